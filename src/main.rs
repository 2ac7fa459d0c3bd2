//! `callnotify`: the command line. Parses arguments, loads configuration and calls into
//! the engine; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use engine::config::Settings;
use engine::startup::Application;

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
}

#[derive(Subcommand)]
enum Provision {
    /// Load lines from JSON Lines (one line per 回線); `-` reads standard input.
    /// Bad lines are reported with their line number and not applied; the rest are.
    Import { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            runtime()?.block_on(async {
                let app = Application::build(settings).await?;
                app.run_until_stopped(shutdown_signal()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            runtime()?.block_on(engine::demo::run(settings, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision { action: Provision::Import { file } } => provision_import(&settings, &file),
    }
}

fn provision_import(settings: &Settings, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let store = engine::store::Store::open(&settings.store.path).with_context(|| {
        format!(
            "opening the store at {} (is `callnotify serve` running on it? stop it first)",
            settings.store.path.display()
        )
    })?;
    let report = if file.as_os_str() == "-" {
        engine::provision::import(&store, std::io::stdin().lock())?
    } else {
        let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        engine::provision::import(&store, std::io::BufReader::new(input))?
    };
    store.flush_blocking()?;
    for (line, reason) in &report.rejected {
        eprintln!("{}:{line}: rejected: {reason}", file.display());
    }
    println!("imported {} lines ({} numbers); rejected {} lines", report.lines, report.numbers, report.rejected.len());
    Ok(if report.rejected.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
