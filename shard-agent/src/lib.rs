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
//! Portable `std` + tokio only: agents run on Windows and macOS desk PCs too.

mod server;

pub use server::Server;
