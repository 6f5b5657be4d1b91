//! Recovery on start: reads the bets file through the one reader, counts
//! each agency's rows, and cuts a torn last row (a crash in the middle of a
//! write); any other damage stops the start with the file left as it was.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;

use super::row::{open_existing, read_part};
use super::StorageError;
use crate::model::AgencyId;
use crate::receipt::Receipt;

/// What [`recover`] found in the bets file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Complete rows kept.
    pub rows: u64,
    /// Each agency's receipt: its count is the position in its data file
    /// to resume from, its digest what the agency checks its file against.
    pub receipts: BTreeMap<AgencyId, Receipt>,
    /// Bytes of a torn last row that were cut off.
    pub truncated_bytes: u64,
}

/// Checks the bets file on start: keeps every complete row, cuts off a torn
/// last row, and counts the rows of each agency. A missing file is an empty
/// one.
///
/// A row is complete with its line end (outside quotes). A crash in the
/// middle of a write leaves at most the start of one row after the last
/// complete one, and only that is cut: a complete row that fails the row
/// check, wherever it is, and a tail that cannot start a row, stop the
/// start instead, naming the row and leaving the file as it was. Cutting
/// them would throw away stored bets (and every row after them).
///
/// The same pass computes each agency's receipt (one hash per row): the
/// central learns here what it tells each agency at `HELLO`.
///
/// # Errors
/// The file cannot be read or cut, or a row is damaged.
pub fn recover(path: &Path) -> Result<Recovered, StorageError> {
    let io_err = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let Some(mut file) = open_existing(path)? else {
        return Ok(Recovered::default());
    };
    let mut receipts = BTreeMap::new();
    let part = read_part(&mut file, 0, None, &mut |bet| {
        receipts
            .entry(bet.agency)
            .or_insert_with(|| Receipt::empty(bet.agency))
            // The row check bounds the number to 0..=9999.
            .push(bet.texts(), bet.number as u16);
    })
    .map_err(|fail| fail.into_error(path, 0))?;
    let f = OpenOptions::new().write(true).open(path).map_err(io_err)?;
    if part.torn > 0 {
        f.set_len(part.end).map_err(io_err)?;
    }
    // Synced whether or not anything was cut: a crash between a group's
    // write and its sync leaves rows in the page cache that were never
    // acknowledged, and the counts read here are about to be told to the
    // agencies (HELLO) as stored. The cut, too, must be durable before new
    // rows follow it.
    f.sync_all().map_err(io_err)?;
    Ok(Recovered {
        rows: part.rows,
        receipts,
        truncated_bytes: part.torn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    const GOOD: &str = "1,Ana,Pérez,1,1999-03-17,5\n2,\"B, b\",C,2,1999-03-17,7574\n";

    fn recovered(body: &[u8]) -> (Result<Recovered, StorageError>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, body).unwrap();
        let r = recover(&path);
        (r, std::fs::read(&path).unwrap())
    }

    #[test]
    fn recover_keeps_complete_rows_and_counts_agencies() {
        let (r, after) = recovered(GOOD.as_bytes());
        let r = r.unwrap();
        assert_eq!(after, GOOD.as_bytes());
        assert_eq!(r.rows, 2);
        let counts: BTreeMap<_, _> = r.receipts.iter().map(|(&a, r)| (a, r.count)).collect();
        assert_eq!(counts, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(r.truncated_bytes, 0);
    }

    #[test]
    fn recover_cuts_a_torn_row_at_every_length() {
        // A third row torn at every byte: whatever is left of it goes, the
        // first two rows stay.
        let third = "3,\"Juan\nCarlos\",Núñez,30904465,1999-03-17,7574\n";
        for cut in 1..third.len() {
            let mut body = GOOD.as_bytes().to_vec();
            body.extend_from_slice(&third.as_bytes()[..cut]);
            let (r, after) = recovered(&body);
            let r = r.unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert_eq!(after, GOOD.as_bytes(), "cut at {cut}");
            assert_eq!(r.rows, 2);
            assert_eq!(r.truncated_bytes, cut as u64);
            assert_eq!(r.receipts.get(&3), None);
        }
    }

    #[test]
    fn recover_refuses_damage_before_the_tail() {
        let mut body = b"1,A,B,1,1999-03-17,5\ngarbage\n".to_vec();
        for _ in 0..2_000 {
            body.extend_from_slice(GOOD.as_bytes());
        }
        let (r, after) = recovered(&body);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
        assert_eq!(after, body, "nothing is cut when refusing");
    }

    /// A valid plain row for agency 1, unique by `i`.
    fn plain(i: usize) -> String {
        format!("1,Ana,Perez,{},1999-03-17,{}\n", 1000 + i, i % 10_000)
    }

    #[test]
    fn recover_refuses_a_bad_row_followed_by_valid_rows() {
        let bad_rows = [
            "garbage\n",
            "1,Ana,Perez,12,1999-03-17,10000\n",
            "1,Ana,Perez,12a,1999-03-17,5\n",
            "0,Ana,Perez,12,1999-03-17,5\n",
            "1,Ana,Perez,12,1999-3-17,5\n",
            "1,Ana,Perez,12,1999-03-17\n",
            // A stray quote: every later line is "inside" it up to the end
            // of the file, far more than a name can hold.
            "1,\"Ana,Perez,12,1999-03-17,5\n",
        ];
        for bad in bad_rows {
            for after in [1, 50, 1_000] {
                if bad.contains('"') && after == 1 {
                    // One short row after a stray quote is a name of under
                    // 100 characters: indistinguishable from a torn row.
                    continue;
                }
                let mut body = GOOD.as_bytes().to_vec();
                body.extend_from_slice(bad.as_bytes());
                for i in 0..after {
                    body.extend_from_slice(plain(i).as_bytes());
                }
                let (r, after_recovery) = recovered(&body);
                let err = r.expect_err(bad).to_string();
                assert!(err.contains("row 3:"), "{bad:?} then {after}: {err}");
                assert_eq!(after_recovery, body, "{bad:?} then {after}: file changed");
            }
        }
    }

    #[test]
    fn recover_refuses_a_bad_complete_last_row() {
        for bad in [
            "1,A,B\n",
            "3,A,B,x,1999-03-17,5\n",
            "3,A,B,1,1999-03-17,99999\n",
        ] {
            let body = format!("{GOOD}{bad}");
            let (r, after) = recovered(body.as_bytes());
            let err = r.expect_err(bad).to_string();
            assert!(err.contains("row 3:"), "{bad:?}: {err}");
            assert_eq!(after, body.as_bytes());
        }
    }

    #[test]
    fn recovery_and_the_tally_refuse_the_same_rows_by_the_same_number() {
        for bad in ["1,A,B,7,1999-03-17,10000\n", "1,A,B,7x,1999-03-17,5\n"] {
            let mut body = GOOD.to_string();
            for i in 0..10 {
                body.push_str(&plain(i));
            }
            body.push_str(bad);
            body.push_str(&plain(11));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bets.csv");
            std::fs::write(&path, &body).unwrap();
            let by_recovery = recover(&path).unwrap_err().to_string();
            let by_tally = crate::store::file::tally(&path, 5).unwrap_err().to_string();
            assert!(by_recovery.contains("row 13:"), "{by_recovery}");
            assert_eq!(by_recovery, by_tally);
        }
    }

    #[test]
    fn a_torn_tail_is_counted_by_neither_recovery_nor_the_reader() {
        let body = format!("{GOOD}3,\"Juan\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, &body).unwrap();
        assert_eq!(crate::store::file::read_rows(&path, |_| {}).unwrap(), 2);
        let r = recover(&path).unwrap();
        assert_eq!((r.rows, r.truncated_bytes), (2, 8));
    }
}
