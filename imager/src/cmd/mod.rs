//! One module per command: its arguments (flags and config keys) and what it does.

pub mod agents;
pub mod demo;
pub mod forget;
pub mod gc;
pub mod keygen;
pub mod list;
pub mod prune;
pub mod repair;
pub mod repair_watch;
pub mod restore;
pub mod scrub;
pub mod serve;
pub mod snapshot;
pub mod status;
pub mod verify;
