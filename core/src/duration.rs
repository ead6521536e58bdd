//! Human durations, one grammar for every flag and config key: `90s`, `30m`, `1.5h`, `7d`,
//! `200ms`, `2w`, `1h 30m`, `0`, or a bare number of seconds. Whole-unit forms and combinations
//! are [`humantime`]'s grammar (`2days 4h`, `15min`); a decimal with one unit (`1.5h`) and a bare
//! number are accepted on top of it. [`format_age`] says how long ago something was, in words.

use std::time::Duration;

use crate::error::{Error, Result};

/// The longest duration accepted (a century): beyond it a typo is likelier than intent.
const MAX_SECS: f64 = 100.0 * 365.0 * 86400.0;

/// Parses a duration (see the module docs).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let bad = || {
        Error::Invalid(format!(
            "'{text}' is not a duration: use e.g. 90s, 30m, 1.5h, 7d, 1h 30m (a bare number is seconds)"
        ))
    };
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(d) = humantime::parse_duration(t) {
        return check(d.as_secs_f64(), text).map(|()| d);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" | "sec" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        "w" => n * 7.0 * 86400.0,
        _ => return Err(bad()),
    };
    check(secs, text)?;
    Ok(Duration::from_secs_f64(secs))
}

fn check(secs: f64, text: &str) -> Result<()> {
    if !secs.is_finite() || !(0.0..=MAX_SECS).contains(&secs) {
        return Err(Error::Invalid(format!(
            "'{text}' is out of range (0 to 100 years)"
        )));
    }
    Ok(())
}

/// How long `secs` seconds is, in words, rounded down to the largest unit: `just now`,
/// `45 seconds`, `1 minute`, `3 hours`, `2 days`, `3 weeks`, `5 months`, `2 years`.
pub fn format_span(secs: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (365 * 86400, "year"),
        (30 * 86400, "month"),
        (7 * 86400, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ];
    for (size, name) in UNITS {
        if secs >= size {
            let n = secs / size;
            return format!("{n} {name}{}", if n == 1 { "" } else { "s" });
        }
    }
    if secs == 0 {
        "no time".into()
    } else {
        format!("{secs} second{}", if secs == 1 { "" } else { "s" })
    }
}

/// When something happened `secs` seconds ago, in words: `just now`, `5 seconds ago`,
/// `3 weeks ago`.
pub fn format_age(secs: u64) -> String {
    if secs == 0 {
        "just now".into()
    } else {
        format!("{} ago", format_span(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar() {
        let s = |x| parse_duration(x).unwrap();
        assert_eq!(s("90s"), Duration::from_secs(90));
        assert_eq!(s("30m"), Duration::from_secs(1800));
        assert_eq!(s("24h"), Duration::from_secs(86400));
        assert_eq!(s("7d"), Duration::from_secs(7 * 86400));
        assert_eq!(s("2w"), Duration::from_secs(14 * 86400));
        assert_eq!(s("200ms"), Duration::from_millis(200));
        assert_eq!(s("15"), Duration::from_secs(15));
        assert_eq!(s("0"), Duration::ZERO);
        assert_eq!(s("0s"), Duration::ZERO);
        assert_eq!(s("1.5h"), Duration::from_secs(5400));
        assert_eq!(s("1h 30m"), Duration::from_secs(5400));
        assert_eq!(s("2days 4h"), Duration::from_secs(2 * 86400 + 4 * 3600));
        for bad in ["", "h", "5x", "-1s", "1e999s", "1y2"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("1000y").is_err());
    }

    #[test]
    fn ages_in_words() {
        assert_eq!(format_age(0), "just now");
        assert_eq!(format_age(1), "1 second ago");
        assert_eq!(format_age(45), "45 seconds ago");
        assert_eq!(format_age(60), "1 minute ago");
        assert_eq!(format_age(3 * 3600 + 5), "3 hours ago");
        assert_eq!(format_age(1_814_400), "3 weeks ago");
        assert_eq!(format_age(86400 * 400), "1 year ago");
        assert_eq!(format_span(0), "no time");
    }
}
