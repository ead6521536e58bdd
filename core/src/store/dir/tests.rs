//! Tests of the directory store: usage, quota and floor, names from the wire, scrub, sweep.

use super::*;
use crate::shard::encode_shard;
use crate::store::{ShardRead, ShardWrite};
use std::fs::OpenOptions;

fn key(i: u8) -> ShardKey {
    ShardKey {
        volume: [1; 16],
        stripe: [i; 32],
        index: 0,
    }
}

#[tokio::test]
async fn put_get_delete_and_persisted_usage() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let f = encode_shard(&key(1), 4, 2, &[5; 100]);
    s.put_shard(&key(1), f.clone()).await.unwrap();
    s.sync().await.unwrap();
    assert_eq!(s.get_shard(&key(1)).await.unwrap(), f);
    assert!(matches!(
        s.get_shard(&key(2)).await,
        Err(Error::ShardMissing)
    ));
    s.put_blob("snap-a", vec![1, 2, 3]).await.unwrap();
    assert_eq!(
        s.list_blobs("snap-").await.unwrap(),
        vec!["snap-a".to_string()]
    );
    let id = s.agent_id();
    let st = s.stat().await.unwrap();
    let used = st.used;
    assert_eq!(used, f.len() as u64 + 3);
    assert!(
        st.fs_free.is_some_and(|f| f > 0),
        "filesystem free space: {st:?}"
    );
    assert_eq!(
        st.room(),
        st.fs_free,
        "no quota: the filesystem is the limit"
    );
    drop(s);
    let s = DirStore::open(dir.path(), 0).unwrap();
    assert_eq!(s.agent_id(), id, "stable id");
    assert_eq!(s.stat().await.unwrap().used, used, "usage rescanned");
    s.delete_shard(&key(1)).await.unwrap();
    assert_eq!(s.stat().await.unwrap().shards, 0);
}

#[test]
fn ranges_are_read_inside_the_payload_of_the_shard_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    s.put_shard_blocking(&key(1), &encode_shard(&key(1), 4, 2, &payload))
        .unwrap();
    assert_eq!(
        s.get_range_blocking(&key(1), 4112, 4112).unwrap(),
        &payload[4112..8224]
    );
    assert_eq!(
        s.get_range_blocking(&key(1), 9999, 1).unwrap(),
        &payload[9999..]
    );
    assert!(matches!(
        s.get_range_blocking(&key(2), 0, 10),
        Err(Error::ShardMissing)
    ));
    // Past the payload's end: refused, not padded.
    assert!(matches!(
        s.get_range_blocking(&key(1), 9999, 2),
        Err(Error::Invalid(_))
    ));
    // A shard stored under another's name, a damaged header, a file cut inside the header:
    // corrupt.
    let path = s.shard_path(&key(3));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, encode_shard(&key(1), 4, 2, &payload)).unwrap();
    assert!(matches!(
        s.get_range_blocking(&key(3), 0, 10),
        Err(Error::ShardCorrupt(_))
    ));
    let mut bad = encode_shard(&key(3), 4, 2, &payload);
    bad[20] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        s.get_range_blocking(&key(3), 0, 10),
        Err(Error::ShardCorrupt(_))
    ));
    std::fs::write(&path, &bad[..50]).unwrap();
    assert!(matches!(
        s.get_range_blocking(&key(3), 0, 10),
        Err(Error::ShardCorrupt(_))
    ));
}

#[tokio::test]
async fn quota_is_enforced_and_bad_input_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 1000).unwrap();
    let f = encode_shard(&key(1), 4, 2, &[5; 600]);
    s.put_shard(&key(1), f).await.unwrap();
    let g = encode_shard(&key(2), 4, 2, &[5; 600]);
    assert!(matches!(
        s.put_shard(&key(2), g.clone()).await,
        Err(Error::Full(_))
    ));
    // Overwriting the same shard does not double-count.
    let f = encode_shard(&key(1), 4, 2, &[5; 600]);
    s.put_shard(&key(1), f).await.unwrap();
    // A shard sent under another key, or corrupt, is refused.
    assert!(s.put_shard(&key(3), g.clone()).await.is_err());
    let mut bad = g;
    bad[200] ^= 1;
    assert!(s.put_shard(&key(2), bad).await.is_err());
    for name in ["../x", "a/b", ".hidden", "", "x\0y"] {
        assert!(s.put_blob(name, vec![1]).await.is_err(), "{name:?}");
    }
}

#[tokio::test]
async fn wire_names_never_leave_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"secret").unwrap();
    for name in [
        "../outside",
        "..",
        "/etc/passwd",
        "blobs/../../outside",
        ".agent-id",
        "a\\b",
        &"x".repeat(200),
    ] {
        assert!(s.get_blob(name).await.is_err(), "get {name:?}");
        assert!(s.put_blob(name, vec![1]).await.is_err(), "put {name:?}");
        assert!(s.delete_blob(name).await.is_err(), "delete {name:?}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    // A symbolic link planted where a blob or a shard would be is not followed.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, dir.path().join("blobs").join("snap-x")).unwrap();
        assert!(
            s.get_blob("snap-x").await.is_err(),
            "a link is not read through"
        );
        let k = key(9);
        let p = s.shard_path(&k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, &p).unwrap();
        assert!(s.get_shard(&k).await.is_err(), "a link is not read through");
        assert!(matches!(
            s.check_stored_blocking(&k),
            Err(_) | Ok(Checked::Missing)
        ));
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    }
}

fn set_age(s: &DirStore, k: &ShardKey, secs: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(s.shard_path(k))
        .unwrap();
    f.set_modified(SystemTime::now() - std::time::Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn scrub_checks_quarantines_and_sees_restores() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let (a, b) = (key(1), key(2));
    let fa = encode_shard(&a, 4, 2, &[5; 100]);
    s.put_shard_blocking(&a, &fa).unwrap();
    s.put_shard_blocking(&b, &encode_shard(&b, 4, 2, &[6; 100]))
        .unwrap();
    assert_eq!(
        s.check_stored_blocking(&a).unwrap(),
        Checked::Sound(fa.len() as u64)
    );
    assert_eq!(s.check_stored_blocking(&key(3)).unwrap(), Checked::Missing);
    // A sound file is never quarantined.
    assert!(!s.quarantine_blocking(&a).unwrap());
    // Bit rot: one payload byte flipped on disk.
    let mut rotten = fa.clone();
    rotten[fa.len() - 7] ^= 0x40;
    fs::write(s.shard_path(&a), &rotten).unwrap();
    assert!(matches!(
        s.check_stored_blocking(&a).unwrap(),
        Checked::Bad(_)
    ));
    let before = s.stat_blocking();
    assert!(s.quarantine_blocking(&a).unwrap());
    let after = s.stat_blocking();
    assert_eq!(after.shards, before.shards - 1);
    assert_eq!(after.used, before.used - fa.len() as u64);
    assert_eq!(s.check_stored_blocking(&a).unwrap(), Checked::Missing);
    assert_eq!(s.quarantined_blocking().unwrap(), vec![(a, false)]);
    // The rotten bytes are kept, not deleted.
    let q: Vec<_> = fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .collect();
    assert_eq!(q.len(), 1);
    // A repair stores it again: reported as restored.
    s.put_shard_blocking(&a, &fa).unwrap();
    assert_eq!(s.quarantined_blocking().unwrap(), vec![(a, true)]);
    // A file that holds another shard is bad too.
    fs::write(s.shard_path(&b), &fa).unwrap();
    assert!(matches!(
        s.check_stored_blocking(&b).unwrap(),
        Checked::Bad(_)
    ));
}

#[test]
fn list_and_sweep_honour_age_and_restore_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let (a, b) = (key(1), key(2));
    let fa = encode_shard(&a, 4, 2, &[5; 100]);
    s.put_shard_blocking(&a, &fa).unwrap();
    s.put_shard_blocking(&b, &encode_shard(&b, 4, 2, &[6; 100]))
        .unwrap();
    assert_eq!(s.list_volumes_blocking().unwrap(), vec![hex(&[1; 16])]);
    assert!(s.list_shards_blocking(&[1; 16], 3).unwrap().is_empty());
    assert!(
        s.list_shards_blocking(&[9; 16], 1).unwrap().is_empty(),
        "unknown volume"
    );
    set_age(&s, &a, 7200);
    set_age(&s, &b, 7200);
    let l = s.list_shards_blocking(&[1; 16], 1).unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].stripe, l[0].index), (a.stripe, 0));
    assert!(l[0].age >= 7199, "age {}", l[0].age);
    // Re-storing the same shard makes it young: a sweep with a 1h grace keeps it.
    s.put_shard_blocking(&a, &fa).unwrap();
    assert!(s.list_shards_blocking(&[1; 16], 1).unwrap()[0].age < 60);
    let st = s.sweep_blocking(3600, &[a, b, key(3)]).unwrap();
    assert_eq!((st.deleted, st.young), (1, 1));
    assert!(st.bytes > 100);
    assert!(matches!(s.get_shard_blocking(&b), Err(Error::ShardMissing)));
    assert_eq!(s.stat_blocking().shards, 1);
    let st = s.sweep_blocking(0, &[a]).unwrap();
    assert_eq!(st.deleted, 1);
    assert_eq!(s.stat_blocking().shards, 0);
    assert_eq!(s.stat_blocking().used, 0);
}

#[test]
fn a_second_open_of_the_directory_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let clone = s.clone();
    drop(s);
    let e = DirStore::open(dir.path(), 0)
        .err()
        .expect("a clone still holds the lock");
    assert!(matches!(e, Error::InUse { .. }), "{e}");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    drop(clone);
    DirStore::open(dir.path(), 0).expect("free again once closed");
}

#[tokio::test]
async fn the_floor_refuses_writes_and_shows_in_stat() {
    let dir = tempfile::tempdir().unwrap();
    // A floor above any real free space: the store is at its floor from the start.
    let limits = Limits {
        quota: 0,
        min_free: MinFree::Bytes(u64::MAX / 2),
    };
    let s = DirStore::open_with(dir.path(), limits).unwrap();
    assert_eq!(s.floor(), u64::MAX / 2);
    let st = s.stat().await.unwrap();
    assert_eq!((st.fs_free, st.room()), (Some(0), Some(0)), "{st:?}");
    let e = s
        .put_shard(&key(1), encode_shard(&key(1), 4, 2, &[5; 100]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Full(_)), "{e}");
    assert!(e.to_string().contains("--min-free"), "{e}");
    assert_eq!(
        s.stat().await.unwrap().used,
        0,
        "nothing reserved by a refusal"
    );
    // Catalog blobs are not held to the floor (every agent keeps the catalog).
    s.put_blob("snap-a", vec![1]).await.unwrap();
    drop(s);
    // A percentage is of the filesystem's size; with a quota too, room is the smaller.
    let limits = Limits {
        quota: 1000,
        min_free: MinFree::Percent(1.0),
    };
    let s = DirStore::open_with(dir.path(), limits).unwrap();
    let total = fs4::total_space(dir.path()).unwrap();
    assert_eq!(s.floor(), MinFree::Percent(1.0).bytes_of(total));
    assert_eq!(
        s.stat().await.unwrap().room(),
        Some(1000 - 1),
        "the blob counts"
    );
}

/// A crash before a shard's group is durable may leave it torn at its name (`dir/pending.rs`):
/// such a file is refused by a confirm and replaced by the next store of the same shard.
#[tokio::test]
async fn a_torn_shard_left_by_a_crash_is_refused_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let f = encode_shard(&key(3), 4, 2, &[9; 4096]);
    s.put_shard(&key(3), f.clone()).await.unwrap();
    drop(s);
    // What a crash before the data reached the disk can leave: the name, part of the bytes.
    let path = dir.path().join("shards").join(key(3).rel_path());
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    let header = &f[..crate::shard::SHARD_HEADER_LEN];
    assert!(
        !s.confirm_shard(&key(3), header).await.unwrap(),
        "a torn file is not kept in place of a send"
    );
    s.put_shard(&key(3), f.clone()).await.unwrap();
    s.sync().await.unwrap();
    assert_eq!(s.get_shard(&key(3)).await.unwrap(), f, "replaced whole");
}

/// Many writes: groups are made durable on the way (the waiting list stays bounded) and a
/// SYNC leaves nothing waiting.
#[tokio::test]
async fn groups_are_flushed_on_the_way_and_by_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = DirStore::open(dir.path(), 0).unwrap();
    for i in 0..(GROUP_FILES as u8 + 10) {
        s.put_shard(&key(i), encode_shard(&key(i), 4, 2, &[i; 64]))
            .await
            .unwrap();
        assert!(s.pending().files_len() < GROUP_FILES, "bounded at {i}");
    }
    assert_eq!(s.pending().files_len(), 10, "the full group went at 64");
    s.sync().await.unwrap();
    assert!(s.pending().is_empty(), "SYNC took the rest");
}
