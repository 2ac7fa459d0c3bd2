//! `ingest`: how fast the engine reads a topic, against a bare librdkafka consumer
//! reading the same topic from the same broker, measured side by side in one run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use engine::sink::{SinkOptions, SmtpSink};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer};

use crate::engine_proc::{free_port, EngineConfig};
use crate::report::Machine;
use crate::traffic::{Generator, Mix};
use crate::{Common, Setup};

const TOPIC: &str = "cdr-ingest";

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    common: Common,
    /// CDRs in the topic.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Rounds of (bare consumer, engine); the report quotes the median ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, serde::Serialize)]
struct Round {
    bare_per_s: f64,
    engine_per_s: f64,
    ratio: f64,
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let Setup { binary, workdir, format, population, brokers, embedded } = common.prepare(TOPIC)?;

    eprintln!("producing {} CDRs", args.count);
    let (producer, acks) = crate::producer::create(&brokers)?;
    let mix = Mix { missed: 0.6, withheld: 0.1, designated: 0.2 };
    let mut generator = Generator::new(population, 1.0, format, mix, "ingest", "ingest.example.jp");
    for _ in 0..args.count {
        let cdr = generator.next(chrono::Utc::now());
        let mut record = BaseRecord::to(TOPIC).key(&cdr.key).payload(&cdr.payload);
        while let Err((_, back)) = producer.send(record) {
            producer.poll(Duration::from_millis(5));
            record = back;
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let delivered = acks.delivered.load(std::sync::atomic::Ordering::Acquire);
    anyhow::ensure!(
        delivered == args.count,
        "the broker took {delivered} of {} CDRs (last error: {:?})",
        args.count,
        acks.last_error.lock().expect("error lock")
    );

    let sink = SmtpSink::start_with(SinkOptions { port: 0, keep_mails: false }).await?;
    let mut config = EngineConfig {
        binary,
        workdir: workdir.clone(),
        brokers: brokers.clone(),
        topic: TOPIC.into(),
        format: format.as_str(),
        group: String::new(),
        smtp: sink.addr(),
        metrics: free_port()?,
        cache_capacity: common.cache_capacity,
        pool_size: common.pool_size,
        from_domain: "ingest.example.jp".into(),
    };
    eprintln!("seeded: {}", config.seed(&population)?);

    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let bare = bare_consumer(&brokers, &format!("bare-{round}-{}", std::process::id()), args.count)?;
        config.group = format!("engine-{round}-{}", std::process::id());
        config.metrics = free_port()?;
        let engine_rate = engine_consumer(&config, args.count).await?;
        let r = Round { bare_per_s: bare, engine_per_s: engine_rate, ratio: engine_rate / bare };
        eprintln!(
            "round {}: bare {:.0} CDR/s, engine {:.0} CDR/s, ratio {:.2}",
            round + 1,
            r.bare_per_s,
            r.engine_per_s,
            r.ratio
        );
        rounds.push(r);
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let machine = Machine::this();
    let markdown = format!(
        "# Kafka ingest: engine vs bare librdkafka consumer\n\n`{}`\n\n\
         Machine: {} cores, {} GiB. {} CDRs ({}), {} partitions, {} numbers provisioned.\n\n\
         | round | bare consumer CDR/s | engine CDR/s | ratio |\n|---|---|---|---|\n{}\n\
         Median ratio: **{median:.2}**\n",
        std::env::args().collect::<Vec<_>>().join(" "),
        machine.cores,
        machine.memory_gib,
        args.count,
        format.as_str(),
        common.partitions,
        common.numbers,
        rounds
            .iter()
            .enumerate()
            .map(|(i, r)| format!("| {} | {:.0} | {:.0} | {:.2} |", i + 1, r.bare_per_s, r.engine_per_s, r.ratio))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    std::fs::create_dir_all(&common.out)?;
    std::fs::write(common.out.join("ingest.md"), &markdown)?;
    let json = serde_json::json!({"machine": machine, "count": args.count, "rounds": rounds, "median_ratio": median});
    std::fs::write(common.out.join("ingest.json"), serde_json::to_string_pretty(&json)?)?;
    println!("{markdown}");
    sink.shutdown().await;
    drop(embedded);
    Ok(())
}

/// Reads `count` messages with a plain consumer; CDR/s from the first to the last.
fn bare_consumer(brokers: &str, group: &str, count: u64) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let (mut n, mut first) = (0u64, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < count {
        anyhow::ensure!(Instant::now() < deadline, "bare consumer read only {n} of {count}");
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.context("bare consumer")?;
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
    }
    let span = first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    Ok(count as f64 / span)
}

/// Runs the engine on a fresh group until it has consumed `count`; CDR/s from its first
/// consumed CDR to the last (metrics polled every 20 ms).
async fn engine_consumer(config: &EngineConfig, count: u64) -> anyhow::Result<f64> {
    let mut engine = config.serve()?;
    engine.wait_ready(Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let consumed = engine.metrics().await?.get("callnotify_cdrs_consumed_total") as u64;
        if consumed > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if consumed >= count {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the engine consumed only {consumed} of {count}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let span = first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    engine.stop()?;
    Ok(count as f64 / span)
}
