//! The official `langcache` and `openai` Python SDKs, unchanged, against the real server.
//!

mod common;

use std::process::Command;

use common::Server;

#[test]
fn official_python_sdks_work_unchanged() {
    let python = common::python_venv();
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_sdks.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&server.url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
    server.assert_healthy();
}
