//! A batch's bets on the wire: the one bet parser (the central's hot path)
//! and the one batch writer, both driven by the field table
//! [`BetField::ALL`].

use std::ops::Range;

use bytes::{BufMut, BytesMut};

use super::error::{bad_value, MessageError};
use super::escape::{escape_with, is_escapable, Pair, Pairs};
use super::{key, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
use crate::model::{BetError, BetField, BetRef, Bets};
use crate::scan;

/// Reads a batch laid out exactly as this project's writers lay it out
/// ([`write_batch`], [`BatchBuilder`]: `BATCH_SIZE:n`, maybe `|FIRST:k`,
/// then `|BET_1:` to `|BET_n:`, each with the six fields in table order)
/// and with no escape in any value: nearly every batch an agency sends.
///
/// It walks the body once, matching the keys it expects where it expects
/// them and finding each value's end with one short scan, and checks each
/// bet where it lies in a single copy of the body. The general reader
/// ([`parse_batch`]) splits every pair, then every bet, before it checks;
/// on the central's hot path that cost about as much as everything else
/// outside SHA-256 (docs/PERFORMANCE.md, "Instructions per bet").
///
/// `None` when the body is laid out in any other way, or when a bet is
/// refused: the general reader then reads the same body, and gives the
/// same bets, or names what is wrong (a property test below holds the two
/// to the same answer).
pub(super) fn read_written_batch(body: &str) -> Option<(Option<u64>, Bets)> {
    let b = body.as_bytes();
    let mut at = after(b, 0, key::BATCH_SIZE.as_bytes())?;
    at = after(b, at, b":")?;
    let (size, end) = whole_number(b, at)?;
    at = end;
    let mut first = None;
    if let Some(from) = after(b, at, b"|FIRST:") {
        let (k, end) = whole_number(b, from)?;
        (first, at) = (Some(k), end);
    }
    // A bet takes well over eight bytes: a larger count is wrong, and
    // would only reserve room for nothing.
    if size == 0 || size > (b.len() / 8) as u64 {
        return None;
    }
    let mut bets = Bets::over(body, size as usize);
    for i in 1..=size {
        at = after(b, at, b"|BET_")?;
        let (index, end) = whole_number(b, at)?;
        if index != i {
            return None;
        }
        at = end;
        let mut spans = [[0u32; 2]; BetField::COUNT];
        for (prefix, span) in FIELD_PREFIXES.iter().zip(&mut spans) {
            at = after(b, at, &prefix.bytes[..prefix.len])?;
            (*span, at) = written_value(body, at, &mut bets)?;
        }
        bets.push_spans(spans).ok()?;
    }
    (at == b.len()).then_some((first, bets))
}

/// The value of a written bet's field that starts at `at`: where its text
/// is in `bets`, and where the value ends in `body`.
///
/// A value ends at the next `\|` (the next field's), at the next bet's
/// `|`, or with the body; which one the caller's next match checks. A `:`
/// inside it is its own (only the pair's first `:` is the key's). A special
/// byte of the value itself comes escaped twice, `\\\c` (`c` being `\`,
/// `|`, `:` or a newline): such a value is unescaped onto the end of the
/// text of `bets`, the rest are left where they are. Any other `\` is not
/// what a written batch holds: `None`.
#[inline(always)]
fn written_value(body: &str, mut at: usize, bets: &mut Bets) -> Option<([u32; 2], usize)> {
    let b = body.as_bytes();
    let start = at;
    // Where the unescaped copy starts in `bets`, once a first escape is met.
    let mut copy: Option<u32> = None;
    let mut run = at;
    let end = loop {
        let end = scan::first_of(&b[at..], *b"\\|").map_or(b.len(), |n| at + n);
        if b.get(end..end + 2) != Some(&b"\\\\"[..]) {
            break end;
        }
        match b.get(end + 2..end + 4) {
            Some(&[b'\\', c]) if is_escapable(c) => {
                let from = bets.append(&body[run..end]);
                bets.append(char::from(c).encode_utf8(&mut [0; 4]));
                copy.get_or_insert(from);
                at = end + 4;
                run = at;
            }
            _ => return None,
        }
    };
    // Offsets fit: a body is part of one frame.
    let span = match copy {
        None => [start as u32, end as u32],
        Some(from) => [from, bets.append(&body[run..end]) + (end - run) as u32],
    };
    Some((span, end))
}

/// Where `expected` ends if `b` holds it at `at`.
#[inline(always)]
fn after(b: &[u8], at: usize, expected: &[u8]) -> Option<usize> {
    let end = at + expected.len();
    let found = b.get(at..end)?;
    same_bytes(found, expected).then_some(end)
}

/// The value of the ASCII digits at `at` (at least one), and where they
/// end; `None` when there are none or the value overflows.
#[inline(always)]
fn whole_number(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    let mut i = at;
    while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        i += 1;
    }
    (i > at).then_some((n, i))
}

/// Reads a batch whose `BATCH_SIZE` value is `size`, laid out in any way
/// the payload rules allow: where it starts (`FIRST`), and its bets.
#[inline(never)]
pub(super) fn parse_batch(
    size: &str,
    pairs: &Pairs<'_>,
) -> Result<(Option<u64>, Bets), MessageError> {
    let first = pairs.find_number(key::FIRST, "a position")?;
    let size: usize = super::unescape(size, "BATCH_SIZE")?
        .parse()
        .map_err(|_| bad_value(key::BATCH_SIZE, "not a whole number"))?;
    if size == 0 {
        return Err(bad_value(key::BATCH_SIZE, "a batch holds at least one bet"));
    }
    // Each BET_i value is itself an escaped payload. Collect them by index so
    // gaps and repeats are caught whatever order they come in.
    let mut slots: Vec<Option<&Pair<'_>>> = vec![None; size.min(pairs.list.len())];
    let mut seen = 0usize;
    for pair in &pairs.list {
        let k = &pair.key;
        let Some(index) = k.strip_prefix(key::BET_PREFIX) else {
            continue;
        };
        let i: usize = index
            .parse()
            .map_err(|_| MessageError::BatchMismatch(format!("{k} is not BET_<number>")))?;
        if i == 0 || i > size {
            return Err(MessageError::BatchMismatch(format!(
                "{k} is outside BATCH_SIZE {size}"
            )));
        }
        // Fewer pairs than BATCH_SIZE: a bet is missing, reported below.
        let Some(slot) = slots.get_mut(i - 1) else {
            continue;
        };
        if slot.replace(pair).is_some() {
            return Err(MessageError::BatchMismatch(format!("{k} appears twice")));
        }
        seen += 1;
    }
    if seen != size {
        let missing = slots.iter().position(Option::is_none).map_or(seen, |p| p) + 1;
        return Err(MessageError::BatchMismatch(format!(
            "BATCH_SIZE is {size} but {seen} bets are present (BET_{missing} is missing)"
        )));
    }
    let text: usize = slots.iter().map(|p| p.map_or(0, |p| p.value.len())).sum();
    let mut bets = Bets::with_capacity(size, text);
    let mut scratch = String::new();
    for (i, pair) in slots.into_iter().enumerate() {
        let pair = pair.expect("invariant: every slot was filled, seen == size");
        bet_texts(pair.value, pairs.specials_of(pair), &mut scratch)
            .and_then(|texts| bets.push_texts(&texts))
            .map_err(|source| MessageError::Bet {
                index: i + 1,
                source,
            })?;
    }
    Ok((first, bets))
}

/// Reads one `BET_i` value, whose special bytes (`\`, `|`, `:`) are at
/// `specials`, into its fields in [`BetField::ALL`] order.
///
/// The value is escaped twice: once as the bet's own payload, once more as
/// a value of the batch, so its pairs are separated by `\|`. One walk over
/// its special bytes finds each pair's `:` and end. A pair with no other
/// escape (nearly every pair of nearly every bet) is borrowed from the
/// value as it is; only a pair holding an escape is unescaped, both levels
/// in one pass, into `scratch`.
fn bet_texts<'s>(
    value: &'s str,
    mut specials: impl Iterator<Item = usize>,
    scratch: &'s mut String,
) -> Result<[&'s str; BetField::COUNT], BetError> {
    // A raw newline at the end is the bet payload's own terminator.
    let value = value.strip_suffix('\n').unwrap_or(value);
    let bytes = value.as_bytes();
    scratch.clear();
    // Each field's value, by [`BetField::ALL`] index, and how many pairs
    // were read.
    let mut fields: [Option<Text>; BetField::COUNT] = [None; BetField::COUNT];
    let mut pairs = 0;
    // The pair being read starts at `start`; `colon` is its first `:`.
    // Specials before `skip` were read by the unescaping pass.
    let (mut start, mut colon, mut skip) = (0, None, 0);
    while let Some(at) = specials.next() {
        if at < skip {
            continue;
        }
        let end = match bytes[at] {
            // `\|`: the pair's end (its `|` is the next special byte).
            b'\\' if bytes.get(at + 1) == Some(&b'|') => {
                specials.next();
                at
            }
            // A raw `|` is a separator too (the batch's splitting leaves
            // none, but the bet's own level would read one as such).
            b'|' => at,
            b':' => {
                colon = colon.or(Some(at));
                continue;
            }
            // Any other escape: this pair is unescaped, start to end.
            _ => {
                let (key, next) = unescape_pair(value, start, scratch)?;
                let text = Text::copied(key.clone(), scratch.len());
                take(
                    &mut fields,
                    &mut pairs,
                    &scratch.as_bytes()[key.clone()],
                    text,
                );
                // Only the value is kept.
                scratch.drain(key);
                (start, colon, skip) = (next, None, next);
                continue;
            }
        };
        let Some(c) = colon.take() else {
            return Err(no_colon(&value[start..end]));
        };
        take(
            &mut fields,
            &mut pairs,
            &bytes[start..c],
            Text::borrowed(c + 1, end),
        );
        start = end + 1 + usize::from(bytes[end] == b'\\');
    }
    // A trailing separator leaves an empty pair, which is not one.
    if start < bytes.len() {
        let Some(c) = colon else {
            return Err(no_colon(&value[start..]));
        };
        let text = Text::borrowed(c + 1, bytes.len());
        take(&mut fields, &mut pairs, &bytes[start..c], text);
    }
    let mut texts = [""; BetField::COUNT];
    for (i, text) in texts.iter_mut().enumerate() {
        let Some(field) = fields[i] else {
            return Err(BetError::Missing(BetField::ALL[i]));
        };
        *text = field.of(value, scratch);
    }
    return Ok(texts);

    /// Keeps `text` as the value of the field whose key is `key`, pair
    /// number `pairs` of the bet. Writers send the fields in table order,
    /// so the pair's own field is checked first. Unknown keys are ignored,
    /// and the first of repeated keys counts, as in any payload.
    #[inline(always)]
    fn take(
        fields: &mut [Option<Text>; BetField::COUNT],
        pairs: &mut usize,
        key: &[u8],
        text: Text,
    ) {
        let field = match FIELD_KEYS.get(*pairs) {
            Some(expected) if same_bytes(expected, key) => Some(*pairs),
            _ => FIELD_KEYS.iter().position(|k| same_bytes(k, key)),
        };
        *pairs += 1;
        if let Some(field) = field {
            fields[field].get_or_insert(text);
        }
    }

    /// The pair of `value` at `start`, which holds an escape, unescaped at
    /// both levels onto the end of `scratch`: where its key is in `scratch`
    /// (its value follows it, to the end), and where the next pair starts.
    #[cold]
    #[inline(never)]
    fn unescape_pair(
        value: &str,
        start: usize,
        scratch: &mut String,
    ) -> Result<(Range<usize>, usize), BetError> {
        let bytes = value.as_bytes();
        let from = scratch.len();
        let mut key_end = None;
        // The last character was the bet's own (unescaped) `\`.
        let mut escape = false;
        let mut i = start;
        let next = loop {
            let Some(&b) = bytes.get(i) else {
                if escape {
                    return Err(malformed("dangling escape".into()));
                }
                break bytes.len();
            };
            // The batch's level: `\x` stands for `x`.
            let c = match b {
                b'\\' => {
                    let Some(&next) = bytes.get(i + 1) else {
                        return Err(malformed("dangling escape".into()));
                    };
                    if !is_escapable(next) {
                        return Err(unknown_escape(&value[i + 1..]));
                    }
                    i += 2;
                    next
                }
                b'|' | b':' => {
                    i += 1;
                    b
                }
                _ => {
                    // A plain run: copied whole (it ends at an ASCII byte,
                    // so on a character boundary).
                    let run = bytes[i..]
                        .iter()
                        .position(|&c| matches!(c, b'\\' | b'|' | b':'))
                        .map_or(bytes.len(), |n| i + n);
                    if std::mem::take(&mut escape) {
                        if b != b'\n' {
                            return Err(unknown_escape(&value[i..run]));
                        }
                        scratch.push('\n');
                        i += 1;
                    }
                    scratch.push_str(&value[i..run]);
                    i = run;
                    continue;
                }
            };
            // The bet's own level.
            if std::mem::take(&mut escape) {
                scratch.push(char::from(c));
                continue;
            }
            match c {
                b'\\' => escape = true,
                b'|' => break i,
                b':' if key_end.is_none() => key_end = Some(scratch.len()),
                _ => scratch.push(char::from(c)),
            }
        };
        let Some(key_end) = key_end else {
            return Err(no_colon(&scratch[from..]));
        };
        Ok((from..key_end, next))
    }
}

/// The fields' keys as bytes, in [`BetField::ALL`] order.
const FIELD_KEYS: [&[u8]; BetField::COUNT] = {
    let mut keys: [&[u8]; BetField::COUNT] = [b""; BetField::COUNT];
    let mut i = 0;
    while i < BetField::COUNT {
        keys[i] = BetField::ALL[i].wire_key().as_bytes();
        i += 1;
    }
    keys
};

/// Where a field's text is: a range of the value itself, or, when it held
/// an escape, of the scratch string it was unescaped into. (Offsets fit: a
/// value is part of one frame.)
#[derive(Debug, Clone, Copy)]
struct Text {
    copied: bool,
    start: u32,
    end: u32,
}

impl Text {
    fn borrowed(start: usize, end: usize) -> Self {
        Text {
            copied: false,
            start: start as u32,
            end: end as u32,
        }
    }

    /// The value an unescaped pair left in scratch, from the end of `key`
    /// to `end`, as it is once the key before it is removed.
    fn copied(key: Range<usize>, end: usize) -> Self {
        Text {
            copied: true,
            start: key.start as u32,
            end: (end - key.len()) as u32,
        }
    }

    fn of<'s>(self, value: &'s str, scratch: &'s str) -> &'s str {
        let from = if self.copied { scratch } else { value };
        &from[self.start as usize..self.end as usize]
    }
}

fn malformed(what: String) -> BetError {
    BetError::Malformed(what)
}

/// The error for a pair, `shown` unescaped, without a `:`.
fn no_colon(shown: &str) -> BetError {
    malformed(format!("pair {shown:?} has no ':'"))
}

/// The error for a `\` followed by `rest`, which starts with a character no
/// writer escapes.
fn unknown_escape(rest: &str) -> BetError {
    let shown = rest.chars().next().unwrap_or('\\');
    malformed(format!("unknown escape \\{shown:?}"))
}

/// `a == b` for a few bytes (keys: 6 to 10), without a call to `memcmp`
/// or a loop: its first and last four or eight bytes, which overlap.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    fn word<const N: usize>(s: &[u8], at: usize) -> [u8; N] {
        s[at..at + N].try_into().expect("N bytes")
    }
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        8.. => word::<8>(a, 0) == word::<8>(b, 0) && word::<8>(a, n - 8) == word::<8>(b, n - 8),
        4.. => word::<4>(a, 0) == word::<4>(b, 0) && word::<4>(a, n - 4) == word::<4>(b, n - 4),
        _ => a.iter().zip(b).all(|(x, y)| x == y),
    }
}

/// Builds one batch frame bet by bet, straight into wire bytes: how the
/// agency turns its data file into frames, cutting a batch when the next
/// bet would not fit.
///
/// The batch header (`BATCH_SIZE:n|FIRST:k`) is only known at the end, so
/// the bets are written after room left for it, and the header is written
/// into that room, right before them, by [`BatchBuilder::finish`].
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: usize,
    first: Option<u64>,
}

/// Room before the bets for the frame header and the batch header:
/// `BATCH_SIZE:` with 4 digits and `|FIRST:` with 20 (a u64).
const BATCH_HEADROOM: usize = HEADER_LEN + key::BATCH_SIZE.len() + 5 + key::FIRST.len() + 22;

impl BatchBuilder {
    /// An empty batch, which says it starts at bet `first` when given.
    pub fn new(first: Option<u64>) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_FRAME_LEN + BATCH_HEADROOM);
        buf.put_bytes(0, BATCH_HEADROOM);
        Self {
            buf,
            count: 0,
            first,
        }
    }

    /// Bets in the batch.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The batch header of `count` bets, in a buffer of its own.
    fn head(&self, count: usize) -> ([u8; BATCH_HEADROOM], usize) {
        let mut head = [0; BATCH_HEADROOM];
        let mut room = &mut head[..];
        put_head(&mut room, count, self.first);
        let len = BATCH_HEADROOM - room.len();
        (head, len)
    }

    /// The payload's length with `count` bets, the bets written so far.
    fn payload_len(&self, count: usize) -> usize {
        self.head(count).1 + (self.buf.len() - BATCH_HEADROOM) + 1
    }

    /// Appends `bet` if the batch still fits in one frame with it; returns
    /// whether it did (the batch is unchanged when it did not).
    pub fn push(&mut self, bet: BetRef<'_>) -> bool {
        self.push_as(bet, Escape::AsNeeded)
    }

    /// [`BatchBuilder::push`] for a bet whose caller knows that none of its
    /// text fields holds `\`, `|` or a newline (an agency's data line
    /// without them): its fields are copied as they are, without a second
    /// look for bytes to escape. The bytes are the same as `push` writes.
    pub(crate) fn push_plain(&mut self, bet: BetRef<'_>) -> bool {
        debug_assert!(
            [bet.first_name, bet.last_name, bet.document, bet.birthdate]
                .iter()
                .all(|t| !t.contains(['\\', '|', '\n'])),
            "not a plain bet: {bet:?}"
        );
        self.push_as(bet, Escape::None)
    }

    fn push_as(&mut self, bet: BetRef<'_>, escape: Escape) -> bool {
        let mark = self.buf.len();
        put_bet(&mut self.buf, self.count + 1, bet, escape);
        // The header is at most the room left for it, so a batch this far
        // from the limit fits without working out its header's length.
        let most = self.buf.len() - HEADER_LEN + 1;
        if most > MAX_PAYLOAD_LEN && self.payload_len(self.count + 1) > MAX_PAYLOAD_LEN {
            self.buf.truncate(mark);
            return false;
        }
        self.count += 1;
        true
    }

    /// The whole frame, length header included.
    pub fn finish(mut self) -> bytes::Bytes {
        let payload_len = self.payload_len(self.count);
        let (head, head_len) = self.head(self.count);
        self.buf.put_u8(b'\n');
        let start = BATCH_HEADROOM - head_len - HEADER_LEN;
        let len = u32::try_from(payload_len).expect("a payload fits in a frame");
        self.buf[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        self.buf[start + HEADER_LEN..BATCH_HEADROOM].copy_from_slice(&head[..head_len]);
        self.buf.split_off(start).freeze()
    }
}

/// Writes a batch payload: the header, every bet, the final `\n`.
pub(super) fn write_batch(dst: &mut BytesMut, first: Option<u64>, bets: &Bets) {
    put_head(dst, bets.len(), first);
    // Room for the whole payload up front: no growth while writing.
    dst.reserve(MAX_PAYLOAD_LEN.min(64 + bets.len() * 128));
    for (i, bet) in bets.iter().enumerate() {
        put_bet(dst, i + 1, bet, Escape::AsNeeded);
    }
    dst.put_u8(b'\n');
}

/// Writes `BATCH_SIZE:n` and, when given, `|FIRST:k`: the batch header of
/// both writers.
fn put_head(dst: &mut impl BufMut, count: usize, first: Option<u64>) {
    let mut n = itoa::Buffer::new();
    dst.put_slice(key::BATCH_SIZE.as_bytes());
    dst.put_u8(b':');
    dst.put_slice(n.format(count).as_bytes());
    if let Some(first) = first {
        dst.put_u8(b'|');
        dst.put_slice(key::FIRST.as_bytes());
        dst.put_u8(b':');
        dst.put_slice(n.format(first).as_bytes());
    }
}

/// Whether [`put_bet`] looks for bytes to escape.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// In every field.
    AsNeeded,
    /// Nowhere: the caller knows there are none.
    None,
}

/// Writes `|BET_i:` and the bet, its fields escaped twice (once as the
/// bet's own payload, once as a value of the batch).
fn put_bet(dst: &mut BytesMut, i: usize, bet: BetRef<'_>, escape: Escape) {
    let mut digits = [itoa::Buffer::new(), itoa::Buffer::new()];
    dst.put_u8(b'|');
    dst.put_slice(key::BET_PREFIX.as_bytes());
    dst.put_slice(digits[0].format(i).as_bytes());
    let texts = bet.texts(&mut digits);
    for (k, (prefix, text)) in FIELD_PREFIXES.iter().zip(texts).enumerate() {
        dst.put_slice(&prefix.bytes[..prefix.len]);
        // The number and the agency are digits: nothing to escape.
        if escape == Escape::None || k >= BetField::TEXT_FIELDS {
            dst.put_slice(text.as_bytes());
        } else {
            // Escape twice in one pass: a special byte `c` becomes `\c` in
            // the bet, and that becomes `\\\c` in the batch.
            escape_with(dst, text.as_bytes(), b"\\\\\\");
        }
    }
}

/// What a bet's field starts with on the wire, in one piece: the `:` after
/// `BET_i` for the first field, else the bet's own separator escaped once
/// for the batch (`\|`); then the field's key and `:`.
#[derive(Clone, Copy)]
struct FieldPrefix {
    bytes: [u8; 16],
    len: usize,
}

/// [`FieldPrefix`] of every field, in [`BetField::ALL`] order, built from
/// the field table when compiling: one copy per field for the batch writer.
const FIELD_PREFIXES: [FieldPrefix; BetField::COUNT] = {
    let mut prefixes = [FieldPrefix {
        bytes: [0; 16],
        len: 0,
    }; BetField::COUNT];
    let mut i = 0;
    while i < BetField::COUNT {
        let head: &[u8] = if i == 0 { b":" } else { b"\\|" };
        let key = BetField::ALL[i].wire_key().as_bytes();
        let mut len = 0;
        let mut j = 0;
        while j < head.len() {
            prefixes[i].bytes[len] = head[j];
            len += 1;
            j += 1;
        }
        j = 0;
        while j < key.len() {
            prefixes[i].bytes[len] = key[j];
            len += 1;
            j += 1;
        }
        prefixes[i].bytes[len] = b':';
        prefixes[i].len = len + 1;
        i += 1;
    }
    prefixes
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;
    use crate::wire::{frame, to_payload, ErrorCode, Request, WireMessage};
    use std::borrow::Cow;

    fn bet(first: &str, last: &str) -> Bet {
        Bet::from_fields("3", first, last, "30904465", "1999-03-17", "7574").unwrap()
    }

    /// [`bet_texts`] on a bet value alone, and what it had to copy.
    fn texts_copied(value: &str) -> Result<(Vec<String>, String), BetError> {
        let specials = super::super::escape::find_specials(value.as_bytes());
        let mut scratch = String::new();
        let texts = bet_texts(
            value,
            specials.into_iter().map(|p| p as usize),
            &mut scratch,
        )?;
        let texts = texts.map(str::to_string).to_vec();
        Ok((texts, scratch))
    }

    fn texts(value: &str) -> Result<Vec<String>, BetError> {
        texts_copied(value).map(|(texts, _)| texts)
    }

    #[test]
    fn reference_batch_bytes_parse() {
        let payload = b"BATCH_SIZE:1|BET_1:NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:30904465\\|NACIMIENTO:1999-03-17\\|NUMERO:7574\\|AGENCY_ID:3\n";
        let req = Request::parse(payload).unwrap();
        assert_eq!(
            req,
            Request::Batch {
                first: None,
                bets: vec![bet("Ana", "Perez")].into()
            }
        );
    }

    #[test]
    fn pipe_in_name_travels_as_triple_backslash() {
        let b = bet("Ana|María", "Pe\\rez:ñ");
        let payload = to_payload(&Request::Batch {
            first: None,
            bets: vec![b.clone()].into(),
        });
        let text = String::from_utf8(payload.clone()).unwrap();
        assert!(text.contains("NOMBRE:Ana\\\\\\|María"), "{text}");
        assert_eq!(
            Request::parse(&payload).unwrap(),
            Request::Batch {
                first: None,
                bets: vec![b].into()
            }
        );
    }

    #[test]
    fn batch_builder_writes_what_the_encoder_writes_and_cuts_at_the_frame() {
        let names = [("Ana", "Perez"), ("A|B\\C", "ñ:ü\n"), ("Jo\"sé", "O,Neil")];
        for first in [None, Some(0), Some(9), Some(123_456_789_012)] {
            let mut builder = BatchBuilder::new(first);
            let mut bets = Vec::new();
            for i in 0.. {
                let (f, l) = names[i % names.len()];
                let b = bet(&f.repeat(1 + i % 7), l);
                if !builder.push(b.as_ref()) {
                    break;
                }
                bets.push(b);
            }
            assert!(bets.len() > 10, "{}", bets.len());
            let built = builder.finish();
            let encoded = frame(&Request::Batch {
                first,
                bets: bets.into(),
            })
            .unwrap();
            assert_eq!(&built[..], &encoded[..]);
            assert!(built.len() <= MAX_FRAME_LEN);
            // Full: the next bet would not have fit.
            assert!(built.len() > MAX_FRAME_LEN - 300, "{}", built.len());
        }
        // A bet too large for any frame is refused even by an empty batch
        // (valid bets never are: their names are at most 100 characters).
        let (long, small) = ("x".repeat(MAX_PAYLOAD_LEN), bet("A", "B"));
        let huge = BetRef {
            first_name: &long,
            ..small.as_ref()
        };
        let mut empty = BatchBuilder::new(Some(0));
        assert!(!empty.push(huge));
        assert_eq!(empty.count(), 0);
    }

    #[test]
    fn plain_bets_are_written_as_push_writes_them() {
        // What the agency sends for a data line without `\` or `|`.
        let bets = [
            bet("Ana", "Pérez"),
            bet("Jo\"sé", "O,Neil:ñ"),
            bet("A B", "C"),
        ];
        let (mut plain, mut escaped) = (BatchBuilder::new(Some(7)), BatchBuilder::new(Some(7)));
        for b in &bets {
            assert!(plain.push_plain(b.as_ref()));
            assert!(escaped.push(b.as_ref()));
        }
        assert_eq!(plain.finish(), escaped.finish());
    }

    #[test]
    fn bet_errors_name_index_and_field() {
        let good =
            "NOMBRE:A\\|APELLIDO:B\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:1\\|AGENCY_ID:1";
        let bad =
            "NOMBRE:A\\|APELLIDO:B\\|DOCUMENTO:1\\|NACIMIENTO:2023-02-30\\|NUMERO:1\\|AGENCY_ID:1";
        let p = format!("BATCH_SIZE:2|BET_1:{good}|BET_2:{bad}\n");
        let err = Request::parse(p.as_bytes()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidBet);
        let text = err.to_string();
        assert!(text.starts_with("BET_2: NACIMIENTO"), "{text}");
    }

    #[test]
    fn plain_bets_are_borrowed_and_escaped_fields_unescaped() {
        let v = "NOMBRE:Ana\\|APELLIDO:Pérez\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:7\\|AGENCY_ID:3";
        let (plain, copied) = texts_copied(v).unwrap();
        assert_eq!(plain, ["Ana", "Pérez", "1", "1999-03-17", "7", "3"]);
        assert_eq!(copied, "");
        // An escaped `|` inside a name is undone, and only that field copied.
        let with_pipe = v.replace("Ana", "A\\\\\\|na");
        let (escaped, copied) = texts_copied(&with_pipe).unwrap();
        assert_eq!(escaped[0], "A|na");
        assert_eq!(copied, "A|na");
        // Fields in another order, an unknown key and a repeat.
        let shuffled = "AGENCY_ID:3\\|X:1\\|NUMERO:7\\|NACIMIENTO:1999-03-17\\|DOCUMENTO:1\\|APELLIDO:Pérez\\|NOMBRE:Ana\\|NUMERO:8";
        assert_eq!(texts(shuffled).unwrap(), plain);
    }

    #[test]
    fn malformed_bets_name_what_is_wrong() {
        let cases = [
            ("NOMBRE:A\\x", "malformed bet: unknown escape \\'x'"),
            ("NOMBRE:A\\\\ñ", "malformed bet: unknown escape \\'ñ'"),
            ("NOMBRE:A\\", "malformed bet: dangling escape"),
            ("NOMBRE:A\\\\", "malformed bet: dangling escape"),
            (
                "NOMBRE:A\\|APELLIDO",
                "malformed bet: pair \"APELLIDO\" has no ':'",
            ),
            ("NOMBRE:A", "APELLIDO is missing"),
        ];
        for (value, error) in cases {
            assert_eq!(texts(value).unwrap_err().to_string(), error, "{value}");
        }
    }

    /// A bet value: the six pairs with values of awkward pieces, mostly
    /// separated as a writer does, sometimes not, sometimes with a stray
    /// pair (unknown, repeated, or without `:`) at the end.
    fn bet_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "Ana",
            "ñ",
            "7",
            "1999-03-17",
            ":",
            "Pérez",
            "0",
            " ",
            "\\",
            "\\\\\\|",
            "\\\\\\:",
            "\\\\\\\n",
            "\n",
        ]);
        let sep = prop::sample::select(vec![
            "\\|", "\\|", "\\|", "\\|", "\\|", "\\|", "\\|", "\\|", "|", "\\", "\\:",
        ]);
        let stray = prop::sample::select(vec![
            "",
            "",
            "",
            "",
            "\\|X:1",
            "\\|NUMERO:2",
            "\\|NOMBRE",
            "\\|",
        ]);
        (
            prop::collection::vec((prop::collection::vec(piece, 0..3), sep), 6),
            stray,
        )
            .prop_map(|(pairs, stray)| {
                let mut v = String::new();
                for (field, (pieces, sep)) in BetField::ALL.iter().zip(pairs) {
                    if !v.is_empty() {
                        v.push_str(sep);
                    }
                    v.push_str(field.wire_key());
                    v.push(':');
                    v.push_str(&pieces.concat());
                }
                v + stray
            })
    }

    /// What a bet value means, read the slow way with the payload-level
    /// functions (unescape the batch's level, split the bet's pairs,
    /// unescape each value): `None` when any step refuses it.
    fn meaning(value: &str) -> Option<Vec<String>> {
        let value = value.strip_suffix('\n').unwrap_or(value);
        let inner = crate::wire::unescape(value, "BET_1").ok()?;
        // A separator at the very end ends the last pair; it opens none.
        let odd_escapes = |s: &str| s.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1;
        let inner = match inner.strip_suffix('|') {
            Some(rest) if !odd_escapes(rest) => rest,
            _ => &inner,
        };
        let pairs = crate::wire::split_pairs(inner, "bet").ok()?;
        BetField::ALL
            .iter()
            .map(|f| {
                let (_, v) = pairs.iter().find(|(k, _)| k == f.wire_key())?;
                crate::wire::unescape(v, "field").ok().map(Cow::into_owned)
            })
            .collect()
    }

    /// Arbitrary bets travel: what is written reads back the same.
    fn any_bet() -> impl proptest::strategy::Strategy<Value = Bet> {
        use proptest::prelude::*;
        let name = prop::collection::vec(
            prop::sample::select(vec![
                "a", "Ana", "ñ", "ü", " ", "|", ":", "\\", "\n", ",", "\"", "\\|", "😀",
            ]),
            1..8,
        )
        .prop_map(|p| p.concat())
        .prop_filter("not blank", |s| !s.trim().is_empty());
        (1u32..=1000, name.clone(), name, "[0-9]{1,10}", 0u16..=9999).prop_map(
            |(agency, first, last, doc, n)| {
                Bet::from_fields(
                    &agency.to_string(),
                    &first,
                    &last,
                    &doc,
                    "1999-03-17",
                    &n.to_string(),
                )
                .expect("generated bets are valid")
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        /// The parser means by a bet value what the payload rules mean,
        /// and refuses exactly what they refuse, with a named error.
        #[test]
        fn bet_values_read_as_the_payload_rules_say(value in bet_value()) {
            match (texts(&value), meaning(&value)) {
                (Ok(got), Some(expected)) => {
                    proptest::prop_assert_eq!(got, expected);
                }
                (Err(BetError::Malformed(why)), None) => proptest::prop_assert!(
                    ["unknown escape", "dangling escape", "pair "].iter().any(|w| why.starts_with(w)),
                    "{why}"
                ),
                (Err(BetError::Missing(_)), None) => {}
                (got, expected) => proptest::prop_assert!(false, "{got:?} but {expected:?}"),
            }
        }

        /// Any text as a bet value: read or refused with a named error,
        /// never a panic.
        #[test]
        fn any_bet_value_reads_or_is_refused(value in "[\\\\|:\nNOMBRE_ñA7 -]{0,40}") {
            let payload = format!("BATCH_SIZE:1|BET_1:{value}\n");
            match Request::parse(payload.as_bytes()) {
                Ok(_) | Err(MessageError::Bet { index: 1, .. }) => {}
                Err(e) => proptest::prop_assert!(e.code() == ErrorCode::MalformedMessage, "{e}"),
            }
        }

        /// The reader of written batches reads a batch as the general
        /// reader does, or leaves it to it: whatever is done to a written
        /// batch (a byte changed, taken out or put in), when it answers, the
        /// general reader gives the same bets.
        #[test]
        fn the_written_batch_reader_agrees_with_the_general_one(
            bets in proptest::collection::vec(any_bet(), 1..6),
            first in proptest::option::of(0u64..1_000_000),
            edits in proptest::collection::vec((0usize..10_000, 0usize..3, proptest::sample::select(b"\\|:\n1x_B".to_vec())), 0..3),
        ) {
            let mut payload = to_payload(&Request::Batch { first, bets: bets.into() });
            for (at, how, byte) in edits {
                let at = at % payload.len();
                match how {
                    0 => payload[at] = byte,
                    1 => { payload.remove(at); }
                    _ => payload.insert(at, byte),
                }
            }
            let Ok(body) = super::super::escape::body_of(&payload) else { return Ok(()) };
            if let Some(read) = read_written_batch(body) {
                let pairs = super::super::escape::pairs_of(body, "payload").unwrap();
                let size = pairs.find(key::BATCH_SIZE).unwrap();
                proptest::prop_assert_eq!(parse_batch(size, &pairs).unwrap(), read);
            }
        }

        /// Encode any bets, decode them: the same bets.
        #[test]
        fn any_bets_round_trip(bets in proptest::collection::vec(any_bet(), 1..12), first in proptest::option::of(0u64..1_000_000)) {
            let request = Request::Batch { first, bets: bets.into() };
            proptest::prop_assert_eq!(Request::parse(&to_payload(&request)).unwrap(), request);
        }
    }

    /// The written-batch reader reads what this project's writers write
    /// (so the property above is not met by its always stepping aside),
    /// and steps aside for a bet it refuses, the general reader naming it.
    #[test]
    fn written_batches_are_read_by_the_fast_reader() {
        let bets: Vec<Bet> = (0..50).map(|i| bet(&format!("Ana {i}"), "Pérez")).collect();
        for first in [None, Some(0), Some(70)] {
            let payload = to_payload(&Request::Batch {
                first,
                bets: bets.clone().into(),
            });
            let body = super::super::escape::body_of(&payload).unwrap();
            let (got_first, got) = read_written_batch(body).expect("read in one pass");
            assert_eq!((got_first, got), (first, bets.clone().into()));
        }
        // Escapes in names are undone, each name copied once.
        let tricky = vec![bet("A|B", "C\\:D\n"), bet("Ana", "Pérez")];
        let escaped = to_payload(&Request::Batch {
            first: None,
            bets: tricky.clone().into(),
        });
        let body = super::super::escape::body_of(&escaped).unwrap();
        let (_, got) = read_written_batch(body).expect("read in one pass");
        assert_eq!(got, tricky.into());
        // Fields out of order: the general reader's.
        let p = "BATCH_SIZE:1|BET_1:APELLIDO:B\\|NOMBRE:A\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:1\\|AGENCY_ID:1";
        assert!(read_written_batch(p).is_none());
        assert!(Request::parse(format!("{p}\n").as_bytes()).is_ok());
        // A refused bet: the general reader names it.
        let p = "BATCH_SIZE:2|BET_1:NOMBRE:A\\|APELLIDO:B\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:1\\|AGENCY_ID:1|BET_2:NOMBRE:A\\|APELLIDO:B\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:10000\\|AGENCY_ID:1\n";
        assert!(read_written_batch(p.strip_suffix('\n').unwrap()).is_none());
        let err = Request::parse(p.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("BET_2: NUMERO"), "{err}");
    }

    #[test]
    fn the_meaning_property_reaches_both_outcomes() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut read, mut refused) = (0, 0);
        for _ in 0..2000 {
            let v = bet_value().new_tree(&mut runner).unwrap().current();
            match meaning(&v) {
                Some(_) => read += 1,
                None => refused += 1,
            }
        }
        assert!(read > 30 && refused > 30, "{read} read, {refused} refused");
    }
}
