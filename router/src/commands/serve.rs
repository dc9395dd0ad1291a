//! `cascade serve`: the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use crate::app::RunningServer;
use crate::cascade::local::LocalEngine;
use crate::cli::ServeArgs;
use crate::config::Config;

/// Loads the configuration, starts listening at once (`/readyz` says when
/// the model is loaded), loads the model, and serves until Ctrl-C/SIGTERM (then drains
/// gracefully); SIGHUP reloads the policy and price sections of the configuration.
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
    runtime.block_on(serve(config, args.config.clone()))
}

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let server = RunningServer::start(&config).await?;
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
    let mut signals = Signals::new()?;
    loop {
        tokio::select! {
            result = &mut loading, if !loaded => {
                loaded = true;
                let engine = result.context("the model loading task failed")??;
                tracing::info!(name = engine.name(), context_window = engine.context_window(), "local model ready");
                state.gateway.attach_local(engine);
            }
            signal = signals.next() => match signal {
                Signal::Reload => reload(&state, path.as_deref()),
                Signal::Stop => break,
            },
        }
    }
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: no new connections, finishing requests in flight");
    let report = server.drain(config.server.shutdown_grace).await;
    if report.clean() {
        tracing::info!("shut down cleanly: every request finished, settled and recorded");
    } else {
        tracing::warn!(
            finished_in_time = report.finished_in_time,
            unsettled_reservations = report.unsettled,
            unwritten_records = report.unwritten,
            "shut down with work left (unsettled reservations are released after their TTL)"
        );
    }
    Ok(())
}

/// Re-reads the configuration file and applies its policy and price sections; a file that
/// does not validate is refused and the running configuration stays.
fn reload(state: &crate::app::AppState, path: Option<&Path>) {
    let result = Config::load(path)
        .map_err(crate::app::ReloadError::from)
        .and_then(|config| state.reload(&config));
    match result {
        Ok(()) => {
            state
                .metrics
                .config_reloads
                .with_label_values(&["ok"])
                .inc();
            tracing::info!("configuration reloaded (policies and prices)");
        }
        Err(e) => {
            state
                .metrics
                .config_reloads
                .with_label_values(&["refused"])
                .inc();
            tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
        }
    }
}

/// What a signal asks of the server.
enum Signal {
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGTERM or Ctrl-C: shut down gracefully.
    Stop,
}

/// The process signals the server reacts to.
struct Signals {
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                hangup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) -> Signal {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        {
            tokio::select! {
                () = ctrl_c => Signal::Stop,
                _ = self.terminate.recv() => Signal::Stop,
                _ = self.hangup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            ctrl_c.await;
            Signal::Stop
        }
    }
}
