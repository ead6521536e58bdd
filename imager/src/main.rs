//! `sa-image`: snapshot a server's whole disk onto shard agents on the office's PCs, and get it
//! back — restored to a disk, or (soon) served live over NBD.
//!
//! Commands: `keygen`, `owner-id`, `key import`, `snapshot`, `list`, `status`, `verify`, `scrub`, `repair`,
//! `restore`, `serve`, `prune`, `forget`, `gc`, `agents list|add|accept|retire`, `demo`.
//! Exit codes: 0 success; 1 error; `verify` exits 2 when shards are missing or corrupt but every
//! stripe is still recoverable, and 3 when data is lost; `status` exits 2 when a snapshot is below
//! its configured redundancy and 3 when data is lost; `scrub` exits 2 when bad shards wait for
//! `repair`; `repair` exits 2 when a shard could not be placed and 3 when a stripe is lost (`repair --watch`
//! runs until SIGINT/SIGTERM and exits 0).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agents;
mod cmd;
mod config;
mod fetch;
mod gc;
mod health;
mod passphrase;
mod progress;
mod serve;
mod source;

/// mimalloc: the data path allocates and frees many shard-sized (1 MiB) buffers; glibc's
/// allocator returns them to the kernel and page-faults them back in, which cost about a quarter
/// of the CPU time of a restore or a live read (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default TCP port of `shard-agent`.
pub const DEFAULT_AGENT_PORT: u16 = 7710;

/// Back a whole disk up onto shard agents on your office's PCs; restore it with any m of them gone.
#[derive(Parser, Debug)]
#[command(name = "sa-image", version, about, long_about = None)]
struct Cli {
    /// TOML file whose keys are the long flag names (key, agents, data_shards, ...).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a new master key (the recovery key) in a file, mode 0600.
    Keygen(cmd::keygen::KeygenArgs),
    /// Print the owner id that agents must be started with.
    OwnerId(cmd::keygen::OwnerIdArgs),
    /// Key files: `key import` writes one from the printed recovery text.
    #[command(subcommand)]
    Key(cmd::keygen::KeyCommand),
    /// Snapshot a disk (block device or image file) onto the agents.
    Snapshot(cmd::snapshot::SnapshotArgs),
    /// List the snapshots in the catalog (any one reachable agent is enough).
    List(cmd::list::ListArgs),
    /// Agents (reachable, last seen, usage) and each snapshot's margin: how many more agent
    /// losses it survives now.
    Status(cmd::status::StatusArgs),
    /// Read and check every shard of a snapshot.
    Verify(cmd::verify::VerifyArgs),
    /// Ask every agent to check all its shard files now, and gather the bad ones they found.
    Scrub(cmd::scrub::ScrubArgs),
    /// Rebuild every missing or bad shard onto agents outside its stripe (and spread shards stored
    /// doubled up by `snapshot --allow-degraded`), and update the catalog; `--watch` keeps doing it,
    /// waiting `--repair-after` before rebuilding around a missing agent.
    Repair(cmd::repair::RepairArgs),
    /// Restore a snapshot to a file or block device.
    Restore(cmd::restore::RestoreArgs),
    /// Serve a snapshot as an NBD export (read-only, or writable into a local overlay file).
    Serve(cmd::serve::ServeArgs),
    /// Apply a retention policy per volume, forget the rest, and collect unreferenced shards.
    Prune(cmd::prune::PruneArgs),
    /// Forget one snapshot, and collect the shards only it used.
    Forget(cmd::forget::ForgetArgs),
    /// Delete shards that no kept snapshot references (safe while snapshots run).
    Gc(cmd::gc::GcArgs),
    /// The agent book: `agents list`, `agents add ADDR`, `agents accept ID`, `agents retire ID`.
    #[command(subcommand)]
    Agents(cmd::agents::AgentsCommand),
    /// Run everything locally: agents, a snapshot, lost agents, a verified restore.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "sa_image=warn,sa_core=warn",
        1 => "sa_image=info,sa_core=info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config = cli.config.clone();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Keygen(a) => cmd::keygen::keygen(a, config.as_deref()),
            Command::OwnerId(a) => cmd::keygen::owner_id(a, config.as_deref()),
            Command::Key(cmd::keygen::KeyCommand::Import(a)) => {
                cmd::keygen::import(a, config.as_deref())
            }
            Command::Snapshot(a) => cmd::snapshot::run(a, config.as_deref()).await,
            Command::List(a) => cmd::list::run(a, config.as_deref()).await,
            Command::Status(a) => cmd::status::run(a, config.as_deref()).await,
            Command::Verify(a) => cmd::verify::run(a, config.as_deref()).await,
            Command::Scrub(a) => cmd::scrub::run(a, config.as_deref()).await,
            Command::Repair(a) => cmd::repair::run(a, config.as_deref()).await,
            Command::Restore(a) => cmd::restore::run(a, config.as_deref()).await,
            Command::Serve(a) => cmd::serve::run(a, config.as_deref()).await,
            Command::Prune(a) => cmd::prune::run(a, config.as_deref()).await,
            Command::Forget(a) => cmd::forget::run(a, config.as_deref()).await,
            Command::Gc(a) => cmd::gc::run(a, config.as_deref()).await,
            Command::Agents(a) => cmd::agents::run(a, config.as_deref()).await,
            Command::Demo(a) => cmd::demo::run(a, config.as_deref()).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
