//! Saved indexes: each named set's HNSW graph (a cache or a collection) with its slot → entry map, so that a
//! restart loads the graph instead of re-inserting every vector.
//!
//! A saved index is only ever a shortcut; the store stays the source of truth. Every
//! entry id maps to one immutable vector, so a saved graph stays valid however old it
//! is: at start-up its slots whose entries are gone become tombstones, and entries
//! written after it was saved are inserted as before.
//!
//! Layout: `<root>/<hex cache id>/segments/` holds the index's frozen segment files
//! (written once each, shared by successive saves), and `<root>/<hex cache id>/<sequence>/`
//! our `slots.bin`, which names the segments of that save. A save freezes the live graph
//! into a new segment, writes `<sequence>.partial/`, syncs both and renames the partial
//! into place, so a crash mid-save leaves the previous save intact; then older saves and
//! the segments only they named are removed. (Saves before segments held hnsw_rs's
//! `graph.hnsw.graph` and `graph.hnsw.data` in the sequence directory; they still load.)

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
const MAGIC_V2: &[u8; 8] = b"SEMSLOT2";
/// Frozen segments instead of hnsw_rs files: the slot map names them (each checks itself).
const MAGIC: &[u8; 8] = b"SEMSLOT3";
const SEGMENTS: &str = "segments";
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
    let segments = dir.join(SEGMENTS);
    fs::create_dir_all(&segments).map_err(io_error(&segments))?;
    let sequence = complete_saves(&dir).first().map_or(1, |n| n + 1);
    let partial = dir.join(format!("{sequence:020}{PARTIAL}"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir(&partial).map_err(io_error(&partial))?;
    let files = index.freeze(&segments)?;
    let mut names = Vec::with_capacity(files.len());
    for file in &files {
        // Every segment of this set lives in its own directory; one elsewhere (never
        // expected) would be lost when that directory is cleaned, so it is not saved.
        match file.file_name().and_then(|n| n.to_str()) {
            Some(name) if file.parent() == Some(segments.as_path()) => names.push(name.to_string()),
            _ => {
                return Err(SavedError::Io {
                    path: file.display().to_string(),
                    reason: "segment outside the set's directory".into(),
                })
            }
        }
    }
    sync_dir(&segments)?;
    write_slots(&partial.join(SLOTS_FILE), index, slots, &names)?;
    sync_dir(&partial)?;
    let done = dir.join(format!("{sequence:020}"));
    fs::rename(&partial, &done).map_err(io_error(&done))?;
    sync_dir(&dir)?;
    // Older saves, partial ones a crash left behind, and segments no save names any
    // more are garbage now (a search still walking one keeps its mapping).
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name != done.file_name().unwrap_or_default() && name != SEGMENTS {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(&segments) {
        for entry in entries.flatten() {
            if !names.iter().any(|n| entry.file_name() == n.as_str()) {
                let _ = fs::remove_file(entry.path());
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

/// `slots.bin`: magic, dimensions, M, ef_construction, slot count, the number of
/// segments, each segment's file name (a length byte, then UTF-8), then per slot the
/// 16-byte entry id and an alive byte, then a SHA-256 of everything before it.
/// (`SEMSLOT2` files have the CRC-32s of hnsw_rs's two files where the segments are;
/// `SEMSLOT1` files lack those too.)
fn write_slots(
    path: &Path,
    index: &VectorIndex,
    slots: &[(EntryId, bool)],
    segments: &[String],
) -> Result<(), SavedError> {
    let params = index.params();
    let mut bytes = Vec::with_capacity(64 + segments.len() * 40 + slots.len() * 17);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(index.dimensions() as u32).to_le_bytes());
    bytes.extend_from_slice(&(params.max_connections as u32).to_le_bytes());
    bytes.extend_from_slice(&(params.ef_construction as u32).to_le_bytes());
    bytes.extend_from_slice(&(slots.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    for name in segments {
        let name = name.as_bytes();
        bytes.push(u8::try_from(name.len()).map_err(|_| SavedError::Io {
            path: path.display().to_string(),
            reason: "segment name too long".into(),
        })?);
        bytes.extend_from_slice(name);
    }
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

/// What a save's index is made of.
enum Saved {
    /// Frozen segment files, by name in the set's `segments` directory.
    Segments(Vec<String>),
    /// hnsw_rs's files in the save's directory, with their CRC-32s where recorded.
    Hnsw(Option<[u32; 2]>),
}

fn read_slots(
    path: &Path,
    dimensions: usize,
    params: IndexParams,
) -> Result<(Vec<(EntryId, bool)>, Saved), SavedError> {
    let bad = |reason: &str| SavedError::Io {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let bytes = fs::read(path).map_err(io_error(path))?;
    let version = match bytes.get(..8) {
        Some(m) if m == MAGIC => 3,
        Some(m) if m == MAGIC_V2 => 2,
        Some(m) if m == MAGIC_V1 => 1,
        _ => return Err(bad("not a slot map")),
    };
    if bytes.len() < 32 + 32 {
        return Err(bad("not a slot map"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("checksum mismatch"));
    }
    let word = |at: usize| {
        body.get(at..at + 4)
            .and_then(|w| w.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    if word(8) as usize != dimensions
        || word(12) as usize != params.max_connections
        || word(16) as usize != params.ef_construction
    {
        return Err(bad("saved with other dimensions or index parameters"));
    }
    let count = u64::from_le_bytes(body[20..28].try_into().unwrap_or([0; 8])) as usize;
    let (saved, header) = match version {
        1 => (Saved::Hnsw(None), 28),
        2 => (Saved::Hnsw(Some([word(28), word(32)])), 36),
        _ => {
            let mut at = 32;
            let mut names = Vec::new();
            for _ in 0..word(28) {
                let len = *body.get(at).ok_or(bad("segment list cut short"))? as usize;
                let name = body
                    .get(at + 1..at + 1 + len)
                    .ok_or(bad("segment list cut short"))?;
                let name = std::str::from_utf8(name).map_err(|_| bad("segment name not UTF-8"))?;
                if name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(bad("segment name is not a file name"));
                }
                names.push(name.to_string());
                at += 1 + len;
            }
            (Saved::Segments(names), at)
        }
    };
    let records = body.get(header..).ok_or(bad("not a slot map"))?;
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
    Ok((slots, saved))
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
    let (slots, saved) = read_slots(&path.join(SLOTS_FILE), dimensions, params)?;
    let index = match saved {
        Saved::Segments(names) => {
            let files: Vec<PathBuf> = names.iter().map(|n| dir.join(SEGMENTS).join(n)).collect();
            VectorIndex::open(&files, dimensions, params)?
        }
        Saved::Hnsw(checksums) => {
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
            VectorIndex::load(&path, dimensions, params)?
        }
    };
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

    /// The one segment file of a set's newest save.
    fn segment_files(root: &Path, id: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(cache_dir(root, id).join(SEGMENTS))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
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
        assert_eq!(index.segments(), 1, "the save froze the live graph");
        // Points added after a save go into a second segment at the next save; the
        // first is shared, not rewritten.
        for n in 100..150 {
            index.insert(n, &unit(&mut rng)).unwrap();
            slots.push((EntryId::new(), true));
        }
        save(root.path(), "a/b", &index, &slots).unwrap();
        assert_eq!(index.segments(), 2);
        assert_eq!(segment_files(root.path(), "a/b").len(), 2);
        assert_eq!(saved_caches(root.path()), vec!["a/b".to_string()]);
        let dir = cache_dir(root.path(), "a/b");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2, "older save removed");
        let loaded = load(root.path(), "a/b", 16, params).unwrap().unwrap();
        assert_eq!(loaded.slots, slots);
        assert_eq!(loaded.index.len(), 150);
        assert_eq!(loaded.index.segments(), 2);

        // Other parameters, or a damaged slot map, are refused.
        assert!(load(root.path(), "a/b", 8, params).is_err());
        let slots_file = dir.join(format!("{:020}", 2)).join(SLOTS_FILE);
        let mut bytes = fs::read(&slots_file).unwrap();
        bytes[100] ^= 1;
        fs::write(&slots_file, &bytes).unwrap();
        assert!(load(root.path(), "a/b", 16, params).is_err());

        // A flipped byte anywhere in a segment is caught by its checksum.
        let fresh = VectorIndex::new(16, 0, params);
        for n in 0..100 {
            fresh.insert(n, &unit(&mut rng)).unwrap();
        }
        save(root.path(), "d", &fresh, &slots[..100]).unwrap();
        let segment = segment_files(root.path(), "d").remove(0);
        let original = fs::read(&segment).unwrap();
        for at in [3, 40, original.len() / 2, original.len() - 1] {
            let mut flipped = original.clone();
            flipped[at] ^= 0x40;
            fs::write(&segment, &flipped).unwrap();
            assert!(load(root.path(), "d", 16, params).is_err(), "byte {at}");
        }
        fs::write(&segment, &original[..original.len() - 64]).unwrap();
        assert!(load(root.path(), "d", 16, params).is_err());
        fs::write(&segment, &original).unwrap();
        assert!(load(root.path(), "d", 16, params).unwrap().is_some());
        fs::remove_file(&segment).unwrap();
        assert!(load(root.path(), "d", 16, params).is_err());
        remove(root.path(), "d");

        // A slot map that does not match the graph is never written.
        assert!(save(root.path(), "c", &index, &slots[..99]).is_err());
        remove(root.path(), "a/b");
        assert!(saved_caches(root.path()).is_empty());
    }

    /// Writes a save as builds before segments did: hnsw_rs's files and a SEMSLOT2 (or,
    /// without CRCs, SEMSLOT1) slot map.
    fn write_hnsw_save(
        root: &Path,
        id: &str,
        index: &VectorIndex,
        slots: &[(EntryId, bool)],
        crcs: bool,
    ) {
        let dir = cache_dir(root, id).join(format!("{:020}", 1));
        fs::create_dir_all(&dir).unwrap();
        index.save_legacy(&dir).unwrap();
        let mut bytes = if crcs { MAGIC_V2 } else { MAGIC_V1 }.to_vec();
        bytes.extend_from_slice(&16u32.to_le_bytes());
        bytes.extend_from_slice(&(index.params().max_connections as u32).to_le_bytes());
        bytes.extend_from_slice(&(index.params().ef_construction as u32).to_le_bytes());
        bytes.extend_from_slice(&(slots.len() as u64).to_le_bytes());
        if crcs {
            for file in saved_files(&dir) {
                bytes.extend_from_slice(&file_crc(&file).unwrap().to_le_bytes());
            }
        }
        for (id, alive) in slots {
            bytes.extend_from_slice(&id.0);
            bytes.push(u8::from(*alive));
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        fs::write(dir.join(SLOTS_FILE), bytes).unwrap();
    }

    #[test]
    fn saves_in_hnsw_rs_format_still_load_and_the_next_save_freezes_them() {
        let root = tempfile::tempdir().unwrap();
        let params = IndexParams::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let index = VectorIndex::new(16, 0, params);
        let points: Vec<Vec<f32>> = (0..200).map(|_| unit(&mut rng)).collect();
        let slots: Vec<(EntryId, bool)> = (0..200).map(|_| (EntryId::new(), true)).collect();
        for (n, p) in points.iter().enumerate() {
            index.insert(n, p).unwrap();
        }
        for crcs in [true, false] {
            write_hnsw_save(root.path(), "old", &index, &slots, crcs);
            let loaded = load(root.path(), "old", 16, params).unwrap().unwrap();
            assert!(loaded.index.loaded_from_outdated_save());
            assert_eq!(loaded.slots, slots);
            assert_eq!(loaded.index.segments(), 0);
            save(root.path(), "old", &loaded.index, &loaded.slots).unwrap();
            let reloaded = load(root.path(), "old", 16, params).unwrap().unwrap();
            assert_eq!(reloaded.index.segments(), 1);
            assert!(!reloaded.index.loaded_from_outdated_save());
            for (n, p) in points.iter().enumerate().step_by(7) {
                assert_eq!(reloaded.index.search(p, 1, &|_| true).unwrap()[0].slot, n);
            }
            remove(root.path(), "old");
        }
        // A flipped byte in hnsw_rs's data file is caught before hnsw_rs reads it.
        write_hnsw_save(root.path(), "old", &index, &slots, true);
        let data = cache_dir(root.path(), "old")
            .join(format!("{:020}", 1))
            .join("graph.hnsw.data");
        let mut bytes = fs::read(&data).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        fs::write(&data, &bytes).unwrap();
        assert!(load(root.path(), "old", 16, params).is_err());
    }
}
