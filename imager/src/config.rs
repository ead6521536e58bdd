//! Settings: every flag can also be a key of a TOML config file (`--config FILE`).
//!
//! The file is flat: keys are the long flag names with `_` for `-` (`key`, `agents`,
//! `data_shards`, `stripe_size`, `listen`, ...). Flags given on the command line win over the file.
//! A key that no command knows is an error, so a typo does not pass silently. The daemon's
//! tables (`[daemon]`, `[web]`, `[alerts]`, `[volume.NAME]`) may share the file: commands pass
//! over them, so `/etc/sa-image/config.toml` serves `sa-image status` as well as the daemon.
//!
//! Durations (`--request-timeout 5s`, `--gc-grace 1.5h`) and sizes (`--cache 256MiB`) have one
//! grammar each, [`sa_core::duration`] and [`sa_core::size`], for flags and keys alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sa_core::store::ClientOptions;
use sa_engine::fleet::sleepers::WakeOptions;
use sa_engine::fleet::{Fleet, FleetOptions};
use serde::de::DeserializeOwned;

use crate::exit::usage;

/// Every key a config file may hold.
pub const KNOWN_KEYS: &[&str] = &[
    "key",
    "passphrase_file",
    "agents",
    "connect_timeout",
    "request_timeout",
    "stall_timeout",
    "data_shards",
    "parity_shards",
    "stripe_size",
    "seal_format",
    "volume",
    "json",
    "to",
    "out",
    "force",
    "listen",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "idle_timeout",
    "overlay",
    "hydrate",
    "hydrate_rate",
    "hydrate_state",
    "cache",
    "hedge_after",
    "size",
    "keep",
    "keep_last",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "gc_grace",
    "dry_run",
    "cache_dir",
    "changed_since",
    "changed_map",
    "dirty_bitmap",
    "new_bitmap",
    "freeze",
    "freeze_timeout",
    "lvm_snapshot",
    "lvm_snapshot_size",
    "pre_hook",
    "post_hook",
    "hook_timeout",
    "inconsistent_ok",
    "no_wait",
    "report_only",
    "allow_degraded",
    "watch",
    "repair_after",
    "interval",
    "state",
    "max_age",
    "max_absence",
    // drill
    "withhold",
    "console",
    "port",
    "screenshot_after",
    "deadline",
    "memory",
    "cpus",
    "firmware",
    "disk_bus",
    "accel",
    "qemu",
    "work_dir",
    "screenshot",
    // wake, durability, plan
    "wake_wait",
    "durability",
    "loss_rate",
    "repair_throughput",
    "target",
    // offsite
    "offsite",
    "offsite_only",
];

/// Tables of the daemon's settings (`sa-image daemon`, see [`crate::daemon::config`]): other
/// commands reading the same file pass over them.
pub const DAEMON_TABLES: &[&str] = &["daemon", "web", "alerts", "volume"];

/// Reads a config file into `T` (whose fields are all optional).
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        usage(format!(
            "config file {} is not valid TOML: {e}",
            path.display()
        ))
    })?;
    let mut table = table;
    table.retain(|k, _| !DAEMON_TABLES.contains(&k));
    for k in table.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            return Err(usage(format!(
                "config file {}: unknown key '{k}' (known: {})",
                path.display(),
                KNOWN_KEYS.join(", ")
            )));
        }
    }
    table.try_into().map_err(|e| {
        usage(format!(
            "config file {} has a key of the wrong type: {e}",
            path.display()
        ))
    })
}

/// Fills every `None` field of `$cli` from `$file`, and ORs boolean flags.
#[macro_export]
macro_rules! merge {
    ($cli:expr, $file:expr; $($opt:ident),* $(; bools $($flag:ident),*)?) => {{
        $( if $cli.$opt.is_none() { $cli.$opt = $file.$opt.take(); } )*
        $( $( $cli.$flag = $cli.$flag || $file.$flag; )* )?
    }};
}

/// The key file and how to open it: the flags (and config keys) of every command that reads
/// or writes backups.
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct KeyArgs {
    /// The key file (made by `sa-image keygen`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// File whose first line is the passphrase of a wrapped key file (without it, a wrapped
    /// key's passphrase is asked for on a terminal).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

impl KeyArgs {
    /// Fills the settings not given as flags from the config file's.
    pub fn merge(&mut self, file: &mut KeyArgs) {
        merge!(self, file; key, passphrase_file);
    }

    /// Loads the master key (the key file is required).
    pub fn load(&self) -> Result<sa_core::keys::MasterKey> {
        let key = self.key.clone().ok_or_else(|| {
            usage("no key file: give --key KEYFILE (or `key` in the config file); make one with `sa-image keygen --out KEYFILE`")
        })?;
        crate::passphrase::load_key(&key, self.passphrase_file.as_deref())
    }
}

/// Which agents to reach and how long to wait for them: the flags (and config keys) of every
/// command that talks to agents.
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct FleetArgs {
    /// Agents, HOST[:PORT] (port 7710 when left out), comma-separated. One member of the agent
    /// book is enough: every other member in service is reached too. A first snapshot names
    /// at least k + m.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// How long to wait for an agent to accept a connection and prove its identity, e.g. 5s
    /// [default: 5s].
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// How long one request to an agent may take before the agent counts as gone, e.g. 60s
    /// [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// How long the link to an agent may stay silent (nothing acknowledged, no answer to a
    /// keepalive probe) while a request is out before the agent counts as gone, e.g. 4s; a PC
    /// cut off without a reset then costs this, not the request timeout [default: 4s].
    #[arg(long, value_name = "DURATION")]
    pub stall_timeout: Option<String>,
    /// Where this machine keeps its manifest cache, a copy of the agent book, agent sightings
    /// and the repair watcher's clock [default: $XDG_CACHE_HOME/sa-image or ~/.cache/sa-image].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

impl FleetArgs {
    /// Fills the settings not given as flags from the config file's.
    pub fn merge(&mut self, file: &mut FleetArgs) {
        merge!(self, file; agents, connect_timeout, request_timeout, stall_timeout, cache_dir);
    }

    /// The agent addresses (required), with the default port added where missing.
    pub fn addrs(&self) -> Result<Vec<String>> {
        match &self.agents {
            Some(a) if !a.is_empty() => Ok(a.iter().map(|s| normalize_addr(s)).collect()),
            _ => Err(usage(
                "no agents: give --agents HOST[:PORT][,HOST[:PORT]...] (or `agents` in the config file)",
            )),
        }
    }

    /// The fleet of `keys`' owner with these timeouts, keeping a copy of the agent book in this
    /// machine's cache directory.
    pub fn fleet(&self, keys: sa_core::keys::Keys) -> Result<Fleet> {
        let owner_dir = sa_engine::cache_dir::owner_dir(self.cache_dir.as_deref(), &keys);
        Ok(Fleet::new(
            Arc::new(keys),
            FleetOptions {
                client: self.client_options()?,
            },
        )
        .with_cache_dir(owner_dir.as_deref()))
    }

    /// The connect, request and stall timeouts of every agent connection.
    pub fn client_options(&self) -> Result<ClientOptions> {
        let mut client = ClientOptions::default();
        if let Some(t) = &self.connect_timeout {
            client.connect_timeout =
                nonzero(duration(t, "--connect-timeout")?, "--connect-timeout")?;
        }
        if let Some(t) = &self.request_timeout {
            client.request_timeout =
                nonzero(duration(t, "--request-timeout")?, "--request-timeout")?;
        }
        if let Some(t) = &self.stall_timeout {
            client.stall_timeout = stall(duration(t, "--stall-timeout")?)?;
        }
        Ok(client)
    }
}

/// Whether to wake sleeping agents by Wake-on-LAN, and how long to wait for them: the flag (and
/// config key) of `restore`, `serve`, `snapshot`, `repair` and `verify`.
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct WakeArgs {
    /// Members of the agent book that do not answer are woken by Wake-on-LAN, and the command
    /// waits this long for enough of them (k per stripe to read, k + m to store); 0 turns
    /// waking off [default: 120s].
    #[arg(long, value_name = "DURATION")]
    pub wake_wait: Option<String>,
}

impl WakeArgs {
    /// Fills the setting when not given as a flag from the config file's.
    pub fn merge(&mut self, file: &mut WakeArgs) {
        merge!(self, file; wake_wait);
    }

    /// The wake options (a zero wait: none).
    pub fn options(&self) -> Result<WakeOptions> {
        let mut o = WakeOptions::default();
        if let Some(t) = &self.wake_wait {
            o.wait = duration(t, "--wake-wait")?;
        }
        Ok(o)
    }

    /// `fleet`, waking sleepers as set.
    pub fn apply(&self, fleet: Fleet) -> Result<Fleet> {
        Ok(fleet.with_wake(self.options()?))
    }
}

/// The `offsite` table of a config file (and of a daemon's `[volume.NAME]`): the same settings
/// as the `--offsite*` flags.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffsiteTable {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: Option<String>,
    /// The S3 endpoint (`http://HOST:PORT`); none: AWS.
    pub endpoint: Option<String>,
    /// The region.
    pub region: Option<String>,
    /// The credentials file.
    pub credentials: Option<PathBuf>,
    /// `data` (default) or `all`.
    pub shards: Option<sa_engine::offsite::ShardSet>,
    /// Upload rate, e.g. `20MiB/s`.
    pub rate: Option<String>,
    /// The daemon only: push on this schedule (e.g. `daily 22:00`) instead of after each
    /// snapshot. Commands pass over it.
    pub schedule: Option<String>,
}

/// The offsite tier: the flags (and the config key `offsite`, a table with the same names
/// without `offsite-`) of every command that writes or reads backups.
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct OffsiteArgs {
    /// Offsite copy in S3-compatible object storage: s3://BUCKET[/PREFIX]. Snapshots upload
    /// to it after they commit; readers take from it what the agents cannot give.
    #[arg(long = "offsite", value_name = "S3URL")]
    #[serde(skip)]
    pub offsite_url: Option<String>,
    /// The S3 endpoint, e.g. http://10.0.0.9:3900 (Garage, MinIO) [default: AWS].
    #[arg(long, value_name = "URL")]
    #[serde(skip)]
    pub offsite_endpoint: Option<String>,
    /// The bucket's region [default: $AWS_REGION, else us-east-1].
    #[arg(long, value_name = "REGION")]
    #[serde(skip)]
    pub offsite_region: Option<String>,
    /// File with `aws_access_key_id = ...` and `aws_secret_access_key = ...` lines
    /// [default: $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY].
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub offsite_credentials: Option<PathBuf>,
    /// Which shards of each stripe go offsite: data (k per stripe; the store's own redundancy
    /// covers them) or all (k + m) [default: data].
    #[arg(long, value_name = "data|all", value_parser = ["data", "all"])]
    #[serde(skip)]
    pub offsite_shards: Option<String>,
    /// Upload at most this many bytes per second, e.g. 20MiB/s [default: unlimited].
    #[arg(long, value_name = "RATE")]
    #[serde(skip)]
    pub offsite_rate: Option<String>,
    /// Readers: no agent is asked; the catalog and every shard come from the offsite copy (the
    /// office is gone: the key and the bucket are enough).
    #[arg(long)]
    pub offsite_only: bool,
    /// The config file's `offsite` table.
    #[arg(skip)]
    pub offsite: Option<OffsiteTable>,
}

impl OffsiteArgs {
    /// Fills the settings not given as flags from the config file's.
    pub fn merge(&mut self, file: &mut OffsiteArgs) {
        let t = file.offsite.take().unwrap_or_default();
        self.offsite_url = self.offsite_url.take().or(t.url);
        self.offsite_endpoint = self.offsite_endpoint.take().or(t.endpoint);
        self.offsite_region = self.offsite_region.take().or(t.region);
        self.offsite_credentials = self.offsite_credentials.take().or(t.credentials);
        self.offsite_rate = self.offsite_rate.take().or(t.rate);
        if self.offsite_shards.is_none() {
            self.offsite_shards = t.shards.map(|s| match s {
                sa_engine::offsite::ShardSet::Data => "data".into(),
                sa_engine::offsite::ShardSet::All => "all".into(),
            });
        }
        self.offsite_only |= file.offsite_only;
    }

    /// The offsite settings, when a url is set.
    pub fn config(&self) -> Result<Option<sa_engine::offsite::OffsiteConfig>> {
        let Some(url) = &self.offsite_url else {
            if self.offsite_only {
                return Err(usage(
                    "--offsite-only needs the bucket: give --offsite s3://BUCKET[/PREFIX] (or \
                     the `offsite` table in the config file)",
                ));
            }
            return Ok(None);
        };
        sa_engine::offsite::parse_url(url).map_err(usage)?;
        Ok(Some(sa_engine::offsite::OffsiteConfig {
            url: url.clone(),
            endpoint: self.offsite_endpoint.clone(),
            region: self.offsite_region.clone(),
            credentials: self.offsite_credentials.clone(),
            shards: match self.offsite_shards.as_deref() {
                Some("all") => sa_engine::offsite::ShardSet::All,
                _ => sa_engine::offsite::ShardSet::Data,
            },
        }))
    }

    /// The upload rate (`None`: unlimited).
    pub fn rate(&self) -> Result<Option<u64>> {
        match &self.offsite_rate {
            Some(r) => rate(r, "--offsite-rate"),
            None => Ok(None),
        }
    }

    /// The bucket, when one is set.
    pub fn store(&self) -> Result<Option<sa_engine::offsite::OffsiteStore>> {
        match self.config()? {
            Some(c) => Ok(Some(sa_engine::offsite::OffsiteStore::open(&c)?)),
            None => Ok(None),
        }
    }

    /// `fleet` with the bucket as its readers' last source (or only one, `--offsite-only`).
    pub fn apply(&self, fleet: Fleet) -> Result<Fleet> {
        Ok(match self.store()? {
            Some(s) => fleet.with_offsite(s, self.offsite_only),
            None => fleet,
        })
    }

    /// The agent addresses: required, unless `--offsite-only` (then none are asked).
    pub fn addrs(&self, fleet: &FleetArgs) -> Result<Vec<String>> {
        if self.offsite_only {
            return Ok(Vec::new());
        }
        fleet.addrs()
    }
}

fn nonzero(d: Duration, flag: &str) -> Result<Duration> {
    if d.is_zero() {
        return Err(usage(format!("{flag} must be more than 0")));
    }
    Ok(d)
}

/// A stall timeout: at least a second (keepalive probes are counted in whole seconds).
fn stall(d: Duration) -> Result<Duration> {
    if d < Duration::from_secs(1) {
        return Err(usage(format!(
            "--stall-timeout {:.3}s is too short: give at least 1s (keepalive probes go once a \
             second); 4s is the default, more for links that queue data for long",
            d.as_secs_f64()
        )));
    }
    Ok(d)
}

/// Adds the default agent port when an address has none.
pub fn normalize_addr(addr: &str) -> String {
    let a = addr.trim();
    if a.rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        a.to_string()
    } else {
        format!("{a}:{}", sa_engine::DEFAULT_AGENT_PORT)
    }
}

/// Parses a duration flag or key (a usage error naming `flag` when it is not one).
pub fn duration(text: &str, flag: &str) -> Result<Duration> {
    sa_core::duration::parse_duration(text).map_err(|e| usage(format!("{flag}: {e}")))
}

/// Parses a size flag or key (a usage error naming `flag` when it is not one).
pub fn size(text: &str, flag: &str) -> Result<u64> {
    sa_core::size::parse_size(text).map_err(|e| usage(format!("{flag}: {e}")))
}

/// Parses a rate: a size per second (`200MiB`, `200MiB/s`), or `unlimited` / `0` for none.
pub fn rate(text: &str, flag: &str) -> Result<Option<u64>> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let n = size(t.strip_suffix("/s").unwrap_or(t), flag)?;
    Ok((n > 0).then_some(n))
}

/// The grace period from `--gc-grace` (default [`sa_engine::gc::DEFAULT_GRACE`]).
pub fn gc_grace(text: Option<&str>) -> Result<Duration> {
    match text {
        Some(t) => duration(t, "--gc-grace"),
        None => Ok(sa_engine::gc::DEFAULT_GRACE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(rate("200MiB", "--r").unwrap(), Some(200 << 20));
        assert_eq!(rate("200MiB/s", "--r").unwrap(), Some(200 << 20));
        assert_eq!(rate("unlimited", "--r").unwrap(), None);
        assert_eq!(rate("0", "--r").unwrap(), None);
        let e = rate("fast", "--hydrate-rate").unwrap_err();
        assert_eq!(crate::exit::code_of(&e), crate::exit::USAGE);
        assert!(e.to_string().contains("--hydrate-rate"), "{e}");
    }

    #[test]
    fn stall_timeout_is_read_and_checked() {
        let mut f = FleetArgs {
            stall_timeout: Some("2.5s".into()),
            ..FleetArgs::default()
        };
        let o = f.client_options().unwrap();
        assert_eq!(o.stall_timeout, Duration::from_millis(2500));
        assert_eq!(
            FleetArgs::default().client_options().unwrap().stall_timeout,
            sa_core::store::remote::STALL_TIMEOUT
        );
        f.stall_timeout = Some("300ms".into());
        let e = f.client_options().unwrap_err();
        assert_eq!(crate::exit::code_of(&e), crate::exit::USAGE);
        assert!(e.to_string().contains("at least 1s"), "{e}");
        f.stall_timeout = Some("soon".into());
        let e = f.client_options().unwrap_err();
        assert!(e.to_string().contains("--stall-timeout"), "{e}");
    }

    #[test]
    fn addresses_get_the_default_port() {
        assert_eq!(normalize_addr("pc1"), "pc1:7710");
        assert_eq!(normalize_addr("10.0.0.5:7000"), "10.0.0.5:7000");
        assert_eq!(normalize_addr(" 10.0.0.5 "), "10.0.0.5:7710");
    }
}
