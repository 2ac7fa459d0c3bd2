//! Wiring: settings → a running engine. `Application::build` opens the store, starts
//! the embedded Kafka if no brokers are configured, the metrics endpoint and the
//! consumer threads; `run_until_stopped` waits for a stop signal and drains.
//!
//! One way to stop: a [`CancellationToken`] tree and a [`TaskTracker`] that every task
//! is spawned on. `shutdown` is the root; `reading` (consumer threads, retry queue) is
//! its child, cancelled first; below `shutdown` each consumer thread's delivery tasks
//! hang, with a child token per partition that a revocation cancels
//! (`source::context::Sending`). Once the consumers have drained, `shutdown` is
//! cancelled and the tracker waited for, all within the grace period. Two helpers end
//! with what they serve instead: the flood-control sweeper with its `Deliverer` (it
//! holds a weak handle) and the site's TLS accept loop with its listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster;
use crate::config::Settings;
use crate::dead_letter::DeadLetters;
use crate::deliver::Deliverer;
use crate::disk::DiskWatch;
use crate::embedded::EmbeddedKafka;
use crate::ops;
use crate::partition_log::{PartitionLog, PartitionLogOptions};
use crate::pipeline::Pipeline;
use crate::render::Renderer;
use crate::resolve::Resolver;
use crate::source::{self, Source, SourceOptions, Stages};
use crate::state::{StateLog, StateOptions};
use crate::store::{Claims, Store};
use crate::telemetry::Metrics;

/// librdkafka's `message.timeout.ms` for dead-letter writes (see `DeadLetters`).
const DEAD_LETTER_TIMEOUT_MS: &str = "5000";

/// How long a stop may take beyond `engine.shutdown_grace_secs` before the engine stops
/// waiting for what has not ended.
pub const STOP_MARGIN: Duration = Duration::from_secs(15);

/// `what`'s output, or past `deadline` an error naming `part` of the engine that had not
/// ended.
async fn ended_by<T>(deadline: tokio::time::Instant, part: &str, what: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout_at(deadline, what).await.map_err(|_| {
        anyhow::anyhow!(
            "the stop took longer than engine.shutdown_grace_secs + {} s: {part} had not ended, and the engine exits without \
             waiting for it (CDRs after the last committed offsets are read again at the next start)",
            STOP_MARGIN.as_secs()
        )
    })
}

/// Cancels the engine's `shutdown` when dropped unless the build got to its end: what a
/// failed build started (the operator endpoint) stops with it.
struct Unbuilt(Option<CancellationToken>);

impl Drop for Unbuilt {
    fn drop(&mut self) {
        if let Some(shutdown) = self.0.take() {
            shutdown.cancel();
        }
    }
}

/// A running engine.
pub struct Application {
    store: Store,
    resolver: Resolver,
    metrics: Metrics,
    metrics_addr: SocketAddr,
    bootstrap: String,
    /// Cancelled when the engine is to stop reading CDRs: the consumer threads and the
    /// retry queue stop. A child of `shutdown`; a consumer thread that fails cancels it.
    reading: CancellationToken,
    /// Cancelled once the consumers have drained: what serves while they do (the
    /// metrics endpoint, the pruner of sent records, the disk watch) stops then, and
    /// delivery tasks still sending queue their mails.
    shutdown: CancellationToken,
    /// Every task the engine spawns, delivery tasks included: a stop waits for them all.
    tasks: TaskTracker,
    source: Source,
    /// This node's part of the shared subscriber state: stopped after the tasks.
    state: Arc<StateLog>,
    /// The partitions' changelogs: stopped after the tasks.
    changelog: Arc<PartitionLog>,
    /// Kept alive while the engine runs, when it was started for us.
    _embedded: Option<EmbeddedKafka>,
    /// `engine.shutdown_grace_secs`.
    grace: Duration,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, None).await
    }

    /// [`Application::build`], its store reading `clock` (a test moving a node's time
    /// on) instead of the system's.
    pub async fn build_with_clock(settings: Settings, clock: Option<crate::store::Clock>) -> anyhow::Result<Self> {
        if let Some(problem) = settings.smtp_credentials_problem() {
            anyhow::bail!(problem);
        }
        let group_commit = Duration::from_millis(settings.store.group_commit_ms);
        let grace = Duration::from_secs(settings.engine.shutdown_grace_secs);
        let kafka = &settings.kafka;
        let embedded = if kafka.brokers.is_empty() {
            let mut topics: Vec<(&str, i32)> =
                kafka.topics.iter().map(|t| (t.name.as_str(), kafka.embedded_partitions)).collect();
            topics.push((&kafka.dead_letter_topic, kafka.embedded_partitions));
            topics.extend([(kafka.state_topic.as_str(), 1), (&kafka.state_requests_topic, 1)]);
            topics.extend([
                (kafka.sent_topic.as_str(), kafka.embedded_partitions),
                (&kafka.retry_topic, kafka.embedded_partitions),
            ]);
            let mock = EmbeddedKafka::start_with(&topics).context("starting the embedded Kafka mock cluster")?;
            tracing::info!(
                bootstrap = mock.bootstrap_servers(),
                "embedded Kafka mock cluster started (kafka.brokers is empty)"
            );
            Some(mock)
        } else {
            None
        };
        let bootstrap = embedded.as_ref().map_or(kafka.brokers.clone(), |c| c.bootstrap_servers().to_owned());

        // The cluster answers and has every topic, before anything is consumed.
        let mut wanted: Vec<(String, &'static str)> =
            kafka.topics.iter().map(|t| (t.name.clone(), "kafka.topics")).collect();
        wanted.push((kafka.dead_letter_topic.clone(), "kafka.dead_letter_topic"));
        let single = [
            (kafka.state_topic.clone(), "kafka.state_topic"),
            (kafka.state_requests_topic.clone(), "kafka.state_requests_topic"),
        ];
        let changelogs =
            [(kafka.sent_topic.clone(), "kafka.sent_topic"), (kafka.retry_topic.clone(), "kafka.retry_topic")];
        let cdr_topics: Vec<String> = kafka.topics.iter().map(|t| t.name.clone()).collect();
        wanted.extend(single.iter().cloned());
        wanted.extend(changelogs.iter().cloned());
        let checked = cluster::client_config(&bootstrap, &[], &kafka.properties);
        let topics = wanted.len();
        tokio::task::spawn_blocking(move || {
            let wanted: Vec<(&str, &str)> = wanted.iter().map(|(t, k)| (t.as_str(), *k)).collect();
            let single: Vec<(&str, &str)> = single.iter().map(|(t, k)| (t.as_str(), *k)).collect();
            cluster::check_topics(&checked, &wanted)?;
            cluster::check_one_partition(&checked, &single)?;
            let changelogs: Vec<(&str, &str)> = changelogs.iter().map(|(t, k)| (t.as_str(), *k)).collect();
            let cdrs: Vec<&str> = cdr_topics.iter().map(String::as_str).collect();
            cluster::check_partitions_cover(&checked, &changelogs, &cdrs)
        })
        .await??;
        tracing::info!(topics, "the Kafka cluster answers and has every topic");

        // The store, a view of the state topic once caught up with it; then the
        // subscriptions the resolver indexes from it.
        let (path, cache) = (settings.store.path.clone(), settings.store.sled_cache_mb << 20);
        let capacity = settings.store.cache_capacity;
        let one_record_lines = settings.store.one_record_lines;
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        // A build that fails ends what it started (the operator endpoint below).
        let mut unbuilt = Unbuilt(Some(shutdown.clone()));
        let tasks = TaskTracker::new();
        // The operator endpoint answers from now: a node catching up (minutes at carrier
        // scale) is scraped, not "down", and `/readyz` says it starts.
        let endpoint = ops::listen(&settings.metrics, metrics.clone(), &tasks, shutdown.clone())
            .await
            .with_context(|| format!("binding metrics.listen {}", settings.metrics.listen))?;
        tracing::info!(
            url = %format!("http://{}/readyz", endpoint.addr()),
            "operator endpoint answering: /metrics now, /readyz ready once CDRs are read"
        );
        let state_options = (
            bootstrap.clone(),
            kafka.properties.clone(),
            kafka.state_topic.clone(),
            kafka.state_requests_topic.clone(),
            kafka.group_id.clone(),
        );
        let changelog_topics = (kafka.sent_topic.clone(), kafka.retry_topic.clone());
        let embedded_state = embedded.is_some();
        let (errors, failed) = (metrics.clone(), shutdown.clone());
        let (store, resolver, state, changelog) = tokio::task::spawn_blocking(move || {
            let store = Store::open_with_cache(&path, cache).with_context(|| {
                format!(
                    "opening the store at {} (one process at a time: is another `callnotify serve`, or a \
                     `provision import` without --url, using it?)",
                    path.display()
                )
            })?;
            let store = match clock {
                Some(clock) => store.with_clock(clock),
                None => store,
            }
            .with_one_record_lines(one_record_lines);
            store.set_group_commit(group_commit);
            store.report_errors_to(errors.clone());
            let (brokers, properties, topic, requests, group_id) = &state_options;
            let reach = crate::cluster::Reach { brokers, properties, group_id };
            let options = StateOptions { reach, topic, requests, embedded: embedded_state };
            let state = StateLog::start(&store, &options, errors.clone(), failed)
                .context("joining the shared subscriber state")?;
            let (sent_topic, retry_topic) = &changelog_topics;
            let changelog =
                Arc::new(PartitionLog::start(&PartitionLogOptions { reach, sent_topic, retry_topic }, errors)?);
            store.attach_partition_sink(changelog.clone());
            let started = std::time::Instant::now();
            let resolver = Resolver::new(store.clone(), capacity)?;
            tracing::info!(
                subscribed = resolver.subscribed_numbers(),
                cached = resolver.cached_subscriptions(),
                took = ?started.elapsed(),
                "subscriptions indexed"
            );
            Ok::<_, anyhow::Error>((store, resolver, state, changelog))
        })
        .await??;
        let disk = DiskWatch::new(&settings.store.path, settings.store.min_free_mb, metrics.clone());
        disk.check();
        if let Some(why) = disk.reason() {
            tracing::warn!(reason = %why, "starting with the store's disk low: no CDR is read until there is room");
        }

        // A dead-letter write the broker has not confirmed within a few seconds is
        // logged, counted and tried again (`DeadLetters`), instead of librdkafka waiting
        // its default 5 minutes in silence; `kafka.properties` may say otherwise.
        let producer: FutureProducer = cluster::client_config(
            &bootstrap,
            &[
                ("enable.idempotence", "true"),
                ("message.timeout.ms", DEAD_LETTER_TIMEOUT_MS),
                // A fax record refused, with its document.
                ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
                // The engine never creates topics: a missing one is an error to see.
                ("allow.auto.create.topics", "false"),
            ],
            &cluster::producer_properties(&kafka.properties),
        )
        .create()
        .context("creating the dead-letter producer")?;
        let dead_letters = DeadLetters::new(producer, &kafka.dead_letter_topic, metrics.clone());

        let from = settings.smtp.from.parse().context("smtp.from")?;
        let renderer = Renderer::new(from).with_site(&settings.admin.public_url);
        // Opening the retry queue walks it in the store (its count, the entries set
        // aside, the last minute's recipients): store work, off the runtime's workers.
        let deliverer = {
            let (smtp, store, metrics, dead_letters) =
                (settings.smtp.clone(), store.clone(), metrics.clone(), dead_letters.clone());
            // The queue counted there too: a walk of the store, not for a tokio worker.
            tokio::task::spawn_blocking(move || {
                Deliverer::new(&smtp, &store, metrics, dead_letters).map(|deliverer| {
                    let queued = deliverer.queued();
                    (deliverer, queued)
                })
            })
            .await??
        };
        let (deliverer, queued) = deliverer;
        let reading = shutdown.child_token();
        // Retries under way at shutdown get the same time as first attempts.
        let finish = source::sending_time(grace);
        tasks.spawn(deliverer.clone().run_retries(reading.clone().cancelled_owned(), finish));
        if queued > 0 {
            tracing::info!(mails = queued, "mails waiting in the retry queue from before");
        }
        if settings.smtp.host.is_empty() {
            tracing::info!(outbox = %settings.smtp.outbox_dir.display(), "no smtp.host: mails are written as .eml files");
        }

        endpoint.serve(store.clone(), disk.clone());
        let metrics_addr = endpoint.addr();
        tracing::info!(url = %format!("http://{metrics_addr}/metrics"), "metrics endpoint listening");

        tasks.spawn(crate::store::sent::prune_hourly(
            store.clone(),
            settings.store.sent_retention_days,
            shutdown.clone(),
        ));
        tasks.spawn(crate::deliver::forget_old_aside_hourly(
            store.clone(),
            Duration::from_secs(settings.smtp.retry_give_up_secs),
            shutdown.clone(),
        ));
        tasks.spawn(crate::store::faxes::expire_hourly(
            store.clone(),
            settings.store.fax_retention_days,
            shutdown.clone(),
        ));
        tasks.spawn(disk.clone().run(shutdown.clone()));

        let pipeline = Pipeline {
            resolver: resolver.clone(),
            renderer,
            claims: Arc::new(Claims::new(store.clone())),
            metrics: metrics.clone(),
            max_call_age: chrono::TimeDelta::hours(settings.engine.max_call_age_hours as i64),
            fax_retention: chrono::TimeDelta::days(settings.store.fax_retention_days as i64),
        };
        let stages = Stages {
            pipeline,
            deliverer,
            dead_letters,
            metrics: metrics.clone(),
            runtime: tokio::runtime::Handle::current(),
            tasks: tasks.clone(),
            disk,
            changelog: changelog.clone(),
        };
        let options = SourceOptions {
            brokers: &bootstrap,
            group_id: &kafka.group_id,
            topics: kafka.topics.iter().map(|t| (t.name.clone(), t.format)).collect(),
            properties: &kafka.properties,
            consumers: settings.engine.consumers,
            max_in_flight: settings.engine.max_in_flight,
            grace,
        };
        let source =
            source::spawn(options, stages, reading.clone(), &shutdown).context("starting the Kafka consumer")?;
        tracing::info!(group = %kafka.group_id, consumers = settings.engine.consumers, topics = ?kafka.topics.iter().map(|t| &t.name).collect::<Vec<_>>(), "consuming CDRs");

        unbuilt.0 = None;
        Ok(Self {
            store,
            resolver,
            metrics,
            metrics_addr,
            bootstrap,
            reading,
            shutdown,
            tasks,
            source,
            state,
            changelog,
            _embedded: embedded,
            grace,
        })
    }

    /// The subscription store (provisioning, the settings site).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The Kafka bootstrap servers in use (the embedded cluster's, if started).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Runs until `shutdown` completes (or the consumer fails), then stops consuming,
    /// finishes in-flight mails within the grace period, commits and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let source = self.source;
        std::thread::spawn(move || {
            let _ = done_tx.send(source.join());
        });
        tokio::pin!(done_rx);
        let finished = tokio::select! {
            () = shutdown => {
                tracing::info!("stopping: finishing in-flight mails");
                None
            }
            r = &mut done_rx => Some(r),
        };
        // Consumers stop reading; queued mails stay in the store for the next start,
        // also the ones queued during the stop; retries under way may finish.
        self.reading.cancel();
        // A stop always ends: what has not ended by the deadline (a librdkafka close that
        // never returns, say) is left behind with an error, and the process can exit.
        let deadline = tokio::time::Instant::now() + self.grace + STOP_MARGIN;
        let result = match finished {
            Some(r) => r,
            None => ended_by(deadline, "the consumer threads", done_rx).await?,
        };
        self.shutdown.cancel();
        self.tasks.close();
        let tasks = self.tasks.wait();
        tokio::pin!(tasks);
        tokio::select! {
            () = &mut tasks => {}
            () = tokio::time::sleep_until(deadline - STOP_MARGIN) => {
                // A request of the site, the IVR or /provision still waits for the state
                // owner (the state topic unwritable): it is answered that the write may
                // not be carried out, so its server can end.
                self.state.abandon_writes();
                ended_by(deadline, "the engine's tasks (retry queue, delivery, metrics endpoint)", tasks).await?;
            }
        }
        let (state, changelog, store) = (self.state.clone(), self.changelog.clone(), self.store.clone());
        let stop = move || {
            changelog.stop();
            changelog.keep_refused_here(&store);
            state.stop();
        };
        ended_by(deadline, "the subscriber state's threads", tokio::task::spawn_blocking(stop)).await??;
        if let Some(cluster) = self._embedded {
            // Its drop joins the mock cluster's thread: off the runtime.
            let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                drop(cluster);
                let _ = gone_tx.send(());
            });
            let _ = ended_by(deadline, "the embedded Kafka cluster", gone_rx).await?;
        }
        if let Some(failure) = self.state.failure() {
            anyhow::bail!("{failure}");
        }
        result.context("consumer threads vanished")?.context("consumer stopped")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_past_its_deadline_names_what_had_not_ended_instead_of_waiting_for_it() {
        let now = tokio::time::Instant::now();
        let err = ended_by(now, "the consumer threads", std::future::pending::<()>()).await.unwrap_err().to_string();
        assert!(err.contains("the consumer threads had not ended"), "{err}");
        assert!(err.contains("read again at the next start"), "{err}");

        let ended = ended_by(now + Duration::from_secs(3600), "the retry queue", std::future::ready(7)).await;
        assert_eq!(ended.unwrap(), 7, "what ends in time is waited for");
    }
}
