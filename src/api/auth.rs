//! The HTTP edge's key check: which role each route needs, and the middleware that
//! enforces it with the server's [`KeyRing`].

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::ApiError;
use super::qdrant::QdrantError;
pub use crate::auth::{KeyRing, Role};

/// What a Qdrant-compatible collection route needs (`None`: not one of them).
fn collection_requirement(method: &Method, route: &str) -> Option<Role> {
    let reads = [
        "/collections/{name}/points/scroll",
        "/collections/{name}/points/count",
        "/collections/{name}/points/query",
        "/collections/{name}/points/query/batch",
        "/collections/{name}/points/search",
        "/collections/{name}/points/search/batch",
        "/collections/{name}/points/{id}",
        "/collections/{name}/exists",
    ];
    Some(match route {
        "/" | "/collections" => Role::Reader,
        r if reads.contains(&r) => Role::Reader,
        "/collections/{name}"
        | "/collections/{name}/index"
        | "/collections/{name}/index/{field}" => {
            if method == Method::GET {
                Role::Reader
            } else {
                Role::Admin
            }
        }
        // POST retrieves points by id; PUT upserts.
        "/collections/{name}/points" if method == Method::POST => Role::Reader,
        r if r.starts_with("/collections/{name}") => Role::Writer,
        _ => return None,
    })
}

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
        "/v1/routers/{name}/route" => Role::Reader,
        "/v1/routers/{name}" if method == Method::GET => Role::Reader,
        r if r.starts_with("/v1/routers/") => Role::Admin,
        "/v1/guards/{name}/check" => Role::Reader,
        "/v1/guards/{name}" if method == Method::GET => Role::Reader,
        r if r.starts_with("/v1/guards/") => Role::Admin,
        "/v1/caches/{cacheId}" => Role::Admin,
        r if r.starts_with("/admin") => Role::Admin,
        _ => Role::Writer,
    };
    Some((role, per_cache))
}

/// Middleware: 401 without a known key, 403 outside the key's role or caches.
pub async fn authorize(State(ring): State<KeyRing>, mut req: Request, next: Next) -> Response {
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
    let qdrant = super::qdrant::is_qdrant_route(&route);
    let deny = |status: StatusCode, message: &str| -> Response {
        if qdrant {
            QdrantError::new(status, message).into_response()
        } else if status == StatusCode::UNAUTHORIZED {
            ApiError::Unauthorized.into_response()
        } else {
            ApiError::Forbidden(message.to_string()).into_response()
        }
    };
    let (needed, per_cache) = match collection_requirement(req.method(), &route) {
        Some(role) => (role, false),
        None => match requirement(req.method(), &route) {
            Some(needed) => needed,
            None => return next.run(req).await,
        },
    };
    // `Authorization: Bearer <key>`, or `api-key: <key>` as Qdrant's clients send it.
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .or_else(|| req.headers().get("api-key").and_then(|v| v.to_str().ok()));
    let Some(key) = presented.and_then(|p| ring.find(p)) else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "an API key is required: send `Authorization: Bearer <key>` or `api-key: <key>`",
        );
    };
    if key.role < needed {
        return deny(
            StatusCode::FORBIDDEN,
            &format!("this key may not use {} {route}", req.method()),
        );
    }
    if qdrant {
        let collection = route
            .starts_with("/collections/{name}")
            .then(|| req.uri().path().split('/').nth(2))
            .flatten();
        if let Some(name) = collection {
            let name = percent_decoded(name);
            if !key.permits_collection(&name) {
                return deny(
                    StatusCode::FORBIDDEN,
                    "this key may not touch that collection",
                );
            }
        }
        // `GET /collections` lists only what the key may touch.
        req.extensions_mut().insert(key);
        return next.run(req).await;
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

/// A path segment with `%XX` escapes decoded (collection names in keys are plain).
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
