//! `semcache serve`: bind first, load in the background, drain on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::auth::KeyRing;
use crate::cache::{CacheService, SaveWhen};
use crate::collections::CollectionService;
use crate::routing::{RoutingConfig, RoutingService};

/// The cores start-up builds, in the order the edges need them.
type Cores = (CacheService, CollectionService, RoutingService);
use crate::config::ServeArgs;
use crate::embed::{self, manifest::ModelManifest, provision, Embedder};
use crate::gateway;
use crate::store::{Store, StoreOptions};

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // The store opens first so a locked or newer-format data dir fails fast and clearly.
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let keys = KeyRing::load(args.api_keys.as_deref())?;
    if !keys.enabled() {
        for addr in std::iter::once(args.addr).chain(args.ext_proc_addr) {
            if !addr.ip().is_loopback() && !args.insecure_no_auth {
                anyhow::bail!(
                    "refusing to listen on {addr} without API keys: give --api-keys PATH, or --insecure-no-auth if something else guards this port"
                );
            }
        }
        tracing::warn!("no API keys configured: every client may read and write every cache");
    }
    let store = Store::open_with(
        &args.data_dir,
        StoreOptions {
            min_free_bytes: args.min_free_disk_bytes,
            cache_bytes: args.store_cache_bytes,
        },
    )?;
    let state = AppState::new(args.limits());
    let ext_proc = match args.ext_proc_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for ext_proc on {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, "Envoy ext_proc (gRPC) listening");
            println!("semcache ext_proc listening on {local}");
            Some(listener)
        }
        None => None,
    };
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, data_dir = %args.data_dir.display(), "listening; /readyz turns 200 once the model and indexes are loaded");
    // Machine-readable line for supervisors and tests that bind port 0.
    println!("semcache listening on {local}");

    // A failed start-up (no model, bad device) stops the server with its reason,
    // rather than leaving it answering 503 forever.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    {
        let (args, store, state) = (args.clone(), store.clone(), state.clone());
        tokio::spawn(async move {
            if let Err(e) = load(args, store, state).await {
                let _ = failed_tx.send(e);
            }
        });
    }
    let failure = Arc::new(std::sync::Mutex::new(None));
    // One stop for both edges.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let failure = failure.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                Ok(e) = failed_rx => {
                    tracing::error!(error = %format!("{e:#}"), "start-up failed");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let ext_proc = ext_proc.map(|listener| {
        let processor = gateway::Processor::new(
            state.core_cell(),
            state.routing_cell(),
            args.gateway_options(),
            keys.clone(),
        );
        tokio::spawn(gateway::serve(listener, processor, stopped()))
    });

    let sweeper = {
        let state = state.clone();
        let every = Duration::from_millis(args.sweep_interval_millis.max(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Ok(core) = state.core() {
                    if let Err(e) = core.maintain().await {
                        tracing::warn!(error = %e, "background maintenance failed");
                    }
                }
                if let Ok(collections) = state.collections() {
                    if let Err(e) = collections.maintain().await {
                        tracing::warn!(error = %e, "collection maintenance failed");
                    }
                }
            }
        })
    };

    #[cfg(unix)]
    {
        let keys = keys.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                match keys.reload() {
                    Ok(n) => tracing::info!(keys = n, "API keys reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "API key reload failed; the previous keys stay in force")
                    }
                }
            }
        });
    }

    axum::serve(listener, api::router(state.clone(), keys))
        .with_graceful_shutdown(stopped())
        .await
        .context("server failed")?;
    if let Some(ext_proc) = ext_proc {
        match ext_proc.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "ext_proc server failed"),
            Err(e) => tracing::warn!(error = %e, "ext_proc server task failed"),
        }
    }
    sweeper.abort();
    if let Ok(core) = state.core() {
        // The next start loads these graphs instead of re-inserting every vector.
        match core.save_indexes(SaveWhen::Changed).await {
            Ok(n) => tracing::info!(caches = n, "indexes saved"),
            Err(e) => tracing::warn!(error = %e, "indexes not saved; the next start rebuilds them"),
        }
    }
    if let Ok(collections) = state.collections() {
        let n = collections.save_indexes(SaveWhen::Changed).await;
        tracing::info!(collections = n, "collection indexes saved");
    }
    tracing::info!("drained; flushing the store");
    store.flush_blocking()?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e.context("start-up failed"));
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn load(args: ServeArgs, store: Store, state: AppState) -> anyhow::Result<()> {
    let manifest = ModelManifest::default_model();
    let model_dir = args.model.dir();
    state.set_phase("fetching model");
    let files =
        tokio::task::spawn_blocking(move || provision::ensure(&manifest, &model_dir)).await??;
    state.set_phase("loading model");
    let queue = args.queue_options();
    let device_choice = args.device;
    let mut config = args.cache_config();
    let collection_config = args.collection_config();
    let adapter_choice = args.adapter.clone();
    let threshold_given = args.similarity_threshold.is_some();
    let cores = tokio::task::spawn_blocking(move || -> anyhow::Result<Cores> {
        let manifest = ModelManifest::default_model();
        let recorded = store.embedding_space()?;
        let adapter = embed::adapter::for_store(
            adapter_choice,
            recorded.clone(),
            store.holds_vectors(),
            &manifest.name,
        )?;
        // An adapter moves similarities: its own default threshold keeps the precision
        // of the base model's default.
        if let Some(threshold) = adapter.as_ref().and_then(|a| a.threshold) {
            if !threshold_given {
                config.similarity_threshold = threshold;
            }
        }
        let device = embed::select_device(device_choice)?;
        let embedder = Embedder::start(&manifest, &files, adapter.as_ref(), &device, queue)?;
        let space = embedder.info().space();
        if recorded.as_deref() != Some(space.as_str()) {
            store.set_embedding_space(&space)?;
        }
        tracing::info!(model = %manifest.name, adapter = embedder.info().adapter.as_deref().unwrap_or("none"), device = ?device, "model loaded");
        let collections =
            CollectionService::open(store.clone(), embedder.clone(), collection_config)?;
        let routing =
            RoutingService::open(store.clone(), embedder.clone(), RoutingConfig::default())?;
        let cache = CacheService::open(store, embedder, config)?;
        Ok((cache, collections, routing))
    })
    .await??;
    let (cache, collections, routing) = cores;
    state.set_core(Arc::new(cache), Arc::new(collections), Arc::new(routing));
    tracing::info!("ready");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}
