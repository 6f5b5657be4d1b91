//! Configuration: defaults, overlaid by `config.toml`, then by environment
//! variables, then by command-line flags (the last applied in `main`).
//!
//! Every error names the key (or variable) at fault, so an operator can fix
//! it without reading code; `main` turns any [`ConfigError`] into exit code 2.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::model::{AgencyId, MAX_NUMBER};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The central.
    pub server: ServerConfig,
    /// One agency.
    pub agency: AgencyConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[server]`: the central.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP port to listen on (0 picks a free one).
    pub port: u16,
    /// Backlog of the listening socket.
    pub listen_backlog: u32,
    /// Agencies that must finish before the draw.
    pub agencies: u32,
    /// The bets file.
    pub storage: PathBuf,
    /// The number that wins the draw.
    pub winning_number: u16,
    /// Sync the bets file before acknowledging a batch (`fdatasync`, shared
    /// by every batch waiting at the time). Off only for measurements.
    pub sync: bool,
    /// Where the draw's outcome is recorded; empty means beside the bets
    /// file, with the extension `.draw.toml`.
    pub draw_record: PathBuf,
    /// Most connections served at once; more are refused with `SERVER_BUSY`.
    pub max_connections: usize,
    /// Seconds a peer has to complete a frame once it has started one (and
    /// to complete the TLS handshake).
    pub frame_timeout: u64,
    /// Seconds a connection may sit with no request before it is closed.
    /// Waiting for the draw does not count: then the central is the one
    /// who owes an answer.
    pub idle_timeout: u64,
    /// Per-agency secrets, agency id to secret. When any are set (here or
    /// in `secrets_file`), every connection must open with `HELLO` and its
    /// agency's secret.
    pub secrets: BTreeMap<String, String>,
    /// A TOML file of the same `id = "secret"` pairs, kept out of the main
    /// configuration; empty for none.
    pub secrets_file: PathBuf,
    /// PEM certificate chain; with `tls_key`, the central speaks only TLS.
    pub tls_cert: PathBuf,
    /// PEM private key for `tls_cert`.
    pub tls_key: PathBuf,
}

impl ServerConfig {
    /// Every configured secret, inline and from `secrets_file`, by agency.
    ///
    /// # Errors
    /// The file cannot be read, or a key is not an agency id.
    pub fn load_secrets(&self) -> Result<BTreeMap<AgencyId, String>, ConfigError> {
        let mut all = self.secrets.clone();
        if !self.secrets_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&self.secrets_file).map_err(|source| {
                ConfigError::Read {
                    path: self.secrets_file.clone(),
                    source,
                }
            })?;
            let from_file: BTreeMap<String, String> =
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: self.secrets_file.clone(),
                    message: e.to_string().trim().replace('\n', " "),
                })?;
            all.extend(from_file);
        }
        all.into_iter()
            .map(|(id, secret)| {
                let agency: AgencyId = parse_value("server.secrets", &id)?;
                if secret.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: format!("server.secrets.{id}"),
                        value: String::new(),
                        reason: "a secret cannot be empty".into(),
                    });
                }
                Ok((agency, secret))
            })
            .collect()
    }

    /// Whether the central speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// [`ServerConfig::frame_timeout`] as a duration.
    pub fn frame_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.frame_timeout)
    }

    /// [`ServerConfig::idle_timeout`] as a duration.
    pub fn idle_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout)
    }

    /// The draw record's path, defaulted from the bets file's.
    pub fn draw_record_path(&self) -> PathBuf {
        if self.draw_record.as_os_str().is_empty() {
            self.storage.with_extension("draw.toml")
        } else {
            self.draw_record.clone()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            port: 12345,
            listen_backlog: 5,
            agencies: 5,
            storage: PathBuf::from("bets.csv"),
            winning_number: 7574,
            sync: true,
            draw_record: PathBuf::new(),
            max_connections: 1024,
            frame_timeout: 10,
            idle_timeout: 120,
            secrets: BTreeMap::new(),
            secrets_file: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
        }
    }
}

/// `[agency]`: one agency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgencyConfig {
    /// This agency's number.
    pub id: AgencyId,
    /// Where the central listens, `host:port`; host names resolve.
    pub server_address: String,
    /// The data file; `{id}` is replaced by the agency number.
    pub data_file: String,
    /// Most bets in one batch (a batch is also cut to fit a frame).
    pub batch_max_amount: usize,
    /// Seconds to keep reconnecting without progress before giving up.
    pub reconnect_timeout: u64,
    /// Batches sent ahead of their acknowledgements (1: wait for each).
    pub window: usize,
    /// This agency's secret, when the central requires one.
    pub secret: String,
    /// A file holding the secret (surrounding white space ignored); empty
    /// for none.
    pub secret_file: PathBuf,
    /// PEM certificate(s) of the authority that signed the central's
    /// certificate; set to speak TLS.
    pub tls_ca: PathBuf,
    /// Name to verify in the central's certificate; empty means the host
    /// part of `server_address`.
    pub tls_server_name: String,
}

impl AgencyConfig {
    /// The secret to present, from `secret` or `secret_file`.
    ///
    /// # Errors
    /// The secret file cannot be read.
    pub fn load_secret(&self) -> Result<Option<String>, ConfigError> {
        if !self.secret_file.as_os_str().is_empty() {
            let text =
                std::fs::read_to_string(&self.secret_file).map_err(|source| ConfigError::Read {
                    path: self.secret_file.clone(),
                    source,
                })?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok((!self.secret.is_empty()).then(|| self.secret.clone()))
    }

    /// The name the central's certificate must carry.
    pub fn tls_name(&self) -> String {
        if !self.tls_server_name.is_empty() {
            return self.tls_server_name.clone();
        }
        let host = self
            .server_address
            .rsplit_once(':')
            .map_or(self.server_address.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }

    /// [`AgencyConfig::reconnect_timeout`] as a duration.
    pub fn reconnect_patience(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reconnect_timeout)
    }
}

impl Default for AgencyConfig {
    fn default() -> Self {
        Self {
            id: 1,
            server_address: "127.0.0.1:12345".to_string(),
            data_file: ".data/agency-{id}.csv".to_string(),
            batch_max_amount: 70,
            reconnect_timeout: 60,
            window: 8,
            secret: String::new(),
            secret_file: PathBuf::new(),
            tls_ca: PathBuf::new(),
            tls_server_name: String::new(),
        }
    }
}

impl AgencyConfig {
    /// The data file path with `{id}` replaced.
    pub fn data_path(&self) -> PathBuf {
        PathBuf::from(self.data_file.replace("{id}", &self.id.to_string()))
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Least severe level printed.
    pub level: LogLevel,
    /// `text` (the contract's lines) or `json`.
    pub format: crate::logging::LogFormat,
}

/// A log level as operators write it: DEBUG, INFO, WARN or ERROR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Every event, including one line per bet.
    Debug,
    /// Normal operation.
    #[default]
    Info,
    /// Only problems.
    Warn,
    /// Only failures.
    Error,
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARN" | "WARNING" => Ok(LogLevel::Warn),
            "ERROR" => Ok(LogLevel::Error),
            _ => Err(format!("{s:?} is not one of DEBUG, INFO, WARN, ERROR")),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which program reads the configuration: the log level comes from a
/// different variable for each (`LOGGING_LEVEL` or `CLI_LOG_LEVEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `lottery server`, `demo`, `gen-data`.
    Server,
    /// `lottery agency`.
    Agency,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value (from any source) is out of range or unreadable.
    #[error("invalid {key} = {value:?}: {reason}")]
    Invalid {
        /// The key or variable, e.g. `server.port` or `SERVER_PORT`.
        key: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Loads `path` (a missing file means defaults) and overlays variables
    /// read through `env`, then checks the ranges.
    ///
    /// `env` is a lookup function rather than the process environment so
    /// tests can check precedence without touching global state.
    ///
    /// # Errors
    /// An unreadable or invalid file, or a bad value, as a [`ConfigError`].
    pub fn load(
        path: &Path,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string().trim().replace('\n', " "),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        config.apply_env(role, env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(
        &mut self,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn set<T: FromStr>(
            env: &impl Fn(&str) -> Option<String>,
            var: &str,
            slot: &mut T,
        ) -> Result<(), ConfigError>
        where
            T::Err: fmt::Display,
        {
            if let Some(raw) = env(var) {
                *slot = parse_value(var, &raw)?;
            }
            Ok(())
        }
        let s = &mut self.server;
        set(&env, "SERVER_PORT", &mut s.port)?;
        set(&env, "SERVER_LISTEN_BACKLOG", &mut s.listen_backlog)?;
        set(&env, "SERVER_AGENCIES", &mut s.agencies)?;
        set(&env, "SERVER_STORAGE", &mut s.storage)?;
        set(&env, "SERVER_WINNING_NUMBER", &mut s.winning_number)?;
        set(&env, "SERVER_SYNC", &mut s.sync)?;
        set(&env, "SERVER_DRAW_RECORD", &mut s.draw_record)?;
        set(&env, "SERVER_MAX_CONNECTIONS", &mut s.max_connections)?;
        set(&env, "SERVER_FRAME_TIMEOUT", &mut s.frame_timeout)?;
        set(&env, "SERVER_IDLE_TIMEOUT", &mut s.idle_timeout)?;
        set(&env, "SERVER_SECRETS_FILE", &mut s.secrets_file)?;
        set(&env, "SERVER_TLS_CERT", &mut s.tls_cert)?;
        set(&env, "SERVER_TLS_KEY", &mut s.tls_key)?;
        let a = &mut self.agency;
        set(&env, "CLI_ID", &mut a.id)?;
        set(&env, "CLI_SERVER_ADDRESS", &mut a.server_address)?;
        set(&env, "CLI_DATA_FILE", &mut a.data_file)?;
        set(&env, "CLI_BATCH_MAXAMOUNT", &mut a.batch_max_amount)?;
        set(&env, "CLI_RECONNECT_TIMEOUT", &mut a.reconnect_timeout)?;
        set(&env, "CLI_WINDOW", &mut a.window)?;
        set(&env, "CLI_SECRET", &mut a.secret)?;
        set(&env, "CLI_SECRET_FILE", &mut a.secret_file)?;
        set(&env, "CLI_TLS_CA", &mut a.tls_ca)?;
        set(&env, "CLI_TLS_SERVER_NAME", &mut a.tls_server_name)?;
        let level_var = match role {
            Role::Server => "LOGGING_LEVEL",
            Role::Agency => "CLI_LOG_LEVEL",
        };
        set(&env, level_var, &mut self.log.level)?;
        set(&env, "LOG_FORMAT", &mut self.log.format)?;
        Ok(())
    }

    /// Checks ranges that the types alone do not.
    ///
    /// # Errors
    /// The first out-of-range value, named by its config key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                value,
                reason: reason.to_string(),
            })
        };
        if self.server.agencies == 0 {
            return bad(
                "server.agencies",
                "0".into(),
                "at least one agency is needed",
            );
        }
        if self.server.listen_backlog == 0 {
            return bad("server.listen_backlog", "0".into(), "must be at least 1");
        }
        if self.server.winning_number > MAX_NUMBER {
            return bad(
                "server.winning_number",
                self.server.winning_number.to_string(),
                "must be within 0..=9999",
            );
        }
        if self.server.storage.as_os_str().is_empty() {
            return bad("server.storage", String::new(), "must name a file");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "0".into(), "must be at least 1");
        }
        if self.server.frame_timeout == 0 {
            return bad(
                "server.frame_timeout",
                "0".into(),
                "must be at least 1 second",
            );
        }
        if self.server.idle_timeout == 0 {
            return bad(
                "server.idle_timeout",
                "0".into(),
                "must be at least 1 second",
            );
        }
        if self.server.tls_cert.as_os_str().is_empty() != self.server.tls_key.as_os_str().is_empty()
        {
            return bad(
                "server.tls_key",
                self.server.tls_key.display().to_string(),
                "tls_cert and tls_key go together",
            );
        }
        for id in self.server.secrets.keys() {
            if id.parse::<AgencyId>().map_or(true, |a| a == 0) {
                return bad("server.secrets", id.clone(), "keys are agency ids");
            }
        }
        if self.agency.id == 0 {
            return bad("agency.id", "0".into(), "agency ids start at 1");
        }
        if self.agency.window == 0 {
            return bad("agency.window", "0".into(), "must be at least 1");
        }
        if self.agency.batch_max_amount == 0 {
            return bad("agency.batch_max_amount", "0".into(), "must be at least 1");
        }
        if !self.agency.server_address.contains(':') {
            return bad(
                "agency.server_address",
                self.agency.server_address.clone(),
                "must be host:port",
            );
        }
        Ok(())
    }
}

/// Parses `raw` for `key`, with an error that names both.
///
/// # Errors
/// [`ConfigError::Invalid`] when `raw` does not parse.
pub fn parse_value<T: FromStr>(key: &str, raw: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    raw.trim()
        .parse()
        .map_err(|e: T::Err| ConfigError::Invalid {
            key: key.to_string(),
            value: raw.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn missing_file_means_defaults() {
        let c = Config::load(
            Path::new("/nonexistent/config.toml"),
            Role::Server,
            env(&[]),
        )
        .unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.port, 12345);
        assert_eq!(c.agency.batch_max_amount, 70);
    }

    #[test]
    fn file_then_env_precedence() {
        let f = file("[server]\nport = 4000\nagencies = 3\n[log]\nlevel = \"DEBUG\"\n");
        let c = Config::load(f.path(), Role::Server, env(&[("SERVER_AGENCIES", "9")])).unwrap();
        assert_eq!(c.server.port, 4000, "file beats default");
        assert_eq!(c.server.agencies, 9, "env beats file");
        assert_eq!(c.log.level, LogLevel::Debug);
    }

    #[test]
    fn log_level_variable_depends_on_role() {
        let vars = env(&[("LOGGING_LEVEL", "ERROR"), ("CLI_LOG_LEVEL", "WARN")]);
        let p = Path::new("/nonexistent");
        assert_eq!(
            Config::load(p, Role::Server, &vars).unwrap().log.level,
            LogLevel::Error
        );
        assert_eq!(
            Config::load(p, Role::Agency, &vars).unwrap().log.level,
            LogLevel::Warn
        );
    }

    #[test]
    fn errors_name_the_key() {
        let p = Path::new("/nonexistent");
        let e = Config::load(p, Role::Server, env(&[("SERVER_PORT", "http")])).unwrap_err();
        assert!(e.to_string().contains("SERVER_PORT"), "{e}");
        let e = Config::load(p, Role::Server, env(&[("SERVER_AGENCIES", "0")])).unwrap_err();
        assert!(e.to_string().contains("server.agencies"), "{e}");
        let f = file("[server]\nprot = 1\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("prot"), "{e}");
        let f = file("[server]\nport = \"x\"\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn data_path_replaces_id() {
        let a = AgencyConfig {
            id: 4,
            ..AgencyConfig::default()
        };
        assert_eq!(a.data_path(), PathBuf::from(".data/agency-4.csv"));
    }
}
