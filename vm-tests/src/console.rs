//! A console transcript fed by reader threads, and waiting for lines in it with a deadline.
//!
//! Readers push complete lines (carriage returns stripped, each stamped with the time since the
//! console was created); waiters block on a condition variable until a matching line arrives, the
//! deadline passes, or every reader has reached end of file. Each [`Console`] keeps a cursor:
//! a wait only looks at lines after the previous match, so a sequence of waits checks order.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The text, without the line end.
    pub text: String,
    /// When it arrived, counted from the start of the console (for a VM: from its start).
    pub at: Duration,
}

#[derive(Default)]
struct State {
    lines: Vec<Line>,
    open_readers: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    start: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking reader thread must not hide the transcript.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A transcript of one or more output streams (e.g. a VM's serial console and qemu's stderr).
pub struct Console {
    shared: Arc<Shared>,
    cursor: usize,
    readers: Vec<JoinHandle<()>>,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// An empty console; its clock starts now.
    pub fn new() -> Console {
        Console {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                start: Instant::now(),
            }),
            cursor: 0,
            readers: Vec::new(),
        }
    }

    /// Starts a thread that reads `stream` until end of file and appends its lines, each
    /// prefixed with `prefix` (e.g. `""` for the serial console, `"[qemu] "` for stderr).
    pub fn attach(&mut self, stream: impl Read + Send + 'static, prefix: &str) {
        let shared = Arc::clone(&self.shared);
        let prefix = prefix.to_string();
        shared.lock().open_readers += 1;
        let handle = std::thread::spawn(move || {
            let mut stream = stream;
            let mut partial: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            let push = |bytes: &[u8]| {
                let text = String::from_utf8_lossy(bytes);
                let text = format!("{prefix}{}", text.trim_end_matches('\r').replace('\r', ""));
                let at = shared.start.elapsed();
                shared.lock().lines.push(Line { text, at });
                shared.changed.notify_all();
            };
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        partial.extend_from_slice(&buf[..n]);
                        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                            push(&partial[..i]);
                            partial.drain(..=i);
                        }
                    }
                }
            }
            if !partial.is_empty() {
                push(&partial);
            }
            shared.lock().open_readers -= 1;
            shared.changed.notify_all();
        });
        self.readers.push(handle);
    }

    /// Waits until a line after the previous match satisfies `pred`, and returns it. Fails when
    /// `timeout` passes, when a line satisfies `fail` (e.g. a guest's failure marker or
    /// "Kernel panic"), or when every stream has ended; the error includes `what` and the
    /// transcript.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
        mut fail: impl FnMut(&str) -> bool,
    ) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            while self.cursor < st.lines.len() {
                let line = &st.lines[self.cursor];
                self.cursor += 1;
                if pred(&line.text) {
                    return Ok(line.clone());
                }
                if fail(&line.text) {
                    let line = line.text.clone();
                    drop(st);
                    return Err(self.error(&format!(
                        "while waiting for {what}, got failure line {line:?}"
                    )));
                }
            }
            if st.open_readers == 0 && !self.readers.is_empty() {
                drop(st);
                return Err(self.error(&format!("output ended (process exited?) before {what}")));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Err(self.error(&format!("timed out after {timeout:?} waiting for {what}")));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until every stream has reached end of file, or `timeout` passes (then false).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.open_readers > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The instant line stamps count from.
    pub fn started(&self) -> Instant {
        self.shared.start
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.shared.lock().lines.clone()
    }

    /// The whole transcript as text, one line each, stamped with seconds since the start.
    pub fn transcript(&self) -> String {
        let st = self.shared.lock();
        let mut s = String::new();
        for l in &st.lines {
            s.push_str(&format!("[{:8.3}] {}\n", l.at.as_secs_f64(), l.text));
        }
        s
    }

    /// An error with `msg` followed by the transcript.
    pub fn error(&self, msg: &str) -> Error {
        Error(format!(
            "{msg}\n----- console transcript -----\n{}----- end of transcript -----",
            self.transcript()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn never(_: &str) -> bool {
        false
    }

    #[test]
    fn waits_in_order_and_strips_carriage_returns() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        let mut c = Console::new();
        c.attach(r, "");
        w.write_all(b"one\r\ntwo\r\nthr").expect("write");
        let l = c
            .wait_for("two", Duration::from_secs(5), |l| l == "two", never)
            .expect("two");
        assert_eq!(l.text, "two");
        // "one" lies before the cursor now.
        w.write_all(b"ee\none\n").expect("write");
        c.wait_for("three", Duration::from_secs(5), |l| l == "three", never)
            .expect("three");
        c.wait_for("one again", Duration::from_secs(5), |l| l == "one", never)
            .expect("one");
    }

    #[test]
    fn times_out_with_the_transcript() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        let mut c = Console::new();
        c.attach(r, "[x] ");
        w.write_all(b"hello\n").expect("write");
        let t = Instant::now();
        let e = c
            .wait_for("bye", Duration::from_millis(200), |l| l == "bye", never)
            .expect_err("no bye");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(
            e.0.contains("timed out") && e.0.contains("[x] hello"),
            "{e}"
        );
    }

    #[test]
    fn end_of_output_and_failure_lines_end_the_wait() {
        let mut c = Console::new();
        c.attach(&b"boot\nSA-VM-FAIL no disk\nlast words"[..], "");
        let e = c
            .wait_for(
                "x",
                Duration::from_secs(5),
                |l| l == "x",
                |l| l.starts_with("SA-VM-FAIL"),
            )
            .expect_err("failure line");
        assert!(e.0.contains("failure line \"SA-VM-FAIL no disk\""), "{e}");
        let e = c
            .wait_for("x", Duration::from_secs(5), |l| l == "x", never)
            .expect_err("end of output");
        assert!(
            e.0.contains("output ended") && e.0.contains("last words"),
            "{e}"
        );
        assert!(c.wait_closed(Duration::from_secs(1)));
    }
}
