//! Sentence embeddings: tokenization, a bounded batching queue, and the candle backend.
//!
//! Requests enter a bounded queue; one inference thread (off the async runtime) drains
//! whatever is waiting, up to a token budget, sorts it by length so padding stays small,
//! and runs the model. A full queue is reported at once as [`EmbedError::QueueFull`] so
//! the HTTP edge can shed load instead of queueing without bound.

pub mod bert;
pub mod manifest;
pub mod provision;
pub mod tokenize;

use std::sync::Arc;
use std::thread;

use candle_core::Device;
use tokio::sync::{mpsc, oneshot};

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

/// Limits of the batching queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Texts that may wait for the model before new ones are refused.
    pub capacity: usize,
    /// Most texts run in one forward pass.
    pub max_batch: usize,
    /// Most padded tokens (batch rows × longest row) in one forward pass.
    pub max_batch_tokens: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            capacity: 1024,
            max_batch: 32,
            max_batch_tokens: 8192,
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
}

#[derive(Debug)]
pub struct EmbedderInfo {
    pub model: String,
    pub dimensions: usize,
    pub device: String,
    pub capacity: usize,
}

impl Embedder {
    /// Loads the model and starts the inference thread.
    pub fn start(
        manifest: &ModelManifest,
        files: &ModelFiles,
        device: &Device,
        options: QueueOptions,
    ) -> Result<Self, EmbedError> {
        let tokenizer = TextTokenizer::load(&files.tokenizer, manifest.max_seq_length)?;
        let backend = BertBackend::load(files, device)?;
        if backend.dimensions() != manifest.dimensions {
            return Err(EmbedError::Load(format!(
                "model has {} dimensions, manifest says {}",
                backend.dimensions(),
                manifest.dimensions
            )));
        }
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let info = Arc::new(EmbedderInfo {
            model: manifest.name.clone(),
            dimensions: manifest.dimensions,
            device: format!("{device:?}"),
            capacity: options.capacity.max(1),
        });
        thread::Builder::new()
            .name("semcache-embed".into())
            .spawn(move || inference_loop(rx, tokenizer, backend, options))
            .map_err(|e| EmbedError::Load(format!("cannot start inference thread: {e}")))?;
        Ok(Self { tx, info })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// Texts waiting for the model right now.
    pub fn queue_depth(&self) -> usize {
        self.info.capacity - self.tx.capacity()
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

fn inference_loop(
    mut rx: mpsc::Receiver<Job>,
    tokenizer: TextTokenizer,
    backend: BertBackend,
    options: QueueOptions,
) {
    while let Some(first) = rx.blocking_recv() {
        crate::metrics::metrics()
            .embed_queue_depth
            .set(rx.len() as i64 + 1);
        let mut jobs = vec![first];
        while jobs.len() < options.max_batch * 4 {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Callers that gave up (client gone) cost nothing.
        jobs.retain(|j| !j.reply.is_closed());

        let mut ready: Vec<(Job, TokenizedText)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            match tokenizer.tokenize(&job.text) {
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
            let take = batch_len(rest, options);
            let (batch, tail) = std::mem::take(&mut rest).split_at_mut(take);
            run_batch(&backend, batch);
            rest = tail;
        }
    }
}

/// How many of the (length-sorted) texts fit one forward pass.
fn batch_len(sorted: &[(Job, TokenizedText)], options: QueueOptions) -> usize {
    let mut n = 0;
    while n < sorted.len() && n < options.max_batch {
        let longest = sorted[n].1.ids.len();
        if n > 0 && longest * (n + 1) > options.max_batch_tokens {
            break;
        }
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
