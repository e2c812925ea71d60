//! ANN search: recall@10 against exact brute force, and single-thread queries per second,
//! on the peers' own vectors (../shared/bench-peers `embed_corpus.py`: MiniLM embeddings of
//! 14.6k ShareGPT first-turn prompts and 1,000 held-out queries) with their parameters
//! (M=16, ef_construction=200, ef_search swept over 16..256, one query per call), so the
//! figures sit beside hnswlib, faiss and usearch from `ann_bench.py` in the same run.
//!
//! ```text
//! SEMCACHE_BENCH_DATA=/tmp/bench-peers/data cargo bench --bench ann
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use semcache::index::{dot, IndexParams, VectorIndex};

/// Reads a 2-d little-endian float32 `.npy` file (C order), as numpy writes it.
fn read_npy(path: &Path) -> (usize, usize, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    let (header_len, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = &header[header.find('(').unwrap() + 1..header.find(')').unwrap()];
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(data.len(), dims[0] * dims[1]);
    (dims[0], dims[1], data)
}

fn top_k(query: &[f32], vectors: &[&[f32]], k: usize) -> Vec<usize> {
    let mut scored: Vec<(usize, f32)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (i, dot(query, v)))
        .collect();
    scored.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored.into_iter().map(|(i, _)| i).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    const K: usize = 10;
    let data = PathBuf::from(
        std::env::var("SEMCACHE_BENCH_DATA").unwrap_or_else(|_| "/tmp/bench-peers/data".into()),
    );
    let corpus_file = data.join("vectors.npy");
    if !corpus_file.exists() {
        eprintln!(
            "{} missing: run ../shared/bench-peers embed_corpus.py first (benches/peers/run.sh)",
            corpus_file.display()
        );
        return;
    }
    let (n, dim, flat) = read_npy(&corpus_file);
    let (nq, _, flat_q) = read_npy(&data.join("queries.npy"));
    let vectors: Vec<&[f32]> = flat.chunks_exact(dim).collect();
    let queries: Vec<&[f32]> = flat_q.chunks_exact(dim).collect();

    let started = Instant::now();
    let truth: Vec<Vec<usize>> = queries.iter().map(|q| top_k(q, &vectors, K)).collect();
    let brute_qps = nq as f64 / started.elapsed().as_secs_f64();

    let params = IndexParams {
        max_connections: 16,
        ef_construction: 200,
        ef_search: 16,
    };
    let mut index = VectorIndex::new(dim, n, params);
    let started = Instant::now();
    for (slot, v) in vectors.iter().enumerate() {
        index.insert(slot, v).unwrap();
    }
    let build_s = started.elapsed().as_secs_f64();
    println!(
        "semcache index (hnsw_rs 0.3.5 builds, M=16, efc=200): {n} vectors x {dim}, {nq} \
         queries; build {build_s:.1} s (1 thread); exact brute force {brute_qps:.0} QPS (1 thread)"
    );
    let recall_of = |index: &VectorIndex| -> f64 {
        let found: Vec<Vec<usize>> = queries
            .iter()
            .map(|q| {
                let hits = index.search(q, K, &|_| true).unwrap();
                hits.into_iter().map(|h| h.slot).collect()
            })
            .collect();
        found
            .iter()
            .zip(&truth)
            .map(|(f, t)| f.iter().filter(|s| t.contains(s)).count() as f64 / K as f64)
            .sum::<f64>()
            / nq as f64
    };
    // Queries per second over `threads` threads, each taking every `threads`-th query.
    let qps_of = |index: &VectorIndex, threads: usize| -> f64 {
        let passes: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..threads {
                        let queries = &queries;
                        scope.spawn(move || {
                            for q in queries.iter().skip(t).step_by(threads) {
                                std::hint::black_box(index.search(q, K, &|_| true).unwrap());
                            }
                        });
                    }
                });
                nq as f64 / started.elapsed().as_secs_f64()
            })
            .collect();
        median(passes)
    };
    let efs = [16, 32, 64, 128, 256];
    let mut live_rows = Vec::new();
    for ef in efs {
        index.set_ef_search(ef);
        live_rows.push((recall_of(&index), qps_of(&index, 1)));
    }
    // The same graph frozen into a segment (what every save makes, and a restart maps).
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let files = index.freeze(dir.path()).unwrap();
    let freeze_s = started.elapsed().as_secs_f64();
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let started = Instant::now();
    let mut frozen = VectorIndex::open(&files, dim, params).unwrap();
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "frozen: written in {freeze_s:.2} s, {bytes} bytes ({:.0} per vector), opened (checked) in {open_ms:.1} ms",
        bytes as f64 / n as f64
    );
    println!("| ef | hnsw_rs recall@10 | hnsw_rs QPS | frozen recall@10 | frozen QPS (1 thread) | frozen / hnsw_rs |");
    println!("|---|---|---|---|---|---|");
    for (ef, (live_recall, live_qps)) in efs.iter().zip(&live_rows) {
        frozen.set_ef_search(*ef);
        let (recall, qps) = (recall_of(&frozen), qps_of(&frozen, 1));
        println!(
            "| {ef} | {live_recall:.3} | {live_qps:.0} | {recall:.3} | {qps:.0} | {:.2}x |",
            qps / live_qps
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("\nfrozen, ef=64, threads sharing one index ({cores} cores):");
    println!("| threads | QPS | vs 1 thread |");
    println!("|---|---|---|");
    frozen.set_ef_search(64);
    let one = qps_of(&frozen, 1);
    for threads in [1, 2, 16] {
        let qps = if threads == 1 {
            one
        } else {
            qps_of(&frozen, threads)
        };
        println!("| {threads} | {qps:.0} | {:.2}x |", qps / one);
    }
}
