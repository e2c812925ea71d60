//! What `maxErrorRate` costs: the decision on a lookup's path and the refit after labels.
//!
//! ```text
//! cargo bench --bench bound
//! ```
//!
//! Single-threaded, in process, on synthetic observations (the maths does not look at the
//! texts): the features, the estimate with an entry's own 0 or 64 labels, and the budget
//! decision — what every bounded lookup adds — and a cache-wide refit to 1,000, 10,000 and
//! 100,000 labels (off the request path, once per twentieth more labels). Medians of
//! repeated timings; compare with a semantic lookup's few milliseconds of embedding.

use std::hint::black_box;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use semcache::cache::bound::{self, Budget, Fit, Observation};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn labels(n: usize, rng: &mut impl Rng) -> Vec<Observation> {
    (0..n)
        .map(|_| {
            let s: f32 = rng.gen_range(0.6..1.0);
            let x = bound::features(s, Some(s - rng.gen_range(0.0..0.1)), rng.gen());
            Observation::new(x, rng.gen_bool(f64::from(s).powi(8)))
        })
        .collect()
}

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let fit = Fit::new(labels(10_000, &mut rng).iter());
    for own in [0usize, 64] {
        let own = labels(own, &mut rng);
        let mut budget = Budget::default();
        let mut times = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            for _ in 0..1_000 {
                let x = bound::features(black_box(0.93), Some(0.88), 0.6);
                let estimate = fit.estimate(&x, black_box(&own));
                black_box(bound::decide(&estimate, 0.1, &mut budget, &mut rng));
            }
            times.push(started.elapsed().as_secs_f64() * 1e6 / 1_000.0);
        }
        println!(
            "decision with {:>2} own labels: median {:.2} µs",
            own.len(),
            median(times)
        );
    }
    for n in [1_000usize, 10_000, 100_000] {
        let data = labels(n, &mut rng);
        let times: Vec<f64> = (0..7)
            .map(|_| {
                let started = Instant::now();
                black_box(Fit::new(black_box(&data).iter()));
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        println!("refit to {n:>6} labels: median {:.2} ms", median(times));
    }
}
