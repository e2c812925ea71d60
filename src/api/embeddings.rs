//! `POST /v1/embeddings`, compatible with OpenAI's embeddings API and SDKs.

use axum::extract::State;
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::JsonBody;
use super::problem::{ApiError, FieldError, Problem};
use super::AppState;

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// A string or an array of strings.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// The served model's name (`sentence-transformers/all-MiniLM-L6-v2` or `all-MiniLM-L6-v2`).
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32, what the OpenAI SDKs ask for).
    pub encoding_format: Option<String>,
    /// Must equal the model's dimensions when given.
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub object: &'static str,
    pub data: Vec<EmbeddingItem>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingItem {
    pub object: &'static str,
    /// An array of floats, or a base64 string with `encoding_format: base64`.
    #[schema(value_type = Object)]
    pub embedding: serde_json::Value,
    pub index: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

fn inputs(
    value: serde_json::Value,
    max_inputs: usize,
    max_bytes: usize,
) -> Result<Vec<String>, ApiError> {
    let texts: Vec<String> = match value {
        serde_json::Value::String(s) => vec![s],
        serde_json::Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(ApiError::field(
                    format!("input[{i}]"),
                    "type",
                    "input must be a string or an array of strings (token arrays are not supported)",
                )),
            })
            .collect::<Result<_, _>>()?,
        serde_json::Value::Array(_) => {
            return Err(ApiError::field("input", "minItems", "input must not be an empty array"))
        }
        _ => {
            return Err(ApiError::field("input", "type", "input must be a string or an array of strings"))
        }
    };
    if texts.len() > max_inputs {
        return Err(ApiError::field(
            "input",
            "maxItems",
            format!("at most {max_inputs} inputs per request"),
        ));
    }
    let errors: Vec<FieldError> = texts
        .iter()
        .enumerate()
        .filter(|(_, t)| t.len() > max_bytes)
        .map(|(i, t)| {
            FieldError::new(
                format!("input[{i}]"),
                "maxLength",
                format!("{} bytes; the limit is {max_bytes}", t.len()),
            )
        })
        .collect();
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(texts)
}

/// Embeds text with the served model.
#[utoipa::path(
    post, path = "/v1/embeddings", tag = "embeddings",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, description = "Embeddings in input order", body = EmbeddingsResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Starting or overloaded", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let limits = state.limits();
    let texts = inputs(
        body.input,
        limits.max_embedding_inputs,
        limits.max_prompt_bytes,
    )?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::field(
                "encoding_format",
                "enum",
                format!("{other:?} is not float or base64"),
            ))
        }
    };
    let core = state.core()?;
    let info = core.embedder().info();
    if let Some(model) = &body.model {
        let short = info.model.rsplit('/').next().unwrap_or(&info.model);
        if model != &info.model && model != short {
            return Err(ApiError::field(
                "model",
                "enum",
                format!("this server embeds with {}", info.model),
            ));
        }
    }
    if let Some(d) = body.dimensions {
        if d != info.dimensions as i64 {
            return Err(ApiError::field(
                "dimensions",
                "enum",
                format!("{} has {} dimensions", info.model, info.dimensions),
            ));
        }
    }
    let embedded = core.embedder().embed_many(texts).await?;
    let tokens = embedded.iter().map(|e| e.tokens).sum();
    let data = embedded
        .into_iter()
        .enumerate()
        .map(|(index, e)| EmbeddingItem {
            object: "embedding",
            embedding: if base64 {
                let bytes: Vec<u8> = e.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(e.vector)
            },
            index,
        })
        .collect();
    Ok(Json(EmbeddingsResponse {
        object: "list",
        data,
        model: info.model.clone(),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}
