//! Keeping the agents' PCs awake for a whole job, quiet phases included.
//!
//! An agent started with `--keep-awake HOLD` holds its PC's "do not sleep" lock from each
//! request until HOLD after it, and says HOLD in its STAT answer. A job's requests come in
//! bursts: a snapshot waiting on a pre-hook, a freeze or a long run of zero stripes, a served
//! disk the booted machine leaves idle, may ask an agent nothing for longer than its hold, and
//! the PC would sleep in the middle of the job. So while a job runs, [`KeepAlive`] asks each of
//! its agents for its STAT every third of the hold it reports (between [`MIN_EVERY`] and
//! [`MAX_EVERY`]); an agent that reports no hold (off, not built for its OS, older) is asked
//! nothing more. Dropping the [`KeepAlive`] (the job ends) stops it; each agent then lets its
//! PC sleep a hold later.
//!
//! The daemon's backup window is the time its jobs run: it runs them through the same engine
//! calls, so the PCs stay awake from the wake-up before a backup until the backup is committed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sa_core::store::{AgentClient, ShardRead};
use tokio::task::JoinSet;

/// The shortest interval between two asks of one agent.
pub const MIN_EVERY: Duration = Duration::from_millis(500);
/// The longest.
pub const MAX_EVERY: Duration = Duration::from_secs(600);
/// After an ask that failed (the agent gone for now), the next one.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);

/// Asks the agents of a running job often enough that their PCs stay awake (see the module
/// docs). Cheap to clone; the asking stops when the last clone is dropped.
#[derive(Clone, Default)]
pub struct KeepAlive {
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl KeepAlive {
    /// Starts keeping `clients` awake (on the current tokio runtime).
    pub fn start<'a>(clients: impl IntoIterator<Item = &'a AgentClient>) -> KeepAlive {
        let k = KeepAlive::default();
        for c in clients {
            k.add(c.clone());
        }
        k
    }

    /// Keeps one more agent awake (one that joined the job late, e.g. woken).
    pub fn add(&self, client: AgentClient) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(ask(client));
    }
}

/// The interval for an agent that holds its PC awake for `hold` after a request.
pub fn every(hold: Duration) -> Duration {
    (hold / 3).clamp(MIN_EVERY, MAX_EVERY)
}

/// Asks `client` for its STAT every [`every`] of the hold it reports, until it reports none.
async fn ask(client: AgentClient) {
    loop {
        let wait = match client.stat().await {
            Ok(stat) => match stat.keep_awake {
                Some(hold) => every(hold),
                None => return,
            },
            Err(e) => {
                tracing::debug!("keeping {} awake: {e}", client.addr());
                RETRY_EVERY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_three_times_per_hold_within_bounds() {
        assert_eq!(every(Duration::from_secs(120)), Duration::from_secs(40));
        assert_eq!(every(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(every(Duration::from_millis(100)), MIN_EVERY);
        assert_eq!(every(Duration::from_secs(24 * 3600)), MAX_EVERY);
    }
}
