//! The [`BlockSource`] trait: what the server serves.
//!
//! A source is a range of `size()` bytes that can be read at any offset.
//! Everything else is optional: each optional operation has a capability
//! method (default `false`) and a default body returning
//! [`SourceError::Unsupported`]. The server advertises only what the
//! capability methods say, and rejects with `EINVAL` the commands it did not
//! advertise, so a source never sees a call it did not ask for (except
//! `cache`, whose default is a harmless no-op).

use async_trait::async_trait;

use crate::error::SourceError;

/// One run of bytes with the same allocation status (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (zero-length extents are ignored by the server).
    pub len: u64,
    /// Not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Known to read as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated run that reads as zeroes.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }
}

/// How `NBD_CMD_WRITE_ZEROES` wants its zeroes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// `NBD_CMD_FLAG_NO_HOLE`: the range MUST end up allocated (no hole punched).
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail at once with [`SourceError::Unsupported`]
    /// (sent as `NBD_ENOTSUP`) unless this is faster than writing zeroes, and
    /// then leave the contents unchanged.
    pub fast: bool,
    /// `NBD_CMD_FLAG_FUA`: persist before returning.
    pub fua: bool,
}

/// A range of bytes served over NBD.
///
/// Offsets and lengths handed to these methods are already checked against
/// [`size`](BlockSource::size) and the server's 32 MiB payload limit.
/// Implementations must be safe to call concurrently: the server runs many
/// requests of one connection, and many connections, at the same time.
#[async_trait]
pub trait BlockSource: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Whether the export is read-only (`NBD_FLAG_READ_ONLY`). Default `true`;
    /// a writable source returns `false` and implements [`write`](BlockSource::write).
    fn read_only(&self) -> bool {
        true
    }
    /// Whether [`flush`](BlockSource::flush) is implemented (`NBD_FLAG_SEND_FLUSH`).
    fn can_flush(&self) -> bool {
        false
    }
    /// Whether writes honour `fua` (`NBD_FLAG_SEND_FUA`).
    fn can_fua(&self) -> bool {
        false
    }
    /// Whether [`trim`](BlockSource::trim) is implemented (`NBD_FLAG_SEND_TRIM`).
    fn can_trim(&self) -> bool {
        false
    }
    /// Whether [`write_zeroes`](BlockSource::write_zeroes) is implemented
    /// (`NBD_FLAG_SEND_WRITE_ZEROES`, and with it `NBD_FLAG_SEND_FAST_ZERO`).
    fn can_write_zeroes(&self) -> bool {
        false
    }
    /// Whether flush and FUA effects are visible to all connections at once
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// Whether [`cache`](BlockSource::cache) does something useful (`NBD_FLAG_SEND_CACHE`).
    fn can_cache(&self) -> bool {
        false
    }
    /// Preferred I/O size advertised in `NBD_INFO_BLOCK_SIZE`; the server
    /// rounds it to a power of two between 512 and 32 MiB.
    fn preferred_block_size(&self) -> u32 {
        crate::proto::DEFAULT_PREFERRED_BLOCK_SIZE
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Writes `data` at `offset`; with `fua`, persists it before returning.
    async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), SourceError> {
        Err(SourceError::Unsupported)
    }
    /// Persists every write that has returned so far.
    async fn flush(&self) -> Result<(), SourceError> {
        Err(SourceError::Unsupported)
    }
    /// Discards `len` bytes at `offset` (contents afterwards are unspecified).
    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), SourceError> {
        Err(SourceError::Unsupported)
    }
    /// Makes `len` bytes at `offset` read as zeroes.
    async fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> Result<(), SourceError> {
        Err(SourceError::Unsupported)
    }
    /// Allocation status of `offset..offset + len`, as consecutive extents
    /// starting at `offset`. They may cover less than `len` (the client asks
    /// again) or more (the server trims). Default: one data extent.
    async fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, SourceError> {
        Ok(vec![Extent::data(len)])
    }
    /// A hint that `offset..offset + len` will be read soon. Default: nothing.
    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }
}
