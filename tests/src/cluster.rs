//! A recovery key and a set of agents owned by it, and `sa-image` runs against them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::agent::Agent;
use crate::bins::bin;

/// Longest any one `sa-image` run may take before the test fails.
pub const SA_TIMEOUT: Duration = Duration::from_secs(120);

/// A recovery key file and the owner id it gives.
#[derive(Debug, Clone)]
pub struct Key {
    /// The key file (mode 0600).
    pub path: PathBuf,
    /// The owner id, 64 hex digits.
    pub owner: String,
}

impl Key {
    /// Makes a new key at `path` with `sa-image keygen`, and checks `owner-id` agrees.
    pub fn generate(path: &Path) -> Key {
        let scratch = path.parent().expect("key path has a parent");
        let out = run_sa(
            [OsStr::new("keygen"), OsStr::new("--out"), path.as_os_str()],
            scratch,
        );
        let keygen = expect_ok(&out, "sa-image keygen");
        let owner = last_line(&keygen);
        assert!(
            is_owner_id(&owner),
            "keygen's last line is not an owner id: {owner:?}\n{keygen}"
        );
        let out = run_sa(
            [
                OsStr::new("owner-id"),
                OsStr::new("--key"),
                path.as_os_str(),
            ],
            scratch,
        );
        let again = last_line(&expect_ok(&out, "sa-image owner-id"));
        assert_eq!(again, owner, "owner-id disagrees with keygen");
        Key {
            path: path.to_path_buf(),
            owner,
        }
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn is_owner_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How to start a [`Cluster`].
#[derive(Debug, Default, Clone)]
pub struct ClusterOptions {
    /// Number of agents.
    pub agents: usize,
    /// Extra flags for some agents, by index (e.g. `(0, vec!["--quota", "1M"])`).
    pub agent_args: Vec<(usize, Vec<String>)>,
    /// Start the agents for this owner id instead of the cluster key's.
    pub owner: Option<String>,
}

/// A temporary directory holding a key and `n` agents owned by it.
///
/// Fields drop in order: the agents are killed before the directory is removed.
#[derive(Debug)]
pub struct Cluster {
    /// The agents, `a0`, `a1`, ...
    pub agents: Vec<Agent>,
    /// The recovery key.
    pub key: Key,
    dir: TempDir,
}

impl Cluster {
    /// A key and `n` plain agents.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(ClusterOptions {
            agents: n,
            ..Default::default()
        })
    }

    /// A key and agents as `opts` says.
    pub fn start_with(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sa-tests-")
            .tempdir()
            .expect("cannot make a temp dir");
        let key = Key::generate(&dir.path().join("key"));
        let owner = opts.owner.clone().unwrap_or_else(|| key.owner.clone());
        let agents = (0..opts.agents)
            .map(|i| {
                let extra: Vec<&str> = opts
                    .agent_args
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .flat_map(|(_, a)| a.iter().map(String::as_str))
                    .collect();
                Agent::start(dir.path(), &format!("a{i}"), &owner, &extra)
            })
            .collect();
        Cluster { agents, key, dir }
    }

    /// The cluster's temporary directory (for images, targets, more keys).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every agent's address, comma-separated, killed ones included.
    pub fn agents_arg(&self) -> String {
        join_addrs(self.agents.iter())
    }

    /// Runs `sa-image ARGS --key KEY --agents ALL`.
    pub fn sa<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.sa_with(args, &self.key.path, &self.agents_arg())
    }

    /// Runs `sa-image ARGS --key KEY --agents AGENTS`.
    pub fn sa_agents<S: AsRef<OsStr>>(&self, args: &[S], agents: &str) -> Output {
        self.sa_with(args, &self.key.path, agents)
    }

    /// Runs `sa-image ARGS --key KEYFILE --agents AGENTS`.
    pub fn sa_with<S: AsRef<OsStr>>(&self, args: &[S], key: &Path, agents: &str) -> Output {
        let mut all: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        all.extend([
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--agents"),
            OsStr::new(agents),
        ]);
        run_sa(all, self.dir())
    }

    /// Runs `sa-image ARGS` with nothing added.
    pub fn sa_bare<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        run_sa(args, self.dir())
    }

    /// A `sa-image` command with `--key` and all agents, not yet started (for runs a test kills).
    pub fn sa_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(bin("sa-image"));
        cmd.args(args)
            .arg("--key")
            .arg(&self.key.path)
            .arg("--agents")
            .arg(self.agents_arg());
        cmd
    }

    /// Runs `sa-image ARGS --json --key KEY --agents AGENTS`: its exit code, the JSON report on
    /// stdout, and the whole output.
    pub fn run_json(&self, args: &[&OsStr], agents: &str) -> (i32, Value, Output) {
        let mut all: Vec<&OsStr> = args.to_vec();
        all.push(OsStr::new("--json"));
        let out = self.sa_agents(&all, agents);
        let code = out
            .status
            .code()
            .unwrap_or_else(|| panic!("sa-image died by a signal:\n{}", shown(&out)));
        let v = parse_json(
            &String::from_utf8_lossy(&out.stdout),
            &format!("sa-image {args:?} (exit {code}):\n{}", shown(&out)),
        );
        eprintln!("[sa-image {:?} exit {code}] {v}", args[0]);
        (code, v, out)
    }

    /// `status --json` with the cluster's private cache directory (last-seen times live there):
    /// the exit code and the report.
    pub fn status_json(&self, agents: &str) -> (i32, Value) {
        let cache = self.path("cache");
        let args = [
            OsStr::new("status"),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
        ];
        let (code, v, _) = self.run_json(&args, agents);
        (code, v)
    }

    /// The exit code of `verify SNAPSHOT` through `agents`.
    pub fn verify_code(&self, snapshot: &str, agents: &str) -> i32 {
        self.run_json(&[OsStr::new("verify"), OsStr::new(snapshot)], agents)
            .0
    }

    /// Takes a snapshot of `source` with `--json` (plus `extra` flags), asserts success, and
    /// returns the JSON report.
    pub fn snapshot(&self, source: &Path, extra: &[&str]) -> Value {
        let mut args: Vec<&OsStr> = vec![OsStr::new("snapshot"), source.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        args.push(OsStr::new("--json"));
        json(&self.sa(&args), "sa-image snapshot")
    }

    /// Restores `snapshot` to `target` with `--json` through the agents `agents`, asserts success,
    /// and returns the JSON report.
    pub fn restore(&self, snapshot: &str, target: &Path, agents: &str) -> Value {
        let args = [
            OsStr::new("restore"),
            OsStr::new(snapshot),
            OsStr::new("--to"),
            target.as_os_str(),
            OsStr::new("--json"),
        ];
        json(&self.sa_agents(&args, agents), "sa-image restore")
    }
}

/// Addresses of `agents`, comma-separated.
pub fn join_addrs<'a>(agents: impl IntoIterator<Item = &'a Agent>) -> String {
    agents
        .into_iter()
        .map(Agent::addr_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `sa-image ARGS` (scratch files in `scratch`), within [`SA_TIMEOUT`].
pub fn run_sa<I, S>(args: I, scratch: &Path) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin("sa-image"));
    cmd.args(args);
    crate::proc::run(cmd, scratch, SA_TIMEOUT)
}

/// Stdout and stderr of a run, for messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stdout and stderr together, lower-cased, for looking for words in an error.
pub fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase()
}

/// Asserts `out` succeeded and returns its stdout.
pub fn expect_ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", shown(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts `out` failed with exit code `code` (any non-zero code for `None`) and returns its
/// stdout and stderr, lower-cased.
pub fn expect_fail(out: &Output, code: Option<i32>, what: &str) -> String {
    // Shown with `--nocapture`: the messages are what an operator reads, worth a look.
    eprintln!("[{what}] {}", shown(out));
    match code {
        Some(c) => assert_eq!(
            out.status.code(),
            Some(c),
            "{what}: expected exit {c}:\n{}",
            shown(out)
        ),
        None => assert!(
            !out.status.success() && out.status.code().is_some(),
            "{what}: expected a clean failure (non-zero exit, no signal):\n{}",
            shown(out)
        ),
    }
    text(out)
}

/// Asserts `out` succeeded and parses its stdout as one JSON value.
pub fn json(out: &Output, what: &str) -> Value {
    let stdout = expect_ok(out, what);
    let v = parse_json(&stdout, what);
    eprintln!("[{what}] {v}");
    v
}

/// Parses `stdout` as one JSON value, with the text in the panic message if it is not.
pub fn parse_json(stdout: &str, what: &str) -> Value {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{what}: stdout is not one JSON value ({e}):\n{stdout}"))
}

/// `v[field]` as a u64, or a panic naming the field.
pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field:?} missing or not a number in {v}"))
}

/// `v[field]` as a string, or a panic naming the field.
pub fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("field {field:?} missing or not a string in {v}"))
}
