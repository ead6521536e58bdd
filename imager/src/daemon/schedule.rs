//! When jobs run: calendar expressions, cron patterns, or a fixed interval. Wall-clock forms are
//! evaluated in the server's local time zone by the `croner` crate (calendar forms are turned into
//! cron patterns first).
//!
//! | form | example | meaning |
//! |---|---|---|
//! | `hourly`, `daily`, `weekly`, `monthly` | `daily` | at 00 minutes; at 00:00; Mondays 00:00; the 1st, 00:00 |
//! | `[daily] [DAYS] H:M[:S]` | `daily 02:00`, `Mon..Fri *:00/30`, `Sat,Sun 08:15` | systemd-style: each of H, M, S is `*`, `N`, `N/STEP`, `A..B` or `A,B`; DAYS are `Mon`..`Sun`, `A..B` or `A,B` |
//! | cron, 5 fields | `30 2 * * 1-5` | minute hour day-of-month month day-of-week (croner's syntax: `L`, `#`, `W`, names, `@daily`) |
//! | cron, 6 fields | `*/20 * * * * *` | seconds first |
//! | `every DURATION` | `every 6h`, `every 20s` | that long after the previous run started (not tied to the clock) |
//! | `never` | | no run (a volume only watched, or no scrub) |

use std::str::FromStr;
use std::time::Duration;

use chrono::{Local, TimeZone};
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron pattern (calendar forms included), with the text given.
    Cron {
        /// The pattern.
        cron: Box<Cron>,
        /// What the config said.
        text: String,
    },
    /// A fixed interval after the previous start.
    Every(Duration),
    /// Never.
    Never,
}

impl Schedule {
    /// Parses a schedule (see the module docs); the error says what was wrong and what to write.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let t = text.trim();
        let hint = "use e.g. `daily 02:00`, `Mon..Fri *:00/30`, `every 6h`, or cron `30 2 * * *`";
        if t.is_empty() {
            return Err(format!("empty schedule: {hint}"));
        }
        if t.eq_ignore_ascii_case("never") {
            return Ok(Schedule::Never);
        }
        if let Some(d) = t.strip_prefix("every ") {
            let d = sa_core::duration::parse_duration(d).map_err(|e| format!("{e}"))?;
            if d < Duration::from_secs(1) {
                return Err(format!("'{t}': the interval must be at least 1s"));
            }
            return Ok(Schedule::Every(d));
        }
        let pattern = if is_calendar(t) {
            calendar_to_cron(t).map_err(|e| format!("'{t}': {e}; {hint}"))?
        } else {
            t.to_string()
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(&pattern)
            .map_err(|e| format!("'{t}' is not a schedule ({e}); {hint}"))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            text: t.to_string(),
        })
    }

    /// The first run strictly after `after_ms` (Unix ms); None for [`Schedule::Never`] (or a
    /// pattern with no future time).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Schedule::Never => None,
            Schedule::Every(d) => Some(after_ms + d.as_millis() as u64),
            Schedule::Cron { cron, .. } => {
                let at = Local.timestamp_millis_opt(after_ms as i64).single()?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The longest time between two runs over the next 64 of them from now (an interval for
    /// [`Schedule::Every`]; a day for [`Schedule::Never`]): the base of a volume's default
    /// `max_age`.
    pub fn longest_gap(&self) -> Duration {
        let now = sa_engine::clock::Clock::now_ms(&sa_engine::clock::SystemClock);
        let mut longest = 0;
        let Some(mut t) = self.next_after(now) else {
            return Duration::from_secs(86400);
        };
        for _ in 0..64 {
            let Some(n) = self.next_after(t) else { break };
            longest = longest.max(n - t);
            t = n;
        }
        Duration::from_millis(longest)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Cron { text, .. } => f.write_str(text),
            Schedule::Every(d) => {
                write!(f, "every {}", sa_core::duration::format_span(d.as_secs()))
            }
            Schedule::Never => f.write_str("never"),
        }
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Schedule::parse(s)
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn is_calendar(t: &str) -> bool {
    let first = t.split_whitespace().next().unwrap_or("").to_lowercase();
    t.contains(':')
        || ["hourly", "daily", "weekly", "monthly"].contains(&first.as_str())
        || DAYS.iter().any(|d| first.starts_with(d))
}

/// `daily 02:00` → `0 0 2 * * *`, `Mon..Fri *:00/30` → `0 0-59/30 * * * MON-FRI`.
fn calendar_to_cron(t: &str) -> Result<String, String> {
    let mut words: Vec<String> = t.split_whitespace().map(str::to_lowercase).collect();
    match words.as_slice() {
        [w] if w == "hourly" => return Ok("0 0 * * * *".into()),
        [w] if w == "daily" => return Ok("0 0 0 * * *".into()),
        [w] if w == "weekly" => return Ok("0 0 0 * * MON".into()),
        [w] if w == "monthly" => return Ok("0 0 0 1 * *".into()),
        _ => {}
    }
    if words.first().is_some_and(|w| w == "daily") {
        words.remove(0);
    }
    let (days, time) = match words.as_slice() {
        [time] if time.contains(':') => ("*".to_string(), time.as_str()),
        [days, time] if time.contains(':') => (weekdays(days)?, time.as_str()),
        [days] => (weekdays(days)?, "00:00"),
        _ => return Err("expected [DAYS] HH:MM[:SS]".into()),
    };
    let parts: Vec<&str> = time.split(':').collect();
    let (h, m, s) = match parts[..] {
        [h, m] => (h, m, "0"),
        [h, m, s] => (h, m, s),
        _ => return Err(format!("'{time}' is not HH:MM or HH:MM:SS")),
    };
    Ok(format!(
        "{} {} {} * * {days}",
        field(s, 59)?,
        field(m, 59)?,
        field(h, 23)?
    ))
}

/// One time field: `*`, `N`, `N/STEP`, `*/STEP`, `A..B`, `A,B` → cron.
fn field(f: &str, max: u32) -> Result<String, String> {
    let num = |x: &str| -> Result<u32, String> {
        let n: u32 = x.parse().map_err(|_| format!("'{x}' is not a number"))?;
        if n > max {
            return Err(format!("{n} is out of range (0..{max})"));
        }
        Ok(n)
    };
    if f == "*" {
        return Ok("*".into());
    }
    if let Some((start, step)) = f.split_once('/') {
        let step = num(step)?;
        if step == 0 {
            return Err("a step of 0".into());
        }
        let start = if start == "*" { 0 } else { num(start)? };
        return Ok(format!("{start}-{max}/{step}"));
    }
    if let Some((a, b)) = f.split_once("..") {
        return Ok(format!("{}-{}", num(a)?, num(b)?));
    }
    let list: Result<Vec<String>, String> = f
        .split(',')
        .map(|x| num(x).map(|n| n.to_string()))
        .collect();
    Ok(list?.join(","))
}

/// `Mon..Fri` → `MON-FRI`, `Sat,Sun` → `SAT,SUN`.
fn weekdays(w: &str) -> Result<String, String> {
    let day = |d: &str| -> Result<String, String> {
        let d3 = d.get(..3).unwrap_or(d);
        if DAYS.contains(&d3) && DAYS.iter().any(|full| d.starts_with(full)) {
            Ok(d3.to_uppercase())
        } else {
            Err(format!("'{d}' is not a day (Mon, Tue, ... Sun)"))
        }
    };
    if let Some((a, b)) = w.split_once("..") {
        return Ok(format!("{}-{}", day(a)?, day(b)?));
    }
    let list: Result<Vec<String>, String> = w.split(',').map(day).collect();
    Ok(list?.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Timelike};

    fn local_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Local
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .unwrap()
            .timestamp_millis() as u64
    }

    fn at(ms: u64) -> chrono::DateTime<Local> {
        Local.timestamp_millis_opt(ms as i64).single().unwrap()
    }

    #[test]
    fn calendar_forms_become_cron() {
        for (cal, cron) in [
            ("daily 02:00", "0 0 2 * * *"),
            ("Mon..Fri *:00/30", "0 0-59/30 * * * MON-FRI"),
            ("Sat,Sun 08:15:30", "30 15 8 * * SAT,SUN"),
            ("*:*:0/20", "0-59/20 * * * * *"),
            ("9..17:00", "0 0 9-17 * * *"),
            ("weekly", "0 0 0 * * MON"),
            ("Sun", "0 0 0 * * SUN"),
        ] {
            assert_eq!(
                calendar_to_cron(&cal.to_lowercase()).unwrap(),
                cron,
                "{cal}"
            );
            Schedule::parse(cal).unwrap();
        }
    }

    #[test]
    fn next_runs() {
        // Wednesday 2025-01-15 10:10 local.
        let wed = local_ms(2025, 1, 15, 10, 10, 0);
        let s = Schedule::parse("daily 02:00").unwrap();
        let n = at(s.next_after(wed).unwrap());
        assert_eq!((n.day(), n.hour(), n.minute()), (16, 2, 0));
        let s = Schedule::parse("Mon..Fri *:00/30").unwrap();
        let n = at(s.next_after(wed).unwrap());
        assert_eq!((n.day(), n.hour(), n.minute()), (15, 10, 30));
        // Friday 23:50 → Monday 00:00.
        let fri = local_ms(2025, 1, 17, 23, 50, 0);
        let n = at(s.next_after(fri).unwrap());
        assert_eq!((n.day(), n.hour(), n.minute()), (20, 0, 0));
        let s = Schedule::parse("*/20 * * * * *").unwrap();
        assert_eq!(s.next_after(wed).unwrap(), wed + 20_000);
        let s = Schedule::parse("30 2 * * *").unwrap();
        let n = at(s.next_after(wed).unwrap());
        assert_eq!((n.day(), n.hour(), n.minute()), (16, 2, 30));
        assert_eq!(
            Schedule::parse("every 90s").unwrap().next_after(wed),
            Some(wed + 90_000)
        );
        assert_eq!(Schedule::parse("never").unwrap().next_after(wed), None);
        // Strictly after: a run at exactly 02:00 is followed by the next day's.
        let two = local_ms(2025, 1, 16, 2, 0, 0);
        let s = Schedule::parse("daily 02:00").unwrap();
        assert_eq!(at(s.next_after(two).unwrap()).day(), 17);
    }

    #[test]
    fn gaps() {
        let s = Schedule::parse("Mon..Fri 02:00").unwrap();
        // Friday to Monday.
        let g = s.longest_gap().as_secs();
        assert!((3 * 86400 - 3600..=3 * 86400 + 3600).contains(&g), "{g}");
        assert_eq!(
            Schedule::parse("every 6h").unwrap().longest_gap(),
            Duration::from_secs(6 * 3600)
        );
    }

    #[test]
    fn bad_schedules_say_what_to_write() {
        for bad in [
            "",
            "dialy 02:00",
            "daily 25:00",
            "Mon..Fry 02:00",
            "every soon",
            "every 0s",
            "* * *",
            "12:00:00:00",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(
                e.contains("daily 02:00") || e.contains("duration") || e.contains("1s"),
                "{bad:?}: {e}"
            );
        }
    }
}
