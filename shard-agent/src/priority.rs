//! `--priority low` (the default): the agent yields the desk PC's CPU and disk to its user.
//!
//! | OS | CPU | disk |
//! |---|---|---|
//! | Linux | nice 10 (or more if started nicer) | idle I/O class (`ioprio_set`; honoured by the BFQ scheduler, ignored by `none`/`mq-deadline`) |
//! | macOS | nice 10 (or more) | the launchd job's `LowPriorityIO` and `ProcessType` `Background` (packaging/macos) |
//! | Windows | background mode (`THREAD_MODE_BACKGROUND_BEGIN`: low CPU, I/O and memory priority) | same |
//!
//! Linux's nice and I/O class belong to each thread and are inherited by threads created later,
//! so [`lower_process`] runs first in `main`, before the runtime starts its threads. Windows'
//! background mode can only be entered by a thread for itself: [`lower_thread`] runs on every
//! runtime thread as it starts (and on the main thread).

use std::fmt;
use std::str::FromStr;

/// How the agent competes with the PC's user for CPU and disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Yield to everything else (the default).
    #[default]
    Low,
    /// The OS's normal priority.
    Normal,
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            other => Err(format!("priority '{other}' is not low or normal")),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
        })
    }
}

/// The nice value of a low-priority agent on Unix.
pub const LOW_NICE: i32 = 10;

/// Lowers the calling thread's CPU and I/O priority for itself and every thread it creates
/// later (Unix); call it before starting any thread. Returns what was done, for the log.
pub fn lower_process() -> Result<&'static str, String> {
    #[cfg(unix)]
    {
        // Only ever raises the nice value (started nicer still, it stays so): no privilege needed.
        let now = rustix::process::getpriority_process(None).unwrap_or(0);
        if now < LOW_NICE {
            rustix::process::setpriority_process(None, LOW_NICE)
                .map_err(|e| format!("cannot lower the CPU priority (nice {LOW_NICE}): {e}"))?;
        }
    }
    #[cfg(target_os = "linux")]
    {
        use ioprio::{Class, Pid, Priority as Io, Target};
        ioprio::set_priority(Target::Process(Pid::from_raw(0)), Io::new(Class::Idle))
            .map_err(|e| format!("cannot set the idle I/O class: {e}"))?;
        Ok("nice 10 or more, idle I/O class")
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        Ok("nice 10 or more")
    }
    #[cfg(windows)]
    {
        lower_thread()?;
        Ok("background mode")
    }
    #[cfg(not(any(unix, windows)))]
    {
        Ok("unchanged (no priority control on this OS)")
    }
}

/// Puts the calling thread in background mode (Windows); nothing elsewhere, where threads
/// inherit [`lower_process`].
pub fn lower_thread() -> Result<(), String> {
    #[cfg(windows)]
    {
        use thread_priority::{set_current_thread_priority, ThreadPriority, WinAPIThreadPriority};
        set_current_thread_priority(ThreadPriority::Os(
            WinAPIThreadPriority::BackgroundModeBegin.into(),
        ))
        .map_err(|e| format!("cannot enter background mode: {e:?}"))?;
    }
    Ok(())
}
