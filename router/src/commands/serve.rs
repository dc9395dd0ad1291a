//! `cascade serve`: the gateway.

use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::local::LocalEngine;
use crate::server::RunningServer;

/// Loads the configuration, starts listening at once (`/readyz` says when
/// the model is loaded), loads the model, and serves until Ctrl-C/SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let mut server = RunningServer::start(&config).await?;
    tracing::info!(
        addr = %server.addr,
        model = %config.local.model,
        remotes = config.remotes.len(),
        "listening; loading the local model"
    );
    let state = Arc::clone(&server.state);
    let local_config = config.local.clone();
    let mut loading = tokio::task::spawn_blocking(move || LocalEngine::start(&local_config));
    let mut loaded = false;
    loop {
        tokio::select! {
            result = &mut loading, if !loaded => {
                loaded = true;
                let engine = result.context("the model loading task failed")??;
                tracing::info!(name = engine.name(), context_window = engine.context_window(), "local model ready");
                state.gateway.attach_local(engine);
            }
            () = shutdown_signal() => {
                tracing::info!("shutting down");
                server.stop();
                break;
            }
        }
    }
    server.wait().await.context("server failed")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
