//! A rig for engine tests: real agent servers in this process (`LocalAgent`, port 0), a key,
//! a manual clock, sample images, and a look at the agents' directories from the outside.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sa_core::keys::{hex, Keys, MasterKey};
use sa_core::manifest::{Manifest, StripeRef};
use sa_core::store::ClientOptions;
use sa_engine::clock::ManualClock;
use sa_engine::fleet::{Access, Fleet, FleetOptions};
use sa_engine::local::LocalAgent;
use sa_engine::progress::NoProgress;
use sa_engine::shutdown::Shutdown;
use sa_engine::snapshot::{snapshot, SnapshotOptions, SnapshotReport};

/// 2026-11-02 00:00 UTC, a Monday: where the manual clock starts.
pub const T0_MS: u64 = 1_793_577_600_000;
/// A day in ms.
pub const DAY_MS: u64 = 86_400_000;

/// Agents, a key and a clock in a temporary directory.
pub struct Rig {
    /// The agents (dropped before the directory).
    pub agents: Vec<LocalAgent>,
    /// The owner's keys.
    pub keys: Arc<Keys>,
    /// The clock every fleet of this rig uses.
    pub clock: Arc<ManualClock>,
    /// The directory.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// `n` agents on 127.0.0.1.
    pub fn new(n: usize) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Arc::new(MasterKey::generate().expect("key").derive());
        let agents = (0..n)
            .map(|i| {
                LocalAgent::start(
                    &dir.path().join(format!("a{i}")),
                    "127.0.0.1",
                    keys.owner_id(),
                )
                .expect("agent")
            })
            .collect();
        Rig {
            agents,
            keys,
            clock: ManualClock::at(T0_MS),
            dir,
        }
    }

    /// A fresh fleet (what one command run knows: the key and nothing else), with short
    /// timeouts and the rig's clock.
    pub fn fleet(&self) -> Fleet {
        let opts = FleetOptions {
            client: ClientOptions {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(10),
                ..ClientOptions::default()
            },
        };
        Fleet::new(self.keys.clone(), opts).with_clock(self.clock.clone())
    }

    /// Every agent's address (stopped ones too).
    pub fn addrs(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.addr().to_string()).collect()
    }

    /// One agent's address, as a list.
    pub fn one(&self, i: usize) -> Vec<String> {
        vec![self.agents[i].addr().to_string()]
    }

    /// A path in the rig's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sample image: random bytes from `seed`, with the stripes in `zero` (of `stripe` bytes)
    /// all zero.
    pub fn image(&self, name: &str, size: u64, seed: u64, stripe: u64, zero: &[u64]) -> PathBuf {
        let mut data = vec![0u8; size as usize];
        let mut xof = blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof();
        xof.fill(&mut data);
        for &z in zero {
            let (a, b) = ((z * stripe) as usize, ((z + 1) * stripe).min(size) as usize);
            data[a..b].fill(0);
        }
        let p = self.path(name);
        std::fs::write(&p, &data).expect("write image");
        p
    }

    /// Takes a snapshot of `source` as `volume` with the given layout through every agent.
    pub async fn snapshot(
        &self,
        fleet: &Fleet,
        source: &Path,
        volume: &str,
        k: u8,
        m: u8,
        stripe: u32,
    ) -> SnapshotReport {
        let mut opts = SnapshotOptions::new(source.to_path_buf(), volume, self.addrs());
        opts.k = k;
        opts.m = m;
        opts.stripe_size = stripe;
        opts.cache_dir = Some(self.path("cache"));
        snapshot(fleet, &opts, &NoProgress, &Shutdown::new())
            .await
            .expect("snapshot")
    }

    /// The manifest of `snapshot`.
    pub async fn manifest(&self, fleet: &Fleet, snap: &str) -> Manifest {
        let cat = sa_engine::catalog::open(fleet, &self.addrs(), Access::Read)
            .await
            .expect("catalog");
        sa_engine::catalog::resolve(&cat.manifests, snap, None)
            .expect("resolve")
            .clone()
    }

    /// The shard file of shard `index` of stripe `i` of `m`, as placed.
    pub fn shard_file(&self, m: &Manifest, i: usize, index: usize) -> PathBuf {
        let StripeRef::Data { id, slots } = &m.stripes[i] else {
            panic!("stripe {i} is a zero stripe");
        };
        let agent = m.agents[slots[index] as usize].id;
        let a = self
            .agents
            .iter()
            .find(|a| a.id() == agent)
            .expect("the agent of the slot");
        let key = sa_core::shard::ShardKey {
            volume: m.volume,
            stripe: *id,
            index: index as u8,
        };
        a.dir().join("shards").join(key.rel_path())
    }

    /// Every shard file of every agent.
    pub fn all_shard_files(&self) -> Vec<PathBuf> {
        self.agents
            .iter()
            .flat_map(|a| files(&a.dir().join("shards")))
            .collect()
    }
}

/// Every regular file under `dir`, recursively (the black-box tests' helper).
pub use sa_tests::scan::files;

/// blake3 of a file.
pub fn digest(p: &Path) -> String {
    hex(blake3::hash(&std::fs::read(p).expect("read")).as_bytes())
}

/// A small deterministic generator (xorshift64*), for test cases.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
