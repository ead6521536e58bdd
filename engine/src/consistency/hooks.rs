//! Pre and post hooks: a command of the admin's run by `sh -c` before the point in time is taken
//! (flush and lock a database, stop a service) and after the read (unlock, start it again).
//!
//! A hook runs in a process group of its own with stdin from `/dev/null`; its output is logged
//! (never printed on our stdout, which may carry `--json`) and the end of it is kept for the
//! error message. It gets `SA_IMAGE_HOOK` (`pre` or `post`), `SA_IMAGE_SOURCE`,
//! `SA_IMAGE_VOLUME` and, for the post hook, `SA_IMAGE_RESULT` (`ok` or `failed`: the read
//! failed). A hook that exits non-zero, or runs past its timeout (its whole process group is then
//! killed), fails the snapshot with [`Error::Hook`].

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::error::{Error, Result};

/// Bytes of a hook's output kept for the error message.
const TAIL: usize = 2000;

/// What a hook is told about the run.
#[derive(Debug, Clone)]
pub struct HookEnv {
    /// The source as given.
    pub source: String,
    /// The volume name.
    pub volume: String,
}

/// Runs `command` as the `phase` hook (see the module docs).
pub async fn run_hook(
    phase: &'static str,
    command: &str,
    timeout: Duration,
    env: &HookEnv,
    result: Option<bool>,
) -> Result<()> {
    let failed = |why: String| Error::Hook {
        phase,
        command: command.to_string(),
        why,
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("SA_IMAGE_HOOK", phase)
        .env("SA_IMAGE_SOURCE", &env.source)
        .env("SA_IMAGE_VOLUME", &env.volume)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(ok) = result {
        cmd.env("SA_IMAGE_RESULT", if ok { "ok" } else { "failed" });
    }
    tracing::info!("running the {phase}-hook `{command}`");
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("could not be started: {e}")))?;
    let pgid = child.id();
    let out = tokio::spawn(tail(child.stdout.take()));
    let err = tokio::spawn(tail(child.stderr.take()));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.map_err(|e| failed(format!("could not be waited for: {e}")))?,
        Err(_) => {
            if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            return Err(failed(format!(
                "did not finish within {timeout:?} (--hook-timeout) and was killed"
            )));
        }
    };
    // A background process of the hook may hold its pipes open: do not wait for it.
    let grace = Duration::from_secs(1);
    let out = tokio::time::timeout(grace, out)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let err = tokio::time::timeout(grace, err)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    for (name, text) in [("stdout", &out), ("stderr", &err)] {
        if !text.trim().is_empty() {
            tracing::info!("{phase}-hook {name}: {}", text.trim());
        }
    }
    if status.success() {
        return Ok(());
    }
    let said = if err.trim().is_empty() { out } else { err };
    let said = said.trim();
    Err(failed(if said.is_empty() {
        format!("failed ({status})")
    } else {
        format!("failed ({status}): {said}")
    }))
}

/// The last [`TAIL`] bytes of a stream, read to its end.
async fn tail(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut s) = stream else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > TAIL {
            kept.drain(..kept.len() - TAIL);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HookEnv {
        HookEnv {
            source: "/dev/sdz".into(),
            volume: "vol".into(),
        }
    }

    #[tokio::test]
    async fn a_hook_sees_its_environment_and_its_failure_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("seen");
        let cmd = format!(
            "echo \"$SA_IMAGE_HOOK $SA_IMAGE_SOURCE $SA_IMAGE_VOLUME $SA_IMAGE_RESULT\" > {}",
            out.display()
        );
        run_hook("post", &cmd, Duration::from_secs(10), &env(), Some(true))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "post /dev/sdz vol ok\n"
        );
        let e = run_hook(
            "pre",
            "echo flushing; echo 'database is locked' >&2; exit 3",
            Duration::from_secs(10),
            &env(),
            None,
        )
        .await
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Hook { phase: "pre", .. }), "{text}");
        assert!(
            text.contains("exit status: 3") && text.contains("database is locked"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        // A background child of the shell, which must die with the hook's process group.
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let e = run_hook("pre", &cmd, Duration::from_millis(500), &env(), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not finish within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // Gone, or a zombie waiting for its new parent to reap it.
        while std::fs::read_to_string(&stat).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the hook's background child {} outlived the kill",
                pid.trim()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
