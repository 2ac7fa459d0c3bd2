//! `callnotify`: the command line. Parses arguments, loads configuration and calls into
//! the engine; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use engine::config::{LogFormat, Settings};
use engine::startup::Application;
use tokio_util::sync::CancellationToken;

/// mimalloc returns freed memory to the system far better than glibc's per-thread
/// arenas under this mix of threads (librdkafka, tokio, the consumer thread): measured
/// in BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "callnotify", version, about = "着信お知らせメール: incoming-call notification mail")]
struct Cli {
    /// Configuration file (TOML) layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and the metrics endpoint until SIGINT/SIGTERM, then drain and exit.
    Serve,
    /// Operator provisioning of lines, numbers and settings.
    Provision {
        #[command(subcommand)]
        action: Provision,
    },
    /// Try it out: serve on embedded defaults, provision a sample subscriber, produce
    /// sample CDRs and show where the mails are. Runs until Ctrl-C.
    Demo,
    /// Play the temporary-password phone line (IVR) in this terminal, as a call from
    /// `--caller`: prompts are printed, keys are typed one entry per line. Run it while
    /// `serve` is stopped (it opens the store), on a single-node store: a cluster's
    /// calls go to a running node's IVR API.
    Ivr {
        /// The calling number (caller ID), e.g. 0312345678.
        #[arg(long)]
        caller: String,
    },
    /// The configuration: check it and show what is in effect.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The dead-letter topic (kafka.dead_letter_topic): list its records, replay CDRs.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetters,
    },
}

#[derive(Subcommand)]
enum DeadLetters {
    /// The records, oldest first per partition: a table, or JSON Lines with --json.
    List {
        #[command(flatten)]
        filter: LetterFilter,
        /// One JSON object per record (its partition, offset, whether it was replayed,
        /// and the record as written).
        #[arg(long)]
        json: bool,
    },
    /// Puts the CDRs of the records back into the topics and partitions they were read
    /// from, and the mails into the retry queue (with `serve` stopped: it opens the
    /// store), once their cause is fixed; each record is replayed once, however often
    /// this runs. A mail keeps its Message-ID.
    Replay {
        #[command(flatten)]
        filter: LetterFilter,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
struct LetterFilter {
    /// `cdr` or `mail`.
    #[arg(long, value_parser = ["cdr", "mail"])]
    kind: Option<String>,
    /// Only records written at or after this time (RFC 3339, e.g. 2026-12-04T09:00:00+09:00).
    #[arg(long, value_parser = parse_time)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only records whose reason (or mail server reply) contains this text.
    #[arg(long)]
    reason: Option<String>,
}

impl From<LetterFilter> for engine::dead_letter::review::Filter {
    fn from(f: LetterFilter) -> Self {
        Self { kind: f.kind, since: f.since, reason: f.reason }
    }
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s).map(|t| t.to_utc()).map_err(|e| format!("{e}: an RFC 3339 time is wanted"))
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Loads the defaults, `--config` and the environment as `serve` would, checks every
    /// setting and prints the effective configuration with secrets masked; exits 1 with
    /// the first problem otherwise.
    Check,
}

#[derive(Subcommand)]
enum Provision {
    /// Load lines from JSON Lines (one line per 回線); `-` reads standard input.
    /// Bad lines are reported with their line number and not applied; the rest are.
    Import {
        file: PathBuf,
        /// Send the lines to a running engine's operator endpoint (its metrics.listen,
        /// e.g. http://127.0.0.1:9187) instead of opening the store, which `serve` holds.
        #[arg(long)]
        url: Option<String>,
    },
    /// Write every line to JSON Lines that `provision import` reads back to the same
    /// store (settings, their versions and, unless left out, the site's credentials:
    /// argon2id hashes, never passwords). Run it while `serve` is stopped.
    Export {
        /// Where to write; `-` (the default) is standard output. A file is written
        /// whole or not at all.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Leave the credentials out: subscribers then set their passwords again by
        /// phone (R-I7).
        #[arg(long)]
        without_credentials: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A configuration that does not load logs as text; the command then says why.
    let format = Settings::load(cli.config.as_deref()).map(|s| s.log.format).unwrap_or_default();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, each told once: many errors already end with their cause's
/// text (`… : Address already in use (os error 98)`), which the chain would repeat.
fn causes(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// deploy/systemd/callnotify.service's `TimeoutStopSec`: a stop that may take longer is
/// killed by systemd mid-drain.
const UNIT_TIMEOUT_STOP_SECS: u64 = 60;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    for (name, meant) in engine::config::unread_env_vars(std::env::vars()) {
        tracing::warn!(variable = %name, "an environment variable that looks like a setting is not read: call it {meant}");
    }
    let file = cli.config.as_deref();
    match cli.command {
        Command::Serve => {
            run_to_end(serve(Settings::load(file)?))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ivr { caller } => {
            let settings = Settings::load(file)?;
            // A new empty store would tell every caller they are on no line.
            store_is_there(&settings)?;
            let store = open_own_store(&settings, |topic| {
                format!(
                    "the store at {} is a node's view of state topic {topic:?}: a temporary password set here would \
                     reach no other node and be overwritten. Call the IVR API of a running node: POST \
                     http://NODE:{}/ivr/calls (docs/ivr.md)",
                    settings.store.path.display(),
                    settings.admin.ivr_listen.port()
                )
            })?;
            let credentials = admin::credentials::Credentials::open(&store)?;
            let ivr = admin::ivr::Ivr::new(store, credentials, admin::clock::SystemClock::shared());
            admin::ivr::terminal::run(&ivr, &caller, std::io::stdin().lock(), std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            // A node's file: a single-node engine's store is the truth between runs, and
            // the demo's sample line would replace a real line 0312345678 in it.
            if let Some(file) = file {
                anyhow::bail!(
                    "the demo runs on embedded defaults and takes no --config ({}): run it without one, or \
                     `callnotify serve` to run a node",
                    file.display()
                );
            }
            run_to_end(engine::demo::run(Settings::load(file)?, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision { action: Provision::Import { file: input, url } } => {
            provision_import(&Settings::load(file)?, &input, url.as_deref())
        }
        Command::Provision { action: Provision::Export { file: output, without_credentials } } => {
            provision_export(&Settings::load(file)?, &output, !without_credentials)
        }
        Command::DeadLetters { action } => dead_letters(&Settings::load(file)?, action),
        Command::Config { action: ConfigAction::Check } => {
            let (settings, effective) = Settings::effective(file, std::env::vars())?;
            print_out(format_args!("{effective}"))?;
            // The files serve reads (as the service's user: run it as that user).
            engine::deliver::check_smtp_files(&settings.smtp)?;
            if let (Some(cert), Some(key)) = (&settings.admin.tls_cert, &settings.admin.tls_key) {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(admin::tls::server_config(cert, key))?;
            }
            let stop = settings.engine.shutdown_grace_secs + engine::startup::STOP_MARGIN.as_secs();
            if stop >= UNIT_TIMEOUT_STOP_SECS {
                eprintln!(
                    "note: a stop may take {stop} s (engine.shutdown_grace_secs and {} s): deploy/'s systemd unit kills \
                     the engine at TimeoutStopSec={UNIT_TIMEOUT_STOP_SECS}, mid-drain; raise it above {stop}",
                    engine::startup::STOP_MARGIN.as_secs()
                );
            }
            // Said, not refused: this shell may lack the secrets the service is given.
            if let Some(problem) = settings.smtp_credentials_problem() {
                eprintln!("note: {problem}; serve refuses to start without them");
            }
            eprintln!("configuration OK");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The engine with the admin server beside it, both stopped by one signal. A signal
/// while the engine starts (the cluster check, the catch-up with the state topic) stops
/// it there: nothing has been read yet, so there is nothing to finish.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    // What the site needs (its certificate, its addresses) before the engine joins its
    // consumer groups: a node that failed after would leave them without a word.
    let bound = admin::server::bind_all(&settings.admin).await?;
    // The operator endpoint is bound by the engine's start, after the cluster check: one
    // taken is found now, before anything else (a moment's bind, given back).
    let metrics_listen = settings.metrics.listen;
    std::net::TcpListener::bind(metrics_listen)
        .with_context(|| format!("cannot listen on metrics.listen {metrics_listen}"))?;
    let test_mailer = engine::deliver::TestMailer::new(&settings.smtp)?;
    let mut signal = Box::pin(shutdown_signal());
    // Biased: the signal is polled first, which installs its handlers before the start
    // logs that it has begun.
    let app = tokio::select! {
        biased;
        () = &mut signal => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
        app = async {
            tracing::info!("starting: checking the Kafka cluster, then catching up with the subscriber state");
            Application::build(settings.clone()).await
        } => app?,
    };
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            signal.await;
            stop.cancel();
        }
    });
    let clock = admin::clock::SystemClock::shared();
    let servers = bound.serve(
        &settings.admin,
        app.store().clone(),
        clock,
        Some(std::sync::Arc::new(test_mailer)),
        app.metrics().clone(),
        stop.clone(),
    );
    let servers = match servers {
        Ok(servers) => servers,
        Err(e) => {
            // The engine runs already: it stops as on a signal, leaving its groups; the
            // cause is said first, as the stop takes a while.
            tracing::error!(error = %e, "the settings site cannot be served: stopping the engine");
            stop.cancel();
            let stopped = app.run_until_stopped(stop.cancelled()).await;
            return Err(anyhow::Error::from(e).context(match stopped {
                Ok(()) => "the engine stopped".to_owned(),
                Err(stop) => format!("the engine stopped with an error too: {stop:#}"),
            }));
        }
    };
    tracing::info!(url = %format!("{}/login", servers.site_url), "settings site listening");
    tracing::info!(url = %format!("http://{}/ivr/calls", servers.ivr), "IVR API listening");
    app.run_until_stopped(stop.cancelled()).await?;
    servers.wait().await;
    Ok(())
}

/// The store, for commands that run while `serve` does not (sled allows one process).
fn open_store(settings: &Settings) -> anyhow::Result<engine::store::Store> {
    engine::store::Store::open_with_cache(&settings.store.path, settings.store.sled_cache_mb << 20)
        .map(|store| store.with_one_record_lines(settings.store.one_record_lines))
        .with_context(|| {
            format!(
                "opening the store at {} (is `callnotify serve` running on it? stop it first)",
                settings.store.path.display()
            )
        })
}

/// The store, for a command that reads what it holds (an export, a replay of mails into
/// its retry queue): one that is not there is an error, not a new empty store (a wrong
/// `store.path`, or a relative one run from another directory, would otherwise back up
/// nothing over the last backup, or queue mails where no engine reads them).
fn open_existing_store(settings: &Settings) -> anyhow::Result<engine::store::Store> {
    store_is_there(settings)?;
    open_store(settings)
}

/// An error naming `store.path` unless a store is there.
fn store_is_there(settings: &Settings) -> anyhow::Result<()> {
    let path = &settings.store.path;
    // sled keeps its log in `db`: a directory without it is not a store yet.
    if !path.join("db").is_file() {
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        anyhow::bail!(
            "no store at {}: check store.path (a relative one is taken from the working directory, here {cwd})",
            path.display()
        );
    }
    Ok(())
}

/// The store, for a command that writes to it while `serve` is stopped: refused, with
/// `refusal(topic)`, if it is a node's view of a cluster's state topic. A store of its own
/// or the embedded cluster's view is the truth between runs (the next `serve` publishes
/// it into the embedded cluster again).
fn open_own_store(settings: &Settings, refusal: impl FnOnce(&str) -> String) -> anyhow::Result<engine::store::Store> {
    let store = open_store(settings)?;
    // Part of it may be in that topic already: a number removed here would stay there,
    // on every other node, as the carry-over resumed publishes only what is left.
    if let Some(topic) = store.carrying_over()? {
        anyhow::bail!(
            "the store at {} was being carried into state topic {topic:?} when its `serve` stopped: a change made \
             here would not reach the nodes reading that topic. Start `serve` on it to finish the carry-over, then \
             make the change through a running node (docs/cluster.md)",
            settings.store.path.display()
        );
    }
    match store.shared_view_of()? {
        Some(topic) => Err(anyhow::anyhow!(refusal(&topic))),
        None => Ok(store),
    }
}

fn provision_import(settings: &Settings, file: &std::path::Path, url: Option<&str>) -> anyhow::Result<ExitCode> {
    // Opened first: a file that is not there makes no store, and sends nothing.
    let input: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        Box::new(std::io::BufReader::new(input))
    };
    let (report, cut_short) = match url {
        Some(url) => {
            let answer = engine::ops::post_provision(url, input, settings.metrics.provision_token.expose())?;
            let cut_short = answer.error.clone();
            (engine::provision::ImportReport::from(answer), cut_short)
        }
        None => {
            // An import into a new store is the bulk path's first step; into one made by
            // mistake (a wrong or relative store.path, --config forgotten), the lines
            // reach no engine: said, so that the operator sees it.
            let path = &settings.store.path;
            if !path.join("db").is_file() {
                let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                eprintln!(
                    "note: no store at {}: a new one is made there (store.path; a relative one is taken from the \
                     working directory, here {cwd})",
                    path.display()
                );
            }
            let store = open_own_store(settings, |topic| {
                format!(
                    "the store at {} is a node's view of state topic {topic:?}: a line imported here would reach no \
                     other node and be overwritten. Import through a running node: provision import {} --url \
                     http://NODE:{}",
                    settings.store.path.display(),
                    file.display(),
                    settings.metrics.listen.port()
                )
            })?;
            // Streamed: an import of millions of lines never sits in memory whole.
            match engine::provision::import(&store, input) {
                Ok(report) => {
                    store.flush_blocking()?;
                    (report, None)
                }
                // What it did before it stopped is said too: the moves and removals
                // happened, and an import again would not name them.
                Err(e) => (*e.done, Some(e.failure.to_string())),
            }
        }
    };
    for (line, reason) in &report.rejected {
        eprintln!("{}:{line}: rejected: {reason}", file.display());
    }
    for (line, number, from) in &report.moved {
        eprintln!(
            "{}:{line}: {number} moved from the line of {from}: its password and settings there were dropped",
            file.display()
        );
    }
    for (line, number) in &report.removed {
        eprintln!(
            "{}:{line}: {number} removed: no line lists it any more; its password, settings and faxes were dropped",
            file.display()
        );
    }
    if report.rejected_not_listed > 0 {
        eprintln!("{}: {} more lines rejected (not listed)", file.display(), report.rejected_not_listed);
    }
    if report.moved_not_listed > 0 {
        eprintln!("{}: {} more numbers moved (not listed)", file.display(), report.moved_not_listed);
    }
    if report.removed_not_listed > 0 {
        eprintln!("{}: {} more numbers removed (not listed)", file.display(), report.removed_not_listed);
    }
    if let Some(error) = &cut_short {
        eprintln!("error: {error}");
    }
    let rejected = report.rejected.len() + report.rejected_not_listed;
    print_out(format_args!(
        "imported {} lines ({} numbers); rejected {rejected} lines\n",
        report.lines, report.numbers
    ))?;
    Ok(if rejected == 0 && cut_short.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn provision_export(settings: &Settings, file: &std::path::Path, credentials: bool) -> anyhow::Result<ExitCode> {
    let store = open_existing_store(settings)?;
    // A cluster node's store is a view of the state topic: a backup of it is whole only
    // once it had read the topic to its end, and true only without writes unconfirmed.
    if let Some(topic) = store.shared_view_of()? {
        let path = settings.store.path.display();
        anyhow::ensure!(
            store.has_read_to_end()?,
            "the store at {path} is a node's view not known to be whole: its node stopped while catching up with \
             state topic {topic:?}, stopped after being cut off from it, or last ran a version that did not note it. \
             A backup of it could lack subscribers or hold removed ones: back up from a node that logged \
             \"subscriber state caught up\" before it stopped, or start this one until it does (docs/operating.md)"
        );
        anyhow::ensure!(
            !store.diverged()?,
            "the store at {path} is a node's view that may hold writes state topic {topic:?} lacks (its node \
             stopped with writes unconfirmed; its next start rebuilds it): back up from another node (docs/operating.md)"
        );
    }
    let report = if file.as_os_str() == "-" {
        engine::provision::export(&store, credentials, std::io::BufWriter::new(std::io::stdout().lock()))?
    } else {
        // Beside the target, renamed over it once complete and synced: a failed export
        // leaves no half file where a good one is expected.
        // FILE.partial, not a changed extension: `a.jsonl` and `a.txt` get different ones.
        let mut partial = file.as_os_str().to_owned();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        // Password hashes and subscribers' addresses: the operator's only, whatever the
        // umask (a file left from before keeps its mode: it is removed first).
        let _ = std::fs::remove_file(&partial);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options
            .open(&partial)
            .map_err(anyhow::Error::from)
            .and_then(|out| {
                let mut out = std::io::BufWriter::new(out);
                let report = engine::provision::export(&store, credentials, &mut out)?;
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                Ok(report)
            })
            .and_then(|report| Ok(std::fs::rename(&partial, file).map(|()| report)?));
        match written {
            Ok(report) => report,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.context(format!("exporting to {}", file.display())));
            }
        }
    };
    let what = if credentials { format!(", {} credentials", report.credentials) } else { String::new() };
    eprintln!("exported {} lines ({} numbers{what}) to {}", report.lines, report.numbers, file.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to standard output: whether its reader is still there. One gone (the
/// output piped into `head`) is no error: the rest is not wanted, and the command ends
/// as it would have, its summary on standard error.
fn print_out(text: std::fmt::Arguments<'_>) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to standard output"),
    }
}

fn dead_letters(settings: &Settings, action: DeadLetters) -> anyhow::Result<ExitCode> {
    use engine::dead_letter::review;
    let kafka = &settings.kafka;
    let (brokers, properties, topic) = (&kafka.brokers, &kafka.properties, &kafka.dead_letter_topic);
    match action {
        DeadLetters::List { filter, json } => {
            let letters = review::list(brokers, properties, topic, &filter.into())?;
            for l in &letters {
                let shown = if json {
                    let line = serde_json::json!({"partition": l.partition, "offset": l.offset,
                        "replayed": l.replayed, "record": l.record});
                    print_out(format_args!("{line}\n"))?
                } else {
                    let at = l.record["at"].as_str().unwrap_or("");
                    let mark = if l.replayed { "replayed" } else { "" };
                    // A mail or record too large for the topic was written without it.
                    let left_out = ["mail_left_out", "raw_left_out"]
                        .iter()
                        .find_map(|field| l.record["entry"][field].as_str().or(l.record[field].as_str()))
                        .map_or(String::new(), |why| format!(" ({why})"));
                    print_out(format_args!(
                        "{}/{}\t{at}\t{}\t{mark}\t{}{left_out}\n",
                        l.partition,
                        l.offset,
                        l.kind(),
                        l.reason()
                    ))?
                };
                if !shown {
                    break;
                }
            }
            eprintln!("{} dead letters on {topic}", letters.len());
        }
        DeadLetters::Replay { filter, dry_run } => {
            let check = engine::replay::CdrCheck::new(settings);
            let done = engine::replay::replay(brokers, properties, topic, &filter.into(), dry_run, &check, || {
                open_existing_store(settings)
            })?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            let cdrs = done.cdrs.iter().map(|(p, o)| format!("{verb} {topic}/{p}/{o} (a CDR, into its topic)\n"));
            let mails =
                done.mails.iter().map(|(p, o)| format!("{verb} {topic}/{p}/{o} (a mail, into the retry queue)\n"));
            for line in cdrs.chain(mails) {
                if !print_out(format_args!("{line}"))? {
                    break;
                }
            }
            for (partition, offset, why) in &done.unreadable {
                eprintln!("left alone {topic}/{partition}/{offset}: {why}");
            }
            // Not failures: left for a replay after the fix each names, or (a mail left
            // out of its dead letter) for none.
            for (partition, offset, why) in &done.held_back {
                eprintln!("held back {topic}/{partition}/{offset}: {why}");
            }
            for (partition, offset, why) in &done.unmarked {
                eprintln!(
                    "put back {topic}/{partition}/{offset} (a CDR, into its topic), but not marked replayed: {why}"
                );
            }
            eprintln!(
                "{verb} {} CDRs and {} mails; {} replayed before, left alone; {} held back",
                done.cdrs.len(),
                done.mails.len(),
                done.already,
                done.held_back.len()
            );
            if let Some(failed) = &done.mails_failed {
                eprintln!("error: the mails were not all replayed: {failed}");
            }
            if done.mails_failed.is_some() || !done.unreadable.is_empty() || !done.unmarked.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` to its end on a new runtime. Blocking work it leaves behind, a start-up
/// step still under way when a stop came (the cluster check, a catch-up with the state
/// topic), is not waited for: whatever a stop must finish, `work` finished itself.
fn run_to_end<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = runtime()?;
    let result = runtime.block_on(work);
    runtime.shutdown_background();
    result
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
