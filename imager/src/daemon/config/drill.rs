//! `[volume.NAME.drill]`: scheduled recovery drills of a volume's newest snapshot (see
//! `sa-image drill` and [`sa_engine::drill`]). `every` (a duration such as `7d`, or any
//! schedule: `Sun 05:00`, `every 3d`) turns them on; the other keys are `drill`'s flags:
//! `console`, `port`, `screenshot_after`, `deadline`, `withhold`, `memory`, `cpus`,
//! `firmware`, `disk_bus`, `accel`, `qemu`. A failed drill is a failed job: the daemon's
//! `job_failed` alert fires until a later drill passes.

use std::path::PathBuf;

use anyhow::Result;
use serde::Deserialize;

use super::super::schedule::Schedule;
use crate::cmd::drill::DrillArgs;
use crate::exit::usage;

/// The table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrillTable {
    every: Option<String>,
    console: Option<String>,
    port: Option<u16>,
    screenshot_after: Option<String>,
    deadline: Option<String>,
    withhold: Option<usize>,
    memory: Option<String>,
    cpus: Option<u32>,
    firmware: Option<String>,
    disk_bus: Option<String>,
    accel: Option<String>,
    qemu: Option<PathBuf>,
}

/// A volume's drills, checked.
#[derive(Debug, Clone)]
pub struct DrillSettings {
    /// When.
    pub every: Schedule,
    /// `drill`'s flags (the volume, agents and work directory are filled in by the job).
    pub args: DrillArgs,
}

/// Checks `[volume.NAME.drill]` (`at` names it in messages). None when `every` is absent or
/// `never`.
pub fn check(t: &DrillTable, at: &str) -> Result<Option<DrillSettings>> {
    let Some(every) = t.every.as_deref() else {
        return Ok(None);
    };
    let every = match sa_core::duration::parse_duration(every) {
        Ok(d) if d.as_secs() >= 60 => Schedule::Every(d),
        Ok(_) => return Err(usage(format!("{at}.every: drills at most once a minute"))),
        Err(_) => Schedule::parse(every).map_err(|e| usage(format!("{at}.every: {e}")))?,
    };
    if matches!(every, Schedule::Never) {
        return Ok(None);
    }
    let args = DrillArgs {
        console: t.console.clone(),
        port: t.port,
        screenshot_after: t.screenshot_after.clone(),
        deadline: t.deadline.clone(),
        withhold: t.withhold,
        memory: t.memory.clone(),
        cpus: t.cpus,
        firmware: t.firmware.clone(),
        disk_bus: t.disk_bus.clone(),
        accel: t.accel.clone(),
        qemu: t.qemu.clone(),
        ..DrillArgs::default()
    };
    // The same checks as the command's flags, now rather than at the first drill (the agents
    // are the top level's, checked there).
    let mut probe = args.clone();
    probe.fleet.agents = Some(vec!["127.0.0.1".into()]);
    crate::cmd::drill::options(&probe, || Some(PathBuf::from("/")))
        .map_err(|e| usage(format!("{at}: {e:#}")))?;
    Ok(Some(DrillSettings { every, args }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> DrillTable {
        toml::from_str(text).expect("a drill table")
    }

    #[test]
    fn every_turns_drills_on_and_the_flags_are_checked_at_load() {
        let d = check(&table("every = \"7d\"\nconsole = \"login:\""), "v")
            .unwrap()
            .expect("drills on");
        assert!(matches!(d.every, Schedule::Every(t) if t.as_secs() == 7 * 86400));
        assert_eq!(d.args.console.as_deref(), Some("login:"));
        assert!(check(&table("console = \"x\""), "v").unwrap().is_none());
        assert!(check(&table("every = \"never\"\nconsole = \"x\""), "v")
            .unwrap()
            .is_none());
        let err = |t: &str| format!("{:#}", check(&table(t), "volume.s.drill").unwrap_err());
        assert!(err("every = \"7d\"").contains("needs something to wait for"));
        assert!(err("every = \"30s\"\nport = 22").contains("at most once a minute"));
        assert!(err("every = \"7d\"\nport = 22\nfirmware = \"efi\"").contains("bios or uefi"));
        assert!(err("every = \"sometimes\"\nport = 22").contains("volume.s.drill.every"));
        assert!(toml::from_str::<DrillTable>("evry = \"7d\"").is_err());
    }
}
