//! Capacity eviction: which live entry to drop when a cache is full.
//!
//! Both policies sample a few live entries at random and evict the worst of the sample
//! (as Redis does), so an eviction costs O(sample), not O(entries):
//! - `lru`: the least recently used;
//! - `lfu` (default): the least *frequently* used, with a logarithmic counter that
//!   decays while an entry is idle, and new entries starting above the floor so they
//!   get a chance to prove themselves. On the skewed traces a cache sees (a few prompts
//!   asked over and over, a long tail asked once) this keeps the popular answers that
//!   LRU flushes out after every burst of one-off prompts; `benches/eviction.rs`
//!   measures both.
//!
//! Per-entry usage is one atomic word, so hits update it under a shared lock.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Lru,
    Lfu,
}

/// Entries compared per eviction.
const SAMPLE: usize = 16;
/// Counter value of a new entry (out of 255).
const INITIAL_FREQUENCY: u64 = 2;
/// An idle entry loses one count per this many cache-wide accesses per live entry:
/// the decay keeps pace with how fast the cache turns over, whatever its size.
const DECAY_TURNOVERS: u64 = 4;
/// Smallest decay period, in accesses.
const MIN_DECAY_TICKS: u64 = 256;
/// Counter growth: each hit raises a counter at `c` above the start with
/// probability 1 / ((c - start) * LOG_FACTOR + 1).
const LOG_FACTOR: f64 = 1.0;

/// Usage of every slot, plus the live slots for sampling.
#[derive(Default)]
pub struct Tracker {
    /// Per slot: last access tick (high 56 bits) and frequency counter (low 8 bits).
    usage: Vec<AtomicU64>,
    live: Vec<usize>,
    /// Position of each slot in `live`, or usize::MAX.
    position: Vec<usize>,
    clock: AtomicU64,
}

fn pack(tick: u64, frequency: u64) -> u64 {
    (tick << 8) | frequency.min(255)
}

impl Tracker {
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A slot became live.
    pub fn admit(&mut self, slot: usize) {
        if self.usage.len() <= slot {
            self.usage.resize_with(slot + 1, AtomicU64::default);
            self.position.resize(slot + 1, usize::MAX);
        }
        if self.position[slot] != usize::MAX {
            return;
        }
        let tick = self.tick();
        self.usage[slot].store(pack(tick, INITIAL_FREQUENCY), Ordering::Relaxed);
        self.position[slot] = self.live.len();
        self.live.push(slot);
    }

    /// A slot answered a lookup.
    pub fn touch(&self, slot: usize) {
        let Some(cell) = self.usage.get(slot) else {
            return;
        };
        let tick = self.tick();
        let old = cell.load(Ordering::Relaxed);
        let frequency = self.decayed(old, tick);
        // Logarithmic increment: the higher the counter, the less likely each step.
        let bump = frequency < 255 && {
            let p = 1.0 / ((frequency.saturating_sub(INITIAL_FREQUENCY)) as f64 * LOG_FACTOR + 1.0);
            rand::thread_rng().gen::<f64>() < p
        };
        let _ = cell.compare_exchange(
            old,
            pack(tick, frequency + bump as u64),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A slot is gone (deleted, expired, evicted).
    pub fn remove(&mut self, slot: usize) {
        let Some(&pos) = self.position.get(slot) else {
            return;
        };
        if pos == usize::MAX {
            return;
        }
        let last = self.live.pop().unwrap_or(slot);
        if last != slot {
            self.live[pos] = last;
            self.position[last] = pos;
        }
        self.position[slot] = usize::MAX;
    }

    fn decayed(&self, packed: u64, now: u64) -> u64 {
        let (tick, frequency) = (packed >> 8, packed & 0xff);
        let period = (self.live.len() as u64 * DECAY_TURNOVERS).max(MIN_DECAY_TICKS);
        frequency.saturating_sub(now.saturating_sub(tick) / period)
    }

    /// The slot to evict next, from a random sample of live slots.
    pub fn victim(&self, policy: Policy, rng: &mut impl Rng) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        let now = self.clock.load(Ordering::Relaxed);
        let sample = SAMPLE.min(self.live.len());
        (0..sample)
            .map(|_| self.live[rng.gen_range(0..self.live.len())])
            .min_by_key(|&slot| {
                let packed = self.usage[slot].load(Ordering::Relaxed);
                let tick = packed >> 8;
                match policy {
                    Policy::Lru => (0, tick),
                    Policy::Lfu => (self.decayed(packed, now), tick),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn lfu_keeps_the_popular_entry_that_lru_drops() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (policy, keeps_popular) in [(Policy::Lfu, true), (Policy::Lru, false)] {
            let mut t = Tracker::default();
            t.admit(0);
            for _ in 0..200 {
                t.touch(0);
            }
            // Then a burst of one-off entries, each evicting one if over 10.
            let mut evicted = Vec::new();
            for slot in 1..60 {
                t.admit(slot);
                if t.len() > 10 {
                    let v = t.victim(policy, &mut rng).unwrap();
                    t.remove(v);
                    evicted.push(v);
                }
            }
            assert_eq!(!evicted.contains(&0), keeps_popular, "{policy:?}");
            assert_eq!(t.len(), 10);
        }
    }

    #[test]
    fn removal_keeps_the_live_set_consistent() {
        let mut t = Tracker::default();
        for s in 0..5 {
            t.admit(s);
        }
        t.remove(2);
        t.remove(2);
        t.remove(4);
        assert_eq!(t.len(), 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let v = t.victim(Policy::Lru, &mut rng).unwrap();
            assert!([0, 1, 3].contains(&v));
        }
    }
}
