//! `run`: the engine under a stream of CDRs, measured end to end.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::producer::{BaseRecord, Producer};
use testkit::smtp::{SinkOptions, SmtpSink};

use crate::producer::CountingProducer;

/// How often a run reads its engines' counters and memory (a line of the timeline).
const TICK: Duration = Duration::from_secs(1);

use crate::engine_proc::{EngineConfig, EngineProcess};
use crate::report::{Machine, Percentiles, Report, Second};
use crate::traffic::{mail_message_id, Generator, Mix};
use crate::{parse_duration, parse_exponent, parse_rate, parse_share, Common, Setup};

const TOPIC: &str = "cdr-load";
/// Received faxes, with `--fax`.
const FAX_TOPIC: &str = "fax-load";
const DOMAIN: &str = "loadtest.example.jp";

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Target CDR/s; 0 = flat out.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    rate: f64,
    /// How long to produce (10s, 2m…).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many CDRs instead (whichever comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Share of missed calls.
    #[arg(long, default_value_t = 0.6, value_parser = parse_share)]
    missed: f64,
    /// Share of withheld callers.
    #[arg(long, default_value_t = 0.1, value_parser = parse_share)]
    withheld: f64,
    /// Share of calls from a designated number of the called subscriber.
    #[arg(long, default_value_t = 0.2, value_parser = parse_share)]
    designated: f64,
    /// Share of the messages that are received faxes (R-F1), on a fax topic of their
    /// own: each a three-page G4 TIFF (10 KB), to a number drawn like a called number.
    /// The subscribed numbers then have fax settings like their call settings.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    fax: f64,
    /// Zipf exponent of called-number popularity.
    #[arg(long, default_value_t = 1.0, value_parser = parse_exponent)]
    zipf: f64,
    /// After producing, how long to wait for the last mails.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain: Duration,
    /// Flat out: how far the producer may run ahead of the engine's consumption. The
    /// mock cluster keeps only 5 MB per partition and deletes older messages, so a lead
    /// beyond that loses CDRs before the engine reads them.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_lead: u64,
    /// No progress bar (for logs and CI).
    #[arg(long)]
    quiet: bool,
    /// Engine nodes in one consumer group (1 to 16), each with a store of its own: the
    /// first is seeded, the others catch up from the shared state (docs/cluster.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
}

/// Mails still expected: Message-ID key → produce time (µs since the epoch).
type Expected = Arc<Mutex<HashMap<u128, u64>>>;

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// What the mail collector found.
#[derive(Default)]
struct Collected {
    received: u64,
    duplicates: u64,
    unexpected: u64,
    unobserved: u64,
    seen: HashSet<u128>,
    /// When the first and the last mail came (µs since the epoch), for the mail rate.
    first_mail: Option<u64>,
    last_mail: Option<u64>,
    latency: Option<Histogram<u64>>,
    per_second: Vec<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let topics: &[&str] = if args.fax > 0.0 { &[TOPIC, FAX_TOPIC] } else { &[TOPIC] };
    let mut setup = common.prepare(topics).await?;
    setup.population.fax = args.fax > 0.0;
    let sink = SmtpSink::start_with(SinkOptions { port: 0, keep_mails: false }).await?;
    let run_id = format!("{}", micros(SystemTime::now()));
    let config = EngineConfig {
        topic: setup.topics[0].clone(),
        group: format!("loadtest-{run_id}"),
        fax_topic: setup.topics.get(1).cloned(),
        ..common.engine_config(&setup, sink.addr(), DOMAIN)?
    };
    let Setup { format, population, brokers, topics, embedded, .. } = setup;
    let topic = &topics[0];
    let mix = Mix { missed: args.missed, withheld: args.withheld, designated: args.designated, fax: args.fax };

    let seed = config.seed(&population).await?;
    eprintln!("seeded: {seed}");

    let mut engine = config.serve()?;
    engine.wait_ready(Duration::from_secs(60)).await?;
    let mut others = Vec::new();
    for i in 1..args.nodes.max(1) {
        let node = EngineConfig { node: format!("n{i}"), metrics: crate::engine_proc::ANY_PORT, ..config.clone() };
        let _ = std::fs::remove_dir_all(node.store_dir());
        let mut process = node.serve()?;
        process.wait_ready(Duration::from_secs(600)).await?;
        others.push(process);
    }
    let engines: Vec<&EngineProcess> = std::iter::once(&engine).chain(others.iter()).collect();
    let stores: Vec<std::path::PathBuf> = (0..args.nodes.max(1))
        .map(|i| {
            if i == 0 {
                config.store_dir()
            } else {
                EngineConfig { node: format!("n{i}"), ..config.clone() }.store_dir()
            }
        })
        .collect();
    let store_bytes_before = stores.iter().map(|d| dir_bytes(d)).max().unwrap_or(0);

    let (producer, acks) = crate::producer::create(&brokers).context("creating the producer")?;
    warm_up(&producer, topic, &engines, Generator::new(population, args.zipf, format, mix, "warmup", DOMAIN)).await?;
    // The warm-up CDR is acknowledged and consumed, but not part of the run.
    let warmup_acks = acks.delivered.load(Ordering::Acquire);

    let expected: Expected = Arc::default();
    let collected = Arc::new(Mutex::new(Collected { latency: Some(histogram()), ..Default::default() }));
    let t0 = Instant::now();
    let collector = tokio::spawn(collect(sink.subscribe(), expected.clone(), collected.clone(), t0));

    let produced = Arc::new(AtomicU64::new(0));
    let consumed_now = Arc::new(AtomicU64::new(0));
    // Flat out needs the engine's progress more often than once a second.
    let addrs: Vec<std::net::SocketAddr> = engines.iter().map(|e| e.metrics_addr()).collect();
    let follower = tokio::spawn(follow_consumption(addrs, consumed_now.clone()));
    let expected_total = Arc::new(AtomicU64::new(0));
    let faxes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let generator = Generator::new(population, args.zipf, format, mix, &run_id, DOMAIN);
        let pacing = Pacing {
            topic: topic.clone(),
            fax_topic: topics.get(1).cloned().unwrap_or_default(),
            faxes: faxes.clone(),
            rate: args.rate,
            duration: args.duration,
            count: args.count.unwrap_or(u64::MAX),
            max_lead: args.max_lead,
            consumed: consumed_now.clone(),
            produced: produced.clone(),
            expected: expected.clone(),
            expected_total: expected_total.clone(),
        };
        let done = done.clone();
        std::thread::spawn(move || {
            let produced = produce(producer, generator, pacing);
            done.store(true, Ordering::Release);
            produced
        })
    };

    let progress = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("template"));
    let mut timeline = Vec::new();
    let (mut peak_rss, mut smtp_sessions) = (0u64, 0u64);
    let cpu_starts: Vec<f64> = engines.iter().map(|e| e.usage().cpu_seconds).collect();
    let mut node_rss = vec![0u64; engines.len()];
    let (mut first_consumed, mut last_consumed, mut consumed) = (None, None, 0u64);
    let mut drain_deadline = None;
    let mut tick = tokio::time::interval(TICK);
    tick.tick().await;
    loop {
        tick.tick().await;
        let usages: Vec<_> = engines.iter().map(|e| e.usage()).collect();
        let usage = usages.iter().max_by_key(|u| u.rss_bytes).copied().unwrap_or_default();
        peak_rss = peak_rss.max(usage.rss_bytes);
        node_rss.iter_mut().zip(&usages).for_each(|(peak, u)| *peak = (*peak).max(u.rss_bytes));
        let (mut now_consumed, mut sessions, mut scraped_all) = (0u64, 0u64, true);
        for e in &engines {
            match e.metrics().await {
                Ok(m) => {
                    now_consumed += m.get("callnotify_cdrs_consumed_total") as u64;
                    sessions += m.get("callnotify_smtp_connections_opened_total") as u64;
                }
                Err(_) => scraped_all = false,
            }
        }
        if !scraped_all {
            now_consumed = consumed + 1;
        } else {
            smtp_sessions = sessions;
        }
        // The warm-up CDR is not part of the run.
        let run_consumed = now_consumed.saturating_sub(1);
        if run_consumed > consumed {
            first_consumed.get_or_insert(t0.elapsed());
            last_consumed = Some(t0.elapsed());
        }
        consumed = run_consumed;
        let (mails, second) = {
            let c = collected.lock().expect("collector lock");
            let second = timeline.len();
            // A second without mails has no latency (it was drawn as 0 ms).
            let (p50, p99) = c.per_second.get(second).filter(|h| !h.is_empty()).map_or((None, None), |h| {
                (Some(h.value_at_quantile(0.5) as f64 / 1000.0), Some(h.value_at_quantile(0.99) as f64 / 1000.0))
            });
            (c.received, (p50, p99))
        };
        // Produced means acknowledged by the broker.
        let sent = acks.delivered.load(Ordering::Acquire) - warmup_acks;
        timeline.push(Second {
            t: timeline.len() as u64,
            produced: sent,
            consumed,
            mails,
            p50_ms: second.0,
            p99_ms: second.1,
            rss_mb: usage.rss_bytes as f64 / 1e6,
        });
        let waiting = expected.lock().expect("expected lock").len();
        progress.set_message(format!(
            "produced {sent}, consumed {consumed}, mails {mails} (waiting for {waiting}), engine RSS {:.0} MB",
            usage.rss_bytes as f64 / 1e6
        ));
        progress.tick();
        // A producer thread that panicked sets nothing: the join below says why.
        if done.load(Ordering::Acquire) || producer_thread.is_finished() {
            let deadline = *drain_deadline.get_or_insert(Instant::now() + args.drain);
            let enqueued = produced.load(Ordering::Acquire);
            let settled = sent + acks.failed.load(Ordering::Acquire) >= enqueued;
            let finished = settled && consumed >= sent && waiting == 0;
            if finished || Instant::now() > deadline {
                break;
            }
        }
    }
    progress.finish_and_clear();
    let producing = producer_thread.join().expect("producer thread");
    let cpus: Vec<f64> = engines.iter().zip(&cpu_starts).map(|(e, start)| e.usage().cpu_seconds - start).collect();
    // The kernel's high-water mark: a peak between two samples, or at start-up, counts.
    for (peak, engine) in node_rss.iter_mut().zip(&engines) {
        *peak = (*peak).max(engine.usage().peak_rss_bytes);
        peak_rss = peak_rss.max(*peak);
    }
    // What the run added to a node's store (the fax documents, with --fax), before any
    // engine stops and compacts.
    let store_growth = stores.iter().map(|d| dir_bytes(d)).max().unwrap_or(0).saturating_sub(store_bytes_before);
    let cpu: f64 = cpus.iter().sum();
    let elapsed = t0.elapsed().as_secs_f64();
    let mut nodes = Vec::new();
    for ((e, cpu), rss) in engines.iter().zip(&cpus).zip(&node_rss) {
        let m = e.metrics().await?;
        let consumed = m.get("callnotify_cdrs_consumed_total") as u64;
        nodes.push(crate::report::NodeShare {
            cdrs_consumed: consumed,
            mails_sent: m.get("callnotify_mails_sent_total") as u64,
            cpu_seconds: *cpu,
            cpu_us_per_cdr: cpu * 1e6 / consumed.max(1) as f64,
            max_rss_mb: *rss as f64 / 1e6,
        });
    }
    drop(engines);
    // A stop that fails (an engine exiting non-zero at SIGTERM) is said after the
    // report is written: the run's measurement is whole by then.
    let mut stopped = Ok(());
    for other in others {
        let result = tokio::task::spawn_blocking(move || other.stop()).await.map_err(anyhow::Error::from);
        stopped = stopped.and(result.and_then(|r| r));
    }
    let result = tokio::task::spawn_blocking(move || engine.stop()).await.map_err(anyhow::Error::from);
    stopped = stopped.and(result.and_then(|r| r));
    sink.shutdown().await;
    // The sink's end closes the mail stream; the collector has seen everything by then.
    let _ = tokio::time::timeout(Duration::from_secs(5), collector).await;

    // The mock cluster drops a partition's oldest records past 5 MB: a backlog of CDRs
    // it no longer holds is the broker's, not the engine's. The CDRs not read yet are
    // each partition's newest: those the broker no longer holds were dropped unread
    // (older ones it dropped after the engine read them).
    let sent = acks.delivered.load(Ordering::Acquire) - warmup_acks;
    let backlog = sent.saturating_sub(consumed);
    let dropped = match &embedded {
        Some(_) if backlog > 0 => {
            let (brokers, topics) = (brokers.clone(), topics.clone());
            let held = tokio::task::spawn_blocking(move || {
                topics.iter().map(|topic| crate::producer::retained(&brokers, topic)).sum::<anyhow::Result<i64>>()
            })
            .await??;
            backlog.saturating_sub(held.max(0) as u64)
        }
        _ => 0,
    };
    let c = collected.lock().expect("collector lock");
    let latency = c.latency.as_ref().expect("histogram");
    follower.abort();
    let produce_failed = acks.failed.load(Ordering::Acquire);
    let still_expected = expected.lock().expect("expected lock").len() as u64;
    // Seen on ticks a second apart: the first and the last increase are each seen up to a
    // second late, so their difference is the span (adding a second made a 30 s run 31 s
    // long, and every rate 3 % low).
    // Growth seen on one tick alone happened within the second before it: timed as that
    // second (a lower bound of the rate; the run's whole time, drain included, made a
    // 0.2 s consumption of 50 000 CDRs read "50 000 CDR/s").
    let consume_span = match (first_consumed, last_consumed) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => TICK.as_secs_f64().min(elapsed),
    };
    // From the first CDR sent to the broker's acknowledgement of the last; a paced run's
    // n CDRs span n / rate at least (the last one's own interval included: a span from the
    // first to the last send made --rate 1 --duration 10s 1.11 CDR/s).
    let produce_span = match args.rate {
        rate if rate > 0.0 => producing.took.as_secs_f64().max(sent as f64 / rate),
        _ => producing.took.as_secs_f64(),
    };
    // From the first mail received to the last: mails trail the CDRs consumed by up to
    // `engine.max_in_flight`, and a slow mail server's tail was divided by the shorter
    // consumption span.
    let mail_span = match (c.first_mail, c.last_mail) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
        _ => consume_span,
    };
    let report = Report {
        nodes,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::this(),
        format: format.as_str().into(),
        numbers: population.numbers,
        subscribed_share: population.subscribed,
        mix,
        offered_rate: (args.rate > 0.0).then_some(args.rate),
        max_lead: args.max_lead,
        duration_s: elapsed,
        cdrs_produced: sent,
        produce_failed,
        produce_error: acks.last_error.lock().expect("error lock").clone(),
        produced_per_s: sent as f64 / produce_span,
        cdrs_consumed: consumed,
        // A paced run's engine consumes no faster than the CDRs come: its span, seen on
        // ticks a second apart, is at least consumed / rate (3 000 CDRs at 300 CDR/s
        // read "333 CDR/s" over the 9 s between the first and the last tick's growth).
        consumed_per_s: consumed as f64
            / match args.rate {
                rate if rate > 0.0 => consume_span.max(consumed as f64 / rate),
                _ => consume_span,
            },
        mails_expected: expected_total.load(Ordering::Acquire),
        mails_received: c.received,
        mails_per_s: c.received as f64 / mail_span,
        latency_ms: Percentiles::of(latency),
        sent_late: producing.late,
        sent_late_max_ms: producing.late_max.as_secs_f64() * 1e3,
        // With a backlog, which mails are lost and which belong to CDRs the engine never
        // got to cannot be told apart: not counted.
        lost: (consumed >= sent).then(|| still_expected.saturating_sub(c.unobserved)),
        backlog,
        duplicates: c.duplicates,
        unexpected: c.unexpected,
        unobserved: c.unobserved,
        engine_max_rss_mb: peak_rss as f64 / 1e6,
        engine_cpu_percent: cpu / elapsed * 100.0,
        smtp_sessions,
        faxes_produced: faxes.load(Ordering::Acquire),
        store_growth_mb: store_growth as f64 / 1e6,
        seed,
        timeline,
    };
    report.write(&common.out)?;
    println!("{}", report.markdown());
    println!("report: {}/report.{{json,md}}, plot: {}/latency.svg", common.out.display(), common.out.display());
    if dropped > 0 {
        anyhow::bail!(
            "the mock cluster dropped at least {dropped} of the {sent} CDRs produced before the engine read them (it keeps \
             5 MB or 100 000 messages a partition): lower --max-lead or --rate (a fax is 14 KB), use more \
             --partitions, or run on --brokers (the report is written)"
        );
    }
    drop(embedded);
    stopped.context("stopping the engines after the run (its report is written)")?;
    report.verdict().map_err(anyhow::Error::msg)
}

/// Keeps `consumed` at the engines' count of consumed CDRs (less the warm-up one).
async fn follow_consumption(metrics: Vec<std::net::SocketAddr>, consumed: Arc<AtomicU64>) {
    loop {
        let mut n = 0;
        for addr in &metrics {
            if let Ok(m) = crate::engine_proc::scrape(*addr).await {
                n += m.get("callnotify_cdrs_consumed_total") as u64;
            }
        }
        consumed.fetch_max(n.saturating_sub(1), Ordering::AcqRel);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CDRs the engines have consumed, together.
async fn consumed_by(engines: &[&EngineProcess]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for e in engines {
        total += e.metrics().await?.get("callnotify_cdrs_consumed_total");
    }
    Ok(total)
}

/// One CDR through the engine before the clock starts, so the consumer group has
/// formed and the first measured CDRs do not carry the join delay.
async fn warm_up(
    producer: &CountingProducer,
    topic: &str,
    engines: &[&EngineProcess],
    mut generator: Generator,
) -> anyhow::Result<()> {
    // A number nobody provisioned: consumed, and no mail.
    let cdr = generator.call_to(generator.population().numbers, chrono::Utc::now());
    producer.send(BaseRecord::to(topic).key(&cdr.key).payload(&cdr.payload)).map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed_by(engines).await? < 1.0 {
        anyhow::ensure!(Instant::now() < deadline, "the engine consumed nothing within 60 s; see engine.log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// How the producer thread paces itself and what it reports.
struct Pacing {
    topic: String,
    /// Where fax records go (`--fax`).
    fax_topic: String,
    /// Fax records produced.
    faxes: Arc<AtomicU64>,
    /// CDR/s; 0 = flat out.
    rate: f64,
    duration: Duration,
    count: u64,
    /// Flat out still stays at most this many CDRs ahead of what the engine consumed:
    /// past that, more load only measures the broker's memory, not the engine.
    max_lead: u64,
    consumed: Arc<AtomicU64>,
    produced: Arc<AtomicU64>,
    expected: Expected,
    expected_total: Arc<AtomicU64>,
}

/// How long past the run's duration the producer waits for room in its queue.
const PRODUCE_WAITS_AT_MOST: Duration = Duration::from_secs(30);

/// What the producer thread did: how long it took, up to the broker's acknowledgement
/// of the last CDR, and how far a paced run fell behind its schedule.
#[derive(Debug, Default)]
struct Produced {
    took: Duration,
    /// CDRs sent more than [`LATE`] after they were due.
    late: u64,
    /// The most any CDR was sent after it was due.
    late_max: Duration,
}

/// A paced CDR sent this long after its due time counts as late: its latency, measured
/// from its sending, hides that wait (coordinated omission).
pub const LATE: Duration = Duration::from_millis(10);

/// The producer thread: paced to the rate (or flat out), until the duration or count.
fn produce(producer: CountingProducer, mut generator: Generator, pacing: Pacing) -> Produced {
    let start = Instant::now();
    let mut n = 0u64;
    let mut produced = Produced::default();
    // A stopped run's topics are removed: this thread (detached) stops producing first.
    while n < pacing.count && start.elapsed() < pacing.duration && !crate::stopping() {
        if pacing.rate > 0.0 {
            // Due past the run's end (a slow rate): the run ends then, without it.
            let due = Duration::from_secs_f64(n as f64 / pacing.rate);
            if due >= pacing.duration {
                break;
            }
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
            // Acknowledgements are counted as they are served: at a slow rate, the
            // timeline's "produced" lagged by up to 1 024 CDRs.
            producer.poll(Duration::ZERO);
            // Behind already, or woken late from the sleep (the thread descheduled).
            let behind = start.elapsed().saturating_sub(due);
            produced.late += u64::from(behind > LATE);
            produced.late_max = produced.late_max.max(behind);
        } else if n.saturating_sub(pacing.consumed.load(Ordering::Acquire)) >= pacing.max_lead {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let now = SystemTime::now();
        let cdr = generator.next(now.into());
        if !cdr.expected.is_empty() {
            let mut map = pacing.expected.lock().expect("expected lock");
            for id in &cdr.expected {
                map.insert(*id, micros(now));
            }
            pacing.expected_total.fetch_add(cdr.expected.len() as u64, Ordering::AcqRel);
        }
        if cdr.fax {
            pacing.faxes.fetch_add(1, Ordering::AcqRel);
        }
        let topic = if cdr.fax { &pacing.fax_topic } else { &pacing.topic };
        let mut record = BaseRecord::to(topic).key(&cdr.key).payload(&cdr.payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // The broker takes nothing (it is gone): the run ends without it.
                Err(_) if start.elapsed() > pacing.duration + PRODUCE_WAITS_AT_MOST => {
                    eprintln!(
                        "the broker took no CDR for {PRODUCE_WAITS_AT_MOST:?} past the run's duration: producing stops"
                    );
                    produced.took = start.elapsed();
                    return produced;
                }
                Err((_, back)) => {
                    // Queue full: let librdkafka deliver, then try again.
                    producer.poll(Duration::from_millis(5));
                    record = back;
                }
            }
        }
        n += 1;
        pacing.produced.store(n, Ordering::Release);
        if n.is_multiple_of(1024) {
            producer.poll(Duration::ZERO);
        }
    }
    let _ = producer.flush(Duration::from_secs(60));
    produced.took = start.elapsed();
    produced
}

/// Matches each received mail to its CDR by Message-ID and records the latency.
async fn collect(
    mut mails: tokio::sync::broadcast::Receiver<testkit::smtp::ReceivedMail>,
    expected: Expected,
    collected: Arc<Mutex<Collected>>,
    t0: Instant,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let mail = match mails.recv().await {
            Ok(mail) => mail,
            Err(RecvError::Lagged(n)) => {
                collected.lock().expect("collector lock").unobserved += n;
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let received = micros(mail.received_at);
        let key = mail_message_id(&mail.data);
        let produced_at = key.and_then(|k| expected.lock().expect("expected lock").remove(&k));
        let mut c = collected.lock().expect("collector lock");
        c.received += 1;
        // By the sink's times, whatever order the mails are read in.
        c.first_mail = Some(c.first_mail.map_or(received, |first| first.min(received)));
        c.last_mail = Some(c.last_mail.map_or(received, |last| last.max(received)));
        match (key, produced_at) {
            (Some(k), Some(at)) => {
                let latency = received.saturating_sub(at).max(1);
                c.seen.insert(k);
                c.latency.as_mut().expect("histogram").saturating_record(latency);
                let second = t0.elapsed().as_secs() as usize;
                while c.per_second.len() <= second {
                    c.per_second.push(histogram());
                }
                c.per_second[second].saturating_record(latency);
            }
            (Some(k), None) if c.seen.contains(&k) => c.duplicates += 1,
            _ => c.unexpected += 1,
        }
    }
}

/// Bytes of the files under `dir` (0 if it cannot be read).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::Population;

    /// A paced run ends at its duration: a CDR due after it is not sent (at 0.5 CDR/s
    /// the second is due 2 s in, past a 1.5 s run), where the producer used to sleep
    /// until it was due and send it, running past `--duration` by up to 1 / rate.
    #[test]
    fn a_paced_run_sends_no_cdr_due_after_its_duration() {
        let kafka = engine::embedded::EmbeddedKafka::start(&["paced"], 1).unwrap();
        let (producer, acks) = crate::producer::create(kafka.bootstrap_servers()).unwrap();
        let population = Population { numbers: 10, subscribed: 0.5, fax: false };
        let mix = Mix { missed: 0.5, withheld: 0.0, designated: 0.0, fax: 0.0 };
        let generator = Generator::new(population, 1.0, engine::decode::CdrFormat::Canonical, mix, "paced", DOMAIN);
        let produced = Arc::new(AtomicU64::new(0));
        let pacing = Pacing {
            topic: "paced".into(),
            fax_topic: String::new(),
            faxes: Arc::default(),
            rate: 0.5,
            duration: Duration::from_millis(1500),
            count: u64::MAX,
            max_lead: 20_000,
            consumed: Arc::default(),
            produced: produced.clone(),
            expected: Arc::default(),
            expected_total: Arc::default(),
        };
        let _ = produce(producer, generator, pacing);
        assert_eq!(produced.load(Ordering::Acquire), 1, "the CDR due at 0 s only");
        assert_eq!(acks.delivered.load(Ordering::Acquire), 1);
    }
}
