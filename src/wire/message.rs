//! The meaning of a frame's payload: `KEY:VALUE` pairs separated by `|` and
//! ended by `\n`, with `\` escaping inside values, and the typed messages
//! built on them ([`Request`] from agency to central, [`Reply`] back).
//!
//! Framing (the length header) lives in [`crate::wire::codec`]; this module never
//! sees it. Every wire key and action name is defined once, here.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, BytesMut};

use crate::model::{AgencyId, BetError, BetField, BetRef, Bets};

/// Largest whole frame, header included, in bytes.
pub const MAX_FRAME_LEN: usize = 8192;
/// Size of the big-endian length header that precedes every payload.
pub const HEADER_LEN: usize = 4;
/// Largest payload a frame can carry: the frame limit less the header.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;

/// Wire keys. Spanish appears only here and in log action names.
pub mod key {
    /// Number of bets in a batch.
    pub const BATCH_SIZE: &str = "BATCH_SIZE";
    /// Prefix of the i-th bet of a batch (`BET_1`, `BET_2`, …).
    pub const BET_PREFIX: &str = "BET_";
    /// The request kind of a non-batch message.
    pub const ACTION: &str = "ACTION";
    /// The agency a message speaks for.
    pub const AGENCY_ID: &str = "AGENCY_ID";
    /// `SUCCESS` or `ERROR` in every reply.
    pub const STATUS: &str = "STATUS";
    /// Human-readable text of a reply.
    pub const MESSAGE: &str = "MESSAGE";
    /// Machine-readable error code of an error reply.
    pub const CODE: &str = "CODE";
    /// Comma-separated winner documents.
    pub const WINNERS: &str = "WINNERS";
    /// `1` when the winners list continues in the next frame.
    pub const MORE: &str = "MORE";
    /// Position, in the agency's data file, of a batch's first bet (0-based,
    /// counting bets, not lines).
    pub const FIRST: &str = "FIRST";
    /// Bets the central holds for the agency.
    pub const STORED: &str = "STORED";
    /// The agency's shared secret, in `HELLO`, when the central requires one.
    pub const SECRET: &str = "SECRET";
    /// Configured agency count, in a status reply.
    pub const AGENCIES: &str = "AGENCIES";
    /// Per-agency `id=held/open|done` entries, comma separated, in a status reply.
    pub const AGENCY_STATE: &str = "AGENCY_STATE";
    /// `1` once the draw is done, in a status reply.
    pub const DRAWN: &str = "DRAWN";
    /// Bet field: first name.
    pub const NOMBRE: &str = "NOMBRE";
    /// Bet field: last name.
    pub const APELLIDO: &str = "APELLIDO";
    /// Bet field: document (DNI).
    pub const DOCUMENTO: &str = "DOCUMENTO";
    /// Bet field: birthdate, `YYYY-MM-DD`.
    pub const NACIMIENTO: &str = "NACIMIENTO";
    /// Bet field: the number bet on.
    pub const NUMERO: &str = "NUMERO";
}

/// Action names carried in `ACTION:`.
pub mod action {
    /// "I have sent all my bets", as the design document names it.
    pub const BETTING_FINISHED: &str = "BETTING_FINISHED";
    /// The same, as the reference agency spells it.
    pub const FINISH_BETTING: &str = "FINISH_BETTING";
    /// Opens a resumable session: the central answers with `STORED`.
    pub const HELLO: &str = "HELLO";
    /// Liveness check: the central answers `MESSAGE:pong`.
    pub const PING: &str = "PING";
    /// Operator view: bets held per agency, who finished, whether drawn.
    pub const STATUS: &str = "STATUS";
}

/// Values of the `STATUS` key.
pub mod status {
    /// The request was carried out.
    pub const SUCCESS: &str = "SUCCESS";
    /// The request was refused; `CODE` and `MESSAGE` say why.
    pub const ERROR: &str = "ERROR";
}

/// Why a well-framed payload does not make a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The payload bytes are not UTF-8.
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    /// The payload is empty.
    #[error("empty payload")]
    Empty,
    /// The payload does not end with an unescaped `\n`.
    #[error("payload does not end with '\\n'")]
    MissingNewline,
    /// A `\` is the last character of the payload or value.
    #[error("dangling escape at the end of {0}")]
    DanglingEscape(&'static str),
    /// A `\` escapes a character no writer escapes.
    #[error("unknown escape \\{0:?} in {1}")]
    UnknownEscape(char, &'static str),
    /// A pair has no `:` between key and value.
    #[error("pair {0:?} has no ':'")]
    MissingColon(String),
    /// A key the message needs is absent.
    #[error("missing key {0}")]
    MissingKey(&'static str),
    /// A key has a value that cannot be read.
    #[error("bad value for {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// `BATCH_SIZE` does not match the `BET_i` keys present, or they have gaps.
    #[error("batch is inconsistent: {0}")]
    BatchMismatch(String),
    /// Neither a batch nor a known action.
    #[error("unknown message: {0}")]
    Unknown(String),
    /// A bet inside a batch is invalid.
    #[error("BET_{index}: {source}")]
    Bet {
        /// 1-based position of the bet in the batch (`BET_i`).
        index: usize,
        /// What is wrong with it.
        source: BetError,
    },
}

impl MessageError {
    /// The error code sent back to the agency for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageError::Bet { .. } => ErrorCode::InvalidBet,
            MessageError::Unknown(_) => ErrorCode::UnknownMessage,
            _ => ErrorCode::MalformedMessage,
        }
    }
}

/// Machine-readable reasons in `CODE:` of an error reply (see docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The payload is not a well-formed `KEY:VALUE|…\n` message.
    MalformedMessage,
    /// The frame header announces more than [`MAX_FRAME_LEN`].
    FrameTooLarge,
    /// A well-formed message of a kind the central does not know.
    UnknownMessage,
    /// A bet fails validation; the message names `BET_i` and the field.
    InvalidBet,
    /// The agency id is out of range or differs from the connection's.
    WrongAgency,
    /// Another open connection already speaks for this agency.
    AgencyBusy,
    /// The agency already announced it finished; no more bets are taken.
    AgencyFinished,
    /// The bets file could not be written; nothing of the batch was kept.
    StorageFailed,
    /// The batch starts past the bets stored for the agency (a gap).
    OutOfOrder,
    /// Secrets are configured and this connection has not presented its
    /// agency's.
    Unauthenticated,
    /// A frame was not completed in time, or the connection sat idle.
    Timeout,
    /// The central is at its connection limit; try again later.
    ServerBusy,
}

impl ErrorCode {
    /// The code as it travels on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedMessage => "MALFORMED_MESSAGE",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::UnknownMessage => "UNKNOWN_MESSAGE",
            ErrorCode::InvalidBet => "INVALID_BET",
            ErrorCode::WrongAgency => "WRONG_AGENCY",
            ErrorCode::AgencyBusy => "AGENCY_BUSY",
            ErrorCode::AgencyFinished => "AGENCY_FINISHED",
            ErrorCode::StorageFailed => "STORAGE_FAILED",
            ErrorCode::OutOfOrder => "OUT_OF_ORDER",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::ServerBusy => "SERVER_BUSY",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message from an agency to the central.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A batch of bets, to be stored all or nothing.
    Batch {
        /// Position of the first bet in the agency's file, when the agency
        /// resumes uploads; lets the central recognise a resent batch.
        first: Option<u64>,
        /// The bets, in file order.
        bets: Bets,
    },
    /// Liveness check (health probes); needs no agency and no secret.
    Ping,
    /// Operator view of the lottery; needs no agency and no secret, and
    /// reveals no personal data.
    Status,
    /// Opens a resumable session for an agency.
    Hello {
        /// The agency.
        agency: AgencyId,
        /// The agency's secret, when the central requires one.
        secret: Option<String>,
    },
    /// The agency has sent all its bets and waits for its winners.
    Finished {
        /// The agency that finished.
        agency: AgencyId,
    },
}

/// A message from the central to an agency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A request was carried out: a batch stored, or a session opened.
    Success {
        /// Human-readable text.
        message: String,
        /// Bets the central now holds for the agency, when it says.
        stored: Option<u64>,
    },
    /// A request was refused.
    Error {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// One frame of the lottery's status. When `more` is set the agency
    /// list continues in the next frame.
    Status {
        /// Agencies configured.
        agencies: u32,
        /// Whether the draw is done.
        drawn: bool,
        /// Per agency with bets or an announcement: bets held, finished.
        states: Vec<AgencyState>,
        /// Another `Status` frame follows.
        more: bool,
    },
    /// One frame of the agency's winners. When `more` is set the list
    /// continues in the next frame.
    Winners {
        /// Winner documents (DNI) in this frame.
        documents: Vec<String>,
        /// Another `Winners` frame follows.
        more: bool,
    },
}

/// One agency's line in a status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgencyState {
    /// The agency.
    pub agency: AgencyId,
    /// Bets the central holds for it.
    pub held: u64,
    /// It announced that it finished.
    pub finished: bool,
}

impl AgencyState {
    fn write(&self, dst: &mut BytesMut) {
        let mut n = itoa::Buffer::new();
        dst.put_slice(n.format(self.agency).as_bytes());
        dst.put_u8(b'=');
        dst.put_slice(n.format(self.held).as_bytes());
        dst.put_slice(if self.finished { b"/done" } else { b"/open" });
    }

    fn parse(s: &str) -> Option<AgencyState> {
        let (agency, rest) = s.split_once('=')?;
        let (held, state) = rest.split_once('/')?;
        Some(AgencyState {
            agency: agency.parse().ok()?,
            held: held.parse().ok()?,
            finished: match state {
                "done" => true,
                "open" => false,
                _ => return None,
            },
        })
    }
}

/// A message type that can be read from a payload and written into one.
pub trait WireMessage: Sized {
    /// Parses a whole payload (including its final `\n`).
    ///
    /// # Errors
    /// A [`MessageError`] saying what is wrong and where.
    fn parse(payload: &[u8]) -> Result<Self, MessageError>;

    /// Appends the payload (including its final `\n`) to `dst`.
    fn write(&self, dst: &mut BytesMut);
}

// ---------------------------------------------------------------------------
// Escaping

/// Whether `c` must be escaped inside a value. `\` and `|` must; `\n` is
/// escaped too so that a payload's only raw newline is its last byte.
fn needs_escape(c: u8) -> bool {
    matches!(c, b'\\' | b'|' | b'\n')
}

/// Appends `value` to `dst` with `\`, `|` and `\n` escaped.
///
/// ```
/// use bytes::BytesMut;
/// use lottery::wire::message::{escape_into, unescape};
///
/// let mut dst = BytesMut::new();
/// escape_into(&mut dst, r"Ana|María\x");
/// assert_eq!(&dst[..], r"Ana\|María\\x".as_bytes());
/// assert_eq!(unescape(r"Ana\|María\\x", "name").unwrap(), r"Ana|María\x");
/// ```
pub fn escape_into(dst: &mut BytesMut, value: &str) {
    escape_with(dst, value.as_bytes(), b"\\");
}

/// Appends `bytes` with `escape` before every byte that needs escaping,
/// copying the plain runs between them whole. (Fields are short: a plain
/// byte loop beats `memchr` here.)
fn escape_with(dst: &mut BytesMut, bytes: &[u8], escape: &[u8]) {
    // Nearly every field has nothing to escape: check eight bytes at a time
    // and copy the field whole.
    if !crate::wire::scan::any_of(bytes, *b"\\|\n") {
        dst.put_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        if needs_escape(c) {
            dst.put_slice(&bytes[start..i]);
            dst.put_slice(escape);
            start = i;
        }
    }
    dst.put_slice(&bytes[start..]);
}

/// Length of `value` once escaped by [`escape_into`].
pub fn escaped_len(value: &str) -> usize {
    value.len() + value.bytes().filter(|&c| needs_escape(c)).count()
}

/// The characters a writer may escape: `\`, `|`, `:` and a newline.
fn is_escapable(c: char) -> bool {
    matches!(c, '\\' | '|' | ':' | '\n')
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
                Some(next) if is_escapable(next) => out.push(next),
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
struct Pair<'a> {
    key: Cow<'a, str>,
    value: &'a str,
    /// Where the value starts in the body.
    at: usize,
    /// The value's special bytes, as a range of [`Pairs::specials`].
    specials: std::ops::Range<usize>,
}

/// A payload body split into its pairs.
struct Pairs<'a> {
    list: Vec<Pair<'a>>,
    /// Positions in the body of every `\\`, `|` and `:`, in order.
    specials: Vec<u32>,
}

impl<'a> Pairs<'a> {
    /// The (escaped) value of the first pair with this key.
    fn find(&self, key: &str) -> Option<&'a str> {
        self.list.iter().find(|p| p.key == key).map(|p| p.value)
    }

    /// Positions, within `pair`'s value, of the value's special bytes.
    fn specials_of(&self, pair: &Pair<'_>) -> impl Iterator<Item = usize> + '_ {
        let at = pair.at;
        self.specials[pair.specials.clone()]
            .iter()
            .map(move |&p| p as usize - at)
    }
}

/// Positions of every `\\`, `|` and `:` in `bytes`, in order: all the bytes
/// that give a payload its structure, at both of a batch's levels (the
/// batch's pairs, and each bet's own).
fn find_specials(bytes: &[u8]) -> Vec<u32> {
    let mut out = vec![0; bytes.len()];
    let n = crate::wire::scan::positions_of(bytes, *b"\\|:", 0, &mut out);
    out.truncate(n);
    out
}

/// Splits a payload body (without its final `\n`) into raw, still escaped,
/// `(key, value)` pairs: at unescaped `|`, then each pair at its first
/// unescaped `:`. Keys are returned unescaped.
///
/// ```
/// use lottery::wire::message::split_pairs;
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
fn pairs_of<'a>(body: &'a str, what: &'static str) -> Result<Pairs<'a>, MessageError> {
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
fn body_of(payload: &[u8]) -> Result<&str, MessageError> {
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

fn bad_value(key: &str, reason: impl Into<String>) -> MessageError {
    MessageError::BadValue {
        key: key.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Requests

impl WireMessage for Request {
    fn parse(payload: &[u8]) -> Result<Self, MessageError> {
        let body = body_of(payload)?;
        let pairs = pairs_of(body, "payload")?;
        if let Some(size) = pairs.find(key::BATCH_SIZE) {
            let first = pairs
                .find(key::FIRST)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad_value(key::FIRST, format!("{v:?} is not a position")))
                })
                .transpose()?;
            let bets = parse_batch(size, &pairs)?;
            return Ok(Request::Batch { first, bets });
        }
        match pairs.find(key::ACTION) {
            Some(a) => {
                let a = unescape(a, "ACTION")?;
                if a == action::PING {
                    return Ok(Request::Ping);
                }
                if a == action::STATUS {
                    return Ok(Request::Status);
                }
                let finished = a == action::BETTING_FINISHED || a == action::FINISH_BETTING;
                if finished || a == action::HELLO {
                    let id = pairs
                        .find(key::AGENCY_ID)
                        .ok_or(MessageError::MissingKey(key::AGENCY_ID))?;
                    let id = unescape(id, "AGENCY_ID")?;
                    let agency = id.parse::<AgencyId>().map_err(|_| {
                        bad_value(key::AGENCY_ID, format!("{id:?} is not an agency id"))
                    })?;
                    Ok(if finished {
                        Request::Finished { agency }
                    } else {
                        let secret = pairs
                            .find(key::SECRET)
                            .map(|v| unescape(v, "SECRET").map(Cow::into_owned))
                            .transpose()?;
                        Request::Hello { agency, secret }
                    })
                } else {
                    Err(MessageError::Unknown(format!("ACTION:{a}")))
                }
            }
            None => Err(MessageError::Unknown(
                "neither BATCH_SIZE nor ACTION is present".to_string(),
            )),
        }
    }

    fn write(&self, dst: &mut BytesMut) {
        match self {
            Request::Batch { first, bets } => write_batch(dst, *first, bets),
            Request::Ping | Request::Status => {
                dst.put_slice(key::ACTION.as_bytes());
                dst.put_u8(b':');
                let name = if matches!(self, Request::Ping) {
                    action::PING
                } else {
                    action::STATUS
                };
                dst.put_slice(name.as_bytes());
                dst.put_u8(b'\n');
            }
            Request::Finished { agency } | Request::Hello { agency, .. } => {
                let name = match self {
                    Request::Hello { .. } => action::HELLO,
                    _ => action::BETTING_FINISHED,
                };
                dst.put_slice(key::ACTION.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(name.as_bytes());
                dst.put_u8(b'|');
                dst.put_slice(key::AGENCY_ID.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(itoa::Buffer::new().format(*agency).as_bytes());
                if let Request::Hello {
                    secret: Some(secret),
                    ..
                } = self
                {
                    dst.put_u8(b'|');
                    dst.put_slice(key::SECRET.as_bytes());
                    dst.put_u8(b':');
                    escape_into(dst, secret);
                }
                dst.put_u8(b'\n');
            }
        }
    }
}

fn parse_batch(size: &str, pairs: &Pairs<'_>) -> Result<Bets, MessageError> {
    let size: usize = unescape(size, "BATCH_SIZE")?
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
    for (i, pair) in slots.into_iter().enumerate() {
        let pair = pair.expect("invariant: every slot was filled, seen == size");
        parse_bet(pair.value, pairs.specials_of(pair), &mut bets).map_err(|source| {
            MessageError::Bet {
                index: i + 1,
                source,
            }
        })?;
    }
    Ok(bets)
}

/// The bet fields in the order [`plain_bet`] and [`parse_bet`] keep them.
const BET_FIELDS: [BetField; 6] = [
    BetField::FirstName,
    BetField::LastName,
    BetField::Document,
    BetField::Birthdate,
    BetField::Number,
    BetField::AgencyId,
];

fn bet_field_index(key: &[u8]) -> Option<usize> {
    // In `BET_FIELDS` order. The length and a letter or two tell the
    // candidate apart; one compare confirms it.
    let candidate = match (key.len(), key.first(), key.get(1)) {
        (6, Some(b'N'), Some(b'O')) => 0,
        (8, Some(b'A'), _) => 1,
        (9, Some(b'D'), _) => 2,
        (10, Some(b'N'), _) => 3,
        (6, Some(b'N'), Some(b'U')) => 4,
        (9, Some(b'A'), _) => 5,
        _ => return None,
    };
    same_bytes(BET_FIELDS[candidate].wire_key().as_bytes(), key).then_some(candidate)
}

/// `a == b` for a few bytes: a plain loop beats a call to `memcmp`.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Parses one escaped `BET_i` value, whose special bytes are at `specials`,
/// validates it, and appends it to `out`.
fn parse_bet(
    escaped: &str,
    specials: impl Iterator<Item = usize>,
    out: &mut Bets,
) -> Result<(), BetError> {
    match plain_bet(escaped, specials) {
        Some([first, last, document, birthdate, number, agency]) => {
            out.push_fields(agency, first, last, document, birthdate, number)
        }
        None => {
            let [first, last, document, birthdate, number, agency] = parse_bet_escaped(escaped)?;
            out.push_fields(&agency, &first, &last, &document, &birthdate, &number)
        }
    }
}

/// The six fields of a bet whose only escapes are the `\|` between its
/// pairs, as nearly every bet is (no `|`, `\` or newline in its names),
/// borrowed straight from the payload: nothing to copy or undo.
///
/// `None` sends the bet down the general path, [`parse_bet_escaped`], which
/// also gives the exact error for anything malformed, so the two agree on
/// every input.
fn plain_bet(escaped: &str, specials: impl Iterator<Item = usize>) -> Option<[&str; 6]> {
    let bytes = escaped.as_bytes();
    if bytes.last() == Some(&b'\n') {
        return None;
    }
    let mut values: [Option<&str>; 6] = [None; 6];
    let mut pair = 0;
    let mut take = |start: usize, colon: Option<usize>, end: usize| -> Option<()> {
        let c = colon?;
        let key = &bytes[start..c];
        // Writers send the fields in this order: check the expected key
        // first, and look the key up only when it is another.
        let field = match BET_FIELDS.get(pair) {
            Some(expected) if same_bytes(expected.wire_key().as_bytes(), key) => pair,
            _ => bet_field_index(key)?,
        };
        pair += 1;
        // Splitting at ASCII bytes keeps both sides valid UTF-8.
        match values[field].replace(&escaped[c + 1..end]) {
            Some(_) => None,
            None => Some(()),
        }
    };
    let (mut start, mut colon) = (0, None);
    let mut specials = specials.peekable();
    while let Some(at) = specials.next() {
        match bytes[at] {
            // A pair ends at `\|` (whose `|` is the next special byte);
            // any other escape, or a raw `|` (which the batch's own splitting
            // never leaves), is for the general path.
            b'\\' if bytes.get(at + 1) == Some(&b'|') => {
                specials.next();
                take(start, colon, at)?;
                start = at + 2;
                colon = None;
            }
            b'\\' | b'|' => return None,
            _ if colon.is_none() => colon = Some(at),
            _ => {}
        }
    }
    take(start, colon, bytes.len())?;
    let [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)] = values else {
        return None;
    };
    Some([a, b, c, d, e, f])
}

/// The six fields of any escaped `BET_i` value, in [`BET_FIELDS`] order.
fn parse_bet_escaped(escaped: &str) -> Result<[String; 6], BetError> {
    // One pass over the doubly escaped text: undo the batch's escaping byte
    // by byte, and feed the result straight into the bet's own pairs, each
    // value into its field's buffer.
    let malformed = |what: String| BetError::Malformed(what);
    let mut values: [Option<Vec<u8>>; 6] = Default::default();
    let mut key: Vec<u8> = Vec::with_capacity(16);
    let mut value: Vec<u8> = Vec::with_capacity(32);
    let mut in_value = false;
    let mut inner_escape = false;
    let mut finish_pair =
        |key: &mut Vec<u8>, value: &mut Vec<u8>, in_value: bool| -> Result<(), BetError> {
            if !in_value {
                return Err(malformed(format!(
                    "pair {:?} has no ':'",
                    String::from_utf8_lossy(key)
                )));
            }
            if let Some(i) = bet_field_index(key) {
                // The first of repeated keys counts, as for any payload.
                if values[i].is_none() {
                    values[i] = Some(std::mem::take(value));
                }
            }
            key.clear();
            value.clear();
            Ok(())
        };
    let bytes = escaped.as_bytes();
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut i = 0;
    while i < bytes.len() {
        // The batch level: `\x` stands for `x`.
        let c = if bytes[i] == b'\\' {
            match bytes.get(i + 1) {
                Some(&next) if is_escapable(char::from(next)) => {
                    i += 2;
                    next
                }
                Some(&next) => {
                    let shown = escaped[i + 1..].chars().next().unwrap_or(char::from(next));
                    return Err(malformed(format!("unknown escape \\{shown:?}")));
                }
                None => return Err(malformed("dangling escape".into())),
            }
        } else {
            i += 1;
            bytes[i - 1]
        };
        // The bet level.
        let target = if in_value { &mut value } else { &mut key };
        if inner_escape {
            if !is_escapable(char::from(c)) {
                return Err(malformed(format!("unknown escape \\{:?}", char::from(c))));
            }
            target.push(c);
            inner_escape = false;
            continue;
        }
        match c {
            b'\\' => inner_escape = true,
            b'|' => {
                finish_pair(&mut key, &mut value, in_value)?;
                in_value = false;
            }
            b':' if !in_value => in_value = true,
            _ => target.push(c),
        }
    }
    if inner_escape {
        return Err(malformed("dangling escape".into()));
    }
    if !key.is_empty() || in_value {
        finish_pair(&mut key, &mut value, in_value)?;
    }
    // Only ASCII escapes were removed from valid UTF-8, so this holds.
    let mut take = |f: usize| -> Result<String, BetError> {
        let v = values[f].take().ok_or(BetError::Missing(BET_FIELDS[f]))?;
        String::from_utf8(v).map_err(|_| malformed(format!("{} is not UTF-8", BET_FIELDS[f])))
    };
    Ok([take(0)?, take(1)?, take(2)?, take(3)?, take(4)?, take(5)?])
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
/// `BATCH_SIZE:` with 4 digits and `|FIRST:` with 20.
const BATCH_HEADROOM: usize = HEADER_LEN + 11 + 4 + 7 + 20;

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

    /// The payload's length with `count` bets and `bets_len` bytes of them.
    fn payload_len(&self, count: usize, bets_len: usize) -> usize {
        let digits = |n: u64| n.checked_ilog10().map_or(1, |d| d as usize + 1);
        let first = self
            .first
            .map_or(0, |f| 1 + key::FIRST.len() + 1 + digits(f));
        key::BATCH_SIZE.len() + 1 + digits(count as u64) + first + bets_len + 1
    }

    /// Appends `bet` if the batch still fits in one frame with it; returns
    /// whether it did (the batch is unchanged when it did not).
    pub fn push(&mut self, bet: BetRef<'_>) -> bool {
        let mark = self.buf.len();
        put_bet(&mut self.buf, self.count + 1, bet);
        if self.payload_len(self.count + 1, self.buf.len() - BATCH_HEADROOM) > MAX_PAYLOAD_LEN {
            self.buf.truncate(mark);
            return false;
        }
        self.count += 1;
        true
    }

    /// The whole frame, length header included.
    pub fn finish(mut self) -> bytes::Bytes {
        let payload_len = self.payload_len(self.count, self.buf.len() - BATCH_HEADROOM);
        let mut head = BytesMut::with_capacity(BATCH_HEADROOM);
        let mut n = itoa::Buffer::new();
        head.put_u32(u32::try_from(payload_len).expect("a payload fits in a frame"));
        head.put_slice(key::BATCH_SIZE.as_bytes());
        head.put_u8(b':');
        head.put_slice(n.format(self.count).as_bytes());
        if let Some(first) = self.first {
            head.put_u8(b'|');
            head.put_slice(key::FIRST.as_bytes());
            head.put_u8(b':');
            head.put_slice(n.format(first).as_bytes());
        }
        self.buf.put_u8(b'\n');
        let start = BATCH_HEADROOM - head.len();
        self.buf[start..BATCH_HEADROOM].copy_from_slice(&head);
        self.buf.split_off(start).freeze()
    }
}

/// Writes `|BET_i:` and the bet, its fields escaped twice (once as the
/// bet's own payload, once as a value of the batch).
fn put_bet(dst: &mut BytesMut, i: usize, bet: BetRef<'_>) {
    let mut digits = itoa::Buffer::new();
    dst.put_u8(b'|');
    dst.put_slice(key::BET_PREFIX.as_bytes());
    dst.put_slice(digits.format(i).as_bytes());
    dst.put_u8(b':');
    for (j, (k, v)) in bet_fields(bet, &mut digits).into_iter().enumerate() {
        if j > 0 {
            // The bet's own separator, escaped once for the outer level.
            dst.put_slice(b"\\|");
        }
        dst.put_slice(k.as_bytes());
        dst.put_u8(b':');
        // Escape twice in one pass: a special byte `c` becomes `\c` in
        // the bet, and that becomes `\\\c` in the batch.
        escape_with(dst, v.as_bytes(), b"\\\\\\");
    }
}

fn bet_fields<'a>(bet: BetRef<'a>, digits: &'a mut itoa::Buffer) -> [(&'static str, &'a str); 6] {
    let number = digits.format(bet.number);
    [
        (key::NOMBRE, bet.first_name),
        (key::APELLIDO, bet.last_name),
        (key::DOCUMENTO, bet.document),
        (key::NACIMIENTO, bet.birthdate),
        (key::NUMERO, number),
        (key::AGENCY_ID, agency_str(bet.agency)),
    ]
}

/// The agency id as text. Ids are small, so the common ones are static and
/// writing a bet needs no allocation.
fn agency_str(id: AgencyId) -> &'static str {
    const SMALL: [&str; 21] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18", "19", "20",
    ];
    match SMALL.get(id as usize) {
        Some(s) => s,
        // Rare: ids above 20 are leaked once per distinct id and kept for the
        // life of the process, which bounds the leak by the agency count.
        None => agency_str_slow(id),
    }
}

fn agency_str_slow(id: AgencyId) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<AgencyId, &'static str>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    cache
        .entry(id)
        .or_insert_with(|| Box::leak(id.to_string().into_boxed_str()))
}

fn write_batch(dst: &mut BytesMut, first: Option<u64>, bets: &Bets) {
    let mut n = itoa::Buffer::new();
    dst.put_slice(key::BATCH_SIZE.as_bytes());
    dst.put_u8(b':');
    dst.put_slice(n.format(bets.len()).as_bytes());
    if let Some(first) = first {
        dst.put_u8(b'|');
        dst.put_slice(key::FIRST.as_bytes());
        dst.put_u8(b':');
        dst.put_slice(n.format(first).as_bytes());
    }
    // Room for the whole payload up front: no growth while writing.
    dst.reserve(MAX_PAYLOAD_LEN.min(64 + bets.len() * 128));
    for (i, bet) in bets.iter().enumerate() {
        put_bet(dst, i + 1, bet);
    }
    dst.put_u8(b'\n');
}

// ---------------------------------------------------------------------------
// Replies

impl WireMessage for Reply {
    fn parse(payload: &[u8]) -> Result<Self, MessageError> {
        let body = body_of(payload)?;
        let pairs = pairs_of(body, "payload")?;
        let status = pairs
            .find(key::STATUS)
            .ok_or(MessageError::MissingKey(key::STATUS))?;
        let text = |k: &'static str| -> Result<String, MessageError> {
            Ok(pairs
                .find(k)
                .map(|v| unescape(v, k))
                .transpose()?
                .map(Cow::into_owned)
                .unwrap_or_default())
        };
        match status {
            status::SUCCESS => {
                if let Some(agencies) = pairs.find(key::AGENCIES) {
                    let agencies = agencies
                        .parse()
                        .map_err(|_| bad_value(key::AGENCIES, "not a number"))?;
                    let states = pairs
                        .find(key::AGENCY_STATE)
                        .unwrap_or("")
                        .split(',')
                        .filter(|e| !e.is_empty())
                        .map(|e| {
                            AgencyState::parse(e).ok_or_else(|| {
                                bad_value(
                                    key::AGENCY_STATE,
                                    format!("{e:?} is not id=held/open|done"),
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    return Ok(Reply::Status {
                        agencies,
                        drawn: pairs.find(key::DRAWN) == Some("1"),
                        states,
                        more: pairs.find(key::MORE) == Some("1"),
                    });
                }
                if let Some(list) = pairs.find(key::WINNERS) {
                    let list = unescape(list, "WINNERS")?;
                    let documents = list
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(str::to_string)
                        .collect();
                    let more = pairs.find(key::MORE) == Some("1");
                    Ok(Reply::Winners { documents, more })
                } else {
                    let stored = pairs
                        .find(key::STORED)
                        .map(|v| {
                            v.parse::<u64>().map_err(|_| {
                                bad_value(key::STORED, format!("{v:?} is not a count"))
                            })
                        })
                        .transpose()?;
                    Ok(Reply::Success {
                        message: text(key::MESSAGE)?,
                        stored,
                    })
                }
            }
            status::ERROR => {
                let code = text(key::CODE)?;
                let code = ErrorCode::from_wire(&code).unwrap_or(ErrorCode::MalformedMessage);
                Ok(Reply::Error {
                    code,
                    message: text(key::MESSAGE)?,
                })
            }
            other => Err(bad_value(key::STATUS, format!("unknown status {other:?}"))),
        }
    }

    fn write(&self, dst: &mut BytesMut) {
        let put_pair = |dst: &mut BytesMut, k: &str, v: &str, first: bool| {
            if !first {
                dst.put_u8(b'|');
            }
            dst.put_slice(k.as_bytes());
            dst.put_u8(b':');
            escape_into(dst, v);
        };
        match self {
            Reply::Success { message, stored } => {
                put_pair(dst, key::STATUS, status::SUCCESS, true);
                put_pair(dst, key::MESSAGE, message, false);
                if let Some(n) = stored {
                    dst.put_u8(b'|');
                    dst.put_slice(key::STORED.as_bytes());
                    dst.put_u8(b':');
                    dst.put_slice(itoa::Buffer::new().format(*n).as_bytes());
                }
            }
            Reply::Error { code, message } => {
                put_pair(dst, key::STATUS, status::ERROR, true);
                put_pair(dst, key::CODE, code.as_str(), false);
                put_pair(dst, key::MESSAGE, message, false);
            }
            Reply::Status {
                agencies,
                drawn,
                states,
                more,
            } => {
                put_pair(dst, key::STATUS, status::SUCCESS, true);
                put_pair(
                    dst,
                    key::AGENCIES,
                    itoa::Buffer::new().format(*agencies),
                    false,
                );
                put_pair(dst, key::DRAWN, if *drawn { "1" } else { "0" }, false);
                dst.put_u8(b'|');
                dst.put_slice(key::AGENCY_STATE.as_bytes());
                dst.put_u8(b':');
                for (i, state) in states.iter().enumerate() {
                    if i > 0 {
                        dst.put_u8(b',');
                    }
                    state.write(dst);
                }
                if *more {
                    put_pair(dst, key::MORE, "1", false);
                }
            }
            Reply::Winners { documents, more } => {
                put_pair(dst, key::STATUS, status::SUCCESS, true);
                dst.put_u8(b'|');
                dst.put_slice(key::WINNERS.as_bytes());
                dst.put_u8(b':');
                for (i, d) in documents.iter().enumerate() {
                    if i > 0 {
                        dst.put_u8(b',');
                    }
                    escape_into(dst, d);
                }
                if *more {
                    put_pair(dst, key::MORE, "1", false);
                }
            }
        }
        dst.put_u8(b'\n');
    }
}

impl ErrorCode {
    /// Reads a code from its wire form.
    pub fn from_wire(s: &str) -> Option<Self> {
        use ErrorCode::*;
        [
            MalformedMessage,
            FrameTooLarge,
            UnknownMessage,
            InvalidBet,
            WrongAgency,
            AgencyBusy,
            AgencyFinished,
            StorageFailed,
            OutOfOrder,
            Unauthenticated,
            Timeout,
            ServerBusy,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Splits a winners list into `Winners` replies that each fit in one frame.
/// An empty list is one reply with an empty value.
pub fn winners_replies(documents: &[String]) -> Vec<Reply> {
    // "STATUS:SUCCESS|WINNERS:" + "|MORE:1" + "\n"
    let overhead = key::STATUS.len()
        + 1
        + status::SUCCESS.len()
        + 1
        + key::WINNERS.len()
        + 1
        + 1
        + key::MORE.len()
        + 2
        + 1;
    let budget = MAX_PAYLOAD_LEN - overhead;
    let mut replies = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for d in documents {
        let len = escaped_len(d) + usize::from(!current.is_empty());
        if !current.is_empty() && used + len > budget {
            replies.push(Reply::Winners {
                documents: std::mem::take(&mut current),
                more: true,
            });
            used = 0;
        }
        used += escaped_len(d) + usize::from(!current.is_empty());
        current.push(d.clone());
    }
    replies.push(Reply::Winners {
        documents: current,
        more: false,
    });
    replies
}

/// Splits a status into `Status` replies that each fit in one frame.
pub fn status_replies(agencies: u32, drawn: bool, states: &[AgencyState]) -> Vec<Reply> {
    // Each entry takes at most 10 + 1 + 20 + 5 + 1 bytes; leave room for the
    // fixed keys.
    const PER_FRAME: usize = (MAX_PAYLOAD_LEN - 128) / 37;
    let mut chunks: Vec<&[AgencyState]> = states.chunks(PER_FRAME).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| Reply::Status {
            agencies,
            drawn,
            states: chunk.to_vec(),
            more: i < last,
        })
        .collect()
}

/// Encodes `msg` to its payload bytes (a convenience for tests and tools).
pub fn to_payload<M: WireMessage>(msg: &M) -> Vec<u8> {
    let mut dst = BytesMut::new();
    msg.write(&mut dst);
    dst.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;

    fn bet(first: &str, last: &str) -> Bet {
        Bet::from_fields("3", first, last, "30904465", "1999-03-17", "7574").unwrap()
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
            let encoded = crate::wire::codec::frame(&Request::Batch {
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
    fn both_finished_spellings() {
        for a in ["BETTING_FINISHED", "FINISH_BETTING"] {
            let p = format!("ACTION:{a}|AGENCY_ID:3\n");
            assert_eq!(
                Request::parse(p.as_bytes()).unwrap(),
                Request::Finished { agency: 3 }
            );
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let p = b"ACTION:FINISH_BETTING|VERSION:9|AGENCY_ID:2\n";
        assert_eq!(Request::parse(p).unwrap(), Request::Finished { agency: 2 });
    }

    #[test]
    fn malformed_payloads() {
        assert_eq!(Request::parse(b""), Err(MessageError::Empty));
        assert_eq!(
            Request::parse(b"ACTION:X"),
            Err(MessageError::MissingNewline)
        );
        assert_eq!(Request::parse(b"\xff\n"), Err(MessageError::NotUtf8));
        assert_eq!(
            Request::parse(b"ACTION:X\\\n"),
            Err(MessageError::MissingNewline)
        );
        assert!(matches!(
            Request::parse(b"NOCOLON\n"),
            Err(MessageError::MissingColon(_))
        ));
        assert!(matches!(
            Request::parse(b"ACTION:DANCE\n"),
            Err(MessageError::Unknown(_))
        ));
        assert!(matches!(
            Request::parse(b"BATCH_SIZE:2|BET_1:x\n"),
            Err(MessageError::BatchMismatch(_))
        ));
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
                for (field, (pieces, sep)) in BET_FIELDS.iter().zip(pairs) {
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

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        /// The fast path for plain bets and the general one agree on every
        /// bet value the fast one accepts; everything else goes to the
        /// general one, which also names the errors.
        #[test]
        fn plain_and_escaped_bet_parsers_agree(value in bet_value()) {
            if let Some(fields) = plain(&value) {
                let general = parse_bet_escaped(&value).expect("the general path accepts it");
                proptest::prop_assert_eq!(fields.map(str::to_string), general);
            }
        }
    }

    #[test]
    fn the_agreement_property_reaches_the_fast_path() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let hits = (0..2000)
            .filter(|_| {
                let v = bet_value().new_tree(&mut runner).unwrap().current();
                plain(&v).is_some()
            })
            .count();
        assert!(hits > 30, "only {hits} of 2000 values were plain bets");
    }

    /// [`plain_bet`] on a bet value alone.
    fn plain(value: &str) -> Option<[&str; 6]> {
        plain_bet(
            value,
            find_specials(value.as_bytes())
                .into_iter()
                .map(|p| p as usize),
        )
    }

    #[test]
    fn bet_field_index_knows_every_wire_key() {
        for (i, f) in BET_FIELDS.iter().enumerate() {
            assert_eq!(bet_field_index(f.wire_key().as_bytes()), Some(i), "{f}");
        }
        assert_eq!(bet_field_index(b"NOMBREX"), None);
    }

    #[test]
    fn plain_bets_take_the_fast_path() {
        let v = "NOMBRE:Ana\\|APELLIDO:Pérez\\|DOCUMENTO:1\\|NACIMIENTO:1999-03-17\\|NUMERO:7\\|AGENCY_ID:3";
        assert_eq!(
            plain(v),
            Some(["Ana", "Pérez", "1", "1999-03-17", "7", "3"])
        );
        // An escaped `|` inside a name needs the general path.
        assert_eq!(plain(&v.replace("Ana", "A\\\\\\|na")), None);
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Success {
                message: "stored 70 bets".into(),
                stored: Some(140),
            },
            Reply::Success {
                message: String::new(),
                stored: None,
            },
            Reply::Error {
                code: ErrorCode::InvalidBet,
                message: "BET_2: bad | thing".into(),
            },
            Reply::Winners {
                documents: vec!["1".into(), "22".into()],
                more: true,
            },
            Reply::Winners {
                documents: vec![],
                more: false,
            },
            Reply::Status {
                agencies: 5,
                drawn: true,
                states: vec![
                    AgencyState {
                        agency: 1,
                        held: 26936,
                        finished: true,
                    },
                    AgencyState {
                        agency: 4,
                        held: 0,
                        finished: false,
                    },
                ],
                more: false,
            },
        ];
        for r in replies {
            assert_eq!(Reply::parse(&to_payload(&r)).unwrap(), r);
        }
        assert_eq!(
            to_payload(&Reply::Winners {
                documents: vec!["30904465".into(), "1".into()],
                more: false
            }),
            b"STATUS:SUCCESS|WINNERS:30904465,1\n"
        );
    }

    #[test]
    fn long_winner_lists_are_split_to_fit() {
        let docs: Vec<String> = (0..5000)
            .map(|i| format!("{:08}", 10_000_000 + i))
            .collect();
        let replies = winners_replies(&docs);
        assert!(replies.len() > 1);
        let mut back = Vec::new();
        for (i, r) in replies.iter().enumerate() {
            assert!(to_payload(r).len() <= MAX_PAYLOAD_LEN);
            let Reply::Winners { documents, more } = r else {
                panic!()
            };
            assert_eq!(*more, i + 1 < replies.len());
            back.extend(documents.iter().cloned());
        }
        assert_eq!(back, docs);
    }
}
