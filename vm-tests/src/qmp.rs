//! A QMP client for a running qemu (`-qmp unix:PATH,server=on,wait=off`): one command at a
//! time, JSON lines over a Unix socket. Asynchronous events that arrive meanwhile are kept, so a
//! test can wait for one ([`Qmp::wait_event`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A QMP connection, in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the socket at `path` (waiting at most `timeout` for qemu to create it), reads
    /// the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::io(
                        format!("connecting to QMP at {}", path.display()),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| Error::io("setting the QMP read timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the QMP socket", e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(Error(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading from QMP", e))?;
        if n == 0 {
            return Err(Error::new("qemu closed the QMP connection"));
        }
        serde_json::from_str(&line).map_err(|e| Error(format!("bad QMP line {line:?}: {e}")))
    }

    /// Runs `command` with `arguments`; returns its `return` value, or an error carrying
    /// qemu's `error.desc`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| Error::io(format!("sending QMP {command}"), e))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error(format!(
                    "QMP {command} {arguments}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                )));
            }
        }
    }

    /// Waits (at most `timeout`) for an event named `name` whose `data` satisfies `matches`,
    /// among those kept and those to come; returns it and forgets it.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && matches(&e["data"]))
            {
                return Ok(self.events.remove(i));
            }
            if Instant::now() >= deadline {
                return Err(Error(format!("no QMP event {name} within {timeout:?}")));
            }
            // Any command makes qemu flush pending events before its answer.
            self.execute("query-status", json!({}))?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
