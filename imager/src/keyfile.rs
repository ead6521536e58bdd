//! Writing key files (`keygen`, `key import`, the demo's key): durably, mode 0600, never over
//! an existing key unless told to.

use std::path::Path;

use anyhow::{bail, Result};
use sa_core::keyfile::KeyFile;
use sa_core::keys::MasterKey;

/// Writes a plain key file: created new with mode 0600, never following a symlink to an old key.
pub fn write_key_file(path: &Path, key: &MasterKey, force: bool) -> Result<()> {
    write_key_text(path, &KeyFile::Plain(key.clone()).to_text(), force)
}

/// Writes a key file's text durably with mode 0600; an existing file only with `force`.
pub fn write_key_text(path: &Path, text: &str, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} exists already; keep it (it may be the only way to your backups) or pass --force",
            path.display()
        );
    }
    let replace = if force {
        sa_core::durable::Replace::Yes
    } else {
        sa_core::durable::Replace::No
    };
    sa_core::durable::write(
        path,
        text.as_bytes(),
        sa_core::durable::Access::Private,
        replace,
    )?;
    Ok(())
}
