//! `semcache eval-guard`: how well a guard of example prompts separates attacks from
//! ordinary traffic, per threshold — the evidence for the default threshold.
//!
//! Attacks: our labelled set (tests/fixtures/guards/prompt-attacks.json; its `heldOut`
//! prompts are phrased unlike any example). Benign: its `hardBenign` prompts (the same
//! words in harmless requests), Quora questions (QQP) and the GPTCache questions. A
//! prompt is blocked when its cosine to the closest example reaches the threshold, as
//! the guard does.

use crate::embed::adapter::AdapterChoice;
use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use super::bound::EvalEmbedder;
use super::{LabelledPair, ParaphrasePair};
use crate::routing::guard::{self, GuardDef, DEFAULT_GUARD_THRESHOLD};

#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// The labelled attack set: `guard` (a definition), `heldOut`, `hardBenign`.
    #[arg(long, default_value = "tests/fixtures/guards/prompt-attacks.json")]
    pub attacks: PathBuf,
    /// QQP pairs (`[{a, b, duplicate}]`): their questions are benign traffic.
    #[arg(long)]
    pub qqp: Option<PathBuf>,
    /// Most QQP questions to use (distinct, in file order).
    #[arg(long, default_value_t = 20_000)]
    pub qqp_limit: usize,
    /// GPTCache pairs (`[{origin, similar}]`): benign traffic too.
    #[arg(long)]
    pub gptcache: Option<PathBuf>,
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttackSet {
    guard: GuardDef,
    held_out: Vec<HeldOut>,
    hard_benign: Vec<String>,
}

#[derive(Deserialize)]
struct HeldOut {
    text: String,
    category: String,
}

fn read<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Per prompt: (closest category, cosine to its closest example).
fn scores(categories: &[Vec<Vec<f32>>], prompts: &[Vec<f32>]) -> Vec<(usize, f32)> {
    prompts
        .iter()
        .map(|p| {
            categories
                .iter()
                .enumerate()
                .filter_map(|(c, examples)| guard::nearest(examples, p).map(|(_, s)| (c, s)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or((0, 0.0))
        })
        .collect()
}

fn share(scores: &[(usize, f32)], t: f32) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores.iter().filter(|(_, s)| *s >= t).count() as f64 / scores.len() as f64
}

pub fn run(args: GuardArgs) -> anyhow::Result<()> {
    let set: AttackSet = read(&args.attacks)?;
    let embedder = EvalEmbedder::start(args.model_dir.clone(), &AdapterChoice::None)?;
    let mut categories = Vec::new();
    for c in &set.guard.categories {
        categories.push(embedder.embed(&c.examples)?);
    }
    let held: Vec<String> = set.held_out.iter().map(|h| h.text.clone()).collect();
    let held_scores = scores(&categories, &embedder.embed(&held)?);
    let hard_scores = scores(&categories, &embedder.embed(&set.hard_benign)?);
    let mut benign: Vec<(&str, Vec<(usize, f32)>)> = Vec::new();
    let mut benign_texts: Vec<Vec<String>> = Vec::new();
    if let Some(path) = &args.qqp {
        let pairs: Vec<LabelledPair> = read(path)?;
        let mut seen = BTreeSet::new();
        let mut texts = Vec::new();
        for p in &pairs {
            for q in [&p.a, &p.b] {
                if texts.len() < args.qqp_limit && seen.insert(q.as_str()) {
                    texts.push(q.clone());
                }
            }
        }
        benign.push((
            "QQP questions",
            scores(&categories, &embedder.embed(&texts)?),
        ));
        benign_texts.push(texts);
    }
    if let Some(path) = &args.gptcache {
        let pairs: Vec<ParaphrasePair> = read(path)?;
        let texts: Vec<String> = pairs
            .iter()
            .flat_map(|p| [p.origin.clone(), p.similar.clone()])
            .collect();
        benign.push((
            "GPTCache questions",
            scores(&categories, &embedder.embed(&texts)?),
        ));
        benign_texts.push(texts);
    }

    let examples: usize = categories.iter().map(Vec::len).sum();
    println!(
        "guard: {} categories, {examples} examples; held-out attacks {}; hard benign {}; {}",
        categories.len(),
        held_scores.len(),
        hard_scores.len(),
        benign
            .iter()
            .map(|(name, s)| format!("{name} {}", s.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("model {}", embedder.embedder.info().model);
    print!("threshold  attacks blocked (right category)  hard benign blocked");
    for (name, _) in &benign {
        print!("  {name} blocked");
    }
    println!();
    let index: Vec<usize> = set
        .held_out
        .iter()
        .map(|h| {
            set.guard
                .categories
                .iter()
                .position(|c| c.name == h.category)
                .unwrap_or(usize::MAX)
        })
        .collect();
    for step in 0..=16 {
        let t = 0.5 + 0.025 * step as f32;
        let right = held_scores
            .iter()
            .zip(&index)
            .filter(|((c, s), want)| *s >= t && c == *want)
            .count() as f64
            / held_scores.len().max(1) as f64;
        let mark = if (t - DEFAULT_GUARD_THRESHOLD).abs() < 1e-4 {
            "*"
        } else {
            " "
        };
        print!(
            "{mark}{t:>8.3}  {:>14.1}% ({:>5.1}%)          {:>6.1}%",
            100.0 * share(&held_scores, t),
            100.0 * right,
            100.0 * share(&hard_scores, t)
        );
        for (name, s) in &benign {
            let width = name.len() + 8;
            print!("  {:>width$.3}%", 100.0 * share(s, t));
        }
        println!();
    }
    println!("* the default threshold (DEFAULT_GUARD_THRESHOLD)");

    // `read: sentences`: a message of several sentences is blocked by any of them too.
    let by_sentence =
        |texts: &[String], whole: &[(usize, f32)]| -> anyhow::Result<Vec<(usize, f32)>> {
            let mut pieces = Vec::new();
            let mut owner = Vec::new();
            for (n, t) in texts.iter().enumerate() {
                let split = guard::sentences(t);
                if split.len() > 1 {
                    owner.extend(std::iter::repeat_n(n, split.len()));
                    pieces.extend(split);
                }
            }
            let mut out = whole.to_vec();
            for (n, score) in owner
                .into_iter()
                .zip(scores(&categories, &embedder.embed(&pieces)?))
            {
                if score.1 > out[n].1 {
                    out[n] = score;
                }
            }
            Ok(out)
        };
    let t = DEFAULT_GUARD_THRESHOLD;
    let padded: Vec<String> = held
        .iter()
        .map(|h| {
            format!(
                "{} {h}",
                "Tell me about the weather in spring and the flowers that grow. ".repeat(10)
            )
        })
        .collect();
    let padded_whole = scores(&categories, &embedder.embed(&padded)?);
    print!(
        "at the default threshold, attacks after 120 words of benign text: blocked {:.1}% reading whole messages, {:.1}% reading sentences",
        100.0 * share(&padded_whole, t),
        100.0 * share(&by_sentence(&padded, &padded_whole)?, t)
    );
    println!();
    print!(
        "read: sentences, at the default threshold: hard benign blocked {:.1}%",
        100.0 * share(&by_sentence(&set.hard_benign, &hard_scores)?, t)
    );
    for ((name, whole), texts) in benign.iter().zip(&benign_texts) {
        print!(
            ", {name} blocked {:.3}%",
            100.0 * share(&by_sentence(texts, whole)?, t)
        );
    }
    println!();
    // The benign prompts closest to an attack example: what a false block looks like.
    let mut near: Vec<(f32, String)> = Vec::new();
    for (text, (_, s)) in set.hard_benign.iter().zip(&hard_scores) {
        near.push((*s, text.clone()));
    }
    near.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("hard benign prompts closest to an example:");
    for (s, text) in near.iter().take(5) {
        println!("  {s:.3}  {text}");
    }
    Ok(())
}
