//! The integration suite's world: real separate processes. Apache Kafka in KRaft mode
//! (`scripts/kafka.sh`): the suite's one-node cluster, started by
//! `scripts/integration.sh` (address in `CALLNOTIFY_IT_BROKERS`), or a cluster a test
//! starts for itself ([`KafkaCluster`]: three nodes, or one with a SASL_SSL listener);
//! postfix's `smtp-sink` writing each mail to its own file; and engines as
//! `callnotify serve` child processes that a test can SIGKILL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use engine::address::DestinationAddress;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// The sender's domain: it ends every Message-ID.
pub const FROM_DOMAIN: &str = "it.example.jp";
/// Waits on conditions that a healthy run meets in seconds.
pub const WAIT: Duration = Duration::from_secs(240);

/// The suite's Kafka, which the script started.
pub fn brokers() -> String {
    std::env::var("CALLNOTIFY_IT_BROKERS")
        .expect("CALLNOTIFY_IT_BROKERS is not set: run the suite with `bash scripts/integration.sh`")
}

/// Creates `topics` (name, partitions) on `brokers`, with the cluster's default
/// replication: the engine never creates topics, it checks them at start.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    engine::embedded::ensure_topics(brokers, topics).await.expect("creating the topics");
}

/// Creates `topic` with `partitions` and the topic settings `config` (e.g.
/// `max.message.bytes`), unless it exists.
pub async fn create_topic_with(brokers: &str, topic: &str, partitions: i32, config: &[(&str, &str)]) {
    create_topic(brokers, topic, partitions, rdkafka::admin::TopicReplication::Fixed(-1), config).await;
}

/// Creates `topic` with one partition whose replicas are the nodes `replicas` (the
/// first leads it) and the topic settings `config`, unless it exists.
pub async fn create_topic_on(brokers: &str, topic: &str, replicas: &[i32], config: &[(&str, &str)]) {
    let assignment = [replicas];
    create_topic(brokers, topic, 1, rdkafka::admin::TopicReplication::Variable(&assignment), config).await;
}

async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: rdkafka::admin::TopicReplication<'_>,
    config: &[(&str, &str)],
) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let new = config.iter().fold(NewTopic::new(topic, partitions, replication), |t, (k, v)| t.set(k, v));
    for result in admin.create_topics(&[new], &AdminOptions::new()).await.expect("create topics") {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => panic!("creating {name}: {code}"),
        }
    }
}

/// A TIFF of `pages` uncompressed bilevel A4 pages (1728 × 2287, fine), each with a
/// black band at its top: a valid fax document of about 494 KB a page, for a record
/// larger than Kafka's 1 MB default (compression 1 is what fax servers write for no
/// compression; the engine decodes it like T.4 and T.6).
pub fn uncompressed_fax(pages: u32) -> Vec<u8> {
    const WIDTH: u32 = 1728;
    const HEIGHT: u32 = 2287;
    let row = (WIDTH / 8) as usize;
    let strip: Vec<u8> =
        (0..HEIGHT).flat_map(|y| std::iter::repeat_n(if y < 100 { 0xff } else { 0x00 }, row)).collect();
    // Little-endian TIFF: header, then per page its strip and its IFD.
    let mut out = b"II*\0\0\0\0\0".to_vec();
    let mut link_at = 4usize;
    for _ in 0..pages {
        let strip_at = out.len() as u32;
        out.extend_from_slice(&strip);
        // Resolution values (204/1, 196/1) just before the IFD.
        let resolution_at = out.len() as u32;
        for value in [204u32, 1, 196, 1] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        let ifd_at = out.len() as u32;
        out[link_at..link_at + 4].copy_from_slice(&ifd_at.to_le_bytes());
        // (tag, type, value): type 3 = SHORT, 4 = LONG, 5 = RATIONAL (an offset).
        let entries: [(u16, u16, u32); 11] = [
            (256, 4, WIDTH),
            (257, 4, HEIGHT),
            (258, 3, 1),
            (259, 3, 1),
            (262, 3, 0),
            (273, 4, strip_at),
            (277, 3, 1),
            (278, 4, HEIGHT),
            (279, 4, strip.len() as u32),
            (282, 5, resolution_at),
            (283, 5, resolution_at + 8),
        ];
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, kind, value) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
        link_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

/// Creates the shared topics of the engines reading `topic` (of `partitions`), as
/// docs/cluster.md tells an operator to.
pub async fn create_shared_topics(brokers: &str, topic: &str, partitions: i32) {
    let [state, requests, sent, retry] = shared_topics(topic);
    let shared = engine::embedded::SharedTopics { state: &state, requests: &requests, sent: &sent, retry: &retry };
    engine::embedded::ensure_shared_topics(brokers, &shared, partitions).await.expect("creating the shared topics");
}

/// Deletes `topic` from `brokers` and waits until the cluster no longer has it.
pub async fn delete_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    // Asking after a topic must not create it again on a broker that creates on request.
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("admin client");
    for result in admin.delete_topics(&[topic], &AdminOptions::new()).await.expect("delete topics") {
        result.unwrap_or_else(|(name, code)| panic!("deleting {name}: {code}"));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let metadata = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        if metadata.topics().iter().all(|t| t.name() != topic || t.error().is_some()) {
            return;
        }
        assert!(Instant::now() < deadline, "{topic} still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Kafka cluster a test starts for itself with `scripts/kafka.sh` (three nodes, or
/// one with a SASL_SSL listener); stopped when dropped.
pub struct KafkaCluster {
    dir: tempfile::TempDir,
    /// The PLAINTEXT listeners, comma-separated.
    pub bootstrap: String,
}

impl KafkaCluster {
    /// `nodes` combined broker+controller nodes; `args` go to `kafka.sh start`.
    pub fn start(nodes: u8, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("it-kafka-").tempdir().expect("tempdir");
        let out = kafka_sh(&["start", "--nodes", &nodes.to_string()], dir.path(), args);
        assert!(
            out.status.success(),
            "kafka.sh start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap")).expect("kafka.sh wrote DIR/bootstrap");
        Self { bootstrap: bootstrap.trim().to_owned(), dir }
    }

    /// A file `kafka.sh` wrote into the cluster's directory (e.g. `bootstrap-sasl-ssl`).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}")).trim().to_owned()
    }

    /// SIGKILLs node `id`.
    pub fn kill_node(&self, id: i32) {
        let out = kafka_sh(&["kill-node"], self.dir.path(), &[&id.to_string()]);
        assert!(out.status.success(), "kafka.sh kill-node {id}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts node `id` again on its storage, and waits until it serves.
    pub fn start_node(&self, id: i32) {
        let out = kafka_sh(&["start-node"], self.dir.path(), &[&id.to_string()]);
        assert!(out.status.success(), "kafka.sh start-node {id}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The node leading `partition` of `topic`.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        let client: BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().expect("client");
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        let topic = metadata.topics().iter().find(|t| t.name() == topic).expect("the topic");
        topic.partitions().iter().find(|p| p.id() == partition).expect("the partition").leader()
    }

    /// Whether node `id` leads a partition of `topic`, as the cluster's metadata says.
    pub fn leads(&self, id: i32, topic: &str) -> bool {
        let client: BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().expect("client");
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        metadata.topics().iter().flat_map(|t| t.partitions()).any(|p| p.leader() == id)
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        let _ = kafka_sh(&["stop"], self.dir.path(), &[]);
    }
}

/// `scripts/kafka.sh SUBCOMMAND --dir DIR ARGS`.
fn kafka_sh(subcommand: &[&str], dir: &Path, args: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    Command::new("bash")
        .arg(script)
        .args(subcommand)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/kafka.sh")
}

/// A producer that keys each CDR by its called number, as an exchange would, with
/// `acks=all` and idempotence: a leader that dies mid-stream loses and reorders nothing.
pub struct Cdrs {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl Cdrs {
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self::with(brokers, topic, &[("linger.ms", "5")])
    }

    /// Batching as an exchange's producer would: what is sent before a flush goes out
    /// as one batch.
    pub fn batched(brokers: &str, topic: &str) -> Self {
        Self::with(brokers, topic, &[("linger.ms", "200")])
    }

    fn with(brokers: &str, topic: &str, settings: &[(&str, &str)]) -> Self {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", brokers).set("acks", "all").set("enable.idempotence", "true");
        for (key, value) in settings {
            config.set(*key, *value);
        }
        Self { producer: config.create().expect("producer"), topic: topic.to_owned() }
    }

    pub fn send(&self, key: &str, payload: &str) {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, back)) => {
                    assert!(
                        matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                        "produce: {e}"
                    );
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
    }

    /// Waits until the broker has every message sent so far.
    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(60)).expect("the broker takes every CDR");
    }
}

/// Every record of `topic` so far, as JSON, once there are `at_least`.
pub fn read_all(brokers: &str, topic: &str, at_least: usize) -> Vec<serde_json::Value> {
    read_until(brokers, topic, |records| records.len() >= at_least)
}

/// The records of `topic` from its start, as JSON, read until `enough` says so (or
/// [`WAIT`] passes).
pub fn read_until(brokers: &str, topic: &str, enough: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + WAIT;
    let mut records = Vec::new();
    while !enough(&records) && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            records.push(serde_json::from_slice(m.payload().unwrap_or_default()).expect("a JSON record"));
        }
    }
    records
}

/// Moves consumer group `group` back to the start of every partition of `topic`, as an
/// operator replaying a topic would (no engine of the group may be running).
pub fn reset_group(brokers: &str, group: &str, topic: &str, partitions: i32) {
    commit_group_at(brokers, group, topic, partitions, 0);
}

/// Commits `offset` in every partition of `topic` for consumer group `group` (no engine
/// of the group may be running).
pub fn commit_group_at(brokers: &str, group: &str, topic: &str, partitions: i32, offset: i64) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Offset(offset)).expect("offset");
    }
    consumer.commit(&list, CommitMode::Sync).expect("commit the offset");
}

/// postfix's `smtp-sink`, dumping each mail to its own file; stopped when dropped.
pub struct PostfixSink {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// How many times each Message-ID of `arrivals` ([`PostfixSink::arrivals`]) arrived.
pub fn counts(arrivals: &HashMap<String, Vec<SystemTime>>) -> HashMap<String, usize> {
    arrivals.iter().map(|(id, at)| (id.clone(), at.len())).collect()
}

impl PostfixSink {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // smtp-sink runs as `nobody` when started by root and must write there.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let mut sink = Self { child: None, addr: free_port(), dir };
        sink.resume();
        sink
    }

    /// Stops it: connections are refused until [`PostfixSink::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same address, taking every mail (a deferring one is
    /// stopped first).
    pub fn resume(&mut self) {
        self.stop();
        self.run(&[]);
    }

    /// Restarts it answering every RCPT TO with a temporary refusal (4xx): every mail is
    /// deferred until [`PostfixSink::resume`].
    pub fn defer(&mut self) {
        self.stop();
        self.run(&["-r", "RCPT"]);
    }

    fn run(&mut self, options: &[&str]) {
        let binary = std::env::var("CALLNOTIFY_IT_SMTP_SINK").unwrap_or_else(|_| "/usr/sbin/smtp-sink".into());
        let template = format!("{}/%Y%m%d%H/%M.", self.dir.path().display());
        let mut command = Command::new(&binary);
        if nix_is_root() {
            command.args(["-u", "nobody"]);
        }
        let child = command
            .args(options)
            .args(["-d", &template])
            .arg(self.addr.to_string())
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary} (Debian package postfix; scripts/setup.sh): {e}"));
        self.child = Some(child);
        testkit::wait::blocking_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || format!("smtp-sink did not start listening on {}", self.addr),
            || std::net::TcpStream::connect(self.addr).is_ok(),
        );
    }

    /// How many times each Message-ID arrived.
    pub fn message_ids(&self) -> HashMap<String, usize> {
        counts(&self.arrivals())
    }

    /// When each Message-ID arrived (the times smtp-sink wrote it out), earliest first.
    pub fn arrivals(&self) -> HashMap<String, Vec<SystemTime>> {
        let mut ids: HashMap<String, Vec<SystemTime>> = HashMap::new();
        for file in files(self.dir.path()) {
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            let Ok(written) = std::fs::metadata(&file).and_then(|m| m.modified()) else { continue };
            if let Some(id) = text.lines().find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("message-id")).map(|(_, v)| v.trim())
            }) {
                ids.entry(id.to_owned()).or_default().push(written);
            }
        }
        ids.values_mut().for_each(|at| at.sort());
        ids
    }

    /// Waits until every id in `expected` has arrived (or [`WAIT`] passes); returns
    /// the counts.
    pub fn wait_for(&self, expected: &[String]) -> HashMap<String, usize> {
        let deadline = Instant::now() + WAIT;
        loop {
            let ids = self.message_ids();
            if expected.iter().all(|id| ids.contains_key(id)) || Instant::now() > deadline {
                return ids;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A file system of a few MiB the test makes (a tmpfs, which needs root: CI runs as
/// root), unmounted when dropped.
pub struct SmallDisk {
    pub path: PathBuf,
}

impl SmallDisk {
    pub fn mount(path: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a {mib} MiB tmpfs on {} (needs root)", path.display());
        Self { path: path.to_owned() }
    }

    /// Bytes free for files.
    pub fn free(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.path).output().expect("df");
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df's figure")
    }

    /// Writes a file that leaves about `leave` bytes free; returns its path.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a_u8; 1 << 20];
        let mut left = self.free().saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        file.sync_all().unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

pub fn free_port() -> SocketAddr {
    testkit::free_port().expect("a free loopback port")
}

/// The consumer group protocol the engines speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupProtocol {
    /// Join/sync rounds led by a member; the session timeout is the client's.
    Classic,
    /// KIP-848: the broker assigns, incrementally; the session timeout is the broker's
    /// (`group.consumer.session.timeout.ms`, set by `scripts/kafka.sh`).
    Consumer,
}

/// The session timeout of both protocols in the suite: the engines' `session.timeout.ms`
/// (classic) and the brokers' `group.consumer.session.timeout.ms` (scripts/kafka.sh).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How an engine process is configured; each engine has its own store directory.
#[derive(Clone)]
pub struct EngineSpec {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub protocol: GroupProtocol,
    pub smtp: SocketAddr,
    /// Its engine log, and its store unless `store` says otherwise.
    pub dir: PathBuf,
    /// Where the store lives when not in `dir` (a file system of the test's own).
    pub store: Option<PathBuf>,
}

impl EngineSpec {
    /// `callnotify` with this engine's settings (its cluster, topics, store, mail server).
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_callnotify"));
        command
            .env("CALLNOTIFY__KAFKA__BROKERS", &self.brokers)
            .env("CALLNOTIFY__KAFKA__GROUP_ID", &self.group)
            .env("CALLNOTIFY__KAFKA__TOPICS", format!(r#"[{{name="{}",format="canonical"}}]"#, self.topic))
            .env("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", dead_letter_topic(&self.topic))
            .env("CALLNOTIFY__KAFKA__STATE_TOPIC", shared_topics(&self.topic)[0].clone())
            .env("CALLNOTIFY__KAFKA__STATE_REQUESTS_TOPIC", shared_topics(&self.topic)[1].clone())
            .env("CALLNOTIFY__KAFKA__SENT_TOPIC", shared_topics(&self.topic)[2].clone())
            .env("CALLNOTIFY__KAFKA__RETRY_TOPIC", shared_topics(&self.topic)[3].clone())
            // The rebalance timeout (classic): how long the coordinator waits for every
            // member to rejoin. The engine polls every 100 ms, so 10 s is ample.
            .env("CALLNOTIFY__KAFKA__PROPERTIES__MAX_POLL_INTERVAL_MS", "10000");
        match self.protocol {
            GroupProtocol::Classic => command
                .env("CALLNOTIFY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", SESSION_TIMEOUT.as_millis().to_string())
                .env("CALLNOTIFY__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "500"),
            GroupProtocol::Consumer => command.env("CALLNOTIFY__KAFKA__PROPERTIES__GROUP_PROTOCOL", "consumer"),
        };
        command
            .env("CALLNOTIFY__STORE__PATH", self.store.clone().unwrap_or_else(|| self.dir.join("store")))
            .envs(testkit::smtp::engine_env(self.smtp))
            .env("CALLNOTIFY__SMTP__FROM", format!("no-reply@{FROM_DOMAIN}"))
            .env("CALLNOTIFY__SMTP__TIMEOUT_SECS", "5")
            .env("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "200")
            .env("CALLNOTIFY__SMTP__RETRY_MAX_DELAY_MS", "2000")
            .env("CALLNOTIFY__SMTP__RATE_PER_SECOND", "100000")
            .env("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "100000")
            .env("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "10")
            .env("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("CALLNOTIFY__ADMIN__IVR_LISTEN", "127.0.0.1:0")
            // CALLNOTIFY_IT_LOG: more of the engine's log, e.g. `info,engine::state=debug`.
            .env("RUST_LOG", std::env::var("CALLNOTIFY_IT_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into()));
        command
    }

    /// The settings an in-process engine of this spec runs with: the environment
    /// [`EngineSpec::command`] gives a process, and `extra`.
    pub fn settings(&self, extra: &[(&str, &str)]) -> engine::config::Settings {
        let command = self.command();
        let mut env: Vec<(String, String)> = command
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .filter(|(k, _)| k.starts_with("CALLNOTIFY__"))
            .collect();
        env.push(("CALLNOTIFY__METRICS__LISTEN".into(), "127.0.0.1:0".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        engine::config::Settings::load_from(None, env).expect("settings")
    }

    /// `callnotify provision import` of JSON Lines through a running engine's endpoint.
    pub fn provision_through(&self, engine: &EngineProcess, lines: &[String]) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let file = self.dir.join("through.jsonl");
        std::fs::write(&file, lines.join("\n")).unwrap();
        let out = self.start_import_through(engine, &file).wait_with_output().expect("provision import --url");
        assert!(out.status.success(), "provision import --url: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `callnotify provision import FILE --url` through a running engine and
    /// leaves it running, its output piped.
    pub fn start_import_through(&self, engine: &EngineProcess, file: &Path) -> Child {
        self.command()
            .args(["provision", "import"])
            .arg(file)
            .args(["--url", &engine.url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("provision import --url")
    }

    /// `callnotify provision import` of JSON Lines, before any engine runs on the store.
    pub fn provision(&self, lines: &[String]) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let file = self.dir.join("lines.jsonl");
        std::fs::write(&file, lines.join("\n")).unwrap();
        let out = self.command().args(["provision", "import"]).arg(&file).output().expect("provision import");
        assert!(out.status.success(), "provision import: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// What its engines have logged so far (`engine.log` in its directory).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default()
    }

    /// Waits until `logged` says its engines' log shows `what`.
    pub fn wait_logged(&self, what: &str, logged: impl Fn() -> bool) {
        let said = || format!("the engine log never showed {what}: {}", self.log());
        testkit::wait::blocking_until(WAIT, Duration::from_millis(100), said, logged);
    }

    /// Starts `callnotify serve`; its log is appended to `engine.log` in its directory.
    pub fn start(&self) -> EngineProcess {
        self.start_with(&[])
    }

    /// Starts `callnotify serve` with `env` overriding the spec's settings.
    pub fn start_with(&self, env: &[(&str, &str)]) -> EngineProcess {
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("engine.log")).unwrap();
        let metrics = free_port();
        let child = self
            .command()
            .envs(env.iter().copied())
            .env("CALLNOTIFY__METRICS__LISTEN", metrics.to_string())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting callnotify serve");
        EngineProcess { child, metrics }
    }
}

pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dead-letter")
}

/// The shared topics (state, state requests, sent, retry) of the engines reading
/// `topic`: each test's subscribers and changelogs its own.
pub fn shared_topics(topic: &str) -> [String; 4] {
    ["state", "state-requests", "sent", "retry"].map(|s| format!("{topic}-{s}"))
}

/// A running `callnotify serve`; SIGKILLed when dropped.
pub struct EngineProcess {
    child: Child,
    metrics: SocketAddr,
}

impl EngineProcess {
    /// SIGKILL: no draining, no commit, no flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the whole process pauses (a stalled VM, a frozen disk) until
    /// [`EngineProcess::resume`].
    pub fn pause(&self) {
        Command::new("kill").args(["-STOP", &self.child.id().to_string()]).status().expect("kill -STOP");
    }

    /// SIGCONT: it goes on where it was paused.
    pub fn resume(&self) {
        Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status().expect("kill -CONT");
    }

    /// SIGTERM, then waits for the exit; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        self.child.wait().expect("wait").success()
    }

    /// Waits up to `limit` for the process to exit by itself; its status, or `None` if
    /// it still runs (it is SIGKILLed when dropped).
    pub fn wait_exit(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One series of `/metrics` (0 until the endpoint answers).
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").map(|(_, body)| body).unwrap_or_default();
        engine::telemetry::series_value(&text, series).unwrap_or(0.0)
    }

    /// Waits until the engine has caught up with the shared subscriber state (a
    /// single-node store it started on is carried into the state topic by then) and
    /// serves: its operator endpoint answers from the start, `/readyz` saying `starting`
    /// until then.
    pub fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/readyz").is_none_or(|(_, body)| body.contains("\nstarting:")) {
            assert!(Instant::now() < deadline, "the engine never served its operator endpoint");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its operator endpoint, for `provision import --url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.metrics)
    }

    /// `/healthz`: its status and body.
    pub fn health(&self) -> (u16, String) {
        self.get("/healthz").expect("the operator endpoint answers")
    }

    /// `/readyz`: its status and body.
    pub fn readiness(&self) -> (u16, String) {
        self.get("/readyz").expect("the operator endpoint answers")
    }

    /// A GET of the operator endpoint: status and body, `None` if it does not answer.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics).ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    /// Waits until `series` reaches `value`.
    pub fn wait_metric(&self, series: &str, value: f64) {
        self.wait_metric_until(series, &format!("reached {value}"), |v| v >= value);
    }

    /// Waits until `series` satisfies `wanted` (described as `what`).
    pub fn wait_metric_until(&self, series: &str, what: &str, wanted: impl Fn(f64) -> bool) {
        let said = || format!("{series} never {what} (now {})", self.metric(series));
        testkit::wait::blocking_until(WAIT, Duration::from_millis(100), said, || wanted(self.metric(series)));
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber and the rule it set (R-N4, R-N5).
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    /// Every call.
    All,
    /// 応答できなかった着信のみ.
    MissedOnly,
    /// 指定した電話番号からの着信のみ, with [`DESIGNATED`] designated.
    DesignatedOnly,
}

/// The designated caller of [`Rule::DesignatedOnly`] subscribers.
pub const DESIGNATED: &str = "09000000001";

pub struct Subscriber {
    pub number: String,
    pub rule: Rule,
}

impl Subscriber {
    pub fn address(&self) -> String {
        format!("n{}@it.example.jp", self.number)
    }

    /// Its provisioning line: started, one checked destination and one unchecked.
    pub fn line(&self) -> String {
        let (designated_only, missed_only) = match self.rule {
            Rule::All => (false, false),
            Rule::MissedOnly => (false, true),
            Rule::DesignatedOnly => (true, false),
        };
        let (checked, unchecked) = (self.address(), format!("unchecked{}@it.example.jp", self.number));
        testkit::line::Subscriber {
            designated_only,
            missed_only,
            designated: &[(DESIGNATED, true)],
            ..testkit::line::Subscriber::new(&self.number, &[(&checked, true), (&unchecked, false)])
        }
        .line()
    }

    /// Whether a call from `caller` (None: withheld) that was or was not answered is
    /// notified, by R-N4..R-N6.
    pub fn notifies(&self, caller: Option<&str>, answered: bool) -> bool {
        match self.rule {
            Rule::All => true,
            Rule::MissedOnly => !answered,
            Rule::DesignatedOnly => caller == Some(DESIGNATED),
        }
    }

    /// The Message-ID of this subscriber's mail for `call_id`.
    pub fn message_id(&self, call_id: &str) -> String {
        let to = DestinationAddress::parse(&self.address()).unwrap();
        engine::render::call_message_id(&self.number, call_id, testkit::cdr::call_end(), &to, FROM_DOMAIN)
    }
}

/// A canonical CDR.
pub fn cdr(call_id: &str, called: &str, caller: Option<&str>, answered: bool) -> String {
    let presentation = if caller.is_some() { "allowed" } else { "withheld" };
    testkit::cdr::cdr(call_id, called, caller, presentation, if answered { "answered" } else { "no_answer" })
}

/// xorshift64, seeded per test and printed, so a failing run can be repeated with
/// `CALLNOTIFY_IT_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(name: &str) -> Self {
        let seed = std::env::var("CALLNOTIFY_IT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        println!("{name}: CALLNOTIFY_IT_SEED={seed}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Checks arrivals against expectations: every expected Message-ID exactly once and
/// nothing else. Returns (lost, duplicated, unexpected) for the message.
pub fn tally(expected: &[String], arrived: &HashMap<String, usize>) -> (usize, usize, usize) {
    let lost = expected.iter().filter(|id| !arrived.contains_key(*id)).count();
    let duplicated = arrived.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
    let wanted: std::collections::HashSet<&String> = expected.iter().collect();
    let unexpected = arrived.keys().filter(|id| !wanted.contains(id)).count();
    (lost, duplicated, unexpected)
}
