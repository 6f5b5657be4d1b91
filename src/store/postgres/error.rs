//! [`PgError`]: what the PostgreSQL store's parts fail with, before the
//! seam names the database it happened in ([`StorageError::Database`]).
//!
//! [`StorageError::Database`]: crate::store::StorageError::Database

use crate::model::AgencyId;

/// A failure inside the PostgreSQL store.
///
/// Its `Display` is the whole message, one line, as the project's errors
/// are (see `lib.rs`); `source()` links the driver's own error where there
/// is one, for code that wants its SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A statement failed, or the connection broke under it: in the
    /// database's own words when it sent any.
    #[error("{}", describe(.0))]
    Statement(#[from] tokio_postgres::Error),
    /// A step of the schema's migration failed.
    #[error("schema step {step}: {}", describe(.source))]
    Schema {
        /// 1-based.
        step: usize,
        /// The statement's failure.
        source: tokio_postgres::Error,
    },
    /// The database could not be reached for the whole patience given, or
    /// refused the connection.
    #[error("{0}")]
    Unreachable(String),
    /// A connection could not be opened.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// What the tables hold, or the database answered, is not what the
    /// central can take as it is (a digest of the wrong length, a schema
    /// newer than this program's).
    #[error("{0}")]
    Invalid(String),
    /// A newer session of the agency, on another central, fences this
    /// central's writes for it.
    #[error(
        "agency {0}: superseded by a newer session of the agency on another central \
         (its epoch in table agencies moved on): nothing was stored"
    )]
    Superseded(AgencyId),
    /// The writer did not store a batch, or did not do what was asked, for
    /// a reason of its own (a batch or transaction before it failed, the
    /// store is closing).
    #[error("{0}")]
    NotDone(&'static str),
    /// Sales closed before the batch's group read `sales`: nothing of it
    /// was stored.
    #[error("{0}")]
    SalesClosed(crate::close::SalesClose),
}

impl From<String> for PgError {
    fn from(why: String) -> PgError {
        PgError::Invalid(why)
    }
}

/// A driver error as one line an operator can act on: the server's own
/// message (`ERROR: …`, `FATAL: …`) when it sent one, else the driver's
/// words with their causes (`error communicating with the server: …`).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A connection that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ConnectError {
    /// Why, as this module's `describe` words it.
    pub reason: String,
    /// Whether trying again can help: the server was not reached, or said
    /// it cannot take connections yet (starting up, shutting down, full).
    /// A refused login (a wrong password, a missing database or role) will
    /// be refused again: the operator has to act.
    pub retry: bool,
    /// The URL lacks what the database asks for (a password): a mistake in
    /// the configuration, not in the database.
    pub configuration: bool,
}
