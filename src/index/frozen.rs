//! Frozen segments: a built HNSW graph exported into one compact, read-only file, which
//! is memory-mapped and searched without locks.
//!
//! hnsw_rs keeps every point behind its own `Arc`, with sixteen neighbour vectors of
//! `Arc` links behind a lock (~3.2 KB a point at M=16), and its search chases those
//! pointers. A frozen segment holds the same graph as flat arrays: vectors contiguous as
//! f16, the slot of each point, and every (point, layer) neighbour list as `u32` ids in
//! one array with offsets. A restart maps the file instead of loading points.
//!
//! File layout (little-endian; every section starts on a 64-byte boundary):
//! - header (64 bytes): magic, version, dimensions, points, top level, entry point,
//!   lists, links, M, ef_construction, CRC-32 of the body, CRC-32 of the header;
//! - vectors: points × dimensions f16;
//! - slots: points u32 (the caller's ids);
//! - first list: points + 1 u32 — point p's lists are `first[p]..first[p + 1]`, one per
//!   layer from 0 to its level;
//! - list offsets: lists + 1 u32 — list l's neighbours are `links[off[l]..off[l + 1]]`;
//! - links: u32 point ids.
//!
//! A file is trusted only after its checksums and structure check out
//! ([`Segment::open`]), so search indexes it without further checks failing.

use std::cell::RefCell;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::mem::size_of;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use super::dot_f16;

const MAGIC: &[u8; 8] = b"SEMSEG01";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const ALIGN: usize = 64;

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Byte offsets of each section, from the counts in the header.
#[derive(Debug, Clone, Copy)]
struct Layout {
    vectors: usize,
    slots: usize,
    first: usize,
    offsets: usize,
    links: usize,
    end: usize,
}

impl Layout {
    fn new(dims: usize, points: usize, lists: usize, links: usize) -> Option<Self> {
        let vectors = HEADER;
        let slots = vectors.checked_add(aligned(points.checked_mul(dims)?.checked_mul(2)?))?;
        let first = slots.checked_add(aligned(points.checked_mul(4)?))?;
        let offsets = first.checked_add(aligned(points.checked_add(1)?.checked_mul(4)?))?;
        let link_at = offsets.checked_add(aligned(lists.checked_add(1)?.checked_mul(4)?))?;
        let end = link_at.checked_add(aligned(links.checked_mul(4)?))?;
        Some(Self {
            vectors,
            slots,
            first,
            offsets,
            links: link_at,
            end,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("segment {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Writes a segment: vectors stream to the file as points are added (so freezing a
/// large graph does not hold a second copy of them); neighbour lists are collected and
/// written by [`SegmentWriter::finish`].
pub struct SegmentWriter {
    path: PathBuf,
    file: BufWriter<File>,
    crc: crc32fast::Hasher,
    dims: usize,
    points: usize,
    slots: Vec<u32>,
    first: Vec<u32>,
    offsets: Vec<u32>,
    links: Vec<u32>,
    max_connections: u32,
    ef_construction: u32,
}

impl SegmentWriter {
    /// A writer for exactly `points` points of `dims` dimensions.
    pub fn create(
        path: &Path,
        dims: usize,
        points: usize,
        max_connections: usize,
        ef_construction: usize,
    ) -> Result<Self, SegmentError> {
        let io = |source| SegmentError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        file.write_all(&[0u8; HEADER]).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            crc: crc32fast::Hasher::new(),
            dims,
            points,
            slots: Vec::with_capacity(points),
            first: Vec::with_capacity(points + 1),
            offsets: vec![0],
            links: Vec::new(),
            max_connections: max_connections as u32,
            ef_construction: ef_construction as u32,
        })
    }

    fn invalid(&self, reason: impl ToString) -> SegmentError {
        SegmentError::Invalid {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    fn io(&self, source: std::io::Error) -> SegmentError {
        SegmentError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SegmentError> {
        self.crc.update(bytes);
        let written = self.file.write_all(bytes);
        written.map_err(|e| self.io(e))
    }

    fn pad(&mut self, written: usize) -> Result<(), SegmentError> {
        let zeros = [0u8; ALIGN];
        self.write(&zeros[..aligned(written) - written])
    }

    /// Adds the next point (ids are given in order, from 0): its slot, vector, and per
    /// layer from 0 up its neighbours' point ids.
    pub fn push(
        &mut self,
        slot: usize,
        vector: &[f16],
        layers: &[Vec<u32>],
    ) -> Result<(), SegmentError> {
        if vector.len() != self.dims || layers.is_empty() || self.slots.len() == self.points {
            return Err(self.invalid("point does not fit the segment"));
        }
        let slot = u32::try_from(slot).map_err(|_| self.invalid("slot beyond u32"))?;
        self.slots.push(slot);
        self.first.push((self.offsets.len() - 1) as u32);
        for layer in layers {
            self.links.extend_from_slice(layer);
            let end =
                u32::try_from(self.links.len()).map_err(|_| self.invalid("too many links"))?;
            self.offsets.push(end);
        }
        let mut bytes = Vec::with_capacity(vector.len() * 2);
        for x in vector {
            bytes.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        self.write(&bytes)
    }

    /// Writes the lists and the header, syncs the file, and returns its size.
    pub fn finish(mut self, entry: u32) -> Result<u64, SegmentError> {
        if self.slots.len() != self.points || self.points == 0 {
            return Err(self.invalid("segment missing points"));
        }
        let lists = self.offsets.len() - 1;
        let links = self.links.len() as u64;
        self.first.push(lists as u32);
        let top = self.level(entry as usize);
        if (0..self.points).any(|p| self.level(p) > top) {
            return Err(self.invalid("entry point is not on the top level"));
        }
        self.pad(self.points * self.dims * 2)?;
        for section in [
            std::mem::take(&mut self.slots),
            std::mem::take(&mut self.first),
            std::mem::take(&mut self.offsets),
            std::mem::take(&mut self.links),
        ] {
            let mut bytes = Vec::with_capacity(section.len() * 4);
            for x in &section {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            self.write(&bytes)?;
            self.pad(bytes.len())?;
        }
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        let words: [u32; 7] = [
            VERSION,
            self.dims as u32,
            self.points as u32,
            top as u32,
            entry,
            lists as u32,
            self.max_connections,
        ];
        for (n, w) in words.iter().enumerate() {
            header[8 + 4 * n..12 + 4 * n].copy_from_slice(&w.to_le_bytes());
        }
        header[36..44].copy_from_slice(&links.to_le_bytes());
        header[44..48].copy_from_slice(&self.ef_construction.to_le_bytes());
        let body_crc = self.crc.clone().finalize();
        header[48..52].copy_from_slice(&body_crc.to_le_bytes());
        let header_crc = crc32fast::hash(&header[..52]);
        header[52..56].copy_from_slice(&header_crc.to_le_bytes());
        let mut file = self.file.into_inner().map_err(|e| SegmentError::Io {
            path: self.path.display().to_string(),
            source: e.into_error(),
        })?;
        let io = |source| SegmentError::Io {
            path: self.path.display().to_string(),
            source,
        };
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        file.metadata().map(|m| m.len()).map_err(io)
    }

    fn level(&self, point: usize) -> usize {
        let end = self
            .first
            .get(point + 1)
            .copied()
            .unwrap_or(self.offsets.len() as u32 - 1);
        (end - self.first[point]) as usize - 1
    }
}

/// A mapped, checked segment.
pub struct Segment {
    map: Mmap,
    layout: Layout,
    dims: usize,
    points: usize,
    top: usize,
    entry: u32,
    lists: usize,
    links: usize,
    max_connections: usize,
    ef_construction: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("points", &self.points)
            .finish()
    }
}

/// A search result inside a segment: the caller's slot and the cosine distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Found {
    pub slot: usize,
    pub distance: f32,
}

impl Segment {
    /// Maps `path` and checks it whole: header and body checksums, section sizes, every
    /// offset and link in range. A damaged file is an error, never a later panic.
    pub fn open(path: &Path) -> Result<Self, SegmentError> {
        Self::map(path, true)
    }

    /// [`Segment::open`] for a file this process has just written and synced: the
    /// writer computed the body's CRC from the bytes it wrote, so reading them all back
    /// again (under a save's gate) is skipped; header and structure are still checked.
    pub fn open_written(path: &Path) -> Result<Self, SegmentError> {
        Self::map(path, false)
    }

    fn map(path: &Path, check_body: bool) -> Result<Self, SegmentError> {
        let invalid = |reason: &str| SegmentError::Invalid {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let io = |source| SegmentError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: segment files are written once and never modified in place (a new save
        // writes new files); the mapping is read-only.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(invalid("not a segment file"));
        }
        let word = |at: usize| u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]);
        if crc32fast::hash(&map[..52]) != word(52) {
            return Err(invalid("header checksum mismatch"));
        }
        if word(8) != VERSION {
            return Err(invalid("unknown segment version"));
        }
        let (dims, points, top, entry, lists, max_connections) = (
            word(12) as usize,
            word(16) as usize,
            word(20) as usize,
            word(24),
            word(28) as usize,
            word(32) as usize,
        );
        let mut link_bytes = [0u8; 8];
        link_bytes.copy_from_slice(&map[36..44]);
        let links = u64::from_le_bytes(link_bytes) as usize;
        let ef_construction = word(44) as usize;
        let layout = Layout::new(dims, points, lists, links).ok_or(invalid("impossible sizes"))?;
        if map.len() != layout.end {
            return Err(invalid("file length does not match its header"));
        }
        if check_body {
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            if crc32fast::hash(&map[HEADER..]) != word(48) {
                return Err(invalid("checksum mismatch"));
            }
        }
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        let segment = Self {
            map,
            layout,
            dims,
            points,
            top,
            entry,
            lists,
            links,
            max_connections,
            ef_construction,
            path: path.to_path_buf(),
        };
        segment.check_structure().map_err(invalid)?;
        Ok(segment)
    }

    fn check_structure(&self) -> Result<(), &'static str> {
        if self.points == 0 || self.dims == 0 {
            return Err("empty segment");
        }
        let first = self.first();
        if first[0] != 0 || first[self.points] as usize != self.lists {
            return Err("list table out of range");
        }
        if first.windows(2).any(|w| w[1] <= w[0]) {
            return Err("a point without lists");
        }
        let offsets = self.offsets();
        let links = self.links();
        if offsets[0] != 0 || offsets[self.lists] as usize != links.len() {
            return Err("link table out of range");
        }
        if offsets.windows(2).any(|w| w[1] < w[0]) {
            return Err("link offsets out of order");
        }
        if links.iter().any(|&l| l as usize >= self.points) {
            return Err("link to a point beyond the segment");
        }
        if self.entry as usize >= self.points || self.level(self.entry as usize) != self.top {
            return Err("entry point is not on the top level");
        }
        Ok(())
    }

    /// The u32 words of a section (sections are 64-byte aligned in a page-aligned map).
    fn words(&self, at: usize, count: usize) -> &[u32] {
        let bytes = &self.map[at..at + count * size_of::<u32>()];
        // SAFETY: in bounds (just sliced), aligned (`at` is a multiple of 64 in a
        // page-aligned mapping), and any bit pattern is a valid u32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u32>(), count) }
    }

    fn vectors(&self) -> &[f16] {
        let count = self.points * self.dims;
        let bytes = &self.map[self.layout.vectors..self.layout.vectors + count * 2];
        // SAFETY: as in `words`; f16 is a transparent u16.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f16>(), count) }
    }

    fn slots(&self) -> &[u32] {
        self.words(self.layout.slots, self.points)
    }

    fn first(&self) -> &[u32] {
        self.words(self.layout.first, self.points + 1)
    }

    fn offsets(&self) -> &[u32] {
        self.words(self.layout.offsets, self.lists + 1)
    }

    fn links(&self) -> &[u32] {
        self.words(self.layout.links, self.links)
    }

    fn level(&self, point: usize) -> usize {
        let first = self.first();
        (first[point + 1] - first[point]) as usize - 1
    }

    pub fn len(&self) -> usize {
        self.points
    }

    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    pub fn dimensions(&self) -> usize {
        self.dims
    }

    /// (M, ef_construction) the graph was built with.
    pub fn built_with(&self) -> (usize, usize) {
        (self.max_connections, self.ef_construction)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn vector(&self, point: usize) -> &[f16] {
        &self.vectors()[point * self.dims..(point + 1) * self.dims]
    }

    /// Every point's slot and vector, in point order.
    pub fn points(&self) -> impl Iterator<Item = (usize, &[f16])> {
        self.slots()
            .iter()
            .zip(self.vectors().chunks_exact(self.dims))
            .map(|(s, v)| (*s as usize, v))
    }

    fn neighbours(&self, point: usize, layer: usize) -> &[u32] {
        let first = self.first();
        let list = first[point] as usize + layer;
        if list >= first[point + 1] as usize {
            return &[]; // above the point's level
        }
        let offsets = self.offsets();
        &self.links()[offsets[list] as usize..offsets[list + 1] as usize]
    }

    fn distance(&self, query: &[f16], point: usize) -> f32 {
        (1.0 - dot_f16(query, self.vector(point))).max(0.0)
    }

    /// Hints the CPU to fetch a point's vector (a walk waits on memory, not arithmetic).
    #[inline]
    fn prefetch(&self, point: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let v = self.vector(point);
            let p = v.as_ptr().cast::<i8>();
            let lines = (v.len() * 2).div_ceil(64).min(4);
            for line in 0..lines {
                // SAFETY: a prefetch never faults; the address is inside the vector.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(
                        p.add(line * 64),
                        std::arch::x86_64::_MM_HINT_T0,
                    )
                };
            }
        }
    }

    /// The `k` nearest points whose slot `keep` accepts, best first: greedy descent on
    /// the upper layers, then a beam of `ef` on layer 0 (HNSW's search). Rejected points
    /// are walked through but never returned.
    pub fn search(
        &self,
        query: &[f16],
        k: usize,
        ef: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<Found> {
        self.search_descending(query, k, ef, keep, Descent::Greedy)
    }

    fn search_descending(
        &self,
        query: &[f16],
        k: usize,
        ef: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
        descent: Descent,
    ) -> Vec<Found> {
        if k == 0 || query.len() != self.dims {
            return Vec::new();
        }
        let ef = ef.max(k);
        let mut current = self.entry as usize;
        let mut best = self.distance(query, current);
        for layer in (1..=self.top).rev() {
            if descent == Descent::OneStep {
                for &n in self.neighbours(current, layer) {
                    let d = self.distance(query, n as usize);
                    if d < best {
                        best = d;
                        current = n as usize;
                    }
                }
                continue;
            }
            loop {
                let mut moved = false;
                for &n in self.neighbours(current, layer) {
                    let d = self.distance(query, n as usize);
                    if d < best {
                        best = d;
                        current = n as usize;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let slots = self.slots();
        VISITED.with(|visited| {
            let mut visited = visited.borrow_mut();
            let visited = visited.begin(self.points);
            let mut candidates = BinaryHeap::with_capacity(ef * 4);
            let mut results: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef + 1);
            visited.mark(current);
            candidates.push(std::cmp::Reverse(Scored(best, current as u32)));
            if keep(slots[current] as usize) {
                results.push(Scored(best, current as u32));
            }
            let mut fresh: Vec<u32> = Vec::with_capacity(64);
            while let Some(std::cmp::Reverse(Scored(d, point))) = candidates.pop() {
                let worst = results.peek().map_or(f32::INFINITY, |s| s.0);
                if d > worst && results.len() >= ef {
                    break;
                }
                fresh.clear();
                for &n in self.neighbours(point as usize, 0) {
                    if visited.mark(n as usize) {
                        self.prefetch(n as usize);
                        fresh.push(n);
                    }
                }
                for &n in &fresh {
                    let d = self.distance(query, n as usize);
                    let worst = results.peek().map_or(f32::INFINITY, |s| s.0);
                    if results.len() < ef || d < worst {
                        candidates.push(std::cmp::Reverse(Scored(d, n)));
                        if keep(slots[n as usize] as usize) {
                            results.push(Scored(d, n));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
            let mut found: Vec<Found> = results
                .into_sorted_vec()
                .into_iter()
                .map(|Scored(distance, p)| Found {
                    slot: slots[p as usize] as usize,
                    distance,
                })
                .collect();
            found.truncate(k);
            found
        })
    }
}

/// How a search goes down the upper layers to its layer-0 start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Descent {
    /// Move to a better neighbour until none is better, on each layer (HNSW's descent).
    Greedy,
    /// One pass over the pivot's neighbours per layer, as hnsw_rs 0.3 does: only to
    /// check, in a test, that the layer-0 walk is hnsw_rs's walk.
    #[cfg_attr(not(test), allow(dead_code))]
    OneStep,
}

impl Segment {
    /// [`Segment::search`] starting layer 0 where hnsw_rs would.
    #[cfg(test)]
    pub(crate) fn search_as_hnsw_rs(&self, query: &[f16], k: usize, ef: usize) -> Vec<Found> {
        self.search_descending(query, k, ef, &|_| true, Descent::OneStep)
    }
}

/// A distance and a point, ordered by distance (then point, so order is total).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored(f32, u32);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Which points a walk has seen: a stamp per point, so starting a walk is one increment
/// instead of clearing a table. One per thread, grown to the largest segment searched.
struct Visited {
    stamps: Vec<u32>,
    stamp: u32,
}

impl Visited {
    fn begin(&mut self, points: usize) -> &mut Self {
        if self.stamps.len() < points {
            self.stamps.resize(points, 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.stamps.fill(0);
            self.stamp = 1;
        }
        self
    }

    /// Marks a point seen; whether it was new.
    #[inline]
    fn mark(&mut self, point: usize) -> bool {
        let seen = self.stamps[point] == self.stamp;
        self.stamps[point] = self.stamp;
        !seen
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = const {
        RefCell::new(Visited { stamps: Vec::new(), stamp: 0 })
    };
}
