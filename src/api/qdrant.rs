//! Qdrant's REST API, the subset applications use, at Qdrant's paths: so the official
//! `qdrant-client` (and LangChain/LlamaIndex code on it) works against semcache
//! unchanged. Responses use Qdrant's envelope (`{"result", "status": "ok", "time"}`),
//! errors Qdrant's (`{"status": {"error": …}, "time"}`).
//!
//! Bodies are read as JSON values and picked apart by hand: Qdrant's shapes are unions
//! (a vector is a list, a document or a point id; `with_payload` a bool, a list or an
//! include/exclude object) and clients send fields we ignore, so this stays lenient on
//! what may be absent and strict, with a message, on what is wrong.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::AppState;
use crate::auth::Key;
use crate::collections::filter::{parse_point_id, point_id_json, Condition};
use crate::collections::{
    CollectionError, CollectionInfo, CollectionService, Filter, FoundPoint, NewPoint, PayloadOp,
    SearchSpec, Selector, VectorInput,
};
use crate::embed::EmbedError;
use crate::store::{PointId, StoreError};

/// The Qdrant REST API version whose shapes these routes follow (what `GET /` reports,
/// and what `qdrant-client`'s compatibility check compares with its own).
pub const QDRANT_API_VERSION: &str = "1.20.0";

/// The edge's one error type on these routes.
#[derive(Debug)]
pub struct QdrantError {
    status: StatusCode,
    message: String,
}

impl QdrantError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<CollectionError> for QdrantError {
    fn from(e: CollectionError) -> Self {
        let status = match &e {
            CollectionError::NotFound(_) => StatusCode::NOT_FOUND,
            CollectionError::Exists(_) => StatusCode::CONFLICT,
            CollectionError::Invalid(_) => StatusCode::BAD_REQUEST,
            CollectionError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            CollectionError::Embed(EmbedError::QueueFull | EmbedError::ShuttingDown) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            CollectionError::Store(StoreError::DiskFull) => StatusCode::INSUFFICIENT_STORAGE,
            CollectionError::Index(crate::index::IndexError::Dimension { .. }) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<super::problem::ApiError> for QdrantError {
    fn from(e: super::problem::ApiError) -> Self {
        Self::new(e.status(), e.to_string())
    }
}

impl IntoResponse for QdrantError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(error = %self.message, "collection request failed");
        }
        let body = json!({"status": {"error": self.message}, "time": 0.0});
        (self.status, axum::Json(body)).into_response()
    }
}

type Answer = Result<Response, QdrantError>;

/// Qdrant's success envelope.
fn ok(result: Value, started: Instant) -> Answer {
    Ok(axum::Json(json!({
        "result": result,
        "status": "ok",
        "time": started.elapsed().as_secs_f64(),
    }))
    .into_response())
}

fn core(state: &AppState) -> Result<&std::sync::Arc<CollectionService>, QdrantError> {
    Ok(state.collections()?)
}

fn parse_body(bytes: &Bytes) -> Result<Value, QdrantError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| QdrantError::bad(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(QdrantError::bad("the request body must be a JSON object"));
    }
    Ok(value)
}

/// A field that is absent or `null` is `None`.
fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn usize_field(body: &Value, name: &str) -> Result<Option<usize>, QdrantError> {
    field(body, name)
        .map(|v| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| QdrantError::bad(format!("`{name}` must be a non-negative integer")))
        })
        .transpose()
}

fn bool_field(body: &Value, name: &str) -> Result<Option<bool>, QdrantError> {
    field(body, name)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| QdrantError::bad(format!("`{name}` must be true or false")))
        })
        .transpose()
}

fn filter_field(body: &Value, name: &str) -> Result<Option<Filter>, QdrantError> {
    field(body, name)
        .map(|f| Filter::parse(f).map_err(|e| QdrantError::bad(format!("bad `{name}`: {e}"))))
        .transpose()
}

fn ids_field(value: &Value, name: &str) -> Result<Vec<PointId>, QdrantError> {
    value
        .as_array()
        .ok_or_else(|| QdrantError::bad(format!("`{name}` must be a list of point ids")))?
        .iter()
        .map(|id| parse_point_id(id).map_err(QdrantError::bad))
        .collect()
}

fn refuse_unsupported(body: &Value, names: &[&str]) -> Result<(), QdrantError> {
    for name in names {
        if field(body, name).is_some() {
            return Err(QdrantError::bad(format!(
                "`{name}` is not supported by semcache"
            )));
        }
    }
    Ok(())
}

/// Which payload keys a response carries.
enum PayloadSelect {
    None,
    All,
    Include(Vec<String>),
    Exclude(Vec<String>),
}

fn strings(value: &Value, name: &str) -> Result<Vec<String>, QdrantError> {
    value
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| QdrantError::bad(format!("`{name}` must be a list of strings")))
}

fn payload_select(body: &Value, default: bool) -> Result<PayloadSelect, QdrantError> {
    Ok(match field(body, "with_payload") {
        None => {
            if default {
                PayloadSelect::All
            } else {
                PayloadSelect::None
            }
        }
        Some(Value::Bool(true)) => PayloadSelect::All,
        Some(Value::Bool(false)) => PayloadSelect::None,
        Some(list @ Value::Array(_)) => PayloadSelect::Include(strings(list, "with_payload")?),
        Some(Value::Object(map)) => match (map.get("include"), map.get("exclude")) {
            (Some(i), _) => PayloadSelect::Include(strings(i, "with_payload.include")?),
            (_, Some(e)) => PayloadSelect::Exclude(strings(e, "with_payload.exclude")?),
            _ => {
                return Err(QdrantError::bad(
                    "`with_payload` object needs include or exclude",
                ))
            }
        },
        Some(_) => {
            return Err(QdrantError::bad(
                "`with_payload` must be a bool, a list or an object",
            ))
        }
    })
}

fn with_vector(body: &Value) -> Result<bool, QdrantError> {
    Ok(
        match field(body, "with_vector").or_else(|| field(body, "with_vectors")) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(Value::Array(names)) => !names.is_empty(),
            Some(_) => return Err(QdrantError::bad("`with_vector` must be a bool or a list")),
        },
    )
}

/// A point as Qdrant returns it (a `Record`, or a `ScoredPoint` with a score).
fn point_json(
    core: &CollectionService,
    name: &str,
    point: &FoundPoint,
    payload: &PayloadSelect,
    vector: bool,
) -> Result<Value, QdrantError> {
    let payload = match payload {
        PayloadSelect::None => Value::Null,
        PayloadSelect::All => Value::Object((*point.payload).clone()),
        PayloadSelect::Include(keys) => Value::Object(
            point
                .payload
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        PayloadSelect::Exclude(keys) => Value::Object(
            point
                .payload
                .iter()
                .filter(|(k, _)| !keys.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    };
    let vector = if vector {
        core.vector(name, &point.id)?
            .map(|v| json!(v))
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let mut out = json!({
        "id": point_id_json(&point.id),
        "payload": payload,
        "vector": vector,
        "shard_key": null,
        "order_value": null,
    });
    if let Some(score) = point.score {
        out["score"] = json!(score);
        out["version"] = json!(0);
    }
    Ok(out)
}

/// A vector as Qdrant accepts it in place of a list of floats: a `Document`.
fn parse_vector(value: &Value, what: &str) -> Result<VectorInput, QdrantError> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .map(VectorInput::Dense)
            .ok_or_else(|| QdrantError::bad(format!("`{what}` must be a list of numbers"))),
        Value::Object(map) if map.contains_key("text") => {
            let text = map
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| QdrantError::bad(format!("`{what}.text` must be a string")))?;
            let model = map
                .get("model")
                .and_then(Value::as_str)
                .ok_or_else(|| QdrantError::bad(format!("`{what}.model` must name the model")))?;
            Ok(VectorInput::Document {
                text: text.to_string(),
                model: model.to_string(),
            })
        }
        Value::Object(map) if map.len() == 1 && map.contains_key("") => parse_vector(&map[""], what),
        Value::Object(_) => Err(QdrantError::bad(format!(
            "`{what}`: named, sparse and multi-vectors are not supported; send one dense vector or a Document"
        ))),
        _ => Err(QdrantError::bad(format!(
            "`{what}` must be a list of numbers or a Document"
        ))),
    }
}

fn wait_flag(query: &WaitQuery) -> bool {
    query.wait.unwrap_or(false)
}

#[derive(Debug, Deserialize)]
pub struct WaitQuery {
    wait: Option<bool>,
}

fn update_result(wait: bool, started: Instant) -> Answer {
    ok(
        json!({"operation_id": 0, "status": if wait { "completed" } else { "acknowledged" }}),
        started,
    )
}

fn forbidden_collection(key: &Option<Extension<Key>>, name: &str) -> bool {
    key.as_ref().is_some_and(|k| !k.permits_collection(name))
}

pub fn routes(max_body_bytes: usize) -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/collections", get(list))
        .route(
            "/collections/{name}",
            get(info).put(create).delete(drop_collection),
        )
        .route("/collections/{name}/exists", get(exists))
        .route("/collections/{name}/index", put(create_index))
        .route("/collections/{name}/index/{field}", delete(delete_index))
        .route("/collections/{name}/points", put(upsert).post(retrieve))
        .route("/collections/{name}/points/{id}", get(get_point))
        .route("/collections/{name}/points/delete", post(delete_points))
        .route(
            "/collections/{name}/points/payload",
            post(set_payload).put(overwrite_payload),
        )
        .route(
            "/collections/{name}/points/payload/delete",
            post(delete_payload),
        )
        .route(
            "/collections/{name}/points/payload/clear",
            post(clear_payload),
        )
        .route("/collections/{name}/points/scroll", post(scroll))
        .route("/collections/{name}/points/count", post(count))
        .route("/collections/{name}/points/query", post(query))
        .route("/collections/{name}/points/query/batch", post(query_batch))
        .route("/collections/{name}/points/search", post(search))
        .route(
            "/collections/{name}/points/search/batch",
            post(search_batch),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Whether a matched route is one of these (its errors take Qdrant's shape).
pub fn is_qdrant_route(route: &str) -> bool {
    route == "/" || route == "/collections" || route.starts_with("/collections/")
}

async fn root() -> Answer {
    Ok(axum::Json(json!({
        "title": "semcache (Qdrant-compatible REST subset)",
        "version": QDRANT_API_VERSION,
        "semcache_version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}

async fn list(State(state): State<AppState>, key: Option<Extension<Key>>) -> Answer {
    let started = Instant::now();
    let names: Vec<Value> = core(&state)?
        .names()
        .into_iter()
        .filter(|n| !forbidden_collection(&key, n))
        .map(|name| json!({"name": name}))
        .collect();
    ok(json!({"collections": names}), started)
}

async fn exists(State(state): State<AppState>, Path(name): Path<String>) -> Answer {
    let started = Instant::now();
    ok(json!({"exists": core(&state)?.exists(&name)}), started)
}

fn info_json(info: &CollectionInfo) -> Value {
    let schema: Map<String, Value> = info
        .indexed_fields
        .iter()
        .map(|(field, kind, points)| {
            (
                field.clone(),
                json!({"data_type": kind, "params": null, "points": points}),
            )
        })
        .collect();
    json!({
        "status": "green",
        "optimizer_status": "ok",
        "indexed_vectors_count": info.indexed,
        "points_count": info.points,
        "segments_count": 1,
        "config": {
            "params": {
                "vectors": {"size": info.record.size, "distance": info.record.distance},
                "shard_number": 1,
                "replication_factor": 1,
                "write_consistency_factor": 1,
                "on_disk_payload": false,
            },
            "hnsw_config": {
                "m": 16,
                "ef_construct": 200,
                "full_scan_threshold": 1000,
                "max_indexing_threads": 0,
                "on_disk": false,
            },
            "optimizer_config": {
                "deleted_threshold": 0.5,
                "vacuum_min_vector_number": 1024,
                "default_segment_number": 1,
                "max_segment_size": null,
                "memmap_threshold": null,
                "indexing_threshold": 0,
                "flush_interval_sec": 0,
                "max_optimization_threads": 1,
            },
            "wal_config": {"wal_capacity_mb": 0, "wal_segments_ahead": 0},
            "quantization_config": null,
        },
        "payload_schema": schema,
    })
}

async fn info(State(state): State<AppState>, Path(name): Path<String>) -> Answer {
    let started = Instant::now();
    let info = core(&state)?.info(&name)?;
    ok(info_json(&info), started)
}

async fn create(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    refuse_unsupported(&body, &["sparse_vectors", "init_from", "sharding_method"])?;
    let vectors = field(&body, "vectors").ok_or_else(|| {
        QdrantError::bad("`vectors` is required: {\"size\": N, \"distance\": \"Cosine\"}")
    })?;
    let size = vectors.get("size").and_then(Value::as_u64);
    let distance = vectors.get("distance").and_then(Value::as_str);
    let (Some(size), Some(distance)) = (size, distance) else {
        return Err(QdrantError::bad(
            "`vectors` must be {\"size\": N, \"distance\": \"Cosine\"}; named vectors are not supported",
        ));
    };
    if vectors
        .get("multivector_config")
        .is_some_and(|v| !v.is_null())
    {
        return Err(QdrantError::bad("multi-vectors are not supported"));
    }
    core(&state)?.create(&name, size as usize, distance).await?;
    ok(json!(true), started)
}

async fn drop_collection(State(state): State<AppState>, Path(name): Path<String>) -> Answer {
    let started = Instant::now();
    ok(json!(core(&state)?.delete(&name).await?), started)
}

async fn create_index(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let field_name = field(&body, "field_name")
        .and_then(Value::as_str)
        .ok_or_else(|| QdrantError::bad("`field_name` is required"))?;
    let schema = match field(&body, "field_schema") {
        None => "keyword".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| QdrantError::bad("`field_schema.type` is required"))?
            .to_string(),
        Some(_) => {
            return Err(QdrantError::bad(
                "`field_schema` must be a string or an object",
            ))
        }
    };
    core(&state)?
        .create_field_index(&name, field_name, &schema)
        .await?;
    update_result(wait_flag(&wait), started)
}

async fn delete_index(
    State(state): State<AppState>,
    Path((name, field_name)): Path<(String, String)>,
    Query(wait): Query<WaitQuery>,
) -> Answer {
    let started = Instant::now();
    core(&state)?.delete_field_index(&name, &field_name).await?;
    update_result(wait_flag(&wait), started)
}

fn payload_object(value: Option<&Value>, what: &str) -> Result<Map<String, Value>, QdrantError> {
    match value {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(_) => Err(QdrantError::bad(format!("`{what}` must be a JSON object"))),
    }
}

fn parse_points(body: &Value) -> Result<Vec<NewPoint>, QdrantError> {
    if let Some(points) = field(body, "points") {
        let points = points
            .as_array()
            .ok_or_else(|| QdrantError::bad("`points` must be a list"))?;
        return points
            .iter()
            .enumerate()
            .map(|(n, p)| {
                let id = p
                    .get("id")
                    .ok_or_else(|| QdrantError::bad(format!("points[{n}] has no `id`")))?;
                let vector = field(p, "vector")
                    .ok_or_else(|| QdrantError::bad(format!("points[{n}] has no `vector`")))?;
                Ok(NewPoint {
                    id: parse_point_id(id).map_err(QdrantError::bad)?,
                    vector: parse_vector(vector, &format!("points[{n}].vector"))?,
                    payload: payload_object(field(p, "payload"), &format!("points[{n}].payload"))?,
                })
            })
            .collect();
    }
    if let Some(batch) = field(body, "batch") {
        let ids = ids_field(
            field(batch, "ids").ok_or_else(|| QdrantError::bad("`batch.ids` is required"))?,
            "batch.ids",
        )?;
        let vectors = field(batch, "vectors")
            .and_then(Value::as_array)
            .ok_or_else(|| QdrantError::bad("`batch.vectors` must be a list"))?;
        if vectors.len() != ids.len() {
            return Err(QdrantError::bad(format!(
                "`batch` has {} ids and {} vectors",
                ids.len(),
                vectors.len()
            )));
        }
        let payloads = match field(batch, "payloads") {
            None => vec![Value::Null; ids.len()],
            Some(Value::Array(p)) if p.len() == ids.len() => p.clone(),
            Some(_) => {
                return Err(QdrantError::bad(
                    "`batch.payloads` must be a list as long as `batch.ids`",
                ))
            }
        };
        return ids
            .into_iter()
            .zip(vectors)
            .zip(payloads)
            .enumerate()
            .map(|(n, ((id, vector), payload))| {
                Ok(NewPoint {
                    id,
                    vector: parse_vector(vector, &format!("batch.vectors[{n}]"))?,
                    payload: payload_object(
                        Some(&payload).filter(|p| !p.is_null()),
                        &format!("batch.payloads[{n}]"),
                    )?,
                })
            })
            .collect();
    }
    Err(QdrantError::bad("give `points` or `batch`"))
}

async fn upsert(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    refuse_unsupported(&body, &["update_filter"])?;
    let points = parse_points(&body)?;
    let wait = wait_flag(&wait);
    core(&state)?.upsert(&name, points, wait).await?;
    update_result(wait, started)
}

async fn retrieve(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let ids = ids_field(
        field(&body, "ids").ok_or_else(|| QdrantError::bad("`ids` is required"))?,
        "ids",
    )?;
    let core = core(&state)?;
    let payload = payload_select(&body, true)?;
    let vector = with_vector(&body)?;
    let points = core.retrieve(&name, &ids)?;
    let out = points
        .iter()
        .map(|p| point_json(core, &name, p, &payload, vector))
        .collect::<Result<Vec<_>, _>>()?;
    ok(Value::Array(out), started)
}

async fn get_point(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Answer {
    let started = Instant::now();
    let id = match id.parse::<u64>() {
        Ok(n) => PointId::Num(n),
        Err(_) => parse_point_id(&Value::String(id)).map_err(QdrantError::bad)?,
    };
    let core = core(&state)?;
    let found = core.retrieve(&name, &[id])?;
    let point = found.first().ok_or_else(|| {
        QdrantError::new(
            StatusCode::NOT_FOUND,
            format!("no point with id {:?}", point_id_json(&id)),
        )
    })?;
    ok(
        point_json(core, &name, point, &PayloadSelect::All, true)?,
        started,
    )
}

/// `points` (ids, or a `{"filter": …}` selector) or `filter`, as Qdrant takes them.
fn selector(body: &Value) -> Result<Selector, QdrantError> {
    if let Some(points) = field(body, "points") {
        if let Some(f) = points.get("filter") {
            return Filter::parse(f)
                .map(Selector::Filter)
                .map_err(|e| QdrantError::bad(format!("bad `points.filter`: {e}")));
        }
        if let Some(ids) = points.get("points") {
            return ids_field(ids, "points.points").map(Selector::Ids);
        }
        return ids_field(points, "points").map(Selector::Ids);
    }
    if let Some(filter) = filter_field(body, "filter")? {
        return Ok(Selector::Filter(filter));
    }
    Err(QdrantError::bad("give `points` (ids) or `filter`"))
}

async fn delete_points(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let wait = wait_flag(&wait);
    core(&state)?
        .delete_points(&name, selector(&body)?, wait)
        .await?;
    update_result(wait, started)
}

async fn change_payload(
    state: AppState,
    name: String,
    wait: WaitQuery,
    body: Bytes,
    op: PayloadOp,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    refuse_unsupported(&body, &["key"])?;
    let payload = payload_object(field(&body, "payload"), "payload")?;
    let wait = wait_flag(&wait);
    core(&state)?
        .update_payload(&name, selector(&body)?, op, payload, Vec::new(), wait)
        .await?;
    update_result(wait, started)
}

async fn set_payload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    change_payload(state, name, wait, body, PayloadOp::Set).await
}

async fn overwrite_payload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    change_payload(state, name, wait, body, PayloadOp::Overwrite).await
}

async fn delete_payload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let keys = strings(
        field(&body, "keys").ok_or_else(|| QdrantError::bad("`keys` is required"))?,
        "keys",
    )?;
    let wait = wait_flag(&wait);
    core(&state)?
        .update_payload(
            &name,
            selector(&body)?,
            PayloadOp::Set,
            Map::new(),
            keys,
            wait,
        )
        .await?;
    update_result(wait, started)
}

async fn clear_payload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(wait): Query<WaitQuery>,
    body: Bytes,
) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let wait = wait_flag(&wait);
    core(&state)?
        .update_payload(
            &name,
            selector(&body)?,
            PayloadOp::Overwrite,
            Map::new(),
            Vec::new(),
            wait,
        )
        .await?;
    update_result(wait, started)
}

async fn scroll(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    refuse_unsupported(&body, &["order_by"])?;
    let offset = field(&body, "offset")
        .map(|v| parse_point_id(v).map_err(QdrantError::bad))
        .transpose()?;
    let limit = usize_field(&body, "limit")?.unwrap_or(10);
    let filter = filter_field(&body, "filter")?;
    let payload = payload_select(&body, true)?;
    let vector = with_vector(&body)?;
    let core = core(&state)?;
    let (points, next) = core.scroll(&name, offset, limit, filter.as_ref())?;
    let points = points
        .iter()
        .map(|p| point_json(core, &name, p, &payload, vector))
        .collect::<Result<Vec<_>, _>>()?;
    ok(
        json!({"points": points, "next_page_offset": next.map(|id| point_id_json(&id))}),
        started,
    )
}

async fn count(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let filter = filter_field(&body, "filter")?;
    let n = core(&state)?.count(&name, filter.as_ref())?;
    ok(json!({"count": n}), started)
}

/// Search parameters shared by `query` and `search`.
fn search_spec(
    body: &Value,
    vector: VectorInput,
    filter: Option<Filter>,
) -> Result<SearchSpec, QdrantError> {
    let params = field(body, "params");
    let (ef, exact) = match params {
        None => (None, false),
        Some(p) => (
            usize_field(p, "hnsw_ef")?,
            bool_field(p, "exact")?.unwrap_or(false),
        ),
    };
    let score_threshold = field(body, "score_threshold")
        .map(|v| {
            v.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| QdrantError::bad("`score_threshold` must be a number"))
        })
        .transpose()?;
    Ok(SearchSpec {
        vector,
        filter,
        limit: usize_field(body, "limit")?.unwrap_or(10),
        offset: usize_field(body, "offset")?.unwrap_or(0),
        score_threshold,
        ef,
        exact,
    })
}

/// The query vector of a `query` request: a vector, a Document or a point id, bare or
/// inside `{"nearest": …}`. A point id searches by that point's vector, without it.
fn query_vector(
    core: &CollectionService,
    name: &str,
    query: &Value,
    filter: &mut Option<Filter>,
) -> Result<VectorInput, QdrantError> {
    let query = match query {
        Value::Object(map) if map.contains_key("nearest") => &map["nearest"],
        Value::Object(map) => {
            for unsupported in [
                "recommend",
                "discover",
                "context",
                "fusion",
                "order_by",
                "sample",
                "formula",
                "rrf",
            ] {
                if map.contains_key(unsupported) {
                    return Err(QdrantError::bad(format!(
                        "`{unsupported}` queries are not supported; use a vector, a Document or {{\"nearest\": …}}"
                    )));
                }
            }
            query
        }
        other => other,
    };
    if query.is_number() || query.is_string() {
        let id = parse_point_id(query).map_err(QdrantError::bad)?;
        let vector = core.vector(name, &id)?.ok_or_else(|| {
            QdrantError::new(StatusCode::NOT_FOUND, format!("no point with id {query}"))
        })?;
        let mut without = filter.take().unwrap_or_default();
        without
            .must_not
            .push(Condition::HasId([id].into_iter().collect()));
        *filter = Some(without);
        return Ok(VectorInput::Dense(vector));
    }
    parse_vector(query, "query")
}

/// The two search routes: `query` (a `query` of several forms, results under
/// `points`) and the older `search` (a `vector`, results as a list).
#[derive(Clone, Copy)]
enum Api {
    Query,
    Search,
}

async fn run(
    core: &CollectionService,
    name: &str,
    body: &Value,
    api: Api,
) -> Result<Value, QdrantError> {
    let mut filter = filter_field(body, "filter")?;
    let vector = match api {
        Api::Query => {
            refuse_unsupported(body, &["prefetch", "lookup_from"])?;
            if let Some(using) = field(body, "using") {
                if using.as_str() != Some("") {
                    return Err(QdrantError::bad(
                        "named vectors (`using`) are not supported",
                    ));
                }
            }
            let query =
                field(body, "query").ok_or_else(|| QdrantError::bad("`query` is required"))?;
            query_vector(core, name, query, &mut filter)?
        }
        Api::Search => parse_vector(
            field(body, "vector").ok_or_else(|| QdrantError::bad("`vector` is required"))?,
            "vector",
        )?,
    };
    let spec = search_spec(body, vector, filter)?;
    let payload = payload_select(body, false)?;
    let with = with_vector(body)?;
    let found = core.search(name, spec).await?;
    let points = found
        .iter()
        .map(|p| point_json(core, name, p, &payload, with))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match api {
        Api::Query => json!({"points": points}),
        Api::Search => Value::Array(points),
    })
}

async fn one(state: AppState, name: String, body: Bytes, api: Api) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let result = run(core(&state)?, &name, &body, api).await?;
    ok(result, started)
}

/// `…/batch`: `{"searches": [request, …]}`, answered in order.
async fn many(state: AppState, name: String, body: Bytes, api: Api) -> Answer {
    let started = Instant::now();
    let body = parse_body(&body)?;
    let searches = field(&body, "searches")
        .and_then(Value::as_array)
        .ok_or_else(|| QdrantError::bad("`searches` must be a list"))?;
    let core = core(&state)?;
    let mut out = Vec::with_capacity(searches.len());
    for request in searches {
        out.push(run(core, &name, request, api).await?);
    }
    ok(Value::Array(out), started)
}

async fn query(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    one(state, name, body, Api::Query).await
}

async fn query_batch(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    many(state, name, body, Api::Query).await
}

async fn search(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Answer {
    one(state, name, body, Api::Search).await
}

async fn search_batch(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    many(state, name, body, Api::Search).await
}
