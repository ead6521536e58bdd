//! The agent wire protocol (version 2), spoken between sa-image and `shard-agent` inside TLS 1.3
//! ([`crate::tls`]: the agent proves its pinned key in the TLS handshake; plain TCP is not
//! served).
//!
//! Every message is a frame: `u32 length (LE, of what follows) | u8 kind | body`. Lengths are
//! checked against [`MAX_FRAME`] before anything is allocated.
//!
//! ```text
//! client -> agent  HELLO      magic "SA-AGENT", version u16
//! agent  -> client CHALLENGE  version u16, agent id [16], nonce [32]
//! client -> agent  AUTH       owner id [32], Ed25519 signature [64] over
//!                             "sa-agent-auth-v2" | agent id | nonce | TLS exporter [32]
//! agent  -> client OK | ERROR (then closes)
//! then requests, each answered in order on that connection:
//!   PUT_SHARD key data | GET_SHARD key | DELETE_SHARD key | CONFIRM_SHARD key header
//!   GET_RANGE key, offset u32, len u32 -> DATA: bytes offset..offset+len of the shard's payload
//!   PUT_BLOB name data | GET_BLOB name | LIST_BLOBS prefix | DELETE_BLOB name
//!   SYNC (make every shard written so far durable) | STAT
//!   LIST_VOLUMES                      -> NAMES (volume ids, hex)
//!   LIST_SHARDS volume [16], bucket u8 -> SHARDS (stripe id [32], index u8, age u64 s) per shard
//!                                        whose stripe id starts with byte `bucket`
//!   SWEEP_SHARDS min_age u64, n u32, n keys -> SWEPT deleted u64, bytes u64, young u64
//!   SCRUB start u8                    -> SCRUBBED rate u64, running u8, passes started u64,
//!                                        passes done u64, last done u64 (Unix s), checked u64,
//!                                        bytes u64, bad total u64, n u32, n × (key, restored u8,
//!                                        reason str)
//! answers: OK | DATA bytes | NAMES list | STAT fields | SHARDS | SWEPT | SCRUBBED | ERROR code message
//! ```
//! Version 2 is version 1 inside TLS, with the TLS exporter value of the session in the signed
//! message (channel binding): a proof made for one TLS session cannot be relayed into another.
//! `STAT` answers `agent id [16], used u64, quota u64, shards u64` and, since the placement
//! change, `fs_free u64` (bytes free on the agent's filesystem) after them, then, for
//! Wake-on-LAN, `mac [6], broadcast [4]`: the MAC and IPv4 broadcast address of the interface
//! the request came in on, all zeros for unknown (loopback, no IPv4 broadcast, an OS that would
//! not tell). The answer is extensible: a reader takes the fields it knows, treats absent
//! trailing fields as unknown (an older agent) and skips trailing fields it does not know (a
//! newer agent). Fields are positional, so the Wake-on-LAN pair is sent only after `fs_free`
//! (an agent that cannot read its free space sends neither) and only when one is known. Readers
//! built before `fs_free` reject the longer answer ("trailing bytes"): upgrade `sa-image`
//! before, or with, the agents; readers built since skip the Wake-on-LAN pair.
//! `SCRUB` (kind 23, answer 107) was added to version 1 for health checks: with `start = 1` the
//! agent begins a full pass over its shard files now (unless one is running) and answers with its
//! scrub state at once; with `start = 0` it only reports. The answer lists the shards the scrub
//! found bad and moved to the agent's quarantine (at most [`MAX_SCRUB_FINDINGS`]; `restored`
//! says a sound copy has been stored again since). An older agent answers with a protocol error.
//! `LIST_VOLUMES`, `LIST_SHARDS` and `SWEEP_SHARDS` were added to version 1 for garbage
//! collection (kinds 19..21, answers 105..106): an older agent answers them with a protocol
//! error, which the collector reports as "agent too old" and skips. Listing goes by stripe-id
//! bucket (256 per volume) so no answer grows with the volume. `SWEEP_SHARDS` deletes each named
//! shard only if its file is at least `min_age` seconds old *by the agent's clock* at the moment of
//! deletion, under a lock that excludes concurrent stores: a shard just stored (or re-stored,
//! which refreshes its age) survives, whatever the clocks of the imager and agent say.
//! `GET_RANGE` (kind 24) was added to version 2 for reads smaller than a stripe (seal format 2,
//! [`crate::seal`]): the agent checks the shard's header (magic, crc, that it is the shard asked
//! for, that the range lies inside its payload) but not the payload's crc, which would mean
//! reading it all; the reader checks the bytes by their AEAD tags. At most [`MAX_RANGE`] bytes.
//! An older agent closes the connection on it (unknown kind): readers then read whole stripes.
//! A shard key is `volume id [16] | stripe id [32] | index u8`. The agent holds only the owner's
//! public id: it can check a signature but cannot decrypt anything.

use std::net::Ipv4Addr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::enc::{Reader, Writer};
use crate::error::{Error, Result};
use crate::shard::ShardKey;

/// Magic the client sends first.
pub const AGENT_MAGIC: [u8; 8] = *b"SA-AGENT";
/// Protocol version.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame accepted (a 64 MiB stripe's shard plus headers).
pub const MAX_FRAME: usize = (64 << 20) + 4096;
/// Largest range one `GET_RANGE` may ask for.
pub const MAX_RANGE: u32 = 16 << 20;
/// Largest frame accepted before authentication: handshake messages are under 200 bytes, so a
/// stranger cannot make an agent set aside a 64 MiB buffer per connection.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;
/// Domain separation for the authentication signature.
pub const AUTH_CONTEXT: &[u8] = b"sa-agent-auth-v2";

mod kind {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const PUT_SHARD: u8 = 10;
    pub const GET_SHARD: u8 = 11;
    pub const DELETE_SHARD: u8 = 12;
    pub const PUT_BLOB: u8 = 13;
    pub const GET_BLOB: u8 = 14;
    pub const LIST_BLOBS: u8 = 15;
    pub const DELETE_BLOB: u8 = 16;
    pub const SYNC: u8 = 17;
    pub const STAT: u8 = 18;
    pub const LIST_VOLUMES: u8 = 19;
    pub const LIST_SHARDS: u8 = 20;
    pub const SWEEP_SHARDS: u8 = 21;
    pub const CONFIRM_SHARD: u8 = 22;
    pub const SCRUB: u8 = 23;
    pub const GET_RANGE: u8 = 24;
    pub const OK: u8 = 100;
    pub const DATA: u8 = 101;
    pub const NAMES: u8 = 102;
    pub const STAT_REPLY: u8 = 103;
    pub const ERROR: u8 = 104;
    pub const SHARDS: u8 = 105;
    pub const SWEPT: u8 = 106;
    pub const SCRUBBED: u8 = 107;
}

/// Error codes an agent sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No such shard or blob.
    NotFound,
    /// Quota or disk full.
    Full,
    /// The request was malformed.
    BadRequest,
    /// The agent's disk failed.
    Io,
    /// Authentication failed.
    Unauthorized,
    /// The stored or uploaded shard fails its checks.
    Corrupt,
}

impl ErrorCode {
    fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::Full => 2,
            ErrorCode::BadRequest => 3,
            ErrorCode::Io => 4,
            ErrorCode::Unauthorized => 5,
            ErrorCode::Corrupt => 6,
        }
    }
    fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Full,
            3 => ErrorCode::BadRequest,
            5 => ErrorCode::Unauthorized,
            6 => ErrorCode::Corrupt,
            _ => ErrorCode::Io,
        }
    }

    /// The code for a store error, as an agent reports it.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::ShardMissing => ErrorCode::NotFound,
            Error::Full(_) => ErrorCode::Full,
            Error::ShardCorrupt(_) => ErrorCode::Corrupt,
            Error::Invalid(_) | Error::Malformed { .. } | Error::UnsupportedVersion { .. } => {
                ErrorCode::BadRequest
            }
            _ => ErrorCode::Io,
        }
    }

    /// The client-side error for a code and the agent's message.
    pub fn into_error(self, message: String) -> Error {
        match self {
            ErrorCode::NotFound => Error::ShardMissing,
            ErrorCode::Full => Error::Full(message),
            ErrorCode::Corrupt => Error::ShardCorrupt(message),
            _ => Error::Remote(message),
        }
    }
}

/// What an agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreStat {
    /// The agent's stable id.
    pub agent_id: [u8; 16],
    /// Bytes stored (shards and blobs).
    pub used: u64,
    /// Quota in bytes, 0 for none.
    pub quota: u64,
    /// Number of shard files.
    pub shards: u64,
    /// Bytes the agent may still write on the filesystem that holds its directory: the free
    /// space (for an unprivileged user) above the floor the agent leaves free for the PC's user
    /// (`--min-free`, see `store::dir::space`), as the agent saw it when answering; `None` from
    /// an agent older than this field. Placement uses `quota - used` when there is a quota
    /// (never more than this), else this.
    pub fs_free: Option<u64>,
    /// MAC of the agent's interface the request came in on (for Wake-on-LAN); `None` when
    /// unknown (loopback, an older agent).
    pub mac: Option<[u8; 6]>,
    /// IPv4 broadcast address of that interface's subnet; `None` when unknown.
    pub broadcast: Option<Ipv4Addr>,
    /// How long the agent keeps its PC awake after a request (`shard-agent --keep-awake`),
    /// whole milliseconds on the wire; `None` when it does not (off, not built for its OS, an
    /// older agent). A client running a long job asks something more often than this so the
    /// PC does not sleep in a quiet phase (the engine's `fleet::keepalive`).
    pub keep_awake: Option<std::time::Duration>,
}

impl StoreStat {
    /// Bytes this agent can still take: `quota - used` with a quota (never more than the
    /// filesystem's free space, when known), else the filesystem's free space; `None` when
    /// unknown (no quota, and an agent too old to report its filesystem).
    pub fn room(&self) -> Option<u64> {
        let in_quota = (self.quota > 0).then(|| self.quota.saturating_sub(self.used));
        match (in_quota, self.fs_free) {
            (Some(q), Some(f)) => Some(q.min(f)),
            (q, f) => q.or(f),
        }
    }
}

/// Most keys one `SWEEP_SHARDS` request may name (keeps frames small).
pub const MAX_SWEEP_KEYS: usize = 16_384;

/// One shard an agent holds, as `LIST_SHARDS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEntry {
    /// Stripe id.
    pub stripe: crate::seal::StripeId,
    /// Shard index.
    pub index: u8,
    /// Seconds since the file was last stored or re-stored, by the agent's clock.
    pub age: u64,
}

/// What a `SWEEP_SHARDS` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SweepStats {
    /// Shard files deleted.
    pub deleted: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Shards named but kept because they were younger than `min_age`.
    pub young: u64,
}

/// Most findings one `SCRUBBED` answer lists (the total is always given).
pub const MAX_SCRUB_FINDINGS: usize = 10_000;

/// A shard the agent's scrub found bad and quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubFinding {
    /// Which shard.
    pub key: ShardKey,
    /// True when a sound copy has been stored again since (a repair put it back).
    pub restored: bool,
    /// What was wrong, e.g. "payload crc32c mismatch".
    pub reason: String,
}

/// An agent's scrub state, as `SCRUB` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrubStatus {
    /// Background rate limit, bytes per second; 0 when the background scrub is off (a pass
    /// asked for then runs unthrottled).
    pub rate: u64,
    /// Whether a pass is running now.
    pub running: bool,
    /// Passes started since the agent started.
    pub passes_started: u64,
    /// Passes completed since the agent started.
    pub passes_done: u64,
    /// When the last pass completed, Unix seconds (0: none yet).
    pub last_done: u64,
    /// Shards checked by the running pass, or by the last one.
    pub checked: u64,
    /// Bytes read by the running pass, or by the last one.
    pub bytes: u64,
    /// Shards in quarantine in all (`bad` may list fewer).
    pub bad_total: u64,
    /// Quarantined shards (at most [`MAX_SCRUB_FINDINGS`]).
    pub bad: Vec<ScrubFinding>,
}

/// The handshake messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Client hello.
    Hello {
        /// Client's protocol version.
        version: u16,
    },
    /// Agent challenge.
    Challenge {
        /// Agent's protocol version.
        version: u16,
        /// Agent's stable id.
        agent_id: [u8; 16],
        /// Random nonce to sign.
        nonce: [u8; 32],
    },
    /// Client proof of ownership.
    Auth {
        /// Owner id (Ed25519 public key).
        owner: [u8; 32],
        /// Signature over `AUTH_CONTEXT | agent id | nonce`.
        signature: [u8; 64],
    },
}

/// A request after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Store a shard file.
    PutShard {
        /// Which shard.
        key: ShardKey,
        /// The whole shard file.
        data: Vec<u8>,
    },
    /// Fetch a shard file.
    GetShard {
        /// Which shard.
        key: ShardKey,
    },
    /// Fetch bytes `offset..offset + len` of a shard's payload (no payload crc check).
    GetRange {
        /// Which shard.
        key: ShardKey,
        /// Offset in the payload (after the header).
        offset: u32,
        /// Bytes wanted, at most [`MAX_RANGE`].
        len: u32,
    },
    /// Keep a stored shard instead of receiving it again: OK when the agent holds a sound shard
    /// file with exactly this header (it then counts as written by this run: its time is
    /// refreshed and the next SYNC makes it durable), NOT_FOUND otherwise.
    ConfirmShard {
        /// Which shard.
        key: ShardKey,
        /// The header the sender's copy has (its payload crc32c stands for the payload).
        header: Vec<u8>,
    },
    /// Delete a shard file.
    DeleteShard {
        /// Which shard.
        key: ShardKey,
    },
    /// Store a catalog blob durably.
    PutBlob {
        /// Blob name.
        name: String,
        /// Contents.
        data: Vec<u8>,
    },
    /// Fetch a catalog blob.
    GetBlob {
        /// Blob name.
        name: String,
    },
    /// List blob names with a prefix.
    ListBlobs {
        /// Name prefix.
        prefix: String,
    },
    /// Delete a blob.
    DeleteBlob {
        /// Blob name.
        name: String,
    },
    /// Make every shard written so far durable.
    Sync,
    /// Report usage.
    Stat,
    /// List the volume ids (hex) the agent holds shards of.
    ListVolumes,
    /// List the shards of one volume whose stripe id starts with byte `bucket`.
    ListShards {
        /// Volume id.
        volume: crate::shard::VolumeId,
        /// First byte of the stripe ids listed.
        bucket: u8,
    },
    /// Delete the named shards that are at least `min_age` seconds old (garbage collection).
    SweepShards {
        /// Shards younger than this (agent's clock) are kept.
        min_age: u64,
        /// The shards to delete.
        keys: Vec<ShardKey>,
    },
    /// Report the scrub state; with `start`, begin a full pass now first.
    Scrub {
        /// Begin a pass now (unless one is running).
        start: bool,
    },
}

/// An answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done.
    Ok,
    /// Bytes of a shard or blob.
    Data(Vec<u8>),
    /// Blob names.
    Names(Vec<String>),
    /// Usage.
    Stat(StoreStat),
    /// Shards held (answer to `ListShards`).
    Shards(Vec<ShardEntry>),
    /// Outcome of a `SweepShards`.
    Swept(SweepStats),
    /// Scrub state (answer to `Scrub`).
    Scrubbed(ScrubStatus),
    /// Failure.
    Error {
        /// What kind.
        code: ErrorCode,
        /// Human text.
        message: String,
    },
}

fn put_key(w: &mut Writer, key: &ShardKey) {
    w.bytes(&key.volume).bytes(&key.stripe).u8(key.index);
}

fn get_key(r: &mut Reader<'_>) -> Result<ShardKey> {
    Ok(ShardKey {
        volume: r.array()?,
        stripe: r.array()?,
        index: r.u8()?,
    })
}

/// A frame split into a small head and an optional large tail, written without copying the tail.
pub struct Frame<'a> {
    kind: u8,
    head: Vec<u8>,
    tail: &'a [u8],
}

impl Handshake {
    /// Frames the message.
    pub fn frame(&self) -> Frame<'static> {
        let mut w = Writer::default();
        let kind = match self {
            Handshake::Hello { version } => {
                w.bytes(&AGENT_MAGIC).u16(*version);
                kind::HELLO
            }
            Handshake::Challenge {
                version,
                agent_id,
                nonce,
            } => {
                w.u16(*version).bytes(agent_id).bytes(nonce);
                kind::CHALLENGE
            }
            Handshake::Auth { owner, signature } => {
                w.bytes(owner).bytes(signature);
                kind::AUTH
            }
        };
        Frame {
            kind,
            head: w.buf,
            tail: &[],
        }
    }

    /// Parses a handshake frame.
    pub fn parse(kind: u8, body: &[u8]) -> Result<Self> {
        let mut r = Reader::new(body, "handshake");
        let msg = match kind {
            kind::HELLO => {
                let magic: [u8; 8] = r.array()?;
                if magic != AGENT_MAGIC {
                    return Err(Error::Protocol("not an sa-image client (bad magic)".into()));
                }
                Handshake::Hello { version: r.u16()? }
            }
            kind::CHALLENGE => Handshake::Challenge {
                version: r.u16()?,
                agent_id: r.array()?,
                nonce: r.array()?,
            },
            kind::AUTH => Handshake::Auth {
                owner: r.array()?,
                signature: r.array()?,
            },
            k => {
                return Err(Error::Protocol(format!(
                    "unexpected handshake message kind {k}"
                )))
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

impl Request {
    /// Frames the request; a shard's or blob's data is the frame's tail (not copied).
    pub fn frame(&self) -> Frame<'_> {
        let mut w = Writer::default();
        let (kind, tail): (u8, &[u8]) = match self {
            Request::PutShard { key, data } => {
                put_key(&mut w, key);
                (kind::PUT_SHARD, data)
            }
            Request::GetShard { key } => {
                put_key(&mut w, key);
                (kind::GET_SHARD, &[])
            }
            Request::GetRange { key, offset, len } => {
                put_key(&mut w, key);
                w.u32(*offset).u32(*len);
                (kind::GET_RANGE, &[])
            }
            Request::ConfirmShard { key, header } => {
                put_key(&mut w, key);
                (kind::CONFIRM_SHARD, header)
            }
            Request::DeleteShard { key } => {
                put_key(&mut w, key);
                (kind::DELETE_SHARD, &[])
            }
            Request::PutBlob { name, data } => {
                w.str(name);
                (kind::PUT_BLOB, data)
            }
            Request::GetBlob { name } => {
                w.str(name);
                (kind::GET_BLOB, &[])
            }
            Request::ListBlobs { prefix } => {
                w.str(prefix);
                (kind::LIST_BLOBS, &[])
            }
            Request::DeleteBlob { name } => {
                w.str(name);
                (kind::DELETE_BLOB, &[])
            }
            Request::Sync => (kind::SYNC, &[]),
            Request::Stat => (kind::STAT, &[]),
            Request::ListVolumes => (kind::LIST_VOLUMES, &[]),
            Request::ListShards { volume, bucket } => {
                w.bytes(volume).u8(*bucket);
                (kind::LIST_SHARDS, &[])
            }
            Request::SweepShards { min_age, keys } => {
                w.u64(*min_age).u32(keys.len() as u32);
                for k in keys {
                    put_key(&mut w, k);
                }
                (kind::SWEEP_SHARDS, &[])
            }
            Request::Scrub { start } => {
                w.u8(u8::from(*start));
                (kind::SCRUB, &[])
            }
        };
        Frame {
            kind,
            head: w.buf,
            tail,
        }
    }

    /// Parses a request frame (takes the body to avoid copying shard data).
    pub fn parse(kind: u8, mut body: Vec<u8>) -> Result<Self> {
        let mut r = Reader::new(&body, "request");
        let req = match kind {
            kind::PUT_SHARD => {
                let key = get_key(&mut r)?;
                body.drain(..49);
                return Ok(Request::PutShard { key, data: body });
            }
            kind::PUT_BLOB => {
                let name = r.str()?;
                let used = body.len() - r.remaining();
                body.drain(..used);
                return Ok(Request::PutBlob { name, data: body });
            }
            kind::GET_SHARD => Request::GetShard {
                key: get_key(&mut r)?,
            },
            kind::CONFIRM_SHARD => {
                let key = get_key(&mut r)?;
                let header = r.take(crate::shard::SHARD_HEADER_LEN)?.to_vec();
                Request::ConfirmShard { key, header }
            }
            kind::DELETE_SHARD => Request::DeleteShard {
                key: get_key(&mut r)?,
            },
            kind::GET_BLOB => Request::GetBlob { name: r.str()? },
            kind::LIST_BLOBS => Request::ListBlobs { prefix: r.str()? },
            kind::DELETE_BLOB => Request::DeleteBlob { name: r.str()? },
            kind::SYNC => Request::Sync,
            kind::STAT => Request::Stat,
            kind::LIST_VOLUMES => Request::ListVolumes,
            kind::LIST_SHARDS => Request::ListShards {
                volume: r.array()?,
                bucket: r.u8()?,
            },
            kind::SWEEP_SHARDS => {
                let min_age = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_SWEEP_KEYS {
                    return Err(Error::Protocol(format!(
                        "sweep of {n} shards, at most {MAX_SWEEP_KEYS} per request"
                    )));
                }
                let mut keys = Vec::with_capacity(n.min(r.remaining() / 49));
                for _ in 0..n {
                    keys.push(get_key(&mut r)?);
                }
                Request::SweepShards { min_age, keys }
            }
            kind::SCRUB => Request::Scrub {
                start: r.u8()? != 0,
            },
            kind::GET_RANGE => {
                let key = get_key(&mut r)?;
                let (offset, len) = (r.u32()?, r.u32()?);
                if len == 0 || len > MAX_RANGE {
                    return Err(Error::Protocol(format!(
                        "GET_RANGE of {len} bytes: 1 to {MAX_RANGE} may be asked at once"
                    )));
                }
                Request::GetRange { key, offset, len }
            }
            k => return Err(Error::Protocol(format!("unknown request kind {k}"))),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// Frames the response; data is the tail.
    pub fn frame(&self) -> Frame<'_> {
        let mut w = Writer::default();
        let (kind, tail): (u8, &[u8]) = match self {
            Response::Ok => (kind::OK, &[]),
            Response::Data(d) => (kind::DATA, d),
            Response::Names(names) => {
                w.u32(names.len() as u32);
                for n in names {
                    w.str(n);
                }
                (kind::NAMES, &[])
            }
            Response::Stat(s) => {
                w.bytes(&s.agent_id).u64(s.used).u64(s.quota).u64(s.shards);
                if let Some(free) = s.fs_free {
                    w.u64(free);
                    if s.mac.is_some() || s.broadcast.is_some() || s.keep_awake.is_some() {
                        w.bytes(&s.mac.unwrap_or_default())
                            .bytes(&s.broadcast.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
                        if let Some(hold) = s.keep_awake {
                            w.u64((hold.as_millis() as u64).max(1));
                        }
                    }
                }
                (kind::STAT_REPLY, &[])
            }
            Response::Shards(entries) => {
                w.u32(entries.len() as u32);
                for e in entries {
                    w.bytes(&e.stripe).u8(e.index).u64(e.age);
                }
                (kind::SHARDS, &[])
            }
            Response::Swept(s) => {
                w.u64(s.deleted).u64(s.bytes).u64(s.young);
                (kind::SWEPT, &[])
            }
            Response::Scrubbed(s) => {
                w.u64(s.rate)
                    .u8(u8::from(s.running))
                    .u64(s.passes_started)
                    .u64(s.passes_done)
                    .u64(s.last_done)
                    .u64(s.checked)
                    .u64(s.bytes)
                    .u64(s.bad_total);
                let listed = &s.bad[..s.bad.len().min(MAX_SCRUB_FINDINGS)];
                w.u32(listed.len() as u32);
                for f in listed {
                    put_key(&mut w, &f.key);
                    w.u8(u8::from(f.restored)).str(&f.reason);
                }
                (kind::SCRUBBED, &[])
            }
            Response::Error { code, message } => {
                w.u16(code.to_u16()).str(message);
                (kind::ERROR, &[])
            }
        };
        Frame {
            kind,
            head: w.buf,
            tail,
        }
    }

    /// Parses a response frame.
    pub fn parse(kind: u8, body: Vec<u8>) -> Result<Self> {
        if kind == kind::DATA {
            return Ok(Response::Data(body));
        }
        let mut r = Reader::new(&body, "response");
        let resp = match kind {
            kind::OK => Response::Ok,
            kind::NAMES => {
                let n = r.u32()? as usize;
                let mut names = Vec::with_capacity(n.min(r.remaining() / 2));
                for _ in 0..n {
                    names.push(r.str()?);
                }
                Response::Names(names)
            }
            kind::STAT_REPLY => {
                let mut s = StoreStat {
                    agent_id: r.array()?,
                    used: r.u64()?,
                    quota: r.u64()?,
                    shards: r.u64()?,
                    fs_free: None,
                    mac: None,
                    broadcast: None,
                    keep_awake: None,
                };
                // Extension fields, in order; an older agent stops before them, and fields a
                // newer agent appends after the known ones are skipped.
                if r.remaining() >= 8 {
                    s.fs_free = Some(r.u64()?);
                }
                if r.remaining() >= 10 {
                    s.mac = Some(r.array()?).filter(|m: &[u8; 6]| *m != [0; 6]);
                    s.broadcast =
                        Some(Ipv4Addr::from(r.array::<4>()?)).filter(|b| !b.is_unspecified());
                }
                if r.remaining() >= 8 {
                    s.keep_awake = Some(r.u64()?)
                        .filter(|ms| *ms > 0)
                        .map(std::time::Duration::from_millis);
                }
                r.take(r.remaining())?;
                Response::Stat(s)
            }
            kind::SHARDS => {
                let n = r.u32()? as usize;
                let mut entries = Vec::with_capacity(n.min(r.remaining() / 41));
                for _ in 0..n {
                    entries.push(ShardEntry {
                        stripe: r.array()?,
                        index: r.u8()?,
                        age: r.u64()?,
                    });
                }
                Response::Shards(entries)
            }
            kind::SCRUBBED => {
                let mut s = ScrubStatus {
                    rate: r.u64()?,
                    running: r.u8()? != 0,
                    passes_started: r.u64()?,
                    passes_done: r.u64()?,
                    last_done: r.u64()?,
                    checked: r.u64()?,
                    bytes: r.u64()?,
                    bad_total: r.u64()?,
                    bad: Vec::new(),
                };
                let n = r.u32()? as usize;
                if n > MAX_SCRUB_FINDINGS {
                    return Err(Error::Protocol(format!(
                        "scrub answer lists {n} shards, at most {MAX_SCRUB_FINDINGS}"
                    )));
                }
                s.bad.reserve(n.min(r.remaining() / 52));
                for _ in 0..n {
                    s.bad.push(ScrubFinding {
                        key: get_key(&mut r)?,
                        restored: r.u8()? != 0,
                        reason: r.str()?,
                    });
                }
                Response::Scrubbed(s)
            }
            kind::SWEPT => Response::Swept(SweepStats {
                deleted: r.u64()?,
                bytes: r.u64()?,
                young: r.u64()?,
            }),
            kind::ERROR => Response::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str()?,
            },
            k => return Err(Error::Protocol(format!("unknown response kind {k}"))),
        };
        r.finish()?;
        Ok(resp)
    }

    /// An error response for a store error.
    pub fn error(e: &Error) -> Self {
        // The client rebuilds the same variant from the code, so send only its inner text.
        let message = match e {
            Error::Full(m) | Error::ShardCorrupt(m) => m.clone(),
            _ => e.to_string(),
        };
        Response::Error {
            code: ErrorCode::of(e),
            message,
        }
    }
}

/// Writes a frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame<'_>) -> std::io::Result<()> {
    let len = 1 + f.head.len() + f.tail.len();
    let mut head = Vec::with_capacity(5 + f.head.len());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.push(f.kind);
    head.extend_from_slice(&f.head);
    w.write_all(&head).await?;
    if !f.tail.is_empty() {
        w.write_all(f.tail).await?;
    }
    w.flush().await
}

/// Reads a frame: `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>> {
    read_frame_max(r, MAX_FRAME).await
}

/// Reads a frame of at most `max` bytes (see [`MAX_HANDSHAKE_FRAME`]); the length is checked
/// before the body is allocated.
pub async fn read_frame_max<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<(u8, Vec<u8>)>> {
    let max = max.min(MAX_FRAME);
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("read frame", e)),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > max {
        return Err(Error::Protocol(format!(
            "frame length {len} outside 1..={max}"
        )));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)
        .await
        .map_err(|e| Error::io("read frame", e))?;
    // Read into spare capacity: no zeroing of a megabyte that is overwritten at once; large
    // bodies in a recycled buffer (see `crate::pool::frames`).
    let want = len - 1;
    let mut body = crate::pool::frames().take(want);
    let got = r
        .take(want as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| Error::io("read frame", e))?;
    if got != want {
        return Err(Error::io(
            "read frame",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("frame cut short after {got} of {want} bytes"),
            ),
        ));
    }
    Ok(Some((kind[0], body)))
}

/// The message an owner signs to authenticate to an agent: bound to the agent's challenge and to
/// the TLS session it travels in (`binding`, see [`crate::tls::client_binding`]).
pub fn auth_message(agent_id: &[u8; 16], nonce: &[u8; 32], binding: &[u8; 32]) -> Vec<u8> {
    let mut m = AUTH_CONTEXT.to_vec();
    m.extend_from_slice(agent_id);
    m.extend_from_slice(nonce);
    m.extend_from_slice(binding);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip_req(req: Request) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &req.frame()).await.unwrap();
        let (k, body) = read_frame(&mut &buf[..]).await.unwrap().unwrap();
        assert_eq!(Request::parse(k, body).unwrap(), req);
    }

    #[tokio::test]
    async fn requests_round_trip() {
        let key = ShardKey {
            volume: [1; 16],
            stripe: [2; 32],
            index: 5,
        };
        round_trip_req(Request::PutShard {
            key,
            data: vec![7; 1000],
        })
        .await;
        round_trip_req(Request::GetShard { key }).await;
        round_trip_req(Request::GetRange {
            key,
            offset: 4112,
            len: 4112,
        })
        .await;
        round_trip_req(Request::ConfirmShard {
            key,
            header: vec![9; crate::shard::SHARD_HEADER_LEN],
        })
        .await;
        round_trip_req(Request::PutBlob {
            name: "snap-x".into(),
            data: vec![1, 2],
        })
        .await;
        round_trip_req(Request::ListBlobs {
            prefix: "snap-".into(),
        })
        .await;
        round_trip_req(Request::Sync).await;
        round_trip_req(Request::ListVolumes).await;
        round_trip_req(Request::ListShards {
            volume: [4; 16],
            bucket: 0xab,
        })
        .await;
        round_trip_req(Request::SweepShards {
            min_age: 3600,
            keys: vec![key, ShardKey { index: 1, ..key }],
        })
        .await;
        round_trip_req(Request::SweepShards {
            min_age: 0,
            keys: vec![],
        })
        .await;
        round_trip_req(Request::Scrub { start: true }).await;
        round_trip_req(Request::Scrub { start: false }).await;
        for resp in [
            Response::Ok,
            Response::Data(vec![1, 2, 3]),
            Response::Names(vec!["a".into(), "b".into()]),
            Response::Stat(StoreStat {
                agent_id: [3; 16],
                used: 10,
                quota: 20,
                shards: 2,
                fs_free: Some(1 << 40),
                mac: None,
                broadcast: None,
                keep_awake: None,
            }),
            Response::Stat(StoreStat {
                agent_id: [5; 16],
                used: 1,
                quota: 0,
                shards: 1,
                fs_free: Some(7),
                mac: Some([0x02, 0, 0, 0, 0, 9]),
                broadcast: Some(Ipv4Addr::new(192, 168, 1, 255)),
                keep_awake: None,
            }),
            Response::Stat(StoreStat {
                agent_id: [6; 16],
                used: 1,
                quota: 0,
                shards: 1,
                fs_free: Some(7),
                mac: Some([0x02, 0, 0, 0, 0, 9]),
                broadcast: None,
                keep_awake: None,
            }),
            Response::Stat(StoreStat {
                agent_id: [8; 16],
                used: 1,
                quota: 0,
                shards: 1,
                fs_free: Some(7),
                mac: None,
                broadcast: None,
                keep_awake: Some(std::time::Duration::from_secs(120)),
            }),
            Response::Stat(StoreStat {
                agent_id: [4; 16],
                used: 0,
                quota: 0,
                shards: 0,
                fs_free: None,
                mac: None,
                broadcast: None,
                keep_awake: None,
            }),
            Response::Error {
                code: ErrorCode::Full,
                message: "full".into(),
            },
            Response::Shards(vec![ShardEntry {
                stripe: [9; 32],
                index: 3,
                age: 77,
            }]),
            Response::Shards(vec![]),
            Response::Swept(SweepStats {
                deleted: 4,
                bytes: 4096,
                young: 1,
            }),
            Response::Scrubbed(ScrubStatus::default()),
            Response::Scrubbed(ScrubStatus {
                rate: 20 << 20,
                running: true,
                passes_started: 3,
                passes_done: 2,
                last_done: 1_700_000_000,
                checked: 10,
                bytes: 10 << 20,
                bad_total: 2,
                bad: vec![
                    ScrubFinding {
                        key,
                        restored: false,
                        reason: "payload crc32c mismatch".into(),
                    },
                    ScrubFinding {
                        key: ShardKey { index: 0, ..key },
                        restored: true,
                        reason: String::new(),
                    },
                ],
            }),
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &resp.frame()).await.unwrap();
            let (k, body) = read_frame(&mut &buf[..]).await.unwrap().unwrap();
            assert_eq!(Response::parse(k, body).unwrap(), resp);
        }
    }

    #[test]
    fn stat_answer_is_extensible() {
        let head = |extra: &[u8]| {
            let mut b = [7u8; 16].to_vec();
            for v in [100u64, 1000, 3] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(extra);
            b
        };
        // An older agent: no fs_free.
        let Response::Stat(s) = Response::parse(kind::STAT_REPLY, head(&[])).unwrap() else {
            panic!("not a stat")
        };
        assert_eq!(
            (s.used, s.quota, s.fs_free, s.room()),
            (100, 1000, None, Some(900))
        );
        // A newer agent with a field we do not know yet: skipped.
        let mut extra = 5u64.to_le_bytes().to_vec();
        extra.extend_from_slice(&[9; 12]);
        let Response::Stat(s) = Response::parse(kind::STAT_REPLY, head(&extra)).unwrap() else {
            panic!("not a stat")
        };
        assert_eq!(
            (s.fs_free, s.room()),
            (Some(5), Some(5)),
            "the disk is fuller than the quota"
        );
        let none = StoreStat::default();
        assert_eq!(none.room(), None, "no quota, no filesystem figure: unknown");
    }

    #[tokio::test]
    async fn stat_answer_carries_wake_on_lan_fields() {
        let old = StoreStat {
            agent_id: [7; 16],
            used: 100,
            quota: 1000,
            shards: 3,
            fs_free: Some(5),
            mac: None,
            broadcast: None,
            keep_awake: None,
        };
        let new = StoreStat {
            mac: Some([0x3c, 0x52, 0x82, 0x0a, 0x1b, 0x2c]),
            broadcast: Some(Ipv4Addr::new(10, 1, 2, 255)),
            keep_awake: None,
            ..old.clone()
        };
        let body = |s: &StoreStat| Response::Stat(s.clone()).frame().head;
        // Without them the answer is exactly the previous one; with them it only grows at the
        // end, by 10 bytes, which readers since `fs_free` skip as unknown trailing fields.
        let (short, long) = (body(&old), body(&new));
        assert_eq!(short.len(), 16 + 4 * 8);
        assert_eq!(&long[..short.len()], &short[..]);
        assert_eq!(long.len(), short.len() + 10);
        for s in [&old, &new] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &Response::Stat(s.clone()).frame())
                .await
                .unwrap();
            let (k, b) = read_frame(&mut &buf[..]).await.unwrap().unwrap();
            assert_eq!(Response::parse(k, b).unwrap(), Response::Stat(s.clone()));
        }
        // Zeros mean unknown; fields after them (a newer agent) are skipped.
        let mut zeros = short.clone();
        zeros.extend_from_slice(&[0; 10]);
        zeros.extend_from_slice(&[1; 4]);
        let Response::Stat(s) = Response::parse(kind::STAT_REPLY, zeros).unwrap() else {
            panic!("not a stat")
        };
        assert_eq!((s.mac, s.broadcast), (None, None));
        // No fs_free: nothing else is sent either (the fields are positional).
        let no_free = StoreStat {
            fs_free: None,
            ..new.clone()
        };
        assert_eq!(body(&no_free).len(), 16 + 3 * 8);
        // The keep-awake hold follows them (zeros standing for an unknown MAC), in whole ms.
        let awake = StoreStat {
            keep_awake: Some(std::time::Duration::from_secs(120)),
            ..old.clone()
        };
        let b = body(&awake);
        assert_eq!(b.len(), short.len() + 10 + 8);
        assert_eq!(&b[b.len() - 8..], &120_000u64.to_le_bytes());
        let Response::Stat(s) = Response::parse(kind::STAT_REPLY, b).unwrap() else {
            panic!("not a stat")
        };
        assert_eq!(s, awake);
        // An agent before the field: none.
        let Response::Stat(s) = Response::parse(kind::STAT_REPLY, long.clone()).unwrap() else {
            panic!("not a stat")
        };
        assert_eq!(s.keep_awake, None);
    }

    #[tokio::test]
    async fn malformed_frames_are_errors() {
        // Absurd length.
        let buf = u32::MAX.to_le_bytes();
        assert!(read_frame(&mut &buf[..]).await.is_err());
        // Truncated body.
        let mut buf = 10u32.to_le_bytes().to_vec();
        buf.push(kind::GET_SHARD);
        assert!(read_frame(&mut &buf[..]).await.is_err());
        // Short key.
        assert!(Request::parse(kind::GET_SHARD, vec![1, 2, 3]).is_err());
        assert!(Request::parse(kind::PUT_SHARD, vec![1, 2, 3]).is_err());
        assert!(Request::parse(250, vec![]).is_err());
        // A sweep that claims more keys than it carries, or more than allowed.
        let mut w = Writer::default();
        w.u64(0).u32(2);
        put_key(
            &mut w,
            &ShardKey {
                volume: [1; 16],
                stripe: [2; 32],
                index: 0,
            },
        );
        assert!(Request::parse(kind::SWEEP_SHARDS, w.buf).is_err());
        let mut w = Writer::default();
        w.u64(0).u32(u32::MAX);
        assert!(Request::parse(kind::SWEEP_SHARDS, w.buf).is_err());
        assert!(Response::parse(kind::SHARDS, vec![5, 0, 0, 0, 1]).is_err());
        assert!(Response::parse(kind::SCRUBBED, vec![0; 20]).is_err());
        assert!(Request::parse(kind::SCRUB, vec![]).is_err());
        // A range of nothing, or past the bound, or cut short.
        for (offset, len) in [(0u32, 0u32), (0, MAX_RANGE + 1)] {
            let mut w = Writer::default();
            put_key(
                &mut w,
                &ShardKey {
                    volume: [1; 16],
                    stripe: [2; 32],
                    index: 0,
                },
            );
            w.u32(offset).u32(len);
            assert!(
                Request::parse(kind::GET_RANGE, w.buf).is_err(),
                "{offset} {len}"
            );
        }
        let mut w = Writer::default();
        put_key(
            &mut w,
            &ShardKey {
                volume: [1; 16],
                stripe: [2; 32],
                index: 0,
            },
        );
        w.u32(7);
        assert!(Request::parse(kind::GET_RANGE, w.buf).is_err());
        assert!(Handshake::parse(kind::HELLO, b"NOTMAGIC\x01\x00".to_vec().as_slice()).is_err());
    }

    #[tokio::test]
    async fn handshake_frames_are_small() {
        let hello = Handshake::Hello { version: 1 };
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello.frame()).await.unwrap();
        let (k, body) = read_frame_max(&mut &buf[..], MAX_HANDSHAKE_FRAME)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(Handshake::parse(k, &body).unwrap(), hello);
        // A stranger's 64 MiB "hello" is refused on its length alone.
        let mut big = ((MAX_FRAME) as u32).to_le_bytes().to_vec();
        big.push(kind::HELLO);
        assert!(read_frame_max(&mut &big[..], MAX_HANDSHAKE_FRAME)
            .await
            .is_err());
        assert!(
            read_frame_max(&mut &big[..], usize::MAX).await.is_err(),
            "truncated"
        );
    }
}
