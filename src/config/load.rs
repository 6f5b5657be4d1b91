//! Loading: defaults, overlaid by the file, then the environment, then the
//! flags, and the one check of the result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::parse_error;
use super::secrets::{secret_key, SECRET_KEYS};
use super::settings::{Config, SETTINGS};
use super::{ConfigError, Role};

/// Where each value that is not the file's came from (key to variable or
/// flag), so a range error can name what the operator actually typed.
type Origins = BTreeMap<&'static str, String>;

impl Config {
    /// Loads `path` (a missing file means defaults), overlays variables read
    /// through `env`, and checks the result.
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
        Self::load_with_flags(path, role, env, None)
    }

    /// [`Config::load`], then the declared flags found in `flags` (the
    /// subcommand's matches of a command built with [`add_flags`](super::add_flags)), then the
    /// one check of the result.
    ///
    /// # Errors
    /// As [`Config::load`]; a flag's unreadable value names the flag.
    pub fn load_with_flags(
        path: &Path,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
        flags: Option<&clap::ArgMatches>,
    ) -> Result<Config, ConfigError> {
        Self::load_reporting(path, role, env, flags).map(|(config, _)| config)
    }

    /// [`Config::load_with_flags`], also saying which file it read (for the
    /// `config` log line, and a warning when a named file is missing).
    ///
    /// # Errors
    /// As [`Config::load_with_flags`].
    pub fn load_reporting(
        path: &Path,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
        flags: Option<&clap::ArgMatches>,
    ) -> Result<(Config, ConfigFile), ConfigError> {
        let (base, file) = read_file(path)?;
        let (config, origins) = Self::overlay(base, role, env, flags)?;
        config.check(&origins)?;
        Ok((config, file))
    }

    /// Defaults < file < environment < flags, unchecked.
    #[cfg(test)]
    fn layer(
        path: &Path,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
        flags: Option<&clap::ArgMatches>,
    ) -> Result<(Config, Origins), ConfigError> {
        Self::overlay(read_file(path)?.0, role, env, flags)
    }

    /// The environment, then the flags, over `config`.
    fn overlay(
        mut config: Config,
        role: Role,
        env: impl Fn(&str) -> Option<String>,
        flags: Option<&clap::ArgMatches>,
    ) -> Result<(Config, Origins), ConfigError> {
        let mut origins = Origins::new();
        for setting in SETTINGS {
            let Some(var) = setting.env_var(role) else {
                continue;
            };
            if let Some(raw) = env(var) {
                setting.apply(&mut config, var, &raw)?;
                origins.insert(setting.key, var.to_string());
            }
        }
        for setting in SETTINGS {
            let (Some(flag), Some(matches)) = (&setting.flag, flags) else {
                continue;
            };
            if let Some(raw) = setting.given(flag, matches) {
                let source = format!("--{}", flag.long);
                setting.apply(&mut config, &source, &raw)?;
                origins.insert(setting.key, source);
            }
        }
        Ok((config, origins))
    }

    /// Checks what the types alone do not: every declared bound and format,
    /// then the rules that tie settings together.
    ///
    /// # Errors
    /// The first bad value, named by its config key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(&Origins::new())
    }

    fn check(&self, origins: &Origins) -> Result<(), ConfigError> {
        for setting in SETTINGS {
            setting.check(self, origins.get(setting.key))?;
        }
        let bad = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                value,
                reason: reason.to_string(),
            })
        };
        if self.server.tls_cert.as_os_str().is_empty() != self.server.tls_key.as_os_str().is_empty()
        {
            return bad(
                "server.tls_key",
                self.server.tls_key.display().to_string(),
                "tls_cert and tls_key go together",
            );
        }
        if !self.server.tls_client_ca.as_os_str().is_empty() && !self.server.tls_enabled() {
            return bad(
                "server.tls_client_ca",
                self.server.tls_client_ca.display().to_string(),
                "client certificates need TLS: set server.tls_cert and server.tls_key too",
            );
        }
        let agency = &self.agency;
        if agency.tls_cert.as_os_str().is_empty() != agency.tls_key.as_os_str().is_empty() {
            return bad(
                "agency.tls_key",
                agency.tls_key.display().to_string(),
                "agency.tls_cert and agency.tls_key go together",
            );
        }
        if !agency.tls_cert.as_os_str().is_empty() && agency.tls_ca.as_os_str().is_empty() {
            return bad(
                "agency.tls_cert",
                agency.tls_cert.display().to_string(),
                "a client certificate needs TLS: set agency.tls_ca (CLI_TLS_CA) too",
            );
        }
        for id in self.server.secrets.keys() {
            if secret_key(id).is_none() {
                return bad("server.secrets", id.clone(), SECRET_KEYS);
            }
        }
        Ok(())
    }
}

/// Which configuration file a load read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFile {
    /// This file was read.
    Read(PathBuf),
    /// There is no file at this path: defaults, environment and flags only.
    Missing(PathBuf),
}

/// As the `config` log line shows it: the path read, or `none`.
impl fmt::Display for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigFile::Read(path) => write!(f, "{}", path.display()),
            ConfigFile::Missing(_) => f.write_str("none"),
        }
    }
}

/// The file's settings over the defaults; a missing file means defaults.
fn read_file(path: &Path) -> Result<(Config, ConfigFile), ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let config = toml::from_str::<Config>(&text).map_err(|e| parse_error(path, &e))?;
            Ok((config, ConfigFile::Read(path.to_path_buf())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((Config::default(), ConfigFile::Missing(path.to_path_buf())))
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
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
    use crate::config::settings::GLOBAL;
    use crate::config::testing::*;
    use crate::config::MAX_WINDOW;
    use crate::logging::LogLevel;

    #[test]
    fn missing_file_means_defaults() {
        let c = Config::load(Path::new(NOWHERE), Role::Server, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.port, 12345);
        assert_eq!(c.agency.batch_max_amount, 70);
    }

    #[test]
    fn the_load_says_which_file_it_read() {
        let load = |p: &Path| Config::load_reporting(p, Role::Server, env(&[]), None).unwrap();
        let (_, read) = load(Path::new(NOWHERE));
        assert_eq!(read, ConfigFile::Missing(NOWHERE.into()));
        assert_eq!(read.to_string(), "none");
        let f = file("[server]\nport = 4000\n");
        let (c, read) = load(f.path());
        assert_eq!(c.server.port, 4000);
        assert_eq!(read.to_string(), f.path().display().to_string());
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
    fn every_variable_beats_the_file_which_beats_the_default() {
        for role in ROLES {
            for s in SETTINGS {
                let Some(var) = s.env_var(role) else { continue };
                let [in_file, in_env] = s.samples;
                let f = file_setting(s, in_file);
                let (c, _) = Config::layer(f.path(), role, env(&[]), None).unwrap();
                assert_eq!(s.value(&c), in_file, "{} from the file", s.key);
                assert_ne!(s.value(&Config::default()), in_file, "{}", s.key);
                let (c, _) = Config::layer(f.path(), role, env(&[(var, in_env)]), None).unwrap();
                assert_eq!(s.value(&c), in_env, "{var} over the file");
            }
        }
    }

    #[test]
    fn every_flag_beats_the_variable() {
        for s in SETTINGS {
            let Some(flag) = s.flag else { continue };
            for &on in flag.on {
                let sub = if on == GLOBAL { "server" } else { on };
                let role = if sub == "agency" {
                    Role::Agency
                } else {
                    Role::Server
                };
                let var = s.env_var(role).expect("a flag's setting has a variable");
                let long = format!("--{}", flag.long);
                let (in_env, given, args) = match flag.switch {
                    Some(value) => {
                        let other = s.samples.into_iter().find(|&v| v != value).unwrap();
                        (other, value, vec!["lottery", sub, &long])
                    }
                    None => {
                        let [a, b] = s.samples;
                        (a, b, vec!["lottery", sub, &long, b])
                    }
                };
                let matches = command().try_get_matches_from(args).unwrap();
                let (_, sub_matches) = matches.subcommand().unwrap();
                let (c, origins) = Config::layer(
                    Path::new(NOWHERE),
                    role,
                    env(&[(var, in_env)]),
                    Some(sub_matches),
                )
                .unwrap();
                assert_eq!(s.value(&c), given, "{long} on {sub} over {var}");
                assert_eq!(origins[s.key], long);
            }
        }
    }

    #[test]
    fn every_bound_is_enforced_naming_key_and_variable() {
        let load = |var: &str, n: u64| {
            Config::load(
                Path::new(NOWHERE),
                Role::Server,
                env(&[(var, &n.to_string())]),
            )
        };
        for s in SETTINGS {
            let (lo, hi) = s.bounds();
            let Some(var) = s.env_var(Role::Server) else {
                assert_eq!(
                    (lo, hi),
                    (None, None),
                    "{}: a bound needs a variable",
                    s.key
                );
                continue;
            };
            if (lo, hi) == (None, None) {
                continue;
            }
            let lo = lo.unwrap_or(0);
            load(var, lo).unwrap_or_else(|e| panic!("{var}={lo}: {e}"));
            let mut outside = Vec::new();
            if lo > 0 {
                outside.push(lo - 1);
            }
            if let Some(hi) = hi {
                load(var, hi).unwrap_or_else(|e| panic!("{var}={hi}: {e}"));
                outside.push(hi + 1);
            }
            for n in outside {
                let e = load(var, n).unwrap_err().to_string();
                assert!(e.contains(s.key) && e.contains(var), "{var}={n}: {e}");
            }
        }
        assert_eq!(
            SETTINGS
                .iter()
                .find(|s| s.key == "agency.window")
                .unwrap()
                .bounds(),
            (Some(1), Some(MAX_WINDOW as u64))
        );
    }

    #[test]
    fn log_level_variable_depends_on_role() {
        let vars = env(&[("LOGGING_LEVEL", "ERROR"), ("CLI_LOG_LEVEL", "WARN")]);
        let p = Path::new(NOWHERE);
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
        let p = Path::new(NOWHERE);
        let e = Config::load(p, Role::Server, env(&[("SERVER_PORT", "http")])).unwrap_err();
        assert!(e.to_string().contains("SERVER_PORT"), "{e}");
        let f = file("[server]\nagencies = 0\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("server.agencies"), "{e}");
        let f = file("[server]\nprot = 1\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("prot"), "{e}");
        let f = file("[server]\nport = \"x\"\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let f = file("[server]\ntls_cert = \"c.pem\"\n");
        let e = Config::load(f.path(), Role::Server, env(&[])).unwrap_err();
        assert!(e.to_string().contains("server.tls_key"), "{e}");
        // TLS settings that only work together.
        for (text, key, says) in [
            (
                "[server]\ntls_client_ca = \"ca.pem\"\n",
                "server.tls_client_ca",
                "server.tls_cert",
            ),
            (
                "[agency]\ntls_cert = \"a.pem\"\n",
                "agency.tls_key",
                "go together",
            ),
            (
                "[agency]\ntls_cert = \"a.pem\"\ntls_key = \"a.key\"\n",
                "agency.tls_cert",
                "set agency.tls_ca (CLI_TLS_CA)",
            ),
        ] {
            let f = file(text);
            let e = Config::load(f.path(), Role::Agency, env(&[])).unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains(says),
                "{e}"
            );
        }
        let f = file(
            "[server]\ntls_cert = \"c.pem\"\ntls_key = \"c.key\"\ntls_client_ca = \"ca.pem\"\n",
        );
        let c = Config::load(f.path(), Role::Server, env(&[])).unwrap();
        assert!(c.server.requires_client_certificates());
        assert!(!Config::default().server.requires_client_certificates());
    }
}
