//! What a received fax costs before and after it is kept (R-F1, docs/fax.md): the
//! document check every fax record gets on the consumer thread (`inspect`: every page
//! decoded), and what the site makes of it on request (a page as PNG, the PDF). Inputs
//! are the decoder fixtures: three A4 pages in T.6 and in T.4, as `tiffcp` writes them.
//!
//! `cargo bench --bench fax` measures; `-- --test` runs each once (CI smoke).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::fax::document::{inspect, page_png, pdf_pictures, to_pdf};

/// The allocator the `callnotify` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/engine/tests/fixtures/fax/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn documents(c: &mut Criterion) {
    for (coding, name) in [("t6", "fine-g4.tif"), ("t4", "fine-g3.tif")] {
        let document = fixture(name);
        let pages = inspect(&document).expect("a fixture inspects").pages;
        let mut group = c.benchmark_group(format!("fax/{coding}"));
        group.throughput(Throughput::Elements(u64::from(pages)));
        group.bench_function("inspect (every page decoded)", |b| b.iter(|| inspect(black_box(&document))));
        group.throughput(Throughput::Elements(1));
        group.bench_function("page as PNG", |b| b.iter(|| page_png(black_box(&document), 0)));
        group.throughput(Throughput::Elements(u64::from(pages)));
        group.bench_function("as PDF", |b| b.iter(|| to_pdf(black_box(&document), usize::MAX)));
        group.finish();
    }
}

/// The site's page of a PDF fax asks which of its pages show as pictures: each page
/// made as a PNG (the PDF loaded again for each), against the PDF loaded once and each
/// page's image decoded.
fn pdf_pages(c: &mut Criterion) {
    let document = fixture("fine-g4.pdf");
    let pages = inspect(&document).expect("a fixture inspects").pages;
    let mut group = c.benchmark_group("fax/pdf pages that show");
    group.throughput(Throughput::Elements(u64::from(pages)));
    group.bench_function("a PNG of each", |b| {
        b.iter(|| (0..pages).map(|page| page_png(black_box(&document), page).is_ok()).collect::<Vec<_>>())
    });
    group.bench_function("pdf_pictures", |b| b.iter(|| pdf_pictures(black_box(&document))));
    group.finish();
}

criterion_group!(benches, documents, pdf_pages);
criterion_main!(benches);
