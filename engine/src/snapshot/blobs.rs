//! Catalog blobs every agent of a run gets (the lease), and tombstone checks.

use sa_core::catalog::Tombstone;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use tokio::task::JoinSet;

use crate::error::{Error, Result};

/// Stores `data` as blob `name` on every client; fails if any refuses.
pub(super) async fn put_everywhere(clients: &[AgentClient], name: &str, data: &[u8]) -> Result<()> {
    let mut set = JoinSet::new();
    for c in clients.iter() {
        let c = c.clone();
        let (name, data) = (name.to_string(), data.to_vec());
        set.spawn(async move { (c.addr().to_string(), c.put_blob(&name, data).await) });
    }
    while let Some(r) = set.join_next().await {
        let (addr, r) = r.map_err(|e| Error::failed(format!("catalog task failed: {e}")))?;
        r.map_err(|e| Error::failed(format!("agent {addr} did not store {name}: {e}")))?;
    }
    Ok(())
}

/// Whether any client holds a tombstone for `snapshot` (all asked at once).
pub(super) async fn forgotten_anywhere(clients: &[AgentClient], snapshot: &str) -> bool {
    let name = Tombstone::blob_name_of(snapshot);
    let mut set = JoinSet::new();
    for c in clients.iter() {
        let (c, name) = (c.clone(), name.clone());
        set.spawn(async move { c.list_blobs(&name).await.is_ok_and(|n| n.contains(&name)) });
    }
    while let Some(r) = set.join_next().await {
        if r.unwrap_or(false) {
            return true;
        }
    }
    false
}

/// Deletes blob `name` from every client, all at once (5 s each at most: an agent lost during
/// the run must not hold up the end of it; what is left expires by itself).
pub(super) async fn delete_everywhere(clients: &[AgentClient], name: &str) -> Result<()> {
    let mut set = JoinSet::new();
    for c in clients.iter() {
        let (c, name) = (c.clone(), name.to_string());
        set.spawn(async move {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), c.delete_blob(&name));
            match r.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{}: {e}", c.addr())),
                Err(_) => Some(format!("{}: no answer", c.addr())),
            }
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(None) => {}
            Ok(Some(f)) => failed.push(f),
            Err(e) => failed.push(format!("delete task failed: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        failed.sort();
        Err(Error::failed(failed.join("; ")))
    }
}
