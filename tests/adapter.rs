//! The built-in `qqp` adapter: merged into the model it matches its own reference
//! vectors (models/adapters/qqp-lora-r8.reference.json, written by
//! training/qqp-adapter/train.py with the adapted PyTorch model), and a data dir never
//! mixes vectors from the adapted and the base model.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn embed(s: &Server, texts: &[&str]) -> Vec<Vec<f64>> {
    let r = s.post("/v1/embeddings", &json!({"input": texts}));
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect()
}

#[test]
fn the_qqp_adapter_matches_its_reference_vectors() {
    let reference: Value = serde_json::from_str(include_str!(
        "../models/adapters/qqp-lora-r8.reference.json"
    ))
    .unwrap();
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(texts.len() >= 20);
    let s = Server::start(&["--adapter", "qqp"]);
    let ready: Value = s.get("/readyz").json().unwrap();
    assert!(ready["adapter"].as_str().unwrap().starts_with("qqp@"));
    let got = embed(&s, &texts);
    let mut worst = f64::MAX;
    for ((text, expected), actual) in texts
        .iter()
        .zip(reference["vectors"].as_array().unwrap())
        .zip(&got)
    {
        let c = cosine(&floats(expected), actual);
        assert!(c >= 0.9999, "{text:?}: cosine {c}");
        worst = worst.min(c);
    }
    eprintln!("adapter parity: worst cosine vs the adapted PyTorch model {worst:.6}");
    // The adapter changes the vectors (it is not a no-op), on the same texts.
    let base = Server::start(&[]);
    let ready: Value = base.get("/readyz").json().unwrap();
    assert_eq!(ready["adapter"], Value::Null);
    let plain = embed(&base, &texts);
    let moved = plain
        .iter()
        .zip(&got)
        .filter(|(p, a)| cosine(p, a) < 0.999)
        .count();
    assert!(moved > texts.len() / 2, "only {moved} vectors changed");
}

/// Runs `serve` on `dir` expecting start-up to fail; returns what it logged.
fn fails_to_start(dir: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_semcache"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("SEMCACHE_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "start-up should have failed");
            let mut log = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut log)
                .unwrap();
            return log;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the server started on a data dir of another embedding space");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_data_dir_keeps_the_embedding_space_it_was_made_in() {
    let tmp = tempfile::tempdir().unwrap();
    // Made with the base model: an explicit adapter is refused, unset follows the store.
    let base_dir = tmp.path().join("base");
    let mut s = Server::start_in(&base_dir, &[]);
    s.set("c", "What is the capital of France?", "Paris", json!({}));
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let log = fails_to_start(&base_dir, &["--adapter", "qqp"]);
    assert!(
        log.contains("were made with sentence-transformers/all-MiniLM-L6-v2")
            && log.contains("--adapter"),
        "{log}"
    );
    let s = Server::start_in(&base_dir, &[]);
    let ready: Value = s.get("/readyz").json().unwrap();
    assert_eq!(ready["adapter"], Value::Null);
    assert_eq!(
        s.search("c", json!({"prompt": "What is the capital of France?"}))
            .len(),
        1
    );
    drop(s);
    // Made with the adapter: unset follows it, the base model is refused.
    let adapted_dir = tmp.path().join("adapted");
    let mut s = Server::start_in(&adapted_dir, &["--adapter", "qqp"]);
    s.set("c", "What is the capital of France?", "Paris", json!({}));
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let s = Server::start_in(&adapted_dir, &[]);
    let ready: Value = s.get("/readyz").json().unwrap();
    assert!(ready["adapter"].as_str().unwrap().starts_with("qqp@"));
    assert_eq!(
        s.search("c", json!({"prompt": "What is the capital of France?"}))
            .len(),
        1
    );
    drop(s);
    let log = fails_to_start(&adapted_dir, &["--adapter", "none"]);
    assert!(log.contains("+qqp@") && log.contains("--adapter"), "{log}");
    // An adapter name we do not know is a usage error.
    let log = fails_to_start(&tmp.path().join("new"), &["--adapter", "turbo"]);
    assert!(log.contains("unknown adapter"), "{log}");
}
