//! The availability history as commands reach the fleet (`fleet::observe`): recorded by every
//! reach, written to the agents only by writing commands and only when something changed, and
//! read back by a machine that has no copy of its own.

mod common;

use std::path::Path;

use common::Rig;
use sa_engine::clock::Clock;
use sa_engine::fleet::{Access, Fleet};

const HOUR_MS: u64 = 3_600_000;

/// A command's fleet keeping its history at `cache`.
fn fleet(rig: &Rig, cache: &Path) -> Fleet {
    rig.fleet().with_history_cache(Some(cache.to_path_buf()))
}

#[tokio::test]
async fn reaches_record_availability_and_write_it_only_when_it_changes() {
    let mut rig = Rig::new(3);
    let cache = rig.path("history");
    let blob = |rig: &Rig, i: usize| {
        std::fs::read(rig.agents[i].dir().join("blobs").join("availability")).ok()
    };

    // A writing command pins the agents and stores the history (all up) on each.
    fleet(&rig, &cache).reach(&rig.addrs(), Access::Write).await;
    let first: Vec<Vec<u8>> = (0..3)
        .map(|i| blob(&rig, i).expect("history stored on every agent"))
        .collect();
    // Again within the hour: nothing new, nothing rewritten (a rewrite has a new nonce).
    fleet(&rig, &cache).reach(&rig.addrs(), Access::Write).await;
    for (i, b) in first.iter().enumerate() {
        assert_eq!(blob(&rig, i).as_ref(), Some(b), "agent {i} rewritten");
    }

    // Agent 2 goes: a read-only command records it in this machine's copy only.
    let gone = rig.agents[2].id();
    rig.agents[2].kill();
    let read = fleet(&rig, &cache);
    read.reach(&rig.one(0), Access::Read).await;
    let up = read.history().availability(&gone, rig.clock.now_secs());
    assert_eq!(
        up.map(|u| u.fraction),
        Some(0.5),
        "seen up and down this hour"
    );
    for (i, b) in first.iter().enumerate().take(2) {
        assert_eq!(
            blob(&rig, i).as_ref(),
            Some(b),
            "a read-only reach wrote agent {i}"
        );
    }

    // A writing command stores the change on the agents that answer.
    fleet(&rig, &cache).reach(&rig.one(0), Access::Write).await;
    assert_ne!(blob(&rig, 0).as_ref(), Some(&first[0]));
    assert_ne!(blob(&rig, 1).as_ref(), Some(&first[1]));

    // An hour later, still down; a machine with no copy of its own reads the agents' copies.
    rig.clock.advance(HOUR_MS);
    fleet(&rig, &cache).reach(&rig.one(1), Access::Write).await;
    let fresh = rig.fleet();
    let reach = fresh.reach(&rig.one(0), Access::Read).await;
    let h = fresh.fleet_history(&reach.live()).await;
    let now = rig.clock.now_secs();
    let a = h.availability(&gone, now).expect("observed");
    assert_eq!((a.fraction, a.observed_hours), (0.25, 2), "{a:?}");
    let b = h.availability(&rig.agents[0].id(), now).expect("observed");
    assert_eq!((b.fraction, b.observed_hours), (1.0, 2), "{b:?}");
}
