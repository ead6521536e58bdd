//! One error type for the crate, and a helper that runs a system tool and turns a failure into an
//! error that names the command and carries its stderr.

use std::fmt;
use std::process::{Command, Output};

/// What failed, in words, with whatever context (command line, stderr, console transcript) helps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    /// An I/O error with a sentence saying what was being done.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        Error(format!("{what}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Renders a command line for messages (program and arguments, space separated).
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, capturing stdout and stderr. Fails if it cannot be started or exits
/// unsuccessfully; the error names the command and includes its stderr (and stdout, if any).
pub fn run(cmd: &mut Command) -> Result<Output> {
    let line = describe(cmd);
    let out = cmd.output().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (is it installed? the packages are listed in the sa_vm_tests crate docs)"
        } else {
            ""
        };
        Error(format!("could not start `{line}`: {e}{hint}"))
    })?;
    if !out.status.success() {
        return Err(Error(format!(
            "`{line}` failed ({}):\nstderr: {}\nstdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
        )));
    }
    Ok(out)
}

/// Fails with a clear message unless the process runs as root (uid 0), which building an image
/// needs (a loop device and a mount for `extlinux --install`).
pub fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading /proc/self/status", e))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1)) // effective uid
        .ok_or_else(|| Error::new("no Uid line in /proc/self/status"))?;
    if uid != "0" {
        return Err(Error(format!(
            "the VM tests must run as root (effective uid is {uid}): building the boot image \
             needs a loop device and a mount for `extlinux --install`. \
             Run e.g. `sudo -E CARGO_TARGET_DIR=... cargo test -p sa-vm-tests`."
        )));
    }
    Ok(())
}
