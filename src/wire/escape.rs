//! The text layer of a payload: `\` escaping inside values, and splitting a
//! payload into its `KEY:VALUE` pairs. Typed messages are built on it in
//! `message.rs`, batches in `batch.rs`.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{BufMut, BytesMut};

use super::error::MessageError;
use crate::scan;

/// Appends `value` to `dst` with `\`, `|` and `\n` escaped.
///
/// ```
/// use bytes::BytesMut;
/// use lottery::wire::{escape_into, unescape};
///
/// let mut dst = BytesMut::new();
/// escape_into(&mut dst, r"Ana|María\x");
/// assert_eq!(&dst[..], r"Ana\|María\\x".as_bytes());
/// assert_eq!(unescape(r"Ana\|María\\x", "name").unwrap(), r"Ana|María\x");
/// ```
pub fn escape_into(dst: &mut BytesMut, value: &str) {
    escape_with(dst, value.as_bytes(), b"\\");
}

/// Appends `bytes` with `escape` before every `\`, `|` and `\n`, copying
/// the plain runs between them whole. `\n` is escaped too so that a
/// payload's only raw newline is its last byte.
///
/// Fields are a few bytes long and nearly all have nothing to escape: one
/// check eight bytes at a time, then the field copied whole.
pub(super) fn escape_with(dst: &mut BytesMut, bytes: &[u8], escape: &[u8]) {
    if !scan::any_of(bytes, *b"\\|\n") {
        dst.put_slice(bytes);
        return;
    }
    let mut start = 0;
    for (at, &c) in bytes.iter().enumerate() {
        if needs_escape(c) {
            dst.put_slice(&bytes[start..at]);
            dst.put_slice(escape);
            start = at;
        }
    }
    dst.put_slice(&bytes[start..]);
}

/// Whether a writer escapes `c`: `\`, `|` and a newline.
fn needs_escape(c: u8) -> bool {
    matches!(c, b'\\' | b'|' | b'\n')
}

/// Length of `value` once escaped by [`escape_into`].
pub(super) fn escaped_len(value: &str) -> usize {
    value.len() + value.bytes().filter(|&c| needs_escape(c)).count()
}

/// The bytes a writer may escape: `\`, `|`, `:` and a newline. A reader
/// accepts exactly these after a `\`.
pub(super) fn is_escapable(c: u8) -> bool {
    matches!(c, b'\\' | b'|' | b':' | b'\n')
}

/// Removes one level of escaping: `\x` becomes `x`.
///
/// Only the characters a writer escapes (`\`, `|`, `:`, newline) may follow
/// a `\`; anything else is a writer's bug or an attack, and is refused
/// rather than guessed at.
///
/// # Errors
/// [`MessageError::DanglingEscape`] when the value ends in a lone `\`;
/// [`MessageError::UnknownEscape`] for `\` before any other character.
pub fn unescape<'a>(value: &'a str, what: &'static str) -> Result<Cow<'a, str>, MessageError> {
    if !value.contains('\\') {
        return Ok(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(next) if next.is_ascii() && is_escapable(next as u8) => out.push(next),
                Some(next) => return Err(MessageError::UnknownEscape(next, what)),
                None => return Err(MessageError::DanglingEscape(what)),
            }
        } else {
            out.push(c);
        }
    }
    Ok(Cow::Owned(out))
}

/// One `KEY:VALUE` pair of a payload: the key unescaped, the value still
/// escaped.
pub(super) struct Pair<'a> {
    /// The key, unescaped.
    pub(super) key: Cow<'a, str>,
    /// The value, still escaped.
    pub(super) value: &'a str,
    /// Where the value starts in the body.
    at: usize,
    /// The value's special bytes, as a range of [`Pairs::specials`].
    specials: Range<usize>,
}

/// A payload body split into its pairs.
pub(super) struct Pairs<'a> {
    /// The pairs in payload order.
    pub(super) list: Vec<Pair<'a>>,
    /// Positions in the body of every `\\`, `|` and `:`, in order.
    specials: Vec<u32>,
}

impl<'a> Pairs<'a> {
    /// The (escaped) value of the first pair with this key.
    pub(super) fn find(&self, key: &str) -> Option<&'a str> {
        self.list.iter().find(|p| p.key == key).map(|p| p.value)
    }

    /// The whole number of the first pair with this key, if there is one;
    /// a value that is not one is refused as not `what` (`"a position"`).
    pub(super) fn find_number(&self, key: &str, what: &str) -> Result<Option<u64>, MessageError> {
        self.find(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| super::error::bad_value(key, format!("{v:?} is not {what}")))
            })
            .transpose()
    }

    /// Positions, within `pair`'s value, of the value's special bytes: a
    /// batch's bets are parsed from the same pass that split the batch.
    pub(super) fn specials_of(&self, pair: &Pair<'_>) -> impl Iterator<Item = usize> + '_ {
        let at = pair.at;
        self.specials[pair.specials.clone()]
            .iter()
            .map(move |&p| p as usize - at)
    }
}

/// Positions of every `\\`, `|` and `:` in `bytes`, in order: all the bytes
/// that give a payload its structure, at both of a batch's levels (the
/// batch's pairs, and each bet's own).
pub(super) fn find_specials(bytes: &[u8]) -> Vec<u32> {
    thread_local! {
        // Room for a position per byte, written by index (a payload fits
        // in a frame, so positions fit in a u32): kept from one payload to
        // the next, so that it is zeroed once, not four bytes per payload
        // byte on every batch (callgrind counted that as a tenth of the
        // central's instructions outside SHA-256; docs/PERFORMANCE.md).
        static ROOM: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    ROOM.with_borrow_mut(|room| {
        if room.len() < bytes.len() {
            room.resize(bytes.len(), 0);
        }
        let n = scan::positions_of(bytes, *b"\\|:", room);
        room[..n].to_vec()
    })
}

/// Splits a payload body (without its final `\n`) into raw, still escaped,
/// `(key, value)` pairs: at unescaped `|`, then each pair at its first
/// unescaped `:`. Keys are returned unescaped.
///
/// ```
/// use lottery::wire::split_pairs;
///
/// let pairs = split_pairs(r"A:1|B:x\|y:z", "payload").unwrap();
/// assert_eq!(pairs[1].0, "B");
/// assert_eq!(pairs[1].1, r"x\|y:z");
/// ```
///
/// # Errors
/// A pair without `:`, or a dangling escape.
pub fn split_pairs<'a>(
    body: &'a str,
    what: &'static str,
) -> Result<Vec<(Cow<'a, str>, &'a str)>, MessageError> {
    Ok(pairs_of(body, what)?
        .list
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect())
}

/// [`split_pairs`], keeping where each value's special bytes are.
pub(super) fn pairs_of<'a>(body: &'a str, what: &'static str) -> Result<Pairs<'a>, MessageError> {
    let bytes = body.as_bytes();
    let specials = find_specials(bytes);
    let mut list = Vec::with_capacity(specials.len() / 8 + 1);
    let mut pair = |start: usize, colon: Option<(usize, usize)>, end: (usize, usize), escaped| {
        let Some((c, first_special)) = colon else {
            return Err(MessageError::MissingColon(body[start..end.0].to_string()));
        };
        let key = &body[start..c];
        list.push(Pair {
            key: if escaped {
                unescape(key, what)?
            } else {
                Cow::Borrowed(key)
            },
            value: &body[c + 1..end.0],
            at: c + 1,
            specials: first_special..end.1,
        });
        Ok(())
    };
    // The pair being read starts at `start`; `colon` is its first unescaped
    // `:` and the index of the special byte after it; `escaped` says whether
    // its key holds an escape.
    let (mut start, mut colon, mut escaped) = (0, None, false);
    let mut k = 0;
    while k < specials.len() {
        let at = specials[k] as usize;
        match bytes[at] {
            b'\\' => {
                if at + 1 >= bytes.len() {
                    return Err(MessageError::DanglingEscape(what));
                }
                // The escaped byte is not special. ASCII `\` is never part
                // of a multi-byte UTF-8 sequence, so stepping over one byte
                // is enough.
                if specials.get(k + 1) == Some(&(specials[k] + 1)) {
                    k += 1;
                }
                escaped |= colon.is_none();
            }
            b'|' => {
                pair(start, colon, (at, k), escaped)?;
                start = at + 1;
                colon = None;
                escaped = false;
            }
            _ if colon.is_none() => colon = Some((at, k + 1)),
            _ => {}
        }
        k += 1;
    }
    pair(start, colon, (bytes.len(), specials.len()), escaped)?;
    Ok(Pairs { list, specials })
}

/// Checks the payload is UTF-8 and ends with an unescaped `\n`; returns the
/// body without it.
pub(super) fn body_of(payload: &[u8]) -> Result<&str, MessageError> {
    if payload.is_empty() {
        return Err(MessageError::Empty);
    }
    // Every byte of every payload is checked here: the SIMD checker is
    // several times faster than the standard one on names with accents.
    let text = simdutf8::basic::from_utf8(payload).map_err(|_| MessageError::NotUtf8)?;
    let body = text
        .strip_suffix('\n')
        .ok_or(MessageError::MissingNewline)?;
    // A final "\\\n" would be an escaped newline, not the terminator.
    let trailing_backslashes = body.bytes().rev().take_while(|&b| b == b'\\').count();
    if trailing_backslashes % 2 == 1 {
        return Err(MessageError::MissingNewline);
    }
    Ok(body)
}
