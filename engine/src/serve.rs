//! Serving a snapshot as a live NBD export (`sa-image serve`): [`run::open`], then
//! [`run::Served::run`].
//!
//! ```text
//! NBD client ──READ──▶ ServeSource ──▶ overlay blocks? ──yes──▶ overlay file
//!                                   └─no──▶ Snapshot ──zero stripe?──yes──▶ zeros
//!                                            └─no──▶ StripeCache ──miss──▶ StripeReader (k shards,
//!                                                    (single flight,        parity on failure or
//!                                                     LRU, read-ahead)      after the hedge delay)
//! ```
//!
//! - [`snapshot`]: the snapshot's bytes at any offset, stripe by stripe, with the cache,
//!   read-ahead, stats and logs (which agents failed, which stripes were rebuilt or lost).
//! - [`cache`]: the bounded LRU of decoded stripes, one fetch per stripe however many readers.
//! - [`overlay`]: the writable overlay file and its persisted map of written blocks.
//! - [`hydrate`]: live restore: the export writes to a target disk while a background copier
//!   moves every stripe onto it, with the progress persisted so a restart resumes.
//! - [`source`]: the [`nbd_server::BlockSource`] joining them: read-only without an overlay or a
//!   hydrate target, writable (write, flush, FUA, write-zeroes, trim) with one.
//! - [`stats`]: counters, printed when `serve` stops.
//!
//! - [`run`]: opening a snapshot for serving, and running the server until shutdown.

pub mod cache;
pub mod hydrate;
pub mod overlay;
pub mod run;
pub mod snapshot;
pub mod source;
pub mod stats;

pub use run::{open, open_with, tls_config, ServeOptions, ServeReport, Served};
