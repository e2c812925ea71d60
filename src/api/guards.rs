//! Prompt guards: categories of example prompts to block, and checks against them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::extract::JsonBody;
use super::problem::ApiError;
use super::routers::check_name;
use super::AppState;
use crate::routing::guard::{CategoryDef, GuardDef, Read};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutGuard {
    categories: Vec<CategoryDef>,
    threshold: Option<f32>,
    #[serde(default)]
    read: Read,
}

pub async fn put_guard(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PutGuard>,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let def = GuardDef {
        categories: body.categories,
        threshold: body.threshold,
        read: body.read,
    };
    let routing = state.routing()?;
    routing.put_guard(&name, def).await?;
    Ok(Json(routing.describe_guard(&name)?))
}

pub async fn get_guard(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.routing()?.describe_guard(&name)?))
}

pub async fn delete_guard(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.routing()?.delete_guard(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("guard `{name}` not found")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    #[default]
    LastUserMessage,
    AllUserMessages,
}

/// `{"text": …}`, or an OpenAI chat request's `messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct CheckRequest {
    text: Option<String>,
    messages: Option<Value>,
    #[serde(default)]
    scope: Scope,
    /// Answer with the matched example's text, not only its id.
    #[serde(default)]
    include_example: bool,
}

pub async fn check(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CheckRequest>,
) -> Result<Json<Value>, ApiError> {
    let limit = state.limits().max_prompt_bytes;
    let texts = match (body.text, body.messages) {
        (Some(t), None) => vec![t],
        (None, Some(m)) => {
            let users = crate::cache::chat::user_texts(&serde_json::json!({ "messages": m }));
            match body.scope {
                Scope::AllUserMessages => users,
                Scope::LastUserMessage => users.into_iter().last().into_iter().collect(),
            }
        }
        _ => {
            return Err(ApiError::field(
                "text",
                "required",
                "give `text` or `messages`",
            ))
        }
    };
    if texts.is_empty() || texts.iter().all(|t| t.trim().is_empty()) {
        return Err(ApiError::field(
            "text",
            "required",
            "nothing to check: no user message with text",
        ));
    }
    if texts.iter().map(String::len).sum::<usize>() > limit {
        return Err(ApiError::field(
            "text",
            "maxLength",
            format!("at most {limit} bytes in all"),
        ));
    }
    let verdict = state
        .routing()?
        .check(
            &name,
            texts,
            body.include_example,
            state.limits().max_guard_windows,
        )
        .await?;
    Ok(Json(serde_json::to_value(verdict).unwrap_or_default()))
}
