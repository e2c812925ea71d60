//! Starts the real `semcache` binary on an ephemeral port, with the real model.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_semcache");

/// Fetches the model once per test binary, so parallel servers don't all download it.
pub fn ensure_model() {
    static FETCH: Once = Once::new();
    FETCH.call_once(|| {
        let status = Command::new(BIN)
            .args(["model", "fetch"])
            .status()
            .expect("run semcache model fetch");
        assert!(status.success(), "semcache model fetch failed");
    });
}

pub struct Server {
    pub child: Child,
    pub url: String,
    /// The ext_proc (gRPC) address, when started with `--ext-proc-addr`.
    pub ext_proc: Option<String>,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A server on a fresh data directory.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut server = Server::start_in(&dir, extra);
        server._tmp = Some(tmp);
        server
    }

    /// A server on `data_dir`, waiting until `/readyz` answers 200.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_in_env(data_dir, extra, &[])
    }

    /// A server on a fresh data directory with extra environment variables.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut server = Server::start_in_env(&dir, extra, env);
        server._tmp = Some(tmp);
        server
    }

    pub fn start_in_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        ensure_model();
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("SEMCACHE_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn semcache");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut ext_proc = None;
        let addr = loop {
            let line = lines
                .next()
                .expect("semcache exited before listening")
                .unwrap();
            if let Some(addr) = line.strip_prefix("semcache ext_proc listening on ") {
                ext_proc = Some(addr.trim().to_string());
            }
            if let Some(addr) = line.strip_prefix("semcache listening on ") {
                break addr.trim().to_string();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let server = Server {
            child,
            url: format!("http://{addr}"),
            ext_proc,
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
        };
        server.wait_ready(Duration::from_secs(120));
        server
    }

    pub fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(r) = client().get(format!("{}/readyz", self.url)).send() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(start.elapsed() < limit, "server not ready after {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap()
    }

    pub fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> reqwest::blocking::Response {
        client()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap()
    }

    pub fn delete(&self, path: &str, body: Option<&Value>) -> reqwest::blocking::Response {
        let req = client().delete(format!("{}{path}", self.url));
        let req = match body {
            Some(b) => req.json(b),
            None => req,
        };
        req.send().unwrap()
    }

    pub fn put(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        client()
            .put(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap()
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        client().get(format!("{}{path}", self.url)).send().unwrap()
    }

    /// Inserts an entry and returns its id.
    pub fn set(&self, cache: &str, prompt: &str, response: &str, attributes: Value) -> String {
        let r = self.post(
            &format!("/v1/caches/{cache}/entries"),
            &json!({"prompt": prompt, "response": response, "attributes": attributes}),
        );
        assert_eq!(r.status(), 201, "{}", r.text().unwrap());
        r.json::<Value>().unwrap()["entryId"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Searches and returns the `data` array.
    pub fn search(&self, cache: &str, body: Value) -> Vec<Value> {
        let r = self.post(&format!("/v1/caches/{cache}/entries/search"), &body);
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
        r.json::<Value>().unwrap()["data"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn assert_healthy(&self) {
        assert_eq!(self.get("/healthz").status(), 200);
        assert_eq!(self.get("/readyz").status(), 200);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A virtual environment with the pinned Python clients of tests/sdk/requirements.txt,
/// created once under ~/.cache/semcache/ (outside target/) from PyPI. Returns its python.
pub fn python_venv() -> PathBuf {
    // Tests of one binary run in parallel; one of them builds the venv, the rest wait.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
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
