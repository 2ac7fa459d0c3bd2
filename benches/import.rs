//! An import's writes against sled's own floor (issue 18's import goal). Each iteration
//! imports the next 10 000 lines of a growing population (one number a line, its own
//! contract, the fax service only: 95 % of `loadtest state`'s lines) into one store,
//! through `engine::provision::import`: parsing, the upsert's reads and writes, the
//! index and the listeners. Beside it, the floor: the same keys written as one plain
//! sled insert (the number's record, which stands for its one-number line, of the size
//! the store writes) into a database of their own, one thread, no reads, no parsing;
//! and as two (a line's record too, as the store wrote before a one-number line had
//! none).
//!
//! `cargo bench --bench import` measures; `-- --test` runs each once (CI smoke).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::phone::PhoneNumber;
use engine::store::Store;

/// The allocator the `callnotify` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LINES: u64 = 10_000;

fn number(i: u64) -> String {
    format!("03{i:08}")
}

/// Lines `from..from + LINES` in `provision import` format.
fn batch(from: u64) -> String {
    (from..from + LINES)
        .map(|i| {
            let n = number(i);
            format!("{{\"contract\":\"{n}\",\"numbers\":[{{\"number\":\"{n}\",\"services\":[\"fax\"]}}]}}\n")
        })
        .collect()
}

fn import_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("import");
    group.throughput(Throughput::Elements(LINES));
    group.sample_size(10);

    // As `store.one_record_lines = true` writes: a one-number line is its number's record.
    let store = Store::temporary().unwrap().with_one_record_lines(true);
    let mut next = 0u64;
    group.bench_function("store_10k_lines", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let text = batch(next);
                next += LINES;
                let started = Instant::now();
                let report = engine::provision::import(&store, text.as_bytes()).unwrap();
                took += started.elapsed();
                assert!(report.rejected.is_empty(), "{:?}", report.rejected);
            }
            took
        })
    });

    // The sizes of what the store writes for a line of the batch.
    let first = PhoneNumber::parse(&number(0)).unwrap();
    let line = serde_json::to_vec(&store.line(&first).unwrap().unwrap()).unwrap();
    let record = serde_json::to_vec(&store.number(&first).unwrap().unwrap()).unwrap();
    // The floors: one insert a line (the number's record), and two (the line's too).
    sled_floor(&mut group, "sled_one_insert_10k", &[("numbers", &record)]);
    sled_floor(&mut group, "sled_two_inserts_10k", &[("lines", &line), ("numbers", &record)]);
    group.finish();
}

/// Times `name`: each line's key written into each of `trees` (a tree's name, the value
/// written) of a database of their own, one plain sled insert each.
fn sled_floor(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    trees: &[(&str, &[u8])],
) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let trees: Vec<(sled::Tree, &[u8])> =
        trees.iter().map(|(name, value)| (db.open_tree(name).unwrap(), *value)).collect();
    let mut next = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let keys: Vec<String> = (next..next + LINES).map(number).collect();
                next += LINES;
                let started = Instant::now();
                for key in &keys {
                    for (tree, value) in &trees {
                        black_box(tree.insert(key.as_bytes(), *value).unwrap());
                    }
                }
                took += started.elapsed();
            }
            took
        })
    });
}

criterion_group!(benches, import_benches);
criterion_main!(benches);
