//! `lottery`: bet collection for a national lottery.
//!
//! Agencies upload their bets to the central in batches over a small framed
//! text protocol; when every agency has finished, the central draws and tells
//! each agency its own winners.
//!
//! The library is what the `lottery` binary runs, and what tests, benches
//! and other programs build on:
//!
//! - [`wire`]: the protocol: length-prefixed frames (a `tokio_util`
//!   `Decoder`/`Encoder`), the `KEY:VALUE|…\n` messages, escaping, and the
//!   one bet parser and batch writer.
//! - [`model`]: the bet, the flat `Bets` of a batch, and the rules a bet
//!   must meet (shared by agency and central).
//! - [`store`]: the storage seam (append durably, counts, the draw's tally,
//!   the draw record) and its bets-file backend.
//! - [`server`]: the central: the accept loop and one handler per
//!   connection, meeting at the lottery's shared state for the one-time draw
//!   (internal: agencies' claims and the draw live in `lottery`).
//! - [`agency`]: an agency: streams its data file, waits for its winners.
//! - [`receipt`]: receipts (a hash chain per agency) and the seal of a
//!   round, shared by central, agency and `lottery verify`.
//! - [`config`], [`logging`], [`shutdown`]: every setting declared once, the
//!   contract's log lines, signals to cancellation.
//! - [`tools`]: the programs over all this: the demo, the load tool,
//!   synthetic data, the operator views, the compose file.
//!
//! Errors follow one convention: an error's `Display` is the whole message,
//! its cause included (it is what replies to agencies and log fields
//! show), and `source()` still links the cause. The one place that prints
//! a chain, [`logging::error_chain`], therefore never repeats a cause.
//!
//! A message on the wire, as an agency frames its announcement that it has
//! finished:
//!
//! ```
//! use lottery::wire::{frame, Finish, Request};
//!
//! let finished = Request::Finished { agency: 3, spelling: Finish::BettingFinished };
//! let bytes = frame(&finished).unwrap();
//! assert_eq!(&bytes[..4], &[0, 0, 0, 0x24]); // payload length, big-endian
//! assert_eq!(&bytes[4..], b"ACTION:BETTING_FINISHED|AGENCY_ID:3\n");
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agency;
pub mod config;
pub mod logging;
mod lottery;
pub mod model;
pub mod receipt;
mod scan;
pub mod server;
pub mod shutdown;
pub mod store;
mod task;
mod tls;
pub mod tools;
pub mod wire;
