//! Settings: every flag can also be a key of a TOML config file (`--config FILE`).
//!
//! The file is flat: keys are the long flag names with `_` for `-` (`key`, `agents`,
//! `data_shards`, `stripe_size`, `listen`, ...). Flags given on the command line win over the file.
//! A key that no command knows is an error, so a typo does not pass silently.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

/// Every key a config file may hold.
pub const KNOWN_KEYS: &[&str] = &[
    "key",
    "agents",
    "data_shards",
    "parity_shards",
    "stripe_size",
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
    "size",
    "keep",
    "agent_bin",
    "keep_last",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "gc_grace",
    "dry_run",
    "cache_dir",
    "changed_since",
    "changed_map",
    "no_wait",
    "report_only",
    "passphrase_file",
    "allow_degraded",
    "watch",
    "repair_after",
    "interval",
    "state",
];

/// Reads a config file into `T` (whose fields are all optional).
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    for k in table.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            bail!(
                "config file {}: unknown key '{k}' (known: {})",
                path.display(),
                KNOWN_KEYS.join(", ")
            );
        }
    }
    table
        .try_into()
        .with_context(|| format!("config file {} has a key of the wrong type", path.display()))
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
    /// The key file.
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
        load_key(&self.key, &self.passphrase_file)
    }
}

/// The key file setting, required.
pub fn require_key(key: &Option<PathBuf>) -> Result<PathBuf> {
    key.clone().context("no key file: give --key KEYFILE (or `key` in the config file); make one with `sa-image keygen --out KEYFILE`")
}

/// Loads the master key named by the `key` setting (required), unwrapping a passphrase-protected
/// key file with `passphrase_file` or, on a terminal, a passphrase asked for.
pub fn load_key(
    key: &Option<PathBuf>,
    passphrase_file: &Option<PathBuf>,
) -> Result<sa_core::keys::MasterKey> {
    crate::passphrase::load_key(&require_key(key)?, passphrase_file.as_deref())
}

/// The agents setting, required.
pub fn require_agents(agents: &Option<Vec<String>>) -> Result<Vec<String>> {
    match agents {
        Some(a) if !a.is_empty() => Ok(a.iter().map(|s| normalize_addr(s)).collect()),
        _ => bail!(
            "no agents: give --agents HOST:PORT[,HOST:PORT...] (or `agents` in the config file)"
        ),
    }
}

/// Adds the default agent port when an address has none.
pub fn normalize_addr(addr: &str) -> String {
    let a = addr.trim();
    if a.rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        a.to_string()
    } else {
        format!("{a}:{}", crate::DEFAULT_AGENT_PORT)
    }
}
