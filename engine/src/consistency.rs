//! Consistency: reading a disk in use as one point in time.
//!
//! A snapshot of a disk that is being written reads its stripes at different moments: the image
//! is one that no single moment had (a filesystem needing fsck, a database with torn pages). So
//! a snapshot never reads a source mounted read-write (the device, one of its partitions, or a
//! device built on it: [`crate::volume::in_use`]) without one of these ([`plan`]):
//!
//! - **A point-in-time NBD export** (`nbd://`, `nbd+unix://`): a VM disk as QEMU exports a
//!   `blockdev-backup` target or snapshot node, or `qemu-nbd` serves a snapshot. The hypervisor
//!   made the point in time; nothing to do here.
//! - **`--freeze MOUNTPOINT`** (each read-write filesystem of the source): `fsfreeze` before the
//!   read, thaw as soon as the last stripe is read (before the upload ends). Writers block
//!   meanwhile, so it suits short reads; a [`guard`] process thaws on every exit path, SIGKILL of
//!   the snapshot included, and after `--freeze-timeout` at the latest (the snapshot then fails).
//!   Nothing sa-image writes may live on a filesystem it freezes: its log (stderr), `--json`
//!   output and manifest cache would block, and the read with them, until the timeout thaws it.
//! - **`--lvm-snapshot`**: the source is an LVM LV; a snapshot LV is created, read and removed
//!   ([`lvm`], also guarded). Writers are held only while `lvcreate` runs.
//! - **`--inconsistent-ok`**: read it anyway; the report says the image is not consistent.
//!
//! Around the point in time, per volume, the admin's [`hooks`]: the pre-hook before it is taken
//! (flush and lock a database), the post-hook once it is over (after the thaw; for LVM right
//! after `lvcreate`), also when the read failed. A failing hook fails the snapshot.

pub mod guard;
pub mod hooks;
pub mod lvm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::source::Source;
use crate::volume::in_use::RwMount;
use guard::{Guard, GuardCommand, GuardTask};
use hooks::{run_hook, HookEnv};

/// Longest a filesystem stays frozen unless told otherwise.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a hook may run unless told otherwise.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `lvcreate` may take.
const LVM_CREATE_WAIT: Duration = Duration::from_secs(300);

/// How to get a consistent point in time of a source in use (see the module docs).
#[derive(Debug, Clone)]
pub struct ConsistencyOptions {
    /// Mount points to freeze during the read: every read-write filesystem of the source.
    pub freeze: Vec<PathBuf>,
    /// Longest a freeze may last; past it the filesystem is thawed and the snapshot fails.
    pub freeze_timeout: Duration,
    /// Read a temporary LVM snapshot of the source (an LV).
    pub lvm_snapshot: bool,
    /// Room of a thick LV's snapshot (`lvcreate --extents`/`--size`; default `10%ORIGIN`).
    pub lvm_snapshot_size: Option<String>,
    /// Shell command run before the point in time is taken.
    pub pre_hook: Option<String>,
    /// Shell command run once it is over.
    pub post_hook: Option<String>,
    /// Longest a hook may run.
    pub hook_timeout: Duration,
    /// Read a source in use without any of the above.
    pub inconsistent_ok: bool,
    /// How to start a guard process (the running binary's hidden guard command); needed by
    /// `freeze` and `lvm_snapshot`.
    pub guard: Option<GuardCommand>,
}

impl Default for ConsistencyOptions {
    fn default() -> Self {
        ConsistencyOptions {
            freeze: Vec::new(),
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT,
            lvm_snapshot: false,
            lvm_snapshot_size: None,
            pre_hook: None,
            post_hook: None,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            inconsistent_ok: false,
            guard: None,
        }
    }
}

/// How a run gets its point in time.
#[derive(Debug, Clone)]
pub enum Method {
    /// An NBD export: the hypervisor's point in time.
    Export,
    /// Not mounted read-write (an image file, an idle device): read as it is.
    NotInUse,
    /// These filesystems are frozen during the read.
    Freeze(Vec<PathBuf>),
    /// A temporary LVM snapshot of this LV is read.
    Lvm(lvm::Origin),
    /// Mounted read-write and read anyway (`--inconsistent-ok`).
    Inconsistent(Vec<RwMount>),
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |v: Vec<String>| v.join(", ");
        match self {
            Method::Export => write!(f, "point-in-time NBD export"),
            Method::NotInUse => write!(f, "not mounted read-write"),
            Method::Freeze(m) => write!(
                f,
                "frozen during the read: {}",
                join(m.iter().map(|p| p.display().to_string()).collect())
            ),
            Method::Lvm(o) => write!(
                f,
                "read from LVM snapshot {}/{} of {}",
                o.vg,
                o.snapshot_name(),
                o.full_name()
            ),
            Method::Inconsistent(m) => write!(
                f,
                "INCONSISTENT: read while mounted read-write on {} (--inconsistent-ok)",
                join(m.iter().map(ToString::to_string).collect())
            ),
        }
    }
}

/// Decides how this run gets its point in time, before anything is stored: refuses a source
/// in use without a method, options that do not fit the source, and `--freeze` of a mount
/// point that is not one of the source's.
pub async fn plan(
    opts: &ConsistencyOptions,
    source: &Path,
    nbd: bool,
    mounted_rw: &[RwMount],
) -> Result<Method> {
    let shown = source.display();
    if nbd && (opts.lvm_snapshot || !opts.freeze.is_empty()) {
        return Err(Error::invalid(format!(
            "--freeze and --lvm-snapshot work on a local block device; {shown} is an NBD export, \
             read as it is: export a point-in-time view of the disk (a blockdev-backup target or \
             a snapshot node, qemu-nbd on a snapshot)"
        )));
    }
    if opts.lvm_snapshot && !opts.freeze.is_empty() {
        return Err(Error::invalid(
            "choose one of --freeze and --lvm-snapshot: creating the LVM snapshot already holds \
             writes for a moment",
        ));
    }
    if (opts.lvm_snapshot || !opts.freeze.is_empty()) && opts.guard.is_none() {
        return Err(Error::invalid(
            "--freeze and --lvm-snapshot need a guard process (ConsistencyOptions::guard)",
        ));
    }
    if opts.freeze_timeout.is_zero() || opts.hook_timeout.is_zero() {
        return Err(Error::invalid(
            "--freeze-timeout and --hook-timeout must be more than 0",
        ));
    }
    if opts.lvm_snapshot {
        return Ok(Method::Lvm(lvm::resolve(source).await?));
    }
    if nbd {
        return Ok(Method::Export);
    }
    if !opts.freeze.is_empty() {
        return plan_freeze(opts, source, mounted_rw);
    }
    if mounted_rw.is_empty() {
        return Ok(Method::NotInUse);
    }
    if opts.inconsistent_ok {
        return Ok(Method::Inconsistent(mounted_rw.to_vec()));
    }
    Err(Error::SourceInUse {
        source_name: shown.to_string(),
        mounts: mounted_rw.iter().map(ToString::to_string).collect(),
    })
}

/// `--freeze`: every mount point given must be a read-write mount of the source, and every
/// read-write mount of the source must be given.
fn plan_freeze(opts: &ConsistencyOptions, source: &Path, mounted_rw: &[RwMount]) -> Result<Method> {
    let shown = source.display();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut frozen = Vec::new();
    for p in &opts.freeze {
        let c = std::fs::canonicalize(p)
            .map_err(|e| Error::invalid(format!("--freeze {}: {e}", p.display())))?;
        if !mounted_rw.iter().any(|m| canon(&m.mountpoint) == c) {
            let mounts: Vec<String> = mounted_rw.iter().map(ToString::to_string).collect();
            return Err(Error::invalid(format!(
                "--freeze {}: no filesystem of {shown} is mounted read-write there ({shown} is \
                 mounted read-write on: {}); give the mount points of the source's filesystems",
                p.display(),
                if mounts.is_empty() {
                    "nothing".to_string()
                } else {
                    mounts.join(", ")
                }
            )));
        }
        if !frozen.contains(&c) {
            frozen.push(c);
        }
    }
    let left: Vec<String> = mounted_rw
        .iter()
        .filter(|m| !frozen.contains(&canon(&m.mountpoint)))
        .map(ToString::to_string)
        .collect();
    if !left.is_empty() && !opts.inconsistent_ok {
        return Err(Error::SourceInUse {
            source_name: format!("{shown} (not frozen)"),
            mounts: left,
        });
    }
    Ok(Method::Freeze(frozen))
}

/// A point in time being held: the guards to release and the post-hook still due.
pub struct Point {
    freezes: Vec<Guard>,
    lvm: Option<Guard>,
    post_hook_due: bool,
    opts: ConsistencyOptions,
    env: HookEnv,
    /// For LVM: the snapshot LV, to read instead of the source.
    pub source: Option<Arc<Source>>,
}

/// Takes the point in time: the pre-hook, then the freezes or the LVM snapshot (whose device is
/// opened as [`Point::source`], and which must be `size` bytes). On failure everything taken is
/// undone (and the post-hook run) before the error returns.
pub async fn take(
    opts: &ConsistencyOptions,
    method: &Method,
    env: HookEnv,
    size: u64,
) -> Result<Point> {
    if let Some(cmd) = &opts.pre_hook {
        run_hook("pre", cmd, opts.hook_timeout, &env, None).await?;
    }
    let mut point = Point {
        freezes: Vec::new(),
        lvm: None,
        post_hook_due: opts.post_hook.is_some(),
        opts: opts.clone(),
        env,
        source: None,
    };
    let guard_cmd = opts.guard.clone();
    let taken = async {
        match (method, &guard_cmd) {
            (Method::Freeze(mounts), Some(g)) => {
                for m in mounts {
                    let task = GuardTask::Freeze {
                        mountpoint: m.clone(),
                        max: opts.freeze_timeout,
                    };
                    let (guard, _) = Guard::start(g, task, opts.freeze_timeout).await?;
                    tracing::info!("froze {}", m.display());
                    point.freezes.push(guard);
                }
            }
            (Method::Lvm(origin), Some(g)) => {
                let task = GuardTask::Lvm {
                    origin: origin.full_name(),
                    name: origin.snapshot_name(),
                    size: if origin.thin {
                        "thin".into()
                    } else {
                        opts.lvm_snapshot_size
                            .clone()
                            .unwrap_or_else(|| lvm::DEFAULT_SNAPSHOT_SIZE.into())
                    },
                };
                let (guard, device) = Guard::start(g, task, LVM_CREATE_WAIT).await?;
                point.lvm = Some(guard);
                let vol = crate::volume::open_source(Path::new(&device))?;
                if vol.size != size {
                    return Err(Error::Consistency(format!(
                        "the LVM snapshot {device} holds {} bytes, its origin {size}",
                        vol.size
                    )));
                }
                point.source = Some(Arc::new(Source::new(vol)));
                // The point in time is taken: the application may go on.
                point.post_hook_due = false;
                if let Some(cmd) = &opts.post_hook {
                    run_hook("post", cmd, opts.hook_timeout, &point.env, Some(true)).await?;
                }
            }
            _ => {}
        }
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = taken {
        let _ = point.after_read(false).await;
        let _ = point.finish().await;
        return Err(e);
    }
    Ok(point)
}

impl Point {
    /// The read is over (`read_ok`: every stripe was read): thaw, then the post-hook if still
    /// due. Every step runs; the first failure is returned (the snapshot must then not commit).
    pub async fn after_read(&mut self, read_ok: bool) -> Result<()> {
        let mut first: Option<Error> = None;
        while let Some(g) = self.freezes.pop() {
            let what = g.task().describe();
            match g.release().await {
                Ok(()) => tracing::info!("thawed: {what}"),
                Err(e) => {
                    tracing::error!("{e}");
                    first.get_or_insert(e);
                }
            }
        }
        if std::mem::take(&mut self.post_hook_due) {
            if let Some(cmd) = &self.opts.post_hook {
                let ok = read_ok && first.is_none();
                if let Err(e) =
                    run_hook("post", cmd, self.opts.hook_timeout, &self.env, Some(ok)).await
                {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The run is over: removes the LVM snapshot (every reader of [`Point::source`] must be gone:
    /// an open LV cannot be removed).
    pub async fn finish(mut self) -> Result<()> {
        self.source = None;
        match self.lvm.take() {
            Some(g) => g.release().await,
            None => Ok(()),
        }
    }
}
