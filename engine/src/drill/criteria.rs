//! What makes a drill pass, and the wait for it: every criterion given must be met before the
//! deadline.
//!
//! - **console**: a line of the guest's serial console matches a regular expression;
//! - **port**: a TCP port of the guest answers through QEMU's user network: a connection to the
//!   forwarded port is accepted and the guest does not close it at once (QEMU accepts on the host
//!   side and drops the connection when nothing listens in the guest), so it counts when the
//!   guest sends something or keeps the connection open for [`PORT_HOLD`];
//! - **screen**: [`Criteria::screenshot_after`] after the start, the screen (taken through QMP)
//!   shows more than one colour.
//!
//! qemu exiting first fails the drill at once. Whatever the outcome, the screen at the end is
//! kept as PNG for the record.

use std::time::Duration;

use regex::Regex;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::qemu::{ppm_has_content, Vm};
use super::workdir::WorkDir;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

/// How long a connection to the guest's port must stay open (or get a byte) to count.
pub const PORT_HOLD: Duration = Duration::from_secs(1);
/// Console lines kept for the failure message.
const TAIL: usize = 12;

/// What a drill waits for.
#[derive(Debug, Clone)]
pub struct Criteria {
    /// A console line matching this.
    pub console: Option<Regex>,
    /// This guest TCP port answering.
    pub port: Option<u16>,
    /// A screen with content this long after the start.
    pub screenshot_after: Option<Duration>,
    /// All of them within this.
    pub deadline: Duration,
}

impl Criteria {
    /// Checks that at least one criterion is given.
    pub fn check(&self) -> Result<()> {
        if self.console.is_none() && self.port.is_none() && self.screenshot_after.is_none() {
            return Err(Error::invalid(
                "a drill needs something to wait for: give --console REGEX (a line the guest \
                 prints once up), --port PORT (a guest TCP port that answers) and/or \
                 --screenshot-after DURATION (a screen with something on it)",
            ));
        }
        if self.screenshot_after.is_some_and(|s| s >= self.deadline) {
            return Err(Error::invalid(
                "--screenshot-after must be shorter than --deadline",
            ));
        }
        Ok(())
    }

    /// The criteria in words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(re) = &self.console {
            parts.push(format!("console /{}/", re.as_str()));
        }
        if let Some(p) = self.port {
            parts.push(format!("port {p}"));
        }
        if let Some(s) = self.screenshot_after {
            parts.push(format!("screen after {}s", s.as_secs()));
        }
        format!(
            "{} within {}s",
            parts.join(" and "),
            self.deadline.as_secs()
        )
    }
}

/// How the wait ended.
#[derive(Debug)]
pub struct Outcome {
    /// Every criterion met.
    pub passed: bool,
    /// Why, in words.
    pub reason: String,
    /// From starting qemu to the last criterion met.
    pub boot: Option<Duration>,
    /// The screen at the end, PNG (empty when it could not be taken).
    pub screenshot: Vec<u8>,
}

/// Waits for `c` on `vm` (see the module docs); `host_port` is the forwarded port.
pub async fn wait(
    vm: &mut Vm,
    c: &Criteria,
    host_port: Option<u16>,
    dir: &WorkDir,
    shutdown: &Shutdown,
) -> Result<Outcome> {
    let mut seen = Seen {
        console_ok: c.console.is_none(),
        tail: Default::default(),
        matched: None,
    };
    let mut port_ok = c.port.is_none();
    let mut screen_ok = c.screenshot_after.is_none();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let deadline = vm.started + c.deadline;
    let mut console_open = true;
    let failure = loop {
        if seen.console_ok && port_ok && screen_ok {
            break None;
        }
        tokio::select! {
            line = vm.console.recv(), if console_open => match line {
                Some(line) => seen.line(c, line),
                None => console_open = false,
            },
            _ = tick.tick() => {
                if let Some(status) = vm.exited() {
                    // What the guest printed last may still be on its way.
                    while let Ok(Some(line)) =
                        tokio::time::timeout(Duration::from_secs(2), vm.console.recv()).await
                    {
                        seen.line(c, line);
                    }
                    if seen.console_ok && port_ok && screen_ok {
                        break None;
                    }
                    break Some(format!("qemu exited ({status}) before the drill passed{}",
                        match vm.stderr() { e if e.is_empty() => String::new(), e => format!(": {e}") }));
                }
                if std::time::Instant::now() >= deadline {
                    break Some(format!("no {} within the deadline of {}s",
                        unmet(c, seen.console_ok, port_ok, screen_ok), c.deadline.as_secs()));
                }
                if !port_ok {
                    if let Some(p) = host_port {
                        port_ok = port_answers(p).await;
                    }
                }
                if !screen_ok && c.screenshot_after.is_some_and(|s| vm.started.elapsed() >= s) {
                    screen_ok = screen_has_content(vm, dir).await?;
                }
            }
            () = shutdown.cancelled() => {
                return Err(Error::Interrupted("the drill was stopped".into()));
            }
        }
    };
    let (tail, matched) = (seen.tail, seen.matched);
    let boot = failure.is_none().then(|| vm.started.elapsed());
    let screenshot = screenshot_png(vm, dir).await;
    let reason = match failure {
        None => {
            let mut why = Vec::new();
            if let Some(l) = matched {
                why.push(format!("console line {:?}", l.trim()));
            }
            if c.port.is_some() {
                why.push(format!("port {} answered", c.port.unwrap_or(0)));
            }
            if c.screenshot_after.is_some() {
                why.push("the screen showed content".to_string());
            }
            why.join(", ")
        }
        Some(f) => {
            let shown: Vec<&str> = tail.iter().map(String::as_str).collect();
            if shown.is_empty() {
                format!("{f}; the console printed nothing")
            } else {
                format!("{f}; last console lines: {}", shown.join(" | "))
            }
        }
    };
    Ok(Outcome {
        passed: boot.is_some(),
        reason,
        boot,
        screenshot,
    })
}

/// The console so far.
struct Seen {
    console_ok: bool,
    tail: std::collections::VecDeque<String>,
    matched: Option<String>,
}

impl Seen {
    fn line(&mut self, c: &Criteria, line: String) {
        tracing::debug!("guest: {line}");
        if !self.console_ok && c.console.as_ref().is_some_and(|re| re.is_match(&line)) {
            self.console_ok = true;
            self.matched = Some(line.clone());
        }
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

fn unmet(c: &Criteria, console_ok: bool, port_ok: bool, screen_ok: bool) -> String {
    let mut parts = Vec::new();
    if !console_ok {
        if let Some(re) = &c.console {
            parts.push(format!("console line matching /{}/", re.as_str()));
        }
    }
    if !port_ok {
        parts.push(format!("answer on guest port {}", c.port.unwrap_or(0)));
    }
    if !screen_ok {
        parts.push("screen with content".to_string());
    }
    parts.join(", no ")
}

/// Whether the guest answers on forwarded port `port` (see the module docs).
async fn port_answers(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let mut b = [0u8; 1];
    match tokio::time::timeout(PORT_HOLD, s.read(&mut b)).await {
        Err(_) => true,     // still open after PORT_HOLD
        Ok(Ok(n)) => n > 0, // the guest spoke first; 0 is a close
        Ok(Err(_)) => false,
    }
}

async fn screen_has_content(vm: &Vm, dir: &WorkDir) -> Result<bool> {
    let path = dir.file("screen.ppm");
    if let Err(e) = vm.screendump(&path, "ppm").await {
        tracing::warn!("screenshot failed: {e}");
        return Ok(false);
    }
    let ppm = std::fs::read(&path)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    Ok(ppm_has_content(&ppm).unwrap_or(false))
}

async fn screenshot_png(vm: &mut Vm, dir: &WorkDir) -> Vec<u8> {
    if vm.exited().is_some() {
        return Vec::new();
    }
    let path = dir.file("screen.png");
    match vm.screendump(&path, "png").await {
        Ok(()) => std::fs::read(&path).unwrap_or_default(),
        Err(e) => {
            tracing::warn!("cannot take the final screenshot: {e}");
            Vec::new()
        }
    }
}
