//! # sa-engine: every operation of sa-image, as a library
//!
//! The CLI (`sa-image`), its daemon and its web page are front ends over this crate: each
//! operation takes an options struct and returns a typed report or a typed error. The engine
//! prints nothing and reads no flags; progress goes through a trait, logs through `tracing`.
//!
//! * [`durability`]: how safe the backup is: the chance a restore finds `k` agents per stripe
//!   (with and without waking sleeping PCs), the chance of losing a snapshot within a year, and a
//!   planner for `k`, `m` and `repair-after` (the model is in `docs/durability.md`).
//! * [`availability`]: each agent's up/down history (one hour resolution, 35 days), a sealed
//!   catalog record merged from every agent's copy: availability and usual hours.
//! * [`wake`]: Wake-on-LAN magic packets to an agent's subnet broadcast and last address.

pub mod availability;
pub mod durability;
pub mod wake;
