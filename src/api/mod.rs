//! The HTTP edge: routes, request limits, problem+json errors, tracing, OpenAPI.
//!
//! Handlers stay thin: parse and validate, call the cache core, shape the response.

pub mod auth;
pub mod caches;
pub mod chat;
pub mod embeddings;
pub mod entries;
pub mod extract;
pub mod guards;
pub mod health;
pub mod problem;
pub mod qdrant;
pub mod routers;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;

use crate::cache::CacheService;
use crate::collections::CollectionService;
use crate::routing::RoutingService;
use extract::BodyLimit;
use problem::ApiError;

/// Request limits; each is documented in the README and settable on the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_bytes: usize,
    pub max_response_bytes: usize,
    pub max_attributes: usize,
    pub max_attribute_bytes: usize,
    pub max_results: usize,
    pub max_ttl_ms: u64,
    pub max_embedding_inputs: usize,
    /// Largest body on the Qdrant-compatible collection routes (batches of vectors as
    /// JSON are large: 256 points of 384 floats are about 1 MB).
    pub max_collection_body_bytes: usize,
    /// Longest a request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Windows of the model a guard check may embed (a long prompt is read in windows).
    pub max_guard_windows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_prompt_bytes: 32 * 1024,
            max_response_bytes: 512 * 1024,
            max_attributes: 32,
            max_attribute_bytes: 256,
            max_results: 100,
            max_ttl_ms: 365 * 24 * 3600 * 1000,
            max_embedding_inputs: 256,
            max_collection_body_bytes: 32 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_guard_windows: 64,
        }
    }
}

/// Shared by every handler. The cache core appears once start-up has loaded it.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the gateway edge (see [`AppState::core_cell`]).
    core: Arc<OnceLock<Arc<CacheService>>>,
    collections: OnceLock<Arc<CollectionService>>,
    /// Shared with the gateway edge too.
    routing: Arc<OnceLock<Arc<RoutingService>>>,
    phase: Mutex<String>,
    limits: Limits,
}

impl AppState {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                core: Arc::new(OnceLock::new()),
                collections: OnceLock::new(),
                routing: Arc::new(OnceLock::new()),
                phase: Mutex::new("starting".into()),
                limits,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The cache core, or 503 while the server is still starting.
    pub fn core(&self) -> Result<&Arc<CacheService>, ApiError> {
        self.inner.core.get().ok_or_else(|| ApiError::Unavailable {
            detail: format!("semcache is not ready yet ({})", self.phase()),
            retry_after_s: 5,
        })
    }

    /// The collections core, or 503 while the server is still starting.
    pub fn collections(&self) -> Result<&Arc<CollectionService>, ApiError> {
        self.inner
            .collections
            .get()
            .ok_or_else(|| ApiError::Unavailable {
                detail: format!("semcache is not ready yet ({})", self.phase()),
                retry_after_s: 5,
            })
    }

    /// The routing core, or 503 while the server is still starting.
    pub fn routing(&self) -> Result<&Arc<RoutingService>, ApiError> {
        self.inner
            .routing
            .get()
            .ok_or_else(|| ApiError::Unavailable {
                detail: format!("semcache is not ready yet ({})", self.phase()),
                retry_after_s: 5,
            })
    }

    /// The cell the core appears in, for the other edge (ext_proc) to read.
    pub fn core_cell(&self) -> Arc<OnceLock<Arc<CacheService>>> {
        self.inner.core.clone()
    }

    pub fn routing_cell(&self) -> Arc<OnceLock<Arc<RoutingService>>> {
        self.inner.routing.clone()
    }

    pub fn set_core(
        &self,
        core: Arc<CacheService>,
        collections: Arc<CollectionService>,
        routing: Arc<RoutingService>,
    ) {
        let _ = self.inner.collections.set(collections);
        let _ = self.inner.routing.set(routing);
        let _ = self.inner.core.set(core);
        self.set_phase("ready");
    }

    pub fn phase(&self) -> String {
        self.inner
            .phase
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    pub fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.inner.phase.lock() {
            *p = phase.to_string();
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "semcache",
        description = "Semantic cache for AI gateways. Cache routes are wire-compatible with Redis LangCache."
    ),
    paths(
        entries::search,
        entries::insert,
        entries::delete_matching,
        entries::delete_one,
        entries::flush,
        chat::search,
        chat::insert,
        caches::get_cache,
        caches::put_cache,
        caches::feedback,
        embeddings::create,
        health::healthz,
        health::readyz,
        crate::admin::stats,
        crate::admin::caches,
        crate::admin::evict,
        crate::admin::compact,
        crate::admin::prometheus,
    ),
    components(schemas(problem::Problem, problem::FieldError))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub fn router(state: AppState, keys: auth::KeyRing) -> Router {
    let body_limit = state.limits().max_body_bytes;
    let timeout = state.limits().request_timeout;
    Router::new()
        .route("/v1/caches/{cacheId}/entries/search", post(entries::search))
        .route(
            "/v1/caches/{cacheId}/entries",
            post(entries::insert).delete(entries::delete_matching),
        )
        .route(
            "/v1/caches/{cacheId}/entries/{entryId}",
            delete(entries::delete_one),
        )
        .route("/v1/caches/{cacheId}/flush", post(entries::flush))
        .route("/v1/caches/{cacheId}/chat/search", post(chat::search))
        .route("/v1/caches/{cacheId}/chat/entries", post(chat::insert))
        .route(
            "/v1/caches/{cacheId}",
            get(caches::get_cache).put(caches::put_cache),
        )
        .route(
            "/v1/caches/{cacheId}/entries/{entryId}/feedback",
            post(caches::feedback),
        )
        .route("/v1/embeddings", post(embeddings::create))
        .route(
            "/v1/routers/{name}",
            get(routers::get_router)
                .put(routers::put_router)
                .delete(routers::delete_router),
        )
        .route("/v1/routers/{name}/route", post(routers::route))
        .route("/v1/routers/{name}/fit", post(routers::fit))
        .route(
            "/v1/guards/{name}",
            get(guards::get_guard)
                .put(guards::put_guard)
                .delete(guards::delete_guard),
        )
        .route("/v1/guards/{name}/check", post(guards::check))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(crate::admin::prometheus))
        .route("/admin/stats", get(crate::admin::stats))
        .route("/admin/caches", get(crate::admin::caches))
        .route("/admin/caches/{cacheId}/evict", post(crate::admin::evict))
        .route("/admin/compact", post(crate::admin::compact))
        .merge(qdrant::routes(state.limits().max_collection_body_bytes))
        .route_layer(middleware::from_fn_with_state(keys, auth::authorize))
        .route_layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                match tokio::time::timeout(timeout, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::Unavailable {
                        detail: format!("the request took longer than {} ms", timeout.as_millis()),
                        retry_after_s: 1,
                    }
                    .into_response(),
                }
            },
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(
            move |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(BodyLimit(body_limit));
                next.run(req).await
            },
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let route = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "unmatched".into());
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        route = %route,
                        cache = cache_id_of(req.uri().path()),
                        status = tracing::field::Empty,
                        latency_ms = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, span: &Span| {
                    span.record("status", res.status().as_u16());
                    let route = res
                        .extensions()
                        .get::<RouteLabel>()
                        .map(|r| r.0.clone())
                        .unwrap_or_else(|| "unmatched".into());
                    crate::metrics::metrics()
                        .http_requests
                        .with_label_values(&[&route, res.status().as_str()])
                        .inc();
                    span.record("latency_ms", latency.as_secs_f64() * 1000.0);
                    tracing::info!("response");
                })
                .on_failure(()),
        )
        .with_state(state)
}

#[derive(Clone)]
struct RouteLabel(String);

/// The cache id in `/v1/caches/{id}/…`, for log fields.
fn cache_id_of(path: &str) -> &str {
    path.strip_prefix("/v1/caches/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| extract::valid_cache_id(id))
        .unwrap_or("")
}

async fn not_found(req: Request) -> Response {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
    }
    .into_response()
}
