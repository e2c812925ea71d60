//! On-disk format versions and the steps between them (history in `migrations/`).

use super::StoreError;

/// The format this binary writes.
pub const FORMAT_VERSION: u32 = 3;

const VERSION_KEY: &[u8] = b"format_version";

/// `STEPS[i]` upgrades a store from version `i + 1` to `i + 2`, in place.
type Step = fn(&sled::Db) -> Result<(), StoreError>;
const STEPS: &[Step] = &[v1_to_v2, v2_to_v3];

/// v2 adds the `summaries` tree (migrations/v2.md): one summary per entry, written
/// from the entries in batches. Rerunning it after a crash rewrites the same values.
fn v1_to_v2(db: &sled::Db) -> Result<(), StoreError> {
    let entries = db.open_tree("entries")?;
    let summaries = db.open_tree("summaries")?;
    let total = entries.len();
    let mut batch = sled::Batch::default();
    for (done, item) in entries.iter().enumerate() {
        let (key, bytes) = item?;
        let record = super::decode_entry(&key, &bytes)?;
        batch.insert(key, super::StoredSummary::of(&record).encode());
        if (done + 1) % 10_000 == 0 {
            summaries.apply_batch(std::mem::take(&mut batch))?;
        }
        if (done + 1) % 100_000 == 0 {
            tracing::info!(done = done + 1, total, "summarising entries");
        }
    }
    summaries.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}

/// v3 adds collections' trees (`collections`, `points`, `point_vectors`;
/// migrations/v3.md). They start empty, so there is nothing to convert; the version
/// stamp keeps a v2 binary from opening a store whose collections it would not see.
fn v2_to_v3(_db: &sled::Db) -> Result<(), StoreError> {
    Ok(())
}

fn read_version(db: &sled::Db) -> Result<Option<u32>, StoreError> {
    let meta = db.open_tree("meta")?;
    match meta.get(VERSION_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let raw: [u8; 4] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                key: "meta/format_version".into(),
                reason: format!("{} bytes, expected 4", bytes.len()),
            })?;
            Ok(Some(u32::from_be_bytes(raw)))
        }
    }
}

pub(crate) fn write_version(db: &sled::Db, version: u32) -> Result<(), StoreError> {
    db.open_tree("meta")?
        .insert(VERSION_KEY, &version.to_be_bytes())?;
    db.flush()?;
    Ok(())
}

/// Stamps a new store, refuses a newer one, and runs each missing step on an older one.
pub fn upgrade(db: &sled::Db) -> Result<(), StoreError> {
    upgrade_with(db, FORMAT_VERSION, STEPS)
}

fn upgrade_with(db: &sled::Db, target: u32, steps: &[Step]) -> Result<(), StoreError> {
    let found = match read_version(db)? {
        Some(v) => v,
        None => {
            write_version(db, target)?;
            return Ok(());
        }
    };
    if found > target {
        return Err(StoreError::FutureFormat {
            found,
            supported: target,
        });
    }
    for version in found..target {
        let step = steps
            .get(version as usize - 1)
            .ok_or_else(|| StoreError::Corrupt {
                key: "meta/format_version".into(),
                reason: format!("no upgrade step from v{version}"),
            })?;
        tracing::info!(
            from = version,
            to = version + 1,
            "upgrading the store format"
        );
        step(db)?;
        write_version(db, version + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_new_store_is_stamped_with_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        upgrade(&db).unwrap();
        assert_eq!(read_version(&db).unwrap(), Some(FORMAT_VERSION));
    }

    #[test]
    fn a_store_from_the_future_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            write_version(&db, FORMAT_VERSION + 1).unwrap();
        }
        let err = match Store::open(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("a newer format must be refused"),
        };
        assert!(matches!(err, StoreError::FutureFormat { .. }));
        assert!(err.to_string().contains("newer semcache"), "{err}");
    }

    #[test]
    fn a_v1_store_gains_a_summary_per_entry() {
        use crate::store::{entry_key, vector_to_bytes, EntryId, EntryRecord, EntrySummary};
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<EntryRecord> = (0..25_000)
            .map(|i| EntryRecord {
                id: EntryId::new(),
                cache_id: format!("c{}", i % 3),
                prompt: format!("prompt {i}"),
                prompt_hash: format!("{i:064x}"),
                response: "é\"quoted\"".into(),
                attributes: [("model".to_string(), format!("m{}", i % 2))].into(),
                created_at_ms: i,
                expires_at_ms: (i % 5 == 0).then_some(i + 1),
                window_end: None,
            })
            .collect();
        {
            // Written as v1 did: entries and vectors, no summaries.
            let db = sled::open(dir.path()).unwrap();
            write_version(&db, 1).unwrap();
            let entries = db.open_tree("entries").unwrap();
            let vectors = db.open_tree("vectors").unwrap();
            for r in &records {
                let key = entry_key(&r.cache_id, &r.id);
                entries
                    .insert(&key, serde_json::to_vec(r).unwrap())
                    .unwrap();
                vectors.insert(&key, vector_to_bytes(&[1.0, 0.0])).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut found: Vec<EntrySummary> =
            store.scan_summaries().collect::<Result<_, _>>().unwrap();
        found.sort_by_key(|s| s.created_at_ms);
        assert_eq!(found.len(), records.len());
        for (r, s) in records.iter().zip(&found) {
            assert_eq!(s.id, r.id);
            assert_eq!(s.cache_id, r.cache_id);
            assert_eq!(s.prompt_hash, r.prompt_hash);
            assert_eq!(s.attributes, r.attributes);
            assert_eq!(s.expires_at_ms, r.expires_at_ms);
            assert_eq!(s.text_bytes, r.prompt.len() + r.response.len());
        }
        // Removing an entry removes its summary.
        assert_eq!(store.remove("c0", &[records[0].id]).unwrap(), 1);
        assert_eq!(store.remove_cache("c1").unwrap(), records.len() / 3);
        let left = store.scan_summaries().count();
        assert_eq!(left, records.len() - 1 - records.len() / 3);
    }

    #[test]
    fn a_v2_store_opens_as_v3_with_its_entries_and_no_collections() {
        use crate::store::{EntryId, EntryRecord};
        let dir = tempfile::tempdir().unwrap();
        let record = EntryRecord {
            id: EntryId::new(),
            cache_id: "c".into(),
            prompt: "p".into(),
            prompt_hash: format!("{:064x}", 1),
            response: "r".into(),
            attributes: Default::default(),
            created_at_ms: 1,
            expires_at_ms: None,
            window_end: None,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert(&record, &[1.0, 0.0]).unwrap();
            store.flush_blocking().unwrap();
            // As a v2 binary left it: stamped 2, no collection trees written to.
            write_version(&store.db, 2).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(read_version(&store.db).unwrap(), Some(3));
        assert_eq!(store.get("c", &record.id).unwrap(), Some(record));
        assert_eq!(store.scan_collections().count(), 0);
    }

    #[test]
    fn older_stores_run_every_step_in_order() {
        // The mechanism future formats will use: a v1 store upgraded to a v3 target.
        fn to_v2(db: &sled::Db) -> Result<(), StoreError> {
            db.open_tree("meta")?.insert("step", "v2")?;
            Ok(())
        }
        fn to_v3(db: &sled::Db) -> Result<(), StoreError> {
            let meta = db.open_tree("meta")?;
            assert_eq!(meta.get("step")?.as_deref(), Some(&b"v2"[..]));
            meta.insert("step", "v3")?;
            Ok(())
        }
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        write_version(&db, 1).unwrap();
        upgrade_with(&db, 3, &[to_v2, to_v3]).unwrap();
        assert_eq!(read_version(&db).unwrap(), Some(3));
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(meta.get("step").unwrap().as_deref(), Some(&b"v3"[..]));
    }
}
