//! `ingest`: how fast the engine reads a topic, against a bare librdkafka consumer
//! reading the same topic from the same broker, measured side by side in one run. With
//! `--consumers N` the engine runs N consumer threads and the baseline N bare consumers
//! in one group.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use testkit::smtp::{SinkOptions, SmtpSink};

use crate::compare::{self, Comparison, Round, Side};
use crate::cpu::CpuSampler;
use crate::traffic::{Generator, Mix};
use crate::{Common, Setup};

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// CDRs in the topic. The mock cluster keeps at most 5 MB or 100 000 messages a
    /// partition: raise `--partitions` with it.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Rounds of (bare consumer, engine); the report quotes the median ratio.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let common = &args.common;
    anyhow::ensure!(
        common.metrics_listen.is_none(),
        "--metrics-listen is for run and state: ingest starts an engine for each round, each on a port of its own"
    );
    // A topic per round, each with CDRs of its own: a round's engine sends the mails its
    // CDRs call for, where it would find them all sent already on a topic read before.
    let stems: Vec<String> = (0..args.rounds).map(|r| format!("cdr-ingest-{r}")).collect();
    let stems: Vec<&str> = stems.iter().map(String::as_str).collect();
    let setup = common.prepare(&stems).await?;
    let Setup { format, population, .. } = setup;
    let (brokers, topics) = (&setup.brokers, &setup.topics);

    eprintln!("producing {} CDRs into each of {} topics", args.count, topics.len());
    // Mails the engine has to send in each round (the bare consumer sends none).
    let mut mails = Vec::with_capacity(topics.len());
    for (round, topic) in topics.iter().enumerate() {
        let run_id = format!("ingest{round}-{}", std::process::id());
        let mix = Mix { missed: 0.6, withheld: 0.1, designated: 0.2, fax: 0.0 };
        let mut generator = Generator::new(population, 1.0, format, mix, &run_id, "ingest.example.jp");
        let mut expected = 0;
        let cdrs =
            (0..args.count).map(|_| generator.next(chrono::Utc::now())).inspect(|c| expected += c.expected.len());
        crate::producer::fill(brokers, topic, cdrs)?;
        mails.push(expected);
        if setup.embedded.is_some() {
            crate::producer::ensure_retained(brokers, topic, args.count)?;
        }
    }

    let sink = SmtpSink::start_with(SinkOptions { port: 0, keep_mails: false }).await?;
    let mut config = common.engine_config(&setup, sink.addr(), "ingest.example.jp")?;
    eprintln!("seeded: {}", config.seed(&population).await?);

    let cpu = CpuSampler::start();
    let mut rounds = Vec::new();
    for (round, topic) in topics.iter().enumerate() {
        let group = format!("bare-{round}-{}", std::process::id());
        let bare = bare_consumers(brokers, topic, &group, args.count, common.consumers)?;
        config.topic = topic.clone();
        config.group = format!("engine-{round}-{}", std::process::id());
        config.metrics = crate::engine_proc::ANY_PORT;
        let engine = compare::engine_rate(&config, "callnotify_cdrs_consumed_total", args.count).await?;
        let r = Round::measured(&cpu, bare, engine).await;
        r.say(round + 1, "bare consumer", "CDR/s");
        rounds.push(r);
    }
    let comparison = Comparison {
        name: "ingest",
        title: "Kafka ingest: engine vs bare librdkafka consumer",
        setup: format!(
            "{} CDRs ({}) per round, {} partitions, {} numbers provisioned; the engine sends the \
             mails they cause within the round ({} mails per round). The engine runs {} consumer \
             thread(s); the baseline as many bare consumers in one group, a thread each.",
            args.count,
            format.as_str(),
            common.partitions,
            common.numbers,
            mails.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
            common.consumers,
        ),
        baseline: "bare consumer",
        unit: "CDR/s",
    };
    println!("{}", compare::write(&common.out, &comparison, &rounds)?);
    sink.shutdown().await;
    drop(setup);
    Ok(())
}

/// Reads `count` messages of `topic` with `consumers` plain consumers in one group, a
/// thread each, as the engine's consumer threads are; CDR/s from the first message to
/// the last.
fn bare_consumers(brokers: &str, topic: &str, group: &str, count: u64, consumers: usize) -> anyhow::Result<Side> {
    let mut members = Vec::with_capacity(consumers);
    for _ in 0..consumers {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false");
        // The engine's own fetch settings: the same reads of the broker.
        for (key, value) in engine::source::FETCH_SETTINGS {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config.create()?;
        consumer.subscribe(&[topic])?;
        members.push(consumer);
    }
    // Read by all members together. Each adds its messages in batches: one shared
    // counter written per message would cost the members more than their polling.
    let read = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(600);
    let spans = std::thread::scope(|scope| {
        let threads: Vec<_> = members
            .iter()
            .map(|consumer| {
                let read = &read;
                scope.spawn(move || -> anyhow::Result<Option<(Instant, Instant)>> {
                    let (mut span, mut unsaid) = (None::<(Instant, Instant)>, 0);
                    while read.load(Ordering::Relaxed) < count {
                        anyhow::ensure!(
                            Instant::now() < deadline,
                            "bare consumers read only {} of {count}",
                            read.load(Ordering::Relaxed)
                        );
                        let polled = consumer.poll(Duration::from_millis(10));
                        let idle = polled.is_none();
                        if let Some(m) = polled {
                            m.context("bare consumer")?;
                            let now = Instant::now();
                            span.get_or_insert((now, now)).1 = now;
                            unsaid += 1;
                        }
                        // The last messages are told when the topic runs dry.
                        if unsaid == 64 || (idle && unsaid > 0) {
                            read.fetch_add(unsaid, Ordering::Relaxed);
                            unsaid = 0;
                        }
                    }
                    Ok(span)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("bare consumer thread")).collect::<anyhow::Result<Vec<_>>>()
    })?;
    let now = Instant::now();
    let from = spans.iter().flatten().map(|s| s.0).min().unwrap_or(now);
    let to = spans.iter().flatten().map(|s| s.1).max().unwrap_or(now);
    Ok(Side::over(count, from, to, None))
}
