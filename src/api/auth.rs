//! The HTTP edge's key check: which role each route needs, and the middleware that
//! enforces it with the server's [`KeyRing`].

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::ApiError;
pub use crate::auth::{KeyRing, Role};

/// What a route needs: a role, and whether it touches one cache or all of them.
fn requirement(method: &Method, route: &str) -> Option<(Role, bool)> {
    let per_cache =
        route.starts_with("/v1/caches/{cacheId}") || route.starts_with("/admin/caches/{cacheId}");
    let role = match route {
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => return None,
        "/v1/caches/{cacheId}/entries/search"
        | "/v1/caches/{cacheId}/chat/search"
        | "/v1/embeddings" => Role::Reader,
        "/v1/caches/{cacheId}" if method == Method::GET => Role::Reader,
        "/v1/caches/{cacheId}" => Role::Admin,
        r if r.starts_with("/admin") => Role::Admin,
        _ => Role::Writer,
    };
    Some((role, per_cache))
}

/// Middleware: 401 without a known key, 403 outside the key's role or caches.
pub async fn authorize(State(ring): State<KeyRing>, req: Request, next: Next) -> Response {
    if !ring.enabled() {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some(route) = route else {
        // Unknown routes answer 404 whoever asks.
        return next.run(req).await;
    };
    let Some((needed, per_cache)) = requirement(req.method(), &route) else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer);
    let Some(key) = presented.and_then(|p| ring.find(p)) else {
        return ApiError::Unauthorized.into_response();
    };
    if key.role < needed {
        return ApiError::Forbidden(format!("this key may not use {} {route}", req.method()))
            .into_response();
    }
    if key.scoped() {
        let cache = if per_cache {
            req.uri().path().split('/').nth(3)
        } else {
            None
        };
        let permitted = match cache {
            Some(c) => key.permits_cache(c),
            // Routes over every cache (global admin, embeddings are fine) need an unscoped key.
            None => route == "/v1/embeddings",
        };
        if !permitted {
            return ApiError::Forbidden("this key may not touch that cache".into()).into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_right_role() {
        assert_eq!(
            requirement(&Method::POST, "/v1/caches/{cacheId}/entries/search"),
            Some((Role::Reader, true))
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/caches/{cacheId}/entries"),
            Some((Role::Writer, true))
        );
        assert_eq!(
            requirement(&Method::PUT, "/v1/caches/{cacheId}"),
            Some((Role::Admin, true))
        );
        assert_eq!(
            requirement(&Method::GET, "/admin/stats"),
            Some((Role::Admin, false))
        );
        assert_eq!(requirement(&Method::GET, "/healthz"), None);
    }
}
