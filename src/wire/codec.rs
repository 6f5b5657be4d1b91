//! Framing: a 4-byte big-endian payload length, then the payload; a whole
//! frame is at most [`MAX_FRAME_LEN`] bytes, unless the reader was given a
//! larger limit (the central's `server.max_frame`, for legacy agencies).
//!
//! [`LotteryCodec`] is the `Decoder`/`Encoder` pair both ends use with
//! `tokio_util::codec::Framed`. It decodes the frames of one direction into
//! typed messages and encodes the other direction's messages into frames.

use std::io;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{
    key, split_pairs, unescape, MessageError, Reply, Request, WireMessage, HEADER_LEN,
    MAX_FRAME_LEN, MAX_PAYLOAD_LEN, MAX_SKIPPED_FRAME,
};
use crate::model::AgencyId;

/// A frame-level failure. After one, the byte stream can no longer be trusted
/// and the connection ends.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announces a frame larger than the limit, and larger than
    /// [`MAX_SKIPPED_FRAME`] too (a smaller one is read past, and comes out
    /// as [`MessageError::FrameTooLarge`]). Raised from the header alone,
    /// before any of the payload is buffered.
    #[error("frame of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The whole frame the header announces, header included.
        size: usize,
        /// The reader's limit, header included.
        limit: usize,
    },
    /// A TLS record arrived where a frame header should be: the peer speaks
    /// TLS and this end does not (see [`is_tls_record`]).
    #[error("the peer speaks TLS (a TLS record arrived where a frame header should be)")]
    TlsRecord,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// A message to send does not fit in one frame.
    #[error("message of {0} bytes does not fit in one frame")]
    MessageTooLarge(usize),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The central's codec: reads [`Request`]s, writes [`Reply`]s.
pub type ServerCodec = LotteryCodec<Request, Reply>;
/// The agency's codec: reads [`Reply`]s, writes [`Request`]s.
pub type AgencyCodec = LotteryCodec<Reply, Request>;

/// Length-prefixed frames carrying `KEY:VALUE|…\n` payloads.
///
/// Decoding yields `Result<In, MessageError>`: a well-framed payload that is
/// not a valid message is an *item*, so the connection can answer it with an
/// error reply and carry on; only [`FrameError`]s end the stream.
pub struct LotteryCodec<In, Out> {
    /// Payload length of the frame being read, once its header is consumed.
    pending: Option<usize>,
    /// When the first byte of the frame being read arrived: the start of its
    /// deadline (a slow sender must not hold a connection forever).
    started: Option<std::time::Instant>,
    /// Largest whole frame this reader accepts, header included.
    max_frame: usize,
    /// An oversize frame being read past, once its header is consumed.
    skipping: Option<Skip>,
    /// The size of the batch the last item refused (see
    /// [`LotteryCodec::refused_batch`]).
    refused_batch: Option<usize>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> LotteryCodec<In, Out> {
    /// When the frame now being read began to arrive; `None` between frames.
    pub fn partial_since(&self) -> Option<std::time::Instant> {
        self.started
    }

    /// When the last item decoded is a batch that is not valid, how many
    /// bets it has: its `BATCH_SIZE` when that is a number, else the
    /// `BET_i` pairs it holds. For the refusal's `cantidad`.
    pub fn refused_batch(&self) -> Option<usize> {
        self.refused_batch
    }

    /// A codec waiting for the first header, reading frames of at most
    /// [`MAX_FRAME_LEN`] bytes.
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME_LEN)
    }

    /// A codec that reads frames of up to `max_frame` bytes, header
    /// included. Only the reading side is widened: what this end writes
    /// still fits [`MAX_FRAME_LEN`], which every peer accepts.
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self {
            pending: None,
            started: None,
            max_frame: max_frame.max(HEADER_LEN),
            skipping: None,
            refused_batch: None,
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for LotteryCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> std::fmt::Debug for LotteryCodec<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LotteryCodec")
            .field("pending", &self.pending)
            .finish()
    }
}

/// Whether `header` (a frame header's 4 bytes) is the start of a TLS record:
/// a content type from change_cipher_spec (0x14) to application data (0x17),
/// then version 3.x. Read as a length that is over 335 MB, so no frame
/// header is ever mistaken for one; recognising it lets either end say
/// "the peer speaks TLS" instead of "frame of 352518916 bytes".
pub fn is_tls_record(header: &[u8]) -> bool {
    matches!(header, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

/// Bytes of a skipped frame kept to tell what it was: a batch's
/// `BATCH_SIZE` and its first bet (which names the agency) come first.
const SKIP_HEAD: usize = 2048;

/// An oversize frame being read past.
#[derive(Debug)]
struct Skip {
    /// The whole frame, header included, as its header announced it.
    size: usize,
    /// Payload bytes still to drop.
    left: usize,
    /// The first [`SKIP_HEAD`] bytes of its payload.
    head: Vec<u8>,
}

impl Skip {
    /// Drops what `src` holds of the frame; the refusal once all of it is
    /// gone.
    fn take(&mut self, src: &mut BytesMut, limit: usize) -> Option<MessageError> {
        let n = self.left.min(src.len());
        let keep = n.min(SKIP_HEAD.saturating_sub(self.head.len()));
        self.head.extend_from_slice(&src[..keep]);
        src.advance(n);
        self.left -= n;
        if self.left > 0 {
            return None;
        }
        let (batch, agency) = peek_batch(&self.head);
        Some(MessageError::FrameTooLarge {
            size: self.size,
            limit,
            batch,
            agency,
        })
    }
}

/// What the first bytes of a payload say of the batch it is: its
/// `BATCH_SIZE`, and its first bet's `AGENCY_ID` when that bet is whole
/// within them. Best effort, for the refusal's log line and nothing else.
fn peek_batch(head: &[u8]) -> (Option<usize>, Option<AgencyId>) {
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).expect("valid up to here"),
    };
    // The batch's first two pairs; the second only when it is whole (an
    // unescaped `|` follows it).
    let pairs = pairs(text);
    if pairs.len() < 2 {
        return (None, None);
    }
    let Some(size) = pairs[0]
        .strip_prefix(key::BATCH_SIZE)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|n| n.parse().ok())
    else {
        return (None, None);
    };
    let agency = (pairs.len() > 2).then_some(pairs[1]).and_then(|first| {
        let bet = first.strip_prefix(&format!("{}1:", key::BET_PREFIX))?;
        let bet = unescape(bet, "BET_1").ok()?;
        let fields = split_pairs(&bet, "BET_1").ok()?;
        let (_, id) = fields.iter().find(|(k, _)| k.as_ref() == key::AGENCY_ID)?;
        id.parse().ok()
    });
    (Some(size), agency)
}

/// The pairs of a payload (or of the start of one), split at unescaped
/// `|`, still escaped.
fn pairs(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, text.bytes().enumerate());
    while let Some((i, b)) = bytes.next() {
        match b {
            b'\\' => {
                bytes.next();
            }
            b'|' => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// How many bets a batch that is not valid has: its `BATCH_SIZE` when that
/// is a number, else the `BET_i` pairs it holds. Best effort, for the
/// refusal's log line.
fn batch_size(payload: &[u8]) -> usize {
    let text = String::from_utf8_lossy(payload);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let pairs = pairs(text);
    let said = pairs.iter().find_map(|p| {
        p.strip_prefix(key::BATCH_SIZE)?
            .strip_prefix(':')?
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
    });
    said.unwrap_or_else(|| {
        pairs
            .iter()
            .filter(|p| p.starts_with(key::BET_PREFIX))
            .count()
    })
}

/// Reads one raw payload from `src`, shared by every codec instance.
///
/// Returns `Ok(None)` until a whole frame is buffered. Rejects an oversize
/// header as soon as its 4 bytes arrive, so a hostile length never makes us
/// reserve or wait for the bytes it claims.
fn decode_payload(
    pending: &mut Option<usize>,
    max_frame: usize,
    src: &mut BytesMut,
) -> Result<Option<BytesMut>, FrameError> {
    let len = match *pending {
        Some(len) => len,
        None => {
            if src.len() < HEADER_LEN {
                return Ok(None);
            }
            if is_tls_record(&src[..HEADER_LEN]) {
                return Err(FrameError::TlsRecord);
            }
            let len = u32::from_be_bytes(src[..HEADER_LEN].try_into().expect("4 bytes")) as usize;
            if len > max_frame - HEADER_LEN {
                return Err(FrameError::TooLarge {
                    size: len.saturating_add(HEADER_LEN),
                    limit: max_frame,
                });
            }
            src.advance(HEADER_LEN);
            *pending = Some(len);
            len
        }
    };
    if src.len() < len {
        // Room for the rest of this frame and the next header.
        src.reserve(len - src.len() + HEADER_LEN);
        return Ok(None);
    }
    *pending = None;
    let payload = src.split_to(len);
    src.reserve(HEADER_LEN);
    Ok(Some(payload))
}

impl<In: WireMessage, Out> Decoder for LotteryCodec<In, Out> {
    type Item = Result<In, MessageError>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        if self.skipping.is_none() {
            match decode_payload(&mut self.pending, self.max_frame, src) {
                // Within reach: read past it (bounded by the size and, at
                // the caller, by the frame's deadline), then answer it.
                Err(FrameError::TooLarge { size, .. }) if size <= MAX_SKIPPED_FRAME => {
                    src.advance(HEADER_LEN);
                    self.skipping = Some(Skip {
                        size,
                        left: size - HEADER_LEN,
                        head: Vec::new(),
                    });
                }
                Err(e) => return Err(e),
                Ok(Some(payload)) => {
                    self.started = None;
                    let item = In::parse(&payload);
                    self.refused_batch = match &item {
                        Err(e) if e.is_batch() => Some(batch_size(&payload)),
                        _ => None,
                    };
                    return Ok(Some(item));
                }
                Ok(None) => {}
            }
        }
        if let Some(skip) = self.skipping.as_mut() {
            if let Some(refusal) = skip.take(src, self.max_frame) {
                self.skipping = None;
                self.refused_batch = None;
                self.started = None;
                return Ok(Some(Err(refusal)));
            }
            // Nothing of it is kept: make no room for it either.
            if self.started.is_none() {
                self.started = Some(std::time::Instant::now());
            }
            return Ok(None);
        }
        if self.started.is_none() && (!src.is_empty() || self.pending.is_some()) {
            self.started = Some(std::time::Instant::now());
        }
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.pending.is_none() && self.skipping.is_none() => Ok(None),
            None => Err(FrameError::Truncated(match &self.skipping {
                // Header and payload received so far.
                Some(skip) => skip.size - skip.left,
                None if self.pending.is_some() => src.len() + HEADER_LEN,
                None => src.len(),
            })),
        }
    }
}

impl<In, Out: WireMessage> Encoder<&Out> for LotteryCodec<In, Out> {
    type Error = FrameError;

    /// Writes header and payload into `dst` together, so `Framed` sends the
    /// frame in one write (no header-then-payload stall under Nagle).
    fn encode(&mut self, msg: &Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.reserve(256);
        dst.put_u32(0); // patched below, once the payload length is known
        msg.write(dst);
        let len = dst.len() - start - HEADER_LEN;
        if len > MAX_PAYLOAD_LEN {
            dst.truncate(start);
            return Err(FrameError::MessageTooLarge(len + HEADER_LEN));
        }
        dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// A request frame encoded whole beforehand (header and payload), as
/// [`BatchBuilder`](super::BatchBuilder) makes them: sent as is.
#[derive(Debug, Clone)]
pub struct RawFrame(pub bytes::Bytes);

impl<In> Encoder<RawFrame> for LotteryCodec<In, Request> {
    type Error = FrameError;

    fn encode(&mut self, frame: RawFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if frame.0.len() > MAX_FRAME_LEN {
            return Err(FrameError::MessageTooLarge(frame.0.len()));
        }
        dst.extend_from_slice(&frame.0);
        Ok(())
    }
}

/// Frames `msg` into a fresh buffer: header and payload, ready to write.
///
/// # Errors
/// [`FrameError::MessageTooLarge`] when it does not fit in one frame.
pub fn frame<M: WireMessage>(msg: &M) -> Result<BytesMut, FrameError> {
    let mut dst = BytesMut::new();
    LotteryCodec::<(), M>::new().encode(msg, &mut dst)?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::to_payload;

    fn finished(agency: u32) -> Request {
        Request::Finished {
            agency,
            spelling: Default::default(),
        }
    }

    #[test]
    fn header_is_big_endian_payload_length() {
        let bytes = frame(&finished(3)).unwrap();
        let payload = b"ACTION:BETTING_FINISHED|AGENCY_ID:3\n";
        assert_eq!(&bytes[..4], &(payload.len() as u32).to_be_bytes());
        assert_eq!(&bytes[4..], payload);
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let bytes = frame(&finished(7)).unwrap();
        let mut codec = ServerCodec::new();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let got = codec.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert!(got.is_none(), "frame complete too early at byte {i}");
            } else {
                assert_eq!(got.unwrap().unwrap(), finished(7));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_header_past_the_skip_limit_fails_before_payload() {
        for len in [MAX_SKIPPED_FRAME - HEADER_LEN + 1, u32::MAX as usize] {
            let mut buf = BytesMut::from(&(len as u32).to_be_bytes()[..]);
            assert!(matches!(
                ServerCodec::new().decode(&mut buf),
                Err(FrameError::TooLarge { size, limit: 8192 }) if size == len + HEADER_LEN
            ));
        }
        // Exactly the limit is fine.
        let mut buf = BytesMut::from(&(MAX_PAYLOAD_LEN as u32).to_be_bytes()[..]);
        assert!(ServerCodec::new().decode(&mut buf).unwrap().is_none());
    }

    /// A batch of `n` bets of agency 4, each about 120 bytes on the wire.
    fn batch_payload(n: usize) -> String {
        let mut payload = format!("BATCH_SIZE:{n}");
        for i in 1..=n {
            payload.push_str(&format!(
                r"|BET_{i}:NOMBRE:Jos\\\|é\|APELLIDO:Pérez Gómez de la Serna\|DOCUMENTO:{}\|NACIMIENTO:1999-03-17\|NUMERO:7574\|AGENCY_ID:4",
                30_000_000 + i
            ));
        }
        payload.push('\n');
        payload
    }

    #[test]
    fn an_oversize_frame_is_read_past_byte_by_byte_and_refused_as_an_item() {
        let payload = batch_payload(150);
        let mut bytes = BytesMut::new();
        bytes.put_u32(payload.len() as u32);
        bytes.put_slice(payload.as_bytes());
        let size = bytes.len();
        assert!(size > MAX_FRAME_LEN);
        bytes.put_slice(&frame(&finished(4)).unwrap());
        let mut codec = ServerCodec::new();
        let mut buf = BytesMut::new();
        let mut items = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            if let Some(item) = codec.decode(&mut buf).unwrap() {
                items.push((i + 1, item));
            }
            // Nothing of the skipped frame is kept beyond its head.
            assert!(buf.len() <= HEADER_LEN + MAX_FRAME_LEN, "at byte {i}");
            if i + 1 > HEADER_LEN && i + 1 < size {
                assert!(codec.partial_since().is_some(), "the frame deadline runs");
            }
        }
        assert_eq!(
            items,
            vec![
                (
                    size,
                    Err(MessageError::FrameTooLarge {
                        size,
                        limit: MAX_FRAME_LEN,
                        batch: Some(150),
                        agency: Some(4)
                    })
                ),
                (bytes.len(), Ok(finished(4))),
            ]
        );
        assert!(codec.partial_since().is_none());
        assert_eq!(
            MessageError::FrameTooLarge {
                size,
                limit: MAX_FRAME_LEN,
                batch: None,
                agency: None
            }
            .code(),
            crate::wire::ErrorCode::FrameTooLarge
        );
    }

    #[test]
    fn a_skipped_frame_names_what_its_head_shows_and_no_more() {
        assert_eq!(peek_batch(batch_payload(3).as_bytes()), (Some(3), Some(4)));
        // The first bet cut short: the size, no agency.
        let payload = batch_payload(3);
        let cut = payload.find("AGENCY_ID").unwrap();
        assert_eq!(peek_batch(&payload.as_bytes()[..cut]), (Some(3), None));
        // Cut inside a multi-byte character, or not a batch at all.
        let cut = payload.find('é').unwrap() + 1;
        assert_eq!(peek_batch(&payload.as_bytes()[..cut]), (Some(3), None));
        assert_eq!(peek_batch(b"ACTION:PING|x:y\n"), (None, None));
        assert_eq!(peek_batch(b"BATCH_SIZE:x|BET_1:y"), (None, None));
        assert_eq!(peek_batch(&[0xff; 40]), (None, None));
    }

    #[test]
    fn a_refused_batch_has_the_size_it_says_or_the_bets_it_holds() {
        let mut codec = ServerCodec::new();
        for (payload, size) in [
            (&b"BATCH_SIZE:2|BET_1:x\n"[..], Some(2)),
            (b"BATCH_SIZE:x|BET_1:a|BET_2:b\\|c|BET_3:d\n", Some(3)),
            (b"BATCH_SIZE:0|BET_1:a\n", Some(1)),
            (b"ACTION:NOPE\n", None),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(payload.len() as u32);
            buf.put_slice(payload);
            assert!(codec.decode(&mut buf).unwrap().unwrap().is_err());
            assert_eq!(codec.refused_batch(), size, "{payload:?}");
        }
        let mut buf = frame(&finished(1)).unwrap();
        assert!(codec.decode(&mut buf).unwrap().unwrap().is_ok());
        assert_eq!(codec.refused_batch(), None);
    }

    #[test]
    fn eof_while_skipping_is_a_truncated_frame() {
        let mut buf = BytesMut::new();
        buf.put_u32(9000);
        buf.put_slice(&[b'x'; 100]);
        let mut codec = ServerCodec::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty(), "skipped bytes are dropped");
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated(104))
        ));
    }

    #[test]
    fn a_wider_limit_reads_larger_frames_and_refuses_past_it() {
        let payload = format!("ACTION:PING{}\n", " ".repeat(8300));
        let mut bytes = BytesMut::new();
        bytes.put_u32(payload.len() as u32);
        bytes.put_slice(payload.as_bytes());
        let whole = bytes.len();
        let mut codec = ServerCodec::with_max_frame(whole);
        let mut buf = bytes.clone();
        assert!(codec.decode(&mut buf).unwrap().is_some());
        let mut buf = bytes.clone();
        assert!(matches!(
            ServerCodec::with_max_frame(whole - 1).decode(&mut buf),
            Ok(Some(Err(MessageError::FrameTooLarge { size, limit, batch: None, agency: None })))
                if size == whole && limit == whole - 1
        ));
    }

    #[test]
    fn a_tls_record_is_named_as_such_not_as_an_oversize_frame() {
        // A TLS alert (what a TLS central answers a plain-text hello with)
        // and a ClientHello (what a TLS agency opens with).
        for record in [
            &[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x32][..],
            &[0x16, 0x03, 0x01, 0x00, 0xf4, 0x01][..],
        ] {
            let mut buf = BytesMut::from(record);
            assert!(matches!(
                AgencyCodec::new().decode(&mut buf),
                Err(FrameError::TlsRecord)
            ));
            let mut buf = BytesMut::from(record);
            assert!(matches!(
                ServerCodec::new().decode(&mut buf),
                Err(FrameError::TlsRecord)
            ));
        }
        // No frame header within the limit looks like one.
        for len in [0u32, 0x19, MAX_PAYLOAD_LEN as u32] {
            assert!(!is_tls_record(&len.to_be_bytes()));
        }
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let bytes = frame(&finished(1)).unwrap();
        for cut in 1..bytes.len() {
            let mut codec = ServerCodec::new();
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            assert!(
                matches!(codec.decode_eof(&mut buf), Err(FrameError::Truncated(n)) if n == cut),
                "cut at {cut}"
            );
        }
        let mut empty = BytesMut::new();
        assert!(ServerCodec::new().decode_eof(&mut empty).unwrap().is_none());
    }

    #[test]
    fn bad_payload_is_an_item_not_a_stream_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(b"x:y");
        buf.put_slice(&frame(&finished(2)).unwrap());
        let mut codec = ServerCodec::new();
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap(),
            Err(MessageError::MissingNewline)
        );
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), Ok(finished(2)));
    }

    #[test]
    fn encoder_refuses_oversize_messages() {
        let docs = vec!["1".repeat(9000)];
        let msg = Reply::Winners {
            documents: docs,
            more: false,
            sealed: None,
        };
        let mut dst = BytesMut::from(&b"keep"[..]);
        let err = ServerCodec::new().encode(&msg, &mut dst).unwrap_err();
        assert!(matches!(err, FrameError::MessageTooLarge(_)));
        assert_eq!(
            &dst[..],
            b"keep",
            "a failed encode leaves the buffer as it was"
        );
        assert!(to_payload(&msg).len() > MAX_PAYLOAD_LEN);
    }
}
