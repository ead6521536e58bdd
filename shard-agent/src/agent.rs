//! Running the agent: priority, log, runtime, store, identity, listener, until told to stop.

use std::future::Future;
use std::pin::Pin;

use anyhow::{Context, Result};
use sa_core::size::format_size;
use sa_core::store::DirStore;
use shard_agent::priority::{self, Priority};
use shard_agent::rate::RateLimit;
use tokio::net::TcpListener;

use crate::config::AgentConfig;

/// What ends the agent.
pub enum Shutdown {
    /// Ctrl-C, or SIGTERM on Unix.
    Signals,
    /// A future (the Windows service manager's stop request).
    #[cfg_attr(not(windows), allow(dead_code))]
    Future(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// Runs the agent until `shutdown` (or a fatal error).
pub fn run(cfg: AgentConfig, shutdown: Shutdown) -> Result<()> {
    // Before the runtime starts its threads: on Linux they inherit it.
    let lowered = (cfg.priority == Priority::Low).then(priority::lower_process);
    init_log(&cfg)?;
    match &lowered {
        Some(Err(e)) => tracing::warn!("running at normal priority: {e}"),
        Some(Ok(how)) => tracing::debug!("priority lowered: {how}"),
        None => {}
    }
    let low = matches!(lowered, Some(Ok(_)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if low {
                let _ = priority::lower_thread();
            }
        })
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(cfg, shutdown, lowered.and_then(Result::ok)))
}

fn init_log(cfg: &AgentConfig) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "shard_agent=info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &cfg.log_file {
        Some(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}

async fn serve(cfg: AgentConfig, shutdown: Shutdown, priority: Option<&'static str>) -> Result<()> {
    let dir = &cfg.dir;
    let store = DirStore::open_with(dir, cfg.limits)
        .with_context(|| format!("cannot open shard directory {}", dir.display()))?;
    let identity = sa_core::tls::AgentIdentity::load_or_create(dir)
        .with_context(|| format!("cannot load the agent identity in {}", dir.display()))?;
    let tls = identity.server_config()?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let stat = store.stat_blocking();
    tracing::info!(
        dir = %dir.display(),
        addr = %local,
        agent_id = %sa_core::keys::hex(&store.agent_id()),
        identity = %identity.public(),
        used = stat.used,
        shards = stat.shards,
        quota = cfg.limits.quota,
        min_free = %format!("{} ({})", cfg.limits.min_free, format_size(store.floor())),
        room = stat.room(),
        max_rate = cfg.max_rate,
        priority = priority.unwrap_or("normal"),
        scrub_rate = cfg.scrub_rate,
        "shard-agent ready"
    );
    // Scripts and tests read this line to learn the port when --listen ends in :0.
    // Nothing more goes to stdout: a parent may stop reading after this line, and a later
    // print would then fail (the identity is in the log line above).
    println!("listening on {local}");
    // The frame pool keeps up to 48 MiB after a restore or a snapshot; an idle PC gets it back.
    tokio::spawn(async {
        let idle = sa_core::pool::FRAME_POOL_IDLE;
        loop {
            tokio::time::sleep(idle).await;
            let freed = sa_core::pool::frames().trim_idle(idle);
            if freed > 0 {
                tracing::debug!("idle: {} of frame buffers freed", format_size(freed as u64));
            }
        }
    });
    let scrub = shard_agent::scrub::Scrubber::new(store.clone(), cfg.scrub_rate);
    tokio::spawn(scrub.clone().run());
    let mut server =
        shard_agent::Server::new(store, cfg.owner, tls, cfg.max_connections).with_scrub(scrub);
    if let Some(rate) = cfg.max_rate {
        server = server.with_rate_limit(RateLimit::new(rate));
    }
    if let Some(hold) = cfg.keep_awake {
        server = server.with_keep_awake(shard_agent::awake::KeepAwake::start(hold));
    }
    let stop: Pin<Box<dyn Future<Output = ()> + Send>> = match shutdown {
        Shutdown::Signals => Box::pin(signals()),
        Shutdown::Future(f) => f,
    };
    tokio::select! {
        r = server.run(listener) => r?,
        _ = stop => tracing::info!("shutting down"),
    }
    Ok(())
}

async fn signals() {
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
