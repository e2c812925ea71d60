//! Semantic routing: named routers whose routes are described by example utterances;
//! a prompt goes to the route it is closest to, or to none when it is out of scope.
//!
//! Definitions live in the store's `routing` tree; the utterances' vectors are the points
//! of an internal collection per router (`semcache.router.{name}`), so a restart never
//! re-embeds them. Scoring and fitting are in [`scorer`].

pub mod scorer;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::now_ms;
use crate::embed::{EmbedError, Embedder};
use crate::store::{CollectionRecord, EntryId, PointId, PointRecord, Store, StoreError};
use scorer::{Accuracy, Params, RouteVectors};

/// Blend of nearest-utterance and centroid cosine before a router is fitted.
pub const DEFAULT_BETA: f32 = 0.5;
/// Score a route needs before a router is fitted (and when its definition names none).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("router `{0}` not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("embedding failed: {0}")]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T, E = RoutingError> = std::result::Result<T, E>;

fn invalid(message: impl Into<String>) -> RoutingError {
    RoutingError::Invalid(message.into())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDef {
    pub name: String,
    pub utterances: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterDef {
    pub routes: Vec<RouteDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

/// A router as stored: its definition and the parameters in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RouterRecord {
    def: RouterDef,
    params: Params,
    fitted_at_ms: Option<u64>,
}

struct Router {
    record: RouterRecord,
    /// Shared with fits running on a blocking thread (a large router's vectors are
    /// tens of MB; they are never copied).
    routes: Arc<Vec<RouteVectors>>,
}

/// Limits on router definitions.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub max_routes: usize,
    pub max_utterances: usize,
    pub max_text_bytes: usize,
    pub max_routers: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_routes: 1000,
            max_utterances: 20_000,
            max_text_bytes: 4096,
            max_routers: 1000,
        }
    }
}

/// A routing decision as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Routed {
    pub route: Option<String>,
    pub score: f32,
    pub alternatives: Vec<RouteScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteScore {
    pub route: String,
    pub score: f32,
}

/// What `fit` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FitReport {
    pub before: Accuracy,
    pub after: Accuracy,
    pub beta: f32,
    pub k: usize,
    pub margin: f32,
    pub thresholds: HashMap<String, f32>,
}

pub struct RoutingService {
    store: Store,
    embedder: Embedder,
    config: RoutingConfig,
    routers: RwLock<HashMap<String, Arc<Router>>>,
}

fn collection_name(name: &str) -> String {
    format!("{}router.{name}", crate::store::INTERNAL_PREFIX)
}

fn key(name: &str) -> String {
    format!("router/{name}")
}

impl RoutingService {
    /// Loads every router from the store (vectors read, never re-embedded).
    pub fn open(store: Store, embedder: Embedder, config: RoutingConfig) -> Result<Self> {
        let service = Self {
            store,
            embedder,
            config,
            routers: RwLock::new(HashMap::new()),
        };
        let mut loaded = HashMap::new();
        for item in service.store.scan_routing() {
            let (key, bytes) = item?;
            let Some(name) = key.strip_prefix("router/") else {
                continue;
            };
            let record: RouterRecord =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            let collection = collection_name(name);
            let mut vectors: Vec<Vec<Vec<f32>>> = vec![Vec::new(); record.def.routes.len()];
            for point in service.store.scan_points(&collection) {
                let point = point?;
                let route = point.record.payload.get("route").and_then(Value::as_u64);
                let vector = service.store.get_point_vector(&collection, &point.id)?;
                if let (Some(route), Some(vector)) = (route, vector) {
                    if let Some(list) = vectors.get_mut(route as usize) {
                        list.push(vector);
                    }
                }
            }
            let routes = Arc::new(vectors.into_iter().map(RouteVectors::new).collect());
            loaded.insert(name.to_string(), Arc::new(Router { record, routes }));
        }
        tracing::info!(routers = loaded.len(), "routers loaded");
        *service.routers.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(service)
    }

    fn get(&self, name: &str) -> Result<Arc<Router>> {
        self.routers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| RoutingError::NotFound(name.to_string()))
    }

    fn check(&self, def: &RouterDef) -> Result<usize> {
        if def.routes.is_empty() || def.routes.len() > self.config.max_routes {
            return Err(invalid(format!(
                "a router has 1 to {} routes",
                self.config.max_routes
            )));
        }
        let mut names = std::collections::HashSet::new();
        let mut total = 0;
        for r in &def.routes {
            if r.name.is_empty() || r.name.len() > 256 {
                return Err(invalid("route names are 1 to 256 bytes"));
            }
            if !names.insert(&r.name) {
                return Err(invalid(format!("route `{}` appears twice", r.name)));
            }
            if r.utterances.is_empty() {
                return Err(invalid(format!("route `{}` has no utterances", r.name)));
            }
            for u in &r.utterances {
                if u.trim().is_empty() || u.len() > self.config.max_text_bytes {
                    return Err(invalid(format!(
                        "route `{}`: utterances are 1 to {} bytes and not blank",
                        r.name, self.config.max_text_bytes
                    )));
                }
            }
            if r.threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                return Err(invalid(format!("route `{}`: threshold is 0 to 1", r.name)));
            }
            total += r.utterances.len();
        }
        if def.threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err(invalid("threshold is 0 to 1"));
        }
        if total > self.config.max_utterances {
            return Err(invalid(format!(
                "{total} utterances; a router holds at most {}",
                self.config.max_utterances
            )));
        }
        Ok(total)
    }

    /// Creates or replaces a router: its utterances are embedded once and stored.
    pub async fn put(&self, name: &str, def: RouterDef) -> Result<()> {
        self.check(&def)?;
        {
            let routers = self.routers.read().unwrap_or_else(|p| p.into_inner());
            if !routers.contains_key(name) && routers.len() >= self.config.max_routers {
                return Err(invalid(format!(
                    "this server holds its maximum of {} routers",
                    self.config.max_routers
                )));
            }
        }
        let texts: Vec<String> = def
            .routes
            .iter()
            .flat_map(|r| r.utterances.clone())
            .collect();
        let embedded = self.embedder.embed_many(texts).await?;
        let mut vectors = embedded.into_iter().map(|e| e.vector);
        let mut per_route = Vec::with_capacity(def.routes.len());
        let mut points = Vec::new();
        for (r, route) in def.routes.iter().enumerate() {
            let mut list = Vec::with_capacity(route.utterances.len());
            for _ in &route.utterances {
                let Some(v) = vectors.next() else { break };
                let mut payload = serde_json::Map::new();
                payload.insert("route".into(), Value::from(r as u64));
                points.push((
                    PointId::Num(points.len() as u64),
                    PointRecord {
                        version: EntryId::new(),
                        payload,
                    },
                    v.clone(),
                ));
                list.push(v);
            }
            per_route.push(list);
        }
        let params = Params {
            beta: DEFAULT_BETA,
            k: 1,
            margin: 0.0,
            thresholds: def
                .routes
                .iter()
                .map(|r| r.threshold.or(def.threshold).unwrap_or(DEFAULT_THRESHOLD))
                .collect(),
        };
        let record = RouterRecord {
            def,
            params,
            fitted_at_ms: None,
        };
        let collection = collection_name(name);
        let dims = self.embedder.info().dimensions;
        let bytes = serde_json::to_vec(&record).map_err(|e| invalid(e.to_string()))?;
        let store = self.store.clone();
        let key = key(name);
        tokio::task::spawn_blocking(move || -> Result<()> {
            store.remove_collection(&collection)?;
            store.put_collection(
                &collection,
                &CollectionRecord {
                    size: dims,
                    distance: "Cosine".into(),
                    created_at_ms: now_ms(),
                    payload_indexes: Default::default(),
                },
            )?;
            for chunk in points.chunks(1000) {
                store.upsert_points(&collection, chunk)?;
            }
            store.put_routing(&key, &bytes)?;
            Ok(())
        })
        .await
        .map_err(|e| invalid(e.to_string()))??;
        self.store.flush().await?;
        let routes = Arc::new(per_route.into_iter().map(RouteVectors::new).collect());
        self.routers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(Router { record, routes }));
        tracing::info!(router = %name, "router stored");
        Ok(())
    }

    /// The definition and the parameters in force.
    pub fn describe(&self, name: &str) -> Result<Value> {
        let router = self.get(name)?;
        let r = &router.record;
        let thresholds: serde_json::Map<String, Value> = r
            .def
            .routes
            .iter()
            .zip(&r.params.thresholds)
            .map(|(route, t)| (route.name.clone(), Value::from(*t)))
            .collect();
        Ok(serde_json::json!({
            "name": name,
            "routes": r.def.routes,
            "threshold": r.def.threshold,
            "fitted": {
                "atMs": r.fitted_at_ms,
                "beta": r.params.beta,
                "k": r.params.k,
                "margin": r.params.margin,
                "thresholds": thresholds,
            },
        }))
    }

    pub async fn delete(&self, name: &str) -> Result<bool> {
        let existed = self
            .routers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some();
        if existed {
            self.store.remove_routing(&key(name))?;
            self.store.remove_collection(&collection_name(name))?;
            self.store.flush().await?;
        }
        Ok(existed)
    }

    /// Routes an embedded prompt.
    pub fn route_vector(&self, name: &str, vector: &[f32]) -> Result<Routed> {
        let router = self.get(name)?;
        let decision = scorer::decide(&router.routes, &router.record.params, vector);
        let routes = &router.record.def.routes;
        let route = decision.route.map(|r| &routes[r]);
        let m = crate::metrics::metrics();
        let chosen = route.map_or("none", |r| r.name.as_str());
        m.routing_decisions
            .with_label_values(&[m.cache_label(name).as_str(), chosen])
            .inc();
        Ok(Routed {
            route: route.map(|r| r.name.clone()),
            score: decision.score,
            alternatives: decision
                .ranked
                .iter()
                .take(5)
                .map(|(r, s)| RouteScore {
                    route: routes[*r].name.clone(),
                    score: *s,
                })
                .collect(),
            metadata: route.and_then(|r| r.metadata.clone()),
        })
    }

    pub async fn route(&self, name: &str, text: String) -> Result<Routed> {
        self.get(name)?;
        let embedded = self.embedder.embed(text).await?;
        self.route_vector(name, &embedded.vector)
    }

    /// Fits the router's parameters on labelled examples (`route: None` = out of scope)
    /// and stores them; reports accuracy on those examples before and after.
    pub async fn fit(
        &self,
        name: &str,
        examples: Vec<(String, Option<String>)>,
        min_oos_recall: Option<f64>,
    ) -> Result<FitReport> {
        let target = min_oos_recall.unwrap_or(scorer::DEFAULT_OOS_RECALL);
        if !(0.0..=1.0).contains(&target) {
            return Err(invalid("minOutOfScopeRecall is 0 to 1"));
        }
        let router = self.get(name)?;
        if examples.is_empty() || examples.len() > self.config.max_utterances {
            return Err(invalid(format!(
                "fit takes 1 to {} examples",
                self.config.max_utterances
            )));
        }
        let index: HashMap<&str, usize> = router
            .record
            .def
            .routes
            .iter()
            .enumerate()
            .map(|(n, r)| (r.name.as_str(), n))
            .collect();
        let mut labels = Vec::with_capacity(examples.len());
        let mut texts = Vec::with_capacity(examples.len());
        for (text, route) in examples {
            if text.trim().is_empty() || text.len() > self.config.max_text_bytes {
                return Err(invalid("example texts are 1 to 4096 bytes and not blank"));
            }
            let label = match route {
                None => None,
                Some(r) => Some(*index.get(r.as_str()).ok_or_else(|| {
                    invalid(format!(
                        "example names route `{r}`, which this router lacks"
                    ))
                })?),
            };
            labels.push(label);
            texts.push(text);
        }
        let embedded = self.embedder.embed_many(texts).await?;
        let examples: Vec<(Vec<f32>, Option<usize>)> =
            embedded.into_iter().map(|e| e.vector).zip(labels).collect();
        let current = router.record.params.clone();
        let routes = router.routes.clone();
        let (params, before, after) = tokio::task::spawn_blocking(move || {
            let before = scorer::evaluate(
                &scorer::score_examples(&routes, &examples, current.k),
                &current,
            );
            let params = scorer::fit(&routes, &examples, &current, target);
            let after = scorer::evaluate(
                &scorer::score_examples(&routes, &examples, params.k),
                &params,
            );
            (params, before, after)
        })
        .await
        .map_err(|e| invalid(e.to_string()))?;
        let mut record = router.record.clone();
        record.params = params.clone();
        record.fitted_at_ms = Some(now_ms());
        let bytes = serde_json::to_vec(&record).map_err(|e| invalid(e.to_string()))?;
        self.store.put_routing(&key(name), &bytes)?;
        self.store.flush().await?;
        let thresholds = record
            .def
            .routes
            .iter()
            .zip(&params.thresholds)
            .map(|(r, t)| (r.name.clone(), *t))
            .collect();
        self.routers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                Arc::new(Router {
                    record,
                    routes: router.routes.clone(),
                }),
            );
        Ok(FitReport {
            before,
            after,
            beta: params.beta,
            k: params.k,
            margin: params.margin,
            thresholds,
        })
    }
}
