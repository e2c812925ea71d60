//! Per-cache counters and lookup latency, kept in memory since start.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Why entries left a cache.
#[derive(Debug, Clone, Copy)]
pub enum Reason {
    Ttl,
    Capacity,
    Admin,
    Deleted,
    Flushed,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Ttl => "ttl",
            Reason::Capacity => "capacity",
            Reason::Admin => "admin",
            Reason::Deleted => "deleted",
            Reason::Flushed => "flushed",
        }
    }
}

/// Latency buckets: upper bounds growing by a third from 50 µs to about 30 s.
const BUCKETS: usize = 48;

fn bucket_bound_us(i: usize) -> f64 {
    50.0 * (4.0f64 / 3.0).powi(i as i32)
}

pub struct Stats {
    hits_exact: AtomicU64,
    hits_semantic: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evicted: [AtomicU64; 5],
    false_hit_reports: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvictionCounts {
    pub ttl: u64,
    pub capacity: u64,
    pub admin: u64,
    pub deleted: u64,
    pub flushed: u64,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyQuantiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// A cache's counters and sizes at one moment.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub entries: u64,
    pub bytes: u64,
    pub hits_exact: u64,
    pub hits_semantic: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: EvictionCounts,
    pub false_hit_reports: u64,
    pub tombstones: u64,
    pub index_size: u64,
    pub lookup_latency: LatencyQuantiles,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            hits_exact: AtomicU64::new(0),
            hits_semantic: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evicted: Default::default(),
            false_hit_reports: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
    pub fn hit(&self, exact: bool) {
        let counter = if exact {
            &self.hits_exact
        } else {
            &self.hits_semantic
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    pub fn insert(&self) {
        self.inserts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn evicted(&self, reason: Reason, n: u64) {
        self.evicted[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn false_hit(&self) {
        self.false_hit_reports.fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self, seconds: f64) {
        let us = seconds * 1e6;
        let i = (0..BUCKETS)
            .find(|&i| us <= bucket_bound_us(i))
            .unwrap_or(BUCKETS - 1);
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }

    fn quantile(&self, counts: &[u64], q: f64) -> f64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_bound_us(i) / 1000.0;
            }
        }
        bucket_bound_us(BUCKETS - 1) / 1000.0
    }

    /// Counters plus the sizes the caller knows (entries, bytes, tombstones, index).
    pub fn snapshot(
        &self,
        entries: u64,
        bytes: u64,
        tombstones: u64,
        index_size: u64,
    ) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counts: Vec<u64> = self.latency.iter().map(get).collect();
        StatsSnapshot {
            entries,
            bytes,
            hits_exact: get(&self.hits_exact),
            hits_semantic: get(&self.hits_semantic),
            misses: get(&self.misses),
            inserts: get(&self.inserts),
            evictions: EvictionCounts {
                ttl: get(&self.evicted[Reason::Ttl as usize]),
                capacity: get(&self.evicted[Reason::Capacity as usize]),
                admin: get(&self.evicted[Reason::Admin as usize]),
                deleted: get(&self.evicted[Reason::Deleted as usize]),
                flushed: get(&self.evicted[Reason::Flushed as usize]),
            },
            false_hit_reports: get(&self.false_hit_reports),
            tombstones,
            index_size,
            lookup_latency: LatencyQuantiles {
                p50_ms: self.quantile(&counts, 0.5),
                p90_ms: self.quantile(&counts, 0.9),
                p99_ms: self.quantile(&counts, 0.99),
            },
        }
    }
}

impl EvictionCounts {
    pub fn add(&mut self, other: &EvictionCounts) {
        self.ttl += other.ttl;
        self.capacity += other.capacity;
        self.admin += other.admin;
        self.deleted += other.deleted;
        self.flushed += other.flushed;
    }
}
