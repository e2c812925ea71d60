//! API keys, shared by both edges (HTTP `Authorization: Bearer <key>`, and the same in
//! an ext_proc stream's gRPC metadata; `api-key: <key>` on the Qdrant routes, as Qdrant's
//! clients send it): each key with a role and optionally the caches and collections it
//! may touch.
//!
//! Keys are kept only as SHA-256 digests and compared in constant time; they are never
//! logged. The key file may hold plain keys (`"key"`) or their digests (`"keySha256"`),
//! and is re-read on SIGHUP without dropping connections.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: Option<String>,
    #[serde(rename = "keySha256")]
    key_sha256: Option<String>,
    role: Role,
    caches: Option<Vec<String>>,
    /// Vector-search collections the key may touch (absent: none if `caches` is
    /// given, all otherwise).
    collections: Option<Vec<String>>,
}

/// A key the ring knows: what its holder may do.
#[derive(Debug, Clone)]
pub struct Key {
    digest: [u8; 32],
    pub role: Role,
    caches: Option<HashSet<String>>,
    collections: Option<HashSet<String>>,
}

impl Key {
    /// Whether the key may touch this cache. A key scoped to collections only touches
    /// no cache; an unscoped key touches every one.
    pub fn permits_cache(&self, cache: &str) -> bool {
        match &self.caches {
            Some(c) => c.contains(cache),
            None => self.collections.is_none(),
        }
    }

    /// Whether the key may touch this collection. A key scoped to caches only touches
    /// no collection; an unscoped key touches every one.
    pub fn permits_collection(&self, collection: &str) -> bool {
        match &self.collections {
            Some(c) => c.contains(collection),
            None => self.caches.is_none(),
        }
    }

    /// Whether the key is limited to a list of caches or collections.
    pub fn scoped(&self) -> bool {
        self.caches.is_some() || self.collections.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the API key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the API key file {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
}

/// The keys in force; empty means authentication is off.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Arc<RwLock<Vec<Key>>>,
    path: Option<PathBuf>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal in time independent of where the inputs differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse(path: &Path) -> Result<Vec<Key>, KeyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KeyFileError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let invalid = |reason: String| KeyFileError::Invalid {
        path: shown.clone(),
        reason,
    };
    let entries: Vec<KeyEntry> = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let digest = match (e.key, e.key_sha256) {
                (Some(k), None) if k.len() >= 16 => digest(&k),
                (Some(_), None) => {
                    return Err(invalid(format!(
                        "entry {i}: keys must be at least 16 characters"
                    )))
                }
                (None, Some(h)) => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h.trim(), &mut d).map_err(|_| {
                        invalid(format!("entry {i}: keySha256 must be 64 hex digits"))
                    })?;
                    d
                }
                _ => {
                    return Err(invalid(format!(
                        "entry {i}: give exactly one of key and keySha256"
                    )))
                }
            };
            Ok(Key {
                digest,
                role: e.role,
                caches: e.caches.map(|c| c.into_iter().collect()),
                collections: e.collections.map(|c| c.into_iter().collect()),
            })
        })
        .collect()
}

impl KeyRing {
    /// Loads the key file; `None` means no authentication.
    pub fn load(path: Option<&Path>) -> Result<Self, KeyFileError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let keys = parse(path)?;
        if keys.is_empty() {
            return Err(KeyFileError::Invalid {
                path: path.display().to_string(),
                reason: "it holds no keys".into(),
            });
        }
        Ok(Self {
            keys: Arc::new(RwLock::new(keys)),
            path: Some(path.to_path_buf()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Re-reads the key file; on error the old keys stay in force.
    pub fn reload(&self) -> Result<usize, KeyFileError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let keys = parse(path)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(n)
    }

    /// The key presented, if the ring holds it (compared in constant time).
    pub fn find(&self, presented: &str) -> Option<Key> {
        let d = digest(presented);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        // Look at every key, so timing does not tell which one matched.
        let mut found = None;
        for key in keys.iter() {
            if same(&key.digest, &d) {
                found = Some(key.clone());
            }
        }
        found
    }
}

/// The key in an `Authorization: Bearer <key>` value.
pub fn bearer(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ").map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_accept_plain_and_hashed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let hashed = hex::encode(Sha256::digest(b"reader-key-0123456789"));
        std::fs::write(
            &path,
            format!(r#"[{{"key": "admin-key-0123456789", "role": "admin"}}, {{"keySha256": "{hashed}", "role": "reader", "caches": ["a"]}}]"#),
        )
        .unwrap();
        let ring = KeyRing::load(Some(&path)).unwrap();
        assert_eq!(ring.find("admin-key-0123456789").unwrap().role, Role::Admin);
        let reader = ring.find("reader-key-0123456789").unwrap();
        assert_eq!(reader.role, Role::Reader);
        assert!(reader.caches.unwrap().contains("a"));
        assert!(ring.find("nope").is_none());

        std::fs::write(&path, r#"[{"key": "short", "role": "admin"}]"#).unwrap();
        assert!(ring.reload().is_err());
        assert!(
            ring.find("admin-key-0123456789").is_some(),
            "old keys stay on a bad reload"
        );
        std::fs::write(
            &path,
            r#"[{"key": "x", "keySha256": "y", "role": "admin"}]"#,
        )
        .unwrap();
        assert!(KeyRing::load(Some(&path)).is_err());
    }
}
