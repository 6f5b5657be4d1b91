//! Configuration: defaults, overlaid by `config.toml`, then by environment
//! variables, then by command-line flags.
//!
//! Every setting is declared once, in the `settings!` table below: its
//! default, file key, variable, flag, bounds and help. The structs, their
//! defaults, the environment and flag overlays, the clap flags and the range
//! checks are all generated from it, so adding a setting is one edit. Every
//! error names the key (and the variable or flag that set it); `main` turns
//! any [`ConfigError`] into exit code 2.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::logging::{LogFormat, LogLevel};
use crate::model::{AgencyId, MAX_NUMBER};
use crate::store::options::{Durability, Options as StoreOptions};
use crate::store::target::Storage;

/// Most batches an agency may keep in flight (`agency.window`): the central
/// reads no further from a connection that has this many unanswered.
pub const MAX_WINDOW: usize = 64;

/// Subcommand name in a flag's `on` list that makes the flag global.
const GLOBAL: &str = "*";

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
        /// Most connections served at once; more are refused with `SERVER_BUSY`.
        max_connections: usize = 1024, env "SERVER_MAX_CONNECTIONS", min 1;
        /// Seconds a peer has to complete a frame once it has started one (and
        /// to complete the TLS handshake).
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
        /// read-only operator session. When any agency has one (here or in
        /// `secrets_file`), every configured agency must, and every
        /// connection must open with `HELLO` and its secret.
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

/// `agency.server_address`: the centrals an agency may use, in the order it
/// tries them. Parsed once, where settings are read, so the agency only
/// ever sees well-formed `host:port` entries, and never an empty list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ServerAddresses {
    /// The setting as written (trimmed): what the `config` line shows.
    given: String,
    /// Its entries, each `host:port`, at least one.
    list: Vec<String>,
}

impl ServerAddresses {
    /// Reads `host:port[,host:port…]`.
    ///
    /// # Errors
    /// An entry is empty or not `host:port` (with a port in 1..=65535); the
    /// message quotes that entry.
    pub fn parse(raw: &str) -> Result<ServerAddresses, String> {
        let given = raw.trim();
        let list = given
            .split(',')
            .map(|entry| check_host_port(entry.trim()).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServerAddresses {
            given: given.to_string(),
            list,
        })
    }

    /// The addresses, in the order they are tried.
    pub fn as_slice(&self) -> &[String] {
        &self.list
    }

    /// The first address: where a single probe goes.
    pub fn first(&self) -> &str {
        &self.list[0] // never empty: `split` yields at least one entry
    }

    /// The setting as written.
    pub fn as_str(&self) -> &str {
        &self.given
    }
}

/// One entry of `agency.server_address`.
fn check_host_port(entry: &str) -> Result<&str, String> {
    let bad = |why: &str| Err(format!("{entry:?} {why} (each address is host:port)"));
    if entry.is_empty() {
        return Err("an address is empty: the list has a stray comma".to_string());
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() {
        return bad("has no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("is an IPv6 address without brackets ([::1]:12345)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("has no valid port (1..=65535)"),
        Ok(_) => Ok(entry),
    }
}

impl From<SocketAddr> for ServerAddresses {
    fn from(address: SocketAddr) -> Self {
        let one = address.to_string();
        ServerAddresses {
            given: one.clone(),
            list: vec![one],
        }
    }
}

impl TryFrom<String> for ServerAddresses {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        ServerAddresses::parse(&raw)
    }
}

impl fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

/// The environment variable(s) of a setting.
#[derive(Debug, Clone, Copy)]
enum Env {
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
struct Flag {
    /// `--long`.
    long: &'static str,
    /// For a switch (no value), the value it sets.
    switch: Option<&'static str>,
    /// The subcommands that take it; `*` for all of them.
    on: &'static [&'static str],
}

/// A format rule on a setting's text, beyond its bounds.
type Check = fn(&str) -> Result<(), &'static str>;

/// One setting as declared: what the generic overlays, clap and the checks
/// need to know about it.
#[derive(Debug)]
pub struct Setting {
    key: &'static str,
    help: &'static str,
    env: Env,
    flag: Option<Flag>,
    min: Option<u64>,
    max: Option<u64>,
    check: Option<Check>,
    /// What a value looks like, for `--help`.
    hint: &'static str,
    get: fn(&Config) -> String,
    set: fn(&mut Config, &str) -> Result<(), String>,
    /// Two distinct valid values, for the table-driven tests.
    #[cfg(test)]
    samples: [&'static str; 2],
    /// Whether a value is a TOML string.
    #[cfg(test)]
    quoted: bool,
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
    fn given(&self, flag: &Flag, matches: &clap::ArgMatches) -> Option<String> {
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
    fn check(&self, config: &Config, origin: Option<&String>) -> Result<(), ConfigError> {
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

/// A value type a setting can have: parsed from a variable or flag, shown
/// in messages.
trait Value: Sized {
    const HINT: &'static str;
    fn parse(raw: &str) -> Result<Self, String>;
    fn show(&self) -> String;
    #[cfg(test)]
    const SAMPLES: [&'static str; 2];
    #[cfg(test)]
    const QUOTED: bool;
}

macro_rules! value_by_text {
    ($($ty:ty: $hint:literal, $quoted:literal, [$a:literal, $b:literal];)*) => {$(
        impl Value for $ty {
            const HINT: &'static str = $hint;
            fn parse(raw: &str) -> Result<Self, String> {
                raw.trim().parse().map_err(|e: <$ty as FromStr>::Err| e.to_string())
            }
            fn show(&self) -> String {
                self.to_string()
            }
            #[cfg(test)]
            const SAMPLES: [&'static str; 2] = [$a, $b];
            #[cfg(test)]
            const QUOTED: bool = $quoted;
        }
    )*};
}

value_by_text! {
    u16: "N", false, ["3", "4"];
    u32: "N", false, ["3", "4"];
    u64: "N", false, ["3", "4"];
    usize: "N", false, ["3", "4"];
    bool: "BOOL", false, ["false", "true"];
    String: "TEXT", true, ["h:1", "h:2"];
    LogLevel: "LEVEL", true, ["DEBUG", "ERROR"];
    LogFormat: "FORMAT", true, ["json", "text"];
}

impl Value for PathBuf {
    const HINT: &'static str = "PATH";
    fn parse(raw: &str) -> Result<Self, String> {
        Ok(PathBuf::from(raw.trim()))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["a.csv", "b.csv"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for Storage {
    const HINT: &'static str = "PATH|URL";
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse()
    }
    /// Without a password: this text can reach messages.
    fn show(&self) -> String {
        self.to_string()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["a.csv", "postgres://u@h:5432/db"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl Value for ServerAddresses {
    const HINT: &'static str = "HOST:PORT[,HOST:PORT...]";
    fn parse(raw: &str) -> Result<Self, String> {
        ServerAddresses::parse(raw)
    }
    fn show(&self) -> String {
        self.given.clone()
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["h:1", "a:1,b:2"];
    #[cfg(test)]
    const QUOTED: bool = true;
}

impl<'de> Deserialize<'de> for Storage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

impl Value for BTreeMap<String, String> {
    const HINT: &'static str = "TABLE";
    fn parse(_: &str) -> Result<Self, String> {
        Err("a table is set in the config file only".into())
    }
    fn show(&self) -> String {
        format!("{} entries", self.len())
    }
    #[cfg(test)]
    const SAMPLES: [&'static str; 2] = ["", ""];
    #[cfg(test)]
    const QUOTED: bool = false;
}

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
    /// subcommand's matches of a command built with [`add_flags`]), then the
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

    /// Whether the central speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Whether every connection must present a client certificate signed by
    /// `tls_client_ca` (mutual TLS). Then every agency is authenticated by
    /// its certificate, which names it, whether or not it has a secret: no
    /// agency can act without authenticating.
    pub fn requires_client_certificates(&self) -> bool {
        self.tls_enabled() && !self.tls_client_ca.as_os_str().is_empty()
    }

    /// [`ServerConfig::frame_timeout`] as a duration.
    pub fn frame_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.frame_timeout)
    }

    /// [`ServerConfig::idle_timeout`] as a duration.
    pub fn idle_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout)
    }

    /// [`ServerConfig::auth_timeout`] as a duration.
    pub fn auth_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.auth_timeout)
    }

    /// [`ServerConfig::shutdown_grace`] as a duration.
    pub fn shutdown_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shutdown_grace)
    }

    /// The draw record's path, defaulted from the bets file's; `None` when
    /// a database keeps the bets (and the draw record, in a table).
    pub fn draw_record_path(&self) -> Option<PathBuf> {
        let bets = self.storage.file()?;
        Some(if self.draw_record.as_os_str().is_empty() {
            bets.with_extension("draw.toml")
        } else {
            self.draw_record.clone()
        })
    }

    /// What the store is handed to open: the target, its draw record,
    /// whether acknowledgements wait for stable storage, and how long a
    /// database may take to answer.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            storage: self.storage.clone(),
            record: self.draw_record_path(),
            durability: if self.sync {
                Durability::Sync
            } else {
                Durability::NoSync
            },
            patience: std::time::Duration::from_secs(self.storage_connect_timeout),
        }
    }

    /// Where the draw record is, for messages and log lines.
    pub fn draw_record_shown(&self) -> String {
        self.draw_record_path().map_or_else(
            || "tables draw and draw_agencies".to_string(),
            |p| p.display().to_string(),
        )
    }
}

/// The secrets the central checks, by who presents them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// Per agency; empty when authentication is off.
    pub agencies: BTreeMap<AgencyId, String>,
    /// Opens a read-only operator session (`PING`, `STATUS`), so that
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
const SECRET_KEYS: &str = "keys are agency ids or \"operator\"";

/// Whose secret a key of `server.secrets` names.
enum SecretKey {
    Agency(AgencyId),
    Operator,
}

fn secret_key(key: &str) -> Option<SecretKey> {
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

impl AgencyConfig {
    /// The secret to present, from `secret` or `secret_file`.
    ///
    /// # Errors
    /// The secret file cannot be read.
    pub fn load_secret(&self) -> Result<Option<String>, ConfigError> {
        if !self.secret_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&self.secret_file).map_err(|source| {
                ConfigError::ReadFile {
                    setting: "agency.secret_file (CLI_SECRET_FILE)",
                    path: self.secret_file.clone(),
                    source,
                }
            })?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok((!self.secret.is_empty()).then(|| self.secret.clone()))
    }

    /// The name the central's certificate must carry when the agency dials
    /// `address` (one entry of `server_address`): `tls_server_name`, else
    /// that address's host, so each central of a list is checked against
    /// its own name.
    pub fn tls_name(&self, address: &str) -> String {
        if !self.tls_server_name.is_empty() {
            return self.tls_server_name.clone();
        }
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }

    /// [`AgencyConfig::reconnect_timeout`] as a duration.
    pub fn reconnect_patience(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reconnect_timeout)
    }

    /// [`AgencyConfig::reply_timeout`] as a duration.
    pub fn reply_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reply_timeout)
    }

    /// [`AgencyConfig::hello_timeout`] as a duration.
    pub fn hello_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.hello_timeout)
    }

    /// [`AgencyConfig::draw_timeout`] as a duration.
    pub fn draw_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.draw_timeout)
    }
}

impl AgencyConfig {
    /// The data file path with `{id}` replaced.
    pub fn data_path(&self) -> PathBuf {
        PathBuf::from(self.data_file.replace("{id}", &self.id.to_string()))
    }

    /// Where the seal is kept: `seal_file` with `{id}` replaced, or the
    /// data file's path followed by `.seal`.
    pub fn seal_path(&self) -> PathBuf {
        if self.seal_file.is_empty() {
            let mut path = self.data_path().into_os_string();
            path.push(".seal");
            return PathBuf::from(path);
        }
        PathBuf::from(self.seal_file.replace("{id}", &self.id.to_string()))
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
    /// [`secret_strength`]). The secret itself is never shown.
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

/// A TOML file that does not parse. The message stays on the lines toml
/// renders it on: its `^^^` marker points at the offending text only when
/// it sits under the quoted line.
fn parse_error(path: &Path, e: &toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        // The error quotes the line, which may hold a database URL's
        // password.
        message: crate::store::target::hide_passwords(e.to_string().trim_end()),
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
    use std::collections::{BTreeSet, HashMap};

    const ROLES: [Role; 2] = [Role::Server, Role::Agency];
    const NOWHERE: &str = "/nonexistent/config.toml";

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

    /// A config file that sets only `setting`, to `value`.
    fn file_setting(setting: &Setting, value: &str) -> tempfile::NamedTempFile {
        let (section, field) = setting.key.split_once('.').unwrap();
        let value = if setting.quoted {
            format!("{value:?}")
        } else {
            value.to_string()
        };
        file(&format!("[{section}]\n{field} = {value}\n"))
    }

    /// A command with every subcommand the declarations name, and the flags.
    fn command() -> clap::Command {
        let names: BTreeSet<&str> = SETTINGS
            .iter()
            .flat_map(|s| s.flag_on().iter().copied())
            .filter(|&on| on != GLOBAL)
            .collect();
        add_flags(
            clap::Command::new("lottery").subcommands(names.into_iter().map(clap::Command::new)),
        )
    }

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
    fn server_address_is_a_list_of_host_port_in_order() {
        let load = |raw: &str| {
            Config::load(
                Path::new(NOWHERE),
                Role::Agency,
                env(&[("CLI_SERVER_ADDRESS", raw)]),
            )
        };
        let c = load(" central-1:12345, central-2:12345 ,[::1]:7 ").unwrap();
        let a = &c.agency.server_address;
        assert_eq!(
            a.as_slice(),
            ["central-1:12345", "central-2:12345", "[::1]:7"]
        );
        assert_eq!(a.first(), "central-1:12345");
        assert_eq!(a.to_string(), "central-1:12345, central-2:12345 ,[::1]:7");
        assert_eq!(c.agency.tls_name("[::1]:7"), "::1");
        assert_eq!(c.agency.tls_name("central-2:12345"), "central-2");
        assert_eq!(
            Config::default().agency.server_address.as_slice(),
            ["127.0.0.1:12345"]
        );
        for (raw, says) in [
            ("a:1,b", "\"b\" has no port"),
            ("a:1,,b:2", "an address is empty"),
            ("a:1,", "an address is empty"),
            (":5", "\":5\" has no host"),
            ("a:1,b:0", "\"b:0\" has no valid port"),
            ("a:x", "\"a:x\" has no valid port"),
            ("::1:5", "without brackets"),
        ] {
            let e = load(raw).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid CLI_SERVER_ADDRESS = {raw:?}: "))
                    && e.contains(says),
                "{raw}: {e}"
            );
        }
        let f = file("[agency]\nserver_address = \"a:1,b\"\n");
        let e = Config::load(f.path(), Role::Agency, env(&[])).unwrap_err();
        assert!(
            e.to_string().contains("server_address") && e.to_string().contains("\"b\" has no port"),
            "{e}"
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

    #[test]
    fn the_draw_record_defaults_beside_the_bets_file_as_documented() {
        let record = |storage: &str| {
            let server = ServerConfig {
                storage: Storage::File(storage.into()),
                ..ServerConfig::default()
            };
            server.draw_record_path().unwrap()
        };
        assert_eq!(record("bets.csv"), PathBuf::from("bets.draw.toml"));
        assert_eq!(
            record("/var/x/bets"),
            PathBuf::from("/var/x/bets.draw.toml")
        );
        // The three places that explain the default give the same example.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let help = SETTINGS.iter().find(|s| s.key == "server.draw_record");
        let example = "bets.csv` -> `bets.draw.toml";
        assert!(help.unwrap().help().contains(example));
        let toml = std::fs::read_to_string(root.join("config.toml")).unwrap();
        let line = toml.lines().find(|l| l.starts_with("draw_record")).unwrap();
        assert!(line.contains("(bets.csv -> bets.draw.toml)"), "{line}");
        let docs = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
        let row = docs
            .lines()
            .find(|l| l.starts_with("| `server.draw_record`"));
        assert!(row.unwrap().contains("(`bets.csv` -> `bets.draw.toml`)"));
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
