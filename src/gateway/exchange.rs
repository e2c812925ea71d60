//! One HTTP request's trip through Envoy's ext_proc filter: look up on the request
//! body, answer a hit at once, and on a miss collect the upstream answer as it passes
//! (never holding a byte of it back) to store it when it has finished.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::proto::{self, Headers};
use super::{Caller, Shared};
use crate::auth::Role;
use crate::cache::chat::{self, sse::Assembler, ChatKey, SCOPE_ATTRIBUTE};
use crate::cache::{valid_cache_id, CacheService, NewEntry, Query};
use crate::embed::{EmbedError, Embedded};
use crate::metrics::metrics;
use crate::routing::{guard::Verdict, RoutingError};

/// Raw stream bytes kept per allowed response byte: SSE framing repeats the envelope
/// in every chunk, so a stream is several times the completion it assembles into.
const SSE_OVERHEAD: usize = 8;

/// What a request that may be stored carries from its lookup to its answer.
pub struct Pending {
    cache_id: String,
    scope: BTreeMap<String, String>,
    no_store: bool,
    no_cache: bool,
    may_store: bool,
    /// Why the cache sits this request out while guards or a router still read it.
    cache_off: Option<&'static str>,
    key: Option<ChatKey>,
    /// The lookup's embedding, so storing does not run the model again.
    embedded: Option<Embedded>,
}

enum Collector {
    Json(Vec<u8>),
    Sse(Box<Assembler>, usize),
    TooLarge,
}

/// The answer to store, handed to a background task once the response has finished.
pub struct StoreJob {
    pending: Pending,
    collector: Collector,
}

enum Phase {
    /// Nothing to do for this request (not a chat request, or already answered).
    Idle,
    /// Waiting for the request body.
    Body(Box<Pending>),
    /// Not looked up; the response gets `x-semcache: bypass` and why.
    Bypass(&'static str),
    /// Looked up and missed; waiting for the response headers.
    Miss(Box<Pending>),
    /// Collecting the response body.
    Collect(Box<Pending>, Collector),
}

/// Why a request ends before the cache: the reply that ends it (a block, a refusal), or
/// `None` to let it go on to the model untouched.
type Stop = Option<Box<ProcessingResponse>>;

/// What the stream learnt, for its log line.
#[derive(Debug, Default)]
pub struct Outcome {
    pub cache_id: String,
    pub outcome: &'static str,
    pub reason: &'static str,
    pub similarity: Option<f32>,
}

pub struct Exchange {
    shared: Arc<Shared>,
    caller: Caller,
    phase: Phase,
    pub outcome: Outcome,
    /// The router's decision (`none`: out of scope), told upstream and to the client.
    pub route: Option<String>,
    /// The request body with the routed model, when routing changed it.
    new_body: Option<Vec<u8>>,
}

fn count(outcome: &'static str, reason: &'static str) {
    metrics()
        .ext_proc_requests
        .with_label_values(&[outcome, reason])
        .inc();
}

/// An immediate reply in OpenAI's error shape (what the SDKs turn into their typed
/// errors), with semcache's headers.
fn openai_error(
    details: &str,
    status: u16,
    (kind, code): (&str, &str),
    message: &str,
    extra: &[(&str, String)],
) -> ProcessingResponse {
    let body = serde_json::json!({"error": {
        "message": message, "type": kind, "param": null, "code": code,
    }});
    let mut headers = vec![("content-type", "application/json".to_string())];
    headers.extend_from_slice(extra);
    proto::immediate(details, status, &headers, body.to_string().into_bytes())
}

/// `no-store` and `no-cache` among a `cache-control` header's directives.
fn cache_control(value: Option<&str>) -> (bool, bool) {
    let mut no_store = false;
    let mut no_cache = false;
    for directive in value.unwrap_or_default().split(',') {
        let name = directive.split('=').next().unwrap_or_default().trim();
        no_store |= name.eq_ignore_ascii_case("no-store");
        no_cache |= name.eq_ignore_ascii_case("no-cache");
    }
    (no_store, no_cache)
}

/// An attribute value within the attribute limit: long values are stood for by their
/// digest, so two tenants never collide and never share.
fn attribute_value(value: &str, limit: usize) -> String {
    if value.len() <= limit {
        value.to_string()
    } else {
        hex::encode(Sha256::digest(value.as_bytes()))
    }
}

impl Exchange {
    pub fn new(shared: Arc<Shared>, caller: Caller) -> Self {
        Self {
            shared,
            caller,
            phase: Phase::Idle,
            outcome: Outcome {
                outcome: "passthrough",
                ..Default::default()
            },
            route: None,
            new_body: None,
        }
    }

    fn core(&self) -> Option<&Arc<CacheService>> {
        self.shared.core.get()
    }

    /// The reply to one message, and an answer to store once that reply is sent.
    pub async fn handle(
        &mut self,
        message: ProcessingRequest,
    ) -> Result<(ProcessingResponse, Option<StoreJob>), Status> {
        let reply = match message.request {
            Some(Request::RequestHeaders(h)) => self.request_headers(&h)?,
            Some(Request::RequestBody(b)) => self.request_body(b).await,
            Some(Request::ResponseHeaders(h)) => self.response_headers(&h),
            Some(Request::ResponseBody(b)) => return Ok(self.response_body(b)),
            Some(Request::RequestTrailers(_)) => proto::request_trailers(),
            Some(Request::ResponseTrailers(_)) => {
                return Ok((proto::response_trailers(), self.response_ended()))
            }
            None => return Err(Status::invalid_argument("empty ProcessingRequest")),
        };
        Ok((reply, None))
    }

    fn bypass(&mut self, reason: &'static str) {
        self.outcome.outcome = "bypass";
        self.outcome.reason = reason;
        count("bypass", reason);
        self.phase = Phase::Bypass(reason);
    }

    fn request_headers(&mut self, h: &HttpHeaders) -> Result<ProcessingResponse, Status> {
        let headers = Headers::from_map(h.headers.as_ref());
        let path = headers.get(":path").unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        let json = headers
            .get("content-type")
            .is_some_and(|c| c.trim_start().starts_with("application/json"));
        let chat = headers.get(":method") == Some("POST")
            && path.ends_with("/chat/completions")
            && json
            && !h.end_of_stream;
        if !chat {
            // Not ours: the rest of this request and its response skip us entirely.
            self.phase = Phase::Idle;
            count("passthrough", "not-chat");
            return Ok(proto::request_headers(Some(proto::mode(false))));
        }
        let shared = self.shared.clone();
        let options = &shared.options;
        let cache_id = self
            .caller
            .cache_id
            .clone()
            .or_else(|| headers.get(&options.cache_header).map(str::to_string))
            .unwrap_or_else(|| options.default_cache.clone());
        self.outcome.cache_id = cache_id.clone();
        // Guards and routers read the body even when the cache will not.
        let pipeline = !self.caller.guards.is_empty() || self.caller.router.is_some();
        let mut cache_off = None;
        let mut bypass_now = |this: &mut Self, reason| {
            if pipeline {
                cache_off = Some(reason);
                return None;
            }
            this.bypass(reason);
            Some(Ok(proto::request_headers(Some(proto::mode(true)))))
        };
        if !valid_cache_id(&cache_id) {
            if let Some(reply) = bypass_now(self, "invalid-cache-id") {
                return reply;
            }
        }
        let mut may_store = true;
        if let Some(key) = &self.caller.key {
            if !key.permits_cache(&cache_id) {
                return Err(Status::permission_denied(
                    "this key may not touch that cache",
                ));
            }
            may_store = key.role >= Role::Writer;
        }
        let (no_store, no_cache) = cache_control(headers.joined("cache-control").as_deref());
        if no_cache && (no_store || !may_store) {
            if let Some(reply) = bypass_now(self, "cache-control") {
                return reply;
            }
        }
        let limit = options.limits.max_attribute_bytes;
        let mut scope = self.caller.scope.clone();
        for name in &options.scope_headers {
            // An absent header is a scope of its own (empty), never a wildcard.
            let value = headers.joined(name).unwrap_or_default();
            scope.insert(format!("header.{name}"), attribute_value(&value, limit));
        }
        self.phase = Phase::Body(Box::new(Pending {
            cache_id,
            scope,
            no_store,
            no_cache,
            may_store,
            cache_off,
            key: None,
            embedded: None,
        }));
        Ok(proto::request_headers(None))
    }

    async fn request_body(&mut self, body: HttpBody) -> ProcessingResponse {
        let Phase::Body(mut pending) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return proto::request_body();
        };
        let started = Instant::now();
        let reply = self.lookup(&mut pending, body).await;
        metrics()
            .ext_proc_lookup_duration
            .observe(started.elapsed().as_secs_f64());
        if matches!(self.phase, Phase::Idle) && reply.is_none() {
            // Looked up and missed: wait for the answer.
            self.phase = Phase::Miss(pending);
        }
        reply.unwrap_or_else(|| {
            let route = self.route.iter().map(|r| ("x-semcache-route", r.clone()));
            proto::request_body_with(&route.collect::<Vec<_>>(), self.new_body.take())
        })
    }

    /// Guards, router and cache in that order, on one embedding of the prompt: an
    /// immediate response (a block, a refusal, a hit), or `None` to let the request go on
    /// to the model.
    async fn lookup(
        &mut self,
        pending: &mut Pending,
        body: HttpBody,
    ) -> Option<ProcessingResponse> {
        let shared = self.shared.clone();
        let limits = &shared.options.limits;
        let unreadable = if !body.end_of_stream {
            // BUFFERED_PARTIAL cut the body at Envoy's buffer limit (or the body is
            // streamed): there is no whole request to key on.
            Some("body-not-buffered")
        } else if body.body.len() > limits.max_body_bytes {
            Some("too-large")
        } else {
            None
        };
        let request = match unreadable {
            Some(reason) => Err(reason),
            None => serde_json::from_slice::<Value>(&body.body).map_err(|_| "invalid-json"),
        };
        let mut request = match request {
            Ok(request) => request,
            Err(reason) => return self.fail_guards(reason),
        };
        let mut embedded = None;
        if !self.caller.guards.is_empty() || self.caller.router.is_some() {
            match self.guard_and_route(&mut request).await {
                Ok(last) => embedded = last,
                Err(reply) => return reply.map(|r| *r),
            }
        }
        if let Some(reason) = pending.cache_off {
            self.bypass(reason);
            return None;
        }
        let Some(core) = self.core().cloned() else {
            self.bypass("not-ready");
            return None;
        };
        let key = match chat::key(&request, core.settings(&pending.cache_id).allow_sampled) {
            Ok(key) => key,
            Err(why) => {
                self.bypass(why.code());
                return None;
            }
        };
        if key.prompt.len() > limits.max_prompt_bytes {
            self.bypass("too-large");
            return None;
        }
        // The guards' embedding of the last user message is the cache's too.
        let embedded = embedded
            .filter(|(text, _)| *text == key.prompt)
            .map(|(_, e)| e);
        let mut attributes = pending.scope.clone();
        attributes.insert(SCOPE_ATTRIBUTE.into(), key.fingerprint.clone());
        pending.key = Some(key.clone());
        self.outcome.outcome = "miss";
        if pending.no_cache {
            count("miss", "no-cache");
            self.outcome.reason = "no-cache";
            return None;
        }
        let query = Query {
            prompt: key.prompt,
            attributes,
            similarity_threshold: None,
            strategies: Vec::new(),
            max_results: 1,
            explain: false,
            // Under overload, go to the model at once rather than after the budget.
            max_queue_wait: Some(shared.options.lookup_timeout),
            embedded: embedded.clone(),
        };
        let budget = shared.options.lookup_timeout;
        let found = match tokio::time::timeout(budget, core.search(&pending.cache_id, &query)).await
        {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                let overloaded =
                    matches!(e, crate::cache::CacheError::Embed(EmbedError::QueueFull));
                // Overload and slow lookups are counted, not logged per request (that
                // would flood the logs exactly when the server is busiest).
                if overloaded {
                    tracing::debug!("embedding queue full; the request goes to the model");
                } else {
                    tracing::warn!(error = %e, "gateway lookup failed; the request goes to the model");
                }
                self.bypass(if overloaded { "overloaded" } else { "error" });
                return None;
            }
            Err(_) => {
                tracing::debug!(
                    budget_ms = budget.as_millis() as u64,
                    "gateway lookup over its budget; the request goes to the model"
                );
                self.bypass("timeout");
                return None;
            }
        };
        // A lookup that did not need the embedding (a new cache, an exact hit) leaves
        // ours for the store.
        pending.embedded = found.embedded.or(embedded);
        let Some(hit) = found.hits.into_iter().next() else {
            count("miss", "no-match");
            self.outcome.reason = "no-match";
            return None;
        };
        let streamed = request.get("stream").and_then(Value::as_bool) == Some(true);
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let Ok(completion) = serde_json::from_str::<Value>(&hit.entry.response) else {
            // Not a completion we stored (someone put text under a chat scope): do not
            // serve it, and let the model answer.
            count("miss", "not-a-completion");
            self.outcome.reason = "not-a-completion";
            return None;
        };
        let (content_type, body) = if streamed {
            (
                "text/event-stream",
                chat::sse::replay(&completion, include_usage).into_bytes(),
            )
        } else {
            ("application/json", hit.entry.response.into_bytes())
        };
        let strategy = match hit.strategy {
            crate::cache::Strategy::Exact => "exact",
            crate::cache::Strategy::Semantic => "semantic",
        };
        count("hit", strategy);
        self.outcome.outcome = "hit";
        self.outcome.reason = strategy;
        self.outcome.similarity = Some(hit.similarity);
        self.phase = Phase::Idle;
        let mut headers = vec![
            ("content-type", content_type.to_string()),
            ("x-semcache", "hit".to_string()),
            ("x-semcache-similarity", format!("{:.4}", hit.similarity)),
            ("x-semcache-entry-id", hit.entry.id.to_string()),
            ("x-semcache-strategy", strategy.to_string()),
        ];
        if streamed {
            headers.push(("cache-control", "no-cache".to_string()));
        }
        if let Some(route) = &self.route {
            headers.push(("x-semcache-route", route.clone()));
        }
        Some(proto::immediate("semcache_hit", 200, &headers, body))
    }

    /// Runs the route's guards, then its router, on one embedding of the request's user
    /// messages. `Ok` carries the last user message and its embedding, for the cache;
    /// `Err` the reply that ends the request here (`None` inside: let it go on, as a
    /// bypass, when guards that could not run fail open).
    async fn guard_and_route(
        &mut self,
        request: &mut Value,
    ) -> Result<Option<(String, Embedded)>, Stop> {
        let shared = self.shared.clone();
        let options = &shared.options;
        let guarded = !self.caller.guards.is_empty();
        if self.caller.router.is_some() {
            // Whatever the client sent, the header upstream is ours.
            self.route = Some("none".into());
        }
        let Some(routing) = shared.routing.get().cloned() else {
            return self.guards_failed("not-ready");
        };
        let mut users = chat::user_texts(request);
        if !self.caller.guard_all_messages || !guarded {
            users = users.split_off(users.len().saturating_sub(1));
        }
        if users.is_empty() {
            // No user text: nothing a guard or router could read.
            return Ok(None);
        }
        let (budget, windows) = if guarded {
            (options.guard_timeout, options.limits.max_guard_windows)
        } else {
            (options.lookup_timeout, 0)
        };
        let embedding = async {
            if guarded {
                let read = routing.guards_read(&self.caller.guards);
                routing.embed_for_guards(users.clone(), windows, read).await
            } else {
                routing.embed(users.clone()).await.map(|w| (w, Vec::new()))
            }
        };
        let (whole, windows) = match tokio::time::timeout(budget, embedding).await {
            Ok(Ok(embedded)) => embedded,
            Ok(Err(RoutingError::TooLong(_))) => return self.guards_failed("too-long"),
            Ok(Err(e)) => {
                let overloaded = matches!(e, RoutingError::Embed(EmbedError::QueueFull));
                if !overloaded {
                    tracing::warn!(error = %e, "gateway embedding for guards or router failed");
                }
                return self.guards_failed(if overloaded { "overloaded" } else { "error" });
            }
            Err(_) => return self.guards_failed("timeout"),
        };
        let vectors: Vec<&[f32]> = whole
            .iter()
            .map(|e| e.vector.as_slice())
            .chain(windows.iter().map(Vec::as_slice))
            .collect();
        for guard in self.caller.guards.clone() {
            match routing.check_vectors(&guard, &vectors, false) {
                Ok(verdict) if verdict.blocked => {
                    return Err(Some(Box::new(self.blocked(&guard, &verdict))))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, guard = %guard, "a route's guard cannot run");
                    return self.guards_failed("unknown-guard");
                }
            }
        }
        let (last_text, last) = match (users.pop(), whole.into_iter().last()) {
            (Some(text), Some(e)) => (text, e),
            _ => return Ok(None),
        };
        if let Some(router) = &self.caller.router {
            match routing.route_vector(router, &last.vector) {
                Ok(routed) => {
                    self.route = Some(routed.route.clone().unwrap_or_else(|| "none".into()));
                    let model = routed
                        .metadata
                        .as_ref()
                        .and_then(|m| m.get("model"))
                        .and_then(Value::as_str);
                    if let (Some(model), Some(object)) = (model, request.as_object_mut()) {
                        if object.get("model").and_then(Value::as_str) != Some(model) {
                            object.insert("model".into(), Value::from(model));
                            self.new_body = serde_json::to_vec(request).ok();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, router = %router, "a route's router cannot run")
                }
            }
        }
        Ok(Some((last_text, last)))
    }

    /// The guards could not run: refuse the request (fail closed, the default) or let
    /// it go on (the route said open; a request without guards always goes on).
    fn guards_failed<T>(&mut self, reason: &'static str) -> Result<T, Stop> {
        Err(self.fail_guards(reason).map(Box::new))
    }

    /// The refusal, or `None` after marking the request a bypass for `reason`.
    fn fail_guards(&mut self, reason: &'static str) -> Option<ProcessingResponse> {
        let refused = self.unchecked(reason);
        if refused.is_none() {
            self.bypass(reason);
        }
        refused
    }

    /// The 503 that fails a guarded request closed, or `None` where it may go on.
    fn unchecked(&mut self, reason: &'static str) -> Option<ProcessingResponse> {
        if self.caller.guards.is_empty() || self.caller.guard_fail_open {
            return None;
        }
        count("refused", reason);
        self.outcome.outcome = "refused";
        self.outcome.reason = reason;
        self.phase = Phase::Idle;
        let message = format!(
            "semcache could not check this request against its guards ({reason}); \
             this route refuses what it cannot check"
        );
        let headers = [
            ("x-semcache", "refused".to_string()),
            ("x-semcache-guard", "unavailable".to_string()),
            ("x-semcache-guard-reason", reason.to_string()),
        ];
        Some(openai_error(
            "semcache_guard_unavailable",
            503,
            ("server_error", "guard_unavailable"),
            &message,
            &headers,
        ))
    }

    /// The 403 a blocked prompt gets, in OpenAI's error shape (the SDKs raise it as
    /// `PermissionDeniedError`).
    fn blocked(&mut self, guard: &str, verdict: &Verdict) -> ProcessingResponse {
        let category = verdict.category.clone().unwrap_or_default();
        count("blocked", "guard");
        self.outcome.outcome = "blocked";
        self.outcome.reason = "guard";
        self.outcome.similarity = Some(verdict.score);
        self.phase = Phase::Idle;
        let message =
            format!("This request was blocked by the `{guard}` guard (category `{category}`).");
        let headers = [
            ("x-semcache", "blocked".to_string()),
            ("x-semcache-guard", category),
            ("x-semcache-guard-name", guard.to_string()),
            (
                "x-semcache-guard-example",
                verdict.example.clone().unwrap_or_default(),
            ),
            ("x-semcache-guard-score", format!("{:.4}", verdict.score)),
        ];
        openai_error(
            "semcache_guard",
            403,
            ("invalid_request_error", "content_blocked"),
            &message,
            &headers,
        )
    }

    fn response_headers(&mut self, h: &HttpHeaders) -> ProcessingResponse {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let pending = match phase {
            Phase::Bypass(reason) => {
                let mut set = vec![
                    ("x-semcache", "bypass".into()),
                    ("x-semcache-bypass", reason.into()),
                ];
                set.extend(self.route.iter().map(|r| ("x-semcache-route", r.clone())));
                let set = proto::mutation(&set);
                return proto::response_headers(Some(set), Some(proto::mode(true)));
            }
            Phase::Miss(pending) => pending,
            _ => return proto::response_headers(None, None),
        };
        let mut set = vec![("x-semcache", "miss".into())];
        set.extend(self.route.iter().map(|r| ("x-semcache-route", r.clone())));
        let set = Some(proto::mutation(&set));
        let headers = Headers::from_map(h.headers.as_ref());
        let skip = |reason: &'static str| {
            metrics().ext_proc_stores.with_label_values(&[reason]).inc();
            proto::response_headers(set.clone(), Some(proto::mode(true)))
        };
        if !pending.may_store {
            return skip("read-only-key");
        }
        if pending.no_store {
            return skip("no-store");
        }
        if headers.get(":status") != Some("200") {
            return skip("status");
        }
        if headers
            .get("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
        {
            return skip("encoded");
        }
        if h.end_of_stream {
            return skip("empty");
        }
        let content_type = headers.get("content-type").unwrap_or_default();
        let collector = if content_type.starts_with("text/event-stream") {
            Collector::Sse(Box::default(), 0)
        } else if content_type.starts_with("application/json") {
            Collector::Json(Vec::new())
        } else {
            return skip("content-type");
        };
        self.phase = Phase::Collect(pending, collector);
        proto::response_headers(set, None)
    }

    fn response_body(&mut self, body: HttpBody) -> (ProcessingResponse, Option<StoreJob>) {
        let limit = self.shared.options.limits.max_response_bytes;
        if let Phase::Collect(_, collector) = &mut self.phase {
            match collector {
                Collector::Json(bytes) if bytes.len() + body.body.len() <= limit => {
                    bytes.extend_from_slice(&body.body)
                }
                Collector::Sse(assembler, seen)
                    if *seen + body.body.len() <= limit * SSE_OVERHEAD =>
                {
                    *seen += body.body.len();
                    assembler.push(&body.body);
                }
                Collector::TooLarge => {}
                _ => *collector = Collector::TooLarge,
            }
        }
        if !body.end_of_stream {
            return (proto::response_body(), None);
        }
        (proto::response_body(), self.response_ended())
    }

    /// The answer collected so far, once the response has ended (its last body chunk,
    /// or its trailers when the operator sends those to us).
    fn response_ended(&mut self) -> Option<StoreJob> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Collect(pending, collector) => Some(StoreJob {
                pending: *pending,
                collector,
            }),
            _ => None,
        }
    }
}

impl StoreJob {
    /// Stores the answer if it is a complete, successful completion; off the request path.
    pub async fn run(self, shared: Arc<Shared>) {
        let result = self.store(&shared).await;
        metrics().ext_proc_stores.with_label_values(&[result]).inc();
        tracing::debug!(result, "gateway answer handled");
    }

    async fn store(self, shared: &Shared) -> &'static str {
        let Some(core) = shared.core.get() else {
            return "not-ready";
        };
        let Pending {
            cache_id,
            mut scope,
            key,
            embedded,
            ..
        } = self.pending;
        let Some(key) = key else {
            return "no-key";
        };
        let completion = match self.collector {
            Collector::TooLarge => return "too-large",
            Collector::Json(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => v,
                Err(_) => return "invalid",
            },
            Collector::Sse(assembler, _) => match assembler.finish() {
                Ok(v) => v,
                Err(why) => return why.code(),
            },
        };
        if let Err(why) = chat::check_response(&completion) {
            return why.code();
        }
        let response = completion.to_string();
        if response.len() > shared.options.limits.max_response_bytes {
            return "too-large";
        }
        scope.insert(SCOPE_ATTRIBUTE.into(), key.fingerprint);
        let entry = NewEntry {
            prompt: key.prompt,
            response,
            attributes: scope,
            ttl_ms: None,
        };
        let stored = match embedded {
            Some(embedded) => core.insert_embedded(&cache_id, entry, embedded).await,
            None => core.insert(&cache_id, entry).await,
        };
        match stored {
            Ok(_) => "stored",
            Err(e) => {
                tracing::warn!(error = %e, cache = %cache_id, "gateway answer not stored");
                "error"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;

    fn exchange() -> Exchange {
        let shared = Arc::new(Shared {
            // No core: as while the model loads.
            core: Arc::new(std::sync::OnceLock::new()),
            routing: Arc::new(std::sync::OnceLock::new()),
            options: super::super::GatewayOptions {
                cache_header: "x-semcache-cache-id".into(),
                default_cache: "default".into(),
                scope_headers: vec!["x-tenant-id".into()],
                lookup_timeout: std::time::Duration::from_millis(200),
                guard_timeout: std::time::Duration::from_millis(1000),
                allow_anonymous: false,
                limits: crate::api::Limits::default(),
            },
            keys: crate::auth::KeyRing::default(),
        });
        Exchange::new(shared, Caller::default())
    }

    fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).into(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect();
        ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                end_of_stream,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn chat_headers(extra: &[(&str, &str)]) -> ProcessingRequest {
        let mut pairs = vec![
            (":method", "POST"),
            (":path", "/v1/chat/completions?x=1"),
            ("content-type", "application/json"),
        ];
        pairs.extend_from_slice(extra);
        headers(&pairs, false)
    }

    fn response_headers(status: &str) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::ResponseHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":status".into(),
                        raw_value: status.as_bytes().to_vec(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn set_headers(reply: &ProcessingResponse) -> Vec<(String, String)> {
        let common = match &reply.response {
            Some(Response::ResponseHeaders(h)) | Some(Response::RequestHeaders(h)) => {
                h.response.clone()
            }
            _ => None,
        };
        common
            .and_then(|c| c.header_mutation)
            .map(|m| {
                m.set_headers
                    .into_iter()
                    .filter_map(|o| o.header)
                    .map(|h| (h.key, String::from_utf8_lossy(&h.raw_value).into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn other_requests_skip_the_rest_of_the_exchange() {
        for request in [
            headers(&[(":method", "GET"), (":path", "/v1/models")], true),
            headers(
                &[
                    (":method", "POST"),
                    (":path", "/v1/embeddings"),
                    ("content-type", "application/json"),
                ],
                false,
            ),
            headers(
                &[
                    (":method", "POST"),
                    (":path", "/v1/chat/completions"),
                    ("content-type", "text/plain"),
                ],
                false,
            ),
        ] {
            let mut x = exchange();
            let (reply, job) = x.handle(request).await.unwrap();
            assert!(job.is_none());
            let mode = reply.mode_override.expect("a mode override");
            assert_eq!(mode.request_body_mode, BodySendMode::None as i32);
            assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
            assert_eq!(x.outcome.outcome, "passthrough");
        }
    }

    #[tokio::test]
    async fn a_bypass_is_told_on_the_response_and_nothing_is_collected() {
        // Not ready yet: the body is read, the request continues, the response says why.
        let mut x = exchange();
        x.handle(chat_headers(&[])).await.unwrap();
        let body = ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body:
                    br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#
                        .to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        let (reply, _) = x.handle(body).await.unwrap();
        assert!(matches!(reply.response, Some(Response::RequestBody(_))));
        let (reply, _) = x.handle(response_headers("200")).await.unwrap();
        let set = set_headers(&reply);
        assert!(set.contains(&("x-semcache".into(), "bypass".into())));
        assert!(set.contains(&("x-semcache-bypass".into(), "not-ready".into())));
        let mode = reply.mode_override.expect("no response body wanted");
        assert_eq!(mode.response_body_mode, BodySendMode::None as i32);

        // A cache id the client cannot have meant: bypass before the body.
        let mut x = exchange();
        let (reply, _) = x
            .handle(chat_headers(&[("x-semcache-cache-id", "../etc")]))
            .await
            .unwrap();
        assert_eq!(x.outcome.reason, "invalid-cache-id");
        assert_eq!(
            reply.mode_override.map(|m| m.request_body_mode),
            Some(BodySendMode::None as i32)
        );

        // Both cache-control directives: nothing to look up or store.
        let mut x = exchange();
        x.handle(chat_headers(&[("cache-control", "no-cache, no-store")]))
            .await
            .unwrap();
        assert_eq!(x.outcome.reason, "cache-control");

        // A body Envoy cut at its buffer limit is not keyed on.
        let mut x = exchange();
        x.handle(chat_headers(&[])).await.unwrap();
        let partial = ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: b"{".to_vec(),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        };
        x.handle(partial).await.unwrap();
        assert_eq!(x.outcome.reason, "body-not-buffered");
    }

    #[tokio::test]
    async fn scope_headers_are_the_operators_and_absent_is_a_value() {
        let mut x = exchange();
        x.handle(chat_headers(&[("x-tenant-id", "acme")]))
            .await
            .unwrap();
        let Phase::Body(pending) = &x.phase else {
            panic!("waiting for the body");
        };
        assert_eq!(
            pending.scope.get("header.x-tenant-id").map(String::as_str),
            Some("acme")
        );
        let mut x = exchange();
        x.handle(chat_headers(&[])).await.unwrap();
        let Phase::Body(pending) = &x.phase else {
            panic!("waiting for the body");
        };
        assert_eq!(
            pending.scope.get("header.x-tenant-id").map(String::as_str),
            Some("")
        );
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(None), (false, false));
        assert_eq!(cache_control(Some("no-store")), (true, false));
        assert_eq!(cache_control(Some("max-age=0, No-Cache")), (false, true));
        assert_eq!(cache_control(Some("no-cache, no-store")), (true, true));
        assert_eq!(cache_control(Some("no-storex")), (false, false));
    }

    #[test]
    fn long_scope_values_are_digested_not_cut() {
        assert_eq!(attribute_value("acme", 8), "acme");
        let a = attribute_value(&"a".repeat(300), 256);
        let b = attribute_value(&format!("{}b", "a".repeat(299)), 256);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
