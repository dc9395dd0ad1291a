//! Storage errors, classified so callers can tell "try again / fail over" from "a bug".

/// Everything the storage layer can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A budget scope has no room for the requested reservation; nothing was reserved anywhere.
    #[error("budget exhausted for scope `{scope}`")]
    BudgetExhausted {
        /// The first scope (in the caller's order) that would have overflowed.
        scope: String,
    },
    /// The referenced request or reservation does not exist.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// What kind of thing was looked up ("request", "reservation").
        what: &'static str,
        /// The id that was looked up.
        id: String,
    },
    /// An argument cannot be stored as given (a value above `i64::MAX`, a score outside [0, 1]).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The storage URL or options are unusable; raised by `connect` only.
    #[error("invalid storage configuration: {0}")]
    Config(String),
    /// The database could not be reached or was too busy; the operation may succeed if retried.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database rejected a write because it broke a constraint of the schema.
    #[error("storage constraint violated: {0}")]
    Constraint(#[source] sqlx::Error),
    /// A schema migration failed; the database is left at the previous version.
    #[error("storage migration {version} failed: {source}")]
    Migration {
        /// The migration that failed.
        version: i64,
        /// Why it failed.
        #[source]
        source: sqlx::Error,
    },
    /// A stored value does not fit the type the API promises (e.g. a negative token count).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("storage error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StorageError {
    /// Whether retrying the same call later (or on another replica) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => Self::Unavailable(err),
            sqlx::Error::Configuration(_) => Self::Config(err.to_string()),
            sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
                Self::Corrupt(err.to_string())
            }
            sqlx::Error::Database(db) => {
                if db.is_unique_violation()
                    || db.is_foreign_key_violation()
                    || db.is_check_violation()
                    || matches!(db.kind(), sqlx::error::ErrorKind::NotNullViolation)
                {
                    Self::Constraint(err)
                } else if is_transient_database_error(db.as_ref()) {
                    Self::Unavailable(err)
                } else {
                    Self::Database(err)
                }
            }
            _ => Self::Database(err),
        }
    }
}

/// Whether a database error means "not now" rather than "never": SQLite's busy, locked and
/// I/O family, PostgreSQL's connection, resource, shutdown, serialization and deadlock classes.
fn is_transient_database_error(db: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    let Some(code) = db.code() else {
        return false;
    };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // SQLite reports the numeric extended result code; its low byte is the primary code.
        const BUSY: u32 = 5;
        const LOCKED: u32 = 6;
        const NOMEM: u32 = 7;
        const READONLY: u32 = 8;
        const IOERR: u32 = 10;
        const FULL: u32 = 13;
        const CANTOPEN: u32 = 14;
        return code.parse::<u32>().is_ok_and(|extended| {
            matches!(
                extended & 0xff,
                BUSY | LOCKED | NOMEM | READONLY | IOERR | FULL | CANTOPEN
            )
        });
    }
    // PostgreSQL SQLSTATE.
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
}
