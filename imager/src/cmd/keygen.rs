//! `keygen`, `owner-id` and `key import`.
//!
//! A key file holds the master key as its recovery text, or (`--passphrase`,
//! `--passphrase-file`) wrapped under a passphrase with Argon2id and AES-256-GCM
//! (format: [`sa_core::keyfile`]). Either way it is written with mode 0600, and one that others
//! may read is refused when it is used.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sa_core::keyfile::{KdfParams, KeyFile, WrappedKey};
use sa_core::keys::MasterKey;
use serde::Deserialize;

use crate::config::{self, KeyArgs};
use crate::exit::usage;
use crate::keyfile::{write_key_file, write_key_text};
use crate::merge;
use crate::passphrase;

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
    /// Protect the key file with a passphrase, asked for (twice on a terminal; from a pipe, the
    /// first line of standard input).
    #[arg(long)]
    #[serde(skip)]
    pub passphrase: bool,
    /// Protect the key file with the passphrase on this file's first line.
    #[arg(long, conflicts_with = "passphrase")]
    pub passphrase_file: Option<PathBuf>,
}

/// Subcommands of `key`.
#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Write a key file from the recovery text (`sakey1-...`), read from standard input or --text.
    Import(KeyImportArgs),
}

/// Flags of `key import`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyImportArgs {
    /// Where to write the key file (mode 0600).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The recovery text; without it, it is read from standard input.
    #[arg(long)]
    #[serde(skip)]
    pub text: Option<String>,
    /// Overwrite an existing key file.
    #[arg(long)]
    pub force: bool,
    /// Protect the key file with a passphrase, asked for (after the recovery text when both
    /// come from standard input).
    #[arg(long)]
    #[serde(skip)]
    pub passphrase: bool,
    /// Protect the key file with the passphrase on this file's first line.
    #[arg(long, conflicts_with = "passphrase")]
    pub passphrase_file: Option<PathBuf>,
}

/// Flags of `owner-id`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct OwnerIdArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
}

/// `sa-image keygen`.
pub fn keygen(mut args: KeygenArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: KeygenArgs = config::load(cfg)?;
    merge!(args, file; out, passphrase_file; bools force);
    let out = args
        .out
        .ok_or_else(|| usage("give --out KEYFILE: where to write the new key"))?;
    if out.exists() && !args.force {
        bail!(
            "{} exists already; keep it (it may be the only way to your backups) or pass --force",
            out.display()
        );
    }
    let key = MasterKey::generate()?;
    let wrapped = store_key(
        &out,
        &key,
        args.passphrase,
        args.passphrase_file.as_deref(),
        args.force,
    )?;
    let keys = key.derive();
    println!(
        "Wrote a new master key to {} (mode 0600{}).",
        out.display(),
        if wrapped {
            ", protected by your passphrase"
        } else {
            ""
        }
    );
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
    args.keyfile.merge(&mut file.keyfile);
    let key = args.keyfile.load()?;
    println!("{}", key.derive().owner_id());
    Ok(0)
}

/// Writes `key` to `out`, wrapped when a passphrase is asked for or given; true when wrapped.
fn store_key(
    out: &Path,
    key: &MasterKey,
    ask: bool,
    passphrase_file: Option<&Path>,
    force: bool,
) -> Result<bool> {
    if !ask && passphrase_file.is_none() {
        write_key_file(out, key, force)?;
        return Ok(false);
    }
    let pass = passphrase::new_passphrase(passphrase_file)?;
    let wrapped = WrappedKey::wrap(key, &pass, KdfParams::DEFAULT)?;
    write_key_text(out, &KeyFile::Wrapped(wrapped).to_text(), force)?;
    Ok(true)
}

/// Reads the recovery text from standard input: lines until they make a whole key.
fn read_recovery_text() -> Result<MasterKey> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Type the recovery key (sakey1-...): ");
        let _ = std::io::stderr().flush();
    }
    let mut text = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the recovery text from standard input")?;
        text.push_str(&line);
        let attempt = MasterKey::from_text(&text);
        let digits = text.chars().filter(char::is_ascii_hexdigit).count();
        match attempt {
            Ok(k) => return Ok(k),
            // A key's text is 6 + 68 characters of letters and digits: stop once there is enough.
            Err(e) if n == 0 || digits >= 70 => {
                if text.trim().is_empty() {
                    bail!("no recovery text on standard input (or give it with --text)");
                }
                return Err(e).context("that is not a valid recovery key");
            }
            Err(_) => {}
        }
    }
}

/// `sa-image key import`.
pub fn import(mut args: KeyImportArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: KeyImportArgs = config::load(cfg)?;
    merge!(args, file; out, passphrase_file; bools force);
    let out = args
        .out
        .ok_or_else(|| usage("give --out KEYFILE: where to write the imported key"))?;
    if out.exists() && !args.force {
        bail!(
            "{} exists already; remove it first or pass --force",
            out.display()
        );
    }
    let key = match &args.text {
        Some(t) => MasterKey::from_text(t).context("that is not a valid recovery key")?,
        None => read_recovery_text()?,
    };
    let wrapped = store_key(
        &out,
        &key,
        args.passphrase,
        args.passphrase_file.as_deref(),
        args.force,
    )?;
    println!(
        "Wrote the key to {} (mode 0600{}). Its owner id:",
        out.display(),
        if wrapped {
            ", protected by your passphrase"
        } else {
            ""
        }
    );
    println!("{}", key.derive().owner_id());
    Ok(0)
}
