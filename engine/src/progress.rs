//! How long work reports how far it is: a [`Progress`] the caller hands in. The engine counts;
//! the CLI draws a bar (indicatif), the daemon keeps figures, a test may record the calls.

use std::sync::Arc;

/// Receives the progress of one long operation (snapshot, restore, verify, hydrate).
pub trait Progress: Send + Sync {
    /// The work starts: `total` bytes of `what` (`snapshot`, `restore`, `verify`).
    fn start(&self, what: &str, total: u64) {
        let _ = (what, total);
    }
    /// `bytes` more are done.
    fn advance(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The work ended (done or failed).
    fn finish(&self) {}
    /// A line for the person waiting (e.g. which agents are still being woken); logged by
    /// default.
    fn note(&self, line: &str) {
        tracing::info!("{line}");
    }
}

/// Progress that goes nowhere (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// The default progress sink, shared.
pub fn none() -> Arc<dyn Progress> {
    Arc::new(NoProgress)
}
