//! `sa-image daemon` started by a test, and the real programs around it: Python helpers from
//! `tests/py` (an HTTP receiver for webhooks and pings, an aiosmtpd SMTP server with STARTTLS,
//! prometheus_client's metrics parser, urllib as an HTTP(S) client) and headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::bins::bin;
use crate::proc::Proc;

/// How long a daemon or helper may take to print its first line.
const START: Duration = Duration::from_secs(30);

/// Starts `cmd` with stdout piped and waits for a line starting with `prefix`; returns the
/// process and the rest of that line. Stdout is drained afterwards.
fn spawn_until_line(mut cmd: Command, name: &str, prefix: &str) -> (Proc, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut p = Proc::spawn(cmd, name);
    let stdout = p.child().stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(START) {
        Ok(rest) => (p, rest),
        Err(_) => {
            let status = p.try_wait();
            panic!("{name} printed no `{prefix}` line within {START:?} (exited: {status:?})")
        }
    }
}

/// A running `sa-image daemon`; killed when dropped.
pub struct Daemon {
    proc: Proc,
    /// The status page's URL (`http://127.0.0.1:PORT/`).
    pub url: String,
    /// Its stderr (the log).
    pub log: PathBuf,
}

impl Daemon {
    /// `sa-image daemon --config CONFIG` with `env` added, its log appended to `log`.
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let mut cmd = Command::new(bin("sa-image"));
        cmd.arg("daemon").arg("--config").arg(config).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (proc, url) = spawn_until_line(cmd, "sa-image daemon", "status page on ");
        Daemon {
            proc,
            url,
            log: log.to_path_buf(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Sends a signal (`TERM`, `HUP`, `KILL`) with `kill`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits for it to exit (panics after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.proc.wait(timeout)
    }

    /// SIGKILL, and reaped.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// `GET path` over plain HTTP: status and body.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        http_get(&self.url, path, headers)
    }

    /// `GET /status.json`.
    pub fn status_json(&self) -> Value {
        let (code, body) = self.get("/status.json", &[]);
        assert_eq!(code, 200, "/status.json: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json: {e}: {body}"))
    }
}

/// A plain HTTP/1.1 GET against `base` (`http://HOST:PORT/`): status and body.
pub fn http_get(base: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let host = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s = TcpStream::connect(&host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
    (code, body.to_string())
}

/// The directory of the Python helpers.
pub fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py")
}

/// A Python helper from `tests/py` that prints `listening on PORT`; killed when dropped.
pub struct PyServer {
    _proc: Proc,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl PyServer {
    /// Runs `python3 tests/py/SCRIPT ARGS`.
    pub fn start(script: &str, args: &[&Path]) -> PyServer {
        let mut cmd = Command::new("python3");
        cmd.arg(py_dir().join(script)).args(args);
        let (proc, port) = spawn_until_line(cmd, script, "listening on ");
        PyServer {
            _proc: proc,
            port: port.parse().expect("a port"),
        }
    }
}

/// Runs `python3 tests/py/SCRIPT ARGS` with `stdin`, and parses its stdout as JSON.
pub fn py_json(script: &str, args: &[&str], stdin: &str) -> Value {
    let mut child = Command::new("python3")
        .arg(py_dir().join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Complete JSON lines written so far to `path`.
pub fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Headless Chromium (Debian's `chromium`) with the flags this machine needs and a fresh
/// profile in `profile`: a screenshot of `url` into `png` (412 px wide, a phone), and the page's
/// DOM after loading.
pub fn chromium(url: &str, png: &Path, profile: &Path) -> String {
    let base = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=412,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null());
    };
    let scratch = profile.parent().unwrap_or(profile);
    // Headless Chromium now and then hangs before it draws anything (seen once in CI in a run
    // whose other Chromium starts all took seconds): such a run is killed and tried again, at
    // most three times.
    let patient = |what: &str, add: &dyn Fn(&mut Command)| -> std::process::Output {
        let mut hung = Vec::new();
        for _ in 0..3 {
            let mut cmd = Command::new("chromium");
            base(&mut cmd);
            add(&mut cmd);
            match crate::proc::try_run(cmd, scratch, START) {
                Ok(out) => return out,
                Err(why) => hung.push(why),
            }
        }
        panic!("chromium {what} hung three times:\n{}", hung.join("\n"));
    };
    let out = patient("--screenshot", &|c| {
        c.arg(format!("--screenshot={}", png.display())).arg(url);
    });
    assert!(
        out.status.success() && png.is_file(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = patient("--dump-dom", &|c| {
        c.arg("--dump-dom").arg(url);
    });
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The visible text of an HTML document: tags dropped, entities of `&<>"` decoded, white space
/// folded.
pub fn html_text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    let mut in_style = false;
    let mut i = 0;
    let b = html.as_bytes();
    let at = |i: usize, what: &[u8]| {
        b.get(i..i + what.len())
            .is_some_and(|x| x.eq_ignore_ascii_case(what))
    };
    while i < b.len() {
        if at(i, b"<style") {
            in_style = true;
        }
        if in_style && at(i, b"</style>") {
            in_style = false;
        }
        match b[i] {
            b'<' => in_tag = true,
            b'>' => {
                in_tag = false;
                out.push(' ');
            }
            _ if in_tag || in_style => {}
            _ => {
                let ch = html[i..].chars().next().unwrap_or(' ');
                out.push(ch);
                i += ch.len_utf8();
                continue;
            }
        }
        i += 1;
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
