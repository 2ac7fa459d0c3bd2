//! `smtp`: how fast the engine delivers mails, against postfix's `smtp-source` sending
//! the same number of mails of the same size over as many sessions, both to one postfix
//! `smtp-sink` on loopback, side by side in each round.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::compare::{self, Comparison, Round, Side};
use crate::cpu::CpuSampler;
use crate::engine_proc::EngineConfig;
use crate::population::Population;
use crate::traffic::{Generator, Mix};
use crate::{Common, Setup};
use testkit::free_port;

#[derive(Args)]
pub struct SmtpArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Mails each side sends per round.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    mails: u64,
    /// SMTP sessions: smtp-source's `-s` and the engine's pool size (`smtp.pool_size`).
    #[arg(long, default_value_t = 16, value_parser = crate::pool_size)]
    sessions: u32,
    /// Rounds; the report quotes the median ratio.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Directory holding postfix's smtp-sink and smtp-source.
    #[arg(long, default_value = "/usr/sbin")]
    postfix_bin: std::path::PathBuf,
}

/// How long a round's smtp-source may take (it sends 20 000 mails in seconds).
const SOURCE_WITHIN: Duration = Duration::from_secs(600);

/// postfix's smtp-sink, stopped when dropped.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn smtp(args: SmtpArgs) -> anyhow::Result<()> {
    let common = &args.common;
    anyhow::ensure!(
        common.metrics_listen.is_none(),
        "--metrics-listen is for run and state: smtp starts an engine for each round, each on a port of its own"
    );
    let stems: Vec<String> = (0..args.rounds).map(|r| format!("cdr-smtp-{r}")).collect();
    let stems: Vec<&str> = stems.iter().map(String::as_str).collect();
    let setup = common.prepare(&stems).await?;
    // Everyone subscribed and every call missed: almost every CDR makes a mail.
    let population = Population { subscribed: 1.0, ..setup.population };
    let sink_bin = args.postfix_bin.join("smtp-sink");
    let source_bin = args.postfix_bin.join("smtp-source");
    if !sink_bin.exists() || !source_bin.exists() {
        bail!(
            "postfix's smtp-sink/smtp-source not found in {} (Debian: apt-get install postfix)",
            args.postfix_bin.display()
        );
    }
    let sink_addr = free_port()?;
    let mut sink = Command::new(&sink_bin);
    if running_as_root() {
        // smtp-sink refuses to run as root without a user to switch to.
        sink.args(["-u", "nobody"]);
    }
    let _sink = Sink(
        sink.args([&sink_addr.to_string(), "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink")?,
    );
    wait_listening(sink_addr).await?;

    let mut config =
        EngineConfig { pool_size: args.sessions, ..common.engine_config(&setup, sink_addr, "smtp.example.jp")? };
    let Setup { format, brokers, topics, embedded, .. } = setup;
    eprintln!("seeded: {}", config.seed(&population).await?);

    let cpu = CpuSampler::start();
    let mut rounds = Vec::new();
    for (round, topic) in topics.iter().enumerate() {
        let (produced, expected) = fill(&brokers, topic, population, format, round, args.mails)?;
        if embedded.is_some() {
            crate::producer::ensure_retained(&brokers, topic, produced)?;
        }
        let started = Instant::now();
        // Awaited, not waited for on the runtime's thread: a stop signal is acted on
        // while it runs (it is killed with the run), and one that hangs ends the run.
        let source = tokio::process::Command::new(&source_bin)
            // -d: keep each session open for its next message, as the engine's pool does.
            .args(["-d", "-s", &args.sessions.to_string(), "-m", &args.mails.to_string(), "-l", "1000"])
            .args(["-f", "no-reply@smtp.example.jp", "-t", "u@load.example.jp", &sink_addr.to_string()])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(SOURCE_WITHIN, source)
            .await
            .map_err(|_| anyhow::anyhow!("smtp-source had not sent {} mails after {SOURCE_WITHIN:?}", args.mails))?
            .context("running smtp-source")?;
        anyhow::ensure!(status.success(), "smtp-source failed: {status}");
        let source = Side::over(args.mails, started, Instant::now(), None);

        config.topic = topic.clone();
        config.group = format!("smtp-{round}-{}", std::process::id());
        config.metrics = crate::engine_proc::ANY_PORT;
        let engine = compare::engine_rate(&config, "callnotify_mails_sent_total", expected).await?;
        let r = Round::measured(&cpu, source, engine).await;
        r.say(round + 1, "smtp-source", "mails/s");
        rounds.push(r);
    }
    let comparison = Comparison {
        name: "smtp",
        title: "SMTP delivery: engine vs postfix smtp-source",
        setup: format!(
            "{} mails per side per round over {} sessions, to one postfix smtp-sink.",
            args.mails, args.sessions
        ),
        baseline: "smtp-source",
        unit: "mails/s",
    };
    println!("{}", compare::write(&common.out, &comparison, &rounds)?);
    drop(embedded);
    Ok(())
}

/// Fills `topic` with CDRs until they make at least `mails` mails; returns how many CDRs
/// the broker took and how many mails they make.
fn fill(
    brokers: &str,
    topic: &str,
    population: Population,
    format: engine::decode::CdrFormat,
    round: usize,
    mails: u64,
) -> anyhow::Result<(u64, u64)> {
    let mix = Mix { missed: 1.0, withheld: 0.0, designated: 0.0, fax: 0.0 };
    let mut generator =
        Generator::new(population, 1.0, format, mix, &format!("smtp{round}-{}", std::process::id()), "smtp.example.jp");
    let mut expected = 0u64;
    let cdrs = std::iter::from_fn(|| {
        (expected < mails).then(|| {
            let cdr = generator.next(chrono::Utc::now());
            expected += cdr.expected.len() as u64;
            cdr
        })
    });
    let produced = crate::producer::fill(brokers, topic, cdrs)?;
    Ok((produced, expected))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "smtp-sink did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
