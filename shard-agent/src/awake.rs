//! Keeping the PC awake while sa-image works with this agent (`--keep-awake`).
//!
//! A desk PC that goes to sleep in the middle of a backup or a restore is an agent lost for the
//! rest of the run. So every request an authenticated client makes counts as work, and from the
//! first request until `--keep-awake` (default 2 minutes) after the last one the agent holds the
//! operating system's "do not sleep" lock; then it lets go, and the PC sleeps when its own
//! settings say. The agent's background scrub does not count: only a client's work does.
//!
//! How the lock is held, per OS:
//! - **Linux**: a systemd-logind inhibitor lock (`sleep:idle`, mode `block`), taken by running
//!   `systemd-inhibit` with a command that says it holds the lock and then waits on a pipe from
//!   the agent. Letting go closes the pipe; if the agent dies (even by SIGKILL) the pipe closes
//!   too, so a lock never outlives the agent. Without logind (no systemd, no system bus) or
//!   without the right (a non-root user needs polkit's `inhibit-block-sleep`), the agent says so
//!   once in its log, serves as usual, and tries again after [`RETRY_AFTER`].
//! - **Other systems** (Windows `SetThreadExecutionState`, macOS power assertions): not built
//!   yet; the agent says so in its log when the flag asks for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long after the last request the PC is kept awake, by default.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(120);
/// After a failure to take the lock, how long before the next try.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// The "do not sleep" lock, taken while clients work (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct KeepAwake {
    inner: Arc<Inner>,
}

struct Inner {
    /// Milliseconds from `base` to the last request (0: none yet).
    last_ms: AtomicU64,
    base: Instant,
    hold: Duration,
    wake: Notify,
}

impl KeepAwake {
    /// Starts the keeper (on the current tokio runtime): the lock is taken at the first
    /// [`touch`](Self::touch) and let go `hold` after the last one.
    /// On an OS where it is not built, it says so once and does nothing.
    pub fn start(hold: Duration) -> KeepAwake {
        let inner = Arc::new(Inner {
            last_ms: AtomicU64::new(0),
            base: Instant::now(),
            hold,
            wake: Notify::new(),
        });
        if lock::SUPPORTED {
            tokio::spawn(keep(inner.clone()));
        } else {
            tracing::info!(
                "--keep-awake: keeping the PC awake is not built for {} yet",
                std::env::consts::OS
            );
        }
        KeepAwake { inner }
    }

    /// A client's request: keep the PC awake for `hold` from now.
    pub fn touch(&self) {
        let ms = self.inner.base.elapsed().as_millis() as u64;
        self.inner.last_ms.store(ms.max(1), Ordering::Relaxed);
        self.inner.wake.notify_one();
    }
}

impl Inner {
    /// When the lock may be let go: `hold` after the last request (None: no request yet).
    fn until(&self) -> Option<Instant> {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms) + self.hold),
        }
    }
}

/// Takes the lock when requests come, lets go when they stop.
async fn keep(inner: Arc<Inner>) {
    let mut retry_at: Option<Instant> = None;
    loop {
        inner.wake.notified().await;
        let busy = inner.until().is_some_and(|u| u > Instant::now());
        if !busy || retry_at.is_some_and(|r| r > Instant::now()) {
            continue;
        }
        let lock = match lock::Lock::take().await {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!(
                    "cannot keep this PC awake while sa-image works with it ({why}); it may \
                     sleep in the middle of a backup or restore. Trying again in {} minutes",
                    RETRY_AFTER.as_secs() / 60
                );
                retry_at = Some(Instant::now() + RETRY_AFTER);
                continue;
            }
        };
        tracing::info!(
            "keeping this PC awake while sa-image works with it ({})",
            lock.how()
        );
        hold(&inner, lock).await;
        tracing::info!("no request for {:?}: this PC may sleep again", inner.hold);
    }
}

/// Keeps `_lock` until `hold` has passed since the last request; it is let go when dropped here.
async fn hold(inner: &Inner, _lock: lock::Lock) {
    while let Some(until) = inner.until().filter(|u| *u > Instant::now()) {
        tokio::time::sleep_until(until.into()).await;
    }
}

#[cfg(target_os = "linux")]
mod lock {
    //! The systemd-logind inhibitor lock, through `systemd-inhibit`.

    use std::process::Stdio;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::process::{Child, Command};

    /// What the lock says it is for (`systemd-inhibit --list` shows it).
    const WHY: &str = "sa-image is backing up to or restoring from this PC";
    /// The line the locked command prints once logind granted the lock.
    const HELD: &str = "sa-image-keep-awake-held";
    /// Built here.
    pub const SUPPORTED: bool = true;

    /// A held lock; dropping it lets go.
    pub struct Lock {
        child: Child,
    }

    impl Lock {
        /// Takes the lock, or says why not.
        pub async fn take() -> Result<Lock, String> {
            let mut child = Command::new("systemd-inhibit")
                .args([
                    "--what=sleep:idle",
                    "--who=shard-agent",
                    &format!("--why={WHY}"),
                    "--mode=block",
                    "sh",
                    "-c",
                    &format!("echo {HELD} && exec cat"),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot run systemd-inhibit: {e}"))?;
            let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
            let first = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await;
            match first {
                Ok(Ok(Some(line))) if line.trim() == HELD => Ok(Lock { child }),
                Err(_) => Err("systemd-inhibit did not answer within 10 s".into()),
                _ => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            e.read_to_string(&mut err),
                        )
                        .await;
                    }
                    let _ = child.kill().await;
                    let err = err.trim();
                    Err(if err.is_empty() {
                        "systemd-inhibit ended without taking the lock".into()
                    } else {
                        format!("systemd-inhibit: {err}")
                    })
                }
            }
        }

        /// How the lock is held, for the log.
        pub fn how(&self) -> String {
            format!(
                "systemd-logind inhibitor lock, sleep:idle, held by systemd-inhibit pid {}",
                self.child.id().unwrap_or(0)
            )
        }
    }

    impl Drop for Lock {
        fn drop(&mut self) {
            // Closing the pipe ends `cat`, then systemd-inhibit, which lets go of the lock;
            // kill_on_drop makes sure of it.
            drop(self.child.stdin.take());
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod lock {
    //! Not built on this OS yet (see the module docs).

    /// Not built here.
    pub const SUPPORTED: bool = false;

    /// Never taken here.
    pub struct Lock;

    impl Lock {
        /// Says why not.
        pub async fn take() -> Result<Lock, String> {
            Err(format!(
                "keeping the PC awake is not built for {} yet",
                std::env::consts::OS
            ))
        }

        /// How the lock is held, for the log.
        pub fn how(&self) -> String {
            String::new()
        }
    }
}
