//! On-disk format versions and the steps between them (history in `migrations/`).

use super::StoreError;

/// The format this binary writes.
pub const FORMAT_VERSION: u32 = 1;

const VERSION_KEY: &[u8] = b"format_version";

/// `STEPS[i]` upgrades a store from version `i + 1` to `i + 2`, in place.
/// Format v1 is the first, so there is no step yet; the next format adds one here
/// and a `migrations/v2.md` describing it.
type Step = fn(&sled::Db) -> Result<(), StoreError>;
const STEPS: &[Step] = &[];

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
