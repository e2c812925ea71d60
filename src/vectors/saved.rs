//! Saved indexes: each named set's HNSW graph (a cache or a collection) with its slot → entry map, so that a
//! restart loads the graph instead of re-inserting every vector.
//!
//! A saved index is only ever a shortcut; the store stays the source of truth. Every
//! entry id maps to one immutable vector, so a saved graph stays valid however old it
//! is: at start-up its slots whose entries are gone become tombstones, and entries
//! written after it was saved are inserted as before.
//!
//! Layout: `<root>/<hex cache id>/<sequence>/` holding hnsw_rs's `graph.hnsw.graph` and
//! `graph.hnsw.data` plus our `slots.bin`. A save writes `<sequence>.partial/`, syncs it
//! and renames it into place, so a crash mid-save leaves the previous save intact.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::index::{saved_files, IndexError, IndexParams, VectorIndex};
use crate::store::EntryId;

/// Slot maps written before the graph files were checksummed (still read).
const MAGIC_V1: &[u8; 8] = b"SEMSLOT1";
/// Adds CRC-32s of the graph and data files: hnsw_rs trusts their contents (a flipped
/// length field would make its loader abort), so a damaged save must never reach it.
const MAGIC: &[u8; 8] = b"SEMSLOT2";
const SLOTS_FILE: &str = "slots.bin";
const PARTIAL: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("saved index {path}: {reason}")]
    Io { path: String, reason: String },
    #[error(transparent)]
    Index(#[from] IndexError),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SavedError + '_ {
    move |e| SavedError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// One cache's loaded graph and, per slot, the entry it held and whether it answered.
pub struct SavedIndex {
    pub index: VectorIndex,
    pub slots: Vec<(EntryId, bool)>,
}

pub fn cache_dir(root: &Path, cache_id: &str) -> PathBuf {
    root.join(hex::encode(cache_id.as_bytes()))
}

/// Cache ids that have a saved index under `root`.
pub fn saved_caches(root: &Path) -> Vec<String> {
    let Ok(dirs) = fs::read_dir(root) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| hex::decode(d.file_name().to_str()?).ok())
        .filter_map(|bytes| String::from_utf8(bytes).ok())
        .collect()
}

/// Sequence numbers of complete saves in a cache's directory, newest first.
fn complete_saves(dir: &Path) -> Vec<u64> {
    let mut found: Vec<u64> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found
}

/// Saves a cache's graph and slot map; the caller keeps writers away meanwhile.
/// Older saves of the cache are removed once the new one is in place.
pub fn save(
    root: &Path,
    cache_id: &str,
    index: &VectorIndex,
    slots: &[(EntryId, bool)],
) -> Result<(), SavedError> {
    if index.len() != slots.len() {
        // A failed insert left a slot without a point; the map would be wrong.
        return Err(SavedError::Io {
            path: cache_id.to_string(),
            reason: format!(
                "index has {} points for {} slots; not saved",
                index.len(),
                slots.len()
            ),
        });
    }
    let dir = cache_dir(root, cache_id);
    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let sequence = complete_saves(&dir).first().map_or(1, |n| n + 1);
    let partial = dir.join(format!("{sequence:020}{PARTIAL}"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir(&partial).map_err(io_error(&partial))?;
    index.save(&partial)?;
    let files = saved_files(&partial);
    let checksums = [file_crc(&files[0])?, file_crc(&files[1])?];
    write_slots(&partial.join(SLOTS_FILE), index, slots, checksums)?;
    for path in &files {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_error(path))?;
    }
    sync_dir(&partial)?;
    let done = dir.join(format!("{sequence:020}"));
    fs::rename(&partial, &done).map_err(io_error(&done))?;
    sync_dir(&dir)?;
    // Older saves, and partial ones a crash left behind, are garbage now.
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.file_name() != done.file_name().unwrap_or_default() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SavedError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_error(dir))
}

/// CRC-32 of a file, read in 1 MiB pieces (~0.1 s per GB here).
fn file_crc(path: &Path) -> Result<u32, SavedError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buffer[..read]);
    }
}

/// `slots.bin`: magic, dimensions, M, ef_construction, slot count, the CRC-32s of the
/// graph and data files, then per slot the 16-byte entry id and an alive byte, then a
/// SHA-256 of everything before it. (`SEMSLOT1` files lack the two CRCs.)
fn write_slots(
    path: &Path,
    index: &VectorIndex,
    slots: &[(EntryId, bool)],
    checksums: [u32; 2],
) -> Result<(), SavedError> {
    let params = index.params();
    let mut bytes = Vec::with_capacity(48 + slots.len() * 17 + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(index.dimensions() as u32).to_le_bytes());
    bytes.extend_from_slice(&(params.max_connections as u32).to_le_bytes());
    bytes.extend_from_slice(&(params.ef_construction as u32).to_le_bytes());
    bytes.extend_from_slice(&(slots.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&checksums[0].to_le_bytes());
    bytes.extend_from_slice(&checksums[1].to_le_bytes());
    for (id, alive) in slots {
        bytes.extend_from_slice(&id.0);
        bytes.push(u8::from(*alive));
    }
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(io_error(path))
}

/// A slot map and, for saves that recorded them, the graph and data files' CRC-32s.
type SlotMap = (Vec<(EntryId, bool)>, Option<[u32; 2]>);

fn read_slots(path: &Path, dimensions: usize, params: IndexParams) -> Result<SlotMap, SavedError> {
    let bad = |reason: &str| SavedError::Io {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let bytes = fs::read(path).map_err(io_error(path))?;
    let checksummed = match bytes.get(..8) {
        Some(m) if m == MAGIC => true,
        Some(m) if m == MAGIC_V1 => false,
        _ => return Err(bad("not a slot map")),
    };
    let header = if checksummed { 36 } else { 28 };
    if bytes.len() < header + 32 {
        return Err(bad("not a slot map"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("checksum mismatch"));
    }
    let word = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or([0; 4]));
    if word(8) as usize != dimensions
        || word(12) as usize != params.max_connections
        || word(16) as usize != params.ef_construction
    {
        return Err(bad("saved with other dimensions or index parameters"));
    }
    let count = u64::from_le_bytes(body[20..28].try_into().unwrap_or([0; 8])) as usize;
    let checksums = checksummed.then(|| [word(28), word(32)]);
    let records = &body[header..];
    if records.len() != count.saturating_mul(17) {
        return Err(bad("slot count does not match the file length"));
    }
    let slots = records
        .chunks_exact(17)
        .map(|r| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&r[..16]);
            (EntryId(id), r[16] == 1)
        })
        .collect();
    Ok((slots, checksums))
}

/// The newest complete save of a cache, checked against the configured dimensions and
/// parameters. `Ok(None)` when there is none.
pub fn load(
    root: &Path,
    cache_id: &str,
    dimensions: usize,
    params: IndexParams,
) -> Result<Option<SavedIndex>, SavedError> {
    let dir = cache_dir(root, cache_id);
    let Some(sequence) = complete_saves(&dir).first().copied() else {
        return Ok(None);
    };
    let path = dir.join(format!("{sequence:020}"));
    let (slots, checksums) = read_slots(&path.join(SLOTS_FILE), dimensions, params)?;
    if let Some(expected) = checksums {
        for (file, expected) in saved_files(&path).iter().zip(expected) {
            if file_crc(file)? != expected {
                return Err(SavedError::Io {
                    path: file.display().to_string(),
                    reason: "checksum mismatch".into(),
                });
            }
        }
    }
    let index = VectorIndex::load(&path, dimensions, params)?;
    if index.len() != slots.len() {
        return Err(SavedError::Io {
            path: path.display().to_string(),
            reason: format!("graph has {} points, slot map {}", index.len(), slots.len()),
        });
    }
    Ok(Some(SavedIndex { index, slots }))
}

/// Removes a cache's saved index (its cache is gone, or the save is unusable).
pub fn remove(root: &Path, cache_id: &str) {
    let _ = fs::remove_dir_all(cache_dir(root, cache_id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn unit(rng: &mut impl Rng) -> Vec<f32> {
        let v: Vec<f32> = (0..16).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let n = crate::index::dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    #[test]
    fn saves_replace_each_other_and_damage_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let params = IndexParams::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let index = VectorIndex::new(16, 0, params);
        let mut slots = Vec::new();
        for n in 0..100 {
            index.insert(n, &unit(&mut rng)).unwrap();
            slots.push((EntryId::new(), n % 10 != 0));
        }
        assert!(load(root.path(), "a/b", 16, params).unwrap().is_none());
        save(root.path(), "a/b", &index, &slots).unwrap();
        save(root.path(), "a/b", &index, &slots).unwrap();
        assert_eq!(saved_caches(root.path()), vec!["a/b".to_string()]);
        let dir = cache_dir(root.path(), "a/b");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "older save removed");
        let loaded = load(root.path(), "a/b", 16, params).unwrap().unwrap();
        assert_eq!(loaded.slots, slots);
        assert_eq!(loaded.index.len(), 100);

        // Other parameters, or a damaged slot map, are refused.
        assert!(load(root.path(), "a/b", 8, params).is_err());
        let slots_file = dir.join(format!("{:020}", 2)).join(SLOTS_FILE);
        let mut bytes = fs::read(&slots_file).unwrap();
        bytes[40] ^= 1;
        fs::write(&slots_file, &bytes).unwrap();
        assert!(load(root.path(), "a/b", 16, params).is_err());

        // A flipped byte in the graph's data file is caught before hnsw_rs reads it.
        save(root.path(), "d", &index, &slots).unwrap();
        let saved = cache_dir(root.path(), "d").join(format!("{:020}", 1));
        let data = saved.join("graph.hnsw.data");
        let original = fs::read(&data).unwrap();
        let mut flipped = original.clone();
        flipped[original.len() / 2] ^= 0x40;
        fs::write(&data, &flipped).unwrap();
        assert!(load(root.path(), "d", 16, params).is_err());
        fs::write(&data, &original).unwrap();
        assert!(load(root.path(), "d", 16, params).unwrap().is_some());

        // Slot maps from before the checksums (SEMSLOT1) still load.
        let slots_v2 = fs::read(saved.join(SLOTS_FILE)).unwrap();
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&slots_v2[8..28]);
        v1.extend_from_slice(&slots_v2[36..slots_v2.len() - 32]);
        let digest = Sha256::digest(&v1);
        v1.extend_from_slice(&digest);
        fs::write(saved.join(SLOTS_FILE), &v1).unwrap();
        let old = load(root.path(), "d", 16, params).unwrap().unwrap();
        assert_eq!(old.slots, slots);
        remove(root.path(), "d");

        // A slot map that does not match the graph is never written.
        assert!(save(root.path(), "c", &index, &slots[..99]).is_err());
        remove(root.path(), "a/b");
        assert!(saved_caches(root.path()).is_empty());
    }
}
