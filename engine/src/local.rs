//! Agents in this process: a real `shard_agent::Server` over a directory, each on its own
//! tokio runtime and thread, bound to an address with port 0. Stopping one ([`LocalAgent::kill`])
//! shuts its runtime down, which drops every connection at once: to its clients it is exactly a
//! PC that went away. The demo and the engine's tests use them; nothing needs to be built or
//! started by hand.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use sa_core::keys::OwnerId;
use sa_core::store::DirStore;

use crate::error::{Error, Result};

/// Background scrub rate of local agents (bytes/s; 0: none, passes only when asked).
const SCRUB_RATE: u64 = 0;

/// An agent served from this process.
pub struct LocalAgent {
    addr: String,
    id: [u8; 16],
    dir: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LocalAgent {
    /// Starts an agent for `owner` over `dir` (created if missing), listening on `ip` with a
    /// port the system picks; returns once it accepts connections.
    pub fn start(dir: &Path, ip: &str, owner: OwnerId) -> Result<LocalAgent> {
        Self::start_with_quota(dir, ip, owner, 0)
    }

    /// [`LocalAgent::start`] with a quota in bytes (0: none).
    pub fn start_with_quota(
        dir: &Path,
        ip: &str,
        owner: OwnerId,
        quota: u64,
    ) -> Result<LocalAgent> {
        Self::start_at(dir, &format!("{ip}:0"), owner, quota)
    }

    /// Starts it again after [`LocalAgent::kill`], on the same address (a PC back on).
    pub fn restart(&mut self, owner: OwnerId) -> Result<()> {
        self.kill();
        let (dir, addr) = (self.dir.clone(), self.addr.clone());
        *self = Self::start_at(&dir, &addr, owner, 0)?;
        Ok(())
    }

    /// An agent over `dir` listening on `listen` (`IP:PORT`, port 0: any).
    pub fn start_at(dir: &Path, listen: &str, owner: OwnerId, quota: u64) -> Result<LocalAgent> {
        let ip = listen.to_string();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(String, [u8; 16])>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (dir2, listen) = (dir.to_path_buf(), listen.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("agent {ip}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::io("cannot start an agent runtime", e)));
                        return;
                    }
                };
                let started = rt.block_on(serve(&dir2, &listen, owner, quota));
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    // Until told to stop (or the handle is gone).
                    let _ = stop_rx.recv();
                }
                // Tasks are dropped at once (connections close, as when a PC is switched off);
                // file operations already running on the blocking pool finish, so nothing
                // writes into the directory after `kill` returns.
                rt.shutdown_timeout(Duration::from_secs(10));
            })
            .map_err(|e| Error::io("cannot start an agent thread", e))?;
        let (addr, id) = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| Error::failed(format!("the agent on {ip} did not start within 30s")))??;
        Ok(LocalAgent {
            addr,
            id,
            dir: dir.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where it listens, `IP:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its stable agent id.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// Its shard directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops it at once: every connection drops, as when a PC is switched off.
    pub fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        self.stop.is_some()
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens the store and identity, binds, and spawns the server; returns the bound address and
/// the agent's id.
async fn serve(dir: &Path, listen: &str, owner: OwnerId, quota: u64) -> Result<(String, [u8; 16])> {
    let store = DirStore::open(dir, quota)?;
    let id = store.agent_id();
    let identity = sa_core::tls::AgentIdentity::load_or_create(dir)?;
    let tls = identity.server_config()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("cannot listen on {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the agent's address", e))?
        .to_string();
    let scrub = shard_agent::scrub::Scrubber::new(store.clone(), SCRUB_RATE);
    tokio::spawn(scrub.clone().run());
    let server = shard_agent::Server::new(store, owner, tls, 256).with_scrub(scrub);
    tokio::spawn(async move {
        if let Err(e) = server.run(listener).await {
            tracing::warn!("local agent stopped: {e}");
        }
    });
    Ok((addr, id))
}
