//! `state`: the shared subscriber state (docs/cluster.md) at carrier scale. Node A
//! starts on an empty store; the population is imported through it
//! (`provision import --url`): the import rate. Then node B starts on an empty store
//! and catches up with the state topic before it serves: its catch-up time (from its
//! own log line) and its peak RSS. Last, the bulk path of a first load: the same files
//! imported into a store of its own (`provision import` without `--url`), then node C
//! started on it publishes it into an empty state topic: that import rate.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use testkit::free_port;

use crate::engine_proc::{strip_colours, ANY_PORT};

use crate::Common;

#[derive(Args)]
pub struct StateArgs {
    #[command(flatten)]
    pub(crate) common: Common,
}

pub async fn state(args: StateArgs) -> anyhow::Result<()> {
    let common = &args.common;
    anyhow::ensure!(
        setup_is_real(common),
        "state needs --brokers (Apache Kafka): the mock cluster keeps 100 000 messages a partition"
    );
    let setup = common.prepare(&["cdr-state", "cdr-bulk"]).await?;
    let population = setup.population;
    // In files of at most a million lines: one upload stays below `POST /provision`'s
    // 1 GiB limit.
    const LINES_PER_FILE: u64 = 1_000_000;
    let started = Instant::now();
    let mut files = Vec::new();
    for (i, from) in (0..population.numbers).step_by(LINES_PER_FILE as usize).enumerate() {
        let file = setup.workdir.join(format!("population-{i}.jsonl"));
        let to = (from + LINES_PER_FILE).min(population.numbers);
        population.write_jsonl_range(std::fs::File::create(&file)?, from..to)?;
        files.push(file);
    }
    eprintln!("{} lines written in {:.1} s", population.numbers, started.elapsed().as_secs_f64());

    let mut a = common.engine_config(&setup, free_port()?, "state.example.jp")?;
    a.topic = setup.topics[0].clone();
    a.group = format!("state-{}", std::process::id());
    a.node = "a".into();
    // Nodes B and C beside node A (`--metrics-listen` is node A's): ports of their own.
    let mut b = common.engine_config(&setup, a.smtp, "state.example.jp")?;
    b.metrics = ANY_PORT;
    (b.topic, b.group, b.node) = (a.topic.clone(), a.group.clone(), "b".into());
    let mut c = common.engine_config(&setup, a.smtp, "state.example.jp")?;
    c.metrics = ANY_PORT;
    (c.topic, c.group, c.node) = (setup.topics[1].clone(), format!("bulk-{}", std::process::id()), "c".into());
    for node in [&a, &b, &c] {
        let _ = std::fs::remove_dir_all(node.store_dir());
        let _ = std::fs::remove_file(node.log_file());
    }

    let mut first = a.serve()?;
    first.wait_ready(Duration::from_secs(120)).await?;
    let started = Instant::now();
    for file in &files {
        let said = a.provision(file, Some(first.metrics_addr())).await?;
        eprintln!("{}: {said} ({:.1} s so far)", file.display(), started.elapsed().as_secs_f64());
    }
    let import = started.elapsed();
    let rate = population.numbers as f64 / import.as_secs_f64();
    println!(
        "import through node A: {} lines in {:.1} s = {rate:.0} lines/s",
        population.numbers,
        import.as_secs_f64()
    );

    let started = Instant::now();
    let mut second = b.serve()?;
    second.wait_ready(Duration::from_secs(1800)).await?;
    let serving = started.elapsed();
    let usage = second.usage();
    let log = std::fs::read_to_string(b.log_file()).context("node B's log")?;
    let caught_up = log.lines().find(|l| l.contains("subscriber state caught up")).unwrap_or("(no catch-up line)");
    println!(
        "node B on an empty store: serving {:.1} s after its start, peak RSS {:.0} MB, RSS now {:.0} MB; {}",
        serving.as_secs_f64(),
        usage.peak_rss_bytes as f64 / 1e6,
        usage.rss_bytes as f64 / 1e6,
        strip_colours(caught_up)
    );
    second.stop()?;
    first.stop()?;

    let started = Instant::now();
    for file in &files {
        let said = c.provision(file, None).await?;
        eprintln!("{}: {said} ({:.1} s so far)", file.display(), started.elapsed().as_secs_f64());
        std::fs::remove_file(file)?;
    }
    let offline = started.elapsed();
    let mut third = c.serve()?;
    third.wait_ready(Duration::from_secs(1800)).await?;
    let bulk = started.elapsed();
    let bulk_rate = population.numbers as f64 / bulk.as_secs_f64();
    let log = std::fs::read_to_string(c.log_file()).context("node C's log")?;
    let carried = log.lines().find(|l| l.contains("into the empty state topic")).unwrap_or("(no carry-over line)");
    println!(
        "bulk path: {} lines imported into node C's own store in {:.1} s, node C serving {:.1} s after that          ({bulk_rate:.0} lines/s in all, peak RSS {:.0} MB); {}",
        population.numbers,
        offline.as_secs_f64(),
        (bulk - offline).as_secs_f64(),
        third.usage().peak_rss_bytes as f64 / 1e6,
        strip_colours(carried)
    );
    third.stop()?;

    let report = serde_json::json!({
        "numbers": population.numbers,
        "import_secs": import.as_secs_f64(),
        "import_lines_per_sec": rate,
        "catch_up_serving_secs": serving.as_secs_f64(),
        "catch_up_log": strip_colours(caught_up),
        "peak_rss_mb": usage.peak_rss_bytes as f64 / 1e6,
        "bulk_offline_import_secs": offline.as_secs_f64(),
        "bulk_secs": bulk.as_secs_f64(),
        "bulk_lines_per_sec": bulk_rate,
        "bulk_log": strip_colours(carried),
    });
    std::fs::create_dir_all(&common.out)?;
    std::fs::write(common.out.join("state.json"), serde_json::to_string_pretty(&report)?)?;
    drop(setup);
    Ok(())
}

fn setup_is_real(common: &Common) -> bool {
    !common.brokers.is_empty()
}
