//! The offsite tier: a copy of the backup in S3-compatible object storage (Garage, MinIO, Ceph
//! RGW, a cloud), for when the whole office is gone.
//!
//! * [`store`]: the bucket as one more shard store ([`OffsiteStore`], the same
//!   [`sa_core::store::ShardRead`] trait as an agent): each stripe's shard files in one object,
//!   `PREFIX/shards/VOLUME/SS/STRIPE.pN` (a pack of shards `0..N`), and catalog blobs under
//!   `PREFIX/catalog/NAME`. The shard files are the agents' own, byte for byte: ciphertext framed
//!   with a crc32c, under names that are keyed hashes. The store learns nothing the agents do
//!   not.
//! * [`push`]: after a snapshot commits on the agents, its stripes' packs (the `k` data shards of
//!   each stripe, or all `k + m` with [`ShardSet::All`]), then its sealed manifest, then the tombstones
//!   of forgotten snapshots. Only what the bucket lacks travels; a push that fails part way is
//!   finished by the next one (a manifest is uploaded only after every shard it names, so the
//!   bucket never holds a snapshot it cannot restore).
//! * [`sweep`]: retention for the bucket: manifests of forgotten snapshots and shards no kept
//!   snapshot uses are deleted, with the grace period and the agents' catalog as the guard
//!   against racing an upload.
//!
//! Readers (`restore`, `serve`, `verify`, `repair`) take the bucket as a source of last resort
//! ([`crate::fleet::Fleet::with_offsite`]): a stripe whose agents cannot give `k` good shards
//! gets the rest from the bucket. With `--offsite-only` no agent is asked at all: the recovery key
//! and the bucket restore or boot the disk.
//!
//! Why only the data shards by default: the store keeps its own redundancy (Garage replicates
//! each object on three nodes; cloud stores more), so parity in the bucket would pay 50% more
//! upload for a loss the store already covers. Shards in the bucket are the agents' shards, so a
//! stripe can mix the two sources: agents' parity makes up for a data shard the bucket lacks, and
//! the other way round.

pub mod push;
pub mod store;
pub mod sweep;

use std::path::PathBuf;

pub use push::{push, PushOptions, PushReport};
pub use store::OffsiteStore;
pub use sweep::{sweep, SweepOptions, SweepReport};

/// Which shards of each stripe go to the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardSet {
    /// The `k` data shards (the store's own replication covers their loss).
    #[default]
    Data,
    /// All `k + m` shards.
    All,
}

impl ShardSet {
    /// The shard indices uploaded for a stripe of `k` data and `m` parity shards.
    pub fn indices(self, k: u8, m: u8) -> std::ops::Range<usize> {
        match self {
            ShardSet::Data => 0..k as usize,
            ShardSet::All => 0..(k + m) as usize,
        }
    }
}

/// Where the offsite copy lives and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct OffsiteConfig {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The S3 endpoint, e.g. `http://10.0.0.9:3900` for a Garage node; none: AWS.
    pub endpoint: Option<String>,
    /// The region (Garage's is named in its config, `garage` by default); none:
    /// `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// A file with `aws_access_key_id = ...` and `aws_secret_access_key = ...` lines (the AWS
    /// credentials format; the first profile, or `[default]`); none: the environment's
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials: Option<PathBuf>,
    /// Which shards of each stripe to upload.
    pub shards: ShardSet,
}

/// Splits `s3://BUCKET/PREFIX` into the bucket and the prefix (no slashes at its ends).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        format!("offsite url '{url}' is not an S3 url: give s3://BUCKET or s3://BUCKET/PREFIX")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(format!(
            "offsite url '{url}': '{bucket}' is not a valid bucket name (3 to 63 lower-case \
             letters, digits, '-' and '.')"
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Reads an access key id and secret from a credentials file (see
/// [`OffsiteConfig::credentials`]).
pub fn read_credentials(path: &std::path::Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read offsite credentials {}: {e}", path.display()))?;
    let (mut id, mut secret) = (None, None);
    let mut profile: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(p) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // The first profile, unless a [default] comes later and nothing was read yet.
            if id.is_some() && secret.is_some() {
                break;
            }
            profile = Some(p.trim().to_string());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "aws_access_key_id" | "access_key_id" => id = Some(v),
            "aws_secret_access_key" | "secret_access_key" => secret = Some(v),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) if !i.is_empty() && !s.is_empty() => Ok((i, s)),
        _ => Err(format!(
            "offsite credentials {}{}: need both aws_access_key_id = ... and \
             aws_secret_access_key = ... lines",
            path.display(),
            profile
                .map(|p| format!(" (profile [{p}])"))
                .unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://office-backup/site1/").unwrap(),
            ("office-backup".into(), "site1".into())
        );
        assert_eq!(
            parse_url("s3://office-backup").unwrap(),
            ("office-backup".into(), String::new())
        );
        assert!(parse_url("http://x/y").unwrap_err().contains("s3://BUCKET"));
        assert!(parse_url("s3://Big_Bucket/x")
            .unwrap_err()
            .contains("not a valid bucket name"));
    }

    #[test]
    fn credentials_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(
            &p,
            "# garage key\n[default]\naws_access_key_id = GK123\naws_secret_access_key = \"s3cr3t\"\n\n[other]\naws_access_key_id = X\n",
        )
        .unwrap();
        assert_eq!(
            read_credentials(&p).unwrap(),
            ("GK123".into(), "s3cr3t".into())
        );
        std::fs::write(&p, "[default]\naws_access_key_id = GK123\n").unwrap();
        assert!(read_credentials(&p)
            .unwrap_err()
            .contains("aws_secret_access_key"));
        assert!(read_credentials(&dir.path().join("none"))
            .unwrap_err()
            .contains("cannot read"));
    }

    #[test]
    fn shard_sets() {
        assert_eq!(ShardSet::Data.indices(4, 2), 0..4);
        assert_eq!(ShardSet::All.indices(4, 2), 0..6);
    }
}
