//! Finding every occurrence of a few bytes in a buffer, eight bytes at a
//! time.
//!
//! Both hot parsers walk text whose structure is a few special bytes far
//! apart: a batch payload (`\`, `|`, `:`) and the bets file (`,`, `"`, the
//! line end). Looking at every byte in a branchy loop, or calling `memchr`
//! for each field (they are a few bytes long, too short for it to pay off),
//! costs far more than one pass that collects all their positions and a
//! walk over those alone.

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of each byte of `x` that is zero, and nothing else (exact:
/// no carry crosses from one byte into the next).
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// Whether any byte of `bytes` is one of `wanted`.
pub(crate) fn any_of(bytes: &[u8], wanted: [u8; 3]) -> bool {
    let [a, b, c] = wanted.map(|w| ONES * u64::from(w));
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        if zero_bytes(w ^ a) | zero_bytes(w ^ b) | zero_bytes(w ^ c) != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|byte| wanted.contains(byte))
}

/// Writes to the start of `out` the position (plus `base`) of every byte of
/// `bytes` that is one of `wanted`, in order, and returns how many there
/// are. `out` must be at least as long as `bytes` (there is at most one
/// position per byte): positions are written by index, with no capacity
/// check per position, which matters at this rate.
pub(crate) fn positions_of(bytes: &[u8], wanted: [u8; 3], base: u32, out: &mut [u32]) -> usize {
    assert!(out.len() >= bytes.len(), "room for a position per byte");
    let [a, b, c] = wanted.map(|w| ONES * u64::from(w));
    let mut n = 0;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = base;
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        let mut found = zero_bytes(w ^ a) | zero_bytes(w ^ b) | zero_bytes(w ^ c);
        while found != 0 {
            out[n] = at + found.trailing_zeros() / 8;
            n += 1;
            found &= found - 1;
        }
        at += 8;
    }
    for (i, byte) in chunks.remainder().iter().enumerate() {
        if wanted.contains(byte) {
            out[n] = at + i as u32;
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_wanted_bytes_at_every_alignment() {
        let text = "a:b|c\\d::||\\\\é:xyzw|0123456789:,\n\"\u{80}\u{ff}";
        for skip in 0..text.len() {
            let bytes = &text.as_bytes()[skip..];
            for wanted in [*b"\\|:", *b",\n\""] {
                let expected: Vec<u32> = (0..bytes.len() as u32)
                    .filter(|&i| wanted.contains(&bytes[i as usize]))
                    .map(|i| i + 7)
                    .collect();
                let mut found = vec![0; bytes.len()];
                let n = positions_of(bytes, wanted, 7, &mut found);
                assert_eq!(&found[..n], expected, "from byte {skip}");
                for len in 0..bytes.len() {
                    let any = bytes[..len].iter().any(|b| wanted.contains(b));
                    assert_eq!(any_of(&bytes[..len], wanted), any, "{skip}+{len}");
                }
            }
        }
    }
}
