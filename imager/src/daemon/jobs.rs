//! The jobs themselves, each an engine call: a snapshot with its hooks and pings, a prune, a scrub
//! request, a repair pass. Each returns how it ended and its figures for the journal.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use sa_core::size::format_size;
use sa_engine::fleet::census::Census;
use sa_engine::gc::GcOptions;
use sa_engine::progress::NoProgress;
use sa_engine::repair::watch::WatchState;
use sa_engine::repair::{repair_pass, PassOptions};
use sa_engine::retention::{prune, PruneOptions};
use sa_engine::scrub::{scrub, ScrubOptions};
use sa_engine::snapshot::{snapshot, SnapshotOptions};
use serde_json::{json, Value};

use super::config::{RepairSettings, Settings, VolumeSettings};
use super::hooks;
use super::journal::Outcome;
use super::notify::{ping, Ping};
use super::shared::{now_ms, Shared};

/// How a job ended: outcome, error, figures.
pub struct Ended {
    /// Ok, failed or interrupted.
    pub outcome: Outcome,
    /// Why it failed.
    pub error: Option<String>,
    /// Its figures.
    pub figures: BTreeMap<String, Value>,
}

impl Ended {
    /// A failure with this error.
    pub fn failed(e: impl ToString) -> Ended {
        Ended {
            outcome: Outcome::Failed,
            error: Some(e.to_string()),
            figures: BTreeMap::new(),
        }
    }

    /// An engine error: interrupted when the daemon stops, failed otherwise.
    pub fn of_engine(e: sa_engine::Error) -> Ended {
        if matches!(e, sa_engine::Error::Interrupted(_)) {
            Ended {
                outcome: Outcome::Interrupted,
                error: Some(format!("{e} (the daemon was asked to stop)")),
                figures: BTreeMap::new(),
            }
        } else {
            Ended::failed(e)
        }
    }
}

fn figures(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// A snapshot of `v`: healthcheck `start` ping, pre hook, snapshot, post hook (whenever the pre
/// hook ran), success or fail ping.
pub async fn snapshot_job(shared: &Shared, s: &Settings, v: &VolumeSettings, id: u64) -> Ended {
    if let Some(url) = &v.healthcheck {
        ping(url, Ping::Start, String::new()).await;
    }
    let env = |hook: &str, result: Option<&str>| {
        let mut e = vec![
            ("SA_IMAGE_VOLUME", v.name.clone()),
            ("SA_IMAGE_SOURCE", v.source.display().to_string()),
            ("SA_IMAGE_JOB", id.to_string()),
            ("SA_IMAGE_HOOK", hook.to_string()),
        ];
        if let Some(r) = result {
            e.push(("SA_IMAGE_RESULT", r.to_string()));
        }
        e
    };
    let mut ended = match &v.pre_hook {
        Some(cmd) => match hooks::run("pre_hook", cmd, v.hook_timeout, &env("pre", None)).await {
            Ok(_) => take_snapshot(shared, s, v).await,
            Err(e) => {
                let ended = Ended::failed(format!("{e}; no snapshot was taken"));
                finish_pings(v, &ended).await;
                return ended;
            }
        },
        None => take_snapshot(shared, s, v).await,
    };
    if let Some(cmd) = &v.post_hook {
        let result = if ended.outcome == Outcome::Ok {
            "ok"
        } else {
            "failed"
        };
        let r = hooks::run("post_hook", cmd, v.hook_timeout, &env("post", Some(result))).await;
        if let Err(e) = r {
            ended.error = Some(match ended.error.take() {
                Some(before) => format!("{before}; then {e}"),
                None => format!("{e} (the snapshot itself was stored)"),
            });
            if ended.outcome == Outcome::Ok {
                ended.outcome = Outcome::Failed;
            }
        }
    }
    finish_pings(v, &ended).await;
    ended
}

async fn finish_pings(v: &VolumeSettings, ended: &Ended) {
    let Some(url) = &v.healthcheck else { return };
    match ended.outcome {
        Outcome::Ok => ping(url, Ping::Success, json!(ended.figures).to_string()).await,
        Outcome::Failed => {
            ping(url, Ping::Fail, ended.error.clone().unwrap_or_default()).await;
        }
        // Stopped, not failed: the next start runs it again.
        Outcome::Interrupted => {}
    }
}

async fn take_snapshot(shared: &Shared, s: &Settings, v: &VolumeSettings) -> Ended {
    // Sleeping members are woken before the backup (and only then: not for checks or repairs).
    let fleet = match shared.fleet() {
        Ok(f) => f.with_wake(s.wake.clone()),
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let addrs = s.fleet.addrs().unwrap_or_default();
    let mut opts = SnapshotOptions::new(v.source.clone(), &v.name, addrs);
    opts.k = v.k;
    opts.m = v.m;
    opts.stripe_size = v.stripe_size;
    opts.allow_degraded = v.allow_degraded;
    opts.cache_dir = s.cache_dir.clone();
    match snapshot(&fleet, &opts, &NoProgress, &shared.shutdown).await {
        Ok(r) => Ended {
            outcome: Outcome::Ok,
            error: None,
            figures: figures(&[
                ("snapshot", json!(r.snapshot)),
                ("bytes_sent", json!(r.bytes_sent)),
                ("bytes_read", json!(r.bytes_read)),
                ("new_stripes", json!(r.new_stripes)),
                ("reused_stripes", json!(r.reused_stripes)),
                ("seconds", json!(r.seconds)),
                ("margin", json!(r.margin)),
                ("agents", json!(r.agents)),
                ("agents_unreachable", json!(r.agents_unreachable)),
                ("degraded", json!(r.degraded)),
            ]),
        },
        Err(e) => Ended::of_engine(e),
    }
}

/// The retention policy of `v`, and the collection that follows.
pub async fn prune_job(shared: &Shared, s: &Settings, v: &VolumeSettings) -> Ended {
    let Some(policy) = v.retention else {
        return Ended::failed("no retention policy");
    };
    let fleet = match shared.fleet() {
        Ok(f) => f,
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let opts = PruneOptions {
        agents: s.fleet.addrs().unwrap_or_default(),
        policy,
        volume: Some(v.name.clone()),
        gc: GcOptions {
            grace: v.gc_grace,
            dry_run: false,
        },
    };
    let run = prune(&fleet, &opts);
    let r = tokio::select! {
        r = run => r,
        () = shared.shutdown.cancelled() => return Ended::of_engine(
            sa_engine::Error::Interrupted("prune stopped".into())),
    };
    match r {
        Ok(r) => {
            let freed: u64 =
                r.gc.as_ref()
                    .map(|g| g.agents.iter().map(|a| a.bytes_freed).sum())
                    .unwrap_or(0);
            // The same retention for the offsite copy: tombstones, then what nothing names.
            let mut offsite_deleted = None;
            if let Some(o) = &v.offsite {
                let swept = match sa_engine::offsite::OffsiteStore::open(&o.config) {
                    Ok(bucket) => {
                        let so = sa_engine::offsite::SweepOptions {
                            agents: opts.agents.clone(),
                            grace: v.gc_grace,
                            offsite_only: false,
                            dry_run: false,
                        };
                        sa_engine::offsite::sweep(&fleet, &bucket, &so).await
                    }
                    Err(e) => Err(e),
                };
                match swept {
                    Ok(sw) => offsite_deleted = Some(sw.shards_deleted),
                    Err(e) => {
                        return Ended::failed(format!(
                            "{} snapshot(s) removed on the agents, but the offsite copy was not \
                             collected: {e}",
                            r.removed.len()
                        ))
                    }
                }
            }
            Ended {
                outcome: Outcome::Ok,
                error: None,
                figures: figures(&[
                    ("kept", json!(r.snapshots.len() - r.removed.len())),
                    ("removed", json!(r.removed.len())),
                    ("removed_ids", json!(r.removed)),
                    ("bytes_freed", json!(freed)),
                    ("offsite_shards_deleted", json!(offsite_deleted)),
                    ("warnings", json!(r.warnings)),
                ]),
            }
        }
        Err(e) => Ended::of_engine(e),
    }
}

/// Pushes the volume's snapshots to its offsite copy (what the bucket lacks).
pub async fn offsite_job(shared: &Shared, s: &Settings, v: &VolumeSettings) -> Ended {
    let Some(o) = &v.offsite else {
        return Ended::failed("no offsite table");
    };
    let fleet = match shared.fleet() {
        Ok(f) => f,
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let bucket = match sa_engine::offsite::OffsiteStore::open(&o.config) {
        Ok(b) => b,
        Err(e) => return Ended::of_engine(e),
    };
    let opts = sa_engine::offsite::PushOptions {
        agents: s.fleet.addrs().unwrap_or_default(),
        volume: Some(v.name.clone()),
        rate: o.rate,
        shards: o.config.shards,
    };
    match sa_engine::offsite::push(&fleet, &bucket, &opts, &NoProgress, &shared.shutdown).await {
        Ok(r) => Ended {
            outcome: Outcome::Ok,
            error: None,
            figures: figures(&[
                ("shards_uploaded", json!(r.shards_uploaded)),
                ("bytes_uploaded", json!(r.bytes_uploaded)),
                ("manifests_uploaded", json!(r.manifests_uploaded)),
                ("seconds", json!(r.seconds)),
            ]),
        },
        Err(e) => Ended::of_engine(e),
    }
}

/// Asks every agent for a scrub pass (the agents run it in the background; each status check
/// gathers what they found).
pub async fn scrub_job(shared: &Shared, s: &Settings) -> Ended {
    let fleet = match shared.fleet() {
        Ok(f) => f,
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let opts = ScrubOptions {
        agents: s.fleet.addrs().unwrap_or_default(),
        start: true,
        wait: false,
    };
    match scrub(&fleet, &opts).await {
        Ok(r) => {
            let asked: Vec<&str> = r
                .agents
                .iter()
                .filter(|a| !a.status.starts_with("failed") && !a.status.starts_with("unreach"))
                .map(|a| a.addr.as_str())
                .collect();
            let failed: Vec<String> = r
                .agents
                .iter()
                .filter(|a| a.status.starts_with("failed"))
                .map(|a| format!("{}: {}", a.addr, a.status))
                .collect();
            Ended {
                outcome: if failed.is_empty() {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                },
                error: (!failed.is_empty()).then(|| failed.join("; ")),
                figures: figures(&[
                    ("agents_asked", json!(asked.len())),
                    ("bad_unrestored", json!(r.bad_unrestored)),
                ]),
            }
        }
        Err(e) => Ended::of_engine(e),
    }
}

/// One repair pass, holding back the shards of agents missing for less than `repair_after`
/// (their clock is kept in `state`, as `repair --watch` keeps it). Returns how it ended and the
/// backlog it left.
pub async fn repair_job(
    shared: &Shared,
    s: &Settings,
    r: RepairSettings,
    state: &mut WatchState,
) -> (Ended, u64) {
    let fleet = match shared.fleet() {
        Ok(f) => f,
        Err(e) => return (Ended::failed(format!("{e:#}")), 0),
    };
    let opts = PassOptions {
        dry_run: false,
        cache_dir: s.cache_dir.clone(),
        agents: s.fleet.addrs().unwrap_or_default(),
    };
    let at = now_ms();
    let mut hold = |census: &Census| -> HashSet<[u8; 16]> {
        let hold = state.observe(census, at, r.after);
        state.save();
        hold
    };
    let result = tokio::select! {
        res = repair_pass(&fleet, &opts, &mut hold) => res,
        () = shared.shutdown.cancelled() => return (Ended::of_engine(
            sa_engine::Error::Interrupted("repair pass stopped".into())), 0),
    };
    match result {
        Ok(rep) => {
            let backlog = rep.shards_held + rep.shards_failed;
            let outcome = if rep.stripes_lost > 0 || rep.shards_failed > 0 {
                Outcome::Failed
            } else {
                Outcome::Ok
            };
            let error = (outcome == Outcome::Failed).then(|| {
                format!(
                    "{} shard(s) could not be placed, {} stripe(s) lost: start more agents or \
                     bring back the missing ones",
                    rep.shards_failed, rep.stripes_lost
                )
            });
            if rep.shards_rebuilt > 0 {
                shared.event(
                    "info",
                    format!(
                        "repair rebuilt {} shard(s) ({})",
                        rep.shards_rebuilt,
                        format_size(rep.bytes_rebuilt)
                    ),
                );
            }
            let ended = Ended {
                outcome,
                error,
                figures: figures(&[
                    ("shards_rebuilt", json!(rep.shards_rebuilt)),
                    ("bytes_rebuilt", json!(rep.bytes_rebuilt)),
                    ("shards_failed", json!(rep.shards_failed)),
                    ("shards_held", json!(rep.shards_held)),
                    ("stripes_lost", json!(rep.stripes_lost)),
                ]),
            };
            (ended, backlog)
        }
        Err(e) => (Ended::of_engine(e), 0),
    }
}

/// The repair watcher's state file in the state directory.
pub fn watch_state_path(s: &Settings) -> PathBuf {
    s.state_dir.join("repair-watch")
}
