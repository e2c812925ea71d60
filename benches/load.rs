//! HTTP load generator: drives a running `semcache serve` with N concurrent closed-loop
//! clients for a bounded time per workload and prints requests/s and p50/p90/p99.
//!
//! ```text
//! SEMCACHE_BENCH_PROMPTS=target/bench-prompts.json cargo bench --bench load
//! ```
//!
//! The workload is the one `../shared/bench-peers/gptcache_bench.py` puts on GPTCache's
//! server, so the two compare: store 1,000 ShareGPT (first-turn prompt, reply) pairs and
//! GPTCache's 999 mock 'origin' prompts, then look up (a) exact repeats of the stored
//! ShareGPT prompts, (b) the 999 mock paraphrases, (c) 1,000 held-out ShareGPT prompts
//! never stored (misses). The prompts file comes from `benches/peers/prompts.py`.
//!
//! Environment: `SEMCACHE_LOAD_SECONDS` (per run, default 20), `SEMCACHE_LOAD_CONCURRENCY`
//! (default "1,16,32"), `SEMCACHE_LOAD_WORKLOADS` (e.g. "paraphrases,misses": the
//! workloads whose names start so; default all), `SEMCACHE_LOAD_URL` (use a server
//! already running instead of starting one; it must be empty). Each request's latency is measured by the client on
//! the same machine, as wrk does for the peer; client and server share the cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

#[derive(serde::Deserialize)]
struct Prompts {
    stored: Vec<(String, String)>,
    mock: Vec<(String, String)>,
    queries: Vec<String>,
}

const CACHE: &str = "load";

#[derive(Default)]
struct Run {
    requests: u64,
    errors: u64,
    hits: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `concurrency` clients, each sending the next body as soon as the last one answered.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    bodies: Arc<Vec<Value>>,
    concurrency: usize,
    duration: Duration,
) -> Run {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (client, url, bodies) = (client.clone(), url.to_string(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            // Workers start at different offsets so they do not send the same body in step.
            let mut next = worker * 104_729;
            while Instant::now() < deadline {
                let body = &bodies[next % bodies.len()];
                next += 1;
                let sent = Instant::now();
                let answer = client.post(&url).json(body).send().await;
                let ok = match answer {
                    Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                        Ok(v) => {
                            let hit = v["data"].as_array().is_some_and(|d| !d.is_empty());
                            run.hits += u64::from(hit);
                            true
                        }
                        Err(_) => false,
                    },
                    _ => false,
                };
                run.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                run.requests += 1;
                run.errors += u64::from(!ok);
            }
            run
        }));
    }
    let mut total = Run::default();
    for task in tasks {
        let run = task.await.expect("client task");
        total.requests += run.requests;
        total.errors += run.errors;
        total.hits += run.hits;
        total.latencies_ms.extend(run.latencies_ms);
    }
    total.seconds = started.elapsed().as_secs_f64();
    total.latencies_ms.sort_by(f64::total_cmp);
    total
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stores every pair, a few requests in flight at once (inserts batch in the embedder).
async fn store_all(client: &reqwest::Client, base: &str, pairs: Vec<(String, String)>) {
    let url = format!("{base}/v1/caches/{CACHE}/entries");
    let pairs = Arc::new(pairs);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, pairs, next) = (client.clone(), url.clone(), pairs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((prompt, response)) = pairs.get(i) else {
                    return;
                };
                let r = client
                    .post(&url)
                    .json(&json!({"prompt": prompt, "response": response}))
                    .send()
                    .await
                    .expect("insert");
                assert_eq!(
                    r.status(),
                    201,
                    "insert refused: {}",
                    r.text().await.unwrap_or_default()
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("insert task");
    }
}

fn main() {
    let Some(prompts) = common::load_prompts::<Prompts>() else {
        return;
    };
    let seconds: u64 = std::env::var("SEMCACHE_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let concurrencies: Vec<usize> = std::env::var("SEMCACHE_LOAD_CONCURRENCY")
        .unwrap_or_else(|_| "1,16,32".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut server, base) = match std::env::var("SEMCACHE_LOAD_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let (child, url) = common::start_server(&tmp.path().join("data"));
            (Some(child), url)
        }
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    runtime.block_on(async {
        wait_ready(&client, &base).await;
        let mut pairs = prompts.stored.clone();
        pairs.extend(
            prompts
                .mock
                .iter()
                .enumerate()
                .map(|(i, (origin, _))| (origin.clone(), format!("mock-answer-{i}"))),
        );
        let started = Instant::now();
        let n = pairs.len();
        store_all(&client, &base, pairs).await;
        let insert_s = started.elapsed().as_secs_f64();
        println!(
            "stored {n} entries in {insert_s:.1} s ({:.1} inserts/s, 8 in flight)",
            n as f64 / insert_s
        );
        let search = format!("{base}/v1/caches/{CACHE}/entries/search");
        let bodies = |texts: Vec<&String>| -> Arc<Vec<Value>> {
            Arc::new(texts.into_iter().map(|p| json!({"prompt": p})).collect())
        };
        let workloads = [
            ("exact repeats", bodies(prompts.stored.iter().map(|(p, _)| p).collect())),
            ("paraphrases (mock similar)", bodies(prompts.mock.iter().map(|(_, s)| s).collect())),
            ("misses (held-out prompts)", bodies(prompts.queries.iter().collect())),
        ];
        let only = std::env::var("SEMCACHE_LOAD_WORKLOADS").unwrap_or_default();
        let chosen = |name: &str| {
            only.is_empty() || only.split(',').any(|w| name.starts_with(w.trim()))
        };
        println!("| workload | concurrency | requests/s | p50 ms | p90 ms | p99 ms | hit rate | errors |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, bodies) in workloads.iter().filter(|(name, _)| chosen(name)) {
            for &c in &concurrencies {
                let run = drive(&client, &search, bodies.clone(), c, Duration::from_secs(seconds)).await;
                let l = &run.latencies_ms;
                println!(
                    "| {name} | {c} | {:.1} | {:.2} | {:.2} | {:.2} | {:.3} | {} |",
                    run.requests as f64 / run.seconds,
                    quantile(l, 0.5),
                    quantile(l, 0.9),
                    quantile(l, 0.99),
                    run.hits as f64 / run.requests.max(1) as f64,
                    run.errors
                );
            }
        }
    });
    if let Some(child) = server.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
