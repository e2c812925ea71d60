//! Embedding latency and throughput on the peers' own protocol (../shared/bench-peers
//! `embed_bench.py`), so the figures sit beside sentence-transformers and ONNX Runtime
//! measured in the same run:
//!
//! - single: 300 ShareGPT first-turn prompts, one call each (tokenization, pooling and
//!   normalisation included), p50 / p99 / mean;
//! - batch: the next 2,000 prompts, sorted by length, in batches of 32, texts/s;
//! - fixed: one text of exactly 16 / 64 / 128 / 256 tokens, 100 calls each.
//!
//! ```text
//! benches/peers/run.sh                     # peers and ours, one run
//! SEMCACHE_BENCH_PROMPTS=target/bench-prompts.json cargo bench --bench embed_protocol
//! ```
//! The prompts file comes from `benches/peers/prompts.py`. Calls go through the service's
//! own batching queue (`Embedder`), as a request would.

use std::time::Instant;

mod common;

use semcache::embed::{
    manifest::ModelManifest, provision, select_device, tokenize::TextTokenizer, DeviceChoice,
    Embedder, QueueOptions,
};

#[derive(serde::Deserialize)]
struct Prompts {
    single: Vec<String>,
    batch: Vec<String>,
    fixed: std::collections::BTreeMap<String, String>,
}

fn quantiles(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), ms.iter().sum::<f64>() / ms.len() as f64)
}

fn main() {
    let Some(prompts) = common::load_prompts::<Prompts>() else {
        return;
    };
    let workers = std::env::var("SEMCACHE_EMBED_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| QueueOptions::default().workers);
    semcache::embed::one_kernel_thread_per_worker(workers);
    let manifest = ModelManifest::default_model();
    let files = provision::ensure(&manifest, &provision::default_model_dir()).expect("model");
    let tokenizer = TextTokenizer::load(&files.tokenizer, manifest.max_seq_length).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let device = select_device(DeviceChoice::Cpu).unwrap();
    let options = QueueOptions {
        workers,
        ..QueueOptions::default()
    };
    let embedder = runtime.block_on(async {
        Embedder::start(&manifest, &files, None, &device, options).expect("embedder")
    });
    let embed_one = |text: &str| {
        runtime
            .block_on(embedder.embed(text.to_string()))
            .expect("embed")
    };

    for text in prompts.single.iter().take(20) {
        embed_one(text);
    }
    let mut single = Vec::new();
    for text in &prompts.single {
        let started = Instant::now();
        embed_one(text);
        single.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (p50, p99, mean) = quantiles(single);

    let mut batch_texts = prompts.batch.clone();
    batch_texts.sort_by_cached_key(|t| tokenizer.tokenize(t).map(|t| t.ids.len()).unwrap_or(0));
    runtime
        .block_on(embedder.embed_many(batch_texts[..64].to_vec()))
        .unwrap();
    let started = Instant::now();
    for chunk in batch_texts.chunks(32) {
        runtime
            .block_on(embedder.embed_many(chunk.to_vec()))
            .unwrap();
    }
    let texts_per_s = batch_texts.len() as f64 / started.elapsed().as_secs_f64();

    let mut fixed = Vec::new();
    let mut lengths: Vec<(usize, &String)> = prompts
        .fixed
        .iter()
        .map(|(n, t)| (n.parse().unwrap(), t))
        .collect();
    lengths.sort();
    for (n, text) in lengths {
        assert_eq!(tokenizer.tokenize(text).unwrap().ids.len(), n);
        for _ in 0..10 {
            embed_one(text);
        }
        let mut ms = Vec::new();
        for _ in 0..100 {
            let started = Instant::now();
            embed_one(text);
            ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let (p50, p99, _) = quantiles(ms);
        fixed.push(format!("{n} tok {p50:.1} / {p99:.1}"));
    }
    println!(
        "semcache (candle, {} inference workers): single p50 {p50:.1} ms, p99 {p99:.1} ms, mean {mean:.1} ms; \
         batch-32 {texts_per_s:.1} texts/s; fixed p50/p99 ms: {}",
        options.workers,
        fixed.join(", ")
    );
}
