//! Exit codes, the same for every command (documented in `sa-image --help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success: sound, full redundancy, nothing to do |
//! | 1 | error: the operation failed (message on stderr) |
//! | 2 | degraded: shards missing or corrupt but every stripe recoverable (`verify`, `status`, `scrub`, `repair`) |
//! | 3 | data lost: some stripe cannot be rebuilt now (`verify`, `status`, `repair`, `restore`) |
//! | 4 | stale: `status --max-age` or `--max-absence` exceeded (a newest snapshot too old, an agent absent too long), and no data lost |
//! | 64 | usage: a wrong flag, a missing setting, a bad value (sysexits `EX_USAGE`) |

use std::fmt;

/// Success.
pub const OK: u8 = 0;
/// The operation failed.
pub const ERROR: u8 = 1;
/// Data is lost (stripes cannot be rebuilt now).
pub const DATA_LOST: u8 = 3;
/// `status --max-age`/`--max-absence` exceeded (3 wins when data is lost too).
pub const STALE: u8 = 4;
/// The command was used wrongly.
pub const USAGE: u8 = 64;

/// The exit codes as `--help` shows them.
pub const HELP: &str =
    "Exit codes: 0 success; 1 error; 2 degraded but recoverable (verify, status, \
scrub, repair); 3 data lost (verify, status, repair, restore); 4 status --max-age or --max-absence \
exceeded (and no data lost); 64 usage error (a wrong flag, a missing \
setting, a bad value).";

/// A usage error: the command, a flag or a config key was wrong. Exits with [`USAGE`].
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

/// The exit code for an error that ended a command.
pub fn code_of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Usage>().is_some() {
        return USAGE;
    }
    match e.downcast_ref::<sa_engine::Error>() {
        Some(sa_engine::Error::StripesLost(_)) => DATA_LOST,
        _ => ERROR,
    }
}
