//! The wire: length-prefixed frames carrying `KEY:VALUE|…\n` payloads, as
//! docs/PROTOCOL.md describes them. One job per file: `codec.rs` frames,
//! `escape.rs` the payload's text, `message.rs` typed messages,
//! `error_code.rs` error codes, `batch.rs` the batch's bets. Every wire
//! constant and key is defined once, here (bet field keys in `BetField`).

mod batch;
mod codec;
mod error;
mod escape;
mod message;

pub use batch::BatchBuilder;
pub use codec::{
    frame, is_tls_record, AgencyCodec, FrameError, LotteryCodec, RawFrame, ServerCodec,
};
pub use error::{ErrorCode, MessageError};
pub use escape::{escape_into, split_pairs, unescape};
pub use message::{
    status_replies, to_payload, winners_replies, AgencyState, Finish, Reply, Request, WireMessage,
};

/// Largest whole frame, header included, in bytes.
pub const MAX_FRAME_LEN: usize = 8192;
/// Size of the big-endian length header that precedes every payload.
pub const HEADER_LEN: usize = 4;
/// Largest payload a frame can carry: the frame limit less the header.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Largest oversize frame a reader reads past, header included: its
/// payload is dropped as it arrives (never buffered), the peer is told, and
/// the connection goes on, so an agency whose batches are too large loses
/// those batches and not the ones after them, nor its announcement. A
/// header announcing more is no agency's batch (a thousand bets of the
/// longest fields fit well within it): that connection ends.
pub const MAX_SKIPPED_FRAME: usize = 1 << 20;

/// Longest reason a close of sales may give, in bytes.
pub const MAX_REASON_LEN: usize = 200;

/// How often the central tells an agency that opened with `HELLO`, and is
/// waiting for an answer that depends on others (the draw, or a takeover of
/// its older connection), that it is still waiting (`STATUS:WAITING`). The
/// agency's reply deadline restarts on each, so a live central is never
/// mistaken for a hung one however long the others take.
pub const STILL_WAITING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Wire keys. Spanish appears only here, in [`BetField`](crate::model::BetField)
/// and in log action names.
pub mod key {
    use crate::model::BetField;

    /// Number of bets in a batch.
    pub const BATCH_SIZE: &str = "BATCH_SIZE";
    /// Prefix of the i-th bet of a batch (`BET_1`, `BET_2`, …).
    pub const BET_PREFIX: &str = "BET_";
    /// The request kind of a non-batch message.
    pub const ACTION: &str = "ACTION";
    /// The agency a message speaks for: the same key as a bet's field.
    pub const AGENCY_ID: &str = BetField::AgencyId.wire_key();
    /// `SUCCESS` or `ERROR` in every reply.
    pub const STATUS: &str = "STATUS";
    /// Human-readable text of a reply.
    pub const MESSAGE: &str = "MESSAGE";
    /// Machine-readable error code of an error reply.
    pub const CODE: &str = "CODE";
    /// Comma-separated winner documents.
    pub const WINNERS: &str = "WINNERS";
    /// `1` when the winners list continues in the next frame.
    pub const MORE: &str = "MORE";
    /// Position, in the agency's data file, of a batch's first bet (0-based,
    /// counting bets, not lines).
    pub const FIRST: &str = "FIRST";
    /// Bets the central holds for the agency.
    pub const STORED: &str = "STORED";
    /// The digest of the bets the central holds for the agency (64 hex
    /// digits), with `STORED` the agency's receipt: in the answer to
    /// `HELLO` and with the winners of a session opened by `HELLO`.
    pub const DIGEST: &str = "DIGEST";
    /// The round's seal (64 hex digits), with the winners of a session
    /// opened by `HELLO`.
    pub const SEAL: &str = "SEAL";
    /// The agency's shared secret, in `HELLO`, when the central requires one.
    pub const SECRET: &str = "SECRET";
    /// Who a `HELLO` without `AGENCY_ID` speaks for: `OPERATOR`.
    pub const ROLE: &str = "ROLE";
    /// Configured agency count, in a status reply.
    pub const AGENCIES: &str = "AGENCIES";
    /// Per-agency `id=held/open|done` entries, comma separated, in a status reply.
    pub const AGENCY_STATE: &str = "AGENCY_STATE";
    /// `1` once the draw is done, in a status reply.
    pub const DRAWN: &str = "DRAWN";
    /// Why sales are closed, in `CLOSE`.
    pub const REASON: &str = "REASON";
    /// Who closed sales (`operator` or `close_at`), in a status reply once
    /// they are closed.
    pub const CLOSED_BY: &str = "CLOSED_BY";
    /// When sales closed (RFC 3339), in a status reply once they are closed.
    pub const CLOSED_AT: &str = "CLOSED_AT";
    /// Why sales closed, in a status reply once they are closed.
    pub const CLOSE_REASON: &str = "CLOSE_REASON";
}

/// Action names carried in `ACTION:`.
pub mod action {
    /// "I have sent all my bets", as the design document names it.
    pub const BETTING_FINISHED: &str = "BETTING_FINISHED";
    /// The same, as the reference agency spells it.
    pub const FINISH_BETTING: &str = "FINISH_BETTING";
    /// Opens a resumable session: the central answers with `STORED`.
    pub const HELLO: &str = "HELLO";
    /// `ROLE` of a `HELLO` that opens an operator session.
    pub const OPERATOR: &str = "OPERATOR";
    /// Liveness check: the central answers `MESSAGE:pong`.
    pub const PING: &str = "PING";
    /// Operator view: bets held per agency, who finished, whether drawn.
    pub const STATUS: &str = "STATUS";
    /// Operator's: close sales now.
    pub const CLOSE: &str = "CLOSE";
}

/// Values of the `STATUS` key.
pub mod status {
    /// The request was carried out.
    pub const SUCCESS: &str = "SUCCESS";
    /// The request was refused; `CODE` and `MESSAGE` say why.
    pub const ERROR: &str = "ERROR";
    /// Not an answer: the central is still working on the request (sent
    /// only to connections that opened with `HELLO`).
    pub const WAITING: &str = "WAITING";
}
