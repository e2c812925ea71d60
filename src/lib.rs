//! semcache: a semantic cache for AI gateways.
//!
//! Layers point one way: the edges [`api`] (HTTP) and [`gateway`] (Envoy ext_proc) → the
//! cores [`cache`] (scope, exact and semantic lookup, expiry), [`collections`]
//! (Qdrant-style points and filtered search) and [`routing`] (semantic routers) →
//! [`vectors`] (persisted, named HNSW sets, which caches and collections are) → the engines [`embed`], [`index`] and [`store`], which know
//! nothing of HTTP or of each other. [`config`] turns flags into each layer's settings;
//! [`server`] wires them together.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cache;
pub mod collections;
pub mod config;
pub mod embed;
pub mod eval;
pub mod gateway;
pub mod index;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod store;
pub mod vectors;

/// One allocator for the server and for the tests and in-process benches that measure it.
/// mimalloc over glibc's malloc, measured restarting 1,000,000 entries (BENCHMARKS.md):
/// hnsw_rs allocates two small objects per graph link, and glibc spent ~15% of the load
/// in malloc/free and ~48 bytes per 32-byte link. Built without transparent huge pages:
/// on the VMs measured, first touches of huge pages cost twice as much as of 4 KiB pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
