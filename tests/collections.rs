//! Vector-search collections through Qdrant's REST API: the official `qdrant-client`
//! Python SDK, unchanged, against the real binary and model (tests/qdrant/
//! check_collections.py), plus persistence across `kill -9` and restarts, and key scopes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

const ADMIN: &str = "admin-key-0123456789";
const READER: &str = "reader-key-0123456789";
const WRITER: &str = "writer-key-0123456789";
const SCOPED: &str = "scoped-key-0123456789";

fn keys_file(dir: &Path) -> PathBuf {
    let path = dir.join("keys.json");
    let keys = json!([
        {"key": ADMIN, "role": "admin"},
        {"key": READER, "role": "reader"},
        {"key": WRITER, "role": "writer"},
        {"key": SCOPED, "role": "writer", "collections": ["mine"]},
    ]);
    std::fs::write(&path, keys.to_string()).unwrap();
    path
}

/// Runs the SDK script against `server`; `phase` is all, write or verify.
fn sdk(server: &Server, phase: &str) -> String {
    let python = common::python_venv();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/qdrant/check_collections.py"
    );
    let out = Command::new(python)
        .arg(script)
        .args([server.url.as_str(), ADMIN, READER, WRITER, "--phase", phase])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "qdrant-client checks ({phase}) failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn official_qdrant_client_works_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let server = Server::start(&["--api-keys", keys.to_str().unwrap()]);
    let out = sdk(&server, "all");
    print!("{out}");
    server.assert_healthy();
}

#[test]
fn collections_survive_kill_and_restart_and_load_saved_graphs() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let dir = tmp.path().join("data");
    let args = ["--api-keys", keys.to_str().unwrap()];
    let mut server = Server::start_in(&dir, &args);
    sdk(&server, "write");
    // Acknowledged (wait=true) upserts survive a crash: re-inserted from the store.
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10));
    drop(server);
    let mut server = Server::start_in(&dir, &args);
    sdk(&server, "verify");
    // A clean stop saves the graph; the next start loads it instead of re-inserting.
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(60)), Some(0));
    drop(server);
    let saved = dir.join("indexes/collections").join(hex(b"persist"));
    assert!(saved.is_dir(), "no saved graph at {}", saved.display());
    let server = Server::start_in(&dir, &args);
    sdk(&server, "verify");
    server.assert_healthy();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn call(s: &Server, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", s.url);
    let client = common::client();
    let mut req = match method {
        "GET" => client.get(url),
        "PUT" => client.put(url),
        "DELETE" => client.delete(url),
        _ => client.post(url),
    };
    req = req.header("api-key", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn key_scopes_reach_collections_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let s = Server::start(&["--api-keys", keys.to_str().unwrap()]);
    let create = json!({"vectors": {"size": 3, "distance": "Cosine"}});
    for name in ["mine", "other"] {
        assert_eq!(
            call(
                &s,
                "PUT",
                &format!("/collections/{name}"),
                ADMIN,
                Some(create.clone())
            )
            .0,
            200
        );
    }
    let points = json!({"points": [{"id": 1, "vector": [1.0, 0.0, 0.0], "payload": {"a": 1}}]});
    // A writer scoped to `mine` writes and reads there only, and creates nothing.
    assert_eq!(
        call(
            &s,
            "PUT",
            "/collections/mine/points?wait=true",
            SCOPED,
            Some(points.clone())
        )
        .0,
        200
    );
    let (status, body) = call(
        &s,
        "PUT",
        "/collections/other/points?wait=true",
        SCOPED,
        Some(points.clone()),
    );
    assert_eq!(status, 403);
    assert!(
        body["status"]["error"]
            .as_str()
            .unwrap()
            .contains("collection"),
        "{body}"
    );
    assert_eq!(
        call(&s, "PUT", "/collections/new", SCOPED, Some(create.clone())).0,
        403
    );
    let (status, body) = call(&s, "GET", "/collections", SCOPED, None);
    assert_eq!(status, 200);
    assert_eq!(body["result"]["collections"], json!([{"name": "mine"}]));
    // Scoped to collections only: no cache is in its scope.
    let r = common::client()
        .post(format!("{}/v1/caches/c/entries/search", s.url))
        .bearer_auth(SCOPED)
        .json(&json!({"prompt": "hi"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // Qdrant's error shape without a key, problem+json stays on our own routes.
    let (status, body) = call(&s, "GET", "/collections/mine", "wrong-key-0123456789", None);
    assert_eq!(status, 401);
    assert!(body["status"]["error"].is_string(), "{body}");
    let query = json!({"query": [1.0, 0.1, 0.0], "limit": 1, "with_payload": true});
    let (status, body) = call(
        &s,
        "POST",
        "/collections/mine/points/query",
        READER,
        Some(query),
    );
    assert_eq!(status, 200);
    assert_eq!(body["result"]["points"][0]["id"], 1);
    assert_eq!(body["result"]["points"][0]["payload"], json!({"a": 1}));
    s.assert_healthy();
}

#[test]
fn deleted_points_leave_the_index_in_a_background_rebuild() {
    let s = Server::start(&["--sweep-interval-millis", "200"]);
    let create = json!({"vectors": {"size": 32, "distance": "Cosine"}});
    assert_eq!(call(&s, "PUT", "/collections/r", "", Some(create)).0, 200);
    // 3,000 points on pseudo-random 32-d vectors (xorshift, seeded by the id), in three requests.
    let vector = |i: u64| -> Vec<f32> {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    for chunk in (0..3000u64).collect::<Vec<_>>().chunks(1000) {
        let points: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"id": i, "vector": vector(*i), "payload": {"keep": i % 6 == 0}}))
            .collect();
        let (status, body) = call(
            &s,
            "PUT",
            "/collections/r/points?wait=true",
            "",
            Some(json!({"points": points})),
        );
        assert_eq!(status, 200, "{body}");
    }
    let delete = json!({"filter": {"must": [{"key": "keep", "match": {"value": false}}]}});
    assert_eq!(
        call(
            &s,
            "POST",
            "/collections/r/points/delete?wait=true",
            "",
            Some(delete)
        )
        .0,
        200
    );
    // 2,500 tombstones outnumber 500 live points: upkeep rebuilds the graph without them.
    let start = std::time::Instant::now();
    loop {
        let (_, info) = call(&s, "GET", "/collections/r", "", None);
        assert_eq!(info["result"]["points_count"], 500);
        if info["result"]["indexed_vectors_count"] == 500 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no rebuild: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every remaining point is found by its own vector in the rebuilt graph.
    for i in (0..3000u64).filter(|i| i % 6 == 0) {
        let query = json!({"query": vector(i), "limit": 1});
        let (status, body) = call(&s, "POST", "/collections/r/points/query", "", Some(query));
        assert_eq!(status, 200);
        assert_eq!(body["result"]["points"][0]["id"], i, "{body}");
    }
    s.assert_healthy();
}
