//! The one signal helper: a [`Shutdown`] token cancelled on the first SIGINT or SIGTERM. The
//! engine never installs handlers itself; commands hand this token to it.

use sa_engine::shutdown::Shutdown;

/// A token cancelled on SIGINT or SIGTERM (logged with the signal's name). The handlers are in
/// place when this returns, so a signal that comes at once is not lost to the default action.
pub fn on_stop_signals() -> Shutdown {
    use tokio::signal::unix::{signal, SignalKind};
    let token = Shutdown::new();
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot watch for signals; stop this command with SIGKILL");
        return token;
    };
    let t = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!("{name}: stopping");
        t.cancel();
    });
    token
}
