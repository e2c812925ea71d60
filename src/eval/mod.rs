//! `semcache eval`: the cache-simulation protocol on a labelled pairs file, through the
//! real cache core (real model, sled store, HNSW index, verifier) in a temporary data dir.
//!
//! Every first text of a pair is inserted; every second text is searched. A hit is
//! *correct* when the entry is the same question as the query (same text, or linked
//! through duplicate labels), *wrong* when a label says they differ (unlabelled hits
//! count as neither). Precision = correct / (correct + wrong); recall = correct hits /
//! duplicate pairs. The plain-cosine baseline is read off the same run: its hit is the
//! nearest candidate, whatever the verifier said.

pub mod bound;
pub mod guard;
pub mod router;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures::stream::{self, StreamExt};
use serde::Deserialize;

use crate::cache::{CacheConfig, CacheService, NewEntry, Query, SearchOutcome};
use crate::embed::{
    adapter::AdapterChoice, manifest::ModelManifest, provision, select_device, DeviceChoice,
    Embedder, QueueOptions,
};
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PairsFormat {
    /// `[{a, b, duplicate}]`: labelled pairs (e.g. Quora Question Pairs).
    Labelled,
    /// `[{origin, similar}]`: every pair a paraphrase (GPTCache's mock data).
    Paraphrases,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The pairs file.
    #[arg(long)]
    pub pairs: PathBuf,
    #[arg(long, value_enum, default_value = "labelled")]
    pub format: PairsFormat,
    /// Write the precision/recall curves (ours and plain cosine) as an SVG plot.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Where model files are cached.
    #[arg(long, env = "SEMCACHE_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Use only the first N pairs (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// The adapter merged into the model (none, qqp, or a .safetensors file).
    #[arg(long, default_value = "none")]
    pub adapter: AdapterChoice,
}

#[derive(Deserialize)]
struct LabelledPair {
    a: String,
    b: String,
    duplicate: bool,
}

#[derive(Deserialize)]
struct ParaphrasePair {
    origin: String,
    similar: String,
}

/// Which texts are "the same question", from the labels.
struct Labels {
    parent: HashMap<String, String>,
    different: HashSet<(String, String)>,
    duplicates: usize,
}

impl Labels {
    /// Duplicate groups from the pairs labelled duplicate (no "different" labels yet).
    fn of_duplicates(pairs: &[LabelledPair]) -> Self {
        let mut labels = Labels {
            parent: HashMap::new(),
            different: HashSet::new(),
            duplicates: 0,
        };
        for p in pairs.iter().filter(|p| p.duplicate) {
            labels.union(&p.a, &p.b);
            labels.duplicates += 1;
        }
        labels
    }

    fn root(&self, text: &str) -> String {
        let mut t = text.to_string();
        while let Some(p) = self.parent.get(&t) {
            if *p == t {
                break;
            }
            t = p.clone();
        }
        t
    }

    fn union(&mut self, a: &str, b: &str) {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra != rb {
            self.parent.insert(ra, rb);
        }
    }

    /// +1 correct, -1 wrong, 0 unlabelled.
    fn judge(&self, query: &str, entry: &str) -> i32 {
        let (rq, re) = (self.root(query), self.root(entry));
        if query == entry || rq == re {
            1
        } else if self.different.contains(&(rq, re)) {
            -1
        } else {
            0
        }
    }
}

struct Task {
    inserts: Vec<String>,
    queries: Vec<String>,
    labels: Labels,
}

fn load(path: &Path, format: PairsFormat, limit: usize) -> anyhow::Result<Task> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pairs: Vec<LabelledPair> = match format {
        PairsFormat::Labelled => serde_json::from_str(&text)?,
        PairsFormat::Paraphrases => serde_json::from_str::<Vec<ParaphrasePair>>(&text)?
            .into_iter()
            .map(|p| LabelledPair {
                a: p.origin,
                b: p.similar,
                duplicate: true,
            })
            .collect(),
    };
    let pairs = if limit > 0 {
        &pairs[..limit.min(pairs.len())]
    } else {
        &pairs[..]
    };
    let mut labels = Labels::of_duplicates(pairs);
    if format == PairsFormat::Paraphrases {
        // Every origin is a different question from every other origin.
        labels.different = HashSet::new();
    }
    for p in pairs.iter().filter(|p| !p.duplicate) {
        let (ra, rb) = (labels.root(&p.a), labels.root(&p.b));
        labels.different.insert((ra.clone(), rb.clone()));
        labels.different.insert((rb, ra));
    }
    let mut seen = HashSet::new();
    let inserts = pairs
        .iter()
        .filter(|p| seen.insert(p.a.clone()))
        .map(|p| p.a.clone())
        .collect();
    Ok(Task {
        inserts,
        queries: pairs.iter().map(|p| p.b.clone()).collect(),
        labels,
    })
}

/// What one query's lookup found: the verified hit and the plain nearest neighbour.
struct Observed {
    ours: Option<(String, f32)>,
    nearest: Option<(String, f32)>,
    /// The rule that rejected the nearest candidate, if one did.
    nearest_rejected_by: Option<&'static str>,
}

struct Point {
    threshold: f32,
    precision: f64,
    recall: f64,
    correct: usize,
    wrong: usize,
}

fn curve(
    task: &Task,
    observed: &[Observed],
    pick: impl Fn(&Observed) -> Option<&(String, f32)>,
    format: PairsFormat,
    thresholds: &[f32],
) -> Vec<Point> {
    thresholds
        .iter()
        .map(|&t| {
            let (mut correct, mut wrong) = (0, 0);
            for (query, obs) in task.queries.iter().zip(observed) {
                let Some((entry, sim)) = pick(obs) else {
                    continue;
                };
                if *sim < t {
                    continue;
                }
                let verdict = match format {
                    PairsFormat::Labelled => task.labels.judge(query, entry),
                    // Each paraphrase belongs to its own origin and no other.
                    PairsFormat::Paraphrases => {
                        if task.labels.root(query) == task.labels.root(entry) {
                            1
                        } else {
                            -1
                        }
                    }
                };
                match verdict {
                    1 => correct += 1,
                    -1 => wrong += 1,
                    _ => {}
                }
            }
            Point {
                threshold: t,
                precision: if correct + wrong == 0 {
                    1.0
                } else {
                    correct as f64 / (correct + wrong) as f64
                },
                recall: correct as f64 / task.labels.duplicates.max(1) as f64,
                correct,
                wrong,
            }
        })
        .collect()
}

/// The precision, and the threshold, at which the hits' recall first reaches `recall`
/// (hits taken in order of similarity): one number to compare models by, free of the
/// threshold grid. `None` when recall never gets there.
fn precision_at_recall(
    task: &Task,
    observed: &[Observed],
    pick: impl Fn(&Observed) -> Option<&(String, f32)>,
    format: PairsFormat,
    recall: f64,
) -> Option<(f64, f32)> {
    let mut hits: Vec<(f32, i32)> = task
        .queries
        .iter()
        .zip(observed)
        .filter_map(|(query, obs)| {
            let (entry, sim) = pick(obs)?;
            let verdict = match format {
                PairsFormat::Labelled => task.labels.judge(query, entry),
                PairsFormat::Paraphrases => {
                    if task.labels.root(query) == task.labels.root(entry) {
                        1
                    } else {
                        -1
                    }
                }
            };
            Some((*sim, verdict))
        })
        .collect();
    hits.sort_by(|a, b| b.0.total_cmp(&a.0));
    let needed = recall * task.labels.duplicates.max(1) as f64;
    let (mut correct, mut wrong) = (0usize, 0usize);
    for (sim, verdict) in hits {
        match verdict {
            1 => correct += 1,
            -1 => wrong += 1,
            _ => continue,
        }
        if correct as f64 >= needed {
            return Some((correct as f64 / (correct + wrong) as f64, sim));
        }
    }
    None
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let task = load(&args.pairs, args.format, args.limit)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let observed = runtime.block_on(simulate(&task, args.model_dir.clone(), &args.adapter))?;
    let default_threshold = args
        .adapter
        .load()?
        .and_then(|a| a.threshold)
        .unwrap_or(CacheConfig::default().similarity_threshold);
    let mut thresholds: Vec<f32> = (35..=49).map(|i| i as f32 * 0.02).collect();
    if !thresholds
        .iter()
        .any(|t| (t - default_threshold).abs() < 1e-6)
    {
        thresholds.push(default_threshold);
        thresholds.sort_by(f32::total_cmp);
    }
    let ours = curve(
        &task,
        &observed,
        |o| o.ours.as_ref(),
        args.format,
        &thresholds,
    );
    let plain = curve(
        &task,
        &observed,
        |o| o.nearest.as_ref(),
        args.format,
        &thresholds,
    );

    println!(
        "{} (adapter {}): {} entries inserted, {} queries, {} duplicate pairs",
        args.pairs.display(),
        args.adapter,
        task.inserts.len(),
        task.queries.len(),
        task.labels.duplicates
    );
    println!("| threshold | semcache precision | semcache recall | correct / wrong | plain cosine precision | plain cosine recall | correct / wrong |");
    println!("|---|---|---|---|---|---|---|");
    for (o, p) in ours.iter().zip(&plain) {
        let mark = if (o.threshold - default_threshold).abs() < 1e-6 {
            " (default)"
        } else {
            ""
        };
        // Off the 0.02 grid (an adapter's default), with the digit that tells it apart.
        let threshold = format!("{:.3}", o.threshold);
        let threshold = threshold.strip_suffix('0').unwrap_or(&threshold);
        println!(
            "| {threshold}{} | {:.3} | {:.3} | {} / {} | {:.3} | {:.3} | {} / {} |",
            mark,
            o.precision,
            o.recall,
            o.correct,
            o.wrong,
            p.precision,
            p.recall,
            p.correct,
            p.wrong
        );
    }
    println!();
    for recall in [0.5, 0.6] {
        let show = |at: Option<(f64, f32)>| match at {
            Some((p, t)) => format!("{p:.3} (threshold {t:.3})"),
            None => "not reached".into(),
        };
        println!(
            "precision at recall {recall:.2}: semcache {}, plain cosine {}",
            show(precision_at_recall(
                &task,
                &observed,
                |o| o.ours.as_ref(),
                args.format,
                recall
            )),
            show(precision_at_recall(
                &task,
                &observed,
                |o| o.nearest.as_ref(),
                args.format,
                recall
            )),
        );
    }
    // Which rule rejected the nearest candidate, and whether the labels agree.
    let mut by_rule: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for (query, obs) in task.queries.iter().zip(&observed) {
        if let (Some(rule), Some((entry, sim))) = (obs.nearest_rejected_by, &obs.nearest) {
            if *sim < default_threshold {
                continue;
            }
            let verdict = match args.format {
                PairsFormat::Labelled => task.labels.judge(query, entry),
                PairsFormat::Paraphrases => {
                    if task.labels.root(query) == task.labels.root(entry) {
                        1
                    } else {
                        -1
                    }
                }
            };
            let counts = by_rule.entry(rule).or_default();
            match verdict {
                1 => counts.0 += 1,
                -1 => counts.1 += 1,
                _ => counts.2 += 1,
            }
        }
    }
    println!("\nNearest candidates at or above the default threshold rejected by the verifier:");
    println!("| rule | labelled same (a hit lost) | labelled different (a wrong hit avoided) | unlabelled |");
    println!("|---|---|---|---|");
    for (rule, (same, different, unknown)) in &by_rule {
        println!("| {rule} | {same} | {different} | {unknown} |");
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "{} — precision vs recall",
            args.pairs
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("pairs")
        );
        std::fs::write(path, svg(&title, &ours, &plain, default_threshold))?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// The default model (fetched if needed) behind the service's batching queue; call
/// inside a Tokio runtime.
fn default_embedder(
    model_dir: Option<PathBuf>,
    adapter: &AdapterChoice,
) -> anyhow::Result<Embedder> {
    let manifest = ModelManifest::default_model();
    let dir = model_dir.unwrap_or_else(provision::default_model_dir);
    let files = provision::ensure(&manifest, &dir)?;
    Ok(Embedder::start(
        &manifest,
        &files,
        adapter.load()?.as_ref(),
        &select_device(DeviceChoice::Auto)?,
        QueueOptions::default(),
    )?)
}

async fn simulate(
    task: &Task,
    model_dir: Option<PathBuf>,
    adapter: &AdapterChoice,
) -> anyhow::Result<Vec<Observed>> {
    let embedder = default_embedder(model_dir, adapter)?;
    let data = tempfile::tempdir()?;
    let store = Store::open(data.path())?;
    let core = Arc::new(CacheService::open(store, embedder, CacheConfig::default())?);
    let cache = "eval";
    let started = std::time::Instant::now();
    let inserted: Vec<anyhow::Result<()>> = stream::iter(task.inserts.iter().cloned())
        .map(|prompt| {
            let core = core.clone();
            async move {
                let entry = NewEntry {
                    prompt,
                    response: String::new(),
                    attributes: BTreeMap::new(),
                    ttl_ms: None,
                };
                core.insert(cache, entry)
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    inserted.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!(
        "inserted {} entries in {:.1}s",
        task.inserts.len(),
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    let observed: Vec<anyhow::Result<Observed>> = stream::iter(task.queries.iter().cloned())
        .map(|prompt| {
            let core = core.clone();
            async move {
                let query = Query {
                    prompt,
                    attributes: BTreeMap::new(),
                    similarity_threshold: Some(0.0),
                    strategies: Vec::new(),
                    max_results: 1,
                    explain: true,
                    max_queue_wait: None,
                    embedded: None,
                };
                let outcome: SearchOutcome = core.search(cache, &query).await?;
                let ours = outcome
                    .hits
                    .first()
                    .map(|h| (h.entry.prompt.clone(), h.similarity));
                let first = outcome.considered.first();
                let nearest = first.map(|c| (c.prompt.clone(), c.similarity));
                let nearest_rejected_by = first.and_then(|c| c.rejected.as_ref()).map(|r| r.name());
                Ok(Observed {
                    ours,
                    nearest,
                    nearest_rejected_by,
                })
            }
        })
        .buffered(64)
        .collect()
        .await;
    eprintln!(
        "searched {} queries in {:.1}s",
        task.queries.len(),
        started.elapsed().as_secs_f64()
    );
    observed.into_iter().collect()
}

/// A small self-contained SVG: precision (y) against recall (x) for both curves.
fn svg(title: &str, ours: &[Point], plain: &[Point], default_threshold: f32) -> String {
    let (w, h, m) = (640.0, 440.0, 60.0);
    let x = |r: f64| m + r * (w - 2.0 * m);
    let y = |p: f64| h - m - (p - 0.5).max(0.0) / 0.5 * (h - 2.0 * m);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        title
    );
    for i in 0..=10 {
        let r = i as f64 / 10.0;
        let p = 0.5 + i as f64 / 20.0;
        let _ = write!(
            out,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#eee"/><text x="{0}" y="{3}" text-anchor="middle">{4:.1}</text>"##,
            x(r),
            y(0.5),
            y(1.0),
            h - m + 16.0,
            r
        );
        let _ = write!(
            out,
            r##"<line x1="{1}" y1="{0}" x2="{2}" y2="{0}" stroke="#eee"/><text x="{3}" y="{4}" text-anchor="end">{5:.2}</text>"##,
            y(p),
            x(0.0),
            x(1.0),
            m - 6.0,
            y(p) + 4.0,
            p
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">recall</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">precision</text>"#,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    );
    for (points, color, name, row) in [
        (ours, "#d62728", "semcache (cosine + verifier)", 0.0),
        (plain, "#1f77b4", "plain cosine", 1.0),
    ] {
        let path: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.recall), y(p.precision)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in points {
            let r = if (p.threshold - default_threshold).abs() < 1e-6 {
                5.0
            } else {
                2.5
            };
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{color}"><title>threshold {:.2}: P {:.3} R {:.3}</title></circle>"#,
                x(p.recall),
                y(p.precision),
                p.threshold,
                p.precision,
                p.recall
            );
        }
        let _ = write!(
            out,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            w - m - 190.0,
            m + 4.0 + row * 18.0,
            w - m - 172.0,
            m + 9.0 + row * 18.0
        );
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" fill="#555">large dots: default threshold {default_threshold:.2}</text>"##,
        w - m - 190.0,
        m + 45.0
    );
    out.push_str("</svg>\n");
    out
}
