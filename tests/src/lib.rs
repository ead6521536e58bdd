//! End-to-end tests for sa-image: real `shard-agent` daemons, real `sa-image` runs, real files
//! and loop devices. Nothing here links the project's crates: the tests drive the binaries the
//! way an operator would, and check what an operator would see (exit codes, messages, `--json`,
//! the bytes that come back, and the files an agent's owner could read).
//!
//! # Tour
//!
//! - [`bins`] finds the binaries: `$SA_BIN_DIR`, else the profile directory of the running test
//!   (`target/<profile>`), else `target/release` beside it. Build them first with
//!   `cargo build --release`.
//! - [`proc`] holds [`proc::Proc`], a child process that is killed and reaped when dropped (also
//!   when a test panics), and [`proc::run`], which runs a command to the end within a deadline.
//! - [`agent`] starts one `shard-agent` on `127.x.y.z:0` in its own directory, reads the
//!   `listening on` line for its port, and can [`agent::Agent::kill`] and
//!   [`agent::Agent::restart`] it on the same address. Its stderr goes to `NAME.log` beside its
//!   directory.
//! - [`cluster`] makes a recovery key (`sa-image keygen`) and `n` agents owned by it, and runs
//!   `sa-image` with that key and those agents: [`cluster::Cluster::sa`].
//! - [`image`] writes test volumes: seeded pseudo-random data, runs of zeros, and a plaintext
//!   marker planted in several places; [`image::sha256`] hashes files and devices.
//! - [`scan`] looks at agents' directories from the outside: shard files, and a raw byte search
//!   (an agent must never hold plaintext).
//! - [`loopdev`] attaches an image to a loop device (root only) and detaches it on drop.
//! - [`nbd_client`] runs standard NBD clients and a random workload checked against a model.
//! - [`serve`] runs `sa-image serve` and reads its address and `--json` report.
//! - [`pki`] makes a test CA and server and client certificates for NBD over TLS.
//! - [`wait`] polls a condition until a deadline: no test waits with a fixed sleep.
//! - [`daemon`] runs `sa-image daemon` and the real programs around it: Python helpers in
//!   `tests/py` (an HTTP receiver for webhooks, an aiosmtpd SMTP server requiring STARTTLS,
//!   prometheus_client's parser, urllib), and headless Chromium (screenshot and DOM).
//! - [`debian`] finds the built `.deb` packages and installs them for one test (`dpkg -i`),
//!   purging them and removing what they made when the test ends, also on a panic.
//! - [`fs`] mounts an ext4 on a loop device and runs a writer in it (root only); both thaw the
//!   filesystem first when dropped, so a test failing while it is frozen never hangs.
//! - [`qemu_nbd`] serves a raw or qcow2 image with `qemu-nbd` (a dirty bitmap with `--bitmap`),
//!   and reads an export's block-status map with `nbdinfo`.
//! - [`garage`] runs a three-node Garage cluster (S3, replication 3) on loopback addresses with a
//!   bucket and a key, for the offsite tier; the AWS CLI lists what the bucket holds.
//! - [`netns`] runs an agent inside a network namespace joined by a veth pair, so a test can cut
//!   it off the network without killing it, or slow its link down (root only; removed on drop).
//! - [`wine`] runs Windows agents: `shard-agent` built for `x86_64-pc-windows-gnu` (once per
//!   test process) and started under Wine in a prefix of the test's own
//!   ([`agent::Agent::start_with`] a [`agent::Launcher`]); `bcryptprimitives.dll` from
//!   `tests/wine/bcryptprimitives.c` makes Rust's std run on Wine 8.
//!
//! # The tests
//!
//! - `tests/backbone.rs`: two agents lost and a restore from one address; damaged shards
//!   (verify exit 2, then exit 3 and a failing restore once more than m are gone); a loop device
//!   as the source; no plaintext on agents; `list` with one agent left, `latest`, id prefixes;
//!   a config file in place of flags.
//! - `tests/bad_input.rs`: missing, unreadable and odd-sized sources; too few agents; an agent
//!   down or full; a wrong key and a stranger's agents; garbage on the agent port; a snapshot
//!   killed midway; restore targets too small or too large; unknown ids; no agent reachable.
//! - `tests/keys.rs`: passphrase-wrapped key files (`--passphrase-file`, a piped passphrase, a
//!   wrong one), a snapshot and restore with one, `key import` of the recovery text, and key or
//!   passphrase files that others may read refused with `chmod 600`.
//! - `tests/targets_and_layouts.rs`: restores over junk (file and block device), incremental
//!   snapshots, k=2 m=1 on four agents, a wiped agent, a damaged catalog copy.
//! - `tests/identity.rs`: agents speak TLS 1.3 only (`openssl s_client` sees it; plain TCP and
//!   garbage inside TLS are dropped); an agent showing a changed identity key is refused until
//!   `agents accept`; a flood of hostile connections leaves the agent serving in bounded memory;
//!   `agents add`/`list`/`retire` and snapshots using every member of the agent book.
//! - `tests/health.rs`: an agent lost for good and repaired; bit rot scrubbed and repaired.
//! - `tests/serve.rs`, `tests/serve_tls.rs`, `tests/hydrate.rs`: the NBD export (plain and
//!   TLS) read by real NBD clients, and live restore.
//! - `tests/consistent.rs`: a source mounted read-write refused without a method; `--freeze`
//!   under a writer (clean `e2fsck -fn`, the writer goes on), thawed after a SIGKILL of the
//!   snapshot and past `--freeze-timeout`; hooks; an NBD export's dirty bitmap making an
//!   incremental read exactly the changed stripes, and refused when it is not the previous
//!   snapshot's; `--lvm-snapshot` where device-mapper exists (skipped, with the reason, where not).
//! - `tests/placement.rs`: placement by free space (an agent at its quota gets nothing, a
//!   nearly full one little, a fleet too small is refused up front), an agent cut off the
//!   network mid-snapshot, `--allow-degraded` and `repair` spreading its doubled shards, and
//!   `repair --watch` waiting `--repair-after` before rebuilding around a missing agent.
//! - `tests/daemon.rs`: `sa-image daemon` over 6 agents: scheduled snapshots, prune, hooks,
//!   healthchecks pings, alerts by webhook and e-mail (STARTTLS) and their resolution around an
//!   agent kill, kill -9 and restart with an exact job journal; `/metrics` read by
//!   prometheus_client, the page in headless Chromium, the login token over HTTPS, systemd
//!   readiness and SIGHUP; `status --max-age/--max-absence`.
//!
//! - `tests/agent_cli.rs`: `--listen HOST` means port 7710; a second agent on a directory in use
//!   is refused; the agent's errors (`error: ...`, exit 1) and usage errors (exit 64).
//! - `tests/good_citizen.rs`: low CPU and I/O priority by default, `--max-rate`, and the floor of
//!   free space (`--min-free`) on a small tmpfs (root): less placed near it, shards refused at it.
//! - `tests/windows_agent.rs`: Windows builds of the agent under Wine serving a snapshot and a
//!   restore beside Linux agents (one of them running PowerShell to keep its PC awake, which
//!   Wine's stub declines), their directory lock, and `service install`/`uninstall`.
//! - `tests/keep_awake.rs`: `--keep-awake` against a real systemd-logind on a private system
//!   bus: the lock from a request until the hold after it, never outliving a killed agent, and
//!   held through a snapshot's quiet pre-hook by the engine's keepalive (root on Linux).
//! - `tests/stall.rs`: a PC cut off the network without a reset in the middle of a snapshot, a
//!   restore and a serving read (nbdcopy) costs each a few seconds, not the request timeout
//!   (root: namespaces, tc).
//! - `tests/offsite.rs`: the offsite tier against a real three-node Garage cluster: restore and
//!   serve from the bucket alone (agents deleted, then a Garage node killed), a wrong secret and
//!   a dead endpoint caught up by the next push (around a dead agent), restore, verify and repair
//!   completing what more than m lost agents took from the bucket, `offsite gc` and `prune` on
//!   the bucket (also racing a slowed push), and the daemon pushing after each snapshot.
//! - `tests/packages.rs`: the Debian packages installed, their units verified, the installed
//!   binaries, man pages, completions and example configs used, `dpkg -r` keeping the shards
//!   (root on Debian, after `packaging/debian/build.sh`).
//!
//! Run them with `cargo build --release && cargo test -p sa-tests` (or set `SA_BIN_DIR`).
//! Tests that need loop devices skip themselves unless run as root.
//!
//! # Parallel safety
//!
//! Each agent gets its own loopback address (`127.A.B.C`, where `A` comes from the test process id
//! and `B.C` from a counter), binds port 0, and owns a fresh temporary directory. Tests therefore
//! run concurrently, in one process (threads) or many (one per test).

pub mod agent;
pub mod bins;
pub mod cluster;
pub mod daemon;
pub mod debian;
pub mod fs;
pub mod garage;
pub mod image;
pub mod loopdev;
pub mod nbd_client;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod qemu_nbd;
pub mod scan;
pub mod serve;
pub mod wait;
pub mod wine;

pub use agent::Agent;
pub use cluster::{json, Cluster, Key};
pub use image::{sha256, ImageSpec};
pub use serve::Serve;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// The default stripe size of `sa-image` (4 MiB).
pub const STRIPE: u64 = 4 * MIB;

/// P(at least `k` of `n` independent agents up, each with `p`): the closed form.
pub fn binomial_at_least(n: u32, k: u32, p: f64) -> f64 {
    let choose = |n: u32, r: u32| -> f64 {
        (0..r)
            .map(|i| f64::from(n - i) / f64::from(i + 1))
            .product()
    };
    (k..=n)
        .map(|j| choose(n, j) * p.powi(j as i32) * (1.0 - p).powi((n - j) as i32))
        .sum()
}
