//! Fixtures the test trees share: the real model's path and a PostgreSQL schema of a test's
//! own (the gateway's tests in `router/tests` and the end-to-end tests here both use them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// Path of the real SmolLM2 model (`CASCADE_TEST_MODEL` overrides it); panics, saying how
/// to fetch it, when it is missing.
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("CASCADE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    path
}

/// A PostgreSQL schema of its own on the test server (`CASCADE_TEST_POSTGRES_URL`), so that
/// tests never see each other's tables; dropped with [`PgSchema::drop`].
pub struct PgSchema {
    /// The server's URL as configured.
    pub base: String,
    /// The schema's name.
    pub name: String,
    admin: sqlx::PgPool,
}

impl PgSchema {
    /// Creates a schema named after `prefix`, this process and the time.
    pub async fn create(prefix: &str) -> Self {
        let base = std::env::var("CASCADE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&base)
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE SCHEMA {name}"))
            .execute(&admin)
            .await
            .unwrap();
        Self { base, name, admin }
    }

    /// `server_url` (the test server, or a way to it) with this schema as the search path.
    pub fn url_via(&self, server_url: &str) -> String {
        let separator = if server_url.contains('?') { '&' } else { '?' };
        format!(
            "{server_url}{separator}options=-c%20search_path%3D{}",
            self.name
        )
    }

    /// The test server's URL with this schema as the search path.
    pub fn url(&self) -> String {
        self.url_via(&self.base)
    }

    /// Drops the schema and everything in it.
    pub async fn drop(self) {
        sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}
