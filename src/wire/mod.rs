//! The wire: length-prefixed frames ([`codec`]) carrying `KEY:VALUE|…\n`
//! payloads ([`message`]).

pub mod codec;
pub mod message;
pub(crate) mod scan;

pub use codec::{frame, AgencyCodec, FrameError, LotteryCodec, RawFrame, ServerCodec};
pub use message::{
    action, escape_into, key, status, status_replies, to_payload, unescape, winners_replies,
    AgencyState, BatchBuilder, ErrorCode, MessageError, Reply, Request, WireMessage, HEADER_LEN,
    MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
};
