//! # sa-engine: every operation of sa-image, as a library
//!
//! The CLI (`sa-image`), its daemon and its web page are front ends over this crate: each
//! operation takes an options struct and returns a typed report or a typed error. The engine
//! prints nothing and reads no flags; progress goes through a trait, logs through `tracing`.
