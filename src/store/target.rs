//! [`Storage`]: what `server.storage` names, parsed once with the rest of
//! the configuration: the bets file, or a PostgreSQL database.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where the central keeps the bets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// The bets file (the embedded default): a path.
    File(PathBuf),
    /// A PostgreSQL database, from a URL in libpq's form.
    Postgres(Box<PgTarget>),
}

/// A PostgreSQL URL as given, and as `tokio-postgres` reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct PgTarget {
    /// The URL as written (it may hold a password: never logged).
    url: String,
    config: tokio_postgres::Config,
}

/// The URL schemes libpq accepts.
const SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

impl Default for Storage {
    fn default() -> Self {
        Storage::File("bets.csv".into())
    }
}

impl FromStr for Storage {
    type Err = String;

    /// A `postgres://` or `postgresql://` URL names a database; anything
    /// else is a file path.
    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if !SCHEMES.iter().any(|s| raw.starts_with(s)) {
            return Ok(Storage::File(PathBuf::from(raw)));
        }
        let config: tokio_postgres::Config = raw
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("a PostgreSQL URL must name a host".into());
        }
        // Nothing here speaks TLS to the database (`NoTls`): a URL that
        // requires it could never connect, and would be retried until the
        // patience ran out with the driver's words for why. Said at start.
        use tokio_postgres::config::SslMode;
        if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
            return Err(
                "sslmode=require asks for TLS to the database, which this program \
                 does not speak: leave sslmode out (or set it to disable) and keep the \
                 database on a trusted network, or reach it through a tunnel"
                    .into(),
            );
        }
        Ok(Storage::Postgres(Box::new(PgTarget {
            url: raw.to_string(),
            config,
        })))
    }
}

impl fmt::Display for Storage {
    /// The path, or the URL without its password (fit for a log line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::File(path) => write!(f, "{}", path.display()),
            Storage::Postgres(target) => write!(f, "{target}"),
        }
    }
}

impl Storage {
    /// The bets file, when the store is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Storage::File(path) => Some(path),
            Storage::Postgres(_) => None,
        }
    }
}

impl PgTarget {
    /// The connection settings.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The hosts and ports, `h1:5432,h2:5433`, for error messages.
    pub fn hosts(&self) -> String {
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let host = match host {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                // One port applies to every host; none means the default.
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for PgTarget {
    /// The URL with any password (in the user part or a `password=`
    /// parameter) replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PgTarget").field(&redact(&self.url)).finish()
    }
}

/// `raw` as it may be shown: a PostgreSQL URL without its password, any
/// other text as it is (for messages about a value that did not parse).
pub fn shown(raw: &str) -> String {
    if SCHEMES.iter().any(|s| raw.trim().starts_with(s)) {
        redact(raw)
    } else {
        raw.to_string()
    }
}

/// `text` (a message that may quote the configuration, such as a TOML
/// error's snippet) with every PostgreSQL URL in it shown without its
/// password.
pub fn hide_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = SCHEMES.iter().filter_map(|s| rest.find(s)).min() {
        out.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(url.len());
        out.push_str(&redact(&url[..end]));
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

/// `url` without its password.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_at(url.find("://").map_or(0, |i| i + 3));
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user, hosts)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(raw: &str) -> PgTarget {
        match raw.parse::<Storage>().unwrap() {
            Storage::Postgres(t) => *t,
            other => panic!("{raw} read as {other:?}"),
        }
    }

    #[test]
    fn a_path_is_a_file_and_a_url_a_database() {
        assert_eq!(
            "bets.csv".parse::<Storage>().unwrap(),
            Storage::File("bets.csv".into())
        );
        assert_eq!(
            "/data/my postgres://x".parse::<Storage>().unwrap().file(),
            Some(Path::new("/data/my postgres://x"))
        );
        let t = pg("postgres://lottery@db:5433/bets");
        assert_eq!(t.config().get_user(), Some("lottery"));
        assert_eq!(t.config().get_dbname(), Some("bets"));
        assert_eq!(t.hosts(), "db:5433");
    }

    #[test]
    fn several_hosts_and_read_write_sessions_are_read() {
        let t = pg("postgresql://u@h1:5432,h2:5433/lottery?target_session_attrs=read-write");
        assert_eq!(t.hosts(), "h1:5432,h2:5433");
        assert_eq!(
            t.config().get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
    }

    #[test]
    fn the_password_never_shows() {
        let s: Storage = "postgres://u:s3cret@h1,h2:6000/db?password=other&sslmode=disable"
            .parse()
            .unwrap();
        let shown = format!("{s} {s:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("other"),
            "{shown}"
        );
        assert_eq!(
            s.to_string(),
            "postgres://u:***@h1,h2:6000/db?password=***&sslmode=disable"
        );
        assert_eq!(
            "postgres://u@h/db".parse::<Storage>().unwrap().to_string(),
            "postgres://u@h/db"
        );
    }

    #[test]
    fn a_value_that_does_not_parse_is_shown_without_its_password() {
        assert_eq!(
            shown("postgres://u:s3cret@h/db?target_session_attrs=x"),
            "postgres://u:***@h/db?target_session_attrs=x"
        );
        assert_eq!(shown("a:b@c"), "a:b@c");
        assert_eq!(
            hide_passwords("2 | storage = \"postgresql://u:pw@h/d?x\" | ^^^ postgres://v:pw2@g"),
            "2 | storage = \"postgresql://u:***@h/d?x\" | ^^^ postgres://v:***@g"
        );
    }

    #[test]
    fn a_url_that_asks_for_tls_is_refused_as_nothing_here_speaks_it() {
        let err = "postgres://u@h/db?sslmode=require"
            .parse::<Storage>()
            .unwrap_err();
        assert!(err.starts_with("sslmode=require asks for TLS"), "{err}");
        for mode in ["disable", "prefer"] {
            let url = format!("postgres://u@h/db?sslmode={mode}");
            assert!(url.parse::<Storage>().is_ok(), "{url}");
        }
    }

    #[test]
    fn a_bad_url_is_refused() {
        let err = "postgres://u@h/db?target_session_attrs=nonsense"
            .parse::<Storage>()
            .unwrap_err();
        assert!(err.starts_with("not a PostgreSQL URL"), "{err}");
    }
}
