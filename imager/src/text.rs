//! Text output that several commands share.

use std::collections::BTreeMap;

use sa_core::duration::format_span;
use sa_core::size::format_size;
use sa_engine::gc::GcReport;
use sa_engine::repair::RepairReport;

/// Prints a collection report for people.
pub fn print_gc(r: &GcReport, dry_run: bool) {
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!(
        "garbage collection: {} snapshot(s) kept, {} running, shards younger than {} kept",
        r.snapshots_kept,
        r.leases,
        format_span(r.min_age)
    );
    for a in &r.agents {
        if a.status == "done" {
            println!(
                "  {}: {} of {} shard files referenced; {verb} {} ({}), {} unreferenced but young, {} stale catalog blob(s) removed{}",
                a.addr,
                a.shards_referenced,
                a.shards_before,
                a.shards_deleted,
                sa_core::size::format_size(a.bytes_freed),
                a.shards_young,
                a.catalog_blobs_deleted,
                if a.tombstones_copied > 0 {
                    format!(", {} forget(s) it missed brought over", a.tombstones_copied)
                } else {
                    String::new()
                }
            );
        } else {
            println!("  {}: {}", a.addr, a.status);
        }
    }
}

/// A repair report for people.
pub fn print_repair(r: &RepairReport) {
    let verb = if r.dry_run {
        "would rebuild"
    } else {
        "rebuilt"
    };
    let mut per_target: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &r.moves {
        if !m.outcome.starts_with("failed") {
            *per_target.entry(m.to.as_str()).or_default() += 1;
        }
    }
    for s in &r.snapshots {
        if s.absent_shards > 0 || s.crowded_shards > 0 || s.revision_after != s.revision_before {
            println!(
                "snapshot {}: {} shard(s) absent{}{}, {} slot(s) moved, revision {} -> {}{}",
                s.snapshot,
                s.absent_shards,
                if s.held_shards > 0 {
                    format!(
                        " ({} held back: their agent is not missing long enough)",
                        s.held_shards
                    )
                } else {
                    String::new()
                },
                if s.crowded_shards > 0 {
                    format!(", {} crowded (two on one agent)", s.crowded_shards)
                } else {
                    String::new()
                },
                s.slots_moved,
                s.revision_before,
                s.revision_after,
                if s.lost_stripes > 0 {
                    format!(", {} stripe(s) LOST", s.lost_stripes)
                } else {
                    String::new()
                }
            );
        }
    }
    for (to, n) in &per_target {
        println!("  {verb} {n} shard(s) onto {to}");
    }
    for m in r
        .moves
        .iter()
        .filter(|m| m.outcome.starts_with("failed"))
        .take(20)
    {
        println!(
            "  stripe {}… shard {}: {}",
            &m.stripe[..12],
            m.index,
            m.outcome
        );
    }
    if r.stripes_repaired == 0 && r.stripes_lost == 0 && r.shards_held > 0 {
        println!(
            "{} shard(s) held back until their agent has been missing long enough",
            r.shards_held
        );
    } else if r.stripes_repaired == 0 && r.stripes_lost == 0 {
        println!("nothing to repair: every shard is present, each stripe on distinct agents");
    } else if !r.dry_run {
        println!(
            "{verb} {} shard(s), {} in {:.1}s ({:.1} MB/s, {} read); {} catalog copies written",
            r.shards_rebuilt,
            format_size(r.bytes_rebuilt),
            r.rebuild_seconds,
            r.rebuild_mb_per_s,
            format_size(r.bytes_read),
            r.catalog_copies_written
        );
    }
    if r.stripes_lost > 0 {
        println!(
            "{} stripe(s) have fewer than k shards: bring back the agents that are down",
            r.stripes_lost
        );
    }
}
