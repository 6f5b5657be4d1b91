//! What can be wrong with a message: [`MessageError`] says why a payload
//! is not one, and [`ErrorCode`] is the machine-readable reason an error
//! reply carries, as one table: each code's variant, wire text and meaning
//! are declared once (docs/PROTOCOL.md lists when each is sent).

use std::fmt;

use crate::model::{keyed_enum, BetError};

keyed_enum! {
    /// Machine-readable reasons in `CODE:` of an error reply.
    pub enum ErrorCode, text as_str {
        /// The payload is not a well-formed `KEY:VALUE|…\n` message.
        MalformedMessage = "MALFORMED_MESSAGE",
        /// The frame header announces more than [`MAX_FRAME_LEN`](super::MAX_FRAME_LEN).
        FrameTooLarge = "FRAME_TOO_LARGE",
        /// A well-formed message of a kind the central does not know.
        UnknownMessage = "UNKNOWN_MESSAGE",
        /// A bet fails validation; the message names `BET_i` and the field.
        InvalidBet = "INVALID_BET",
        /// The agency id is out of range or differs from the connection's.
        WrongAgency = "WRONG_AGENCY",
        /// Another open connection already speaks for this agency.
        AgencyBusy = "AGENCY_BUSY",
        /// The agency already announced it finished; no more bets are taken.
        AgencyFinished = "AGENCY_FINISHED",
        /// The bets file could not be written; nothing of the batch was kept.
        StorageFailed = "STORAGE_FAILED",
        /// The batch starts past the bets stored for the agency (a gap).
        OutOfOrder = "OUT_OF_ORDER",
        /// Secrets are configured and this connection has not presented its
        /// agency's.
        Unauthenticated = "UNAUTHENTICATED",
        /// Too many wrong secrets came from this address: it is locked
        /// out for a while, and its `HELLO` is refused unread.
        AuthThrottled = "AUTH_THROTTLED",
        /// A frame was not completed in time, or the connection sat idle.
        Timeout = "TIMEOUT",
        /// The central is at its connection limit; try again later.
        ServerBusy = "SERVER_BUSY",
        /// The central speaks only TLS and the client spoke plain text.
        TlsRequired = "TLS_REQUIRED",
        /// The client started a TLS handshake and the central does not speak TLS.
        TlsUnavailable = "TLS_UNAVAILABLE",
        /// Sales are closed (by an operator or at `server.close_at`):
        /// nothing of the batch was stored; or a close was refused, the
        /// sales being closed already or the round drawn.
        BettingClosed = "BETTING_CLOSED",
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a well-framed payload does not make a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The payload bytes are not UTF-8.
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    /// The payload is empty.
    #[error("empty payload")]
    Empty,
    /// The payload does not end with an unescaped `\n`.
    #[error("payload does not end with '\\n'")]
    MissingNewline,
    /// A `\` is the last character of the payload or value.
    #[error("dangling escape at the end of {0}")]
    DanglingEscape(&'static str),
    /// A `\` escapes a character no writer escapes.
    #[error("unknown escape \\{0:?} in {1}")]
    UnknownEscape(char, &'static str),
    /// A pair has no `:` between key and value.
    #[error("pair {0:?} has no ':'")]
    MissingColon(String),
    /// A key the message needs is absent.
    #[error("missing key {0}")]
    MissingKey(&'static str),
    /// A key has a value that cannot be read.
    #[error("bad value for {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// `BATCH_SIZE` does not match the `BET_i` keys present, or they have gaps.
    #[error("batch is inconsistent: {0}")]
    BatchMismatch(String),
    /// Neither a batch nor a known action.
    #[error("unknown message: {0}")]
    Unknown(String),
    /// The frame is larger than the reader's limit. Its payload was read
    /// past and dropped, so the stream is still in step and the connection
    /// goes on; its first bytes said what it was, when they could.
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    FrameTooLarge {
        /// The whole frame the header announced, header included.
        size: usize,
        /// The reader's limit, header included.
        limit: usize,
        /// Its `BATCH_SIZE`, when it began as a batch.
        batch: Option<usize>,
        /// The `AGENCY_ID` of its first bet, when that was readable.
        agency: Option<crate::model::AgencyId>,
    },
    /// A bet inside a batch is invalid.
    #[error("BET_{index}: {source}")]
    Bet {
        /// 1-based position of the bet in the batch (`BET_i`).
        index: usize,
        /// What is wrong with it.
        source: BetError,
    },
}

impl MessageError {
    /// The error code sent back to the agency for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageError::Bet { .. } => ErrorCode::InvalidBet,
            MessageError::Unknown(_) => ErrorCode::UnknownMessage,
            MessageError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedMessage,
        }
    }
}

impl MessageError {
    /// Whether the payload was a batch (it carried `BATCH_SIZE`) that is
    /// not valid: the central logs its refusal as a rejected batch
    /// (`apuesta_recibida`), and anything else as a refused `request`.
    /// A payload too broken to show its keys counts as a request.
    pub fn is_batch(&self) -> bool {
        use super::key::{BATCH_SIZE, FIRST};
        match self {
            MessageError::Bet { .. } | MessageError::BatchMismatch(_) => true,
            MessageError::FrameTooLarge { batch, .. } => batch.is_some(),
            MessageError::BadValue { key, .. } => key == BATCH_SIZE || key == FIRST,
            MessageError::DanglingEscape(within) | MessageError::UnknownEscape(_, within) => {
                *within == BATCH_SIZE
            }
            _ => false,
        }
    }
}

pub(super) fn bad_value(key: &str, reason: impl Into<String>) -> MessageError {
    MessageError::BadValue {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_wire_text() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::COUNT, 16);
        assert_eq!(ErrorCode::from_wire("NOPE"), None);
    }
}
