//! How sure the cache is that serving a semantic candidate is correct (`maxErrorRate`).
//!
//! After vCache (Schroeder et al., ICLR 2026): no single similarity threshold is right
//! for every cached prompt, so the cache learns P(correct | lookup) from labelled
//! lookups and serves a candidate only when a *lower confidence bound* on that
//! probability reaches 1 − δ. The model is a Bayesian logistic regression:
//!
//! - cache-wide weights `w` over a few features of the (query, candidate) pair
//!   (similarity, margin to the runner-up, lexical overlap), fitted to every
//!   observation of the cache with a Gaussian prior (Laplace approximation), so a new
//!   entry starts from what the cache has learned;
//! - a per-entry offset `u ~ N(0, τ²)` fitted to the entry's own observations, so an
//!   entry whose paraphrases keep being right (or wrong) moves away from the rest.
//!
//! The decision uses `logit = w·x + u` minus `z` posterior standard deviations.

// Small dense matrices: index loops read as the formulas do.
#![allow(clippy::needless_range_loop)]

use rand::Rng;
use serde::Serialize;

/// Features per observation (the first is the constant 1).
pub const FEATURES: usize = 4;
pub type Features = [f32; FEATURES];

/// Standard deviations below the posterior mean the decision is taken at (chosen with
/// the prior's spread and `TAU` on the tuning half of `qqp-train.json`: the smallest that
/// kept every δ there, docs/hit-quality.md).
const Z: f64 = 1.0;
/// Prior standard deviation of an entry's own offset from the cache-wide curve.
const TAU: f64 = 0.35;
/// Observations kept per entry (oldest dropped first).
pub const MAX_PER_ENTRY: usize = 64;

/// The cache-wide prior: mean and standard deviation of each weight, a weak version of
/// the curve fitted on the tuning half of `qqp-train.json` (`semcache eval-bound`,
/// docs/hit-quality.md), so a fresh cache serves only near-identical prompts until its
/// own labels say more.
const PRIOR_MEAN: [f64; FEATURES] = [1.5, 1.6, 0.0, -0.9];
const PRIOR_SD: [f64; FEATURES] = [1.0, 0.5, 0.5, 1.0];

/// The features of a candidate found at `similarity`, the next candidate (if any) at
/// `runner_up`, with word overlap `overlap` (Jaccard, in [0, 1]).
pub fn features(similarity: f32, runner_up: Option<f32>, overlap: f32) -> Features {
    let margin = runner_up.map_or(0.2, |r| (similarity - r).clamp(0.0, 0.2));
    [1.0, (similarity - 0.9) * 10.0, margin * 10.0, overlap - 0.5]
}

pub use crate::store::Observation;

impl Observation {
    pub fn new(x: Features, correct: bool) -> Self {
        Self {
            x: x.to_vec(),
            correct,
        }
    }
}

/// The cache-wide posterior: mode and covariance of `w`.
#[derive(Debug, Clone)]
pub struct Fit {
    w: [f64; FEATURES],
    cov: [[f64; FEATURES]; FEATURES],
    observations: usize,
}

/// What the model says of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// Posterior point estimate of P(correct).
    pub probability: f32,
    /// The lower confidence bound the decision uses.
    pub lower_bound: f32,
    /// Observations of this entry itself.
    pub entry_observations: usize,
    /// Observations of the whole cache the curve was fitted to.
    pub cache_observations: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Confident enough: serve the candidate.
    Serve,
    /// Confident enough, but sent to the model anyway this time to keep learning; its
    /// answer labels the candidate.
    Explore,
    /// Not confident: a miss, whose answer labels the candidate.
    Miss,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Serve => "serve",
            Decision::Explore => "explore",
            Decision::Miss => "miss",
        }
    }

    /// Whether the fresh answer should be compared with the candidate's.
    pub fn labels(self) -> bool {
        !matches!(self, Decision::Serve)
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn dot(a: &[f64; FEATURES], x: &[f32]) -> f64 {
    a.iter().zip(x).map(|(a, x)| a * f64::from(*x)).sum()
}

/// Cholesky factor of a symmetric positive-definite matrix (lower triangle).
fn cholesky(m: &[[f64; FEATURES]; FEATURES]) -> Option<[[f64; FEATURES]; FEATURES]> {
    let mut l = [[0.0; FEATURES]; FEATURES];
    for i in 0..FEATURES {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = m[i][i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i][i] = d.sqrt();
            } else {
                l[i][j] = (m[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

/// Solves `L Lᵀ x = b`.
fn solve(l: &[[f64; FEATURES]; FEATURES], b: &[f64; FEATURES]) -> [f64; FEATURES] {
    let mut y = [0.0; FEATURES];
    for i in 0..FEATURES {
        let s: f64 = (0..i).map(|k| l[i][k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i][i];
    }
    let mut x = [0.0; FEATURES];
    for i in (0..FEATURES).rev() {
        let s: f64 = (i + 1..FEATURES).map(|k| l[k][i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i][i];
    }
    x
}

fn inverse(l: &[[f64; FEATURES]; FEATURES]) -> [[f64; FEATURES]; FEATURES] {
    let mut inv = [[0.0; FEATURES]; FEATURES];
    for j in 0..FEATURES {
        let mut e = [0.0; FEATURES];
        e[j] = 1.0;
        let col = solve(l, &e);
        for i in 0..FEATURES {
            inv[i][j] = col[i];
        }
    }
    inv
}

impl Default for Fit {
    /// The prior alone (no observations yet).
    fn default() -> Self {
        let mut cov = [[0.0; FEATURES]; FEATURES];
        for (i, row) in cov.iter_mut().enumerate() {
            row[i] = PRIOR_SD[i] * PRIOR_SD[i];
        }
        Self {
            w: PRIOR_MEAN,
            cov,
            observations: 0,
        }
    }
}

impl Fit {
    /// The posterior mode and covariance of `w` given every observation: Newton's method
    /// on the log posterior from the prior mean, each step halved until it gains (so a
    /// lopsided set of labels cannot throw the weights off).
    pub fn new<'a>(observations: impl Iterator<Item = &'a Observation> + Clone) -> Self {
        // Log posterior, its gradient and its negated Hessian at `w`.
        let at = |w: &[f64; FEATURES]| {
            let mut value = 0.0;
            let mut grad = [0.0; FEATURES];
            let mut hess = [[0.0; FEATURES]; FEATURES];
            for i in 0..FEATURES {
                let precision = 1.0 / (PRIOR_SD[i] * PRIOR_SD[i]);
                let d = w[i] - PRIOR_MEAN[i];
                value -= 0.5 * d * d * precision;
                grad[i] = -d * precision;
                hess[i][i] = precision;
            }
            let mut n = 0;
            for o in observations.clone().filter(|o| o.x.len() == FEATURES) {
                n += 1;
                let eta = dot(w, &o.x);
                let p = sigmoid(eta);
                let y = if o.correct { 1.0 } else { 0.0 };
                // log σ(η) or log(1 − σ(η)), computed stably.
                value += y * eta - (eta.max(0.0) + (-eta.abs()).exp().ln_1p());
                let weight = p * (1.0 - p);
                for i in 0..FEATURES {
                    let xi = f64::from(o.x[i]);
                    grad[i] += (y - p) * xi;
                    for j in 0..=i {
                        hess[i][j] += weight * xi * f64::from(o.x[j]);
                    }
                }
            }
            for i in 0..FEATURES {
                for j in 0..i {
                    hess[j][i] = hess[i][j];
                }
            }
            (value, grad, hess, n)
        };
        let mut w = PRIOR_MEAN;
        let (mut value, mut grad, mut hess, n) = at(&w);
        for _ in 0..50 {
            let Some(l) = cholesky(&hess) else {
                return Self::default();
            };
            let step = solve(&l, &grad);
            let mut scale = 1.0;
            let mut moved = false;
            for _ in 0..30 {
                let mut next = w;
                for i in 0..FEATURES {
                    next[i] += scale * step[i];
                }
                let (v, g, h, _) = at(&next);
                if v.is_finite() && v >= value {
                    (w, value, grad, hess, moved) = (next, v, g, h, true);
                    break;
                }
                scale *= 0.5;
            }
            if !moved || step.iter().all(|s| (scale * s).abs() < 1e-8) {
                break;
            }
        }
        match cholesky(&hess) {
            Some(l) => Self {
                w,
                cov: inverse(&l),
                observations: n,
            },
            None => Self::default(),
        }
    }

    pub fn observations(&self) -> usize {
        self.observations
    }

    /// An entry's own offset from the cache-wide curve: posterior mean and variance.
    fn offset(&self, own: &[Observation]) -> (f64, f64) {
        let precision = 1.0 / (TAU * TAU);
        let mut u = 0.0;
        let mut curvature = precision;
        for _ in 0..20 {
            let mut grad = -u * precision;
            curvature = precision;
            for o in own.iter().filter(|o| o.x.len() == FEATURES) {
                let p = sigmoid(dot(&self.w, &o.x) + u);
                grad += if o.correct { 1.0 - p } else { -p };
                curvature += p * (1.0 - p);
            }
            let step = grad / curvature;
            u += step;
            if step.abs() < 1e-9 {
                break;
            }
        }
        (u, 1.0 / curvature)
    }

    /// P(correct) for a candidate with features `x` and its entry's own observations.
    pub fn estimate(&self, x: &Features, own: &[Observation]) -> Estimate {
        let (u, u_var) = self.offset(own);
        let mean = dot(&self.w, x) + u;
        let mut var = u_var;
        for i in 0..FEATURES {
            for j in 0..FEATURES {
                var += f64::from(x[i]) * self.cov[i][j] * f64::from(x[j]);
            }
        }
        Estimate {
            probability: sigmoid(mean) as f32,
            lower_bound: sigmoid(mean - Z * var.max(0.0).sqrt()) as f32,
            entry_observations: own.len(),
            cache_observations: self.observations,
        }
    }
}

/// The error the cache has committed to: over recent semantic hits, the sum of each
/// one's bound on P(wrong) and their count, both decaying (half-life about 700 hits)
/// so that confidence earned long ago cannot pay for a burst of doubtful hits now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    spent: f64,
    served: f64,
}

const BUDGET_DECAY: f64 = 1.0 - 1.0 / 1000.0;

impl Budget {
    /// Whether serving a candidate with this bound keeps the recent average of the
    /// bounds on P(wrong) within δ.
    fn allows(&self, lower: f64, delta: f64) -> bool {
        let risk = 1.0 - lower;
        (self.spent * BUDGET_DECAY + risk) <= delta * (self.served * BUDGET_DECAY + 1.0)
    }

    fn charge(&mut self, lower: f64) {
        self.spent = self.spent * BUDGET_DECAY + (1.0 - lower);
        self.served = self.served * BUDGET_DECAY + 1.0;
    }
}

/// Serve when the candidate's bound on P(wrong) fits the cache's error budget (the
/// recent hits' bounds must average at most δ) and no single answer is much riskier
/// than δ allows; even then, now and then send the lookup to the model to keep the
/// estimate honest. A served candidate is charged to the budget.
pub fn decide(
    estimate: &Estimate,
    max_error_rate: f32,
    budget: &mut Budget,
    rng: &mut impl Rng,
) -> Decision {
    let lower = f64::from(estimate.lower_bound);
    let delta = f64::from(max_error_rate);
    let floor = (1.0 - 2.0 * delta).max(0.5);
    if lower < floor || !budget.allows(lower, delta) {
        return Decision::Miss;
    }
    let explore = ((1.0 - lower) / 2.0).clamp(0.01, 0.1);
    if rng.gen_bool(explore) {
        return Decision::Explore;
    }
    budget.charge(lower);
    Decision::Serve
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn obs(similarity: f32, correct: bool) -> Observation {
        Observation::new(features(similarity, None, 0.5), correct)
    }

    #[test]
    fn linear_algebra_on_a_worked_example() {
        // [[4,2,0,0],[2,3,0,0],[0,0,1,0],[0,0,0,9]] x = [2,1,3,9] → x = [0.5, 0, 3, 1].
        let m = [
            [4.0, 2.0, 0.0, 0.0],
            [2.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 9.0],
        ];
        let l = cholesky(&m).unwrap();
        let x = solve(&l, &[2.0, 1.0, 3.0, 9.0]);
        for (got, want) in x.iter().zip([0.5, 0.0, 3.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        let inv = inverse(&l);
        // The 2×2 block's inverse is [[3,-2],[-2,4]] / 8.
        assert!((inv[0][0] - 0.375).abs() < 1e-12);
        assert!((inv[0][1] + 0.25).abs() < 1e-12);
        assert!((inv[3][3] - 1.0 / 9.0).abs() < 1e-12);
        assert!(cholesky(&[[0.0; FEATURES]; FEATURES]).is_none());
    }

    #[test]
    fn with_no_observations_the_fit_is_the_prior() {
        let fit = Fit::new([].iter());
        for i in 0..FEATURES {
            assert!((fit.w[i] - PRIOR_MEAN[i]).abs() < 1e-9);
            assert!((fit.cov[i][i] - PRIOR_SD[i] * PRIOR_SD[i]).abs() < 1e-9);
        }
        // At the prior: logit = 1.5 + 1.6·(0.99−0.9)·10 = 2.94 → p = 0.9498.
        let e = fit.estimate(&features(0.99, None, 0.5), &[]);
        assert!((e.probability - 0.9498).abs() < 1e-3, "{e:?}");
        assert!(e.lower_bound < e.probability);
    }

    #[test]
    fn the_fit_recovers_a_known_curve() {
        // Correct with probability σ(2 + 3·(s−0.9)·10) at similarities 0.80..0.99.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = Vec::new();
        for _ in 0..20_000 {
            let s: f32 = rng.gen_range(0.8..0.99);
            let p = sigmoid(2.0 + 3.0 * f64::from((s - 0.9) * 10.0));
            data.push(obs(s, rng.gen_bool(p)));
        }
        let fit = Fit::new(data.iter());
        // Margin and overlap are constant here, so only the bias mixes with them.
        let at = |s: f32| fit.estimate(&features(s, None, 0.5), &[]).probability;
        for s in [0.82f32, 0.9, 0.97] {
            let want = sigmoid(2.0 + 3.0 * f64::from((s - 0.9) * 10.0)) as f32;
            assert!((at(s) - want).abs() < 0.02, "at {s}: {} vs {want}", at(s));
        }
        assert_eq!(fit.observations(), 20_000);
        // With this much data the cache-wide curve is known closely (what remains of the
        // bound is the entry's own offset, unknown without its own labels).
        assert!(fit.cov[1][1] < 0.01, "{:?}", fit.cov);
    }

    #[test]
    fn an_entry_that_keeps_being_wrong_loses_its_confidence() {
        let fit = Fit::new([].iter());
        let x = features(0.97, None, 0.5);
        let fresh = fit.estimate(&x, &[]);
        let wrong: Vec<_> = (0..20).map(|_| obs(0.97, false)).collect();
        let bad = fit.estimate(&x, &wrong);
        let right: Vec<_> = (0..8).map(|_| obs(0.97, true)).collect();
        let good = fit.estimate(&x, &right);
        assert!(
            bad.probability < fresh.probability - 0.15,
            "{fresh:?} {bad:?}"
        );
        assert!(good.probability > fresh.probability, "{fresh:?} {good:?}");
        assert_eq!(bad.entry_observations, 20);
    }

    #[test]
    fn decisions_follow_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let sure = Estimate {
            probability: 0.999,
            lower_bound: 0.995,
            entry_observations: 0,
            cache_observations: 100,
        };
        let unsure = Estimate {
            lower_bound: 0.8,
            ..sure
        };
        let mut budget = Budget::default();
        // The first doubtful candidate finds no budget: 0.2 risk against δ = 0.1.
        assert_eq!(decide(&unsure, 0.1, &mut budget, &mut rng), Decision::Miss);
        let explored = (0..10_000)
            .filter(|_| decide(&sure, 0.1, &mut budget, &mut rng) == Decision::Explore)
            .count();
        // (1 − 0.995) / 2 is under the 1% floor.
        assert!((50..200).contains(&explored), "{explored}");
        // Thousands of near-certain hits leave room for a doubtful one...
        assert_ne!(decide(&unsure, 0.1, &mut budget, &mut rng), Decision::Miss);
        // ...but never for one under the floor (1 − 2δ, at least one half).
        let doubtful = Estimate {
            lower_bound: 0.65,
            ..sure
        };
        assert_eq!(
            decide(&doubtful, 0.1, &mut budget, &mut rng),
            Decision::Miss
        );
        assert!(Decision::Miss.labels() && Decision::Explore.labels());
        assert!(!Decision::Serve.labels());
    }

    /// The bound holds in a seeded simulation: entries whose paraphrases are right with
    /// their own probability curves, labels from every miss and exploration.
    #[test]
    fn the_error_rate_stays_within_delta() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for delta in [0.05f32, 0.1, 0.2] {
            let entries = 300;
            // Each entry's curve: its own shift from a common one.
            let shifts: Vec<f64> = (0..entries).map(|_| rng.gen_range(-1.5..1.5)).collect();
            let mut own: Vec<Vec<Observation>> = vec![Vec::new(); entries];
            let mut fit = Fit::new([].iter());
            let mut budget = Budget::default();
            let (mut served, mut wrong, mut since_fit) = (0u32, 0u32, 0);
            for _ in 0..30_000 {
                let e = rng.gen_range(0..entries);
                let s: f32 = rng.gen_range(0.75..1.0);
                let x = features(s, None, 0.5);
                let correct = rng.gen_bool(sigmoid(1.0 + 2.5 * f64::from(x[1]) + shifts[e]));
                let estimate = fit.estimate(&x, &own[e]);
                match decide(&estimate, delta, &mut budget, &mut rng) {
                    Decision::Serve => {
                        served += 1;
                        wrong += u32::from(!correct);
                    }
                    _ => {
                        own[e].push(Observation::new(x, correct));
                        if own[e].len() > MAX_PER_ENTRY {
                            own[e].remove(0);
                        }
                        since_fit += 1;
                        if since_fit >= 200 {
                            fit = Fit::new(own.iter().flatten());
                            since_fit = 0;
                        }
                    }
                }
            }
            eprintln!("δ {delta}: {wrong} wrong of {served} served");
            assert!(served > 300, "δ {delta}: served only {served}");
            // The achieved rate, with room for sampling noise (3 binomial sds).
            let n = f64::from(served);
            let allowed = f64::from(delta) * n + 3.0 * (f64::from(delta) * n).sqrt();
            assert!(
                f64::from(wrong) <= allowed,
                "δ {delta}: {wrong} wrong of {served} served"
            );
        }
    }
}
