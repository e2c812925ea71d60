//! Which prompt each entry last answered, so feedback can name "the query it wrongly
//! answered" without the gateway resending it. Bounded; forgotten on restart.

use std::collections::HashMap;

use crate::store::EntryId;

const CAPACITY: usize = 16_384;

#[derive(Default)]
pub struct RecentAnswers {
    map: HashMap<(String, EntryId), String>,
}

impl RecentAnswers {
    pub fn remember(&mut self, cache_id: &str, id: EntryId, prompt: &str) {
        if self.map.len() >= CAPACITY {
            // Cheap bound: forget everything rather than track recency per entry.
            self.map.clear();
        }
        self.map
            .insert((cache_id.to_string(), id), prompt.to_string());
    }

    pub fn last(&self, cache_id: &str, id: EntryId) -> Option<String> {
        self.map.get(&(cache_id.to_string(), id)).cloned()
    }
}
