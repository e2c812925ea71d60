//! The one error type of the HTTP edge, rendered as RFC 9457 problem details.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::cache::CacheError;
use crate::embed::EmbedError;
use crate::store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `attributes.tenant` or `cacheId`.
    pub field: String,
    /// The rule it broke, e.g. `required`, `type`, `maxLength`, `range`.
    pub rule: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
            message: message.into(),
        }
    }
}

/// `application/problem+json` body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("an API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("not cached: {0}")]
    Uncacheable(String),
    #[error("{method} is not allowed here")]
    MethodNotAllowed { method: String },
    #[error("{detail}")]
    Unavailable { detail: String, retry_after_s: u32 },
    #[error("the disk is full; entries cannot be stored until space is freed")]
    InsufficientStorage,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn field(field: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, rule, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Uncacheable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Validation(_) => ("validation", "Invalid request"),
            ApiError::MalformedJson(_) => ("malformed-json", "Malformed JSON"),
            ApiError::PayloadTooLarge { .. } => ("payload-too-large", "Payload too large"),
            ApiError::Unauthorized => ("unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => ("forbidden", "Forbidden"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::Uncacheable(_) => ("uncacheable", "Not cacheable"),
            ApiError::MethodNotAllowed { .. } => ("method-not-allowed", "Method not allowed"),
            ApiError::Unavailable { .. } => ("unavailable", "Service unavailable"),
            ApiError::InsufficientStorage => ("insufficient-storage", "Insufficient storage"),
            ApiError::Internal(_) => ("internal", "Internal error"),
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::NotFound => ApiError::NotFound("no such entry".into()),
            CacheError::Embed(e) => e.into(),
            CacheError::Store(e) => e.into(),
            CacheError::Index(e) => ApiError::Internal(e.to_string()),
            CacheError::NoRecentQuery => {
                ApiError::field("prompt", "required", CacheError::NoRecentQuery.to_string())
            }
        }
    }
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        match e {
            EmbedError::QueueFull => ApiError::Unavailable {
                detail: "the embedding queue is full; retry shortly or forward to the model".into(),
                retry_after_s: 1,
            },
            EmbedError::ShuttingDown => ApiError::Unavailable {
                detail: "the server is shutting down".into(),
                retry_after_s: 5,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DiskFull => ApiError::InsufficientStorage,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => tracing::warn!(error = %self, "request shed"),
            s if s.is_server_error() => tracing::error!(error = %self, "request failed"),
            _ => {}
        }
        let (slug, title) = self.kind();
        let retry_after = match &self {
            ApiError::Unavailable { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        let detail = match &self {
            ApiError::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        };
        let errors = match self {
            ApiError::Validation(errors) => errors,
            _ => Vec::new(),
        };
        let problem = Problem {
            kind: format!("https://semcache.dev/problems/{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
            errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
