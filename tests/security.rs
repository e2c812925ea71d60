//! API keys, tenant isolation, load shedding, and crash safety under SIGKILL.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Server;
use rand::Rng;
use serde_json::{json, Value};

const ADMIN: &str = "admin-key-000000000000";
const WRITER_A: &str = "writer-a-key-0000000000";
const READER_A: &str = "reader-a-key-0000000000";
const READER_ALL: &str = "reader-all-key-00000000";

fn keys_file(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("keys.json");
    // The reader key is stored hashed, as the README recommends.
    let hashed = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(READER_A.as_bytes()))
    };
    std::fs::write(
        &path,
        format!(
            r#"[{{"key": "{ADMIN}", "role": "admin"}},
                {{"key": "{WRITER_A}", "role": "writer", "caches": ["a"]}},
                {{"keySha256": "{hashed}", "role": "reader", "caches": ["a"]}},
                {{"key": "{READER_ALL}", "role": "reader"}}{extra}]"#
        ),
    )
    .unwrap();
    path
}

fn call(
    s: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::blocking::Response {
    let client = common::client();
    let url = format!("{}{path}", s.url);
    let mut req = match method {
        "GET" => client.get(url),
        "PUT" => client.put(url),
        "DELETE" => client.delete(url),
        _ => client.post(url),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().unwrap()
}

#[test]
fn keys_roles_and_cache_scopes() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path(), "");
    let s = Server::start(&["--api-keys", keys.to_str().unwrap()]);
    let set = json!({"prompt": "What is the tallest mountain?", "response": "Everest"});
    let search = json!({"prompt": "What is the tallest mountain?"});

    // No key, or an unknown one: 401 problem with a challenge.
    let r = call(
        &s,
        "POST",
        "/v1/caches/a/entries/search",
        None,
        Some(search.clone()),
    );
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/a/entries/search",
            Some("wrong-key-000000000000"),
            Some(search.clone())
        )
        .status(),
        401
    );
    // Health, readiness, metrics and the API document need no key.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(call(&s, "GET", path, None, None).status(), 200, "{path}");
    }

    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/a/entries",
            Some(WRITER_A),
            Some(set.clone())
        )
        .status(),
        201
    );
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/b/entries",
            Some(WRITER_A),
            Some(set.clone())
        )
        .status(),
        403
    );
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/b/entries",
            Some(ADMIN),
            Some(set.clone())
        )
        .status(),
        201
    );
    // Readers search but do not write.
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/a/entries/search",
            Some(READER_A),
            Some(search.clone())
        )
        .status(),
        200
    );
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/a/entries",
            Some(READER_A),
            Some(set.clone())
        )
        .status(),
        403
    );
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/embeddings",
            Some(READER_A),
            Some(json!({"input": "hi"}))
        )
        .status(),
        200
    );
    // Writers do not administer.
    assert_eq!(
        call(
            &s,
            "PUT",
            "/v1/caches/a",
            Some(WRITER_A),
            Some(json!({"maxEntries": 5}))
        )
        .status(),
        403
    );
    assert_eq!(
        call(&s, "GET", "/admin/stats", Some(WRITER_A), None).status(),
        403
    );
    assert_eq!(
        call(&s, "GET", "/admin/stats", Some(READER_ALL), None).status(),
        403
    );
    assert_eq!(
        call(&s, "GET", "/admin/stats", Some(ADMIN), None).status(),
        200
    );
    assert_eq!(
        call(
            &s,
            "PUT",
            "/v1/caches/a",
            Some(ADMIN),
            Some(json!({"maxEntries": 5}))
        )
        .status(),
        200
    );

    // SIGHUP reloads the file: a new key works at once, a removed one stops working.
    std::fs::write(&keys, format!(r#"[{{"key": "{ADMIN}", "role": "admin"}}, {{"key": "new-reader-key-000000", "role": "reader"}}]"#)).unwrap();
    s.signal("HUP");
    let start = Instant::now();
    while call(
        &s,
        "GET",
        "/v1/caches/a",
        Some("new-reader-key-000000"),
        None,
    )
    .status()
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reload did not happen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/a/entries/search",
            Some(READER_ALL),
            Some(search)
        )
        .status(),
        401
    );
    s.assert_healthy();
}

#[test]
fn a_key_scoped_to_one_cache_never_reaches_another() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(
        tmp.path(),
        r#", {"key": "admin-a-key-0000000000", "role": "admin", "caches": ["a"]}"#,
    );
    let s = Server::start(&["--api-keys", keys.to_str().unwrap()]);
    let secret = "Tenant B's secret question about payroll";
    let chat =
        json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": secret}]});
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/b/entries",
            Some(ADMIN),
            Some(json!({"prompt": secret, "response": "b-only", "attributes": {"t": "b"}}))
        )
        .status(),
        201
    );
    let completion = json!({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "b-only"}}]});
    assert_eq!(
        call(
            &s,
            "POST",
            "/v1/caches/b/chat/entries",
            Some(ADMIN),
            Some(json!({"request": chat, "response": completion}))
        )
        .status(),
        201
    );

    for key in [WRITER_A, READER_A, "admin-a-key-0000000000"] {
        let tries: Vec<(&str, &str, Option<Value>)> = vec![
            (
                "POST",
                "/v1/caches/b/entries/search",
                Some(json!({"prompt": secret})),
            ),
            ("POST", "/v1/caches/b/chat/search", Some(chat.clone())),
            (
                "DELETE",
                "/v1/caches/b/entries",
                Some(json!({"attributes": {"t": "b"}})),
            ),
            ("POST", "/v1/caches/b/flush", None),
            ("GET", "/v1/caches/b", None),
            (
                "POST",
                "/admin/caches/b/evict",
                Some(json!({"olderThanMillis": 0, "dryRun": false})),
            ),
            ("GET", "/admin/caches", None),
            ("GET", "/admin/stats", None),
            ("POST", "/admin/compact", None),
        ];
        for (method, path, body) in tries {
            let r = call(&s, method, path, Some(key), body);
            assert_eq!(r.status(), 403, "{key} {method} {path}");
            assert!(!r.text().unwrap().contains("b-only"));
        }
        // Its own cache never shows the other's entry either.
        let r = call(
            &s,
            "POST",
            "/v1/caches/a/entries/search",
            Some(key),
            Some(json!({"prompt": secret, "similarityThreshold": 0.0})),
        );
        assert_eq!(r.json::<Value>().unwrap()["data"], json!([]));
    }
    // The scoped admin administers its own cache.
    assert_eq!(
        call(
            &s,
            "POST",
            "/admin/caches/a/evict",
            Some("admin-a-key-0000000000"),
            Some(json!({"olderThanMillis": 0}))
        )
        .status(),
        200
    );
    // Nothing of b was touched.
    let r = call(
        &s,
        "POST",
        "/v1/caches/b/entries/search",
        Some(ADMIN),
        Some(json!({"prompt": secret})),
    );
    assert_eq!(r.json::<Value>().unwrap()["data"][0]["response"], "b-only");
}

#[test]
fn no_keys_means_loopback_only_unless_insecure() {
    common::ensure_model();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--addr", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-keys"));
    let s = Server::start_in(&tmp.path().join("d2"), &["--insecure-no-auth"]);
    s.assert_healthy();
}

#[test]
fn a_full_embedding_queue_sheds_load_and_health_stays_up() {
    let s = Server::start(&["--embed-queue", "2"]);
    s.set("c", "warm up", "x", json!({}));
    let shed = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..12 {
            let (s, shed) = (&s, &shed);
            scope.spawn(move || {
                for i in 0..6 {
                    let r = s.post("/v1/caches/c/entries/search", &json!({"prompt": format!("A long question number {t}-{i} about the history of the Roman empire and its many provinces"), "searchStrategies": ["semantic"]}));
                    let status = r.status().as_u16();
                    if status == 503 {
                        assert_eq!(r.headers()["retry-after"], "1");
                        assert_eq!(r.headers()["content-type"], "application/problem+json");
                    } else {
                        assert_eq!(status, 200);
                    }
                    shed.lock().unwrap().push(status);
                }
            });
        }
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                assert_eq!(s.get("/healthz").status(), 200);
                assert!(started.elapsed() < Duration::from_secs(1), "health stalled");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        while shed.lock().unwrap().len() < 72 {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let statuses = shed.into_inner().unwrap();
    assert!(statuses.contains(&503), "nothing was shed");
    assert!(statuses.contains(&200));
}

#[test]
fn slow_requests_time_out_with_a_problem() {
    let s = Server::start(&["--request-timeout-millis", "1"]);
    let r = s.post(
        "/v1/embeddings",
        &json!({"input": vec!["a fairly long sentence to embed, repeated many times"; 64]}),
    );
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

/// Every acknowledged (prompt, id) is served by an exact lookup.
fn assert_all_served(s: &Server, acknowledged: &[(String, String)], when: &str) {
    for (prompt, id) in acknowledged {
        let hits = s.search(
            "crash",
            json!({"prompt": prompt, "searchStrategies": ["exact"]}),
        );
        assert_eq!(
            hits.first().map(|h| h["id"].clone()),
            Some(json!(id)),
            "{when}: lost {prompt}"
        );
    }
}

#[test]
fn acknowledged_writes_survive_twenty_sigkills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut rng = rand::thread_rng();
    for round in 0..20 {
        let s = Server::start_in(&dir, &[]);
        // Everything acknowledged so far is there.
        assert_all_served(&s, &acknowledged, &format!("round {round}"));
        let acked = Mutex::new(Vec::new());
        let kill_after = Duration::from_millis(rng.gen_range(30..400));
        std::thread::scope(|scope| {
            for w in 0..4 {
                let (s, acked) = (&s, &acked);
                scope.spawn(move || {
                    for i in 0..1000 {
                        let prompt = format!("round {round} writer {w} entry {i}");
                        let r = common::client()
                            .post(format!("{}/v1/caches/crash/entries", s.url))
                            .json(&json!({"prompt": prompt, "response": "r"}))
                            .send();
                        match r {
                            Ok(r) if r.status() == 201 => {
                                let id = r.json::<Value>().unwrap()["entryId"]
                                    .as_str()
                                    .unwrap()
                                    .to_string();
                                acked.lock().unwrap().push((prompt, id));
                            }
                            _ => return, // killed
                        }
                    }
                });
            }
            std::thread::sleep(kill_after);
            s.signal("KILL");
        });
        acknowledged.extend(acked.into_inner().unwrap());
    }
    let s = Server::start_in(&dir, &[]);
    assert_all_served(&s, &acknowledged, "after the last round");
    eprintln!(
        "20 SIGKILL rounds: {} acknowledged inserts, all served after restart",
        acknowledged.len()
    );
    assert!(acknowledged.len() >= 20);
}

/// Unmounts the small filesystem when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_answers_507_and_inserts_resume_when_space_returns() {
    // Needs a small filesystem of its own; CI runs as root and can mount one.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = tmp.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&fs)
        .status()
        .unwrap();
    assert!(mounted.success(), "cannot mount a tmpfs");
    let _mount = Mount(fs.clone());
    let ballast = fs.join("ballast");
    std::fs::write(&ballast, vec![0u8; 16 * 1024 * 1024]).unwrap();
    {
        let s = Server::start_in(&fs.join("data"), &["--min-free-disk-bytes", "8388608"]);
        let response = "x".repeat(300_000);
        let mut stored = 0;
        let full = loop {
            let r = s.post(
                "/v1/caches/c/entries",
                &json!({"prompt": format!("entry {stored}"), "response": response}),
            );
            if r.status() != 201 {
                break r;
            }
            stored += 1;
            assert!(stored < 200, "the disk never filled");
        };
        assert_eq!(full.status(), 507);
        assert_eq!(full.headers()["content-type"], "application/problem+json");
        s.assert_healthy();
        assert_eq!(
            s.search("c", json!({"prompt": "entry 0"})).len(),
            1,
            "stored entries still answer"
        );
        // Space returns: inserts work again, without a restart.
        std::fs::remove_file(&ballast).unwrap();
        let r = s.post(
            "/v1/caches/c/entries",
            &json!({"prompt": "after the disk was freed", "response": "ok"}),
        );
        assert_eq!(r.status(), 201, "{}", r.text().unwrap());
        assert_eq!(
            s.search("c", json!({"prompt": "after the disk was freed"}))
                .len(),
            1
        );
        eprintln!("disk full after {stored} inserts: 507, then 201 once space returned");
    }
}
