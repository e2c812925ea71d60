//! Sentence embeddings: tokenization, a bounded batching queue, and the candle backend.
//!
//! Requests enter a bounded queue; inference workers (threads off the async runtime) each
//! take their share of whatever is waiting, sort it by length so padding stays small,
//! and run the model, which they share. A full queue is reported at once as
//! [`EmbedError::QueueFull`] so the HTTP edge can shed load instead of queueing without
//! bound.
//!
//! On CPU there is a worker per core, each running candle on its own one-thread pool;
//! the model's dense layers and attention are our own kernels ([`kernels`]), which
//! split a layer across the cores no other worker is using: a lone request gets every
//! core, a saturated server runs one batch per core without hand-offs.

pub mod adapter;
pub mod bert;
pub mod kernels;
pub mod manifest;
mod parts;
pub mod provision;
pub mod tokenize;

use std::sync::{Arc, Mutex};
use std::thread;

use candle_core::Device;
use tokio::sync::{mpsc, oneshot};

use adapter::Adapter;
use bert::BertBackend;
use manifest::ModelManifest;
use provision::ModelFiles;
use tokenize::{TextTokenizer, TokenizedText};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("the embedding queue is full")]
    QueueFull,
    #[error("the embedder is shutting down")]
    ShuttingDown,
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("device: {0}")]
    Device(String),
}

/// Which compute device to run the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if this binary was built with it and a GPU answers, else CPU.
    Auto,
    Cpu,
    Cuda,
}

pub fn select_device(choice: DeviceChoice) -> Result<Device, EmbedError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => Ok(cuda_device().unwrap_or(Device::Cpu)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, EmbedError> {
    Device::new_cuda(0).map_err(|e| {
        EmbedError::Device(format!(
            "no usable CUDA GPU ({e}); the CUDA build needs an NVIDIA driver providing libcuda.so.1"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device, EmbedError> {
    Err(EmbedError::Device(
        "this binary was built without CUDA support; rebuild with `cargo build --release --features cuda` or use --device cpu".into(),
    ))
}

/// Keeps candle's element-wise kernels on the calling thread. With a worker per core,
/// candle's own helper threads would only spin against the other workers (measured:
/// 40 vs 33 texts/s at batch 32 on 2 cores). candle reads `CANDLE_NUM_THREADS` once, so
/// this must run before any thread that might use candle starts; a value the operator
/// set is left alone.
pub fn one_kernel_thread_per_worker(workers: usize) {
    if workers > 1 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Limits of the batching queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Texts that may wait for the model before new ones are refused.
    pub capacity: usize,
    /// Most texts run in one forward pass.
    pub max_batch: usize,
    /// Most tokens in one forward pass (padded ones included where batches are padded).
    pub max_batch_tokens: usize,
    /// Inference threads sharing the model (CPU; a GPU gets one).
    pub workers: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            capacity: 1024,
            max_batch: 32,
            max_batch_tokens: 8192,
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One embedded text.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vector: Vec<f32>,
    /// Tokens the model saw, special tokens included, after truncation.
    pub tokens: usize,
    /// Byte offset where the unseen tail of a truncated text begins.
    pub truncated_at: Option<usize>,
}

struct Job {
    text: String,
    reply: oneshot::Sender<Result<Embedded, EmbedError>>,
}

/// Handle to the embedding queue; cheap to clone.
#[derive(Clone)]
pub struct Embedder {
    tx: mpsc::Sender<Job>,
    info: Arc<EmbedderInfo>,
    pace: Arc<Pace>,
}

/// Recent model time per text (an exponential average over batches), for callers that
/// would rather not queue than wait longer than they can afford.
#[derive(Default)]
struct Pace {
    nanos_per_text: std::sync::atomic::AtomicU64,
}

impl Pace {
    fn record(&self, texts: usize, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = (took.as_nanos() / texts.max(1) as u128) as u64;
        let old = self.nanos_per_text.load(Relaxed);
        let new = if old == 0 { now } else { (old * 4 + now) / 5 };
        self.nanos_per_text.store(new, Relaxed);
    }
}

#[derive(Debug)]
pub struct EmbedderInfo {
    pub model: String,
    /// The adapter merged into the model (`name@sha256 prefix`), if any.
    pub adapter: Option<String>,
    pub dimensions: usize,
    pub device: String,
    /// The CPU kernel (`SEMCACHE_EMBED_KERNEL`), or `gpu`.
    pub kernel: String,
    pub capacity: usize,
    pub workers: usize,
}

impl EmbedderInfo {
    /// What a stored vector's meaning depends on: the model, and the adapter if any.
    /// Vectors from two different spaces must never be compared.
    pub fn space(&self) -> String {
        adapter::space(&self.model, self.adapter.as_deref())
    }
}

impl Embedder {
    /// Loads the model and starts the inference thread.
    pub fn start(
        manifest: &ModelManifest,
        files: &ModelFiles,
        adapter: Option<&Adapter>,
        device: &Device,
        options: QueueOptions,
    ) -> Result<Self, EmbedError> {
        let tokenizer = TextTokenizer::load(&files.tokenizer, manifest.max_seq_length)?;
        if let Some(adapter) = adapter {
            adapter::check_base(adapter, &manifest.name)?;
        }
        let backend = BertBackend::load(files, adapter, device)?;
        if backend.dimensions() != manifest.dimensions {
            return Err(EmbedError::Load(format!(
                "model has {} dimensions, manifest says {}",
                backend.dimensions(),
                manifest.dimensions
            )));
        }
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let workers = if device.is_cpu() {
            options.workers.max(1)
        } else {
            1
        };
        let info = Arc::new(EmbedderInfo {
            model: manifest.name.clone(),
            adapter: adapter.map(Adapter::id),
            dimensions: manifest.dimensions,
            device: format!("{device:?}"),
            kernel: backend.kernel_name().to_string(),
            capacity: options.capacity.max(1),
            workers,
        });
        let pace = Arc::new(Pace::default());
        let shared = Arc::new(Worker {
            queue: Mutex::new(rx),
            pace: pace.clone(),
            tokenizer,
            backend,
            options,
            workers,
        });
        for n in 0..workers {
            let shared = shared.clone();
            // One thread per worker for candle's CPU kernels (matmuls and the row-parallel
            // softmax/layer-norm), so workers never wait on each other's parallel ops.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("semcache-embed-{n}"))
                .build()
                .map_err(|e| EmbedError::Load(format!("cannot start inference thread: {e}")))?;
            thread::Builder::new()
                .name(format!("semcache-embed-queue-{n}"))
                .spawn(move || shared.run(&pool))
                .map_err(|e| EmbedError::Load(format!("cannot start inference thread: {e}")))?;
        }
        Ok(Self { tx, info, pace })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// Texts waiting for the model right now.
    pub fn queue_depth(&self) -> usize {
        self.info.capacity - self.tx.capacity()
    }

    /// About how long a text queued now waits for its embedding: the texts ahead of it
    /// at the recent pace, shared by the workers.
    pub fn expected_wait(&self) -> std::time::Duration {
        let per_text = self
            .pace
            .nanos_per_text
            .load(std::sync::atomic::Ordering::Relaxed);
        let ahead = self.queue_depth() as u64 + 1;
        std::time::Duration::from_nanos(per_text * ahead / self.info.workers.max(1) as u64)
    }

    pub async fn embed(&self, text: String) -> Result<Embedded, EmbedError> {
        let mut all = self.embed_many(vec![text]).await?;
        all.pop().ok_or(EmbedError::ShuttingDown)
    }

    /// Embeds several texts; either all are queued or none (then `QueueFull`).
    pub async fn embed_many(&self, texts: Vec<String>) -> Result<Vec<Embedded>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let permits = self.tx.try_reserve_many(texts.len()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => EmbedError::QueueFull,
            mpsc::error::TrySendError::Closed(()) => EmbedError::ShuttingDown,
        })?;
        let mut replies = Vec::with_capacity(texts.len());
        for (permit, text) in permits.zip(texts) {
            let (reply, rx) = oneshot::channel();
            permit.send(Job { text, reply });
            replies.push(rx);
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.map_err(|_| EmbedError::ShuttingDown)??);
        }
        Ok(out)
    }
}

/// What the inference workers share: the queue, the tokenizer and the model.
struct Worker {
    queue: Mutex<mpsc::Receiver<Job>>,
    pace: Arc<Pace>,
    tokenizer: TextTokenizer,
    backend: BertBackend,
    options: QueueOptions,
    workers: usize,
}

impl Worker {
    fn run(&self, pool: &rayon::ThreadPool) {
        while let Some(jobs) = self.take_share() {
            // While this worker computes, the kernels leave its core to it.
            let _busy = kernels::busy();
            // Callers that gave up (client gone) cost nothing.
            let mut ready: Vec<(Job, TokenizedText)> = Vec::with_capacity(jobs.len());
            for job in jobs.into_iter().filter(|j| !j.reply.is_closed()) {
                match self.tokenizer.tokenize(&job.text) {
                    Ok(tokens) => ready.push((job, tokens)),
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
            // Similar lengths side by side, so each padded batch wastes little.
            ready.sort_by_key(|(_, t)| t.ids.len());
            let mut rest: &mut [(Job, TokenizedText)] = &mut ready;
            while !rest.is_empty() {
                let take = batch_len(rest, self.options, self.backend.ragged());
                let (batch, tail) = std::mem::take(&mut rest).split_at_mut(take);
                let started = std::time::Instant::now();
                pool.install(|| run_batch(&self.backend, batch));
                self.pace.record(take, started.elapsed());
                rest = tail;
            }
        }
    }

    /// Waits for work, then takes this worker's share of what is queued: all of it for
    /// a single worker (up to four batches), else an even split, so a burst of 32 texts
    /// runs as two batches of 16 on two cores rather than one batch of 32 on one.
    /// `None` once the queue is closed.
    fn take_share(&self) -> Option<Vec<Job>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let first = queue.blocking_recv()?;
        let waiting = queue.len() + 1;
        crate::metrics::metrics()
            .embed_queue_depth
            .set(waiting as i64);
        let share = if self.workers == 1 {
            self.options.max_batch * 4
        } else {
            waiting.div_ceil(self.workers).min(self.options.max_batch)
        };
        let mut jobs = vec![first];
        while jobs.len() < share {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        Some(jobs)
    }
}

/// How many of the (length-sorted) texts fit one forward pass: at most `max_batch`
/// texts and `max_batch_tokens` tokens. Without padding (`ragged`, the CPU kernels) that
/// is all there is. Padded batches count every row at the longest one's length and stop
/// before padding exceeds half the real tokens, once the batch is big enough for padding
/// to cost more than a forward pass's fixed overhead.
fn batch_len(sorted: &[(Job, TokenizedText)], options: QueueOptions, ragged: bool) -> usize {
    const OVERHEAD_TOKENS: usize = 1024;
    let (mut n, mut real) = (0, 0);
    while n < sorted.len() && n < options.max_batch {
        let longest = sorted[n].1.ids.len();
        let padded = longest * (n + 1);
        let over_budget = if ragged {
            real + longest > options.max_batch_tokens
        } else {
            let wasteful = padded > OVERHEAD_TOKENS && 2 * padded > 3 * (real + longest);
            padded > options.max_batch_tokens || wasteful
        };
        if n > 0 && over_budget {
            break;
        }
        real += longest;
        n += 1;
    }
    n.max(1)
}

fn run_batch(backend: &BertBackend, batch: &mut [(Job, TokenizedText)]) {
    let inputs: Vec<&TokenizedText> = batch.iter().map(|(_, t)| t).collect();
    let started = std::time::Instant::now();
    let result = backend.embed(&inputs);
    let m = crate::metrics::metrics();
    m.embed_batch_size.observe(inputs.len() as f64);
    m.embedded_texts.inc_by(inputs.len() as u64);
    m.embed_duration.observe(started.elapsed().as_secs_f64());
    let replies = batch.iter_mut().map(|(job, tokens)| {
        let (reply, _) = oneshot::channel();
        (
            std::mem::replace(&mut job.reply, reply),
            (tokens.ids.len(), tokens.truncated_at),
        )
    });
    match result {
        Ok(vectors) => {
            for ((reply, (tokens, truncated_at)), vector) in replies.zip(vectors) {
                let _ = reply.send(Ok(Embedded {
                    vector,
                    tokens,
                    truncated_at,
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "embedding batch failed");
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_follows_recent_batches() {
        use std::sync::atomic::Ordering::Relaxed;
        use std::time::Duration;
        let pace = Pace::default();
        pace.record(4, Duration::from_millis(20));
        assert_eq!(
            pace.nanos_per_text.load(Relaxed),
            5_000_000,
            "first batch sets it"
        );
        pace.record(1, Duration::from_millis(10));
        // A fifth of the way towards the newest batch's 10 ms per text.
        assert_eq!(pace.nanos_per_text.load(Relaxed), 6_000_000);
        pace.record(0, Duration::ZERO);
        assert_eq!(pace.nanos_per_text.load(Relaxed), 4_800_000);
    }

    fn texts(lengths: &[usize]) -> Vec<(Job, TokenizedText)> {
        lengths
            .iter()
            .map(|&n| {
                let (reply, _) = oneshot::channel();
                let job = Job {
                    text: String::new(),
                    reply,
                };
                let tokens = TokenizedText {
                    ids: vec![0; n],
                    truncated_at: None,
                };
                (job, tokens)
            })
            .collect()
    }

    #[test]
    fn padded_batches_stop_before_padding_outweighs_real_tokens() {
        let options = QueueOptions::default();
        // Short texts share a batch whatever their spread: padding is cheap there.
        assert_eq!(batch_len(&texts(&[5, 10, 20, 40]), options, false), 4);
        // Long rows do not drag short ones up to their length.
        assert_eq!(
            batch_len(&texts(&[20, 25, 30, 40, 60, 256, 256]), options, false),
            5
        );
        assert_eq!(batch_len(&texts(&[256; 40]), options, false), 32);
        // The token budget holds, and one text always goes.
        let small = QueueOptions {
            max_batch_tokens: 300,
            ..options
        };
        assert_eq!(batch_len(&texts(&[100, 100, 100, 100]), small, false), 3);
        assert_eq!(batch_len(&texts(&[500]), small, false), 1);
    }

    #[test]
    fn ragged_batches_count_only_real_tokens() {
        let options = QueueOptions::default();
        assert_eq!(
            batch_len(&texts(&[20, 25, 30, 40, 60, 256, 256]), options, true),
            7
        );
        assert_eq!(batch_len(&texts(&[256; 40]), options, true), 32);
        let small = QueueOptions {
            max_batch_tokens: 300,
            ..options
        };
        assert_eq!(batch_len(&texts(&[10, 100, 100, 100]), small, true), 3);
        assert_eq!(batch_len(&texts(&[500]), small, true), 1);
    }
}
