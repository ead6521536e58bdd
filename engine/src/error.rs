//! The engine's typed errors.
//!
//! Every operation returns [`Error`]: a caller (the CLI, the daemon, a test) can match on what
//! went wrong (too few agents, no such snapshot, stripes lost with their list) and decide what to
//! print, which exit code to give, or whether to alert. Messages are written for the person who
//! reads them: they say what is wrong and what to do, and name the user's paths and agents, never
//! temporary files.

use std::fmt;

/// Result alias of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an engine operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failure of the formats, crypto or stores below (a wrong key, an agent error, ...).
    #[error(transparent)]
    Core(#[from] sa_core::Error),
    /// A local file or device operation failed. The OS error is part of the message and
    /// deliberately not a `source()`, so a report that prints the chain does not repeat it.
    #[error("{what}: {err}")]
    Io {
        /// What we were doing, naming the user's path.
        what: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// An NBD export (a snapshot source) could not be opened or read.
    #[error("{what}: {err}")]
    Nbd {
        /// What we were doing, naming the URI.
        what: String,
        /// The client's error.
        err: nbd_server::client::ClientError,
    },
    /// A snapshot source is mounted read-write and no way to read it consistently was chosen.
    #[error(
        "{source_name} is mounted read-write ({}): stripes read at different moments of a disk in \
         use do not form one consistent image. Choose how to get a point in time: --freeze \
         MOUNTPOINT (freeze each of those filesystems during the read), --lvm-snapshot (read a \
         temporary LVM snapshot of it), or, for a VM disk, snapshot the hypervisor's \
         point-in-time NBD export (nbd://...); or accept an image that may need fsck with \
         --inconsistent-ok",
        mounts.join(", ")
    )]
    SourceInUse {
        /// The source.
        source_name: String,
        /// Where it (or a partition or device built on it) is mounted read-write, as
        /// `MOUNTPOINT (DEVICE)`.
        mounts: Vec<String>,
    },
    /// A pre or post hook failed; the snapshot was not committed.
    #[error("the {phase}-hook `{command}` {why}; nothing was committed")]
    Hook {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        command: String,
        /// What went wrong (exit status and the end of its output, or the timeout).
        why: String,
    },
    /// Freezing a filesystem or making an LVM snapshot failed, or the freeze did not last the
    /// read.
    #[error("{0}")]
    Consistency(String),
    /// No agent given (or in the book) could be used; per address, why.
    #[error("{0}")]
    NoAgent(NoAgent),
    /// Fewer agents answer than the operation needs.
    #[error(
        "{what}: {reachable} agent(s) answer but {needed} are needed{}{}",
        if down.is_empty() { String::new() } else { format!(" (not answering: {})", down.join(", ")) },
        if hint.is_empty() { String::new() } else { format!("; {hint}") }
    )]
    TooFewAgents {
        /// What could not be done.
        what: String,
        /// Agents that answered.
        reachable: usize,
        /// Agents needed.
        needed: usize,
        /// The members that did not answer, as `address (id…)`.
        down: Vec<String>,
        /// What to do about it.
        hint: String,
    },
    /// Members woken by Wake-on-LAN did not answer within the wait, and the operation cannot
    /// go on without them.
    #[error(
        "{} agent(s) did not wake within {}: {}. Switch these PCs on, or check that \
         Wake-on-LAN is enabled in their firmware and network settings (and that this machine \
         is on their subnet, or its router forwards directed broadcasts); or wait longer with \
         --wake-wait",
        asleep.len(),
        sa_core::duration::format_span(waited.as_secs()),
        asleep.join(", ")
    )]
    Asleep {
        /// How long was waited.
        waited: std::time::Duration,
        /// The members that did not answer, as `address (id…)`.
        asleep: Vec<String>,
    },
    /// The agents do not have the room the operation needs.
    #[error("{0}")]
    NoRoom(String),
    /// No snapshot matches the id or prefix given.
    #[error("no snapshot '{0}' in the catalog (see `sa-image list`)")]
    NoSuchSnapshot(String),
    /// A snapshot id prefix matches several snapshots.
    #[error("'{prefix}' matches {count} snapshots: give more of the id")]
    AmbiguousSnapshot {
        /// The prefix given.
        prefix: String,
        /// How many it matches.
        count: usize,
    },
    /// `latest` was asked for while the catalog holds several volumes and none was named.
    #[error(
        "`latest` is ambiguous: the catalog holds {} volumes ({}); give --volume NAME",
        volumes.len(),
        volumes.join(", ")
    )]
    VolumeNeeded {
        /// The volumes in the catalog.
        volumes: Vec<String>,
    },
    /// The volume named holds no snapshot.
    #[error(
        "no snapshot of volume '{volume}' in the catalog{}",
        if known.is_empty() { String::new() } else { format!(" (volumes: {})", known.join(", ")) }
    )]
    NoSuchVolume {
        /// The volume asked for.
        volume: String,
        /// The volumes the catalog holds.
        known: Vec<String>,
    },
    /// The catalog holds no snapshot at all.
    #[error("the catalog holds no snapshot yet: take one with `sa-image snapshot`")]
    EmptyCatalog,
    /// Some stripes cannot be rebuilt: more than m of their shards are gone.
    #[error("{0}")]
    StripesLost(StripesLost),
    /// A restore target exists and holds data.
    #[error(
        "{0} exists and is not empty: restore would overwrite it; give --force to replace it, or \
         another --to"
    )]
    TargetExists(String),
    /// A restore target (or snapshot source) is in use: mounted, or held open by another program.
    #[error("{path} is in use ({why}): {hint}")]
    DeviceBusy {
        /// The device.
        path: String,
        /// What holds it.
        why: String,
        /// What to do.
        hint: String,
    },
    /// The source changed under a running snapshot in a way that cannot be committed.
    #[error(
        "stripe {stripe} changed while the snapshot ran (a disk in use?); nothing was committed: \
         snapshot a consistent view (a stopped or frozen filesystem, an LVM or VM snapshot)"
    )]
    SourceChanged {
        /// The stripe that changed.
        stripe: u64,
    },
    /// The caller's shutdown future fired.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// Invalid options or inputs, with what to give instead.
    #[error("{0}")]
    Invalid(String),
    /// An operation failed midway for a reason told in the message; what was committed (usually
    /// nothing) is said there too.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// Wraps an io error with what we were doing.
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            err,
        }
    }

    /// Wraps an NBD client error with what we were doing.
    pub fn nbd(what: impl Into<String>, err: nbd_server::client::ClientError) -> Self {
        Error::Nbd {
            what: what.into(),
            err,
        }
    }

    /// An invalid input.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// An operation that failed midway.
    pub fn failed(msg: impl Into<String>) -> Self {
        Error::Failed(msg.into())
    }

    /// True when the error says data cannot be recovered right now (stripes lost).
    pub fn is_data_lost(&self) -> bool {
        matches!(self, Error::StripesLost(_))
    }
}

/// `map_err` for io results: `file.read(..).ctx(|| format!("cannot read {}", p.display()))`.
pub trait IoContext<T> {
    /// Attaches what we were doing to an io error.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// Why no agent could be used: per address tried, the failure.
#[derive(Debug)]
pub struct NoAgent {
    /// Address and error, per attempt.
    pub attempts: Vec<(String, String)>,
    /// Some agent refused this owner key.
    pub refused: bool,
    /// Some agent showed another identity than its pinned one.
    pub identity_changed: bool,
}

impl fmt::Display for NoAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no agent could be used:")?;
        for (a, e) in &self.attempts {
            write!(f, "\n  {a}: {e}")?;
        }
        if self.attempts.is_empty() {
            write!(f, " no address was given and the agent book names none")?;
        }
        if self.identity_changed {
            write!(
                f,
                "\nan agent showed another identity than the one pinned for it: see above"
            )
        } else if self.refused {
            write!(
                f,
                "\nthe agents refused this key: is it the key these backups were made with? \
                 (`sa-image owner-id --key KEYFILE` must print the id the agents were started with)"
            )
        } else {
            write!(f, "\nare the agents running, and are the addresses right?")
        }
    }
}

/// Stripes that cannot be rebuilt, with what was wrong with each.
#[derive(Debug)]
pub struct StripesLost {
    /// How many stripes are lost.
    pub count: u64,
    /// Stripes in the snapshot.
    pub total: u64,
    /// Parity shards per stripe.
    pub m: u8,
    /// The first lost stripes (up to 10): index, byte range, and what failed.
    pub shown: Vec<LostStripe>,
    /// Agents that did not answer, as `address (id…)`.
    pub agents_down: Vec<String>,
    /// What the target holds now (`no target file was left behind`, ...), if a target was written.
    pub target_note: Option<String>,
}

/// One lost stripe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostStripe {
    /// Stripe index.
    pub stripe: u64,
    /// First byte.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// The final error.
    pub error: String,
    /// The shards that failed: `shard 2 on 127.0.0.3:7710 (1a2b…) Unreachable`.
    pub shards: Vec<String>,
}

impl fmt::Display for StripesLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} stripes cannot be recovered: more than m={} shards of each are lost{}.",
            self.count,
            self.total,
            self.m,
            if self.count as usize > self.shown.len() {
                format!(" (first {} shown)", self.shown.len())
            } else {
                String::new()
            }
        )?;
        for l in &self.shown {
            write!(
                f,
                "\n  stripe {} (bytes {}..{}): {} [{}]",
                l.stripe,
                l.offset,
                l.offset + l.len,
                l.error,
                l.shards.join(", ")
            )?;
        }
        if self.agents_down.is_empty() {
            write!(f, "\nEvery agent of the snapshot answered: the missing shards are gone (deleted or corrupt); an older snapshot may still hold these stripes")?;
        } else {
            write!(
                f,
                "\nBring back the agents that are down ({}) and run it again",
                self.agents_down.join(", ")
            )?;
        }
        if let Some(n) = &self.target_note {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}
