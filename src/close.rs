//! The close of sales: who closed them, when and why. Before it, the draw
//! waits for every configured agency to finish; once it lands, every batch
//! the store has not taken yet is refused (`BETTING_CLOSED`) and the draw
//! runs over what was stored.
//!
//! The store orders the close among the batches it stores (the bets file's
//! writer takes it in its queue; a database takes it as one row), keeps it
//! for good before anyone learns of it, and hands it back on a restart.

use std::fmt;

/// Who closed sales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// An operator, with `lottery close`.
    Operator,
    /// The central's clock reaching `server.close_at`.
    CloseAt,
}

impl ClosedBy {
    /// How records, replies and log lines name it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Operator => "operator",
            ClosedBy::CloseAt => "close_at",
        }
    }

    /// The inverse of [`ClosedBy::as_str`].
    pub fn from_name(name: &str) -> Option<ClosedBy> {
        match name {
            "operator" => Some(ClosedBy::Operator),
            "close_at" => Some(ClosedBy::CloseAt),
            _ => None,
        }
    }
}

impl fmt::Display for ClosedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A close of sales, as kept and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesClose {
    /// Who closed.
    pub by: ClosedBy,
    /// When (RFC 3339, UTC, to the millisecond).
    pub at: String,
    /// Why, in the operator's words (or which `close_at` it was).
    pub reason: String,
}

impl SalesClose {
    /// A close by `by`, now, for `reason`.
    pub fn now(by: ClosedBy, reason: impl Into<String>) -> SalesClose {
        SalesClose {
            by,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SalesClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sales closed at {} by {} ({})",
            self.at, self.by, self.reason
        )
    }
}

/// Parses an RFC 3339 time (`2026-12-07T18:00:00Z`, `…-03:00`).
///
/// # Errors
/// The text is not an RFC 3339 time with its offset.
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!(
                "{text:?} is not an RFC 3339 time with its offset, such as \
                 2026-12-07T18:00:00Z or 2026-12-07T15:00:00-03:00 ({e})"
            )
        })
}

/// `server.close_at`: when the central closes sales by itself, if ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseAt(pub Option<chrono::DateTime<chrono::Utc>>);

impl CloseAt {
    /// As written in settings and logs: RFC 3339, or empty for never.
    pub fn show(&self) -> String {
        self.0.map_or_else(String::new, |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        })
    }
}

impl std::str::FromStr for CloseAt {
    type Err = String;

    fn from_str(raw: &str) -> Result<CloseAt, String> {
        if raw.trim().is_empty() {
            return Ok(CloseAt(None));
        }
        parse_time(raw).map(|t| CloseAt(Some(t)))
    }
}

impl<'de> serde::Deserialize<'de> for CloseAt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}
