//! The row format of the bets file, `agency,first_name,last_name,document,birthdate,number`:
//! the encoder ([`encode_rows`]), the one reader ([`read_rows`], and
//! `read_part` under recovery and the draw) and the one row check
//! ([`check_row`]). Everything that reads the file reads it through here, so
//! a row that recovery accepts is a row the draw accepts, and the reverse.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;

use super::StorageError;
use crate::model::{AgencyId, BetBytes, MAX_DOCUMENT_LEN, MAX_NAME_CHARS, MAX_NUMBER};
use crate::scan;

/// Encodes bets as CSV rows of the bets file, quoting only the fields that
/// need it (those holding `,`, `"`, CR or LF; a `"` inside is doubled).
///
/// Written by hand rather than through the `csv` writer: this runs for every
/// stored bet on the central's hot path, and nearly every field is plain
/// text copied as is. Any CSV reader reads it back, [`read_rows`] included.
pub fn encode_rows<'a, B: Into<BetBytes<'a>>>(
    bets: impl IntoIterator<Item = B>,
    dst: &mut Vec<u8>,
) {
    let mut digits = itoa::Buffer::new();
    for b in bets {
        let b = b.into();
        dst.extend_from_slice(digits.format(b.agency()).as_bytes());
        for field in b.texts() {
            dst.push(b',');
            push_field(dst, field);
        }
        dst.push(b',');
        dst.extend_from_slice(digits.format(b.number()).as_bytes());
        dst.push(b'\n');
    }
}

/// A field as CSV: as it is, or quoted when it must be. The bytes that call
/// for quotes are all below `-`, which documents, dates and most names never
/// hold: one test of eight bytes at a time rules them out, and only a field
/// with a byte that low (a space, say) is looked at byte by byte. The plain case is
/// kept small enough to be inlined into [`encode_rows`]'s loop (out of line,
/// its call cost the central about 45 instructions a bet; see
/// docs/PERFORMANCE.md); quoting, rare, is out of line.
#[inline(always)]
fn push_field(dst: &mut Vec<u8>, field: &[u8]) {
    if scan::any_below(field, b',' + 1)
        && field
            .iter()
            .any(|&c| matches!(c, b',' | b'"' | b'\r' | b'\n'))
    {
        push_quoted(dst, field);
    } else {
        dst.extend_from_slice(field);
    }
}

#[cold]
#[inline(never)]
fn push_quoted(dst: &mut Vec<u8>, field: &[u8]) {
    dst.push(b'"');
    for part in field.split_inclusive(|&c| c == b'"') {
        dst.extend_from_slice(part);
        if part.last() == Some(&b'"') {
            dst.push(b'"');
        }
    }
    dst.push(b'"');
}

/// A stored bet as the reader hands it out, borrowed from the reader.
#[derive(Debug, Clone, Copy)]
pub struct StoredBet<'a> {
    /// The agency that took it.
    pub agency: AgencyId,
    /// First name(s), unquoted (the row check does not look inside).
    pub first_name: &'a [u8],
    /// Last name(s), unquoted.
    pub last_name: &'a [u8],
    /// The document (DNI): 1 to 10 ASCII digits.
    pub document: &'a [u8],
    /// Birthdate, `YYYY-MM-DD` in shape.
    pub birthdate: &'a [u8],
    /// The number bet on.
    pub number: u32,
}

impl StoredBet<'_> {
    /// Its text fields in the order receipts hash them.
    pub fn texts(&self) -> [&[u8]; 4] {
        [
            self.first_name,
            self.last_name,
            self.document,
            self.birthdate,
        ]
    }
}

/// The one row check: six fields, an agency id (1 or more), a document of
/// 1 to 10 digits, a birthdate shaped `YYYY-MM-DD` and a number from 0 to
/// 9999. `count` is how many fields the row has (only the first six are in
/// `fields`).
///
/// It runs for every row of the draw, so it checks bytes only: no UTF-8,
/// no calendar (the writer stored only bets that passed the model's full
/// validation; this catches damage, not invalid bets).
///
/// # Errors
/// Why the row is not a stored bet.
#[inline(always)]
pub fn check_row<'a>(fields: &[&'a [u8]; 6], count: usize) -> Result<StoredBet<'a>, String> {
    if count != 6 {
        return Err(format!("{count} fields instead of 6"));
    }
    let agency = match digits_value(fields[0]) {
        Some(a) if a >= 1 && a <= u64::from(AgencyId::MAX) => a as AgencyId,
        _ => return Err("agency is not an id (1 or more)".into()),
    };
    let number = match digits_value(fields[5]) {
        Some(n) if n <= u64::from(MAX_NUMBER) => n as u32,
        _ => return Err("number is not from 0 to 9999".into()),
    };
    let document = fields[3];
    if document.is_empty() || document.len() > MAX_DOCUMENT_LEN || !all_digits(document) {
        return Err("document is not 1 to 10 digits".into());
    }
    if !is_date_shaped(fields[4]) {
        return Err("birthdate is not of the form YYYY-MM-DD".into());
    }
    Ok(StoredBet {
        agency,
        first_name: fields[1],
        last_name: fields[2],
        document,
        birthdate: fields[4],
        number,
    })
}

/// The value of one to ten ASCII digits (ten fit in a `u64`); `None` for
/// anything else.
fn digits_value(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 10 || !all_digits(field) {
        return None;
    }
    Some(field.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn all_digits(field: &[u8]) -> bool {
    field.iter().all(u8::is_ascii_digit)
}

/// `YYYY-MM-DD` in shape: ten bytes, digits but for the two dashes.
/// Checked eight bytes at a time: this runs for every row of the draw.
fn is_date_shaped(field: &[u8]) -> bool {
    const DASHES_AT: u64 = 0xFF << 32 | 0xFF << 56;
    const DASHES: u64 = (b'-' as u64) << 32 | (b'-' as u64) << 56;
    const ZEROS_AT_DASHES: u64 = (b'0' as u64) << 32 | (b'0' as u64) << 56;
    let Ok(date) = <&[u8; 10]>::try_from(field) else {
        return false;
    };
    let head = u64::from_le_bytes(date[..8].try_into().expect("eight bytes"));
    head & DASHES_AT == DASHES
        && eight_digits(head & !DASHES_AT | ZEROS_AT_DASHES)
        && date[8].is_ascii_digit()
        && date[9].is_ascii_digit()
}

/// Whether the eight bytes of `w` are all ASCII digits (0x30 to 0x39): each
/// has 3 as its high half, and still has after adding 6 (no byte can carry
/// into the next once the first test holds).
fn eight_digits(w: u64) -> bool {
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    const SIXES: u64 = 0x0606_0606_0606_0606;
    w & HIGH == THREES && (w + SIXES) & HIGH == THREES
}

/// Whether `field` is the start of a `YYYY-MM-DD`-shaped date.
fn could_be_date(field: &[u8]) -> bool {
    field.len() <= 10
        && field.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// Whether `tail`, the bytes after the last complete row, can be the start
/// of a row that a crash cut short: what the writer was writing when the
/// process died. Only such a tail is a torn write; anything else (too many
/// fields, a letter in the agency, a "name" of hundreds of characters that
/// swallowed later rows behind a stray quote) is damage.
///
/// # Errors
/// Why `tail` cannot start a row.
fn check_torn(tail: &[u8]) -> Result<(), String> {
    // A row torn between its `\r` and `\n` (a CRLF file edited by hand).
    let tail = tail.strip_suffix(b"\r").unwrap_or(tail);
    let mut reader = csv_core::ReaderBuilder::new()
        .terminator(csv_core::Terminator::Any(b'\n'))
        .build();
    let mut out = vec![0; tail.len() + 1];
    let mut ends = [0usize; 7];
    let (outcome, read, written, count) = reader.read_record(tail, &mut out, &mut ends);
    if outcome != csv_core::ReadRecordResult::InputEmpty || read != tail.len() {
        return Err("not the start of a row, so not a torn write".into());
    }
    // The fields so far: `count` complete ones, then the one cut short.
    let mut from = 0;
    for (i, &end) in ends[..count]
        .iter()
        .chain(std::iter::once(&written))
        .enumerate()
    {
        let field = &out[from..end];
        from = end;
        let fits = match i {
            0 => field.len() <= 10 && all_digits(field),
            // Characters, counted by their first bytes (the last one may be
            // cut short).
            1 | 2 => field.iter().filter(|&&b| b & 0xC0 != 0x80).count() <= MAX_NAME_CHARS,
            3 => field.len() <= MAX_DOCUMENT_LEN && all_digits(field),
            4 => could_be_date(field),
            5 => field.len() <= 4 && all_digits(field),
            _ => false,
        };
        if !fits {
            return Err(format!(
                "field {} cannot start a stored bet, so this is not a torn write",
                i + 1
            ));
        }
    }
    Ok(())
}

/// Streams the bets file back, calling `each` for every stored bet, without
/// holding the file in memory; returns how many there are. A missing file
/// is an empty one.
///
/// A last row without its line end is a torn write (recovery cuts it on
/// start; later, it is a batch still being written): it is not a stored bet
/// and is not counted, but it must be the start of one.
///
/// # Errors
/// The file cannot be read, a row fails [`check_row`], or the bytes after
/// the last complete row cannot start one.
pub fn read_rows(path: &Path, mut each: impl FnMut(StoredBet<'_>)) -> Result<u64, StorageError> {
    let Some(mut file) = open_existing(path)? else {
        return Ok(0);
    };
    match read_part(&mut file, 0, None, &mut each) {
        Ok(part) => Ok(part.rows),
        Err(fail) => Err(fail.into_error(path, 0)),
    }
}

/// The bets file, or `None` when there is none yet.
///
/// # Errors
/// The file exists but cannot be opened.
pub(super) fn open_existing(path: &Path) -> Result<Option<File>, StorageError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Why reading a part of the file failed; rows count from the part's start.
pub(super) enum ReadFail {
    Io(io::Error),
    Corrupt(u64, String),
}

impl ReadFail {
    /// The error, for a part that starts after `rows_before` rows.
    pub(super) fn into_error(self, path: &Path, rows_before: u64) -> StorageError {
        match self {
            ReadFail::Io(source) => StorageError::Io {
                path: path.to_path_buf(),
                source,
            },
            ReadFail::Corrupt(row, reason) => StorageError::Corrupt {
                path: path.to_path_buf(),
                row: rows_before + row,
                reason,
            },
        }
    }
}

/// What a part of the file held.
pub(super) struct Part {
    /// Complete rows (blank lines are skipped, as CSV readers do).
    pub(super) rows: u64,
    /// Where the part ended: the file offset after its last complete row.
    pub(super) end: u64,
    /// Bytes of a torn last row after `end` (only for a part read to the
    /// end of the file).
    pub(super) torn: u64,
}

/// Bytes the reader reads at a time.
pub(super) const READ_BLOCK: usize = 256 << 10;

/// Reads rows from file offset `from` (which must start a row) until the
/// end of the file, or until a row would start at or past `stop_at`,
/// checking each with [`check_row`] and handing it to `each`.
///
/// This is the draw's whole cost, so it reads the file in large blocks and
/// finds every `,`, `"` and line end of a block in one pass of the shared
/// byte scanner: a row without a `"` (nearly all of them) is cut at the
/// commas found before its line end; a row with quoted
/// fields (a name holding a comma, a quote or a line break, which may span
/// lines) goes through CSV's own parser. A row is complete with its line
/// end outside quotes; what follows the last complete row at the end of
/// the file is a torn write, which [`check_torn`] must accept.
pub(super) fn read_part(
    file: &mut File,
    from: u64,
    stop_at: Option<u64>,
    each: &mut dyn FnMut(StoredBet<'_>),
) -> Result<Part, ReadFail> {
    let mut buf = vec![0u8; READ_BLOCK];
    file.seek(io::SeekFrom::Start(from)).map_err(ReadFail::Io)?;
    // `base` is the file offset of `buf[0]`.
    let (mut start, mut filled, mut eof, mut base) = (0usize, 0usize, false, from);
    let (mut rows, mut torn) = (0u64, 0u64);
    let mut quoted = csv_core::Reader::new();
    let mut scratch = (Vec::new(), [0usize; 8]);
    // Where every `,`, `\n` and `"` of the buffer is, found once per read;
    // `mark` is the first one at or after `start`.
    let mut marks: Vec<u32> = Vec::new();
    let (mut marked, mut mark) = (0, 0);
    loop {
        if stop_at.is_some_and(|stop| base + start as u64 >= stop) {
            break;
        }
        // A whole row from `start`, or (at the end) whatever is left.
        // Most rows: the next marks are five commas and the line's end.
        let mut commas = [0usize; 5];
        let plain = plain_row(&buf, &marks[..marked], &mut mark, start, &mut commas);
        let found = match plain {
            Some(PlainRow { len, commas: 5 }) => {
                let row = &buf[start..start + len];
                start += len + 1;
                let mut fields = [&b""[..]; 6];
                let mut from = 0;
                for (slot, &comma) in fields.iter_mut().zip(&commas) {
                    *slot = &row[from..comma];
                    from = comma + 1;
                }
                fields[5] = row[from..].strip_suffix(b"\r").unwrap_or(&row[from..]);
                rows += 1;
                each(check_row(&fields, 6).map_err(|reason| ReadFail::Corrupt(rows, reason))?);
                continue;
            }
            // Blank lines, rows with quotes or the wrong field count, and
            // the last row: the general path below.
            Some(_) => complete_row(&buf[start..filled]),
            None => None,
        };
        if let Some((len, _)) = found {
            // The general path takes the row: skip its marks.
            while marks[..marked]
                .get(mark)
                .is_some_and(|&m| (m as usize) < start + len)
            {
                mark += 1;
            }
        }
        let (row_len, has_quotes) = match found {
            Some(found) => found,
            None if !eof => {
                // Keep the partial row, make room after it, read on.
                buf.copy_within(start..filled, 0);
                filled -= start;
                base += start as u64;
                start = 0;
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0); // a row longer than a block
                }
                let n = file.read(&mut buf[filled..]).map_err(ReadFail::Io)?;
                filled += n;
                eof = n == 0;
                // Written by index: the room grows with the buffer only.
                marks.resize(buf.len(), 0);
                marked = scan::positions_of(&buf[..filled], *b",\n\"", &mut marks);
                mark = 0;
                continue;
            }
            None if start == filled => break,
            None => {
                // No line end outside quotes before the end of the file.
                check_torn(&buf[start..filled]).map_err(|r| ReadFail::Corrupt(rows + 1, r))?;
                torn = (filled - start) as u64;
                break;
            }
        };
        let row = &buf[start..start + row_len];
        start += row_len;
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        if row.is_empty() {
            continue; // CSV readers skip blank lines too
        }
        rows += 1;
        let mut fields = [&b""[..]; 6];
        let count = if has_quotes {
            split_quoted(row, &mut fields, &mut quoted, &mut scratch)
        } else {
            split_plain(row, &mut fields)
        };
        each(check_row(&fields, count).map_err(|reason| ReadFail::Corrupt(rows, reason))?);
    }
    Ok(Part {
        rows,
        end: base + start as u64,
        torn,
    })
}

/// Length of the first complete row of `bytes`, its `\n` included, and
/// whether it holds a `"`: the first line when it holds none or an even
/// number of them, else as many lines as it takes for the quotes to pair up
/// (a quoted field holding a line break).
fn complete_row(bytes: &[u8]) -> Option<(usize, bool)> {
    let end = memchr::memchr(b'\n', bytes)?;
    if memchr::memchr(b'"', &bytes[..end]).is_none() {
        return Some((end + 1, false));
    }
    let mut open = false;
    let mut from = 0;
    loop {
        let end = from + memchr::memchr(b'\n', &bytes[from..])?;
        let quotes = memchr::memchr_iter(b'"', &bytes[from..end]).count();
        open ^= quotes % 2 == 1;
        if !open {
            return Some((end + 1, true));
        }
        from = end + 1;
    }
}

/// A line without quotes: its length (without the `\n`) and its commas.
struct PlainRow {
    len: usize,
    commas: usize,
}

/// The row at `start`, read from the buffer's `marks` (the positions of
/// its `,`, `\n` and `"`) from index `mark` on, noting where its first five
/// commas are (relative to `start`). `None` without a whole line; `commas`
/// is not 5 when the line is not a plain six-field row (reported as 0 when
/// it holds a `"`). Advances `mark` past the line.
fn plain_row(
    buf: &[u8],
    marks: &[u32],
    mark: &mut usize,
    start: usize,
    commas: &mut [usize; 5],
) -> Option<PlainRow> {
    let mut found = 0;
    for (k, &m) in marks.iter().enumerate().skip(*mark) {
        let at = m as usize;
        if at < start {
            continue; // behind a row the general path took
        }
        match buf[at] {
            b',' => {
                if let Some(slot) = commas.get_mut(found) {
                    *slot = at - start;
                }
                found += 1;
            }
            b'\n' => {
                *mark = k + 1;
                return Some(PlainRow {
                    len: at - start,
                    commas: found,
                });
            }
            // Quoted fields: not plain; the general path takes the row.
            _ => {
                return Some(PlainRow {
                    len: at - start,
                    commas: 0,
                })
            }
        }
    }
    None
}

/// Splits a row without quotes at its commas into at most six fields;
/// returns how many it has.
fn split_plain<'a>(row: &'a [u8], fields: &mut [&'a [u8]; 6]) -> usize {
    let mut count = 0;
    let mut from = 0;
    for comma in memchr::memchr_iter(b',', row) {
        if let Some(slot) = fields.get_mut(count) {
            *slot = &row[from..comma];
        }
        count += 1;
        from = comma + 1;
    }
    if let Some(slot) = fields.get_mut(count) {
        *slot = &row[from..];
    }
    count + 1
}

/// Splits a row with quoted fields into at most six fields through `quoted`
/// (CSV's own parser, reused from row to row), unquoted into `scratch`;
/// returns how many it has.
fn split_quoted<'a>(
    row: &'a [u8],
    fields: &mut [&'a [u8]; 6],
    quoted: &mut csv_core::Reader,
    scratch: &'a mut (Vec<u8>, [usize; 8]),
) -> usize {
    let (out, ends) = scratch;
    // Unquoting only shortens a field, and the parser stops at the row's
    // end: the row's length is room enough.
    out.resize(row.len() + 1, 0);
    let (mut read, mut written, mut count) = (0, 0, 0);
    loop {
        // The empty input after the row tells the parser the row ended.
        let input = &row[read..];
        let (outcome, nin, nout, nend) =
            quoted.read_record(input, &mut out[written..], &mut ends[count..]);
        read += nin;
        written += nout;
        count += nend;
        match outcome {
            csv_core::ReadRecordResult::InputEmpty if input.is_empty() => break,
            csv_core::ReadRecordResult::InputEmpty => {}
            csv_core::ReadRecordResult::Record | csv_core::ReadRecordResult::End => break,
            // More than eight fields, or (impossible) more output than input.
            csv_core::ReadRecordResult::OutputEndsFull | csv_core::ReadRecordResult::OutputFull => {
                quoted.reset();
                return ends.len() + 1;
            }
        }
    }
    quoted.reset();
    let out: &'a [u8] = out;
    let mut from = 0;
    for (slot, &end) in fields.iter_mut().zip(ends.iter().take(count)) {
        *slot = &out[from..end];
        from = end;
    }
    count
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::Bet;

    /// Every bet [`read_rows`] reads back: (agency, document, number).
    pub(crate) fn scanned(path: &Path) -> (u64, Vec<(u32, String, u32)>) {
        let mut seen = Vec::new();
        let n = read_rows(path, |b| {
            let document = String::from_utf8(b.document.to_vec()).unwrap();
            seen.push((b.agency, document, b.number));
        })
        .unwrap();
        (n, seen)
    }

    pub(crate) fn bet(agency: u32, first: &str, last: &str, doc: &str, n: &str) -> Bet {
        Bet::from_fields(&agency.to_string(), first, last, doc, "1999-03-17", n).unwrap()
    }

    #[test]
    fn scan_reads_every_row_back_across_blocks_and_quoting() {
        // Enough rows to cross several read blocks, with names that need
        // quoting (some spanning lines) among plain ones.
        let names = [
            "Ana",
            "Pérez, Ana",
            "say \"hi\"",
            "two\nlines",
            "cr\r\nlf",
            "\"",
            ",",
            "Ñandú",
        ];
        let mut bets = crate::model::Bets::new();
        let mut expected = Vec::new();
        for i in 0..60_000u32 {
            let (first, last) = (names[i as usize % 8], names[(i as usize / 8) % 8]);
            let doc = format!("{}", 10_000_000 + i);
            let number = (i * 7919 % 10_000).to_string();
            let agency = 1 + i % 7;
            bets.push_fields(
                &agency.to_string(),
                first,
                last,
                &doc,
                "1999-03-17",
                &number,
            )
            .unwrap();
            expected.push((agency, doc, i * 7919 % 10_000));
        }
        let mut body = Vec::new();
        encode_rows(bets.iter(), &mut body);
        assert!(body.len() > 2 * READ_BLOCK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, &body).unwrap();

        let (n, seen) = scanned(&path);
        assert_eq!(n, 60_000);
        assert_eq!(seen, expected);
        // And the csv crate reads the same rows.
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(&body[..]);
        let theirs: Vec<(u32, String, u32)> = reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                (
                    r[0].parse().unwrap(),
                    r[3].to_string(),
                    r[5].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(theirs, expected);
    }

    #[test]
    fn a_last_row_without_newline_is_torn_and_blank_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let complete = "1,A,B,7,1999-03-17,5\r\n\n2,\"x,\"\"y\",C,8,1999-03-17,6\n";
        std::fs::write(&path, complete).unwrap();
        let (n, seen) = scanned(&path);
        assert_eq!(n, 2);
        assert_eq!(seen, [(1, "7".into(), 5), (2, "8".into(), 6)]);
        // Without its line end the last row is a torn write: not a bet
        // (recovery cuts it), whether or not its fields look whole.
        std::fs::write(&path, complete.trim_end()).unwrap();
        assert_eq!(scanned(&path).0, 1);
        // Bytes after the last row that cannot start one are damage.
        std::fs::write(&path, "1,A,B,7,1999-03-17,5\n1,\"A,B\",7,x").unwrap();
        let err = read_rows(&path, |_| {}).unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }

    #[test]
    fn scan_of_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_rows(&dir.path().join("none.csv"), |_| {}).unwrap(), 0);
    }

    #[test]
    fn scan_reports_the_corrupt_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, "1,A,B,1,1999-03-17,5\n1,A,B\n").unwrap();
        let err = read_rows(&path, |_| {}).unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }

    #[test]
    fn rows_quote_only_what_needs_it() {
        let mut rows = Vec::new();
        let b = bet(12, "say \"hi\"", "a,b\r\nc", "7", "42");
        encode_rows([b.as_ref()], &mut rows);
        assert_eq!(
            String::from_utf8(rows.clone()).unwrap(),
            "12,\"say \"\"hi\"\"\",\"a,b\r\nc\",7,1999-03-17,42\n"
        );
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(&rows[..]);
        let record = reader.records().next().unwrap().unwrap();
        assert_eq!(&record[1], "say \"hi\"");
        assert_eq!(&record[2], "a,b\r\nc");
    }
}
