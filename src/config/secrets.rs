//! The central's secrets (inline and from `server.secrets_file`) and the
//! strength a secret must have.

use std::collections::BTreeMap;

use super::error::parse_error;
use super::settings::ServerConfig;
use super::ConfigError;
use crate::model::AgencyId;

impl ServerConfig {
    /// Every configured secret, inline and from `secrets_file`, checked:
    /// when any agency has one, every configured agency (`1..=agencies`)
    /// must have one too.
    ///
    /// # Errors
    /// The file cannot be read, a key is neither an agency id nor
    /// `operator`, a secret is empty, a configured agency has no secret
    /// while others have one, or a secret is too weak (see
    /// [`secret_strength`]); the error names whose.
    pub fn load_secrets(&self) -> Result<Secrets, ConfigError> {
        let secrets = self.read_secrets()?;
        let open = self.agencies_without_secret(&secrets);
        // All open is authentication off (warned about at start); some
        // open while others are not is a mistake that would leave those
        // agencies' winners to anyone.
        if let (Some(first), false) = (open.first(), open.len() == self.agencies as usize) {
            return Err(ConfigError::Invalid {
                key: format!("server.secrets.{first}"),
                value: String::new(),
                reason: format!(
                    "agency {first} has no secret while other agencies have one (agencies \
                     without one: {}); give every agency in 1..={} a secret",
                    list(&open),
                    self.agencies
                ),
            });
        }
        let weak = secrets
            .agencies
            .iter()
            .map(|(id, secret)| (format!("agency {id}"), id.to_string(), secret))
            .chain(
                secrets
                    .operator
                    .iter()
                    .map(|secret| ("the operator".to_string(), OPERATOR_KEY.to_string(), secret)),
            )
            .find_map(|(who, key, secret)| {
                secret_strength(secret).err().map(|why| (who, key, why))
            });
        if let Some((who, key, why)) = weak {
            return Err(ConfigError::WeakSecret {
                key: format!("server.secrets.{key}"),
                who,
                why,
            });
        }
        Ok(secrets)
    }

    /// The secrets as written, inline and from `secrets_file`, without the
    /// check that every agency has one (operator tools need only theirs).
    ///
    /// # Errors
    /// The file cannot be read, a key is neither an agency id nor
    /// `operator`, or a secret is empty.
    pub fn read_secrets(&self) -> Result<Secrets, ConfigError> {
        let mut all = self.secrets.clone();
        if !self.secrets_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&self.secrets_file).map_err(|source| {
                ConfigError::ReadFile {
                    setting: "server.secrets_file (SERVER_SECRETS_FILE)",
                    path: self.secrets_file.clone(),
                    source,
                }
            })?;
            let from_file: BTreeMap<String, String> =
                toml::from_str(&text).map_err(|e| parse_error(&self.secrets_file, &e))?;
            all.extend(from_file);
        }
        let mut secrets = Secrets::default();
        for (id, secret) in all {
            let Some(key) = secret_key(&id) else {
                return Err(ConfigError::Invalid {
                    key: "server.secrets".into(),
                    value: id,
                    reason: SECRET_KEYS.into(),
                });
            };
            if secret.is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("server.secrets.{id}"),
                    value: String::new(),
                    reason: "a secret cannot be empty".into(),
                });
            }
            match key {
                SecretKey::Agency(agency) => {
                    secrets.agencies.insert(agency, secret);
                }
                SecretKey::Operator => secrets.operator = Some(secret),
            }
        }
        Ok(secrets)
    }

    /// The configured agencies (`1..=agencies`) that can act without
    /// authenticating. The one place that decides it: another way to
    /// authenticate (a client certificate, say) belongs here.
    pub fn agencies_without_secret(&self, secrets: &Secrets) -> Vec<AgencyId> {
        if self.requires_client_certificates() {
            // Every connection presents a certificate that names its agency.
            return Vec::new();
        }
        (1..=self.agencies)
            .filter(|id| !secrets.agencies.contains_key(id))
            .collect()
    }
}

/// The secrets the central checks, by who presents them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Per agency; empty when authentication is off.
    pub agencies: BTreeMap<AgencyId, String>,
    /// Opens an operator session (`PING`, `STATUS`, `CLOSE`), so that
    /// `lottery status` never has to speak as an agency.
    pub operator: Option<String>,
}

impl Secrets {
    /// Whether connections must authenticate.
    pub fn required(&self) -> bool {
        !self.agencies.is_empty()
    }
}

/// The key of the operator's secret in `server.secrets` and its file.
pub const OPERATOR_KEY: &str = "operator";

/// What the keys of `server.secrets` may be.
pub(super) const SECRET_KEYS: &str = "keys are agency ids or \"operator\"";

/// Whose secret a key of `server.secrets` names.
pub(super) enum SecretKey {
    Agency(AgencyId),
    Operator,
}

pub(super) fn secret_key(key: &str) -> Option<SecretKey> {
    if key == OPERATOR_KEY {
        return Some(SecretKey::Operator);
    }
    match key.parse::<AgencyId>() {
        Ok(0) | Err(_) => None,
        Ok(agency) => Some(SecretKey::Agency(agency)),
    }
}

/// Least strength of a secret, in bits.
pub const MIN_SECRET_BITS: u32 = 128;

/// Fewest different characters in a secret: a random one of any accepted
/// length has many more; "aaaa…" or "abab…" have fewer.
pub const MIN_SECRET_DISTINCT: usize = 8;

/// The strength of a secret, in bits: its length in characters times the
/// bits of one character of the smallest alphabet that holds all of them
/// (digits 3.3, hex digits of one case 4, letters of one case and digits
/// 5.2, letters and digits 5.9, those and `+/=_-` 6, printable ASCII 6.6,
/// and 6.6 for any other character). It is what a secret drawn at random
/// from that alphabet would have, so it is an upper bound: it refuses what
/// is surely weak (short, or made of few characters) and leaves randomness
/// to whoever makes the secret (`lottery secrets` writes 64 hex digits,
/// 256 bits).
///
/// # Errors
/// Weaker than [`MIN_SECRET_BITS`], or fewer than [`MIN_SECRET_DISTINCT`]
/// different characters: why, and what is accepted.
pub fn secret_strength(secret: &str) -> Result<u32, String> {
    let all = |f: fn(char) -> bool| secret.chars().all(f);
    let alphabet: u32 = if all(|c| c.is_ascii_digit()) {
        10
    } else if all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        || all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
    {
        16
    } else if all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        || all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    {
        36
    } else if all(|c| c.is_ascii_alphanumeric()) {
        62
    } else if all(|c| c.is_ascii_alphanumeric() || "+/=_-".contains(c)) {
        64
    } else {
        95
    };
    let chars = secret.chars().count();
    let bits = (chars as f64 * f64::from(alphabet).log2()) as u32;
    let distinct = secret
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let accepted = format!(
        "a secret needs at least {MIN_SECRET_BITS} bits: 32 hex digits, 22 letters and \
         digits, or 20 printable characters, drawn at random (`lottery secrets` writes \
         256-bit ones)"
    );
    if bits < MIN_SECRET_BITS {
        return Err(format!(
            "too weak: {chars} characters of a {alphabet}-character alphabet are at most \
             {bits} bits; {accepted}"
        ));
    }
    if distinct < MIN_SECRET_DISTINCT {
        return Err(format!(
            "too weak: only {distinct} different characters (a random secret has many \
             more); {accepted}"
        ));
    }
    Ok(bits)
}

/// `1, 2, 5` for messages.
fn list(ids: &[AgencyId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use crate::config::{Config, Role};

    #[test]
    fn an_agency_without_a_secret_among_others_is_named() {
        let f = file(&format!(
            "1 = \"{STRONG}1\"\n3 = \"{STRONG}3\"\noperator = \"{STRONG}op\"\n"
        ));
        let server = ServerConfig {
            agencies: 4,
            secrets_file: f.path().to_path_buf(),
            ..ServerConfig::default()
        };
        let e = server.load_secrets().unwrap_err().to_string();
        assert!(e.contains("server.secrets.2"), "{e}");
        assert!(
            e.contains("agency 2 has no secret while other agencies have one"),
            "{e}"
        );
        assert!(e.contains("without one: 2, 4"), "{e}");
        // What operator tools read needs no completeness.
        let read = server.read_secrets().unwrap();
        assert_eq!(read.operator, Some(format!("{STRONG}op")));
        assert_eq!(read.agencies.len(), 2);
        // Every configured agency has one: fine, extra ids too.
        let server = ServerConfig {
            agencies: 1,
            ..server
        };
        let secrets = server.load_secrets().unwrap();
        assert!(secrets.required());
        assert!(server.agencies_without_secret(&secrets).is_empty());
    }

    /// 32 random hex digits: 128 bits, the least accepted.
    const STRONG: &str = "3f9a0c71d2e84b6a95c0e1f7a2b3d4c5";

    #[test]
    fn a_secret_is_as_strong_as_its_length_over_its_alphabet() {
        let bits = |s: &str| secret_strength(s);
        assert_eq!(bits(STRONG), Ok(128), "32 hex digits");
        assert_eq!(bits(&STRONG.to_uppercase()), Ok(128));
        assert!(bits(&STRONG[1..]).is_err(), "31 hex digits: 124 bits");
        assert_eq!(bits(&crate::tools::launch::new_secret()), Ok(256));
        assert!(
            bits("Kq3ZtR8wPx2LmN7vBy4Hc").is_err(),
            "21 letters and digits: 125 bits"
        );
        assert_eq!(
            bits("Kq3ZtR8wPx2LmN7vBy4HcJ"),
            Ok(130),
            "22 letters and digits"
        );
        assert_eq!(
            bits("k!3Z~R8w;x2L m7v#y4("),
            Ok(131),
            "20 printable characters"
        );
        assert!(
            bits("12345678901234567890123456789012345678").is_err(),
            "38 digits"
        );
        assert!(bits("dos-secreto").unwrap_err().contains("at most 66 bits"));
        let repeated = "ab".repeat(40);
        let e = bits(&repeated).unwrap_err();
        assert!(e.contains("only 2 different characters"), "{e}");
        assert!(e.contains("lottery secrets"), "{e}");
    }

    #[test]
    fn a_weak_secret_is_refused_naming_whose_it_is() {
        for (text, key, who) in [
            (
                format!("1 = \"{STRONG}\"\n2 = \"dos-secreto\"\n"),
                "server.secrets.2",
                "agency 2",
            ),
            (
                format!("1 = \"{STRONG}\"\n2 = \"{STRONG}\"\noperator = \"operador\"\n"),
                "server.secrets.operator",
                "the operator",
            ),
        ] {
            let f = file(&text);
            let server = ServerConfig {
                agencies: 2,
                secrets_file: f.path().to_path_buf(),
                ..ServerConfig::default()
            };
            let e = server.load_secrets().unwrap_err();
            assert!(matches!(e, ConfigError::WeakSecret { .. }), "{e}");
            let e = e.to_string();
            assert!(
                e.starts_with(&format!("{key}: the secret of {who} is too weak")),
                "{e}"
            );
            assert!(
                !e.contains("secreto") && !e.contains("operador"),
                "never shown: {e}"
            );
        }
    }

    #[test]
    fn no_secrets_at_all_leaves_every_agency_open() {
        let server = ServerConfig {
            agencies: 3,
            ..ServerConfig::default()
        };
        let secrets = server.load_secrets().unwrap();
        assert!(!secrets.required());
        assert_eq!(server.agencies_without_secret(&secrets), [1, 2, 3]);
        let f = file("[server.secrets]\nadmin = \"x\"\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("agency ids or \"operator\""), "{e}");
    }
}
