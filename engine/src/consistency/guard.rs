//! The guard: a helper process that makes a consistency step (freeze a filesystem, create an
//! LVM snapshot) and undoes it on every way the snapshot can end, SIGKILL included.
//!
//! The snapshot process starts the guard *before* the step, with a pipe on the guard's stdin, in
//! a process group of its own (a Ctrl-C or a kill of the snapshot's group does not reach it).
//! The guard makes the step and says `ready [DETAIL]` on stdout (or `error MESSAGE`), then waits
//! for the first of:
//! - the line `release` on stdin: the read is over;
//! - end of file on stdin: the snapshot process is gone, however it died (the kernel closes its
//!   end of the pipe, even on SIGKILL);
//! - SIGINT or SIGTERM to the guard itself;
//! - the maximum time ([`GuardTask::Freeze`] only): a freeze must never outlast it.
//!
//! It then undoes the step and says `released`, `expired` (the maximum time ran out first: the
//! snapshot fails, its image would not be consistent) or `error MESSAGE`, and exits (0, 3, 4).
//! It logs nothing between the step and its undo: a log file on the frozen filesystem would block
//! it.
//! What cannot be guarded against: SIGKILL of the guard itself (or of the whole cgroup, as a
//! systemd unit with `KillMode=control-group` does on its final kill).
//!
//! Steps run the system's own tools: `fsfreeze` (util-linux) and `lvcreate`/`lvremove` (lvm2).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

/// Exit status of a guard whose maximum time ran out.
pub const EXIT_EXPIRED: u8 = 3;
/// Exit status of a guard whose step could not be made.
pub const EXIT_STEP_FAILED: u8 = 2;
/// Exit status of a guard whose undo failed.
pub const EXIT_UNDO_FAILED: u8 = 4;
/// Exit status of a guard given wrong arguments.
pub const EXIT_USAGE: u8 = 64;

/// How to start a guard: a program and the arguments before the task's, e.g. the running
/// `sa-image` and its hidden `consistency-guard` command.
#[derive(Debug, Clone)]
pub struct GuardCommand {
    /// The program.
    pub program: PathBuf,
    /// Arguments before the task's.
    pub args: Vec<String>,
}

/// What a guard does and undoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardTask {
    /// `fsfreeze --freeze MOUNTPOINT`, undone by `fsfreeze --unfreeze`, at most `max` long.
    Freeze {
        /// The mount point.
        mountpoint: PathBuf,
        /// Longest time frozen.
        max: Duration,
    },
    /// `lvcreate --snapshot`, undone by `lvremove`.
    Lvm {
        /// `VG/LV` of the origin.
        origin: String,
        /// Name of the snapshot LV (in the origin's VG).
        name: String,
        /// `lvcreate` size: `thin` (a thin snapshot, no size) or an `--extents`/`--size` value
        /// (`10%ORIGIN`, `2G`).
        size: String,
    },
}

impl GuardTask {
    /// The task as arguments of the guard command.
    pub fn to_args(&self) -> Vec<String> {
        match self {
            GuardTask::Freeze { mountpoint, max } => vec![
                "freeze".into(),
                max.as_secs().max(1).to_string(),
                mountpoint.display().to_string(),
            ],
            GuardTask::Lvm { origin, name, size } => {
                vec!["lvm".into(), origin.clone(), name.clone(), size.clone()]
            }
        }
    }

    /// Parses [`GuardTask::to_args`].
    pub fn parse(args: &[String]) -> Option<GuardTask> {
        match args {
            [kind, max, mp] if kind == "freeze" => Some(GuardTask::Freeze {
                mountpoint: PathBuf::from(mp),
                max: Duration::from_secs(max.parse().ok()?),
            }),
            [kind, origin, name, size] if kind == "lvm" => Some(GuardTask::Lvm {
                origin: origin.clone(),
                name: name.clone(),
                size: size.clone(),
            }),
            _ => None,
        }
    }

    /// For messages: `freeze of /srv`, `LVM snapshot vg/root-sa-image of vg/root`.
    pub fn describe(&self) -> String {
        match self {
            GuardTask::Freeze { mountpoint, .. } => format!("freeze of {}", mountpoint.display()),
            GuardTask::Lvm { origin, name, .. } => {
                let vg = origin.split('/').next().unwrap_or("");
                format!("LVM snapshot {vg}/{name} of {origin}")
            }
        }
    }

    fn max(&self) -> Option<Duration> {
        match self {
            GuardTask::Freeze { max, .. } => Some(*max),
            GuardTask::Lvm { .. } => None,
        }
    }

    /// Makes the step; returns the detail for `ready` (the snapshot device for LVM).
    async fn make(&self) -> std::result::Result<String, String> {
        match self {
            GuardTask::Freeze { mountpoint, .. } => {
                tool(Command::new("fsfreeze").arg("--freeze").arg(mountpoint)).await?;
                Ok(String::new())
            }
            GuardTask::Lvm { origin, name, size } => {
                let mut cmd = Command::new("lvcreate");
                cmd.args(["--snapshot", "--name", name]);
                if size == "thin" {
                    // A thin snapshot is skipped at activation unless told otherwise.
                    cmd.args(["--setactivationskip", "n", "--activate", "y"]);
                } else if size.contains('%') {
                    cmd.args(["--extents", size]);
                } else {
                    cmd.args(["--size", size]);
                }
                tool(cmd.arg(origin)).await?;
                let vg = origin.split('/').next().unwrap_or("");
                Ok(format!("/dev/{vg}/{name}"))
            }
        }
    }

    /// Undoes the step, retrying a second apart: a device may be busy for a moment after the
    /// read (an LV stays open until the snapshot process has closed it, or exited).
    async fn undo(&self) -> std::result::Result<(), String> {
        let attempts = match self {
            GuardTask::Freeze { .. } => 3,
            GuardTask::Lvm { .. } => 10,
        };
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let r = match self {
                GuardTask::Freeze { mountpoint, .. } => {
                    tool(Command::new("fsfreeze").arg("--unfreeze").arg(mountpoint)).await
                }
                GuardTask::Lvm { origin, name, .. } => {
                    let vg = origin.split('/').next().unwrap_or("");
                    tool(
                        Command::new("lvremove")
                            .arg("--yes")
                            .arg(format!("{vg}/{name}")),
                    )
                    .await
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Runs a system tool to the end; the error names it and carries its stderr.
async fn tool(cmd: &mut Command) -> std::result::Result<(), String> {
    let shown = format!("{:?}", cmd.as_std()).replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run `{shown}`: {e} (is it installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            err.trim().replace('\n', "; ")
        ))
    }
}

/// The guard process's body (see the module docs): returns its exit status. `stop` is cancelled
/// on SIGINT or SIGTERM.
pub async fn serve(args: &[String], stop: Shutdown) -> u8 {
    let Some(task) = GuardTask::parse(args) else {
        say(&format!("error bad guard arguments {args:?}")).await;
        return EXIT_USAGE;
    };
    // Nothing is logged between the step and its undo: the log may go to a file on the frozen
    // filesystem, and a write there would block the guard until a thaw that only it can do.
    tracing::info!("guard: making the {}", task.describe());
    match task.make().await {
        Ok(detail) => say(format!("ready {detail}").trim_end()).await,
        Err(e) => {
            say(&format!("error {e}")).await;
            return EXIT_STEP_FAILED;
        }
    }
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let why = tokio::select! {
        line = stdin.next_line() => match line {
            Ok(Some(l)) if l.trim() == "release" => Why::Released,
            _ => Why::ParentGone,
        },
        () = stop.cancelled() => Why::Signal,
        () = sleep_or_forever(task.max()) => Why::Expired,
    };
    let undone = task.undo().await;
    match why {
        Why::Released => {}
        Why::ParentGone => tracing::warn!("guard: the snapshot process is gone"),
        Why::Signal => tracing::warn!("guard: stopped by a signal"),
        Why::Expired => tracing::warn!("guard: the {} reached its maximum time", task.describe()),
    }
    match undone {
        Ok(()) if why == Why::Expired => {
            say("expired").await;
            EXIT_EXPIRED
        }
        Ok(()) => {
            tracing::info!("guard: the {} is undone", task.describe());
            say("released").await;
            0
        }
        Err(e) => {
            tracing::error!("guard: cannot undo the {}: {e}", task.describe());
            say(&format!("error {e}")).await;
            EXIT_UNDO_FAILED
        }
    }
}

/// Why a guard undoes its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Released,
    ParentGone,
    Signal,
    Expired,
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One line to the snapshot process; it may be gone (a closed pipe is not an error here).
async fn say(line: &str) {
    let mut out = tokio::io::stdout();
    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
    let _ = out.flush().await;
}

/// A running guard, from the snapshot process's side. Dropping it without [`Guard::release`]
/// closes the pipe: the guard undoes its step by itself.
pub struct Guard {
    task: GuardTask,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Guard {
    /// Starts a guard for `task` and waits until its step is made (at most `wait`); returns it
    /// and the detail of its `ready` line.
    pub async fn start(
        cmd: &GuardCommand,
        task: GuardTask,
        wait: Duration,
    ) -> Result<(Guard, String)> {
        let what = task.describe();
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .args(task.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                Error::Consistency(format!(
                    "cannot start the guard for the {what} ({}): {e}",
                    cmd.program.display()
                ))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Consistency("the guard has no pipes".into()));
        };
        let mut guard = Guard {
            task,
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
        };
        let line = tokio::time::timeout(wait, guard.stdout.next_line()).await;
        match line {
            Ok(Ok(Some(l))) if l == "ready" || l.starts_with("ready ") => {
                let detail = l.strip_prefix("ready").unwrap_or("").trim().to_string();
                Ok((guard, detail))
            }
            Ok(Ok(Some(l))) => Err(Error::Consistency(format!(
                "{what} failed: {}",
                l.strip_prefix("error ").unwrap_or(&l)
            ))),
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = guard.child.wait().await.ok();
                Err(Error::Consistency(format!(
                    "the guard for the {what} ended without making it ({status:?})"
                )))
            }
            Err(_) => Err(Error::Consistency(format!(
                "the {what} took longer than {wait:?}; it is being undone"
            ))),
        }
    }

    /// What it guards.
    pub fn task(&self) -> &GuardTask {
        &self.task
    }

    /// Asks the guard to undo its step and waits for it. Fails when the step was undone early
    /// (its maximum time ran out) or the undo failed.
    pub async fn release(mut self) -> Result<()> {
        let what = self.task.describe();
        if let Some(mut stdin) = self.stdin.take() {
            // A guard that already expired has exited: its answer is on stdout regardless.
            let _ = stdin.write_all(b"release\n").await;
            let _ = stdin.flush().await;
        }
        let mut answer = None;
        while let Ok(Some(l)) = self.stdout.next_line().await {
            answer = Some(l);
        }
        let _ = self.child.wait().await;
        match answer.as_deref() {
            Some("released") => Ok(()),
            Some("expired") => Err(Error::Consistency(format!(
                "the {what} reached its maximum time and was undone before the read ended: the \
                 image would not be consistent, so nothing was committed; raise --freeze-timeout \
                 or use --lvm-snapshot for long reads"
            ))),
            Some(l) => Err(Error::Consistency(format!(
                "undoing the {what} failed: {}",
                l.strip_prefix("error ").unwrap_or(l)
            ))),
            None => Err(Error::Consistency(format!(
                "the guard of the {what} ended without a word: check that it was undone"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_through_arguments() {
        for t in [
            GuardTask::Freeze {
                mountpoint: "/srv/my data".into(),
                max: Duration::from_secs(600),
            },
            GuardTask::Lvm {
                origin: "vg0/root".into(),
                name: "root-sa-image".into(),
                size: "10%ORIGIN".into(),
            },
        ] {
            assert_eq!(GuardTask::parse(&t.to_args()), Some(t));
        }
        assert_eq!(
            GuardTask::parse(&["freeze".into(), "x".into(), "/m".into()]),
            None
        );
        assert_eq!(GuardTask::parse(&["thaw".into()]), None);
    }
}
