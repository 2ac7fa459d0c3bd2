//! What the side-by-side modes (`ingest`, `smtp`) share: the engine's rate read from its
//! own counters, and a report of rounds with the median ratio.

use std::path::Path;

use anyhow::Context as _;
use std::time::{Duration, Instant};

use crate::cpu::{Busy, CpuSampler};
use crate::engine_proc::EngineConfig;
use crate::report::Machine;

/// One side of a round: its rate, when it ran (first item to last), and the CPU of the
/// measured process where it is a process of its own (the engine).
#[derive(Debug, Clone, Copy)]
pub struct Side {
    pub per_s: f64,
    pub from: Instant,
    pub to: Instant,
    pub own_cores: Option<f64>,
}

impl Side {
    /// `count` items from `from` to `to`.
    pub fn over(count: u64, from: Instant, to: Instant, own_cores: Option<f64>) -> Self {
        let span = (to - from).as_secs_f64();
        Self { per_s: count as f64 / if span > 0.0 { span } else { 1.0 }, from, to, own_cores }
    }
}

/// One round: the baseline's rate and the engine's, measured one after the other, and
/// how busy the machine was during each.
#[derive(Debug, serde::Serialize)]
pub struct Round {
    pub baseline_per_s: f64,
    pub engine_per_s: f64,
    pub ratio: f64,
    pub baseline_busy: Option<Busy>,
    pub engine_busy: Option<Busy>,
    /// Cores the engine's process used while it was measured.
    pub engine_cores: Option<f64>,
}

impl Round {
    pub async fn measured(cpu: &CpuSampler, baseline: Side, engine: Side) -> Self {
        Self {
            baseline_per_s: baseline.per_s,
            engine_per_s: engine.per_s,
            ratio: engine.per_s / baseline.per_s,
            baseline_busy: cpu.busy(baseline.from, baseline.to).await,
            engine_busy: cpu.busy(engine.from, engine.to).await,
            engine_cores: engine.own_cores,
        }
    }

    /// The round's line on stderr while a run goes on.
    pub fn say(&self, number: usize, baseline: &str, unit: &str) {
        let [baseline_cores, engine_cores] = self.cores();
        eprintln!(
            "round {number}: {baseline} {:.0} {unit}, engine {:.0} {unit}, ratio {:.2}; cores busy during \
             {baseline} {baseline_cores}, during engine {engine_cores}",
            self.baseline_per_s, self.engine_per_s, self.ratio,
        );
    }

    /// Cores busy during each side: the machine, then the engine's and the load tester's
    /// processes.
    fn cores(&self) -> [String; 2] {
        let busy = |b: Option<Busy>, engine: Option<f64>| {
            b.map_or("–".into(), |b| match engine {
                Some(e) => format!("{:.2} ({e:.2} engine, {:.2} load tester)", b.machine, b.load_tester),
                None => format!("{:.2} ({:.2} load tester)", b.machine, b.load_tester),
            })
        };
        [busy(self.baseline_busy, None), busy(self.engine_busy, self.engine_cores)]
    }
}

/// How often [`engine_rate`] reads the engine's counter.
const POLL: Duration = Duration::from_millis(20);

/// Starts the engine and measures how fast its counter `metric` reaches `count`: per
/// second, from the first reading that saw it count to the one that saw it reach
/// `count` (the counter read every 20 ms), over what it counted in between.
pub async fn engine_rate(config: &EngineConfig, metric: &str, count: u64) -> anyhow::Result<Side> {
    let mut engine = config.serve()?;
    engine.wait_ready(Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let n = engine.metrics().await?.get(metric) as u64;
        if n > 0 {
            first.get_or_insert_with(|| (Instant::now(), n, engine.usage().cpu_seconds));
        }
        if n >= count {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the engine's {metric} reached only {n} of {count}");
        tokio::time::sleep(POLL).await;
    }
    let (to, cpu_seconds) = (Instant::now(), engine.usage().cpu_seconds);
    let (from, seen_first, cpu_from) = first.expect("a count reached is seen counting");
    tokio::task::spawn_blocking(move || engine.stop()).await??;
    let counted = timed_count(count, seen_first, to - from)
        .with_context(|| format!("the engine's {metric} cannot be timed: raise the count this mode sends"))?;
    let cores = (cpu_seconds - cpu_from) / (to - from).as_secs_f64();
    Ok(Side::over(counted, from, to, cores.is_finite().then_some(cores)))
}

/// What of `count` the engine counted between the first reading that saw it counting
/// (`seen_first` by then) and the last, `span` later: what it counted before the first
/// reading took time not in the span (counted in, a round of 0.4 s read 5 % fast).
/// Refused when less than two polls lay between the readings: every item counted within
/// one poll was divided by a second.
fn timed_count(count: u64, seen_first: u64, span: Duration) -> anyhow::Result<u64> {
    let counted = count.saturating_sub(seen_first);
    anyhow::ensure!(
        span >= 2 * POLL && counted > 0,
        "{count} counted within {span:?}, {seen_first} of them by the first reading {POLL:?} apart: too few to time"
    );
    Ok(counted)
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
    let median = median(rounds.iter().map(|r| r.ratio).collect());
    let machine = Machine::this();
    let rows: Vec<String> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let [baseline, engine] = r.cores();
            format!(
                "| {} | {:.0} | {:.0} | {:.2} | {baseline} | {engine} |",
                i + 1,
                r.baseline_per_s,
                r.engine_per_s,
                r.ratio
            )
        })
        .collect();
    let markdown = format!(
        "# {title}\n\n`{command}`\n\nMachine: {cores} cores, {mem} GiB. {setup}\n\n\
         | round | {baseline} {unit} | engine {unit} | ratio | cores busy during {baseline} | cores busy during engine |\n\
         |---|---|---|---|---|---|\n{rows}\n\n\
         Median ratio: **{median:.2}**\n\n\
         Cores busy: the whole machine's on average over each side's span (of {cores}), and in \
         brackets the processes' own; the rest is the broker (when it runs apart), the mail \
         server and the kernel.\n",
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

/// The median of `values` (the mean of the middle two of an even count); 0 if none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    /// An even number of rounds has the mean of its middle two as median: it took the
    /// upper one, so four rounds' ratios 1, 2, 3, 4 were quoted as 3.
    #[test]
    fn the_median_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two() {
        assert_eq!(super::median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    /// `ingest --count 2000` reported "engine 2000 CDR/s" (all counted within one poll,
    /// divided by a second) beside a baseline timed exactly; a longer round counted the
    /// items done before its first reading over a span without their time.
    #[test]
    fn an_engine_rate_is_timed_over_what_it_counted_between_the_readings() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(super::timed_count(100_000, 6_000, ms(400)).unwrap(), 94_000);
        let e = super::timed_count(2_000, 2_000, ms(0)).unwrap_err().to_string();
        assert!(e.contains("too few to time"), "{e}");
        assert!(super::timed_count(2_000, 500, ms(20)).is_err(), "one poll apart is no measurement");
    }
}
