//! The bets file backend: append-only CSV, one row per stored bet,
//! `agency,first_name,last_name,document,birthdate,number`.
//!
//! - [`row`]: the row format: the encoder, the one reader and the one row
//!   check that recovery, the draw and the tools share.
//! - [`writer`]: the writer thread: group commit, acknowledged after the sync.
//! - [`recover`](mod@recover): the check on start that cuts a torn last row.
//! - [`tally`](mod@tally): the draw's tally, in two halves for large files.
//! - `lock`: one central at a time on a bets file.
//! - `record`: the draw record; [`rounds`]: the ledger of sealed rounds and
//!   `lottery new-round`; `store`: all of it behind [`crate::store::Store`].

mod lock;
mod record;
pub mod recover;
pub mod rounds;
pub mod row;
mod store;
pub mod tally;
pub mod writer;

pub use record::{load_close, load_record, save_close, save_record};
pub use recover::{recover, Recovered};
pub use row::{encode_rows, read_rows, StoredBet};
pub use store::FileStore;
pub use tally::{recompute, tally};
pub use writer::{BetStore, Pending};

pub(crate) use crate::store::StorageError;
