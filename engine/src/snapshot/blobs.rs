//! Catalog blobs every agent of a run gets (the lease), and tombstone checks.

use std::time::Duration;

use sa_core::catalog::Tombstone;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};

use crate::error::{Error, Result};
use crate::fleet::each::on_each;

/// Stores `data` as blob `name` on every client; fails if any refuses.
pub(super) async fn put_everywhere(clients: &[AgentClient], name: &str, data: &[u8]) -> Result<()> {
    let answers = on_each(clients.iter().enumerate(), |c| {
        let (name, data) = (name.to_string(), data.to_vec());
        async move { c.put_blob(&name, data).await }
    })
    .await?;
    for (i, r) in answers {
        r.map_err(|e| {
            Error::failed(format!(
                "agent {} did not store {name}: {e}",
                clients[i].addr()
            ))
        })?;
    }
    Ok(())
}

/// Whether any client holds a tombstone for `snapshot` (all asked at once).
pub(super) async fn forgotten_anywhere(clients: &[AgentClient], snapshot: &str) -> bool {
    let name = Tombstone::blob_name_of(snapshot);
    let answers = on_each(clients.iter().enumerate(), |c| {
        let name = name.clone();
        async move { c.list_blobs(&name).await.is_ok_and(|n| n.contains(&name)) }
    })
    .await;
    answers.is_ok_and(|a| a.iter().any(|(_, found)| *found))
}

/// Deletes blob `name` from every client, all at once (5 s each at most: an agent lost during
/// the run must not hold up the end of it; what is left expires by itself).
pub(super) async fn delete_everywhere(clients: &[AgentClient], name: &str) -> Result<()> {
    let answers = on_each(clients.iter().enumerate(), |c| {
        let name = name.to_string();
        async move { tokio::time::timeout(Duration::from_secs(5), c.delete_blob(&name)).await }
    })
    .await?;
    let mut failed: Vec<String> = answers
        .into_iter()
        .filter_map(|(i, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{}: {e}", clients[i].addr())),
            Err(_) => Some(format!("{}: no answer", clients[i].addr())),
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        failed.sort();
        Err(Error::failed(failed.join("; ")))
    }
}
