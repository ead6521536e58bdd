//! Scheduled recovery drills ([`sa_engine::drill`], settings in [`super::config::drill`]): the
//! job, and what the status page shows of it.
//!
//! A drill that fails is a failed job, so the journal's `job_failed/drill/VOLUME` alert
//! ([`super::health`]) fires through the usual path and is resolved by the next drill that
//! passes. The drill's work directory is `STATE_DIR/drill-work`; each volume's last screenshot is
//! kept as `STATE_DIR/drill/HEX.png` (HEX: the volume name in hex, safe in a path and a URL) and
//! served at `/drill/HEX.png`.

use std::fmt::Write;
use std::path::PathBuf;

use sa_core::keys::hex;
use sa_engine::drill::drill;
use serde_json::json;

use super::config::{Settings, VolumeSettings};
use super::jobs::Ended;
use super::journal::{JobKind, Outcome};
use super::shared::{lock, Shared};

/// Where a volume's last screenshot is kept.
pub fn screenshot_path(s: &Settings, volume: &str) -> PathBuf {
    s.state_dir
        .join("drill")
        .join(format!("{}.png", hex(volume.as_bytes())))
}

/// A drill of `v`'s newest snapshot.
pub async fn drill_job(shared: &Shared, s: &Settings, v: &VolumeSettings) -> Ended {
    let Some(d) = &v.drill else {
        return Ended::failed("no [drill] settings for this volume");
    };
    let fleet = match shared.fleet() {
        Ok(f) => f,
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let mut args = d.args.clone();
    args.volume = Some(v.name.clone());
    args.fleet = s.fleet.clone();
    let opts = match crate::cmd::drill::options(&args, || Some(s.state_dir.join("drill-work"))) {
        Ok(o) => o,
        Err(e) => return Ended::failed(format!("{e:#}")),
    };
    let r = match drill(&fleet, &opts, &shared.shutdown).await {
        Ok(r) => r,
        Err(e) => return Ended::of_engine(e),
    };
    let shot = screenshot_path(s, &v.name);
    if !r.screenshot.is_empty() {
        let saved = std::fs::create_dir_all(shot.parent().unwrap_or(&s.state_dir))
            .and_then(|()| std::fs::write(&shot, &r.screenshot));
        if let Err(e) = saved {
            tracing::warn!(
                "cannot keep the drill's screenshot in {}: {e}",
                shot.display()
            );
        }
    } else {
        let _ = std::fs::remove_file(&shot);
    }
    Ended {
        outcome: if r.passed {
            Outcome::Ok
        } else {
            Outcome::Failed
        },
        error: (!r.passed)
            .then(|| format!("the drill of snapshot {} failed: {}", r.snapshot, r.reason)),
        figures: [
            ("snapshot", json!(r.snapshot)),
            ("passed", json!(r.passed)),
            ("reason", json!(r.reason)),
            ("boot_seconds", json!(r.boot_seconds)),
            ("seconds", json!(r.seconds)),
            ("withheld", json!(r.withheld)),
            ("stripes_rebuilt", json!(r.stripes_rebuilt)),
            ("screenshot_bytes", json!(r.screenshot_bytes)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

/// The page's lines about `volume`'s last drill: result, why, and the screenshot.
pub fn page_html(
    h: &mut String,
    shared: &Shared,
    s: &Settings,
    volume: &str,
    esc: fn(&str) -> String,
) {
    let last = lock(&shared.journal)
        .last_done
        .get(&(JobKind::Drill, Some(volume.to_string())))
        .cloned();
    let Some(j) = last else {
        if s.volumes
            .iter()
            .any(|v| v.name == volume && v.drill.is_some())
        {
            h.push_str("<p class=small>No recovery drill yet</p>");
        }
        return;
    };
    let passed = j.outcome == Some(Outcome::Ok);
    let reason = j
        .figures
        .get("reason")
        .and_then(|r| r.as_str())
        .map(str::to_string)
        .or(j.error.clone())
        .unwrap_or_default();
    let _ = write!(
        h,
        "<p class=small>Last recovery drill {}: {}</p>",
        if passed { "passed" } else { "FAILED" },
        esc(&reason)
    );
    if screenshot_path(s, volume).exists() {
        let _ = write!(
            h,
            "<img class=shot src=\"/drill/{}.png\" alt=\"screen at the end of the last drill\" \
             width=360>",
            hex(volume.as_bytes())
        );
    }
}

/// The bytes of `/drill/HEX.png`, when that volume has a screenshot.
pub fn screenshot(s: &Settings, path: &str) -> Option<Vec<u8>> {
    let name = path.strip_prefix("/drill/")?.strip_suffix(".png")?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let vol = s.volumes.iter().find(|v| hex(v.name.as_bytes()) == name)?;
    std::fs::read(screenshot_path(s, &vol.name)).ok()
}
