//! The integration suite: the engine as `callnotify serve` processes against Apache
//! Kafka (KRaft) and postfix's `smtp-sink`, with faults: SIGKILLs of engines and of
//! brokers, a mail server outage, poison messages, an engine dying beside another
//! (both group protocols), a rebalance while mails wait, a secured listener, missing
//! topics. Mails are counted by Message-ID.
//!
//! Ignored by `cargo test`: `bash scripts/integration.sh` fetches and starts Kafka
//! (`scripts/kafka.sh`), then runs `cargo test --test integration -- --ignored`.

#[path = "integration/world.rs"]
mod world;

use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use testkit::http::Answer;
use world::*;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// `count` subscribers numbered from `prefix`, the three rules in turn.
fn subscribers(prefix: &str, count: usize) -> Vec<Subscriber> {
    let rules = [Rule::All, Rule::MissedOnly, Rule::DesignatedOnly];
    (0..count).map(|i| Subscriber { number: format!("{prefix}{i:07}"), rule: rules[i % 3] }).collect()
}

/// `count` subscribers numbered from `prefix`, every call notified.
fn every_call_subscribers(prefix: &str, count: usize) -> Vec<Subscriber> {
    (0..count).map(|i| Subscriber { number: format!("{prefix}{i:07}"), rule: Rule::All }).collect()
}

/// Produces `payloads` (key, CDR) to `topic` on a thread of its own, 40 every 200 ms
/// (about 200 a second), so faults can happen while CDRs keep coming.
fn produce_paced(brokers: &str, topic: &str, payloads: Vec<(String, String)>) -> std::thread::JoinHandle<()> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    std::thread::spawn(move || {
        let cdrs = Cdrs::new(&brokers, &topic);
        for batch in payloads.chunks(40) {
            for (key, payload) in batch {
                cdrs.send(key, payload);
            }
            cdrs.flush();
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// A test's directory of stores and engine logs; removed afterwards unless
/// `CALLNOTIFY_IT_KEEP` is set.
struct Workdir {
    path: std::path::PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Workdir {
    fn new(name: &str) -> Self {
        let temp = tempfile::Builder::new().prefix(&format!("it-{name}-")).tempdir().unwrap();
        if std::env::var_os("CALLNOTIFY_IT_KEEP").is_some() {
            let path = temp.keep();
            println!("{name}: stores and engine logs kept in {}", path.display());
            Self { path, temp: None }
        } else {
            Self { path: temp.path().to_owned(), temp: Some(temp) }
        }
    }
}

/// A failed test keeps its stores and engine logs, and shows the end of each log: CI
/// keeps only what a run prints.
impl Drop for Workdir {
    fn drop(&mut self) {
        let Some(temp) = self.temp.take().filter(|_| std::thread::panicking()) else { return };
        let path = temp.keep();
        println!("stores and engine logs of the failed test kept in {}", path.display());
        for engine in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let log = std::fs::read_to_string(engine.path().join("engine.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            println!("--- {} (last {} lines)", engine.path().join("engine.log").display(), tail.len());
            tail.iter().rev().for_each(|line| println!("{line}"));
        }
    }
}

/// A world for one test on the suite's Kafka: its topic (and dead-letter topic), a
/// sink, and an engine spec (classic group protocol).
fn setup(name: &str, partitions: i32, subscribers: &[Subscriber]) -> (PostfixSink, EngineSpec, Workdir) {
    setup_on(&brokers(), name, partitions, subscribers)
}

/// [`setup`] on the cluster at `brokers`.
fn setup_on(
    brokers: &str,
    name: &str,
    partitions: i32,
    subscribers: &[Subscriber],
) -> (PostfixSink, EngineSpec, Workdir) {
    let topic = format!("it-{name}");
    block_on(create_topics(brokers, &[(&topic, partitions), (&dead_letter_topic(&topic), 1)]));
    block_on(create_shared_topics(brokers, &topic, partitions));
    let sink = PostfixSink::start();
    let dir = Workdir::new(name);
    let spec = EngineSpec {
        brokers: brokers.to_owned(),
        topic,
        group: format!("it-{name}"),
        protocol: GroupProtocol::Classic,
        smtp: sink.addr,
        dir: dir.path.join("a"),
        store: None,
    };
    spec.provision(&subscribers.iter().map(Subscriber::line).collect::<Vec<_>>());
    (sink, spec, dir)
}

/// CDRs of the spec's topic its group has committed, over all partitions.
fn committed(spec: &EngineSpec, partitions: i32) -> i64 {
    committed_offsets(spec, partitions).iter().sum()
}

/// The group's committed offset of each partition of the spec's topic (0 where none).
fn committed_offsets(spec: &EngineSpec, partitions: i32) -> Vec<i64> {
    let (group, topic) = (&spec.group, &spec.topic);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
    committed.elements().iter().map(|e| e.offset().to_raw().unwrap_or(0).max(0)).collect()
}

/// The end offset (high watermark) of each partition of the spec's topic.
fn end_offsets(spec: &EngineSpec, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &spec.brokers).create().expect("consumer");
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(&spec.topic, p, Duration::from_secs(10)).expect("watermarks").1)
        .collect()
}

/// Waits until the group has committed the first `total` CDRs of the spec's topic.
fn wait_committed(spec: &EngineSpec, partitions: i32, total: usize) {
    let said = || format!("the group committed {} of {total} CDRs", committed(spec, partitions));
    testkit::wait::blocking_until(WAIT, Duration::from_millis(500), said, || {
        committed(spec, partitions) >= total as i64
    });
}

/// How long after a mail's acceptance a SIGKILL can still find its sent record off disk:
/// an append and `fdatasync` (under a millisecond alone), with room for a loaded machine;
/// far below the second between commits, which a record never written would show.
const UNRECORDED: Duration = Duration::from_millis(250);

/// The mails that arrived twice (never more) and when each first arrived.
fn sent_twice(arrivals: &std::collections::HashMap<String, Vec<SystemTime>>) -> Vec<(&String, SystemTime)> {
    let more: Vec<_> = arrivals.iter().filter(|(_, at)| at.len() > 2).collect();
    assert!(more.is_empty(), "mails sent three times or more: {more:?}");
    arrivals.iter().filter(|(_, at)| at.len() == 2).map(|(id, at)| (id, at[0])).collect()
}

/// The time from `first` (a mail's first arrival) to the next SIGKILL, if one came
/// within [`UNRECORDED`]. The sink's file times and the test's clock are one clock, but
/// a file is written out a little after the acceptance it records: a kill up to 20 ms
/// before the file counts as right after it.
fn before_a_kill(first: SystemTime, kills: &[SystemTime]) -> Option<Duration> {
    let slack = Duration::from_millis(20);
    kills
        .iter()
        .filter_map(|kill| (*kill + slack).duration_since(first).ok())
        .map(|d| d.saturating_sub(slack))
        .filter(|d| *d <= UNRECORDED)
        .min()
}

/// The kill soak's judge of a mail sent twice; runs with `cargo test` (no broker needed).
#[test]
fn a_mail_sent_twice_is_put_down_to_a_kill_only_one_that_came_just_after_it_arrived() {
    let first = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let ms = Duration::from_millis;
    assert_eq!(before_a_kill(first, &[first - ms(900), first + ms(40), first + ms(120)]), Some(ms(40)));
    assert_eq!(before_a_kill(first, &[first - ms(5)]), Some(ms(0)), "its file written just after the kill");
    assert_eq!(before_a_kill(first, &[first - ms(300), first + ms(600)]), None, "a record that never reached disk");
}

/// 20 000 CDRs (about 10 % notify) produced while the engine is SIGKILLed and
/// restarted at once, 20 times at random moments: every expected mail arrives at
/// smtp-sink, and only once, but for what the delivery guarantees (docs/delivery.md, case 1) let
/// a SIGKILL cause: a mail accepted just before it, whose sent record had not reached
/// disk, arrives twice. Each mail that arrives twice is checked against the kill times.
/// Then the group is reset to offset 0 and everything is consumed again: no new mail.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn kill_soak_every_expected_mail_arrives_through_20_sigkills_twice_only_at_a_kill_then_a_replay_sends_nothing() {
    const CDRS: usize = 20_000;
    const KILLS: usize = 20;
    const PARTITIONS: i32 = 4;
    let subs = subscribers("031", 300);
    let (sink, spec, _dir) = setup("soak", PARTITIONS, &subs);
    let mut rng = Rng::from_env("kill soak");

    let mut expected = Vec::new();
    let mut payloads = Vec::with_capacity(CDRS);
    for i in 0..CDRS {
        let call_id = format!("soak-{i}");
        let caller = [Some(DESIGNATED), Some("09000000002"), None][rng.below(3) as usize];
        let answered = rng.below(2) == 0;
        if rng.below(10) == 0 {
            let s = &subs[rng.below(subs.len() as u64) as usize];
            if s.notifies(caller, answered) {
                expected.push(s.message_id(&call_id));
            }
            payloads.push((s.number.clone(), cdr(&call_id, &s.number, caller, answered)));
        } else {
            let nobody = format!("05{:08}", rng.below(100_000_000));
            payloads.push((nobody.clone(), cdr(&call_id, &nobody, caller, answered)));
        }
    }
    println!("kill soak: {CDRS} CDRs, {} mails expected", expected.len());

    // About 200 CDRs a second, for as long as the kills go on.
    let producer = produce_paced(&spec.brokers, &spec.topic, payloads);
    let mut engine = spec.start();
    let mut kills = Vec::with_capacity(KILLS);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(1_000 + rng.below(5_000)));
        kills.push(SystemTime::now());
        engine.kill();
        // Restarted at once, as a supervisor would: the new member joins while the
        // killed one is still in the group, until its session expires.
        engine = spec.start();
    }
    producer.join().unwrap();

    let arrived = sink.wait_for(&expected);
    let (lost, duplicated, unexpected) = tally(&expected, &arrived);
    println!("kill soak: {} arrived; lost {lost}, duplicated {duplicated}, unexpected {unexpected}", arrived.len());
    assert_eq!((lost, unexpected), (0, 0), "every expected mail arrived, nothing else");
    // Delivery guarantees, case 1: a mail the server accepted just before a SIGKILL,
    // whose sent record had not reached disk, is sent again. Any other mail arrives once.
    let arrivals = sink.arrivals();
    let judged: Vec<_> =
        sent_twice(&arrivals).into_iter().map(|(id, first)| (id, before_a_kill(first, &kills))).collect();
    for (id, gap) in &judged {
        match gap {
            Some(gap) => println!("kill soak: {id} sent twice; a SIGKILL came {gap:?} after it first arrived"),
            None => {
                println!("kill soak: {id} sent twice, with no SIGKILL within {UNRECORDED:?} after it first arrived")
            }
        }
    }
    let unexplained: Vec<_> = judged.iter().filter(|(_, gap)| gap.is_none()).map(|(id, _)| id).collect();
    assert!(unexplained.is_empty(), "mails sent twice with no SIGKILL just after their first arrival: {unexplained:?}");

    // Replay: everything committed, the engine stopped, the group back at offset 0.
    wait_committed(&spec, PARTITIONS, CDRS);
    assert!(engine.terminate(), "SIGTERM: drains and exits 0");
    reset_group(&spec.brokers, &spec.group, &spec.topic, PARTITIONS);
    let engine = spec.start();
    engine.wait_metric("callnotify_cdrs_consumed_total", CDRS as f64);
    wait_committed(&spec, PARTITIONS, CDRS);
    assert_eq!(engine.metric("callnotify_mails_duplicate_total"), expected.len() as f64, "each mail found as sent");
    assert_eq!(engine.metric("callnotify_mails_sent_total"), 0.0);
    assert!(engine.terminate());
    assert_eq!(sink.message_ids(), counts(&arrivals), "the replay sent nothing");
}

/// Must-show 3: smtp-sink is stopped for 60 s mid-stream: the partition keeps moving
/// (mails wait in the retry queue), and when the sink is back every mail arrives, none
/// twice.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn smtp_outage_mails_wait_in_the_queue_while_partitions_move_then_all_arrive_once() {
    const PARTITIONS: i32 = 2;
    let outage =
        Duration::from_secs(std::env::var("CALLNOTIFY_IT_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let subs = every_call_subscribers("032", 50);
    let (mut sink, spec, _dir) = setup("outage", PARTITIONS, &subs);
    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    let mut expected = Vec::new();
    let produce = |phase: &str, expected: &mut Vec<String>| {
        for (i, s) in subs.iter().enumerate().cycle().take(100) {
            let call_id = format!("outage-{phase}-{}", expected.len());
            expected.push(s.message_id(&call_id));
            cdrs.send(&s.number, &cdr(&call_id, &s.number, Some("09011112222"), i % 2 == 0));
        }
        cdrs.flush();
    };
    let engine = spec.start();
    produce("before", &mut expected);
    sink.wait_for(&expected);

    sink.stop();
    let stopped = Instant::now();
    produce("during", &mut expected);
    engine.wait_metric("callnotify_retry_queue_mails", 1.0);
    wait_committed(&spec, PARTITIONS, expected.len());
    println!("outage: every CDR committed {:?} into the outage", stopped.elapsed());
    std::thread::sleep(outage.saturating_sub(stopped.elapsed()));
    sink.resume();
    produce("after", &mut expected);

    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "all 300 mails, each once");
    assert!(engine.metric("callnotify_mails_retried_total") >= 100.0);
    assert!(engine.terminate());
}

/// Must-show 5: 1 000 malformed messages among good ones: every good one is notified,
/// every bad one is in the dead-letter topic with its reason.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn poison_messages_go_to_the_dead_letter_topic_and_every_good_cdr_is_notified() {
    const BAD: usize = 1_000;
    let subs = every_call_subscribers("033", 100);
    let (sink, spec, _dir) = setup("poison", 2, &subs);
    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    let poisons = ["{not json", "", "\u{0}\u{1}binary", r#"{"call_id":"x"}"#, r#"{"call_id":"y","called":"03-1234"}"#];
    let mut expected = Vec::new();
    for i in 0..BAD {
        cdrs.send(&format!("bad-{i}"), poisons[i % poisons.len()]);
        if i % 2 == 0 {
            let s = &subs[i % subs.len()];
            let call_id = format!("good-{i}");
            expected.push(s.message_id(&call_id));
            cdrs.send(&s.number, &cdr(&call_id, &s.number, None, false));
        }
    }
    cdrs.flush();
    let engine = spec.start();

    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0));
    let records = read_all(&spec.brokers, &dead_letter_topic(&spec.topic), BAD);
    assert_eq!(records.len(), BAD);
    for r in &records {
        assert_eq!(r["kind"], "cdr", "{r}");
        assert!(!r["reason"].as_str().unwrap_or_default().is_empty(), "{r}");
        assert!(r["raw_base64"].is_string(), "{r}");
    }
    assert_eq!(engine.metric("callnotify_dead_letters_total{kind=\"cdr\"}"), BAD as f64);

    // The operator's view of the same records (`callnotify dead-letters`), on Apache Kafka.
    let out = spec.command().args(["dead-letters", "list", "--json", "--kind", "cdr"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), BAD);
    assert!(listed.iter().all(|l| l["record"]["kind"] == "cdr" && l["replayed"] == false));
    // They do not decode with the topic's format as it stands: a replay would only
    // dead-letter them again, so it holds them back, saying why (R-M4).
    let out = spec.command().args(["dead-letters", "replay", "--dry-run"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && said
                .contains(&format!("would replay 0 CDRs and 0 mails; 0 replayed before, left alone; {BAD} held back")),
        "{said}"
    );
    assert_eq!(
        said.lines().filter(|l| l.starts_with("held back") && l.contains("does not decode as canonical")).count(),
        BAD,
        "{said}"
    );
    assert!(engine.terminate());
}

/// A full disk (docs/delivery.md): the store's file system, a 64 MiB tmpfs,
/// is filled by another writer while CDRs keep coming. The engine stops reading with
/// less than `store.min_free_mb` free, says why on `/readyz` (503; `/healthz`, the
/// liveness probe, stays 200: a restart would not help) and in
/// `callnotify_store_disk_low`, keeps its endpoints up, and once the space is freed reads
/// on by itself: every mail arrives once. It used to write on into the full disk and
/// exit 1 (`No space left on device`), the operator endpoint with it.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_full_disk_pauses_reading_shows_why_and_every_mail_arrives_once_when_space_is_freed() {
    let subs = every_call_subscribers("036", 50);
    let (sink, spec, dir) = setup("disk", 2, &[]);
    let disk = SmallDisk::mount(&dir.path.join("small"), 64);
    let spec = EngineSpec { store: Some(disk.path.join("store")), ..spec };
    spec.provision(&subs.iter().map(Subscriber::line).collect::<Vec<_>>());
    let engine = spec.start_with(&[("CALLNOTIFY__STORE__MIN_FREE_MB", "16")]);
    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    let send = |from: usize, count: usize| -> Vec<String> {
        (from..from + count)
            .map(|i| {
                let s = &subs[i % subs.len()];
                let call_id = format!("disk-{i}");
                cdrs.send(&s.number, &cdr(&call_id, &s.number, Some("09012345678"), false));
                s.message_id(&call_id)
            })
            .collect()
    };

    let before = send(0, 200);
    cdrs.flush();
    assert_eq!(tally(&before, &sink.wait_for(&before)), (0, 0, 0));
    assert_eq!(engine.health(), (200, "ok\n".to_owned()));
    assert_eq!(engine.readiness().0, 200);

    let filler = disk.fill_leaving(8 << 20);
    engine.wait_metric("callnotify_store_disk_low", 1.0);
    let (status, why) = engine.readiness();
    assert_eq!(status, 503, "{why}");
    assert!(why.starts_with("not ready\nstore: ") && why.contains("CDRs are not read until there is room"), "{why}");
    assert_eq!(engine.health(), (200, "ok\n".to_owned()), "alive all the same");
    assert!(why.contains("below store.min_free_mb (16 MiB)"), "{why}");
    // The consumer thread pauses at its next turn (the flag is looked at every second).
    engine.wait_metric("callnotify_consumer_paused{consumer=\"0\"}", 1.0);
    let consumed = engine.metric("callnotify_cdrs_consumed_total");

    // Traffic goes on into the full disk: none of it is read meanwhile.
    let during = send(200, 300);
    cdrs.flush();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(engine.metric("callnotify_cdrs_consumed_total"), consumed, "no CDR read on a low disk");
    let arrived = sink.message_ids();
    assert!(during.iter().all(|id| !arrived.contains_key(id)), "no mail of a CDR sent on a low disk");

    std::fs::remove_file(filler).unwrap();
    engine.wait_metric_until("callnotify_store_disk_low", "fell to 0", |v| v == 0.0);
    let all: Vec<String> = before.into_iter().chain(during).collect();
    assert_eq!(tally(&all, &sink.wait_for(&all)), (0, 0, 0));
    assert_eq!(engine.readiness().0, 200);
    println!("full disk: paused at {consumed} CDRs, 300 sent meanwhile; all 500 mails once after the space was freed");
    assert!(engine.terminate());
    assert!(!spec.log().contains("No space left"), "the store never met the full disk");
    // The consumer properties the suite sets are not handed to the dead-letter producer.
    assert!(!spec.log().contains("CONFWARN"), "{}", spec.log());
}

/// A full disk during `provision import`: sled writes in the background, so the failure
/// shows at a later line than the first one lost (a probe saw line 1495 named when
/// 1494 was not stored either). The import flushes every 20 000 lines and its error
/// names the first line not known to be on disk; given room again, the store opens and
/// has every line before it, and importing the file again completes.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn an_import_into_a_full_disk_names_the_lines_on_disk_and_they_are() {
    let dir = Workdir::new("import-full");
    let disk = SmallDisk::mount(&dir.path.join("small"), 24);
    let store = disk.path.join("store");
    let subs = every_call_subscribers("037", 100_000);
    let file = dir.path.join("lines.jsonl");
    std::fs::write(&file, subs.iter().map(Subscriber::line).collect::<Vec<_>>().join("\n")).unwrap();
    let import = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callnotify"))
            .env("CALLNOTIFY__STORE__PATH", &store)
            .args(["provision", "import"])
            .arg(&file)
            .output()
            .expect("provision import")
    };

    let out = import();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the import cannot fit in 24 MiB: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let from: usize = stderr
        .split("the lines before line ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the error names the lines on disk: {stderr}"));
    assert!(from > 1_000, "some checkpoints passed: {stderr}");

    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=512m"])
        .arg(&disk.path)
        .status()
        .expect("remount");
    assert!(status.success());
    {
        let opened = engine::store::Store::open(&store).expect("the store opens after the full disk");
        for s in &subs[..from - 1] {
            let number = engine::phone::PhoneNumber::parse(&s.number).unwrap();
            assert!(opened.number(&number).unwrap().is_some(), "line of {} said stored, and is not", s.number);
        }
    }
    let again = import();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    println!("import into a full disk: failed naming line {from} as the first not known stored; all before it were");
}

/// Two engines in one group speaking `protocol`, one SIGKILLed mid-stream: the other
/// takes its partitions within the session timeout and a few seconds (printed), and
/// nothing is lost. Each engine has its own store, so CDRs the killed one had sent but
/// not committed are sent again by the other (docs/delivery.md):
/// never more than the CDRs past the group's committed offsets when it died.
fn one_of_two_engines_killed(protocol: GroupProtocol, name: &str, prefix: &str) {
    const PARTITIONS: i32 = 4;
    let subs = every_call_subscribers(prefix, 200);
    let (sink, first, dir) = setup(name, PARTITIONS, &subs);
    let first = EngineSpec { protocol, ..first };
    // The second node starts on an empty store: it learns the subscribers from the
    // state topic the first carried its store into.
    let second = EngineSpec { dir: dir.path.join("b"), ..first.clone() };
    let a = first.start();
    a.wait_serving();
    let b = second.start();

    let mut expected = Vec::new();
    let mut payloads = Vec::new();
    for i in 0..2_000 {
        let s = &subs[i % subs.len()];
        let call_id = format!("{name}-{i}");
        expected.push(s.message_id(&call_id));
        payloads.push((s.number.clone(), cdr(&call_id, &s.number, Some("09011112222"), false)));
    }
    let producer = produce_paced(&first.brokers, &first.topic, payloads);
    // Both engines have partitions and are sending.
    a.wait_metric("callnotify_mails_sent_total", 1.0);
    b.wait_metric("callnotify_mails_sent_total", 1.0);
    let killed = Instant::now();
    a.kill();
    // What the killed engine may have sent without committing: every CDR past the
    // group's committed offsets (the survivor's own uncommitted ones included).
    let uncommitted: i64 = end_offsets(&second, PARTITIONS)
        .iter()
        .zip(committed_offsets(&second, PARTITIONS))
        .map(|(end, done)| end - done)
        .sum();
    b.wait_metric("callnotify_consumer_partitions{consumer=\"0\"}", PARTITIONS as f64);
    let takeover = killed.elapsed();
    producer.join().unwrap();

    let arrived = sink.wait_for(&expected);
    let (lost, duplicated, unexpected) = tally(&expected, &arrived);
    println!(
        "{name} ({protocol:?}): the survivor held all {PARTITIONS} partitions {takeover:?} after the SIGKILL \
         (session timeout {SESSION_TIMEOUT:?}); lost {lost}, sent twice {duplicated} of at most {uncommitted} \
         uncommitted CDRs"
    );
    assert_eq!((lost, unexpected), (0, 0), "nothing lost, nothing but the expected mails");
    assert!(duplicated as i64 <= uncommitted, "only CDRs past the committed offsets are sent again");
    assert!(takeover < SESSION_TIMEOUT + Duration::from_secs(10), "took over in {takeover:?}");
    wait_committed(&second, PARTITIONS, expected.len());
    assert!(b.terminate());
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn classic_protocol_two_engines_one_killed_the_other_takes_over_within_the_session_timeout_nothing_lost() {
    one_of_two_engines_killed(GroupProtocol::Classic, "takeover-classic", "034");
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn consumer_protocol_two_engines_one_killed_the_other_takes_over_within_the_session_timeout_nothing_lost() {
    one_of_two_engines_killed(GroupProtocol::Consumer, "takeover-kip848", "044");
}

/// A second engine joins, speaking `protocol`, while the first has mails waiting for
/// its rate limit. The first queues them and commits before giving partitions up, so
/// the second never reads those CDRs again (each engine has its own store: a CDR read
/// twice would be a mail sent twice) and every mail arrives once.
fn a_member_joins_while_mails_wait(protocol: GroupProtocol, name: &str, prefix: &str) {
    const PARTITIONS: i32 = 4;
    const CALLS: usize = 40;
    let subs = every_call_subscribers(prefix, CALLS);
    let (sink, first, dir) = setup(name, PARTITIONS, &subs);
    let first = EngineSpec { protocol, ..first };
    // The second node starts on an empty store (see above).
    let second = EngineSpec { dir: dir.path.join("b"), ..first.clone() };
    // Two mails a second and 4 s of grace: at the revocation most mails still wait.
    let slow = [("CALLNOTIFY__SMTP__RATE_PER_SECOND", "2"), ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "4")];
    let a = first.start_with(&slow);
    a.wait_serving();
    let cdrs = Cdrs::new(&first.brokers, &first.topic);
    let mut expected = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let call_id = format!("{name}-{i}");
        expected.push(s.message_id(&call_id));
        cdrs.send(&s.number, &cdr(&call_id, &s.number, Some("09011112222"), false));
    }
    cdrs.flush();
    a.wait_metric("callnotify_cdrs_notified_total", CALLS as f64);

    let b = second.start();
    b.wait_metric("callnotify_consumer_partitions{consumer=\"0\"}", 1.0);
    sink.wait_for(&expected);
    let queued = a.metric("callnotify_mails_retried_total");
    let consumed = a.metric("callnotify_cdrs_consumed_total") + b.metric("callnotify_cdrs_consumed_total");
    assert!(a.terminate() && b.terminate());
    let arrived = sink.message_ids();

    let (lost, duplicated, unexpected) = tally(&expected, &arrived);
    println!("{name} ({protocol:?}): {queued} mails queued at the revocation, {consumed} CDRs read in all");
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0), "every mail once");
    assert!(queued >= 1.0, "the revocation came while the first engine had mails waiting");
    assert_eq!(consumed, CALLS as f64, "no CDR was read twice");
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn classic_protocol_a_revoked_partition_s_waiting_mails_are_queued_and_committed_so_the_new_owner_reads_nothing_twice()
{
    a_member_joins_while_mails_wait(GroupProtocol::Classic, "revoke-classic", "035");
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn consumer_protocol_a_revoked_partition_s_waiting_mails_are_queued_and_committed_so_the_new_owner_reads_nothing_twice()
{
    a_member_joins_while_mails_wait(GroupProtocol::Consumer, "revoke-kip848", "045");
}

/// `callnotify_offsets_skipped_total`: an engine whose group committed offset 5 of a
/// batch of ten CDRs reads every CDR from there on, or counts each one the broker
/// passed over, so an operator sees CDRs lost to the broker. Kafka hands out the whole
/// batch and librdkafka drops the records before the offset: none is passed over.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn an_engine_resuming_inside_a_batch_reads_every_cdr_from_its_committed_offset_on() {
    let (_sink, spec, _dir) = setup("skip", 1, &[]);
    let batched = Cdrs::batched(&spec.brokers, &spec.topic);
    let send_ten = |first: usize| {
        for i in first..first + 10 {
            let nobody = format!("05{i:08}");
            batched.send(&nobody, &cdr(&format!("skip-{i}"), &nobody, None, false));
        }
        batched.flush();
    };
    send_ten(0);
    commit_group_at(&spec.brokers, &spec.group, &spec.topic, 1, 5);
    let engine = spec.start();
    send_ten(10);
    wait_committed(&spec, 1, 20);
    let read = engine.metric("callnotify_cdrs_consumed_total");
    let skipped = engine.metric("callnotify_offsets_skipped_total");
    println!("resume inside a batch: {read} CDRs read, {skipped} offsets skipped by the broker");
    assert!(engine.terminate());
    assert_eq!((read, skipped), (15.0, 0.0), "every offset from 5 on read, none passed over");
}

/// Starts an engine whose `missing` topic (named by config key `key`) does not exist:
/// it exits non-zero within 15 s with an error naming both, and the topic is still not
/// there (the suite's Kafka creates topics on request; the engine asks for none).
fn refused_at_start_for_a_missing_topic(spec: &EngineSpec, missing: &str, key: &str) {
    let started = Instant::now();
    let engine = spec.start();
    let status = engine.wait_exit(Duration::from_secs(15)).expect("serve exits within 15 s");
    let took = started.elapsed();
    let log = spec.log();
    println!("missing {key}: exit {status} after {took:?}");
    assert!(!status.success(), "a non-zero exit: {log}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("an error line: {log}"));
    assert!(error.contains(&format!("\"{missing}\"")) && error.contains(key), "{error}");
    let client: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &spec.brokers).create().expect("client");
    let metadata = client.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    assert!(metadata.topics().iter().all(|t| t.name() != missing), "the check created {missing}");
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn serve_with_a_missing_cdr_topic_exits_at_start_naming_the_topic_and_kafka_topics() {
    // The work directory is kept to the end (the engine makes its store there), then removed.
    let (_sink, spec, _dir) = setup("missing-cdr", 1, &[]);
    let spec = EngineSpec { topic: "it-no-such-cdr-topic".into(), ..spec };
    block_on(create_topics(&spec.brokers, &[(&dead_letter_topic(&spec.topic), 1)]));
    refused_at_start_for_a_missing_topic(&spec, &spec.topic, "kafka.topics");
}

#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn serve_with_a_missing_dead_letter_topic_exits_at_start_naming_the_topic_and_its_key() {
    let (_sink, spec, _dir) = setup("missing-dl", 1, &[]);
    let spec = EngineSpec { topic: "it-no-dead-letters".into(), ..spec };
    block_on(create_topics(&spec.brokers, &[(&spec.topic, 1)]));
    refused_at_start_for_a_missing_topic(&spec, &dead_letter_topic(&spec.topic), "kafka.dead_letter_topic");
}

/// The dead-letter topic disappears while the engine runs: a poison CDR's record cannot
/// be written. Within seconds that is logged at ERROR with the topic and counted; the
/// CDR stays uncommitted; once the topic is back the record is written and the CDR
/// committed. Nothing is lost.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_dead_letter_write_that_fails_is_logged_counted_and_retried_and_its_cdr_waits_for_it() {
    let (_sink, spec, _dir) = setup("dl-gone", 1, &[]);
    let engine = spec.start();
    engine.wait_metric("callnotify_consumer_partitions{consumer=\"0\"}", 1.0);
    let dead = dead_letter_topic(&spec.topic);
    block_on(delete_topic(&spec.brokers, &dead));

    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    cdrs.send("bad-0", "{not json");
    cdrs.flush();
    engine.wait_metric("callnotify_dead_letter_write_errors_total{kind=\"cdr\"}", 1.0);
    let log = spec.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains(&dead) && l.contains("dead-letter record not written")),
        "{log}"
    );
    assert_eq!(committed(&spec, 1), 0, "the CDR is not committed before its dead letter is written");
    assert_eq!(engine.metric("callnotify_dead_letters_total{kind=\"cdr\"}"), 0.0);

    block_on(create_topics(&spec.brokers, &[(&dead, 1)]));
    engine.wait_metric("callnotify_dead_letters_total{kind=\"cdr\"}", 1.0);
    wait_committed(&spec, 1, 1);
    let records = read_all(&spec.brokers, &dead, 1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["raw_base64"], "e25vdCBqc29u", "the poison CDR's bytes");
    println!(
        "dead-letter topic gone: {} failed writes before it was back",
        engine.metric("callnotify_dead_letter_write_errors_total{kind=\"cdr\"}")
    );
    assert!(engine.terminate());
}

/// On a cluster of three nodes (replication 3, `min.insync.replicas` 2): the leader of
/// a CDR partition is SIGKILLed mid-stream and restarted 10 s later, then the leader of
/// the dead-letter topic: every mail arrives once, every dead letter is written, and
/// the longest pause between mails is printed.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn three_nodes_the_cdr_and_dead_letter_leaders_killed_and_restarted_no_mail_or_dead_letter_lost() {
    const PARTITIONS: i32 = 4;
    const CDRS: usize = 4_000;
    let cluster = KafkaCluster::start(3, &[]);
    let subs = every_call_subscribers("036", 100);
    let (sink, spec, _dir) = setup_on(&cluster.bootstrap, "cluster", PARTITIONS, &subs);
    let mut expected = Vec::new();
    let mut payloads = Vec::with_capacity(CDRS);
    for i in 0..CDRS {
        if i % 10 == 9 {
            payloads.push((format!("bad-{i}"), format!("{{not json {i}")));
            continue;
        }
        let s = &subs[i % subs.len()];
        let call_id = format!("cluster-{i}");
        expected.push(s.message_id(&call_id));
        payloads.push((s.number.clone(), cdr(&call_id, &s.number, None, false)));
    }
    let bad = CDRS - expected.len();
    let engine = spec.start();
    let producer = produce_paced(&spec.brokers, &spec.topic, payloads);
    engine.wait_metric("callnotify_mails_sent_total", 50.0);

    let mut kills = Vec::new();
    for topic in [spec.topic.clone(), dead_letter_topic(&spec.topic)] {
        let leader = cluster.leader(&topic, 0);
        kills.push(SystemTime::now());
        cluster.kill_node(leader);
        println!("cluster: node {leader}, leader of {topic}/0, SIGKILLed");
        std::thread::sleep(Duration::from_secs(10));
        cluster.start_node(leader);
        println!("cluster: node {leader} restarted; {topic}/0 is now led by node {}", cluster.leader(&topic, 0));
    }
    producer.join().unwrap();

    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "every mail once");
    wait_committed(&spec, PARTITIONS, CDRS);
    // A dead-letter write confirmed too late (its leader killed) is sent again, and
    // both may be kept: records are told apart by the CDR's partition and offset.
    let poison_cdrs = |records: &[serde_json::Value]| -> std::collections::HashSet<(i64, i64)> {
        records.iter().map(|r| (r["partition"].as_i64().unwrap(), r["offset"].as_i64().unwrap())).collect()
    };
    let records = read_until(&spec.brokers, &dead_letter_topic(&spec.topic), |r| poison_cdrs(r).len() >= bad);
    assert_eq!(poison_cdrs(&records).len(), bad, "every poison CDR dead-lettered");
    let mut times: Vec<SystemTime> = sink.arrivals().into_values().flatten().collect();
    times.sort();
    let (pause, after) =
        times.windows(2).map(|w| (w[1].duration_since(w[0]).unwrap_or_default(), w[0])).max().expect("mails arrived");
    let since_kills: Vec<String> = kills
        .iter()
        .enumerate()
        .filter_map(|(n, kill)| Some(format!("{:?} after kill {}", after.duration_since(*kill).ok()?, n + 1)))
        .collect();
    // The pause is what subscribers saw: the test's producer waits for each new
    // partition leader too (it flushes every 40 CDRs), so it includes that wait.
    println!(
        "cluster: {} mails, {} poison CDRs dead-lettered ({} records written); the longest pause between mails \
         {pause:?}, from {}",
        expected.len(),
        bad,
        records.len(),
        if since_kills.is_empty() { "before the kills".to_owned() } else { since_kills.join(", ") }
    );
    assert!(engine.terminate());
}

/// docs/cluster.md, a write the state topic refuses for good (here every record is
/// larger than the topic's `max.message.bytes`): the owner stops its node, and the import
/// waiting for the write is told at once that this node stops and why, instead of
/// waiting out its 60 s while the engine's stop waited for it past its deadline.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_state_write_the_topic_refuses_stops_the_node_and_its_waiting_import_is_told_why_at_once() {
    let topic = "it-refused";
    let [state, ..] = shared_topics(topic);
    block_on(create_topic_with(&brokers(), &state, 1, &[("max.message.bytes", "64")]));
    let (_sink, spec, _dir) = setup("refused", 1, &[]);
    let engine = spec.start();
    engine.wait_serving();

    let file = spec.dir.join("refused.jsonl");
    std::fs::write(&file, every_call_subscribers("0374", 1)[0].line()).unwrap();
    let out = spec.command().args(["provision", "import"]).arg(&file).args(["--url", &engine.url()]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    println!("state write refused: the import said: {said}");
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("this node stops (publishing subscriber state failed"), "{said}");
    let status = engine.wait_exit(WAIT).expect("the node stops by itself");
    assert!(!status.success(), "the node's exit says it failed");
    let log = spec.log();
    assert!(log.contains("publishing subscriber state failed"), "{log}");
    assert!(!log.contains("the stop took longer than"), "the node stops within its deadline: {log}");
}

/// docs/cluster.md, a broker's loss under the state owner: on a cluster of three nodes,
/// the broker holding the state topic's only replica is SIGKILLed, and a subscriber is
/// provisioned through the engine while that broker stays down for 20 s: longer than the
/// owner used to wait for a publish (10 s, after which it stopped its node). The import
/// is confirmed once the broker is back, the engine keeps running, and the new
/// subscriber's call is notified (R-N2). Then the broker is lost again and the engine
/// stopped while an import waits: it stops cleanly, the import is told, and the next
/// start rebuilds the store from the topic.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_state_write_while_the_state_topic_s_broker_is_down_waits_for_it_and_the_node_keeps_running() {
    const OUTAGE: Duration = Duration::from_secs(20);
    let cluster = KafkaCluster::start(3, &[]);
    let topic = "it-offline";
    let [state, requests, ..] = shared_topics(topic);
    // The state topic on node 3 alone, the requests led by node 1: node 3's loss makes
    // the state topic unwritable until it returns, and nothing else.
    block_on(create_topic_on(
        &cluster.bootstrap,
        &state,
        &[3],
        &[("cleanup.policy", "compact"), ("min.insync.replicas", "1")],
    ));
    block_on(create_topic_on(&cluster.bootstrap, &requests, &[1, 2, 3], &[]));
    let (sink, spec, _dir) = setup_on(&cluster.bootstrap, "offline", 2, &[]);
    let engine = spec.start();
    engine.wait_serving();
    let [before, during] = <[Subscriber; 2]>::try_from(every_call_subscribers("0372", 2)).ok().unwrap();
    // The owner has caught up and published before the loss.
    spec.provision_through(&engine, &[before.line()]);

    cluster.kill_node(3);
    let down = Instant::now();
    std::thread::scope(|scope| {
        let import = scope.spawn(|| spec.provision_through(&engine, &[during.line()]));
        std::thread::sleep(OUTAGE);
        assert!(!import.is_finished(), "the import waits while the state topic cannot be written");
        cluster.start_node(3);
        import.join().expect("the import through the engine is confirmed once the broker is back");
    });
    println!("state topic's broker down for {OUTAGE:?}: the import was confirmed {:?} after the kill", down.elapsed());
    // What the operator's CallnotifyErrors alert sees: the writes stalled.
    let stalled = engine.metric("callnotify_errors_total{stage=\"state\",error=\"stalled\"}");
    assert!(stalled >= 1.0, "the stall is counted: {stalled}");

    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    let mut expected: Vec<String> = [&before, &during]
        .iter()
        .map(|s| {
            let call_id = format!("offline-{}", s.number);
            cdrs.send(&s.number, &cdr(&call_id, &s.number, None, false));
            s.message_id(&call_id)
        })
        .collect();
    cdrs.flush();
    assert_eq!(
        tally(&expected, &sink.wait_for(&expected)),
        (0, 0, 0),
        "both subscribers notified, the one imported during the outage too"
    );

    // The broker lost again, an import under way, and the engine stopped: the import is
    // told its lines may not be written, the engine exits cleanly within its grace period,
    // and its next start rebuilds the store from the state topic.
    const PUBLISHING: &str = "has not confirmed the owner's writes yet";
    const CATCHING_UP: &str = "could not read the previous owner's writes yet";
    let logged_before = |text: &str| spec.log().matches(text).count();
    let (publishing, catching_up) = (logged_before(PUBLISHING), logged_before(CATCHING_UP));
    cluster.kill_node(3);
    let file = spec.dir.join("stopped.jsonl");
    std::fs::write(&file, every_call_subscribers("0373", 1)[0].line()).unwrap();
    let import = spec.start_import_through(&engine, &file);
    // The owner waits for the topic to confirm its writes, or (when the broker's loss
    // moved the owner's group coordinator, and the partition with it) to read the topic
    // before it carries out anything.
    spec.wait_logged("the owner waiting", || {
        logged_before(PUBLISHING) > publishing || logged_before(CATCHING_UP) > catching_up
    });
    let wrote = logged_before(PUBLISHING) > publishing;
    let stopping = Instant::now();
    assert!(engine.terminate(), "the engine stops cleanly while the state topic cannot be written: {}", spec.log());
    let stopped = stopping.elapsed();
    let out = import.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    println!("stopped while the owner waited: exit 0 after {stopped:?}; the import said: {said}");
    assert!(!out.status.success() && said.contains("may or may not be carried out"), "{said}");
    cluster.start_node(3);
    let engine = spec.start();
    engine.wait_serving();
    // Only an owner that had written its store rebuilds it.
    assert_eq!(spec.log().contains("rebuilding it from the topic"), wrote, "the store rebuilt: {}", spec.log());
    let call_id = format!("after-{}", before.number);
    cdrs.send(&before.number, &cdr(&call_id, &before.number, None, false));
    cdrs.flush();
    expected.push(before.message_id(&call_id));
    assert_eq!(tally(&expected, &sink.wait_for(&expected)), (0, 0, 0), "notified from the rebuilt store");
    assert!(engine.terminate(), "the engine ran on and stops cleanly: {}", spec.log());
}

/// docs/cluster.md, a broker's loss under the state owner: a new owner announces itself
/// before it writes anything. With one of the state topic's two replicas lost (and
/// `min.insync.replicas` 2), the topic is read but not written: the announcement waits.
/// The engine stopped then has written nothing the topic lacks, so its next start keeps
/// its store instead of rebuilding it (minutes at carrier scale). Before: the stop marked
/// the store, and the next start rebuilt it.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_node_stopped_while_a_new_owner_s_announcement_waits_keeps_its_store() {
    let cluster = KafkaCluster::start(3, &[]);
    let topic = "it-announcing";
    let [state, ..] = shared_topics(topic);
    block_on(create_topic_on(
        &cluster.bootstrap,
        &state,
        &[2, 3],
        &[("cleanup.policy", "compact"), ("min.insync.replicas", "2")],
    ));
    let (_sink, spec, _dir) = setup_on(&cluster.bootstrap, "announcing", 1, &[]);
    // The node lost before the engine starts, and every leader (group coordinators too)
    // moved off it: the engine's owner becomes one on a cluster that answers, and its
    // only wait is the announcement's.
    cluster.kill_node(3);
    let topics = ["__consumer_offsets", &spec.topic, &dead_letter_topic(&spec.topic)];
    let shared = shared_topics(&spec.topic);
    testkit::wait::blocking_until(
        WAIT,
        Duration::from_millis(200),
        || "leaders still on the lost node".into(),
        || topics.iter().copied().chain(shared.iter().map(String::as_str)).all(|t| !cluster.leads(3, t)),
    );
    let engine = spec.start();
    engine.wait_serving();

    let file = spec.dir.join("announcing.jsonl");
    std::fs::write(&file, every_call_subscribers("0375", 1)[0].line()).unwrap();
    let import = spec.start_import_through(&engine, &file);
    spec.wait_logged("the announcement waiting", || spec.log().contains("has not confirmed the owner's writes yet"));
    assert!(!spec.log().contains("the state owner announced itself"), "{}", spec.log());
    assert!(engine.terminate(), "the engine stops cleanly: {}", spec.log());
    let out = import.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("may or may not be carried out"), "{said}");

    let engine = spec.start();
    engine.wait_serving();
    assert!(!spec.log().contains("rebuilding it from the topic"), "the store kept: {}", spec.log());
    assert!(engine.terminate(), "{}", spec.log());
}

/// A test CA and a server certificate for 127.0.0.1, made with openssl, in a directory
/// as `scripts/kafka.sh start --sasl-ssl DIR` wants it.
fn test_certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=callnotify-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null"#;
    let status = std::process::Command::new("bash").args(["-c", script]).current_dir(dir.path()).status();
    assert!(status.expect("bash").success(), "openssl made the test CA");
    dir
}

/// The engine on a SASL_SSL listener with SCRAM-SHA-512, trusting a CA the test made:
/// it notifies as on plaintext. With a wrong password it stops at start, within the
/// check's wait, with an error that says authentication failed. Neither password shows
/// in either log.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn sasl_ssl_scram_sha_512_notifies_and_wrong_credentials_are_a_clear_error_at_start() {
    const PASSWORD: &str = "s3cret-Pw-4-engine";
    const WRONG: &str = "wrong-Pw-guessed";
    let certs = test_certificates();
    let cluster = KafkaCluster::start(
        1,
        &["--sasl-ssl", certs.path().to_str().unwrap(), "--scram", &format!("engine:{PASSWORD}")],
    );
    let subs = every_call_subscribers("037", 5);
    let (sink, plain, dir) = setup_on(&cluster.bootstrap, "sasl", 1, &subs);
    let spec = EngineSpec { brokers: cluster.file("bootstrap-sasl-ssl"), ..plain.clone() };
    let ca = certs.path().join("ca.pem");
    let secured = |password: &'static str| {
        [
            ("CALLNOTIFY__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
            ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_USERNAME", "engine"),
            ("CALLNOTIFY__KAFKA__PROPERTIES__SASL_PASSWORD", password),
            ("CALLNOTIFY__KAFKA__PROPERTIES__SSL_CA_LOCATION", ca.to_str().unwrap()),
        ]
    };

    let engine = spec.start_with(&secured(PASSWORD));
    let cdrs = Cdrs::new(&cluster.bootstrap, &spec.topic);
    let mut expected = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let call_id = format!("sasl-{i}");
        expected.push(s.message_id(&call_id));
        cdrs.send(&s.number, &cdr(&call_id, &s.number, None, false));
    }
    cdrs.flush();
    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "notified over SASL_SSL");
    assert!(engine.terminate());

    let wrong = EngineSpec { dir: dir.path.join("b"), ..spec.clone() };
    let started = Instant::now();
    let refused = wrong.start_with(&secured(WRONG));
    let status = refused.wait_exit(Duration::from_secs(30)).expect("serve exits, no hang");
    let log = wrong.log();
    println!("wrong password: exit {status} after {:?}", started.elapsed());
    assert!(!status.success());
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("an error line: {log}"));
    assert!(error.contains("SASL authentication") && error.contains("SCRAM-SHA-512"), "{error}");
    for log in [spec.log(), log] {
        assert!(!log.contains(PASSWORD) && !log.contains(WRONG), "a password in the log: {log}");
    }
}

/// Three engine nodes, each on an empty store of its own, one group (docs/cluster.md):
/// subscribers provisioned through node A, their destinations changed through node B,
/// and the calls, read by all three nodes, go to the new destinations (R-L3, R-N2);
/// then a fourth node started alone on an empty store catches up before it serves and
/// notifies by the same settings.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn three_nodes_share_subscribers_changed_through_any_node_and_a_fourth_catches_up() {
    const PARTITIONS: i32 = 6;
    let subs = every_call_subscribers("0371", 30);
    let (sink, a, dir) = setup("nodes", PARTITIONS, &[]);
    let specs: Vec<EngineSpec> =
        ["a", "b", "c", "d"].iter().map(|n| EngineSpec { dir: dir.path.join(n), ..a.clone() }).collect();
    let nodes: Vec<EngineProcess> = specs[..3].iter().map(EngineSpec::start).collect();
    nodes.iter().for_each(EngineProcess::wait_serving);
    specs[0].provision_through(&nodes[0], &subs.iter().map(Subscriber::line).collect::<Vec<_>>());
    let moved = |s: &Subscriber| format!("moved{}@it.example.jp", s.number);
    let changed: Vec<String> =
        subs.iter().map(|s| testkit::line::Subscriber::new(&s.number, &[(&moved(s), true)]).line()).collect();
    specs[1].provision_through(&nodes[1], &changed);
    // The change is confirmed once B shows it; the others apply it within their
    // propagation time (BENCHMARKS.md), and a call read before that goes by the old
    // settings. This test is about where calls go after the change: every node first
    // shows as much of the state topic as B does (the lag metric operators compare).
    let written = nodes[1].metric("callnotify_state_applied_offset");
    for node in &nodes {
        node.wait_metric_until("callnotify_state_applied_offset", "reached the writer's", |v| v >= written);
    }
    // Every node reads calls: serving is not holding partitions yet (the provisioning
    // above can be done before the group has shared them).
    for node in &nodes {
        node.wait_metric_until("callnotify_consumer_partitions{consumer=\"0\"}", "above 0", |v| v > 0.0);
    }

    let cdrs = Cdrs::new(&a.brokers, &a.topic);
    let message_id = |s: &Subscriber, call_id: &str| {
        let to = engine::address::DestinationAddress::parse(&moved(s)).unwrap();
        engine::render::call_message_id(&s.number, call_id, testkit::cdr::call_end(), &to, FROM_DOMAIN)
    };
    let call = |round: &str, expected: &mut Vec<String>| {
        for (i, s) in subs.iter().enumerate() {
            let call_id = format!("nodes-{round}-{i}");
            expected.push(message_id(s, &call_id));
            cdrs.send(&s.number, &cdr(&call_id, &s.number, Some("09011112222"), false));
        }
        cdrs.flush();
    };
    let mut expected = Vec::new();
    call("1", &mut expected);
    call("2", &mut expected);
    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "every call notified once, at the address set through B");
    let sent: Vec<f64> = nodes.iter().map(|n| n.metric("callnotify_mails_sent_total")).collect();
    println!("three nodes: mails sent by each {sent:?}");
    assert!(sent.iter().all(|&n| n > 0.0), "every node read calls and notified: {sent:?}");
    for node in nodes {
        assert!(node.terminate());
    }

    let started = Instant::now();
    let fourth = specs[3].start();
    fourth.wait_serving();
    let caught_up = specs[3].log().lines().find(|l| l.contains("subscriber state caught up")).map(str::to_owned);
    println!("fourth node: serving {:?} after its start; {}", started.elapsed(), caught_up.clone().unwrap_or_default());
    assert!(caught_up.is_some(), "the fourth node says it caught up: {}", specs[3].log());
    call("3", &mut expected);
    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "the fourth node notifies by the settings changed through B");
    assert!(fourth.terminate());
}

/// In-process engine nodes on the suite's Kafka (their stores under `dir`), for what is
/// measured or counted through the store's own API, and the runtime they run on.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    nodes: Vec<engine::startup::Application>,
}

impl InProcess {
    fn start(spec: &EngineSpec, dir: &std::path::Path, count: usize) -> Self {
        let mut cluster = Self { runtime: tokio::runtime::Runtime::new().unwrap(), nodes: Vec::new() };
        for _ in 0..count {
            cluster.add(spec, dir);
        }
        cluster
    }

    /// Starts one more node, on an empty store of its own; it serves once caught up.
    fn add(&mut self, spec: &EngineSpec, dir: &std::path::Path) -> &engine::startup::Application {
        let store = dir.join(format!("node-{}", self.nodes.len()));
        let settings = spec.settings(&[("CALLNOTIFY__STORE__PATH", &store.display().to_string())]);
        let node = self.runtime.block_on(engine::startup::Application::build(settings)).expect("node starts");
        self.nodes.push(node);
        self.nodes.last().expect("just added")
    }

    /// Serves node `i`'s settings site on a loopback port, as `callnotify serve` does.
    fn serve_site(&self, i: usize) -> std::net::SocketAddr {
        let store = self.nodes[i].store().clone();
        self.runtime.block_on(async move {
            let credentials = admin::credentials::Credentials::open(&store).expect("credentials");
            let site = admin::site::SiteState::new(store, credentials, admin::clock::SystemClock::shared());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            tokio::spawn(async move { axum::serve(listener, admin::site::router(site)).await.expect("site") });
            addr
        })
    }

    /// One request to a site this runtime serves.
    fn http(&self, site: std::net::SocketAddr, method: &str, path: &str, cookies: &str, form: Option<&str>) -> Answer {
        self.runtime.block_on(testkit::http::request(site, method, path, cookies, form))
    }

    /// Stops every node, as SIGTERM does, all at once as an operator stops a cluster.
    /// One after another, each node's leaving made the ones still running rebalance, and
    /// a stop that came while its node rejoined waited for that: once, on the loaded CI
    /// machine, past the stop's deadline.
    fn stop(self) {
        let Self { runtime, nodes } = self;
        runtime.block_on(async {
            let mut stopping = tokio::task::JoinSet::new();
            for node in nodes {
                stopping.spawn(node.run_until_stopped(std::future::ready(())));
            }
            while let Some(stopped) = stopping.join_next().await {
                stopped.expect("a node's stop").expect("node stops");
            }
        });
    }
}

/// docs/cluster.md on Apache Kafka, through the settings site: three in-process nodes,
/// each with its own store and site, one group reading three partitions. A subscriber
/// provisioned through node A changes their destination on node B's site (R-N2, R-S9:
/// the form carries its version); calls read by every node go to the new address only.
/// The session serves pages on nodes A and C, and a logout on C ends it on A and B
/// (R-S7). A fourth node started on an empty store catches up, shows the new setting,
/// takes the password (R-S1) and refuses a wrong one.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn three_nodes_a_destination_changed_on_b_s_site_governs_every_node_and_a_session_works_on_all() {
    const PARTITIONS: i32 = 3;
    const NUMBER: &str = "0375000001";
    const PASSWORD: &str = "kumo2026sora";
    const NEW: &str = "hanako@it.example.jp";
    let (sink, spec, dir) = setup("site-nodes", PARTITIONS, &[]);
    let mut cluster = InProcess::start(&spec, &dir.path, 3);
    let sites: Vec<std::net::SocketAddr> = (0..3).map(|i| cluster.serve_site(i)).collect();
    let (a, b, c) = (sites[0], sites[1], sites[2]);
    let store = cluster.nodes[0].store().clone();
    let line = testkit::line::Subscriber::new(NUMBER, &[("taro@it.example.jp", true)]).line();
    engine::provision::import(&store, line.as_bytes()).expect("import through node A");
    let number = engine::phone::PhoneNumber::parse(NUMBER).unwrap();
    let credentials = admin::credentials::Credentials::open(&store).expect("credentials");
    credentials.set_password(&number, PASSWORD, chrono::Utc::now()).expect("password through node A");

    let login = |cluster: &InProcess, site, password: &str| {
        let form = cluster.http(site, "GET", "/login", "", None);
        let body = format!("number={NUMBER}&password={password}&csrf={}", form.csrf());
        cluster.http(site, "POST", "/login", &form.cookie_header(), Some(&body))
    };
    let logged_in = login(&cluster, b, PASSWORD);
    assert_eq!((logged_in.status, logged_in.location.as_deref()), (303, Some("/")), "{}", logged_in.body);
    let session = logged_in.cookie_header();
    let path = format!("/numbers/{NUMBER}/call");
    let page = cluster.http(b, "GET", &path, &session, None);
    assert_eq!(page.status, 200, "{}", page.body);
    let version = page.body.split("name=\"version\" value=\"").nth(1).and_then(|v| v.split('"').next()).unwrap();
    let form = format!(
        "csrf={}&version={version}&enabled=on&dest_0={}&send_0=on&current={PASSWORD}",
        page.csrf(),
        NEW.replace('@', "%40")
    );
    let saved = cluster.http(b, "POST", &path, &session, Some(&form));
    assert_eq!((saved.status, saved.location), (303, Some(format!("{path}?saved=1"))), "{}", saved.body);
    // Confirmed once B shows it; a call read by another node before that node applied
    // it (its propagation time, BENCHMARKS.md) goes by the old settings: the calls come
    // once every node shows the new destination.
    for node in &cluster.nodes {
        let shown = || {
            node.store()
                .number(&number)
                .unwrap()
                .is_some_and(|r| r.call.destinations.iter().any(|d| d.address.to_string() == NEW))
        };
        testkit::wait::blocking_until(WAIT, Duration::from_millis(10), || format!("{NEW} never shown"), shown);
    }

    // Every node reads calls: the CDRs' keys spread them over the three partitions.
    let deadline = Instant::now() + WAIT;
    let reading = |n: &engine::startup::Application| {
        n.metrics().value("callnotify_consumer_partitions{consumer=\"0\"}").unwrap_or(0.0) > 0.0
    };
    while !cluster.nodes.iter().all(reading) {
        assert!(Instant::now() < deadline, "the partitions were never shared by all three nodes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cdrs = Cdrs::new(&spec.brokers, &spec.topic);
    let to = engine::address::DestinationAddress::parse(NEW).unwrap();
    let mut expected = Vec::new();
    for i in 0..30 {
        let call_id = format!("site-nodes-{i}");
        expected.push(engine::render::call_message_id(NUMBER, &call_id, testkit::cdr::call_end(), &to, FROM_DOMAIN));
        cdrs.send(&format!("key-{i}"), &cdr(&call_id, NUMBER, Some("09011112222"), false));
    }
    cdrs.flush();
    let arrived = sink.wait_for(&expected);
    let sent: Vec<f64> =
        cluster.nodes.iter().map(|n| n.metrics().value("callnotify_mails_sent_total").unwrap_or(0.0)).collect();
    println!("site on three nodes: mails sent by each {sent:?}");
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "every call notified once, at the address saved on B");
    assert!(sent.iter().all(|&n| n > 0.0), "every node read calls and notified: {sent:?}");

    for (node, site) in [("A", a), ("C", c)] {
        let menu = cluster.http(site, "GET", "/", &session, None);
        assert_eq!(menu.status, 200, "node {node} serves the session: {:?} {}", menu.location, menu.body);
        assert!(menu.body.contains(NUMBER), "node {node} shows the subscriber's page");
    }
    let menu = cluster.http(c, "GET", "/", &session, None);
    let out = cluster.http(c, "POST", "/logout", &session, Some(&format!("csrf={}", menu.csrf())));
    assert_eq!(out.status, 303, "logged out on node C: {}", out.body);
    for (node, site) in [("A", a), ("B", b)] {
        let after = cluster.http(site, "GET", "/", &session, None);
        assert_eq!((after.status, after.location.as_deref()), (303, Some("/login?notice=ended")), "node {node}");
    }

    let started = Instant::now();
    cluster.add(&spec, &dir.path);
    println!("fourth node: serving {:?} after its start", started.elapsed());
    let d = cluster.serve_site(3);
    let wrong = login(&cluster, d, "wrong2026pass");
    assert_eq!((wrong.status, wrong.location), (200, None), "a wrong password is refused on the fourth node");
    let logged_in = login(&cluster, d, PASSWORD);
    assert_eq!((logged_in.status, logged_in.location.as_deref()), (303, Some("/")), "{}", logged_in.body);
    let page = cluster.http(d, "GET", &path, &logged_in.cookie_header(), None);
    assert!(page.body.contains(NEW), "the fourth node shows the destination saved on B");
    cluster.stop();
}

/// R-S2, R-S3 on Apache Kafka: wrong entries spread round robin over three nodes lock a
/// password after exactly ten and a temporary password after exactly three; thirty at
/// once from three nodes count ten, never more.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn three_nodes_wrong_passwords_round_robin_and_at_once_lock_after_exactly_the_rule_s_count() {
    use engine::store::state::Attempt;
    use engine::store::{CredentialKind, CredentialRecord};
    let (_sink, spec, dir) = setup("lockout", 1, &[]);
    let cluster = InProcess::start(&spec, &dir.path, 3);
    let stores: Vec<engine::store::Store> = cluster.nodes.iter().map(|n| n.store().clone()).collect();
    let numbers = ["0372000001", "0372000002", "0372000003"];
    let lines: Vec<String> =
        numbers.iter().map(|n| testkit::line::Subscriber::new(n, &[("x@it.example.jp", true)]).line()).collect();
    engine::provision::import(&stores[0], lines.join("\n").as_bytes()).expect("import through node 0");
    let number = |i: usize| engine::phone::PhoneNumber::parse(numbers[i]).unwrap();
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";
    let record = |kind| CredentialRecord {
        hash: hash.into(),
        kind,
        set_at: chrono::Utc::now(),
        failures: 0,
        invalidated: false,
    };
    for (i, kind) in [CredentialKind::Password, CredentialKind::Temporary].into_iter().enumerate() {
        stores[(i + 1) % 3].set_credential(&number(i), &record(kind)).unwrap();
        let outcomes: Vec<Attempt> = (0..kind.max_failures() as usize + 2)
            .map(|t| stores[t % 3].login_attempt(&number(i), hash, false, chrono::Utc::now()).unwrap())
            .collect();
        let locked_at = outcomes.iter().position(|o| matches!(o, Attempt::Wrong { locked: true, .. }));
        println!("{kind:?}: {outcomes:?}");
        assert_eq!(locked_at, Some(kind.max_failures() as usize - 1), "locked by entry {}", kind.max_failures());
        assert!(outcomes[kind.max_failures() as usize..].iter().all(|o| *o == Attempt::Locked));
    }
    stores[0].set_credential(&number(2), &record(CredentialKind::Password)).unwrap();
    let started = Instant::now();
    let racing: Vec<_> = (0..30)
        .map(|t| {
            let store = stores[t % 3].clone();
            let n = number(2);
            std::thread::spawn(move || store.login_attempt(&n, hash, false, chrono::Utc::now()).unwrap())
        })
        .collect();
    let outcomes: Vec<Attempt> = racing.into_iter().map(|t| t.join().unwrap()).collect();
    let counted = outcomes.iter().filter(|o| matches!(o, Attempt::Wrong { .. })).count();
    let locks = outcomes.iter().filter(|o| matches!(o, Attempt::Wrong { locked: true, .. })).count();
    println!(
        "30 wrong entries at once over three nodes: {counted} counted, {locks} locked, in {:?}",
        started.elapsed()
    );
    assert_eq!((counted, locks), (10, 1), "{outcomes:?}");
    cluster.stop();
}

/// Propagation of a write between nodes on Apache Kafka (BENCHMARKS.md): settings saved
/// through node A, one after another; the time until A's save returns (A shows the write)
/// and until node C applies it, p50 and p99 over 300 saves. A and C are the two nodes of
/// three that are not the state owner, so each save crosses the cluster twice (A to the
/// owner, the owner to A and C). Printed, not asserted.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn state_propagation_from_one_node_to_another_is_measured() {
    use std::sync::{Arc, Mutex};
    let (_sink, spec, dir) = setup("propagation", 1, &[]);
    let cluster = InProcess::start(&spec, &dir.path, 3);
    let nodes = &cluster.nodes;
    let owner = |n: &engine::startup::Application| n.metrics().value("callnotify_state_owner") == Some(1.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nodes.iter().any(owner) {
        assert!(Instant::now() < deadline, "no node became the state owner");
        std::thread::sleep(Duration::from_millis(20));
    }
    let others: Vec<&engine::startup::Application> = nodes.iter().filter(|n| !owner(n)).collect();
    let (a, c) = (others[0].store().clone(), others[1].store().clone());
    let line = testkit::line::Subscriber::new("0373000001", &[("x@it.example.jp", true)]).line();
    engine::provision::import(&a, line.as_bytes()).expect("import");
    let number = engine::phone::PhoneNumber::parse("0373000001").unwrap();
    let applied: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
    let (seen, view) = (applied.clone(), c.clone());
    // Told after the values are written: the record read here is the one just applied.
    c.on_number_change(move |n, services| {
        if services.is_some() && *n == number {
            if let Some(record) = view.number(n).unwrap() {
                seen.lock().unwrap().entry(record.call.version).or_insert_with(Instant::now);
            }
        }
    });
    let (mut confirmed, mut propagated) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        let mut settings = a.number(&number).unwrap().unwrap().call;
        let version = settings.version;
        settings.missed_only = !settings.missed_only;
        let written = Instant::now();
        let new = a.save_call_settings(&number, version, settings).expect("save");
        confirmed.push(written.elapsed());
        let deadline = Instant::now() + Duration::from_secs(10);
        let at = loop {
            if let Some(at) = applied.lock().unwrap().get(&new) {
                break *at;
            }
            assert!(Instant::now() < deadline, "version {new} never reached node C");
            std::thread::sleep(Duration::from_micros(200));
        };
        propagated.push(at.saturating_duration_since(written));
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p).ceil() as usize).saturating_sub(1)]
    };
    println!(
        "state propagation over 300 saves: confirmed on A p50 {:?} p99 {:?}; applied on C p50 {:?} p99 {:?}",
        pct(&mut confirmed, 0.5),
        pct(&mut confirmed, 0.99),
        pct(&mut propagated, 0.5),
        pct(&mut propagated, 0.99)
    );
    cluster.stop();
}

/// Three nodes, one group, the mail server deferring every mail (4xx): each node queues
/// the mails of its partitions. Node A is SIGKILLed for good; the mail server takes
/// mail again. Nodes B and C take A's partitions, restore their retry entries from the
/// partitions' changelog and send A's mails: nothing lost, and (no mail was accepted
/// before the kill, so none is in the window docs/delivery.md names) nothing twice.
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_node_killed_for_good_with_mails_in_its_retry_queue_leaves_them_to_the_others() {
    const PARTITIONS: i32 = 6;
    let subs = every_call_subscribers("0374", 60);
    let (mut sink, first, dir) = setup("killed-queue", PARTITIONS, &subs);
    sink.defer();
    let specs: Vec<EngineSpec> =
        ["a", "b", "c"].iter().map(|n| EngineSpec { dir: dir.path.join(n), ..first.clone() }).collect();
    let a = specs[0].start();
    a.wait_serving();
    let others: Vec<EngineProcess> = specs[1..].iter().map(EngineSpec::start).collect();
    let all = || std::iter::once(&a).chain(others.iter());
    let deadline = Instant::now() + WAIT;
    while !all().all(|n| n.metric("callnotify_consumer_partitions{consumer=\"0\"}") > 0.0) {
        assert!(Instant::now() < deadline, "the partitions were never shared by all three nodes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cdrs = Cdrs::new(&first.brokers, &first.topic);
    let mut expected = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let call_id = format!("killed-queue-{i}");
        expected.push(s.message_id(&call_id));
        cdrs.send(&s.number, &cdr(&call_id, &s.number, Some("09011112222"), false));
    }
    cdrs.flush();
    let queued = |n: &EngineProcess| n.metric("callnotify_retry_queue_mails");
    while all().map(queued).sum::<f64>() < subs.len() as f64 {
        assert!(Instant::now() < deadline, "not every mail was queued: {:?}", all().map(queued).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(100));
    }
    let in_a = queued(&a);
    println!("killed with a queue: node A holds {in_a} of {} queued mails when SIGKILLed", subs.len());
    assert!(in_a > 0.0, "node A had mails waiting");
    a.kill();
    sink.resume();
    let arrived = sink.wait_for(&expected);
    let (lost, duplicated, unexpected) = tally(&expected, &arrived);
    let sent: Vec<f64> = others.iter().map(|n| n.metric("callnotify_mails_sent_total")).collect();
    println!(
        "killed with a queue: lost {lost}, sent twice {duplicated}, unexpected {unexpected}; sent by B and C {sent:?}"
    );
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    for node in others {
        assert!(node.terminate());
    }
}

/// R-F1 on Apache Kafka: a fax record larger than Kafka's default 1 MB (a three-page
/// uncompressed fax, 1.5 MB, 2 MB in its record) goes through topics set up as
/// docs/fax.md says (`max.message.bytes` 32 MiB on the fax and dead-letter topics and, by
/// `ensure_shared_topics`, the state topics): kept through the state owner, whose request
/// and published record carry the document, and mailed once with its link. One that
/// does not check out (its page count wrong) is dead-lettered whole, and `dead-letters
/// replay` puts it back into its topic (its producer refused records over 1 MB before).
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn r_f1_a_fax_above_kafka_s_one_megabyte_default_is_kept_and_mailed_through_topics_set_up_for_it() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    const NUMBER: &str = "0398765430";
    const TO: &str = "big-fax@example.jp";
    // The dead-letter topic set up for faxes before setup makes one of its own.
    let big = [("max.message.bytes", "33554432")];
    block_on(create_topic_with(&brokers(), &dead_letter_topic("it-fax-large"), 1, &big));
    let (sink, spec, _dir) = setup("fax-large", 1, &[]);
    let fax_topic = format!("{}-fax", spec.topic);
    block_on(create_topic_with(&spec.brokers, &fax_topic, 1, &[("max.message.bytes", "33554432")]));
    spec.provision(&[serde_json::json!({"contract": NUMBER, "numbers": [{"number": NUMBER, "services": ["fax"],
        "fax_settings": {"enabled": true, "destinations": [{"address": TO, "send": true}]}}]})
    .to_string()]);
    let topics = format!(r#"[{{name="{}",format="canonical"}},{{name="{fax_topic}",format="fax"}}]"#, spec.topic);
    let engine = spec.start_with(&[("CALLNOTIFY__KAFKA__TOPICS", &topics)]);

    let document = uncompressed_fax(3);
    let received = chrono::Utc::now();
    let record = |fax_id: &str, pages: u32| testkit::fax::record_at(fax_id, NUMBER, &document, pages, received);
    let (bad, good) = (record("big-0", 2), record("big-1", 3));
    assert!(good.len() > 1_900_000, "{} bytes", good.len());
    // The fax server's producer, allowed records that large.
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("message.max.bytes", "33554432")
        .create()
        .unwrap();
    for record in [&bad, &good] {
        producer.send(BaseRecord::to(&fax_topic).key(NUMBER).payload(record)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let to = engine::address::DestinationAddress::parse(TO).unwrap();
    let number = engine::phone::PhoneNumber::parse(NUMBER).unwrap();
    let expected = [engine::render::fax_message_id(&number, received, "big-1", &to, FROM_DOMAIN)];
    let arrived = sink.wait_for(&expected);
    assert_eq!(tally(&expected, &arrived), (0, 0, 0), "mailed once");
    let letters = read_all(&spec.brokers, &dead_letter_topic(&spec.topic), 1);
    assert_eq!(letters.len(), 1, "the bad record dead-lettered");
    assert!(letters[0]["reason"].as_str().unwrap_or_default().contains("pages"), "{}", letters[0]["reason"]);
    let out = spec.command().args(["dead-letters", "replay"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("replayed 1 CDRs"), "{said}");
    // Read again, refused again: a second dead letter, nothing mailed.
    let deadline = Instant::now() + WAIT;
    while engine.metric("callnotify_dead_letters_total{kind=\"cdr\"}") < 2.0 {
        assert!(Instant::now() < deadline, "the replayed record was never read again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(engine.terminate());
}

/// An owner paused past its session (SIGSTOP) while it carries out an import sent
/// through the other node, and resumed (SIGCONT) once that node took over and finished
/// the import: what the paused owner writes then carries its ended epoch, so every node
/// ignores it (docs/cluster.md, "A paused owner is fenced"). It stops by itself (exit 1,
/// saying why), and a node started afterwards on an empty store shows every line. A
/// pause that lands between two of the owner's batches leaves it nothing to write: it
/// only gives up the request partition. Then the roles swap and the new owner is paused
/// during the next import (at most four tries).
#[test]
#[ignore = "integration: bash scripts/integration.sh"]
fn a_state_owner_paused_past_its_session_is_fenced_when_it_resumes() {
    const LINES: usize = 60_000;
    const FENCED: &str = "callnotify_errors_total{stage=\"state\",error=\"fenced\"}";
    let (_sink, first, dir) = setup("paused-owner", 1, &[]);
    let specs: Vec<EngineSpec> =
        ["a", "b", "c"].iter().map(|n| EngineSpec { dir: dir.path.join(n), ..first.clone() }).collect();
    let mut nodes: Vec<Option<EngineProcess>> = specs[..2].iter().map(|s| Some(s.start())).collect();
    nodes.iter().flatten().for_each(EngineProcess::wait_serving);
    let owner_of = |nodes: &[Option<EngineProcess>]| {
        let deadline = Instant::now() + WAIT;
        loop {
            let owning: Vec<usize> = (0..2)
                .filter(|&i| nodes[i].as_ref().is_some_and(|n| n.metric("callnotify_state_owner") == 1.0))
                .collect();
            if owning.len() == 1 {
                return owning[0];
            }
            assert!(Instant::now() < deadline, "no single state owner: {owning:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut imported = 0;
    let mut fenced = None;
    for attempt in 0..4 {
        let owner = owner_of(&nodes);
        let (paused, through) = (nodes[owner].as_ref().unwrap(), nodes[1 - owner].as_ref().unwrap());
        let lines: Vec<String> = (0..LINES)
            .map(|i| testkit::line::Subscriber::new(&format!("03{attempt}{i:07}"), &[("x@it.example.jp", true)]).line())
            .collect();
        let file = dir.path.join(format!("import-{attempt}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let import = first.start_import_through(through, &file);
        // Paused while it carries out the import (it has applied its first records).
        let from = paused.metric("callnotify_state_applied_offset");
        paused.wait_metric_until("callnotify_state_applied_offset", "moved", |at| at >= from + 5_000.0);
        paused.pause();
        let paused_at = Instant::now();
        through.wait_metric("callnotify_state_owner", 1.0);
        let out = import.wait_with_output().unwrap();
        assert!(out.status.success(), "the import through the other node: {}", String::from_utf8_lossy(&out.stderr));
        imported += LINES;
        println!(
            "paused owner, try {attempt}: the other node took over and finished the import {:?} after the pause",
            paused_at.elapsed()
        );
        paused.resume();
        match nodes[owner].take().unwrap().wait_exit(Duration::from_secs(20)) {
            Some(status) => {
                assert_eq!(status.code(), Some(1), "the paused node's exit");
                fenced = Some((owner, attempt));
                break;
            }
            None => {
                // SIGKILLed by `wait_exit`: started again for the next try.
                println!("paused owner, try {attempt}: paused between batches, nothing to fence");
                let node = specs[owner].start();
                node.wait_serving();
                nodes[owner] = Some(node);
            }
        }
    }
    let (owner, attempt) = fenced.expect("no pause landed while the owner carried out a batch in four tries");
    let said = specs[owner].log();
    assert!(said.contains("another node took over while it was paused"), "the paused node's log: {said}");
    let other = nodes[1 - owner].as_ref().unwrap();
    assert!(other.metric(FENCED) >= 1.0, "the other node ignored none of the paused owner's records");
    println!("paused owner, try {attempt}: it exited 1; the other node ignored its records");

    // A node that reads the whole topic later ignores the same records: every line.
    let late = specs[2].start();
    late.wait_serving();
    assert!(late.metric(FENCED) >= 1.0, "it ignored the paused owner's records too");
    let log = plain(&specs[2].log());
    let subscribed =
        log.lines().find_map(|l| l.split(" subscribed=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok());
    assert_eq!(subscribed, Some(imported), "{log}");
    assert!(late.terminate());
}

/// `text` without its terminal colours (the engine's log has them).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
