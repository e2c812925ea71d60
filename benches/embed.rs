//! Embedding latency and throughput, and HNSW search against brute force, in process.
//!
//! `cargo bench --bench embed`
//!
//! The peers' figures (sentence-transformers, ONNX Runtime, hnswlib) come from
//! `../shared/bench-peers`; compare only numbers measured on the same machine in the
//! same run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use semcache::embed::{
    manifest::ModelManifest, provision, select_device, DeviceChoice, Embedder, QueueOptions,
};
use semcache::index::{dot, IndexParams, VectorIndex};

fn embedder() -> Embedder {
    let manifest = ModelManifest::default_model();
    let files = provision::ensure(&manifest, &provision::default_model_dir()).expect("model");
    let device = select_device(DeviceChoice::Cpu).unwrap();
    Embedder::start(&manifest, &files, None, &device, QueueOptions::default()).expect("embedder")
}

fn prompts(n: usize, words: usize) -> Vec<String> {
    let vocabulary = [
        "how",
        "do",
        "I",
        "configure",
        "the",
        "gateway",
        "cache",
        "for",
        "a",
        "large",
        "language",
        "model",
        "with",
        "retries",
        "and",
        "timeouts",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    (0..n)
        .map(|_| {
            (0..words)
                .map(|_| vocabulary[rng.gen_range(0..vocabulary.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn embedding(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let embedder = runtime.block_on(async { embedder() });
    let mut group = c.benchmark_group("embed");
    group.sample_size(20);
    for words in [12, 48, 180] {
        let text = prompts(1, words).pop().unwrap();
        group.bench_with_input(BenchmarkId::new("single", words), &text, |b, text| {
            b.iter(|| runtime.block_on(embedder.embed(text.clone())).unwrap())
        });
    }
    let batch = prompts(32, 50);
    group.throughput(Throughput::Elements(32));
    group.bench_function("batch32_50words", |b| {
        b.iter(|| {
            runtime
                .block_on(embedder.embed_many(batch.clone()))
                .unwrap()
        })
    });
    group.finish();
}

fn search(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let unit = |rng: &mut rand::rngs::StdRng| {
        let v: Vec<f32> = (0..384).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let n = dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let points: Vec<Vec<f32>> = (0..10_000).map(|_| unit(&mut rng)).collect();
    let index = VectorIndex::new(384, points.len(), IndexParams::default());
    for (slot, p) in points.iter().enumerate() {
        index.insert(slot, p).unwrap();
    }
    let queries: Vec<Vec<f32>> = (0..100).map(|_| unit(&mut rng)).collect();
    let mut group = c.benchmark_group("search_10k");
    group.throughput(Throughput::Elements(queries.len() as u64));
    group.bench_function("hnsw_k10", |b| {
        b.iter(|| {
            for q in &queries {
                index.search(q, 10, &|_| true).unwrap();
            }
        })
    });
    group.bench_function("brute_force_k10", |b| {
        b.iter(|| {
            for q in &queries {
                let mut scored: Vec<(usize, f32)> = points
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i, dot(q, p)))
                    .collect();
                scored.select_nth_unstable_by(10, |a, b| b.1.total_cmp(&a.1));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, embedding, search);
criterion_main!(benches);
