//! Errors of the store.

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `database.url` is empty.
    #[error("PostgreSQL is not configured: set database.url or DATABASE_URL")]
    NotConfigured,
    /// The database does not answer at start.
    #[error("cannot reach PostgreSQL at {url} ({reason})")]
    Unreachable {
        /// The URL with the password hidden.
        url: String,
        /// The connection error.
        reason: String,
    },
    /// Migrations are not applied.
    #[error(
        "the PostgreSQL schema is missing migrations {}; run `iot-api migrate` (scripts/up does)",
        missing.join(", ")
    )]
    SchemaOutdated {
        /// `version_description` of each missing migration.
        missing: Vec<String>,
    },
    /// Applying migrations failed.
    #[error("applying migrations failed: {0}")]
    Migration(String),
    /// A row that must exist does not.
    #[error("not found")]
    NotFound,
    /// A row with that key exists already.
    #[error("already exists")]
    Conflict,
    /// Any other database error (connection lost, timeout, ...).
    #[error("PostgreSQL error: {0}")]
    Db(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether PostgreSQL rejected the data itself, so that sending the same
    /// rows again can never succeed: SQLSTATE class 22 (data exception: a
    /// value out of range, a character text cannot hold, bad JSON) or 23
    /// (integrity constraint violation), or a value the driver cannot
    /// encode. Connection trouble, timeouts, missing tables and every other
    /// error are not: they may pass once the database (or its operator)
    /// recovers.
    pub fn is_rejected_data(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(d)) => d
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            StoreError::Db(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }

    /// Whether the database is unavailable (as opposed to a bad request).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. }
                | StoreError::Db(
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::WorkerCrashed
                )
        )
    }
}
