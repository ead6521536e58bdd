//! This machine's cache directory: the manifest cache, agent sightings and the repair
//! watcher's clock live there, one directory per owner (the first 16 hex digits of the owner
//! id). Default root: `$XDG_CACHE_HOME/sa-image`, else `~/.cache/sa-image`.

use std::path::{Path, PathBuf};

use sa_core::keys::{hex, Keys};

/// The default cache root.
pub fn default_root() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|p| p.join("sa-image"))
}

/// The directory of `keys`' owner under `root` (None: the default root; None back when there is
/// no default, e.g. no HOME).
pub fn owner_dir(root: Option<&Path>, keys: &Keys) -> Option<PathBuf> {
    root.map(Path::to_path_buf)
        .or_else(default_root)
        .map(|r| r.join(&hex(&keys.owner_id().0)[..16]))
}
