//! Repair, garbage collection, retention and the fleet, in-process against real agent servers:
//! each case on broken or incomplete fleets, with exact expected outcomes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{digest, files, Rig, DAY_MS};
use sa_core::manifest::StripeRef;
use sa_engine::fleet::Access;
use sa_engine::gc::GcOptions;
use sa_engine::progress::NoProgress;
use sa_engine::repair::watch::{watch, PassLine, WatchOptions};
use sa_engine::repair::{repair_pass, PassOptions};
use sa_engine::restore::{restore, RestoreOptions};
use sa_engine::retention::{forget, prune, ForgetOptions, Policy, PruneOptions};
use sa_engine::shutdown::Shutdown;
use sa_engine::verify::{verify, VerifyOptions};

const STRIPE: u32 = 64 << 10;

async fn verify_code(rig: &Rig, snap: &str, via: usize) -> u8 {
    let opts = VerifyOptions {
        snapshot: snap.to_string(),
        volume: None,
        agents: rig.one(via),
    };
    verify(&rig.fleet(), &opts, &NoProgress, &Shutdown::new())
        .await
        .expect("verify")
        .exit_code()
}

async fn restores_exactly(rig: &Rig, snap: &str, via: usize, want: &str, name: &str) {
    let target = rig.path(name);
    let opts = RestoreOptions {
        snapshot: snap.to_string(),
        volume: None,
        target: target.clone(),
        force: false,
        agents: rig.one(via),
    };
    restore(&rig.fleet(), &opts, &NoProgress, &Shutdown::new())
        .await
        .expect("restore");
    assert_eq!(digest(&target), want, "{name}");
}

fn pass(rig: &Rig, via: usize) -> PassOptions {
    PassOptions {
        dry_run: false,
        cache_dir: Some(rig.path("cache")),
        agents: rig.one(via),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_puts_back_deleted_shards_and_rebuilds_a_lost_agent_elsewhere() {
    let mut rig = Rig::new(7);
    let img = rig.image("disk.img", 8 * STRIPE as u64, 1, STRIPE as u64, &[2]);
    let fleet = rig.fleet();
    let snap = rig.snapshot(&fleet, &img, "v", 4, 2, STRIPE).await.snapshot;
    let man = rig.manifest(&fleet, &snap).await;
    // Two shards deleted on agents that answer: put back where they were.
    let f1 = rig.shard_file(&man, 0, 1);
    let f2 = rig.shard_file(&man, 5, 4);
    std::fs::remove_file(&f1).unwrap();
    std::fs::remove_file(&f2).unwrap();
    assert_eq!(verify_code(&rig, &snap, 0).await, 2);
    let r = repair_pass(&rig.fleet(), &pass(&rig, 0), &mut |_| HashSet::new())
        .await
        .expect("repair");
    assert_eq!(
        (r.shards_rebuilt, r.shards_failed, r.exit_code()),
        (2, 0, 0),
        "{r:?}"
    );
    assert!(f1.exists() && f2.exists(), "put back in place");
    assert_eq!(verify_code(&rig, &snap, 3).await, 0);

    // An agent lost for good: its shards go to the seventh agent (outside each stripe).
    let lost = rig
        .agents
        .iter()
        .position(|a| man.agents.iter().any(|e| e.id == a.id()))
        .unwrap();
    let held_before = files(&rig.agents[lost].dir().join("shards")).len() as u64;
    rig.agents[lost].kill();
    let via = (lost + 1) % 7;
    assert_eq!(verify_code(&rig, &snap, via).await, 2);
    let r = repair_pass(&rig.fleet(), &pass(&rig, via), &mut |_| HashSet::new())
        .await
        .expect("repair");
    assert_eq!(r.shards_rebuilt, held_before, "{r:?}");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.snapshots[0].revision_after, 1, "a new manifest revision");
    assert_eq!(
        verify_code(&rig, &snap, via).await,
        0,
        "full redundancy without it"
    );
    restores_exactly(&rig, &snap, via, &digest(&img), "after-repair.img").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_holds_a_missing_agent_back_until_the_repair_delay_passes() {
    let mut rig = Rig::new(7);
    let img = rig.image("disk.img", 4 * STRIPE as u64, 2, STRIPE as u64, &[]);
    let fleet = rig.fleet();
    let snap = rig.snapshot(&fleet, &img, "v", 4, 2, STRIPE).await.snapshot;
    let man = rig.manifest(&fleet, &snap).await;
    let lost = rig
        .agents
        .iter()
        .position(|a| man.agents.iter().any(|e| e.id == a.id()))
        .unwrap();
    rig.agents[lost].kill();
    let via = (lost + 1) % 7;
    let opts = WatchOptions {
        pass: pass(&rig, via),
        repair_after: Duration::from_secs(3600),
        interval: Duration::from_millis(20),
        state: Some(rig.path("watch-state")),
    };
    let stop = Shutdown::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, u64)>();
    let clock = rig.clock.clone();
    let watch_fleet = rig.fleet();
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let mut on_pass = |l: &PassLine| {
            let r = l.report.as_ref().expect("pass report");
            let _ = tx.send((l.pass, r.shards_held, r.shards_rebuilt));
        };
        watch(&watch_fleet, &opts, &stop2, &mut on_pass).await
    });
    // First passes: the agent is missing for less than an hour of the rig's clock: held back.
    let (_, held, rebuilt) = rx.recv().await.unwrap();
    assert!(held > 0 && rebuilt == 0, "held {held}, rebuilt {rebuilt}");
    clock.advance(3_600_001);
    let mut rebuilt_total = 0;
    while let Some((p, _, rebuilt)) = rx.recv().await {
        rebuilt_total += rebuilt;
        if rebuilt_total > 0 || p > 50 {
            break;
        }
    }
    stop.cancel();
    task.await.unwrap().expect("watch ends cleanly");
    assert!(rebuilt_total > 0, "rebuilt after the delay");
    assert_eq!(verify_code(&rig, &snap, via).await, 0);
    assert!(
        std::fs::read_to_string(rig.path("watch-state")).is_ok(),
        "the clock is kept in the state file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_collects_what_only_it_used_and_reaches_an_agent_that_was_down() {
    let mut rig = Rig::new(6);
    let a = rig.image("a.img", 6 * STRIPE as u64, 3, STRIPE as u64, &[]);
    let fleet = rig.fleet();
    let first = rig.snapshot(&fleet, &a, "v", 2, 1, STRIPE).await.snapshot;
    // The second shares half the stripes with the first.
    let mut bytes = std::fs::read(&a).unwrap();
    for b in &mut bytes[..3 * STRIPE as usize] {
        *b ^= 0xa5;
    }
    let b = rig.path("b.img");
    std::fs::write(&b, &bytes).unwrap();
    rig.clock.advance(1000);
    let second = rig
        .snapshot(&rig.fleet(), &b, "v", 2, 1, STRIPE)
        .await
        .snapshot;
    let before = rig.all_shard_files().len();
    assert_eq!(before, 9 * 3, "9 distinct stripes of 3 shards");
    // Agent 5 is down while the first snapshot is forgotten through agent 0.
    rig.agents[5].kill();
    let opts = ForgetOptions {
        agents: rig.one(0),
        snapshot: first.clone(),
        volume: None,
        gc: GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
    };
    let r = forget(&rig.fleet(), &opts).await.expect("forget");
    assert_eq!(r.agents_down.len(), 1, "{r:?}");
    // Back, it still holds the first snapshot's manifest; listed through it alone, the
    // snapshot stays forgotten (the book names the others, which hold the tombstone).
    let dir5 = rig.agents[5].dir().to_path_buf();
    rig.agents[5].restart(rig.keys.owner_id()).expect("restart");
    let blobs5 = || {
        files(&dir5.join("blobs"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        blobs5().iter().any(|n| n.contains(&first)),
        "{:?}",
        blobs5()
    );
    let listed = sa_engine::list::list(
        &rig.fleet(),
        &sa_engine::list::ListOptions {
            agents: rig.one(5),
            volume: None,
        },
    )
    .await
    .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].snapshot, second);
    // A collection brings the forget to it: the tombstone copied, the stale manifest gone,
    // and only the second snapshot's shards are left anywhere.
    let reach = rig.fleet().reach(&rig.one(1), Access::Write).await;
    let g = sa_engine::gc::collect(
        &rig.fleet(),
        &reach,
        GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
    )
    .await
    .expect("gc");
    assert!(g.agents.iter().any(|a| a.tombstones_copied == 1), "{g:?}");
    let names = blobs5();
    assert!(
        names.iter().any(|n| n == &format!("forgotten-{first}"))
            && !names.iter().any(|n| n == &format!("snap-{first}")),
        "{names:?}"
    );
    let man = rig.manifest(&rig.fleet(), &second).await;
    let referenced = man
        .stripes
        .iter()
        .filter(|s| matches!(s, StripeRef::Data { .. }))
        .count()
        * 3;
    assert_eq!(rig.all_shard_files().len(), referenced);
    restores_exactly(&rig, &second, 5, &digest(&b), "second.img").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_exactly_what_the_policy_says_per_volume() {
    let rig = Rig::new(3);
    let img = rig.image("x.img", 2 * STRIPE as u64, 4, STRIPE as u64, &[]);
    // Four days, two snapshots a day, of two volumes.
    let mut ids = Vec::new();
    for day in 0..4 {
        for half in 0..2 {
            for vol in ["sda", "sdb"] {
                let s = rig.snapshot(&rig.fleet(), &img, vol, 2, 1, STRIPE).await;
                ids.push((day, half, vol, s.snapshot));
                rig.clock.advance(60_000);
            }
            rig.clock.advance(DAY_MS / 2 - 120_000);
        }
    }
    let opts = PruneOptions {
        agents: rig.one(0),
        policy: Policy {
            last: 1,
            daily: 2,
            weekly: 0,
            monthly: 0,
        },
        volume: Some("sda".into()),
        gc: GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
    };
    let r = prune(&rig.fleet(), &opts).await.expect("prune");
    // sda: newest of day 3 (last 1 and daily), newest of day 2 (daily): kept; the rest removed.
    let kept: HashSet<&String> = ids
        .iter()
        .filter(|(d, h, v, _)| *v == "sda" && *h == 1 && (*d == 3 || *d == 2))
        .map(|(_, _, _, id)| id)
        .collect();
    let decided_kept: HashSet<&String> = r
        .snapshots
        .iter()
        .filter(|d| d.keep)
        .map(|d| &d.snapshot)
        .collect();
    assert_eq!(decided_kept, kept, "{r:?}");
    assert_eq!(r.snapshots.len(), 8, "only sda is judged: {r:?}");
    assert_eq!(r.removed.len(), 6, "{r:?}");
    let listed = sa_engine::list::list(
        &rig.fleet(),
        &sa_engine::list::ListOptions {
            agents: rig.one(2),
            volume: None,
        },
    )
    .await
    .expect("list");
    assert_eq!(listed.iter().filter(|l| l.volume == "sda").count(), 2);
    assert_eq!(listed.iter().filter(|l| l.volume == "sdb").count(), 8);
    // `latest` with two volumes needs one named.
    let e = sa_engine::catalog::resolve(&rig_manifests(&rig).await, "latest", None).unwrap_err();
    assert!(matches!(e, sa_engine::Error::VolumeNeeded { .. }), "{e}");
}

async fn rig_manifests(rig: &Rig) -> Vec<sa_core::manifest::Manifest> {
    sa_engine::catalog::open(&rig.fleet(), &rig.addrs(), Access::Read)
        .await
        .expect("catalog")
        .manifests
}
