//! semcache: a semantic cache for AI gateways.
//!
//! Layers point one way: [`api`] (HTTP) → [`cache`] (scope, exact and semantic lookup,
//! expiry) → the engines [`embed`], [`index`] and [`store`], which know nothing of HTTP
//! or of each other. [`config`] turns flags into each layer's settings; [`server`] wires
//! them together.

pub mod admin;
pub mod api;
pub mod cache;
pub mod config;
pub mod embed;
pub mod eval;
pub mod index;
pub mod metrics;
pub mod server;
pub mod store;
