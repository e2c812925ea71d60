//! Collections' points in sled (format v3, `migrations/v3.md`).
//!
//! Trees:
//! - `collections`: name → JSON [`CollectionRecord`];
//! - `points`: `{name}/{point key}` → JSON [`PointRecord`] (version and payload);
//! - `point_vectors`: the same key → the vector as little-endian f32s.
//!
//! A point key is a tag byte (0: unsigned integer, 1: UUID) and the id's big-endian
//! bytes, so a collection's points scan in Qdrant's order: numbers ascending, then UUIDs.
//! A point's `version` changes whenever its vector does; it is the id the shared HNSW
//! layer indexes, so a saved graph never maps a slot to a vector it does not hold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::{vector_from_bytes, vector_to_bytes, EntryId, Store, StoreError};

/// Collections whose names start with this belong to semcache itself (routers' and
/// guards' examples); the collections API neither lists nor accepts them.
pub const INTERNAL_PREFIX: &str = "semcache.";

/// A point's id: an unsigned integer or a UUID, as Qdrant's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PointId {
    Num(u64),
    Uuid([u8; 16]),
}

impl PointId {
    fn encode(&self, key: &mut Vec<u8>) {
        match self {
            PointId::Num(n) => {
                key.push(0);
                key.extend_from_slice(&n.to_be_bytes());
            }
            PointId::Uuid(u) => {
                key.push(1);
                key.extend_from_slice(u);
            }
        }
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first()? {
            (0, rest) => Some(PointId::Num(u64::from_be_bytes(rest.try_into().ok()?))),
            (1, rest) => Some(PointId::Uuid(rest.try_into().ok()?)),
            _ => None,
        }
    }
}

/// How a collection was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionRecord {
    pub size: usize,
    pub distance: String,
    pub created_at_ms: u64,
    /// Payload keys with an index, and the index's schema (`keyword`, `integer`, …).
    #[serde(default)]
    pub payload_indexes: BTreeMap<String, String>,
}

/// One point as stored (its vector is in `point_vectors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub version: EntryId,
    pub payload: serde_json::Map<String, serde_json::Value>,
}

/// A point read back by a scan.
pub struct StoredPoint {
    pub id: PointId,
    pub record: PointRecord,
}

fn prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(b'/');
    key
}

pub fn point_key(name: &str, id: &PointId) -> Vec<u8> {
    let mut key = prefix(name);
    id.encode(&mut key);
    key
}

fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: "point".into(),
        reason: e.to_string(),
    })
}

impl Store {
    pub fn put_collection(&self, name: &str, record: &CollectionRecord) -> Result<(), StoreError> {
        self.check_room()?;
        self.collections.insert(name.as_bytes(), encode(record)?)?;
        Ok(())
    }

    pub fn scan_collections(
        &self,
    ) -> impl Iterator<Item = Result<(String, CollectionRecord), StoreError>> + '_ {
        self.collections.iter().map(|item| {
            let (key, bytes) = item?;
            let name = String::from_utf8(key.to_vec()).map_err(|e| corrupt(&key, e))?;
            let record = serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?;
            Ok((name, record))
        })
    }

    /// Removes a collection and every point of it; returns how many points it held.
    /// The record goes first, so a crash midway leaves points a restart ignores (and
    /// removes).
    pub fn remove_collection(&self, name: &str) -> Result<usize, StoreError> {
        self.collections.remove(name.as_bytes())?;
        self.remove_orphan_points(name)
    }

    /// Removes every point stored under `name` (whose collection record is gone).
    pub fn remove_orphan_points(&self, name: &str) -> Result<usize, StoreError> {
        let keys: Vec<sled::IVec> = self
            .points
            .scan_prefix(prefix(name))
            .keys()
            .collect::<Result<_, _>>()?;
        for chunk in keys.chunks(1000) {
            let mut batch = sled::Batch::default();
            for key in chunk {
                batch.remove(key);
            }
            self.point_vectors.apply_batch(batch.clone())?;
            self.points.apply_batch(batch)?;
        }
        Ok(keys.len())
    }

    /// Names that have points stored (to find orphans at start-up).
    pub fn point_owners(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        // Jumps from one collection's keys to the next: one read per collection.
        while let Some(item) = self.points.range(from.as_slice()..).next() {
            let (key, _) = item?;
            let end = key
                .iter()
                .position(|b| *b == b'/')
                .ok_or_else(|| corrupt(&key, "no separator"))?;
            let name = String::from_utf8(key[..end].to_vec()).map_err(|e| corrupt(&key, e))?;
            from = key[..end].to_vec();
            from.push(b'/' + 1);
            names.push(name);
        }
        Ok(names)
    }

    /// Writes points (record and vector each) in one transaction. Not yet durable:
    /// see [`Store::flush`].
    pub fn upsert_points(
        &self,
        name: &str,
        points: &[(PointId, PointRecord, Vec<f32>)],
    ) -> Result<(), StoreError> {
        self.check_room()?;
        let encoded: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = points
            .iter()
            .map(|(id, record, vector)| {
                Ok((
                    point_key(name, id),
                    encode(record)?,
                    vector_to_bytes(vector),
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        (&self.points, &self.point_vectors).transaction(|(records, vectors)| {
            for (key, record, vector) in &encoded {
                records.insert(key.as_slice(), record.as_slice())?;
                vectors.insert(key.as_slice(), vector.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        Ok(())
    }

    /// Rewrites points' records (payload changes), leaving their vectors.
    pub fn put_point_records(
        &self,
        name: &str,
        records: &[(PointId, PointRecord)],
    ) -> Result<(), StoreError> {
        self.check_room()?;
        let mut batch = sled::Batch::default();
        for (id, record) in records {
            batch.insert(point_key(name, id), encode(record)?);
        }
        self.points.apply_batch(batch)?;
        Ok(())
    }

    /// Removes points; returns how many existed.
    pub fn remove_points(&self, name: &str, ids: &[PointId]) -> Result<usize, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| point_key(name, id)).collect();
        let removed = (&self.points, &self.point_vectors).transaction(|(records, vectors)| {
            let mut removed = 0;
            for key in &keys {
                if records.remove(key.as_slice())?.is_some() {
                    removed += 1;
                }
                vectors.remove(key.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(removed)
        })?;
        Ok(removed)
    }

    pub fn get_point_vector(
        &self,
        name: &str,
        id: &PointId,
    ) -> Result<Option<Vec<f32>>, StoreError> {
        let key = point_key(name, id);
        match self.point_vectors.get(&key)? {
            None => Ok(None),
            Some(bytes) => vector_from_bytes(&bytes)
                .map(Some)
                .ok_or_else(|| corrupt(&key, "vector length is not a multiple of 4")),
        }
    }

    pub fn get_point(&self, name: &str, id: &PointId) -> Result<Option<PointRecord>, StoreError> {
        let key = point_key(name, id);
        match self.points.get(&key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// Every point of a collection, in id order.
    pub fn scan_points(
        &self,
        name: &str,
    ) -> impl Iterator<Item = Result<StoredPoint, StoreError>> + '_ {
        let skip = prefix(name).len();
        self.points.scan_prefix(prefix(name)).map(move |item| {
            let (key, bytes) = item?;
            let id = PointId::decode(&key[skip..]).ok_or_else(|| corrupt(&key, "bad point id"))?;
            let record = serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?;
            Ok(StoredPoint { id, record })
        })
    }

    /// Routers' and guards' definitions (`routing` tree): name → JSON.
    pub fn put_routing(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check_room()?;
        self.routing.insert(key.as_bytes(), value)?;
        Ok(())
    }

    pub fn get_routing(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.routing.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    pub fn remove_routing(&self, key: &str) -> Result<(), StoreError> {
        self.routing.remove(key.as_bytes())?;
        Ok(())
    }

    pub fn scan_routing(&self) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + '_ {
        self.routing.iter().map(|item| {
            let (key, value) = item?;
            let name = String::from_utf8(key.to_vec()).map_err(|e| corrupt(&key, e))?;
            Ok((name, value.to_vec()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tag: &str) -> PointRecord {
        let mut payload = serde_json::Map::new();
        payload.insert("tag".into(), tag.into());
        PointRecord {
            version: EntryId::new(),
            payload,
        }
    }

    #[test]
    fn points_round_trip_in_id_order_and_collections_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = CollectionRecord {
            size: 2,
            distance: "Cosine".into(),
            created_at_ms: 1,
            payload_indexes: BTreeMap::new(),
        };
        store.put_collection("a", &meta).unwrap();
        store.put_collection("ab", &meta).unwrap();
        let uuid = PointId::Uuid([7; 16]);
        store
            .upsert_points(
                "a",
                &[
                    (uuid, record("u"), vec![0.0, 1.0]),
                    (PointId::Num(300), record("big"), vec![1.0, 0.0]),
                    (PointId::Num(2), record("small"), vec![0.6, 0.8]),
                ],
            )
            .unwrap();
        store
            .upsert_points("ab", &[(PointId::Num(1), record("other"), vec![1.0, 0.0])])
            .unwrap();
        let ids: Vec<PointId> = store.scan_points("a").map(|p| p.unwrap().id).collect();
        assert_eq!(ids, vec![PointId::Num(2), PointId::Num(300), uuid]);
        assert_eq!(
            store.get_point_vector("a", &PointId::Num(2)).unwrap(),
            Some(vec![0.6, 0.8])
        );
        assert_eq!(
            store.point_owners().unwrap(),
            vec!["a".to_string(), "ab".to_string()]
        );
        assert_eq!(
            store
                .remove_points("a", &[PointId::Num(2), PointId::Num(9)])
                .unwrap(),
            1
        );
        assert_eq!(store.remove_collection("a").unwrap(), 2);
        assert_eq!(store.scan_points("a").count(), 0);
        assert_eq!(store.scan_points("ab").count(), 1);
        let names: Vec<String> = store.scan_collections().map(|c| c.unwrap().0).collect();
        assert_eq!(names, vec!["ab".to_string()]);
    }
}
