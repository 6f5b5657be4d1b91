//! The bet and its validation rules, shared by the agency (reading its data
//! file) and the central (reading a batch), so both refuse the same things.

use std::fmt;

use chrono::{Datelike, NaiveDate};

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

/// The fields of a bet, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetField {
    /// `NOMBRE`
    FirstName,
    /// `APELLIDO`
    LastName,
    /// `DOCUMENTO`
    Document,
    /// `NACIMIENTO`
    Birthdate,
    /// `NUMERO`
    Number,
    /// `AGENCY_ID`
    AgencyId,
}

impl BetField {
    /// The field's key on the wire.
    pub fn wire_key(self) -> &'static str {
        use crate::protocol::key;
        match self {
            BetField::FirstName => key::NOMBRE,
            BetField::LastName => key::APELLIDO,
            BetField::Document => key::DOCUMENTO,
            BetField::Birthdate => key::NACIMIENTO,
            BetField::Number => key::NUMERO,
            BetField::AgencyId => key::AGENCY_ID,
        }
    }
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
        Self::from_owned(
            agency,
            first_name.to_string(),
            last_name.to_string(),
            document.to_string(),
            birthdate.to_string(),
            number,
        )
    }

    /// [`Bet::from_fields`] for text already owned, which it keeps instead
    /// of copying (the central's decoder builds the strings anyway).
    ///
    /// # Errors
    /// As [`Bet::from_fields`].
    pub fn from_owned(
        agency: &str,
        first_name: String,
        last_name: String,
        document: String,
        birthdate: String,
        number: &str,
    ) -> Result<Bet, BetError> {
        let (agency, number) = check(
            agency,
            &first_name,
            &last_name,
            &document,
            &birthdate,
            number,
        )?;
        Ok(Bet {
            agency,
            first_name,
            last_name,
            document,
            birthdate,
            number,
        })
    }

    /// Whether this bet wins a draw of `winning_number`.
    pub fn is_winner(&self, winning_number: u16) -> bool {
        self.number == winning_number
    }
}

/// Every rule, in field order; returns the parsed agency and number.
fn check(
    agency: &str,
    first_name: &str,
    last_name: &str,
    document: &str,
    birthdate: &str,
    number: &str,
) -> Result<(AgencyId, u16), BetError> {
    let agency = parse_agency(agency)?;
    check_name(BetField::FirstName, first_name)?;
    check_name(BetField::LastName, last_name)?;
    check_document(document)?;
    check_birthdate(birthdate)?;
    Ok((agency, parse_number(number)?))
}

fn parse_agency(v: &str) -> Result<AgencyId, BetError> {
    match v.parse::<AgencyId>() {
        Ok(id) if id >= 1 && v.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(invalid(
            BetField::AgencyId,
            v,
            "not an agency id (1 or more)",
        )),
    }
}

fn check_name(field: BetField, v: &str) -> Result<(), BetError> {
    if v.trim().is_empty() {
        return Err(invalid(field, v, "empty"));
    }
    if v.chars().count() > MAX_NAME_CHARS {
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

fn check_birthdate(v: &str) -> Result<(), BetError> {
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
    let date = NaiveDate::from_ymd_opt(digits(0..4) as i32, digits(5..7), digits(8..10))
        .ok_or_else(|| invalid(BetField::Birthdate, v, "not a real calendar date"))?;
    if date > today() {
        return Err(invalid(BetField::Birthdate, v, "in the future"));
    }
    if date.year() < 1900 {
        return Err(invalid(BetField::Birthdate, v, "before 1900"));
    }
    Ok(())
}

/// Today's local date, looked up at most once a minute per thread: asking
/// the time zone for every bet would dominate batch validation.
fn today() -> NaiveDate {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: Cell<(u64, NaiveDate)> = const { Cell::new((0, NaiveDate::MIN)) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let (expires, date) = cache.get();
        if now < expires {
            return date;
        }
        let date = chrono::Local::now().date_naive();
        cache.set((now + 60, date));
        date
    })
}

fn parse_number(v: &str) -> Result<u16, BetError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(BetField::Number, v, "not a whole number"));
    }
    match v.parse::<u16>() {
        Ok(n) if n <= MAX_NUMBER => Ok(n),
        _ => Err(invalid(BetField::Number, v, "outside 0..=9999")),
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
}
