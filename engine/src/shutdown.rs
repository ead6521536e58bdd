//! Stopping long work from outside: the caller hands in a [`Shutdown`] token and cancels it
//! (the CLI on SIGINT/SIGTERM, the daemon on SIGTERM or a reload, a test when it is done). The
//! engine never installs signal handlers itself.

/// A cancellation token: cheap to clone, cancelled once for all clones.
pub type Shutdown = tokio_util::sync::CancellationToken;

/// A token nobody cancels.
pub fn never() -> Shutdown {
    Shutdown::new()
}
