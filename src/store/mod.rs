//! Durable storage in sled: the source of truth for entries and their vectors.
//!
//! Trees:
//! - `meta`: the on-disk format version (see `migrations/`) and the embedding space
//!   (model and adapter) the vectors were made in;
//! - `entries`: `{cacheId}/{entryId}` → JSON [`EntryRecord`];
//! - `vectors`: the same key → the embedding as little-endian f32s;
//! - collections' trees: see [`points`].
//!
//! `/` cannot occur in a cache id, so a cache's keys are one contiguous prefix range.

mod migrate;
mod points;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

pub use migrate::FORMAT_VERSION;
pub use points::{point_key, CollectionRecord, PointId, PointRecord, StoredPoint, INTERNAL_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage error: {0}")]
    Sled(String),
    #[error("the disk is full")]
    DiskFull,
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the data directory was written by a newer semcache (format v{found}); this binary reads up to v{supported}. \
         Run a newer semcache, or point --data-dir elsewhere"
    )]
    FutureFormat { found: u32, supported: u32 },
    #[error("cannot open the data directory {path}: {reason}")]
    Open { path: String, reason: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.raw_os_error() == Some(28) => StoreError::DiskFull,
            sled::Error::Io(io) => StoreError::Io(io),
            other => StoreError::Sled(other.to_string()),
        }
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

/// Identifier of one entry: 16 bytes, shown as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryId(pub [u8; 16]);

impl EntryId {
    /// Time-ordered (UUIDv7) so ids sort by insertion.
    pub fn new() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    pub fn parse(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl Default for EntryId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// One cached prompt and its answer, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRecord {
    pub id: EntryId,
    pub cache_id: String,
    pub prompt: String,
    /// sha256 of the normalised prompt, hex: the exact-match key.
    pub prompt_hash: String,
    pub response: String,
    pub attributes: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// For prompts longer than the model's window: the byte offset where the part
    /// the model cannot see begins, so two long prompts that differ only there never
    /// match semantically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<usize>,
}

/// What start-up needs of a stored entry: everything but the prompt's and response's
/// text, of which only the length is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct EntrySummary {
    pub id: EntryId,
    pub cache_id: String,
    pub prompt_hash: String,
    pub attributes: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// Bytes of prompt and response together.
    pub text_bytes: usize,
}

/// The `summaries` tree's value: an entry's [`EntrySummary`] less what its key holds.
/// A restart reads these (~150 bytes each) instead of the records with their texts,
/// which on a cold page cache means reading a tenth of the data.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredSummary {
    prompt_hash: String,
    attributes: BTreeMap<String, String>,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    text_bytes: usize,
}

impl StoredSummary {
    fn of(record: &EntryRecord) -> Self {
        Self {
            prompt_hash: record.prompt_hash.clone(),
            attributes: record.attributes.clone(),
            created_at_ms: record.created_at_ms,
            expires_at_ms: record.expires_at_ms,
            text_bytes: record.prompt.len() + record.response.len(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        // Plain strings and numbers: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

pub fn entry_key(cache_id: &str, id: &EntryId) -> Vec<u8> {
    let mut key = Vec::with_capacity(cache_id.len() + 17);
    key.extend_from_slice(cache_id.as_bytes());
    key.push(b'/');
    key.extend_from_slice(&id.0);
    key
}

fn split_key(key: &[u8]) -> Option<(String, EntryId)> {
    if key.len() < 18 || key[key.len() - 17] != b'/' {
        return None;
    }
    let (cache, id) = key.split_at(key.len() - 16);
    let cache = std::str::from_utf8(&cache[..cache.len() - 1]).ok()?;
    Some((cache.to_string(), EntryId(id.try_into().ok()?)))
}

fn cache_prefix(cache_id: &str) -> Vec<u8> {
    let mut key = cache_id.as_bytes().to_vec();
    key.push(b'/');
    key
}

pub fn vector_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn vector_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// What users reported about an entry's answers (`/feedback`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// Embeddings of prompts this entry answered wrongly.
    pub wrong: Vec<Vec<f32>>,
    /// Embeddings of prompts this entry answered correctly.
    pub confirmed: Vec<Vec<f32>>,
    /// Labelled lookups for `maxErrorRate` (features and outcome; see `cache::bound`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<Observation>,
}

/// One labelled lookup: the features its decision used, and whether serving the
/// candidate was (or would have been) right.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub x: Vec<f32>,
    #[serde(rename = "c")]
    pub correct: bool,
}

/// A cache's own settings; `None` fields fall back to the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheSettings {
    pub similarity_threshold: Option<f32>,
    pub default_ttl_millis: Option<u64>,
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub allow_sampled: bool,
    /// δ for `maxErrorRate`; `None` serves by the similarity threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f32>,
}

/// How a store is opened.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Inserts are refused (507) while the filesystem has less free than this.
    pub min_free_bytes: u64,
    /// sled's page cache. Its default (1 GiB) fills with every record read at start-up
    /// and stays resident; entries are also in the OS page cache, so this is kept small.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            min_free_bytes: 0,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    /// Inserts are refused (DiskFull) while the data dir's filesystem has less free.
    min_free_bytes: u64,
    path: std::path::PathBuf,
    db: sled::Db,
    commits: GroupCommit,
    entries: sled::Tree,
    /// Same keys as `entries`: what start-up needs of each (see [`EntrySummary`]).
    summaries: sled::Tree,
    vectors: sled::Tree,
    feedback: sled::Tree,
    settings: sled::Tree,
    hits: sled::Tree,
    collections: sled::Tree,
    points: sled::Tree,
    point_vectors: sled::Tree,
    routing: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store and brings its format up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Like [`Store::open`], with a page cache of `cache_bytes`, refusing inserts while
    /// the filesystem has less than `min_free_bytes` free. sled 0.34 does not recover from ENOSPC in place (its
    /// flushes hang), so the reserve keeps it from ever meeting a full disk; inserts
    /// succeed again as soon as space returns.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let min_free_bytes = options.min_free_bytes;
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .mode(sled::Mode::HighThroughput);
        // The file lock outlives a closed store by a moment (sled's background work
        // holds it until it finishes), and a restarted process may still be exiting;
        // a holder that stays past two seconds is another running server.
        let locked = |e: &sled::Error| e.to_string().contains("could not acquire lock");
        let mut opened = config.open();
        for _ in 0..40 {
            match &opened {
                Err(e) if locked(e) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    opened = config.open();
                }
                _ => break,
            }
        }
        let db = opened.map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: if locked(&e) {
                "it is locked by another running semcache process; stop it or use another --data-dir"
                    .into()
            } else {
                e.to_string()
            },
        })?;
        migrate::upgrade(&db)?;
        Ok(Self {
            min_free_bytes,
            path: path.to_path_buf(),
            commits: GroupCommit::start(db.clone())?,
            entries: db.open_tree("entries")?,
            summaries: db.open_tree("summaries")?,
            vectors: db.open_tree("vectors")?,
            feedback: db.open_tree("feedback")?,
            settings: db.open_tree("settings")?,
            hits: db.open_tree("hits")?,
            collections: db.open_tree("collections")?,
            points: db.open_tree("points")?,
            point_vectors: db.open_tree("point_vectors")?,
            routing: db.open_tree("routing")?,
            db,
        })
    }

    /// Writes an entry and its vector atomically. Not yet durable: see [`Store::flush`].
    pub fn insert(&self, record: &EntryRecord, vector: &[f32]) -> Result<(), StoreError> {
        self.check_room()?;
        let key = entry_key(&record.cache_id, &record.id);
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            key: record.id.to_string(),
            reason: e.to_string(),
        })?;
        let summary = StoredSummary::of(record).encode();
        let vector = vector_to_bytes(vector);
        let trees = (&self.entries, &self.summaries, &self.vectors);
        trees.transaction(|(entries, summaries, vectors)| {
            entries.insert(key.as_slice(), value.as_slice())?;
            summaries.insert(key.as_slice(), summary.as_slice())?;
            vectors.insert(key.as_slice(), vector.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        Ok(())
    }

    fn check_room(&self) -> Result<(), StoreError> {
        if self.min_free_bytes > 0
            && free_bytes(&self.path).is_some_and(|free| free < self.min_free_bytes)
        {
            return Err(StoreError::DiskFull);
        }
        Ok(())
    }

    pub fn get(&self, cache_id: &str, id: &EntryId) -> Result<Option<EntryRecord>, StoreError> {
        let key = entry_key(cache_id, id);
        self.entries
            .get(&key)?
            .map(|bytes| decode_entry(&key, &bytes))
            .transpose()
    }

    pub fn get_vector(&self, cache_id: &str, id: &EntryId) -> Result<Option<Vec<f32>>, StoreError> {
        let key = entry_key(cache_id, id);
        match self.vectors.get(&key)? {
            None => Ok(None),
            Some(bytes) => vector_from_bytes(&bytes)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: "vector length is not a multiple of 4".into(),
                }),
        }
    }

    /// Removes entries; returns how many existed.
    pub fn remove(&self, cache_id: &str, ids: &[EntryId]) -> Result<usize, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| entry_key(cache_id, id)).collect();
        self.remove_keys(&keys)
    }

    /// Removes every entry of one cache; returns how many.
    pub fn remove_cache(&self, cache_id: &str) -> Result<usize, StoreError> {
        let prefix = cache_prefix(cache_id);
        let mut removed = 0;
        // One entry at a time (a cache may be large), but each wholly.
        for key in self.entries.scan_prefix(&prefix).keys() {
            removed += self.remove_keys(&[key?])?;
        }
        Ok(removed)
    }

    /// Removes entries from every tree that holds them, in one transaction, so a crash
    /// never leaves a summary (which a restart would index) without its entry. Returns
    /// how many entries existed.
    fn remove_keys<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<usize, StoreError> {
        let trees = (
            &self.entries,
            &self.summaries,
            &self.vectors,
            &self.feedback,
            &self.hits,
        );
        let removed = trees.transaction(|(entries, summaries, vectors, feedback, hits)| {
            let mut removed = 0;
            for key in keys {
                let key = key.as_ref();
                if entries.remove(key)?.is_some() {
                    removed += 1;
                }
                summaries.remove(key)?;
                vectors.remove(key)?;
                feedback.remove(key)?;
                hits.remove(key)?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(removed)
        })?;
        Ok(removed)
    }

    /// Every stored entry's summary (no texts, no vector), in key order.
    pub fn scan_summaries(&self) -> impl Iterator<Item = Result<EntrySummary, StoreError>> + '_ {
        self.summaries.iter().map(move |item| {
            let (key, bytes) = item?;
            let corrupt = |reason: String| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason,
            };
            let (cache_id, id) = split_key(&key).ok_or_else(|| corrupt("malformed key".into()))?;
            let stored: StoredSummary =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            Ok(EntrySummary {
                id,
                cache_id,
                prompt_hash: stored.prompt_hash,
                attributes: stored.attributes,
                created_at_ms: stored.created_at_ms,
                expires_at_ms: stored.expires_at_ms,
                text_bytes: stored.text_bytes,
            })
        })
    }

    /// Every stored entry with its vector, in key order (grouped by cache).
    pub fn scan(&self) -> impl Iterator<Item = Result<(EntryRecord, Vec<f32>), StoreError>> + '_ {
        self.entries.iter().map(move |item| {
            let (key, bytes) = item?;
            let record = decode_entry(&key, &bytes)?;
            let vector = self
                .vectors
                .get(&key)?
                .and_then(|b| vector_from_bytes(&b))
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: "entry has no vector".into(),
                })?;
            Ok((record, vector))
        })
    }

    pub fn put_feedback(
        &self,
        cache_id: &str,
        id: &EntryId,
        record: &FeedbackRecord,
    ) -> Result<(), StoreError> {
        let key = entry_key(cache_id, id);
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            key: id.to_string(),
            reason: e.to_string(),
        })?;
        self.feedback.insert(key, value)?;
        Ok(())
    }

    /// Every feedback record as `(cacheId, entryId, record)`.
    pub fn scan_feedback(
        &self,
    ) -> impl Iterator<Item = Result<(String, EntryId, FeedbackRecord), StoreError>> + '_ {
        self.feedback.iter().map(|item| {
            let (key, bytes) = item?;
            let corrupt = |reason: String| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason,
            };
            let (cache, id) = split_key(&key).ok_or_else(|| corrupt("bad key".into()))?;
            let record = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            Ok((cache, id, record))
        })
    }

    pub fn put_settings(&self, cache_id: &str, settings: &CacheSettings) -> Result<(), StoreError> {
        let value = serde_json::to_vec(settings).map_err(|e| StoreError::Corrupt {
            key: cache_id.to_string(),
            reason: e.to_string(),
        })?;
        self.settings.insert(cache_id.as_bytes(), value)?;
        Ok(())
    }

    /// Every cache's settings.
    pub fn scan_settings(
        &self,
    ) -> impl Iterator<Item = Result<(String, CacheSettings), StoreError>> + '_ {
        self.settings.iter().map(|item| {
            let (key, bytes) = item?;
            let cache = String::from_utf8_lossy(&key).into_owned();
            let settings = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                key: cache.clone(),
                reason: e.to_string(),
            })?;
            Ok((cache, settings))
        })
    }

    /// Increments an entry's persisted hit counter, kept in its own small tree so a hit
    /// never rewrites the (possibly large) record. Best effort: durable with the next flush.
    pub fn record_hit(&self, cache_id: &str, id: &EntryId) -> Result<(), StoreError> {
        let key = entry_key(cache_id, id);
        self.hits.update_and_fetch(&key, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// How many lookups an entry has answered.
    pub fn hits(&self, cache_id: &str, id: &EntryId) -> Result<u64, StoreError> {
        let value = self.hits.get(entry_key(cache_id, id))?;
        Ok(value
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Makes every write so far durable (fsync). Concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commits.flush().await
    }

    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// The embedding space (model, adapter) this store's vectors were made in, if
    /// recorded. Stores written before it was recorded hold none.
    pub fn embedding_space(&self) -> Result<Option<String>, StoreError> {
        let meta = self.db.open_tree("meta")?;
        Ok(meta
            .get(SPACE_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the embedding space, durably.
    pub fn set_embedding_space(&self, space: &str) -> Result<(), StoreError> {
        self.db
            .open_tree("meta")?
            .insert(SPACE_KEY, space.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether any cache entry, collection or stored set exists (what an older store
    /// without a recorded embedding space made with its model).
    pub fn holds_vectors(&self) -> bool {
        !(self.entries.is_empty() && self.collections.is_empty() && self.routing.is_empty())
    }
}

const SPACE_KEY: &str = "embedding_space";

type Waiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Group commit on one thread. sled 0.34's `flush_async` deadlocks when many tasks
/// flush at once (seen here under 64 concurrent inserts), so every waiter hands a reply
/// channel to this thread; each `flush()` it runs covers every write made before the
/// waiters it then answers had enqueued.
#[derive(Clone)]
struct GroupCommit {
    thread: Arc<CommitThread>,
}

/// Owns the commit thread: dropping the last `Store` stops and joins it, so the
/// database (and its file lock) is released before `drop` returns.
struct CommitThread {
    tx: Option<std::sync::mpsc::Sender<Waiter>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for CommitThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl GroupCommit {
    fn start(db: sled::Db) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Waiter>();
        let handle = std::thread::Builder::new()
            .name("semcache-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })?;
        Ok(Self {
            thread: Arc::new(CommitThread {
                tx: Some(tx),
                handle: Some(handle),
            }),
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let stopped = || StoreError::Sled("the commit thread has stopped".into());
        let (reply, done) = tokio::sync::oneshot::channel();
        self.thread
            .tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(reply)
            .map_err(|_| stopped())?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.contains("No space left") => Err(StoreError::DiskFull),
            Ok(Err(e)) => Err(StoreError::Sled(e)),
            Err(_) => Err(stopped()),
        }
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    #[allow(clippy::useless_conversion)] // c_ulong is u64 here, u32 on 32-bit targets
    (rc == 0).then(|| u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<EntryRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cache: &str, prompt: &str) -> EntryRecord {
        EntryRecord {
            id: EntryId::new(),
            cache_id: cache.into(),
            prompt: prompt.into(),
            prompt_hash: "00".into(),
            response: "r".into(),
            attributes: BTreeMap::new(),
            created_at_ms: 1,
            expires_at_ms: None,
            window_end: None,
        }
    }

    #[test]
    fn entries_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = record("c1", "hello");
        let b = record("c2", "world");
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert(&a, &[0.5, -1.0]).unwrap();
            store.insert(&b, &[1.0, 0.0]).unwrap();
            store.record_hit("c1", &a.id).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let got = store.get("c1", &a.id).unwrap().unwrap();
        assert_eq!(got.prompt, "hello");
        assert_eq!(store.hits("c1", &a.id).unwrap(), 1);
        assert_eq!(
            store.get_vector("c1", &a.id).unwrap().unwrap(),
            vec![0.5, -1.0]
        );
        assert!(
            store.get("c2", &a.id).unwrap().is_none(),
            "ids are scoped by cache"
        );
        let all: Vec<_> = store.scan().collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(store.remove_cache("c1").unwrap(), 1);
        assert_eq!(store.remove("c2", &[b.id, EntryId::new()]).unwrap(), 1);
        assert_eq!(store.scan().count(), 0);
    }

    #[test]
    fn entry_ids_print_and_parse() {
        let id = EntryId::new();
        assert_eq!(EntryId::parse(&id.to_string()), Some(id));
        assert_eq!(EntryId::parse("nope"), None);
    }
}
