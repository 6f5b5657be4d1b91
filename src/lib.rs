//! `lottery`: bet collection for a national lottery.
//!
//! Agencies upload their bets to the central in batches over a small framed
//! text protocol; when every agency has finished, the central draws and tells
//! each agency its own winners.
//!
//! - [`codec`]: length-prefixed frames, as a `tokio_util` `Decoder`/`Encoder`.
//! - [`protocol`]: the `KEY:VALUE|…\n` payload and the typed messages.
//! - [`model`]: the bet, the flat `Bets` of a batch, and their validation.
//! - [`storage`]: the append-only bets file, its writer thread and the
//!   draw's scan.
//! - [`lottery`]: shared state, the one-time draw, waiting for it.
//! - [`server`]: the central (listener and per-connection handlers).
//! - [`agency`]: an agency (streams its file, waits for its winners).
//! - [`config`], [`logging`], [`shutdown`], [`tls`]: operating concerns.
//! - [`gen_data`], [`demo`], [`bench`]: synthetic data, the one-machine demo,
//!   and the load tool.
//! - [`ops`]: the health probe, the status view and the winners table.
//! - [`compose`]: the compose file for the central and N agencies.
//!
//! A message on the wire, as an agency frames its announcement that it has
//! finished:
//!
//! ```
//! use lottery::wire::{frame, Request};
//!
//! let bytes = frame(&Request::Finished { agency: 3 }).unwrap();
//! assert_eq!(&bytes[..4], &[0, 0, 0, 0x24]); // payload length, big-endian
//! assert_eq!(&bytes[4..], b"ACTION:BETTING_FINISHED|AGENCY_ID:3\n");
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agency;
pub mod config;
pub mod logging;
pub mod lottery;
pub mod model;
pub mod net;
mod scan;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod task;
pub mod tools;
pub mod wire;
