//! The agency's progress bar: bets the central holds of the data file's
//! total, with rate and ETA, drawn only when a person watches a terminal.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::logging::{self, LogFormat};

/// Starts a bar for the agency reading `data`, when a person watches text
/// logs: stdout a terminal (a bar would corrupt JSON lines or a log file),
/// and stderr too, which is where the bar is drawn. No bar for a data file
/// that cannot be read: the agency stops at once, and its error should not
/// follow an empty bar. Returns the sender to pass to
/// [`crate::agency::run_with_progress`] and the task that draws the bar; it
/// ends when the sender is dropped.
pub fn start(data: &Path, format: LogFormat) -> Option<(watch::Sender<u64>, JoinHandle<()>)> {
    let watched = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    if !watched || format != LogFormat::Text {
        return None;
    }
    let total = count_bets(data)?;
    let (tx, rx) = watch::channel(0u64);
    Some((tx, tokio::spawn(show(total, rx))))
}

/// Bets in a data file (its non-blank lines), for the bar's total; `None`
/// when it cannot be opened.
fn count_bets(path: &Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let lines = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .count();
    Some(lines as u64)
}

/// Draws bets held of total until the sender is dropped.
async fn show(total: u64, mut held: watch::Receiver<u64>) {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} bets  {per_sec}  ETA {eta}")
            .expect("a valid template"),
    );
    logging::draw_around(Some(bar.clone()));
    while held.changed().await.is_ok() {
        bar.set_position(*held.borrow());
    }
    logging::draw_around(None);
    bar.finish();
    if !bar.is_hidden() {
        // The bar leaves the cursor at its end: what follows (the shell's
        // prompt, an error) starts on a line of its own.
        eprintln!();
    }
}
