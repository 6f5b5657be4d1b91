//! The wire: length-prefixed frames ([`codec`]) carrying `KEY:VALUE|…\n`
//! payloads ([`message`]).

pub mod codec;
pub mod message;
pub(crate) mod scan;
