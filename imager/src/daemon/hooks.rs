//! Pre- and post-snapshot hooks: a command run by `sh -c` with a timeout, e.g. to quiesce a
//! database before the snapshot and resume it after.
//!
//! The hook runs in its own process group, with stdin from /dev/null and these variables:
//! `SA_IMAGE_VOLUME`, `SA_IMAGE_SOURCE`, `SA_IMAGE_JOB` (the job id), `SA_IMAGE_HOOK` (`pre` or
//! `post`) and, for the post hook, `SA_IMAGE_RESULT` (`ok` or `failed`: how the snapshot went).
//! A non-zero exit, a signal, or the timeout (the whole group is killed) fails the job, with the
//! command, how it ended and the last lines it printed (its output is kept up to 4 KiB).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Output kept per hook run (the tail).
const TAIL: usize = 4096;

/// Runs hook `which` (`pre_hook`, `post_hook`): `Ok(output tail)` on exit 0, else a message that
/// says what happened.
pub async fn run(
    which: &str,
    cmd: &str,
    timeout: Duration,
    env: &[(&str, String)],
) -> Result<String, String> {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .map_err(|e| format!("{which} `{cmd}` could not start: {e}"))?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|r| tokio::spawn(keep_tail(r, out.clone())))
    .collect();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.map_err(|e| format!("{which} `{cmd}`: cannot wait for it: {e}"))?,
        Err(_) => {
            if let Some(pid) = child.id() {
                // The whole group: `sh -c` and whatever it started.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            for r in readers {
                r.abort();
            }
            return Err(format!(
                "{which} `{cmd}` did not finish within {}; it was killed{}",
                if timeout < Duration::from_secs(1) {
                    format!("{} ms", timeout.as_millis())
                } else {
                    sa_core::duration::format_span(timeout.as_secs())
                },
                shown(&out)
            ));
        }
    };
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    if status.success() {
        return Ok(String::from_utf8_lossy(&out.lock().unwrap_or_else(|p| p.into_inner())).into());
    }
    let how = match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "was killed by a signal".to_string(),
    };
    Err(format!("{which} `{cmd}` {how}{}", shown(&out)))
}

fn shown(out: &Mutex<Vec<u8>>) -> String {
    let out = out.lock().unwrap_or_else(|p| p.into_inner());
    let text = String::from_utf8_lossy(&out);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        let lines: Vec<&str> = text.lines().collect();
        let last = &lines[lines.len().saturating_sub(5)..];
        format!(": {}", last.join(" / "))
    }
}

async fn keep_tail(mut r: Box<dyn AsyncRead + Send + Unpin>, out: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        o.extend_from_slice(&buf[..n]);
        if o.len() > TAIL {
            let cut = o.len() - TAIL;
            o.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_succeed_fail_and_time_out() {
        let env = [("SA_IMAGE_VOLUME", "sys".to_string())];
        let t = Duration::from_secs(10);
        let ok = run("pre_hook", "echo frozen $SA_IMAGE_VOLUME", t, &env)
            .await
            .unwrap();
        assert_eq!(ok.trim(), "frozen sys");
        let e = run("pre_hook", "echo db busy >&2; exit 3", t, &env)
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "pre_hook `echo db busy >&2; exit 3` exited with status 3: db busy"
        );
        let started = std::time::Instant::now();
        // A grandchild holding the pipes open must not keep the job waiting.
        let e = run(
            "post_hook",
            "sleep 30 & sleep 30",
            Duration::from_millis(300),
            &env,
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("did not finish within") && e.contains("killed"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
