//! The gateway edge: Envoy's External Processing API (`envoy.service.ext_proc.v3`) over
//! gRPC, so an Envoy-based gateway caches chat completions by configuration alone.
//!
//! One gRPC stream per HTTP request ([`exchange`]). Whatever goes wrong on our side —
//! not ready, overloaded, a lookup over its budget, a body we cannot read — the request
//! continues to the model: semcache may only speed a request up, never fail it. Only a
//! stream without a valid key is refused, with a gRPC status, so that Envoy's own
//! failure mode decides.
//!
//! Per route of the gateway (its `initial_metadata`), a request can also pass guards
//! (blocked: a 403 in OpenAI's error shape; guards that cannot run fail closed unless the
//! route says open) and a router (`x-semcache-route`, and the body's `model` rewritten
//! when the route's metadata names one) before the cache lookup — all on one embedding
//! of the prompt.

mod exchange;
mod proto;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    ProcessingRequest, ProcessingResponse,
};
use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::Limits;
use crate::auth::{Key, KeyRing};
use crate::cache::CacheService;
use crate::metrics::metrics;
use crate::routing::RoutingService;
use exchange::Exchange;

/// gRPC metadata naming the cache, set by the operator per route (`initial_metadata`).
pub const CACHE_METADATA: &str = "x-semcache-cache-id";
/// gRPC metadata keys with this prefix become scope attributes (`meta.<rest>`).
pub const SCOPE_METADATA_PREFIX: &str = "x-semcache-scope-";
/// gRPC metadata naming the guards a route's requests pass, comma-separated, in order.
pub const GUARDS_METADATA: &str = "x-semcache-guards";
/// `last-user-message` (default) or `all-user-messages`.
pub const GUARD_SCOPE_METADATA: &str = "x-semcache-guard-scope";
/// `closed` (default: a request the guards could not check is refused) or `open`.
pub const GUARD_FAILURE_METADATA: &str = "x-semcache-guard-failure";
/// gRPC metadata naming the router for a route's requests.
pub const ROUTER_METADATA: &str = "x-semcache-router";

/// How the gateway edge finds caches and scopes, and its limits.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Request header naming the cache, when the stream's metadata does not.
    pub cache_header: String,
    /// Cache used when neither metadata nor header names one.
    pub default_cache: String,
    /// Request headers whose values scope answers (e.g. a tenant id set by the gateway).
    pub scope_headers: Vec<String>,
    /// A lookup slower than this lets the request go on to the model.
    pub lookup_timeout: Duration,
    /// Guards waiting longer than this for the prompt's embedding have failed.
    pub guard_timeout: Duration,
    /// Streams without a key are let in (as writers) even when keys are on.
    pub allow_anonymous: bool,
    pub limits: Limits,
}

/// What every stream shares.
pub struct Shared {
    pub core: Arc<OnceLock<Arc<CacheService>>>,
    pub routing: Arc<OnceLock<Arc<RoutingService>>>,
    pub options: GatewayOptions,
    keys: KeyRing,
}

/// Who opened a stream and what the operator's metadata says about it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    key: Option<Key>,
    cache_id: Option<String>,
    scope: BTreeMap<String, String>,
    guards: Vec<String>,
    guard_all_messages: bool,
    guard_fail_open: bool,
    router: Option<String>,
}

pub struct Processor {
    shared: Arc<Shared>,
}

impl Processor {
    pub fn new(
        core: Arc<OnceLock<Arc<CacheService>>>,
        routing: Arc<OnceLock<Arc<RoutingService>>>,
        options: GatewayOptions,
        keys: KeyRing,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                core,
                routing,
                options,
                keys,
            }),
        }
    }

    fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
        let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        let mut caller = Caller {
            cache_id: text(CACHE_METADATA).map(str::to_string),
            guards: text(GUARDS_METADATA)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect(),
            router: text(ROUTER_METADATA)
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_string),
            ..Caller::default()
        };
        // A misspelt setting must not weaken a guard: refuse the stream, loudly.
        caller.guard_all_messages = match text(GUARD_SCOPE_METADATA).map(str::trim) {
            None | Some("last-user-message") => false,
            Some("all-user-messages") => true,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                "{GUARD_SCOPE_METADATA} is last-user-message or all-user-messages, not `{other}`"
            )))
            }
        };
        caller.guard_fail_open = match text(GUARD_FAILURE_METADATA).map(str::trim) {
            None | Some("closed") => false,
            Some("open") => true,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "{GUARD_FAILURE_METADATA} is closed or open, not `{other}`"
                )))
            }
        };
        let presented = text("authorization");
        let anonymous = presented.is_none() && self.shared.options.allow_anonymous;
        if self.shared.keys.enabled() && !anonymous {
            let key = presented
                .and_then(crate::auth::bearer)
                .and_then(|k| self.shared.keys.find(k));
            match key {
                Some(key) => caller.key = Some(key),
                None => return Err(Status::unauthenticated(
                    "an ext_proc stream needs `authorization: Bearer <key>` in its gRPC metadata",
                )),
            }
        }
        for entry in metadata.iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(name, value) = entry {
                if let (Some(rest), Ok(value)) = (
                    name.as_str().strip_prefix(SCOPE_METADATA_PREFIX),
                    value.to_str(),
                ) {
                    caller
                        .scope
                        .insert(format!("meta.{rest}"), value.to_string());
                }
            }
        }
        Ok(caller)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Processor {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let caller = match self.caller(request.metadata()) {
            Ok(caller) => caller,
            Err(status) => {
                let why = if status.code() == tonic::Code::Unauthenticated {
                    "unauthenticated"
                } else {
                    "invalid"
                };
                metrics().ext_proc_streams.with_label_values(&[why]).inc();
                return Err(status);
            }
        };
        metrics().ext_proc_streams.with_label_values(&["ok"]).inc();
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = self.shared.clone();
        let span = tracing::info_span!(
            "ext_proc",
            cache = tracing::field::Empty,
            route = tracing::field::Empty,
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
            similarity = tracing::field::Empty,
        );
        tokio::spawn(
            async move {
                let active = &metrics().ext_proc_active;
                active.inc();
                let mut exchange = Exchange::new(shared.clone(), caller);
                while let Some(message) = inbound.next().await {
                    let Ok(message) = message else {
                        // Envoy went away (client reset, timeout): nothing to answer.
                        break;
                    };
                    match exchange.handle(message).await {
                        Ok((reply, job)) => {
                            if tx.send(Ok(reply)).await.is_err() {
                                break;
                            }
                            if let Some(job) = job {
                                // The answer has gone on to the client; store it beside.
                                tokio::spawn(job.run(shared.clone()).in_current_span());
                            }
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    }
                }
                active.dec();
                let span = tracing::Span::current();
                let o = &exchange.outcome;
                span.record("cache", o.cache_id.as_str());
                span.record("outcome", o.outcome);
                span.record("reason", o.reason);
                if let Some(route) = &exchange.route {
                    span.record("route", route.as_str());
                }
                if let Some(s) = o.similarity {
                    span.record("similarity", s);
                }
                tracing::info!("ext_proc stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Largest ext_proc message accepted: a buffered body up to Envoy's buffer limit.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The health of the server as a whole ("") and of the ExternalProcessor service by name.
async fn report(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health.set_service_status("", status).await;
    let name = <ExternalProcessorServer<Processor> as tonic::server::NamedService>::NAME;
    health.set_service_status(name, status).await;
}

/// Serves ext_proc on `listener` until `stop` resolves; in-flight streams finish first.
pub async fn serve(
    listener: TcpListener,
    processor: Processor,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            // Each message is small and answered at once: do not wait to coalesce.
            let _ = s.set_nodelay(true);
        })
    });
    // grpc.health.v1, for Envoy's gRPC health checks of the semcache cluster: NOT_SERVING
    // until the model and indexes are loaded (a starting replica would only answer
    // "continue"), then SERVING.
    let (health, health_service) = tonic_health::server::health_reporter();
    report(&health, tonic_health::ServingStatus::NotServing).await;
    let core = processor.shared.core.clone();
    tokio::spawn(async move {
        while core.get().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report(&health, tonic_health::ServingStatus::Serving).await;
    });
    let service = ExternalProcessorServer::new(processor)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}
