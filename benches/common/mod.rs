//! What the benchmark programs share: the peers' prompts file and a server to drive.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The prompts file `benches/peers/prompts.py` writes (`SEMCACHE_BENCH_PROMPTS`, default
/// `target/bench-prompts.json`); `None`, with the fix printed, when it is missing.
#[allow(dead_code)] // not every benchmark reads prompts
pub fn load_prompts<T: serde::de::DeserializeOwned>() -> Option<T> {
    let path = std::env::var("SEMCACHE_BENCH_PROMPTS")
        .unwrap_or_else(|_| "target/bench-prompts.json".into());
    match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).expect("prompts file")),
        Err(e) => {
            eprintln!(
                "{path}: {e}; write it with benches/peers/prompts.py (see benches/peers/run.sh)"
            );
            None
        }
    }
}

/// Starts `semcache serve` on `data_dir` and returns it with its base URL once it
/// listens (not yet ready); its stdout keeps being drained. `SEMCACHE_BENCH_SERVER`
/// names another build's binary to run instead (for A/B runs between builds).
#[allow(dead_code)] // not every benchmark starts a server
pub fn start_server(data_dir: &Path) -> (Child, String) {
    start_server_with(data_dir, &[])
}

/// As [`start_server`], with more flags.
#[allow(dead_code)]
pub fn start_server_with(data_dir: &Path, extra: &[&str]) -> (Child, String) {
    let binary = std::env::var_os("SEMCACHE_BENCH_SERVER")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_semcache").into());
    let mut child = Command::new(binary)
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("SEMCACHE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start semcache");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").expect("read stdout");
        if let Some(a) = line.strip_prefix("semcache listening on ") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, format!("http://{addr}"))
}
