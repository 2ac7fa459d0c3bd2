//! The retry queue's reads during a mail server's outage after a rebalance: the node's
//! store holds, due ahead of its own mails, `CALLNOTIFY_BENCH_FOREIGN` entries (default
//! 10 000) of a CDR partition it gave up, which another node reads now. They stay in
//! this store, unsent, until the partition comes back, set aside at the revocation
//! (`RetryQueue::park`); every turn of the retry loop (one per finished attempt) reads
//! the queue.
//!
//!
//! And the restore of a rebalance's newly assigned partitions (`RetryQueue::reconcile`):
//! 30 partitions, each with its share of `CALLNOTIFY_BENCH_FOREIGN` queued entries, made
//! their changelogs' in one call, beside one call a partition (as the restore did before:
//! a walk of the whole queue each).
//!
//! `cargo bench --bench retry` measures; `-- --test` runs each once (CI smoke).

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::address::DestinationAddress;
use engine::deliver::queue::{Queued, RetryQueue};
use engine::phone::PhoneNumber;
use engine::render::{MailService, Origin, Renderer};
use engine::store::{PartitionId, PartitionSink, Store};

/// The allocator the `callnotify` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The mails this node sends per turn (`smtp.pool_size`'s default).
const OWN: usize = 16;

/// A node that reads partition 0, and partition 1 until it gives it up; it publishes
/// nowhere.
#[derive(Default)]
struct Node {
    gave_up_one: AtomicBool,
}

impl PartitionSink for Node {
    fn sent(&self, _: &PartitionId, _: &[u8], _: u64) {}
    fn retry_put(&self, _: &PartitionId, _: &[u8], _: i64, _: &[u8]) {}
    fn retry_removed(&self, _: &PartitionId, _: &[u8]) {}
    fn owns(&self, partition: &PartitionId) -> bool {
        partition.partition == 0 || (partition.partition == 1 && !self.gave_up_one.load(Ordering::SeqCst))
    }
}

/// A mail to `u{i}@example.jp`, its call read from `partition`, its first attempt failed.
fn queued(renderer: &Renderer, i: usize, partition: i32) -> Queued {
    let called = PhoneNumber::parse(&format!("03{:08}", i)).unwrap();
    let to = DestinationAddress::parse(&format!("u{i}@example.jp")).unwrap();
    let mail = renderer.render_test(called.as_str(), &to, "n", MailService::Call).unwrap();
    let ended_at = DateTime::from_timestamp(1_764_000_000, 0).unwrap();
    let source = Some(PartitionId { topic: "cdr".into(), partition });
    let origin = Origin { call_id: format!("call-{i}"), called, ended_at, source };
    Queued::new(&mail, &origin, "451 4.3.0 try later", ended_at)
}

fn retry_benches(c: &mut Criterion) {
    let foreign: usize = std::env::var("CALLNOTIFY_BENCH_FOREIGN").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let store = Store::temporary().unwrap();
    let node = Arc::new(Node::default());
    store.attach_partition_sink(node.clone());
    let queue = RetryQueue::open(&store).unwrap();
    let renderer = Renderer::new("no-reply@notify.example.jp".parse().unwrap());
    let now_secs = Utc::now().timestamp() as u64;
    // Partition 1's entries fall due first; partition 0's after them.
    for i in 0..foreign {
        queue.push(&queued(&renderer, i, 1), 1_000 + i as i64, now_secs).unwrap();
    }
    for i in foreign..foreign + OWN {
        queue.push(&queued(&renderer, i, 0), 1_000 + i as i64, now_secs).unwrap();
    }
    // The revocation of partition 1 (`PartitionLog::disown`).
    node.gave_up_one.store(true, Ordering::SeqCst);
    assert_eq!(queue.park().unwrap(), foreign);
    let now_ms = Utc::now().timestamp_millis();
    let none = HashSet::new();

    let mut group = c.benchmark_group("retry_queue");
    group.throughput(Throughput::Elements(1));
    // One turn of the retry loop: the due mails it sends, and when the next is due.
    group.bench_function("turn_after_a_rebalance", |b| {
        b.iter(|| {
            let turn = queue.turn(black_box(now_ms), &none, OWN).unwrap();
            assert_eq!((turn.due.len(), turn.next_due_ms), (OWN, Some(1_000 + foreign as i64)), "this node's own");
        })
    });
    group.finish();
    reconcile_benches(c, foreign, &renderer);
}

/// A node that reads every partition and publishes nowhere.
struct ReadsAll;

impl PartitionSink for ReadsAll {
    fn sent(&self, _: &PartitionId, _: &[u8], _: u64) {}
    fn retry_put(&self, _: &PartitionId, _: &[u8], _: i64, _: &[u8]) {}
    fn retry_removed(&self, _: &PartitionId, _: &[u8]) {}
    fn owns(&self, _: &PartitionId) -> bool {
        true
    }
}

/// The partitions a rebalance assigns the node at once (30 partitions on one node).
const ASSIGNED: i32 = 30;

fn reconcile_benches(c: &mut Criterion, entries: usize, renderer: &Renderer) {
    let store = Store::temporary().unwrap();
    store.attach_partition_sink(Arc::new(ReadsAll));
    let queue = RetryQueue::open(&store).unwrap();
    let now_secs = Utc::now().timestamp() as u64;
    for i in 0..entries {
        queue.push(&queued(renderer, i, i as i32 % ASSIGNED), 1_000 + i as i64, now_secs).unwrap();
    }
    let partitions: Vec<PartitionId> =
        (0..ASSIGNED).map(|partition| PartitionId { topic: "cdr".into(), partition }).collect();
    // Changelogs that confirmed none of them: each entry is published again, the queue
    // unchanged (so every iteration finds the same).
    let empty = Default::default();
    let logs: Vec<_> = partitions.iter().map(|p| (p, &empty)).collect();
    let none = HashSet::new();
    let republished = |logs: &[_]| {
        let mut republished = 0;
        queue.reconcile(logs, &none, |_, r| republished += r.unconfirmed.len()).unwrap();
        republished
    };

    let mut group = c.benchmark_group("retry_queue_restore");
    group.throughput(Throughput::Elements(1));
    group.bench_function("reconcile_30_partitions_at_once", |b| {
        b.iter(|| assert_eq!(republished(black_box(&logs)), entries))
    });
    group.bench_function("reconcile_30_partitions_one_at_a_time", |b| {
        b.iter(|| assert_eq!(logs.chunks(1).map(|one| republished(black_box(one))).sum::<usize>(), entries))
    });
    group.finish();
}

criterion_group!(benches, retry_benches);
criterion_main!(benches);
