//! The seal an agency keeps between runs (`agency.seal_file`, by default
//! beside its data file: `agency-3.csv.seal`). A round drawn again over
//! forged bets, with its record and ledger forged to match, agrees with
//! itself; only what the agencies were given first can tell. So the first
//! seal an agency's winners come with is kept, with the receipt of the
//! file it was given for, and every later run over the same bets (the same
//! round, for this agency) must be given the same seal.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::mismatches;
use crate::receipt::{Digest, Receipt};

/// What the kept file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Kept {
    /// The round's seal.
    seal: String,
    /// The bets of the data file it was given for.
    bets: u64,
    /// Their digest.
    digest: String,
}

/// How the seal of this run stands against the kept one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The same seal as the one kept for these bets.
    Same,
    /// None was kept for these bets (none at all, or one for another data
    /// file): this one is kept now.
    Kept,
    /// The one kept for these bets was an earlier round's: the central held
    /// none of them when this run began, so this run uploaded them all
    /// anew, into a new round. This one replaces it.
    NewRound,
    /// This one could not be written (a read-only folder, say): a later
    /// run cannot compare (the reason).
    NotKept(String),
}

/// Why the seal cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The kept seal for these bets differs: the winners are not valid.
    Differs(String),
    /// The kept file exists but cannot be read back: nothing to compare
    /// with, and nothing is overwritten.
    Unreadable(PathBuf, String),
}

/// Compares `sealed`, the seal this run's winners came with for the bets
/// whose receipt is `file`, with the one kept at `path`, and keeps it when
/// none was kept for these bets. `uploaded_anew`: the central held none of
/// these bets when this run began (the round began anew for this agency, as
/// after `lottery new-round`), so a different kept seal is an earlier
/// round's, not this one's: a central that had this agency's bets and
/// sealed them again differently is what the kept seal catches.
///
/// # Errors
/// The kept seal for these bets differs, or the kept file is damaged.
pub(super) fn compare_and_keep(
    path: &Path,
    file: &Receipt,
    sealed: Digest,
    uploaded_anew: bool,
) -> Result<Outcome, Refusal> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let unreadable = |why: String| Refusal::Unreadable(path.to_path_buf(), why);
            let kept: Kept = toml::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
            let digest: Digest = kept
                .digest
                .parse()
                .map_err(|e| unreadable(format!("{e}")))?;
            if kept.bets == file.count && digest == file.digest {
                let seal: Digest = kept.seal.parse().map_err(|e| unreadable(format!("{e}")))?;
                match mismatches::check_kept_seal(path, seal, sealed) {
                    Ok(()) => return Ok(Outcome::Same),
                    Err(why) if !uploaded_anew => return Err(Refusal::Differs(why)),
                    Err(_) => {
                        return Ok(match keep(path, file, sealed) {
                            Ok(()) => Outcome::NewRound,
                            Err(e) => Outcome::NotKept(e.to_string()),
                        })
                    }
                }
            }
            // Kept for other bets: a new data file is a new round.
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Refusal::Unreadable(path.to_path_buf(), e.to_string())),
    }
    Ok(match keep(path, file, sealed) {
        Ok(()) => Outcome::Kept,
        Err(e) => Outcome::NotKept(e.to_string()),
    })
}

/// Writes the kept file whole or not at all: a temporary file beside it,
/// synced, then renamed over it.
fn keep(path: &Path, file: &Receipt, sealed: Digest) -> std::io::Result<()> {
    let kept = Kept {
        seal: sealed.to_string(),
        bets: file.count,
        digest: file.digest.to_string(),
    };
    let text = format!(
        "# The seal this agency's winners came with, for the bets of its data file \
         (count and digest).\n# A later run over the same bets must be given the same seal.\n{}",
        toml::to_string(&kept).expect("three plain values serialise")
    );
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut out = std::fs::File::create(&temporary)?;
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(n: u32) -> Receipt {
        let mut r = Receipt::empty(1);
        for i in 0..n {
            r.push([b"A", b"B", i.to_string().as_bytes(), b"1999-03-17"], 7);
        }
        r
    }

    #[test]
    fn kept_once_then_compared_for_the_same_bets_and_replaced_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv.seal");
        let (first, other) = (Receipt::empty(1).digest, Receipt::empty(2).digest);
        let bets = receipt(3);
        assert_eq!(
            compare_and_keep(&path, &bets, first, false),
            Ok(Outcome::Kept)
        );
        assert_eq!(
            compare_and_keep(&path, &bets, first, false),
            Ok(Outcome::Same)
        );
        match compare_and_keep(&path, &bets, other, false) {
            Err(Refusal::Differs(why)) => assert!(
                why.starts_with(&format!(
                    "the central sealed this round as {other}, but this agency was given {first}"
                )),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        // Refused: the kept seal is left as it was.
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains(&first.to_string()));
        // The same bets uploaded anew (the central held none of them when
        // the run began): a new round, whose seal replaces the kept one.
        assert_eq!(
            compare_and_keep(&path, &bets, other, true),
            Ok(Outcome::NewRound)
        );
        assert_eq!(
            compare_and_keep(&path, &bets, other, false),
            Ok(Outcome::Same)
        );
        assert_eq!(
            compare_and_keep(&path, &bets, first, true),
            Ok(Outcome::NewRound)
        );
        // Other bets (a new data file): a new round, kept anew.
        assert_eq!(
            compare_and_keep(&path, &receipt(4), other, false),
            Ok(Outcome::Kept)
        );
        assert_eq!(
            compare_and_keep(&path, &receipt(4), other, false),
            Ok(Outcome::Same)
        );
    }

    #[test]
    fn a_damaged_file_is_refused_and_left_alone_and_an_unwritable_one_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv.seal");
        std::fs::write(&path, "seal = 3\n").unwrap();
        let seal = Receipt::empty(1).digest;
        assert!(matches!(
            compare_and_keep(&path, &receipt(1), seal, false),
            Err(Refusal::Unreadable(p, _)) if p == path
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "seal = 3\n");
        let nowhere = dir.path().join("missing-folder").join("agency-1.csv.seal");
        assert!(matches!(
            compare_and_keep(&nowhere, &receipt(1), seal, false),
            Ok(Outcome::NotKept(_))
        ));
    }
}
