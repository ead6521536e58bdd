//! Hundreds of loss patterns against one real fleet: shard files hidden (missing) or damaged
//! (corrupt) at random, then `verify` and `restore` must say exactly what a model says: every
//! stripe with at most m bad shards is rebuilt byte for byte, the others are named as lost, and
//! the counts of missing and corrupt shards are exact. The files are put back after each case.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{digest, Rig, Rng};
use sa_core::manifest::StripeRef;
use sa_engine::progress::NoProgress;
use sa_engine::restore::{restore, RestoreOptions};
use sa_engine::shutdown::Shutdown;
use sa_engine::verify::{verify, VerifyOptions};
use sa_engine::Error;

const STRIPE: u32 = 64 << 10;
const CASES: u64 = 200;

/// What was done to one shard file, undone after the case.
enum Harm {
    Hidden(PathBuf, PathBuf),
    Damaged(PathBuf, Vec<u8>),
}

impl Harm {
    fn undo(self) {
        match self {
            Harm::Hidden(from, to) => std::fs::rename(to, from).expect("put back"),
            Harm::Damaged(p, bytes) => std::fs::write(p, bytes).expect("put back"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_restore_agree_with_the_model_for_every_loss_pattern() {
    let rig = Rig::new(6);
    let (k, m) = (4u8, 2u8);
    let stripes = 12u64;
    let img = rig.image(
        "disk.img",
        stripes * STRIPE as u64,
        7,
        STRIPE as u64,
        &[3, 8],
    );
    let fleet = rig.fleet();
    let snap = rig.snapshot(&fleet, &img, "v", k, m, STRIPE).await;
    let man = rig.manifest(&fleet, &snap.snapshot).await;
    let data: Vec<usize> = (0..man.stripes.len())
        .filter(|&i| matches!(man.stripes[i], StripeRef::Data { .. }))
        .collect();
    let want = digest(&img);
    let aside = rig.path("aside");
    std::fs::create_dir_all(&aside).unwrap();
    let mut rng = Rng(0x5eed);
    let mut seen_codes = BTreeMap::new();
    for case in 0..CASES {
        // Up to 3 harms per stripe on up to 4 stripes: some recoverable, some not.
        let mut harms = Vec::new();
        let mut harmed = std::collections::HashSet::new();
        let mut bad: BTreeMap<usize, usize> = BTreeMap::new();
        let (mut missing, mut corrupt) = (0u64, 0u64);
        for _ in 0..rng.below(5) {
            let s = data[rng.below(data.len() as u64) as usize];
            for _ in 0..1 + rng.below(3) {
                let idx = rng.below((k + m) as u64) as usize;
                if !harmed.insert((s, idx)) {
                    continue; // already harmed in this case
                }
                let file = rig.shard_file(&man, s, idx);
                *bad.entry(s).or_default() += 1;
                if rng.below(2) == 0 {
                    let to = aside.join(format!("{case}-{s}-{idx}"));
                    std::fs::rename(&file, &to).unwrap();
                    harms.push(Harm::Hidden(file, to));
                    missing += 1;
                } else {
                    let bytes = std::fs::read(&file).unwrap();
                    let mut bent = bytes.clone();
                    let at = rng.below(bent.len() as u64) as usize;
                    bent[at] ^= 1 << rng.below(8);
                    std::fs::write(&file, &bent).unwrap();
                    harms.push(Harm::Damaged(file, bytes));
                    corrupt += 1;
                }
            }
        }
        let lost: Vec<u64> = bad
            .iter()
            .filter(|(_, n)| **n > m as usize)
            .map(|(s, _)| *s as u64)
            .collect();
        let code = if !lost.is_empty() {
            3
        } else if missing + corrupt > 0 {
            2
        } else {
            0
        };
        let vopts = VerifyOptions {
            snapshot: snap.snapshot.clone(),
            volume: None,
            agents: rig.one(0),
        };
        let v = verify(&fleet, &vopts, &NoProgress, &Shutdown::new())
            .await
            .expect("verify runs");
        let ctx = format!("case {case}: bad {bad:?}, {missing} hidden, {corrupt} damaged");
        assert_eq!(v.exit_code(), code, "{ctx}: {v:?}");
        assert_eq!(v.lost, lost, "{ctx}");
        assert_eq!(v.shards_missing, missing, "{ctx}");
        assert_eq!(v.shards_corrupt, corrupt, "{ctx}");
        *seen_codes.entry(code).or_insert(0) += 1;

        let target = rig.path(&format!("r{case}.img"));
        let ropts = RestoreOptions {
            snapshot: snap.snapshot.clone(),
            volume: None,
            target: target.clone(),
            force: false,
            agents: rig.one(1),
        };
        match restore(&fleet, &ropts, &NoProgress, &Shutdown::new()).await {
            Ok(r) => {
                assert!(lost.is_empty(), "{ctx}: restored although stripes are lost");
                assert_eq!(digest(&target), want, "{ctx}");
                // A restore reads k shards per stripe (data first): it meets at most the harms.
                assert!(
                    r.missing_shards <= missing && r.corrupt_shards <= corrupt,
                    "{ctx}: {r:?}"
                );
                std::fs::remove_file(&target).unwrap();
            }
            Err(Error::StripesLost(l)) => {
                let named: Vec<u64> = l.shown.iter().map(|s| s.stripe).collect();
                assert_eq!(l.count, lost.len() as u64, "{ctx}");
                assert_eq!(named, lost[..lost.len().min(10)], "{ctx}");
                assert!(!target.exists(), "{ctx}: a failed restore left its target");
            }
            Err(e) => panic!("{ctx}: unexpected error {e}"),
        }
        for h in harms {
            h.undo();
        }
    }
    // The cases covered all three outcomes.
    assert_eq!(seen_codes.len(), 3, "{seen_codes:?}");
}
