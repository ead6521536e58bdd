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
//! - **macOS**: `caffeinate -i -s` (power assertions against idle sleep, and system sleep on AC
//!   power) around the same waiting command; the assertions end with it.
//! - **Windows**: PowerShell calls `SetThreadExecutionState(ES_CONTINUOUS | ES_SYSTEM_REQUIRED)`
//!   (through `Add-Type`: the agent itself has no FFI, unsafe code being forbidden here) and
//!   then waits on the pipe on the same thread; Windows clears the state when that thread ends.
//!   Where PowerShell may not compile the declaration (constrained language mode), the agent
//!   logs the reason, as on Linux.
//! - **Other systems**: not built; the agent says so in its log when the flag asks for it.
//!
//! Every STAT answer carries the hold, so that a client running a long job asks something
//! often enough through its quiet phases (the engine's `fleet::keepalive`).

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
                "--keep-awake: keeping the PC awake is not built for {}",
                std::env::consts::OS
            );
        }
        KeepAwake { inner }
    }

    /// How long after a request the PC stays awake, as told to clients in STAT (they ask
    /// something more often than that during a long job); None where the lock is not built.
    pub fn hold(&self) -> Option<Duration> {
        lock::SUPPORTED.then_some(self.inner.hold)
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

mod lock {
    //! The OS's "do not sleep" lock, held by a child process for as long as its standard input
    //! is open (see the module docs); [`lock_command`] says which command, per OS.

    use std::process::Stdio;
    use std::time::Duration;

    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::process::{Child, Command};

    /// What the lock says it is for (`systemd-inhibit --list` shows it).
    const WHY: &str = "sa-image is backing up to or restoring from this PC";
    /// The line the locking command prints once the OS granted the lock.
    pub(super) const HELD: &str = "sa-image-keep-awake-held";
    /// Built for this OS.
    pub const SUPPORTED: bool = lock_command(std::env::consts::OS).is_some();

    /// Windows: PowerShell calls `SetThreadExecutionState(ES_CONTINUOUS | ES_SYSTEM_REQUIRED)`
    /// on its pipeline thread, says so, then blocks reading its standard input on that same
    /// thread; Windows clears a thread's execution state when the thread ends, i.e. when the
    /// pipe closes (let go, or the agent died) and PowerShell exits. 2147483649 = 0x80000001
    /// (a hex literal would be read as a negative Int32).
    const WINDOWS_SCRIPT: &str = "$ErrorActionPreference = 'Stop'
$sig = '[DllImport(\"kernel32.dll\")] public static extern uint SetThreadExecutionState(uint esFlags);'
$k = Add-Type -MemberDefinition $sig -Name KeepAwake -Namespace SaImage -PassThru
if ($k::SetThreadExecutionState([uint32]2147483649) -eq 0) {
  [Console]::Error.WriteLine('SetThreadExecutionState refused the request'); exit 1
}
[Console]::Out.WriteLine('sa-image-keep-awake-held'); [Console]::Out.Flush()
$null = [Console]::In.ReadToEnd()
";

    /// The program and arguments that take the lock on `os` (`std::env::consts::OS`), print
    /// [`HELD`] and keep the lock until their standard input closes; None where not built.
    /// - linux: `systemd-inhibit` (logind's `sleep:idle` block lock) around `sh -c 'echo; cat'`;
    /// - macos: `caffeinate -i -s` (power assertions against idle sleep, and against system
    ///   sleep on AC power) around the same `sh -c`;
    /// - windows: `powershell.exe -EncodedCommand` with [`WINDOWS_SCRIPT`] (UTF-16LE, base64:
    ///   no quoting through the Windows command line).
    pub const fn lock_command(os: &str) -> Option<&'static str> {
        match os.as_bytes() {
            b"linux" => Some("systemd-inhibit"),
            b"macos" => Some("caffeinate"),
            b"windows" => Some("powershell.exe"),
            _ => None,
        }
    }

    /// The arguments of [`lock_command`] for `os`.
    pub fn lock_args(os: &str) -> Vec<String> {
        let hold_in_sh = format!("echo {HELD} && exec cat");
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match os {
            "linux" => v(&[
                "--what=sleep:idle",
                "--who=shard-agent",
                &format!("--why={WHY}"),
                "--mode=block",
                "sh",
                "-c",
                &hold_in_sh,
            ]),
            "macos" => v(&["-i", "-s", "sh", "-c", &hold_in_sh]),
            "windows" => {
                let utf16: Vec<u8> = WINDOWS_SCRIPT
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect();
                v(&[
                    "-NoProfile",
                    "-NonInteractive",
                    "-EncodedCommand",
                    &base64::engine::general_purpose::STANDARD.encode(utf16),
                ])
            }
            _ => Vec::new(),
        }
    }

    /// A held lock; dropping it lets go.
    pub struct Lock {
        child: Child,
        program: &'static str,
    }

    impl Lock {
        /// Takes the lock, or says why not.
        pub async fn take() -> Result<Lock, String> {
            let os = std::env::consts::OS;
            let program = lock_command(os)
                .ok_or_else(|| format!("keeping the PC awake is not built for {os}"))?;
            let mut cmd = Command::new(program);
            cmd.args(lock_args(os))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            #[cfg(windows)]
            cmd.creation_flags(0x0800_0000); // CREATE_NO_WINDOW
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
            // PowerShell compiles the call's C# declaration first: give it time.
            let first = tokio::time::timeout(Duration::from_secs(30), out.next_line()).await;
            match first {
                Ok(Ok(Some(line))) if line.trim() == HELD => Ok(Lock { child, program }),
                Err(_) => Err(format!("{program} did not answer within 30 s")),
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
                        format!("{program} ended without taking the lock")
                    } else {
                        format!("{program}: {err}")
                    })
                }
            }
        }

        /// How the lock is held, for the log.
        pub fn how(&self) -> String {
            let what = match self.program {
                "systemd-inhibit" => "systemd-logind inhibitor lock, sleep:idle",
                "caffeinate" => "power assertions against idle and system sleep",
                _ => "thread execution state ES_SYSTEM_REQUIRED",
            };
            format!(
                "{what}, held by {} pid {}",
                self.program,
                self.child.id().unwrap_or(0)
            )
        }
    }

    impl Drop for Lock {
        fn drop(&mut self) {
            // Closing the pipe ends the command holding the lock, which lets go of it;
            // kill_on_drop makes sure of it.
            drop(self.child.stdin.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lock::{lock_args, lock_command, HELD};
    use base64::Engine as _;

    #[test]
    fn each_os_has_its_locking_command() {
        assert_eq!(lock_command("linux"), Some("systemd-inhibit"));
        assert_eq!(lock_command("macos"), Some("caffeinate"));
        assert_eq!(lock_command("windows"), Some("powershell.exe"));
        assert_eq!(lock_command("freebsd"), None);
        assert!(lock_args("freebsd").is_empty());
        let mac = lock_args("macos");
        assert_eq!(&mac[..4], ["-i", "-s", "sh", "-c"]);
        assert!(mac[4].contains(HELD) && mac[4].ends_with("exec cat"));
    }

    #[test]
    fn the_windows_command_decodes_to_the_script() {
        let args = lock_args("windows");
        assert_eq!(
            &args[..3],
            ["-NoProfile", "-NonInteractive", "-EncodedCommand"]
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&args[3])
            .expect("base64");
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let script = String::from_utf16(&units).expect("UTF-16LE");
        assert!(script.contains("SetThreadExecutionState([uint32]2147483649)"));
        assert_eq!(
            2147483649u32, 0x8000_0001,
            "ES_CONTINUOUS | ES_SYSTEM_REQUIRED"
        );
        assert!(script.contains(&format!("WriteLine('{HELD}')")));
        assert!(script.contains("[Console]::In.ReadToEnd()"));
        // Inside PowerShell's single quotes the DllImport's double quotes are literal.
        assert!(script.contains(r#"[DllImport("kernel32.dll")]"#));
    }
}
