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
