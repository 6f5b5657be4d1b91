//! The bet and its validation rules, shared by the agency (reading its data
//! file) and the central (reading a batch), so both refuse the same things.

use std::fmt;

mod keyed_enum;
pub(crate) use keyed_enum::keyed_enum;

/// An agency's number, 1 up to the configured agency count.
pub type AgencyId = u32;

/// The numbers one can bet on.
pub const MAX_NUMBER: u16 = 9999;
/// Longest accepted document (DNI), in digits.
pub const MAX_DOCUMENT_LEN: usize = 10;
/// Longest accepted first or last name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// One bet, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bet {
    /// The agency that took the bet.
    pub agency: AgencyId,
    /// First name(s); any UTF-8 text.
    pub first_name: String,
    /// Last name(s); any UTF-8 text.
    pub last_name: String,
    /// Document number (DNI): digits only, leading zeros kept.
    pub document: String,
    /// Birthdate as `YYYY-MM-DD`, a real calendar date not in the future.
    pub birthdate: String,
    /// The number bet on, 0..=9999.
    pub number: u16,
}

keyed_enum! {
    /// The fields of a bet with their wire keys, in the order a bet's payload
    /// carries them. The wire's parser and writer are driven by this table,
    /// so a new field starts here.
    pub enum BetField, text wire_key {
        /// First name(s).
        FirstName = "NOMBRE",
        /// Last name(s).
        LastName = "APELLIDO",
        /// Document (DNI).
        Document = "DOCUMENTO",
        /// Birthdate, `YYYY-MM-DD`.
        Birthdate = "NACIMIENTO",
        /// The number bet on.
        Number = "NUMERO",
        /// The agency that took the bet.
        AgencyId = "AGENCY_ID",
    }
}

impl BetField {
    /// How many fields, the first of [`BetField::ALL`], a bet keeps as text
    /// (in [`Bets`]); the others are numbers.
    pub const TEXT_FIELDS: usize = 4;
}

impl fmt::Display for BetField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_key())
    }
}

/// Why a bet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BetError {
    /// A field is absent.
    #[error("{0} is missing")]
    Missing(BetField),
    /// A field is present but its value is not acceptable.
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        /// Which field.
        field: BetField,
        /// The value as received (cut to a readable length).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bet's own payload is not well formed.
    #[error("malformed bet: {0}")]
    Malformed(String),
}

fn invalid(field: BetField, value: &str, reason: &'static str) -> BetError {
    let mut shown: String = value.chars().take(40).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    let value = shown;
    BetError::Invalid {
        field,
        value,
        reason,
    }
}

impl Bet {
    /// Builds a bet from its six text fields, checking every rule.
    ///
    /// # Errors
    /// A [`BetError`] naming the first field that is wrong and why.
    pub fn from_fields(
        agency: &str,
        first_name: &str,
        last_name: &str,
        document: &str,
        birthdate: &str,
        number: &str,
    ) -> Result<Bet, BetError> {
        let texts = [first_name, last_name, document, birthdate, number, agency];
        let (agency, number) = check(&texts, &today())?;
        Ok(Bet {
            agency,
            first_name: first_name.to_string(),
            last_name: last_name.to_string(),
            document: document.to_string(),
            birthdate: birthdate.to_string(),
            number,
        })
    }

    /// Whether this bet wins a draw of `winning_number`.
    pub fn is_winner(&self, winning_number: u16) -> bool {
        self.number == winning_number
    }

    /// The bet as a borrowed view.
    pub fn as_ref(&self) -> BetRef<'_> {
        BetRef {
            agency: self.agency,
            first_name: &self.first_name,
            last_name: &self.last_name,
            document: &self.document,
            birthdate: &self.birthdate,
            number: self.number,
        }
    }
}

/// A validated bet whose text lives elsewhere: in a [`Bets`] buffer, or in
/// a [`Bet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BetRef<'a> {
    /// The agency that took the bet.
    pub agency: AgencyId,
    /// First name(s).
    pub first_name: &'a str,
    /// Last name(s).
    pub last_name: &'a str,
    /// Document number (DNI).
    pub document: &'a str,
    /// Birthdate, `YYYY-MM-DD`.
    pub birthdate: &'a str,
    /// The number bet on.
    pub number: u16,
}

/// Today's date, as validation compares birthdates with it: looked up once
/// and reused for many bets (a batch, a few hundred lines), as asking the
/// clock and the time zone per bet would dominate validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Today([u8; 10]);

impl Today {
    /// The local date now.
    pub fn now() -> Self {
        Today(today())
    }
}

impl<'a> BetRef<'a> {
    /// Checks a bet of `agency` (whose id is known to be valid: the
    /// agency's own) from its text fields, as [`Bet::from_fields`] does.
    ///
    /// # Errors
    /// A [`BetError`] naming the first field that is wrong.
    pub fn check(
        agency: AgencyId,
        first_name: &'a str,
        last_name: &'a str,
        document: &'a str,
        birthdate: &'a str,
        number: &str,
        today: Today,
    ) -> Result<Self, BetError> {
        check_text(first_name, last_name, document, birthdate, &today.0)?;
        Ok(BetRef {
            agency,
            first_name,
            last_name,
            document,
            birthdate,
            number: parse_number(number)?,
        })
    }
}

impl<'a> BetRef<'a> {
    /// The fields as they travel, in [`BetField::ALL`] order; the numbers
    /// are written into `digits` (but for the usual small agency ids, which
    /// are static text), so this needs no allocation.
    pub(crate) fn texts<'s>(&self, digits: &'s mut [itoa::Buffer; 2]) -> [&'s str; BetField::COUNT]
    where
        'a: 's,
    {
        /// The usual agency ids as text: the batch writer then formats
        /// only the number per bet (as it did before the redesign).
        const SMALL: [&str; 21] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16", "17", "18", "19", "20",
        ];
        let [number, agency] = digits;
        let agency = match SMALL.get(self.agency as usize) {
            Some(small) => small,
            None => agency.format(self.agency),
        };
        [
            self.first_name,
            self.last_name,
            self.document,
            self.birthdate,
            number.format(self.number),
            agency,
        ]
    }

    /// An owned copy.
    pub fn to_bet(&self) -> Bet {
        Bet {
            agency: self.agency,
            first_name: self.first_name.to_string(),
            last_name: self.last_name.to_string(),
            document: self.document.to_string(),
            birthdate: self.birthdate.to_string(),
            number: self.number,
        }
    }
}

/// Where one bet's text lies in [`Bets::text`]: its four text fields are
/// stored end to end from `start`, and end at `ends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    start: u32,
    ends: [u32; BetField::TEXT_FIELDS],
    agency: AgencyId,
    number: u16,
}

/// The validated bets of one batch, kept flat: every text field of every
/// bet in one buffer, and a small fixed-size slot per bet.
///
/// This is how bets travel through both hot paths (the agency reading its
/// file, the central decoding a batch): filling it costs two buffers per
/// batch that can be reused, never an allocation per bet, and its bets are
/// read back as [`BetRef`]s borrowing from it. [`Bet`] stays the owned,
/// convenient form for everything else.
#[derive(Clone, Default)]
pub struct Bets {
    text: String,
    slots: Vec<Slot>,
    /// Today's date, looked up once for the batch rather than per bet.
    today: Option<Today>,
}

impl PartialEq for Bets {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text && self.slots == other.slots
    }
}

impl Eq for Bets {}

impl Bets {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `bets` bets of `text` bytes of fields.
    pub fn with_capacity(bets: usize, text: usize) -> Self {
        Self {
            text: String::with_capacity(text),
            slots: Vec::with_capacity(bets),
            today: None,
        }
    }

    /// Number of bets.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no bets.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Removes every bet, keeping the buffers.
    pub fn clear(&mut self) {
        self.text.clear();
        self.slots.clear();
    }

    /// The `i`-th bet (0-based).
    pub fn get(&self, i: usize) -> Option<BetRef<'_>> {
        self.slots.get(i).map(|s| self.view(s))
    }

    /// The bets in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = BetRef<'_>> + '_ {
        self.slots.iter().map(|s| self.view(s))
    }

    fn view(&self, s: &Slot) -> BetRef<'_> {
        let field = |from: u32, to: u32| &self.text[from as usize..to as usize];
        BetRef {
            agency: s.agency,
            first_name: field(s.start, s.ends[0]),
            last_name: field(s.ends[0], s.ends[1]),
            document: field(s.ends[1], s.ends[2]),
            birthdate: field(s.ends[2], s.ends[3]),
            number: s.number,
        }
    }

    /// Checks the six text fields of a bet (as [`Bet::from_fields`] does)
    /// and appends it.
    ///
    /// # Errors
    /// A [`BetError`] naming the first field that is wrong; nothing is
    /// appended then.
    pub fn push_fields(
        &mut self,
        agency: &str,
        first_name: &str,
        last_name: &str,
        document: &str,
        birthdate: &str,
        number: &str,
    ) -> Result<(), BetError> {
        self.push_texts(&[first_name, last_name, document, birthdate, number, agency])
    }

    /// [`Bets::push_fields`] with the fields as they travel, in
    /// [`BetField::ALL`] order.
    ///
    /// # Errors
    /// As [`Bets::push_fields`].
    pub fn push_texts(&mut self, texts: &[&str; BetField::COUNT]) -> Result<(), BetError> {
        let today = self.today();
        let (agency, number) = check(texts, &today.0)?;
        self.push_unchecked(agency, std::array::from_fn(|i| texts[i]), number);
        Ok(())
    }

    /// [`Bets::push_fields`] for an agency id already known to be valid
    /// (the agency's own, from its configuration).
    ///
    /// # Errors
    /// As [`Bets::push_fields`].
    pub fn push_for(
        &mut self,
        agency: AgencyId,
        first_name: &str,
        last_name: &str,
        document: &str,
        birthdate: &str,
        number: &str,
    ) -> Result<(), BetError> {
        let bet = BetRef::check(
            agency,
            first_name,
            last_name,
            document,
            birthdate,
            number,
            self.today(),
        )?;
        self.push(bet);
        Ok(())
    }

    fn today(&mut self) -> Today {
        *self.today.get_or_insert_with(Today::now)
    }

    /// Appends a bet that is already valid.
    pub fn push(&mut self, bet: BetRef<'_>) {
        self.push_unchecked(
            bet.agency,
            [bet.first_name, bet.last_name, bet.document, bet.birthdate],
            bet.number,
        );
    }

    fn push_unchecked(
        &mut self,
        agency: AgencyId,
        fields: [&str; BetField::TEXT_FIELDS],
        number: u16,
    ) {
        let start = self.offset();
        let mut ends = [0u32; BetField::TEXT_FIELDS];
        for (end, field) in ends.iter_mut().zip(fields) {
            self.text.push_str(field);
            *end = self.offset();
        }
        self.slots.push(Slot {
            start,
            ends,
            agency,
            number,
        });
    }

    fn offset(&self) -> u32 {
        // A batch fits in one frame (8 KiB), and an agency's read-ahead in
        // a few of them: offsets are far from 4 GiB.
        u32::try_from(self.text.len()).expect("a batch's text is under 4 GiB")
    }

    /// Moves the last bet out into a batch of its own (the agency's reader
    /// does this when a bet does not fit in the batch being filled).
    pub fn split_last(&mut self) -> Bets {
        let mut rest = Bets::new();
        if let Some(last) = self.slots.pop() {
            rest.push(self.view(&last));
            self.text.truncate(last.start as usize);
        }
        rest
    }
}

impl std::fmt::Debug for Bets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Extend<BetRef<'a>> for Bets {
    fn extend<I: IntoIterator<Item = BetRef<'a>>>(&mut self, iter: I) {
        for bet in iter {
            self.push(bet);
        }
    }
}

impl<'a> FromIterator<&'a Bet> for Bets {
    fn from_iter<I: IntoIterator<Item = &'a Bet>>(iter: I) -> Self {
        let mut bets = Bets::new();
        bets.extend(iter.into_iter().map(Bet::as_ref));
        bets
    }
}

impl From<&[Bet]> for Bets {
    fn from(bets: &[Bet]) -> Self {
        bets.iter().collect()
    }
}

impl From<Vec<Bet>> for Bets {
    fn from(bets: Vec<Bet>) -> Self {
        bets.iter().collect()
    }
}

/// Every rule, the agency's first, then in field order; returns the parsed
/// agency and number.
fn check(texts: &[&str; BetField::COUNT], today: &[u8; 10]) -> Result<(AgencyId, u16), BetError> {
    let [first_name, last_name, document, birthdate, number, agency] = *texts;
    let agency = parse_agency(agency)?;
    check_text(first_name, last_name, document, birthdate, today)?;
    Ok((agency, parse_number(number)?))
}

fn check_text(
    first_name: &str,
    last_name: &str,
    document: &str,
    birthdate: &str,
    today: &[u8; 10],
) -> Result<(), BetError> {
    check_name(BetField::FirstName, first_name)?;
    check_name(BetField::LastName, last_name)?;
    check_document(document)?;
    check_birthdate(birthdate, today)
}

fn parse_agency(v: &str) -> Result<AgencyId, BetError> {
    match digits_value(v) {
        Some(id) if id >= 1 && id <= u64::from(AgencyId::MAX) => Ok(id as AgencyId),
        _ => Err(invalid(
            BetField::AgencyId,
            v,
            "not an agency id (1 or more)",
        )),
    }
}

/// The value of a text of ASCII digits only (at least one), saturating at
/// `u64::MAX`; `None` for anything else (a sign, a space, nothing).
fn digits_value(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

fn check_name(field: BetField, v: &str) -> Result<(), BetError> {
    // A name that starts with a letter or digit is not blank; only the
    // others need the (Unicode-aware) trim.
    let starts_plain = v.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric);
    if !starts_plain && v.trim().is_empty() {
        return Err(invalid(field, v, "empty"));
    }
    // A character is at least one byte: only a long text can have too many.
    if v.len() > MAX_NAME_CHARS && v.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(field, v, "longer than 100 characters"));
    }
    Ok(())
}

fn check_document(v: &str) -> Result<(), BetError> {
    if v.is_empty() {
        return Err(invalid(BetField::Document, v, "empty"));
    }
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(BetField::Document, v, "not all digits"));
    }
    if v.len() > MAX_DOCUMENT_LEN {
        return Err(invalid(BetField::Document, v, "longer than 10 digits"));
    }
    Ok(())
}

fn check_birthdate(v: &str, today: &[u8; 10]) -> Result<(), BetError> {
    let b = v.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return Err(invalid(
            BetField::Birthdate,
            v,
            "not a date of the form YYYY-MM-DD",
        ));
    }
    let digits =
        |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    let (year, month, day) = (digits(0..4), digits(5..7), digits(8..10));
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(invalid(BetField::Birthdate, v, "not a real calendar date"));
    }
    // Same-shaped ISO dates compare as text in calendar order.
    if b > &today[..] {
        return Err(invalid(BetField::Birthdate, v, "in the future"));
    }
    if year < 1900 {
        return Err(invalid(BetField::Birthdate, v, "before 1900"));
    }
    Ok(())
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Today's local date as `YYYY-MM-DD`, looked up at most once a minute per
/// thread: asking the time zone for every bet would dominate validation.
fn today() -> [u8; 10] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: Cell<(u64, [u8; 10])> = const { Cell::new((0, [0; 10])) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let (expires, date) = cache.get();
        if now < expires {
            return date;
        }
        let text = chrono::Local::now()
            .date_naive()
            .format("%Y-%m-%d")
            .to_string();
        let date: [u8; 10] = text
            .as_bytes()
            .try_into()
            .expect("a four-digit year formats in 10 bytes");
        cache.set((now + 60, date));
        date
    })
}

fn parse_number(v: &str) -> Result<u16, BetError> {
    match digits_value(v) {
        None => Err(invalid(BetField::Number, v, "not a whole number")),
        Some(n) if n <= u64::from(MAX_NUMBER) => Ok(n as u16),
        Some(_) => Err(invalid(BetField::Number, v, "outside 0..=9999")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bet(doc: &str, date: &str, number: &str) -> Result<Bet, BetError> {
        Bet::from_fields("1", "Ana", "Pérez", doc, date, number)
    }

    #[test]
    fn accepts_a_plain_bet() {
        let b = bet("30904465", "1999-03-17", "7574").unwrap();
        assert_eq!(b.number, 7574);
        assert!(b.is_winner(7574));
        assert!(!b.is_winner(1));
    }

    #[test]
    fn refuses_impossible_dates() {
        for d in [
            "2023-02-30",
            "1999-13-01",
            "1999-3-17",
            "17-03-1999",
            "2999-01-01",
            "1899-12-31",
        ] {
            let err = bet("1", d, "1").unwrap_err();
            assert!(
                matches!(
                    err,
                    BetError::Invalid {
                        field: BetField::Birthdate,
                        ..
                    }
                ),
                "{d}: {err}"
            );
        }
        assert!(bet("1", "2000-02-29", "1").is_ok());
    }

    #[test]
    fn refuses_bad_numbers_and_documents() {
        for n in ["10000", "-1", "7a", "", " 1"] {
            assert!(matches!(
                bet("1", "1999-03-17", n),
                Err(BetError::Invalid {
                    field: BetField::Number,
                    ..
                })
            ));
        }
        for d in ["", "12a", "12345678901", "-5"] {
            assert!(matches!(
                bet(d, "1999-03-17", "1"),
                Err(BetError::Invalid {
                    field: BetField::Document,
                    ..
                })
            ));
        }
        assert!(matches!(
            Bet::from_fields("0", "A", "B", "1", "1999-03-17", "1"),
            Err(BetError::Invalid {
                field: BetField::AgencyId,
                ..
            })
        ));
        assert!(matches!(
            Bet::from_fields("1", " ", "B", "1", "1999-03-17", "1"),
            Err(BetError::Invalid {
                field: BetField::FirstName,
                ..
            })
        ));
    }

    #[test]
    fn calendar_rules() {
        for ok in [
            "2000-02-29",
            "2024-02-29",
            "1900-01-01",
            "1999-12-31",
            "1999-04-30",
        ] {
            assert!(bet("1", ok, "1").is_ok(), "{ok}");
        }
        for bad in [
            "1900-02-29",
            "2023-02-29",
            "1999-04-31",
            "1999-00-10",
            "1999-01-00",
        ] {
            assert!(bet("1", bad, "1").is_err(), "{bad}");
        }
        let today = String::from_utf8(today().to_vec()).unwrap();
        assert!(bet("1", &today, "1").is_ok(), "born today is allowed");
    }

    #[test]
    fn names_count_characters_not_bytes() {
        let long_in_bytes = "ñ".repeat(100); // 200 bytes, 100 characters
        assert!(Bet::from_fields("1", &long_in_bytes, "B", "1", "1999-03-17", "1").is_ok());
        let too_long = "ñ".repeat(101);
        assert!(Bet::from_fields("1", &too_long, "B", "1", "1999-03-17", "1").is_err());
    }

    #[test]
    fn bets_keep_fields_apart_and_in_order() {
        let owned = vec![
            bet("30904465", "1999-03-17", "7574").unwrap(),
            Bet::from_fields("2", "José|María", "Ñandú, Jr.", "0012", "2000-02-29", "0").unwrap(),
        ];
        let bets = Bets::from(owned.clone());
        assert_eq!(bets.len(), 2);
        assert_eq!(bets.iter().map(|b| b.to_bet()).collect::<Vec<_>>(), owned);
        assert_eq!(bets.get(1).unwrap().last_name, "Ñandú, Jr.");
        assert_eq!(bets.get(2), None);

        let mut built = Bets::new();
        built
            .push_for(1, "Ana", "Pérez", "30904465", "1999-03-17", "7574")
            .unwrap();
        built
            .push_fields("2", "José|María", "Ñandú, Jr.", "0012", "2000-02-29", "0")
            .unwrap();
        assert_eq!(built, bets);
        // A refused bet leaves nothing behind.
        assert!(built
            .push_for(1, "Ana", "Pérez", "1", "1999-02-30", "1")
            .is_err());
        assert_eq!(built, bets);

        let last = built.split_last();
        assert_eq!(
            last.iter().map(|b| b.to_bet()).collect::<Vec<_>>(),
            owned[1..]
        );
        assert_eq!(built, Bets::from(&owned[..1]));
        built.clear();
        assert!(built.is_empty());
    }
}
