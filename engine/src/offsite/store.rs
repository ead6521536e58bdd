//! The bucket as a shard store: [`OffsiteStore`] reads and writes the agents' own shard files and
//! catalog blobs as objects, through `object_store`'s S3 client (request signing, retries).
//!
//! Names: `PREFIX/shards/VOLUME/SS/STRIPE.pN`, a **pack**: the shard files `0..N` of one stripe
//! back to back, all of one length (the `k` data shards, or all `k + m`), and
//! `PREFIX/catalog/NAME`. One object per stripe, not per shard: a quarter of the requests (S3
//! bills per request) and no object a few KiB over a store's block size (Garage's is 1 MiB, a
//! shard file 1 MiB and 4.5 KiB), which made per-shard uploads about 15% slower here. Errors keep the store's own words and name the url, so an admin can
//! tell a wrong key (403) from a wrong endpoint (connection refused) from a missing bucket (404).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use sa_core::keys::hex;
use sa_core::seal::StripeId;
use sa_core::shard::{ShardKey, VolumeId};
use sa_core::store::{ShardEntry, ShardRead, StoreStat};

use super::{parse_url, read_credentials, OffsiteConfig};

/// How long one request may take (a 4 MiB shard on a slow uplink included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for a connection to the endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a failed request, and the time they may take together: short enough that an
/// unreachable endpoint fails a job within a minute, not object_store's default three.
const RETRIES: usize = 3;
const RETRY_FOR: Duration = Duration::from_secs(20);

/// An S3 bucket (and prefix) holding an offsite copy.
#[derive(Clone)]
pub struct OffsiteStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://bucket/prefix (endpoint)`, for messages.
    name: Arc<str>,
}

fn core_err(name: &str, what: &str, e: object_store::Error) -> sa_core::Error {
    match e {
        object_store::Error::NotFound { .. } => sa_core::Error::ShardMissing,
        e => sa_core::Error::Offsite(format!("offsite {name}: cannot {what}: {e}")),
    }
}

impl OffsiteStore {
    /// Connects (lazily: the first request does) to the bucket `cfg` names.
    pub fn open(cfg: &OffsiteConfig) -> crate::error::Result<Self> {
        let (bucket, prefix) = parse_url(&cfg.url).map_err(crate::error::Error::failed)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        if let Some(region) = &cfg.region {
            b = b.with_region(region);
        } else if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(ep) = &cfg.endpoint {
            b = b.with_endpoint(ep.trim_end_matches('/'));
        }
        if let Some(path) = &cfg.credentials {
            let (id, secret) = read_credentials(path).map_err(crate::error::Error::failed)?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        } else if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            return Err(crate::error::Error::failed(format!(
                "no credentials for offsite {}: give a credentials file (--offsite-credentials, \
                 or `credentials` in the offsite table) or set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY",
                cfg.url
            )));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: RETRIES,
            retry_timeout: RETRY_FOR,
        };
        // Plain http only to an endpoint named with it (a Garage or MinIO on the LAN). Set here:
        // `with_client_options` replaces what `with_allow_http` would have set.
        let client = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(
                cfg.endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let store = b
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| crate::error::Error::failed(format!("offsite {}: {e}", cfg.url)))?;
        let name = match &cfg.endpoint {
            Some(ep) => format!("{} ({ep})", cfg.url),
            None => cfg.url.clone(),
        };
        Ok(OffsiteStore {
            store: Arc::new(store),
            prefix,
            name: name.into(),
        })
    }

    /// `s3://bucket/prefix (endpoint)`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// `shards/VOLUME/SS/STRIPE.pCOUNT`.
    fn pack_path(&self, volume: &VolumeId, stripe: &StripeId, count: usize) -> Path {
        let s = hex(stripe);
        self.path(&format!("shards/{}/{}/{s}.p{count}", hex(volume), &s[..2]))
    }

    fn blob_path(&self, name: &str) -> Path {
        self.path(&format!("catalog/{name}"))
    }

    async fn put(&self, path: &Path, what: &str, data: PutPayload) -> sa_core::Result<()> {
        self.store
            .put(path, data)
            .await
            .map(|_| ())
            .map_err(|e| core_err(&self.name, what, e))
    }

    /// The whole object at `path`.
    async fn get(&self, path: &Path, what: &str) -> sa_core::Result<bytes::Bytes> {
        let got = self
            .store
            .get(path)
            .await
            .map_err(|e| core_err(&self.name, what, e))?;
        got.bytes().await.map_err(|e| core_err(&self.name, what, e))
    }

    async fn delete(&self, path: &Path, what: &str) -> sa_core::Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(core_err(&self.name, what, e)),
        }
    }

    /// Uploads shard files `0..files.len()` of one stripe (all of one length) as its pack.
    pub async fn put_pack(
        &self,
        volume: &VolumeId,
        stripe: &StripeId,
        files: Vec<Vec<u8>>,
    ) -> sa_core::Result<()> {
        let count = files.len();
        // The files go out as they are, one after the other: no copy into one buffer.
        let pack: PutPayload = files.into_iter().map(bytes::Bytes::from).collect();
        let path = self.pack_path(volume, stripe, count);
        self.put(&path, "upload a stripe's shards", pack).await
    }

    /// Fetches the pack of `count` shard files of a stripe, split into its files (unchecked:
    /// each goes through the codec's checks like a shard from an agent).
    pub async fn get_pack(
        &self,
        volume: &VolumeId,
        stripe: &StripeId,
        count: usize,
    ) -> sa_core::Result<Vec<Vec<u8>>> {
        let path = self.pack_path(volume, stripe, count);
        let bytes = self.get(&path, "fetch a stripe's shards").await?;
        if count == 0 || bytes.is_empty() || bytes.len() % count != 0 {
            return Err(sa_core::Error::ShardCorrupt(format!(
                "offsite object {path} is {} bytes, not {count} shard files of one length",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks(bytes.len() / count)
            .map(<[u8]>::to_vec)
            .collect())
    }

    /// Deletes a stripe's pack (missing is not an error).
    pub async fn delete_pack(
        &self,
        volume: &VolumeId,
        stripe: &StripeId,
        count: usize,
    ) -> sa_core::Result<()> {
        let path = self.pack_path(volume, stripe, count);
        self.delete(&path, "delete a stripe's shards").await
    }

    /// Uploads a catalog blob.
    pub async fn put_blob(&self, name: &str, data: Vec<u8>) -> sa_core::Result<()> {
        self.put(&self.blob_path(name), "upload a catalog blob", data.into())
            .await
    }

    /// Deletes a catalog blob (missing is not an error).
    pub async fn delete_blob(&self, name: &str) -> sa_core::Result<()> {
        self.delete(&self.blob_path(name), "delete a catalog blob")
            .await
    }

    /// The packs of `volume` held under stripe-id byte `bucket`: per stripe, the largest count.
    pub async fn packs_held(
        &self,
        volume: &VolumeId,
        bucket: u8,
    ) -> sa_core::Result<HashMap<StripeId, u8>> {
        let mut held: HashMap<StripeId, u8> = HashMap::new();
        for (stripe, count, _) in self.packs_in(volume, bucket).await? {
            let c = held.entry(stripe).or_default();
            *c = (*c).max(count);
        }
        Ok(held)
    }

    /// The packs of `volume` under stripe-id byte `bucket`: stripe, count, age in seconds.
    async fn packs_in(
        &self,
        volume: &VolumeId,
        bucket: u8,
    ) -> sa_core::Result<Vec<(StripeId, u8, u64)>> {
        let dir = format!("shards/{}/{bucket:02x}", hex(volume));
        Ok(self
            .list(&dir)
            .await?
            .into_iter()
            .filter_map(|(n, _, age)| parse_pack_name(&n).map(|(s, c)| (s, c, age)))
            .collect())
    }

    /// Every pack in the bucket, page by page (memory: one listing page), as its volume,
    /// stripe, count and age in seconds; objects with other names are passed over.
    pub fn all_packs(
        &self,
    ) -> impl futures::Stream<Item = sa_core::Result<(VolumeId, StripeId, u8, u64)>> + '_ {
        let dir = self.path("shards");
        let base = dir.as_ref().len() + 1;
        let now = unix_now();
        self.store.list(Some(&dir)).filter_map(move |meta| {
            let r = match meta {
                Err(e) => Some(Err(core_err(&self.name, "list the bucket", e))),
                Ok(meta) => {
                    let name = meta.location.as_ref().get(base..).unwrap_or("");
                    let mut parts = name.split('/');
                    let vol = parts.next().and_then(sa_core::keys::unhex);
                    let file = parts.nth(1).and_then(parse_pack_name);
                    match (vol.and_then(|v| VolumeId::try_from(v).ok()), file) {
                        (Some(volume), Some((stripe, count))) => {
                            let age = (now - meta.last_modified.timestamp()).max(0) as u64;
                            Some(Ok((volume, stripe, count, age)))
                        }
                        _ => None,
                    }
                }
            };
            std::future::ready(r)
        })
    }

    /// Lists objects under `rest` (every page), as (name after `rest`, size, age in seconds).
    async fn list(&self, rest: &str) -> sa_core::Result<Vec<(String, u64, u64)>> {
        let dir = self.path(rest);
        let now = unix_now();
        let mut stream = self.store.list(Some(&dir));
        let mut out = Vec::new();
        let base = dir.as_ref().len() + 1;
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| core_err(&self.name, "list the bucket", e))?;
            let full = meta.location.as_ref();
            if full.len() > base {
                let age = (now - meta.last_modified.timestamp()).max(0) as u64;
                out.push((full[base..].to_string(), meta.size, age));
            }
        }
        Ok(out)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Parses `STRIPE.pCOUNT` (hex stripe id).
fn parse_pack_name(name: &str) -> Option<(StripeId, u8)> {
    let (s, c) = name.rsplit_once(".p")?;
    let bytes = sa_core::keys::unhex(s)?;
    Some((
        bytes.try_into().ok()?,
        c.parse().ok().filter(|&c: &u8| c > 0)?,
    ))
}

#[async_trait]
impl ShardRead for OffsiteStore {
    async fn get_shard(&self, key: &ShardKey) -> sa_core::Result<Vec<u8>> {
        // Whichever pack holds the stripe (readers use `get_pack` directly).
        let count = self
            .packs_held(&key.volume, key.stripe[0])
            .await?
            .get(&key.stripe)
            .copied()
            .filter(|&c| c > key.index)
            .ok_or(sa_core::Error::ShardMissing)?;
        let mut files = self
            .get_pack(&key.volume, &key.stripe, count as usize)
            .await?;
        Ok(files.swap_remove(key.index as usize))
    }

    async fn get_blob(&self, name: &str) -> sa_core::Result<Vec<u8>> {
        let bytes = self
            .get(&self.blob_path(name), "fetch a catalog blob")
            .await?;
        Ok(bytes.to_vec())
    }

    async fn list_blobs(&self, prefix: &str) -> sa_core::Result<Vec<String>> {
        let mut names: Vec<String> = self
            .list("catalog")
            .await?
            .into_iter()
            .map(|(n, _, _)| n)
            .filter(|n| n.starts_with(prefix) && !n.contains('/'))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn stat(&self) -> sa_core::Result<StoreStat> {
        let all = self.list("shards").await?;
        let blobs = self.list("catalog").await?;
        Ok(StoreStat {
            agent_id: [0; 16],
            used: all.iter().chain(&blobs).map(|o| o.1).sum(),
            quota: 0,
            // Shards, not objects: each pack holds several.
            shards: all
                .iter()
                .filter_map(|(n, _, _)| n.rsplit('/').next().and_then(parse_pack_name))
                .map(|(_, c)| u64::from(c))
                .sum(),
            fs_free: None,
            mac: None,
            broadcast: None,
            keep_awake: None,
        })
    }

    async fn list_volumes(&self) -> sa_core::Result<Vec<String>> {
        let mut vols: Vec<String> = self
            .list("shards")
            .await?
            .into_iter()
            .filter_map(|(n, _, _)| n.split('/').next().map(str::to_string))
            .collect();
        vols.sort();
        vols.dedup();
        Ok(vols)
    }

    async fn list_shards(&self, volume: &VolumeId, bucket: u8) -> sa_core::Result<Vec<ShardEntry>> {
        let mut out = Vec::new();
        for (stripe, count, age) in self.packs_in(volume, bucket).await? {
            out.extend((0..count).map(|index| ShardEntry { stripe, index, age }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_names_round_trip() {
        let stripe = [0xab; 32];
        let name = format!("{}.p4", hex(&stripe));
        assert_eq!(parse_pack_name(&name), Some((stripe, 4)));
        assert_eq!(parse_pack_name(&format!("{}.p0", hex(&stripe))), None);
        assert_eq!(parse_pack_name(&format!("{}.3", hex(&stripe))), None);
        assert_eq!(parse_pack_name("zz.p1"), None);
    }
}
