//! Capacity, eviction, index health, the admin API and Prometheus metrics.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::Server;
use serde_json::{json, Value};

fn put(s: &Server, path: &str, body: &Value) -> reqwest::blocking::Response {
    common::client()
        .put(format!("{}{path}", s.url))
        .json(body)
        .send()
        .unwrap()
}

fn cache_stats(s: &Server, cache: &str) -> Value {
    s.get(&format!("/v1/caches/{cache}"))
        .json::<Value>()
        .unwrap()["stats"]
        .clone()
}

#[test]
fn a_capped_cache_never_holds_more_than_its_cap_and_stays_reachable() {
    let s = Server::start(&[]);
    let r = put(&s, "/v1/caches/capped", &json!({"maxEntries": 20}));
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert_eq!(r.json::<Value>().unwrap()["settings"]["maxEntries"], 20);

    let done = AtomicBool::new(false);
    let most = AtomicU64::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let n = cache_stats(&s, "capped")["entries"].as_u64().unwrap();
                most.fetch_max(n, Ordering::Relaxed);
            }
        });
        let writers: Vec<_> = (0..6)
            .map(|w| {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..12 {
                        s.set(
                            "capped",
                            &format!(
                                "Question {w}-{i}: how do I configure feature number {}?",
                                w * 100 + i
                            ),
                            "answer",
                            json!({}),
                        );
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(
        most.load(Ordering::Relaxed) <= 20,
        "saw {} entries",
        most.load(Ordering::Relaxed)
    );
    let stats = cache_stats(&s, "capped");
    assert_eq!(stats["entries"], 20);
    assert_eq!(stats["inserts"], 72);
    assert_eq!(stats["evictions"]["capacity"], 52);

    // Every entry still live is found by its own prompt, exactly and semantically.
    let mut live = 0;
    for w in 0..6 {
        for i in 0..12 {
            let prompt = format!(
                "Question {w}-{i}: how do I configure feature number {}?",
                w * 100 + i
            );
            let exact = s.search(
                "capped",
                json!({"prompt": prompt, "searchStrategies": ["exact"]}),
            );
            if exact.is_empty() {
                continue;
            }
            live += 1;
            let semantic = s.search("capped", json!({"prompt": prompt, "searchStrategies": ["semantic"], "similarityThreshold": 0.99}));
            assert_eq!(
                semantic[0]["id"], exact[0]["id"],
                "{prompt} unreachable after eviction"
            );
        }
    }
    assert_eq!(live, 20);

    // Lowering the cap evicts at once; a byte cap is honoured too.
    put(&s, "/v1/caches/capped", &json!({"maxEntries": 5}));
    assert_eq!(cache_stats(&s, "capped")["entries"], 5);
    put(&s, "/v1/caches/capped", &json!({"maxBytes": 3000}));
    let stats = cache_stats(&s, "capped");
    assert!(stats["bytes"].as_u64().unwrap() <= 3000, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() >= 1);

    // Invalid settings are 400s.
    assert_eq!(
        put(&s, "/v1/caches/capped", &json!({"maxEntries": 0})).status(),
        400
    );
    assert_eq!(
        put(&s, "/v1/caches/capped", &json!({"similarityThreshold": 3})).status(),
        400
    );
    assert_eq!(
        put(&s, "/v1/caches/capped", &json!({"bogus": 1})).status(),
        400
    );
}

#[test]
fn a_server_wide_ceiling_bounds_all_caches_together() {
    let s = Server::start(&["--max-entries", "10"]);
    for i in 0..8 {
        s.set("a", &format!("Alpha question {i}"), "x", json!({}));
        s.set("b", &format!("Beta question {i}"), "x", json!({}));
    }
    let total: u64 = ["a", "b"]
        .iter()
        .map(|c| cache_stats(&s, c)["entries"].as_u64().unwrap())
        .sum();
    assert!(total <= 10, "{total}");
    let global: Value = s.get("/admin/stats").json().unwrap();
    assert_eq!(global["entries"], total);
}

#[test]
fn admin_evict_by_age_and_attributes_dry_run_by_default() {
    let s = Server::start(&[]);
    for i in 0..4 {
        s.set(
            "c",
            &format!("Old question {i}"),
            "x",
            json!({"tenant": "a"}),
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    for i in 0..3 {
        s.set(
            "c",
            &format!("New question {i}"),
            "x",
            json!({"tenant": if i == 0 { "a" } else { "b" }}),
        );
    }
    let evict = |body: Value| -> Value {
        let r = s.post("/admin/caches/c/evict", &body);
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    };
    assert_eq!(
        evict(json!({"olderThanMillis": 300})),
        json!({"matched": 4, "evicted": 0})
    );
    assert_eq!(cache_stats(&s, "c")["entries"], 7);
    assert_eq!(
        evict(json!({"attributes": {"tenant": "a"}, "dryRun": true})),
        json!({"matched": 5, "evicted": 0})
    );
    assert_eq!(
        evict(json!({"olderThanMillis": 300, "dryRun": false})),
        json!({"matched": 4, "evicted": 4})
    );
    assert_eq!(
        evict(json!({"attributes": {"tenant": "a"}, "dryRun": false})),
        json!({"matched": 1, "evicted": 1})
    );
    let stats = cache_stats(&s, "c");
    assert_eq!(stats["entries"], 2);
    assert_eq!(stats["evictions"]["admin"], 5);
    assert!(s
        .search("c", json!({"prompt": "Old question 1"}))
        .is_empty());
    assert_eq!(s.search("c", json!({"prompt": "New question 2"})).len(), 1);
    assert_eq!(s.post("/admin/caches/c/evict", &json!({})).status(), 400);
    assert_eq!(
        s.post("/admin/caches/c/evict", &json!({"olderThanMillis": -1}))
            .status(),
        400
    );
}

#[test]
fn compaction_keeps_search_results_identical() {
    let s = Server::start(&[]);
    let topics = [
        "bake bread",
        "change a tire",
        "learn Rust",
        "plant tomatoes",
        "tie a tie",
        "brew coffee",
    ];
    let mut ids = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        for j in 0..5 {
            ids.push(s.set(
                "c",
                &format!("How do I {t}? (variant {j})"),
                &format!("{i}-{j}"),
                json!({}),
            ));
        }
    }
    for id in ids.iter().step_by(3) {
        assert_eq!(
            s.delete(&format!("/v1/caches/c/entries/{id}"), None)
                .status(),
            204
        );
    }
    let queries: Vec<String> = topics
        .iter()
        .map(|t| format!("What is the best way to {t}?"))
        .collect();
    let run = || -> Vec<Vec<(String, String)>> {
        queries
            .iter()
            .map(|q| {
                s.search(
                    "c",
                    json!({"prompt": q, "maxResults": 5, "similarityThreshold": 0.3}),
                )
                .iter()
                .map(|h| {
                    (
                        h["id"].as_str().unwrap().to_string(),
                        format!("{:.4}", h["similarity"].as_f64().unwrap()),
                    )
                })
                .collect()
            })
            .collect()
    };
    let before = run();
    assert!(cache_stats(&s, "c")["tombstones"].as_u64().unwrap() >= 10);
    let r = s.post("/admin/compact", &json!({}));
    assert_eq!(r.status(), 200);
    assert!(
        r.json::<Value>().unwrap()["tombstonesRemoved"]
            .as_u64()
            .unwrap()
            >= 10
    );
    let stats = cache_stats(&s, "c");
    assert_eq!(stats["tombstones"], 0);
    assert_eq!(stats["indexSize"], 20);
    assert_eq!(run(), before);
}

fn scrape(s: &Server) -> HashMap<String, f64> {
    let text = s.get("/metrics").text().unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_metrics.py");
    let out = Command::new(common::python_venv())
        .arg(script)
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "metrics do not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        })
        .collect()
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let s = Server::start(&[]);
    let before = scrape(&s);
    s.set("m", "What is the speed of light?", "c", json!({}));
    s.search("m", json!({"prompt": "What is the speed of light?"}));
    s.search(
        "m",
        json!({"prompt": "How fast does light travel?", "similarityThreshold": 0.5}),
    );
    s.search("m", json!({"prompt": "Who painted the Mona Lisa?"}));
    let after = scrape(&s);
    let get = |m: &HashMap<String, f64>, k: &str| *m.get(k).unwrap_or(&0.0);
    let exact = r#"semcache_lookups_total{cache="m",result="hit",strategy="exact"}"#;
    let semantic = r#"semcache_lookups_total{cache="m",result="hit",strategy="semantic"}"#;
    let miss = r#"semcache_lookups_total{cache="m",result="miss",strategy="none"}"#;
    assert_eq!(get(&after, exact) - get(&before, exact), 1.0);
    assert_eq!(get(&after, semantic) - get(&before, semantic), 1.0);
    assert_eq!(get(&after, miss) - get(&before, miss), 1.0);
    assert_eq!(get(&after, r#"semcache_entries{cache="m"}"#), 1.0);
    assert_eq!(get(&after, r#"semcache_inserts_total{cache="m"}"#), 1.0);
    assert!(
        get(&after, r#"semcache_embed_batch_size_count{}"#)
            > get(&before, r#"semcache_embed_batch_size_count{}"#)
    );
    assert!(
        get(
            &after,
            r#"semcache_lookup_duration_seconds_count{strategy="semantic"}"#
        ) >= 1.0
    );
    assert!(after
        .keys()
        .any(|k| k.starts_with("semcache_http_requests_total")));
    assert!(after
        .keys()
        .any(|k| k.starts_with("process_resident_memory_bytes")));
    for name in [
        "semcache_bytes",
        "semcache_index_tombstones",
        "semcache_embed_queue_depth",
        "semcache_evictions_total",
        "semcache_false_hit_reports_total",
    ] {
        let text = s.get("/metrics").text().unwrap();
        assert!(text.contains(&format!("# TYPE {name}")), "{name} missing");
    }
    let caches: Value = s.get("/admin/caches").json().unwrap();
    assert_eq!(caches["caches"][0]["cacheId"], "m");
    assert_eq!(caches["caches"][0]["stats"]["hitsExact"], 1);
    assert_eq!(caches["caches"][0]["stats"]["misses"], 1);
    assert!(
        caches["caches"][0]["stats"]["lookupLatency"]["p50Ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
