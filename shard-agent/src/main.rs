//! `shard-agent`: stores one owner's encrypted shards in a directory on a desk PC.
//!
//! ```text
//! shard-agent --dir DIR --owner OWNER_ID [--listen HOST[:PORT]] [--quota SIZE] [--min-free 10%|SIZE]
//!             [--max-rate SIZE] [--priority low|normal] [--scrub-rate SIZE] [--log-file FILE]
//!             [--config FILE]
//! shard-agent service install [FLAGS] | service uninstall        (Windows)
//! ```
//! Every flag is also a key of the TOML config file ([`config`]); flags win over the file.
//! Errors are printed as `error: ...` on stderr, like sa-image's. Exit codes: 0 after a clean
//! shutdown, 1 when the agent cannot run (directory in use, port taken, ...), 64 (EX_USAGE) for a
//! bad command line or config file.

use std::process::ExitCode;

use clap::Parser;

mod agent;
mod config;
#[cfg(windows)]
mod service;

use config::{Cli, Command};

/// mimalloc: the data path allocates and frees many shard-sized (1 MiB) buffers; glibc's
/// allocator returns them to the kernel and page-faults them back in, which cost about a quarter
/// of the CPU time of a restore or a live read (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits' EX_USAGE: the command was used incorrectly.
pub const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    match cli.command {
        None => match cli.agent.resolve() {
            Ok(cfg) => exit(agent::run(cfg, agent::Shutdown::Signals)),
            Err(e) => usage(e),
        },
        Some(Command::Service(cmd)) => service_command(*cmd),
        Some(Command::Docs(d)) => exit(
            d.run(<Cli as clap::CommandFactory>::command())
                .map_err(Into::into),
        ),
    }
}

/// Prints a usage error and gives its exit code.
pub fn usage(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(EX_USAGE)
}

/// The exit code of a run: 0, or 1 with the error printed (a service logs it too).
pub fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(windows)]
fn service_command(cmd: config::ServiceCommand) -> ExitCode {
    service::main(cmd)
}

#[cfg(not(windows))]
fn service_command(_: config::ServiceCommand) -> ExitCode {
    usage(anyhow::anyhow!(
        "`shard-agent service` installs a Windows service and works on Windows only; on Linux \
         run the agent under systemd, on macOS under launchd (packaging/macos/ has a job file)"
    ))
}
