//! What the agency tells its operator when its data file and the central
//! disagree: a receipt or a seal that does not match. The receipts and the
//! seal themselves are computed in `receipt.rs`; these are the texts.

use crate::model::AgencyId;
use crate::receipt::{Digest, Receipt, Sealed};

/// What the mismatches an agency can meet have in common: why they happen.
const LIKELY_CAUSES: &str = "an earlier round's bets, another agency's file, or an edited file";

/// The agency's check before it resumes: `file` is the receipt of the first
/// `held.count` bets of its data file at `path` (or of all of them, when the
/// file has fewer), `held` the central's receipt from `HELLO`.
///
/// # Errors
/// A message for the operator naming the mismatch; nothing may be sent.
pub fn check_prefix(
    path: &std::path::Path,
    agency: AgencyId,
    held: Receipt,
    file: &Receipt,
) -> Result<(), String> {
    let path = path.display();
    if file.count < held.count {
        return Err(format!(
            "the central holds {} bets for agency {agency} but {path} has only {}: {LIKELY_CAUSES}; \
             nothing was sent (start a new round on the central, or use the right file)",
            held.count, file.count
        ));
    }
    if file.digest != held.digest {
        return Err(format!(
            "the central holds {} bets for agency {agency} that are not the first {} of {path} \
             (central digest {}, file digest {}): {LIKELY_CAUSES}; nothing was sent \
             (start a new round on the central, or use the right file)",
            held.count, held.count, held.digest, file.digest
        ));
    }
    Ok(())
}

/// [`check_prefix`]'s message when line `line`, among the first `held`
/// bets of the file, is not a valid bet: the central holds
/// only valid bets, so it cannot hold this file's.
pub fn not_a_bet(path: &std::path::Path, agency: AgencyId, held: u64, line: u64) -> String {
    format!(
        "the central holds {held} bets for agency {agency}, but line {line} of {}, among the \
         first {held} bets, is not a valid bet: {LIKELY_CAUSES}; nothing was sent",
        path.display(),
    )
}

/// The agency's check of its winners: the receipt the central sealed for
/// it must be its whole file's (`file`).
///
/// # Errors
/// A message naming the mismatch: the winners are not valid.
pub fn check_sealed(path: &std::path::Path, file: &Receipt, sealed: &Sealed) -> Result<(), String> {
    let sealed_receipt = sealed.receipt;
    if sealed_receipt == *file {
        return Ok(());
    }
    Err(format!(
        "the draw (seal {}) counted {} bets with digest {} for this agency, but {} holds {} bets \
         with digest {}: the central did not draw over exactly this file's bets, so these \
         winners are not valid",
        sealed.seal,
        sealed_receipt.count,
        sealed_receipt.digest,
        path.display(),
        file.count,
        file.digest
    ))
}

/// The agency's check of a seal against the one it kept from an earlier
/// run over the same data file (the same bets, so the same round): they
/// must be equal.
///
/// # Errors
/// A message naming both seals and the file that keeps the first: the
/// central no longer holds the round the agency was given, so these
/// winners are not valid.
pub fn check_kept_seal(
    kept_in: &std::path::Path,
    kept: Digest,
    sealed: Digest,
) -> Result<(), String> {
    if kept == sealed {
        return Ok(());
    }
    Err(format!(
        "the central sealed this round as {sealed}, but this agency was given {kept} for the \
         same bets (kept in {}): the round was drawn again over other bets, so these winners \
         are not valid; publish both seals and compare them with the other agencies' (remove \
         that file only when this data file was meant for a new round)",
        kept_in.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Bet;
    use crate::receipt::seal;

    fn bet(first: &str, last: &str, doc: &str, number: &str) -> Bet {
        Bet::from_fields("1", first, last, doc, "1999-03-17", number).unwrap()
    }

    #[test]
    fn the_agency_checks_name_each_mismatch() {
        let path = std::path::Path::new("agency-1.csv");
        let a = bet("Ana", "Pérez", "30904465", "7574");
        let b = bet("Bob", "Lee", "1", "5");
        let held = Receipt::empty(1).after([a.as_ref()]);
        assert_eq!(check_prefix(path, 1, held, &held), Ok(()));
        let other = Receipt::empty(1).after([b.as_ref()]);
        let err = check_prefix(path, 1, held, &other).unwrap_err();
        assert!(
            err.starts_with(
                "the central holds 1 bets for agency 1 that are not the first 1 of agency-1.csv"
            ) && err.contains(LIKELY_CAUSES),
            "{err}"
        );
        let err = check_prefix(path, 1, held, &Receipt::empty(1)).unwrap_err();
        assert!(err.contains("but agency-1.csv has only 0"), "{err}");

        let sealed = Sealed {
            receipt: held,
            seal: seal(7574, 1, &BTreeMap::from([(1, held)])),
        };
        assert_eq!(check_sealed(path, &held, &sealed), Ok(()));
        let two = held.after([b.as_ref()]);
        let err = check_sealed(path, &two, &sealed).unwrap_err();
        assert!(
            err.contains(&format!("counted 1 bets with digest {}", held.digest))
                && err.contains(&format!(
                    "agency-1.csv holds 2 bets with digest {}",
                    two.digest
                ))
                && err.ends_with("so these winners are not valid"),
            "{err}"
        );
    }
}
