//! Approximate nearest-neighbour search over one cache's vectors, with hnsw_rs.
//!
//! The index knows only slots (dense `usize` ids) and vectors; what a slot means, and
//! whether it is still alive, belongs to the caller, which passes a filter to each search.
//! hnsw_rs cannot delete, so dead slots stay in the graph as tombstones and are filtered.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::prelude::Hnsw;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index holds {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("the index failed internally: {0}")]
    Internal(String),
}

/// Cosine distance for L2-normalised vectors, `1 - dot`, clamped at 0.
///
/// anndists' `DistDot` asserts `dot <= 1`, which rounding breaks for near-identical
/// vectors and would panic a request; this never panics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Dot product in eight independent lanes, which the compiler vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            lanes[i] += ca[i] * cb[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// HNSW build and search parameters.
#[derive(Debug, Clone, Copy)]
pub struct IndexParams {
    pub max_connections: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            max_connections: 16,
            ef_construction: 200,
            ef_search: 64,
        }
    }
}

const MAX_LAYERS: usize = 16;

pub struct VectorIndex {
    hnsw: Hnsw<'static, f32, CosineDistance>,
    dimensions: usize,
    params: IndexParams,
    /// hnsw_rs loses points when inserts race (hnsw_rs #32), so inserts take turns;
    /// searches never wait for this.
    insert_lock: Mutex<()>,
}

/// One search result: a slot and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub slot: usize,
    pub similarity: f32,
}

impl VectorIndex {
    pub fn new(dimensions: usize, capacity_hint: usize, params: IndexParams) -> Self {
        let hnsw = Hnsw::new(
            params.max_connections,
            capacity_hint.max(1024),
            MAX_LAYERS,
            params.ef_construction,
            CosineDistance,
        );
        Self {
            hnsw,
            dimensions,
            params,
            insert_lock: Mutex::new(()),
        }
    }

    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, v: &[f32]) -> Result<(), IndexError> {
        if v.len() != self.dimensions {
            return Err(IndexError::Dimension {
                got: v.len(),
                expected: self.dimensions,
            });
        }
        Ok(())
    }

    pub fn insert(&self, slot: usize, vector: &[f32]) -> Result<(), IndexError> {
        self.check(vector)?;
        let _turn = self.insert_lock.lock().unwrap_or_else(|p| p.into_inner());
        catch_unwind(AssertUnwindSafe(|| self.hnsw.insert_slice((vector, slot))))
            .map_err(|p| IndexError::Internal(panic_text(p)))
    }

    /// The `k` nearest slots accepted by `keep`, best first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<Neighbour>, IndexError> {
        self.check(query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let ef = self.params.ef_search.max(k);
        let to_neighbours = |found: Vec<hnsw_rs::prelude::Neighbour>| -> Vec<Neighbour> {
            found
                .into_iter()
                .filter(|n| keep(n.d_id))
                .map(|n| Neighbour {
                    slot: n.d_id,
                    similarity: 1.0 - n.distance,
                })
                .collect()
        };
        // hnsw_rs's filtered walk costs about three times a plain one (measured on
        // clustered 384-d vectors), so try the plain walk first and filter afterwards;
        // only when that leaves too few results walk again with the filter.
        let plain = catch_unwind(AssertUnwindSafe(|| self.hnsw.search(query, k, ef)))
            .map_err(|p| IndexError::Internal(panic_text(p)))?;
        let returned = plain.len();
        let kept = to_neighbours(plain);
        if kept.len() >= k || returned < k {
            return Ok(kept);
        }
        let filter = |id: &usize| keep(*id);
        let found = catch_unwind(AssertUnwindSafe(|| {
            self.hnsw.search_filter(query, k, ef, Some(&filter))
        }))
        .map_err(|p| IndexError::Internal(panic_text(p)))?;
        Ok(to_neighbours(found))
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_unit(rng: &mut impl Rng, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let norm = dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }

    #[test]
    fn every_point_is_found_by_its_own_vector() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let index = VectorIndex::new(32, 0, IndexParams::default());
        let points: Vec<Vec<f32>> = (0..3000).map(|_| random_unit(&mut rng, 32)).collect();
        // Concurrent inserters, as under real traffic (hnsw_rs #32).
        std::thread::scope(|s| {
            for part in 0..4 {
                let (index, points) = (&index, &points);
                s.spawn(move || {
                    for (slot, p) in points.iter().enumerate().skip(part).step_by(4) {
                        index.insert(slot, p).unwrap();
                    }
                });
            }
        });
        for (slot, p) in points.iter().enumerate() {
            let found = index.search(p, 1, &|_| true).unwrap();
            assert_eq!(found[0].slot, slot, "point {slot} unreachable");
            assert!(found[0].similarity > 0.999);
        }
    }

    #[test]
    fn filtered_out_slots_are_never_returned() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let index = VectorIndex::new(16, 0, IndexParams::default());
        let points: Vec<Vec<f32>> = (0..500).map(|_| random_unit(&mut rng, 16)).collect();
        for (slot, p) in points.iter().enumerate() {
            index.insert(slot, p).unwrap();
        }
        let found = index.search(&points[10], 5, &|slot| slot % 2 == 1).unwrap();
        assert!(!found.is_empty());
        assert!(found.iter().all(|n| n.slot % 2 == 1));
    }

    #[test]
    fn identical_vectors_do_not_panic_and_bad_dimensions_are_errors() {
        let index = VectorIndex::new(4, 0, IndexParams::default());
        // A vector whose dot with itself rounds above 1.0.
        let v = [0.5000001f32, 0.5000001, 0.5000001, 0.5000001];
        for slot in 0..50 {
            index.insert(slot, &v).unwrap();
        }
        let found = index.search(&v, 3, &|_| true).unwrap();
        assert_eq!(found.len(), 3);
        assert!(matches!(
            index.insert(99, &[1.0]),
            Err(IndexError::Dimension { .. })
        ));
    }
}
