//! `shard-agent`: stores one owner's encrypted shards in a directory on a desk PC.
//!
//! ```text
//! shard-agent --dir DIR --listen ADDR:PORT --owner OWNER_ID [--quota SIZE] [--scrub-rate SIZE]
//!             [--config FILE]
//! ```
//! Every flag is also a key of the TOML config file (`dir`, `listen`, `owner`, `quota`,
//! `max_connections`, `scrub_rate`); flags win over the file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sa_core::keys::OwnerId;
use sa_core::size::parse_size;
use sa_core::store::DirStore;
use serde::Deserialize;
use tokio::net::TcpListener;

/// mimalloc: the data path allocates and frees many shard-sized (1 MiB) buffers; glibc's
/// allocator returns them to the kernel and page-faults them back in, which cost about a quarter
/// of the CPU time of a restore or a live read (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stores shards of sa-image backups for one owner, in a directory, within a quota.
#[derive(Parser, Debug)]
#[command(name = "shard-agent", version, about, long_about = None)]
struct Args {
    /// Directory that holds the shards (created if missing).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Address and port to listen on.
    #[arg(long)]
    listen: Option<String>,
    /// Owner id allowed to use this agent (from `sa-image owner-id --key KEYFILE`).
    #[arg(long)]
    owner: Option<String>,
    /// Most bytes to store, e.g. 200G (default: no limit but the disk).
    #[arg(long)]
    quota: Option<String>,
    /// Most client connections at once.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Background scrub rate, bytes per second, e.g. 20MiB (the default); 0 turns the background
    /// scrub off (a pass asked for with `sa-image scrub` then runs unthrottled).
    #[arg(long)]
    scrub_rate: Option<String>,
    /// TOML file with any of the keys above.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    listen: Option<String>,
    owner: Option<String>,
    quota: Option<String>,
    max_connections: Option<usize>,
    scrub_rate: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "shard_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("config {} is not valid", p.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(dir) = args.dir.or(file.dir) else {
        bail!("no shard directory: give --dir DIR (or `dir` in the config file)")
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:7710".into());
    let Some(owner) = args.owner.or(file.owner) else {
        bail!("no owner: give --owner OWNER_ID, printed by `sa-image owner-id --key KEYFILE` on the server")
    };
    let owner: OwnerId = owner.parse()?;
    let quota = match args.quota.or(file.quota) {
        Some(q) => parse_size(&q)?,
        None => 0,
    };
    let max_connections = args.max_connections.or(file.max_connections).unwrap_or(256);
    let scrub_rate = match args.scrub_rate.or(file.scrub_rate) {
        Some(r) => parse_size(r.trim_end_matches("/s"))?,
        None => shard_agent::scrub::DEFAULT_RATE,
    };

    let store = DirStore::open(&dir, quota)
        .with_context(|| format!("cannot open shard directory {}", dir.display()))?;
    let identity = sa_core::tls::AgentIdentity::load_or_create(&dir)
        .with_context(|| format!("cannot load the agent identity in {}", dir.display()))?;
    let tls = identity.server_config()?;
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    let stat = store.stat_blocking();
    tracing::info!(
        dir = %dir.display(),
        agent_id = %sa_core::keys::hex(&store.agent_id()),
        identity = %identity.public(),
        used = stat.used,
        shards = stat.shards,
        quota,
        scrub_rate,
        "shard-agent ready"
    );
    // Scripts and tests read this line to learn the port when --listen ends in :0.
    // Nothing more goes to stdout: a parent may stop reading after this line, and a later
    // print would then fail (the identity is in the log line above).
    println!("listening on {local}");
    let scrub = shard_agent::scrub::Scrubber::new(store.clone(), scrub_rate);
    tokio::spawn(scrub.clone().run());
    let server = shard_agent::Server::new(store, owner, tls, max_connections).with_scrub(scrub);
    tokio::select! {
        r = server.run(listener) => r?,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
