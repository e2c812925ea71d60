//! Restart time, memory and disk per entry, with the real binary.
//!
//! `cargo bench --bench restart` (entries: `SEMCACHE_BENCH_ENTRIES`, default 100000;
//! caches they are spread over: `SEMCACHE_BENCH_CACHES`, default 10)
//!
//! Fills a data directory with synthetic entries written straight through the store
//! (prompts "synthetic prompt <i> about topic <i mod 997>", 200-byte responses, one
//! attribute, ten caches by default; vectors are clustered like real prompt embeddings: one of
//! 4,096 random unit centres plus Gaussian noise, normalised, cosine ≈ 0.7 to the
//! centre — embedding a million prompts would take hours and restart never re-embeds
//! anyway). Then:
//!
//! 1. starts `semcache serve` on it with no saved index: every vector is re-inserted
//!    (time to `/readyz` 200), and stops it with SIGTERM, which saves the graphs;
//! 2. starts it again: the saved graphs load (time to ready, resident memory);
//! 3. where the OS lets it (root on Linux), drops the page cache, as a reboot or a move
//!    to another node would, and starts it once more: the cold start.
//!
//! and reports the data directory's size. The same is measured on an empty data
//! directory, so the model's own footprint can be subtracted.
//!
//! Building a million-entry directory takes most of an hour (step 1 inserts every
//! vector), so `SEMCACHE_BENCH_DIR=<dir>` keeps it: a later run on the same directory
//! with the same entry count skips the fill and step 1 and measures only the start from
//! saved graphs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use semcache::cache::prompt_hash;
use semcache::store::{EntryId, EntryRecord, Store};

mod common;

fn fill(dir: &Path, entries: usize, caches: usize) {
    let store = Store::open(dir).expect("open store");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let unit = |v: &mut Vec<f32>| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    };
    let centres: Vec<Vec<f32>> = (0..4096)
        .map(|_| {
            let mut c: Vec<f32> = (0..384).map(|_| gaussian(&mut rng)).collect();
            unit(&mut c);
            c
        })
        .collect();
    let response = "r".repeat(200);
    for i in 0..entries {
        let prompt = format!("synthetic prompt {i} about topic {}", i % 997);
        // Noise of norm ~1 around a unit centre: cosine to the centre ≈ 0.7.
        let centre = &centres[rng.gen_range(0..centres.len())];
        let mut v: Vec<f32> = centre
            .iter()
            .map(|c| c + gaussian(&mut rng) / (384f32).sqrt())
            .collect();
        unit(&mut v);
        let record = EntryRecord {
            id: EntryId::new(),
            cache_id: format!("cache-{}", i % caches),
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

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
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

/// Empties the OS page cache (Linux, root only); false where that is not allowed.
fn drop_page_cache() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// What one start measured.
struct Start {
    ready_s: f64,
    rss: u64,
    /// Seconds from SIGTERM to exit: draining, saving the graphs, flushing.
    stop_s: f64,
}

/// Starts the server on `dir`, waits for `/readyz` 200, then stops it with SIGTERM.
fn start(dir: &Path) -> Start {
    let started = Instant::now();
    let (mut child, base) = common::start_server(dir);
    let client = reqwest::blocking::Client::new();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send() {
            if r.status() == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_bytes(child.id());
    let stopping = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Start {
        ready_s,
        rss,
        stop_s: stopping.elapsed().as_secs_f64(),
    }
}

fn main() {
    let entries: usize = std::env::var("SEMCACHE_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let kept = std::env::var_os("SEMCACHE_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = match &kept {
        Some(_) => None,
        None => Some(
            tempfile::tempdir_in(std::env::var("SEMCACHE_BENCH_TMP").unwrap_or("target".into()))
                .unwrap(),
        ),
    };
    let parent = kept
        .clone()
        .unwrap_or_else(|| tmp.as_ref().unwrap().path().to_path_buf());
    let empty = parent.join("empty");
    let caches: usize = std::env::var("SEMCACHE_BENCH_CACHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|c| *c > 0)
        .unwrap_or(10);
    let full = match caches {
        10 => parent.join(format!("full-{entries}")),
        _ => parent.join(format!("full-{entries}-in-{caches}")),
    };
    let _ = std::fs::remove_dir_all(&empty);
    std::fs::create_dir_all(&empty).unwrap();
    let baseline = start(&empty);
    // A kept directory that a finished earlier run left with saved graphs.
    let reused = kept.is_some() && dir_size(&full.join("indexes")) > 0;
    let (fill_s, rebuilt) = if reused {
        (None, None)
    } else {
        let _ = std::fs::remove_dir_all(&full);
        let t = Instant::now();
        fill(&full, entries, caches);
        let fill_s = t.elapsed().as_secs_f64();
        (Some(fill_s), Some(start(&full)))
    };
    let loaded = start(&full);
    let cold = drop_page_cache().then(|| start(&full));
    let disk = dir_size(&full);
    let graphs = dir_size(&full.join("indexes"));
    let per_entry = |rss: u64| rss.saturating_sub(baseline.rss) as f64 / entries as f64;
    println!("| entries | fill store (s) | start, re-inserting every vector (s) | SIGTERM to exit, graphs saved (s) | start from saved graphs (s) | same, page cache dropped (s) | RSS ready (saved graphs) | RSS per entry (model subtracted) | data dir | disk per entry (of which graphs) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| 0 | - | {:.2} | - | - | - | {:.0} MiB | - | - | - |",
        baseline.ready_s,
        baseline.rss as f64 / 1048576.0
    );
    let or_dash = |x: Option<f64>, digits: usize| match x {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    };
    println!(
        "| {entries} in {caches} | {} | {} | {} | {:.2} | {} | {:.0} MiB | {:.0} B (re-inserted: {}) | {:.0} MiB | {:.0} B ({:.0} B) |",
        or_dash(fill_s, 1),
        or_dash(rebuilt.as_ref().map(|r| r.ready_s), 1),
        or_dash(rebuilt.as_ref().map(|r| r.stop_s), 1),
        loaded.ready_s,
        or_dash(cold.as_ref().map(|c| c.ready_s), 2),
        loaded.rss as f64 / 1048576.0,
        per_entry(loaded.rss),
        match &rebuilt {
            Some(r) => format!("{:.0} B", per_entry(r.rss)),
            None => "-".into(),
        },
        disk as f64 / 1048576.0,
        disk as f64 / entries as f64,
        graphs as f64 / entries as f64
    );
}
