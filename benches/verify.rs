//! What the verification stage costs next to the semantic lookup it guards.
//!
//! ```text
//! cargo bench --bench verify        (SEMCACHE_BENCH_PAIRS: a pairs file, default
//!                                    ../shared/data/gptcache-mock-pairs.json)
//! ```
//!
//! For every labelled pair (query = `similar` or `b`, stored entry = `origin` or `a`) it
//! times, in process and single-threaded as a lookup runs it, the verifier's work for one
//! lookup — the query's lexical signature once, then the entry's signature and the rule
//! checks for each of the 4 candidates a one-result lookup examines at most — and the
//! query's embedding through the real model (the embedding dominates a semantic lookup's
//! latency; HTTP, HNSW and storage add a few hundred microseconds more). It prints both
//! medians and their ratio; the issue's budget is 10% of a lookup's median latency.

use std::time::Instant;

use semcache::cache::verify::{self, Signature, VerifyRules};
use semcache::embed::{
    manifest::ModelManifest, provision, select_device, DeviceChoice, Embedder, QueueOptions,
};

/// Candidates a lookup for one result verifies at most (`max(2·maxResults, 4)`).
const CANDIDATES: usize = 4;

fn main() {
    let options = QueueOptions::default();
    semcache::embed::one_kernel_thread_per_worker(options.workers);
    let path = std::env::var("SEMCACHE_BENCH_PAIRS")
        .unwrap_or_else(|_| "../shared/data/gptcache-mock-pairs.json".to_string());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON array");
    let field = |row: &serde_json::Value, names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| row.get(n).and_then(|v| v.as_str()))
            .map(str::to_string)
    };
    let pairs: Vec<(String, String)> = rows
        .iter()
        .filter_map(|r| Some((field(r, ["similar", "b"])?, field(r, ["origin", "a"])?)))
        .collect();
    assert!(
        !pairs.is_empty(),
        "{path}: no {{origin, similar}} or {{a, b}} pairs"
    );

    let rules = VerifyRules::default();
    let mut verify_us = Vec::with_capacity(pairs.len());
    for (query, entry) in &pairs {
        let started = Instant::now();
        for _ in 0..100 {
            let query_sig = Signature::of(std::hint::black_box(query));
            for _ in 0..CANDIDATES {
                let entry_sig = Signature::of(std::hint::black_box(entry));
                let _ = std::hint::black_box(verify::check(&rules, &query_sig, &entry_sig));
            }
        }
        verify_us.push(started.elapsed().as_secs_f64() * 1e6 / 100.0);
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let manifest = ModelManifest::default_model();
    let files = provision::ensure(&manifest, &provision::default_model_dir()).expect("model");
    let device = select_device(DeviceChoice::Cpu).unwrap();
    let embedder = runtime
        .block_on(async { Embedder::start(&manifest, &files, None, &device, options) })
        .expect("embedder");
    let mut embed_us = Vec::with_capacity(pairs.len());
    for (query, _) in pairs.iter().take(20) {
        runtime.block_on(embedder.embed(query.clone())).unwrap();
    }
    for (query, _) in &pairs {
        let started = Instant::now();
        runtime.block_on(embedder.embed(query.clone())).unwrap();
        embed_us.push(started.elapsed().as_secs_f64() * 1e6);
    }

    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (verify_p50, embed_p50) = (median(verify_us), median(embed_us));
    println!(
        "{} pairs from {path}: verifier (query signature + {CANDIDATES} candidates) p50 {verify_p50:.1} µs; \
         query embedding p50 {:.2} ms; verifier / embedding = {:.2}%",
        pairs.len(),
        embed_p50 / 1e3,
        100.0 * verify_p50 / embed_p50
    );
}
