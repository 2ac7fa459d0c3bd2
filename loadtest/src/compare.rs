//! What the side-by-side modes (`ingest`, `smtp`) share: the engine's rate read from its
//! own counters, and a report of rounds with the median ratio.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::engine_proc::EngineConfig;
use crate::report::Machine;

/// One round: the baseline's rate and the engine's, measured one after the other.
#[derive(Debug, serde::Serialize)]
pub struct Round {
    pub baseline_per_s: f64,
    pub engine_per_s: f64,
    pub ratio: f64,
}

impl Round {
    pub fn new(baseline_per_s: f64, engine_per_s: f64) -> Self {
        Self { baseline_per_s, engine_per_s, ratio: engine_per_s / baseline_per_s }
    }
}

/// Starts the engine and measures how fast its counter `metric` reaches `count`: per
/// second, from its first increment to the last (the counter polled every 20 ms).
pub async fn engine_rate(config: &EngineConfig, metric: &str, count: u64) -> anyhow::Result<f64> {
    let mut engine = config.serve()?;
    engine.wait_ready(Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let n = engine.metrics().await?.get(metric) as u64;
        if n > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if n >= count {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the engine's {metric} reached only {n} of {count}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let span = first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    tokio::task::spawn_blocking(move || engine.stop()).await??;
    Ok(count as f64 / span)
}

/// What a comparison report says about itself.
pub struct Comparison<'a> {
    /// File name stem in the report folder (`ingest`, `smtp`).
    pub name: &'a str,
    pub title: &'a str,
    /// One line on the set-up, after the machine.
    pub setup: String,
    pub baseline: &'a str,
    pub unit: &'a str,
}

/// Writes `NAME.md` and `NAME.json` to `out` and returns the Markdown.
pub fn write(out: &Path, c: &Comparison<'_>, rounds: &[Round]) -> anyhow::Result<String> {
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let machine = Machine::this();
    let rows: Vec<String> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| format!("| {} | {:.0} | {:.0} | {:.2} |", i + 1, r.baseline_per_s, r.engine_per_s, r.ratio))
        .collect();
    let markdown = format!(
        "# {title}\n\n`{command}`\n\nMachine: {cores} cores, {mem} GiB. {setup}\n\n\
         | round | {baseline} {unit} | engine {unit} | ratio |\n|---|---|---|---|\n{rows}\n\n\
         Median ratio: **{median:.2}**\n",
        title = c.title,
        command = std::env::args().collect::<Vec<_>>().join(" "),
        cores = machine.cores,
        mem = machine.memory_gib,
        setup = c.setup,
        baseline = c.baseline,
        unit = c.unit,
        rows = rows.join("\n"),
    );
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(format!("{}.md", c.name)), &markdown)?;
    let json = serde_json::json!({"machine": machine, "setup": c.setup, "rounds": rounds, "median_ratio": median});
    std::fs::write(out.join(format!("{}.json", c.name)), serde_json::to_string_pretty(&json)?)?;
    Ok(markdown)
}
