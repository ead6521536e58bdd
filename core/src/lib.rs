//! # sa-core: the formats and machinery of sa-image, without any network server
//!
//! sa-image backs a whole disk up onto `shard-agent` daemons on an office's desk PCs. This crate
//! holds everything both sides agree on:
//!
//! * [`layout`]: a volume is cut into fixed-size stripes (default 4 MiB), each into `k` data
//!   shards plus `m` parity shards, placed on `k + m` distinct agents.
//! * [`placement`]: which agents take each stripe's shards: shares proportional to each agent's
//!   room (quota or free disk), never more than it can take, deterministic per stripe.
//! * [`keys`]: one 32-byte master key (the recovery key) derives every key by HKDF-SHA256; the
//!   owner's Ed25519 identity proves ownership to agents, which never hold a secret.
//! * [`keyfile`]: the key file on disk, plain or wrapped under a passphrase (Argon2id +
//!   AES-256-GCM); a key file others may read is refused.
//! * [`seal`]: a stripe's id is a keyed BLAKE3 of its plaintext; stripes are encrypted with
//!   AES-256-GCM under a synthetic nonce, so equal stripes give equal shards (dedupe, resumable).
//! * [`codec`]: the erasure code (XOR for `m = 1`, Reed-Solomon otherwise).
//! * [`stripe`]: plaintext → id → ciphertext → shards → framed shard files, and back.
//! * [`pool`]: reusable stripe buffers (keeps the allocator from faulting memory back in).
//! * [`shard`]: the shard file format (fixed header, crc32c) an agent can check without a key.
//! * [`manifest`], [`catalog`]: what a snapshot is, sealed and replicated to every agent.
//! * [`store`]: the [`store::ShardRead`]/[`store::ShardWrite`] traits, a local directory store
//!   (what an agent serves) and a remote agent client.
//! * [`wire`]: the agent protocol (frames, handshake, requests), spoken inside [`tls`]: TLS 1.3
//!   where each agent proves its own Ed25519 key and no certificate authority is involved.
//! * [`durable`]: writing a state or key file so a crash leaves the old one or the whole new one.
//! * [`duration`], [`size`]: the one grammar for durations (`90s`, `1.5h`, `7d`) and sizes (`4MiB`).
//! * [`pins`]: the agent book, a sealed catalog record with every agent's pinned key and last
//!   address (trust on first contact, changes refused unless accepted on purpose).
//!
//! Formats are versioned and carry magics; readers refuse versions they do not know.
//! Errors are typed ([`Error`]) so callers can reconstruct around a lost or corrupt shard.

pub mod catalog;
pub mod codec;
pub mod durable;
pub mod duration;
pub mod enc;
pub mod envelope;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod keyfile;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod pins;
pub mod placement;
pub mod pool;
pub mod seal;
pub mod shard;
pub mod size;
pub mod store;
pub mod stripe;
pub mod tls;
pub mod wire;

pub use error::{Error, Result};
