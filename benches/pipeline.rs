//! The engine's hot path, stage by stage and as a whole (what the consumer thread runs
//! per CDR). Inputs are realistic: the decoder fixtures, a store provisioned through the
//! import path with `CALLNOTIFY_BENCH_NUMBERS` numbers (default 200 000), 5 % of them
//! subscribed.
//!
//! `cargo bench --bench pipeline` measures; `-- --test` runs each once (CI smoke).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::address::DestinationAddress;
use engine::decode::{decode, CdrFormat};
use engine::filter::decide;
use engine::phone::PhoneNumber;
use engine::pipeline::{classify, Notify, Now, Verdict};
use engine::render::Renderer;
use engine::resolve::Resolver;
use engine::store::Store;

/// The allocator the `callnotify` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1024;

fn fixture(format: &str) -> Vec<u8> {
    let path = format!("{}/engine/tests/fixtures/cdr/{format}/no_answer.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The number of the i-th provisioned line; every 20th is subscribed (5 %).
fn number(i: usize) -> String {
    format!("03{:08}", i)
}

fn subscribed(i: usize) -> bool {
    i.is_multiple_of(20)
}

fn provisioned_store() -> (Store, usize) {
    let count: usize = std::env::var("CALLNOTIFY_BENCH_NUMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let store = Store::temporary().expect("temporary store");
    let lines: Vec<String> = (0..count)
        .map(|i| {
            let n = number(i);
            if subscribed(i) {
                format!(
                    r#"{{"contract":"{n}","numbers":[{{"number":"{n}","services":["call"],"settings":{{"enabled":true,"destinations":[{{"address":"u{i}@example.jp","send":true}},{{"address":"v{i}@example.jp","send":false}}],"missed_only":true}}}}]}}"#
                )
            } else {
                format!(r#"{{"contract":"{n}","numbers":[{{"number":"{n}","services":["fax"]}}]}}"#)
            }
        })
        .collect();
    let report = engine::provision::import(&store, lines.join("\n").as_bytes()).expect("import");
    assert!(report.rejected.is_empty());
    (store, count)
}

fn canonical_cdr(i: usize, called: &str) -> Vec<u8> {
    format!(
        r#"{{"call_id":"bench-{i}","called":"{called}","caller":"+8190{i:08}","presentation":"allowed","started_at":"2026-11-24T10:00:00+09:00","answered_at":null,"ended_at":"2026-11-24T10:00:31+09:00","outcome":"no_answer"}}"#
    )
    .into_bytes()
}

fn decode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for format in [CdrFormat::Canonical, CdrFormat::Asterisk, CdrFormat::Freeswitch] {
        let payload = fixture(format.as_str());
        group.bench_function(format.as_str(), |b| b.iter(|| decode(format, black_box(&payload)).expect("fixture")));
    }
    group.finish();
}

fn stage_benches(c: &mut Criterion) {
    let (store, count) = provisioned_store();
    let hot = PhoneNumber::parse(&number(0)).unwrap();

    let mut group = c.benchmark_group("resolve");
    group.throughput(Throughput::Elements(1));
    let resolver = Resolver::new(store.clone(), 100_000).unwrap();
    resolver.resolve(&hot).unwrap();
    group.bench_function("cache_hit", |b| b.iter(|| resolver.resolve(black_box(&hot)).unwrap()));
    let unsubscribed = PhoneNumber::parse(&number(1)).unwrap();
    group.bench_function("not_subscribed", |b| b.iter(|| resolver.resolve(black_box(&unsubscribed)).unwrap()));
    // A one-entry cache: every lookup of a subscribed number reads sled.
    let cold = Resolver::new(store.clone(), 1).unwrap();
    let numbers: Vec<PhoneNumber> =
        (0..count).step_by(20 * 7).map(|i| PhoneNumber::parse(&number(i)).unwrap()).collect();
    let mut i = 0;
    group.bench_function("cache_miss_sled", |b| {
        b.iter(|| {
            i = (i + 1) % numbers.len();
            cold.resolve(black_box(&numbers[i])).unwrap()
        })
    });
    group.finish();

    let payload = canonical_cdr(1, &number(0));
    let call = decode(CdrFormat::Canonical, &payload).unwrap();
    let subscription = resolver.resolve(&hot).unwrap();
    c.benchmark_group("filter")
        .throughput(Throughput::Elements(1))
        .bench_function("decide", |b| b.iter(|| decide(black_box(subscription.as_deref()), black_box(&call)).is_ok()));

    let renderer = Renderer::new("着信お知らせメール <no-reply@callnotify.example.jp>".parse().unwrap());
    let to = DestinationAddress::parse("u0@example.jp").unwrap();
    c.benchmark_group("render")
        .throughput(Throughput::Elements(1))
        .bench_function("mail", |b| b.iter(|| renderer.render(black_box(&call), &to).unwrap()));

    // The whole in-process path over a batch of distinct numbers, cache warm.
    let non_matching: Vec<Vec<u8>> =
        (0..count).filter(|i| !subscribed(*i)).take(BATCH).map(|i| canonical_cdr(i, &number(i))).collect();
    let matching: Vec<Vec<u8>> =
        (0..count).filter(|i| subscribed(*i)).take(BATCH).map(|i| canonical_cdr(i, &number(i))).collect();
    // The clock a minute after the CDRs' calls ended, with the default maximum age.
    let at = Now { now: call.ended_at + chrono::TimeDelta::minutes(1), max_age: chrono::TimeDelta::hours(24) };
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("non_matching", |b| {
        b.iter(|| {
            for p in &non_matching {
                assert!(matches!(classify(CdrFormat::Canonical, p, &resolver, at).unwrap(), Verdict::Filtered(_)));
            }
        })
    });
    group.bench_function("matching_with_render", |b| {
        b.iter(|| {
            for p in &matching {
                let Verdict::Notify(Notify { call, subscription }) =
                    classify(CdrFormat::Canonical, p, &resolver, at).unwrap()
                else {
                    panic!("subscribed number not notified")
                };
                for r in &subscription.recipients {
                    black_box(renderer.render(&call, r).unwrap());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decode_benches, stage_benches);
criterion_main!(benches);
