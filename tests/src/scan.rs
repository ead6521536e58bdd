//! Looking at agents' directories from the outside, as the PC's owner could.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every regular file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Shard files of an agent directory: `DIR/shards/<volume>/<2hex>/<stripe>.<index>`.
pub fn shard_files(agent_dir: &Path) -> Vec<PathBuf> {
    files(&agent_dir.join("shards"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| shard_name(n).is_some())
        })
        .collect()
}

/// `(stripe hex, index)` of a shard file name `<stripe-hex>.<index>`.
pub fn shard_name(name: &str) -> Option<(String, u32)> {
    let (stripe, index) = name.rsplit_once('.')?;
    let ok = !stripe.is_empty() && stripe.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(())?;
    Some((stripe.to_string(), index.parse().ok()?))
}

/// The stripe ids (hex) that `agent_dir` holds a shard of.
pub fn stripe_ids(agent_dir: &Path) -> BTreeSet<String> {
    shard_files(agent_dir)
        .iter()
        .filter_map(|p| shard_name(p.file_name()?.to_str()?).map(|(s, _)| s))
        .collect()
}

/// The shard file of stripe `stripe` (hex) in `agent_dir`, if it holds one.
pub fn shard_of(agent_dir: &Path, stripe: &str) -> Option<PathBuf> {
    shard_files(agent_dir).into_iter().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(shard_name)
            .is_some_and(|(s, _)| s == stripe)
    })
}

/// Files under `dir` whose raw bytes or path contain `needle` (ASCII), found with `grep -rlaF`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let out = Command::new("grep")
        .args(["-r", "-l", "-a", "-F", "--", needle])
        .arg(dir)
        .output()
        .expect("cannot run grep");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "grep failed in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    found.extend(
        files(dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(needle)),
    );
    found.sort();
    found.dedup();
    found
}
