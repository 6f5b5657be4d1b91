//! Deterministic synthetic agency files, `agency-{N}.csv`, in the same shape
//! as real ones: Spanish names with accents and ñ, 8-digit documents, real
//! birthdates, and a chosen share of bets on the winning number.
//!
//! Each agency's file depends only on the seed and its own number, so
//! generating 3 or 20 agencies gives agency 1 the same file.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use chrono::{Days, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{AgencyId, MAX_NUMBER};

const FIRST_NAMES: &[&str] = &[
    "Santiago",
    "Mateo",
    "Tomás",
    "Agustín",
    "Joaquín",
    "Nicolás",
    "Martín",
    "Benjamín",
    "Lucía",
    "Sofía",
    "María",
    "Valentina",
    "Camila",
    "Martina",
    "Julián",
    "Ramón",
    "Inés",
    "Begoña",
    "Iñaki",
    "Germán",
    "Sebastián",
    "Emilia",
    "Zoe",
    "José",
    "Ángel",
    "Renata",
    "Maximiliano",
    "Facundo",
    "Lionel",
    "Catalina",
    "Ana",
    "Milagros",
    "Florencia",
    "Simón",
    "Andrés",
    "Noemí",
];

const LAST_NAMES: &[&str] = &[
    "González",
    "Rodríguez",
    "Fernández",
    "López",
    "Martínez",
    "Pérez",
    "Gómez",
    "Díaz",
    "Sánchez",
    "Romero",
    "Álvarez",
    "Núñez",
    "Muñoz",
    "Peña",
    "Ibáñez",
    "Acuña",
    "Castañeda",
    "Ordóñez",
    "Zúñiga",
    "Lorca",
    "Benítez",
    "Suárez",
    "Giménez",
    "Quiñones",
    "Montaña",
    "Cabañas",
    "Ríos",
    "Domínguez",
    "Ferreyra",
    "Sosa",
    "Aguirre",
    "Villalba",
    "Avendaño",
    "Echeverría",
];

/// Names that exercise every escaping and quoting rule: the protocol's own
/// `|`, `:` and `\`, and CSV's comma and double quote.
const TRICKY_NAMES: &[&str] = &[
    "Ana|María",
    "Juan:Carlos",
    "Luis\\Ángel",
    "Pérez, Ana",
    "O\"Neil",
    "Ñandú|:\\,\"",
    "D'Alessandro",
];

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Agencies `1..=agencies` get a file each.
    pub agencies: u32,
    /// Bets in each file.
    pub bets_per_agency: u64,
    /// Same seed, same files.
    pub seed: u64,
    /// The number that wins.
    pub winning_number: u16,
    /// Share of bets placed on the winning number (0.0..=1.0).
    pub winner_share: f64,
    /// Share of bets whose names hold `|`, `:`, `\`, `,` or `"` (0.0..=1.0).
    pub tricky_share: f64,
    /// End lines with CRLF instead of LF.
    pub crlf: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            agencies: 5,
            bets_per_agency: 20_000,
            seed: 7574,
            winning_number: 7574,
            winner_share: 0.0002,
            tricky_share: 0.0,
            crlf: false,
        }
    }
}

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The agency.
    pub agency: AgencyId,
    /// Where its file is.
    pub path: PathBuf,
    /// Bets written.
    pub bets: u64,
    /// Bets on the winning number.
    pub winners: u64,
}

/// Writes `agency-{N}.csv` for every agency into `dir` (created if needed).
///
/// # Errors
/// A bad share, or the files cannot be written.
pub fn generate(dir: &Path, opts: &GenOptions) -> io::Result<Vec<Generated>> {
    for (name, share) in [
        ("winner share", opts.winner_share),
        ("tricky share", opts.tricky_share),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} {share} is not within 0..=1"),
            ));
        }
    }
    std::fs::create_dir_all(dir)?;
    (1..=opts.agencies)
        .map(|agency| {
            let path = dir.join(format!("agency-{agency}.csv"));
            let winners = write_agency(&path, agency, opts)?;
            Ok(Generated {
                agency,
                path,
                bets: opts.bets_per_agency,
                winners,
            })
        })
        .collect()
}

fn write_agency(path: &Path, agency: AgencyId, opts: &GenOptions) -> io::Result<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        opts.seed ^ u64::from(agency).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let out = BufWriter::with_capacity(1 << 16, File::create(path)?);
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .terminator(if opts.crlf {
            csv::Terminator::CRLF
        } else {
            csv::Terminator::Any(b'\n')
        })
        .from_writer(out);
    let epoch = NaiveDate::from_ymd_opt(1940, 1, 1).expect("a real date");
    let mut winners = 0;
    for _ in 0..opts.bets_per_agency {
        let tricky = rng.random_bool(opts.tricky_share);
        let first = if tricky {
            TRICKY_NAMES[rng.random_range(0..TRICKY_NAMES.len())].to_string()
        } else if rng.random_bool(0.3) {
            // Two given names, like "Santiago Lionel".
            format!(
                "{} {}",
                FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())],
                FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())]
            )
        } else {
            FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())].to_string()
        };
        let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
        let document = rng.random_range(10_000_000u32..=45_999_999);
        // 1940-01-01 plus up to ~65 years: always a real date in the past.
        let birthdate = epoch + Days::new(rng.random_range(0..23_700));
        let number = if rng.random_bool(opts.winner_share) {
            winners += 1;
            opts.winning_number
        } else {
            // Any other number, so the winner count is exactly what was drawn.
            let n = rng.random_range(0..MAX_NUMBER);
            if n >= opts.winning_number {
                n + 1
            } else {
                n
            }
        };
        w.write_record([
            first.as_str(),
            last,
            &document.to_string(),
            &birthdate.format("%Y-%m-%d").to_string(),
            &number.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(winners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_files_and_exact_winner_count() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            agencies: 2,
            bets_per_agency: 2_000,
            winner_share: 0.01,
            tricky_share: 0.05,
            ..GenOptions::default()
        };
        let ga = generate(a.path(), &opts).unwrap();
        generate(
            b.path(),
            &GenOptions {
                agencies: 3,
                ..opts.clone()
            },
        )
        .unwrap();
        for g in &ga {
            let bytes = std::fs::read(&g.path).unwrap();
            assert_eq!(
                bytes,
                std::fs::read(b.path().join(format!("agency-{}.csv", g.agency))).unwrap()
            );
            let text = String::from_utf8(bytes).unwrap();
            let mut rows = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(text.as_bytes());
            let mut n = 0;
            let mut winners = 0;
            for r in rows.records() {
                let r = r.unwrap();
                crate::model::Bet::from_fields("1", &r[0], &r[1], &r[2], &r[3], &r[4]).unwrap();
                n += 1;
                winners += u64::from(&r[4] == "7574");
            }
            assert_eq!(n, 2_000);
            assert_eq!(winners, g.winners);
            assert!(winners > 0);
        }
        assert_ne!(
            std::fs::read(&ga[0].path).unwrap(),
            std::fs::read(&ga[1].path).unwrap(),
            "agencies get different bets"
        );
    }
}
