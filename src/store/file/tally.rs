//! The draw's tally: every stored bet read back through the one reader,
//! counted per agency with each agency's winners in file order; a large
//! file in two halves at once.

use std::fs::File;
use std::io;
use std::path::Path;

use super::row::{open_existing, read_part, ReadFail, StoredBet};
use super::StorageError;
use crate::receipt::{Receipt, Recomputed};
use crate::store::Tally;

impl Tally {
    /// Counts one stored bet.
    fn add(&mut self, bet: StoredBet<'_>, winning: u32) {
        *self.per_agency.entry(bet.agency).or_default() += 1;
        if bet.number == winning {
            let document = String::from_utf8_lossy(bet.document).into_owned();
            self.winners.entry(bet.agency).or_default().push(document);
        }
    }

    /// Adds what a later part of the file holds.
    fn extend(&mut self, later: Tally) {
        self.rows += later.rows;
        for (agency, n) in later.per_agency {
            *self.per_agency.entry(agency).or_default() += n;
        }
        for (agency, documents) in later.winners {
            self.winners.entry(agency).or_default().extend(documents);
        }
    }
}

/// Files smaller than this are tallied by one thread.
const SPLIT_ABOVE: u64 = 8 << 20;

/// Tallies the bets file for a draw of `winning`: bets per agency, and
/// each agency's winners in file order.
///
/// A large file is read by two threads at once, one from each half: the
/// draw runs while the agencies wait, and the central's other core would
/// otherwise sit idle. The second half starts after the first line end past
/// the middle; as a quoted name may hold a line break, that is only a guess
/// at a row boundary, which the first thread confirms by ending exactly
/// there. When it does not (the middle fell inside such a name), the second
/// thread's work is dropped and the first reads on to the end alone.
///
/// # Errors
/// As [`read_rows`](super::read_rows).
pub fn tally(path: &Path, winning: u32) -> Result<Tally, StorageError> {
    let Some(mut file) = open_existing(path)? else {
        return Ok(Tally::default());
    };
    let io_err = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let split = if len > SPLIT_ABOVE {
        row_start_after(&file, len / 2).map_err(io_err)?
    } else {
        None
    };
    let tally_part = |file: &mut File, from: u64, stop_at: Option<u64>| {
        let mut tally = Tally::default();
        let part = read_part(file, from, stop_at, &mut |bet| tally.add(bet, winning))?;
        tally.rows = part.rows;
        Ok::<_, ReadFail>((tally, part.end))
    };
    let Some(split) = split else {
        let (tally, _) = tally_part(&mut file, 0, None).map_err(|f| f.into_error(path, 0))?;
        return Ok(tally);
    };
    std::thread::scope(|scope| {
        let second = scope.spawn(|| {
            let mut file = File::open(path).map_err(ReadFail::Io)?;
            tally_part(&mut file, split, None)
        });
        let (mut tally, end) =
            tally_part(&mut file, 0, Some(split)).map_err(|f| f.into_error(path, 0))?;
        let second = second.join().expect("the draw's reader does not panic");
        if end == split {
            match second {
                Ok((later, _)) => tally.extend(later),
                Err(fail) => return Err(fail.into_error(path, tally.rows)),
            }
        } else {
            // The guess fell inside a row: read on from where the first
            // half really ended.
            let (later, _) =
                tally_part(&mut file, end, None).map_err(|f| f.into_error(path, tally.rows))?;
            tally.extend(later);
        }
        Ok(tally)
    })
}

/// Recomputes each agency's receipt and its winners for `winning` from the
/// bets file, in one pass and without changing it (a torn last row is not
/// a stored bet: it is neither counted nor cut). What `lottery verify`
/// compares with the draw record; one thread, as receipts chain each
/// agency's bets in order.
///
/// # Errors
/// As [`read_rows`](super::read_rows).
pub fn recompute(path: &Path, winning: u16) -> Result<Recomputed, StorageError> {
    let mut found = Recomputed::default();
    super::read_rows(path, |bet| {
        found
            .receipts
            .entry(bet.agency)
            .or_insert_with(|| Receipt::empty(bet.agency))
            // The row check bounds the number to 0..=9999.
            .push(bet.texts(), bet.number as u16);
        if bet.number == u32::from(winning) {
            let document = String::from_utf8_lossy(bet.document).into_owned();
            found.winners.entry(bet.agency).or_default().push(document);
        }
    })?;
    Ok(found)
}

/// Where the first line after byte `from` starts, if there is one.
fn row_start_after(file: &File, from: u64) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let mut window = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut window, from)?;
    Ok(memchr::memchr(b'\n', &window[..n]).map(|at| from + at as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BetRef;
    use crate::store::file::encode_rows;

    /// A bets file over the split threshold: `rows` rows, with a row whose
    /// quoted name holds many line breaks at row `tricky_at`.
    fn big_file(path: &Path, rows: u32, tricky_at: Option<u32>) -> Tally {
        let tricky = "x\n".repeat(3000);
        let mut body = Vec::new();
        let mut expected = Tally::default();
        for i in 0..rows {
            let doc = (10_000_000 + i).to_string();
            let agency = 1 + i % 3;
            let number = if i % 1000 == 7 {
                7574
            } else {
                (i % 9999) as u16
            };
            let first = if Some(i) == tricky_at {
                tricky.as_str()
            } else {
                "Ana"
            };
            let bet = BetRef {
                agency,
                first_name: first,
                last_name: "Pérez, Núñez",
                document: &doc,
                birthdate: "1999-03-17",
                number,
            };
            encode_rows([bet], &mut body);
            expected.rows += 1;
            expected.add(
                StoredBet {
                    agency,
                    first_name: first.as_bytes(),
                    last_name: "Pérez, Núñez".as_bytes(),
                    document: doc.as_bytes(),
                    birthdate: b"1999-03-17",
                    number: u32::from(number),
                },
                7574,
            );
        }
        std::fs::write(path, &body).unwrap();
        assert!(body.len() as u64 > SPLIT_ABOVE);
        expected
    }

    #[test]
    fn tally_in_two_halves_matches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        // A tricky row far from the middle: the split is taken.
        let expected = big_file(&path, 200_000, Some(10));
        assert_eq!(tally(&path, 7574).unwrap(), expected);

        // A tricky row right at the middle, its line breaks around the
        // first line end past it: the guess is wrong and must be dropped.
        big_file(&path, 200_000, None);
        let len = std::fs::metadata(&path).unwrap().len();
        let middle_row = {
            let body = std::fs::read(&path).unwrap();
            body[..len as usize / 2]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u32
        };
        let expected = big_file(&path, 200_000, Some(middle_row - 1));
        let len = std::fs::metadata(&path).unwrap().len();
        let split = row_start_after(&File::open(&path).unwrap(), len / 2)
            .unwrap()
            .unwrap();
        let body = std::fs::read(&path).unwrap();
        assert_eq!(
            body[..split as usize]
                .iter()
                .filter(|&&b| b == b'"')
                .count()
                % 2,
            1,
            "the guessed split is inside the quoted name"
        );
        assert_eq!(tally(&path, 7574).unwrap(), expected);
    }

    #[test]
    fn tally_names_a_corrupt_row_in_the_second_half_by_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        big_file(&path, 200_000, Some(10));
        let mut body = std::fs::read(&path).unwrap();
        body.extend_from_slice(b"1,A,B,notadocument,1999-03-17,5\n");
        std::fs::write(&path, &body).unwrap();
        let err = tally(&path, 7574).unwrap_err().to_string();
        assert!(err.contains("row 200001"), "{err}");
    }
}
