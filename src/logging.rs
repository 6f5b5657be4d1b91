//! Log lines in the contract's shape:
//!
//! ```text
//! 2026-11-26 21:14:32 INFO     action: apuesta_recibida | result: success | cantidad: 100
//! ```
//!
//! Call sites pass structured fields (`info!(action = APUESTA_RECIBIDA,
//! result = SUCCESS, cantidad = n)`); [`ContractFormat`] renders them as
//! `key: value` pairs in the order written, joined by ` | `.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Values of the `result` field.
pub mod result {
    /// The action completed.
    pub const SUCCESS: &str = "success";
    /// The action failed.
    pub const FAIL: &str = "fail";
    /// The action is under way (for example, waiting for the server).
    pub const IN_PROGRESS: &str = "in_progress";
}

/// Values of the `action` field. The Spanish names are the contract's.
pub mod action {
    /// The effective configuration, once at start.
    pub const CONFIG: &str = "config";
    /// A configuration file named by `--config` or `LOTTERY_CONFIG` does
    /// not exist (WARN, at start).
    pub const CONFIG_FILE: &str = "config_file";
    /// The listener is bound; carries the real address.
    pub const LISTEN: &str = "listen";
    /// A batch was handled (stored or rejected).
    pub const APUESTA_RECIBIDA: &str = "apuesta_recibida";
    /// One stored bet (DEBUG).
    pub const APUESTA_ALMACENADA: &str = "apuesta_almacenada";
    /// One bet acknowledged to an agency (DEBUG).
    pub const APUESTA_ENVIADA: &str = "apuesta_enviada";
    /// The draw is done.
    pub const SORTEO: &str = "sorteo";
    /// An agency received its winners.
    pub const CONSULTA_GANADORES: &str = "consulta_ganadores";
    /// An agency announced it finished.
    pub const AGENCIA_FINALIZADA: &str = "agencia_finalizada";
    /// Sales closed (the central), or an agency learned they closed before
    /// its whole file was stored.
    pub const CIERRE: &str = "cierre";
    /// The agency connects to the central.
    pub const CONNECT: &str = "connect";
    /// A connection ended with an error.
    pub const CONNECTION: &str = "connection";
    /// A message that is not a batch was refused (malformed, or an
    /// unknown action); a refused batch is `apuesta_recibida`.
    pub const REQUEST: &str = "request";
    /// An operator's `STATUS` could not read the other centrals' agencies
    /// from the database (WARN); it was answered with this central's own.
    pub const STATUS: &str = "status";
    /// The open-files limit leaves room for fewer connections than
    /// configured (WARN, at start).
    pub const OPEN_FILES: &str = "open_files";
    /// How connections authenticate, once at start: a WARN when any
    /// agency can act without a secret.
    pub const AUTH: &str = "auth";
    /// Failed or refused authentications of one peer address, in summary:
    /// at most one line per peer per interval, with counts.
    pub const AUTH_FAILURES: &str = "auth_failures";
    /// Wrong secrets from all addresses together reached the limit: every
    /// address's wrong secrets are answered late for a while (WARN).
    pub const AUTH_THROTTLE: &str = "auth_throttle";
    /// The listening socket was closed.
    pub const CLOSE_LISTENER: &str = "close_listener";
    /// A connection sat idle past the idle timeout and was closed.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// A connection was closed during shutdown.
    pub const CLOSE_CONNECTION: &str = "close_connection";
    /// Writing to the bets file failed.
    pub const STORE: &str = "store";
    /// The bets file was checked (and repaired) on start.
    pub const RECOVER: &str = "recover";
    /// The draw record was written or read back.
    pub const DRAW_RECORD: &str = "draw_record";
    /// The agency lost its connection and is reconnecting.
    pub const RECONNECT: &str = "reconnect";
    /// The central is still working on an agency's request (the draw).
    pub const WAITING: &str = "waiting";
    /// Some agencies have finished and the draw still waits for others:
    /// which, once a minute.
    pub const DRAW_WAITING: &str = "draw_waiting";
    /// The agency chose the protocol to speak (the reference one, when the
    /// central does not answer `HELLO`).
    pub const PROTOCOL: &str = "protocol";
    /// The agency checked its winners' receipt against its file: the
    /// round's seal, to publish and compare.
    pub const SEAL: &str = "seal";
    /// The agency could not keep the seal for later runs to compare with.
    pub const SEAL_FILE: &str = "seal_file";
    /// The central compared a finished round's record with its bets on
    /// start (or `lottery verify` did).
    pub const VERIFY: &str = "verify";
    /// A new round was started: the previous one's files kept aside.
    pub const NEW_ROUND: &str = "new_round";
    /// The admin listener (metrics, status page, probes) is listening, or
    /// is open to its network without the operator's secret (WARN).
    pub const ADMIN: &str = "admin";
    /// The admin listener was closed.
    pub const CLOSE_ADMIN: &str = "close_admin";
    /// The bets file was flushed and closed.
    pub const CLOSE_BETS_FILE: &str = "close_bets_file";
    /// The central reached its database (or is retrying, or gave up).
    pub const DATABASE_CONNECT: &str = "database_connect";
    /// The database's schema was checked and brought up to date on start.
    pub const DATABASE_SCHEMA: &str = "database_schema";
    /// The connection to the database was closed.
    pub const CLOSE_DATABASE: &str = "close_database";
    /// The agency's data file was closed.
    pub const CLOSE_DATA_FILE: &str = "close_data_file";
    /// The program stopped on an error (ERROR, last line; the message is
    /// also on stderr when that is not where stdout goes).
    pub const EXIT: &str = "exit";
    /// A shutdown signal arrived.
    pub const SIGNAL: &str = "signal";
    /// The process is done shutting down.
    pub const SHUTDOWN: &str = "shutdown";
}

/// An error and its causes as one message, `message: cause: …`, the way
/// the fatal `exit` line and `lottery: error:` show it.
///
/// The project's convention: an error's `Display` is complete, its cause
/// included, because that text is what replies to agencies and log fields
/// show; `source()` still links the cause for code that walks the chain.
/// Printing the chain as anyhow's `{:#}` does would then repeat each cause
/// (`No such file or directory (os error 2): No such file or directory (os
/// error 2)`). This is the one place that walks a chain: it adds a cause's
/// first line only while the text so far does not already say it, and
/// stops at the first cause it already said, whose own causes that text
/// then holds too (a PostgreSQL failure says the server's words once, not
/// again as the driver's bare `db error` and its multi-line detail). A
/// library error that follows the other convention (a bare message, the
/// cause only in `source()`) is still shown whole.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        let said = said.lines().next().unwrap_or_default();
        if text.contains(said) {
            break;
        }
        text.push_str(": ");
        text.push_str(said);
        cause = c.source();
    }
    text
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

/// Reads and writes an enum as the words operators type, the same in the
/// config file, a variable and a flag (case does not matter).
macro_rules! words {
    ($name:ident, $expected:literal, { $($variant:ident => $word:literal $(| $alias:literal)*),* $(,)? }) => {
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let word = s.trim();
                $(
                    if word.eq_ignore_ascii_case($word) $(|| word.eq_ignore_ascii_case($alias))* {
                        return Ok($name::$variant);
                    }
                )*
                Err(format!("{s:?} is not {}", $expected))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $($name::$variant => $word,)*
                })
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

words!(LogLevel, "one of DEBUG, INFO, WARN, ERROR", {
    Debug => "DEBUG",
    Info => "INFO",
    Warn => "WARN" | "WARNING",
    Error => "ERROR",
});

words!(LogFormat, "text or json", { Text => "text", Json => "json" });

impl From<LogLevel> for Level {
    fn from(l: LogLevel) -> Level {
        match l {
            LogLevel::Debug => Level::DEBUG,
            LogLevel::Info => Level::INFO,
            LogLevel::Warn => Level::WARN,
            LogLevel::Error => Level::ERROR,
        }
    }
}

/// How log events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// The contract's `action: … | result: …` lines (the default).
    #[default]
    Text,
    /// One JSON object a line, same events and fields, for log shippers.
    Json,
}

/// The progress bar on the terminal, while one is drawn (see
/// [`draw_around`]).
static BAR: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);

/// Writes log lines around `bar` while it is drawn (`None` once it is
/// done): the bar is lifted, the line written, the bar drawn again below
/// it. Without this a line written to the same terminal lands after the
/// bar's text, on its line, and the bar is then redrawn over what follows.
pub fn draw_around(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = bar;
}

/// Log lines not yet on stdout, oldest first. Every line goes through here,
/// so lines reach stdout in the order they were written, whichever thread
/// wrote them and whenever they are flushed.
static PENDING: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Held lines are written once they reach this many bytes, even on a busy
/// worker that has not parked: about a hundred contract lines.
const PENDING_LIMIT: usize = 16 * 1024;

thread_local! {
    /// Set on a runtime worker of [`flush_when_idle`]'s runtime once it has
    /// parked: it writes out what it logged before it parks again, so its
    /// lines may wait until then.
    static FLUSHES_ON_PARK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Lets the runtime's workers hold their log lines until they run out of
/// work (they park), or until `PENDING_LIMIT` bytes wait, and then write
/// them to stdout with one system call.
///
/// A central logs a line for every batch (`apuesta_recibida`), from the
/// worker that handled it. Written at once, that is a `write` to stdout per
/// batch, and a wake-up of whatever reads the other end of the pipe (the
/// container's log collector): 5 % of the central's samples in a profile
/// under load (docs/PERFORMANCE.md, "Log lines held until a worker runs out
/// of work"). A worker parks whenever it has
/// nothing to run, which on an idle or lightly loaded central is right
/// after it handled the batch, so a line still reaches stdout at once
/// there; under load it waits for the next park or for the lines behind it.
///
/// Only for a program that writes nothing else to stdout (the server): a
/// `println!` on a worker would otherwise overtake lines logged before it.
/// Other threads (the main thread, the bets writer, blocking tasks) still
/// write at once, after every held line.
pub fn flush_when_idle(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder
        .on_thread_unpark(|| FLUSHES_ON_PARK.set(true))
        .on_thread_park(flush)
}

/// Writes every held log line to stdout. Called when a worker parks, and
/// once more as the program ends (see [`FlushOnDrop`]).
pub fn flush() {
    let mut pending = PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    write_out(&mut pending);
}

/// Writes the held lines out, and empties the buffer whatever the outcome:
/// a line stdout refused is not retried forever.
fn write_out(pending: &mut Vec<u8>) {
    use std::io::Write;
    if pending.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(pending).and_then(|()| out.flush());
    pending.clear();
}

/// Flushes the held log lines when dropped: kept in `main`, so that every
/// way out of it (a return, a panic unwinding through it) writes them.
#[derive(Debug)]
pub struct FlushOnDrop;

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        flush();
    }
}

/// Stdout for log lines, written around a progress bar when one is drawn.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // Each event arrives as one whole line.
        let put = |hold: bool| {
            let mut pending = PENDING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.extend_from_slice(buf);
            if !hold || pending.len() >= PENDING_LIMIT {
                write_out(&mut pending);
            }
        };
        match bar {
            // It must reach the terminal while the bar is lifted.
            Some(bar) => bar.suspend(|| put(false)),
            None => put(FLUSHES_ON_PARK.get()),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Installs the global subscriber: events on stdout at `level`, in `format`.
/// With the `console` feature, also serves tokio-console; the stdout layer
/// keeps its own level filter, so the console's trace-level runtime events
/// never reach stdout.
///
/// Calling it twice is harmless (the second call does nothing), which keeps
/// in-process tests that start several components simple.
pub fn init(level: LogLevel, format: LogFormat) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = LevelFilter::from_level(Level::from(level));
    let stdout = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(ContractFormat)
            .with_writer(|| LogOut)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonFormat)
            .with_writer(|| LogOut)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(stdout);
    #[cfg(feature = "console")]
    let registry = registry.with(console_layer());
    let _ = registry.try_init();
}

/// The tokio-console layer, serving the console on `TOKIO_CONSOLE_BIND`
/// (`HOST:PORT`, by default `127.0.0.1:6669`), or on the Unix socket
/// `LOTTERY_CONSOLE_SOCKET` names (no port to pick or to collide on: the
/// tests use it).
#[cfg(feature = "console")]
fn console_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let builder = console_subscriber::ConsoleLayer::builder().with_default_env();
    match std::env::var_os("LOTTERY_CONSOLE_SOCKET") {
        Some(path) => builder.server_addr(std::path::PathBuf::from(path)).spawn(),
        None => builder.spawn(),
    }
}

/// Renders events as JSON lines: `timestamp`, `level`, then the event's
/// fields in the order written (`action`, `result`, …).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = serde_json::Map::new();
        object.insert(
            "timestamp".into(),
            clock::json(std::time::SystemTime::now()).into(),
        );
        object.insert("level".into(), event.metadata().level().as_str().into());
        event.record(&mut JsonFields(&mut object));
        let line = serde_json::Value::Object(object).to_string();
        writeln!(writer, "{line}")
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Renders events as contract lines (timestamp, padded level, fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct ContractFormat;

impl<S, N> FormatEvent<S, N> for ContractFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(128);
        clock::text(std::time::SystemTime::now(), &mut line);
        write!(line, " {:<8} ", event.metadata().level().as_str())?;
        render_fields(event, &mut line);
        writeln!(writer, "{line}")
    }
}

/// Appends the event's fields as `k: v | k: v`.
fn render_fields(event: &Event<'_>, out: &mut String) {
    let mut v = FieldWriter { out, first: true };
    event.record(&mut v);
}

struct FieldWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl FieldWriter<'_> {
    fn push(&mut self, name: &str, value: &dyn fmt::Display) {
        if !self.first {
            self.out.push_str(" | ");
        }
        self.first = false;
        self.out.push_str(name);
        self.out.push_str(": ");
        let start = self.out.len();
        let _ = write!(self.out, "{value}");
        // The contract promises values without `|`, and one event a line.
        if self.out[start..].contains(['|', '\n', '\r']) {
            let clean = self.out[start..]
                .replace('|', "/")
                .replace(['\n', '\r'], " ");
            self.out.truncate(start);
            self.out.push_str(&clean);
        }
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field.name(), &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        struct AsDisplay<'a>(&'a dyn fmt::Debug);
        impl fmt::Display for AsDisplay<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        self.push(field.name(), &AsDisplay(value));
    }
}

/// A shared in-memory log sink, for tests of the formats.
#[cfg(test)]
#[derive(Clone, Default)]
struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

/// Collects the lines this thread logs in the contract's format, without
/// their timestamps, until the returned guard is dropped: for tests of the
/// lines other modules log.
#[cfg(test)]
pub(crate) fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let buf = Buf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(Level::DEBUG)
        .event_format(ContractFormat)
        .with_writer(buf.clone())
        .finish();
    (Captured(buf), tracing::subscriber::set_default(subscriber))
}

/// Lines collected by [`capture`].
#[cfg(test)]
pub(crate) struct Captured(Buf);

#[cfg(test)]
impl Captured {
    /// Every line so far, timestamps dropped.
    pub(crate) fn lines(&self) -> Vec<String> {
        let text = String::from_utf8(self.0 .0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| l[20..].to_string()).collect()
    }
}

/// Renders one event line without the timestamp, for tests of the format.
#[cfg(test)]
fn render_without_time<F: FnOnce()>(emit: F) -> String {
    let buf = Buf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(Level::DEBUG)
        .event_format(ContractFormat)
        .with_writer(buf.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    // Drop "YYYY-MM-DD HH:MM:SS ".
    text[20..].to_string()
}

/// The log lines' local time. chrono's `strftime` parses its pattern and
/// converts to local time on every call, and a loaded central logs a line
/// per batch; the date and time to the second are formatted once a second
/// per thread instead, and only the milliseconds per line (a few per cent
/// of the load tool's throughput in five interleaved pairs, within the
/// host's noise).
mod clock {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// One second, formatted.
    struct Second {
        /// Seconds since the epoch.
        at: u64,
        /// `2026-12-02T14:20:01` (JSON lines).
        json: String,
        /// `2026-12-02 14:20:01` (text lines).
        text: String,
        /// The zone's offset then, `+00:00`.
        offset: String,
    }

    thread_local! {
        static LAST: RefCell<Option<Second>> = const { RefCell::new(None) };
    }

    fn with_second<R>(now: SystemTime, f: impl FnOnce(&Second, u32) -> R) -> R {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (at, millis) = (since.as_secs(), since.subsec_millis());
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            if last.as_ref().is_none_or(|s| s.at != at) {
                let local = chrono::DateTime::<chrono::Local>::from(
                    UNIX_EPOCH + std::time::Duration::from_secs(at),
                );
                *last = Some(Second {
                    at,
                    json: local.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    text: local.format("%Y-%m-%d %H:%M:%S").to_string(),
                    offset: local.format("%:z").to_string(),
                });
            }
            f(last.as_ref().expect("set above"), millis)
        })
    }

    /// `2026-12-02T14:20:01.749+00:00`.
    pub fn json(now: SystemTime) -> String {
        with_second(now, |s, millis| {
            format!("{}.{millis:03}{}", s.json, s.offset)
        })
    }

    /// Appends `2026-12-02 14:20:01` to `line`.
    pub fn text(now: SystemTime, line: &mut String) {
        with_second(now, |s, _| line.push_str(&s.text));
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        #[test]
        fn the_cached_second_formats_as_chrono_does() {
            // Across a second's boundary, and back (a clock set back).
            let base = UNIX_EPOCH + Duration::from_millis(1_764_684_001_998);
            for step in [0i64, 1, 2, 1_001, -5_000, 3] {
                let t = if step >= 0 {
                    base + Duration::from_millis(step as u64)
                } else {
                    base - Duration::from_millis(step.unsigned_abs())
                };
                let local = chrono::DateTime::<chrono::Local>::from(t);
                assert_eq!(
                    json(t),
                    local.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
                );
                let mut line = String::new();
                text(t, &mut line);
                assert_eq!(line, local.format("%Y-%m-%d %H:%M:%S").to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_formats_read_back_what_they_write() {
        for level in [
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
        ] {
            assert_eq!(level.to_string().parse::<LogLevel>(), Ok(level));
        }
        assert_eq!(" warning ".parse::<LogLevel>(), Ok(LogLevel::Warn));
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        let e = "LOUD".parse::<LogLevel>().unwrap_err();
        assert_eq!(e, "\"LOUD\" is not one of DEBUG, INFO, WARN, ERROR");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open data file x.csv: {source}")]
        struct Complete {
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("bare message")]
        struct Bare {
            source: std::io::Error,
        }
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(Complete { source: missing() });
        assert_eq!(
            error_chain(e.as_ref()),
            "cannot open data file x.csv: entity not found"
        );
        let e = anyhow::Error::new(Complete { source: missing() }).context("starting");
        assert_eq!(
            error_chain(e.as_ref()),
            "starting: cannot open data file x.csv: entity not found"
        );
        let e = anyhow::Error::new(Bare { source: missing() });
        assert_eq!(error_chain(e.as_ref()), "bare message: entity not found");
        // A complete message over a driver's bare one over the server's
        // multi-line words (a PostgreSQL failure): said once, one line.
        #[derive(Debug, thiserror::Error)]
        #[error("ERROR: relation \"bets\" does not exist\nHINT: run the migrations")]
        struct Server;
        #[derive(Debug, thiserror::Error)]
        #[error("db error")]
        struct Driver(#[source] Server);
        #[derive(Debug, thiserror::Error)]
        #[error("ERROR: relation \"bets\" does not exist")]
        struct Pg(#[source] Driver);
        #[derive(Debug, thiserror::Error)]
        #[error("database db:5432/lottery: {0}")]
        struct Store(#[source] Pg);
        let e = anyhow::Error::new(Store(Pg(Driver(Server)))).context("starting the central");
        assert_eq!(
            error_chain(e.as_ref()),
            "starting the central: database db:5432/lottery: ERROR: relation \"bets\" does not exist"
        );
    }

    #[test]
    fn the_log_table_in_docs_lists_every_action() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(root.join("src/logging.rs")).unwrap();
        let module = source
            .split("pub mod action {")
            .nth(1)
            .and_then(|rest| rest.split("\n}").next())
            .unwrap();
        let actions: Vec<&str> = module
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert!(actions.contains(&action::SHUTDOWN), "{actions:?}");
        let logs = std::fs::read_to_string(root.join("docs/LOGS.md")).unwrap();
        let table: Vec<&str> = logs
            .lines()
            .skip_while(|l| !l.starts_with("| program | action | when |"))
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert!(!table.is_empty(), "docs/LOGS.md has no log table");
        let named = |a: &str| {
            let cell = format!("`{a}`");
            table
                .iter()
                .any(|row| row.split('|').nth(2).unwrap().contains(&cell))
        };
        let missing: Vec<&&str> = actions.iter().filter(|a| !named(a)).collect();
        assert!(
            missing.is_empty(),
            "docs/LOGS.md's log table lacks {missing:?}"
        );
    }

    #[test]
    fn contract_shape() {
        let line = render_without_time(|| {
            tracing::info!(
                action = action::APUESTA_RECIBIDA,
                result = result::SUCCESS,
                cantidad = 100
            );
        });
        assert_eq!(
            line,
            "INFO     action: apuesta_recibida | result: success | cantidad: 100\n"
        );
    }

    #[test]
    fn json_lines_carry_the_same_fields() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonFormat)
            .with_writer(buf.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(action = action::APUESTA_RECIBIDA, result = result::SUCCESS, cantidad = 70, peer = %"a|b");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["action"], "apuesta_recibida");
        assert_eq!(v["result"], "success");
        assert_eq!(v["cantidad"], 70);
        assert_eq!(v["peer"], "a|b");
        assert!(v["timestamp"].as_str().unwrap().starts_with("20"));
    }

    #[test]
    fn display_values_and_pipes() {
        let peer: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let line = render_without_time(|| {
            tracing::warn!(action = "x", result = result::FAIL, peer = %peer, reason = "a|b\nc");
        });
        assert_eq!(
            line,
            "WARN     action: x | result: fail | peer: 127.0.0.1:5000 | reason: a/b c\n"
        );
    }
}
