//! Semantic routing: named routers whose routes are described by example utterances;
//! a prompt goes to the route it is closest to, or to none when it is out of scope.
//!
//! Guards ([`guard`]) are the same shape turned around: categories of example prompts
//! to block. Both are stored as labelled example sets ([`sets`]), so a restart never
//! re-embeds them. Scoring and fitting of routers are in [`scorer`].

pub mod guard;
mod head;
pub mod scorer;
mod sets;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::now_ms;
use crate::embed::{EmbedError, Embedded, Embedder};
use crate::store::{Store, StoreError};
use guard::Guard;
use scorer::{Accuracy, Head, Params, RouteVectors};

/// Blend of nearest-utterance and centroid cosine before a router is fitted.
pub const DEFAULT_BETA: f32 = 0.5;
/// Score a route needs before a router is fitted (and when its definition names none).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("router `{0}` not found")]
    NotFound(String),
    #[error("guard `{0}` not found")]
    GuardNotFound(String),
    #[error("the prompt is too long to check: it needs more than {0} windows of the model")]
    TooLong(usize),
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
    /// Trained on the utterances when the router is stored; `fit` decides whether the
    /// router uses it.
    head: Option<Arc<Head>>,
}

/// Where a router's head is kept (`routing` tree), beside its record.
fn head_key(name: &str) -> String {
    format!("router-head/{name}")
}

/// Trains a router's head off the async threads (seconds for thousands of utterances).
async fn train_head(routes: Arc<Vec<RouteVectors>>) -> Option<Arc<Head>> {
    tokio::task::spawn_blocking(move || Head::train(&routes).map(Arc::new))
        .await
        .ok()
        .flatten()
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
    /// Whether the linear head picks the route.
    pub head: bool,
    pub thresholds: HashMap<String, f32>,
}

pub struct RoutingService {
    store: Store,
    embedder: Embedder,
    config: RoutingConfig,
    routers: RwLock<HashMap<String, Arc<Router>>>,
    guards: RwLock<HashMap<String, Arc<Guard>>>,
}

const ROUTER: &str = "router";

/// An f32 setting as JSON shows it: 0.575, not 0.574999988079071.
fn tidy(x: f32) -> f64 {
    (f64::from(x) * 1e6).round() / 1e6
}

fn corrupt(key: &str, e: serde_json::Error) -> RoutingError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    }
    .into()
}

impl RoutingService {
    /// Loads every router and guard from the store (vectors read, never re-embedded).
    pub fn open(store: Store, embedder: Embedder, config: RoutingConfig) -> Result<Self> {
        let mut routers = HashMap::new();
        let groups_of = |r: &RouterRecord| r.def.routes.len();
        for (name, record, groups) in sets::load_all(&store, ROUTER, groups_of)? {
            let routes: Vec<RouteVectors> = groups.into_iter().map(RouteVectors::new).collect();
            let head = match store.get_routing(&head_key(&name))? {
                Some(bytes) => Head::from_bytes(&bytes),
                None => None,
            }
            .filter(|h| h.routes() == routes.len())
            // Missing (a router from before heads) or unreadable: train it again.
            .or_else(|| Head::train(&routes))
            .map(Arc::new);
            let routes = Arc::new(routes);
            routers.insert(
                name,
                Arc::new(Router {
                    record,
                    routes,
                    head,
                }),
            );
        }
        let guards = guard::load(&store)?;
        tracing::info!(
            routers = routers.len(),
            guards = guards.len(),
            "routers and guards loaded"
        );
        Ok(Self {
            store,
            embedder,
            config,
            routers: RwLock::new(routers),
            guards: RwLock::new(guards),
        })
    }

    fn install(&self, name: &str, router: Router) {
        self.routers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(router));
    }

    /// Embeds a request's prompts once, for every guard, router and cache that looks at it.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>> {
        Ok(self.embedder.embed_many(texts).await?)
    }

    fn get(&self, name: &str) -> Result<Arc<Router>> {
        self.routers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| RoutingError::NotFound(name.to_string()))
    }

    /// Checks a labelled set's groups (a router's routes, a guard's categories) against
    /// the limits; `words` names them in errors (`["router", "route", "utterances"]`).
    fn check_groups(
        &self,
        words: [&str; 3],
        groups: &[(&str, &[String], Option<f32>)],
        threshold: Option<f32>,
    ) -> Result<usize> {
        let [set, group, texts] = words;
        if groups.is_empty() || groups.len() > self.config.max_routes {
            return Err(invalid(format!(
                "a {set} has 1 to {} {group}s",
                self.config.max_routes
            )));
        }
        let mut names = std::collections::HashSet::new();
        let mut total = 0;
        for (name, examples, own) in groups {
            if name.is_empty() || name.len() > 256 {
                return Err(invalid(format!("{group} names are 1 to 256 bytes")));
            }
            if !names.insert(name) {
                return Err(invalid(format!("{group} `{name}` appears twice")));
            }
            if examples.is_empty() {
                return Err(invalid(format!("{group} `{name}` has no {texts}")));
            }
            if examples
                .iter()
                .any(|u| u.trim().is_empty() || u.len() > self.config.max_text_bytes)
            {
                return Err(invalid(format!(
                    "{group} `{name}`: {texts} are 1 to {} bytes and not blank",
                    self.config.max_text_bytes
                )));
            }
            if own.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
                return Err(invalid(format!("{group} `{name}`: threshold is 0 to 1")));
            }
            total += examples.len();
        }
        if threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err(invalid("threshold is 0 to 1"));
        }
        if total > self.config.max_utterances {
            return Err(invalid(format!(
                "{total} {texts}; a {set} holds at most {}",
                self.config.max_utterances
            )));
        }
        Ok(total)
    }

    /// Refuses a new set past the server's limit (replacing one is always allowed).
    fn check_room<T>(
        &self,
        sets: &RwLock<HashMap<String, T>>,
        name: &str,
        what: &str,
    ) -> Result<()> {
        let sets = sets.read().unwrap_or_else(|p| p.into_inner());
        if !sets.contains_key(name) && sets.len() >= self.config.max_routers {
            return Err(invalid(format!(
                "this server holds its maximum of {} {what}s",
                self.config.max_routers
            )));
        }
        Ok(())
    }

    /// Creates or replaces a router: its utterances are embedded once and stored.
    pub async fn put(&self, name: &str, def: RouterDef) -> Result<()> {
        let groups: Vec<(&str, &[String], Option<f32>)> = def
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.utterances.as_slice(), r.threshold))
            .collect();
        self.check_groups(["router", "route", "utterances"], &groups, def.threshold)?;
        self.check_room(&self.routers, name, "router")?;
        let utterances: Vec<&[String]> =
            def.routes.iter().map(|r| r.utterances.as_slice()).collect();
        let per_route = sets::embed(&self.embedder, &utterances).await?;
        let routes: Arc<Vec<RouteVectors>> =
            Arc::new(per_route.into_iter().map(RouteVectors::new).collect());
        let head = train_head(routes.clone()).await;
        let params = Params {
            head: false,
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
        let bytes = serde_json::to_vec(&record).map_err(|e| invalid(e.to_string()))?;
        let dims = self.embedder.info().dimensions;
        if let Some(head) = &head {
            self.store.put_routing(&head_key(name), &head.to_bytes())?;
        }
        let groups: Vec<&[Vec<f32>]> = routes.iter().map(|r| r.utterances.as_slice()).collect();
        sets::save(&self.store, dims, ROUTER, name, bytes, &groups).await?;
        self.install(
            name,
            Router {
                record,
                routes,
                head,
            },
        );
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
            .map(|(route, t)| (route.name.clone(), Value::from(tidy(*t))))
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
                "head": r.params.head,
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
            self.store.remove_routing(&head_key(name))?;
            sets::remove(&self.store, ROUTER, name).await?;
        }
        Ok(existed)
    }

    /// Routes an embedded prompt.
    pub fn route_vector(&self, name: &str, vector: &[f32]) -> Result<Routed> {
        let router = self.get(name)?;
        let decision = scorer::decide(
            &router.routes,
            router.head.as_deref(),
            &router.record.params,
            vector,
        );
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
        let head = router.head.clone();
        let (params, before, after) = tokio::task::spawn_blocking(move || {
            let head = head.as_deref();
            let before = scorer::evaluate(
                &scorer::score_examples(&routes, head, &examples, current.k),
                &current,
            );
            let params = scorer::fit(&routes, head, &examples, &current, target);
            let after = scorer::evaluate(
                &scorer::score_examples(&routes, head, &examples, params.k),
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
        sets::save_record(&self.store, ROUTER, name, &bytes).await?;
        let thresholds = record
            .def
            .routes
            .iter()
            .zip(&params.thresholds)
            .map(|(r, t)| (r.name.clone(), *t))
            .collect();
        self.install(
            name,
            Router {
                record,
                routes: router.routes.clone(),
                head: router.head.clone(),
            },
        );
        Ok(FitReport {
            before,
            after,
            beta: params.beta,
            k: params.k,
            margin: params.margin,
            head: params.head,
            thresholds,
        })
    }
}
