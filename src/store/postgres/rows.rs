//! A batch's bets as rows of `COPY bets … FROM STDIN (FORMAT binary)`,
//! encoded on the connection's task that received them, so the writer only
//! numbers them and hands the bytes on.
//!
//! PostgreSQL's binary copy format: a header, then per row a 16-bit field
//! count and, per field, a 32-bit length and the value in the type's binary
//! form (an `int4` or `int8` big-endian, `text` as its UTF-8 bytes), then a
//! trailer of -1 as the field count. Every row here starts with the same
//! fixed-size fields (agency, then `seq`), so a row's `seq` sits at a known
//! offset from the row's start and can be written once the writer knows
//! where in its agency's upload the batch falls.
//!
//! Written by hand rather than through `BinaryCopyInWriter`, which encodes
//! each value behind a `dyn ToSql` on the writer's task: that was a third of
//! the writer's time per row.

use bytes::{BufMut, Bytes, BytesMut};

use crate::model::{AgencyId, BetRef};

/// The columns, in the order each row holds them.
///
/// The `WHERE` keeps every row (`random()` is in `[0, 1)`); it is there
/// because it is volatile, which makes PostgreSQL insert the rows one by
/// one instead of through COPY's multi-insert buffer. That buffer gives
/// each row it holds (up to 1,000) a slot of its own, and each slot
/// registers the table's one tuple descriptor with the statement's
/// resource owner: in PostgreSQL 15, past 64 entries, a hash table probed
/// linearly, and the same key every time, so each registration and each
/// release walks past all the others. One COPY per group of batches makes
/// that cost quadratic in the group, every group: a third of the server's
/// CPU (profiled, `MakeTupleTableSlot` → `ResourceOwnerRememberTupleDesc`
/// and back). Row by row, with one central the server spent a third less
/// CPU a bet and the central stored a third more bets a second (with
/// three centrals, whose groups are smaller, 15 % and 12 %); the
/// write-ahead log grows by about 60 % (a record per row instead of per
/// page), which a standby receives too. docs/PERFORMANCE.md, "PostgreSQL
/// rows one by one", has the runs.
///
/// That a volatile `WHERE` means one row at a time is how PostgreSQL's
/// COPY is written, not something its documentation promises: if a
/// version changes it, the rows are still stored (the writer checks
/// COPY's count, see `writer::group::copy`), only the gain is lost.
pub const COPY: &str =
    "COPY bets (agency, seq, first_name, last_name, document, birthdate, number) \
                        FROM STDIN (FORMAT binary) WHERE random() >= 0";

/// The stream's start: the signature, no flags, no header extension.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The stream's end: a row of -1 fields.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Fields per row (see [`COPY`]).
const FIELDS: i16 = 7;

/// Where a row's `seq` value starts: after the field count (2), the
/// agency's length and value (4 + 4), and `seq`'s length (4).
const SEQ_AT: usize = 2 + 4 + 4 + 4;

/// One batch's rows, their `seq` not yet written.
#[derive(Debug)]
pub struct Rows {
    agency: AgencyId,
    buf: BytesMut,
    /// Where each row starts in `buf`.
    starts: Vec<u32>,
}

impl Rows {
    /// Encodes `bets`, all of one agency.
    ///
    /// # Panics
    /// If the bets are of more than one agency, or their text passes 2 GiB
    /// (a batch is bounded by the frame size, far below).
    pub fn encode<'a>(agency: AgencyId, bets: impl ExactSizeIterator<Item = BetRef<'a>>) -> Rows {
        let mut rows = Rows {
            agency,
            buf: BytesMut::with_capacity(bets.len() * 96),
            starts: Vec::with_capacity(bets.len()),
        };
        let agency = i32::try_from(agency).expect("agency ids fit in int4");
        for bet in bets {
            assert_eq!(
                i64::from(bet.agency),
                i64::from(agency),
                "one agency per batch"
            );
            rows.starts
                .push(u32::try_from(rows.buf.len()).expect("a batch is small"));
            let buf = &mut rows.buf;
            buf.put_i16(FIELDS);
            buf.put_i32(4);
            buf.put_i32(agency);
            buf.put_i32(8);
            buf.put_i64(0); // seq: see `number_from`
            for text in [bet.first_name, bet.last_name, bet.document, bet.birthdate] {
                buf.put_i32(i32::try_from(text.len()).expect("a field is short"));
                buf.put_slice(text.as_bytes());
            }
            buf.put_i32(4);
            buf.put_i32(i32::from(bet.number));
        }
        rows
    }

    /// The agency the rows are of.
    pub fn agency(&self) -> AgencyId {
        self.agency
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Numbers the rows `first`, `first + 1`, … and returns their bytes.
    pub fn number_from(mut self, first: i64) -> Bytes {
        for (i, &start) in self.starts.iter().enumerate() {
            let at = start as usize + SEQ_AT;
            self.buf[at..at + 8].copy_from_slice(&(first + i as i64).to_be_bytes());
        }
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;

    fn bet(agency: &str, document: &str, number: &str) -> Bet {
        Bet::from_fields(agency, "Ana", "Pérez", document, "1999-03-17", number).unwrap()
    }

    #[test]
    fn a_row_is_the_binary_format_field_by_field_with_its_seq() {
        let bets = [bet("3", "30904465", "7574"), bet("3", "1", "0")];
        let rows = Rows::encode(3, bets.iter().map(Bet::as_ref));
        assert_eq!((rows.len(), rows.agency()), (2, 3));
        let bytes = rows.number_from(41);
        let mut first = Vec::new();
        first.extend_from_slice(&7i16.to_be_bytes());
        first.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 3]);
        first.extend_from_slice(&[0, 0, 0, 8]);
        first.extend_from_slice(&41i64.to_be_bytes());
        first.extend_from_slice(&[0, 0, 0, 3]);
        first.extend_from_slice(b"Ana");
        first.extend_from_slice(&[0, 0, 0, 6]);
        first.extend_from_slice("Pérez".as_bytes());
        first.extend_from_slice(&[0, 0, 0, 8]);
        first.extend_from_slice(b"30904465");
        first.extend_from_slice(&[0, 0, 0, 10]);
        first.extend_from_slice(b"1999-03-17");
        first.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0x1d, 0x96]);
        assert_eq!(&bytes[..first.len()], &first[..]);
        // The second row: its seq follows, its number is 0.
        let second = &bytes[first.len()..];
        assert_eq!(&second[SEQ_AT..SEQ_AT + 8], &42i64.to_be_bytes());
        assert_eq!(&second[second.len() - 4..], &[0, 0, 0, 0]);
        assert_eq!(HEADER.len(), 19);
    }
}
