//! The official `langcache` and `openai` Python SDKs, unchanged, against the real server.
//!
//! A virtual environment with the pinned SDKs (tests/sdk/requirements.txt) is created
//! once under ~/.cache/semcache/ (outside target/), from PyPI.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;

fn venv() -> PathBuf {
    let requirements = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/requirements.txt");
    let pins = std::fs::read_to_string(requirements).unwrap();
    let tag: u32 = pins
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    let dir = base.join(format!("semcache/sdk-venv-{tag:08x}"));
    let python = dir.join("bin/python");
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status();
        assert!(
            ok.map(|s| s.success()).unwrap_or(false),
            "python3 -m venv failed: these tests need Python 3.10+ with venv (Debian: python3-venv)"
        );
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r", requirements])
            .status()
            .unwrap();
        assert!(ok.success(), "pip install of the SDKs failed (needs PyPI)");
        std::fs::write(dir.join(".complete"), pins).unwrap();
    }
    python
}

#[test]
fn official_python_sdks_work_unchanged() {
    let python = venv();
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
