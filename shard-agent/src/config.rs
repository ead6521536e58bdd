//! The agent's flags and config file, resolved into one [`AgentConfig`].
//!
//! Every flag is also a key of the TOML config file (`--max-rate` is `max_rate`); flags win over
//! the file. Anything wrong here is a usage error (exit 64).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sa_core::keys::OwnerId;
use sa_core::size::parse_size;
use sa_core::store::{Limits, MinFree};
use serde::Deserialize;
use shard_agent::listen::{listen_addr, DEFAULT_LISTEN};
use shard_agent::priority::Priority;

/// Stores shards of sa-image backups for one owner, in a directory, within a quota, leaving the
/// PC's disk, CPU and network to its user.
#[derive(Parser, Debug)]
#[command(
    name = "shard-agent",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The agent as a Windows service: `service install [FLAGS]`, `service uninstall`.
    #[command(subcommand)]
    Service(Box<ServiceCommand>),
    /// Hidden, for packaging: `completions SHELL` and `manpages DIR`.
    #[command(flatten)]
    Docs(sa_clidocs::DocsCommand),
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Register the agent as a Windows service (it runs as LocalSystem, starts with the PC, and
    /// is started now) with these flags; from an administrator prompt.
    Install(AgentArgs),
    /// Stop and remove the Windows service.
    Uninstall,
    /// What the service manager starts (not for people).
    #[command(hide = true)]
    Run(AgentArgs),
}

/// The agent's flags (each also a config file key).
#[derive(Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// Directory that holds the shards (created if missing). Default on Windows:
    /// %ProgramData%\sa-image\shards; required elsewhere.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Address to listen on: HOST:PORT, or a bare host for port 7710 [default: 0.0.0.0:7710].
    #[arg(long)]
    pub listen: Option<String>,
    /// Owner id allowed to use this agent (from `sa-image owner-id --key KEYFILE`).
    #[arg(long)]
    pub owner: Option<String>,
    /// Most bytes to store, e.g. 200G (default: the free space above --min-free).
    #[arg(long)]
    pub quota: Option<String>,
    /// Free space the agent always leaves on its disk, whatever the quota: a share of the disk
    /// (10%) or a size (20G); 0 for none [default: 10%].
    #[arg(long)]
    pub min_free: Option<String>,
    /// Most bytes per second of shard traffic, in and out together, e.g. 20MiB; at least 1MiB
    /// (default: no limit).
    #[arg(long)]
    pub max_rate: Option<String>,
    /// CPU and disk priority: low (yield to the PC's user) or normal [default: low].
    #[arg(long)]
    pub priority: Option<String>,
    /// Most client connections at once [default: 256].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Background scrub rate, bytes per second, e.g. 20MiB (the default); 0 turns the background
    /// scrub off (a pass asked for with `sa-image scrub` then runs unthrottled).
    #[arg(long)]
    pub scrub_rate: Option<String>,
    /// Append the log to this file instead of stderr.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Keep the PC from sleeping while sa-image works with this agent, until this long after its
    /// last request, e.g. 5m; `off` never [default: 2m]. Linux: a systemd-logind inhibitor lock.
    #[arg(long, value_name = "DURATION|off")]
    pub keep_awake: Option<String>,
    /// TOML file with any of the keys above (dir, listen, owner, quota, min_free, max_rate,
    /// priority, max_connections, scrub_rate, log_file, keep_awake).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    listen: Option<String>,
    owner: Option<String>,
    quota: Option<String>,
    min_free: Option<String>,
    max_rate: Option<String>,
    priority: Option<String>,
    max_connections: Option<usize>,
    scrub_rate: Option<String>,
    log_file: Option<PathBuf>,
    keep_awake: Option<String>,
}

/// Everything the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub dir: PathBuf,
    pub listen: String,
    pub owner: OwnerId,
    pub limits: Limits,
    /// Bytes per second of shard traffic, `None` for no limit.
    pub max_rate: Option<u64>,
    pub priority: Priority,
    pub max_connections: usize,
    pub scrub_rate: u64,
    pub log_file: Option<PathBuf>,
    /// How long after a request the PC is kept awake; None: never.
    pub keep_awake: Option<std::time::Duration>,
}

/// The lowest `--max-rate`: slower, a server's requests (60 s each, several 1 MiB shards in
/// flight per agent) would time out and the agent be taken for lost.
const MIN_MAX_RATE: u64 = 1 << 20;

/// A rate such as `20MiB` or `20MiB/s`.
fn parse_rate(text: &str, what: &str) -> Result<u64> {
    parse_size(text.trim().trim_end_matches("/s")).with_context(|| format!("--{what} '{text}'"))
}

/// The shard directory when none is given: `%ProgramData%\sa-image\shards` on Windows.
pub fn default_dir() -> Option<PathBuf> {
    cfg!(windows).then(|| program_data().join("sa-image").join("shards"))
}

/// `%ProgramData%` (Windows' machine-wide application data), `C:\ProgramData` if unset.
pub fn program_data() -> PathBuf {
    std::env::var_os("ProgramData")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
}

impl AgentArgs {
    /// Flags and file together, checked.
    pub fn resolve(&self) -> Result<AgentConfig> {
        let file: FileConfig = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("config {} is not valid", p.display()))?
            }
            None => FileConfig::default(),
        };
        let Some(dir) = self.dir.clone().or(file.dir).or_else(default_dir) else {
            bail!("no shard directory: give --dir DIR (or `dir` in the config file)")
        };
        let listen = self
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_addr(&listen).map_err(|e| anyhow!("--listen: {e}"))?;
        let Some(owner) = self.owner.clone().or(file.owner) else {
            bail!(
                "no owner: give --owner OWNER_ID, printed by `sa-image owner-id --key KEYFILE` \
                 on the server"
            )
        };
        let owner: OwnerId = owner.parse().context("--owner")?;
        let quota = match self.quota.clone().or(file.quota) {
            Some(q) => parse_size(&q).with_context(|| format!("--quota '{q}'"))?,
            None => 0,
        };
        let min_free = match self.min_free.clone().or(file.min_free) {
            Some(m) => MinFree::parse(&m).context("--min-free")?,
            None => MinFree::DEFAULT,
        };
        let max_rate = match self.max_rate.clone().or(file.max_rate) {
            Some(r) => Some(parse_rate(&r, "max-rate")?).filter(|&r| r > 0),
            None => None,
        };
        if let Some(r) = max_rate.filter(|&r| r < MIN_MAX_RATE) {
            bail!(
                "--max-rate {r} bytes/s is too low: at least 1MiB (a server gives each request \
                 60 s, and a snapshot has several shards of 1 MiB in flight per agent)"
            );
        }
        let priority = match self.priority.clone().or(file.priority) {
            Some(p) => p.parse().map_err(|e| anyhow!("--priority: {e}"))?,
            None => Priority::Low,
        };
        let max_connections = self.max_connections.or(file.max_connections).unwrap_or(256);
        let scrub_rate = match self.scrub_rate.clone().or(file.scrub_rate) {
            Some(r) => parse_rate(&r, "scrub-rate")?,
            None => shard_agent::scrub::DEFAULT_RATE,
        };
        let keep_awake = match self.keep_awake.clone().or(file.keep_awake) {
            None => Some(shard_agent::awake::DEFAULT_HOLD),
            Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
            Some(v) => Some(
                sa_core::duration::parse_duration(&v)
                    .map_err(|e| anyhow!("--keep-awake '{v}': {e}; or `off`"))?,
            )
            .filter(|d| !d.is_zero()),
        };
        Ok(AgentConfig {
            dir,
            listen,
            owner,
            limits: Limits { quota, min_free },
            max_rate,
            priority,
            max_connections,
            scrub_rate,
            log_file: self.log_file.clone().or(file.log_file),
            keep_awake,
        })
    }

    /// The flags given, as arguments again, with paths made absolute (a service starts in
    /// another directory).
    #[cfg_attr(not(any(windows, test)), allow(dead_code))]
    pub fn to_args(&self) -> Result<Vec<OsString>> {
        let mut out: Vec<OsString> = Vec::new();
        let mut path = |flag: &str, p: &Option<PathBuf>| -> Result<()> {
            if let Some(p) = p {
                out.push(flag.into());
                out.push(absolute(p)?.into_os_string());
            }
            Ok(())
        };
        path("--dir", &self.dir)?;
        path("--log-file", &self.log_file)?;
        path("--config", &self.config)?;
        let max_connections = self.max_connections.map(|n| n.to_string());
        for (flag, v) in [
            ("--listen", &self.listen),
            ("--owner", &self.owner),
            ("--quota", &self.quota),
            ("--min-free", &self.min_free),
            ("--max-rate", &self.max_rate),
            ("--priority", &self.priority),
            ("--max-connections", &max_connections),
            ("--scrub-rate", &self.scrub_rate),
            ("--keep-awake", &self.keep_awake),
        ] {
            if let Some(v) = v {
                out.push(flag.into());
                out.push(v.into());
            }
        }
        Ok(out)
    }
}

#[cfg_attr(not(any(windows, test)), allow(dead_code))]
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot make {} absolute", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "abababababababababababababababababababababababababababababababab";

    fn args(flags: &[&str]) -> AgentArgs {
        let mut all = vec!["shard-agent"];
        all.extend_from_slice(flags);
        Cli::try_parse_from(all).expect("flags parse").agent
    }

    #[test]
    fn defaults_for_a_desk_pc() {
        let c = args(&["--dir", "d", "--owner", OWNER]).resolve().unwrap();
        assert_eq!(c.listen, "0.0.0.0:7710");
        assert_eq!(c.limits.min_free, MinFree::Percent(10.0));
        assert_eq!(c.limits.quota, 0);
        assert_eq!(c.priority, Priority::Low);
        assert_eq!(c.max_rate, None);
        assert_eq!(c.keep_awake, Some(shard_agent::awake::DEFAULT_HOLD));
    }

    #[test]
    fn keep_awake_takes_a_duration_or_off() {
        let with = |v: &str| args(&["--dir", "d", "--owner", OWNER, "--keep-awake", v]).resolve();
        assert_eq!(
            with("5m").unwrap().keep_awake,
            Some(std::time::Duration::from_secs(300))
        );
        assert_eq!(with("off").unwrap().keep_awake, None);
        assert_eq!(with("0s").unwrap().keep_awake, None);
        let e = with("soon").unwrap_err().to_string();
        assert!(
            e.contains("--keep-awake 'soon'") && e.contains("off"),
            "{e}"
        );
    }

    #[test]
    fn every_flag_is_a_config_key_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "dir = 'x'\nlisten = '127.0.0.9'\nowner = '{OWNER}'\nquota = '1G'\n\
                 min_free = '5G'\nmax_rate = '20MiB/s'\npriority = 'normal'\n\
                 max_connections = 9\nscrub_rate = '1M'\nlog_file = 'a.log'\n\
                 keep_awake = '10m'\n"
            ),
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = args(&["--config", f]).resolve().unwrap();
        assert_eq!(c.dir, PathBuf::from("x"));
        assert_eq!(c.listen, "127.0.0.9:7710");
        assert_eq!(c.limits.quota, 1 << 30);
        assert_eq!(c.limits.min_free, MinFree::Bytes(5 << 30));
        assert_eq!(c.max_rate, Some(20 << 20));
        assert_eq!(c.priority, Priority::Normal);
        assert_eq!((c.max_connections, c.scrub_rate), (9, 1 << 20));
        assert_eq!(c.log_file, Some(PathBuf::from("a.log")));
        assert_eq!(c.keep_awake, Some(std::time::Duration::from_secs(600)));
        let c = args(&["--config", f, "--min-free", "1%", "--priority", "low"])
            .resolve()
            .unwrap();
        assert_eq!(c.limits.min_free, MinFree::Percent(1.0));
        assert_eq!(c.priority, Priority::Low);
    }

    #[test]
    fn the_macos_sample_config_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shard-agent.toml");
        let text = include_str!("../../packaging/macos/shard-agent.toml")
            .replace("REPLACE-WITH-THE-OWNER-ID", OWNER);
        std::fs::write(&file, text).unwrap();
        let c = args(&["--config", file.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.listen, "0.0.0.0:7710");
        assert_eq!(c.priority, Priority::Low);
        assert_eq!(c.limits.min_free, MinFree::Percent(10.0));
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flags, says) in [
            (vec!["--owner", OWNER, "--min-free", "150%"], "min-free"),
            (vec!["--owner", OWNER, "--max-rate", "fast"], "max-rate"),
            (vec!["--owner", OWNER, "--max-rate", "512K"], "too low"),
            (vec!["--owner", OWNER, "--priority", "high"], "priority"),
            (vec!["--owner", OWNER, "--listen", "0.0.0.0:x"], "listen"),
            (vec!["--owner", "nothex"], "owner"),
            (vec!["--dir", "d"], "no owner"),
        ] {
            let mut f = flags.clone();
            if !f.contains(&"--dir") {
                f.extend(["--dir", "d"]);
            }
            let e = format!("{:#}", args(&f).resolve().unwrap_err());
            assert!(e.contains(says), "{flags:?}: {e}");
        }
    }

    #[test]
    fn args_round_trip_with_absolute_paths() {
        let a = args(&["--dir", "d", "--owner", OWNER, "--max-rate", "1M"]);
        let back: Vec<String> = a
            .to_args()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(std::path::Path::new(&back[1]).is_absolute(), "{back:?}");
        let mut all = vec!["shard-agent".to_string()];
        all.extend(back);
        let again = Cli::try_parse_from(all).unwrap().agent.resolve().unwrap();
        assert_eq!(again.max_rate, Some(1 << 20));
        assert!(again.dir.ends_with("d"));
    }
}
