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
//! The fleet and the catalog:
//! * [`fleet`]: reaching the agents (the ones given and every member of the agent book in
//!   service), judging each against the book (pins, strangers at a member's address, retired
//!   agents), never writing the book from a read-only command; [`fleet::census`] (who is up,
//!   what each holds, each snapshot's margin) and [`fleet::seen`] (when each agent last answered);
//!   [`fleet::sleepers`] (each PC's MAC learned from `STAT` into the book; waking members that
//!   do not answer and waiting until a command has what it needs, `agents wake`) and
//!   [`fleet::observe`] (each reach recorded in the availability history).
//! * [`catalog`]: the live snapshots read from the whole fleet; `latest` of a volume; a
//!   snapshot's agent table mapped to connections.
//! * [`agents`]: the agent book as the admin changes it: list, add, accept, retire.
//!
//! The operations, one module each (options in, report out):
//! * [`snapshot`]: a disk into stripes onto the agents, incremental, resumable, placed by room.
//! * [`restore`], [`verify`], [`scrub`], [`status`], [`list`]; [`limits`] judges a status report
//!   (snapshot too old, agent absent too long, margin below target) for `status --max-age` and
//!   the daemon's alerts.
//! * [`repair`] (+ [`repair::watch`]): rebuild absent and crowded shards, new manifest revisions.
//! * [`retention`] (prune, forget) over [`gc`] (tombstones, leases, mark and sweep).
//! * [`serve`]: a snapshot as a live NBD export, with an overlay or a live restore (hydrate).
//! * [`offsite`]: a copy in S3-compatible object storage: push after a snapshot, a bucket
//!   collection, and the bucket as a last source (or the only one) for every reader.
//! * [`drill`]: a recovery drill: the snapshot served with m agents withheld, booted in QEMU,
//!   judged (console line, guest port, screenshot), the result sealed on the agents.
//!
//! Underneath: [`read`] (one stripe back from k shards: parity on failure, hedging when serving),
//! [`volume`] and [`source`] (sources and restore targets, opened safely; a source is a file, a
//! block device or an NBD export), [`direct`] (restore targets written with `O_DIRECT`),
//! [`consistency`] (a point in time of a disk in use: refusal without a method, `--freeze` and
//! `--lvm-snapshot` through a guard process that undoes them on every exit, pre and post hooks),
//! [`local`] (agents in this process, for the demo and tests).
//!
//! Models: [`durability`] (how safe the backup is: the chance a restore finds `k` agents per
//! stripe, with and without waking sleeping PCs, the chance of losing a snapshot within a year,
//! and a planner for `k`, `m` and `repair-after`; the model is in `docs/durability.md`;
//! [`durability::measured`] feeds it the fleet as measured, for `status --durability` and `plan`),
//! [`availability`] (each agent's up/down history, a sealed catalog record), [`wake`]
//! (Wake-on-LAN magic packets).
//!
//! Supporting: [`error`], [`progress`], [`clock`], [`shutdown`], [`cache_dir`], [`time`].

pub mod agents;
pub mod availability;
pub mod cache_dir;
pub mod catalog;
pub mod clock;
pub mod consistency;
pub mod direct;
pub mod drill;
pub mod durability;
pub mod error;
pub mod fleet;
pub mod gc;
pub mod limits;
pub mod list;
pub mod local;
pub mod offsite;
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
pub mod wake;

pub use error::{Error, Result};

/// Data shards per stripe unless told otherwise.
pub const DEFAULT_K: u8 = 4;
/// Parity shards per stripe unless told otherwise.
pub const DEFAULT_M: u8 = 2;
/// Stripe size unless told otherwise (4 MiB).
pub const DEFAULT_STRIPE_SIZE: u32 = 4 << 20;
/// The agents' TCP port unless told otherwise.
pub const DEFAULT_AGENT_PORT: u16 = 7710;
