//! Configuration: defaults, overlaid by `config.toml`, then by environment
//! variables, then by command-line flags.
//!
//! Every setting is declared once, in the `settings!` table of `settings.rs`: its
//! default, file key, variable, flag, bounds and help. The structs, their
//! defaults, the environment and flag overlays, the clap flags and the range
//! checks are all generated from it, so adding a setting is one edit. Every
//! error names the key (and the variable or flag that set it); `main` turns
//! any [`ConfigError`] into exit code 2.

mod address;
mod agency;
mod error;
mod load;
mod secrets;
mod server;
mod settings;
#[cfg(test)]
mod testing;
mod values;

pub use address::{AdminAddress, ServerAddresses};
pub use error::ConfigError;
pub use load::{parse_value, ConfigFile};
pub use secrets::{secret_strength, Secrets, MIN_SECRET_BITS, MIN_SECRET_DISTINCT, OPERATOR_KEY};
pub use settings::{
    add_flags, AgencyConfig, Config, LogConfig, ServerConfig, Setting, MAX_WINDOW, SETTINGS,
};

/// Which program reads the configuration: the log level comes from a
/// different variable for each (`LOGGING_LEVEL` or `CLI_LOG_LEVEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `lottery server`, `demo`, `gen-data`.
    Server,
    /// `lottery agency`.
    Agency,
}
