//! Restart time, memory and disk per entry, with the real binary.
//!
//! `cargo bench --bench restart` (entries: `SEMCACHE_BENCH_ENTRIES`, default 100000)
//!
//! Fills a data directory with synthetic entries written straight through the store
//! (prompts "synthetic prompt <i> about topic <i mod 997>", 200-byte responses, one
//! attribute, random unit vectors — embedding a million prompts would take hours and
//! restart never re-embeds anyway), then starts `semcache serve` on it and measures
//! the time until `/readyz` answers 200, the resident memory once ready, and the size of
//! the data directory. The same is measured on an empty data directory, so the model's
//! own footprint can be subtracted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use semcache::cache::prompt_hash;
use semcache::store::{EntryId, EntryRecord, Store};

fn fill(dir: &Path, entries: usize) {
    let store = Store::open(dir).expect("open store");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let response = "r".repeat(200);
    for i in 0..entries {
        let prompt = format!("synthetic prompt {i} about topic {}", i % 997);
        let mut v: Vec<f32> = (0..384).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        let record = EntryRecord {
            id: EntryId::new(),
            cache_id: format!("cache-{}", i % 10),
            prompt_hash: prompt_hash(&prompt),
            prompt,
            response: response.clone(),
            attributes: BTreeMap::from([("tenant".to_string(), format!("t{}", i % 50))]),
            created_at_ms: 1,
            expires_at_ms: None,
            window_end: None,
        };
        store.insert(&record, &v).expect("insert");
    }
    store.flush_blocking().expect("flush");
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Starts the server on `dir`; returns (seconds to ready, RSS once ready).
fn start(dir: &Path) -> (f64, u64) {
    let bin = env!("CARGO_BIN_EXE_semcache");
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("SEMCACHE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start semcache");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(a) = line.strip_prefix("semcache listening on ") {
            break a.trim().to_string();
        }
    };
    let client = reqwest::blocking::Client::new();
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/readyz")).send() {
            if r.status() == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_bytes(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (ready, rss)
}

fn main() {
    let entries: usize = std::env::var("SEMCACHE_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    let full = tmp.path().join("full");
    std::fs::create_dir_all(&empty).unwrap();
    let (empty_ready, empty_rss) = start(&empty);
    let t = Instant::now();
    fill(&full, entries);
    let fill_s = t.elapsed().as_secs_f64();
    let disk = dir_size(&full);
    let (ready, rss) = start(&full);
    let per_entry_rss = rss.saturating_sub(empty_rss) as f64 / entries as f64;
    println!("| entries | fill (s) | restart to ready (s) | RSS ready | RSS per entry (model subtracted) | data dir | disk per entry |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| 0 | - | {empty_ready:.2} | {:.0} MiB | - | - | - |",
        empty_rss as f64 / 1048576.0
    );
    println!(
        "| {entries} | {fill_s:.1} | {ready:.2} | {:.0} MiB | {:.0} B | {:.0} MiB | {:.0} B |",
        rss as f64 / 1048576.0,
        per_entry_rss,
        disk as f64 / 1048576.0,
        disk as f64 / entries as f64
    );
}
