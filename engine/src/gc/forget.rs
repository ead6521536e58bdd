//! Forgetting snapshots: tombstones first, then their manifests.

use sa_core::catalog::Tombstone;
use sa_core::keys::Keys;
use sa_core::manifest::{parse_blob_name, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{AgentClient, ShardRead, ShardWrite};

use super::read_leases;
use crate::error::{Error, Result};

/// Writes tombstones for `ids` on every client, deletes their drill records, then their `snap-`
/// blobs, except those a
/// live lease names as its base (a running snapshot reuses their stripes: the collector keeps
/// them until the lease ends, then deletes them). Fails if no client took a tombstone (nothing is
/// deleted then).
pub async fn forget(
    clients: &[AgentClient],
    keys: &Keys,
    ids: &[String],
    now: u64,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for id in ids {
        let t = Tombstone {
            snapshot: id.clone(),
            forgotten_at: now,
        };
        let sealed = t.seal(keys)?;
        let name = Tombstone::blob_name_of(id);
        let mut stored = 0;
        for c in clients {
            match c.put_blob(&name, sealed.clone()).await {
                Ok(()) => stored += 1,
                Err(e) => warnings.push(format!("{}: tombstone of {id} not stored: {e}", c.addr())),
            }
        }
        if stored == 0 {
            return Err(Error::failed(format!(
                "no agent accepted the tombstone of snapshot {id}; nothing forgotten: {}",
                warnings.join("; ")
            )));
        }
    }
    // The snapshot's drill record goes with it (the tombstone hides it from `list` anyway).
    for id in ids {
        let name = crate::drill::record::blob_name(id);
        for c in clients {
            if let Err(e) = c.delete_blob(&name).await {
                warnings.push(format!("{}: {name} not deleted: {e}", c.addr()));
            }
        }
    }
    // Leases read after the tombstones are down: a snapshot that leases a base later sees its
    // tombstone and does not use it.
    let (leases, _) = read_leases(clients, keys, now).await?;
    for id in ids {
        if leases
            .iter()
            .any(|l| l.base.as_deref() == Some(id.as_str()))
        {
            continue;
        }
        let prefix = format!("{SNAPSHOT_BLOB_PREFIX}{id}");
        for c in clients {
            // Every revision of it (repair writes `snap-<ID>.r<N>`).
            let names = match c.list_blobs(&prefix).await {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!(
                        "{}: {prefix} not deleted (the tombstone hides it): {e}",
                        c.addr()
                    ));
                    continue;
                }
            };
            for name in names
                .into_iter()
                .filter(|n| parse_blob_name(n).is_some_and(|(i, _)| i == id))
            {
                if let Err(e) = c.delete_blob(&name).await {
                    warnings.push(format!(
                        "{}: {name} not deleted (the tombstone hides it): {e}",
                        c.addr()
                    ));
                }
            }
        }
    }
    Ok(warnings)
}
