//! Property tests of the codec and payload layer: any bets, any split of the
//! byte stream, any pile-up of frames in one read, the same messages out.

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use lottery::model::Bet;
use lottery::wire::{
    escape_into, split_pairs, to_payload, unescape, AgencyCodec, ErrorCode, Finish, Reply, Request,
    ServerCodec, WireMessage, MAX_PAYLOAD_LEN,
};

/// Names drawn from plain letters, Spanish accents, and every character the
/// protocol or CSV treats specially.
fn name() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            2 => prop::sample::select(vec!['á', 'é', 'í', 'ó', 'ú', 'ñ', 'Ñ', 'ü', ' ']),
            1 => prop::sample::select(vec!['|', ':', '\\', ',', '"', '\n', '\'']),
            1 => any::<char>().prop_filter("printable", |c| !c.is_control()),
        ],
        1..20,
    )
    .prop_map(|chars| chars.into_iter().collect::<String>())
    .prop_filter("not blank", |s| !s.trim().is_empty())
}

fn bet() -> impl Strategy<Value = Bet> {
    (
        1u32..=50,
        name(),
        name(),
        "[0-9]{1,10}",
        (1900i32..2020, 1u32..=12, 1u32..=28),
        0u16..=9999,
    )
        .prop_map(|(agency, first, last, doc, (y, m, d), n)| {
            Bet::from_fields(
                &agency.to_string(),
                &first,
                &last,
                &doc,
                &format!("{y:04}-{m:02}-{d:02}"),
                &n.to_string(),
            )
            .expect("generated bets are valid")
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        3 => proptest::collection::vec(bet(), 1..30).prop_filter_map("fits one frame", |bets| {
            let r = Request::Batch { first: None, bets: bets.into() };
            (to_payload(&r).len() <= MAX_PAYLOAD_LEN).then_some(r)
        }),
        1 => (1u32..=1000, any::<bool>()).prop_map(|(agency, reference)| Request::Finished {
            agency,
            spelling: if reference { Finish::FinishBetting } else { Finish::BettingFinished },
        }),
        1 => (1u32..=1000).prop_map(|agency| Request::Hello { agency, secret: None }),
    ]
}

fn encode_all(requests: &[Request]) -> Vec<u8> {
    let mut codec = AgencyCodec::new();
    let mut wire = BytesMut::new();
    for r in requests {
        codec.encode(r, &mut wire).unwrap();
    }
    wire.to_vec()
}

/// Decodes `wire` fed in the given chunk sizes, as reads would deliver it.
fn decode_chunked(wire: &[u8], cuts: &[usize]) -> Vec<Request> {
    let mut codec = ServerCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = wire;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap()).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            out.push(item.unwrap());
        }
    }
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Hostile bytes: whatever arrives, cut however, the decoder never
    /// panics, never holds more than one frame's worth of an unfinished
    /// frame, and stops for good at the first framing error.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overbuffer(
        bytes in proptest::collection::vec(any::<u8>(), 0..40_000),
        cuts in proptest::collection::vec(1usize..9_000, 1..8),
        small_headers in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if small_headers {
            // Make plausible headers common, so frames actually complete.
            for chunk in bytes.chunks_mut(97) {
                if chunk.len() >= 4 {
                    chunk[0] = 0;
                    chunk[1] = 0;
                    chunk[2] &= 0x1f;
                }
            }
        }
        let mut codec = ServerCodec::new();
        let mut buf = BytesMut::new();
        let mut rest = &bytes[..];
        let mut cuts = cuts.iter().cycle();
        'feed: while !rest.is_empty() {
            let n = (*cuts.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_message_or_error)) => {}
                    Ok(None) => {
                        // Whatever is buffered is one unfinished frame, whose
                        // payload the header already vouched for.
                        prop_assert!(buf.len() <= MAX_PAYLOAD_LEN + 4, "buffered {}", buf.len());
                        prop_assert!(buf.capacity() <= 4 * 8192 + 9_000, "capacity {}", buf.capacity());
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
        let _ = codec.decode_eof(&mut buf);
    }

    #[test]
    fn any_split_gives_the_same_messages(
        requests in proptest::collection::vec(request(), 1..6),
        cuts in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let wire = encode_all(&requests);
        prop_assert_eq!(decode_chunked(&wire, &cuts), requests.clone());
        // All frames in a single read.
        prop_assert_eq!(decode_chunked(&wire, &[wire.len()]), requests);
    }

    #[test]
    fn escaping_round_trips(value in ".*") {
        let mut dst = BytesMut::new();
        escape_into(&mut dst, &value);
        let escaped = std::str::from_utf8(&dst).unwrap();
        prop_assert!(!escaped.contains('\n') || value.contains('\n'));
        prop_assert_eq!(unescape(escaped, "value").unwrap(), value.as_str());
        // An escaped value never splits a pair.
        let payload = format!("K:{escaped}|L:x");
        let pairs = split_pairs(&payload, "payload").unwrap();
        prop_assert_eq!(pairs.len(), 2);
        prop_assert_eq!(unescape(pairs[0].1, "value").unwrap(), value.as_str());
    }

    #[test]
    fn replies_round_trip(code in 0usize..8, message in ".*", docs in proptest::collection::vec("[0-9]{1,10}", 0..50)) {
        let codes = ["MALFORMED_MESSAGE", "FRAME_TOO_LARGE", "UNKNOWN_MESSAGE", "INVALID_BET",
                     "WRONG_AGENCY", "AGENCY_BUSY", "AGENCY_FINISHED", "STORAGE_FAILED"];
        let code = ErrorCode::from_wire(codes[code]).unwrap();
        for reply in [Reply::Error { code, message: message.clone() }, Reply::Winners { documents: docs.clone(), more: false, sealed: None }] {
            prop_assert_eq!(Reply::parse(&to_payload(&reply)).unwrap(), reply);
        }
    }
}

/// Every frame of a realistic stream, cut at every byte boundary.
#[test]
fn every_frame_split_at_every_byte_boundary() {
    let bets: Vec<Bet> = (0..40)
        .map(|i| {
            Bet::from_fields(
                "2",
                [
                    "Ana|María",
                    "Juan:Carlos",
                    "Luis\\Ángel",
                    "Pérez, Ana",
                    "O\"Neil",
                    "Ñandú",
                ][i % 6],
                "Núñez",
                &(10_000_000 + i).to_string(),
                "1999-03-17",
                &(i * 250).to_string(),
            )
            .unwrap()
        })
        .collect();
    let requests = vec![
        Request::Batch {
            first: Some(0),
            bets: bets[..20].into(),
        },
        Request::Batch {
            first: Some(20),
            bets: bets[20..].into(),
        },
        Request::Finished {
            agency: 2,
            spelling: Finish::BettingFinished,
        },
    ];
    let wire = encode_all(&requests);
    for cut in 1..wire.len() {
        let mut codec = ServerCodec::new();
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = Vec::new();
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            got.push(item.unwrap());
        }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            got.push(item.unwrap());
        }
        assert_eq!(got, requests, "cut at byte {cut}");
    }
}
