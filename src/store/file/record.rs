//! The draw record of the file store: TOML that operators read, one
//! `[agencies.N]` table per agency, written atomically beside the bets file.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::close::{ClosedBy, SalesClose};
use crate::model::AgencyId;
use crate::receipt::{Digest, Receipt};
use crate::store::{ClosedRound, Draw};

/// The record's file format. Digests are hex text, so that an operator can
/// compare them with what the agencies logged.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DrawRecord {
    winning_number: u16,
    drawn_at: String,
    bets: u64,
    seal: String,
    /// When sales were closed before every agency finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    close: Option<CloseRecord>,
    agencies: BTreeMap<String, AgencyRecord>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AgencyRecord {
    bets: u64,
    digest: String,
    /// `finished`: the agency announced it finished; `closed`: sales
    /// closed first. Absent in records of rounds that were not closed
    /// (every agency finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    winners: Vec<String>,
}

/// The close of sales as kept: its own file until the draw (with the
/// agencies that had finished), then in the draw record (whose agencies
/// each say it).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CloseRecord {
    by: String,
    at: String,
    reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finished: Option<Vec<AgencyId>>,
}

impl CloseRecord {
    fn of(close: &SalesClose) -> CloseRecord {
        CloseRecord {
            by: close.by.as_str().to_string(),
            at: close.at.clone(),
            reason: close.reason.clone(),
            finished: None,
        }
    }

    fn read(self) -> Result<SalesClose, String> {
        Ok(SalesClose {
            by: ClosedBy::from_name(&self.by)
                .ok_or_else(|| format!("close: by = {:?} is not operator or close_at", self.by))?,
            at: self.at,
            reason: self.reason,
        })
    }
}

/// The state word of an agency in a closed round's record.
const FINISHED: &str = "finished";
/// The state word of an agency that had not finished when sales closed.
const CLOSED: &str = "closed";

/// Keeps the close of sales at `path` atomically (as the draw record is
/// written), so a central started after it, before the draw, draws.
///
/// # Errors
/// Any step of the write failed.
pub fn save_close(close: &ClosedRound, path: &Path) -> io::Result<()> {
    let record = CloseRecord {
        finished: Some(close.finished.iter().copied().collect()),
        ..CloseRecord::of(&close.close)
    };
    let text = toml::to_string(&record).map_err(io::Error::other)?;
    write_atomically(path, &text)
}

/// Reads a close kept by [`save_close`]; `Ok(None)` when there is none.
///
/// # Errors
/// The file exists but cannot be read or parsed.
pub fn load_close(path: &Path) -> io::Result<Option<ClosedRound>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
    let mut record: CloseRecord = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let finished = record.finished.take().unwrap_or_default();
    Ok(Some(ClosedRound {
        close: record.read().map_err(invalid)?,
        finished: finished.into_iter().collect(),
    }))
}

/// Writes `draw` to `path` atomically: a temporary file beside it, synced,
/// renamed over `path`, then the directory synced, so a crash leaves either
/// no record or the whole record.
///
/// # Errors
/// Any step of the write failed.
pub fn save_record(draw: &Draw, path: &Path) -> io::Result<()> {
    let record = DrawRecord {
        winning_number: draw.winning_number,
        drawn_at: draw.drawn_at.clone(),
        bets: draw.bets,
        seal: draw.seal.to_string(),
        close: draw.closed.as_ref().map(|c| CloseRecord::of(&c.close)),
        agencies: draw
            .receipts
            .keys()
            .chain(draw.winners.keys())
            .map(|&a| {
                let receipt = draw.receipt_of(a);
                let state = draw.closed.as_ref().map(|c| {
                    if c.finished.contains(&a) {
                        FINISHED.to_string()
                    } else {
                        CLOSED.to_string()
                    }
                });
                let entry = AgencyRecord {
                    bets: receipt.count,
                    digest: receipt.digest.to_string(),
                    state,
                    winners: draw.winners_of(a).to_vec(),
                };
                (a.to_string(), entry)
            })
            .collect(),
    };
    let text = toml::to_string(&record).map_err(io::Error::other)?;
    write_atomically(path, &text)
}

/// Writes `text` to `path` atomically: a temporary file beside it, synced,
/// renamed over `path`, then the directory synced.
///
/// # Errors
/// Any step of the write failed.
pub(super) fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// Reads a record written by [`save_record`]; `Ok(None)` when there is none.
///
/// # Errors
/// The record exists but cannot be read or parsed.
pub fn load_record(path: &Path) -> io::Result<Option<Draw>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
    let record: DrawRecord = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let digest = |text: &str| text.parse::<Digest>().map_err(|e| invalid(e.to_string()));
    let mut winners = HashMap::new();
    let mut receipts = BTreeMap::new();
    let mut finished = std::collections::BTreeSet::new();
    for (agency, entry) in record.agencies {
        let agency: AgencyId = agency
            .parse()
            .map_err(|_| invalid(format!("agency key {agency:?} is not a number")))?;
        match (entry.state.as_deref(), &record.close) {
            (None, None) => {}
            (Some(FINISHED), Some(_)) => {
                finished.insert(agency);
            }
            (Some(CLOSED), Some(_)) => {}
            (Some(other), Some(_)) => {
                return Err(invalid(format!(
                    "agencies.{agency}: state = {other:?} is neither {FINISHED:?} nor {CLOSED:?}"
                )))
            }
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "agencies.{agency}: a closed round's record says of each agency whether it \
                     finished or was closed (state), and this one does not"
                )))
            }
            (Some(_), None) => {
                return Err(invalid(format!(
                    "agencies.{agency}: a state is recorded but the record has no [close]"
                )))
            }
        }
        let receipt = Receipt {
            count: entry.bets,
            digest: digest(&entry.digest)?,
        };
        receipts.insert(agency, receipt);
        if !entry.winners.is_empty() {
            winners.insert(agency, entry.winners);
        }
    }
    let closed = match record.close {
        Some(close) => Some(ClosedRound {
            close: close.read().map_err(invalid)?,
            finished,
        }),
        None => None,
    };
    Ok(Some(Draw {
        closed,
        winning_number: record.winning_number,
        drawn_at: record.drawn_at,
        winners,
        receipts,
        seal: digest(&record.seal)?,
        bets: record.bets,
        elapsed: Duration::ZERO,
    }))
}
