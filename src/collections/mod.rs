//! Vector-search collections: named sets of points (id, vector, JSON payload) with
//! filtered nearest-neighbour search, as Qdrant's API describes them.
//!
//! The store (`store::points`) is the source of truth; each collection's in-memory
//! generation (HNSW graph + [`table::PointTable`]) is the shared persisted-set layer
//! (`vectors`) that caches use too, with the same saved graphs, tombstones and rebuilds.
//! Documents (`{"text", "model"}` in place of a vector) are embedded here, through the
//! same batching queue as cache prompts.

pub mod filter;
pub mod payload_index;
pub mod table;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::cache::{now_ms, valid_cache_id};
use crate::embed::{EmbedError, Embedder};
use crate::index::{IndexError, IndexParams, Walk};
use crate::metrics::metrics;
use crate::store::{
    CollectionRecord, EntryId, PointId, PointRecord, Store, StoreError, INTERNAL_PREFIX,
};
use crate::vectors::{self, on_every_core, Generation, IndexedSet, SaveWhen, SlotMap};
pub use filter::Filter;
use table::{Payload, PointSlot, PointTable};

#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    #[error("collection `{0}` not found")]
    NotFound(String),
    #[error("collection `{0}` already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("embedding failed: {0}")]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("index error: {0}")]
    Index(#[from] IndexError),
    #[error("internal error: {0}")]
    Internal(String),
}

type Result<T, E = CollectionError> = std::result::Result<T, E>;

fn invalid(message: impl Into<String>) -> CollectionError {
    CollectionError::Invalid(message.into())
}

/// Limits and index parameters for every collection.
#[derive(Debug, Clone)]
pub struct CollectionConfig {
    pub index: IndexParams,
    /// Where saved graphs go (`<index dir>/collections`); `None` re-inserts at start-up.
    pub save_dir: Option<PathBuf>,
    pub max_collections: usize,
    pub max_batch: usize,
    pub max_dimensions: usize,
    pub max_payload_bytes: usize,
    pub max_limit: usize,
}

impl Default for CollectionConfig {
    fn default() -> Self {
        Self {
            index: IndexParams::default(),
            save_dir: None,
            max_collections: 1000,
            max_batch: 10_000,
            max_dimensions: 4096,
            max_payload_bytes: 64 * 1024,
            max_limit: 10_000,
        }
    }
}

/// A vector, or a text for the server to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum VectorInput {
    Dense(Vec<f32>),
    Document { text: String, model: String },
}

pub struct NewPoint {
    pub id: PointId,
    pub vector: VectorInput,
    pub payload: Map<String, Value>,
}

/// What a search asks for.
#[derive(Debug, Clone)]
pub struct SearchSpec {
    pub vector: VectorInput,
    pub filter: Option<Filter>,
    pub limit: usize,
    pub offset: usize,
    pub score_threshold: Option<f32>,
    pub ef: Option<usize>,
    pub exact: bool,
}

/// A point as returned: id, payload (shared, not copied) and, for searches, the score.
#[derive(Debug, Clone)]
pub struct FoundPoint {
    pub id: PointId,
    pub payload: Payload,
    pub score: Option<f32>,
}

/// Which points an operation touches.
pub enum Selector {
    Ids(Vec<PointId>),
    Filter(Filter),
}

/// How a payload update applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadOp {
    /// Adds or replaces the given keys.
    Set,
    /// Replaces the whole payload.
    Overwrite,
}

/// Sums over every collection.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionTotals {
    pub collections: usize,
    pub points: u64,
    pub bytes: u64,
    pub index_points: u64,
}

/// A collection's description, for `GET /collections/{name}`.
pub struct CollectionInfo {
    pub record: CollectionRecord,
    pub points: usize,
    pub indexed: usize,
    pub tombstones: usize,
    /// Per indexed payload key: how many points have it.
    pub indexed_fields: Vec<(String, String, usize)>,
}

struct Collection {
    name: String,
    record: RwLock<CollectionRecord>,
    set: IndexedSet<PointTable>,
    /// Writers take turns: the store's order and the table's always agree on which
    /// version of a point is current.
    writes: Mutex<()>,
}

type PointGeneration = Generation<PointTable>;

pub struct CollectionService {
    store: Store,
    embedder: Embedder,
    config: CollectionConfig,
    collections: RwLock<HashMap<String, Arc<Collection>>>,
}

/// Scales a vector to unit length (what Cosine distance compares); refuses the
/// unscalable.
fn normalised(mut v: Vec<f32>) -> Result<Vec<f32>> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(invalid("vector holds a value that is not a finite number"));
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return Err(invalid(
            "a zero vector has no direction to compare by cosine",
        ));
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Ok(v)
}

impl CollectionService {
    /// Loads every collection: saved graphs where they match the store, the rest of
    /// the points re-inserted from their stored vectors (never re-embedded).
    pub fn open(store: Store, embedder: Embedder, config: CollectionConfig) -> Result<Self> {
        let started = Instant::now();
        let service = Self {
            store,
            embedder,
            config,
            collections: RwLock::new(HashMap::new()),
        };
        let mut records = HashMap::new();
        let mut internal = HashSet::new();
        for item in service.store.scan_collections() {
            let (name, record) = item?;
            if name.starts_with(INTERNAL_PREFIX) {
                internal.insert(name);
            } else {
                records.insert(name, record);
            }
        }
        for owner in service.store.point_owners()? {
            if !records.contains_key(&owner) && !internal.contains(&owner) {
                // A deletion that crashed midway: finish it.
                let removed = service.store.remove_orphan_points(&owner)?;
                tracing::info!(collection = %owner, points = removed, "removed points of a deleted collection");
            }
        }
        let mut saved = match &service.config.save_dir {
            Some(root) => vectors::load_saved::<PointTable>(root, service.config.index, |name| {
                records.get(name).map(|r| r.size)
            }),
            None => HashMap::new(),
        };
        let work: Vec<_> = records
            .into_iter()
            .map(|(name, record)| {
                let graph = saved.remove(&name);
                (name, record, graph)
            })
            .collect();
        let loaded = on_every_core(work, |(name, record, graph)| {
            let loaded = service.load_collection(&name, &record, graph);
            (name, record, loaded)
        });
        let mut total = 0;
        for (name, record, loaded) in loaded {
            let (generation, from_saved) = loaded?;
            total += generation.read().live();
            let collection = Collection {
                name: name.clone(),
                set: IndexedSet::new(record.size, service.config.index),
                record: RwLock::new(record),
                writes: Mutex::new(()),
            };
            if from_saved {
                collection.set.adopt_loaded(generation);
            } else {
                collection.set.replace(generation);
            }
            service.publish_gauges(&name, &collection);
            service.write_map().insert(name, Arc::new(collection));
        }
        tracing::info!(
            collections = service.read_map().len(),
            points = total,
            millis = started.elapsed().as_millis() as u64,
            "collections loaded"
        );
        Ok(service)
    }

    /// One collection's generation from its saved graph (if any) and the store.
    fn load_collection(
        &self,
        name: &str,
        record: &CollectionRecord,
        graph: Option<vectors::SavedGraph<PointTable>>,
    ) -> Result<(PointGeneration, bool)> {
        let from_saved = graph.is_some();
        let (generation, mut waiting) = graph.unwrap_or_else(|| {
            (
                Generation::new(record.size, self.config.index),
                HashMap::new(),
            )
        });
        for item in self.store.scan_points(name) {
            let point = item?;
            let slot = PointSlot::new(
                point.id,
                point.record.version,
                Arc::new(point.record.payload),
            );
            match waiting.remove(&point.record.version) {
                Some(n) => {
                    let mut table = generation.write();
                    table.fill(n, slot);
                    table.publish(n);
                }
                None => {
                    let vector =
                        self.store
                            .get_point_vector(name, &point.id)?
                            .ok_or_else(|| StoreError::Corrupt {
                                key: format!("{name}/{:?}", point.id),
                                reason: "point has no vector".into(),
                            })?;
                    register(&generation, slot, &vector)?;
                }
            }
        }
        generation.write().set_index_fields(&indexed_fields(record));
        Ok((generation, from_saved))
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Collection>>> {
        self.collections.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Collection>>> {
        self.collections.write().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Result<Arc<Collection>> {
        self.read_map()
            .get(name)
            .cloned()
            .ok_or_else(|| CollectionError::NotFound(name.to_string()))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.read_map().contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read_map().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn check_name(name: &str) -> Result<()> {
        if name.starts_with(INTERNAL_PREFIX) {
            return Err(invalid(format!(
                "collection names starting with {INTERNAL_PREFIX:?} are reserved"
            )));
        }
        if valid_cache_id(name) {
            Ok(())
        } else {
            Err(invalid(format!(
                "collection name {name:?} is invalid: 1-128 characters from A-Z a-z 0-9 . _ -"
            )))
        }
    }

    pub async fn create(&self, name: &str, size: usize, distance: &str) -> Result<()> {
        Self::check_name(name)?;
        if distance != "Cosine" {
            return Err(invalid(format!(
                "distance {distance} is not supported; semcache collections use Cosine"
            )));
        }
        if size == 0 || size > self.config.max_dimensions {
            return Err(invalid(format!(
                "vector size must be 1 to {}, not {size}",
                self.config.max_dimensions
            )));
        }
        let record = CollectionRecord {
            size,
            distance: distance.to_string(),
            created_at_ms: now_ms(),
            payload_indexes: Default::default(),
        };
        {
            let mut map = self.write_map();
            if map.contains_key(name) {
                return Err(CollectionError::Exists(name.to_string()));
            }
            if map.len() >= self.config.max_collections {
                return Err(CollectionError::TooLarge(format!(
                    "this server holds its maximum of {} collections",
                    self.config.max_collections
                )));
            }
            self.store.put_collection(name, &record)?;
            map.insert(
                name.to_string(),
                Arc::new(Collection {
                    name: name.to_string(),
                    set: IndexedSet::new(size, self.config.index),
                    record: RwLock::new(record),
                    writes: Mutex::new(()),
                }),
            );
        }
        self.store.flush().await?;
        tracing::info!(collection = %name, size, "collection created");
        Ok(())
    }

    /// Deletes a collection and its points; false if there was none.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let Some(collection) = self.write_map().remove(name) else {
            return Ok(false);
        };
        let _gate = collection.set.gate.write().await;
        let store = self.store.clone();
        let owned = name.to_string();
        let removed = tokio::task::spawn_blocking(move || store.remove_collection(&owned))
            .await
            .map_err(|e| CollectionError::Internal(e.to_string()))??;
        if let Some(root) = &self.config.save_dir {
            vectors::saved::remove(root, name);
        }
        self.store.flush().await?;
        let m = metrics();
        if m.cache_label(name) == name {
            let _ = m.collection_points.remove_label_values(&[name]);
            let _ = m.collection_bytes.remove_label_values(&[name]);
        }
        tracing::info!(collection = %name, points = removed, "collection deleted");
        Ok(true)
    }

    pub fn info(&self, name: &str) -> Result<CollectionInfo> {
        let collection = self.get(name)?;
        let record = collection
            .record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let generation = collection.set.generation();
        let table = generation.read();
        let indexed_fields = record
            .payload_indexes
            .iter()
            .map(|(field, schema)| {
                let path: Vec<String> = field.split('.').map(str::to_string).collect();
                let with = table
                    .from_id(None)
                    .filter(|s| has_value(&s.payload, &path))
                    .count();
                (field.clone(), schema.clone(), with)
            })
            .collect();
        Ok(CollectionInfo {
            points: table.live(),
            indexed: generation.index.len(),
            tombstones: table.tombstones(),
            record,
            indexed_fields,
        })
    }

    /// Records a payload index; for keyword, integer, bool and UUID fields it also keeps
    /// postings, so a filter's `must` match on the field starts from them.
    pub async fn create_field_index(&self, name: &str, field: &str, schema: &str) -> Result<()> {
        const SCHEMAS: &[&str] = &[
            "keyword", "integer", "float", "bool", "text", "uuid", "datetime",
        ];
        if field.is_empty() || field.len() > 256 {
            return Err(invalid("field_name must be 1 to 256 characters"));
        }
        if !SCHEMAS.contains(&schema) {
            return Err(invalid(format!(
                "field_schema {schema:?} is not supported (one of {})",
                SCHEMAS.join(", ")
            )));
        }
        self.change_indexes(name, |indexes| {
            indexes.insert(field.to_string(), schema.to_string());
        })
        .await
    }

    pub async fn delete_field_index(&self, name: &str, field: &str) -> Result<()> {
        self.change_indexes(name, |indexes| {
            indexes.remove(field);
        })
        .await
    }

    /// Changes a collection's payload indexes: stored, then the live table's postings
    /// rebuilt (under the gate, so a rebuild's swap cannot lose them).
    async fn change_indexes(
        &self,
        name: &str,
        change: impl FnOnce(&mut std::collections::BTreeMap<String, String>),
    ) -> Result<()> {
        let collection = self.get(name)?;
        let gate = collection.set.gate.read().await;
        let record = {
            let mut record = collection.record.write().unwrap_or_else(|p| p.into_inner());
            change(&mut record.payload_indexes);
            record.clone()
        };
        self.store.put_collection(name, &record)?;
        let generation = collection.set.generation();
        generation
            .write()
            .set_index_fields(&indexed_fields(&record));
        drop(gate);
        self.store.flush().await?;
        Ok(())
    }

    /// Turns inputs into unit vectors of the collection's size, embedding documents
    /// in one batch.
    async fn vectors(&self, size: usize, inputs: Vec<VectorInput>) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Option<Vec<f32>>> = Vec::with_capacity(inputs.len());
        let mut texts = Vec::new();
        let mut at = Vec::new();
        for (n, input) in inputs.into_iter().enumerate() {
            match input {
                VectorInput::Dense(v) => {
                    if v.len() != size {
                        return Err(invalid(format!(
                            "wrong vector size: expected {size}, got {}",
                            v.len()
                        )));
                    }
                    out.push(Some(normalised(v)?));
                }
                VectorInput::Document { text, model } => {
                    let ours = &self.embedder.info().model;
                    let short = ours.rsplit('/').next().unwrap_or(ours);
                    if model != *ours && model != short {
                        return Err(invalid(format!(
                            "model {model:?} is not served here; documents are embedded with {ours:?}"
                        )));
                    }
                    if self.embedder.info().dimensions != size {
                        return Err(invalid(format!(
                            "documents embed to {} dimensions; this collection holds {size}",
                            self.embedder.info().dimensions
                        )));
                    }
                    out.push(None);
                    texts.push(text);
                    at.push(n);
                }
            }
        }
        if !texts.is_empty() {
            let embedded = self.embedder.embed_many(texts).await?;
            for (n, e) in at.into_iter().zip(embedded) {
                out[n] = Some(e.vector);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn check_payload(&self, payload: &Map<String, Value>) -> Result<()> {
        let bytes = serde_json::to_vec(payload)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if bytes > self.config.max_payload_bytes {
            return Err(CollectionError::TooLarge(format!(
                "a payload of {bytes} bytes is over the limit of {}",
                self.config.max_payload_bytes
            )));
        }
        Ok(())
    }

    fn check_batch(&self, n: usize) -> Result<()> {
        if n > self.config.max_batch {
            return Err(CollectionError::TooLarge(format!(
                "{n} points in one request; the limit is {}",
                self.config.max_batch
            )));
        }
        Ok(())
    }

    /// Adds or replaces points. With `wait`, returns once they are durable (fsynced).
    pub async fn upsert(&self, name: &str, points: Vec<NewPoint>, wait: bool) -> Result<()> {
        let collection = self.get(name)?;
        self.check_batch(points.len())?;
        let size = collection
            .record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .size;
        for p in &points {
            self.check_payload(&p.payload)?;
        }
        let mut seen = HashSet::new();
        if points.iter().any(|p| !seen.insert(p.id)) {
            // Qdrant keeps the last; one request naming an id twice is almost always a bug.
            return Err(invalid("a point id appears twice in one request"));
        }
        let (meta, inputs): (Vec<_>, Vec<_>) = points
            .into_iter()
            .map(|p| ((p.id, p.payload), p.vector))
            .unzip();
        let vectors = self.vectors(size, inputs).await?;
        let rows: Vec<(PointId, PointRecord, Vec<f32>)> = meta
            .into_iter()
            .zip(vectors)
            .map(|((id, payload), vector)| {
                let record = PointRecord {
                    version: EntryId::new(),
                    payload,
                };
                (id, record, vector)
            })
            .collect();
        let count = rows.len();
        self.write(name, &collection, wait, "upsert", move |store, target| {
            store.upsert_points(&target.name, &rows)?;
            let generation = target.set.generation();
            for (id, record, vector) in rows {
                let slot = PointSlot::new(id, record.version, Arc::new(record.payload));
                register(&generation, slot, &vector)?;
            }
            Ok(count)
        })
        .await?;
        Ok(())
    }

    /// Runs a write on a blocking thread with the collection's writers taking turns and
    /// its gate held shared, then makes it durable if asked, and counts it.
    async fn write(
        &self,
        name: &str,
        collection: &Arc<Collection>,
        wait: bool,
        operation: &str,
        work: impl FnOnce(&Store, &Collection) -> Result<usize> + Send + 'static,
    ) -> Result<usize> {
        let gate = collection.set.gate.read().await;
        let (store, target) = (self.store.clone(), collection.clone());
        let written = tokio::task::spawn_blocking(move || {
            let _turn = target.writes.lock().unwrap_or_else(|p| p.into_inner());
            work(&store, &target)
        })
        .await
        .map_err(|e| CollectionError::Internal(e.to_string()))??;
        drop(gate);
        if wait {
            self.store.flush().await?;
        }
        metrics()
            .collection_writes
            .with_label_values(&[operation])
            .inc_by(written as u64);
        self.publish_gauges(name, collection);
        Ok(written)
    }

    /// The ids a selector names that exist now.
    fn select(&self, collection: &Collection, selector: &Selector) -> Vec<PointId> {
        let generation = collection.set.generation();
        let table = generation.read();
        match selector {
            Selector::Ids(ids) => ids
                .iter()
                .filter(|id| table.get(id).is_some())
                .copied()
                .collect(),
            Selector::Filter(filter) => table
                .from_id(None)
                .filter(|s| filter.matches(&s.id, &s.payload))
                .map(|s| s.id)
                .collect(),
        }
    }

    pub async fn delete_points(&self, name: &str, selector: Selector, wait: bool) -> Result<usize> {
        let collection = self.get(name)?;
        if let Selector::Ids(ids) = &selector {
            self.check_batch(ids.len())?;
        }
        let ids = self.select(&collection, &selector);
        self.write(name, &collection, wait, "delete", move |store, target| {
            let mut removed = 0;
            for chunk in ids.chunks(1000) {
                removed += store.remove_points(&target.name, chunk)?;
                let generation = target.set.generation();
                let mut table = generation.write();
                for id in chunk {
                    table.kill_point(id);
                }
            }
            Ok(removed)
        })
        .await
    }

    /// Changes payloads: `Set` merges `payload` in, `Overwrite` replaces it, and
    /// `delete_keys` removes keys (with `payload` empty).
    pub async fn update_payload(
        &self,
        name: &str,
        selector: Selector,
        op: PayloadOp,
        payload: Map<String, Value>,
        delete_keys: Vec<String>,
        wait: bool,
    ) -> Result<usize> {
        let collection = self.get(name)?;
        if let Selector::Ids(ids) = &selector {
            self.check_batch(ids.len())?;
        }
        self.check_payload(&payload)?;
        let ids = self.select(&collection, &selector);
        let max_payload = self.config.max_payload_bytes;
        self.write(name, &collection, wait, "payload", move |store, target| {
            let generation = target.set.generation();
            let mut records = Vec::with_capacity(ids.len());
            {
                let table = generation.read();
                for id in &ids {
                    let Some(slot) = table.get(id) else { continue };
                    let mut next = match op {
                        PayloadOp::Set => (*slot.payload).clone(),
                        PayloadOp::Overwrite => Map::new(),
                    };
                    next.extend(payload.iter().map(|(k, v)| (k.clone(), v.clone())));
                    for key in &delete_keys {
                        next.remove(key);
                    }
                    let bytes = serde_json::to_vec(&next).map(|b| b.len()).unwrap_or(usize::MAX);
                    if bytes > max_payload {
                        return Err(CollectionError::TooLarge(format!(
                            "the payload of point {id:?} would be {bytes} bytes, over the limit of {max_payload}"
                        )));
                    }
                    records.push((*id, PointRecord { version: slot.version, payload: next }));
                }
            }
            store.put_point_records(&target.name, &records)?;
            let mut table = generation.write();
            for (id, record) in &records {
                table.set_payload(id, Arc::new(record.payload.clone()));
            }
            Ok(records.len())
        })
        .await
    }

    /// Points by id (those that exist), in the order asked.
    pub fn retrieve(&self, name: &str, ids: &[PointId]) -> Result<Vec<FoundPoint>> {
        let collection = self.get(name)?;
        self.check_batch(ids.len())?;
        let generation = collection.set.generation();
        let table = generation.read();
        Ok(ids
            .iter()
            .filter_map(|id| table.get(id))
            .map(|s| FoundPoint {
                id: s.id,
                payload: s.payload.clone(),
                score: None,
            })
            .collect())
    }

    /// The stored (unit) vector of a point.
    pub fn vector(&self, name: &str, id: &PointId) -> Result<Option<Vec<f32>>> {
        Ok(self.store.get_point_vector(name, id)?)
    }

    /// A page of points in id order from `offset`, and where the next page starts.
    pub fn scroll(
        &self,
        name: &str,
        offset: Option<PointId>,
        limit: usize,
        filter: Option<&Filter>,
    ) -> Result<(Vec<FoundPoint>, Option<PointId>)> {
        let collection = self.get(name)?;
        let limit = limit.clamp(1, self.config.max_limit);
        let generation = collection.set.generation();
        let table = generation.read();
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut next = None;
        for s in table
            .from_id(offset)
            .filter(|s| filter.is_none_or(|f| f.matches(&s.id, &s.payload)))
        {
            if page.len() == limit {
                next = Some(s.id);
                break;
            }
            page.push(FoundPoint {
                id: s.id,
                payload: s.payload.clone(),
                score: None,
            });
        }
        Ok((page, next))
    }

    pub fn count(&self, name: &str, filter: Option<&Filter>) -> Result<usize> {
        let collection = self.get(name)?;
        let generation = collection.set.generation();
        let table = generation.read();
        Ok(match filter {
            None => table.live(),
            Some(f) => table
                .from_id(None)
                .filter(|s| f.matches(&s.id, &s.payload))
                .count(),
        })
    }

    /// Nearest points to the query, best first. The walk is chosen by how many points
    /// the filter lets through: few → compare each of them (exact, and cheaper than a
    /// walk that must visit ~ef/share points to find ef that pass); most → a plain walk
    /// filtered afterwards; in between → hnsw_rs's filtered walk.
    pub async fn search(&self, name: &str, spec: SearchSpec) -> Result<Vec<FoundPoint>> {
        let started = Instant::now();
        let collection = self.get(name)?;
        let size = collection
            .record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .size;
        let wanted = spec.limit.saturating_add(spec.offset);
        if spec.limit == 0 || wanted > self.config.max_limit {
            return Err(invalid(format!(
                "limit + offset must be 1 to {}",
                self.config.max_limit
            )));
        }
        let query = self
            .vectors(size, vec![spec.vector.clone()])
            .await?
            .pop()
            .unwrap_or_default();
        let ef = spec
            .ef
            .unwrap_or(self.config.index.ef_search)
            .clamp(1, 4096);
        let generation = collection.set.generation();
        let max_connections = self.config.index.max_connections;
        // A walk or scan is CPU work of a millisecond or more: off the runtime's threads.
        let found = tokio::task::spawn_blocking(move || -> Result<Vec<FoundPoint>> {
            let table = generation.read();
            let (walk, mask) = match &spec.filter {
                Some(f) if !f.is_empty() => {
                    let (mask, passing) = table.filter_mask(f);
                    let live = table.live().max(1);
                    let walk = if spec.exact
                        || passing <= 1000
                        || passing * passing <= ef * max_connections * live
                    {
                        Walk::Exact
                    } else if passing * 2 >= live {
                        Walk::PlainFirst
                    } else {
                        Walk::Filtered
                    };
                    (walk, Some(mask))
                }
                _ if spec.exact => (Walk::Exact, None),
                _ => (Walk::PlainFirst, None),
            };
            let keep = |n: usize| match &mask {
                Some(mask) => mask.get(n).copied().unwrap_or(false),
                None => table.is_alive(n),
            };
            let neighbours = generation
                .index
                .search_with(&query, wanted, ef, walk, &keep)?;
            Ok(neighbours
                .into_iter()
                .skip(spec.offset)
                .filter(|n| spec.score_threshold.is_none_or(|t| n.similarity >= t))
                .filter_map(|n| {
                    table.slot(n.slot).map(|s| FoundPoint {
                        id: s.id,
                        payload: s.payload.clone(),
                        score: Some(n.similarity),
                    })
                })
                .collect())
        })
        .await
        .map_err(|e| CollectionError::Internal(e.to_string()))??;
        metrics()
            .collection_query_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(found)
    }

    /// Background upkeep: rebuild collections whose tombstones outnumber live points,
    /// and save graphs that grew.
    pub async fn maintain(&self) -> Result<()> {
        let all: Vec<(String, Arc<Collection>)> = self
            .read_map()
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        for (name, collection) in &all {
            if collection.set.needs_rebuild() {
                let removed = self.rebuild(name, collection).await?;
                tracing::info!(collection = %name, tombstones = removed, "collection index rebuilt");
            }
        }
        self.save_indexes(SaveWhen::Stale).await;
        Ok(())
    }

    /// Rebuilds a collection's index from the store without tombstones.
    async fn rebuild(&self, name: &str, collection: &Collection) -> Result<usize> {
        let size = collection
            .record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .size;
        let load = |fresh: &PointGeneration, old: &PointTable, version: &EntryId| -> Result<()> {
            let Some(slot) = old.slot_of_version(version) else {
                return Ok(());
            };
            if let Some(vector) = self.store.get_point_vector(name, &slot.id)? {
                register(fresh, slot.clone(), &vector)?;
            }
            Ok(())
        };
        // Payload changes made while rebuilding are in the old table only.
        let carry = |fresh: &mut PointTable, old: &PointTable, _: &[EntryId]| {
            fresh.set_index_fields(&old.index_fields());
            for s in old.from_id(None) {
                if fresh.get(&s.id).is_some_and(|f| f.version == s.version) {
                    fresh.set_payload(&s.id, s.payload.clone());
                }
            }
        };
        let removed = collection
            .set
            .rebuild(size, self.config.index, load, carry)
            .await?;
        Ok(removed)
    }

    /// Saves the graphs `when` selects; returns how many were saved.
    pub async fn save_indexes(&self, when: SaveWhen) -> usize {
        let Some(root) = self.config.save_dir.clone() else {
            return 0;
        };
        let all: Vec<(String, Arc<Collection>)> = self
            .read_map()
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let mut saved = 0;
        for (name, collection) in all {
            if collection.set.save_if_stale(&root, &name, when).await {
                saved += 1;
            }
        }
        saved
    }

    /// Totals over all collections, for admin stats.
    pub fn totals(&self) -> CollectionTotals {
        let map = self.read_map();
        let mut totals = CollectionTotals {
            collections: map.len(),
            ..CollectionTotals::default()
        };
        for collection in map.values() {
            let (points, bytes, index) = Self::usage(collection);
            totals.points += points as u64;
            totals.bytes += bytes;
            totals.index_points += index as u64;
        }
        totals
    }

    /// (live points, bytes, index points). Bytes count as a cache entry's do: vectors
    /// as f32 and payloads as JSON (the graph's f16 copy and links are in BENCHMARKS.md).
    fn usage(collection: &Collection) -> (usize, u64, usize) {
        let size = collection
            .record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .size;
        let generation = collection.set.generation();
        let table = generation.read();
        let bytes = (table.live() * size * 4 + table.payload_bytes()) as u64;
        (table.live(), bytes, generation.index.len())
    }

    fn publish_gauges(&self, name: &str, collection: &Collection) {
        let (live, bytes, _) = Self::usage(collection);
        let m = metrics();
        let label = m.cache_label(name);
        m.collection_points
            .with_label_values(&[&label])
            .set(live as i64);
        m.collection_bytes
            .with_label_values(&[&label])
            .set(bytes as i64);
    }
}

/// The fields of a collection's payload indexes that keep postings.
fn indexed_fields(record: &CollectionRecord) -> Vec<String> {
    record
        .payload_indexes
        .iter()
        .filter(|(_, schema)| payload_index::INDEXED_SCHEMAS.contains(&schema.as_str()))
        .map(|(field, _)| field.clone())
        .collect()
}

fn has_value(payload: &Map<String, Value>, path: &[String]) -> bool {
    let mut value = payload.get(&path[0]);
    for part in &path[1..] {
        value = value.and_then(|v| v.get(part));
    }
    value.is_some_and(|v| !v.is_null())
}

/// Adds a point to a generation: reserve a slot, index it, then make it current.
fn register(generation: &PointGeneration, slot: PointSlot, vector: &[f32]) -> Result<()> {
    let n = generation.write().reserve(slot);
    generation.index.insert(n, vector)?;
    generation.write().publish(n);
    Ok(())
}
