//! A `qemu-nbd` server as a baseline NBD export, and helpers to pick and wait for a port.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{describe, Error, Result};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it).
/// Another process may still take it before it is used; tests on one machine rarely collide.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("reading the bound port", e))
}

/// Waits until `addr` accepts a TCP connection, or fails after `timeout`. The probe connection
/// is closed at once (an NBD server sees a client that leaves during the handshake).
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left
            .min(Duration::from_millis(500))
            .max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error(format!(
                    "{addr} did not accept a connection within {timeout:?}: {e}"
                )))
            }
            // Refused at once: the server is not listening yet; retry shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `qemu-nbd -f raw -t -e 8 -p PORT --bind 127.0.0.1 IMAGE`: serves a raw image (read-write,
/// persistent, up to 8 clients at once) until dropped.
pub struct QemuNbd {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    command: String,
}

impl QemuNbd {
    /// Starts the server on a free port and waits (at most `timeout`) until it accepts.
    pub fn start(image: &Path, timeout: Duration) -> Result<QemuNbd> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "-f",
            "raw",
            "-t",
            "-e",
            "8",
            "--bind",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let command = describe(&cmd);
        let child = cmd.spawn().map_err(|e| {
            Error(format!(
                "could not start `{command}`: {e} (apt-get install -y qemu-utils)"
            ))
        })?;
        let mut server = QemuNbd {
            child,
            addr,
            command,
        };
        let deadline = Instant::now() + timeout;
        loop {
            // A server that exits (bad image, port taken) is reported at once, with its stderr.
            if let Ok(Some(status)) = server.child.try_wait() {
                let err = server.stop_and_stderr();
                return Err(Error(format!(
                    "`{}` exited with {status}{err}",
                    server.command
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_for_port(addr, left.min(Duration::from_millis(100))) {
                Ok(()) => return Ok(server),
                Err(e) if Instant::now() >= deadline => {
                    let err = server.stop_and_stderr();
                    return Err(Error(format!("`{}`: {e}{err}", server.command)));
                }
                Err(_) => {}
            }
        }
    }

    /// `nbd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        crate::qemu::nbd_url(self.addr, None)
    }

    /// Kills the server and returns its stderr (for error messages).
    fn stop_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
        }
        if s.is_empty() {
            s
        } else {
            format!("\nqemu-nbd stderr: {}", s.trim_end())
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
