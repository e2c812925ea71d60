//! OpenAI-request-aware routes: the cache key comes from a Chat Completions request.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::entries::{search_response, Checks, SearchQueryParams, SetResponse};
use super::extract::{CacheId, JsonBody};
use super::problem::{ApiError, Problem};
use super::AppState;
use crate::cache::chat::{self, Uncacheable, SCOPE_ATTRIBUTE};
use crate::cache::{NewEntry, Query};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatEntryRequest {
    /// The Chat Completions request as the gateway received it.
    #[schema(value_type = Object)]
    pub request: Value,
    /// The chat completion the model returned (assembled, if it was streamed).
    #[schema(value_type = Object)]
    pub response: Value,
    pub ttl_millis: Option<i64>,
}

fn scope(fingerprint: String) -> BTreeMap<String, String> {
    BTreeMap::from([(SCOPE_ATTRIBUTE.to_string(), fingerprint)])
}

fn refused(e: Uncacheable) -> ApiError {
    match e {
        Uncacheable::Invalid(detail) => ApiError::field("request", "type", detail),
        other => ApiError::Uncacheable(other.to_string()),
    }
}

/// Looks up a Chat Completions request. Requests that must not be cached (sampling,
/// non-text input, no trailing user message) are a miss with `x-semcache-bypass`.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/chat/search", tag = "chat",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}"), super::entries::SearchParams),
    request_body(content = Object, description = "An OpenAI Chat Completions request"),
    responses(
        (status = 200, description = "As entries/search; `response` holds the cached completion JSON", body = super::entries::SearchResponse,
         headers(("x-semcache" = String, description = "hit or miss"),
                 ("x-semcache-bypass" = String, description = "why the request was not looked up, when it was not"))),
        (status = 400, description = "Not a Chat Completions request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    params: SearchQueryParams,
    JsonBody(request): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let core = state.core()?;
    let allow_sampled = core.settings(&cache_id).allow_sampled;
    let key = match chat::key(&request, allow_sampled) {
        Ok(key) => key,
        Err(Uncacheable::Invalid(detail)) => {
            return Err(ApiError::field("request", "type", detail))
        }
        Err(bypass) => {
            let mut response = search_response(Default::default(), false);
            response
                .headers_mut()
                .insert("x-semcache-bypass", HeaderValue::from_static(bypass.code()));
            return Ok(response);
        }
    };
    if key.prompt.len() > state.limits().max_prompt_bytes {
        return Err(ApiError::field(
            "messages",
            "maxLength",
            format!(
                "the last user message is over {} bytes",
                state.limits().max_prompt_bytes
            ),
        ));
    }
    let query = Query {
        prompt: key.prompt,
        attributes: scope(key.fingerprint),
        similarity_threshold: None,
        strategies: Vec::new(),
        max_results: 1,
        explain: params.0.explain,
        max_queue_wait: None,
        embedded: None,
    };
    let outcome = core.search(&cache_id, &query).await?;
    Ok(search_response(outcome, query.explain))
}

/// Stores a completion for a Chat Completions request. Errors, refusals, truncated
/// answers and requests that must not be cached are refused with 422 and not stored.
#[utoipa::path(
    post, path = "/v1/caches/{cacheId}/chat/entries", tag = "chat",
    params(("cacheId" = String, Path, description = "[A-Za-z0-9._-]{1,128}")),
    request_body = ChatEntryRequest,
    responses(
        (status = 201, description = "Stored", body = SetResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not cacheable; nothing stored", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn insert(
    State(state): State<AppState>,
    CacheId(cache_id): CacheId,
    JsonBody(body): JsonBody<ChatEntryRequest>,
) -> Result<Response, ApiError> {
    let limits = state.limits();
    let core = state.core()?;
    let key = chat::key(&body.request, core.settings(&cache_id).allow_sampled).map_err(refused)?;
    chat::check_response(&body.response).map_err(refused)?;
    let response = body.response.to_string();
    let mut checks = Checks::default();
    checks.text(
        "request.messages",
        &key.prompt,
        limits.max_prompt_bytes,
        false,
    );
    checks.text("response", &response, limits.max_response_bytes, false);
    checks.ttl(body.ttl_millis, limits);
    checks.finish()?;
    let id = core
        .insert(
            &cache_id,
            NewEntry {
                prompt: key.prompt,
                response,
                attributes: scope(key.fingerprint),
                ttl_ms: body.ttl_millis.map(|t| t as u64),
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SetResponse {
            entry_id: id.to_string(),
        }),
    )
        .into_response())
}
