//! The data file's records, read as the csv crate reads them (no header,
//! any number of fields, each record ending at `\n`), without its state
//! machine for the lines that need none.
//!
//! A data file is nearly all lines without a double quote: such a line is
//! its fields split at `,`, found with the rest of a block's structure in
//! one vectorised pass, and a whole block of lines is checked as UTF-8 at
//! once. A line with a quote, or one that is not UTF-8, is read by
//! `csv_core` itself, from where the line starts, as the csv crate would
//! (a quoted field may hold commas, quotes and newlines). Callgrind counted
//! the csv crate as a third of the agency's instructions per bet outside
//! SHA-256 (docs/PERFORMANCE.md).
//!
//! What the csv crate did, this does too: a UTF-8 byte order mark at the
//! start of the file is dropped, blank lines (`\n` alone) are no record,
//! and a record's line is the one after the previous record, so it counts
//! the blank lines before it as its own. The tests below compare the two
//! on arbitrary files.

use std::io::{self, Read};
use std::ops::ControlFlow;

use memchr::{memchr, memchr2, memchr3_iter, memrchr};

/// Bytes asked of the file in one read, and the buffer's first size.
const READ: usize = 1 << 16;
/// Bytes of whole lines checked as UTF-8 in one go: a block, not the whole
/// buffer, as a line with a quote ends the block early and the rest of it
/// is checked again.
const BLOCK: usize = 1 << 14;

/// The fields of one record, without allocating for the usual five (more
/// are an error, reported by their count).
#[derive(Default, Clone, Copy)]
pub(super) struct Fields<'a> {
    first: [&'a str; 5],
    len: usize,
    plain: bool,
}

impl<'a> Fields<'a> {
    /// Field `i`, or `""` past the end.
    pub(super) fn get(&self, i: usize) -> &'a str {
        self.first
            .get(i)
            .filter(|_| i < self.len)
            .copied()
            .unwrap_or("")
    }

    /// How many fields the record has.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether no field holds a byte the wire escapes (`\`, `|`, a
    /// newline): the batch writer then copies the fields as they are.
    pub(super) fn plain(&self) -> bool {
        self.plain
    }

    fn push(&mut self, field: &'a str) {
        if let Some(slot) = self.first.get_mut(self.len) {
            *slot = field;
        }
        self.len += 1;
    }
}

/// One record of the data file.
pub(super) struct Record<'a> {
    /// Its line, numbered as the csv crate numbers it.
    pub line: u64,
    /// Its fields; `None` when it is not valid UTF-8.
    pub fields: Option<Fields<'a>>,
}

/// Reads records from `src`.
pub(super) struct Records<R> {
    src: R,
    buf: Vec<u8>,
    /// The unread bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
    eof: bool,
    /// Whether the file's first bytes were read (and a BOM dropped).
    started: bool,
    /// The line of the byte at `pos` (1-based: one more than the `\n`s
    /// before it).
    line: u64,
    /// The line the next record is said to be on.
    record_line: u64,
    /// The reader of lines with a quote, made on the first one.
    quoted: Option<csv_core::Reader>,
    /// Its output: the fields' bytes, and where each ends.
    out: Vec<u8>,
    ends: Vec<usize>,
}

impl<R: Read> Records<R> {
    pub(super) fn new(src: R) -> Self {
        Records {
            src,
            buf: vec![0; READ],
            pos: 0,
            end: 0,
            eof: false,
            started: false,
            line: 1,
            record_line: 1,
            quoted: None,
            out: vec![0; 1024],
            ends: vec![0; 16],
        }
    }

    /// The line of the record being read: where a read error is reported.
    pub(super) fn record_line(&self) -> u64 {
        self.record_line
    }

    /// Hands every record to `f`, in order, until the end of the file
    /// (`Continue`) or until `f` breaks (`Break`).
    ///
    /// # Errors
    /// The file cannot be read.
    pub(super) fn for_each(
        &mut self,
        mut f: impl FnMut(Record<'_>) -> ControlFlow<()>,
    ) -> io::Result<ControlFlow<()>> {
        loop {
            let Some(block_end) = self.block()? else {
                return Ok(ControlFlow::Continue(()));
            };
            let bytes = &self.buf[self.pos..block_end];
            let (text, bad) = match simdutf8::compat::from_utf8(bytes) {
                Ok(text) => (text, false),
                // The lines before the one that is not UTF-8 are read as
                // usual, that one the slow way, which says what it is.
                Err(e) => {
                    let good = memrchr(b'\n', &bytes[..e.valid_up_to()]).map_or(0, |n| n + 1);
                    let text = std::str::from_utf8(&bytes[..good])
                        .expect("invariant: valid up to valid_up_to");
                    (text, true)
                }
            };
            let (read, flow) = plain_lines(text, &mut self.line, &mut self.record_line, &mut f);
            self.pos += read;
            if flow.is_break() {
                return Ok(flow);
            }
            if (read < text.len() || bad) && self.quoted_record(&mut f)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
    }

    /// The end of the next block of whole lines from `pos` (all that is
    /// left at the end of the file), reading more as needed; `None` at the
    /// end of the file.
    fn block(&mut self) -> io::Result<Option<usize>> {
        if !self.started {
            // As csv_core does on its first read, which a file answers with
            // more than three bytes when it has them.
            while self.end < 3 && !self.eof {
                self.fill()?;
            }
            self.started = true;
            if self.buf[..self.end].starts_with(b"\xef\xbb\xbf") {
                self.pos = 3;
            }
        }
        loop {
            let unread = &self.buf[self.pos..self.end];
            let head = &unread[..unread.len().min(BLOCK)];
            let newline = memrchr(b'\n', head)
                .or_else(|| memchr(b'\n', &unread[head.len()..]).map(|n| head.len() + n));
            if let Some(n) = newline {
                return Ok(Some(self.pos + n + 1));
            }
            if self.eof {
                return Ok((self.pos < self.end).then_some(self.end));
            }
            self.fill()?;
        }
    }

    /// Reads more of the file after the unread bytes (moved to the front
    /// of the buffer, which grows when they fill it).
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(2 * self.buf.len(), 0);
        }
        let n = loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        self.eof = n == 0;
        self.end += n;
        Ok(())
    }

    /// Reads the record at `pos` with `csv_core`, as the csv crate did, and
    /// hands it to `f`.
    fn quoted_record(
        &mut self,
        f: &mut impl FnMut(Record<'_>) -> ControlFlow<()>,
    ) -> io::Result<ControlFlow<()>> {
        use csv_core::ReadRecordResult as Read;
        let mut reader = self.quoted.take().unwrap_or_else(|| {
            let mut reader = csv_core::ReaderBuilder::new()
                .terminator(csv_core::Terminator::Any(b'\n'))
                .build();
            // A blank line, so that it counts as started: a BOM is dropped
            // only at the start of the file, which `fill` did.
            let _ = reader.read_record(b"\n", &mut [0; 1], &mut [0; 1]);
            reader
        });
        let (mut out, mut ends) = (0, 0);
        loop {
            if self.pos == self.end && !self.eof {
                self.fill()?;
                continue;
            }
            let input = &self.buf[self.pos..self.end];
            let (result, read, wrote, ended) =
                reader.read_record(input, &mut self.out[out..], &mut self.ends[ends..]);
            self.line += memchr::memchr_iter(b'\n', &input[..read]).count() as u64;
            self.pos += read;
            out += wrote;
            ends += ended;
            match result {
                Read::InputEmpty => {}
                Read::OutputFull => self.out.resize(2 * self.out.len(), 0),
                Read::OutputEndsFull => self.ends.resize(2 * self.ends.len(), 0),
                Read::Record => break,
                Read::End => {
                    self.quoted = Some(reader);
                    return Ok(ControlFlow::Continue(()));
                }
            }
        }
        self.quoted = Some(reader);
        let line = std::mem::replace(&mut self.record_line, self.line);
        // As before: the record's bytes are UTF-8, and each field starts
        // and ends on a character boundary.
        let fields = simdutf8::basic::from_utf8(&self.out[..out])
            .ok()
            .and_then(|text| {
                let mut fields = Fields::default();
                let mut start = 0;
                for &end in &self.ends[..ends] {
                    fields.push(text.get(start..end)?);
                    start = end;
                }
                Some(fields)
            });
        Ok(f(Record { line, fields }))
    }
}

/// Hands `f` the records of `text`, whole lines (the last may lack its
/// `\n` at the end of the file), up to the first line holding a double
/// quote. Returns how many bytes were read (up to that line's start), and
/// whether `f` broke.
fn plain_lines<'t>(
    text: &'t str,
    line: &mut u64,
    record_line: &mut u64,
    f: &mut impl FnMut(Record<'t>) -> ControlFlow<()>,
) -> (usize, ControlFlow<()>) {
    let bytes = text.as_bytes();
    let mut fields = Fields::default();
    // The line being read starts at `line_start`, its field at `start`.
    let (mut line_start, mut start) = (0, 0);
    // The next `\` or `|`: the lines that end before it need no escaping.
    let next_special =
        |from: usize| memchr2(b'\\', b'|', &bytes[from..]).map_or(usize::MAX, |n| from + n);
    let mut special = next_special(0);
    for at in memchr3_iter(b',', b'\n', b'"', bytes) {
        match bytes[at] {
            b',' => {
                fields.push(&text[start..at]);
                start = at + 1;
            }
            b'\n' => {
                *line += 1;
                if at == line_start {
                    // A blank line: no record.
                    (line_start, start) = (at + 1, at + 1);
                    continue;
                }
                fields.push(&text[start..at]);
                fields.plain = special > at;
                if special < at {
                    special = next_special(at);
                }
                let record = Record {
                    line: std::mem::replace(record_line, *line),
                    fields: Some(std::mem::take(&mut fields)),
                };
                (line_start, start) = (at + 1, at + 1);
                if f(record).is_break() {
                    return (line_start, ControlFlow::Break(()));
                }
            }
            // A quote: csv_core reads this line.
            _ => return (line_start, ControlFlow::Continue(())),
        }
    }
    if line_start < bytes.len() {
        // The file's last line, without a `\n`.
        fields.push(&text[start..]);
        fields.plain = special == usize::MAX;
        let record = Record {
            line: *record_line,
            fields: Some(fields),
        };
        return (bytes.len(), f(record));
    }
    (bytes.len(), ControlFlow::Continue(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the csv crate, set up as the agency set it up before, reads
    /// from `data`: each record's line and fields (`None`: not UTF-8).
    fn by_csv(data: &[u8]) -> Vec<(u64, Option<Vec<String>>)> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .terminator(csv::Terminator::Any(b'\n'))
            .from_reader(data);
        let mut record = csv::ByteRecord::new();
        let mut out = Vec::new();
        loop {
            let line = reader.position().line();
            if !reader.read_byte_record(&mut record).unwrap() {
                break;
            }
            let line = record.position().map_or(line, |p| p.line());
            let fields = simdutf8::basic::from_utf8(record.as_slice())
                .ok()
                .and_then(|text| {
                    (0..record.len())
                        .map(|i| record.range(i).and_then(|r| text.get(r)))
                        .map(|f| f.map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                });
            out.push((line, fields));
        }
        out
    }

    /// A source that hands out its bytes a few at a time, so that lines
    /// and characters are cut across reads.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(self.0.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// What [`Records`] reads, in the same shape, and whether it said a
    /// record was plain when a field held `\` or `|`.
    fn by_records(src: impl Read) -> Vec<(u64, Option<Vec<String>>)> {
        let mut out = Vec::new();
        let flow = Records::new(src)
            .for_each(|r| {
                let fields = r.fields.map(|f| {
                    let all: Vec<String> =
                        (0..f.len().min(5)).map(|i| f.get(i).to_string()).collect();
                    let special = all.iter().any(|s| s.contains(['\\', '|', '\n']));
                    assert!(!(f.plain() && special), "plain but {all:?}");
                    all
                });
                out.push((r.line, fields));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert!(flow.is_continue());
        out
    }

    /// The csv crate's records, cut to the first five fields as
    /// [`Fields`] keeps them (with how many there were).
    fn cut(records: Vec<(u64, Option<Vec<String>>)>) -> Vec<(u64, Option<Vec<String>>)> {
        records
            .into_iter()
            .map(|(line, f)| (line, f.map(|f| f.into_iter().take(5).collect())))
            .collect()
    }

    fn same_as_csv(data: &[u8]) {
        let expected = cut(by_csv(data));
        assert_eq!(
            by_records(data),
            expected,
            "{:?}",
            String::from_utf8_lossy(data)
        );
        // Byte by byte, a long line is copied forward at every read.
        let steps: &[usize] = if data.len() < 4096 {
            &[1, 2, 3, 7]
        } else {
            &[4093]
        };
        for &step in steps {
            assert_eq!(
                by_records(Trickle(data, step)),
                expected,
                "{step} bytes a read: {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn reads_what_the_csv_crate_reads() {
        for data in [
            &b""[..],
            b"\n",
            b"\r\n",
            b"a",
            b"Ana,P\xc3\xa9rez,1,1999-03-17,5\r\n\r\nBob,Lee,2,1999-02-28,6",
            b"\n\n\nAna,Lee\n\nx\n",
            b"\xef\xbb\xbfAna,Lee\n\xef\xbb\xbfBo,\"x\"\n",
            b"\xef\xbb\xbf\"Ana\",Lee\n",
            b"\"Ana\nMar\xc3\xada\",\"O\"\"Neil\",3\r\nplain,line\n\"unterminated",
            b"O\"Neil,x\nA|B,C\\D,E\n",
            b"bad\xff,utf8\nok,line\n\"q\xc3\",\"\xa9\"\nlast",
            b"a,b,c,d,e,f,g\n,,,,\n",
        ] {
            same_as_csv(data);
        }
        // Long lines, past a block and past the buffer's first size.
        let long = format!(
            "{},x\n\"{}\",y\n",
            "a".repeat(3 * READ),
            "b".repeat(BLOCK + 5)
        );
        same_as_csv(long.as_bytes());
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1000))]

        /// Any file of the bytes that matter reads as the csv crate reads it.
        #[test]
        fn any_file_reads_as_the_csv_crate_reads_it(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "Ana", "1999-03-17", ",", ",", ",", "\"", "\n", "\n", "\r\n", "\r",
                    "|", "\\", "ñ", "\u{feff}", "\u{fffd}", " ",
                ]),
                0..60,
            ),
            bad in proptest::option::of(0usize..60),
        ) {
            let mut data = pieces.concat().into_bytes();
            if let Some(at) = bad {
                // A byte that is never UTF-8, or half a character.
                let at = at.min(data.len());
                data.insert(at, if at % 2 == 0 { 0xff } else { 0xc3 });
            }
            same_as_csv(&data);
        }
    }
}
