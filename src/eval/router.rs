//! `semcache eval-router`: the router's scorer on CLINC150 (Larson et al. 2019).
//!
//! One route per intent from the first N `train` utterances (N = 10, what a user writes
//! by hand, and 100, all of them). CLINC150's test split is not ours to use, so the
//! held-out figures come from two-fold cross-validation on `val` + `oos_val`: fit on one
//! half (even positions per intent, even out-of-scope positions), score the other, swap,
//! average. `oos_train` is a second out-of-scope set no fit sees.

use crate::embed::adapter::AdapterChoice;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use super::bound::EvalEmbedder;
use crate::routing::scorer::{self, Accuracy, Params, RouteVectors};

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// CLINC150 JSON with `train`, `val`, `oos_train`, `oos_val` lists of [text, intent].
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Out-of-scope recall each fit aims for (then maximising in-scope accuracy).
    #[arg(long, default_value_t = crate::routing::scorer::DEFAULT_OOS_RECALL)]
    pub min_oos_recall: f64,
    /// Write the texts, their vectors and the two halves here (`vectors.f32`, `index.json`),
    /// so a peer library can be scored on the same vectors and folds.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

type Pairs = Vec<(String, String)>;

fn split(data: &serde_json::Value, name: &str) -> anyhow::Result<Pairs> {
    data.get(name)
        .and_then(|v| v.as_array())
        .with_context(|| format!("no `{name}` list"))?
        .iter()
        .map(|pair| {
            let text = pair.get(0).and_then(|v| v.as_str());
            let intent = pair.get(1).and_then(|v| v.as_str());
            match (text, intent) {
                (Some(t), Some(i)) => Ok((t.to_string(), i.to_string())),
                _ => anyhow::bail!("`{name}` holds something other than [text, intent]"),
            }
        })
        .collect()
}

/// Per `val` position, its half: alternating within each intent (`None`: no such route).
fn val_halves(val: &Pairs, index: &BTreeMap<&str, usize>) -> Vec<Option<usize>> {
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    val.iter()
        .map(|(_, intent)| {
            let k = seen.entry(*index.get(intent.as_str())?).or_default();
            *k += 1;
            Some((*k - 1) % 2)
        })
        .collect()
}

/// `dir/vectors.f32`: every split's rows (little-endian f32) in the order of `index.json`,
/// which holds each split's [text, intent] pairs, its rows, and the halves.
fn export(
    dir: &std::path::Path,
    model: &str,
    splits: [(&str, &Pairs, &[Vec<f32>]); 4],
    halves: &[Option<usize>],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (mut bytes, mut index, mut row) = (Vec::new(), serde_json::Map::new(), 0usize);
    for (name, pairs, vectors) in splits {
        bytes.extend(vectors.iter().flatten().flat_map(|x| x.to_le_bytes()));
        let rows = [row, row + vectors.len()];
        row = rows[1];
        index.insert(
            name.into(),
            serde_json::json!({ "rows": rows, "pairs": pairs }),
        );
    }
    let oos_halves: Vec<usize> = (0..splits[3].1.len()).map(|n| n % 2).collect();
    let index = serde_json::json!({
        "model": model,
        "dimensions": splits[0].2.first().map_or(0, Vec::len),
        "splits": index,
        "halves": { "val": halves, "oos_val": oos_halves },
    });
    std::fs::write(dir.join("vectors.f32"), bytes)?;
    std::fs::write(dir.join("index.json"), serde_json::to_string(&index)?)?;
    eprintln!("exported {row} vectors to {}", dir.display());
    Ok(())
}

fn show(label: &str, a: &Accuracy) {
    println!(
        "  {label:<44} in-scope accuracy {:>5.1}%  out-of-scope recall {:>5.1}%  precision {:>5.1}%  ({} examples)",
        100.0 * a.in_scope_accuracy,
        100.0 * a.out_of_scope_recall,
        100.0 * a.out_of_scope_precision,
        a.examples
    );
}

fn mean(a: &Accuracy, b: &Accuracy) -> Accuracy {
    Accuracy {
        accuracy: (a.accuracy + b.accuracy) / 2.0,
        in_scope_accuracy: (a.in_scope_accuracy + b.in_scope_accuracy) / 2.0,
        out_of_scope_recall: (a.out_of_scope_recall + b.out_of_scope_recall) / 2.0,
        out_of_scope_precision: (a.out_of_scope_precision + b.out_of_scope_precision) / 2.0,
        examples: a.examples + b.examples,
    }
}

pub fn run(args: RouterArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("cannot read {}", args.data.display()))?;
    let data: serde_json::Value = serde_json::from_str(&text)?;
    let (train, val, oos_train, oos_val) = (
        split(&data, "train")?,
        split(&data, "val")?,
        split(&data, "oos_train")?,
        split(&data, "oos_val")?,
    );
    let mut intents: Vec<String> = train.iter().map(|(_, i)| i.clone()).collect();
    intents.sort();
    intents.dedup();
    let index: BTreeMap<&str, usize> = intents
        .iter()
        .enumerate()
        .map(|(n, i)| (i.as_str(), n))
        .collect();

    let vectors = EvalEmbedder::start(args.model_dir.clone(), &AdapterChoice::None)?;
    let embed = |pairs: &Pairs| -> anyhow::Result<Vec<Vec<f32>>> {
        let texts: Vec<String> = pairs.iter().map(|(t, _)| t.clone()).collect();
        vectors.embed(&texts)
    };
    let (train_v, val_v, oos_train_v, oos_val_v) = (
        embed(&train)?,
        embed(&val)?,
        embed(&oos_train)?,
        embed(&oos_val)?,
    );

    let val_half = val_halves(&val, &index);
    if let Some(dir) = &args.export {
        let splits = [
            ("train", &train, &train_v[..]),
            ("val", &val, &val_v[..]),
            ("oos_train", &oos_train, &oos_train_v[..]),
            ("oos_val", &oos_val, &oos_val_v[..]),
        ];
        export(dir, &vectors.embedder.info().model, splits, &val_half)?;
    }

    // Labelled examples: in-scope val with its route, out-of-scope with none; halves by
    // position (per intent for val).
    let mut halves: [Vec<(Vec<f32>, Option<usize>)>; 2] = [Vec::new(), Vec::new()];
    for (((_, intent), v), half) in val.iter().zip(&val_v).zip(&val_half) {
        let (Some(route), Some(half)) = (index.get(intent.as_str()), half) else {
            continue;
        };
        halves[*half].push((v.clone(), Some(*route)));
    }
    for (n, v) in oos_val_v.iter().enumerate() {
        halves[n % 2].push((v.clone(), None));
    }
    let all: Vec<(Vec<f32>, Option<usize>)> = halves.concat();
    let oos_holdout: Vec<(Vec<f32>, Option<usize>)> =
        oos_train_v.iter().map(|v| (v.clone(), None)).collect();

    println!(
        "CLINC150: {} intents; train {}, val {}, oos_val {}, oos_train {}; model {}",
        intents.len(),
        train.len(),
        val.len(),
        oos_val.len(),
        oos_train.len(),
        vectors.embedder.info().model
    );
    let target = args.min_oos_recall;
    println!("each fit: best in-scope accuracy at out-of-scope recall >= {target}");
    for per_route in [10usize, 100] {
        let mut utterances: Vec<Vec<Vec<f32>>> = vec![Vec::new(); intents.len()];
        for ((_, intent), v) in train.iter().zip(&train_v) {
            if let Some(&r) = index.get(intent.as_str()) {
                if utterances[r].len() < per_route {
                    utterances[r].push(v.clone());
                }
            }
        }
        let routes: Vec<RouteVectors> = utterances.into_iter().map(RouteVectors::new).collect();
        let default = Params {
            beta: crate::routing::DEFAULT_BETA,
            k: 1,
            margin: 0.0,
            thresholds: vec![crate::routing::DEFAULT_THRESHOLD; routes.len()],
            head: false,
        };
        println!("\n{per_route} utterances per route");
        let trained = Instant::now();
        let head = scorer::Head::train(&routes);
        let head = head.as_ref();
        println!(
            "  linear head trained on the utterances in {:.1} s",
            trained.elapsed().as_secs_f64()
        );
        let scored_all = scorer::score_examples(&routes, head, &all, 1);
        show(
            "no fit (defaults), on val + oos_val",
            &scorer::evaluate(&scored_all, &default),
        );
        let started = Instant::now();
        let mut folds = Vec::new();
        for k in 0..2 {
            let fitted = scorer::fit(&routes, head, &halves[k], &default, target);
            let held = scorer::score_examples(&routes, head, &halves[1 - k], fitted.k);
            folds.push((scorer::evaluate(&held, &fitted), fitted));
        }
        let fit_s = started.elapsed().as_secs_f64() / 2.0;
        show(
            "fit on one half, scored on the other (mean)",
            &mean(&folds[0].0, &folds[1].0),
        );
        for (k, (_, p)) in folds.iter().enumerate() {
            let spread = p
                .thresholds
                .iter()
                .fold((f32::MAX, f32::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
            println!(
                "    fold {k}: head {}, beta {:.2}, k {}, margin {:.2}, thresholds {:.3}..{:.3}",
                p.head, p.beta, p.k, p.margin, spread.0, spread.1
            );
        }
        let fitted = scorer::fit(&routes, head, &all, &default, target);
        let oos = scorer::evaluate(
            &scorer::score_examples(&routes, head, &oos_holdout, fitted.k),
            &fitted,
        );
        println!(
            "  fit on all of val + oos_val: out-of-scope recall on oos_train (unseen) {:.1}%",
            100.0 * oos.out_of_scope_recall
        );
        // Cost of one decision beyond the embedding.
        let queries: Vec<&Vec<f32>> = val_v.iter().take(1000).collect();
        let started = Instant::now();
        let mut routed = 0usize;
        for q in &queries {
            routed += usize::from(scorer::decide(&routes, head, &fitted, q).route.is_some());
        }
        let micros = started.elapsed().as_secs_f64() * 1e6 / queries.len() as f64;
        println!(
            "  one decision: {micros:.1} µs ({} routes; {routed} of {} routed); one fit: {fit_s:.1} s",
            routes.len(),
            queries.len()
        );
    }
    Ok(())
}
