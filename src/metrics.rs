//! Prometheus metrics, served at `/metrics`.
//!
//! Cache ids become the `cache` label only for the first [`MAX_CACHE_LABELS`] caches
//! seen; later ones share the label `_other`, so a tenant creating caches cannot blow
//! up the series count.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Most distinct values of the `cache` label.
pub const MAX_CACHE_LABELS: usize = 100;

pub struct Metrics {
    registry: Registry,
    pub lookups: IntCounterVec,
    pub lookup_duration: HistogramVec,
    pub inserts: IntCounterVec,
    pub entries: IntGaugeVec,
    pub bytes: IntGaugeVec,
    pub evictions: IntCounterVec,
    pub tombstones: IntGaugeVec,
    pub index_segments: IntGaugeVec,
    pub false_hit_reports: IntCounterVec,
    pub bounded_decisions: IntCounterVec,
    pub exploration_labels: IntCounterVec,
    pub embed_batch_size: Histogram,
    pub embed_queue_depth: IntGauge,
    pub embed_duration: Histogram,
    pub http_requests: IntCounterVec,
    pub startup_entries: IntGaugeVec,
    pub index_saves: IntCounterVec,
    pub ext_proc_streams: IntCounterVec,
    pub ext_proc_active: IntGauge,
    pub ext_proc_requests: IntCounterVec,
    pub ext_proc_stores: IntCounterVec,
    pub ext_proc_lookup_duration: Histogram,
    pub collection_points: IntGaugeVec,
    pub collection_bytes: IntGaugeVec,
    pub collection_writes: IntCounterVec,
    pub collection_query_duration: Histogram,
    pub routing_decisions: IntCounterVec,
    pub guard_decisions: IntCounterVec,
    pub embedded_texts: IntCounter,
    labels: Mutex<HashSet<String>>,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let lookups = IntCounterVec::new(
        Opts::new(
            "semcache_lookups_total",
            "Cache lookups by outcome (hit or miss) and the strategy that answered",
        ),
        &["cache", "result", "strategy"],
    )?;
    let lookup_duration = HistogramVec::new(
        HistogramOpts::new(
            "semcache_lookup_duration_seconds",
            "Time to answer a lookup, embedding included",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]),
        &["strategy"],
    )?;
    let inserts = IntCounterVec::new(
        Opts::new("semcache_inserts_total", "Entries stored"),
        &["cache"],
    )?;
    let entries = IntGaugeVec::new(Opts::new("semcache_entries", "Live entries"), &["cache"])?;
    let bytes = IntGaugeVec::new(
        Opts::new(
            "semcache_bytes",
            "Bytes held by live entries (prompt, response, attributes, vector)",
        ),
        &["cache"],
    )?;
    let evictions = IntCounterVec::new(
        Opts::new(
            "semcache_evictions_total",
            "Entries removed, by reason (ttl, capacity, admin, deleted, flushed)",
        ),
        &["cache", "reason"],
    )?;
    let tombstones = IntGaugeVec::new(
        Opts::new(
            "semcache_index_tombstones",
            "Dead points still in a cache's HNSW graph",
        ),
        &["cache"],
    )?;
    let index_segments = IntGaugeVec::new(
        Opts::new(
            "semcache_index_segments",
            "Frozen (memory-mapped) segments in a cache's index; the live graph is not counted",
        ),
        &["cache"],
    )?;
    let false_hit_reports = IntCounterVec::new(
        Opts::new(
            "semcache_false_hit_reports_total",
            "Feedback reports of wrong answers",
        ),
        &["cache"],
    )?;
    let bounded_decisions = IntCounterVec::new(
        Opts::new(
            "semcache_bounded_decisions_total",
            "maxErrorRate decisions on a semantic candidate (serve, explore, miss)",
        ),
        &["cache", "decision"],
    )?;
    let exploration_labels = IntCounterVec::new(
        Opts::new(
            "semcache_exploration_labels_total",
            "Explorations labelled by comparing the fresh answer with the cached one",
        ),
        &["cache", "label"],
    )?;
    let embed_batch_size = Histogram::with_opts(
        HistogramOpts::new("semcache_embed_batch_size", "Texts per model forward pass")
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
    )?;
    let embed_queue_depth =
        IntGauge::new("semcache_embed_queue_depth", "Texts waiting for the model")?;
    let embed_duration = Histogram::with_opts(
        HistogramOpts::new(
            "semcache_embed_batch_duration_seconds",
            "Time of one model forward pass",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]),
    )?;
    let http_requests = IntCounterVec::new(
        Opts::new(
            "semcache_http_requests_total",
            "HTTP requests by route and status code",
        ),
        &["route", "status"],
    )?;
    let startup_entries = IntGaugeVec::new(
        Opts::new(
            "semcache_startup_entries",
            "Entries loaded at start-up, by how their index points came back: from a saved graph, or re-inserted",
        ),
        &["source"],
    )?;
    let index_saves = IntCounterVec::new(
        Opts::new(
            "semcache_index_saves_total",
            "HNSW graph saves by result (ok or failed)",
        ),
        &["result"],
    )?;
    let ext_proc_streams = IntCounterVec::new(
        Opts::new(
            "semcache_ext_proc_streams_total",
            "Envoy ext_proc streams opened, by result (ok, or rejected: unauthenticated)",
        ),
        &["result"],
    )?;
    let ext_proc_active = IntGauge::new(
        "semcache_ext_proc_active_streams",
        "Envoy ext_proc streams open now",
    )?;
    let ext_proc_requests = IntCounterVec::new(
        Opts::new(
            "semcache_ext_proc_requests_total",
            "Chat requests seen on the gateway path, by outcome (hit, miss, bypass, error, passthrough) and reason",
        ),
        &["outcome", "reason"],
    )?;
    let ext_proc_stores = IntCounterVec::new(
        Opts::new(
            "semcache_ext_proc_stores_total",
            "Answers after a gateway miss, by result (stored, or why not)",
        ),
        &["result"],
    )?;
    let ext_proc_lookup_duration = Histogram::with_opts(
        HistogramOpts::new(
            "semcache_ext_proc_lookup_duration_seconds",
            "Time from a chat request's body reaching semcache to its answer (hit or continue)",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        ]),
    )?;
    let collection_points = IntGaugeVec::new(
        Opts::new(
            "semcache_collection_points",
            "Live points per vector-search collection (label shared with caches' limit)",
        ),
        &["collection"],
    )?;
    let collection_bytes = IntGaugeVec::new(
        Opts::new(
            "semcache_collection_bytes",
            "Estimated memory of each collection: vectors (f16 in the graph), links and payloads",
        ),
        &["collection"],
    )?;
    let collection_writes = IntCounterVec::new(
        Opts::new(
            "semcache_collection_writes_total",
            "Points written to collections, by operation (upsert, delete, payload)",
        ),
        &["operation"],
    )?;
    let collection_query_duration = Histogram::with_opts(
        HistogramOpts::new(
            "semcache_collection_query_duration_seconds",
            "Time to answer a collection query, embedding of a document included",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
    )?;
    let routing_decisions = IntCounterVec::new(
        Opts::new(
            "semcache_routing_decisions_total",
            "Prompts routed, by router and the route chosen (none: out of scope)",
        ),
        &["router", "route"],
    )?;
    let guard_decisions = IntCounterVec::new(
        Opts::new(
            "semcache_guard_decisions_total",
            "Prompts checked by guards, by guard and the category that blocked (none: passed)",
        ),
        &["guard", "category"],
    )?;
    let embedded_texts = IntCounter::new(
        "semcache_embedded_texts_total",
        "Texts the model has embedded, every caller together",
    )?;
    registry.register(Box::new(routing_decisions.clone()))?;
    registry.register(Box::new(guard_decisions.clone()))?;
    registry.register(Box::new(embedded_texts.clone()))?;
    registry.register(Box::new(collection_points.clone()))?;
    registry.register(Box::new(collection_bytes.clone()))?;
    registry.register(Box::new(collection_writes.clone()))?;
    registry.register(Box::new(collection_query_duration.clone()))?;
    registry.register(Box::new(ext_proc_streams.clone()))?;
    registry.register(Box::new(ext_proc_active.clone()))?;
    registry.register(Box::new(ext_proc_requests.clone()))?;
    registry.register(Box::new(ext_proc_stores.clone()))?;
    registry.register(Box::new(ext_proc_lookup_duration.clone()))?;
    registry.register(Box::new(startup_entries.clone()))?;
    registry.register(Box::new(index_saves.clone()))?;
    registry.register(Box::new(lookups.clone()))?;
    registry.register(Box::new(lookup_duration.clone()))?;
    registry.register(Box::new(inserts.clone()))?;
    registry.register(Box::new(entries.clone()))?;
    registry.register(Box::new(bytes.clone()))?;
    registry.register(Box::new(evictions.clone()))?;
    registry.register(Box::new(tombstones.clone()))?;
    registry.register(Box::new(index_segments.clone()))?;
    registry.register(Box::new(false_hit_reports.clone()))?;
    registry.register(Box::new(bounded_decisions.clone()))?;
    registry.register(Box::new(exploration_labels.clone()))?;
    registry.register(Box::new(embed_batch_size.clone()))?;
    registry.register(Box::new(embed_queue_depth.clone()))?;
    registry.register(Box::new(embed_duration.clone()))?;
    registry.register(Box::new(http_requests.clone()))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(Metrics {
        registry,
        lookups,
        lookup_duration,
        inserts,
        entries,
        bytes,
        evictions,
        tombstones,
        index_segments,
        false_hit_reports,
        bounded_decisions,
        exploration_labels,
        embed_batch_size,
        embed_queue_depth,
        embed_duration,
        http_requests,
        startup_entries,
        index_saves,
        ext_proc_streams,
        ext_proc_active,
        ext_proc_requests,
        ext_proc_stores,
        ext_proc_lookup_duration,
        collection_points,
        collection_bytes,
        collection_writes,
        collection_query_duration,
        routing_decisions,
        guard_decisions,
        embedded_texts,
        labels: Mutex::new(HashSet::new()),
    })
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| build().expect("metric definitions are valid"))
}

impl Metrics {
    /// The `cache` label for a cache id, bounded in cardinality.
    pub fn cache_label(&self, cache_id: &str) -> String {
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        if labels.contains(cache_id) {
            return cache_id.to_string();
        }
        if labels.len() >= MAX_CACHE_LABELS && labels.contains("_other") {
            return "_other".to_string();
        }
        let label = if labels.len() < MAX_CACHE_LABELS {
            labels.insert(cache_id.to_string());
            cache_id
        } else if labels.insert("_other".to_string()) {
            "_other"
        } else {
            return "_other".to_string();
        };
        // Series exist from the first sight of a cache, at zero, so rates and absence
        // alerts work before the first eviction or report.
        for reason in ["ttl", "capacity", "admin", "deleted", "flushed"] {
            self.evictions.with_label_values(&[label, reason]);
        }
        self.false_hit_reports.with_label_values(&[label]);
        self.inserts.with_label_values(&[label]);
        self.entries.with_label_values(&[label]);
        self.bytes.with_label_values(&[label]);
        self.tombstones.with_label_values(&[label]);
        self.index_segments.with_label_values(&[label]);
        label.to_string()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
