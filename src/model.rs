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

// Out of line: the rules run for every bet, and refuse hardly any.
#[cold]
#[inline(never)]
fn invalid(field: BetField, value: &[u8], reason: &'static str) -> BetError {
    let value = String::from_utf8_lossy(value);
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
        let (agency, number) = check(texts.map(str::as_bytes), &today())?;
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

/// A bet of a [`Bets`] as bytes: all that the per-bet consumers on the
/// central's hot path (the receipt chain, the bets file's rows) read. Handed
/// out by [`Bets::iter_bytes`], it is cheaper than a [`BetRef`], whose
/// `&str` fields each cost a check that they start and end on a character
/// boundary; it is made only from a [`BetRef`] or a [`Bets`], so it is
/// valid all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BetBytes<'a> {
    agency: AgencyId,
    texts: [&'a [u8]; BetField::TEXT_FIELDS],
    number: u16,
}

impl<'a> BetBytes<'a> {
    /// The agency that took the bet.
    pub fn agency(&self) -> AgencyId {
        self.agency
    }

    /// First name, last name, document and birthdate, in that order.
    pub fn texts(&self) -> [&'a [u8]; BetField::TEXT_FIELDS] {
        self.texts
    }

    /// The number bet on.
    pub fn number(&self) -> u16 {
        self.number
    }
}

impl<'a> From<BetRef<'a>> for BetBytes<'a> {
    fn from(bet: BetRef<'a>) -> Self {
        BetBytes {
            agency: bet.agency,
            texts: [bet.first_name, bet.last_name, bet.document, bet.birthdate].map(str::as_bytes),
            number: bet.number,
        }
    }
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
        check_text(
            first_name.as_bytes(),
            last_name.as_bytes(),
            document.as_bytes(),
            birthdate.as_bytes(),
            &today.0,
        )?;
        Ok(BetRef {
            agency,
            first_name,
            last_name,
            document,
            birthdate,
            number: parse_number(number.as_bytes())?,
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

/// Where one bet's text lies in [`Bets::text`]: text field `i` is
/// `spans[i][0]..spans[i][1]`. A bet pushed field by field has them end to
/// end; a bet read in place from a batch's text ([`Bets::over`]) has them
/// where the batch had them, with its keys in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    spans: [[u32; 2]; BetField::TEXT_FIELDS],
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
///
/// The central's batch reader copies the batch's whole text in once and
/// points into it (`Bets::over`, `Bets::push_spans`): one copy of
/// 8 KiB costs less than four small copies a bet.
#[derive(Clone, Default)]
pub struct Bets {
    text: String,
    slots: Vec<Slot>,
    /// Today's date, looked up once for the batch rather than per bet.
    today: Option<Today>,
}

/// The bytes of `text` at `span`.
#[inline(always)]
fn span_of(text: &[u8], [from, to]: [u32; 2]) -> &[u8] {
    &text[from as usize..to as usize]
}

/// Two batches are equal when they hold the same bets in the same order,
/// wherever their text lies.
impl PartialEq for Bets {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
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
        let field = |i: usize| &self.text[s.spans[i][0] as usize..s.spans[i][1] as usize];
        BetRef {
            agency: s.agency,
            first_name: field(0),
            last_name: field(1),
            document: field(2),
            birthdate: field(3),
            number: s.number,
        }
    }

    /// The agency of each bet, in order.
    pub fn agencies(&self) -> impl ExactSizeIterator<Item = AgencyId> + '_ {
        self.slots.iter().map(|s| s.agency)
    }

    /// The bets in order, as bytes.
    pub fn iter_bytes(&self) -> impl ExactSizeIterator<Item = BetBytes<'_>> + '_ {
        let text = self.text.as_bytes();
        self.slots.iter().map(move |s| BetBytes {
            agency: s.agency,
            // Written out rather than with `array::map`, which the
            // compiler leaves as a call per bet (callgrind).
            texts: [
                span_of(text, s.spans[0]),
                span_of(text, s.spans[1]),
                span_of(text, s.spans[2]),
                span_of(text, s.spans[3]),
            ],
            number: s.number,
        })
    }

    /// An empty batch whose bets are to be read in place from `text` with
    /// [`Bets::push_spans`], with room for `bets` of them.
    pub(crate) fn over(text: &str, bets: usize) -> Self {
        let mut copy = String::with_capacity(text.len());
        copy.push_str(text);
        Self {
            text: copy,
            slots: Vec::with_capacity(bets),
            today: None,
        }
    }

    /// Appends `piece` to the text (for a field that had to be unescaped
    /// before [`Bets::push_spans`] can point at it); returns where it
    /// starts.
    pub(crate) fn append(&mut self, piece: &str) -> u32 {
        let from = self.offset();
        self.text.push_str(piece);
        from
    }

    /// Checks the bet whose six fields, in [`BetField::ALL`] order, are at
    /// `spans` of the text given to [`Bets::over`] (as [`Bets::push_texts`]
    /// checks them), and appends it without copying its text.
    ///
    /// # Errors
    /// As [`Bets::push_fields`].
    pub(crate) fn push_spans(
        &mut self,
        spans: [[u32; 2]; BetField::COUNT],
    ) -> Result<(), BetError> {
        let today = self.today();
        let text = self.text.as_bytes();
        let texts = [
            span_of(text, spans[0]),
            span_of(text, spans[1]),
            span_of(text, spans[2]),
            span_of(text, spans[3]),
            span_of(text, spans[4]),
            span_of(text, spans[5]),
        ];
        let (agency, number) = check(texts, &today.0)?;
        self.slots.push(Slot {
            spans: [spans[0], spans[1], spans[2], spans[3]],
            agency,
            number,
        });
        Ok(())
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
        let (agency, number) = check(texts.map(str::as_bytes), &today.0)?;
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
        let mut spans = [[0u32; 2]; BetField::TEXT_FIELDS];
        for (span, field) in spans.iter_mut().zip(fields) {
            span[0] = self.offset();
            self.text.push_str(field);
            span[1] = self.offset();
        }
        self.slots.push(Slot {
            spans,
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
            // Its text goes too when it was the last text pushed (a bet
            // read in place leaves the batch's text as it is).
            if last.spans[BetField::TEXT_FIELDS - 1][1] as usize == self.text.len() {
                self.text.truncate(last.spans[0][0] as usize);
            }
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
///
/// The rules read bytes: digits, dates and the usual names are ASCII, and
/// making each field a `&str` costs a check of both its ends, per field and
/// per bet, on the central's hot path. The few names that need characters
/// (a blank-looking start, more than 100 bytes) are read as text where they
/// are checked. Every caller's fields are UTF-8 text cut at ASCII bytes.
fn check(texts: [&[u8]; BetField::COUNT], today: &[u8; 10]) -> Result<(AgencyId, u16), BetError> {
    let [first_name, last_name, document, birthdate, number, agency] = texts;
    let agency = parse_agency(agency)?;
    check_text(first_name, last_name, document, birthdate, today)?;
    Ok((agency, parse_number(number)?))
}

fn check_text(
    first_name: &[u8],
    last_name: &[u8],
    document: &[u8],
    birthdate: &[u8],
    today: &[u8; 10],
) -> Result<(), BetError> {
    check_name(BetField::FirstName, first_name)?;
    check_name(BetField::LastName, last_name)?;
    check_document(document)?;
    check_birthdate(birthdate, today)
}

fn parse_agency(v: &[u8]) -> Result<AgencyId, BetError> {
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
fn digits_value(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for &c in v {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(d));
    }
    Some(n)
}

#[inline(always)]
fn check_name(field: BetField, v: &[u8]) -> Result<(), BetError> {
    // A name that starts with a letter or digit is not blank, and one of
    // at most 100 bytes is not too long: most names need no more.
    let starts_plain = v.first().is_some_and(u8::is_ascii_alphanumeric);
    if starts_plain && v.len() <= MAX_NAME_CHARS {
        return Ok(());
    }
    check_name_text(field, v)
}

/// [`check_name`] for the rest, by characters.
#[cold]
#[inline(never)]
fn check_name_text(field: BetField, v: &[u8]) -> Result<(), BetError> {
    let text = String::from_utf8_lossy(v);
    if text.trim().is_empty() {
        return Err(invalid(field, v, "empty"));
    }
    // A character is at least one byte: only a long text can have too many.
    if v.len() > MAX_NAME_CHARS && text.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(field, v, "longer than 100 characters"));
    }
    Ok(())
}

fn check_document(v: &[u8]) -> Result<(), BetError> {
    if v.is_empty() {
        return Err(invalid(BetField::Document, v, "empty"));
    }
    if !v.iter().all(u8::is_ascii_digit) {
        return Err(invalid(BetField::Document, v, "not all digits"));
    }
    if v.len() > MAX_DOCUMENT_LEN {
        return Err(invalid(BetField::Document, v, "longer than 10 digits"));
    }
    Ok(())
}

fn check_birthdate(v: &[u8], today: &[u8; 10]) -> Result<(), BetError> {
    let shape = |v: &[u8]| -> Option<[u8; 10]> {
        let b: [u8; 10] = v.try_into().ok()?;
        let digits_at = [0, 1, 2, 3, 5, 6, 8, 9];
        let ok = b[4] == b'-' && b[7] == b'-' && digits_at.iter().all(|&i| b[i].is_ascii_digit());
        ok.then_some(b)
    };
    let Some(b) = shape(v) else {
        return Err(invalid(
            BetField::Birthdate,
            v,
            "not a date of the form YYYY-MM-DD",
        ));
    };
    let digits =
        |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    let (year, month, day) = (digits(0..4), digits(5..7), digits(8..10));
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(invalid(BetField::Birthdate, v, "not a real calendar date"));
    }
    // Same-shaped ISO dates compare as text in calendar order; as numbers
    // of their bytes, without a call to compare memory.
    let key = |d: &[u8; 10]| {
        let mut wide = [0u8; 16];
        wide[..10].copy_from_slice(d);
        u128::from_be_bytes(wide)
    };
    if key(&b) > key(today) {
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

fn parse_number(v: &[u8]) -> Result<u16, BetError> {
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
