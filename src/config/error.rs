//! A configuration that cannot be used, and what says why.

use std::path::{Path, PathBuf};

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
    /// A file a setting names (a secrets file) cannot be read.
    #[error("cannot read {path}, named by {setting}: {source}")]
    ReadFile {
        /// The setting, with its variable.
        setting: &'static str,
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
    /// A configured secret is too weak to stand guessing (see
    /// [`secret_strength`](super::secret_strength)). The secret itself is never shown.
    #[error("{key}: the secret of {who} is {why}")]
    WeakSecret {
        /// `server.secrets.N`.
        key: String,
        /// `agency N`, or `the operator`.
        who: String,
        /// What is wrong, and what is accepted.
        why: String,
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

/// A TOML file that does not parse. The message stays on the lines toml
/// renders it on: its `^^^` marker points at the offending text only when
/// it sits under the quoted line.
pub(super) fn parse_error(path: &Path, e: &toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        // The error quotes the line, which may hold a database URL's
        // password.
        message: crate::store::target::hide_passwords(e.to_string().trim_end()),
    }
}
