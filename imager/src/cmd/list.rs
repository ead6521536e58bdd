//! `sa-image list`: the snapshots in the catalog. Any one reachable agent is enough.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use sa_core::manifest::{Manifest, StripeRef};
use sa_core::seal::StripeId;
use sa_core::size::format_size;
use serde::{Deserialize, Serialize};

use crate::agents::open_catalog;
use crate::config::{self, require_agents, KeyArgs};
use crate::merge;

/// Flags of `list`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: one is enough.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of `list --json`.
#[derive(Serialize, Debug)]
pub struct ListEntry {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
    /// Volume size.
    pub size: u64,
    /// Stripes.
    pub stripes: u64,
    /// Zero stripes.
    pub zero_stripes: u64,
    /// Data shards.
    pub k: u8,
    /// Parity shards.
    pub m: u8,
    /// Stripe size.
    pub stripe_size: u32,
    /// Agents in the table.
    pub agents: usize,
    /// Bytes of data (non-zero stripes, plaintext) this snapshot added: stripes that no older
    /// snapshot of the volume holds. What it costs on the agents is this times (k+m)/k.
    pub new_data: u64,
    /// Bytes of data it shares with at least one other snapshot of the volume (stored once).
    pub shared_data: u64,
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// New and shared data per manifest (same order), per volume, oldest first.
fn data_figures(manifests: &[Manifest]) -> Vec<(u64, u64)> {
    use std::collections::{HashMap, HashSet};
    let ids = |m: &Manifest| -> HashSet<StripeId> {
        m.stripes
            .iter()
            .filter_map(|s| {
                if let StripeRef::Data { id, .. } = s {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect()
    };
    let mut refs: HashMap<(&str, StripeId), u32> = HashMap::new();
    for m in manifests {
        for id in ids(m) {
            *refs.entry((m.volume_name.as_str(), id)).or_default() += 1;
        }
    }
    let mut order: Vec<usize> = (0..manifests.len()).collect();
    order.sort_by_key(|&i| (manifests[i].created, manifests[i].created_nanos));
    let mut seen: HashSet<(&str, StripeId)> = HashSet::new();
    let mut out = vec![(0, 0); manifests.len()];
    for i in order {
        let m = &manifests[i];
        let v = m.volume_name.as_str();
        for (n, s) in m.stripes.iter().enumerate() {
            if let StripeRef::Data { id, .. } = s {
                let len = m.layout.stripe_len(n as u64) as u64;
                if !seen.contains(&(v, *id)) {
                    out[i].0 += len;
                }
                if refs.get(&(v, *id)).copied().unwrap_or(0) > 1 {
                    out[i].1 += len;
                }
            }
        }
        seen.extend(ids(m).into_iter().map(|id| (v, id)));
    }
    out
}

fn entry(m: &Manifest) -> ListEntry {
    ListEntry {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        created: rfc3339(m.created),
        created_unix: m.created,
        size: m.layout.volume_size,
        stripes: m.layout.stripe_count(),
        zero_stripes: m.zero_stripes(),
        k: m.layout.k,
        m: m.layout.m,
        stripe_size: m.layout.stripe_size,
        agents: m.agents.len(),
        new_data: 0,
        shared_data: 0,
    }
}

/// `sa-image list`.
pub async fn run(mut args: ListArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ListArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents; bools json);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let (manifests, _) = open_catalog(&require_agents(&args.agents)?, &keys).await?;
    let figures = data_figures(&manifests);
    let rows: Vec<ListEntry> = manifests
        .iter()
        .zip(figures)
        .map(|(m, (new_data, shared_data))| ListEntry {
            new_data,
            shared_data,
            ..entry(m)
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no snapshots yet");
        return Ok(0);
    }
    println!(
        "{:<16}  {:<20}  {:<16} {:>10} {:>10} {:>10} {:>8} {:>6}  k+m",
        "snapshot", "created", "volume", "size", "new data", "shared", "stripes", "zero"
    );
    for r in &rows {
        println!(
            "{:<16}  {:<20}  {:<16} {:>10} {:>10} {:>10} {:>8} {:>6}  {}+{}",
            r.snapshot,
            r.created,
            r.volume,
            format_size(r.size),
            format_size(r.new_data),
            format_size(r.shared_data),
            r.stripes,
            r.zero_stripes,
            r.k,
            r.m
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
