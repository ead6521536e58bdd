//! Asking every agent of a run the same thing at once.

use std::future::Future;

use sa_core::store::AgentClient;
use tokio::task::JoinSet;

use crate::error::{Error, Result};

/// Runs `ask` on every `(slot, client)` at once and returns the answers with their slots, in
/// slot order. A task that panicked fails the whole call (a bug, not an agent's answer).
pub async fn on_each<'a, T, F, Fut>(
    clients: impl IntoIterator<Item = (usize, &'a AgentClient)>,
    ask: F,
) -> Result<Vec<(usize, T)>>
where
    F: Fn(AgentClient) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = JoinSet::new();
    for (slot, c) in clients {
        let answer = ask(c.clone());
        set.spawn(async move { (slot, answer.await) });
    }
    let mut out = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        out.push(r.map_err(|e| Error::failed(format!("agent task failed: {e}")))?);
    }
    out.sort_by_key(|(slot, _)| *slot);
    Ok(out)
}
