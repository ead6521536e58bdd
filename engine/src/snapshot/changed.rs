//! Changed-block hints: `--changed-map FILE` lists the byte ranges of the volume that changed
//! since the `--changed-since` snapshot. Stripes that no range touches are taken from that
//! snapshot's manifest without reading the source.
//!
//! Format: text, one range per line, `OFFSET LENGTH` (separated by spaces, tabs or a comma),
//! each a decimal number or `0x` hex; blank lines and `#` comments are ignored. Ranges may
//! overlap and come in any order, e.g. from a hypervisor's dirty bitmap (one line per dirty
//! block) or `filefrag`/`qemu-img map` extents:
//! ```text
//! # offset length
//! 0 4096
//! 0x40000000 0x100000
//! ```

use std::path::Path;

use sa_core::layout::Layout;

use crate::error::{Error, IoContext, Result};

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a changed map; every range must lie within `volume_size`.
pub fn parse(text: &str, volume_size: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|f| !f.is_empty())
            .collect();
        let (Some(off), Some(len), 2) = (
            fields.first().and_then(|f| number(f)),
            fields.get(1).and_then(|f| number(f)),
            fields.len(),
        ) else {
            return Err(Error::invalid(format!(
                "changed map line {}: expected `OFFSET LENGTH` (decimal or 0x hex), found {line:?}",
                n + 1
            )));
        };
        if off.checked_add(len).is_none_or(|end| end > volume_size) {
            return Err(Error::invalid(format!(
                "changed map line {}: range {off}+{len} goes past the end of the {volume_size}-byte volume",
                n + 1
            )));
        }
        if len > 0 {
            out.push((off, len));
        }
    }
    Ok(out)
}

/// Reads and parses a changed-map file.
pub fn load(path: &Path, volume_size: u64) -> Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(path)
        .ctx(|| format!("cannot read changed map {}", path.display()))?;
    parse(&text, volume_size).map_err(|e| match e {
        Error::Invalid(why) => Error::Invalid(format!("{}: {why}", path.display())),
        e => e,
    })
}

/// Per stripe: does any range touch it?
pub fn touched(ranges: &[(u64, u64)], layout: &Layout) -> Vec<bool> {
    let mut t = vec![false; layout.stripe_count() as usize];
    for &(off, len) in ranges {
        for s in layout.stripe_of(off)..=layout.stripe_of(off + len - 1) {
            t[s as usize] = true;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_marks_stripes() {
        let layout = Layout::new(16 << 20, 4 << 20, 4, 2).unwrap();
        let r = parse(
            "# header\n0 1\n\n0x800000, 0x400001  # spans two\n100 0\n",
            16 << 20,
        )
        .unwrap();
        assert_eq!(r, vec![(0, 1), (0x80_0000, 0x40_0001)]);
        assert_eq!(touched(&r, &layout), vec![true, false, true, true]);
        assert!(parse("1\n", 1 << 20).is_err());
        assert!(parse("x 1\n", 1 << 20).is_err());
        assert!(parse("0 1 2\n", 1 << 20).is_err());
        assert!(parse("1048575 2\n", 1 << 20).is_err(), "past the end");
        assert!(
            parse("18446744073709551615 2\n", 1 << 20).is_err(),
            "overflow"
        );
    }
}
