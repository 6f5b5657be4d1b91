//! Named tasks, so tokio-console shows what each task is (the listener, a
//! connection, the bets writer, the draw). Names need tokio's unstable API,
//! so they are given only in builds with `--cfg tokio_unstable` (`make
//! console`); elsewhere these are plain `spawn` calls.

use std::future::Future;

use tokio::task::JoinHandle;

/// Spawns `future` as a task called `name`.
pub fn spawn_named<F>(name: &str, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(tokio_unstable)]
    {
        tokio::task::Builder::new()
            .name(name)
            .spawn(future)
            .expect("the runtime accepts new tasks")
    }
    #[cfg(not(tokio_unstable))]
    {
        let _ = name;
        tokio::spawn(future)
    }
}

/// Runs blocking `work` on the blocking pool as a task called `name`.
pub fn spawn_blocking_named<F, R>(name: &str, work: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    #[cfg(tokio_unstable)]
    {
        tokio::task::Builder::new()
            .name(name)
            .spawn_blocking(work)
            .expect("the runtime accepts new tasks")
    }
    #[cfg(not(tokio_unstable))]
    {
        let _ = name;
        tokio::task::spawn_blocking(work)
    }
}
