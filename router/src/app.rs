//! The server's lifecycle: starting the gateway over its storage, binding its listeners, and
//! draining it on shutdown ([`RunningServer`]). What the handlers share is
//! [`crate::http::AppState`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::budget::BudgetGate;
use crate::clock::now_unix_ms as now_ms;
use crate::config::{Config, OnLedgerFailure};
use crate::ledger::spool::Spool;
use crate::ledger::Ledger;
use crate::reload::{Live, SharedPolicies};
use crate::storage::Storage;
use crate::upstream::{CallGate, OpenGate};

use crate::http::{admin_router, router};
pub use crate::http::{AppState, ReloadError, StateError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The handlers' state could not be built (a missing key, a remote's client).
    #[error(transparent)]
    State(#[from] StateError),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Every in-flight request finished within the grace period.
    pub finished_in_time: bool,
    /// Reservations still unsettled at the end (released later by their TTL).
    pub unsettled: usize,
    /// Ledger records not written at the end (lost).
    pub unwritten: usize,
}

impl DrainReport {
    /// Nothing was cut or lost.
    pub fn clean(&self) -> bool {
        self.finished_in_time && self.unsettled == 0 && self.unwritten == 0
    }
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The admin API's own address, when it has one.
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The task that releases expired reservations; stopped with the server.
    expiry: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Opens the storage, binds `config.server.listen` and starts serving with every paid
    /// call reserved against the budgets in storage.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let storage = crate::storage::connect(&config.storage).await?;
        // Records spooled by an earlier run (the database was down when it stopped) go in
        // first, whatever this run's behaviour; a spool that cannot be replayed now stays for
        // the replay task (spool mode) or the next start.
        let spool = Arc::new(Spool::new(config.ledger.spool_path.clone()));
        if spool.has_pending() {
            match spool.replay(&storage).await {
                Ok(n) => {
                    tracing::info!(records = n, path = %spool.path().display(), "replayed the ledger spool left by an earlier run")
                }
                Err(e) => tracing::warn!(error = %e, "cannot replay the ledger spool yet"),
            }
        }
        let spool = (config.ledger.on_failure == OnLedgerFailure::Spool).then_some(spool);
        let policies: SharedPolicies = Arc::new(Live::new(config.policies.clone()));
        let budget = Arc::new(BudgetGate::new(storage.clone(), Arc::clone(&policies)));
        let gate: Arc<dyn CallGate> = Arc::clone(&budget) as Arc<dyn CallGate>;
        let mut server = Self::start_inner(
            config,
            policies,
            gate,
            Some((budget, storage.clone(), spool)),
        )
        .await?;
        // Reservations of requests that died (a crash elsewhere, a lost settle) are released
        // after the TTL; `reserve` does so too, but only when a budget looks full.
        // Kept signals older than the retention are deleted on the same tick (an indexed range
        // delete: nothing to do costs one index probe).
        let period =
            std::time::Duration::from_secs(config.storage.reservation_ttl_secs.clamp(1, 60));
        let retention_ms = config
            .ledger
            .signals_retention
            .map(|r| i64::try_from(r.as_millis()).unwrap_or(i64::MAX));
        server.expiry = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let now = now_ms();
                if let Err(e) = storage.expire_reservations(now).await {
                    tracing::warn!(error = %e, "cannot expire reservations");
                }
                if let Some(retention) = retention_ms {
                    if let Err(e) = storage.forget_signals(now.saturating_sub(retention)).await {
                        tracing::warn!(error = %e, "cannot delete expired request signals");
                    }
                }
            }
        }));
        Ok(server)
    }

    /// Starts serving with the open gate: nothing is reserved or recorded.
    pub async fn start_open(config: &Config) -> Result<Self, StartError> {
        Self::start_with_gate(config, Arc::new(OpenGate)).await
    }

    /// Binds and starts serving with the given call gate.
    pub async fn start_with_gate(
        config: &Config,
        gate: Arc<dyn CallGate>,
    ) -> Result<Self, StartError> {
        let policies: SharedPolicies = Arc::new(Live::new(config.policies.clone()));
        Self::start_inner(config, policies, gate, None).await
    }

    async fn start_inner(
        config: &Config,
        policies: SharedPolicies,
        gate: Arc<dyn CallGate>,
        store: Option<(Arc<BudgetGate>, Storage, Option<Arc<Spool>>)>,
    ) -> Result<Self, StartError> {
        let mut state = AppState::new(config, Arc::clone(&policies), gate)?;
        if let Some((budget, storage, spool)) = store {
            state.ledger = Some(Arc::new(Ledger::start(
                storage.clone(),
                policies,
                Arc::clone(&state.metrics),
                spool,
            )));
            state.budget = Some(budget);
            state.storage = Some(storage);
        }
        let state = Arc::new(state);
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let (shutdown, signal) = oneshot::channel::<()>();
        let signal = futures::FutureExt::shared(async move {
            let _ = signal.await;
        });
        let admin_addr = match config.admin.listen {
            Some(admin) => {
                let listener =
                    TcpListener::bind(admin)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: admin,
                            source,
                        })?;
                let bound = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: admin,
                    source,
                })?;
                let app = admin_router(Arc::clone(&state));
                let stop = signal.clone();
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                    {
                        tracing::error!(error = %e, "admin listener failed");
                    }
                });
                Some(bound)
            }
            None => None,
        };
        let app = router(Arc::clone(&state), admin_addr.is_none());
        // Headers and body may go out in separate writes; without NODELAY,
        // Nagle's algorithm holds the second one back for a delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
        });
        Ok(Self {
            addr,
            admin_addr,
            expiry: None,
            state,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// Stops accepting connections and waits for in-flight requests.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Waits until the server stops (on its own, or after `shutdown`).
    pub async fn wait(mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Graceful shutdown: stops accepting, lets in-flight requests finish for up to `grace`
    /// (then cuts those left, whose records are still written as abandoned), waits for
    /// reservations to settle and the ledger to be written (up to `grace` more), and closes
    /// the database.
    pub async fn drain(mut self, grace: std::time::Duration) -> DrainReport {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let finished_in_time = tokio::time::timeout(grace, &mut self.task).await.is_ok();
        if !finished_in_time {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish in time; cutting them"
            );
            self.task.abort();
            let _ = (&mut self.task).await;
        }
        if let Some(expiry) = self.expiry.take() {
            expiry.abort();
        }
        let state = &self.state;
        let outstanding = || {
            let held = state.budget.as_ref().map_or(0, |b| b.outstanding());
            let pending = state.ledger.as_ref().map_or(0, |l| l.pending());
            (held, pending)
        };
        let deadline = tokio::time::Instant::now() + grace;
        while outstanding() != (0, 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (unsettled, unwritten) = outstanding();
        if let Some(storage) = &state.storage {
            storage.close().await;
        }
        DrainReport {
            finished_in_time,
            unsettled,
            unwritten,
        }
    }

    /// Asks the server to stop without waiting.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
