//! How a router scores a prompt against its routes, and how `fit` tunes it.
//!
//! A route's score blends the prompt's cosine to the route's nearest utterance with its
//! cosine to the route's centroid (the normalised mean of its utterances):
//! `beta · nearest + (1 − beta) · centroid`. The nearest utterance is sharp when a route
//! has many phrasings; the centroid is steadier when it has few. The best route is taken
//! when its score reaches the route's threshold and leads the runner-up by at least
//! `margin`; otherwise the prompt is out of scope (`None`).
//!
//! "Nearest" is the mean of the route's `k` closest utterances (k = 1: the closest one).
//!
//! `fit` chooses whether the linear head ([`Head`]) picks the route, `beta`, `k`, a
//! global threshold and margin, then per-route thresholds,
//! for the best in-scope accuracy whose out-of-scope recall reaches a target (0.7 unless
//! the caller says): rejecting more out-of-scope prompts always costs some in-scope ones,
//! and the target says how many are worth it. Without out-of-scope examples it maximises
//! in-scope accuracy.

use serde::{Deserialize, Serialize};

pub use super::head::Head;

/// Unit vectors of one route.
#[derive(Debug, Clone)]
pub struct RouteVectors {
    pub utterances: Vec<Vec<f32>>,
    pub centroid: Vec<f32>,
}

impl RouteVectors {
    pub fn new(utterances: Vec<Vec<f32>>) -> Self {
        let dims = utterances.first().map_or(0, Vec::len);
        let mut centroid = vec![0f32; dims];
        for u in &utterances {
            for (c, x) in centroid.iter_mut().zip(u) {
                *c += x;
            }
        }
        let norm = centroid.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            centroid.iter_mut().for_each(|x| *x /= norm);
        }
        Self {
            utterances,
            centroid,
        }
    }
}

/// What `fit` tunes (and what a router starts with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub beta: f32,
    /// How many of a route's closest utterances "nearest" averages.
    #[serde(default = "one")]
    pub k: usize,
    pub margin: f32,
    /// Per route, in route order.
    pub thresholds: Vec<f32>,
    /// The linear head ([`Head`]) picks the route; the blended score of the route it
    /// picks still decides out of scope (and the margin is not used).
    #[serde(default)]
    pub head: bool,
}

/// One routing decision: the route (or none), its score, and every route's score, best
/// first.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub route: Option<usize>,
    pub score: f32,
    pub ranked: Vec<(usize, f32)>,
}

fn one() -> usize {
    1
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b)
}

/// Routes whose utterances are compared one by one; the rest are ranked by centroid.
const SHORTLIST: usize = 8;

/// Per route: (nearest-utterance cosine, centroid cosine). Every centroid is compared;
/// only the `SHORTLIST` routes with the closest centroids compare their utterances (the
/// others get their centroid cosine as the nearest one): a prompt's route and runner-up
/// are among them, and a router of 150 routes × 100 utterances costs ~1,000 dot
/// products instead of 15,000.
pub fn raw_scores(routes: &[RouteVectors], query: &[f32], k: usize) -> Vec<(f32, f32)> {
    let centroids: Vec<f32> = routes.iter().map(|r| dot(&r.centroid, query)).collect();
    let mut order: Vec<usize> = (0..routes.len()).collect();
    if routes.len() > SHORTLIST {
        order.select_nth_unstable_by(SHORTLIST - 1, |a, b| {
            centroids[*b].total_cmp(&centroids[*a])
        });
        order.truncate(SHORTLIST);
    }
    let mut raw: Vec<(f32, f32)> = centroids.iter().map(|c| (*c, *c)).collect();
    let mut sims = Vec::new();
    for r in order {
        sims.clear();
        sims.extend(routes[r].utterances.iter().map(|u| dot(u, query)));
        let k = k.clamp(1, sims.len().max(1));
        if sims.len() > k {
            sims.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        }
        if !sims.is_empty() {
            raw[r].0 = sims[..k].iter().sum::<f32>() / k as f32;
        }
    }
    raw
}

fn blend(raw: &[(f32, f32)], beta: f32) -> Vec<f32> {
    raw.iter()
        .map(|(n, c)| beta * n + (1.0 - beta) * c)
        .collect()
}

/// (best route, its score, the runner-up's score).
fn top_two(scores: &[f32]) -> Option<(usize, f32, f32)> {
    let mut best: Option<(usize, f32)> = None;
    let mut second = f32::NEG_INFINITY;
    for (r, &s) in scores.iter().enumerate() {
        match best {
            Some((_, b)) if s <= b => second = second.max(s),
            Some((_, b)) => {
                second = b;
                best = Some((r, s));
            }
            None => best = Some((r, s)),
        }
    }
    best.map(|(r, s)| (r, s, second))
}

fn accept(params: &Params, route: usize, score: f32, second: f32) -> bool {
    let threshold = params.thresholds.get(route).copied().unwrap_or(1.0);
    score >= threshold && score - second >= params.margin
}

/// The route a prompt goes to before its threshold is applied: the head's pick (then
/// no runner-up counts) or the best blended score. (route, score, runner-up's score).
fn pick(scores: &[f32], head_best: Option<usize>, params: &Params) -> Option<(usize, f32, f32)> {
    match head_best {
        Some(r) if params.head && r < scores.len() => Some((r, scores[r], f32::NEG_INFINITY)),
        _ => top_two(scores),
    }
}

pub fn decide(
    routes: &[RouteVectors],
    head: Option<&Head>,
    params: &Params,
    query: &[f32],
) -> Decision {
    let scores = blend(&raw_scores(routes, query, params.k), params.beta);
    let mut ranked: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let head_best = head.filter(|_| params.head).map(|h| h.best(query));
    let Some((best, score, second)) = pick(&scores, head_best, params) else {
        return Decision {
            route: None,
            score: 0.0,
            ranked,
        };
    };
    Decision {
        route: accept(params, best, score, second).then_some(best),
        score,
        ranked,
    }
}

/// How well parameters do on labelled examples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Accuracy {
    /// Share of all examples answered right (out-of-scope ones by `None`).
    pub accuracy: f64,
    /// Share of in-scope examples sent to their route.
    pub in_scope_accuracy: f64,
    /// Share of out-of-scope examples answered `None`.
    pub out_of_scope_recall: f64,
    /// Of the prompts answered `None`, the share that were out of scope.
    pub out_of_scope_precision: f64,
    pub examples: usize,
}

/// One example as `fit` sees it: its raw scores and its route (`None`: out of scope).
pub struct Scored {
    raw: Vec<(f32, f32)>,
    head_best: Option<usize>,
    truth: Option<usize>,
}

pub fn score_examples(
    routes: &[RouteVectors],
    head: Option<&Head>,
    examples: &[(Vec<f32>, Option<usize>)],
    k: usize,
) -> Vec<Scored> {
    examples
        .iter()
        .map(|(v, truth)| Scored {
            raw: raw_scores(routes, v, k),
            head_best: head.map(|h| h.best(v)),
            truth: *truth,
        })
        .collect()
}

pub fn evaluate(scored: &[Scored], params: &Params) -> Accuracy {
    let (mut right, mut in_total, mut in_right, mut oos_total, mut oos_right, mut rejected) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for s in scored {
        let scores = blend(&s.raw, params.beta);
        let answer = pick(&scores, s.head_best, params)
            .and_then(|(r, score, second)| accept(params, r, score, second).then_some(r));
        rejected += usize::from(answer.is_none());
        let ok = answer == s.truth;
        right += usize::from(ok);
        match s.truth {
            Some(_) => {
                in_total += 1;
                in_right += usize::from(ok);
            }
            None => {
                oos_total += 1;
                oos_right += usize::from(ok);
            }
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Accuracy {
        accuracy: share(right, scored.len()),
        in_scope_accuracy: share(in_right, in_total),
        out_of_scope_recall: share(oos_right, oos_total),
        out_of_scope_precision: share(oos_right, rejected),
        examples: scored.len(),
    }
}

/// Out-of-scope recall `fit` aims for on its examples when the caller names none. Set
/// above the 60% we want on prompts the fit has not seen: on CLINC150's held-out halves
/// a 0.6 target landed at 59%, 0.7 at 71–74% (`semcache eval-router`).
pub const DEFAULT_OOS_RECALL: f64 = 0.7;

/// What `fit` maximises: in-scope accuracy once out-of-scope recall reaches the
/// target; below it, how far it falls short (so the search still climbs towards it).
fn objective(in_acc: f64, oos_recall: f64, has_oos: bool, target: f64) -> f64 {
    if !has_oos {
        in_acc
    } else if oos_recall + 1e-9 >= target {
        1.0 + in_acc
    } else {
        oos_recall - target + in_acc * 1e-3
    }
}

fn value(a: &Accuracy, has_oos: bool, target: f64) -> f64 {
    objective(a.in_scope_accuracy, a.out_of_scope_recall, has_oos, target)
}

/// Tunes `beta`, `k`, the thresholds and the margin on labelled examples for the best
/// in-scope accuracy at out-of-scope recall ≥ `target`; returns the new parameters
/// (the old ones if nothing beats them).
pub fn fit(
    routes: &[RouteVectors],
    head: Option<&Head>,
    examples: &[(Vec<f32>, Option<usize>)],
    current: &Params,
    target: f64,
) -> Params {
    let has_oos = examples.iter().any(|(_, t)| t.is_none());
    let n = routes.len();
    let mut best = current.clone();
    let mut best_value = value(
        &evaluate(&score_examples(routes, head, examples, current.k), current),
        has_oos,
        target,
    );
    let mut best_scored = None;
    let heads: &[bool] = if head.is_some() {
        &[false, true]
    } else {
        &[false]
    };
    for k in [1usize, 3] {
        let scored = score_examples(routes, head, examples, k);
        let mut improved = false;
        for (&use_head, beta) in heads
            .iter()
            .flat_map(|h| [0.0f32, 0.25, 0.5, 0.75, 1.0].map(|b| (h, b)))
        {
            let probe = Params {
                beta,
                k,
                margin: 0.0,
                thresholds: Vec::new(),
                head: use_head,
            };
            // Candidate thresholds: quantiles of the picked routes' scores.
            let mut tops: Vec<f32> = scored
                .iter()
                .filter_map(|s| {
                    pick(&blend(&s.raw, beta), s.head_best, &probe).map(|(_, score, _)| score)
                })
                .collect();
            tops.sort_by(f32::total_cmp);
            let mut candidates: Vec<f32> = (0..=80)
                .filter_map(|q| tops.get(q * tops.len().saturating_sub(1) / 80).copied())
                .collect();
            candidates.insert(0, -1.0);
            candidates.dedup();
            let margins: &[f32] = if use_head {
                &[0.0]
            } else {
                &[0.0, 0.01, 0.02, 0.04]
            };
            for &t in &candidates {
                for &margin in margins {
                    let params = Params {
                        beta,
                        k,
                        margin,
                        thresholds: vec![t; n],
                        head: use_head,
                    };
                    let v = value(&evaluate(&scored, &params), has_oos, target);
                    if v > best_value + 1e-9 {
                        best_value = v;
                        best = params;
                        improved = true;
                    }
                }
            }
        }
        if improved {
            best_scored = Some(scored);
        }
    }
    let scored = best_scored.unwrap_or_else(|| score_examples(routes, head, examples, best.k));
    refine_per_route(&scored, &mut best, has_oos, target);
    best
}

/// Moves each route's threshold where that raises the objective, counting only the
/// examples the route ranks first (what its threshold decides), and only for routes
/// that rank several examples first (few examples make per-route thresholds noisy).
fn refine_per_route(scored: &[Scored], params: &mut Params, has_oos: bool, target: f64) {
    let in_total = scored.iter().filter(|s| s.truth.is_some()).count().max(1) as f64;
    let oos_total = scored.iter().filter(|s| s.truth.is_none()).count().max(1) as f64;
    // Per route: (score, runner-up, truth) of the examples it ranks first.
    let mut by_route: Vec<Vec<(f32, f32, Option<usize>)>> =
        vec![Vec::new(); params.thresholds.len()];
    for s in scored {
        let scores = blend(&s.raw, params.beta);
        if let Some((r, score, second)) = pick(&scores, s.head_best, params) {
            by_route[r].push((score, second, s.truth));
        }
    }
    let now = evaluate(scored, params);
    let (mut in_right, mut oos_right) = (
        now.in_scope_accuracy * in_total,
        now.out_of_scope_recall * oos_total,
    );
    let margin = params.margin;
    for (r, taken) in by_route.iter().enumerate() {
        if taken.len() < 3 {
            continue;
        }
        // (in-scope right, out-of-scope right) among `taken` at threshold t.
        let counts = |t: f32| -> (f64, f64) {
            taken
                .iter()
                .fold((0.0, 0.0), |(i, o), &(score, second, truth)| {
                    let answer = (score >= t && score - second >= margin).then_some(r);
                    match (truth, answer == truth) {
                        (Some(_), true) => (i + 1.0, o),
                        (None, true) => (i, o + 1.0),
                        _ => (i, o),
                    }
                })
        };
        let current = params.thresholds[r];
        let (ci, co) = counts(current);
        let score_of = |t: f32| {
            let (i, o) = counts(t);
            objective(
                (in_right - ci + i) / in_total,
                (oos_right - co + o) / oos_total,
                has_oos,
                target,
            )
        };
        let mut best = (score_of(current), current);
        for &(score, _, _) in taken {
            for t in [score - 1e-4, score + 1e-4] {
                let v = score_of(t);
                // Ties go to the threshold nearer the global one.
                if v > best.0 + 1e-12
                    || (v > best.0 - 1e-12 && (t - current).abs() < (best.1 - current).abs())
                {
                    best = (v, t);
                }
            }
        }
        let (i, o) = counts(best.1);
        in_right += i - ci;
        oos_right += o - co;
        params.thresholds[r] = best.1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn routes() -> Vec<RouteVectors> {
        vec![
            RouteVectors::new(vec![unit(&[1.0, 0.1, 0.0]), unit(&[1.0, -0.1, 0.0])]),
            RouteVectors::new(vec![unit(&[0.0, 1.0, 0.1]), unit(&[0.1, 1.0, 0.0])]),
        ]
    }

    #[test]
    fn the_nearest_route_wins_and_far_prompts_are_out_of_scope() {
        let params = Params {
            beta: 0.5,
            k: 1,
            margin: 0.0,
            thresholds: vec![0.8, 0.8],
            head: false,
        };
        let d = decide(&routes(), None, &params, &unit(&[1.0, 0.05, 0.0]));
        assert_eq!(d.route, Some(0));
        assert_eq!(d.ranked[0].0, 0);
        assert!(d.score > 0.9);
        let d = decide(&routes(), None, &params, &unit(&[0.0, 0.0, 1.0]));
        assert_eq!(d.route, None, "{d:?}");
    }

    #[test]
    fn fit_learns_a_threshold_that_rejects_out_of_scope_examples() {
        let routes = routes();
        let examples = vec![
            (unit(&[1.0, 0.2, 0.3]), Some(0)),
            (unit(&[0.9, 0.0, 0.4]), Some(0)),
            (unit(&[0.2, 1.0, 0.3]), Some(1)),
            (unit(&[0.0, 0.9, 0.4]), Some(1)),
            (unit(&[0.3, 0.2, 1.0]), None),
            (unit(&[0.2, 0.3, 1.0]), None),
        ];
        let start = Params {
            beta: 0.5,
            k: 1,
            margin: 0.0,
            thresholds: vec![-1.0, -1.0],
            head: false,
        };
        let head = Head::train(&routes);
        let before = evaluate(
            &score_examples(&routes, head.as_ref(), &examples, 1),
            &start,
        );
        assert_eq!(before.out_of_scope_recall, 0.0);
        let fitted = fit(&routes, head.as_ref(), &examples, &start, 1.0);
        let after = evaluate(
            &score_examples(&routes, head.as_ref(), &examples, fitted.k),
            &fitted,
        );
        assert_eq!(after.in_scope_accuracy, 1.0, "{fitted:?}");
        assert_eq!(after.out_of_scope_recall, 1.0, "{fitted:?}");
        assert_eq!(after.out_of_scope_precision, 1.0);
    }
}
