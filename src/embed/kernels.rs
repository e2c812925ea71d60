//! CPU kernels for the embedder: dense layers (x·Wᵀ + b, optionally GELU) and
//! multi-head self-attention, as candle custom ops.
//!
//! candle's CPU matmul (the `gemm` crate) packs both operands on every call; for a
//! sentence embedder the weights never change, so packing them once at load saves that
//! work (~20% of an embedding, measured with perf) and lets one small AVX2/FMA
//! micro-kernel stream them (f16 weights), or, on CPUs with AVX-512 BF16, an AVX-512
//! micro-kernel of bf16 dot products at twice the rate (see [`Precision`]). Bias and the
//! exact (erf) GELU are fused into the same pass so the activation never makes another
//! trip through candle.
//!
//! The embedder runs one worker per core. A layer is split across the cores that no
//! worker is using at that moment (see [`busy`]): a lone request gets every core, a
//! saturated server runs one layer per core with no hand-offs.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// Output columns per packed panel: two 8-lane AVX registers.
const PANEL: usize = 16;
/// Input rows per micro-tile: 6 × 2 accumulators + 2 weight registers + 1 broadcast
/// fit the 16 AVX registers.
const TILE_ROWS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// GELU with the exact erf, as BERT is trained (not the tanh approximation).
    Gelu,
}

/// How a packed layer stores its weights and multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f16 weights widened to f32 in registers (F16C); f32 products and sums (AVX2, FMA).
    F16,
    /// bf16 weights and inputs, f32 sums: AVX-512 BF16 dot products do twice the
    /// multiply-adds per cycle of f32 FMAs (measured here: 230 vs 115 GFLOP/s per core).
    /// Embeddings stay within cosine 0.99995 of sentence-transformers' (`tests/parity.rs`).
    Bf16,
}

/// Which code runs the model's dense layers on a CPU: chosen once per process (the
/// fastest this CPU and build run, as measured per CPU family in BENCHMARKS.md), logged,
/// and overridable with `SEMCACHE_EMBED_KERNEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX-BF16 tiles (Intel Xeon 4th generation on): not in this build yet (issue #20).
    Amx,
    /// bf16 dot products on AVX-512 BF16 ([`Precision::Bf16`]).
    Avx512Bf16,
    /// AVX-512 f32 micro-kernels (Intel Skylake-SP to Ice Lake): not in this build yet.
    Avx512,
    /// f16 weights × f32 on AVX2, FMA and F16C ([`Precision::F16`]).
    Avx2,
    /// candle's own CPU matmuls: any CPU.
    Candle,
}

impl Kernel {
    pub const ALL: [Kernel; 5] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::Avx512,
        Kernel::Avx2,
        Kernel::Candle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Candle => "candle",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name.trim())
    }

    /// Whether this build has the kernel and this CPU runs it; if not, why.
    pub fn runs_here(self) -> Result<(), &'static str> {
        match self {
            Kernel::Amx => Err("this build has no AMX kernels yet"),
            Kernel::Avx512 => Err("this build has no AVX-512 f32 kernels yet"),
            Kernel::Avx512Bf16 if !(available() && bf16_available()) => {
                Err("this CPU lacks AVX-512 BF16")
            }
            Kernel::Avx2 if !available() => Err("this CPU lacks AVX2, FMA or F16C"),
            _ => Ok(()),
        }
    }

    /// How the dense layers are packed for this kernel (`None`: candle's matmuls).
    pub fn packing(self) -> Option<Precision> {
        match self {
            Kernel::Avx512Bf16 => Some(Precision::Bf16),
            Kernel::Avx2 => Some(Precision::F16),
            Kernel::Amx | Kernel::Avx512 | Kernel::Candle => None,
        }
    }

    /// The fastest kernel this CPU runs (bf16 dot products measured 1.3–1.8× the f16
    /// path on Zen 4 and Emerald Rapids; the packed f16 path ahead of candle everywhere).
    fn fastest() -> Self {
        [Kernel::Avx512Bf16, Kernel::Avx2]
            .into_iter()
            .find(|k| k.runs_here().is_ok())
            .unwrap_or(Kernel::Candle)
    }

    /// This process's kernel: `SEMCACHE_EMBED_KERNEL` when this CPU runs it (a request it
    /// cannot honour is logged and the fastest is used), else the fastest;
    /// `SEMCACHE_EMBED_BF16=0` (older setting) asks for `avx2`.
    pub fn chosen() -> Self {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let fastest = Self::fastest();
            let asked = std::env::var("SEMCACHE_EMBED_KERNEL").ok().or_else(|| {
                (std::env::var("SEMCACHE_EMBED_BF16").ok().as_deref() == Some("0"))
                    .then(|| "avx2".to_string())
            });
            let Some(asked) = asked.filter(|a| !a.trim().is_empty()) else {
                return fastest;
            };
            match Self::parse(&asked).map(|k| (k, k.runs_here())) {
                Some((kernel, Ok(()))) => kernel,
                Some((kernel, Err(why))) => {
                    tracing::warn!(
                        asked = kernel.name(),
                        why,
                        using = fastest.name(),
                        "SEMCACHE_EMBED_KERNEL cannot be honoured here"
                    );
                    fastest
                }
                None => {
                    tracing::warn!(
                        asked = %asked,
                        valid = "amx, avx512-bf16, avx512, avx2, candle",
                        using = fastest.name(),
                        "unknown SEMCACHE_EMBED_KERNEL"
                    );
                    fastest
                }
            }
        })
    }
}

/// Whether this CPU has AVX-512 BF16 dot products.
fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A dense layer with its weights packed for [`PackedLinear::forward`].
///
/// [`Precision::F16`]: weights are stored as f16 and widened to f32 in registers (F16C);
/// products and sums stay f32. Half the bytes let all six MiniLM layers (21 MB) stay in
/// this CPU's L3 between requests instead of streaming 42 MB from memory per embedding:
/// 16-token embeddings 25–30% faster; parity with sentence-transformers stays ≥ 0.99999.
/// [`Precision::Bf16`]: the same bytes as bf16 pairs, for AVX-512 BF16 dot products.
pub struct PackedLinear {
    in_features: usize,
    out_features: usize,
    precision: Precision,
    /// f16 bits, `[panel][k][PANEL]`: column `p·PANEL + j` of Wᵀ at
    /// `panels[(p·k + kk)·PANEL + j]`, zero past `out_features`. For bf16:
    /// `[panel][k/2][BF16_PANEL][2]`, the bf16 bits of W[c][2q + t] at
    /// `panels[((p·k2 + q)·BF16_PANEL + j)·2 + t]` (k2 = k rounded up to pairs).
    panels: Vec<u16>,
    /// Bias, zero-padded to whole panels of either width.
    bias: Vec<f32>,
    activation: Activation,
}

/// Output columns per bf16 panel: two 16-lane AVX-512 registers.
const BF16_PANEL: usize = 32;
/// Input rows per bf16 micro-tile: 12 × 2 accumulators + 2 weight registers + 1
/// broadcast fit the 32 AVX-512 registers.
const BF16_TILE_ROWS: usize = 12;

/// Below this many multiply-adds a layer is not worth handing to other threads.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Inference workers currently inside a batch.
static BUSY_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// Marks the calling worker busy until dropped; see [`busy`].
pub struct BusyWorker(());

/// Call around each batch an inference worker runs, so layers are only split across
/// cores that no other worker is using.
pub fn busy() -> BusyWorker {
    BUSY_WORKERS.fetch_add(1, Ordering::SeqCst);
    BusyWorker(())
}

impl Drop for BusyWorker {
    fn drop(&mut self) {
        BUSY_WORKERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many parts to split a layer of `work` multiply-adds into: one per idle core,
/// counting the caller's own.
fn parts_for(work: usize, panels: usize) -> usize {
    if work < PARALLEL_MIN_WORK {
        return 1;
    }
    let busy = BUSY_WORKERS.load(Ordering::SeqCst).max(1);
    (super::parts::cores().saturating_sub(busy) + 1)
        .min(panels)
        .max(1)
}

/// An output buffer shared by the parts of one layer, each writing its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the parts write disjoint column ranges of the buffer, and the caller waits for
// all of them before the buffer is used again.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `part(0)`…`part(parts - 1)` on the caller and idle helper threads.
fn run_parts(parts: usize, part: impl Fn(usize) + Sync) {
    super::parts::run(parts, &part);
}

/// Whether this CPU runs the packed kernels (x86-64 with AVX2, FMA and F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedLinear {
    /// `weight` is row-major `[out_features][in_features]`, as PyTorch stores it.
    /// `None` when a weight does not fit the precision this CPU runs (the caller keeps
    /// f32 matmuls).
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
        activation: Activation,
    ) -> Option<Self> {
        Self::with_precision(
            weight,
            bias,
            out_features,
            in_features,
            activation,
            Kernel::chosen().packing().unwrap_or(Precision::F16),
        )
    }

    /// [`PackedLinear::new`] in a given precision; `None` for bf16 where the CPU lacks it.
    pub fn with_precision(
        weight: &[f32],
        bias: &[f32],
        out_features: usize,
        in_features: usize,
        activation: Activation,
        precision: Precision,
    ) -> Option<Self> {
        assert_eq!(weight.len(), out_features * in_features);
        assert_eq!(bias.len(), out_features);
        if precision == Precision::Bf16 && !bf16_available() {
            return None;
        }
        let fits = |w: &f32| match precision {
            Precision::F16 => w.abs() <= f32::from(half::f16::MAX),
            Precision::Bf16 => w.is_finite(),
        };
        if !weight.iter().all(fits) {
            return None;
        }
        let panels = match precision {
            Precision::F16 => {
                let panel_count = out_features.div_ceil(PANEL);
                let mut panels = vec![0u16; panel_count * in_features * PANEL];
                for (col, row) in weight.chunks_exact(in_features).enumerate() {
                    let (panel, lane) = (col / PANEL, col % PANEL);
                    for (kk, w) in row.iter().enumerate() {
                        panels[(panel * in_features + kk) * PANEL + lane] =
                            half::f16::from_f32(*w).to_bits();
                    }
                }
                panels
            }
            Precision::Bf16 => {
                let (panel_count, k2) =
                    (out_features.div_ceil(BF16_PANEL), in_features.div_ceil(2));
                let mut panels = vec![0u16; panel_count * k2 * BF16_PANEL * 2];
                for (col, row) in weight.chunks_exact(in_features).enumerate() {
                    let (panel, lane) = (col / BF16_PANEL, col % BF16_PANEL);
                    for (kk, w) in row.iter().enumerate() {
                        panels[((panel * k2 + kk / 2) * BF16_PANEL + lane) * 2 + kk % 2] =
                            half::bf16::from_f32(*w).to_bits();
                    }
                }
                panels
            }
        };
        let mut padded_bias = vec![0f32; out_features.div_ceil(BF16_PANEL) * BF16_PANEL];
        padded_bias[..out_features].copy_from_slice(bias);
        Some(Self {
            in_features,
            out_features,
            precision,
            panels,
            bias: padded_bias,
            activation,
        })
    }

    /// `out[r] = act(x[r]·Wᵀ + b)` for `rows` rows of `x` (row-major, `in_features` wide).
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.in_features);
        assert_eq!(out.len(), rows * self.out_features);
        if rows == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.precision == Precision::Bf16 {
            self.forward_bf16(x, rows, out);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if available() {
            self.split_panels(rows, PANEL, out, |range, out| {
                // SAFETY: AVX2 and FMA are present (checked above); slice lengths were
                // asserted, and each part writes only the columns of its own panels.
                unsafe { avx2::matmul(self, x, rows, out, range) };
            });
            return;
        }
        self.forward_portable(x, rows, out);
    }

    /// Runs `matmul` on the layer's panels (of `width` columns), split into one range per
    /// idle core; each call writes only its own panels' columns of `out`.
    #[cfg(target_arch = "x86_64")]
    fn split_panels(
        &self,
        rows: usize,
        width: usize,
        out: &mut [f32],
        matmul: impl Fn(Range<usize>, *mut f32) + Sync,
    ) {
        let panels = self.out_features.div_ceil(width);
        let parts = parts_for(rows * self.in_features * self.out_features, panels);
        let shared = SharedOut(out.as_mut_ptr());
        run_parts(parts, |i| {
            matmul(panels * i / parts..panels * (i + 1) / parts, shared.get())
        });
    }

    /// The bf16 path: inputs rounded to bf16 once (each row padded to whole pairs), then
    /// the layer's panels split across idle cores as in [`PackedLinear::forward`].
    #[cfg(target_arch = "x86_64")]
    fn forward_bf16(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let k2 = self.in_features.div_ceil(2);
        BF16_INPUT.with_borrow_mut(|inputs| {
            inputs.clear();
            inputs.resize(rows * k2 * 2, 0);
            // SAFETY: AVX-512 BF16 is present (a Bf16 layer is only built where it is);
            // `inputs` holds `rows` rows of `2·k2` values.
            unsafe { avx512::to_bf16_rows(x, rows, self.in_features, inputs) };
            let inputs: &[u16] = inputs;
            self.split_panels(rows, BF16_PANEL, out, |range, out| {
                // SAFETY: as above; each part writes only the columns of its own panels.
                unsafe { avx512::matmul(self, inputs, rows, out, range) };
            });
        });
    }

    /// Columns of the output that `panels` (of `width` columns) cover.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn columns(&self, panels: Range<usize>, width: usize) -> Range<usize> {
        (panels.start * width).min(self.out_features)..(panels.end * width).min(self.out_features)
    }

    /// Applies the activation to `columns` of every row (after the products).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unsafe fn activate(&self, out: *mut f32, rows: usize, columns: Range<usize>) {
        if self.activation == Activation::Gelu {
            for row in 0..rows {
                let values = std::slice::from_raw_parts_mut(
                    out.add(row * self.out_features + columns.start),
                    columns.len(),
                );
                for v in values {
                    *v = gelu(*v);
                }
            }
        }
    }

    /// The same arithmetic without SIMD, for CPUs without AVX2 and as the tests' reference.
    fn forward_portable(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let k = self.in_features;
        let k2 = k.div_ceil(2);
        let weight = |c: usize, kk: usize| match self.precision {
            Precision::F16 => {
                half::f16::from_bits(self.panels[((c / PANEL) * k + kk) * PANEL + c % PANEL])
                    .to_f32()
            }
            Precision::Bf16 => half::bf16::from_bits(
                self.panels
                    [(((c / BF16_PANEL) * k2 + kk / 2) * BF16_PANEL + c % BF16_PANEL) * 2 + kk % 2],
            )
            .to_f32(),
        };
        let input = |v: f32| match self.precision {
            Precision::F16 => v,
            Precision::Bf16 => half::bf16::from_f32(v).to_f32(),
        };
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for c in 0..self.out_features {
                let mut sum = self.bias[c];
                for (kk, xv) in xr.iter().enumerate() {
                    sum += input(*xv) * weight(c, kk);
                }
                out[r * self.out_features + c] = match self.activation {
                    Activation::Identity => sum,
                    Activation::Gelu => gelu(sum),
                };
            }
        }
    }
}

/// A custom op's input as contiguous f32 rows: the values, the leading dimensions and
/// the row width (the last dimension).
fn f32_rows<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &'a Layout,
) -> candle_core::Result<(&'a [f32], &'a [usize], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 input expected");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input expected");
    };
    let Some((&width, leading)) = layout.shape().dims().split_last() else {
        candle_core::bail!("{op}: input has no dimensions");
    };
    Ok((&data[start..end], leading, width))
}

/// The shape `leading × width`.
fn with_width(leading: &[usize], width: usize) -> Shape {
    let mut dims = leading.to_vec();
    dims.push(width);
    Shape::from(dims)
}

/// Runs the packed layer inside candle's graph (CPU tensors only; other devices use
/// candle's own matmul).
impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, leading, k) = f32_rows("packed-linear", storage, layout)?;
        if k != self.in_features {
            candle_core::bail!(
                "packed-linear: input width {k}, layer expects {}",
                self.in_features
            );
        }
        let rows: usize = leading.iter().product();
        let mut out = vec![0f32; rows * self.out_features];
        self.forward(data, rows, &mut out);
        Ok((CpuStorage::F32(out), with_width(leading, self.out_features)))
    }
}

/// Multi-head self-attention over the fused Q/K/V projection of texts laid back to back
/// (no padding): `(tokens, 3·width)` in, `(tokens, width)` out, heads side by side as the
/// output layer expects them; each text attends only to itself. Q must be pre-scaled by
/// 1/√head_size. Per head and text: scores, softmax and the weighted sum of values,
/// without materialising a score tensor for the batch or transposing Q, K and V (candle
/// needs ~10 ops and 4 copies for the same).
pub struct Attention {
    pub heads: usize,
    /// Tokens of each text, in order; they sum to the input's rows.
    pub lengths: Vec<usize>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, leading, fused) = f32_rows("attention", storage, layout)?;
        let width = fused / 3;
        if fused % 3 != 0 || self.heads == 0 || width % self.heads != 0 {
            candle_core::bail!(
                "attention: width {fused} does not split into Q, K, V of {} heads",
                self.heads
            );
        }
        let tokens: usize = leading.iter().product();
        if self.lengths.iter().sum::<usize>() != tokens {
            candle_core::bail!(
                "attention: lengths {:?} do not add up to {tokens} tokens",
                self.lengths
            );
        }
        let mut out = vec![0f32; tokens * width];
        attention(data, width, self.heads, &self.lengths, &mut out);
        Ok((CpuStorage::F32(out), with_width(leading, width)))
    }
}

fn attention(qkv: &[f32], width: usize, heads: usize, lengths: &[usize], out: &mut [f32]) {
    let head_size = width / heads;
    let starts: Vec<usize> = lengths
        .iter()
        .scan(0, |start, len| {
            let this = *start;
            *start += len;
            Some(this)
        })
        .collect();
    let jobs = lengths.len() * heads;
    let work: usize = lengths.iter().map(|len| len * len * width * 2).sum();
    let parts = parts_for(work, jobs);
    let shared = SharedOut(out.as_mut_ptr());
    run_parts(parts, |part| {
        for job in jobs * part / parts..jobs * (part + 1) / parts {
            let (text, head) = (job / heads, job % heads);
            let (start, len) = (starts[text], lengths[text]);
            let rows = &qkv[start * 3 * width..(start + len) * 3 * width];
            // SAFETY: each job writes only its own head's columns of its own text's rows.
            let out = unsafe {
                std::slice::from_raw_parts_mut(shared.get().add(start * width), len * width)
            };
            one_head(rows, width, head * head_size, head_size, len, out);
        }
    });
}

/// Attention of one head of one text. `rows`: the text's `seq` rows of Q|K|V; the head's
/// columns start at `column` in each of the three.
fn one_head(
    rows: &[f32],
    width: usize,
    column: usize,
    head_size: usize,
    len: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2, FMA and F16C are present; `rows` holds `len` rows of Q|K|V.
        return unsafe { avx2::one_head(rows, width, column, head_size, len, out) };
    }
    one_head_portable(rows, width, column, head_size, len, out);
}

/// One head's attention without SIMD: for CPUs without AVX2, and the reference the
/// SIMD kernel is tested against.
#[inline(always)]
fn one_head_portable(
    rows: &[f32],
    width: usize,
    column: usize,
    head_size: usize,
    len: usize,
    out: &mut [f32],
) {
    let stride = 3 * width;
    // The head's keys transposed (head_size × len), so each query's scores are a sum of
    // scaled key rows: vector operations along the keys, no horizontal sums.
    let mut keys = vec![0f32; head_size * len];
    for j in 0..len {
        let k = &rows[j * stride + width + column..][..head_size];
        for (c, value) in k.iter().enumerate() {
            keys[c * len + j] = *value;
        }
    }
    let mut scores = vec![0f32; len];
    for i in 0..len {
        let q = &rows[i * stride + column..][..head_size];
        scores.fill(0.0);
        for (c, qc) in q.iter().enumerate() {
            for (score, k) in scores.iter_mut().zip(&keys[c * len..][..len]) {
                *score = qc.mul_add(*k, *score);
            }
        }
        softmax_in_place(&mut scores);
        let o = &mut out[i * width + column..][..head_size];
        o.fill(0.0);
        for (j, p) in scores.iter().enumerate() {
            let v = &rows[j * stride + 2 * width + column..][..head_size];
            for (o, v) in o.iter_mut().zip(v) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

/// Softmax of one row of scores, in place.
#[inline(always)]
fn softmax_in_place(scores: &mut [f32]) {
    let max = lanes(scores, f32::NEG_INFINITY, f32::max);
    for score in scores.iter_mut() {
        *score = exp(*score - max);
    }
    let scale = 1.0 / lanes(scores, 0.0, |a, b| a + b);
    for score in scores.iter_mut() {
        *score *= scale;
    }
}

/// Folds `values` with `f` in eight independent lanes, so the loop vectorises (a plain
/// fold is one sequential chain of dependent operations).
#[inline(always)]
fn lanes(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], chunk[l]);
        }
    }
    rest.iter().chain(&acc).fold(init, |a, b| f(a, *b))
}

/// eˣ for x ≤ 0 (softmax after subtracting the maximum): Cody–Waite range reduction to
/// x = n·ln2 + r, a degree-6 polynomial for eʳ (Cephes' expf, ~1 ulp), and 2ⁿ built in
/// the exponent bits. Branch-free so softmax loops vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = r.mul_add(1.987_569_1e-4, 1.398_2e-3);
    p = r.mul_add(p, 8.333_452e-3);
    p = r.mul_add(p, 4.166_579_6e-2);
    p = r.mul_add(p, 1.666_666_5e-1);
    p = r.mul_add(p, 0.5);
    let e = (r * r).mul_add(p, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Residual connection and layer norm in one pass: `LayerNorm(x + residual)` over the
/// last dimension, for `(tokens, width)` inputs. Saves candle an addition (and its
/// tensor) per norm, and splits long batches across idle cores by rows.
pub struct AddNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl candle_core::CustomOp2 for AddNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, _, x_width) = f32_rows("add-layer-norm", x, x_layout)?;
        let (residual, _, _) = f32_rows("add-layer-norm", residual, residual_layout)?;
        let width = self.weight.len();
        if x_layout.shape() != residual_layout.shape() || x_width != width {
            candle_core::bail!(
                "add-layer-norm: shapes {:?} and {:?}, width {width}",
                x_layout.shape(),
                residual_layout.shape()
            );
        }
        let rows = x.len() / width;
        let mut out = vec![0f32; x.len()];
        let parts = parts_for(rows * width * 8, rows);
        let shared = SharedOut(out.as_mut_ptr());
        run_parts(parts, |part| {
            let range = rows * part / parts..rows * (part + 1) / parts;
            // SAFETY: each part writes only its own rows.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    shared.get().add(range.start * width),
                    range.len() * width,
                )
            };
            let span = range.start * width..range.end * width;
            self.rows(&x[span.clone()], &residual[span], out);
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

impl AddNorm {
    fn rows(&self, x: &[f32], residual: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX2, FMA and F16C are present.
            return unsafe { avx2::add_norm_rows(self, x, residual, out) };
        }
        self.rows_portable(x, residual, out);
    }

    #[inline(always)]
    fn rows_portable(&self, x: &[f32], residual: &[f32], out: &mut [f32]) {
        let width = self.weight.len();
        for ((x, residual), out) in x
            .chunks_exact(width)
            .zip(residual.chunks_exact(width))
            .zip(out.chunks_exact_mut(width))
        {
            for ((o, a), b) in out.iter_mut().zip(x).zip(residual) {
                *o = a + b;
            }
            let mean = lanes(out, 0.0, |a, b| a + b) / width as f32;
            for o in out.iter_mut() {
                *o -= mean;
            }
            let variance = lanes_of_squares(out) / width as f32;
            let scale = 1.0 / (variance + self.eps).sqrt();
            for ((o, w), b) in out.iter_mut().zip(&self.weight).zip(&self.bias) {
                *o = (*o * scale).mul_add(*w, *b);
            }
        }
    }
}

/// Σ v² in eight independent lanes (vectorises, unlike a plain fold).
#[inline(always)]
fn lanes_of_squares(values: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..8 {
            acc[l] = chunk[l].mul_add(chunk[l], acc[l]);
        }
    }
    rest.iter().map(|v| v * v).sum::<f32>() + acc.iter().sum::<f32>()
}

/// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as a rational function on [-4, 4] (odd numerator of degree 13 over an even
/// denominator of degree 8; erf(±4) rounds to ±1 in f32). Absolute error below 5e-7
/// against libm (tested), and branch-free so the GELU loop vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906_3e-4);
    p = x2.mul_add(p, -2.954_600_6e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    p *= x;
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329_2e-3);
    q = x2.mul_add(q, -1.426_474e-2);
    p / q
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{softmax_in_place, AddNorm, PackedLinear, PANEL, TILE_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// The output columns of `panels` for every row, then the activation on them.
    /// Panels outermost: one panel (16 columns × k) stays in L1/L2 while every row of
    /// `x` streams past it, so each weight is read from memory once per call.
    ///
    /// `out` must hold `rows × out_features` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matmul(
        layer: &PackedLinear,
        x: &[f32],
        rows: usize,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        let k = layer.in_features;
        let n = layer.out_features;
        for panel in panels.clone() {
            let weights = layer.panels.as_ptr().add(panel * k * PANEL);
            let bias = layer.bias.as_ptr().add(panel * PANEL);
            let col = panel * PANEL;
            let cols = PANEL.min(n - col);
            panel_rows::<true>(
                x.as_ptr(),
                k,
                rows,
                k,
                weights as *const u8,
                bias,
                out.add(col),
                n,
                cols,
            );
        }
        layer.activate(out, rows, layer.columns(panels, PANEL));
    }

    /// `R` rows × 16 columns of output, accumulated over all of k in registers. Row `r` of
    /// `x` starts at `x + r·x_stride`; `weights` is one panel, f16 bits when `HALF`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const R: usize, const HALF: bool>(
        x: *const f32,
        x_stride: usize,
        k: usize,
        weights: *const u8,
        bias: *const f32,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
    ) {
        let b0 = _mm256_loadu_ps(bias);
        let b1 = _mm256_loadu_ps(bias.add(8));
        let mut acc = [[b0, b1]; R];
        for kk in 0..k {
            let (w0, w1) = if HALF {
                let w = (weights as *const u16).add(kk * PANEL);
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(w as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(w.add(8) as *const __m128i)),
                )
            } else {
                let w = (weights as *const f32).add(kk * PANEL);
                (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)))
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*x.add(r * x_stride + kk));
                acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = out.add(r * out_stride);
            if cols == PANEL {
                _mm256_storeu_ps(dst, acc[0]);
                _mm256_storeu_ps(dst.add(8), acc[1]);
            } else {
                let mut lanes = [0f32; PANEL];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, cols);
            }
        }
    }

    /// One panel of output columns for `rows` rows, in tiles of up to six rows.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_rows<const HALF: bool>(
        x: *const f32,
        x_stride: usize,
        rows: usize,
        k: usize,
        weights: *const u8,
        bias: *const f32,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
    ) {
        let mut row = 0;
        while row < rows {
            let tile = TILE_ROWS.min(rows - row);
            let x = x.add(row * x_stride);
            let out = out.add(row * out_stride);
            let args = (x, x_stride, k, weights, bias, out, out_stride, cols);
            match tile {
                6 => micro::<6, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
                5 => micro::<5, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
                4 => micro::<4, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
                3 => micro::<3, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
                2 => micro::<2, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
                _ => micro::<1, HALF>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                ),
            }
            row += tile;
        }
    }

    /// Attention of one head of one text as two small matrix products on the same
    /// micro-kernel: scores = Q·Kᵀ against keys packed in panels of 16, then the softmaxed
    /// scores times values packed in panels of 16 columns.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn one_head(
        rows: &[f32],
        width: usize,
        column: usize,
        head_size: usize,
        len: usize,
        out: &mut [f32],
    ) {
        let stride = 3 * width;
        let key_panels = len.div_ceil(PANEL);
        let value_panels = head_size.div_ceil(PANEL);
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.resize(
                key_panels * head_size * PANEL + len * len + value_panels * len * PANEL,
                0.0,
            );
            let (keys, rest) = scratch.split_at_mut(key_panels * head_size * PANEL);
            let (scores, values) = rest.split_at_mut(len * len);
            for j in 0..len {
                let key = &rows[j * stride + width + column..][..head_size];
                let value = &rows[j * stride + 2 * width + column..][..head_size];
                for c in 0..head_size {
                    keys[((j / PANEL) * head_size + c) * PANEL + j % PANEL] = key[c];
                    values[((c / PANEL) * len + j) * PANEL + c % PANEL] = value[c];
                }
            }
            let zero = [0f32; PANEL];
            for panel in 0..key_panels {
                panel_rows::<false>(
                    rows.as_ptr().add(column),
                    stride,
                    len,
                    head_size,
                    keys.as_ptr().add(panel * head_size * PANEL) as *const u8,
                    zero.as_ptr(),
                    scores.as_mut_ptr().add(panel * PANEL),
                    len,
                    PANEL.min(len - panel * PANEL),
                );
            }
            for row in scores.chunks_exact_mut(len) {
                softmax_in_place(row);
            }
            for panel in 0..value_panels {
                panel_rows::<false>(
                    scores.as_ptr(),
                    len,
                    len,
                    len,
                    values.as_ptr().add(panel * len * PANEL) as *const u8,
                    zero.as_ptr(),
                    out.as_mut_ptr().add(column + panel * PANEL),
                    width,
                    PANEL.min(head_size - panel * PANEL),
                );
            }
        })
    }

    /// The portable add + layer norm, compiled with AVX2/FMA so its loops vectorise.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add_norm_rows(norm: &AddNorm, x: &[f32], residual: &[f32], out: &mut [f32]) {
        norm.rows_portable(x, residual, out)
    }

    thread_local! {
        /// Per-thread buffers for packed keys, scores and values, reused across calls.
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per-thread buffer for a bf16 layer's inputs, reused across calls.
    static BF16_INPUT: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PackedLinear, BF16_PANEL, BF16_TILE_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `x` (`rows` × `k` f32) as bf16 rows of `inputs.len() / rows` values (pairs; a
    /// padding column stays zero), rounded to nearest even.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn to_bf16_rows(x: &[f32], rows: usize, k: usize, inputs: &mut [u16]) {
        let width = inputs.len() / rows;
        for r in 0..rows {
            let src = &x[r * k..(r + 1) * k];
            let dst = &mut inputs[r * width..r * width + k];
            let mut i = 0;
            while i + 16 <= k {
                let half: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
                _mm256_storeu_si256(
                    dst.as_mut_ptr().add(i) as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(half),
                );
                i += 16;
            }
            for (d, v) in dst[i..].iter_mut().zip(&src[i..]) {
                *d = half::bf16::from_f32(*v).to_bits();
            }
        }
    }

    /// The output columns of `panels` for every row, then the activation on them;
    /// panels outermost, as in the AVX2 path. `out` holds `rows × out_features` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn matmul(
        layer: &PackedLinear,
        inputs: &[u16],
        rows: usize,
        out: *mut f32,
        panels: Range<usize>,
    ) {
        let k2 = layer.in_features.div_ceil(2);
        let n = layer.out_features;
        for panel in panels.clone() {
            let weights = layer.panels.as_ptr().add(panel * k2 * BF16_PANEL * 2);
            let bias = layer.bias.as_ptr().add(panel * BF16_PANEL);
            let col = panel * BF16_PANEL;
            let cols = BF16_PANEL.min(n - col);
            let mut row = 0;
            while row < rows {
                let tile = BF16_TILE_ROWS.min(rows - row);
                let x = inputs.as_ptr().add(row * k2 * 2);
                let dst = out.add(row * n + col);
                macro_rules! tile {
                    ($($r:literal)*) => {
                        match tile {
                            $($r => micro::<$r>(x, k2, weights, bias, dst, n, cols),)*
                            _ => unreachable!(),
                        }
                    };
                }
                tile!(1 2 3 4 5 6 7 8 9 10 11 12);
                row += tile;
            }
        }
        layer.activate(out, rows, layer.columns(panels, BF16_PANEL));
    }

    /// `R` rows × 32 columns of output, accumulated over all `k2` input pairs in registers.
    /// Row `r` of `x` starts at `x + r·2·k2`; `weights` is one panel.
    #[inline(always)]
    unsafe fn micro<const R: usize>(
        x: *const u16,
        k2: usize,
        weights: *const u16,
        bias: *const f32,
        out: *mut f32,
        out_stride: usize,
        cols: usize,
    ) {
        let b0 = _mm512_loadu_ps(bias);
        let b1 = _mm512_loadu_ps(bias.add(16));
        let mut acc = [[b0, b1]; R];
        for q in 0..k2 {
            let w = weights.add(q * BF16_PANEL * 2);
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(32) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = (x.add(r * k2 * 2 + q * 2) as *const i32).read_unaligned();
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], a, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], a, w1);
            }
        }
        let (m0, m1) = if cols == BF16_PANEL {
            (u16::MAX, u16::MAX)
        } else {
            let low = cols.min(16);
            let high = cols.saturating_sub(16);
            (((1u32 << low) - 1) as u16, ((1u32 << high) - 1) as u16)
        };
        for (r, acc) in acc.iter().enumerate() {
            let dst = out.add(r * out_stride);
            _mm512_mask_storeu_ps(dst, m0, acc[0]);
            _mm512_mask_storeu_ps(dst.add(16), m1, acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in 0..=86_000 {
            // Down to -86: below -87 the input is clamped (e⁻⁸⁷ ≈ 1.6e-38 is zero weight).
            let x = -(i as f32) * 1e-3;
            let want = x.exp();
            worst = worst.max((exp(x) - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative exp error {worst}");
    }

    #[test]
    fn attention_matches_the_textbook_formula() {
        // A head size that is not a multiple of the panel width, and MiniLM's (32).
        for head_size in [10, 32] {
            check_attention(head_size);
        }
    }

    fn check_attention(head_size: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let heads = 3;
        let width = heads * head_size;
        // Three texts back to back; the second is long enough to be split across cores.
        let lengths = [7, 40, 1];
        let starts = [0, 7, 47];
        let tokens: usize = lengths.iter().sum();
        let qkv: Vec<f32> = (0..tokens * 3 * width)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let mut out = vec![0f32; tokens * width];
        attention(&qkv, width, heads, &lengths, &mut out);
        for (t, &len) in lengths.iter().enumerate() {
            let at = |i: usize, part: usize, c: usize| {
                qkv[(starts[t] + i) * 3 * width + part * width + c] as f64
            };
            for h in 0..heads {
                let cols = h * head_size..(h + 1) * head_size;
                for i in 0..len {
                    let scores: Vec<f64> = (0..len)
                        .map(|j| cols.clone().map(|c| at(i, 0, c) * at(j, 1, c)).sum())
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for c in cols.clone() {
                        let got = out[(starts[t] + i) * width + c] as f64;
                        let want: f64 = (0..len).map(|j| weights[j] / total * at(j, 2, c)).sum();
                        assert!(
                            (got - want).abs() < 1e-5,
                            "text {t} head {h} row {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_attention_agree() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for (head_size, len) in [(32, 73), (20, 5), (64, 17)] {
            let width = 2 * head_size;
            let rows: Vec<f32> = (0..len * 3 * width)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let mut simd = vec![0f32; len * width];
            let mut portable = vec![0f32; len * width];
            one_head(&rows, width, head_size, head_size, len, &mut simd);
            one_head_portable(&rows, width, head_size, head_size, len, &mut portable);
            for (a, b) in simd.iter().zip(&portable) {
                assert!((a - b).abs() < 1e-5, "{head_size}x{len}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn add_norm_matches_the_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (rows, width) = (300, 37);
        let norm = AddNorm {
            weight: (0..width).map(|_| rng.gen_range(0.5..1.5)).collect(),
            bias: (0..width).map(|_| rng.gen_range(-0.5..0.5)).collect(),
            eps: 1e-12,
        };
        let x: Vec<f32> = (0..rows * width)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let r: Vec<f32> = (0..rows * width)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let xt = candle_core::Tensor::from_vec(x.clone(), (rows, width), &candle_core::Device::Cpu)
            .unwrap();
        let rt = candle_core::Tensor::from_vec(r.clone(), (rows, width), &candle_core::Device::Cpu)
            .unwrap();
        let got: Vec<f32> = xt
            .apply_op2_no_bwd(&rt, &norm)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for row in 0..rows {
            let v: Vec<f64> = (0..width)
                .map(|c| (x[row * width + c] + r[row * width + c]) as f64)
                .collect();
            let mean = v.iter().sum::<f64>() / width as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / width as f64;
            for c in 0..width {
                let want = (v[c] - mean) / (var + 1e-12).sqrt() * norm.weight[c] as f64
                    + norm.bias[c] as f64;
                let got = got[row * width + c] as f64;
                assert!((got - want).abs() < 1e-4, "[{row},{c}] {got} vs {want}");
            }
        }
    }

    #[test]
    fn weights_beyond_f16_are_not_packed() {
        let f16 = |w: &[f32]| {
            PackedLinear::with_precision(w, &[0.0], 1, 2, Activation::Identity, Precision::F16)
        };
        assert!(f16(&[1.0, 7e4]).is_none());
        assert!(f16(&[1.0, f32::NAN]).is_none());
        // bf16 has f32's range; only non-finite weights stay unpacked (and nothing where
        // the CPU has no bf16 dot products).
        let bf16 = |w: &[f32]| {
            PackedLinear::with_precision(w, &[0.0], 1, 2, Activation::Identity, Precision::Bf16)
        };
        assert_eq!(bf16(&[1.0, 7e4]).is_some(), bf16_available());
        assert!(bf16(&[1.0, f32::INFINITY]).is_none());
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let err = (erf(x) as f64 - libm::erf(x as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 5e-7, "worst erf error {worst}");
    }

    #[test]
    fn packed_layer_matches_the_plain_product() {
        check_packed_layer(Precision::F16);
    }

    #[test]
    fn bf16_layer_matches_the_plain_product_of_bf16_values() {
        if !bf16_available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        check_packed_layer(Precision::Bf16);
    }

    /// The packed layer against an f64 product of the values it stores: weights rounded
    /// to f16 (inputs exact), or weights and inputs rounded to bf16.
    fn check_packed_layer(precision: Precision) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let stored = |v: f32| match precision {
            Precision::F16 => half::f16::from_f32(v).to_f64(),
            Precision::Bf16 => half::bf16::from_f32(v).to_f64(),
        };
        let input = |v: f32| match precision {
            Precision::F16 => v as f64,
            Precision::Bf16 => half::bf16::from_f32(v).to_f64(),
        };
        // Widths that are and are not whole panels (16 and 32 columns), odd and even
        // inputs, row counts around both tile sizes.
        for (out_features, in_features) in [(48, 40), (37, 19), (16, 1), (5, 7), (70, 33)] {
            let weight: Vec<f32> = (0..out_features * in_features)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let bias: Vec<f32> = (0..out_features)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            for activation in [Activation::Identity, Activation::Gelu] {
                let layer = PackedLinear::with_precision(
                    &weight,
                    &bias,
                    out_features,
                    in_features,
                    activation,
                    precision,
                )
                .unwrap();
                for rows in [1, 5, 6, 7, 12, 13, 25] {
                    let x: Vec<f32> = (0..rows * in_features)
                        .map(|_| rng.gen_range(-1.0..1.0))
                        .collect();
                    let mut got = vec![0f32; rows * out_features];
                    layer.forward(&x, rows, &mut got);
                    for r in 0..rows {
                        for c in 0..out_features {
                            let mut sum = bias[c] as f64;
                            for kk in 0..in_features {
                                sum += input(x[r * in_features + kk])
                                    * stored(weight[c * in_features + kk]);
                            }
                            let want = match activation {
                                Activation::Identity => sum,
                                Activation::Gelu => {
                                    0.5 * sum * (1.0 + libm::erf(sum / std::f64::consts::SQRT_2))
                                }
                            };
                            let got = got[r * out_features + c] as f64;
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{precision:?} {out_features}x{in_features} {activation:?} rows {rows}: [{r},{c}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
