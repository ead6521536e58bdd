//! A running `sa-image serve` for tests: started with a cluster's key, its `serving` line
//! parsed for the URL and snapshot id, its stderr kept in a log file, stopped with SIGTERM to
//! read its `--json` report, and killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::cluster::parse_json;
use crate::proc::Proc;
use crate::Cluster;

/// A running `sa-image serve`; killed when dropped.
pub struct Serve {
    proc: Proc,
    /// `nbd://127.0.0.1:PORT`, or `nbds://127.0.0.1:PORT` when serving with TLS
    pub url: String,
    /// The snapshot id it serves.
    pub id: String,
    /// Its stdout lines after the first.
    pub lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Serve {
    /// Starts `sa-image serve SNAPSHOT --listen 127.0.0.1:0 --json EXTRA` with the cluster's key
    /// and `agents`, and waits for its `serving snapshot` line.
    pub fn start(c: &Cluster, snapshot: &str, agents: &str, extra: &[&str]) -> Serve {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = c.path(&format!("serve-{n}.log"));
        let mut cmd = Command::new(crate::bins::bin("sa-image"));
        cmd.args(["serve", snapshot, "--listen", "127.0.0.1:0", "--json"])
            .args(extra)
            .arg("--key")
            .arg(&c.key.path)
            .arg("--agents")
            .arg(agents)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("cannot create the serve log"));
        let mut proc = Proc::spawn(cmd, "sa-image serve");
        let stdout = proc.child().stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(e) => panic!(
                "serve printed no `serving` line ({e}); its log:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            ),
        };
        // serving snapshot ID (SIZE) on nbd://ADDR (nbds:// with TLS)
        let rest = first
            .strip_prefix("serving snapshot ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let id = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let url = rest
            .rsplit(" on ")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(
            url.starts_with("nbd://127.0.0.1:") || url.starts_with("nbds://127.0.0.1:"),
            "no URL in {first:?}"
        );
        Serve {
            proc,
            url,
            id,
            lines,
            stderr,
        }
    }

    /// Everything serve has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stops it with SIGTERM, checks it exits 0, and returns its JSON report.
    pub fn stop(mut self) -> serde_json::Value {
        let st = Command::new("kill")
            .args(["-TERM", &self.proc.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(st.success(), "kill -TERM failed");
        let status = self.proc.wait(Duration::from_secs(30));
        assert!(
            status.success(),
            "serve exited with {status}; log:\n{}",
            self.log()
        );
        // The report is the JSON object at the end; lines before it (such as
        // `hydration complete: ...`) are skipped.
        let mut text = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            if text.is_empty() && !l.starts_with('{') {
                continue;
            }
            text.push_str(&l);
            text.push('\n');
        }
        parse_json(&text, "serve --json report")
    }

    /// Its process (for signals).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
