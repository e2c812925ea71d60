//! `semcache eval-bound`: does `maxErrorRate` keep its promise, and with how many hits?
//!
//! A stream of Quora questions from one half of `qqp-train.json` (split by duplicate
//! group, so the halves share no question) arrives in a seeded random order. Each
//! lookup finds its nearest cached question (exactly, over the real model's vectors);
//! a hit is correct when both are in one duplicate group (every other hit counts as
//! wrong); a miss caches the question. The bounded policy (`cache::bound`, the code the
//! service runs) learns from the label of every miss and exploration; static
//! thresholds run on the same stream for comparison, the best one chosen in hindsight.
//!
//! Labels come from the oracle, or from comparing answers as the service does: each
//! duplicate group is given one GPTCache pair as its answer, an asker gets one of the
//! pair's two wordings at random, and two answers agree when equal or when their
//! embeddings' cosine reaches `--answer-similarity`.

use crate::embed::adapter::AdapterChoice;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use futures::stream::{self, StreamExt};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::{default_embedder, LabelledPair, Labels, ParaphrasePair};
use crate::cache::answers_agree_at;
use crate::cache::bound::{self, Decision, Fit, Observation};
use crate::cache::verify::{self, Signature, VerifyRules};
use crate::embed::Embedder;
use crate::index::dot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Half {
    /// The half the constants were tuned on.
    Tune,
    /// The half kept for the report.
    Report,
}

#[derive(Debug, clap::Args)]
pub struct BoundArgs {
    /// Labelled pairs (`qqp-train.json`).
    #[arg(long)]
    pub pairs: PathBuf,
    /// GPTCache's paraphrase pairs, used as answers for answer-comparison labels.
    #[arg(long)]
    pub gptcache: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "report")]
    pub half: Half,
    /// Pairs drawn from the half (their questions make the stream).
    #[arg(long, default_value_t = 5000)]
    pub pairs_per_half: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Runs (stream orders) per policy.
    #[arg(long, default_value_t = 3)]
    pub runs: u64,
    /// Answers whose embeddings are at least this close count as the same answer.
    #[arg(long, default_value_t = 0.9)]
    pub answer_similarity: f32,
    /// Print the cache-wide fit to every labelled nearest candidate (for the prior).
    #[arg(long)]
    pub fit_prior: bool,
    #[arg(long, env = "SEMCACHE_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// The adapter merged into the model (none, qqp, or a .safetensors file).
    #[arg(long, default_value = "none")]
    pub adapter: AdapterChoice,
}

/// Candidates remembered per query (earlier questions, nearest first).
const NEIGHBOURS: usize = 16;

struct Stream {
    texts: Vec<String>,
    signatures: Vec<Signature>,
    group: Vec<usize>,
    /// Per text, its nearest earlier texts with their similarity.
    neighbours: Vec<Vec<(usize, f32)>>,
}

/// Where a bounded run's labels come from.
#[derive(Clone, Copy)]
enum Labeller<'a> {
    Oracle,
    Answers { answers: &'a Answers, level: f32 },
}

/// GPTCache wordings as the answers of duplicate groups.
struct Answers {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
    /// Per group, its pair (index into pairs of `texts`: 2p and 2p+1).
    pair_of_group: Vec<usize>,
}

impl Answers {
    fn agree(&self, a: (usize, usize), b: (usize, usize), level: f32) -> bool {
        let (ta, tb) = (self.text(a), self.text(b));
        answers_agree_at(
            &self.texts[ta],
            &self.texts[tb],
            dot(&self.vectors[ta], &self.vectors[tb]),
            level,
        )
    }

    /// (group, wording) → text index.
    fn text(&self, (group, wording): (usize, usize)) -> usize {
        2 * self.pair_of_group[group] + wording
    }
}

#[derive(Default, Clone, Copy)]
struct Tally {
    queries: u64,
    served: u64,
    wrong: u64,
    labels: u64,
    label_errors: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.queries += o.queries;
        self.served += o.served;
        self.wrong += o.wrong;
        self.labels += o.labels;
        self.label_errors += o.label_errors;
    }
    fn hit_rate(&self) -> f64 {
        self.served as f64 / self.queries.max(1) as f64
    }
    fn error(&self) -> f64 {
        self.wrong as f64 / self.served.max(1) as f64
    }
    /// Wilson 95% interval of the error rate.
    fn interval(&self) -> (f64, f64) {
        let n = self.served as f64;
        if n == 0.0 {
            return (0.0, 1.0);
        }
        let (p, z) = (self.error(), 1.96f64);
        let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
        ((centre - half).max(0.0), (centre + half).min(1.0))
    }
}

fn half_of(root: &str) -> Half {
    if Sha256::digest(root.as_bytes())[0] & 1 == 0 {
        Half::Tune
    } else {
        Half::Report
    }
}

fn questions(args: &BoundArgs) -> anyhow::Result<(Vec<String>, Vec<usize>)> {
    let text = std::fs::read_to_string(&args.pairs)
        .with_context(|| format!("cannot read {}", args.pairs.display()))?;
    let pairs: Vec<LabelledPair> = serde_json::from_str(&text)?;
    let labels = Labels::of_duplicates(&pairs);
    let mut chosen: Vec<&LabelledPair> = pairs
        .iter()
        .filter(|p| {
            half_of(&labels.root(&p.a)) == args.half && half_of(&labels.root(&p.b)) == args.half
        })
        .collect();
    chosen.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
    chosen.truncate(args.pairs_per_half);
    let mut texts: Vec<String> = chosen
        .iter()
        .flat_map(|p| [p.a.clone(), p.b.clone()])
        .collect();
    texts.sort();
    texts.dedup();
    let mut groups: HashMap<String, usize> = HashMap::new();
    let group = texts
        .iter()
        .map(|t| {
            let n = groups.len();
            *groups.entry(labels.root(t)).or_insert(n)
        })
        .collect();
    Ok((texts, group))
}

/// The default model behind its batching queue, with vectors kept on disk by content:
/// what every evaluation embeds its texts with.
pub(super) struct EvalEmbedder {
    runtime: tokio::runtime::Runtime,
    pub embedder: Embedder,
    cache: PathBuf,
}

impl EvalEmbedder {
    pub fn start(model_dir: Option<PathBuf>, adapter: &AdapterChoice) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let embedder = {
            let _entered = runtime.enter();
            default_embedder(model_dir, adapter)?
        };
        let cache = crate::embed::provision::cache_root().join("eval-vectors");
        Ok(Self {
            runtime,
            embedder,
            cache,
        })
    }

    pub fn embed(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.runtime
            .block_on(embed_all(&self.embedder, texts, &self.cache))
    }
}

/// Embeds through the service's batching queue; vectors are kept on disk by content.
async fn embed_all(
    embedder: &Embedder,
    texts: &[String],
    cache: &std::path::Path,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut hasher = Sha256::new();
    hasher.update(embedder.info().space().as_bytes());
    for t in texts {
        hasher.update(t.as_bytes());
        hasher.update([0u8]);
    }
    let path = cache.join(format!("{}.f32", hex::encode(hasher.finalize())));
    let dims = embedder.info().dimensions;
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() == texts.len() * dims * 4 {
            return Ok(bytes
                .chunks_exact(dims * 4)
                .map(|v| {
                    v.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
                .collect());
        }
    }
    let started = std::time::Instant::now();
    let batches: Vec<Vec<String>> = texts.chunks(32).map(|c| c.to_vec()).collect();
    let done: Vec<_> = stream::iter(batches)
        .map(|batch| embedder.embed_many(batch))
        .buffered(4)
        .collect()
        .await;
    let mut vectors = Vec::with_capacity(texts.len());
    for batch in done {
        vectors.extend(batch?.into_iter().map(|e| e.vector));
    }
    eprintln!(
        "embedded {} texts in {:.0} s",
        texts.len(),
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(cache)?;
    let bytes: Vec<u8> = vectors
        .iter()
        .flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    std::fs::write(&path, bytes)?;
    Ok(vectors)
}

/// Per position of `order`, its nearest earlier texts (positions in `order`).
fn neighbours(vectors: &[Vec<f32>], order: &[usize]) -> Vec<Vec<(usize, f32)>> {
    let n = order.len();
    let work = |range: std::ops::Range<usize>| {
        range
            .map(|i| {
                let q = &vectors[order[i]];
                let mut best: Vec<(usize, f32)> = Vec::with_capacity(NEIGHBOURS + 1);
                for (j, &text) in order[..i].iter().enumerate() {
                    let s = dot(q, &vectors[text]);
                    if best.len() < NEIGHBOURS || s > best[best.len() - 1].1 {
                        let at = best.partition_point(|b| b.1 >= s);
                        best.insert(at, (j, s));
                        best.truncate(NEIGHBOURS);
                    }
                }
                best
            })
            .collect::<Vec<_>>()
    };
    // Later positions have more to compare with: split the work by area, not count.
    let split = (n as f64 / std::f64::consts::SQRT_2) as usize;
    std::thread::scope(|s| {
        let late = s.spawn(|| work(split..n));
        let mut all = work(0..split);
        all.extend(late.join().unwrap_or_default());
        all
    })
}

enum Policy<'a> {
    Static { threshold: f32, rules: bool },
    Bounded { delta: f32, labeller: Labeller<'a> },
}

fn run(stream: &Stream, policy: &Policy, seed: u64, observed: &mut Vec<Observation>) -> Tally {
    let n = stream.texts.len();
    let rules = VerifyRules::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cached = vec![false; n];
    let mut own: HashMap<usize, Vec<Observation>> = HashMap::new();
    let mut fit = Fit::default();
    let mut budget = bound::Budget::default();
    let (mut labels_total, mut since_fit) = (0usize, 0usize);
    // Which wording of its group's answer each asker got.
    let wording: Vec<usize> = (0..n).map(|_| rng.gen_range(0..2)).collect();
    let mut tally = Tally::default();
    for i in 0..n {
        tally.queries += 1;
        let mut in_cache = stream.neighbours[i].iter().filter(|(j, _)| cached[*j]);
        let Some(&(c, s)) = in_cache.next() else {
            cached[i] = true;
            continue;
        };
        let runner_up = in_cache.next().map(|r| r.1);
        let truth = stream.group[i] == stream.group[c];
        let rules_pass =
            || verify::check(&rules, &stream.signatures[i], &stream.signatures[c]).is_ok();
        let serve = match policy {
            Policy::Static { threshold, rules } => s >= *threshold && (!rules || rules_pass()),
            Policy::Bounded { delta, labeller } => {
                if !rules_pass() {
                    false
                } else {
                    let overlap = stream.signatures[i].overlap(&stream.signatures[c]);
                    let x = bound::features(s, runner_up, overlap);
                    let list = own.entry(c).or_default();
                    let estimate = fit.estimate(&x, list);
                    let decision = bound::decide(&estimate, *delta, &mut budget, &mut rng);
                    if decision.labels() {
                        let label = match labeller {
                            Labeller::Oracle => truth,
                            Labeller::Answers { answers, level } => answers.agree(
                                (stream.group[i], wording[i]),
                                (stream.group[c], wording[c]),
                                *level,
                            ),
                        };
                        tally.labels += 1;
                        tally.label_errors += u64::from(label != truth);
                        let o = Observation::new(x, label);
                        list.push(o.clone());
                        if list.len() > bound::MAX_PER_ENTRY {
                            list.remove(0);
                        }
                        observed.push(o);
                        labels_total += 1;
                        since_fit += 1;
                        // As the service: refit after a twentieth more labels.
                        if since_fit >= (labels_total / 20).max(16) {
                            fit = Fit::new(own.values().flatten());
                            since_fit = 0;
                        }
                    }
                    decision == Decision::Serve
                }
            }
        };
        if serve {
            tally.served += 1;
            tally.wrong += u64::from(!truth);
        } else {
            cached[i] = true;
        }
    }
    tally
}

pub fn run_eval(args: BoundArgs) -> anyhow::Result<()> {
    let (texts, group) = questions(&args)?;
    let groups = group.iter().max().map_or(0, |g| g + 1);
    let embedder = EvalEmbedder::start(args.model_dir.clone(), &args.adapter)?;
    let vectors = embedder.embed(&texts)?;
    let answers = match &args.gptcache {
        Some(path) => {
            let pairs: Vec<ParaphrasePair> = serde_json::from_str(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )?;
            let texts: Vec<String> = pairs
                .iter()
                .flat_map(|p| [p.origin.clone(), p.similar.clone()])
                .collect();
            let vectors = embedder.embed(&texts)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
            let pair_of_group = (0..groups).map(|_| rng.gen_range(0..pairs.len())).collect();
            report_answer_noise(&texts, &vectors);
            Some(Answers {
                texts,
                vectors,
                pair_of_group,
            })
        }
        None => None,
    };
    println!(
        "\n{} questions in {} duplicate groups ({:?} half, {} pairs, seed {}), {} runs",
        texts.len(),
        groups,
        args.half,
        args.pairs_per_half,
        args.seed,
        args.runs
    );
    let streams: Vec<Stream> = (0..args.runs)
        .map(|r| {
            let mut order: Vec<usize> = (0..texts.len()).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed * 1000 + r));
            Stream {
                neighbours: neighbours(&vectors, &order),
                signatures: order.iter().map(|&t| Signature::of(&texts[t])).collect(),
                group: order.iter().map(|&t| group[t]).collect(),
                texts: order.iter().map(|&t| texts[t].clone()).collect(),
            }
        })
        .collect();
    let total = |policy: &Policy| {
        let mut sum = Tally::default();
        let mut seen = Vec::new();
        for (r, stream) in streams.iter().enumerate() {
            sum.add(run(stream, policy, args.seed + r as u64, &mut seen));
        }
        (sum, seen)
    };
    if args.fit_prior {
        let (_, seen) = total(&Policy::Bounded {
            delta: 0.0,
            labeller: Labeller::Oracle,
        });
        let fit = Fit::new(seen.iter());
        println!("cache-wide fit to {} labels: {:?}", seen.len(), fit);
    }
    let grid: Vec<f32> = (0..=120).map(|k| 0.70 + 0.0025 * k as f32).collect();
    let statics: Vec<(f32, Tally)> = grid
        .iter()
        .map(|&t| {
            (
                t,
                total(&Policy::Static {
                    threshold: t,
                    rules: true,
                })
                .0,
            )
        })
        .collect();
    let best_static = |error: f64| {
        statics
            .iter()
            .filter(|(_, t)| t.served > 0 && t.error() <= error)
            .max_by(|a, b| a.1.served.cmp(&b.1.served))
            .copied()
    };
    let (plain, _) = total(&Policy::Static {
        threshold: 0.9,
        rules: false,
    });
    let (defaults, _) = total(&Policy::Static {
        threshold: 0.9,
        rules: true,
    });
    println!("\n| policy | hit rate | error rate (95% CI) |\n|---|---|---|");
    for (name, t) in [
        ("plain cosine ≥ 0.90", plain),
        ("our defaults (≥ 0.90 + rules)", defaults),
    ] {
        let (lo, hi) = t.interval();
        println!(
            "| {name} | {:.4} | {:.4} ({lo:.4}–{hi:.4}) |",
            t.hit_rate(),
            t.error()
        );
    }
    let mut labellers = vec![("oracle", Labeller::Oracle)];
    if let Some(answers) = &answers {
        labellers.push((
            "answers",
            Labeller::Answers {
                answers,
                level: args.answer_similarity,
            },
        ));
    }
    for (name, labeller) in labellers {
        println!(
            "\nmaxErrorRate, labels from {name}:\n\n| δ | hit rate | error rate (95% CI) | ≤ δ | labels (wrong) | best static at that error: threshold, hit rate | ours ÷ static | best static with error ≤ δ: threshold, hit rate, error |\n|---|---|---|---|---|---|---|---|"
        );
        for delta in [0.02f32, 0.05, 0.10, 0.20] {
            let (t, _) = total(&Policy::Bounded { delta, labeller });
            let (lo, hi) = t.interval();
            let (st, sh) = match best_static(t.error()) {
                Some((threshold, s)) => (
                    format!("{threshold:.4}, {:.4}", s.hit_rate()),
                    format!("{:.2}×", t.hit_rate() / s.hit_rate().max(1e-9)),
                ),
                None => ("none that low".to_string(), "—".to_string()),
            };
            let within = match best_static(f64::from(delta)) {
                Some((threshold, s)) => {
                    format!("{threshold:.4}, {:.4}, {:.4}", s.hit_rate(), s.error())
                }
                None => "none".to_string(),
            };
            println!(
                "| {delta:.2} | {:.4} | {:.4} ({lo:.4}–{hi:.4}) | {} | {} ({}) | {st} | {sh} | {within} |",
                t.hit_rate(),
                t.error(),
                if t.error() <= f64::from(delta) {
                    "yes"
                } else {
                    "**no**"
                },
                t.labels,
                t.label_errors,
            );
        }
    }
    drop(embedder);
    Ok(())
}

/// How often the answer comparison is wrong, on GPTCache's pairs used as answers: a
/// pair's two wordings are the same answer; a wording and the nearest other pair's
/// wording are different answers.
fn report_answer_noise(texts: &[String], vectors: &[Vec<f32>]) {
    let pairs = vectors.len() / 2;
    // Each origin's nearest wording of another pair: the hardest different answer.
    let nearest_other: Vec<(usize, f32)> = (0..pairs)
        .map(|p| {
            (0..vectors.len())
                .filter(|&t| t / 2 != p)
                .map(|t| (t, dot(&vectors[2 * p], &vectors[t])))
                .fold((0, f32::MIN), |a, b| if b.1 > a.1 { b } else { a })
        })
        .collect();
    println!("\nAnswer comparison on GPTCache's {pairs} pairs used as answers (a pair's two wordings are one answer; each origin against the nearest wording of another pair is two different answers):\n\n| level | same judged different: cosine / cosine + rules | nearest different judged same: cosine / cosine + rules |\n|---|---|---|");
    for level in [0.7f32, 0.8, 0.85, 0.9, 0.95] {
        let (mut missed, mut missed_rules, mut confused, mut confused_rules) = (0, 0, 0, 0);
        for (p, &(other, other_cosine)) in nearest_other.iter().enumerate() {
            let (a, b) = (2 * p, 2 * p + 1);
            let cosine = dot(&vectors[a], &vectors[b]);
            missed += usize::from(cosine < level);
            missed_rules += usize::from(!answers_agree_at(&texts[a], &texts[b], cosine, level));
            confused += usize::from(other_cosine >= level);
            confused_rules += usize::from(answers_agree_at(
                &texts[a],
                &texts[other],
                other_cosine,
                level,
            ));
        }
        let share = |n: usize| n as f64 / pairs as f64;
        println!(
            "| {level:.2} | {:.3} / {:.3} | {:.3} / {:.3} |",
            share(missed),
            share(missed_rules),
            share(confused),
            share(confused_rules)
        );
    }
}
