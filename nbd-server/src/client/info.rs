//! What a connection learned in the handshake, and what block status returns.

use crate::proto::*;

/// The server's size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths must be multiples of this (a power of 2, at most 64 KiB).
    pub minimum: u32,
    /// Requests aligned to this are efficient.
    pub preferred: u32,
    /// The largest payload the server takes in one request.
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// "If size constraints have not been advertised ... a server SHOULD
    /// support a default minimum block size of 1, a preferred block size of
    /// 2^12 (4,096), and a maximum payload size that is at least 2^25".
    fn default() -> Self {
        BlockSizes {
            minimum: MIN_BLOCK_SIZE,
            preferred: DEFAULT_PREFERRED_BLOCK_SIZE,
            maximum: MAX_PAYLOAD,
        }
    }
}

impl BlockSizes {
    /// Checks advertised constraints against the spec's rules.
    pub(crate) fn checked(
        minimum: u32,
        preferred: u32,
        maximum: u32,
    ) -> Result<BlockSizes, String> {
        // The minimum block size: "If advertised, this value MUST be a power
        // of 2, MUST NOT be larger than 2^16 (65,536)".
        if !minimum.is_power_of_two() || minimum > 1 << 16 {
            return Err(format!(
                "minimum block size {minimum} is not a power of 2 up to 65536"
            ));
        }
        // The preferred block size: "this MUST be a power of 2 at least as
        // large as the maximum of the minimum block size and 2^9 (512)".
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err(format!(
                "preferred block size {preferred} is not a power of 2 of at least max(512, {minimum})"
            ));
        }
        // The maximum payload: "MUST be at least as large as the preferred block size".
        if maximum < preferred {
            return Err(format!(
                "maximum payload {maximum} is smaller than the preferred block size {preferred}"
            ));
        }
        Ok(BlockSizes {
            minimum,
            preferred,
            maximum,
        })
    }
}

/// The export this connection is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub export: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*` of [`crate::proto`]).
    pub flags: u16,
    /// Size constraints (the spec's defaults when the server sent none).
    pub block_size: BlockSizes,
    /// Whether the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_size_advertised: bool,
    /// Whether structured replies were negotiated (needed for block status).
    pub structured_replies: bool,
}

impl ExportInfo {
    /// The server said the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    /// `NBD_FLAG_CAN_MULTI_CONN`: "In the absence of this flag, clients SHOULD
    /// NOT multiplex their commands over more than one connection to the
    /// export" (reads of a read-only snapshot are safe either way).
    pub fn can_multi_conn(&self) -> bool {
        self.flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }
}

/// A metadata context the server granted, with the id its block status
/// replies carry ("clients MUST therefore treat the ID as an opaque value and
/// not (for instance) cache it between connections").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The context name, e.g. `base:allocation` or `qemu:dirty-bitmap:NAME`.
    pub name: String,
    /// The id on this connection.
    pub id: u32,
}

/// One block status descriptor, placed at its offset in the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Start of the extent.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Status flags; their meaning depends on the context.
    pub flags: u32,
}

impl StatusExtent {
    /// End of the extent (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// `base:allocation`: `NBD_STATE_HOLE`, "the block represents a hole".
    pub fn is_hole(&self) -> bool {
        self.flags & NBD_STATE_HOLE != 0
    }

    /// `base:allocation`: `NBD_STATE_ZERO`, "the block contents read as all zeroes".
    pub fn is_zero(&self) -> bool {
        self.flags & NBD_STATE_ZERO != 0
    }

    /// `qemu:dirty-bitmap:NAME`: `NBD_STATE_DIRTY`, "set when the extent is dirty".
    pub fn is_dirty(&self) -> bool {
        self.flags & NBD_STATE_DIRTY != 0
    }
}

/// Merges neighbours with equal flags ("the client SHOULD be prepared to
/// handle consecutive descriptors with the same *status* value").
pub fn merge_extents(extents: &mut Vec<StatusExtent>) {
    let mut out: Vec<StatusExtent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset && last.flags == e.flags => last.len += e.len,
            _ => out.push(e),
        }
    }
    *extents = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_follow_the_spec_rules() {
        assert!(BlockSizes::checked(1, 4096, MAX_PAYLOAD).is_ok());
        assert!(BlockSizes::checked(512, 512, u32::MAX).is_ok());
        assert!(BlockSizes::checked(3, 4096, MAX_PAYLOAD).is_err());
        assert!(BlockSizes::checked(1 << 17, 1 << 17, MAX_PAYLOAD).is_err());
        assert!(BlockSizes::checked(1, 256, MAX_PAYLOAD).is_err());
        assert!(BlockSizes::checked(4096, 2048, MAX_PAYLOAD).is_err());
        assert!(BlockSizes::checked(1, 4096, 4095).is_err());
    }

    #[test]
    fn merging_joins_equal_neighbours_only() {
        let e = |offset, len, flags| StatusExtent { offset, len, flags };
        let mut v = vec![e(0, 10, 3), e(10, 5, 3), e(15, 5, 0), e(30, 5, 0)];
        merge_extents(&mut v);
        assert_eq!(v, [e(0, 15, 3), e(15, 5, 0), e(30, 5, 0)]);
    }
}
