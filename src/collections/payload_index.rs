//! Payload indexes (`PUT /collections/{name}/index`): for a keyword, integer, bool or
//! UUID field, the slots holding each value, so a filter with a `match` on the field
//! starts from those slots instead of evaluating every point.
//!
//! Postings are only ever appended to: a slot that died or changed its payload stays
//! listed until the index is rebuilt (when stale postings outnumber live points), and
//! every candidate is checked against the whole filter anyway, so a stale posting costs
//! one check, never a wrong answer.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::filter::{key_path, values_at, Condition, Filter, Matcher};

/// Field schemas with postings; the others are recorded but scanned.
pub const INDEXED_SCHEMAS: &[&str] = &["keyword", "integer", "bool", "uuid"];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Text(String),
    Int(i64),
    Bool(bool),
}

fn key_of(value: &Value) -> Option<Key> {
    match value {
        Value::String(s) => Some(Key::Text(s.clone())),
        Value::Bool(b) => Some(Key::Bool(*b)),
        Value::Number(n) => n.as_i64().map(Key::Int),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct FieldIndex {
    path: Vec<String>,
    postings: HashMap<Key, Vec<u32>>,
}

impl FieldIndex {
    fn add(&mut self, slot: u32, payload: &Map<String, Value>) -> usize {
        let mut added = 0;
        for value in values_at(payload, &self.path) {
            if let Some(key) = key_of(value) {
                self.postings.entry(key).or_default().push(slot);
                added += 1;
            }
        }
        added
    }
}

/// Every indexed field of one generation's point table.
#[derive(Debug, Default)]
pub struct PayloadIndexes {
    fields: BTreeMap<String, FieldIndex>,
    postings: usize,
}

impl PayloadIndexes {
    pub fn fields(&self) -> Vec<String> {
        self.fields.keys().cloned().collect()
    }

    /// Replaces the indexed fields and rebuilds their postings from `slots` (the live
    /// ones, with their payloads).
    pub fn rebuild<'a>(
        &mut self,
        fields: &[String],
        slots: impl Iterator<Item = (usize, &'a Map<String, Value>)>,
    ) {
        self.fields = fields
            .iter()
            .map(|f| {
                let path = key_path(f);
                (
                    f.clone(),
                    FieldIndex {
                        path,
                        postings: HashMap::new(),
                    },
                )
            })
            .collect();
        self.postings = 0;
        for (slot, payload) in slots {
            self.add(slot, payload);
        }
    }

    pub fn add(&mut self, slot: usize, payload: &Map<String, Value>) {
        let Ok(slot) = u32::try_from(slot) else {
            return;
        };
        for index in self.fields.values_mut() {
            self.postings += index.add(slot, payload);
        }
    }

    /// Whether stale postings outnumber the live points enough to rebuild.
    pub fn needs_rebuild(&self, live: usize) -> bool {
        !self.fields.is_empty() && self.postings > 2 * live * self.fields.len() + 1024
    }

    /// Slots that may pass `filter`: the postings of the most selective indexed `match`
    /// among its `must` conditions (sorted, deduplicated), or `None` when no such
    /// condition narrows it.
    pub fn candidates(&self, filter: &Filter) -> Option<Vec<u32>> {
        let mut best: Option<Vec<u32>> = None;
        for condition in &filter.must {
            let Condition::Match { key, matcher } = condition else {
                continue;
            };
            let Some(index) = self.fields.values().find(|f| &f.path == key) else {
                continue;
            };
            let values: Vec<&Value> = match matcher {
                Matcher::Value(v) => vec![v],
                Matcher::Any(list) => list.iter().collect(),
                _ => continue,
            };
            let mut slots: Vec<u32> = values
                .into_iter()
                .filter_map(key_of)
                .filter_map(|k| index.postings.get(&k))
                .flatten()
                .copied()
                .collect();
            slots.sort_unstable();
            slots.dedup();
            if best.as_ref().is_none_or(|b| slots.len() < b.len()) {
                best = Some(slots);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn postings_narrow_a_must_match_and_keep_stale_slots_harmless() {
        let payloads: Vec<Map<String, Value>> = (0..10)
            .map(|i| {
                json!({"g": i % 3, "tag": if i < 5 { "a" } else { "b" }})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect();
        let mut indexes = PayloadIndexes::default();
        indexes.rebuild(&["g".into(), "tag".into()], payloads.iter().enumerate());
        let filter = |v: Value| Filter::parse(&v).unwrap();
        let f = filter(
            json!({"must": [{"key": "g", "match": {"value": 0}}, {"key": "tag", "match": {"value": "a"}}]}),
        );
        // g == 0 → 0, 3, 6, 9 (4 slots) beats tag == a (5 slots).
        assert_eq!(indexes.candidates(&f), Some(vec![0, 3, 6, 9]));
        let any = filter(json!({"must": [{"key": "g", "match": {"any": [1, 2]}}]}));
        assert_eq!(indexes.candidates(&any).unwrap().len(), 6);
        // Conditions the index cannot answer leave the scan to the filter.
        assert_eq!(
            indexes.candidates(&filter(
                json!({"should": [{"key": "g", "match": {"value": 0}}]})
            )),
            None
        );
        assert_eq!(
            indexes.candidates(&filter(
                json!({"must": [{"key": "n", "match": {"value": 0}}]})
            )),
            None
        );
        // A slot re-added with a new payload is listed under both values.
        indexes.add(0, json!({"g": 1}).as_object().unwrap());
        assert!(indexes.candidates(&f).unwrap().contains(&0));
        assert!(indexes
            .candidates(&filter(
                json!({"must": [{"key": "g", "match": {"value": 1}}]})
            ))
            .unwrap()
            .contains(&0));
    }
}
