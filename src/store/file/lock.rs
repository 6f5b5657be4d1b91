//! The bets file's lock: one central at a time.
//!
//! A central holds an exclusive `flock` on its bets file for as long as its
//! store is open; `lottery new-round` takes the same lock before it renames
//! the round's files. So a second central given the same file (two
//! containers on one volume), or a new round started under a running
//! central, is refused with words that say why, instead of two writers
//! interleaving rows, or a central writing on into a file that was just
//! renamed out from under it. The lock is the kernel's: it goes with the
//! process, however the process ends.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::StorageError;

/// The lock, held until dropped.
#[derive(Debug)]
pub struct FileLock(#[allow(dead_code)] Flock<File>);

/// Takes the lock on `bets` (creating the file if it is missing), or says
/// that a running central holds it. `purpose` ends the refusal: what the
/// operator should do.
///
/// # Errors
/// Another process holds the lock, or the file cannot be opened.
pub fn lock(bets: &Path, purpose: &str) -> Result<FileLock, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(bets)
        .map_err(|source| StorageError::Io {
            path: bets.to_path_buf(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(FileLock(held)),
        Err((_, Errno::EWOULDBLOCK)) => Err(StorageError::Write {
            path: bets.to_path_buf(),
            reason: format!("a running central holds this file's lock: {purpose}"),
        }),
        Err((_, errno)) => Err(StorageError::Io {
            path: bets.to_path_buf(),
            source: errno.into(),
        }),
    }
}
