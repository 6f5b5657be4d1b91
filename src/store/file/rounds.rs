//! The rounds ledger of the file store (`bets.rounds.toml` beside the bets
//! file): one `[[rounds]]` entry per sealed round, with its seal, and where
//! its files were kept once a new round started.
//!
//! It is what lets the central tell "no draw yet" from "the draw record was
//! deleted": a round whose seal is in the ledger and whose files were not
//! kept aside is sealed, so a start without its record is refused instead of
//! drawing again. Its limit: someone who deletes the ledger too (or edits
//! it) is not caught by the central; the agencies still are the check
//! then, as each logged the seal and checks its own receipt.

use std::io;
use std::path::{Path, PathBuf};

use super::record::write_atomically;
use super::{load_record, recompute, StorageError};
use crate::receipt::{self, Digest};
use crate::store::{Draw, NewRound, RecordAt};

/// The ledger's file format.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    /// Sealed rounds, oldest first.
    #[serde(default)]
    pub rounds: Vec<Round>,
}

/// One sealed round.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Round {
    /// Its number, from 1.
    pub round: u32,
    /// Its seal (hex).
    pub seal: String,
    /// When it was drawn.
    pub drawn_at: String,
    /// Bets it drew over.
    pub bets: u64,
    /// Where its bets file was kept once a new round started; absent while
    /// it is the current round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_bets: Option<String>,
    /// Where its draw record was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_record: Option<String>,
    /// Where its close of sales was kept, when sales were closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_close: Option<String>,
}

impl Ledger {
    /// The ledger of the bets file at `bets`: `bets.rounds.toml` beside it.
    pub fn path_for(bets: &Path) -> PathBuf {
        bets.with_extension("rounds.toml")
    }

    /// Reads the ledger at `path`; an empty one when there is none.
    ///
    /// # Errors
    /// It exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Ledger, StorageError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(source) => {
                return Err(StorageError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| StorageError::Record {
            kept: RecordAt::File(path.to_path_buf()),
            reason: e.to_string(),
        })
    }

    fn save(&self, path: &Path) -> Result<(), StorageError> {
        let mut text = String::from(
            "# The rounds of this lottery, written by the central: each sealed round's seal,\n\
             # and where its files were kept once a new round started (`lottery new-round`).\n",
        );
        text.push_str(
            &toml::to_string(self)
                .map_err(io::Error::other)
                .map_err(|source| StorageError::Io {
                    path: path.to_path_buf(),
                    source,
                })?,
        );
        write_atomically(path, &text).map_err(|source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The current round if it is sealed (its files not kept aside yet).
    pub fn sealed_current(&self) -> Option<&Round> {
        self.rounds.last().filter(|r| r.kept_bets.is_none())
    }

    /// The current round's number: the sealed one, or the one after the
    /// last kept aside.
    pub fn current(&self) -> u32 {
        match self.rounds.last() {
            Some(r) if r.kept_bets.is_none() => r.round,
            Some(r) => r.round + 1,
            None => 1,
        }
    }

    /// Adds `draw` as the current round's seal, and saves.
    fn seal(&mut self, draw: &Draw, path: &Path) -> Result<(), StorageError> {
        self.rounds.push(Round {
            round: self.current(),
            seal: draw.seal.to_string(),
            drawn_at: draw.drawn_at.clone(),
            bets: draw.bets,
            kept_bets: None,
            kept_record: None,
            kept_close: None,
        });
        self.save(path)
    }
}

/// Records `draw` in the ledger of `bets`, after its record was written.
///
/// # Errors
/// The ledger cannot be read or written.
pub fn seal_round(bets: &Path, draw: &Draw) -> Result<(), StorageError> {
    let path = Ledger::path_for(bets);
    let mut ledger = Ledger::load(&path)?;
    if ledger.sealed_current().map(|r| r.seal.as_str()) == Some(&draw.seal.to_string()) {
        return Ok(());
    }
    ledger.seal(draw, &path)
}

/// Reads the draw record at `record` and checks it against the ledger of
/// `bets`: a record missing while the ledger says the round was sealed, or
/// a record whose seal is not the one the round was sealed with, is an
/// error. With `repair`, a record the ledger does not know yet (the central
/// stopped between writing the two, or a record from before the ledger) is
/// added to it.
///
/// # Errors
/// The record or the ledger cannot be read, or they disagree.
pub fn load_checked(
    bets: &Path,
    record: &Path,
    repair: bool,
) -> Result<Option<Draw>, StorageError> {
    let draw = load_record(record).map_err(|source| StorageError::Io {
        path: record.to_path_buf(),
        source,
    })?;
    let ledger_path = Ledger::path_for(bets);
    let mut ledger = Ledger::load(&ledger_path)?;
    let refuse = |reason: String| StorageError::Record {
        kept: RecordAt::File(record.to_path_buf()),
        reason,
    };
    let no_bets = std::fs::metadata(bets).map_or(true, |m| m.len() == 0);
    match (draw, ledger.sealed_current().cloned()) {
        (None, None) => Ok(None),
        (None, Some(_)) if no_bets => {
            // The sealed round's bets and record were both moved aside by
            // hand (the way before `lottery new-round`): no bets are left
            // to draw again, so this is a new, empty round.
            if repair {
                if let Some(last) = ledger.rounds.last_mut() {
                    last.kept_bets = Some("moved aside by hand".to_string());
                    last.kept_record = Some("moved aside by hand".to_string());
                }
                ledger.save(&ledger_path)?;
            }
            Ok(None)
        }
        (None, Some(round)) => Err(refuse(format!(
            "missing, but round {} of {} was sealed on {} over {} bets (seal {}), as {} \
             says: a deleted record does not make the central draw again; put the record \
             back, or keep the round aside and start a new one with `lottery new-round`",
            round.round,
            bets.display(),
            round.drawn_at,
            round.bets,
            round.seal,
            ledger_path.display()
        ))),
        (Some(draw), Some(round)) if round.seal != draw.seal.to_string() => Err(refuse(format!(
            "its seal {} is not the seal round {} was drawn with, {} (in {}): the record was \
             replaced",
            draw.seal,
            round.round,
            round.seal,
            ledger_path.display()
        ))),
        (Some(draw), Some(_)) => Ok(Some(draw)),
        (Some(draw), None) => {
            if repair {
                ledger.seal(&draw, &ledger_path)?;
            }
            Ok(Some(draw))
        }
    }
}

/// `path` with `.round-N-<seal8>` put before its extension
/// (`bets.csv` -> `bets.round-1-a938d40f.csv`); a draw record's double
/// extension is kept whole (`bets.draw.toml` -> `bets.round-1-….draw.toml`).
pub fn kept_name(path: &Path, round: u32, seal: &Digest) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag = format!(".round-{round}-{}", seal.short());
    let cut = if let Some(kind) = [".draw.toml", ".close.toml"]
        .into_iter()
        .find(|k| name.ends_with(k))
    {
        name.len() - kind.len()
    } else {
        name.rfind('.').filter(|&i| i > 0).unwrap_or(name.len())
    };
    path.with_file_name(format!("{}{tag}{}", &name[..cut], &name[cut..]))
}

/// Starts a new round on the bets file `bets` (with its record at
/// `record`): the current round must be drawn, and its record must match
/// its bets ([`receipt::differences`]); its bets file and record are then
/// renamed by round and seal, and the ledger notes where they went. The
/// next start of the central finds no bets and no record: an empty round.
/// Run it with the central stopped: a running central's lock on the bets
/// file refuses it.
///
/// # Errors
/// The round is not drawn, its record does not match its bets, a kept name
/// is taken, or a file cannot be read or renamed.
pub fn new_round(
    bets: &Path,
    record: &Path,
    agencies: u32,
    winning_number: u16,
) -> Result<NewRound, StorageError> {
    let refuse = |reason: String| StorageError::Record {
        kept: RecordAt::File(record.to_path_buf()),
        reason,
    };
    // Held until the files are renamed: no central may be writing them.
    let _lock = bets
        .exists()
        .then(|| {
            super::lock::lock(
                bets,
                "a new round starts with the central stopped: stop it, then run new-round again",
            )
        })
        .transpose()?;
    let ledger_path = Ledger::path_for(bets);
    let mut ledger = Ledger::load(&ledger_path)?;
    let Some(draw) = load_checked(bets, record, true)? else {
        if bets.exists() && std::fs::metadata(bets).map_or(0, |m| m.len()) > 0 {
            return Err(refuse(format!(
                "round {} is not drawn yet (no draw record) and {} holds bets: a new round \
                 starts only after the draw",
                ledger.current(),
                bets.display()
            )));
        }
        if !bets.exists() && !ledger_path.exists() {
            // Not a round that ended: most likely a path mistyped.
            return Err(StorageError::Io {
                path: bets.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no bets file, no draw record and no rounds ledger ({}) here: nothing \
                         to start a new round from; check server.storage",
                        ledger_path.display()
                    ),
                ),
            });
        }
        return Ok(NewRound::AlreadyEmpty {
            round: ledger.current(),
        });
    };
    let found = recompute(bets, draw.winning_number)?;
    let differences = receipt::differences(draw.claimed(), &found, agencies, winning_number);
    if !differences.is_empty() {
        return Err(refuse(format!(
            "does not match the stored bets, so the round is not kept as sealed: {}",
            differences.join("; ")
        )));
    }
    // `load_checked` added the round to the ledger if it was missing.
    ledger = Ledger::load(&ledger_path)?;
    let round = ledger.current();
    let (kept_bets, kept_record) = (
        kept_name(bets, round, &draw.seal),
        kept_name(record, round, &draw.seal),
    );
    // A closed round's close goes with it (its record says it too).
    let close = bets.with_extension("close.toml");
    let kept_close = close.exists().then(|| kept_name(&close, round, &draw.seal));
    for taken in [Some(&kept_bets), Some(&kept_record), kept_close.as_ref()]
        .into_iter()
        .flatten()
    {
        if taken.exists() {
            return Err(refuse(format!(
                "cannot keep round {round} as {}: that file exists",
                taken.display()
            )));
        }
    }
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| StorageError::Io {
            path: from.to_path_buf(),
            source,
        })
    };
    rename(bets, &kept_bets)?;
    rename(record, &kept_record)?;
    if let Some(kept_close) = &kept_close {
        rename(&close, kept_close)?;
    }
    if let Some(last) = ledger.rounds.last_mut() {
        last.kept_bets = Some(kept_bets.display().to_string());
        last.kept_record = Some(kept_record.display().to_string());
        last.kept_close = kept_close.as_ref().map(|c| c.display().to_string());
    }
    ledger.save(&ledger_path)?;
    Ok(NewRound::Kept {
        round,
        seal: draw.seal,
        bets: kept_bets.display().to_string(),
        record: kept_record.display().to_string(),
        close: kept_close.map(|c| c.display().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_names_carry_round_and_seal_before_the_extension() {
        let seal: Digest = "a938d40f94215f948ea2f5be5cd3370023212e72e388a6688d86708b21f6ab9e"
            .parse()
            .unwrap();
        let name = |p: &str| kept_name(Path::new(p), 2, &seal).display().to_string();
        assert_eq!(name("/d/bets.csv"), "/d/bets.round-2-a938d40f.csv");
        assert_eq!(
            name("/d/bets.draw.toml"),
            "/d/bets.round-2-a938d40f.draw.toml"
        );
        assert_eq!(
            name("/d/bets.close.toml"),
            "/d/bets.round-2-a938d40f.close.toml"
        );
        assert_eq!(name("/d/outcome.toml"), "/d/outcome.round-2-a938d40f.toml");
        assert_eq!(name("/d/bets"), "/d/bets.round-2-a938d40f");
    }
}
