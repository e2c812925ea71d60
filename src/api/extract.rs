//! Request extractors whose rejections are problem+json with the offending field.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::problem::{ApiError, FieldError};

/// Like `axum::Json`, but a bad body says which field is wrong and how.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The body limit in force, recorded for error messages.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::MalformedJson(
            "the request body is empty; a JSON object is required".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::MalformedJson(inner.to_string())
            }
            Category::Data => {
                let message = inner.to_string();
                let (field, rule) = if let Some(name) = missing_field(&message) {
                    (join_path(&path, &name), "required")
                } else {
                    (path, "type")
                };
                ApiError::Validation(vec![FieldError::new(field, rule, strip_position(&message))])
            }
        }
    })
}

fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

fn join_path(path: &str, name: &str) -> String {
    if path.is_empty() || path == "." {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// `{cacheId}` from the path, checked against `[A-Za-z0-9._-]{1,128}`.
pub struct CacheId(pub String);

pub use crate::cache::valid_cache_id;

impl<S: Send + Sync> FromRequestParts<S> for CacheId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::field("cacheId", "pattern", e.body_text()))?;
        let raw = params
            .iter()
            .find(|(name, _)| *name == "cacheId")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| ApiError::field("cacheId", "required", "the path has no cache id"))?;
        if !valid_cache_id(&raw) {
            return Err(ApiError::field(
                "cacheId",
                "pattern",
                "a cache id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
        Ok(CacheId(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        prompt: String,
        attributes: Option<std::collections::BTreeMap<String, String>>,
    }

    #[test]
    fn errors_name_the_field() {
        match parse_json::<Body>(br#"{"attributes": {}}"#) {
            Err(ApiError::Validation(e)) => assert_eq!(
                (e[0].field.as_str(), e[0].rule.as_str()),
                ("prompt", "required")
            ),
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"prompt": "x", "attributes": {"a": 1}}"#) {
            Err(ApiError::Validation(e)) => assert_eq!(e[0].field, "attributes.a"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_json::<Body>(b"{nope"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b""),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[test]
    fn cache_ids_follow_the_pattern() {
        assert!(valid_cache_id("tenant-1.prod_v2"));
        assert!(!valid_cache_id(""));
        assert!(!valid_cache_id("a/b"));
        assert!(!valid_cache_id("naïve"));
        assert!(!valid_cache_id(&"x".repeat(129)));
    }
}
