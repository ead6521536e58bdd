//! One module per command: its arguments (flags and config keys) and what it does.

pub mod demo;
pub mod keygen;
pub mod list;
pub mod restore;
pub mod snapshot;
pub mod verify;
