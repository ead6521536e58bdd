//! What a snapshot run reports (`snapshot --json` prints it as is).

use serde::Serialize;

/// What `snapshot --json` prints.
#[derive(Serialize, Debug, Clone)]
pub struct SnapshotReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Stripes in the volume.
    pub stripes: u64,
    /// All-zero stripes (nothing stored).
    pub zero_stripes: u64,
    /// Stripes whose shards were sent.
    pub new_stripes: u64,
    /// Stripes already stored, referenced only.
    pub reused_stripes: u64,
    /// Stripes found stored whole on their agents (left by an interrupted run) and kept.
    pub resumed_stripes: u64,
    /// Bytes of shard files sent.
    pub bytes_sent: u64,
    /// Wall time.
    pub seconds: f64,
    /// When each phase of the run ended, in seconds from its start (for tuning and benchmarks).
    pub phases: Phases,
    /// Agents used.
    pub agents: usize,
    /// Members and addresses that did not answer (placed around), as `address (id…)`.
    pub agents_unreachable: Vec<String>,
    /// k and m.
    pub data_shards: u8,
    /// m.
    pub parity_shards: u8,
    /// The snapshot whose stripes were reused (the previous one of the volume, or --changed-since).
    pub base: Option<String>,
    /// Where the base's manifest came from: `cache` or `agents`.
    pub base_manifest_from: Option<String>,
    /// Stripes not read at all, taken from the base because nothing marked them changed
    /// (`--changed-map`, or a dirty bitmap: see `changes_from`).
    pub unread_stripes: u64,
    /// Stripes not read because the NBD export's `base:allocation` reports them as zeroes.
    pub zero_stripes_unread: u64,
    /// Stripes read from the source.
    pub stripes_read: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// What told which stripes changed since the base: `dirty bitmap NAME` or
    /// `changed map PATH`; None when every stripe was read.
    pub changes_from: Option<String>,
    /// The dirty bitmap recorded as starting at this snapshot's point in time (`--new-bitmap`).
    pub tracking_bitmap: Option<String>,
    /// How the point in time was had: `point-in-time NBD export`, `not mounted read-write`,
    /// `frozen during the read: ...`, `read from LVM snapshot ...`, or `INCONSISTENT: ...`.
    pub consistency: String,
    /// Size of the sealed (compressed, encrypted) manifest, bytes.
    pub manifest_bytes: u64,
    /// Agent losses the snapshot survives as stored (m, unless stored degraded).
    pub margin: i64,
    /// Stored with fewer than k + m agents (`--allow-degraded`).
    pub degraded: bool,
    /// Agents that failed during the run: their part went to the others, and the shards they
    /// took before failing count as absent (the margin shows it; `repair` restores it).
    pub agents_lost: Vec<String>,
    /// Per agent used (address): the room it reported before the run (bytes; None: unknown)
    /// and the shards it was given.
    pub placement: Vec<AgentPlacement>,
    /// Where the source (a block device), or a device built on it, is mounted read-write, as
    /// `MOUNTPOINT (DEVICE)`; see `consistency` for how it was read.
    pub source_mounted_rw: Vec<String>,
    /// Things the operator should know: a dirty bitmap not used (and why), an LVM snapshot
    /// that could not be removed.
    pub warnings: Vec<String>,
}

/// One agent's part in a snapshot (`snapshot --json`).
#[derive(Serialize, Debug, Clone)]
pub struct AgentPlacement {
    /// Address.
    pub addr: String,
    /// Bytes it could take when the run started (`quota - used`, else the filesystem's free
    /// space); None when it did not say.
    pub room: Option<u64>,
    /// New shards planned for it over the volume (if every stripe read were new and non-zero).
    pub planned_shards: u64,
}

/// When each phase of a snapshot ended, in seconds from the start of the run.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Phases {
    /// The source opened and the agents reached (done at once).
    pub reached: f64,
    /// Room, base, changes and zeroes known.
    pub planned: f64,
    /// The lease written on every agent (and the base checked not forgotten).
    pub leased: f64,
    /// The last stripe read from the source (the point in time released).
    pub read: f64,
    /// Every stripe stored.
    pub stored: f64,
    /// The manifest stored on the agents: the commit point.
    pub committed: f64,
}
