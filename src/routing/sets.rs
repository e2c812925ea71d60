//! Labelled example sets as the store keeps them — a router's routes, a guard's
//! categories: one record in the `routing` tree (`{kind}/{name}`) and the examples'
//! vectors as points of an internal collection (`semcache.{kind}.{name}`), each point
//! labelled with its group's position. A restart reads the vectors back and never runs
//! the model on them again.

use serde_json::Value;

use super::Result;
use crate::cache::now_ms;
use crate::embed::Embedder;
use crate::store::{CollectionRecord, EntryId, PointId, PointRecord, Store, StoreError};

/// Per group, the unit vectors of its examples, in the order given.
pub type Groups = Vec<Vec<Vec<f32>>>;

fn collection(kind: &str, name: &str) -> String {
    format!("{}{kind}.{name}", crate::store::INTERNAL_PREFIX)
}

fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// Embeds every group's texts in one pass through the batching queue.
pub async fn embed(embedder: &Embedder, groups: &[&[String]]) -> Result<Groups> {
    let texts: Vec<String> = groups.iter().flat_map(|g| g.iter().cloned()).collect();
    let mut vectors = embedder
        .embed_many(texts)
        .await?
        .into_iter()
        .map(|e| e.vector);
    Ok(groups
        .iter()
        .map(|g| vectors.by_ref().take(g.len()).collect())
        .collect())
}

/// Replaces a set: its vectors, then its record (written last), flushed before it returns.
pub async fn save(
    store: &Store,
    dims: usize,
    kind: &'static str,
    name: &str,
    record: Vec<u8>,
    groups: &[&[Vec<f32>]],
) -> Result<()> {
    let mut points = Vec::new();
    for (g, vectors) in groups.iter().enumerate() {
        for (i, v) in vectors.iter().enumerate() {
            let mut payload = serde_json::Map::new();
            payload.insert("group".into(), Value::from(g as u64));
            payload.insert("i".into(), Value::from(i as u64));
            points.push((
                PointId::Num(points.len() as u64),
                PointRecord {
                    version: EntryId::new(),
                    payload,
                },
                v.clone(),
            ));
        }
    }
    let writer = store.clone();
    let (collection, key) = (collection(kind, name), key(kind, name));
    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let store = writer;
        store.remove_collection(&collection)?;
        store.put_collection(
            &collection,
            &CollectionRecord {
                size: dims,
                distance: "Cosine".into(),
                created_at_ms: now_ms(),
                payload_indexes: Default::default(),
            },
        )?;
        for chunk in points.chunks(1000) {
            store.upsert_points(&collection, chunk)?;
        }
        store.put_routing(&key, &record)
    })
    .await
    .map_err(|e| super::invalid(e.to_string()))??;
    store.flush().await?;
    Ok(())
}

/// Writes a set's record alone (its vectors unchanged), durably.
pub async fn save_record(store: &Store, kind: &str, name: &str, record: &[u8]) -> Result<()> {
    store.put_routing(&key(kind, name), record)?;
    store.flush().await?;
    Ok(())
}

pub async fn remove(store: &Store, kind: &str, name: &str) -> Result<()> {
    store.remove_routing(&key(kind, name))?;
    store.remove_collection(&collection(kind, name))?;
    store.flush().await?;
    Ok(())
}

/// Every stored set of a kind: its name, its record (parsed once) and its vectors, sized
/// by `groups_of` (how many groups the record says it has).
pub fn load_all<T: serde::de::DeserializeOwned>(
    store: &Store,
    kind: &str,
    groups_of: impl Fn(&T) -> usize,
) -> Result<Vec<(String, T, Groups)>> {
    let prefix = format!("{kind}/");
    let mut sets = Vec::new();
    for item in store.scan_routing() {
        let (key, bytes) = item?;
        let Some(name) = key.strip_prefix(&prefix) else {
            continue;
        };
        let record: T = serde_json::from_slice(&bytes).map_err(|e| super::corrupt(&key, e))?;
        let collection = collection(kind, name);
        let mut found: Vec<Vec<(u64, Vec<f32>)>> = vec![Vec::new(); groups_of(&record)];
        for point in store.scan_points(&collection) {
            let point = point?;
            let payload = &point.record.payload;
            // `route`: what the first routers (format v3) called the group.
            let group = ["group", "route"]
                .iter()
                .find_map(|k| payload.get(*k).and_then(Value::as_u64));
            let at = payload.get("i").and_then(Value::as_u64).unwrap_or(0);
            let vector = store.get_point_vector(&collection, &point.id)?;
            if let (Some(g), Some(vector)) = (group, vector) {
                if let Some(list) = found.get_mut(g as usize) {
                    list.push((at, vector));
                }
            }
        }
        // Examples keep their positions: a guard names the example that matched by it.
        let groups = found
            .into_iter()
            .map(|mut list| {
                list.sort_by_key(|(at, _)| *at);
                list.into_iter().map(|(_, v)| v).collect()
            })
            .collect();
        sets.push((name.to_string(), record, groups));
    }
    Ok(sets)
}
