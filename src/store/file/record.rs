//! The draw record of the file store: TOML that operators read, one
//! `[agencies.N]` table per agency, written atomically beside the bets file.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::AgencyId;
use crate::receipt::{Digest, Receipt};
use crate::store::Draw;

/// The record's file format. Digests are hex text, so that an operator can
/// compare them with what the agencies logged.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DrawRecord {
    winning_number: u16,
    drawn_at: String,
    bets: u64,
    seal: String,
    agencies: BTreeMap<String, AgencyRecord>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AgencyRecord {
    bets: u64,
    digest: String,
    winners: Vec<String>,
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
        agencies: draw
            .receipts
            .keys()
            .chain(draw.winners.keys())
            .map(|&a| {
                let receipt = draw.receipt_of(a);
                let entry = AgencyRecord {
                    bets: receipt.count,
                    digest: receipt.digest.to_string(),
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
    for (agency, entry) in record.agencies {
        let agency: AgencyId = agency
            .parse()
            .map_err(|_| invalid(format!("agency key {agency:?} is not a number")))?;
        let receipt = Receipt {
            count: entry.bets,
            digest: digest(&entry.digest)?,
        };
        receipts.insert(agency, receipt);
        if !entry.winners.is_empty() {
            winners.insert(agency, entry.winners);
        }
    }
    Ok(Some(Draw {
        winning_number: record.winning_number,
        drawn_at: record.drawn_at,
        winners,
        receipts,
        seal: digest(&record.seal)?,
        bets: record.bets,
        elapsed: Duration::ZERO,
    }))
}
