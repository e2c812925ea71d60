//! One collection generation's slot map: which point each HNSW slot holds, its payload,
//! and whether it is the point's current vector.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::filter::Filter;
use super::payload_index::PayloadIndexes;
use crate::store::{EntryId, PointId};
use crate::vectors::SlotMap;

pub type Payload = Arc<Map<String, Value>>;

#[derive(Debug, Clone)]
pub struct PointSlot {
    pub id: PointId,
    pub version: EntryId,
    pub payload: Payload,
    /// The payload's size as JSON, for memory accounting.
    payload_bytes: usize,
    alive: bool,
}

fn json_size(payload: &Map<String, Value>) -> usize {
    if payload.is_empty() {
        return 0;
    }
    serde_json::to_vec(payload).map_or(0, |b| b.len())
}

impl PointSlot {
    pub fn new(id: PointId, version: EntryId, payload: Payload) -> Self {
        Self {
            id,
            version,
            payload_bytes: json_size(&payload),
            payload,
            alive: false,
        }
    }
}

#[derive(Default)]
pub struct PointTable {
    slots: Vec<PointSlot>,
    /// Live points by id, ordered (scroll pages through it).
    by_id: BTreeMap<PointId, usize>,
    by_version: HashMap<EntryId, usize>,
    live: usize,
    /// Payload bytes of the live points.
    payload_bytes: usize,
    indexes: PayloadIndexes,
}

impl PointTable {
    /// Takes a slot for a point that is not visible yet.
    pub fn reserve(&mut self, mut slot: PointSlot) -> usize {
        // A slot copied from another generation (a rebuild) arrives marked alive.
        slot.alive = false;
        self.slots.push(slot);
        self.slots.len() - 1
    }

    /// Puts a stored point into a slot made by `reserve_tombstones` (a loaded graph).
    pub fn fill(&mut self, n: usize, mut slot: PointSlot) {
        if let Some(place) = self.slots.get_mut(n) {
            if !place.alive {
                slot.alive = false;
                *place = slot;
            }
        }
    }

    /// Makes an indexed slot the point's current one; its older slot becomes a tombstone.
    pub fn publish(&mut self, n: usize) {
        let Some(slot) = self.slots.get_mut(n) else {
            return;
        };
        if slot.alive {
            return;
        }
        slot.alive = true;
        let (id, version) = (slot.id, slot.version);
        self.live += 1;
        self.payload_bytes += slot.payload_bytes;
        self.indexes.add(n, &slot.payload);
        self.by_version.insert(version, n);
        if let Some(old) = self.by_id.insert(id, n) {
            self.bury(old);
        }
        self.reindex_if_stale();
    }

    fn reindex_if_stale(&mut self) {
        if self.indexes.needs_rebuild(self.live) {
            self.reindex(&self.indexes.fields());
        }
    }

    fn reindex(&mut self, fields: &[String]) {
        let slots = &self.slots;
        let live = self.by_id.values().map(|n| (*n, &*slots[*n].payload));
        self.indexes.rebuild(fields, live);
    }

    /// Sets the payload fields with postings, and builds them.
    pub fn set_index_fields(&mut self, fields: &[String]) {
        self.reindex(fields);
    }

    pub fn index_fields(&self) -> Vec<String> {
        self.indexes.fields()
    }

    fn bury(&mut self, n: usize) {
        if let Some(slot) = self.slots.get_mut(n) {
            if slot.alive {
                slot.alive = false;
                self.live -= 1;
                self.payload_bytes -= slot.payload_bytes;
                self.by_version.remove(&slot.version);
                // The payload is not needed any more; the id stays for the saved map.
                slot.payload = Payload::default();
                slot.payload_bytes = 0;
            }
        }
    }

    pub fn kill_point(&mut self, id: &PointId) -> bool {
        match self.by_id.remove(id) {
            Some(n) => {
                self.bury(n);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: &PointId) -> Option<&PointSlot> {
        self.by_id.get(id).map(|n| &self.slots[*n])
    }

    pub fn slot(&self, n: usize) -> Option<&PointSlot> {
        self.slots.get(n).filter(|s| s.alive)
    }

    pub fn is_alive(&self, n: usize) -> bool {
        self.slots.get(n).is_some_and(|s| s.alive)
    }

    pub fn set_payload(&mut self, id: &PointId, payload: Payload) {
        if let Some(n) = self.by_id.get(id) {
            let slot = &mut self.slots[*n];
            let bytes = json_size(&payload);
            self.payload_bytes = self.payload_bytes - slot.payload_bytes + bytes;
            slot.payload_bytes = bytes;
            slot.payload = payload;
            let n = *n;
            self.indexes.add(n, &self.slots[n].payload);
            self.reindex_if_stale();
        }
    }

    /// Payload bytes of the live points.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    pub fn slot_of_version(&self, version: &EntryId) -> Option<&PointSlot> {
        self.by_version.get(version).map(|n| &self.slots[*n])
    }

    /// Live points in id order, from `start` on.
    pub fn from_id(&self, start: Option<PointId>) -> impl Iterator<Item = &PointSlot> + '_ {
        let range = match start {
            Some(id) => self.by_id.range(id..),
            None => self.by_id.range(..),
        };
        range.map(|(_, n)| &self.slots[*n])
    }

    /// Whether each slot is alive and passes `filter`, and how many do. A payload index
    /// on a `must` match narrows the slots checked; otherwise every slot is.
    pub fn filter_mask(&self, filter: &Filter) -> (Vec<bool>, usize) {
        let passes = |s: &PointSlot| s.alive && filter.matches(&s.id, &s.payload);
        let mask: Vec<bool> = match self.indexes.candidates(filter) {
            Some(candidates) => {
                let mut mask = vec![false; self.slots.len()];
                for n in candidates {
                    let n = n as usize;
                    if let Some(s) = self.slots.get(n) {
                        mask[n] = passes(s);
                    }
                }
                mask
            }
            None => self.slots.iter().map(passes).collect(),
        };
        let count = mask.iter().filter(|m| **m).count();
        (mask, count)
    }
}

impl SlotMap for PointTable {
    fn live(&self) -> usize {
        self.live
    }
    fn tombstones(&self) -> usize {
        self.slots.len() - self.live
    }
    fn slot_count(&self) -> usize {
        self.slots.len()
    }
    fn slot_entries(&self) -> Vec<(EntryId, bool)> {
        self.slots.iter().map(|s| (s.version, s.alive)).collect()
    }
    fn live_ids(&self) -> Vec<EntryId> {
        self.by_id
            .values()
            .map(|n| self.slots[*n].version)
            .collect()
    }
    fn reserve_tombstones(&mut self, n: usize) {
        let nothing = Payload::default();
        self.slots.extend(
            (0..n).map(|_| PointSlot::new(PointId::Num(0), EntryId([0; 16]), nothing.clone())),
        );
    }
    fn kill_entry(&mut self, version: &EntryId) {
        if let Some(n) = self.by_version.get(version).copied() {
            let id = self.slots[n].id;
            if self.by_id.get(&id) == Some(&n) {
                self.by_id.remove(&id);
            }
            self.bury(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_version_buries_the_old_one() {
        let mut table = PointTable::default();
        let (v1, v2) = (EntryId::new(), EntryId::new());
        let a = table.reserve(PointSlot::new(PointId::Num(7), v1, Payload::default()));
        table.publish(a);
        let b = table.reserve(PointSlot::new(PointId::Num(7), v2, Payload::default()));
        assert_eq!(
            table.get(&PointId::Num(7)).unwrap().version,
            v1,
            "not visible before publish"
        );
        table.publish(b);
        assert_eq!(table.get(&PointId::Num(7)).unwrap().version, v2);
        assert_eq!((table.live(), table.tombstones()), (1, 1));
        assert_eq!(table.live_ids(), vec![v2]);
        table.kill_entry(&v1); // already a tombstone: nothing changes
        assert_eq!(table.live(), 1);
        table.kill_entry(&v2);
        assert!(table.get(&PointId::Num(7)).is_none());
        assert_eq!(table.slot_entries(), vec![(v1, false), (v2, false)]);
    }
}
