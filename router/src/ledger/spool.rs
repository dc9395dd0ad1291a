//! The ledger spool: records the database could not take, kept in a JSONL file (one record
//! per line, fsynced before the request is answered) until they can be replayed into it.
//!
//! Replaying is idempotent (the ledger ignores a second record with the same id), so a replay
//! cut short, or one that races a record already written, cannot double-count a request. The
//! file is truncated only after every record in it has been committed.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Mutex;

use crate::storage::{LedgerRecord, Storage, StorageError};

/// Records replayed per transaction.
const REPLAY_BATCH: usize = 256;

/// Why spooling or replaying failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("ledger spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger spool: cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("ledger spool: the file task failed: {0}")]
    Task(String),
    #[error("ledger spool replay: {0}")]
    Storage(#[from] StorageError),
}

/// The spool file of one gateway.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    /// Appends and replays take turns, so a truncation never drops a record appended
    /// while the replay ran.
    lock: Mutex<()>,
    /// Whether the file may hold records (checked by the replay loop without touching disk).
    pending: AtomicBool,
}

impl Spool {
    /// The spool at `path`; a file left over from an earlier run counts as pending.
    pub fn new(path: PathBuf) -> Self {
        let pending = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        Self {
            path,
            lock: Mutex::new(()),
            pending: AtomicBool::new(pending),
        }
    }

    /// Where the spool file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether records may be waiting for a replay.
    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Appends records and returns once they are on disk (fsynced).
    pub async fn append(&self, records: &[LedgerRecord]) -> Result<(), SpoolError> {
        let mut lines = Vec::new();
        for record in records {
            serde_json::to_writer(&mut lines, record)?;
            lines.push(b'\n');
        }
        let _turn = self.lock.lock().await;
        let path = self.path.clone();
        run_blocking(move || append_lines(&path, &lines)).await?;
        self.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes every spooled record into `storage`, then removes them from the file. Returns
    /// how many records were replayed; on a storage error the file is kept whole (what was
    /// already committed is ignored by the next replay). Lines that are not records (a write
    /// torn by a crash) are moved to `<spool>.rejected` rather than lost or retried forever.
    ///
    /// The file is locked only to read it and to cut what was replayed, not while the
    /// database is written (which can wait out a busy timeout), so appends are not held up.
    pub async fn replay(&self, storage: &Storage) -> Result<usize, SpoolError> {
        let (lines, consumed) = {
            let _turn = self.lock.lock().await;
            let path = self.path.clone();
            run_blocking(move || read_lines(&path)).await?
        };
        if lines.is_empty() {
            return Ok(0);
        }
        let mut records = Vec::with_capacity(lines.len());
        let mut rejected = Vec::new();
        for line in lines {
            match serde_json::from_str::<LedgerRecord>(&line) {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable line in the ledger spool; set aside");
                    rejected.extend_from_slice(line.as_bytes());
                    rejected.push(b'\n');
                }
            }
        }
        for batch in records.chunks(REPLAY_BATCH) {
            if let Err(e) = storage.record_batch(batch).await {
                if e.is_transient() {
                    return Err(e.into());
                }
                // One record the database will never take must not block the others.
                for record in batch {
                    match storage.record(record).await {
                        Ok(()) => {}
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => {
                            tracing::error!(request_id = %record.id, error = %e, "spooled record refused by the database; set aside");
                            serde_json::to_writer(&mut rejected, record)?;
                            rejected.push(b'\n');
                        }
                    }
                }
            }
        }
        let _turn = self.lock.lock().await;
        let path = self.path.clone();
        let left = run_blocking(move || {
            if !rejected.is_empty() {
                append_lines(&rejected_path(&path), &rejected)?;
            }
            cut_prefix(&path, consumed)
        })
        .await?;
        self.pending.store(left > 0, Ordering::Release);
        Ok(records.len())
    }
}

/// Where records the database refuses for good are kept for a person to look at.
fn rejected_path(spool: &Path) -> PathBuf {
    let mut name = spool.as_os_str().to_owned();
    name.push(".rejected");
    PathBuf::from(name)
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn append_lines(path: &Path, lines: &[u8]) -> Result<(), SpoolError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_error(path))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(lines).map_err(io_error(path))?;
    // The answer goes out only after its record is durable, here as in the database.
    file.sync_data().map_err(io_error(path))
}

/// The non-empty lines of the file, and how many bytes they were read from.
fn read_lines(path: &Path) -> Result<(Vec<String>, u64), SpoolError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_error(path)(e)),
    };
    let mut lines = Vec::new();
    for line in bytes.lines() {
        let line = line.map_err(io_error(path))?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    Ok((lines, bytes.len() as u64))
}

/// Removes the first `consumed` bytes (the replayed records; appends only ever add at the
/// end) and returns how many bytes are left. What is left is rewritten to a new file that
/// replaces the old one only once it is durable.
fn cut_prefix(path: &Path, consumed: u64) -> Result<u64, SpoolError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let start = usize::try_from(consumed)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let rest = &bytes[start..];
    if rest.is_empty() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        file.set_len(0).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
        return Ok(0);
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(rest).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    Ok(rest.len() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(id: &str) -> LedgerRecord {
        LedgerRecord {
            id: id.into(),
            created_unix_ms: 1,
            team: Some("alpha".into()),
            key_id: None,
            experiment: None,
            variant: None,
            route: "remote".into(),
            reason: "model_requested".into(),
            confidence: None,
            confidence_aggregate: None,
            local_tokens: 0,
            remote_model: Some("big".into()),
            remote_input_tokens: 3,
            remote_output_tokens: 4,
            cost_nanos: 11,
            latency_ms: 5,
            status: 200,
            prompt_text: None,
            overrun_nanos: 0,
            signals: None,
        }
    }

    #[tokio::test]
    async fn spooled_records_are_replayed_once_and_the_file_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        let spool = Spool::new(path.clone());
        assert!(!spool.has_pending());
        // "b" carries kept signals: they survive the spool's JSON line exactly.
        let with_signals = LedgerRecord {
            signals: Some(crate::storage::EncodedSignals::encode(
                &[policies::TokenSignal {
                    logprob: f32::NEG_INFINITY,
                    entropy: 0.5,
                    margin: 1.0,
                }],
                None,
            )),
            ..record("b")
        };
        spool
            .append(&[record("a"), with_signals.clone()])
            .await
            .unwrap();
        // A torn last line, as a crash mid-append would leave.
        append_lines(&path, b"{\"id\": \"c\", \"creat").unwrap();
        let storage = crate::storage::in_memory().await;
        // Already written before the fault: the replay must not trip over it.
        storage.record(&record("a")).await.unwrap();
        let reopened = Spool::new(path.clone());
        assert!(
            reopened.has_pending(),
            "a leftover file is pending at start-up"
        );
        assert_eq!(reopened.replay(&storage).await.unwrap(), 2);
        assert_eq!(storage.get_record("b").await.unwrap(), Some(with_signals));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(!reopened.has_pending());
        let rejected = std::fs::read_to_string(rejected_path(&path)).unwrap();
        assert!(rejected.contains("creat"), "{rejected}");
        assert_eq!(reopened.replay(&storage).await.unwrap(), 0);
    }

    #[test]
    fn cutting_the_replayed_prefix_keeps_what_was_appended_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        append_lines(&path, b"old\n").unwrap();
        append_lines(&path, b"new\n").unwrap();
        assert_eq!(cut_prefix(&path, 4).unwrap(), 4);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(cut_prefix(&path, 4).unwrap(), 0);
        assert_eq!(std::fs::read(&path).unwrap().len(), 0);
    }
}
