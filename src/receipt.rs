//! Receipts and the seal: what lets an agency, an operator or anyone with the
//! files check the outcome instead of trusting the central. One definition,
//! used by the central (as it stores and as it draws), the agency (over its
//! own data file) and `lottery verify` (over the stored bets); whatever the
//! store.
//!
//! - An agency's **receipt** is how many of its bets are held and a digest
//!   of them in order: a hash chain whose whole state is 32 bytes, so a
//!   store can keep it in a row and advance it in a batch's transaction.
//!   `d_0 = SHA-256("lottery receipt v1" || agency as u32 BE)` (another
//!   agency's bets never match), `d_i = SHA-256(d_{i-1} || canonical(bet_i))`.
//! - `canonical(bet)`: the first name, last name, document and birthdate (in
//!   `BetField` order), each as its UTF-8 length (u32 BE) then its bytes,
//!   then the number as a u16 BE. The agency is in `d_0`, not in each bet.
//! - The **seal** of a round: `SHA-256("lottery seal v1" || winning number
//!   as u16 BE || agency count as u32 BE || for each agency 1..=N in order:
//!   id as u32 BE || count as u64 BE || digest)`.
//!
//! docs/PROTOCOL.md spells these out with a worked example that the tests
//! below check.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::model::{AgencyId, BetBytes, BetRef};

/// Bytes of a digest.
pub const DIGEST_LEN: usize = 32;

/// What the receipt chain of every agency starts from (then the agency id).
const RECEIPT_DOMAIN: &[u8] = b"lottery receipt v1";
/// What a seal starts from.
const SEAL_DOMAIN: &[u8] = b"lottery seal v1";

/// A SHA-256 digest; shown and sent as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Digest {
    /// The first 8 hex digits: enough to tell rounds apart in a file name.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

/// A digest that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a digest (64 hex digits)")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadDigest(s.chars().take(80).collect());
        if s.len() != 2 * DIGEST_LEN || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; DIGEST_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Digest(out))
    }
}

/// The canonical encoding of one bet, handed to `out` piece by piece (the
/// one definition, for the hash and for anyone who wants the bytes): each
/// text field (first name, last name, document, birthdate, as stored) as
/// its length in bytes (u32 BE) then its UTF-8 bytes, then the number as a
/// u16 BE.
pub fn canonical(texts: [&[u8]; 4], number: u16, mut out: impl FnMut(&[u8])) {
    for text in texts {
        // A name is at most 100 characters, so its length fits in a u32.
        out(&(text.len() as u32).to_be_bytes());
        out(text);
    }
    out(&number.to_be_bytes());
}

/// One agency's receipt: how many of its bets are held, and the digest of
/// them in order. Its whole state is these two values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Bets held.
    pub count: u64,
    /// The chain's value after them.
    pub digest: Digest,
}

impl Receipt {
    /// The receipt of no bets of `agency`: `d_0`.
    pub fn empty(agency: AgencyId) -> Receipt {
        let mut h = Sha256::new();
        h.update(RECEIPT_DOMAIN);
        h.update(agency.to_be_bytes());
        Receipt {
            count: 0,
            digest: Digest(h.finalize().into()),
        }
    }

    /// Extends the chain by one bet, given its text fields (first name, last
    /// name, document, birthdate, as stored) and its number.
    pub fn push(&mut self, texts: [&[u8]; 4], number: u16) {
        // The whole message is laid out on the stack, padded as SHA-256
        // pads it, and compressed in one call when it fits in three blocks
        // (every bet of usual names does): feeding the hasher a dozen small
        // pieces, or even one piece through its buffer, costs as much again
        // as the hashing itself (callgrind; docs/PERFORMANCE.md).
        const BLOCKS: usize = 3;
        let len = DIGEST_LEN + texts.iter().map(|t| 4 + t.len()).sum::<usize>() + 2;
        self.digest = if len + 9 <= BLOCKS * 64 {
            let mut blocks = [[0u8; 64]; BLOCKS];
            let message = blocks.as_flattened_mut();
            message[..DIGEST_LEN].copy_from_slice(&self.digest.0);
            let mut at = DIGEST_LEN;
            canonical(texts, number, |bytes| {
                message[at..at + bytes.len()].copy_from_slice(bytes);
                at += bytes.len();
            });
            digest_padded(&mut blocks, at)
        } else {
            let mut h = Sha256::new();
            h.update(self.digest.0);
            canonical(texts, number, |bytes| h.update(bytes));
            Digest(h.finalize().into())
        };
        self.count += 1;
    }

    /// Extends the chain by one bet.
    pub fn push_bet(&mut self, bet: &BetRef<'_>) {
        let texts = [bet.first_name, bet.last_name, bet.document, bet.birthdate];
        self.push(texts.map(str::as_bytes), bet.number);
    }

    /// Extends the chain by `bets`, returning the receipt after them.
    pub fn after<'a, B: Into<BetBytes<'a>>>(
        mut self,
        bets: impl IntoIterator<Item = B>,
    ) -> Receipt {
        for bet in bets {
            let bet = bet.into();
            self.push(bet.texts(), bet.number());
        }
        self
    }
}

/// SHA-256 of the first `len` bytes of `blocks`, whose bytes after them are
/// zero and leave room for the padding (at least nine bytes): the standard
/// padding (`0x80`, zeros, the length in bits as a u64 BE) written in place,
/// and the blocks compressed in one call.
fn digest_padded<const B: usize>(blocks: &mut [[u8; 64]; B], len: usize) -> Digest {
    /// SHA-256's initial state (FIPS 180-4, 5.3.3).
    const H0: [u32; 8] = [
        0x6a09_e667,
        0xbb67_ae85,
        0x3c6e_f372,
        0xa54f_f53a,
        0x510e_527f,
        0x9b05_688c,
        0x1f83_d9ab,
        0x5be0_cd19,
    ];
    let used = (len + 9).div_ceil(64);
    let end = used * 64;
    let flat = blocks.as_flattened_mut();
    flat[len] = 0x80;
    flat[end - 8..end].copy_from_slice(&(len as u64 * 8).to_be_bytes());
    let mut state = H0;
    sha2::block_api::compress256(&mut state, &blocks[..used]);
    let mut out = [0u8; DIGEST_LEN];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    Digest(out)
}

/// What the winners of a session opened by `HELLO` carry: the agency's
/// receipt as sealed, and the seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The agency's receipt the draw took into account.
    pub receipt: Receipt,
    /// The round's seal.
    pub seal: Digest,
}

/// The seal of a round drawn with `winning_number`: one digest over the
/// winning number and every configured agency's receipt (`1..=agencies`; an
/// agency missing from `receipts` holds no bets).
pub fn seal(winning_number: u16, agencies: u32, receipts: &BTreeMap<AgencyId, Receipt>) -> Digest {
    let mut h = Sha256::new();
    h.update(SEAL_DOMAIN);
    h.update(winning_number.to_be_bytes());
    h.update(agencies.to_be_bytes());
    for agency in 1..=agencies {
        let r = receipts
            .get(&agency)
            .copied()
            .unwrap_or_else(|| Receipt::empty(agency));
        h.update(agency.to_be_bytes());
        h.update(r.count.to_be_bytes());
        h.update(r.digest.0);
    }
    Digest(h.finalize().into())
}

/// What the stored bets say a round's outcome is, recomputed from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recomputed {
    /// Each agency's receipt (agencies with bets only).
    pub receipts: BTreeMap<AgencyId, Receipt>,
    /// Each agency's winning documents in stored order, for the recorded
    /// winning number.
    pub winners: HashMap<AgencyId, Vec<String>>,
}

/// A round's outcome as its record states it.
#[derive(Debug, Clone, Copy)]
pub struct Claimed<'a> {
    /// The recorded winning number.
    pub winning_number: u16,
    /// The recorded seal.
    pub seal: Digest,
    /// Each agency's recorded receipt.
    pub receipts: &'a BTreeMap<AgencyId, Receipt>,
    /// Each agency's recorded winners.
    pub winners: &'a HashMap<AgencyId, Vec<String>>,
}

/// Compares a draw record with what the stored bets say, and with the
/// configuration (`agencies`, `winning_number`): every difference, named
/// for an operator, in a stable order; empty when they agree.
pub fn differences(
    claimed: Claimed<'_>,
    found: &Recomputed,
    agencies: u32,
    winning_number: u16,
) -> Vec<String> {
    let mut out = Vec::new();
    if claimed.winning_number != winning_number {
        out.push(format!(
            "winning number: the record says {}, the configuration {}",
            claimed.winning_number, winning_number
        ));
    }
    // A record lists every agency of its round, one without bets too: a
    // configuration for another count is named as such, and the rest is
    // compared over the record's own agencies (its seal covers them), so
    // that the count is not blamed on the seal.
    let recorded = claimed.receipts.keys().copied().max().unwrap_or(0);
    let agencies = if recorded != 0 && recorded != agencies {
        out.push(format!(
            "agencies: the record is of a round of {recorded} agencies, the configuration \
             says {agencies} (server.agencies, SERVER_AGENCIES, --agencies)"
        ));
        recorded
    } else {
        agencies
    };
    let mut ids: Vec<AgencyId> = (1..=agencies).collect();
    ids.extend(found.receipts.keys().copied());
    ids.extend(claimed.receipts.keys().copied());
    ids.extend(claimed.winners.keys().copied());
    ids.sort_unstable();
    ids.dedup();
    for agency in ids {
        if agency == 0 || agency > agencies {
            out.push(format!(
                "agency {agency}: not one of the configured agencies 1..={agencies}"
            ));
            continue;
        }
        let receipt_of = |receipts: &BTreeMap<AgencyId, Receipt>| {
            receipts
                .get(&agency)
                .copied()
                .unwrap_or_else(|| Receipt::empty(agency))
        };
        let (recorded, stored) = (receipt_of(claimed.receipts), receipt_of(&found.receipts));
        if recorded.count != stored.count {
            out.push(format!(
                "agency {agency} count: the record says {}, the stored bets {}",
                recorded.count, stored.count
            ));
        }
        if recorded.digest != stored.digest {
            out.push(format!(
                "agency {agency} digest: the record says {}, the stored bets {}",
                recorded.digest, stored.digest
            ));
        }
        let listed = claimed.winners.get(&agency).map_or(&[][..], Vec::as_slice);
        let drawn = found.winners.get(&agency).map_or(&[][..], Vec::as_slice);
        if listed != drawn {
            out.push(format!(
                "agency {agency} winners: the record says [{}], the stored bets [{}]",
                listed.join(", "),
                drawn.join(", ")
            ));
        }
    }
    let sealed = seal(claimed.winning_number, agencies, &found.receipts);
    if claimed.seal != sealed {
        out.push(format!(
            "seal: the record says {}, the stored bets with its winning number give {sealed}",
            claimed.seal
        ));
    }
    out
}

/// Compares the receipts a store serves to agencies that resume (`source`
/// names where it keeps them, e.g. a database table) with the receipts
/// recomputed from its bets: every difference, named for an operator, in
/// agency order; empty when they agree. An agency missing from either is
/// its empty receipt.
pub fn served_differences(
    source: &str,
    served: &BTreeMap<AgencyId, Receipt>,
    found: &Recomputed,
    agencies: u32,
) -> Vec<String> {
    let mut ids: Vec<AgencyId> = (1..=agencies).collect();
    ids.extend(served.keys().copied());
    ids.extend(found.receipts.keys().copied());
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    for agency in ids {
        let receipt_of = |receipts: &BTreeMap<AgencyId, Receipt>| {
            receipts
                .get(&agency)
                .copied()
                .unwrap_or_else(|| Receipt::empty(agency))
        };
        let (said, stored) = (receipt_of(served), receipt_of(&found.receipts));
        if said.count != stored.count {
            out.push(format!(
                "agency {agency} count: {source} says {}, the stored bets {}",
                said.count, stored.count
            ));
        }
        if said.digest != stored.digest {
            out.push(format!(
                "agency {agency} digest: {source} says {}, the stored bets {}",
                said.digest, stored.digest
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;

    fn bet(first: &str, last: &str, doc: &str, number: &str) -> Bet {
        Bet::from_fields("1", first, last, doc, "1999-03-17", number).unwrap()
    }

    /// The chain's step, padded by hand for bets that fit in three blocks,
    /// is SHA-256 of the definition's bytes at every length, across each
    /// block boundary and past the three blocks.
    #[test]
    fn each_step_is_sha256_of_the_canonical_bytes_at_every_length() {
        let mut receipt = Receipt::empty(4);
        for n in 0..200 {
            let name = "ñ".repeat(n / 2) + &"a".repeat(n % 2);
            let texts = [name.as_bytes(), b"Perez", b"123", b"1999-03-17"];
            let mut h = Sha256::new();
            h.update(receipt.digest.0);
            canonical(texts, n as u16, |bytes| h.update(bytes));
            let expected = Digest(h.finalize().into());
            receipt.push(texts, n as u16);
            assert_eq!(
                receipt.digest,
                expected,
                "a first name of {} bytes",
                name.len()
            );
        }
    }

    /// The worked example of docs/PROTOCOL.md, byte for byte.
    #[test]
    fn the_documented_example() {
        let empty = Receipt::empty(1);
        assert_eq!(
            empty.digest.to_string(),
            "a4f8a6c9efcdfd938efe4b6eb9df4586fa204c3388f43e13a5863024a1995cae"
        );
        let ana = Bet::from_fields("1", "Ana", "Pérez", "30904465", "1999-03-17", "7574").unwrap();
        let one = empty.after([ana.as_ref()]);
        assert_eq!(one.count, 1);
        assert_eq!(
            one.digest.to_string(),
            "1db2a5201a47b2275ff0275a77c385b3c4abc9e8a552af18dee49c56b9070d7e"
        );
        assert_eq!(
            seal(7574, 1, &BTreeMap::from([(1, one)])).to_string(),
            "a938d40f94215f948ea2f5be5cd3370023212e72e388a6688d86708b21f6ab9e"
        );
    }

    #[test]
    fn digests_parse_back_and_refuse_junk() {
        let d = Receipt::empty(7).digest;
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for junk in ["", "zz", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            assert!(junk.parse::<Digest>().is_err(), "{junk:?}");
        }
    }

    #[test]
    fn the_chain_depends_on_agency_order_and_every_field() {
        let a = bet("Ana", "Pérez", "30904465", "7574");
        let b = bet("Bob", "Lee", "1", "5");
        let one = Receipt::empty(1).after([a.as_ref(), b.as_ref()]);
        assert_eq!(one.count, 2);
        assert_ne!(one, Receipt::empty(2).after([a.as_ref(), b.as_ref()]));
        assert_ne!(one, Receipt::empty(1).after([b.as_ref(), a.as_ref()]));
        // Field boundaries are part of the encoding: moving a byte from one
        // name to the other changes the digest.
        let shifted = bet("AnaP", "érez", "30904465", "7574");
        assert_ne!(
            Receipt::empty(1).after([a.as_ref()]),
            Receipt::empty(1).after([shifted.as_ref()])
        );
        let number = bet("Ana", "Pérez", "30904465", "7575");
        assert_ne!(
            Receipt::empty(1).after([a.as_ref()]),
            Receipt::empty(1).after([number.as_ref()])
        );
    }

    #[test]
    fn the_seal_covers_the_winning_number_and_every_receipt() {
        let a = bet("Ana", "Pérez", "30904465", "7574");
        let receipts = BTreeMap::from([(1, Receipt::empty(1).after([a.as_ref()]))]);
        let s = seal(7574, 2, &receipts);
        assert_ne!(s, seal(7575, 2, &receipts));
        assert_ne!(s, seal(7574, 3, &receipts));
        // An agency without bets is its empty receipt, listed or not.
        let mut listed = receipts.clone();
        listed.insert(2, Receipt::empty(2));
        assert_eq!(s, seal(7574, 2, &listed));
    }

    #[test]
    fn a_bet_too_long_for_the_stack_hashes_the_same_way() {
        // Stored rows are not length-checked on reading back: a long name
        // takes the streaming path, which must agree with the one-shot one.
        let long = "ñ".repeat(300);
        let mut by_pieces = Sha256::new();
        by_pieces.update(Receipt::empty(1).digest.0);
        let texts = [long.as_bytes(), b"B", b"1", b"1999-03-17"];
        canonical(texts, 5, |b| by_pieces.update(b));
        let mut r = Receipt::empty(1);
        r.push(texts, 5);
        assert_eq!(r.digest, Digest(by_pieces.finalize().into()));
        let mut short = Sha256::new();
        short.update(Receipt::empty(1).digest.0);
        canonical([b"A", b"B", b"1", b"1999-03-17"], 5, |b| short.update(b));
        let mut r = Receipt::empty(1);
        r.push([b"A", b"B", b"1", b"1999-03-17"], 5);
        assert_eq!(r.digest, Digest(short.finalize().into()));
    }
}
