//! Our embeddings match sentence-transformers' (tests/fixtures/minilm-reference.json,
//! copied from the project's shared fixtures): cosine >= 0.9999 for every text, including
//! the empty string, unicode, and a text truncated at 256 tokens — on every CPU kernel
//! this machine runs (`SEMCACHE_EMBED_KERNEL`); the others are listed as skipped.

mod common;

use common::Server;
use serde_json::{json, Value};

const KERNELS: [&str; 5] = ["amx", "avx512-bf16", "avx512", "avx2", "candle"];

#[test]
fn embeddings_match_sentence_transformers() {
    let mut checked = Vec::new();
    for kernel in KERNELS {
        let s = Server::start_env(&[], &[("SEMCACHE_EMBED_KERNEL", kernel)]);
        let ready: Value = s.get("/readyz").json().unwrap();
        // A kernel this CPU or build lacks falls back (and says so in the log).
        if ready["kernel"] != kernel {
            eprintln!(
                "parity: kernel {kernel} skipped here (the server runs {})",
                ready["kernel"]
            );
            continue;
        }
        let worst = parity(&s);
        eprintln!(
            "parity: kernel {kernel} checked, worst cosine vs sentence-transformers {worst:.6}"
        );
        checked.push(kernel);
    }
    eprintln!("parity: kernels checked on this machine: {checked:?}");
    // Every machine runs candle's path; every x86-64 CPU since 2015 the AVX2 one.
    assert!(checked.contains(&"candle"));
    #[cfg(target_arch = "x86_64")]
    assert!(checked.contains(&"avx2"));
    // Unset, the fastest kernel this CPU runs is chosen.
    let s = Server::start(&[]);
    let ready: Value = s.get("/readyz").json().unwrap();
    let fastest = KERNELS
        .iter()
        .find(|k| checked.contains(k))
        .copied()
        .unwrap();
    assert_eq!(ready["kernel"], fastest);
    // A kernel name we do not know is logged and ignored.
    let s = Server::start_env(&[], &[("SEMCACHE_EMBED_KERNEL", "turbo")]);
    let ready: Value = s.get("/readyz").json().unwrap();
    assert_eq!(ready["kernel"], fastest);
}

fn parity(s: &Server) -> f64 {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/minilm-reference.json")).unwrap();
    let items = fixture["items"].as_array().unwrap();
    assert!(items.len() >= 20);
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let r = s.post("/v1/embeddings", &json!({"input": texts}));
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    let mut worst = f64::MAX;
    for (item, got) in items.iter().zip(body["data"].as_array().unwrap()) {
        let expected: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let actual: Vec<f64> = got["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(actual.len(), expected.len());
        let dot: f64 = expected.iter().zip(&actual).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(&expected) * norm(&actual));
        let text: String = item["text"].as_str().unwrap().chars().take(40).collect();
        assert!(cosine >= 0.9999, "{text:?}: cosine {cosine}");
        worst = worst.min(cosine);
    }
    // One at a time (batch of one, no padding) must agree too.
    for item in items.iter().take(5) {
        let r = s.post("/v1/embeddings", &json!({"input": item["text"]}));
        let got: Vec<f64> = r.json::<Value>().unwrap()["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let dot: f64 = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&got)
            .map(|(a, b)| a.as_f64().unwrap() * b)
            .sum();
        assert!(dot >= 0.9999, "single {dot}");
    }
    worst
}
