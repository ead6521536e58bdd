//! Where shards live: the [`ShardRead`] / [`ShardWrite`] traits and their two implementations,
//! a local directory ([`DirStore`], also what an agent serves) and a remote agent
//! ([`AgentClient`]). Checking, decryption and reconstruction are layers above a store
//! ([`crate::stripe`]), never flags inside one.

use async_trait::async_trait;

use crate::error::Result;
use crate::shard::{ShardKey, VolumeId};
pub use crate::wire::{ScrubFinding, ScrubStatus, ShardEntry, StoreStat, SweepStats};

pub mod dir;
pub mod remote;

pub use dir::{Checked, DirStore, Limits, MinFree};
pub use remote::{AgentClient, ClientOptions};

/// The read side of a store.
#[async_trait]
pub trait ShardRead: Send + Sync {
    /// Fetches a whole shard file (header + payload), unchecked.
    async fn get_shard(&self, key: &ShardKey) -> Result<Vec<u8>>;
    /// Fetches a catalog blob.
    async fn get_blob(&self, name: &str) -> Result<Vec<u8>>;
    /// Lists catalog blob names starting with `prefix`.
    async fn list_blobs(&self, prefix: &str) -> Result<Vec<String>>;
    /// Reports usage.
    async fn stat(&self) -> Result<StoreStat>;
    /// Volume ids (hex) the store holds shards of (garbage collection).
    async fn list_volumes(&self) -> Result<Vec<String>>;
    /// Shards of `volume` whose stripe id starts with byte `bucket`, with their ages.
    async fn list_shards(&self, volume: &VolumeId, bucket: u8) -> Result<Vec<ShardEntry>>;
}

/// The write side of a store.
#[async_trait]
pub trait ShardWrite: ShardRead {
    /// Stores a whole shard file. Visible only whole; durable after [`ShardWrite::sync`].
    async fn put_shard(&self, key: &ShardKey, file: Vec<u8>) -> Result<()>;
    /// Keeps an identical stored shard instead of receiving it again (a resumed snapshot):
    /// true when the store holds a sound shard for `key` whose header is `header`; it then
    /// counts as stored by this run (durable after [`ShardWrite::sync`]).
    async fn confirm_shard(&self, key: &ShardKey, header: &[u8]) -> Result<bool>;
    /// Deletes a shard (missing is not an error).
    async fn delete_shard(&self, key: &ShardKey) -> Result<()>;
    /// Stores a catalog blob, durably, before returning.
    async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()>;
    /// Deletes a catalog blob (missing is not an error).
    async fn delete_blob(&self, name: &str) -> Result<()>;
    /// Durability barrier: every shard stored before this call survives a crash after it.
    async fn sync(&self) -> Result<()>;
    /// Deletes each of `keys` whose file is at least `min_age` seconds old by the store's own
    /// clock; younger ones are kept (garbage collection with a grace period).
    async fn sweep(&self, min_age: u64, keys: Vec<ShardKey>) -> Result<SweepStats>;
}
