//! The request ledger as the gateway writes it: one record per request, committed before
//! the response completes (a JSON body is sent after its record is durable; a stream's last
//! event after its record is durable), so a crash can lose a request in flight but never one
//! a client saw finish.
//!
//! When the database refuses a batch for a transient reason (locked, read-only, unreachable),
//! the writer appends it to the spool file instead (see [`crate::ledger::spool`]) and a replay task
//! writes it into the database once it works again; with no spool (`fail_closed`) the write
//! fails and the caller withholds the answer.
//!
//! Records go through one writer task that commits whatever has queued up meanwhile in a
//! single transaction (group commit): under load many requests share one fsync instead of
//! queueing for one each, and each request still waits until its own record is durable.

pub mod spool;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use policies::NanoUsd;
use tokio::sync::{mpsc, oneshot};

use crate::ledger::spool::Spool;
use crate::metrics::Metrics;
use crate::reload::SharedPolicies;
use crate::storage::{LedgerRecord, Storage, StorageError};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 256;
/// Records waiting for the writer before callers wait to enqueue (backpressure).
const QUEUE: usize = 4096;
/// How often the replay task looks for spooled records (a memory read when there are none).
const REPLAY_PERIOD: Duration = Duration::from_secs(1);

/// A record waiting for its commit, and who to tell.
struct Pending {
    record: LedgerRecord,
    done: oneshot::Sender<Result<(), LedgerError>>,
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger writer has stopped")]
    Stopped,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the database refused the record and the spool could not keep it: {0}")]
    Spool(String),
}

/// Writes ledger records and keeps the spend metrics.
pub struct Ledger {
    queue: mpsc::Sender<Pending>,
    /// Where records go while the database refuses them; `None` fails closed.
    spool: Option<Arc<Spool>>,
    policies: SharedPolicies,
    metrics: Arc<Metrics>,
    /// Records handed to the ledger and not yet written (or failed); shutdown waits for 0.
    pending: Arc<AtomicUsize>,
}

impl Ledger {
    /// Starts the writer task on the current runtime. It ends when the last `Ledger` is
    /// dropped, after writing what was queued. With a spool, records the database refuses
    /// for a transient reason are spooled, and a replay task writes them back later.
    pub fn start(
        storage: Storage,
        policies: SharedPolicies,
        metrics: Arc<Metrics>,
        spool: Option<Arc<Spool>>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        if let Some(spool) = &spool {
            tokio::spawn(replay_loop(storage.clone(), Arc::downgrade(spool)));
        }
        let writer = Writer {
            storage,
            spool: spool.clone(),
            metrics: Arc::clone(&metrics),
        };
        tokio::spawn(writer.run(rx));
        Self {
            queue,
            spool,
            policies,
            metrics,
            pending: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether a record that cannot be written fails its request (no spool).
    pub fn fails_closed(&self) -> bool {
        self.spool.is_none()
    }

    /// The price tables records are costed with (the live ones: a reload reaches them).
    pub fn policies(&self) -> Arc<policies::Policies> {
        self.policies.load()
    }

    /// Records not yet written.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Writes a record in the background (a client that left does not wait), counted as
    /// pending from this call on so that shutdown waits for it.
    pub fn write_detached(self: Arc<Self>, record: LedgerRecord) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(request_id = %record.id, "no runtime to write the ledger record");
            return;
        };
        handle.spawn(async move {
            let id = record.id.clone();
            if let Err(e) = self.write_counted(record).await {
                tracing::error!(request_id = %id, error = %e, "ledger record of an abandoned request not written");
            }
            self.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Writes a record and returns once it is durable.
    pub async fn write(&self, record: LedgerRecord) -> Result<(), LedgerError> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let result = self.write_counted(record).await;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn write_counted(&self, record: LedgerRecord) -> Result<(), LedgerError> {
        let (done, wait) = oneshot::channel();
        let cost = NanoUsd(record.cost_nanos).usd();
        if let (true, Some(upstream)) = (record.overrun_nanos > 0, &record.remote_model) {
            tracing::warn!(
                request_id = %record.id,
                %upstream,
                overrun_nanos = record.overrun_nanos,
                "the remote billed more than the worst case reserved for the call"
            );
            self.metrics
                .spend_overrun
                .with_label_values(&[upstream])
                .inc_by(record.overrun_nanos);
        }
        let labels = (
            record.team.clone(),
            record.experiment.clone(),
            record.variant.clone(),
        );
        self.queue
            .send(Pending { record, done })
            .await
            .map_err(|_| LedgerError::Stopped)?;
        let result = wait.await.map_err(|_| LedgerError::Stopped)?;
        if let Err(e) = result {
            self.metrics.ledger_errors.inc();
            return Err(e);
        }
        let (team, experiment, variant) = labels;
        if let Some(team) = team {
            self.metrics
                .team_spend
                .with_label_values(&[&team])
                .inc_by(cost);
        }
        if let (Some(experiment), Some(variant)) = (experiment, variant) {
            self.metrics
                .variant_requests
                .with_label_values(&[&experiment, &variant])
                .inc();
            self.metrics
                .variant_cost
                .with_label_values(&[&experiment, &variant])
                .inc_by(cost);
        }
        Ok(())
    }
}

/// The writer task's state.
struct Writer {
    storage: Storage,
    spool: Option<Arc<Spool>>,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Commits queued records in batches until every sender is gone.
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let records: Vec<LedgerRecord> = batch.iter().map(|p| p.record.clone()).collect();
            match self.storage.record_batch(&records).await {
                Ok(()) => {
                    for pending in batch.drain(..) {
                        let _ = pending.done.send(Ok(()));
                    }
                }
                // The database is not taking writes now: spool the whole batch (one fsync)
                // rather than wait on each record in turn.
                Err(e) if e.is_transient() && self.spool.is_some() => {
                    tracing::warn!(error = %e, records = records.len(), "ledger database unavailable; spooling");
                    let result = self.spool_records(&records).await;
                    for pending in batch.drain(..) {
                        let _ = pending
                            .done
                            .send(result.clone().map_err(LedgerError::Spool));
                    }
                }
                // One bad record (or a transient failure) must not fail the others: write
                // them one by one and report each its own outcome.
                Err(_) => {
                    for pending in batch.drain(..) {
                        let result = self.write_one(&pending.record).await;
                        if let Err(e) = &result {
                            tracing::error!(request_id = %pending.record.id, error = %e, "cannot write the ledger record");
                        }
                        let _ = pending.done.send(result);
                    }
                }
            }
        }
    }

    async fn write_one(&self, record: &LedgerRecord) -> Result<(), LedgerError> {
        match self.storage.record(record).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_transient() && self.spool.is_some() => self
                .spool_records(std::slice::from_ref(record))
                .await
                .map_err(LedgerError::Spool),
            Err(e) => Err(e.into()),
        }
    }

    async fn spool_records(&self, records: &[LedgerRecord]) -> Result<(), String> {
        let Some(spool) = &self.spool else {
            return Err("no spool is configured".into());
        };
        spool.append(records).await.map_err(|e| e.to_string())?;
        self.metrics.ledger_spooled.inc_by(records.len() as u64);
        Ok(())
    }
}

/// Writes spooled records into the database whenever there are some and it takes them;
/// ends when the ledger (the spool's owner) is gone.
async fn replay_loop(storage: Storage, spool: Weak<Spool>) {
    let mut tick = tokio::time::interval(REPLAY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(spool) = spool.upgrade() else {
            return;
        };
        if !spool.has_pending() {
            continue;
        }
        match spool.replay(&storage).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "replayed the ledger spool into the database"),
            Err(e) => tracing::debug!(error = %e, "ledger spool not replayed yet"),
        }
    }
}
