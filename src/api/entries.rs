//! LangCache-compatible cache routes: search, insert, delete, flush.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{CacheId, JsonBody};
use super::problem::{ApiError, FieldError, Problem};
use super::{AppState, Limits};
use crate::cache::{Considered, Hit, NewEntry, Query, SearchOutcome, Strategy};
use crate::store::EntryId;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchRequest {
    /// The prompt to look up.
    pub prompt: String,
    /// Minimum cosine similarity in [0, 1] for a semantic hit; the cache's default when absent.
    pub similarity_threshold: Option<f64>,
    /// Strategies in priority order: `exact` (normalised prompt, no model run) and/or `semantic`.
    pub search_strategies: Option<Vec<String>>,
    /// Exact-match scope: only entries carrying every one of these attributes are seen.
    pub attributes: Option<BTreeMap<String, String>>,
    /// How many entries to return (default 1).
    pub max_results: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    pub id: String,
    pub prompt: String,
    pub response: String,
    pub attributes: BTreeMap<String, String>,
    /// Cosine similarity in [0, 1]; 1 for exact hits.
    pub similarity: f32,
    /// `exact` or `semantic`.
    pub search_strategy: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    /// Best first; empty on a miss.
    pub data: Vec<CacheEntry>,
    /// With `?explain=true`: every candidate considered, served or not, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub explain: Option<Vec<Considered>>,
}

/// `?explain=true` on search routes.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct SearchParams {
    /// Include every candidate considered and why it was or was not served.
    #[serde(default)]
    pub explain: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetRequest {
    pub prompt: String,
    pub response: String,
    pub attributes: Option<BTreeMap<String, String>>,
    /// Time to live in milliseconds; the cache's default when absent.
    pub ttl_millis: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetResponse {
    pub entry_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeleteQueryRequest {
    /// Entries carrying every one of these attributes are deleted; must not be empty.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteQueryResponse {
    pub deleted_entries_count: usize,
}

/// Collects every field error instead of stopping at the first.
#[derive(Default)]
pub(super) struct Checks(Vec<FieldError>);

impl Checks {
    pub(super) fn fail(
        &mut self,
        field: impl Into<String>,
        rule: &str,
        message: impl Into<String>,
    ) {
        self.0.push(FieldError::new(field, rule, message));
    }

    pub(super) fn text(&mut self, field: &str, value: &str, max: usize, allow_empty: bool) {
        if !allow_empty && value.trim().is_empty() {
            self.fail(field, "notEmpty", format!("{field} must not be empty"));
        }
        if value.len() > max {
            self.fail(
                field,
                "maxLength",
                format!("{field} is {} bytes; the limit is {max}", value.len()),
            );
        }
    }

    pub(super) fn attributes(&mut self, attributes: &BTreeMap<String, String>, limits: &Limits) {
        if attributes.len() > limits.max_attributes {
            self.fail(
                "attributes",
                "maxProperties",
                format!("at most {} attributes are allowed", limits.max_attributes),
            );
        }
        for (key, value) in attributes {
            let field = format!("attributes.{key}");
            if key.starts_with("semcache.") {
                self.fail(
                    &field,
                    "reserved",
                    "attribute names starting with semcache. are reserved",
                );
            }
            if key.is_empty() || key.len() > limits.max_attribute_bytes {
                self.fail(
                    &field,
                    "keyLength",
                    format!(
                        "attribute names are 1 to {} bytes",
                        limits.max_attribute_bytes
                    ),
                );
            }
            if value.len() > limits.max_attribute_bytes {
                self.fail(
                    &field,
                    "maxLength",
                    format!(
                        "attribute values are at most {} bytes",
                        limits.max_attribute_bytes
                    ),
                );
            }
        }
    }

    /// `ttlMillis`, when given, between 1 ms and the limit.
    pub(super) fn ttl(&mut self, ttl: Option<i64>, limits: &Limits) {
        if ttl.is_some_and(|t| t < 1 || t as u64 > limits.max_ttl_ms) {
            self.fail(
                "ttlMillis",
                "range",
                format!("ttlMillis must be between 1 and {}", limits.max_ttl_ms),
            );
        }
    }

    pub(super) fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

fn parse_strategies(raw: &Option<Vec<String>>, checks: &mut Checks) -> Vec<Strategy> {
    let Some(raw) = raw else {
        return Vec::new();
    };
    if raw.is_empty() {
        checks.fail(
            "searchStrategies",
            "minItems",
            "name at least one of exact, semantic",
        );
    }
    let mut out = Vec::new();
    for (i, name) in raw.iter().enumerate() {
        match name.as_str() {
            "exact" => out.push(Strategy::Exact),
            "semantic" => out.push(Strategy::Semantic),
            other => checks.fail(
                format!("searchStrategies[{i}]"),
                "enum",
                format!("unknown strategy {other:?}; use exact or semantic"),
            ),
        }
    }
    out.dedup();
    out
}

impl SearchRequest {
    pub fn into_query(self, limits: &Limits, explain: bool) -> Result<Query, ApiError> {
        let mut checks = Checks::default();
        checks.text("prompt", &self.prompt, limits.max_prompt_bytes, false);
        if let Some(t) = self.similarity_threshold {
            if !(0.0..=1.0).contains(&t) {
                checks.fail(
                    "similarityThreshold",
                    "range",
                    "similarityThreshold must be between 0 and 1",
                );
            }
        }
        let max_results = self.max_results.unwrap_or(1);
        if max_results < 1 || max_results > limits.max_results as i64 {
            checks.fail(
                "maxResults",
                "range",
                format!("maxResults must be between 1 and {}", limits.max_results),
            );
        }
        let strategies = parse_strategies(&self.search_strategies, &mut checks);
        let attributes = self.attributes.unwrap_or_default();
        checks.attributes(&attributes, limits);
        checks.finish()?;
        Ok(Query {
            prompt: self.prompt,
            attributes,
            similarity_threshold: self.similarity_threshold.map(|t| t as f32),
            strategies,
            max_results: max_results as usize,
            explain,
            max_queue_wait: None,
            embedded: None,
        })
    }
}

impl SetRequest {
    pub fn into_entry(self, limits: &Limits) -> Result<NewEntry, ApiError> {
        let mut checks = Checks::default();
        checks.text("prompt", &self.prompt, limits.max_prompt_bytes, false);
        checks.text("response", &self.response, limits.max_response_bytes, true);
        checks.ttl(self.ttl_millis, limits);
        let attributes = self.attributes.unwrap_or_default();
        checks.attributes(&attributes, limits);
        checks.finish()?;
        Ok(NewEntry {
            prompt: self.prompt,
            response: self.response,
            attributes,
            ttl_ms: self.ttl_millis.map(|t| t as u64),
        })
    }
}

/// `SearchParams` from the query string; a malformed one is a 400 problem.
pub struct SearchQueryParams(pub SearchParams);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SearchQueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<SearchParams>::from_request_parts(parts, state)
            .await
            .map(|q| SearchQueryParams(q.0))
            .map_err(|e| ApiError::field("explain", "type", e.body_text()))
    }
}

fn to_entry(hit: Hit) -> CacheEntry {
    CacheEntry {
        id: hit.entry.id.to_string(),
        prompt: hit.entry.prompt,
        response: hit.entry.response,
        attributes: hit.entry.attributes,
        similarity: hit.similarity,
        search_strategy: match hit.strategy {
            Strategy::Exact => "exact",
            Strategy::Semantic => "semantic",
        }
        .into(),
    }
}

/// The search response with the `x-semcache*` headers a gateway can act on.
pub fn search_response(outcome: SearchOutcome, explain: bool) -> Response {
    let data: Vec<CacheEntry> = outcome.hits.into_iter().map(to_entry).collect();
    let explain = explain.then_some(outcome.considered);
    let mut headers = HeaderMap::new();
    match data.first() {
        Some(best) => {
            headers.insert("x-semcache", HeaderValue::from_static("hit"));
            if let Ok(v) = HeaderValue::from_str(&format!("{:.4}", best.similarity)) {
                headers.insert("x-semcache-similarity", v);
            }
            if let Ok(v) = HeaderValue::from_str(&best.id) {
                headers.insert("x-semcache-entry-id", v);
            }
        }
        None => {
            headers.insert("x-semcache", HeaderValue::from_static("miss"));
            // maxErrorRate: the insert that follows for this prompt labels that entry.
            if let Some(id) = outcome.explore {
                if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                    headers.insert("x-semcache-explore", v);
                }
            }
        }
    }
    (headers, Json(SearchResponse { data, explain })).into_response()
}

/// Searches a cache: exact match first, then semantic.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/entries/search", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}"), SearchParams),
    request_body = SearchRequest,
    responses(
        (status = 200, description = "Hits, best first; `data: []` is a miss", body = SearchResponse,
         headers(("x-semcache" = String, description = "hit or miss"),
                 ("x-semcache-similarity" = String, description = "similarity of the best hit"),
                 ("x-semcache-entry-id" = String, description = "id of the best hit"))),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Starting or overloaded; forward to the model", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    params: SearchQueryParams,
    JsonBody(body): JsonBody<SearchRequest>,
) -> Result<Response, ApiError> {
    let query = body.into_query(state.limits(), params.0.explain)?;
    let core = state.core()?;
    let outcome = core.search(&cache_id, &query).await?;
    Ok(search_response(outcome, query.explain))
}

/// Stores a prompt and its response; durable once answered 201.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/entries", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    request_body = SetRequest,
    responses(
        (status = 201, description = "Stored", body = SetResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Starting or overloaded", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "Disk full", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn insert(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    JsonBody(body): JsonBody<SetRequest>,
) -> Result<Response, ApiError> {
    let entry = body.into_entry(state.limits())?;
    let core = state.core()?;
    let id = core.insert(&cache_id, entry).await?;
    Ok((
        StatusCode::CREATED,
        Json(SetResponse {
            entry_id: id.to_string(),
        }),
    )
        .into_response())
}

/// Deletes the entries that carry every given attribute.
#[utoipa::path(
    delete, path = "/v1/caches/{cacheId}/entries", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    request_body = DeleteQueryRequest,
    responses(
        (status = 200, description = "Deleted", body = DeleteQueryResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_matching(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    JsonBody(body): JsonBody<DeleteQueryRequest>,
) -> Result<Json<DeleteQueryResponse>, ApiError> {
    let mut checks = Checks::default();
    if body.attributes.is_empty() {
        checks.fail(
            "attributes",
            "minProperties",
            "name at least one attribute; use /flush to empty a cache",
        );
    }
    checks.attributes(&body.attributes, state.limits());
    checks.finish()?;
    let core = state.core()?;
    let deleted = core.delete_matching(&cache_id, &body.attributes).await?;
    Ok(Json(DeleteQueryResponse {
        deleted_entries_count: deleted,
    }))
}

#[derive(Deserialize)]
pub struct EntryPath {
    #[serde(rename = "cacheId")]
    _cache_id: String,
    #[serde(rename = "entryId")]
    entry_id: String,
}

/// Deletes one entry.
#[utoipa::path(
    delete, path = "/v1/caches/{cacheId}/entries/{entryId}", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}"),
           ("entryId" = String, Path, description = "32 hex digits")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such entry", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_one(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    Path(path): Path<EntryPath>,
) -> Result<StatusCode, ApiError> {
    let not_found =
        || ApiError::NotFound(format!("cache {cache_id} has no entry {}", path.entry_id));
    let id = EntryId::parse(&path.entry_id).ok_or_else(not_found)?;
    let core = state.core()?;
    core.delete(&cache_id, &id).await.map_err(|e| match e {
        crate::cache::CacheError::NotFound => not_found(),
        other => other.into(),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes every entry of a cache.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/flush", tag = "cache",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    responses((status = 204, description = "Flushed"))
)]
pub async fn flush(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
) -> Result<StatusCode, ApiError> {
    let core = state.core()?;
    core.flush_cache(&cache_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
