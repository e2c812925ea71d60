//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: model loaded, store open, indexes loaded.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready to serve"),
    (status = 503, description = "Still starting, or start-up failed"),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.core() {
        Ok(core) => {
            let info = core.embedder().info();
            (
                StatusCode::OK,
                Json(json!({
                    "status": "ready",
                    "model": info.model,
                    "adapter": info.adapter,
                    "device": info.device,
                    "kernel": info.kernel,
                    "caches": core.cache_count(),
                })),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting", "phase": state.phase()})),
        ),
    }
}
