//! The schema's migrations, embedded in the binary so an installed `cascade` needs no SQL
//! files at run time (sqlx's `migrate!` would need its `macros` feature, and
//! `Migrator::new(path)` reads files from disk). They are applied by `common/migrate.rs`.
//!
//! Each backend has its own SQL because the dialects differ in types (SQLite `INTEGER` in
//! `STRICT` tables, PostgreSQL `BIGINT`), but both lists must hold the same versions with the
//! same meaning. Never edit a released migration: add the next version.

/// One schema change, applied once, inside the same transaction as its bookkeeping row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// Applied in increasing order; recorded in `schema_migrations.version`.
    pub(crate) version: i64,
    /// A few words on what it changes, recorded alongside the version.
    pub(crate) description: &'static str,
    /// The statements, run as one script.
    pub(crate) sql: &'static str,
}

/// Creates the bookkeeping table; valid SQL for both backends.
pub(crate) const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
    version BIGINT PRIMARY KEY NOT NULL, \
    description TEXT NOT NULL, \
    applied_unix_ms BIGINT NOT NULL)";

/// SQLite's migrations.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        description: "ledger and budget reservations",
        sql: include_str!("migrations/sqlite/0001_ledger_and_budgets.sql"),
    },
    Migration {
        version: 2,
        description: "ledger overrun_nanos",
        sql: include_str!("migrations/sqlite/0002_ledger_overrun.sql"),
    },
    Migration {
        version: 3,
        description: "request_signals",
        sql: include_str!("migrations/sqlite/0003_request_signals.sql"),
    },
];

/// PostgreSQL's migrations.
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        description: "ledger and budget reservations",
        sql: include_str!("migrations/postgres/0001_ledger_and_budgets.sql"),
    },
    Migration {
        version: 2,
        description: "ledger overrun_nanos",
        sql: include_str!("migrations/postgres/0002_ledger_overrun.sql"),
    },
    Migration {
        version: 3,
        description: "request_signals",
        sql: include_str!("migrations/postgres/0003_request_signals.sql"),
    },
];

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migration_versions_in_increasing_order() {
        let versions = |list: &[Migration]| list.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(SQLITE), versions(POSTGRES));
        assert!(versions(SQLITE).windows(2).all(|w| w[0] < w[1]));
        assert!(SQLITE
            .iter()
            .chain(POSTGRES)
            .all(|m| !m.sql.trim().is_empty()));
    }
}
