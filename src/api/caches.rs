//! Per-cache settings and feedback on served answers.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{CacheId, JsonBody};
use super::problem::{ApiError, FieldError, Problem};
use super::AppState;
use crate::cache::stats::StatsSnapshot;
use crate::store::{CacheSettings, EntryId};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsRequest {
    /// Default similarity threshold of this cache, in [0, 1].
    pub similarity_threshold: Option<f64>,
    /// TTL for entries inserted without `ttlMillis`.
    pub default_ttl_millis: Option<i64>,
    /// Most live entries this cache keeps.
    pub max_entries: Option<i64>,
    /// Most bytes (prompts, responses, attributes, vectors) this cache keeps.
    pub max_bytes: Option<i64>,
    /// Cache chat requests that sample (temperature > 0, n > 1).
    pub allow_sampled: Option<bool>,
    /// Serve a semantic hit only when the cache is confident, from what it has learned,
    /// that it is right with probability at least 1 − maxErrorRate (in (0, 0.5]);
    /// absent serves by the similarity threshold.
    pub max_error_rate: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheView {
    pub cache_id: String,
    /// Effective settings: this cache's own, else the server's defaults.
    pub settings: EffectiveSettings,
    /// Counters since start and current sizes.
    pub stats: StatsSnapshot,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSettings {
    pub similarity_threshold: f32,
    pub default_ttl_millis: Option<u64>,
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    pub allow_sampled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f32>,
}

fn view(state: &AppState, cache_id: String) -> Result<CacheView, ApiError> {
    let core = state.core()?;
    let own = core.settings(&cache_id);
    let defaults = core.config();
    Ok(CacheView {
        stats: core.stats(&cache_id).unwrap_or_default(),
        settings: EffectiveSettings {
            similarity_threshold: own
                .similarity_threshold
                .unwrap_or(defaults.similarity_threshold),
            default_ttl_millis: own.default_ttl_millis.or(defaults.default_ttl_ms),
            max_entries: own.max_entries,
            max_bytes: own.max_bytes,
            allow_sampled: own.allow_sampled,
            max_error_rate: own.max_error_rate,
        },
        cache_id,
    })
}

/// A cache's effective settings and its stats.
#[utoipa::path(
    get, path = "/v1/caches/{cacheId}", tag = "caches",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    responses((status = 200, description = "Settings", body = CacheView))
)]
pub async fn get_cache(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
) -> Result<Json<CacheView>, ApiError> {
    Ok(Json(view(&state, cache_id)?))
}

/// Replaces a cache's settings (absent fields return to the server defaults).
#[utoipa::path(
    put, path = "/v1/caches/{cacheId}", tag = "caches",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    request_body = SettingsRequest,
    responses(
        (status = 200, description = "Stored", body = CacheView),
        (status = 400, description = "Invalid settings", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_cache(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    JsonBody(body): JsonBody<SettingsRequest>,
) -> Result<Json<CacheView>, ApiError> {
    let mut errors = Vec::new();
    if let Some(d) = body.max_error_rate {
        if !(d > 0.0 && d <= 0.5) {
            errors.push(FieldError::new(
                "maxErrorRate",
                "range",
                "maxErrorRate must be above 0 and at most 0.5",
            ));
        }
    }
    if let Some(t) = body.similarity_threshold {
        if !(0.0..=1.0).contains(&t) {
            errors.push(FieldError::new(
                "similarityThreshold",
                "range",
                "must be between 0 and 1",
            ));
        }
    }
    let positive = |field: &str, v: Option<i64>, errors: &mut Vec<FieldError>| -> Option<u64> {
        match v {
            Some(n) if n < 1 => {
                errors.push(FieldError::new(
                    field,
                    "range",
                    format!("{field} must be at least 1"),
                ));
                None
            }
            other => other.map(|n| n as u64),
        }
    };
    let settings = CacheSettings {
        similarity_threshold: body.similarity_threshold.map(|t| t as f32),
        default_ttl_millis: positive("defaultTtlMillis", body.default_ttl_millis, &mut errors),
        max_entries: positive("maxEntries", body.max_entries, &mut errors),
        max_bytes: positive("maxBytes", body.max_bytes, &mut errors),
        allow_sampled: body.allow_sampled.unwrap_or(false),
        max_error_rate: body.max_error_rate.map(|d| d as f32),
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    state.core()?.put_settings(&cache_id, settings).await?;
    Ok(Json(view(&state, cache_id)?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// false: this entry answered a prompt wrongly; true: it answered correctly.
    pub correct: bool,
    /// The prompt it answered; defaults to the last prompt this entry answered.
    pub prompt: Option<String>,
}

#[derive(Deserialize)]
pub struct FeedbackPath {
    #[serde(rename = "cacheId")]
    _cache_id: String,
    #[serde(rename = "entryId")]
    entry_id: String,
}

/// Reports whether an entry's answer was right. A wrong answer is never served again
/// for that prompt or its close paraphrases; a right one lets close paraphrases of it
/// skip the lexical checks.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/entries/{entryId}/feedback", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}"),
           ("entryId" = String, Path, description = "32 hex digits")),
    request_body = FeedbackRequest,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Invalid request, or no prompt to attach it to", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such entry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn feedback(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    Path(path): Path<FeedbackPath>,
    JsonBody(body): JsonBody<FeedbackRequest>,
) -> Result<StatusCode, ApiError> {
    let not_found =
        || ApiError::NotFound(format!("cache {cache_id} has no entry {}", path.entry_id));
    let id = EntryId::parse(&path.entry_id).ok_or_else(not_found)?;
    if let Some(p) = &body.prompt {
        let limit = state.limits().max_prompt_bytes;
        if p.trim().is_empty() || p.len() > limit {
            return Err(ApiError::field(
                "prompt",
                "length",
                format!("prompt must be 1 to {limit} bytes"),
            ));
        }
    }
    let core = state.core()?;
    core.feedback(&cache_id, &id, body.correct, body.prompt)
        .await
        .map_err(|e| match e {
            crate::cache::CacheError::NotFound => not_found(),
            other => other.into(),
        })?;
    Ok(StatusCode::NO_CONTENT)
}
