//! `sa-image`: the command line over the engine ([`sa_engine`]). It turns flags and the config
//! file into engine options, asks for passphrases, draws progress bars, prints the engine's
//! reports as text or JSON, and gives exit codes ([`exit`]).
//!
//! Commands: `keygen`, `owner-id`, `key import`, `snapshot`, `list`, `status`, `plan`, `verify`,
//! `scrub`, `repair`, `restore`, `serve`, `drill`, `prune`, `forget`, `gc`,
//! `agents list|add|accept|retire|wake`, `demo`,
//! `daemon`; hidden, for packaging: `completions SHELL` and `manpages DIR` ([`sa_clidocs`]).
//!
//! Files: [`cmd`] (one per command), [`daemon`] (`sa-image daemon`: schedules, alerts, metrics
//! and the status page), [`config`] (the config file, the flags every command
//! shares, and the one duration and size grammar), [`exit`], [`keyfile`], [`progress`] (indicatif),
//! [`signal`] (SIGINT/SIGTERM to the engine's shutdown token), [`passphrase`], [`text`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod config;
mod daemon;
mod exit;
mod keyfile;
mod passphrase;
mod progress;
mod signal;
mod text;

/// The hidden command a snapshot runs as its guard process (see
/// [`sa_engine::consistency::guard`]): `sa-image consistency-guard TASK...`.
pub const GUARD_COMMAND: &str = "consistency-guard";

/// mimalloc: the data path allocates and frees many shard-sized (1 MiB) buffers; glibc's
/// allocator returns them to the kernel and page-faults them back in, which cost about a quarter
/// of the CPU time of a restore or a live read (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Back a whole disk up onto shard agents on your office's PCs; restore it with any m of them gone.
#[derive(Parser, Debug)]
#[command(
    name = "sa-image",
    version,
    about,
    long_about = None,
    after_help = exit::HELP,
)]
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
    /// Snapshot a disk (block device or image file) onto the agents (defaults: k=4, m=2, 4MiB
    /// stripes).
    Snapshot(cmd::snapshot::SnapshotArgs),
    /// List the snapshots in the catalog (any one reachable agent is enough).
    List(cmd::list::ListArgs),
    /// Agents (reachable, last seen, usage) and each snapshot's margin: how many more agent
    /// losses it survives now. Exit 0 full redundancy, 2 below it, 3 data lost, 4 --max-age or
    /// --max-absence exceeded.
    Status(cmd::status::StatusArgs),
    /// Recommend k, m and repair-after for the fleet as measured, to keep the chance of losing
    /// a snapshot within a year under --target (see docs/durability.md).
    Plan(cmd::plan::PlanArgs),
    /// Read and check every shard of a snapshot. Exit 0 sound, 2 degraded but recoverable, 3
    /// data lost.
    Verify(cmd::verify::VerifyArgs),
    /// Ask every agent to check all its shard files now, and gather the bad ones they found.
    /// Exit 2 when bad shards wait for `repair`.
    Scrub(cmd::scrub::ScrubArgs),
    /// Rebuild every missing or bad shard onto agents outside its stripe (and spread shards stored
    /// doubled up by `snapshot --allow-degraded`), and update the catalog; `--watch` keeps doing it,
    /// waiting `--repair-after` before rebuilding around a missing agent. Exit 2 when a shard
    /// found no place, 3 when a stripe is lost.
    Repair(cmd::repair::RepairArgs),
    /// Restore a snapshot to a file or block device. Exit 3 when stripes cannot be rebuilt.
    Restore(cmd::restore::RestoreArgs),
    /// Serve a snapshot as an NBD export (read-only, or writable into a local overlay file, or a
    /// live restore onto a disk) [default listen: 127.0.0.1:10809].
    Serve(cmd::serve::ServeArgs),
    /// Recovery drill: serve a snapshot with m agents withheld, boot it in QEMU and check a
    /// console line, a guest port and/or the screen; the result is stored next to the snapshot.
    /// Exit 0 passed, 1 failed.
    Drill(cmd::drill::DrillArgs),
    /// Apply a retention policy per volume, forget the rest, and collect unreferenced shards.
    Prune(cmd::prune::PruneArgs),
    /// Forget one snapshot, and collect the shards only it used.
    Forget(cmd::forget::ForgetArgs),
    /// Delete shards that no kept snapshot references (safe while snapshots run).
    Gc(cmd::gc::GcArgs),
    /// The offsite copy in S3-compatible object storage: `offsite push` (upload what the bucket
    /// lacks), `offsite gc` (delete what no kept snapshot uses).
    #[command(subcommand)]
    Offsite(cmd::offsite::OffsiteCommand),
    /// The agent book: `agents list`, `agents add ADDR`, `agents accept ID`, `agents retire ID`,
    /// `agents wake ID|--all`.
    #[command(subcommand)]
    Agents(cmd::agents::AgentsCommand),
    /// Run by itself: snapshots on schedules with retention, the repair watcher, weekly scrubs,
    /// alerts (webhook, e-mail, healthchecks pings), a status page and /metrics [default config:
    /// /etc/sa-image/config.toml]. SIGHUP reloads the settings, SIGTERM stops between stripes.
    Daemon(cmd::daemon::DaemonArgs),
    /// Run everything locally: agents in this process, a snapshot, lost agents, a verified
    /// restore and a copy through NBD [default size: 256MiB].
    Demo(cmd::demo::DemoArgs),
    #[command(flatten)]
    Docs(sa_clidocs::DocsCommand),
    /// Internal: the guard process of `snapshot --freeze`/`--lvm-snapshot`, which undoes the
    /// freeze or the LVM snapshot when the snapshot ends or dies.
    #[command(name = "consistency-guard", hide = true)]
    ConsistencyGuard(GuardArgs),
}

/// The guard's task, as the snapshot gives it.
#[derive(clap::Args, Debug)]
struct GuardArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    task: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let daemon = matches!(cli.command, Command::Daemon(_));
    let default = match cli.verbose {
        0 if daemon => "sa_image=info,sa_engine=warn,sa_core=warn",
        0 => "sa_image=warn,sa_engine=warn,sa_core=warn",
        1 => "sa_image=info,sa_engine=info,sa_core=info",
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
            return ExitCode::from(exit::ERROR);
        }
    };
    let config = cli.config.clone();
    let result = runtime.block_on(async move {
        let cfg = config.as_deref();
        match cli.command {
            Command::Keygen(a) => cmd::keygen::keygen(a, cfg),
            Command::OwnerId(a) => cmd::keygen::owner_id(a, cfg),
            Command::Key(cmd::keygen::KeyCommand::Import(a)) => cmd::keygen::import(a, cfg),
            Command::Snapshot(a) => cmd::snapshot::run(a, cfg).await,
            Command::List(a) => cmd::list::run(a, cfg).await,
            Command::Status(a) => cmd::status::run(a, cfg).await,
            Command::Plan(a) => cmd::plan::run(a, cfg).await,
            Command::Verify(a) => cmd::verify::run(a, cfg).await,
            Command::Scrub(a) => cmd::scrub::run(a, cfg).await,
            Command::Repair(a) => cmd::repair::run(a, cfg).await,
            Command::Restore(a) => cmd::restore::run(a, cfg).await,
            Command::Serve(a) => cmd::serve::run(a, cfg).await,
            Command::Drill(a) => cmd::drill::run(a, cfg).await,
            Command::Prune(a) => cmd::prune::run(a, cfg).await,
            Command::Forget(a) => cmd::forget::run(a, cfg).await,
            Command::Gc(a) => cmd::gc::run(a, cfg).await,
            Command::Agents(a) => cmd::agents::run(a, cfg).await,
            Command::Offsite(c) => cmd::offsite::run(c, cfg).await,
            Command::Demo(a) => cmd::demo::run(a, cfg).await,
            Command::Daemon(a) => cmd::daemon::run(a, cfg).await,
            Command::Docs(d) => d
                .run(<Cli as clap::CommandFactory>::command())
                .map(|()| exit::OK)
                .map_err(Into::into),
            Command::ConsistencyGuard(a) => {
                Ok(sa_engine::consistency::guard::serve(&a.task, signal::on_stop_signals()).await)
            }
        }
    });
    // Background tasks (a signal watcher) must not hold the process.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}
