//! Persisted, named HNSW sets: what a cache and a collection both are underneath.
//!
//! A set is a sequence of [`Generation`]s (an HNSW graph and the slot map that says
//! what each of its slots holds); writers add to the current one, a rebuild makes a
//! fresh one without tombstones and swaps it in atomically, and [`saved`] writes a
//! generation's graph to disk so a restart loads it instead of re-inserting vectors.
//! What a slot *means* (a cache entry with its scope, a point with its payload) is the
//! core's [`SlotMap`]; this layer knows only entry ids, liveness and the graph.
//! Every [`EntryId`] names one immutable vector, which is what keeps old saves valid.

pub mod saved;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::index::{IndexParams, VectorIndex};
use crate::metrics::metrics;
use crate::store::EntryId;

/// Frozen segments a set may have before upkeep rebuilds it into one (a search walks
/// every segment; saves add one each).
pub const MAX_SEGMENTS: usize = 4;

/// What a core keeps per slot, seen from this layer.
pub trait SlotMap: Default + Send + Sync + 'static {
    /// Live (searchable) slots.
    fn live(&self) -> usize;
    /// Slots whose entry is gone but whose point stays in the graph.
    fn tombstones(&self) -> usize;
    /// Every slot ever reserved in this generation (live or not).
    fn slot_count(&self) -> usize;
    /// Per slot, its entry and whether it is still alive: what a save records.
    fn slot_entries(&self) -> Vec<(EntryId, bool)>;
    /// Ids of the live entries.
    fn live_ids(&self) -> Vec<EntryId>;
    /// Makes `n` dead slots, for a loaded graph whose entries are matched in later.
    fn reserve_tombstones(&mut self, n: usize);
    /// The entry leaves the set (its point stays, as a tombstone).
    fn kill_entry(&mut self, id: &EntryId);
}

/// Which sets [`IndexedSet::save_if_stale`] saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveWhen {
    /// Every set with a point the last save lacks (at shutdown).
    Changed,
    /// Sets that grew by a tenth (at least 1,000 points) or were rebuilt since their
    /// last save (background upkeep: a save holds the set's writers off meanwhile).
    Stale,
}

/// One consistent view of a set: slot map and index always change together.
pub struct Generation<T> {
    /// Tells generations apart, so a saved index knows whether it is of this one.
    pub serial: u64,
    pub index: VectorIndex,
    table: RwLock<T>,
}

impl<T: SlotMap> Generation<T> {
    pub fn new(dimensions: usize, params: IndexParams) -> Self {
        Self::with_index(VectorIndex::new(dimensions, 0, params))
    }

    pub fn with_index(index: VectorIndex) -> Self {
        static SERIALS: AtomicU64 = AtomicU64::new(1);
        Self {
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            index,
            table: RwLock::new(T::default()),
        }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, T> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, T> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A named set's current generation, the gate that keeps writers out of a swap, and
/// what its last save covered.
pub struct IndexedSet<T> {
    /// Writers hold it shared; swaps (rebuild, flush, save) hold it exclusively, so no
    /// write can land half in a generation that is being replaced.
    pub gate: tokio::sync::RwLock<()>,
    current: RwLock<Arc<Generation<T>>>,
    /// Generation serial and slot count of the last saved index.
    saved: Mutex<Option<(u64, usize)>>,
}

impl<T: SlotMap> IndexedSet<T> {
    pub fn new(dimensions: usize, params: IndexParams) -> Self {
        Self {
            gate: tokio::sync::RwLock::new(()),
            current: RwLock::new(Arc::new(Generation::new(dimensions, params))),
            saved: Mutex::new(None),
        }
    }

    pub fn generation(&self) -> Arc<Generation<T>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, generation: Generation<T>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(generation);
    }

    /// Takes a generation loaded from a save as current; an outdated save counts as
    /// none, so upkeep replaces it soon.
    pub fn adopt_loaded(&self, generation: Generation<T>) {
        let slots = generation.read().slot_count();
        let outdated = generation.index.loaded_from_outdated_save();
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) =
            (!outdated).then_some((generation.serial, slots));
        self.replace(generation);
    }

    /// (live, tombstones) of the current generation.
    pub fn counts(&self) -> (usize, usize) {
        let generation = self.generation();
        let t = generation.read();
        (t.live(), t.tombstones())
    }

    /// Whether a rebuild is due: tombstones outnumber live points and are enough to be
    /// worth it, or saves have left more frozen segments than a search should walk
    /// (each save freezes what was added since the last into a segment of its own).
    pub fn needs_rebuild(&self) -> bool {
        let (live, tombstones) = self.counts();
        tombstones >= 1024 && tombstones > live || self.generation().index.segments() > MAX_SEGMENTS
    }

    /// Saves the current graph under `root/<name>` if `when` says it is stale.
    /// Returns whether it was saved; failures are logged and counted, not returned
    /// (a save is only ever a shortcut for the next start).
    pub async fn save_if_stale(&self, root: &Path, name: &str, when: SaveWhen) -> bool {
        let last = *self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let stale = |generation: &Generation<T>| {
            let slots = generation.read().slot_count();
            match (last, when) {
                _ if slots == 0 => false,
                (None, _) => true,
                (Some((serial, _)), _) if serial != generation.serial => true,
                (Some((_, saved)), SaveWhen::Changed) => slots != saved,
                (Some((_, saved)), SaveWhen::Stale) => slots >= saved + (saved / 10).max(1000),
            }
        };
        if !stale(&self.generation()) {
            return false;
        }
        let _gate = self.gate.write().await;
        let generation = self.generation();
        let slots = generation.read().slot_entries();
        let started = Instant::now();
        let (root, id, saving) = (root.to_path_buf(), name.to_string(), generation.clone());
        let result =
            tokio::task::spawn_blocking(move || saved::save(&root, &id, &saving.index, &slots))
                .await;
        let outcome = match result {
            Ok(Ok(())) => {
                let slots = generation.read().slot_count();
                *self.saved.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((generation.serial, slots));
                tracing::info!(set = %name, points = slots, millis = started.elapsed().as_millis() as u64, "index saved");
                "ok"
            }
            Ok(Err(e)) => {
                tracing::warn!(set = %name, error = %e, "index not saved");
                "failed"
            }
            Err(e) => {
                tracing::warn!(set = %name, error = %e, "index save task failed");
                "failed"
            }
        };
        metrics().index_saves.with_label_values(&[outcome]).inc();
        outcome == "ok"
    }

    /// Rebuilds the set without tombstones and swaps it in atomically; searches keep
    /// using the old generation meanwhile. `load` adds one live entry (by id) to the
    /// fresh generation, or skips it if it has gone; `carry` copies per-entry state
    /// that is not in the store from the old table. Returns the tombstones removed.
    pub async fn rebuild<E>(
        &self,
        dimensions: usize,
        params: IndexParams,
        load: impl Fn(&Generation<T>, &T, &EntryId) -> Result<(), E>,
        carry: impl FnOnce(&mut T, &T, &[EntryId]),
    ) -> Result<usize, E> {
        let snapshot: Vec<EntryId> = self.generation().read().live_ids();
        let fresh = Generation::<T>::new(dimensions, params);
        // The slow part, blocking no one.
        {
            let old = self.generation();
            for id in &snapshot {
                let table = old.read();
                load(&fresh, &table, id)?;
            }
        }
        // Catch up with what changed meanwhile, then swap, with writers held off.
        let _gate = self.gate.write().await;
        let old = self.generation();
        let (now_live, tombstones) = {
            let t = old.read();
            (t.live_ids(), t.tombstones())
        };
        let now_set: HashSet<EntryId> = now_live.iter().copied().collect();
        let had: HashSet<EntryId> = snapshot.iter().copied().collect();
        {
            let table = old.read();
            for id in now_live.iter().filter(|id| !had.contains(id)) {
                load(&fresh, &table, id)?;
            }
        }
        {
            let mut table = fresh.write();
            for id in had.iter().filter(|id| !now_set.contains(id)) {
                table.kill_entry(id);
            }
            carry(&mut table, &old.read(), &now_live);
        }
        self.replace(fresh);
        Ok(tombstones)
    }
}

/// A loaded graph's generation, and its slots waiting for their entries by id.
pub type SavedGraph<T> = (Generation<T>, HashMap<EntryId, usize>);

/// Every set's saved graph under `root` that loads cleanly, with its slots waiting for
/// their entries (matched by id after the store is scanned). Unusable saves are
/// removed, and their sets rebuilt from the store.
/// `dimensions` names each set's vector size; saves of sets it does not know are removed.
pub fn load_saved<T: SlotMap>(
    root: &Path,
    params: IndexParams,
    dimensions: impl Fn(&str) -> Option<usize> + Sync,
) -> HashMap<String, SavedGraph<T>> {
    let mut graphs = HashMap::new();
    let loaded = on_every_core(saved::saved_caches(root), |name| {
        let found = match dimensions(&name) {
            Some(d) => saved::load(root, &name, d, params),
            None => Ok(None),
        };
        (name, found)
    });
    for (name, found) in loaded {
        match found {
            Ok(Some(found)) => {
                let waiting: HashMap<EntryId, usize> = found
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, alive))| *alive)
                    .map(|(n, (id, _))| (*id, n))
                    .collect();
                let generation = Generation::<T>::with_index(found.index);
                generation.write().reserve_tombstones(found.slots.len());
                graphs.insert(name, (generation, waiting));
            }
            Ok(None) if dimensions(&name).is_none() => saved::remove(root, &name),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(set = %name, error = %e, "saved index unusable; rebuilding it from the store");
                saved::remove(root, &name);
            }
        }
    }
    graphs
}

/// Runs `work` on every item, spread over a thread per core (start-up work that is
/// independent per set: loading saved graphs, re-inserting vectors).
pub fn on_every_core<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queue = Mutex::new(items);
    let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while let Some(item) = next() {
                        done.push(work(item));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots that are all alive: enough of a core's table for these tests.
    #[derive(Default)]
    struct AllAlive(Vec<EntryId>);

    impl SlotMap for AllAlive {
        fn live(&self) -> usize {
            self.0.len()
        }
        fn tombstones(&self) -> usize {
            0
        }
        fn slot_count(&self) -> usize {
            self.0.len()
        }
        fn slot_entries(&self) -> Vec<(EntryId, bool)> {
            self.0.iter().map(|id| (*id, true)).collect()
        }
        fn live_ids(&self) -> Vec<EntryId> {
            self.0.clone()
        }
        fn reserve_tombstones(&mut self, _: usize) {}
        fn kill_entry(&mut self, _: &EntryId) {}
    }

    #[tokio::test]
    async fn saves_freeze_segments_until_too_many_call_for_a_rebuild() {
        let root = tempfile::tempdir().unwrap();
        let set = IndexedSet::<AllAlive>::new(8, IndexParams::default());
        let mut slot = 0;
        for round in 1..=MAX_SEGMENTS + 1 {
            let generation = set.generation();
            for _ in 0..10 {
                let v: Vec<f32> = (0..8).map(|d| ((slot * 7 + d) % 11) as f32 + 0.5).collect();
                generation.index.insert(slot, &v).unwrap();
                generation.write().0.push(EntryId::new());
                slot += 1;
            }
            assert!(set.save_if_stale(root.path(), "s", SaveWhen::Changed).await);
            assert_eq!(set.generation().index.segments(), round);
            assert_eq!(set.needs_rebuild(), round > MAX_SEGMENTS, "round {round}");
        }
    }
}
