//! The cache core: scope, exact and semantic lookup, inserts, deletes and expiry.
//!
//! This is the only module that combines the engines: the embedder (`embed`), the
//! durable store (`store`) and the per-cache vector index (`index`). The store is the
//! source of truth; each cache's in-memory [`Generation`] (slot table + HNSW index) is
//! derived from it and rebuilt from it at start-up without re-embedding anything.

pub mod bound;
pub mod chat;
pub mod evict;
mod learn;
mod normalize;
mod recent;
pub mod stats;
mod table;
pub mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::embed::{EmbedError, Embedded, Embedder};
use crate::index::{dot, IndexError, IndexParams};
use crate::metrics::metrics;
use crate::store::{CacheSettings, EntryId, EntryRecord, FeedbackRecord, Store, StoreError};
pub use crate::vectors::SaveWhen;
use crate::vectors::{self, on_every_core, IndexedSet};

use evict::Policy;
pub use learn::answers_agree_at;
pub use normalize::{normalize_prompt, prompt_hash};
use recent::RecentAnswers;
use stats::{Reason, Stats, StatsSnapshot};
use table::{Slot, SlotTable};
pub use verify::{Rejection, VerifyRules};

/// A query this close to one reported wrong for an entry is refused that entry.
const REPORTED_SIMILARITY: f32 = 0.9;
/// A query this close to one confirmed correct for an entry skips the lexical rules.
const CONFIRMED_SIMILARITY: f32 = 0.95;
/// Feedback examples kept per entry and kind (oldest dropped first).
const MAX_FEEDBACK_EXAMPLES: usize = 32;

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
    #[error("no recent lookup was answered by this entry; send the prompt it answered")]
    NoRecentQuery,
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
    pub verify: VerifyRules,
    pub eviction: Policy,
    /// Server-wide ceilings over all caches together.
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Where each cache's HNSW graph is saved so a restart need not rebuild it; `None`
    /// rebuilds every index from the store at start-up.
    pub index_save_dir: Option<PathBuf>,
    /// `maxErrorRate` labels: a fresh answer agrees with the cached one when their
    /// embeddings are at least this close (and the lexical rules agree).
    pub answer_similarity: f32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            similarity_threshold: 0.9,
            default_ttl_ms: None,
            index: IndexParams::default(),
            brute_force_limit: 1024,
            verify: VerifyRules::default(),
            eviction: Policy::Lfu,
            max_entries: None,
            max_bytes: None,
            index_save_dir: None,
            answer_similarity: 0.9,
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
    /// Report every candidate considered and why it was or was not served.
    pub explain: bool,
    /// Refuse (as a full queue) rather than wait longer than this for the embedding.
    pub max_queue_wait: Option<std::time::Duration>,
    /// The prompt's embedding when the caller has it already (the gateway embeds a
    /// prompt once for its guards, router and cache).
    pub embedded: Option<Embedded>,
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

/// One candidate a lookup looked at, for `explain`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Considered {
    pub id: String,
    pub prompt: String,
    pub similarity: f32,
    pub strategy: Strategy,
    pub served: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
    /// With `maxErrorRate`: the estimate and the decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<learn::Explained>,
}

impl Considered {
    /// A semantic candidate the lookup did not serve, and why.
    fn rejected(entry: EntryRecord, similarity: f32, rejected: Rejection) -> Self {
        Self {
            id: entry.id.to_string(),
            prompt: entry.prompt,
            similarity: similarity.clamp(0.0, 1.0),
            strategy: Strategy::Semantic,
            served: false,
            rejected: Some(rejected),
            estimate: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SearchOutcome {
    pub hits: Vec<Hit>,
    /// Filled only when the query asked to explain.
    pub considered: Vec<Considered>,
    /// The prompt's embedding, when the lookup ran the model: a caller that stores the
    /// answer after a miss passes it back to [`CacheService::insert_embedded`].
    pub embedded: Option<Embedded>,
    /// With `maxErrorRate`: the candidate this miss explores; the answer stored next for
    /// the prompt labels it.
    pub explore: Option<EntryId>,
}

/// Cache ids: `[A-Za-z0-9._-]{1,128}`, whichever edge names them.
pub fn valid_cache_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One consistent view of a cache: slot table and index always change together.
type Generation = vectors::Generation<SlotTable>;
type SavedGraph = vectors::SavedGraph<SlotTable>;

struct CacheState {
    /// The index and slot table, with the gate inserts hold shared and swaps (flush,
    /// delete-by-attributes, rebuild, save) exclusively.
    set: IndexedSet<SlotTable>,
    settings: RwLock<CacheSettings>,
    stats: Stats,
    /// Held while an entry is made visible and the cache brought back within its
    /// limits, so the live count never exceeds them, even for a moment.
    capacity: Mutex<()>,
    learner: learn::Learner,
}

pub struct CacheService {
    store: Store,
    embedder: Embedder,
    config: CacheConfig,
    caches: RwLock<HashMap<String, Arc<CacheState>>>,
    recent: Mutex<RecentAnswers>,
    explorations: Mutex<learn::Explorations>,
}

/// Whether the parts of two prompts the model did not see (past its window) agree:
/// the normalised prompts must share a suffix covering both unseen parts. Prompts within
/// the window always agree.
fn tails_agree(
    query: &str,
    query_end: Option<usize>,
    entry: &str,
    entry_end: Option<usize>,
) -> bool {
    if query_end.is_none() && entry_end.is_none() {
        return true;
    }
    let unseen = |text: &str, end: Option<usize>| {
        end.and_then(|at| text.get(at..))
            .map(|tail| normalize_prompt(tail).chars().count())
            .unwrap_or(0)
    };
    let needed = unseen(query, query_end).max(unseen(entry, entry_end));
    let (q, e) = (normalize_prompt(query), normalize_prompt(entry));
    let common = q
        .chars()
        .rev()
        .zip(e.chars().rev())
        .take_while(|(a, b)| a == b)
        .count();
    common >= needed
}

impl CacheService {
    /// Builds every cache's index from the store (vectors are read, never recomputed).
    pub fn open(store: Store, embedder: Embedder, config: CacheConfig) -> Result<Self, CacheError> {
        let service = Self {
            store,
            embedder,
            config,
            caches: RwLock::new(HashMap::new()),
            recent: Mutex::new(RecentAnswers::default()),
            explorations: Mutex::new(learn::Explorations::default()),
        };
        for item in service.store.scan_settings() {
            let (cache_id, settings) = item?;
            *service.state_or_create(&cache_id).settings_mut() = settings;
        }
        let started = Instant::now();
        // Saved graphs load on a thread per core while this thread reads the store (one
        // sequential scan); the two are most of a restart, and neither waits for the other.
        let (saved_graphs, scanned) = std::thread::scope(|scope| {
            let graphs = scope.spawn(|| {
                let graphs = service.load_saved_indexes();
                (graphs, started.elapsed().as_millis() as u64)
            });
            let scanned = service.read_entries(now_ms());
            let graphs = graphs
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (graphs, scanned)
        });
        let (mut saved_graphs, graphs_ms) = saved_graphs;
        let (by_cache, expired) = scanned?;
        let scanned_ms = started.elapsed().as_millis() as u64;
        // Each cache's entries take their saved slots; caches in parallel.
        let mut caches: Vec<(String, Vec<Slot>, Option<SavedGraph>)> = by_cache
            .into_iter()
            .map(|(cache_id, slots)| {
                let saved = saved_graphs.remove(&cache_id);
                (cache_id, slots, saved)
            })
            .collect();
        caches.extend(
            saved_graphs
                .into_iter()
                .map(|(cache_id, saved)| (cache_id, Vec::new(), Some(saved))),
        );
        let matched = on_every_core(caches, |(cache_id, slots, saved)| {
            let Some((generation, mut waiting)) = saved else {
                return (cache_id, None, slots, 0);
            };
            let mut unsaved = Vec::new();
            let mut from_saved = 0;
            let mut table = generation.write();
            for slot in slots {
                match waiting.remove(&slot.id()) {
                    Some(n) => {
                        table.fill(n, slot);
                        table.publish(n);
                        from_saved += 1;
                    }
                    None => unsaved.push(slot),
                }
            }
            drop(table);
            (cache_id, Some(generation), unsaved, from_saved)
        });
        // Entries no saved graph holds, by cache, as the scan made their slots.
        let mut unsaved: BTreeMap<String, Vec<Slot>> = BTreeMap::new();
        let (mut loaded, mut from_saved) = (0usize, 0usize);
        for (cache_id, generation, unsaved_slots, saved_count) in matched {
            loaded += unsaved_slots.len() + saved_count;
            from_saved += saved_count;
            if let Some(generation) = generation {
                if generation.read().live() == 0 {
                    if let Some(root) = &service.config.index_save_dir {
                        vectors::saved::remove(root, &cache_id);
                    }
                } else {
                    service
                        .state_or_create(&cache_id)
                        .set
                        .adopt_loaded(generation);
                }
            }
            if !unsaved_slots.is_empty() {
                unsaved.insert(cache_id, unsaved_slots);
            }
        }
        service.insert_unsaved(unsaved)?;
        for item in service.store.scan_feedback() {
            let (cache_id, id, feedback) = item?;
            if let Some(state) = service.state(&cache_id) {
                state
                    .generation()
                    .write()
                    .set_feedback(&id, Arc::new(feedback));
            }
        }
        for (_, state) in service.all_states() {
            state.learner.refit(&state.generation().read());
        }
        for (cache_id, id) in &expired {
            service.store.remove(cache_id, std::slice::from_ref(id))?;
        }
        let m = metrics();
        m.startup_entries
            .with_label_values(&["saved_index"])
            .set(from_saved as i64);
        m.startup_entries
            .with_label_values(&["reinserted"])
            .set((loaded - from_saved) as i64);
        tracing::info!(
            entries = loaded,
            from_saved_indexes = from_saved,
            inserted = loaded - from_saved,
            expired = expired.len(),
            graphs_loaded_ms = graphs_ms,
            store_scanned_ms = scanned_ms,
            total_ms = started.elapsed().as_millis() as u64,
            caches = service.cache_count(),
            "indexes loaded from the store"
        );
        Ok(service)
    }

    /// Inserts, at start-up, the entries no saved graph holds (all of them on a first
    /// start, those written after the last save otherwise). One cache's inserts take
    /// turns (hnsw_rs), so caches are spread over a thread per core.
    /// Only the vectors are read: the slots come from the summaries scan (no record is
    /// decoded, and attribute sets stay shared as the scan made them).
    fn insert_unsaved(&self, unsaved: BTreeMap<String, Vec<Slot>>) -> Result<(), CacheError> {
        let load_cache = |cache_id: &str, slots: Vec<Slot>| -> Result<(), CacheError> {
            let generation = self.state_or_create(cache_id).generation();
            for slot in slots {
                let id = slot.id();
                let Some(vector) = self.store.get_vector(cache_id, &id)? else {
                    return Err(StoreError::Corrupt {
                        key: id.to_string(),
                        reason: "entry has no vector".into(),
                    }
                    .into());
                };
                register_slot(&generation, slot, &vector)?;
            }
            Ok(())
        };
        on_every_core(unsaved.into_iter().collect(), |(cache_id, slots)| {
            load_cache(&cache_id, slots)
        })
        .into_iter()
        .collect()
    }

    /// Every stored entry as a (not yet visible) slot, by cache, and the entries that
    /// expired while the service was down.
    #[allow(clippy::type_complexity)]
    fn read_entries(
        &self,
        now: u64,
    ) -> Result<(HashMap<String, Vec<Slot>>, Vec<(String, EntryId)>), CacheError> {
        let dimensions = self.dimensions();
        let mut by_cache: HashMap<String, Vec<Slot>> = HashMap::new();
        let mut expired = Vec::new();
        // Entries share a few attribute sets; one copy of each from the start keeps a
        // map per entry from being allocated, kept until the tables share them, and
        // freed between longer-lived allocations (measured: +60 MiB at 100k entries).
        let mut attribute_sets: HashSet<Arc<BTreeMap<String, String>>> = HashSet::new();
        for item in self.store.scan_summaries() {
            let mut summary = item?;
            if summary.expires_at_ms.is_some_and(|t| t <= now) {
                expired.push((summary.cache_id, summary.id));
                continue;
            }
            // Keys are grouped by cache, so the cache id is copied once per cache.
            let cache_id = std::mem::take(&mut summary.cache_id);
            let attributes = match attribute_sets.get(&summary.attributes) {
                Some(shared) => shared.clone(),
                None => {
                    let shared = Arc::new(std::mem::take(&mut summary.attributes));
                    attribute_sets.insert(shared.clone());
                    shared
                }
            };
            let slot = Slot::from_summary(summary, attributes, dimensions);
            match by_cache.get_mut(&cache_id) {
                Some(slots) => slots.push(slot),
                None => {
                    by_cache.insert(cache_id, vec![slot]);
                }
            }
        }
        Ok((by_cache, expired))
    }

    /// Every cache's saved graph that loads cleanly, with its slots waiting for their
    /// entries (matched by id after the store is scanned). Unusable saves are removed
    /// and their caches rebuilt from the store.
    fn load_saved_indexes(&self) -> HashMap<String, SavedGraph> {
        match &self.config.index_save_dir {
            Some(root) => {
                let dimensions = self.dimensions();
                vectors::load_saved(root, self.config.index, |_| Some(dimensions))
            }
            None => HashMap::new(),
        }
    }

    /// Saves the HNSW graphs of the caches `when` selects, so the next start loads them
    /// instead of re-inserting every vector. Returns how many caches were saved.
    pub async fn save_indexes(&self, when: SaveWhen) -> Result<usize, CacheError> {
        let Some(root) = self.config.index_save_dir.clone() else {
            return Ok(0);
        };
        let mut saved_count = 0;
        for (cache_id, state) in self.all_states() {
            if state.set.save_if_stale(&root, &cache_id, when).await {
                saved_count += 1;
                // A save froze the live graph into a segment.
                self.publish_gauges(&cache_id, &state);
            }
        }
        Ok(saved_count)
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

    /// A cache's settings (the server defaults for a cache never configured).
    pub fn settings(&self, cache_id: &str) -> CacheSettings {
        self.state(cache_id)
            .map(|s| s.settings().clone())
            .unwrap_or_default()
    }

    /// Replaces a cache's settings, creating the cache if needed; durable on return.
    pub async fn put_settings(
        &self,
        cache_id: &str,
        settings: CacheSettings,
    ) -> Result<(), CacheError> {
        let state = self.state_or_create(cache_id);
        self.store.put_settings(cache_id, &settings)?;
        self.store.flush().await?;
        *state.settings_mut() = settings;
        // Lowered limits take effect now, not at the next insert.
        let evicted = {
            let _gate = state.set.gate.read().await;
            let _turn = state.capacity.lock().unwrap_or_else(|p| p.into_inner());
            self.evict_to_fit(cache_id, &state, &state.generation(), 0)?
        };
        if evicted > 0 {
            self.store.flush().await?;
            self.publish_gauges(cache_id, &state);
        }
        Ok(())
    }

    fn threshold(&self, state: &CacheState, query: &Query) -> f32 {
        query
            .similarity_threshold
            .or(state.settings().similarity_threshold)
            .unwrap_or(self.config.similarity_threshold)
    }

    /// Stores an entry; when this returns it is durable (fsynced).
    pub async fn insert(&self, cache_id: &str, new: NewEntry) -> Result<EntryId, CacheError> {
        let embedded = self.embedder.embed(new.prompt.clone()).await?;
        self.insert_embedded(cache_id, new, embedded).await
    }

    /// As [`insert`](Self::insert), with the prompt's embedding already computed (by the
    /// lookup that missed), so the model runs once per request.
    pub async fn insert_embedded(
        &self,
        cache_id: &str,
        new: NewEntry,
        embedded: Embedded,
    ) -> Result<EntryId, CacheError> {
        let state = self.state_or_create(cache_id);
        let now = now_ms();
        let ttl = new
            .ttl_ms
            .or(state.settings().default_ttl_millis)
            .or(self.config.default_ttl_ms);
        let record = EntryRecord {
            id: EntryId::new(),
            cache_id: cache_id.to_string(),
            prompt_hash: prompt_hash(&new.prompt),
            window_end: embedded.truncated_at,
            prompt: new.prompt,
            response: new.response,
            attributes: new.attributes,
            created_at_ms: now,
            expires_at_ms: ttl.map(|t| now.saturating_add(t)),
        };
        let _gate = state.set.gate.read().await;
        self.store.insert(&record, &embedded.vector)?;
        self.store.flush().await?;
        let generation = state.generation();
        let evicted = {
            let _turn = state.capacity.lock().unwrap_or_else(|p| p.into_inner());
            // Make room first, so the live count never passes the limits.
            let incoming = table::entry_bytes(&record, embedded.vector.len());
            let evicted = self.evict_to_fit(cache_id, &state, &generation, incoming)?;
            if let Err(e) = register(&generation, &record, &embedded.vector) {
                // Keep store and index in agreement: an entry we cannot index is not kept.
                self.store.remove(cache_id, &[record.id])?;
                return Err(e);
            }
            evicted
        };
        state.stats.insert();
        metrics()
            .inserts
            .with_label_values(&[&metrics().cache_label(cache_id)])
            .inc();
        if evicted > 0 {
            // Evictions need not be acknowledged, but the next flush covers them anyway.
            self.store.flush().await?;
        }
        self.publish_gauges(cache_id, &state);
        self.label_exploration(
            cache_id,
            &state,
            &record.prompt,
            &record.attributes,
            &record.response,
        );
        Ok(record.id)
    }

    /// Evicts entries until the cache and the server are within their limits with room
    /// for an entry of `incoming` bytes (0: no entry coming); returns how many. Called
    /// with the cache's capacity lock held.
    fn evict_to_fit(
        &self,
        cache_id: &str,
        state: &CacheState,
        generation: &Generation,
        incoming: u64,
    ) -> Result<usize, CacheError> {
        let (max_entries, max_bytes) = {
            let settings = state.settings();
            (settings.max_entries, settings.max_bytes)
        };
        let global = |f: fn(&SlotTable) -> u64| -> u64 {
            self.all_states()
                .iter()
                .map(|(_, s)| f(&s.generation().read()))
                .sum()
        };
        let adding = u64::from(incoming > 0);
        let mut evicted = 0;
        let mut rng = rand::thread_rng();
        loop {
            let (live, bytes) = {
                let t = generation.read();
                (t.live() as u64, t.live_bytes())
            };
            let over = max_entries.is_some_and(|m| live + adding > m)
                || max_bytes.is_some_and(|m| bytes + incoming > m)
                || self
                    .config
                    .max_entries
                    .is_some_and(|m| global(|t| t.live() as u64) + adding > m)
                || self
                    .config
                    .max_bytes
                    .is_some_and(|m| global(SlotTable::live_bytes) + incoming > m);
            if !over || live == 0 {
                break;
            }
            let Some(victim) = generation.read().victim(self.config.eviction, &mut rng) else {
                break;
            };
            self.store.remove(cache_id, &[victim])?;
            generation.write().kill_entry(&victim);
            evicted += 1;
        }
        if evicted > 0 {
            state.stats.evicted(Reason::Capacity, evicted as u64);
            self.count_evictions(cache_id, Reason::Capacity, evicted);
        }
        Ok(evicted)
    }

    fn all_states(&self) -> Vec<(String, Arc<CacheState>)> {
        match self.caches.read() {
            Ok(c) => c.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn count_evictions(&self, cache_id: &str, reason: Reason, n: usize) {
        let label = metrics().cache_label(cache_id);
        metrics()
            .evictions
            .with_label_values(&[&label, reason.label()])
            .inc_by(n as u64);
    }

    fn publish_gauges(&self, cache_id: &str, state: &CacheState) {
        let (live, bytes, tombstones, segments) = {
            let generation = state.generation();
            let t = generation.read();
            (
                t.live(),
                t.live_bytes(),
                t.tombstones(),
                generation.index.segments(),
            )
        };
        let m = metrics();
        let label = m.cache_label(cache_id);
        m.entries.with_label_values(&[&label]).set(live as i64);
        m.bytes.with_label_values(&[&label]).set(bytes as i64);
        m.tombstones
            .with_label_values(&[&label])
            .set(tombstones as i64);
        m.index_segments
            .with_label_values(&[&label])
            .set(segments as i64);
    }

    /// A cache's counters and sizes; `None` for a cache never used.
    pub fn stats(&self, cache_id: &str) -> Option<StatsSnapshot> {
        self.state(cache_id).map(|state| snapshot(&state))
    }

    /// Every cache with its stats, sorted by id.
    pub fn list_caches(&self) -> Vec<(String, StatsSnapshot)> {
        let mut all: Vec<(String, StatsSnapshot)> = self
            .all_states()
            .into_iter()
            .map(|(id, state)| (id, snapshot(&state)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Exact first (no model run), then semantic through the verifier, as the query's
    /// strategies say.
    pub async fn search(&self, cache_id: &str, query: &Query) -> Result<SearchOutcome, CacheError> {
        let started = Instant::now();
        let Some(state) = self.state(cache_id) else {
            metrics()
                .lookups
                .with_label_values(&[&metrics().cache_label(cache_id), "miss", "none"])
                .inc();
            return Ok(SearchOutcome::default());
        };
        let generation = state.generation();
        let strategies = if query.strategies.is_empty() {
            vec![Strategy::Exact, Strategy::Semantic]
        } else {
            query.strategies.clone()
        };
        let bounded = state.settings().max_error_rate;
        let threshold = match bounded {
            // The learned bound decides; only a threshold the request names still holds.
            Some(_) => query.similarity_threshold.unwrap_or(learn::BOUNDED_FLOOR),
            None => self.threshold(&state, query),
        };
        let now = now_ms();
        let mut outcome = SearchOutcome::default();
        let mut served: Vec<usize> = Vec::new();
        for strategy in strategies {
            if outcome.hits.len() >= query.max_results {
                break;
            }
            match strategy {
                Strategy::Exact => {
                    let slots = generation.read().exact_matches(
                        &prompt_hash(&query.prompt),
                        &query.attributes,
                        now,
                    );
                    for slot in slots {
                        if outcome.hits.len() >= query.max_results {
                            break;
                        }
                        if served.contains(&slot) {
                            continue;
                        }
                        let Some(entry) = self.entry_at(cache_id, &generation, slot)? else {
                            continue;
                        };
                        served.push(slot);
                        self.serve(&mut outcome, query, entry, 1.0, Strategy::Exact);
                    }
                }
                Strategy::Semantic => {
                    if generation.read().live() == 0 {
                        continue;
                    }
                    self.semantic(
                        cache_id,
                        &state,
                        &generation,
                        query,
                        threshold,
                        now,
                        &mut served,
                        &mut outcome,
                    )
                    .await?;
                }
            }
        }
        for hit in &outcome.hits {
            if let Err(e) = self.store.record_hit(cache_id, &hit.entry.id) {
                tracing::warn!(error = %e, "could not count a hit");
            }
            if let Ok(mut recent) = self.recent.lock() {
                recent.remember(cache_id, hit.entry.id, &query.prompt);
            }
        }
        {
            let table = generation.read();
            for slot in &served {
                table.touch(*slot);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (result, strategy) = match outcome.hits.first() {
            Some(hit) => {
                state.stats.hit(hit.strategy == Strategy::Exact);
                (
                    "hit",
                    if hit.strategy == Strategy::Exact {
                        "exact"
                    } else {
                        "semantic"
                    },
                )
            }
            None => {
                state.stats.miss();
                ("miss", "none")
            }
        };
        state.stats.latency(elapsed);
        let m = metrics();
        m.lookups
            .with_label_values(&[&m.cache_label(cache_id), result, strategy])
            .inc();
        m.lookup_duration
            .with_label_values(&[strategy])
            .observe(elapsed);
        Ok(outcome)
    }

    fn serve(
        &self,
        outcome: &mut SearchOutcome,
        query: &Query,
        entry: EntryRecord,
        similarity: f32,
        strategy: Strategy,
    ) {
        let similarity = similarity.clamp(0.0, 1.0);
        if query.explain {
            outcome.considered.push(Considered {
                id: entry.id.to_string(),
                prompt: entry.prompt.clone(),
                similarity,
                strategy,
                served: true,
                rejected: None,
                estimate: None,
            });
        }
        outcome.hits.push(Hit {
            entry,
            similarity,
            strategy,
        });
    }

    /// The entry behind a live slot, if the store still has it.
    fn entry_at(
        &self,
        cache_id: &str,
        generation: &Generation,
        slot: usize,
    ) -> Result<Option<EntryRecord>, CacheError> {
        let Some(id) = generation.read().entry_id(slot) else {
            return Ok(None);
        };
        Ok(self.store.get(cache_id, &id)?)
    }

    #[allow(clippy::too_many_arguments)]
    async fn semantic(
        &self,
        cache_id: &str,
        state: &CacheState,
        generation: &Generation,
        query: &Query,
        threshold: f32,
        now: u64,
        served: &mut Vec<usize>,
        outcome: &mut SearchOutcome,
    ) -> Result<(), CacheError> {
        let embedded = match &query.embedded {
            Some(embedded) => embedded.clone(),
            None => {
                if query
                    .max_queue_wait
                    .is_some_and(|limit| self.embedder.expected_wait() > limit)
                {
                    return Err(EmbedError::QueueFull.into());
                }
                self.embedder.embed(query.prompt.clone()).await?
            }
        };
        let vector = embedded.vector.clone();
        let query_end = embedded.truncated_at;
        outcome.embedded = Some(embedded);
        let query_sig = verify::Signature::of(&query.prompt);
        // A few more than asked: some may be confirmed by feedback below the threshold.
        let k = (query.max_results * 2).max(4);
        let candidates = self.nearest(cache_id, generation, &vector, &query.attributes, k, now)?;
        let bounded = state.settings().max_error_rate;
        for (at, &(slot, similarity)) in candidates.iter().enumerate() {
            if outcome.hits.len() >= query.max_results {
                break;
            }
            if served.contains(&slot) {
                continue;
            }
            let feedback = generation.read().feedback(slot);
            let best = |examples: &[Vec<f32>]| {
                examples
                    .iter()
                    .map(|e| dot(&vector, e))
                    .fold(f32::MIN, f32::max)
            };
            let confirmed = feedback
                .as_ref()
                .is_some_and(|f| best(&f.confirmed) >= CONFIRMED_SIMILARITY);
            let reported = feedback
                .as_ref()
                .map(|f| best(&f.wrong))
                .unwrap_or(f32::MIN);
            if similarity < threshold && !confirmed {
                // Candidates come best first: nothing further can pass either, unless
                // confirmed by feedback, which only an explained lookup needs to show.
                if query.explain {
                    self.explain_rejection(
                        cache_id,
                        generation,
                        slot,
                        similarity,
                        Rejection::BelowThreshold { threshold },
                        outcome,
                    )?;
                }
                continue;
            }
            let Some(entry) = self.entry_at(cache_id, generation, slot)? else {
                continue;
            };
            let rejection = if reported >= REPORTED_SIMILARITY {
                Some(Rejection::ReportedWrong {
                    similarity: reported,
                })
            } else if !tails_agree(&query.prompt, query_end, &entry.prompt, entry.window_end) {
                Some(Rejection::TailDiffers)
            } else if confirmed {
                None
            } else {
                verify::check(
                    &self.config.verify,
                    &query_sig,
                    &verify::Signature::of(&entry.prompt),
                )
                .err()
            };
            match (rejection, bounded.filter(|_| !confirmed)) {
                // With `maxErrorRate`, the nearest candidate the rules pass is decided by
                // the learned bound (unless feedback confirmed it), and nothing further is
                // considered.
                (None, Some(delta)) => {
                    let runner_up = candidates.get(at + 1).map(|c| c.1);
                    if self.decide_bounded(
                        cache_id, state, generation, query, &query_sig, entry, similarity,
                        runner_up, delta, outcome,
                    ) {
                        served.push(slot);
                    }
                    break;
                }
                (None, None) => {
                    served.push(slot);
                    self.serve(outcome, query, entry, similarity, Strategy::Semantic);
                }
                (Some(rejected), _) => {
                    if query.explain {
                        outcome
                            .considered
                            .push(Considered::rejected(entry, similarity, rejected));
                    }
                    // When the nearest prompt is a near-identical edit that differs in a
                    // number, a name or a negation, the query asks something the cache
                    // has not seen: what ranks below is less like it still, so serve
                    // nothing rather than a worse match.
                    if outcome.hits.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn explain_rejection(
        &self,
        cache_id: &str,
        generation: &Generation,
        slot: usize,
        similarity: f32,
        rejected: Rejection,
        outcome: &mut SearchOutcome,
    ) -> Result<(), CacheError> {
        if let Some(entry) = self.entry_at(cache_id, generation, slot)? {
            outcome
                .considered
                .push(Considered::rejected(entry, similarity, rejected));
        }
        Ok(())
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

    /// Records that an entry answered a prompt wrongly (it will not answer that prompt
    /// or its close paraphrases again) or correctly (close paraphrases of that prompt
    /// skip the lexical rules). Durable on return.
    pub async fn feedback(
        &self,
        cache_id: &str,
        id: &EntryId,
        correct: bool,
        prompt: Option<String>,
    ) -> Result<(), CacheError> {
        let state = self.state(cache_id).ok_or(CacheError::NotFound)?;
        let generation = state.generation();
        if generation.read().slot_of(id).is_none() {
            return Err(CacheError::NotFound);
        }
        let prompt = match prompt {
            Some(p) => p,
            None => self
                .recent
                .lock()
                .ok()
                .and_then(|r| r.last(cache_id, *id))
                .ok_or(CacheError::NoRecentQuery)?,
        };
        let vector = self.embedder.embed(prompt.clone()).await?.vector;
        let _gate = state.set.gate.read().await;
        let observation =
            self.feedback_observation(cache_id, &generation, id, &prompt, &vector, correct)?;
        let _one = state.learner.write_turn().await;
        let mut record: FeedbackRecord = generation
            .read()
            .feedback_of(id)
            .map(|f| (*f).clone())
            .unwrap_or_default();
        if !correct {
            state.stats.false_hit();
            metrics()
                .false_hit_reports
                .with_label_values(&[&metrics().cache_label(cache_id)])
                .inc();
        }
        let examples = if correct {
            &mut record.confirmed
        } else {
            &mut record.wrong
        };
        examples.push(vector);
        if examples.len() > MAX_FEEDBACK_EXAMPLES {
            examples.remove(0);
        }
        learn::push(&mut record, observation);
        self.store.put_feedback(cache_id, id, &record)?;
        self.store.flush().await?;
        generation.write().set_feedback(id, Arc::new(record));
        learn::refit_if_due(&state, &generation).await;
        Ok(())
    }

    pub async fn delete(&self, cache_id: &str, id: &EntryId) -> Result<(), CacheError> {
        let state = self.state(cache_id).ok_or(CacheError::NotFound)?;
        let _gate = state.set.gate.read().await;
        let removed = self.store.remove(cache_id, &[*id])?;
        state.generation().write().kill_entry(id);
        if removed == 0 {
            return Err(CacheError::NotFound);
        }
        self.store.flush().await?;
        state.stats.evicted(Reason::Deleted, 1);
        self.count_evictions(cache_id, Reason::Deleted, 1);
        self.publish_gauges(cache_id, &state);
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
        let _gate = state.set.gate.write().await;
        let removed = self.remove_matching(cache_id, &state, attributes, None, Reason::Deleted)?;
        self.store.flush().await?;
        Ok(removed)
    }

    /// Removes the live entries in scope (and created before `created_before`); the
    /// caller holds the gate exclusively.
    fn remove_matching(
        &self,
        cache_id: &str,
        state: &CacheState,
        attributes: &BTreeMap<String, String>,
        created_before: Option<u64>,
        reason: Reason,
    ) -> Result<usize, CacheError> {
        let generation = state.generation();
        let ids = generation.read().matching_ids(attributes, created_before);
        let removed = self.store.remove(cache_id, &ids)?;
        {
            let mut table = generation.write();
            for id in &ids {
                table.kill_entry(id);
            }
        }
        state.stats.evicted(reason, ids.len() as u64);
        self.count_evictions(cache_id, reason, ids.len());
        self.publish_gauges(cache_id, state);
        Ok(removed)
    }

    /// `POST /admin/caches/{id}/evict`: entries older than `older_than_ms` and in scope
    /// of `attributes`. Returns (matched, evicted); a dry run evicts nothing.
    pub async fn admin_evict(
        &self,
        cache_id: &str,
        older_than_ms: Option<u64>,
        attributes: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<(usize, usize), CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok((0, 0));
        };
        let created_before = older_than_ms.map(|age| now_ms().saturating_sub(age));
        let _gate = state.set.gate.write().await;
        let matched = state
            .generation()
            .read()
            .matching_ids(attributes, created_before)
            .len();
        if dry_run {
            return Ok((matched, 0));
        }
        let evicted =
            self.remove_matching(cache_id, &state, attributes, created_before, Reason::Admin)?;
        self.store.flush().await?;
        Ok((matched, evicted))
    }

    /// Empties a cache: store entries removed, index replaced by an empty one.
    pub async fn flush_cache(&self, cache_id: &str) -> Result<usize, CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok(0);
        };
        let _gate = state.set.gate.write().await;
        let removed = self.store.remove_cache(cache_id)?;
        state.replace(Generation::new(self.dimensions(), self.config.index));
        if let Some(root) = &self.config.index_save_dir {
            vectors::saved::remove(root, cache_id);
        }
        self.store.flush().await?;
        state.stats.evicted(Reason::Flushed, removed as u64);
        self.count_evictions(cache_id, Reason::Flushed, removed);
        self.publish_gauges(cache_id, &state);
        Ok(removed)
    }

    /// Removes expired entries from the store and tombstones them; returns how many.
    pub async fn sweep_expired(&self) -> Result<usize, CacheError> {
        let now = now_ms();
        let mut total = 0;
        for (cache_id, state) in self.all_states() {
            if state.generation().read().expired_ids(now).is_empty() {
                continue;
            }
            let _gate = state.set.gate.write().await;
            let generation = state.generation();
            let expired = generation.read().expired_ids(now);
            total += self.store.remove(&cache_id, &expired)?;
            {
                let mut table = generation.write();
                for id in &expired {
                    table.kill_entry(id);
                }
            }
            state.stats.evicted(Reason::Ttl, expired.len() as u64);
            self.count_evictions(&cache_id, Reason::Ttl, expired.len());
            self.publish_gauges(&cache_id, &state);
        }
        if total > 0 {
            self.store.flush().await?;
        }
        Ok(total)
    }

    /// Background upkeep: expire entries, and rebuild indexes whose tombstones
    /// outnumber their live points (and are enough to be worth the work).
    pub async fn maintain(&self) -> Result<(), CacheError> {
        let swept = self.sweep_expired().await?;
        if swept > 0 {
            tracing::info!(removed = swept, "expired entries swept");
        }
        for (cache_id, state) in self.all_states() {
            if state.set.needs_rebuild() {
                let removed = self.rebuild(&cache_id).await?;
                tracing::info!(cache = %cache_id, tombstones = removed, "index rebuilt");
            }
        }
        self.save_indexes(SaveWhen::Stale).await?;
        Ok(())
    }

    /// Rebuilds every cache's index without tombstones; returns tombstones removed.
    pub async fn compact(&self) -> Result<usize, CacheError> {
        let mut removed = 0;
        for (cache_id, _) in self.all_states() {
            removed += self.rebuild(&cache_id).await?;
        }
        self.store.flush().await?;
        Ok(removed)
    }

    /// Rebuilds one cache's index from the store and swaps it in atomically; searches
    /// keep using the old index meanwhile. Returns how many tombstones went away.
    pub async fn rebuild(&self, cache_id: &str) -> Result<usize, CacheError> {
        let Some(state) = self.state(cache_id) else {
            return Ok(0);
        };
        let load = |fresh: &Generation, _: &SlotTable, id: &EntryId| -> Result<(), CacheError> {
            if let (Some(record), Some(vector)) = (
                self.store.get(cache_id, id)?,
                self.store.get_vector(cache_id, id)?,
            ) {
                register(fresh, &record, &vector)?;
            }
            Ok(())
        };
        // Feedback lives in the old table only (and the store); carry it over.
        let carry = |table: &mut SlotTable, old: &SlotTable, live: &[EntryId]| {
            for id in live {
                if let Some(f) = old.feedback_of(id) {
                    table.set_feedback(id, f);
                }
            }
        };
        let removed = state
            .set
            .rebuild(self.dimensions(), self.config.index, load, carry)
            .await?;
        self.publish_gauges(cache_id, &state);
        Ok(removed)
    }
}

fn snapshot(state: &CacheState) -> StatsSnapshot {
    let generation = state.generation();
    let table = generation.read();
    state.stats.snapshot(
        table.live() as u64,
        table.live_bytes(),
        table.tombstones() as u64,
        generation.index.len() as u64,
    )
}

impl CacheState {
    fn new(dimensions: usize, config: &CacheConfig) -> Self {
        Self {
            set: IndexedSet::new(dimensions, config.index),
            settings: RwLock::new(CacheSettings::default()),
            stats: Stats::default(),
            capacity: Mutex::new(()),
            learner: learn::Learner::default(),
        }
    }

    fn generation(&self) -> Arc<Generation> {
        self.set.generation()
    }

    fn replace(&self, generation: Generation) {
        self.set.replace(generation)
    }

    fn settings(&self) -> std::sync::RwLockReadGuard<'_, CacheSettings> {
        self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    fn settings_mut(&self) -> std::sync::RwLockWriteGuard<'_, CacheSettings> {
        self.settings.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Adds an entry to a generation: reserve a slot, index it, then make it visible.
fn register(
    generation: &Generation,
    record: &EntryRecord,
    vector: &[f32],
) -> Result<(), CacheError> {
    register_slot(generation, Slot::from_record(record, vector.len()), vector)
}

fn register_slot(generation: &Generation, slot: Slot, vector: &[f32]) -> Result<(), CacheError> {
    let slot = generation.write().reserve(slot);
    generation.index.insert(slot, vector)?;
    generation.write().publish(slot);
    Ok(())
}
