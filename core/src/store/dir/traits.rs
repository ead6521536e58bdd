//! The directory store behind the [`ShardRead`] / [`ShardWrite`] traits: each call runs its file
//! operations on tokio's blocking pool.

use async_trait::async_trait;

use super::DirStore;
use crate::error::{Error, Result};
use crate::shard::ShardKey;
use crate::store::{ShardRead, ShardWrite, StoreStat};
use crate::wire::{ShardEntry, SweepStats};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("store task", std::io::Error::other(e.to_string())))?
}

#[async_trait]
impl ShardRead for DirStore {
    async fn get_shard(&self, key: &ShardKey) -> Result<Vec<u8>> {
        let (s, k) = (self.clone(), *key);
        blocking(move || s.get_shard_blocking(&k)).await
    }
    async fn get_blob(&self, name: &str) -> Result<Vec<u8>> {
        let (s, n) = (self.clone(), name.to_string());
        blocking(move || s.get_blob_blocking(&n)).await
    }
    async fn list_blobs(&self, prefix: &str) -> Result<Vec<String>> {
        let (s, p) = (self.clone(), prefix.to_string());
        blocking(move || s.list_blobs_blocking(&p)).await
    }
    async fn stat(&self) -> Result<StoreStat> {
        Ok(self.stat_blocking())
    }
    async fn list_volumes(&self) -> Result<Vec<String>> {
        let s = self.clone();
        blocking(move || s.list_volumes_blocking()).await
    }
    async fn list_shards(
        &self,
        volume: &crate::shard::VolumeId,
        bucket: u8,
    ) -> Result<Vec<ShardEntry>> {
        let (s, v) = (self.clone(), *volume);
        blocking(move || s.list_shards_blocking(&v, bucket)).await
    }
}

#[async_trait]
impl ShardWrite for DirStore {
    async fn put_shard(&self, key: &ShardKey, file: Vec<u8>) -> Result<()> {
        let (s, k) = (self.clone(), *key);
        blocking(move || s.put_shard_blocking(&k, &file)).await
    }
    async fn confirm_shard(&self, key: &ShardKey, header: &[u8]) -> Result<bool> {
        let (s, k, h) = (self.clone(), *key, header.to_vec());
        blocking(move || s.confirm_shard_blocking(&k, &h)).await
    }
    async fn delete_shard(&self, key: &ShardKey) -> Result<()> {
        let (s, k) = (self.clone(), *key);
        blocking(move || s.delete_shard_blocking(&k)).await
    }
    async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let (s, n) = (self.clone(), name.to_string());
        blocking(move || s.put_blob_blocking(&n, &data)).await
    }
    async fn delete_blob(&self, name: &str) -> Result<()> {
        let (s, n) = (self.clone(), name.to_string());
        blocking(move || s.delete_blob_blocking(&n)).await
    }
    async fn sync(&self) -> Result<()> {
        let s = self.clone();
        blocking(move || s.sync_blocking()).await
    }
    async fn sweep(&self, min_age: u64, keys: Vec<ShardKey>) -> Result<SweepStats> {
        let s = self.clone();
        blocking(move || s.sweep_blocking(min_age, &keys)).await
    }
}
