//! The engine under test, as a separate `callnotify` process: seeded through
//! `callnotify provision import`, then `callnotify serve`, watched through its
//! `/metrics` endpoint and `/proc` (RSS, CPU).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::population::Population;

/// How the engine is configured for a run (environment overrides of its defaults).
#[derive(Clone)]
pub struct EngineConfig {
    pub binary: PathBuf,
    pub workdir: PathBuf,
    pub brokers: String,
    pub topic: String,
    pub format: &'static str,
    pub group: String,
    pub smtp: SocketAddr,
    /// Where the engine serves `/metrics`; [`ANY_PORT`]: a port the engine picks (its
    /// log names it), so no port picked here can be taken meanwhile.
    pub metrics: SocketAddr,
    pub cache_capacity: u64,
    pub pool_size: u32,
    pub consumers: usize,
    pub from_domain: String,
    /// A name of this node's own when several run side by side: its store is
    /// `store-NODE` and its log `engine-NODE.log` (empty: `store`, `engine.log`).
    pub node: String,
    /// A topic of fax records the engine reads too (`run --fax`).
    pub fax_topic: Option<String>,
}

impl EngineConfig {
    /// The settings every command shares: the store, the mail server and the limits.
    /// The Kafka settings are `serve`'s alone: a mode seeds the store before it has
    /// chosen the topic and group it reads (and the engine refuses empty ones).
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        // Kafka settings only from the load tester: one inherited from the operator's
        // environment (a `CALLNOTIFY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS`, say) could
        // send the engine off this machine. Other settings pass (a measurement with
        // `CALLNOTIFY__STORE__GROUP_COMMIT_MS=1`, say), but those set below.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().to_ascii_uppercase().starts_with("CALLNOTIFY__KAFKA__") {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(&self.workdir)
            .env("CALLNOTIFY__STORE__PATH", self.store_dir())
            .env("CALLNOTIFY__STORE__CACHE_CAPACITY", self.cache_capacity.to_string())
            .envs(testkit::smtp::engine_env(self.smtp))
            .env("CALLNOTIFY__SMTP__POOL_SIZE", self.pool_size.to_string())
            .env("CALLNOTIFY__ENGINE__CONSUMERS", self.consumers.to_string())
            .env("CALLNOTIFY__SMTP__FROM", format!("no-reply@{}", self.from_domain))
            // The load tester measures the engine, not the mail limits a carrier sets.
            .env("CALLNOTIFY__SMTP__RATE_PER_SECOND", "1000000")
            .env("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "1000000")
            .env("CALLNOTIFY__METRICS__LISTEN", self.metrics.to_string())
            .env("CALLNOTIFY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("CALLNOTIFY__ADMIN__IVR_LISTEN", "127.0.0.1:0")
            // A stop waits for nothing a run measures: short, so `stop` can bound it.
            .env("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", ENGINE_GRACE_SECS.to_string())
            // Warnings, and the one line that says how long catching up with the shared state took.
            .env(
                "RUST_LOG",
                // The line naming the metrics endpoint's port, whatever else is asked for.
                std::env::var("CALLNOTIFY_ENGINE_LOG").unwrap_or_else(|_| "warn,engine::state=info".into())
                    + ",engine::startup=info",
            );
        cmd
    }

    /// Seeds the store with `population` through the operator's import path, unless
    /// this work directory already holds exactly that population (a reused `--workdir`).
    pub async fn seed(&self, population: &Population) -> anyhow::Result<String> {
        let marker = self.workdir.join("seeded");
        let fax = if population.fax { ", with fax settings" } else { "" };
        let shape = format!("{} numbers, {} subscribed{fax}\n", population.numbers, population.subscribed);
        if std::fs::read_to_string(&marker).is_ok_and(|m| m == shape) {
            return Ok(format!("reused the store in {} ({})", self.workdir.display(), shape.trim()));
        }
        // Another population: a store of its own (one that an engine served is a view of
        // a state topic, which takes no import beside it).
        match std::fs::remove_dir_all(self.store_dir()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let started = Instant::now();
        let jsonl = self.workdir.join("population.jsonl");
        population.write_jsonl(std::fs::File::create(&jsonl)?)?;
        let imported = self.provision(&jsonl, None).await?;
        std::fs::remove_file(&jsonl)?;
        std::fs::write(&marker, shape)?;
        Ok(format!("{imported} in {:.1} s", started.elapsed().as_secs_f64()))
    }

    /// This node's store directory.
    pub fn store_dir(&self) -> PathBuf {
        match self.node.as_str() {
            "" => self.workdir.join("store"),
            node => self.workdir.join(format!("store-{node}")),
        }
    }

    /// This node's log file.
    pub fn log_file(&self) -> PathBuf {
        match self.node.as_str() {
            "" => self.workdir.join("engine.log"),
            node => self.workdir.join(format!("engine-{node}.log")),
        }
    }

    /// Runs `callnotify provision import` on a JSON Lines file: into this node's store,
    /// or with `--url` through the running node whose operator endpoint is `through`.
    /// An import takes minutes at carrier scale: awaited, so a stop signal is seen
    /// meanwhile, and the import is killed when the run is dropped.
    pub async fn provision(&self, jsonl: &Path, through: Option<SocketAddr>) -> anyhow::Result<String> {
        let mut command = self.command();
        command.args(["provision", "import"]).arg(jsonl);
        if let Some(metrics) = through {
            command.args(["--url", &format!("http://{metrics}")]);
        }
        let out = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .output()
            .await
            .context("running provision import")?;
        if !out.status.success() {
            bail!("provision import failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts `callnotify serve`; its log is appended to `engine.log` in the work
    /// directory (a run of several rounds keeps every round's).
    pub fn serve(&self) -> anyhow::Result<EngineProcess> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_file())?;
        let log_from = log.metadata()?.len();
        let fax = self.fax_topic.as_ref().map(|t| format!(r#",{{name="{t}",format="fax"}}"#)).unwrap_or_default();
        let topics = format!(r#"[{{name="{}",format="{}"}}{fax}]"#, self.topic, self.format);
        let [state, requests, sent, retry] = shared_topics(&self.topic);
        let child = self
            .command()
            .env("CALLNOTIFY__KAFKA__BROKERS", &self.brokers)
            .env("CALLNOTIFY__KAFKA__GROUP_ID", &self.group)
            .env("CALLNOTIFY__KAFKA__TOPICS", topics)
            .env("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", format!("{}-dead-letter", self.topic))
            .env("CALLNOTIFY__KAFKA__STATE_TOPIC", &state)
            .env("CALLNOTIFY__KAFKA__STATE_REQUESTS_TOPIC", &requests)
            .env("CALLNOTIFY__KAFKA__SENT_TOPIC", &sent)
            .env("CALLNOTIFY__KAFKA__RETRY_TOPIC", &retry)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting serve")?;
        Ok(EngineProcess { child, metrics: self.metrics, log: self.log_file(), log_from })
    }
}

/// `EngineConfig::metrics` for a port the engine picks.
pub const ANY_PORT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0));

/// The metrics address the engine's log names ("metrics endpoint listening") after
/// byte `from` of `log`, once it does.
fn metrics_bound(log: &std::path::Path, from: u64) -> anyhow::Result<Option<SocketAddr>> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(log).with_context(|| format!("reading {}", log.display()))?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let Some(line) = text.lines().map(strip_colours).find(|l| l.contains("metrics endpoint listening")) else {
        return Ok(None);
    };
    let addr = line
        .split("url=http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("no address in the engine's line {line:?}"))?;
    Ok(Some(addr.parse().with_context(|| format!("the engine's metrics address {addr:?}"))?))
}

/// A log line without its terminal colours.
pub fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The shared topics (`kafka.state_topic`, `state_requests_topic`, `sent_topic`,
/// `retry_topic`) of the engine reading `topic`.
pub fn shared_topics(topic: &str) -> [String; 4] {
    ["state", "state-requests", "sent", "retry"].map(|s| format!("{topic}-{s}"))
}

pub struct EngineProcess {
    child: Child,
    /// Its port 0 until [`EngineProcess::wait_ready`] read the one the engine bound.
    metrics: SocketAddr,
    /// The engine's log, and where this start's lines begin in it.
    log: PathBuf,
    log_from: u64,
}

/// One reading of the engine process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub rss_bytes: u64,
    /// User + system CPU time so far.
    pub cpu_seconds: f64,
    /// The most RSS the process has had (VmHWM).
    pub peak_rss_bytes: u64,
}

impl EngineProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// RSS and CPU time from `/proc/PID`.
    pub fn usage(&self) -> Usage {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .map_or(0, |kb: u64| kb * 1024)
        };
        let (rss_bytes, peak_rss_bytes) = (kib("VmRSS:"), kib("VmHWM:"));
        let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| crate::cpu::process_ticks(&s))
            .map_or(0.0, |ticks| ticks as f64 / crate::cpu::TICKS_PER_S);
        Usage { rss_bytes, cpu_seconds, peak_rss_bytes }
    }

    /// The engine's metrics.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        scrape(self.metrics).await
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Waits until the engine is built (its log says the metrics endpoint listens: the
    /// endpoint answers `/metrics` from before its catch-up with the state topic) and
    /// `/metrics` answers.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the engine exited during start-up ({status}); see engine.log");
            }
            if let Some(bound) = metrics_bound(&self.log, self.log_from)? {
                if self.metrics.port() == 0 {
                    self.metrics = bound;
                }
                if self.metrics().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the engine did not start within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then wait for the drain and exit: up to [`STOP_WITHIN`], after which the
    /// engine is killed (it hangs, or it was stopped with SIGSTOP) and that is the error.
    pub fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        let deadline = Instant::now() + STOP_WITHIN;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the engine did not stop within {STOP_WITHIN:?} of SIGTERM: killed; see engine.log");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            bail!("the engine exited with {status}; see engine.log");
        }
        Ok(())
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        // On an early return the engine must not outlive the load test.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scrape of the engine's `/metrics`.
pub struct Metrics(String);

impl Metrics {
    /// The value of one series (`name` or `name{labels}`), 0 if absent.
    pub fn get(&self, series: &str) -> f64 {
        engine::telemetry::series_value(&self.0, series).unwrap_or(0.0)
    }
}

/// One scrape of an engine's `/metrics`, given up after [`SCRAPE_WITHIN`]: an engine
/// that hangs (or is stopped) still has its socket accept connections.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scraped = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n").await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(Metrics(text))
    };
    tokio::time::timeout(SCRAPE_WITHIN, scraped)
        .await
        .with_context(|| format!("the engine's /metrics at {addr} did not answer within {SCRAPE_WITHIN:?}"))?
}

/// How long a scrape of `/metrics` may take.
const SCRAPE_WITHIN: Duration = Duration::from_secs(5);

/// The engine's `engine.shutdown_grace_secs` in a load test.
const ENGINE_GRACE_SECS: u64 = 10;

/// How long [`EngineProcess::stop`] waits: past the engine's own deadline (its grace
/// plus 15 s).
const STOP_WITHIN: Duration = Duration::from_secs(ENGINE_GRACE_SECS + 25);

#[cfg(test)]
mod tests {
    use super::*;

    /// The port an engine picked is read from its own start's line: a log kept over
    /// several rounds names an earlier engine's port first.
    #[test]
    fn the_metrics_port_is_read_from_this_start_s_log_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("engine.log");
        let line = |port: u16| {
            format!(
                "\u{1b}[2m2026-12-06T09:50:33Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mengine::startup\u{1b}[0m: metrics endpoint listening \u{1b}[3murl\u{1b}[0m\u{1b}[2m=\u{1b}[0mhttp://127.0.0.1:{port}/metrics\n"
            )
        };
        std::fs::write(&log, line(40001)).unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        assert_eq!(metrics_bound(&log, from).unwrap(), None, "not yet listening");
        std::fs::write(&log, line(40001) + "a warning\n" + &line(40002)).unwrap();
        assert_eq!(metrics_bound(&log, from).unwrap(), Some("127.0.0.1:40002".parse().unwrap()));
    }
}
