//! The in-memory slot table of one cache generation: which index slot is which entry,
//! whether it is still alive, and the lookups that avoid touching the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::evict::{Policy, Tracker};
use crate::store::{EntryId, EntryRecord, EntrySummary, FeedbackRecord};

/// What an entry costs in memory accounting: prompt, response, attributes and vector.
pub fn entry_bytes(record: &EntryRecord, dimensions: usize) -> u64 {
    cost(
        record.prompt.len() + record.response.len(),
        &record.attributes,
        dimensions,
    )
}

fn cost(text_bytes: usize, attributes: &BTreeMap<String, String>, dimensions: usize) -> u64 {
    let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    (text_bytes + attribute_bytes + dimensions * 4) as u64
}

/// Attribute names the service sets itself; clients cannot.
pub const RESERVED_PREFIX: &str = "semcache.";

/// The exact-match key: a prompt hash's 32 bytes. Kept as its hex text it cost 64 bytes
/// and a heap allocation, twice per entry (slot and index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct HashKey([u8; 32]);

impl HashKey {
    fn of(hex_hash: &str) -> Self {
        let mut key = [0u8; 32];
        if hex::decode_to_slice(hex_hash, &mut key).is_err() {
            // Not a hex sha256 (this service writes nothing else): a digest of the text
            // still keys equal texts alike.
            key = Sha256::digest(hex_hash.as_bytes()).into();
        }
        Self(key)
    }
}

pub struct Slot {
    id: EntryId,
    prompt_hash: HashKey,
    attributes: Arc<BTreeMap<String, String>>,
    expires_at_ms: Option<u64>,
    created_at_ms: u64,
    /// What the entry costs: prompt, response, attributes and vector.
    bytes: u64,
    /// False until indexed, and again once deleted or expired (a tombstone).
    alive: bool,
}

impl Slot {
    pub fn from_record(record: &EntryRecord, dimensions: usize) -> Self {
        Self {
            bytes: entry_bytes(record, dimensions),
            created_at_ms: record.created_at_ms,
            id: record.id,
            prompt_hash: HashKey::of(&record.prompt_hash),
            attributes: Arc::new(record.attributes.clone()),
            expires_at_ms: record.expires_at_ms,
            alive: false,
        }
    }

    /// The same slot from what a restart reads of the entry (texts skipped), with its
    /// attributes already shared.
    pub fn from_summary(
        summary: EntrySummary,
        attributes: Arc<BTreeMap<String, String>>,
        dimensions: usize,
    ) -> Self {
        Self {
            bytes: cost(summary.text_bytes, &attributes, dimensions),
            created_at_ms: summary.created_at_ms,
            id: summary.id,
            prompt_hash: HashKey::of(&summary.prompt_hash),
            attributes,
            expires_at_ms: summary.expires_at_ms,
            alive: false,
        }
    }

    pub fn id(&self) -> EntryId {
        self.id
    }
}

#[derive(Default)]
pub struct SlotTable {
    slots: Vec<Slot>,
    by_id: HashMap<EntryId, usize>,
    by_hash: HashMap<HashKey, Vec<usize>>,
    /// `(key, value)` → slots carrying that attribute (dead ones included until rebuild).
    postings: HashMap<(String, String), Vec<usize>>,
    feedback: HashMap<usize, Arc<FeedbackRecord>>,
    /// One shared copy of each distinct attribute set: deployments use few (model,
    /// tenant, …), and a map of its own costs an entry about 600 bytes.
    attribute_sets: HashSet<Arc<BTreeMap<String, String>>>,
    live: usize,
    live_bytes: u64,
    usage: Tracker,
}

impl SlotTable {
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Points in the index that no longer answer (deleted, expired, evicted).
    pub fn tombstones(&self) -> usize {
        self.slots.len() - self.live
    }

    /// Records that a slot answered a lookup (for eviction).
    pub fn touch(&self, n: usize) {
        self.usage.touch(n);
    }

    /// The entry capacity eviction should drop next.
    pub fn victim(&self, policy: Policy, rng: &mut impl rand::Rng) -> Option<EntryId> {
        self.usage.victim(policy, rng).map(|n| self.slots[n].id)
    }

    /// Ids of every live entry.
    pub fn live_ids(&self) -> Vec<EntryId> {
        self.slots
            .iter()
            .filter(|s| s.alive)
            .map(|s| s.id)
            .collect()
    }

    /// Slots taken, live or not: the points in this generation's index.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Every slot in order, with whether it answers: what a saved index needs to map its
    /// points back to entries.
    pub fn slot_entries(&self) -> Vec<(EntryId, bool)> {
        self.slots.iter().map(|s| (s.id, s.alive)).collect()
    }

    /// Appends `n` dead slots, to be filled with [`SlotTable::fill`]: a loaded index's
    /// points keep their slot numbers, and those whose entries are gone stay tombstones.
    pub fn reserve_tombstones(&mut self, n: usize) {
        let nothing = Arc::new(BTreeMap::new());
        self.slots.extend((0..n).map(|_| Slot {
            id: EntryId([0; 16]),
            prompt_hash: HashKey::default(),
            attributes: nothing.clone(),
            expires_at_ms: None,
            created_at_ms: 0,
            bytes: 0,
            alive: false,
        }));
    }

    /// Puts an entry into a slot made by [`SlotTable::reserve_tombstones`]; publish next.
    pub fn fill(&mut self, n: usize, mut slot: Slot) {
        slot.attributes = self.shared_attributes(slot.attributes);
        if let Some(place) = self.slots.get_mut(n) {
            if !place.alive {
                *place = slot;
            }
        }
    }

    fn shared_attributes(
        &mut self,
        attributes: Arc<BTreeMap<String, String>>,
    ) -> Arc<BTreeMap<String, String>> {
        if let Some(shared) = self.attribute_sets.get(&attributes) {
            return shared.clone();
        }
        self.attribute_sets.insert(attributes.clone());
        attributes
    }

    /// Takes a slot number for an entry that is not visible yet.
    pub fn reserve(&mut self, mut slot: Slot) -> usize {
        slot.attributes = self.shared_attributes(slot.attributes);
        self.slots.push(slot);
        self.slots.len() - 1
    }

    /// Makes an indexed slot visible to lookups.
    pub fn publish(&mut self, n: usize) {
        let Some(slot) = self.slots.get_mut(n) else {
            return;
        };
        slot.alive = true;
        self.live += 1;
        self.live_bytes += slot.bytes;
        self.usage.admit(n);
        self.by_id.insert(slot.id, n);
        self.by_hash.entry(slot.prompt_hash).or_default().push(n);
        for (k, v) in slot.attributes.iter() {
            self.postings
                .entry((k.clone(), v.clone()))
                .or_default()
                .push(n);
        }
    }

    pub fn kill_entry(&mut self, id: &EntryId) {
        let Some(n) = self.by_id.remove(id) else {
            return;
        };
        self.feedback.remove(&n);
        self.usage.remove(n);
        let slot = &mut self.slots[n];
        if slot.alive {
            slot.alive = false;
            self.live -= 1;
            self.live_bytes -= slot.bytes;
        }
        if let Some(list) = self.by_hash.get_mut(&slot.prompt_hash) {
            list.retain(|s| *s != n);
            if list.is_empty() {
                self.by_hash.remove(&slot.prompt_hash);
            }
        }
    }

    pub fn slot_of(&self, id: &EntryId) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Every entry's feedback record (for the cache-wide fit of `maxErrorRate`).
    pub fn feedback_records(
        &self,
    ) -> std::collections::hash_map::Values<'_, usize, Arc<FeedbackRecord>> {
        self.feedback.values()
    }

    pub fn feedback(&self, n: usize) -> Option<Arc<FeedbackRecord>> {
        self.feedback.get(&n).cloned()
    }

    pub fn feedback_of(&self, id: &EntryId) -> Option<Arc<FeedbackRecord>> {
        self.slot_of(id).and_then(|n| self.feedback(n))
    }

    pub fn set_feedback(&mut self, id: &EntryId, record: Arc<FeedbackRecord>) {
        if let Some(n) = self.slot_of(id) {
            self.feedback.insert(n, record);
        }
    }

    pub fn entry_id(&self, n: usize) -> Option<EntryId> {
        self.slots.get(n).filter(|s| s.alive).map(|s| s.id)
    }

    /// Alive, unexpired, and carrying every scope attribute with the same value.
    pub fn visible(&self, n: usize, scope: &BTreeMap<String, String>, now: u64) -> bool {
        let Some(slot) = self.slots.get(n) else {
            return false;
        };
        slot.alive
            && slot.expires_at_ms.is_none_or(|t| t > now)
            && scope.iter().all(|(k, v)| slot.attributes.get(k) == Some(v))
            // Entries scoped by the service itself (chat fingerprints) answer only
            // lookups in that same scope, never a plain search that omits it.
            && slot
                .attributes
                .iter()
                .filter(|(k, _)| k.starts_with(RESERVED_PREFIX))
                .all(|(k, v)| scope.get(k) == Some(v))
    }

    /// Visible slots whose normalised prompt hashes to `hash`, newest first.
    pub fn exact_matches(
        &self,
        hash: &str,
        scope: &BTreeMap<String, String>,
        now: u64,
    ) -> Vec<usize> {
        self.by_hash
            .get(&HashKey::of(hash))
            .map(|slots| {
                slots
                    .iter()
                    .rev()
                    .copied()
                    .filter(|n| self.visible(*n, scope, now))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A superset of the slots in scope: the shortest posting list among the scope's
    /// attributes. `None` when the scope is empty (every slot is a candidate).
    pub fn scope_candidates(&self, scope: &BTreeMap<String, String>) -> Option<Vec<usize>> {
        if scope.is_empty() {
            return None;
        }
        let shortest = scope
            .iter()
            .map(|(k, v)| {
                self.postings
                    .get(&(k.clone(), v.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
            })
            .min_by_key(|list| list.len())
            .unwrap_or(&[]);
        Some(shortest.to_vec())
    }

    /// Ids of alive entries carrying every attribute of `scope` (expired ones included)
    /// and, with `created_before`, created before that time.
    pub fn matching_ids(
        &self,
        scope: &BTreeMap<String, String>,
        created_before: Option<u64>,
    ) -> Vec<EntryId> {
        let candidates: Vec<usize> = match self.scope_candidates(scope) {
            Some(list) => list,
            None => (0..self.slots.len()).collect(),
        };
        candidates
            .into_iter()
            .filter(|n| self.visible(*n, scope, 0))
            .filter(|n| created_before.is_none_or(|t| self.slots[*n].created_at_ms < t))
            .map(|n| self.slots[n].id)
            .collect()
    }

    pub fn expired_ids(&self, now: u64) -> Vec<EntryId> {
        self.slots
            .iter()
            .filter(|s| s.alive && s.expires_at_ms.is_some_and(|t| t <= now))
            .map(|s| s.id)
            .collect()
    }
}

impl crate::vectors::SlotMap for SlotTable {
    fn live(&self) -> usize {
        SlotTable::live(self)
    }
    fn tombstones(&self) -> usize {
        SlotTable::tombstones(self)
    }
    fn slot_count(&self) -> usize {
        SlotTable::slot_count(self)
    }
    fn slot_entries(&self) -> Vec<(EntryId, bool)> {
        SlotTable::slot_entries(self)
    }
    fn live_ids(&self) -> Vec<EntryId> {
        SlotTable::live_ids(self)
    }
    fn reserve_tombstones(&mut self, n: usize) {
        SlotTable::reserve_tombstones(self, n)
    }
    fn kill_entry(&mut self, id: &EntryId) {
        SlotTable::kill_entry(self, id)
    }
}
