//! One module per command: its flags (and config keys), the engine options they make, and how
//! the engine's report is printed. No command calls another; shared text output is in
//! [`crate::text`], shared settings in [`crate::config`].

pub mod agents;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod forget;
pub mod gc;
pub mod keygen;
pub mod list;
pub mod offsite;
pub mod plan;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod scrub;
pub mod serve;
pub mod snapshot;
pub mod status;
pub mod verify;
