//! The HTTP API against the real binary and model: hits, scope, expiry, deletes, bad input.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

#[test]
fn exact_and_semantic_hits() {
    let s = Server::start(&[]);
    let id = s.set("faq", "What is the capital of France?", "Paris", json!({}));

    // Exact: case and whitespace folded, no model needed, similarity 1.
    let r = s.post(
        "/v1/caches/faq/entries/search",
        &json!({"prompt": "  what is the CAPITAL of france? "}),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-semcache"], "hit");
    assert_eq!(r.headers()["x-semcache-entry-id"], id.as_str());
    let body: Value = r.json().unwrap();
    assert_eq!(body["data"][0]["searchStrategy"], "exact");
    assert_eq!(body["data"][0]["similarity"], 1.0);
    assert_eq!(body["data"][0]["response"], "Paris");

    // Semantic: a paraphrase.
    let hits = s.search(
        "faq",
        json!({"prompt": "Tell me the capital city of France.", "similarityThreshold": 0.85}),
    );
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["id"], id.as_str());
    assert_eq!(hits[0]["searchStrategy"], "semantic");
    let sim = hits[0]["similarity"].as_f64().unwrap();
    assert!(sim > 0.85 && sim < 1.0, "{sim}");

    // The paraphrase misses when only exact matching is allowed.
    let hits = s.search(
        "faq",
        json!({"prompt": "Tell me the capital city of France.", "searchStrategies": ["exact"]}),
    );
    assert!(hits.is_empty());

    // Unrelated prompts miss, with the miss header.
    let r = s.post(
        "/v1/caches/faq/entries/search",
        &json!({"prompt": "How do I reverse a linked list in Rust?"}),
    );
    assert_eq!(r.headers()["x-semcache"], "miss");
    assert!(r.headers().get("x-semcache-entry-id").is_none());
    assert_eq!(r.json::<Value>().unwrap()["data"], json!([]));

    // The threshold is honoured: the same paraphrase misses at 0.99.
    let hits = s.search(
        "faq",
        json!({"prompt": "Tell me the capital city of France.", "similarityThreshold": 0.99}),
    );
    assert!(hits.is_empty());

    // Another cache never sees this one's entries.
    assert!(s
        .search("other", json!({"prompt": "What is the capital of France?"}))
        .is_empty());
}

#[test]
fn max_results_returns_the_best_first_and_explain_says_why() {
    let s = Server::start(&[]);
    s.set("c", "How do I bake sourdough bread?", "a", json!({}));
    s.set(
        "c",
        "How can I make sourdough bread at home?",
        "b",
        json!({}),
    );
    s.set("c", "Steps for baking a loaf of sourdough", "c", json!({}));
    s.set(
        "c",
        "How do I bake sourdough bread in 2 hours?",
        "d",
        json!({}),
    );
    let r = s.post(
        "/v1/caches/c/entries/search?explain=true",
        &json!({"prompt": "How do I bake sourdough bread?", "maxResults": 4, "similarityThreshold": 0.3}),
    );
    let body: Value = r.json().unwrap();
    let hits = body["data"].as_array().unwrap();
    assert_eq!(hits.len(), 3, "{body:#}");
    assert_eq!(hits[0]["response"], "a");
    assert_eq!(hits[0]["searchStrategy"], "exact");
    let sims: Vec<f64> = hits
        .iter()
        .map(|h| h["similarity"].as_f64().unwrap())
        .collect();
    assert!(sims.windows(2).all(|w| w[0] >= w[1]), "{sims:?}");
    // A time limit the query does not have is a different question: explain says so.
    let rejected: Vec<&Value> = body["explain"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["served"] == false)
        .collect();
    assert_eq!(rejected.len(), 1, "{body:#}");
    assert_eq!(
        rejected[0]["prompt"],
        "How do I bake sourdough bread in 2 hours?"
    );
    assert_eq!(rejected[0]["rejected"]["rule"], "numbersDiffer");
    // Without explain there is no explain field.
    let plain: Value = s
        .post(
            "/v1/caches/c/entries/search",
            &json!({"prompt": "How do I bake sourdough bread?"}),
        )
        .json()
        .unwrap();
    assert!(plain.get("explain").is_none());
}

#[test]
fn attributes_scope_every_lookup() {
    let s = Server::start(&[]);
    let a = s.set(
        "c",
        "Summarize the plot of Hamlet",
        "for tenant a",
        json!({"tenant": "a", "model": "m1"}),
    );
    let b = s.set(
        "c",
        "Summarize the plot of Hamlet",
        "for tenant b",
        json!({"tenant": "b", "model": "m1"}),
    );
    for strategy in ["exact", "semantic"] {
        let hits = s.search(
            "c",
            json!({"prompt": "Summarize the plot of Hamlet", "attributes": {"tenant": "a"}, "searchStrategies": [strategy]}),
        );
        assert_eq!(hits.len(), 1, "{strategy}");
        assert_eq!(hits[0]["id"], a.as_str());
        assert_eq!(hits[0]["attributes"], json!({"tenant": "a", "model": "m1"}));
        let hits = s.search(
            "c",
            json!({"prompt": "Give me a summary of Hamlet's plot", "attributes": {"tenant": "b"}, "searchStrategies": [strategy], "similarityThreshold": 0.5}),
        );
        if strategy == "semantic" {
            assert_eq!(hits.len(), 1);
            assert_eq!(hits[0]["id"], b.as_str());
        }
        // A key no entry carries, or a different value, sees nothing.
        let hits = s.search(
            "c",
            json!({"prompt": "Summarize the plot of Hamlet", "attributes": {"tenant": "a", "model": "m2"}, "searchStrategies": [strategy]}),
        );
        assert!(hits.is_empty(), "{strategy}");
        let hits = s.search(
            "c",
            json!({"prompt": "Summarize the plot of Hamlet", "attributes": {"tenant": "c"}, "searchStrategies": [strategy]}),
        );
        assert!(hits.is_empty(), "{strategy}");
    }
    // No attributes: both are in scope.
    let hits = s.search(
        "c",
        json!({"prompt": "Summarize the plot of Hamlet", "maxResults": 5}),
    );
    assert_eq!(hits.len(), 2);
}

#[test]
fn entries_expire_after_their_ttl() {
    let s = Server::start(&["--sweep-interval-millis", "200"]);
    let r = s.post(
        "/v1/caches/c/entries",
        &json!({"prompt": "What time is it in Tokyo?", "response": "noon", "ttlMillis": 800}),
    );
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().unwrap()["entryId"]
        .as_str()
        .unwrap()
        .to_string();
    let keep = s.set("c", "What time is it in Paris?", "morning", json!({}));
    assert_eq!(
        s.search("c", json!({"prompt": "What time is it in Tokyo?"}))
            .len(),
        1
    );
    std::thread::sleep(Duration::from_millis(1500));
    for strategy in ["exact", "semantic"] {
        let hits = s.search(
            "c",
            json!({"prompt": "What time is it in Tokyo?", "searchStrategies": [strategy], "similarityThreshold": 0.95}),
        );
        assert!(hits.is_empty(), "{strategy}: {hits:?}");
    }
    // The sweeper removed it from disk; the unexpired entry stays.
    assert_eq!(
        s.delete(&format!("/v1/caches/c/entries/{id}"), None)
            .status(),
        404
    );
    assert_eq!(
        s.search("c", json!({"prompt": "What time is it in Paris?"}))[0]["id"],
        keep.as_str()
    );
}

#[test]
fn delete_by_id_and_by_attributes_and_flush() {
    let s = Server::start(&[]);
    let a = s.set(
        "c",
        "How do I reset my password?",
        "a",
        json!({"user": "1"}),
    );
    let b = s.set(
        "c",
        "How do I change my email address?",
        "b",
        json!({"user": "1", "app": "web"}),
    );
    let c = s.set(
        "c",
        "How do I delete my account?",
        "c",
        json!({"user": "2"}),
    );

    let r = s.delete(&format!("/v1/caches/c/entries/{a}"), None);
    assert_eq!(r.status(), 204);
    assert!(s
        .search(
            "c",
            json!({"prompt": "How do I reset my password?", "similarityThreshold": 0.95})
        )
        .is_empty());
    let r = s.delete(&format!("/v1/caches/c/entries/{a}"), None);
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        s.delete("/v1/caches/c/entries/not-an-id", None).status(),
        404
    );

    let r = s.delete(
        "/v1/caches/c/entries",
        Some(&json!({"attributes": {"user": "1"}})),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["deletedEntriesCount"], 1);
    assert!(s
        .search("c", json!({"prompt": "How do I change my email address?"}))
        .is_empty());
    assert_eq!(
        s.search("c", json!({"prompt": "How do I delete my account?"}))[0]["id"],
        c.as_str()
    );
    let _ = b;

    let r = s.delete("/v1/caches/c/entries", Some(&json!({"attributes": {}})));
    assert_eq!(r.status(), 400);

    let r = s.post("/v1/caches/c/flush", &json!({}));
    assert_eq!(r.status(), 204);
    assert!(s
        .search("c", json!({"prompt": "How do I delete my account?"}))
        .is_empty());
    // The cache keeps working after a flush.
    let d = s.set("c", "How do I delete my account?", "d", json!({}));
    assert_eq!(
        s.search("c", json!({"prompt": "How do I delete my account?"}))[0]["id"],
        d.as_str()
    );
    let hits = s.search(
        "c",
        json!({"prompt": "How can I remove my account?", "similarityThreshold": 0.7}),
    );
    assert_eq!(hits[0]["id"], d.as_str());
}

fn assert_problem(r: reqwest::blocking::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().unwrap();
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string());
    if let Some(field) = field {
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .expect("field errors")
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    }
    body
}

#[test]
fn bad_input_gets_a_clear_4xx() {
    let s = Server::start(&[]);
    let search = "/v1/caches/c/entries/search";
    let insert = "/v1/caches/c/entries";

    assert_problem(s.post_raw(search, "{\"prompt\": "), 400, None);
    assert_problem(s.post_raw(search, "not json"), 400, None);
    assert_problem(s.post_raw(search, ""), 400, None);
    assert_problem(s.post(search, &json!({})), 400, Some("prompt"));
    assert_problem(
        s.post(insert, &json!({"prompt": "x"})),
        400,
        Some("response"),
    );
    assert_problem(s.post(search, &json!({"prompt": 42})), 400, Some("prompt"));
    assert_problem(
        s.post(search, &json!({"prompt": "x", "attributes": {"k": 1}})),
        400,
        Some("attributes.k"),
    );
    assert_problem(
        s.post(search, &json!({"prompt": "x", "attributes": ["k"]})),
        400,
        Some("attributes"),
    );
    assert_problem(
        s.post(
            insert,
            &json!({"prompt": "x", "response": "y", "ttlMillis": -5}),
        ),
        400,
        Some("ttlMillis"),
    );
    assert_problem(
        s.post(
            insert,
            &json!({"prompt": "x", "response": "y", "ttlMillis": "soon"}),
        ),
        400,
        Some("ttlMillis"),
    );
    assert_problem(
        s.post("/v1/caches/bad$id/entries/search", &json!({"prompt": "x"})),
        400,
        Some("cacheId"),
    );
    assert_problem(
        s.post(
            "/v1/caches/caf%C3%A9/entries",
            &json!({"prompt": "x", "response": "y"}),
        ),
        400,
        Some("cacheId"),
    );
    let long_id = "x".repeat(129);
    assert_problem(
        s.post(
            &format!("/v1/caches/{long_id}/entries/search"),
            &json!({"prompt": "x"}),
        ),
        400,
        Some("cacheId"),
    );
    for t in [-0.1, 1.5] {
        assert_problem(
            s.post(search, &json!({"prompt": "x", "similarityThreshold": t})),
            400,
            Some("similarityThreshold"),
        );
    }
    assert_problem(
        s.post(search, &json!({"prompt": "x", "maxResults": 0})),
        400,
        Some("maxResults"),
    );
    assert_problem(
        s.post(
            search,
            &json!({"prompt": "x", "searchStrategies": ["fuzzy"]}),
        ),
        400,
        Some("searchStrategies[0]"),
    );
    assert_problem(s.post(search, &json!({"prompt": ""})), 400, Some("prompt"));
    assert_problem(
        s.post(insert, &json!({"prompt": "   ", "response": "y"})),
        400,
        Some("prompt"),
    );
    let huge_prompt = "a".repeat(100_000);
    assert_problem(
        s.post(search, &json!({"prompt": huge_prompt})),
        400,
        Some("prompt"),
    );
    assert_problem(
        s.post(insert, &json!({"prompt": huge_prompt, "response": "y"})),
        400,
        Some("prompt"),
    );
    let oversized = json!({"prompt": "x", "response": "r".repeat(2 * 1024 * 1024)});
    assert_problem(s.post(insert, &oversized), 413, None);
    let many: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    assert_problem(
        s.post(
            insert,
            &json!({"prompt": "x", "response": "y", "attributes": many}),
        ),
        400,
        Some("attributes"),
    );

    // Unknown routes and methods are problems too.
    assert_problem(s.get("/v1/nothing"), 404, None);
    assert_problem(s.get(search), 405, None);
    assert_problem(
        s.post("/v1/embeddings", &json!({"input": 5})),
        400,
        Some("input"),
    );
    assert_problem(
        s.post("/v1/embeddings", &json!({"input": "x", "model": "gpt-4"})),
        400,
        Some("model"),
    );

    // Nothing above was stored, and the server is fine.
    s.assert_healthy();
    assert!(s
        .search("c", json!({"prompt": "x", "searchStrategies": ["exact"]}))
        .is_empty());
    s.set("c", "still works", "yes", json!({}));
}

#[test]
fn embeddings_are_openai_shaped() {
    let s = Server::start(&[]);
    let r = s.post(
        "/v1/embeddings",
        &json!({"input": ["hello", "world"], "model": "sentence-transformers/all-MiniLM-L6-v2"}),
    );
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["index"], 1);
    let v = body["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(v.len(), 384);
    let norm: f64 = v
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert_eq!(body["usage"]["prompt_tokens"], 6);

    let r = s.post(
        "/v1/embeddings",
        &json!({"input": "hello", "encoding_format": "base64"}),
    );
    let body: Value = r.json().unwrap();
    assert!(body["data"][0]["embedding"].as_str().unwrap().len() > 2000);
}

#[test]
fn openapi_document_lists_the_routes() {
    let s = Server::start(&[]);
    let doc: Value = s.get("/openapi.json").json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/caches/{cacheId}/entries/search",
        "/v1/caches/{cacheId}/entries",
        "/v1/caches/{cacheId}/entries/{entryId}",
        "/v1/caches/{cacheId}/flush",
        "/v1/embeddings",
        "/healthz",
        "/readyz",
        "/v1/caches/{cacheId}/chat/search",
        "/v1/caches/{cacheId}/chat/entries",
        "/v1/caches/{cacheId}",
        "/v1/caches/{cacheId}/entries/{entryId}/feedback",
        "/admin/stats",
        "/admin/caches",
        "/admin/caches/{cacheId}/evict",
        "/admin/compact",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}
