//! Turns SIGTERM, SIGINT and SIGHUP into the cancellation of the root token,
//! the one place where shutdown starts.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::logging::{action, result};

/// Spawns a task that cancels `token` on the first SIGTERM, SIGINT or
/// SIGHUP.
///
/// SIGHUP (the terminal or session went away) is a graceful shutdown too:
/// left to its default action it would kill the process with nothing
/// logged and nothing closed.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
            // Cancelled by someone else (the process is ending anyway).
            _ = token.cancelled() => return,
        };
        info!(
            action = action::SIGNAL,
            result = result::SUCCESS,
            signal = name
        );
        token.cancel();
    });
    Ok(())
}
