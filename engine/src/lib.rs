//! # sa-engine: every operation of sa-image, as a library
//!
//! The CLI (`sa-image`), its daemon and its web page are front ends over this crate: each
//! operation takes an options struct and returns a typed report or a typed [`Error`]. The engine
//! prints nothing and reads no flags; progress goes through [`progress::Progress`], logs through
//! `tracing`, time through [`clock::Clock`], and long work stops when the caller's
//! [`shutdown::Shutdown`] token is cancelled.
//!
//! ## Tour
//!
//! * [`fleet`]: reaching the agents (the ones given and every member of the agent book in
//!   service), judging each against the book (pins, strangers at a member's address, retired
//!   agents), never writing the book from a read-only command; [`fleet::census`] (who is up,
//!   what each holds, each snapshot's margin) and [`fleet::seen`] (when each agent last answered).
//! * [`catalog`]: the live snapshots read from the whole fleet; `latest` of a volume; a
//!   snapshot's agent table mapped to connections.
//! * [`read`]: one stripe back from k shards (parity on failure, hedging when serving).
//! * [`snapshot`]: a disk into stripes onto the agents, incremental, resumable, placed by room.
//! * [`volume`], [`source`]: opening sources and restore targets safely.
//!
//! Supporting: [`error`], [`progress`], [`clock`], [`shutdown`], [`cache_dir`].

pub mod agents;
pub mod cache_dir;
pub mod catalog;
pub mod clock;
pub mod error;
pub mod fleet;
pub mod gc;
pub mod list;
pub mod local;
pub mod progress;
pub mod read;
pub mod repair;
pub mod restore;
pub mod retention;
pub mod scrub;
pub mod serve;
pub mod shutdown;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod time;
pub mod verify;
pub mod volume;

pub use error::{Error, Result};

/// Data shards per stripe unless told otherwise.
pub const DEFAULT_K: u8 = 4;
/// Parity shards per stripe unless told otherwise.
pub const DEFAULT_M: u8 = 2;
/// Stripe size unless told otherwise (4 MiB).
pub const DEFAULT_STRIPE_SIZE: u32 = 4 << 20;
/// The agents' TCP port unless told otherwise.
pub const DEFAULT_AGENT_PORT: u16 = 7710;
