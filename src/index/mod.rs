//! Approximate nearest-neighbour search over one set's vectors: hnsw_rs builds the graph,
//! frozen segments ([`frozen`]) hold it once built.
//!
//! The index knows only slots (dense `usize` ids) and vectors; what a slot means, and
//! whether it is still alive, belongs to the caller, which passes a filter to each search.
//! Nothing is deleted from a graph, so dead slots stay as tombstones and are filtered.
//!
//! New points go into a live hnsw_rs graph. A save freezes it into a compact,
//! memory-mapped, checksummed segment (flat `u32` neighbour lists, f16 vectors) and
//! starts an empty live graph; a restart maps the segments and loads no points. A search
//! walks every segment (lock-free, a per-thread visited table) and the live graph, and
//! merges by similarity; the owner rebuilds a set into one graph when segments pile up.
//!
//! Vectors are stored as f16 (callers pass and get f32): half the memory with the same
//! recall; a similarity is off by at most about 1e-3.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use half::f16;
use hnsw_rs::anndists::dist::Distance;
#[cfg(test)]
use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::{load_description, Description, HnswIo};
use hnsw_rs::prelude::Hnsw;

pub mod frozen;

use frozen::{Segment, SegmentError, SegmentWriter};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index holds {expected}")]
    Dimension { got: usize, expected: usize },
    #[error("the index failed internally: {0}")]
    Internal(String),
    #[error("index file {path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

/// File name stem of a saved graph: `graph.hnsw.graph` and `graph.hnsw.data`.
const SAVED_BASENAME: &str = "graph";
/// Stem of the f16 copy made of a graph saved with f32 vectors, while it loads.
const UPGRADE_BASENAME: &str = "upgrade";

/// How the graph stores each vector component.
type Element = f16;

/// The files [`VectorIndex::save`] writes into `dir`: hnsw_rs's graph, then its vectors.
pub fn saved_files(dir: &Path) -> [std::path::PathBuf; 2] {
    hnsw_files(dir, SAVED_BASENAME)
}

/// hnsw_rs's two files for the stem `basename` in `dir`: graph, then vectors.
fn hnsw_files(dir: &Path, basename: &str) -> [std::path::PathBuf; 2] {
    ["graph", "data"].map(|ext| dir.join(format!("{basename}.hnsw.{ext}")))
}

/// Cosine distance for L2-normalised vectors, `1 - dot`, clamped at 0.
///
/// anndists' `DistDot` asserts `dot <= 1`, which rounding breaks for near-identical
/// vectors and would panic a request; this never panics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CosineDistance;

impl Distance<Element> for CosineDistance {
    fn eval(&self, a: &[Element], b: &[Element]) -> f32 {
        (1.0 - dot_f16(a, b)).max(0.0)
    }
}

/// Graphs saved before the f16 change held f32 vectors; tests write such graphs.
#[cfg(test)]
impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

fn to_elements(v: &[f32]) -> Vec<Element> {
    v.iter().map(|x| f16::from_f32(*x)).collect()
}

/// Dot product of two f16 vectors, summed in f32.
fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx2_fma_f16c() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked once, cached).
            return unsafe { simd::dot_f16_avx2_fma(a, b) };
        }
    }
    dot_f16_portable(a, b)
}

fn dot_f16_portable(a: &[f16], b: &[f16]) -> f32 {
    dot_lanes(a, b, f16::to_f32)
}

/// Dot product of two equally long slices.
///
/// Distance evaluations are most of an HNSW search, and the default x86-64 target only
/// allows SSE2, so the AVX2+FMA version is chosen at run time where the CPU has it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked once, cached).
            return unsafe { simd::dot_avx2_fma(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b, |x| x)
}

/// Eight independent lanes, which the compiler vectorises for any target.
fn dot_lanes<T: Copy>(a: &[T], b: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| widen(*x) * widen(*y))
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            lanes[i] += widen(ca[i]) * widen(cb[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn has_avx2_fma() -> bool {
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    pub fn has_avx2_fma_f16c() -> bool {
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c"))
    }

    /// Sums eight lanes into one.
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum(sum: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
    }

    /// As [`dot_avx2_fma`], widening eight f16 at a time to f32 (F16C).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2_fma(a: &[half::f16], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr() as *const __m128i, b.as_ptr() as *const __m128i);
        let load =
            |p: *const __m128i, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.byte_add(i * 2)));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (lane, sum) in acc.iter_mut().enumerate() {
                let at = i + lane * 8;
                *sum = _mm256_fmadd_ps(load(pa, at), load(pb, at), *sum);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load(pa, i), load(pb, i), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = horizontal_sum(sum);
        while i < n {
            total += a[i].to_f32() * b[i].to_f32();
            i += 1;
        }
        total
    }

    /// Four 8-wide accumulators hide the FMA latency.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (lane, sum) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + lane * 8));
                let y = _mm256_loadu_ps(pb.add(i + lane * 8));
                *sum = _mm256_fmadd_ps(x, y, *sum);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = horizontal_sum(sum);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }
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

/// What a search reads: the frozen segments, and the live hnsw_rs graph that new points
/// go into. Swapped whole (under the insert lock) when the live graph is frozen.
struct Parts {
    frozen: Vec<Arc<Segment>>,
    live: Hnsw<'static, Element, CosineDistance>,
}

fn live_graph(params: IndexParams, capacity_hint: usize) -> Hnsw<'static, Element, CosineDistance> {
    Hnsw::new(
        params.max_connections,
        capacity_hint.max(1024),
        MAX_LAYERS,
        params.ef_construction,
        CosineDistance,
    )
}

/// An HNSW index in segments: points are inserted into a live hnsw_rs graph, which
/// [`VectorIndex::freeze`] turns into a compact, memory-mapped [`Segment`]; a search
/// walks every segment and the live graph and merges by similarity.
pub struct VectorIndex {
    parts: RwLock<Arc<Parts>>,
    dimensions: usize,
    params: IndexParams,
    /// hnsw_rs loses points when inserts race (hnsw_rs #32), so inserts take turns (and
    /// a freeze waits its turn too); searches never wait for this.
    insert_lock: Mutex<()>,
    /// Loaded from a save in an older format, converted on every load until it is saved
    /// again.
    outdated_save: bool,
}

/// One search result: a slot and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub slot: usize,
    pub similarity: f32,
}

impl VectorIndex {
    pub fn new(dimensions: usize, capacity_hint: usize, params: IndexParams) -> Self {
        Self::from_parts(
            Vec::new(),
            live_graph(params, capacity_hint),
            dimensions,
            params,
            false,
        )
    }

    fn from_parts(
        frozen: Vec<Arc<Segment>>,
        live: Hnsw<'static, Element, CosineDistance>,
        dimensions: usize,
        params: IndexParams,
        outdated_save: bool,
    ) -> Self {
        Self {
            parts: RwLock::new(Arc::new(Parts { frozen, live })),
            dimensions,
            params,
            insert_lock: Mutex::new(()),
            outdated_save,
        }
    }

    fn parts(&self) -> Arc<Parts> {
        self.parts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Opens saved segments (see [`VectorIndex::freeze`]) as a new index whose live
    /// graph is empty: nothing is loaded point by point. Each file's checksums and
    /// structure are checked; a damaged file, or one of other dimensions or build
    /// parameters, is an error.
    pub fn open(
        paths: &[PathBuf],
        dimensions: usize,
        params: IndexParams,
    ) -> Result<Self, IndexError> {
        let mut frozen = Vec::with_capacity(paths.len());
        for path in paths {
            let segment = Segment::open(path)?;
            if segment.dimensions() != dimensions {
                return Err(IndexError::Dimension {
                    got: segment.dimensions(),
                    expected: dimensions,
                });
            }
            if segment.built_with() != (params.max_connections, params.ef_construction) {
                let (m, efc) = segment.built_with();
                return Err(IndexError::File {
                    path: path.display().to_string(),
                    reason: format!(
                        "built with M={m} ef_construction={efc}, configured M={} ef_construction={}",
                        params.max_connections, params.ef_construction
                    ),
                });
            }
            frozen.push(Arc::new(segment));
        }
        Ok(Self::from_parts(
            frozen,
            live_graph(params, 0),
            dimensions,
            params,
            false,
        ))
    }

    /// Freezes the live graph into a new segment file in `dir` (synced), maps it, and
    /// swaps it in with an empty live graph; searches keep their view meanwhile.
    /// Returns the files of every segment, oldest first: what [`VectorIndex::open`]
    /// takes to bring this index back.
    pub fn freeze(&self, dir: &Path) -> Result<Vec<PathBuf>, IndexError> {
        let _turn = self.insert_lock.lock().unwrap_or_else(|p| p.into_inner());
        let parts = self.parts();
        let mut frozen = parts.frozen.clone();
        if parts.live.get_nb_point() > 0 {
            let path = dir.join(format!("{}.seg", uuid::Uuid::new_v4().simple()));
            let written = catch_unwind(AssertUnwindSafe(|| {
                write_segment(&parts.live, &path, self.dimensions, self.params)
            }));
            let written = written
                .map_err(|p| IndexError::Internal(panic_text(p)))
                .and_then(|r| r);
            if let Err(e) = written {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            frozen.push(Arc::new(Segment::open_written(&path)?));
            let live = live_graph(self.params, 0);
            *self.parts.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Parts {
                frozen: frozen.clone(),
                live,
            });
        }
        Ok(frozen.iter().map(|s| s.path().to_path_buf()).collect())
    }

    /// Frozen segments in this index.
    pub fn segments(&self) -> usize {
        self.parts().frozen.len()
    }

    /// Writes the live graph in hnsw_rs's own format, as saves did before segments;
    /// tests use it to make such saves.
    #[cfg(test)]
    pub(crate) fn save_legacy(&self, dir: &Path) -> Result<(), IndexError> {
        let parts = self.parts();
        let written = parts
            .live
            .file_dump(dir, SAVED_BASENAME)
            .map_err(|e| IndexError::Internal(e.to_string()))?;
        assert_eq!(written, SAVED_BASENAME);
        Ok(())
    }

    /// Reads a graph saved in hnsw_rs's format (saves before frozen segments), as the
    /// live graph. Damaged or foreign files are an error (never a panic), and so is a
    /// graph of other dimensions or build parameters. A graph saved with f32 vectors
    /// loads from an f16 copy made beside it. Either way the next save freezes it.
    pub fn load(dir: &Path, dimensions: usize, params: IndexParams) -> Result<Self, IndexError> {
        let file_error = |reason: String| IndexError::File {
            path: dir.display().to_string(),
            reason,
        };
        let header = check_data_file(dir).map_err(file_error)?;
        let basename = if header.t_name == std::any::type_name::<f32>() {
            let started = std::time::Instant::now();
            let upgraded = upgrade_f32_save(dir, &header);
            if upgraded.is_err() {
                remove_upgrade(dir);
            }
            upgraded.map_err(|e| file_error(format!("cannot convert f32 vectors to f16: {e}")))?;
            tracing::info!(
                dir = %dir.display(),
                points = header.nb_point,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "saved graph converted from f32 to f16 vectors"
            );
            UPGRADE_BASENAME
        } else {
            SAVED_BASENAME
        };
        // hnsw_rs ties a loaded graph's lifetime to its loader (for memory-mapped data,
        // which we do not use); the loader is a few hundred bytes, kept for good.
        let loader: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, basename)));
        let loaded = catch_unwind(AssertUnwindSafe(move || {
            let loader = loader; // moved, so the closure is FnOnce and may return it
            loader.load_hnsw::<Element, CosineDistance>()
        }));
        if basename == UPGRADE_BASENAME {
            // Everything is in memory now; the saved f32 files stay as they were.
            remove_upgrade(dir);
        }
        let hnsw: Hnsw<'static, Element, CosineDistance> = loaded
            .map_err(|p| file_error(panic_text(p)))?
            .map_err(|e| file_error(e.to_string()))?;
        if hnsw.get_nb_point() > 0 && hnsw.get_point_indexation().get_data_dimension() != dimensions
        {
            return Err(IndexError::Dimension {
                got: hnsw.get_point_indexation().get_data_dimension(),
                expected: dimensions,
            });
        }
        if hnsw.get_max_nb_connection() as usize != params.max_connections
            || hnsw.get_ef_construction() != params.ef_construction
        {
            return Err(file_error(format!(
                "built with M={} ef_construction={}, configured M={} ef_construction={}",
                hnsw.get_max_nb_connection(),
                hnsw.get_ef_construction(),
                params.max_connections,
                params.ef_construction
            )));
        }
        // Every load of the old format costs hnsw_rs's loader; a fresh save replaces it.
        Ok(Self::from_parts(Vec::new(), hnsw, dimensions, params, true))
    }

    /// Whether this index came from a save in an older format, which a new save replaces.
    pub fn loaded_from_outdated_save(&self) -> bool {
        self.outdated_save
    }

    pub fn params(&self) -> IndexParams {
        self.params
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Candidates kept during a search walk: higher finds more true neighbours, slower.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef.max(1);
    }

    pub fn len(&self) -> usize {
        let parts = self.parts();
        parts.frozen.iter().map(|s| s.len()).sum::<usize>() + parts.live.get_nb_point()
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
        let parts = self.parts();
        catch_unwind(AssertUnwindSafe(|| {
            parts.live.insert_slice((&to_elements(vector), slot))
        }))
        .map_err(|p| IndexError::Internal(panic_text(p)))
    }

    /// The `k` nearest slots accepted by `keep`, best first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<Neighbour>, IndexError> {
        self.search_with(query, k, self.params.ef_search, Walk::PlainFirst, keep)
    }

    /// The `k` nearest slots accepted by `keep`, best first, walking with a beam of
    /// `ef` (at least `k`) the way `walk` says.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        walk: Walk,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<Neighbour>, IndexError> {
        self.check(query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let ef = ef.max(k);
        let query = to_elements(query);
        let query = query.as_slice();
        let parts = self.parts();
        if walk == Walk::Exact {
            return catch_unwind(AssertUnwindSafe(|| exact(&parts, query, k, keep)))
                .map_err(|p| IndexError::Internal(panic_text(p)));
        }
        let mut found = Vec::new();
        let live_searched = parts.live.get_nb_point() > 0;
        for segment in &parts.frozen {
            // A frozen walk filters as it goes at little cost, whichever `walk` is asked.
            let hits = catch_unwind(AssertUnwindSafe(|| segment.search(query, k, ef, keep)))
                .map_err(|p| IndexError::Internal(panic_text(p)))?;
            found.extend(hits.into_iter().map(|f| Neighbour {
                slot: f.slot,
                similarity: 1.0 - f.distance,
            }));
        }
        if live_searched {
            found.extend(search_live(&parts.live, query, k, ef, walk, keep)?);
        }
        if parts.frozen.len() + usize::from(live_searched) > 1 {
            found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
            found.truncate(k);
        }
        Ok(found)
    }
}

/// A search of the live hnsw_rs graph.
fn search_live(
    live: &Hnsw<'static, Element, CosineDistance>,
    query: &[Element],
    k: usize,
    ef: usize,
    walk: Walk,
    keep: &(dyn Fn(usize) -> bool + Sync),
) -> Result<Vec<Neighbour>, IndexError> {
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
    if walk == Walk::PlainFirst {
        // hnsw_rs's filtered walk costs about three times a plain one (measured on
        // clustered 384-d vectors), so try the plain walk first and filter
        // afterwards; only when that leaves too few results walk again with the filter.
        let plain = catch_unwind(AssertUnwindSafe(|| live.search(query, k, ef)))
            .map_err(|p| IndexError::Internal(panic_text(p)))?;
        let returned = plain.len();
        let kept = to_neighbours(plain);
        if kept.len() >= k || returned < k {
            return Ok(kept);
        }
    }
    let filter = |id: &usize| keep(*id);
    let found = catch_unwind(AssertUnwindSafe(|| {
        live.search_filter(query, k, ef, Some(&filter))
    }))
    .map_err(|p| IndexError::Internal(panic_text(p)))?;
    Ok(to_neighbours(found))
}

/// Brute force over every point `keep` accepts, in every part: exact, and cheaper than
/// a walk when few points pass the filter.
fn exact(
    parts: &Parts,
    query: &[Element],
    k: usize,
    keep: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<Neighbour> {
    let mut best: Vec<Neighbour> = Vec::with_capacity(k + 1);
    let mut consider = |slot: usize, vector: &[Element]| {
        if !keep(slot) {
            return;
        }
        let similarity = dot_f16(query, vector).min(1.0);
        if best.len() == k && best[k - 1].similarity >= similarity {
            return;
        }
        let at = best.partition_point(|n| n.similarity >= similarity);
        best.insert(at, Neighbour { slot, similarity });
        best.truncate(k);
    };
    for segment in &parts.frozen {
        for (slot, vector) in segment.points() {
            consider(slot, vector);
        }
    }
    // hnsw_rs's point iterator unwraps the entry point, which an empty graph lacks.
    if parts.live.get_nb_point() > 0 {
        for point in parts.live.get_point_indexation() {
            consider(point.get_origin_id(), point.get_v());
        }
    }
    best
}

/// Exports a built hnsw_rs graph as a segment file: points numbered layer by layer in
/// hnsw_rs's own order (so a neighbour's `(layer, rank)` gives its number), the entry
/// point first on the top layer (hnsw_rs makes the first point to reach a level its
/// entry point).
fn write_segment(
    hnsw: &Hnsw<'static, Element, CosineDistance>,
    path: &Path,
    dimensions: usize,
    params: IndexParams,
) -> Result<(), IndexError> {
    let indexation = hnsw.get_point_indexation();
    let points = hnsw.get_nb_point();
    let mut base = [0usize; MAX_LAYERS + 1];
    for layer in 0..MAX_LAYERS {
        base[layer + 1] = base[layer] + indexation.get_layer_nb_point(layer);
    }
    if base[MAX_LAYERS] != points {
        return Err(IndexError::Internal(
            "graph layers do not add up to its points".into(),
        ));
    }
    let top = (0..MAX_LAYERS)
        .rev()
        .find(|l| indexation.get_layer_nb_point(*l) > 0)
        .unwrap_or(0);
    let mut writer = SegmentWriter::create(
        path,
        dimensions,
        points,
        params.max_connections,
        params.ef_construction,
    )?;
    let number = |id: hnsw_rs::prelude::PointId| -> Option<u32> {
        let rank = usize::try_from(id.1).ok()?;
        let at = base.get(id.0 as usize)? + rank;
        (at < points).then_some(at as u32)
    };
    let mut layers: Vec<Vec<u32>> = Vec::new();
    for (n, point) in indexation.into_iter().enumerate() {
        let id = point.get_point_id();
        if number(id) != Some(n as u32) {
            return Err(IndexError::Internal(format!(
                "point {id:?} out of order at {n}"
            )));
        }
        let level = id.0 as usize;
        let hood = point.get_neighborhood_id();
        layers.resize_with(level + 1, Vec::new);
        for (layer, list) in layers.iter_mut().enumerate() {
            list.clear();
            for neighbour in hood.get(layer).into_iter().flatten() {
                let at = number(neighbour.p_id)
                    .ok_or_else(|| IndexError::Internal("link to an unknown point".into()))?;
                list.push(at);
            }
        }
        writer.push(point.get_origin_id(), point.get_v(), &layers[..=level])?;
    }
    writer.finish(base[top] as u32)?;
    Ok(())
}

/// How [`VectorIndex::search_with`] looks for neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// A plain walk filtered afterwards, then a filtered walk if that left too few: for
    /// filters most points pass.
    PlainFirst,
    /// hnsw_rs's filtered walk straight away: for filters many points fail.
    Filtered,
    /// Every accepted point compared: for filters few points pass, or exact search.
    Exact,
}

/// hnsw_rs ends the whole process (exit status 1) when a saved data file holds fewer
/// vectors than its graph names, which at start-up would be a crash loop. So the data
/// file's length is checked against the graph's header first: a damaged save becomes an
/// error, and the caller rebuilds that cache from the store. Returns the graph's header.
fn check_data_file(dir: &Path) -> Result<Description, String> {
    let [graph, data] = saved_files(dir);
    let mut reader = BufReader::new(File::open(&graph).map_err(|e| e.to_string())?);
    let header = catch_unwind(AssertUnwindSafe(|| load_description(&mut reader)))
        .map_err(panic_text)?
        .map_err(|e| e.to_string())?;
    let element = if header.t_name == std::any::type_name::<Element>() {
        size_of::<Element>()
    } else if header.t_name == std::any::type_name::<f32>() {
        size_of::<f32>()
    } else {
        return Err(format!("vectors of type {} are not ours", header.t_name));
    };
    let per_point = DATA_RECORD_HEAD + header.dimension * element;
    let expected = header
        .nb_point
        .checked_mul(per_point)
        .and_then(|body| body.checked_add(DATA_HEAD))
        .ok_or("graph header names an impossible size")?;
    let found = std::fs::metadata(&data).map_err(|e| e.to_string())?.len();
    if found != expected as u64 {
        return Err(format!(
            "data file holds {found} bytes; the graph's {} points need {expected}",
            header.nb_point
        ));
    }
    Ok(header)
}

// Layout of hnsw_rs 0.3's data file: magic u32 and dimension usize, then per point
// magic u32, id u64, byte length u64 and the raw values.
const DATA_HEAD: usize = size_of::<u32>() + size_of::<usize>();
const DATA_RECORD_HEAD: usize = size_of::<u32>() + 2 * size_of::<u64>();

/// Writes an f16 copy of a graph saved with f32 vectors, as `upgrade.hnsw.*` in `dir`:
/// the same graph file with the element type renamed in its header, and every vector
/// record narrowed. `header` comes from [`check_data_file`], so the data file's size
/// is already known to match. The copy is read once and removed (a crash leaves the f32
/// save, converted again next start), so it is not synced to disk.
fn upgrade_f32_save(dir: &Path, header: &Description) -> std::io::Result<()> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let [graph, data] = saved_files(dir);
    let [new_graph, new_data] = hnsw_files(dir, UPGRADE_BASENAME);

    // The graph header ends with the element type's name, length first (usize).
    let old_name = header.t_name.as_bytes();
    let header_len = size_of::<u32>()
        + 2
        + size_of::<f64>()
        + 1
        + 3 * size_of::<usize>()
        + size_of::<usize>()
        + header.distname.len()
        + size_of::<usize>()
        + old_name.len();
    let mut input = BufReader::new(File::open(&graph)?);
    let mut head = vec![0u8; header_len];
    input.read_exact(&mut head)?;
    let name_at = header_len - old_name.len();
    let length_at = name_at - size_of::<usize>();
    if &head[name_at..] != old_name || head[length_at..name_at] != old_name.len().to_ne_bytes() {
        return Err(invalid("unexpected graph header layout"));
    }
    let new_name = std::any::type_name::<Element>().as_bytes();
    let mut output = BufWriter::new(File::create(&new_graph)?);
    output.write_all(&head[..length_at])?;
    output.write_all(&new_name.len().to_ne_bytes())?;
    output.write_all(new_name)?;
    std::io::copy(&mut input, &mut output)?;
    output.flush()?;

    let mut input = BufReader::new(File::open(&data)?);
    let mut output = BufWriter::new(File::create(&new_data)?);
    let mut head = [0u8; DATA_HEAD];
    input.read_exact(&mut head)?;
    output.write_all(&head)?;
    let mut record = [0u8; DATA_RECORD_HEAD];
    let mut values = vec![0u8; header.dimension * size_of::<f32>()];
    let narrow_len = (header.dimension * size_of::<Element>()) as u64;
    for _ in 0..header.nb_point {
        input.read_exact(&mut record)?;
        if record[DATA_RECORD_HEAD - 8..] != (values.len() as u64).to_ne_bytes() {
            return Err(invalid("vector record of unexpected length"));
        }
        input.read_exact(&mut values)?;
        output.write_all(&record[..DATA_RECORD_HEAD - 8])?;
        output.write_all(&narrow_len.to_ne_bytes())?;
        for value in values.chunks_exact(4) {
            let value = f32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
            output.write_all(&f16::from_f32(value).to_bits().to_ne_bytes())?;
        }
    }
    output.flush()
}

fn remove_upgrade(dir: &Path) {
    for file in hnsw_files(dir, UPGRADE_BASENAME) {
        let _ = std::fs::remove_file(file);
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

    /// Clustered unit vectors, like prompt embeddings: a random centre plus noise.
    fn clustered(rng: &mut impl Rng, n: usize, dim: usize, centres: usize) -> Vec<Vec<f32>> {
        let centres: Vec<Vec<f32>> = (0..centres).map(|_| random_unit(rng, dim)).collect();
        (0..n)
            .map(|i| {
                let c = &centres[i % centres.len()];
                let v: Vec<f32> = c.iter().map(|x| x + rng.gen_range(-0.08..0.08)).collect();
                let norm = dot(&v, &v).sqrt();
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect()
    }

    fn brute_top(points: &[Vec<f32>], query: &[f32], k: usize) -> Vec<usize> {
        let mut scored: Vec<(usize, f32)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (i, dot(query, p)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored.into_iter().take(k).map(|(i, _)| i).collect()
    }

    #[test]
    fn a_frozen_graph_answers_as_hnsw_rs_does_on_the_same_graph() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let points = clustered(&mut rng, 4000, 48, 40);
        let queries = clustered(&mut rng, 300, 48, 40);
        let index = VectorIndex::new(48, 0, IndexParams::default());
        for (slot, p) in points.iter().enumerate() {
            index.insert(slot * 3 + 1, p).unwrap();
        }
        let before: Vec<Vec<Neighbour>> = queries
            .iter()
            .map(|q| index.search(q, 10, &|_| true).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let files = index.freeze(dir.path()).unwrap();
        assert_eq!((files.len(), index.segments(), index.len()), (1, 1, 4000));
        // Started where hnsw_rs starts layer 0, the walk is hnsw_rs's: the same
        // neighbours, in the same order, at the same distances.
        let segment = index.parts().frozen[0].clone();
        for (q, expected) in queries.iter().zip(&before) {
            let got = segment.search_as_hnsw_rs(&to_elements(q), 10, 64);
            let got: Vec<Neighbour> = got
                .into_iter()
                .map(|f| Neighbour {
                    slot: f.slot,
                    similarity: 1.0 - f.distance,
                })
                .collect();
            assert_eq!(&got, expected);
        }
        let (mut same, mut overlap, mut recall_rs, mut recall_frozen) = (0, 0, 0, 0);
        for (q, expected) in queries.iter().zip(&before) {
            let got = index.search(q, 10, &|_| true).unwrap();
            assert_eq!(got.len(), 10);
            let slots = |n: &[Neighbour]| n.iter().map(|n| n.slot).collect::<Vec<_>>();
            same += usize::from(slots(&got) == slots(expected));
            overlap += got
                .iter()
                .filter(|g| slots(expected).contains(&g.slot))
                .count();
            let truth: Vec<usize> = brute_top(&points, q, 10)
                .into_iter()
                .map(|i| i * 3 + 1)
                .collect();
            recall_rs += expected.iter().filter(|n| truth.contains(&n.slot)).count();
            recall_frozen += got.iter().filter(|n| truth.contains(&n.slot)).count();
            for g in &got {
                let exact = dot(q, &points[(g.slot - 1) / 3]);
                assert!((g.similarity - exact).abs() < 2e-3);
            }
        }
        // The descent used keeps moving on each upper layer until it stops improving
        // (hnsw_rs takes one step), which starts layer 0 elsewhere on a few queries:
        // results agree almost always and recall does not drop.
        assert!(same >= 270, "identical top-10 on {same} of 300 queries");
        assert!(overlap >= 2900, "{overlap} of 3000 neighbours shared");
        assert!(
            recall_frozen + 5 >= recall_rs,
            "frozen {recall_frozen} vs hnsw_rs {recall_rs}"
        );

        // Reopened from its file, it answers the same.
        let reopened = VectorIndex::open(&files, 48, IndexParams::default()).unwrap();
        for q in queries.iter().take(20) {
            assert_eq!(
                reopened.search(q, 10, &|_| true).unwrap(),
                index.search(q, 10, &|_| true).unwrap()
            );
        }
        assert!(VectorIndex::open(&files, 32, IndexParams::default()).is_err());
        let other = IndexParams {
            max_connections: 8,
            ..IndexParams::default()
        };
        assert!(VectorIndex::open(&files, 48, other).is_err());
    }

    #[test]
    fn frozen_recall_at_the_default_ef_and_every_point_found_by_its_own_vector() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let points = clustered(&mut rng, 6000, 64, 200);
        let index = VectorIndex::new(64, 0, IndexParams::default());
        let dir = tempfile::tempdir().unwrap();
        // Three segments and a live graph: the search merges them.
        for (slot, p) in points.iter().enumerate() {
            index.insert(slot, p).unwrap();
            if slot == 2999 || slot == 4499 || slot == 5399 {
                index.freeze(dir.path()).unwrap();
            }
        }
        assert_eq!(index.segments(), 3);
        assert_eq!(index.len(), 6000);
        for (slot, p) in points.iter().enumerate() {
            let found = index.search(p, 1, &|_| true).unwrap();
            assert_eq!(found[0].slot, slot, "point {slot} unreachable");
        }
        let queries = clustered(&mut rng, 200, 64, 200);
        let mut hits = 0;
        for q in &queries {
            let truth = brute_top(&points, q, 10);
            let got = index.search(q, 10, &|_| true).unwrap();
            hits += got.iter().filter(|n| truth.contains(&n.slot)).count();
            // Exact search over every part (f16 vectors: near-ties may swap places).
            let exact = index
                .search_with(q, 10, 10, Walk::Exact, &|_| true)
                .unwrap();
            let shared = exact.iter().filter(|n| truth.contains(&n.slot)).count();
            assert!(shared >= 9, "exact search found {shared} of the true 10");
        }
        let recall = hits as f64 / 2000.0;
        assert!(recall >= 0.95, "recall@10 {recall}");
        // Filters (tombstones, scopes) hold in every part.
        for q in queries.iter().take(50) {
            let found = index.search(q, 10, &|slot| slot % 7 == 3).unwrap();
            assert_eq!(found.len(), 10);
            assert!(found.iter().all(|n| n.slot % 7 == 3));
            let mut sorted = found.clone();
            sorted.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
            assert_eq!(found, sorted);
        }
        assert!(index.search(&queries[0], 5, &|_| false).unwrap().is_empty());

        // Frozen segments only, the live graph empty: every walk still answers.
        index.freeze(dir.path()).unwrap();
        assert_eq!(index.segments(), 4);
        for walk in [Walk::PlainFirst, Walk::Filtered, Walk::Exact] {
            let found = index
                .search_with(&points[77], 3, 64, walk, &|_| true)
                .unwrap();
            assert_eq!(found[0].slot, 77, "{walk:?}");
        }
        let empty = VectorIndex::new(64, 0, IndexParams::default());
        for walk in [Walk::PlainFirst, Walk::Filtered, Walk::Exact] {
            assert!(empty
                .search_with(&points[0], 3, 64, walk, &|_| true)
                .unwrap()
                .is_empty());
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
    fn simd_dot_matches_the_portable_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for len in [0, 1, 7, 8, 31, 32, 33, 384, 1000] {
            let a: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4, "len {len}");
            assert!(
                (dot_portable(&a, &b) as f64 - exact).abs() < 1e-4,
                "len {len}"
            );
        }
    }

    #[test]
    fn a_saved_index_loads_and_answers_like_the_original() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let points: Vec<Vec<f32>> = (0..500).map(|_| random_unit(&mut rng, 32)).collect();
        let index = VectorIndex::new(32, 0, IndexParams::default());
        for (slot, p) in points.iter().enumerate() {
            index.insert(slot * 2, p).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        index.save_legacy(dir.path()).unwrap();
        let loaded = VectorIndex::load(dir.path(), 32, IndexParams::default()).unwrap();
        assert_eq!(loaded.len(), 500);
        for p in points.iter().take(50) {
            let a = index.search(p, 5, &|_| true).unwrap();
            let b = loaded.search(p, 5, &|_| true).unwrap();
            assert_eq!(a, b);
        }
        // It keeps growing after the load.
        let extra = random_unit(&mut rng, 32);
        loaded.insert(10_001, &extra).unwrap();
        assert_eq!(loaded.search(&extra, 1, &|_| true).unwrap()[0].slot, 10_001);

        // Other dimensions or parameters, and damaged files, are errors, not panics.
        assert!(VectorIndex::load(dir.path(), 64, IndexParams::default()).is_err());
        let other = IndexParams {
            max_connections: 8,
            ..IndexParams::default()
        };
        assert!(VectorIndex::load(dir.path(), 32, other).is_err());
        let graph = dir.path().join("graph.hnsw.graph");
        let bytes = std::fs::read(&graph).unwrap();
        std::fs::write(&graph, &bytes[..bytes.len() / 2]).unwrap();
        assert!(VectorIndex::load(dir.path(), 32, IndexParams::default()).is_err());
        std::fs::write(&graph, b"not a graph").unwrap();
        assert!(VectorIndex::load(dir.path(), 32, IndexParams::default()).is_err());
        assert!(
            VectorIndex::load(&dir.path().join("missing"), 32, IndexParams::default()).is_err()
        );
    }

    #[test]
    fn a_graph_saved_with_f32_vectors_loads_as_f16() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let points: Vec<Vec<f32>> = (0..400).map(|_| random_unit(&mut rng, 32)).collect();
        // What earlier versions saved: the same distance over f32 vectors.
        let old: Hnsw<f32, CosineDistance> = Hnsw::new(16, 400, MAX_LAYERS, 200, CosineDistance);
        for (slot, p) in points.iter().enumerate() {
            old.insert_slice((p, slot * 3));
        }
        let dir = tempfile::tempdir().unwrap();
        old.file_dump(dir.path(), SAVED_BASENAME).unwrap();
        let before: Vec<Vec<u8>> = saved_files(dir.path())
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect();

        let loaded = VectorIndex::load(dir.path(), 32, IndexParams::default()).unwrap();
        assert_eq!(loaded.len(), 400);
        assert!(loaded.loaded_from_outdated_save());
        for (slot, p) in points.iter().enumerate() {
            let found = loaded.search(p, 1, &|_| true).unwrap();
            assert_eq!(found[0].slot, slot * 3);
            assert!((found[0].similarity - 1.0).abs() < 1e-3);
            let expected = old.search(p, 5, 64);
            let got = loaded.search(p, 5, &|_| true).unwrap();
            for (e, g) in expected.iter().zip(&got) {
                assert!((1.0 - e.distance - g.similarity).abs() < 2e-3);
            }
        }
        // The saved files are untouched (their checksums still hold) and the f16 copy
        // is gone; a save writes f16, which loads directly.
        let after: Vec<Vec<u8>> = saved_files(dir.path())
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect();
        assert!(before == after);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let resaved = tempfile::tempdir().unwrap();
        loaded.save_legacy(resaved.path()).unwrap();
        let header = check_data_file(resaved.path()).unwrap();
        assert_eq!(header.t_name, std::any::type_name::<Element>());
        let data_len = std::fs::metadata(&saved_files(resaved.path())[1])
            .unwrap()
            .len();
        assert_eq!(
            data_len as usize,
            DATA_HEAD + 400 * (DATA_RECORD_HEAD + 32 * 2)
        );
        let reloaded = VectorIndex::load(resaved.path(), 32, IndexParams::default()).unwrap();
        assert_eq!(reloaded.len(), 400);
        // Still hnsw_rs's format, which the next save replaces with a segment.
        assert!(reloaded.loaded_from_outdated_save());
    }

    #[test]
    fn f16_dot_matches_the_f32_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for len in [0, 1, 7, 8, 31, 32, 33, 384] {
            let a = random_unit(&mut rng, len.max(1));
            let b = random_unit(&mut rng, len.max(1));
            let (a, b) = (&a[..len], &b[..len]);
            let (na, nb) = (to_elements(a), to_elements(b));
            assert!((dot_f16(&na, &nb) - dot(a, b)).abs() < 1e-3, "len {len}");
            assert!(
                (dot_f16_portable(&na, &nb) - dot(a, b)).abs() < 1e-3,
                "len {len}"
            );
        }
    }

    #[test]
    fn a_truncated_data_file_is_an_error_not_an_exit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let index = VectorIndex::new(32, 0, IndexParams::default());
        for slot in 0..200 {
            index.insert(slot, &random_unit(&mut rng, 32)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        index.save_legacy(dir.path()).unwrap();
        let data = dir.path().join("graph.hnsw.data");
        let bytes = std::fs::read(&data).unwrap();
        let record = DATA_RECORD_HEAD + 32 * size_of::<Element>();
        // Cut at a record boundary (hnsw_rs exits the process there) and mid-record.
        for keep in [bytes.len() - 10 * record, bytes.len() - record / 2] {
            std::fs::write(&data, &bytes[..keep]).unwrap();
            assert!(VectorIndex::load(dir.path(), 32, IndexParams::default()).is_err());
        }
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
