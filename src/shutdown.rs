//! Turns SIGTERM and SIGINT into the cancellation of the root token, the one
//! place where shutdown starts.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::logging::{action, result};

/// Spawns a task that cancels `token` on the first SIGTERM or SIGINT.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
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
