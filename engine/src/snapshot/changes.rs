//! What a run need not read: the base snapshot, and which stripes changed since it.
//!
//! The base is the newest snapshot of the volume with this layout (or `--changed-since`). What
//! changed comes from one of:
//! - a changed map (`--changed-map`, [`super::changed`]): trusted as given;
//! - the export's dirty bitmap (`--dirty-bitmap NAME`, NBD sources): used only when the base was
//!   taken with `--new-bitmap NAME`, i.e. its manifest names that bitmap as the one that started
//!   recording at its point in time ([`Manifest::tracking_bitmap`]). Any doubt means a full read
//!   with a warning, never a wrong incremental: no base, a base taken without a bitmap or with
//!   another one, a volume whose size changed, an export that does not offer the bitmap (removed,
//!   not exported, lost in a migration), or a bitmap that cannot be read. What cannot be seen
//!   over NBD is a bitmap cleared, or deleted and made again under the same name: give each point
//!   in time a bitmap of its own name (as libvirt checkpoints do) and such a bitmap is refused.
//!
//! Stripes no change touches are taken from the base's manifest without reading
//! ([`take_untouched`]); stripes an export's `base:allocation` reports as zeroes are recorded as
//! zero without reading ([`take_zero`]).

use std::collections::HashMap;

use sa_core::layout::Layout;
use sa_core::manifest::{AgentEntry, Manifest, StripeRef};
use sa_core::seal::StripeId;
use sa_core::size::format_size;
use sa_core::store::AgentClient;

use super::base::{find_base, Base, Pick};
use super::cache::ManifestCache;
use super::changed;
use super::stripe::StripeOutcome;
use super::SnapshotOptions;
use crate::error::{Error, Result};
use crate::fleet::Fleet;
use crate::source::Source;

/// The base of a run and what changed since it.
pub(super) struct Changes {
    /// The base snapshot.
    pub base: Option<Base>,
    /// Per stripe, whether it changed (None: read every stripe).
    pub touched: Option<Vec<bool>>,
    /// What told which stripes changed: `dirty bitmap NAME` or `changed map PATH`.
    pub from: Option<String>,
    /// Why a dirty bitmap given was not used (the run reads everything).
    pub fallback: Option<String>,
}

/// Finds the base and what changed since it (see the module docs).
pub(super) async fn find(
    fleet: &Fleet,
    opts: &SnapshotOptions,
    clients: &[AgentClient],
    mcache: Option<&ManifestCache>,
    layout: &Layout,
    source: &Source,
) -> Result<Changes> {
    let keys = fleet.keys();
    let volume_id = keys.volume_id(&opts.volume);
    if let Some((since, map)) = &opts.changed {
        return changed_map(fleet, opts, clients, mcache, layout, since, map).await;
    }
    let pick = Pick::Latest {
        volume: volume_id,
        k: opts.k,
        m: opts.m,
        stripe_size: opts.stripe_size,
    };
    let base = match find_base(clients, keys, mcache, pick).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("cannot read the catalog for reuse, sending everything: {e}");
            None
        }
    };
    let mut changes = Changes {
        base,
        touched: None,
        from: None,
        fallback: None,
    };
    let (Some(name), Some(nbd)) = (&opts.dirty_bitmap, source.nbd()) else {
        return Ok(changes);
    };
    let why_not = match changes.base.as_ref().map(|b| &b.manifest) {
        None => Some(format!(
            "there is no earlier snapshot of volume '{}' with this layout to build on",
            opts.volume
        )),
        Some(m) => bitmap_refusal(
            m,
            name,
            layout,
            nbd.has_context(&crate::source::nbd::bitmap_context(name)),
        ),
    };
    match why_not {
        Some(why) => changes.fallback = Some(why),
        None => match nbd.dirty_stripes(name, layout).await {
            Ok(t) => {
                changes.touched = Some(t);
                changes.from = Some(format!("dirty bitmap {name}"));
            }
            Err(e) => changes.fallback = Some(format!("the bitmap could not be read ({e})")),
        },
    }
    if let Some(why) = &changes.fallback {
        tracing::warn!("dirty bitmap {name} not used: {why}; reading the whole export");
    }
    Ok(changes)
}

/// Why the export's bitmap `name` must not be trusted against the base `m`; None when it may.
fn bitmap_refusal(m: &Manifest, name: &str, layout: &Layout, offered: bool) -> Option<String> {
    if m.layout.seal != layout.seal {
        return Some(format!(
            "snapshot {} seals its stripes in format {}, this run in format {}: no stripe of it \
             can be reused",
            m.snapshot, m.layout.seal, layout.seal
        ));
    }
    if m.layout != *layout {
        return Some(format!(
            "the volume is {} now and was {} in snapshot {}",
            format_size(layout.volume_size),
            format_size(m.layout.volume_size),
            m.snapshot
        ));
    }
    match &m.tracking_bitmap {
        None => {
            return Some(format!(
                "the previous snapshot {} was taken without --new-bitmap, so no bitmap is known \
                 to start at its point in time",
                m.snapshot
            ))
        }
        Some(t) if t != name => {
            return Some(format!(
                "it does not belong to the previous snapshot {}, which was taken with \
                 --new-bitmap {t}",
                m.snapshot
            ))
        }
        Some(_) => {}
    }
    if !offered {
        return Some(
            "the export does not offer it (removed, not exported with the export's `bitmaps` or \
             qemu-nbd -B, or lost when the VM moved)"
                .into(),
        );
    }
    None
}

/// `--changed-since` + `--changed-map`.
async fn changed_map(
    fleet: &Fleet,
    opts: &SnapshotOptions,
    clients: &[AgentClient],
    mcache: Option<&ManifestCache>,
    layout: &Layout,
    since: &str,
    map: &std::path::Path,
) -> Result<Changes> {
    let keys = fleet.keys();
    let volume_id = keys.volume_id(&opts.volume);
    let b = find_base(clients, keys, mcache, Pick::Named(since, volume_id))
        .await?
        .ok_or_else(|| Error::invalid(format!("--changed-since {since}: no such snapshot")))?;
    let bm = &b.manifest;
    if bm.volume != volume_id {
        return Err(Error::invalid(format!(
            "--changed-since {since}: snapshot {} is of volume '{}', not '{}': a changed map only \
             makes sense against an earlier snapshot of the same volume",
            bm.snapshot, bm.volume_name, opts.volume
        )));
    }
    if bm.layout.seal != layout.seal {
        return Err(Error::invalid(format!(
            "--changed-since {since}: snapshot {} seals its stripes in format {}, this run in \
             format {}: none of its stripes can be reused (snapshot without a changed map, or \
             with --seal-format {})",
            bm.snapshot, bm.layout.seal, layout.seal, bm.layout.seal
        )));
    }
    if bm.layout != *layout {
        return Err(Error::invalid(format!(
            "--changed-since {since}: snapshot {} has size {} with {} stripes at k={} m={}, this run has \
             size {} with {} stripes at k={} m={}: the layouts must match (snapshot without a changed map)",
            bm.snapshot,
            bm.layout.volume_size,
            format_size(bm.layout.stripe_size as u64),
            bm.layout.k,
            bm.layout.m,
            layout.volume_size,
            format_size(layout.stripe_size as u64),
            layout.k,
            layout.m
        )));
    }
    let ranges = changed::load(map, layout.volume_size)?;
    Ok(Changes {
        touched: Some(changed::touched(&ranges, layout)),
        base: Some(b),
        from: Some(format!("changed map {}", map.display())),
        fallback: None,
    })
}

/// Where already-stored stripes live, from the previous snapshot of the volume.
pub(super) fn known_stripes(
    prev: Option<&Manifest>,
    table: &[AgentEntry],
) -> HashMap<StripeId, Vec<u16>> {
    let mut known = HashMap::new();
    let Some(prev) = prev else { return known };
    // Map the previous table's slots to the new table's; a stripe is reusable only when
    // every one of its shards is on an agent that is in the new table.
    let remap: Vec<Option<u16>> = prev
        .agents
        .iter()
        .map(|a| table.iter().position(|t| t.id == a.id).map(|p| p as u16))
        .collect();
    for s in &prev.stripes {
        if let StripeRef::Data { id, slots } = s {
            let mapped: Option<Vec<u16>> = slots
                .iter()
                .map(|&s| remap.get(s as usize).copied().flatten())
                .collect();
            if let Some(mapped) = mapped {
                known.insert(*id, mapped);
            }
        }
    }
    known
}

/// Stripes the changes say are untouched, taken from the base without reading: fills
/// `stripes` and `totals`, returns how many.
pub(super) fn take_untouched(
    base: &Manifest,
    touched: &[bool],
    known: &HashMap<StripeId, Vec<u16>>,
    stripes: &mut [Option<StripeRef>],
    totals: &mut StripeOutcome,
) -> u64 {
    let mut unread = 0;
    for (i, s) in base.stripes.iter().enumerate() {
        if touched[i] {
            continue;
        }
        match s {
            StripeRef::Zero => {
                stripes[i] = Some(StripeRef::Zero);
                totals.zero += 1;
            }
            StripeRef::Data { id, .. } => match known.get(id) {
                Some(slots) => {
                    stripes[i] = Some(StripeRef::Data {
                        id: *id,
                        slots: slots.clone(),
                    });
                    totals.reused += 1;
                }
                // Its shards are on agents no longer in the table: read it after all.
                None => continue,
            },
        }
        unread += 1;
    }
    unread
}

/// Stripes still to read that the export reports as all zeroes: recorded as zero without
/// reading. Returns how many.
pub(super) fn take_zero(
    zero: &[bool],
    stripes: &mut [Option<StripeRef>],
    totals: &mut StripeOutcome,
) -> u64 {
    let mut n = 0;
    for (s, &z) in stripes.iter_mut().zip(zero) {
        if s.is_none() && z {
            *s = Some(StripeRef::Zero);
            totals.zero += 1;
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(bitmap: Option<&str>) -> Manifest {
        let layout = Layout::new(16 << 20, 4 << 20, 4, 2).unwrap();
        Manifest {
            snapshot: "00aa".into(),
            volume_name: "vm".into(),
            volume: [1; 16],
            revision: 0,
            created: 0,
            created_nanos: 0,
            layout,
            agents: vec![],
            stripes: vec![StripeRef::Zero; 4],
            tracking_bitmap: bitmap.map(str::to_string),
        }
    }

    #[test]
    fn only_the_bitmap_named_by_the_base_is_trusted() {
        let layout = Layout::new(16 << 20, 4 << 20, 4, 2).unwrap();
        let m = manifest(Some("b1"));
        assert_eq!(bitmap_refusal(&m, "b1", &layout, true), None);
        let other = bitmap_refusal(&m, "b2", &layout, true).unwrap();
        assert!(other.contains("--new-bitmap b1"), "{other}");
        let absent = bitmap_refusal(&m, "b1", &layout, false).unwrap();
        assert!(absent.contains("does not offer"), "{absent}");
        let none = bitmap_refusal(&manifest(None), "b1", &layout, true).unwrap();
        assert!(none.contains("without --new-bitmap"), "{none}");
        let grown = Layout::new(20 << 20, 4 << 20, 4, 2).unwrap();
        let size = bitmap_refusal(&m, "b1", &grown, true).unwrap();
        assert!(size.contains("was 16"), "{size}");
    }

    #[test]
    fn zero_stripes_are_taken_only_where_nothing_else_was() {
        let mut stripes = vec![None, Some(StripeRef::Zero), None, None];
        let mut totals = StripeOutcome::default();
        let n = take_zero(&[true, true, false, true], &mut stripes, &mut totals);
        assert_eq!(n, 2);
        assert_eq!(totals.zero, 2);
        assert_eq!(stripes[2], None);
        assert_eq!(stripes[3], Some(StripeRef::Zero));
    }
}
