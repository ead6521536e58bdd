//! Typed errors of sa-core.
//!
//! Library functions return [`Error`]; binaries wrap it in `anyhow` and print it with the fix.
//! Variants name what went wrong so that a reader can reconstruct around a bad shard
//! ([`Error::ShardMissing`], [`Error::ShardCorrupt`], [`Error::AgentUnreachable`]) instead of
//! giving up.

use std::io;

/// Result alias for sa-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sa-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local file or directory operation failed. The OS error is part of the message and
    /// deliberately not a `source()`: a report that prints the chain (`{:#}`) would repeat it.
    #[error("{what}: {err}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        err: io::Error,
    },
    /// A shard is not stored where the manifest says it is.
    #[error("shard not found")]
    ShardMissing,
    /// A shard exists but fails its checks (header, crc32c, identity).
    #[error("corrupt shard: {0}")]
    ShardCorrupt(String),
    /// A stored object (manifest, blob) does not parse.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which kind of object.
        what: &'static str,
        /// Why it was rejected.
        why: String,
    },
    /// An object was written by a newer (or unknown) format version.
    #[error(
        "{what} has format version {found}, this build reads version {supported}; upgrade sa-image"
    )]
    UnsupportedVersion {
        /// Which kind of object.
        what: &'static str,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// Authenticated decryption failed: wrong key, or tampered data.
    #[error("authentication failed for {0}: wrong key, or the data was altered")]
    AuthFailed(String),
    /// Too few shards of a stripe survive to rebuild it.
    #[error("not enough shards: {have} usable of the {need} needed")]
    NotEnoughShards {
        /// Usable shards.
        have: usize,
        /// Shards needed (k).
        need: usize,
    },
    /// A store ran out of space (agent quota or disk).
    #[error("store is full: {0}")]
    Full(String),
    /// The agent could not be reached.
    #[error("agent {addr} unreachable: {why}")]
    AgentUnreachable {
        /// Address tried.
        addr: String,
        /// Why the connection failed.
        why: String,
    },
    /// The agent that holds the shard could not be reached when this run started.
    #[error("its agent is down (unreachable since this run started)")]
    AgentDown,
    /// The agent refused us (authentication).
    #[error("agent {addr} refused access: {why}")]
    Refused {
        /// Address of the agent.
        addr: String,
        /// The agent's reason.
        why: String,
    },
    /// An agent shows another identity key than the one pinned for its id: another machine
    /// may pose as it.
    #[error(
        "agent {id} at {addr} shows identity key {presented} but {pinned} is pinned for it: another \
         machine may be posing as that agent, so it is not used. If its identity key was replaced \
         on purpose (its directory restored without identity.key, say), accept the new one with \
         `sa-image agents accept {id} --agents {addr}`"
    )]
    IdentityChanged {
        /// Address of the agent.
        addr: String,
        /// Its agent id (hex).
        id: String,
        /// The pinned key (hex).
        pinned: String,
        /// The key it showed (hex).
        presented: String,
    },
    /// A different agent answers at the address the agent book records for a member: a PC
    /// reinstalled (a fresh shard directory), or another machine that took its address.
    #[error(
        "at {addr} answers agent {id}, not {member}, the member the agent book has at that address \
         (a reinstalled PC, or another machine on its address?); it is not used. To use it as a new \
         agent run `sa-image agents add {addr}`; the old member stays listed as down until it is \
         back or `sa-image agents retire {member}`"
    )]
    Stranger {
        /// The address.
        addr: String,
        /// The id of the agent that answers there (hex).
        id: String,
        /// The id of the member the book has there (hex).
        member: String,
    },
    /// The agent was retired from this owner's agent book.
    #[error(
        "agent {id} at {addr} was retired (`sa-image agents retire`) and is not used; to use it \
         again run `sa-image agents add {addr}`"
    )]
    Retired {
        /// Address of the agent.
        addr: String,
        /// Its agent id (hex).
        id: String,
    },
    /// The peer broke the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The agent reported an error of its own.
    #[error("agent error: {0}")]
    Remote(String),
    /// The offsite object store failed a request (its words, and which store).
    #[error("{0}")]
    Offsite(String),
    /// Invalid parameters (layout, sizes, key text).
    #[error("{0}")]
    Invalid(String),
    /// A store directory is held by another process (another agent on the same directory).
    #[error(
        "{path} is in use by another process (it holds {lock}): stop the shard-agent that uses \
         it, or give this one another directory"
    )]
    InUse {
        /// The directory.
        path: String,
        /// Its lock file.
        lock: String,
    },
    /// A key file that group or others may read: the key decrypts every backup.
    #[error(
        "key file {path} may be read by other users (mode {mode:03o}); refusing to use it: run `chmod 600 {path}`"
    )]
    InsecureKeyFile {
        /// The key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file is wrapped under a passphrase and none was given.
    #[error("key file {0} is protected by a passphrase: give --passphrase-file FILE, or run on a terminal to be asked for it")]
    PassphraseNeeded(String),
    /// The passphrase does not unwrap the key file (or the file was altered).
    #[error("wrong passphrase for the key file (or the file was altered)")]
    WrongPassphrase,
}

impl Error {
    /// Wraps an io error with what we were doing.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            err: source,
        }
    }

    /// A short helper for malformed objects.
    pub fn malformed(what: &'static str, why: impl Into<String>) -> Self {
        Error::Malformed {
            what,
            why: why.into(),
        }
    }

    /// True when the failure is about this one shard (missing, corrupt, agent gone), so
    /// a reader should treat the shard as missing and reconstruct around it.
    pub fn is_shard_loss(&self) -> bool {
        !matches!(
            self,
            Error::Invalid(_)
                | Error::UnsupportedVersion { .. }
                | Error::InsecureKeyFile { .. }
                | Error::InUse { .. }
                | Error::PassphraseNeeded(_)
                | Error::WrongPassphrase
        )
    }
}
