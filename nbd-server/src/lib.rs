//! An NBD (Network Block Device) server over any [`BlockSource`].
//!
//! sa-image serves a backed-up disk to a rescue machine or a VM over NBD; this
//! crate is that protocol, and knows nothing of shards or snapshots. The imager
//! implements [`BlockSource`] over its stripe reader and hands it to a [`Server`].
//! The crate also holds an NBD [`client`], for reading other servers' exports
//! (a running VM's disk exported by QEMU) when taking a snapshot.
//!
//! # Tour
//!
//! - [`source`]: the [`BlockSource`] trait. `size` and `read` are required;
//!   write, flush, trim, write-zeroes, block status and cache are optional, each
//!   with a capability method (`can_*`, `read_only`) from which the server
//!   computes the transmission flags, and a default body returning
//!   [`SourceError::Unsupported`].
//! - [`error`]: [`SourceError`] and its single mapping to NBD error values
//!   ([`SourceError::nbd_errno`]); [`ServeError`] for connection failures.
//! - [`exports`]: [`Exports`], names to [`Export`]s; one export can answer to
//!   several names (the default `""` and a snapshot id).
//! - [`memory`]: [`MemorySource`], a sparse in-memory source for tests and examples.
//! - [`server`]: [`Server::run`] / [`serve`]: accept loop, connection cap,
//!   timeouts, shutdown; [`ServerConfig`] holds the limits against hostile clients.
//! - [`tls`]: `NBD_OPT_STARTTLS` (required when configured), [`load_pem`].
//! - `handshake` (private): fixed-newstyle option haggling.
//! - `transmission` (private): request parsing, concurrent execution, the reply writer.
//! - [`proto`]: constants and wire types, with the spec's sentences beside them.
//! - [`client`]: an NBD client (URIs, handshake, pipelined reads, block status
//!   for `base:allocation` and `qemu:dirty-bitmap:NAME`), for reading other
//!   servers' exports such as QEMU's.
//!
//! # Protocol coverage
//!
//! Fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`).
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (`NBD_INFO_EXPORT`,
//! `NBD_INFO_BLOCK_SIZE` always: minimum 1, preferred 4096 or the source's
//! hint, maximum 32 MiB; `NBD_INFO_NAME`/`DESCRIPTION` on request),
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with
//! `base:allocation` (and the `base:` wildcard for listing), `STARTTLS` (with a
//! certificate: FORCEDTLS, TLS 1.3/1.2 via rustls; without: `NBD_REP_ERR_UNSUP`).
//! Unknown options get `NBD_REP_ERR_UNSUP`. Commands: `READ` (structured:
//! one `OFFSET_DATA` chunk; `DF` honoured trivially), `WRITE`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` (`REQ_ONE`), `CACHE`,
//! `DISC`. Not supported: SELECTIVETLS, client certificates, extended headers, `OFFSET_HOLE` read chunks,
//! oldstyle and non-fixed newstyle handshakes beyond `EXPORT_NAME`.
//!
//! Requests of one connection run concurrently (bounded count and bytes in
//! flight) and their replies go out in completion order through one writer;
//! malformed input closes that one connection and nothing else.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{Export, Exports, MemorySource, serve};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let disk = Arc::new(MemorySource::new(64 << 20));
//! let exports = Exports::single(Export::new("disk", "a test disk", disk))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! serve(listener, Arc::new(exports), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod error;
pub mod exports;
#[cfg(test)]
mod fuzz;
mod handshake;
pub mod memory;
pub mod proto;
pub mod server;
pub mod source;
pub mod tls;
mod transmission;

pub use error::{ExportsError, ServeError, SourceError};
pub use exports::{Export, Exports};
pub use memory::MemorySource;
pub use server::{serve, Server, ServerConfig};
pub use source::{BlockSource, Extent, ZeroFlags};
pub use tls::{load_pem, TlsError};
/// The TLS library, for building a [`ServerConfig::tls`] by hand.
pub use tokio_rustls::rustls;
