//! Semantic routers: define routes by example utterances, route a prompt, fit thresholds.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::extract::JsonBody;
use super::problem::ApiError;
use super::AppState;
use crate::routing::{RouteDef, RouterDef, RoutingError};

impl From<RoutingError> for ApiError {
    fn from(e: RoutingError) -> Self {
        match e {
            RoutingError::NotFound(_) | RoutingError::GuardNotFound(_) => {
                ApiError::NotFound(e.to_string())
            }
            RoutingError::Invalid(message) => ApiError::field("body", "invalid", message),
            RoutingError::TooLong(_) => ApiError::field("messages", "maxLength", e.to_string()),
            RoutingError::Embed(e) => e.into(),
            RoutingError::Store(e) => e.into(),
        }
    }
}

pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    if crate::cache::valid_cache_id(name) {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            "pattern",
            "router and guard names are 1-128 characters from A-Z a-z 0-9 . _ -",
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutRouter {
    routes: Vec<RouteDef>,
    threshold: Option<f32>,
}

pub async fn put_router(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PutRouter>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let def = RouterDef {
        routes: body.routes,
        threshold: body.threshold,
    };
    state.routing()?.put(&name, def).await?;
    Ok((StatusCode::OK, Json(state.routing()?.describe(&name)?)).into_response())
}

pub async fn get_router(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.routing()?.describe(&name)?))
}

pub async fn delete_router(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.routing()?.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("router `{name}` not found")))
    }
}

/// `{"text": …}`, or an OpenAI chat request's `messages` (routed on the last user one).
#[derive(Debug, Deserialize)]
pub struct RouteRequest {
    text: Option<String>,
    messages: Option<Value>,
}

fn prompt_of(
    text: Option<String>,
    messages: Option<Value>,
    limit: usize,
) -> Result<String, ApiError> {
    let prompt = match (text, messages) {
        (Some(t), None) => t,
        (None, Some(m)) => {
            crate::cache::chat::last_user_message(&serde_json::json!({"messages": m}))
                .map_err(|e| ApiError::field("messages", "invalid", e.to_string()))?
        }
        _ => {
            return Err(ApiError::field(
                "text",
                "required",
                "give `text` or `messages`",
            ))
        }
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::field("text", "required", "the text is blank"));
    }
    if prompt.len() > limit {
        return Err(ApiError::field(
            "text",
            "maxLength",
            format!("at most {limit} bytes"),
        ));
    }
    Ok(prompt)
}

pub async fn route(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RouteRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = prompt_of(body.text, body.messages, state.limits().max_prompt_bytes)?;
    let routed = state.routing()?.route(&name, prompt).await?;
    Ok(Json(serde_json::to_value(routed).unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct FitRequest {
    examples: Vec<FitExample>,
    /// Out-of-scope recall to reach on the examples (default 0.7); the fit then
    /// maximises in-scope accuracy.
    min_out_of_scope_recall: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitExample {
    text: String,
    /// The route the text belongs to; `null` for out of scope.
    route: Option<String>,
}

pub async fn fit(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<FitRequest>,
) -> Result<Json<Value>, ApiError> {
    let examples = body
        .examples
        .into_iter()
        .map(|e| (e.text, e.route))
        .collect();
    let report = state
        .routing()?
        .fit(&name, examples, body.min_out_of_scope_recall)
        .await?;
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
}
