//! Noticing an agent that vanished without a reset (a PC's cable pulled, its link cut, its
//! power gone mid-request), and not waiting for it twice.
//!
//! **Stall detection, in the kernel.** A whole-request timeout cannot be short (a 1 MiB shard
//! over a slow link legitimately takes seconds), and a silent agent is not a slow one: a slow
//! agent's kernel still acknowledges what it receives. So each agent connection asks the
//! kernel to give up when *the link* is silent ([`tune`]):
//! - `TCP_USER_TIMEOUT` (Linux): data sent and not acknowledged for the stall timeout kills the
//!   connection (a request being sent into a cut link);
//! - TCP keepalive with a short idle time (half the stall timeout) and one probe a second: a
//!   connection that waits for an answer and hears nothing, not even the acknowledgement of a
//!   probe, dies too (the request went out whole, then the link went). On Linux the user
//!   timeout decides when unanswered probes kill it; elsewhere (macOS, Windows) the probe count
//!   does, to the same order.
//!
//! An agent busy for a long time (a slow disk syncing) still answers probes at the TCP level, so
//! it is waited for, up to the request timeout, as before; a busy link keeps getting
//! acknowledgements, so a large shard over a slow link is not cut either. The stall timeout
//! must exceed the worst time a link may queue data without acknowledging it.
//!
//! **Down for a while.** A request that failed as unreachable *after costing time* (at least
//! half the shorter of the connect and stall timeouts: a silent link, not a refused
//! connection, which costs a round trip) marks the agent down ([`Health`]): for
//! [`ClientOptions::retry_after`](super::ClientOptions::retry_after) every call fails at once,
//! without a connection attempt, so the stripes of a run that still name it do not each pay the
//! connect timeout. Once that time has passed a call still fails at once but starts one
//! reconnection in the background; when it succeeds the agent is used again (a PC that came
//! back during a long serve). No caller ever waits for a probe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Sets the stall detection described in the module docs on an agent connection.
pub(super) fn tune(tcp: &TcpStream, stall: Duration) -> std::io::Result<()> {
    let sock = SockRef::from(tcp);
    let idle = (stall / 2).max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new().with_time(idle);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(1))
        .with_retries(stall.saturating_sub(idle).as_secs().max(1) as u32);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(stall))?;
    Ok(())
}

/// How long a failure must have taken to count as a silent agent: half the shorter timeout.
pub(super) fn silent_after(connect: Duration, stall: Duration) -> Duration {
    connect.min(stall) / 2
}

/// Whether an agent counts as down, as one client has seen it.
#[derive(Default)]
pub(super) struct Health {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Since when, and why, when down.
    down: Option<(Instant, String)>,
    /// A background reconnection is under way.
    probing: bool,
}

/// What a call should do, given the agent's health.
pub(super) enum Verdict {
    /// Go ahead.
    Ask,
    /// Fail at once with this reason.
    Down(String),
    /// Fail at once with this reason, and start the (one) background reconnection.
    DownProbe(String),
}

impl Health {
    /// Whether to ask the agent now (see [`Verdict`]).
    pub(super) fn verdict(&self, retry_after: Duration) -> Verdict {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((since, why)) = &s.down else {
            return Verdict::Ask;
        };
        let ago = since.elapsed();
        let why = format!(
            "not answering since {:.1}s ago ({why}); not asked again for now",
            ago.as_secs_f64()
        );
        if ago >= retry_after && !s.probing {
            s.probing = true;
            Verdict::DownProbe(why)
        } else {
            Verdict::Down(why)
        }
    }

    /// The agent did not answer (again).
    pub(super) fn down(&self, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = s.down.is_none();
        s.down = Some((Instant::now(), why.to_string()));
        s.probing = false;
        if first {
            tracing::warn!("agent stopped answering ({why}); its requests fail at once for now");
        }
    }

    /// The agent answered.
    pub(super) fn up(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.down = None;
        s.probing = false;
    }

    /// Whether the agent counts as down.
    pub(super) fn is_down(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .is_some()
    }
}
