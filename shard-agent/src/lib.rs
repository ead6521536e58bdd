//! # shard-agent: a small daemon that keeps one owner's shards on a desk PC
//!
//! * [`Server`] accepts TCP connections, runs the [`sa_core::wire`] handshake (the client signs a
//!   random challenge with the owner's Ed25519 key; the agent holds only the public owner id), then
//!   answers requests against a [`sa_core::store::DirStore`], whose file operations run on tokio's
//!   blocking pool.
//! * A malformed frame or a failed authentication closes that one connection; the agent keeps
//!   serving everyone else. Connections are capped, handshakes and idle connections time out.
//! * The agent never sees a key that decrypts data, and shard file names are made from the
//!   (checked) shard key, never from a path on the wire.
//!
//! * [`scrub::Scrubber`] checks every shard file's crc32c in the background at a bounded rate
//!   and moves bad ones to a quarantine directory; `SCRUB` requests ask for a pass now and report.
//!
//! * [`netinfo`] finds the MAC and broadcast address of the interface a client reached the agent
//!   on, for the `STAT` answer (sa-image wakes the PC by Wake-on-LAN with them).
//! * A good citizen on a desk PC: [`priority`] lowers its CPU and I/O priority (the default),
//!   [`rate::RateLimit`] caps its shard traffic (`--max-rate`), and the store's floor
//!   (`sa_core::store::MinFree`, `--min-free`) keeps the user's disk from filling.
//! * [`listen`] reads `--listen` (a bare host means port 7710).
//! * [`awake::KeepAwake`] keeps the PC from sleeping while clients work with the agent
//!   (`--keep-awake`: a systemd-logind inhibitor lock on Linux).
//!
//! Portable `std` + tokio: agents run on Windows and macOS desk PCs too. What differs per OS
//! is cfg-gated in [`priority`] and in `sa_core::store::dir::files`; the binary adds a Windows
//! service (`shard-agent service install`).

pub mod awake;
pub mod listen;
pub mod netinfo;
pub mod priority;
pub mod rate;
pub mod scrub;
mod server;

pub use server::Server;
