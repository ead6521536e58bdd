//! `keygen` and `owner-id`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sa_core::keys::MasterKey;
use serde::Deserialize;

use crate::config::{self, require_key};
use crate::merge;

/// Flags of `keygen`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeygenArgs {
    /// Where to write the new key file (mode 0600).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overwrite an existing key file (the old key is lost: its backups become unreadable).
    #[arg(long)]
    pub force: bool,
}

/// Flags of `owner-id`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct OwnerIdArgs {
    /// The key file.
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// Writes a key file: created new with mode 0600, never following a symlink to an old key.
pub fn write_key_file(path: &Path, key: &MasterKey, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} exists already; keep it (it may be the only way to your backups) or pass --force",
            path.display()
        );
    }
    let tmp = path.with_extension("tmp-new");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    writeln!(f, "{}", key.to_text())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `sa-image keygen`.
pub fn keygen(mut args: KeygenArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: KeygenArgs = config::load(cfg)?;
    merge!(args, file; out; bools force);
    let out = args
        .out
        .context("give --out KEYFILE: where to write the new key")?;
    let key = MasterKey::generate()?;
    write_key_file(&out, &key, args.force)?;
    let keys = key.derive();
    println!("Wrote a new master key to {} (mode 0600).", out.display());
    println!();
    println!("Recovery key (write it down and keep it offline; with one agent's address it restores everything):");
    println!("  {}", key.to_text());
    println!();
    println!("Start every shard-agent with --owner set to this owner id:");
    println!("{}", keys.owner_id());
    Ok(0)
}

/// `sa-image owner-id`.
pub fn owner_id(mut args: OwnerIdArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: OwnerIdArgs = config::load(cfg)?;
    merge!(args, file; key);
    let path = require_key(&args.key)?;
    let key = MasterKey::load(&path)?;
    println!("{}", key.derive().owner_id());
    Ok(0)
}
