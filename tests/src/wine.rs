//! Windows agents on this Linux machine: `shard-agent` built for `x86_64-pc-windows-gnu` (linked
//! by Debian's mingw-w64) and run by Wine (Debian's `wine64`, 8.0).
//!
//! - [`unavailable`] says why Windows agents cannot run here (no Wine, no mingw linker, no
//!   Windows standard library for rustc), or `None`.
//! - [`agent_exe`] builds the agent once per test process (`cargo build --release --target
//!   x86_64-pc-windows-gnu -p shard-agent`: a no-op when it is fresh, as after `.ci/run` built
//!   it; `$SA_WINDOWS_AGENT` names a ready .exe instead) and puts `bcryptprimitives.dll` beside it:
//!   Rust's std takes its random bytes from `ProcessPrng` in that DLL, which Wine 8 lacks (the
//!   .exe then exits 53, silently). The DLL is built from our own C source,
//!   `tests/wine/bcryptprimitives.c`, over `RtlGenRandom`.
//! - [`Wine`] is one Wine prefix (a fresh `C:` drive and registry) in a temporary directory;
//!   [`Wine::launcher`] starts agents in it ([`crate::agent::Agent::start_with`]), and dropping it
//!   ends every process of the prefix (`wineserver -k`) and removes it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::agent::Launcher;
use crate::bins::bin_dir;

/// The Rust target of Windows agents.
pub const TARGET: &str = "x86_64-pc-windows-gnu";
/// The mingw-w64 C compiler, also the linker of [`TARGET`].
pub const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";
const WINE_DIR: &str = "/usr/lib/wine";

fn wine64() -> PathBuf {
    Path::new(WINE_DIR).join("wine64")
}

fn wineserver() -> PathBuf {
    Path::new(WINE_DIR).join("wineserver")
}

fn runs(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why Windows agents cannot run on this machine, or `None` when they can.
pub fn unavailable() -> Option<String> {
    if !wine64().is_file() {
        return Some(format!(
            "no {} (apt-get install wine64)",
            wine64().display()
        ));
    }
    if !runs(MINGW_GCC, "--version") {
        return Some(format!(
            "no {MINGW_GCC} (apt-get install gcc-mingw-w64-x86-64)"
        ));
    }
    if std::env::var_os("SA_WINDOWS_AGENT").is_none() {
        let sysroot = Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let has_std =
            sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).join("lib").is_dir());
        if !has_std {
            return Some(format!(
                "rustc has no standard library for {TARGET} (rustup target add {TARGET})"
            ));
        }
    }
    None
}

/// `None` when Windows agents can run; else prints why and returns the reason, so the test can
/// return. Under CI (`$CI` set), where `.ci/run` installs everything, it panics instead.
pub fn skip_reason(test: &str) -> Option<String> {
    let why = unavailable()?;
    if std::env::var_os("CI").is_some() {
        panic!("{test}: Windows agents must run under CI, but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    Some(why)
}

/// The Windows agent, built once per test process, with `bcryptprimitives.dll` beside it.
pub fn agent_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let exe = match std::env::var_os("SA_WINDOWS_AGENT") {
            Some(p) => PathBuf::from(p),
            None => build_agent(),
        };
        build_prng_dll(exe.parent().expect("the .exe has a directory"));
        exe
    })
    .clone()
}

fn build_agent() -> PathBuf {
    let target_dir = bin_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "shard-agent",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER", MINGW_GCC);
    let started = std::time::Instant::now();
    let out = crate::proc::run(cmd, &std::env::temp_dir(), Duration::from_secs(1800));
    assert!(
        out.status.success(),
        "building the Windows agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "[wine] Windows agent built (or found fresh) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    target_dir
        .join(TARGET)
        .join("release")
        .join("shard-agent.exe")
}

fn build_prng_dll(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("wine/bcryptprimitives.c");
    let dll = dir.join("bcryptprimitives.dll");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&dll).is_some_and(|d| modified(&src).is_some_and(|s| d >= s)) {
        return;
    }
    // Built beside, then renamed: tests in other processes may look at the same place.
    let tmp = dir.join(format!("bcryptprimitives.dll.{}", std::process::id()));
    let out = Command::new(MINGW_GCC)
        .args(["-shared", "-O2", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-ladvapi32")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {MINGW_GCC}: {e}"));
    assert!(
        out.status.success(),
        "{MINGW_GCC} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &dll).expect("cannot put bcryptprimitives.dll in place");
}

/// A path as Windows programs under Wine see it (Wine's drive `Z:` is `/`).
pub fn windows_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// One Wine prefix; every process in it is ended when this is dropped.
#[derive(Debug)]
pub struct Wine {
    dir: TempDir,
    exe: PathBuf,
}

impl Wine {
    /// A fresh prefix (initialised with `wineboot`, a few seconds) and the Windows agent.
    pub fn start() -> Wine {
        let exe = agent_exe();
        let dir = tempfile::Builder::new()
            .prefix("sa-wine-")
            .tempdir()
            .expect("cannot make a temp dir");
        let w = Wine { dir, exe };
        let mut boot = w.command(Path::new("wineboot"));
        boot.arg("--init");
        let out = crate::proc::run(boot, w.dir.path(), Duration::from_secs(180));
        assert!(
            out.status.success(),
            "wineboot --init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The server and its service manager linger a few seconds after wineboot; a service
        // started while they wind down hangs for minutes. Wait for them to be gone.
        let mut settle = Command::new("timeout");
        settle.arg("60").arg(wineserver()).arg("-w").envs(w.env());
        crate::proc::run(settle, w.dir.path(), Duration::from_secs(90));
        w
    }

    fn prefix(&self) -> PathBuf {
        self.dir.path().join("prefix")
    }

    fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("WINEPREFIX".into(), self.prefix().into_os_string()),
            ("WINEDEBUG".into(), "-all".into()),
        ]
    }

    /// `wine64 PROGRAM` in this prefix (a Windows program: ours, or one of Wine's, like `sc`).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(wine64());
        cmd.arg(program).envs(self.env());
        cmd
    }

    /// `wine64 shard-agent.exe` in this prefix.
    pub fn agent_command(&self) -> Command {
        self.command(&self.exe)
    }

    /// How [`crate::agent::Agent::start_with`] starts a Windows agent here.
    pub fn launcher(&self) -> Launcher {
        Launcher {
            program: wine64(),
            args: vec![self.exe.clone().into_os_string()],
            env: self.env(),
            windows_paths: true,
        }
    }

    /// The prefix's `C:` drive.
    pub fn drive_c(&self) -> PathBuf {
        self.prefix().join("drive_c")
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = Command::new(wineserver())
            .arg("-k")
            .envs(self.env())
            .status();
        // Wait (at most 30 s) for the server to go before the prefix is removed.
        let _ = Command::new("timeout")
            .arg("30")
            .arg(wineserver())
            .arg("-w")
            .envs(self.env())
            .status();
    }
}
