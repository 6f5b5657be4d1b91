//! Positions of three given bytes, found eight at a time, for both hot
//! parsers (a batch payload's `\`, `|`, `:` and the bets file's `,`, `"`,
//! line end): not `memchr`, because there those bytes are a few bytes apart
//! and its cost per match loses (measured in docs/PERFORMANCE.md, "The byte
//! scanner").

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of each byte of `x` that is zero, and nothing else (exact:
/// no carry crosses from one byte into the next).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// The high bit of each byte of `w` that is one of the bytes splatted in
/// `wanted`.
#[inline(always)]
fn hits<const N: usize>(w: u64, wanted: &[u64; N]) -> u64 {
    wanted.iter().fold(0, |found, &x| found | zero_bytes(w ^ x))
}

/// Whether any byte of `bytes` is below `limit` (at most 128).
#[inline(always)]
pub(crate) fn any_below(bytes: &[u8], limit: u8) -> bool {
    debug_assert!(limit <= 128);
    let below = ONES * u64::from(limit);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        // The high bit of a byte below `limit` (exact for a limit of at
        // most 128, with bytes of 128 and more ruled out by `!w`).
        if w.wrapping_sub(below) & !w & !LOW7 != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&c| c < limit)
}

/// Whether any byte of `bytes` is one of `wanted`.
#[inline]
pub(crate) fn any_of(bytes: &[u8], wanted: [u8; 3]) -> bool {
    let splat = wanted.map(|w| ONES * u64::from(w));
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        if hits(w, &splat) != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|byte| wanted.contains(byte))
}

/// The position of the first byte of `bytes` that is one of `wanted`.
///
/// For the short runs between a batch's keys (a few to a few dozen bytes):
/// a word at a time, with no setup to amortise.
#[inline]
pub(crate) fn first_of<const N: usize>(bytes: &[u8], wanted: [u8; N]) -> Option<usize> {
    let splat = wanted.map(|w| ONES * u64::from(w));
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        let found = hits(w, &splat);
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = chunks.remainder();
    rest.iter()
        .position(|byte| wanted.contains(byte))
        .map(|i| at + i)
}

/// Writes to the start of `out` the position of every byte of `bytes` that
/// is one of `wanted`, in order, and returns how many there are.
///
/// `out` must be at least as long as `bytes` (there is at most one position
/// per byte): positions are written by index, with no capacity check per
/// position, which matters at this rate. Positions fit in a `u32`: callers
/// scan a frame or a read block.
pub(crate) fn positions_of(bytes: &[u8], wanted: [u8; 3], out: &mut [u32]) -> usize {
    assert!(out.len() >= bytes.len(), "room for a position per byte");
    assert!(u32::try_from(bytes.len()).is_ok(), "positions fit in a u32");
    let splat = wanted.map(|w| ONES * u64::from(w));
    let mut n = 0;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0u32;
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        let mut found = hits(w, &splat);
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
            for wanted in [*b"\\|:", *b",\n\"", *b"\\|\n"] {
                for limit in [1, b'-', b',' + 1, 0x80] {
                    for len in 0..bytes.len() {
                        let low = bytes[..len].iter().any(|&c| c < limit);
                        assert_eq!(
                            any_below(&bytes[..len], limit),
                            low,
                            "{skip}+{len} <{limit}"
                        );
                    }
                }
                let expected: Vec<u32> = (0..bytes.len() as u32)
                    .filter(|&i| wanted.contains(&bytes[i as usize]))
                    .collect();
                let mut found = vec![0; bytes.len()];
                let n = positions_of(bytes, wanted, &mut found);
                assert_eq!(&found[..n], expected, "from byte {skip}");
                for len in 0..bytes.len() {
                    let any = bytes[..len].iter().any(|b| wanted.contains(b));
                    assert_eq!(any_of(&bytes[..len], wanted), any, "{skip}+{len}");
                    let first = expected.iter().map(|&p| p as usize).find(|&p| p < len);
                    assert_eq!(first_of(&bytes[..len], wanted), first, "{skip}+{len}");
                    let two = [wanted[0], wanted[1]];
                    let first = (0..len).find(|&p| two.contains(&bytes[p]));
                    assert_eq!(first_of(&bytes[..len], two), first, "{skip}+{len}");
                }
            }
        }
    }
}
