//! The `settings!` table: every setting's default, file key, variable,
//! flag, bounds and help, and the clap flags made from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::address::{AdminAddress, ServerAddresses};
use super::values::Value;
use super::{ConfigError, Role};
use crate::logging::{LogFormat, LogLevel};
use crate::model::{AgencyId, MAX_NUMBER};
use crate::store::target::Storage;

/// Most batches an agency may keep in flight (`agency.window`): the central
/// reads no further from a connection that has this many unanswered.
pub const MAX_WINDOW: usize = 64;

/// Subcommand name in a flag's `on` list that makes the flag global.
pub(super) const GLOBAL: &str = "*";

/// Declares the settings. Each line reads
/// `field: type = default, env VAR, flag "long" on [subcommands], min N,
/// max N, check fn;` where everything after the default is optional, in
/// that order. `env (A, B)` names the server's and the agency's variable;
/// `flag ("long" = "value")` is a switch that sets `value`.
macro_rules! settings {
    (@env) => { Env::None };
    (@env $var:literal) => { Env::Var($var) };
    (@env ($server:literal, $agency:literal)) => {
        Env::ByRole { server: $server, agency: $agency }
    };
    (@flag) => { None };
    (@flag $long:literal on [$($on:literal),*]) => {
        Some(Flag { long: $long, switch: None, on: &[$($on),*] })
    };
    (@flag ($long:literal = $value:literal) on [$($on:literal),*]) => {
        Some(Flag { long: $long, switch: Some($value), on: &[$($on),*] })
    };
    (@opt) => { None };
    (@opt $e:expr) => { Some($e) };
    (
        $(
            $(#[doc = $sdoc:literal])*
            $section:ident: $Section:ident {
                $(
                    $(#[doc = $doc:literal])*
                    $field:ident: $ty:ty = $default:expr
                    $(, env $env:tt)?
                    $(, flag $flag:tt on [$($on:literal),*])?
                    $(, min $min:expr)?
                    $(, max $max:expr)?
                    $(, check $check:expr)?;
                )*
            }
        )*
    ) => {
        /// The whole configuration.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $sdoc])* pub $section: $Section, )*
        }

        $(
            $(#[doc = $sdoc])*
            #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
            #[serde(default, deny_unknown_fields)]
            pub struct $Section {
                $( $(#[doc = $doc])* pub $field: $ty, )*
            }

            impl Default for $Section {
                fn default() -> Self {
                    Self { $( $field: $default, )* }
                }
            }
        )*

        /// Every setting, in declaration order (the order of `config.toml`).
        pub static SETTINGS: &[Setting] = &[
            $( $( Setting {
                key: concat!(stringify!($section), ".", stringify!($field)),
                help: concat!($($doc),*),
                env: settings!(@env $($env)?),
                flag: settings!(@flag $($flag on [$($on),*])?),
                min: settings!(@opt $($min)?),
                max: settings!(@opt $($max)?),
                check: settings!(@opt $($check)?),
                hint: <$ty as Value>::HINT,
                get: {
                    fn get(c: &Config) -> String {
                        Value::show(&c.$section.$field)
                    }
                    get
                },
                set: {
                    fn set(c: &mut Config, raw: &str) -> Result<(), String> {
                        c.$section.$field = Value::parse(raw)?;
                        Ok(())
                    }
                    set
                },
                #[cfg(test)]
                samples: <$ty as Value>::SAMPLES,
                #[cfg(test)]
                quoted: <$ty as Value>::QUOTED,
            }, )* )*
        ];
    };
}

settings! {
    /// `[server]`: the central.
    server: ServerConfig {
        /// TCP port to listen on (0 picks a free one).
        port: u16 = 12345, env "SERVER_PORT", flag "port" on ["server"];
        /// Backlog of the listening socket.
        listen_backlog: u32 = 5, env "SERVER_LISTEN_BACKLOG",
            flag "listen-backlog" on ["server"], min 1;
        /// Agencies that must finish before the draw.
        agencies: u32 = 5, env "SERVER_AGENCIES",
            flag "agencies" on ["server", "gen-data", "verify", "new-round"], min 1;
        /// Where the bets are kept: the bets file's path, or a PostgreSQL
        /// database as a libpq URL (`postgres://user@host:port/db`, several
        /// hosts allowed).
        storage: Storage = Storage::default(), env "SERVER_STORAGE",
            flag "storage" on ["server", "verify", "new-round", "winners"],
            check not_empty;
        /// Seconds the central keeps trying to reach its database at start
        /// (PostgreSQL storage), retrying with backoff, before it exits 1.
        storage_connect_timeout: u64 = 30, env "SERVER_STORAGE_CONNECT_TIMEOUT", min 1;
        /// The number that wins the draw.
        winning_number: u16 = 7574, env "SERVER_WINNING_NUMBER",
            flag "winning-number" on ["server", "gen-data", "verify", "new-round"],
            max MAX_NUMBER as u64;
        /// Sync the bets file before acknowledging a batch (`fdatasync`, shared
        /// by every batch waiting at the time); `--no-sync` turns it off, only
        /// for measurements.
        sync: bool = true, env "SERVER_SYNC", flag ("no-sync" = "false") on ["server", "demo"];
        /// Where the draw's outcome is recorded (with the bets file; a
        /// database keeps it in a table); empty means beside the bets file,
        /// its extension replaced (`bets.csv` -> `bets.draw.toml`).
        draw_record: PathBuf = PathBuf::new(), env "SERVER_DRAW_RECORD",
            flag "draw-record" on ["server", "verify", "new-round"];
        /// When the central closes sales by itself: an RFC 3339 time
        /// (`2026-12-07T18:00:00-03:00`); empty for never (the draw waits
        /// for every agency, or for `lottery close`). Batches after it are
        /// refused (`BETTING_CLOSED`) and the draw runs over the bets stored.
        /// A time already past when a round that is neither closed nor
        /// drawn starts is an error.
        close_at: crate::close::CloseAt = crate::close::CloseAt::default(),
            env "SERVER_CLOSE_AT", flag "close-at" on ["server"];
        /// Most connections served at once; more are refused with `SERVER_BUSY`.
        max_connections: usize = 1024, env "SERVER_MAX_CONNECTIONS", min 1;
        /// Seconds a peer has to complete a frame once it has started one
        /// (counting only while the central is reading), and to complete the
        /// TLS handshake; also each reply's write deadline.
        frame_timeout: u64 = 10, env "SERVER_FRAME_TIMEOUT", min 1;
        /// Seconds a connection may sit with no request before it is closed.
        /// Waiting for the draw does not count: then the central is the one
        /// who owes an answer.
        idle_timeout: u64 = 120, env "SERVER_IDLE_TIMEOUT", min 1;
        /// Seconds a new connection has to authenticate (`HELLO` with its
        /// secret; where authentication is off, its first valid request)
        /// before it is closed. Short: only strangers ever need long.
        auth_timeout: u64 = 10, env "SERVER_AUTH_TIMEOUT", min 1;
        /// Most connections from one IP address that have not authenticated
        /// yet; more from it are refused with `SERVER_BUSY`. Agencies behind
        /// one address (a NAT) need one each only while they connect.
        max_unauthenticated_per_address: usize = 32,
            env "SERVER_MAX_UNAUTHENTICATED_PER_ADDRESS", min 1;
        /// Seconds shutdown waits for connections to finish what they
        /// started; the store then has 2 s more to close, so the central
        /// exits within this plus 3 s of the signal.
        shutdown_grace: u64 = 5, env "SERVER_SHUTDOWN_GRACE", min 1, max 6;
        /// Per-agency secrets, agency id to secret, and `operator` for the
        /// operator session (`lottery status`, `lottery close`). When any
        /// agency has one (here or in `secrets_file`), every configured
        /// agency must, and every connection must open with `HELLO` and its
        /// secret.
        secrets: BTreeMap<String, String> = BTreeMap::new();
        /// A TOML file of the same `id = "secret"` pairs, kept out of the main
        /// configuration; empty for none.
        secrets_file: PathBuf = PathBuf::new(), env "SERVER_SECRETS_FILE";
        /// PEM certificate chain; with `tls_key`, the central speaks only TLS.
        tls_cert: PathBuf = PathBuf::new(), env "SERVER_TLS_CERT";
        /// PEM private key for `tls_cert`.
        tls_key: PathBuf = PathBuf::new(), env "SERVER_TLS_KEY";
        /// Largest frame accepted from an agency, in bytes, header included.
        /// The contract's limit is 8192; raise it only for legacy agencies
        /// configured with batches too large for it (a frame refused for
        /// size loses the batch). At most 64 KiB: each connection may buffer
        /// one frame.
        max_frame: usize = crate::wire::MAX_FRAME_LEN, env "SERVER_MAX_FRAME",
            flag "max-frame" on ["server"], min crate::wire::MAX_FRAME_LEN as u64,
            max 65536;
        /// PEM certificate(s) of the authority that signs agency certificates;
        /// set (with `tls_cert`) to require a client certificate from every
        /// connection and take the agency from it (a DNS name `agency-N`).
        tls_client_ca: PathBuf = PathBuf::new(), env "SERVER_TLS_CLIENT_CA";
        /// Where the admin listener serves `/metrics` (Prometheus), the
        /// status page `/`, and `/healthz` and `/readyz`, as `IP:PORT`; empty
        /// keeps it off. A port of its own, never the agencies': bind it to
        /// loopback or a private network. Its pages ask for the operator's
        /// secret (`operator` in the secrets) when one is configured; the
        /// probes never do.
        admin_address: AdminAddress = AdminAddress::default(), env "SERVER_ADMIN_ADDRESS",
            flag "admin-address" on ["server"];
    }

    /// `[agency]`: one agency.
    agency: AgencyConfig {
        /// This agency's number.
        id: AgencyId = 1, env "CLI_ID", flag "id" on ["agency"], min 1;
        /// Where the central listens, `host:port`, or several centrals sharing
        /// one database, comma-separated (`c1:12345,c2:12345`): the agency
        /// connects to one that answers, in this order, and moves on to the
        /// next when its connection fails. Host names resolve.
        server_address: ServerAddresses = SocketAddr::from(([127, 0, 0, 1], 12345)).into(),
            env "CLI_SERVER_ADDRESS", flag "server-address" on ["agency"];
        /// The data file; `{id}` is replaced by the agency number.
        data_file: String = ".data/agency-{id}.csv".into(), env "CLI_DATA_FILE",
            flag "data-file" on ["agency"];
        /// Most bets in one batch (a batch is also cut to fit a frame).
        batch_max_amount: usize = 70, env "CLI_BATCH_MAXAMOUNT",
            flag "batch-max-amount" on ["agency"], min 1;
        /// Seconds to keep reconnecting without progress before giving up.
        reconnect_timeout: u64 = 60, env "CLI_RECONNECT_TIMEOUT",
            flag "reconnect-timeout" on ["agency"];
        /// Seconds to wait for each reply of the central. While waiting for
        /// the draw it restarts on each of the central's still-waiting frames
        /// (sent every 5 s), so there it is never less than 10 s.
        reply_timeout: u64 = 30, env "CLI_REPLY_TIMEOUT",
            flag "reply-timeout" on ["agency"], min 1;
        /// Seconds to wait for the answer to `HELLO`. A central silent that
        /// long is taken for the design's reference central: the agency then
        /// speaks the reference protocol (one batch at a time, no resuming).
        /// With several addresses it is taken for a hung central instead, and
        /// the agency moves on to the next.
        hello_timeout: u64 = 5, env "CLI_HELLO_TIMEOUT",
            flag "hello-timeout" on ["agency"], min 2;
        /// Seconds to wait for the winners from a reference central, which
        /// sends no still-waiting frames while the other agencies finish.
        draw_timeout: u64 = 3600, env "CLI_DRAW_TIMEOUT",
            flag "draw-timeout" on ["agency"], min 1;
        /// Batches sent ahead of their acknowledgements (1: wait for each).
        window: usize = 8, env "CLI_WINDOW", flag "window" on ["agency", "demo", "bench"],
            min 1, max MAX_WINDOW as u64;
        /// This agency's secret, when the central requires one.
        secret: String = String::new(), env "CLI_SECRET";
        /// A file holding the secret (surrounding white space ignored); empty
        /// for none.
        secret_file: PathBuf = PathBuf::new(), env "CLI_SECRET_FILE";
        /// Where the agency keeps the seal its winners came with, to compare
        /// on every later run over the same data file; `{id}` is replaced.
        /// Empty means beside the data file (`agency-3.csv.seal`).
        seal_file: String = String::new(), env "CLI_SEAL_FILE";
        /// PEM certificate(s) of the authority that signed the central's
        /// certificate; set to speak TLS.
        tls_ca: PathBuf = PathBuf::new(), env "CLI_TLS_CA";
        /// Name to verify in the central's certificate; empty means the host
        /// part of the address of `server_address` being dialled.
        tls_server_name: String = String::new(), env "CLI_TLS_SERVER_NAME";
        /// PEM certificate chain this agency presents to a central that
        /// requires client certificates (it names the agency: `agency-N`).
        tls_cert: PathBuf = PathBuf::new(), env "CLI_TLS_CERT";
        /// PEM private key for the agency's `tls_cert`.
        tls_key: PathBuf = PathBuf::new(), env "CLI_TLS_KEY";
    }

    /// `[log]`.
    log: LogConfig {
        /// Least severe level printed: DEBUG, INFO, WARN or ERROR.
        level: LogLevel = LogLevel::Info, env ("LOGGING_LEVEL", "CLI_LOG_LEVEL"),
            flag "log-level" on ["server", "agency"];
        /// `text` (the contract's lines) or `json` (one object a line).
        format: LogFormat = LogFormat::Text, env "LOG_FORMAT", flag "log-format" on ["*"];
    }
}

fn not_empty(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must name a file or a postgres:// URL");
    }
    Ok(())
}

/// The environment variable(s) of a setting.
#[derive(Debug, Clone, Copy)]
pub(super) enum Env {
    /// Set in the file only.
    None,
    /// One variable for every program.
    Var(&'static str),
    /// The contract gives the server and the agency different names.
    ByRole {
        server: &'static str,
        agency: &'static str,
    },
}

/// A setting's command-line flag.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flag {
    /// `--long`.
    pub(super) long: &'static str,
    /// For a switch (no value), the value it sets.
    pub(super) switch: Option<&'static str>,
    /// The subcommands that take it; `*` for all of them.
    pub(super) on: &'static [&'static str],
}

/// A format rule on a setting's text, beyond its bounds.
pub(super) type Check = fn(&str) -> Result<(), &'static str>;

/// One setting as declared: what the generic overlays, clap and the checks
/// need to know about it.
#[derive(Debug)]
pub struct Setting {
    pub(super) key: &'static str,
    pub(super) help: &'static str,
    pub(super) env: Env,
    pub(super) flag: Option<Flag>,
    pub(super) min: Option<u64>,
    pub(super) max: Option<u64>,
    pub(super) check: Option<Check>,
    /// What a value looks like, for `--help`.
    pub(super) hint: &'static str,
    pub(super) get: fn(&Config) -> String,
    pub(super) set: fn(&mut Config, &str) -> Result<(), String>,
    /// Two distinct valid values, for the table-driven tests.
    #[cfg(test)]
    pub(super) samples: [&'static str; 2],
    /// Whether a value is a TOML string.
    #[cfg(test)]
    pub(super) quoted: bool,
}

impl Setting {
    /// The file key, `section.field`.
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// The help text (the declaration's doc comment).
    pub fn help(&self) -> &'static str {
        self.help.trim()
    }

    /// The variable that sets it for `role`, if any.
    pub fn env_var(&self, role: Role) -> Option<&'static str> {
        match (self.env, role) {
            (Env::None, _) => None,
            (Env::Var(var), _) => Some(var),
            (Env::ByRole { server, .. }, Role::Server) => Some(server),
            (Env::ByRole { agency, .. }, Role::Agency) => Some(agency),
        }
    }

    /// Its flag, `--long`, if it has one.
    pub fn flag(&self) -> Option<&'static str> {
        self.flag.map(|f| f.long)
    }

    /// The subcommands that take its flag (`*`: every one).
    pub fn flag_on(&self) -> &'static [&'static str] {
        self.flag.map_or(&[], |f| f.on)
    }

    /// Its value in `config`, as written in the environment.
    pub fn value(&self, config: &Config) -> String {
        (self.get)(config)
    }

    /// Inclusive bounds of a numeric setting.
    pub fn bounds(&self) -> (Option<u64>, Option<u64>) {
        (self.min, self.max)
    }

    /// Sets it in `config` from text, as a variable or a flag would.
    ///
    /// # Errors
    /// `raw` does not parse; the error names `source` (the variable or flag).
    pub fn apply(&self, config: &mut Config, source: &str, raw: &str) -> Result<(), ConfigError> {
        (self.set)(config, raw).map_err(|reason| ConfigError::Invalid {
            key: source.to_string(),
            // A database URL that does not parse may still hold a password.
            value: crate::store::target::shown(raw),
            reason,
        })
    }

    /// The clap argument of its flag.
    fn arg(&self, flag: &Flag) -> clap::Arg {
        let mut help = self.help().to_string();
        // The bounds the value is checked against, so that a refused value
        // is no surprise.
        match (self.min, self.max) {
            (Some(min), Some(max)) => help.push_str(&format!(" ({min} to {max})")),
            (Some(min), None) if min > 1 => help.push_str(&format!(" (at least {min})")),
            (None, Some(max)) => help.push_str(&format!(" (at most {max})")),
            _ => {}
        }
        help.push_str(&format!(" [{}", self.key));
        if let Some(value) = flag.switch {
            help.push_str(&format!(" = {value}"));
        }
        match self.env {
            Env::None => {}
            Env::Var(var) => help.push_str(&format!(", {var}")),
            Env::ByRole { server, agency } => {
                help.push_str(&format!(", {server} (server), {agency} (agency)"));
            }
        }
        help.push(']');
        let arg = clap::Arg::new(self.key).long(flag.long).help(help);
        match flag.switch {
            Some(_) => arg.action(clap::ArgAction::SetTrue),
            None => arg.value_name(self.hint),
        }
    }

    /// The flag's value in `matches`, as text, when it was given.
    pub(super) fn given(&self, flag: &Flag, matches: &clap::ArgMatches) -> Option<String> {
        // `try_get_one` rather than `get_one`: a subcommand without this
        // flag is not an error.
        match flag.switch {
            Some(value) => matches
                .try_get_one::<bool>(self.key)
                .ok()
                .flatten()
                .filter(|on| **on)
                .map(|_| value.to_string()),
            None => matches
                .try_get_one::<String>(self.key)
                .ok()
                .flatten()
                .cloned(),
        }
    }

    /// Checks bounds and format; `origin` names where the value came from.
    pub(super) fn check(
        &self,
        config: &Config,
        origin: Option<&String>,
    ) -> Result<(), ConfigError> {
        let value = (self.get)(config);
        let number = value.parse::<u64>().ok();
        let reason = match (number, self.min, self.max) {
            (Some(n), lo, Some(hi)) if n < lo.unwrap_or(0) || n > hi => {
                Some(format!("must be within {}..={hi}", lo.unwrap_or(0)))
            }
            (Some(n), Some(lo), None) if n < lo => Some(format!("must be at least {lo}")),
            _ => self
                .check
                .and_then(|check| check(&value).err())
                .map(str::to_string),
        };
        match reason {
            None => Ok(()),
            Some(reason) => Err(ConfigError::Invalid {
                key: match origin {
                    Some(source) => format!("{} (set by {source})", self.key),
                    None => self.key.to_string(),
                },
                value,
                reason,
            }),
        }
    }
}

/// Adds every declared flag to the subcommands its declaration names (and
/// the global ones to `cmd` itself).
///
/// # Panics
/// A declaration names a subcommand `cmd` does not have.
pub fn add_flags(mut cmd: clap::Command) -> clap::Command {
    for setting in SETTINGS {
        let Some(flag) = &setting.flag else { continue };
        for &on in flag.on {
            let arg = setting.arg(flag);
            cmd = if on == GLOBAL {
                cmd.arg(arg.global(true))
            } else {
                cmd.mut_subcommand(on, |sub| sub.arg(arg))
            };
        }
    }
    cmd
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::testing::*;

    #[test]
    fn every_setting_has_help_and_a_line_in_config_toml_and_the_docs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let toml_path = root.join("config.toml");
        let c = Config::load(&toml_path, Role::Server, env(&[])).unwrap();
        assert_eq!(c, Config::default(), "config.toml holds the defaults");
        let toml_text = std::fs::read_to_string(toml_path).unwrap();
        let docs = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
        for s in SETTINGS {
            assert!(!s.help().is_empty(), "{}", s.key);
            assert!(
                docs.contains(&format!("`{}`", s.key)),
                "docs/CONFIGURATION.md: {}",
                s.key
            );
            for role in ROLES {
                if let Some(var) = s.env_var(role) {
                    assert!(toml_text.contains(var), "config.toml: {var}");
                    assert!(
                        docs.contains(&format!("`{var}`")),
                        "docs/CONFIGURATION.md: {var}"
                    );
                }
            }
            if let Some(long) = s.flag() {
                assert!(
                    docs.contains(&format!("--{long}`")),
                    "docs/CONFIGURATION.md: --{long}"
                );
            }
        }
    }
}
