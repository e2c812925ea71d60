//! Hit rate of the eviction policies on a skewed prompt trace, at equal capacity.
//!
//! `cargo bench --bench eviction`
//!
//! The trace: requests to a universe of distinct prompts drawn from a Zipf
//! distribution (a few prompts asked over and over), interleaved with one-off prompts
//! never seen again (the long tail every gateway sees). Each request is a lookup; a miss
//! inserts the prompt, evicting per policy when the cache is full. Both policies run the
//! production code (`semcache::cache::evict::Tracker`) on the same trace.

use rand::distributions::Distribution;
use rand::{Rng, SeedableRng};
use semcache::cache::evict::{Policy, Tracker};

/// Zipf(s) over 0..n by inverse CDF on a precomputed table.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        cdf.iter_mut().for_each(|c| *c /= total);
        Self { cdf }
    }
}

impl Distribution<usize> for Zipf {
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|&c| c < u)
    }
}

fn trace(requests: usize, universe: usize, s: f64, one_off_share: f64, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(universe, s);
    let mut next_one_off = universe;
    (0..requests)
        .map(|_| {
            if rng.gen::<f64>() < one_off_share {
                next_one_off += 1;
                next_one_off
            } else {
                zipf.sample(&mut rng)
            }
        })
        .collect()
}

fn hit_rate(trace: &[usize], capacity: usize, policy: Policy) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut tracker = Tracker::default();
    let mut present = vec![false; trace.iter().max().map(|m| m + 1).unwrap_or(0)];
    let mut hits = 0usize;
    for &key in trace {
        if present[key] {
            hits += 1;
            tracker.touch(key);
            continue;
        }
        if tracker.len() >= capacity {
            if let Some(victim) = tracker.victim(policy, &mut rng) {
                tracker.remove(victim);
                present[victim] = false;
            }
        }
        tracker.admit(key);
        present[key] = true;
    }
    hits as f64 / trace.len() as f64
}

fn main() {
    // `cargo bench` passes --bench; nothing else is configurable.
    let universe = 100_000;
    let requests = 1_000_000;
    println!("Eviction policies on a Zipf trace: {requests} requests over {universe} recurring prompts plus one-off prompts.");
    println!("| Zipf s | one-off share | capacity | LRU hit rate | LFU (semcache default) hit rate | LFU / LRU |");
    println!("|---|---|---|---|---|---|");
    for (s, one_off) in [(0.8, 0.3), (1.0, 0.3), (1.0, 0.0), (1.2, 0.5)] {
        let t = trace(requests, universe, s, one_off, 42);
        for capacity in [1_000, 5_000, 20_000] {
            let lru = hit_rate(&t, capacity, Policy::Lru);
            let lfu = hit_rate(&t, capacity, Policy::Lfu);
            println!(
                "| {s} | {:.0}% | {capacity} | {:.3} | {:.3} | {:.2}x |",
                one_off * 100.0,
                lru,
                lfu,
                lfu / lru
            );
        }
    }
}
