//! Typed messages on a payload: [`Request`] from agency to central, [`Reply`]
//! back, why a payload is not one ([`MessageError`]), and the cutting of long
//! replies into frames. A batch's bets are read and written in `batch.rs`.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use super::batch::{parse_batch, read_written_batch, write_batch};
use super::error::{bad_value, MessageError};
use super::escape::{body_of, escape_into, escaped_len, pairs_of, unescape};
use super::{action, key, status, ErrorCode, MAX_PAYLOAD_LEN, MAX_REASON_LEN};
use crate::close::{ClosedBy, SalesClose};
use crate::model::{AgencyId, Bets};
use crate::receipt::{Digest, Receipt, Sealed};

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
    /// Opens an operator session (`PING`, `STATUS` and `CLOSE` only), so
    /// that operator tools never speak for an agency.
    OperatorHello {
        /// The operator's secret.
        secret: Option<String>,
    },
    /// Closes sales now (an operator's): the draw then runs over what was
    /// stored.
    Close {
        /// Why, in the operator's words (logged and kept with the close).
        reason: String,
    },
    /// The agency has sent all its bets and waits for its winners.
    Finished {
        /// The agency that finished.
        agency: AgencyId,
        /// How the action is spelled; both mean the same to this central.
        spelling: Finish,
    },
}

/// The two spellings of the "finished" action. The design document names
/// it `BETTING_FINISHED`; the reference agency sends, and the reference
/// central understands only, `FINISH_BETTING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Finish {
    /// `BETTING_FINISHED`, as the design document names it.
    #[default]
    BettingFinished,
    /// `FINISH_BETTING`, as the reference implementation spells it.
    FinishBetting,
}

impl Finish {
    /// The `ACTION` value.
    pub const fn action(self) -> &'static str {
        match self {
            Finish::BettingFinished => action::BETTING_FINISHED,
            Finish::FinishBetting => action::FINISH_BETTING,
        }
    }
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
        /// The digest of those bets (the answer to `HELLO`), when it says.
        digest: Option<Digest>,
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
        /// The close of sales, once they are closed.
        close: Option<SalesClose>,
        /// Another `Status` frame follows.
        more: bool,
    },
    /// Not an answer: the central is still working on the last request
    /// (waiting for the draw, or for an older connection to let go). Sent
    /// every [`STILL_WAITING_EVERY`](super::STILL_WAITING_EVERY), only to
    /// connections that opened with `HELLO`.
    Waiting {
        /// What it waits for, for people.
        message: String,
    },
    /// One frame of the agency's winners. When `more` is set the list
    /// continues in the next frame.
    Winners {
        /// Winner documents (DNI) in this frame.
        documents: Vec<String>,
        /// Another `Winners` frame follows.
        more: bool,
        /// On the last frame to a session opened by `HELLO`: the agency's
        /// receipt as sealed, and the round's seal.
        sealed: Option<Sealed>,
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

impl WireMessage for Request {
    fn parse(payload: &[u8]) -> Result<Self, MessageError> {
        let body = body_of(payload)?;
        if let Some((first, bets)) = read_written_batch(body) {
            return Ok(Request::Batch { first, bets });
        }
        let pairs = pairs_of(body, "payload")?;
        if let Some(size) = pairs.find(key::BATCH_SIZE) {
            let (first, bets) = parse_batch(size, &pairs)?;
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
                if a == action::CLOSE {
                    let reason = pairs
                        .find(key::REASON)
                        .ok_or(MessageError::MissingKey(key::REASON))?;
                    let reason = unescape(reason, "REASON")?.into_owned();
                    return Ok(Request::Close { reason });
                }
                let finished = [Finish::BettingFinished, Finish::FinishBetting]
                    .into_iter()
                    .find(|f| a == f.action());
                let secret = || {
                    pairs
                        .find(key::SECRET)
                        .map(|v| unescape(v, "SECRET").map(Cow::into_owned))
                        .transpose()
                };
                if a == action::HELLO {
                    if let Some(role) = pairs.find(key::ROLE) {
                        let role = unescape(role, "ROLE")?;
                        if role != action::OPERATOR {
                            return Err(bad_value(key::ROLE, format!("{role:?} is not OPERATOR")));
                        }
                        return Ok(Request::OperatorHello { secret: secret()? });
                    }
                }
                if finished.is_some() || a == action::HELLO {
                    let id = pairs
                        .find(key::AGENCY_ID)
                        .ok_or(MessageError::MissingKey(key::AGENCY_ID))?;
                    let id = unescape(id, "AGENCY_ID")?;
                    let agency = id.parse::<AgencyId>().map_err(|_| {
                        bad_value(key::AGENCY_ID, format!("{id:?} is not an agency id"))
                    })?;
                    Ok(if let Some(spelling) = finished {
                        Request::Finished { agency, spelling }
                    } else {
                        Request::Hello {
                            agency,
                            secret: secret()?,
                        }
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
            Request::Close { reason } => {
                dst.put_slice(key::ACTION.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(action::CLOSE.as_bytes());
                dst.put_u8(b'|');
                dst.put_slice(key::REASON.as_bytes());
                dst.put_u8(b':');
                escape_into(dst, reason);
                dst.put_u8(b'\n');
            }
            Request::OperatorHello { secret } => {
                dst.put_slice(key::ACTION.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(action::HELLO.as_bytes());
                dst.put_u8(b'|');
                dst.put_slice(key::ROLE.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(action::OPERATOR.as_bytes());
                if let Some(secret) = secret {
                    dst.put_u8(b'|');
                    dst.put_slice(key::SECRET.as_bytes());
                    dst.put_u8(b':');
                    escape_into(dst, secret);
                }
                dst.put_u8(b'\n');
            }
            Request::Finished { agency, .. } | Request::Hello { agency, .. } => {
                let name = match self {
                    Request::Finished { spelling, .. } => spelling.action(),
                    _ => action::HELLO,
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
                    let close = match pairs.find(key::CLOSED_BY) {
                        None => None,
                        Some(by) => Some(SalesClose {
                            by: ClosedBy::from_name(by).ok_or_else(|| {
                                bad_value(
                                    key::CLOSED_BY,
                                    format!("{by:?} is not operator or close_at"),
                                )
                            })?,
                            at: text(key::CLOSED_AT)?,
                            reason: text(key::CLOSE_REASON)?,
                        }),
                    };
                    return Ok(Reply::Status {
                        agencies,
                        drawn: pairs.find(key::DRAWN) == Some("1"),
                        states,
                        close,
                        more: pairs.find(key::MORE) == Some("1"),
                    });
                }
                let stored = pairs.find_number(key::STORED, "a count")?;
                let digest_of = |k: &'static str| {
                    pairs
                        .find(k)
                        .map(|v| v.parse::<Digest>().map_err(|e| bad_value(k, e.to_string())))
                        .transpose()
                };
                let digest = digest_of(key::DIGEST)?;
                if let Some(list) = pairs.find(key::WINNERS) {
                    let list = unescape(list, "WINNERS")?;
                    let documents = list
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(str::to_string)
                        .collect();
                    let more = pairs.find(key::MORE) == Some("1");
                    let sealed = match (stored, digest, digest_of(key::SEAL)?) {
                        (Some(count), Some(digest), Some(seal)) => Some(Sealed {
                            receipt: Receipt { count, digest },
                            seal,
                        }),
                        (None, None, None) => None,
                        _ => {
                            return Err(bad_value(
                                key::SEAL,
                                "STORED, DIGEST and SEAL come together",
                            ))
                        }
                    };
                    Ok(Reply::Winners {
                        documents,
                        more,
                        sealed,
                    })
                } else {
                    Ok(Reply::Success {
                        message: text(key::MESSAGE)?,
                        stored,
                        digest,
                    })
                }
            }
            status::WAITING => Ok(Reply::Waiting {
                message: text(key::MESSAGE)?,
            }),
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
        /// `|KEY:a,b,c` and, when the list goes on in the next frame,
        /// `|MORE:1`: the shape of every list a reply carries.
        fn put_list<T>(
            dst: &mut BytesMut,
            key: &str,
            items: &[T],
            more: bool,
            put: impl Fn(&T, &mut BytesMut),
        ) {
            dst.put_u8(b'|');
            dst.put_slice(key.as_bytes());
            dst.put_u8(b':');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    dst.put_u8(b',');
                }
                put(item, dst);
            }
            if more {
                dst.put_slice(b"|");
                dst.put_slice(key::MORE.as_bytes());
                dst.put_slice(b":1");
            }
        }
        let put_pair = |dst: &mut BytesMut, k: &str, v: &str, first: bool| {
            if !first {
                dst.put_u8(b'|');
            }
            dst.put_slice(k.as_bytes());
            dst.put_u8(b':');
            escape_into(dst, v);
        };
        match self {
            Reply::Success {
                message,
                stored,
                digest,
            } => {
                put_pair(dst, key::STATUS, status::SUCCESS, true);
                put_pair(dst, key::MESSAGE, message, false);
                if let Some(n) = stored {
                    put_pair(dst, key::STORED, itoa::Buffer::new().format(*n), false);
                }
                if let Some(d) = digest {
                    put_pair(dst, key::DIGEST, &d.to_string(), false);
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
                close,
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
                if let Some(close) = close {
                    put_pair(dst, key::CLOSED_BY, close.by.as_str(), false);
                    put_pair(dst, key::CLOSED_AT, &close.at, false);
                    put_pair(dst, key::CLOSE_REASON, &close.reason, false);
                }
                put_list(dst, key::AGENCY_STATE, states, *more, AgencyState::write);
            }
            Reply::Waiting { message } => {
                put_pair(dst, key::STATUS, status::WAITING, true);
                put_pair(dst, key::MESSAGE, message, false);
            }
            Reply::Winners {
                documents,
                more,
                sealed,
            } => {
                put_pair(dst, key::STATUS, status::SUCCESS, true);
                put_list(dst, key::WINNERS, documents, *more, |d, dst| {
                    escape_into(dst, d)
                });
                if let Some(Sealed { receipt, seal }) = sealed {
                    let count = itoa::Buffer::new().format(receipt.count).to_string();
                    put_pair(dst, key::STORED, &count, false);
                    put_pair(dst, key::DIGEST, &receipt.digest.to_string(), false);
                    put_pair(dst, key::SEAL, &seal.to_string(), false);
                }
            }
        }
        dst.put_u8(b'\n');
    }
}

/// Splits a winners list into `Winners` replies that each fit in one frame.
/// An empty list is one reply with an empty value. `sealed` (for a session
/// opened by `HELLO`) goes on the last one; without it the replies are
/// exactly the contract's.
pub fn winners_replies(documents: &[String], sealed: Option<Sealed>) -> Vec<Reply> {
    // "|STORED:" + a u64 + "|DIGEST:" + 64 + "|SEAL:" + 64, on every frame's
    // budget for simplicity (only the last carries it).
    const SEALED_LEN: usize = 8 + 20 + 8 + 64 + 6 + 64;
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
    let budget = MAX_PAYLOAD_LEN - overhead - SEALED_LEN;
    let mut replies = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for d in documents {
        let len = escaped_len(d) + usize::from(!current.is_empty());
        if !current.is_empty() && used + len > budget {
            replies.push(Reply::Winners {
                documents: std::mem::take(&mut current),
                more: true,
                sealed: None,
            });
            used = 0;
        }
        used += escaped_len(d) + usize::from(!current.is_empty());
        current.push(d.clone());
    }
    replies.push(Reply::Winners {
        documents: current,
        more: false,
        sealed,
    });
    replies
}

/// Splits a status into `Status` replies that each fit in one frame, the
/// close of sales (if any) on each.
pub fn status_replies(
    agencies: u32,
    drawn: bool,
    states: &[AgencyState],
    close: Option<&SalesClose>,
) -> Vec<Reply> {
    // Each entry takes at most 10 + 1 + 20 + 5 + 1 bytes; leave room for the
    // fixed keys and the close (its reason at most `MAX_REASON_LEN` bytes,
    // twice that escaped).
    const PER_FRAME: usize = (MAX_PAYLOAD_LEN - 128 - 100 - 2 * MAX_REASON_LEN) / 37;
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
            close: close.cloned(),
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

    #[test]
    fn both_finished_spellings() {
        for (a, spelling) in [
            ("BETTING_FINISHED", Finish::BettingFinished),
            ("FINISH_BETTING", Finish::FinishBetting),
        ] {
            let p = format!("ACTION:{a}|AGENCY_ID:3\n");
            let request = Request::Finished {
                agency: 3,
                spelling,
            };
            assert_eq!(Request::parse(p.as_bytes()).unwrap(), request);
            assert_eq!(to_payload(&request), p.as_bytes(), "written as read");
        }
    }

    #[test]
    fn operator_hello_round_trips_and_needs_no_agency() {
        for secret in [None, Some("op|er:a\\tor".to_string())] {
            let r = Request::OperatorHello { secret };
            assert_eq!(Request::parse(&to_payload(&r)).unwrap(), r);
        }
        assert_eq!(
            to_payload(&Request::OperatorHello {
                secret: Some("s3".into())
            }),
            b"ACTION:HELLO|ROLE:OPERATOR|SECRET:s3\n"
        );
        assert!(matches!(
            Request::parse(b"ACTION:HELLO|ROLE:ADMIN|SECRET:x\n"),
            Err(MessageError::BadValue { .. })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let p = b"ACTION:FINISH_BETTING|VERSION:9|AGENCY_ID:2\n";
        assert_eq!(
            Request::parse(p).unwrap(),
            Request::Finished {
                agency: 2,
                spelling: Finish::FinishBetting
            }
        );
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
    fn replies_round_trip() {
        let replies = [
            Reply::Success {
                message: "stored 70 bets".into(),
                stored: Some(140),
                digest: None,
            },
            Reply::Success {
                message: String::new(),
                stored: None,
                digest: None,
            },
            Reply::Success {
                message: "agency 1: resume from bet 0".into(),
                stored: Some(0),
                digest: Some(Receipt::empty(1).digest),
            },
            Reply::Error {
                code: ErrorCode::InvalidBet,
                message: "BET_2: bad | thing".into(),
            },
            Reply::Waiting {
                message: "waiting for the draw: 3 of 5 agencies finished".into(),
            },
            Reply::Winners {
                documents: vec!["1".into(), "22".into()],
                more: true,
                sealed: None,
            },
            Reply::Winners {
                documents: vec![],
                more: false,
                sealed: None,
            },
            Reply::Winners {
                documents: vec!["1".into()],
                more: false,
                sealed: Some(Sealed {
                    receipt: Receipt::empty(2),
                    seal: Receipt::empty(3).digest,
                }),
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
                close: Some(SalesClose {
                    by: ClosedBy::Operator,
                    at: "2026-12-07T18:00:00.000Z".into(),
                    reason: "agency 4's machine is gone | for good".into(),
                }),
                more: false,
            },
        ];
        for r in replies {
            assert_eq!(Reply::parse(&to_payload(&r)).unwrap(), r);
        }
        assert_eq!(
            to_payload(&Reply::Winners {
                documents: vec!["30904465".into(), "1".into()],
                more: false,
                sealed: None,
            }),
            b"STATUS:SUCCESS|WINNERS:30904465,1\n"
        );
    }

    #[test]
    fn long_winner_lists_are_split_to_fit() {
        let docs: Vec<String> = (0..5000)
            .map(|i| format!("{:08}", 10_000_000 + i))
            .collect();
        let sealed = Sealed {
            receipt: Receipt::empty(1),
            seal: Receipt::empty(2).digest,
        };
        let replies = winners_replies(&docs, Some(sealed));
        assert!(replies.len() > 1);
        let mut back = Vec::new();
        for (i, r) in replies.iter().enumerate() {
            assert!(to_payload(r).len() <= MAX_PAYLOAD_LEN);
            let Reply::Winners {
                documents,
                more,
                sealed: on,
            } = r
            else {
                panic!()
            };
            assert_eq!(*more, i + 1 < replies.len());
            assert_eq!(*on, (!*more).then_some(sealed), "only on the last frame");
            back.extend(documents.iter().cloned());
        }
        assert_eq!(back, docs);
    }
    #[test]
    fn only_a_payload_with_batch_size_is_a_rejected_batch() {
        let err = |p: &[u8]| Request::parse(p).unwrap_err();
        for batch in [
            &b"BATCH_SIZE:2|BET_1:x\n"[..],
            b"BATCH_SIZE:x|BET_1:x\n",
            b"BATCH_SIZE:0\n",
            b"BATCH_SIZE:1\\q|BET_1:x\n",
            b"BATCH_SIZE:1|FIRST:x|BET_1:x\n",
            b"BATCH_SIZE:1|BET_1:NOMBRE:Ana\n",
        ] {
            assert!(err(batch).is_batch(), "{}", String::from_utf8_lossy(batch));
        }
        for request in [
            &b"ACTION:NOPE\n"[..],
            b"HELLO:WORLD\n",
            b"ACTION:BETTING_FINISHED\n",
            b"ACTION:BETTING_FINISHED|AGENCY_ID:x\n",
            b"ACTION:PI\\qNG\n",
            b"no colon\n",
            b"",
        ] {
            assert!(
                !err(request).is_batch(),
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }
}
