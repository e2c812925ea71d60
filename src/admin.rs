//! Operator routes: global and per-cache stats, eviction, compaction, Prometheus.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::extract::{CacheId, JsonBody};
use crate::api::problem::{ApiError, Problem};
use crate::api::AppState;
use crate::cache::stats::{EvictionCounts, StatsSnapshot};
use crate::metrics::metrics;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalStats {
    pub caches: usize,
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
    pub embed_queue_depth: usize,
    pub store_bytes_on_disk: u64,
    pub model: String,
    pub device: String,
    /// Vector-search collections: how many, their live points, bytes (vectors as f32
    /// and payloads as JSON) and index points (live and tombstones).
    #[schema(value_type = Object)]
    pub collections: crate::collections::CollectionTotals,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatsItem {
    pub cache_id: String,
    pub stats: StatsSnapshot,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CacheList {
    pub caches: Vec<CacheStatsItem>,
}

/// Totals over all caches.
#[utoipa::path(get, path = "/admin/stats", tag = "admin", responses((status = 200, body = GlobalStats)))]
pub async fn stats(State(state): State<AppState>) -> Result<Json<GlobalStats>, ApiError> {
    let core = state.core()?;
    let all = core.list_caches();
    let mut g = GlobalStats {
        caches: all.len(),
        entries: 0,
        bytes: 0,
        hits_exact: 0,
        hits_semantic: 0,
        misses: 0,
        inserts: 0,
        evictions: EvictionCounts::default(),
        false_hit_reports: 0,
        tombstones: 0,
        index_size: 0,
        embed_queue_depth: core.embedder().queue_depth(),
        store_bytes_on_disk: core.store().size_on_disk(),
        model: core.embedder().info().model.clone(),
        device: core.embedder().info().device.clone(),
        collections: state.collections()?.totals(),
    };
    for (_, s) in &all {
        g.entries += s.entries;
        g.bytes += s.bytes;
        g.hits_exact += s.hits_exact;
        g.hits_semantic += s.hits_semantic;
        g.misses += s.misses;
        g.inserts += s.inserts;
        g.evictions.add(&s.evictions);
        g.false_hit_reports += s.false_hit_reports;
        g.tombstones += s.tombstones;
        g.index_size += s.index_size;
    }
    Ok(Json(g))
}

/// Every cache with its stats.
#[utoipa::path(get, path = "/admin/caches", tag = "admin", responses((status = 200, body = CacheList)))]
pub async fn caches(State(state): State<AppState>) -> Result<Json<CacheList>, ApiError> {
    let caches = state
        .core()?
        .list_caches()
        .into_iter()
        .map(|(cache_id, stats)| CacheStatsItem { cache_id, stats })
        .collect();
    Ok(Json(CacheList { caches }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvictRequest {
    /// Entries created more than this many milliseconds ago.
    pub older_than_millis: Option<i64>,
    /// Entries carrying every one of these attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// Only count what would be evicted (the default).
    pub dry_run: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EvictResponse {
    pub matched: usize,
    pub evicted: usize,
}

/// Evicts a cache's entries by age and/or attributes; a dry run unless `dryRun: false`.
#[utoipa::path(
    post, path = "/admin/caches/{cacheId}/evict", tag = "admin",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    request_body = EvictRequest,
    responses(
        (status = 200, body = EvictResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn evict(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    JsonBody(body): JsonBody<EvictRequest>,
) -> Result<Json<EvictResponse>, ApiError> {
    let attributes = body.attributes.unwrap_or_default();
    if body.older_than_millis.is_none() && attributes.is_empty() {
        return Err(ApiError::field(
            "olderThanMillis",
            "required",
            "name olderThanMillis, attributes, or both",
        ));
    }
    if body.older_than_millis.is_some_and(|t| t < 0) {
        return Err(ApiError::field(
            "olderThanMillis",
            "range",
            "olderThanMillis must not be negative",
        ));
    }
    let core = state.core()?;
    let (matched, evicted) = core
        .admin_evict(
            &cache_id,
            body.older_than_millis.map(|t| t as u64),
            &attributes,
            body.dry_run.unwrap_or(true),
        )
        .await?;
    Ok(Json(EvictResponse { matched, evicted }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompactResponse {
    /// Dead points removed from the indexes.
    pub tombstones_removed: usize,
}

/// Rebuilds every index without tombstones (searches keep answering meanwhile).
#[utoipa::path(post, path = "/admin/compact", tag = "admin", responses((status = 200, body = CompactResponse)))]
pub async fn compact(State(state): State<AppState>) -> Result<Json<CompactResponse>, ApiError> {
    let removed = state.core()?.compact().await?;
    Ok(Json(CompactResponse {
        tombstones_removed: removed,
    }))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(core) = state.core() {
        metrics()
            .embed_queue_depth
            .set(core.embedder().queue_depth() as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
}
