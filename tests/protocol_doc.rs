//! docs/PROTOCOL.md stays true: every byte-level example's header matches
//! its payload, and every complete example parses as the message it shows.

use lottery::wire::{Reply, Request, WireMessage};

/// (header bytes, payload) for each example in the document.
fn examples() -> Vec<(u32, String)> {
    let doc = include_str!("../docs/PROTOCOL.md");
    let is_header = |s: &str| {
        let parts: Vec<&str> = s.split(' ').collect();
        parts.len() == 4
            && parts
                .iter()
                .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
    };
    let header = |s: &str| u32::from_str_radix(&s.replace(' ', ""), 16).unwrap();
    let payload = |s: &str| s.trim_end().replace("\\n", "\n");
    let mut out = Vec::new();
    let lines: Vec<&str> = doc.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if is_header(line.trim()) {
            out.push((header(line.trim()), payload(lines[i + 1])));
        } else if let Some(rest) = line
            .strip_prefix("agency  -> ")
            .or(line.strip_prefix("central <- "))
        {
            let (h, p) = rest.split_at(11);
            out.push((header(h), payload(p.trim_start())));
        }
    }
    out
}

#[test]
fn headers_match_payloads() {
    let examples = examples();
    assert!(
        examples.len() >= 15,
        "found only {} examples",
        examples.len()
    );
    for (header, payload) in examples {
        if payload.contains('…') {
            continue; // abridged: the length is illustrative
        }
        assert_eq!(header as usize, payload.len(), "header of {payload:?}");
        let parsed = if payload.starts_with("STATUS:") {
            Reply::parse(payload.as_bytes()).map(|_| ())
        } else {
            Request::parse(payload.as_bytes()).map(|_| ())
        };
        parsed.unwrap_or_else(|e| panic!("{payload:?} does not parse: {e}"));
    }
}

/// The worked example of receipts and the seal is what the code computes.
#[test]
fn the_receipt_example_is_what_the_code_computes() {
    use lottery::receipt::{canonical, seal, Receipt};
    let doc = include_str!("../docs/PROTOCOL.md");
    let doc = &doc[doc.find("Worked example").expect("the worked example")..];
    let value = |name: &str| {
        doc.lines()
            .find_map(|l| l.strip_prefix(name)?.trim_start().strip_prefix("= "))
            .unwrap_or_else(|| panic!("no {name:?} line in the worked example"))
            .trim()
            .to_string()
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let bet =
        lottery::model::Bet::from_fields("1", "Ana", "Pérez", "30904465", "1999-03-17", "7574")
            .unwrap();
    let mut bytes = Vec::new();
    let texts = [
        &bet.first_name,
        &bet.last_name,
        &bet.document,
        &bet.birthdate,
    ]
    .map(|t| t.as_bytes());
    canonical(texts, bet.number, |b| bytes.extend_from_slice(b));
    let empty = Receipt::empty(1);
    let one = empty.after([bet.as_ref()]);
    assert_eq!(value("d_0 input "), hex(b"lottery receipt v1\0\0\0\x01"));
    assert_eq!(value("d_0 "), empty.digest.to_string());
    assert_eq!(value("canonical "), hex(&bytes));
    assert_eq!(value("d_1 "), one.digest.to_string());
    let mut seal_input = b"lottery seal v1".to_vec();
    seal_input.extend_from_slice(&7574u16.to_be_bytes());
    seal_input.extend_from_slice(&1u32.to_be_bytes());
    seal_input.extend_from_slice(&1u32.to_be_bytes());
    seal_input.extend_from_slice(&1u64.to_be_bytes());
    seal_input.extend_from_slice(&one.digest.0);
    assert_eq!(value("seal input "), hex(&seal_input));
    assert_eq!(
        value("seal "),
        seal(7574, 1, &[(1, one)].into()).to_string()
    );
}
