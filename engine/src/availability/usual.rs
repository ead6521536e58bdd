//! Usual hours: per hour of the week, how often an agent was up, and a short text such as
//! "usually up Mon-Fri 08-18".

use std::fmt::Write as _;
use std::time::Duration;

use super::SLOT_SECS;

/// Hours in a week.
pub const WEEK: usize = 7 * 24;
/// An hour of the week is *usually up* when the agent was up at least this often in it.
const USUALLY: f64 = 0.5;
/// Below this share of the week's hours observed, the summary says there is too little history.
const ENOUGH: usize = WEEK * 4 / 5;
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// An agent's usual hours, in local time.
#[derive(Debug, Clone, PartialEq)]
pub struct UsualHours {
    /// Per hour of the week, from Monday 00:00 local: the fraction of the observed hours the
    /// agent was up, `None` when that hour was never observed.
    pub fraction: [Option<f64>; WEEK],
}

impl UsualHours {
    /// From observed (Unix hour, value) pairs, value 1 up, 0 down, 0.5 both.
    pub(super) fn from_hours(
        hours: impl Iterator<Item = (u64, f64)>,
        utc_offset_secs: i32,
    ) -> Self {
        let mut sum = [0.0f64; WEEK];
        let mut count = [0u32; WEEK];
        for (h, v) in hours {
            let local = (h * SLOT_SECS) as i64 + i64::from(utc_offset_secs);
            let local_hour = local.div_euclid(3600);
            // 1970-01-01 was a Thursday: day 0 is weekday 3 counting from Monday.
            let weekday = (local_hour.div_euclid(24) + 3).rem_euclid(7);
            let i = (weekday * 24 + local_hour.rem_euclid(24)) as usize;
            sum[i] += v;
            count[i] += 1;
        }
        let mut fraction = [None; WEEK];
        for i in 0..WEEK {
            if count[i] > 0 {
                fraction[i] = Some(sum[i] / f64::from(count[i]));
            }
        }
        UsualHours { fraction }
    }

    /// The fractions, with `default` (e.g. the 30-day availability) for hours never observed:
    /// what [`crate::durability::weekly_availability`] takes.
    pub fn fractions_or(&self, default: f64) -> [f64; WEEK] {
        self.fraction.map(|f| f.unwrap_or(default))
    }

    /// Hours of the week observed at least once.
    pub fn observed(&self) -> usize {
        self.fraction.iter().filter(|f| f.is_some()).count()
    }

    /// Whether hour `i` of the week is usually up (never observed counts as not).
    fn usually_up(&self, i: usize) -> bool {
        self.fraction[i % WEEK].is_some_and(|f| f >= USUALLY)
    }

    /// The longest run of hours of the week, across midnight and the week's end, in which the
    /// agent is usually not up (e.g. 62 hours from Friday 18:00 to Monday 08:00): a `repair-after`
    /// shorter than this rebuilds PCs that were only switched off.
    pub fn longest_usual_absence(&self) -> Duration {
        let (mut best, mut run) = (0usize, 0usize);
        // Twice round the week, so a run across Sunday midnight is counted whole.
        for i in 0..2 * WEEK {
            run = if self.usually_up(i) { 0 } else { run + 1 };
            best = best.max(run);
        }
        Duration::from_secs(best.min(WEEK) as u64 * 3600)
    }

    /// A short text: "usually up Mon-Fri 08-18", "always up", "rarely up", or "too little
    /// history yet (N of the week's 168 hours seen)".
    pub fn summary(&self) -> String {
        let seen = self.observed();
        if seen < ENOUGH {
            return format!("too little history yet ({seen} of the week's {WEEK} hours seen)");
        }
        let days: Vec<[bool; 24]> = (0..7)
            .map(|d| std::array::from_fn(|h| self.usually_up(d * 24 + h)))
            .collect();
        if days.iter().all(|d| d.iter().all(|u| *u)) {
            return "always up".into();
        }
        if days.iter().all(|d| d.iter().all(|u| !*u)) {
            return "rarely up".into();
        }
        let mut parts = Vec::new();
        let mut d = 0;
        while d < 7 {
            let mut e = d;
            while e + 1 < 7 && days[e + 1] == days[d] {
                e += 1;
            }
            if days[d].iter().any(|u| *u) {
                let span = if e > d {
                    format!("{}-{}", DAYS[d], DAYS[e])
                } else {
                    DAYS[d].to_string()
                };
                parts.push(format!("{span} {}", hour_ranges(&days[d])));
            }
            d = e + 1;
        }
        format!("usually up {}", parts.join(", "))
    }
}

/// "08-18", "08-12,13-18" or "all day" for one day's usually-up hours.
fn hour_ranges(day: &[bool; 24]) -> String {
    if day.iter().all(|u| *u) {
        return "all day".into();
    }
    let mut out = String::new();
    let mut h = 0;
    while h < 24 {
        if !day[h] {
            h += 1;
            continue;
        }
        let start = h;
        while h < 24 && day[h] {
            h += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{start:02}-{h:02}");
    }
    out
}
