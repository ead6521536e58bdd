//! Protocol constants and wire types of fixed-newstyle NBD.
//!
//! Everything here follows `doc/proto.md` of the NetworkBlockDevice/nbd
//! repository; the spec's own sentences are quoted beside the values and
//! checks that obey them. All integers on the wire are big-endian:
//! "`0xdeadbeef` is used for literal hex numbers (which are always sent in
//! network byte order)".

// ---------------------------------------------------------------- handshake

/// "S: 64 bits, `0x4e42444d41474943` (ASCII '`NBDMAGIC`')".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// The second magic of the oldstyle handshake: "S: 64 bits, `0x00420281861253`
/// (`cliserv_magic`, a magic number)". Only a client needs it, to say why it stops.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// "If the `port` field is not present then it MUST default to the NBD port
/// number assigned by IANA (10809)" (doc/uri.md).
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// "S: 64 bits, `0x49484156454F5054` (ASCII '`IHAVEOPT`')"; also the magic of
/// every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// "S: 64 bits, `0x3e889045565a9` (magic number for replies)" to options.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: "`NBD_FLAG_FIXED_NEWSTYLE`; MUST be set by servers that
/// support the fixed newstyle protocol".
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: "`NBD_FLAG_NO_ZEROES`; if set, and if the client replies
/// with `NBD_FLAG_C_NO_ZEROES` ... the server MUST NOT send the 124 bytes of zero".
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// "Clients MUST NOT set any other flags; the server MUST drop the TCP
/// connection if the client sets an unknown flag".
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Option: enter transmission with the named export (no error reply possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: "The client desires to abort the negotiation".
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade to TLS ("The client wishes to initiate TLS").
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// "The option sent by the client is unknown by this server implementation".
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// "The option sent by the client is known by this server and syntactically
/// valid, but server-side policy forbids the server to allow the option".
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// "The option sent by the client is known by this server, but was determined
/// by the server to be syntactically or semantically invalid."
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// "The option sent by the client is not supported on the platform on which
/// the server is running".
pub const NBD_REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// "The server requires the client to initiate TLS before any other option."
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// "The requested export is not available."
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// "The server is unwilling to continue negotiation as it is in the process
/// of being shut down."
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// "The server is unwilling to enter transmission phase for a given export
/// unless the client first acknowledges (via `NBD_INFO_BLOCK_SIZE`) that it
/// will obey non-default block sizing requirements."
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// "The request or the reply is too large to process."
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information item: size and transmission flags ("*length* MUST be 12").
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information item: human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information item: size constraints ("*length* MUST be 14").
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ------------------------------------------------------- transmission flags

/// "bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1."
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// "If this flag is set, the server MUST error subsequent write operations".
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Exposes `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Exposes `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Exposes `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Exposes `NBD_CMD_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// "MUST leave this flag clear if structured replies have not been negotiated".
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// "the effects of `NBD_CMD_FLUSH` and `NBD_CMD_FLAG_FUA` MUST be visible across
/// all connections when the server sends its reply".
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Exposes `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// "MUST set this transmission flag to 0 if `NBD_FLAG_SEND_WRITE_ZEROES` is not set."
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ------------------------------------------------------------- transmission

/// "C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`)".
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// "S: 32 bits, 0x67446698, magic (`NBD_SIMPLE_REPLY_MAGIC`...)".
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "S: 32 bits, 0x668e33ef, magic (`NBD_STRUCTURED_REPLY_MAGIC`)".
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: soft disconnect; "There is no reply to an `NBD_CMD_DISC`."
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: "valid during `NBD_CMD_WRITE_ZEROES`", do not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: "don't fragment", valid during `NBD_CMD_READ`.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: "valid during `NBD_CMD_BLOCK_STATUS`", one extent only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: "valid during `NBD_CMD_WRITE_ZEROES`", fail fast with ENOTSUP.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: "MUST set this bit if this is the final reply".
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload, final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: 64-bit offset, then data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: 64-bit offset, 32-bit hole size.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: context id then (length, flags) descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: error, message length, message.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply type: error, message length, message, offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flag: "the block represents a hole".
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: "the block contents read as all zeroes".
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Flag of QEMU's `qemu:dirty-bitmap:NAME` contexts (QEMU's docs/interop/nbd):
/// "bit 0: `NBD_STATE_DIRTY`, set when the extent is "dirty"".
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` ("each with a unique metadata context ID").
pub const BASE_ALLOCATION_ID: u32 = 1;

// ----------------------------------------------------------- error values

/// `NBD_EPERM` (1), Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO` (5), Input/output error.
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM` (12), Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL` (22), Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC` (28), No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW` (75), Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP` (95), Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN` (108), Server is in the process of being shut down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ------------------------------------------------------------------ limits

/// Minimum block size we advertise: "a server SHOULD support a default
/// minimum block size of 1".
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Default preferred block size: "a preferred block size of 2^12 (4,096)".
pub const DEFAULT_PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum payload: "a maximum payload size that is at least 2^25
/// (33,554,432) (even if the export size is smaller)".
pub const MAX_PAYLOAD: u32 = 1 << 25;
/// Strings "MUST be no longer than 4096 bytes".
pub const MAX_STRING: usize = 4096;
/// Bound on one option's data: the largest legal option (`NBD_OPT_SET_META_CONTEXT`
/// with a handful of queries) fits easily; anything longer closes the connection
/// before we allocate for it.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// "a server SHOULD NOT send more than 2^20 status descriptors in a single chunk".
pub const MAX_EXTENTS: usize = 1 << 20;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// One transmission request header.
///
/// ```text
/// C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`)
/// C: 16 bits, command flags
/// C: 16 bits, type
/// C: 64 bits, handle
/// C: 64 bits, offset (unsigned)
/// C: 32 bits, length (unsigned)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    /// Parses a request header; `None` when the magic is wrong.
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Option<Request> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != NBD_REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes this header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Big-endian u64 from the first 8 bytes of `b` (callers pass exactly 8).
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A simple reply header:
/// "S: 32 bits, 0x67446698, magic ... S: 32 bits, error (MAY be zero) S: 64 bits, handle".
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header: magic, flags, type, handle, payload length.
pub fn structured_header(
    flags: u16,
    kind: u16,
    handle: u64,
    len: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Name of an option, for logs and errors.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an unknown option",
    }
}

/// Name of an option reply type, for logs and errors.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown reply type",
    }
}

/// Name of an NBD error value, for logs and errors.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "NBD_EPERM",
        NBD_EIO => "NBD_EIO",
        NBD_ENOMEM => "NBD_ENOMEM",
        NBD_EINVAL => "NBD_EINVAL",
        NBD_ENOSPC => "NBD_ENOSPC",
        NBD_EOVERFLOW => "NBD_EOVERFLOW",
        NBD_ENOTSUP => "NBD_ENOTSUP",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN",
        _ => "an unknown error value",
    }
}

/// Name of a command type, for logs.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        NBD_CMD_READ => "READ",
        NBD_CMD_WRITE => "WRITE",
        NBD_CMD_DISC => "DISC",
        NBD_CMD_FLUSH => "FLUSH",
        NBD_CMD_TRIM => "TRIM",
        NBD_CMD_CACHE => "CACHE",
        NBD_CMD_WRITE_ZEROES => "WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            kind: NBD_CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Some(r));
    }

    #[test]
    fn bad_request_magic_is_rejected() {
        let mut b = Request {
            flags: 0,
            kind: 0,
            handle: 1,
            offset: 0,
            len: 1,
        }
        .encode();
        b[0] ^= 0xff;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn headers_have_spec_layout() {
        let s = simple_reply(NBD_EINVAL, 7);
        assert_eq!(&s[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&s[4..8], &22u32.to_be_bytes());
        let h = structured_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 7, 6);
        assert_eq!(&h[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&h[6..8], &0x8001u16.to_be_bytes());
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }
}
