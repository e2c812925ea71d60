//! The cache core: scope, exact and semantic lookup, inserts, deletes and expiry.
//!
//! This is the only module that combines the engines: the embedder (`embed`), the
//! durable store (`store`) and the per-cache vector index (`index`). The store is the
//! source of truth; each cache's in-memory [`Generation`] (slot table + HNSW index) is
//! derived from it and rebuilt from it at start-up without re-embedding anything.

mod normalize;
mod table;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::embed::{EmbedError, Embedder};
use crate::index::{dot, IndexError, IndexParams, VectorIndex};
use crate::store::{EntryId, EntryRecord, Store, StoreError};

pub use normalize::{normalize_prompt, prompt_hash};
use table::{Slot, SlotTable};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("entry not found")]
    NotFound,
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Server-wide cache behaviour.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Similarity a semantic hit needs when the request names none.
    pub similarity_threshold: f32,
    /// TTL of entries inserted without one; `None` keeps them until deleted.
    pub default_ttl_ms: Option<u64>,
    pub index: IndexParams,
    /// Scoped searches whose candidate set is at most this large are answered by exact
    /// brute force instead of a filtered HNSW walk (perfect recall for narrow scopes).
    pub brute_force_limit: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            similarity_threshold: 0.9,
            default_ttl_ms: None,
            index: IndexParams::default(),
            brute_force_limit: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Exact,
    Semantic,
}

/// What a lookup asks for.
#[derive(Debug, Clone)]
pub struct Query {
    pub prompt: String,
    pub attributes: BTreeMap<String, String>,
    pub similarity_threshold: Option<f32>,
    /// In priority order; empty means both, exact first.
    pub strategies: Vec<Strategy>,
    pub max_results: usize,
}

/// What an insert stores.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub prompt: String,
    pub response: String,
    pub attributes: BTreeMap<String, String>,
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub entry: EntryRecord,
    pub similarity: f32,
    pub strategy: Strategy,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One consistent view of a cache: slot table and index always change together.
struct Generation {
    index: VectorIndex,
    table: RwLock<SlotTable>,
}

struct CacheState {
    /// Inserts hold it shared; flush and delete-by-attributes hold it exclusively, so
    /// no insert can land half in a generation that is being replaced.
    gate: tokio::sync::RwLock<()>,
    current: RwLock<Arc<Generation>>,
}

pub struct CacheService {
    store: Store,
    embedder: Embedder,
    config: CacheConfig,
    caches: RwLock<HashMap<String, Arc<CacheState>>>,
}

impl CacheService {
    /// Builds every cache's index from the store (vectors are read, never recomputed).
    pub fn open(store: Store, embedder: Embedder, config: CacheConfig) -> Result<Self, CacheError> {
        let service = Self {
            store,
            embedder,
            config,
            caches: RwLock::new(HashMap::new()),
        };
        let now = now_ms();
        let mut expired: Vec<(String, EntryId)> = Vec::new();
        let mut loaded = 0usize;
        for item in service.store.scan() {
            let (record, vector) = item?;
            if record.expires_at_ms.is_some_and(|t| t <= now) {
                expired.push((record.cache_id.clone(), record.id));
                continue;
            }
            let state = service.state_or_create(&record.cache_id);
            let generation = state.generation();
            register(&generation, &record, &vector)?;
            loaded += 1;
        }
        for (cache_id, id) in &expired {
            service.store.remove(cache_id, std::slice::from_ref(id))?;
        }
        tracing::info!(
            entries = loaded,
            expired = expired.len(),
            caches = service.cache_count(),
            "indexes loaded from the store"
        );
        Ok(service)
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn cache_count(&self) -> usize {
        self.caches.read().map(|c| c.len()).unwrap_or(0)
    }

    fn state(&self, cache_id: &str) -> Option<Arc<CacheState>> {
        self.caches.read().ok()?.get(cache_id).cloned()
    }

    fn state_or_create(&self, cache_id: &str) -> Arc<CacheState> {
        if let Some(state) = self.state(cache_id) {
            return state;
        }
        let mut caches = self.caches.write().unwrap_or_else(|p| p.into_inner());
        caches
            .entry(cache_id.to_string())
            .or_insert_with(|| Arc::new(CacheState::new(self.dimensions(), &self.config)))
            .clone()
    }

    fn dimensions(&self) -> usize {
        self.embedder.info().dimensions
    }

    /// Stores an entry; when this returns it is durable (fsynced).
    pub async fn insert(&self, cache_id: &str, new: NewEntry) -> Result<EntryId, CacheError> {
        let embedded = self.embedder.embed(new.prompt.clone()).await?;
        let now = now_ms();
        let ttl = new.ttl_ms.or(self.config.default_ttl_ms);
        let record = EntryRecord {
            id: EntryId::new(),
            cache_id: cache_id.to_string(),
            prompt_hash: prompt_hash(&new.prompt),
            prompt: new.prompt,
            response: new.response,
            attributes: new.attributes,
            created_at_ms: now,
            expires_at_ms: ttl.map(|t| now.saturating_add(t)),
            hits: 0,
        };
        let state = self.state_or_create(cache_id);
        let _gate = state.gate.read().await;
        self.store.insert(&record, &embedded.vector)?;
        self.store.flush().await?;
        let generation = state.generation();
        if let Err(e) = register(&generation, &record, &embedded.vector) {
            // Keep store and index in agreement: an entry we cannot index is not kept.
            self.store.remove(cache_id, &[record.id])?;
            return Err(e);
        }
        Ok(record.id)
    }

    /// Exact first (no model run), then semantic, as the query's strategies say.
    pub async fn search(&self, cache_id: &str, query: &Query) -> Result<Vec<Hit>, CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok(Vec::new());
        };
        let generation = state.generation();
        let strategies = if query.strategies.is_empty() {
            vec![Strategy::Exact, Strategy::Semantic]
        } else {
            query.strategies.clone()
        };
        let threshold = query
            .similarity_threshold
            .unwrap_or(self.config.similarity_threshold);
        let now = now_ms();
        let mut found: Vec<(usize, f32, Strategy)> = Vec::new();
        for strategy in strategies {
            if found.len() >= query.max_results {
                break;
            }
            let wanted = query.max_results - found.len();
            let taken = |slot: usize| found.iter().any(|(s, _, _)| *s == slot);
            let more: Vec<(usize, f32)> = match strategy {
                Strategy::Exact => {
                    let hash = prompt_hash(&query.prompt);
                    let table = generation.read();
                    table
                        .exact_matches(&hash, &query.attributes, now)
                        .into_iter()
                        .filter(|slot| !taken(*slot))
                        .take(wanted)
                        .map(|slot| (slot, 1.0))
                        .collect()
                }
                Strategy::Semantic => {
                    if generation.read().live() == 0 {
                        continue;
                    }
                    let vector = self.embedder.embed(query.prompt.clone()).await?.vector;
                    self.nearest(
                        cache_id,
                        &generation,
                        &vector,
                        &query.attributes,
                        wanted + found.len(),
                        now,
                    )?
                    .into_iter()
                    .filter(|(slot, sim)| *sim >= threshold && !taken(*slot))
                    .take(wanted)
                    .collect()
                }
            };
            found.extend(more.into_iter().map(|(slot, sim)| (slot, sim, strategy)));
        }

        let mut hits = Vec::with_capacity(found.len());
        for (slot, similarity, strategy) in found {
            let Some(id) = generation.read().entry_id(slot) else {
                continue;
            };
            // The entry may have been deleted since the index answered.
            let Some(entry) = self.store.get(cache_id, &id)? else {
                continue;
            };
            if let Err(e) = self.store.record_hit(cache_id, &id) {
                tracing::warn!(error = %e, "could not count a hit");
            }
            hits.push(Hit {
                entry,
                similarity: similarity.clamp(0.0, 1.0),
                strategy,
            });
        }
        Ok(hits)
    }

    /// The `k` live, in-scope slots nearest to `vector`, with their similarity.
    fn nearest(
        &self,
        cache_id: &str,
        generation: &Generation,
        vector: &[f32],
        attributes: &BTreeMap<String, String>,
        k: usize,
        now: u64,
    ) -> Result<Vec<(usize, f32)>, CacheError> {
        let table = generation.read();
        if let Some(candidates) = table.scope_candidates(attributes) {
            if candidates.len() <= self.config.brute_force_limit {
                let ids: Vec<(usize, EntryId)> = candidates
                    .into_iter()
                    .filter(|slot| table.visible(*slot, attributes, now))
                    .filter_map(|slot| table.entry_id(slot).map(|id| (slot, id)))
                    .collect();
                drop(table);
                let mut scored = Vec::with_capacity(ids.len());
                for (slot, id) in ids {
                    if let Some(v) = self.store.get_vector(cache_id, &id)? {
                        scored.push((slot, dot(vector, &v)));
                    }
                }
                scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                scored.truncate(k);
                return Ok(scored);
            }
        }
        let keep = |slot: usize| table.visible(slot, attributes, now);
        let found = generation.index.search(vector, k, &keep)?;
        Ok(found.into_iter().map(|n| (n.slot, n.similarity)).collect())
    }

    pub async fn delete(&self, cache_id: &str, id: &EntryId) -> Result<(), CacheError> {
        let state = self.state(cache_id).ok_or(CacheError::NotFound)?;
        let _gate = state.gate.read().await;
        let removed = self.store.remove(cache_id, &[*id])?;
        state.generation().write().kill_entry(id);
        if removed == 0 {
            return Err(CacheError::NotFound);
        }
        self.store.flush().await?;
        Ok(())
    }

    /// Deletes every entry whose attributes contain all of `attributes`.
    pub async fn delete_matching(
        &self,
        cache_id: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<usize, CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok(0);
        };
        let _gate = state.gate.write().await;
        let generation = state.generation();
        let ids = generation.read().matching_ids(attributes);
        let removed = self.store.remove(cache_id, &ids)?;
        {
            let mut table = generation.write();
            for id in &ids {
                table.kill_entry(id);
            }
        }
        self.store.flush().await?;
        Ok(removed)
    }

    /// Empties a cache: store entries removed, index replaced by an empty one.
    pub async fn flush_cache(&self, cache_id: &str) -> Result<usize, CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok(0);
        };
        let _gate = state.gate.write().await;
        let removed = self.store.remove_cache(cache_id)?;
        state.replace(Generation::new(self.dimensions(), &self.config));
        self.store.flush().await?;
        Ok(removed)
    }

    /// Removes expired entries from the store and tombstones them; returns how many.
    pub async fn sweep_expired(&self) -> Result<usize, CacheError> {
        let now = now_ms();
        let states: Vec<(String, Arc<CacheState>)> = match self.caches.read() {
            Ok(c) => c.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => return Ok(0),
        };
        let mut total = 0;
        for (cache_id, state) in states {
            let generation = state.generation();
            let expired = generation.read().expired_ids(now);
            if expired.is_empty() {
                continue;
            }
            total += self.store.remove(&cache_id, &expired)?;
            let mut table = generation.write();
            for id in &expired {
                table.kill_entry(id);
            }
        }
        if total > 0 {
            self.store.flush().await?;
        }
        Ok(total)
    }
}

impl CacheState {
    fn new(dimensions: usize, config: &CacheConfig) -> Self {
        Self {
            gate: tokio::sync::RwLock::new(()),
            current: RwLock::new(Arc::new(Generation::new(dimensions, config))),
        }
    }

    fn generation(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, generation: Generation) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(generation);
    }
}

impl Generation {
    fn new(dimensions: usize, config: &CacheConfig) -> Self {
        Self {
            index: VectorIndex::new(dimensions, 0, config.index),
            table: RwLock::new(SlotTable::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SlotTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SlotTable> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Adds an entry to a generation: reserve a slot, index it, then make it visible.
fn register(
    generation: &Generation,
    record: &EntryRecord,
    vector: &[f32],
) -> Result<(), CacheError> {
    let slot = generation.write().reserve(Slot::from_record(record));
    generation.index.insert(slot, vector)?;
    generation.write().publish(slot);
    Ok(())
}
