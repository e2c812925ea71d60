//! `maxErrorRate` through the REST flow, on the real binary and model: a lookup the cache
//! is unsure of is a miss that names the entry it explores; the insert that follows
//! labels that entry; labels teach the cache to serve; an entry that keeps being wrong
//! stops being served; labels survive a restart; bad settings are 400s.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

const ANSWER: &str = "Open Settings, then Security, then choose Reset password.";

fn search(s: &Server, cache: &str, prompt: &str) -> (Option<String>, Option<String>, Value) {
    let r = s.post(
        &format!("/v1/caches/{cache}/entries/search?explain=true"),
        &json!({ "prompt": prompt }),
    );
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (state, explore) = (header("x-semcache"), header("x-semcache-explore"));
    (state, explore, r.json().unwrap())
}

fn metric(s: &Server, needle: &str) -> f64 {
    let text = s.get("/metrics").text().unwrap();
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn wait_metric(s: &Server, needle: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(s, needle) < at_least {
        assert!(
            Instant::now() < deadline,
            "{needle} never reached {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn feedback(s: &Server, cache: &str, id: &str, correct: bool, prompt: &str) {
    let r = s.post(
        &format!("/v1/caches/{cache}/entries/{id}/feedback"),
        &json!({"correct": correct, "prompt": prompt}),
    );
    assert_eq!(r.status(), 204, "{}", r.text().unwrap());
}

#[test]
fn explorations_labels_and_what_the_cache_learns_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cache = "bounded";
    let query = "How would I go about resetting my password?";
    let (served_by, observations, labels);
    {
        let s = Server::start_in(&dir, &[]);
        // Bad settings are clear 400s naming the field.
        for bad in [json!(0), json!(0.7), json!(-0.1), json!("x")] {
            let r = s.put(
                &format!("/v1/caches/{cache}"),
                &json!({ "maxErrorRate": bad }),
            );
            assert_eq!(r.status(), 400, "{bad}");
            assert!(r.text().unwrap().contains("maxErrorRate"));
        }
        let r = s.put(
            &format!("/v1/caches/{cache}"),
            &json!({"maxErrorRate": 0.1}),
        );
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().unwrap()["settings"]["maxErrorRate"], 0.1);

        let a = s.set(cache, "How do I reset my password?", ANSWER, json!({}));
        // A fresh cache has learned nothing: even a near-identical prompt is not served,
        // and the miss names the entry it explores, with the estimate explained.
        let p = "How can I reset my password?";
        let (state, explore, body) = search(&s, cache, p);
        assert_eq!(state.as_deref(), Some("miss"));
        assert_eq!(explore.as_deref(), Some(a.as_str()));
        let seen = &body["explain"][0];
        assert_eq!(seen["rejected"]["rule"], "notConfident", "{body}");
        assert_eq!(seen["estimate"]["decision"], "miss");
        assert_eq!(seen["estimate"]["cacheObservations"], 0);
        let (p_est, lower) = (
            seen["estimate"]["probability"].as_f64().unwrap(),
            seen["estimate"]["lowerBound"].as_f64().unwrap(),
        );
        assert!(lower < p_est && lower < 0.9, "{seen}");
        // The gateway's insert for that prompt, with the same answer: labelled correct.
        s.set(cache, p, ANSWER, json!({}));
        wait_metric(
            &s,
            r#"semcache_exploration_labels_total{cache="bounded",label="same"}"#,
            1.0,
        );
        // Another explored prompt answered differently: labelled wrong.
        let (_, explore, _) = search(&s, cache, "How do I recover my password?");
        assert!(explore.is_some());
        s.set(
            cache,
            "How do I recover my password?",
            "Use the 'Forgot password' link on the sign-in page.",
            json!({}),
        );
        wait_metric(
            &s,
            r#"semcache_exploration_labels_total{cache="bounded",label="different"}"#,
            1.0,
        );

        // Labels teach the cache: after enough confirmed paraphrases (none within 0.95 of
        // the query, so it is the learned bound that serves it, not a confirmation).
        let teach = [
            "How do I reset my account password?",
            "What is the way to reset my password?",
            "Can you tell me how to reset my password?",
            "How to reset password?",
            "I forgot my password, how do I reset it?",
            "Steps to reset my password?",
            "Where do I reset my password?",
            "How do I reset my login password?",
            "Password reset: how do I do it?",
        ];
        let (state, _, _) = search(&s, cache, query);
        assert_eq!(state.as_deref(), Some("miss"));
        let mut taught = 0;
        let served = loop {
            for prompt in teach {
                feedback(&s, cache, &a, true, prompt);
            }
            taught += teach.len();
            let (state, _, body) = search(&s, cache, query);
            if state.as_deref() == Some("hit") {
                break body;
            }
            assert!(taught < 200, "not served after {taught} labels: {body}");
        };
        let seen = &served["explain"][0];
        assert_eq!(seen["estimate"]["decision"], "serve", "{served}");
        assert!(seen["estimate"]["lowerBound"].as_f64().unwrap() >= 0.9);
        served_by = served["data"][0]["id"].as_str().unwrap().to_string();

        // An entry that keeps being wrong stops being served: reports for prompts near
        // it but not near the query (so the report rule does not decide it).
        let wrong = [
            "How can I change my password?",
            "How do I recover my password?",
            "Reset my password please",
        ];
        let mut reports = 0;
        let refused = loop {
            feedback(&s, cache, &served_by, false, wrong[reports % wrong.len()]);
            reports += 1;
            let (state, _, body) = search(&s, cache, query);
            if state.as_deref() == Some("miss") {
                break body;
            }
            assert!(reports < 30, "still served after {reports} reports: {body}");
        };
        let seen = &refused["explain"][0];
        assert_eq!(seen["id"], served_by.as_str());
        assert_eq!(seen["rejected"]["rule"], "notConfident", "{refused}");
        observations = seen["estimate"]["entryObservations"].as_u64().unwrap();
        // Two exploration labels, the confirmations and the reports.
        labels = (2 + taught + reports) as u64;
        assert!(observations >= reports as u64);
        assert!(
            metric(
                &s,
                r#"semcache_bounded_decisions_total{cache="bounded",decision="serve"}"#
            ) >= 1.0
        );
        s.assert_healthy();
    }
    // Labels are durable: after a restart the entry is still refused, on the same count.
    let s = Server::start_in(&dir, &[]);
    let (state, _, body) = search(&s, cache, query);
    assert_eq!(state.as_deref(), Some("miss"), "{body}");
    let seen = &body["explain"][0];
    assert_eq!(seen["id"], served_by.as_str());
    assert_eq!(seen["estimate"]["entryObservations"], observations);
    assert_eq!(seen["estimate"]["cacheObservations"], labels, "{body}");
    // Switching the bound off serves by the threshold again.
    let r = s.put(&format!("/v1/caches/{cache}"), &json!({}));
    assert_eq!(r.status(), 200);
    let (state, _, _) = search(&s, cache, "How can I reset my password?");
    assert_eq!(state.as_deref(), Some("hit"));
}
