//! The Debian packages under test: finding the freshly built `.deb` files, and installing them
//! on this machine for one test, with everything undone when it ends (also on a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crate::bins::bin_dir;
use crate::cluster::shown;

/// The packages, as dpkg names them.
pub const PACKAGES: [&str; 2] = ["sa-image", "shard-agent"];

/// The shard agent's system user and state directory, made by its package.
pub const AGENT_USER: &str = "shard-agent";
/// See [`AGENT_USER`].
pub const AGENT_STATE: &str = "/var/lib/shard-agent";

/// Why the package tests cannot run here (not root, not Debian), or `None` when they can.
pub fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root: dpkg -i installs the packages system-wide".into());
    }
    if !Path::new("/etc/debian_version").exists() || !on_path("dpkg") {
        return Some("needs Debian (dpkg)".into());
    }
    None
}

fn is_root() -> bool {
    run(command("id", &["-u"])).stdout == b"0\n"
}

/// Whether `prog` is on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The newest `NAME_*.deb` of each package in the build's `debian/` directory (beside
/// `release/`), checked to be newer than the binary it packages. Panics with the command that
/// builds them when they are missing or stale.
pub fn find_debs() -> Vec<PathBuf> {
    let bins = bin_dir();
    let dir = bins
        .parent()
        .expect("the binaries' directory has a parent")
        .join("debian");
    PACKAGES
        .iter()
        .map(|name| {
            let deb = newest(&dir, &format!("{name}_"))
                .unwrap_or_else(|| panic!("no {name}_*.deb in {}: build the packages with packaging/debian/build.sh (./test.sh does)", dir.display()));
            let built = bins.join(name);
            assert!(
                mtime(&deb) >= mtime(&built),
                "{} is older than {}: rebuild the packages with packaging/debian/build.sh",
                deb.display(),
                built.display()
            );
            deb
        })
        .collect()
}

fn newest(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".deb")
        })
        .max_by_key(|p| mtime(p))
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", p.display()))
}

/// dpkg's status of `package`: "install ok installed", "deinstall ok config-files", or "" when
/// dpkg does not know it.
pub fn status(package: &str) -> String {
    let out = run(command("dpkg-query", &["-W", "-f=${Status}", package]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The files `package` installed (`dpkg -L`).
pub fn files(package: &str) -> Vec<PathBuf> {
    let out = expect(command("dpkg", &["-L", package]), "dpkg -L");
    out.lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect()
}

/// The packages installed on this machine for one test: `dpkg -i` on creation; on drop, purged,
/// and the agent's user and state directory removed when the test made them.
#[derive(Debug)]
pub struct Installed {
    debs: Vec<PathBuf>,
    user_was_there: bool,
    state_was_there: bool,
}

impl Installed {
    /// Installs `debs`. Panics when one of the packages is already installed (the test would
    /// replace and then remove somebody's installation).
    pub fn new(debs: Vec<PathBuf>) -> Installed {
        for p in PACKAGES {
            let s = status(p);
            assert!(
                s.is_empty() || s.contains("not-installed"),
                "{p} is already on this machine ({s}); this test installs and purges its own build: \
                 remove it first with `dpkg --purge sa-image shard-agent`"
            );
        }
        let installed = Installed {
            debs,
            user_was_there: user_exists(AGENT_USER),
            state_was_there: Path::new(AGENT_STATE).exists(),
        };
        installed.install();
        installed
    }

    /// `dpkg -i` the packages (again), checking it succeeds.
    pub fn install(&self) -> String {
        let mut cmd = Command::new("dpkg");
        cmd.arg("-i").args(&self.debs);
        expect(cmd, "dpkg -i")
    }

    /// `dpkg ACTION` (`-r`, `--purge`) on both packages, checking it succeeds.
    pub fn dpkg(&self, action: &str) -> String {
        let mut cmd = Command::new("dpkg");
        cmd.arg(action).args(PACKAGES);
        expect(cmd, &format!("dpkg {action}"))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
        if !self.state_was_there {
            let _ = std::fs::remove_dir_all(AGENT_STATE);
        }
        if !self.user_was_there && user_exists(AGENT_USER) {
            let _ = Command::new("userdel").arg(AGENT_USER).output();
        }
    }
}

/// Whether the system user `name` exists.
pub fn user_exists(name: &str) -> bool {
    run(command("getent", &["passwd", name])).status.success()
}

/// `program args...`.
pub fn command(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Runs `cmd` to the end (two minutes at most).
pub fn run(cmd: Command) -> Output {
    let scratch = tempfile::tempdir().expect("tempdir");
    crate::proc::run(cmd, scratch.path(), Duration::from_secs(120))
}

/// Runs `cmd`, asserts it succeeded, and returns its stdout and stderr together.
pub fn expect(cmd: Command, what: &str) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{what} failed:\n{}", shown(&out));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
