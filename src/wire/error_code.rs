//! The machine-readable reasons of an error reply, as one table: each code's
//! variant, wire text and meaning are declared once (docs/PROTOCOL.md lists
//! them with when each is sent).

use std::fmt;

use crate::model::keyed_enum;

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
        /// A frame was not completed in time, or the connection sat idle.
        Timeout = "TIMEOUT",
        /// The central is at its connection limit; try again later.
        ServerBusy = "SERVER_BUSY",
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
        assert_eq!(ErrorCode::COUNT, 12);
        assert_eq!(ErrorCode::from_wire("NOPE"), None);
    }
}
