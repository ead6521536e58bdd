//! `sa-image demo`: the whole story on one machine, on local defaults.
//!
//! Makes a sample disk image (random data, text, and zero runs), a key, and six `shard-agent`
//! child processes on 127.0.0.2-7; snapshots the image with k=4 m=2; kills two agents; restores
//! from the address of one surviving agent alone; serves the snapshot over NBD and copies it with
//! a standard NBD client (nbdcopy or qemu-img); and checks that both copies are byte-identical.
//! Everything it started is stopped and removed at the end, on error, and on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sa_core::keys::MasterKey;
use sa_core::size::{format_size, parse_size};
use serde::Deserialize;

use crate::cmd::restore::restore;
use crate::cmd::snapshot::{snapshot, SnapshotPlan};
use crate::config;
use crate::merge;

/// Flags of `demo`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DemoArgs {
    /// Size of the sample disk image.
    #[arg(long)]
    pub size: Option<String>,
    /// Keep the demo directory (agents' shards, image, key) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Path of the shard-agent binary (default: next to sa-image, then $PATH).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

/// A child agent, killed when dropped.
struct AgentProc {
    child: Child,
    addr: String,
}

impl AgentProc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent_binary(given: Option<PathBuf>) -> PathBuf {
    if let Some(p) = given {
        return p;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("shard-agent");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("shard-agent")
}

/// Starts `cmd` with stdout piped and returns it (killed when dropped) with the first line it
/// prints, read with a deadline: how a child reports the address it bound.
fn spawn_with_first_line(
    mut cmd: Command,
    what: &str,
    timeout: Duration,
) -> Result<(AgentProc, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {what} (build it with `cargo build --release`)"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let proc = AgentProc {
        child,
        addr: String::new(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(timeout)
        .with_context(|| format!("{what} did not start within {}s", timeout.as_secs()))?;
    Ok((proc, line.trim().to_string()))
}

fn start_agent(bin: &Path, dir: &Path, ip: &str, owner: &str) -> Result<AgentProc> {
    let mut cmd = Command::new(bin);
    cmd.arg("--dir")
        .arg(dir)
        .args(["--listen", &format!("{ip}:0"), "--owner", owner]);
    // The agent prints "listening on IP:PORT" once bound.
    let (mut proc, line) = spawn_with_first_line(cmd, "shard-agent", Duration::from_secs(10))?;
    proc.addr = line
        .strip_prefix("listening on ")
        .context("shard-agent did not report its address")?
        .to_string();
    Ok(proc)
}

/// Writes a sample disk: 1/2 random, 1/4 zero, 1/4 text, in 4 MiB runs (one stripe each).
fn make_image(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut xof = blake3::Hasher::new()
        .update(b"sa-image demo")
        .finalize_xof();
    let mut chunk = vec![0u8; 4 << 20];
    let text = b"The quick brown fox jumps over the office server. ";
    let mut written = 0u64;
    let mut n = 0u64;
    while written < size {
        let len = (size - written).min(chunk.len() as u64) as usize;
        match n % 4 {
            0 | 2 => xof.fill(&mut chunk[..len]),
            1 => chunk[..len]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = text[i % text.len()]),
            _ => chunk[..len].fill(0),
        }
        f.write_all(&chunk[..len])?;
        written += len as u64;
        n += 1;
    }
    f.flush()?;
    Ok(())
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Which NBD client copies an export to a file: nbdcopy (libnbd) or qemu-img.
fn nbd_copier() -> Option<(&'static str, Vec<&'static str>)> {
    let found = |prog: &str| {
        Command::new(prog)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("nbdcopy") {
        Some(("nbdcopy", vec![]))
    } else if found("qemu-img") {
        Some(("qemu-img", vec!["convert", "-f", "raw", "-O", "raw"]))
    } else {
        None
    }
}

/// Serves the snapshot over NBD with `sa-image serve` (a child process, agents still down) and
/// copies the export with a standard NBD client, as a bare-metal restore would.
fn restore_through_nbd(
    dir: &Path,
    snapshot: &str,
    agent: &str,
    image: &Path,
    want: blake3::Hash,
) -> Result<()> {
    let Some((client, args)) = nbd_copier() else {
        println!("  skipped the NBD restore: install nbdcopy (libnbd-bin) or qemu-img to see it");
        return Ok(());
    };
    let exe = std::env::current_exe().context("cannot find sa-image itself")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "serve",
        snapshot,
        "--listen",
        "127.0.0.1:0",
        "--agents",
        agent,
        "--key",
    ])
    .arg(dir.join("master.key"));
    let (mut serve, line) = spawn_with_first_line(cmd, "sa-image serve", Duration::from_secs(30))?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .with_context(|| format!("sa-image serve printed no address: {line:?}"))?
        .to_string();
    println!("  serving the snapshot over NBD at {url} (2 agents still down)");
    let out = dir.join("nbd-restored.img");
    let t = Instant::now();
    let status = Command::new(client)
        .args(&args)
        .arg(&url)
        .arg(&out)
        .status()
        .with_context(|| format!("cannot run {client}"))?;
    if !status.success() {
        bail!("{client} {url} failed ({status})");
    }
    let secs = t.elapsed().as_secs_f64();
    serve.kill();
    let got = hash_file(&out)?;
    if got != want {
        bail!("the image copied through NBD differs from the original");
    }
    let size = std::fs::metadata(image)?.len();
    println!(
        "  {client} copied the export in {secs:.2}s ({}/s): byte-identical too",
        format_size((size as f64 / secs) as u64)
    );
    Ok(())
}

/// `sa-image demo`.
pub async fn run(mut args: DemoArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: DemoArgs = config::load(cfg)?;
    merge!(args, file; size, agent_bin; bools keep);
    let size = parse_size(args.size.as_deref().unwrap_or("256MiB"))?;
    let size = size.div_ceil(512) * 512;
    let dir = tempfile::Builder::new()
        .prefix("sa-image-demo-")
        .tempdir()
        .context("cannot make a temp dir")?;
    let result = tokio::select! {
        r = demo(dir.path(), size, agent_binary(args.agent_bin.clone())) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; agents stopped and files removed")),
    };
    if args.keep {
        let kept = dir.keep();
        println!("kept the demo files in {}", kept.display());
    }
    result
}

async fn demo(dir: &Path, size: u64, agent_bin: PathBuf) -> Result<u8> {
    let t0 = Instant::now();
    println!("sa-image demo in {}", dir.display());
    let image = dir.join("disk.img");
    make_image(&image, size)?;
    println!(
        "  made a {} sample disk image (random data, text, zero runs)",
        format_size(size)
    );

    let key = MasterKey::generate()?;
    crate::cmd::keygen::write_key_file(&dir.join("master.key"), &key, false)?;
    let keys = Arc::new(key.derive());
    let owner = keys.owner_id().to_string();

    let mut agents = Vec::new();
    for i in 0..6 {
        let adir = dir.join(format!("agent{}", i + 1));
        agents.push(start_agent(
            &agent_bin,
            &adir,
            &format!("127.0.0.{}", i + 2),
            &owner,
        )?);
    }
    let addrs: Vec<String> = agents.iter().map(|a| a.addr.clone()).collect();
    println!("  started 6 shard-agents: {}", addrs.join(" "));

    let plan = SnapshotPlan {
        source: image.clone(),
        volume: "demo-disk".into(),
        agents: addrs.clone(),
        k: 4,
        m: 2,
        stripe_size: 4 << 20,
        quiet: false,
        allow_degraded: false,
    };
    let t = Instant::now();
    let snap = snapshot(&plan, keys.clone()).await?;
    let snap_secs = t.elapsed().as_secs_f64();
    println!(
        "  snapshot {}: {} stripes ({} zero), {} sent, {:.2}s ({}/s)",
        snap.snapshot,
        snap.stripes,
        snap.zero_stripes,
        format_size(snap.bytes_sent),
        snap_secs,
        format_size((size as f64 / snap_secs) as u64)
    );

    agents[1].kill();
    agents[4].kill();
    println!(
        "  killed 2 of 6 agents: {} and {}",
        agents[1].addr, agents[4].addr
    );

    let restored = dir.join("restored.img");
    let t = Instant::now();
    let rep = restore(
        &snap.snapshot,
        &restored,
        &[agents[0].addr.clone()],
        keys.clone(),
        false,
    )
    .await?;
    let rest_secs = t.elapsed().as_secs_f64();
    println!(
        "  restored from {} alone (the catalog named the rest): {:.2}s ({}/s), {} of {} stripes rebuilt from parity",
        agents[0].addr,
        rest_secs,
        format_size((size as f64 / rest_secs) as u64),
        rep.reconstructed_stripes,
        rep.stripes
    );
    let (a, b) = (hash_file(&image)?, hash_file(&restored)?);
    if a != b {
        bail!("restored image differs from the original (blake3 {a} vs {b})");
    }
    println!(
        "  verified: restored image is byte-identical (blake3 {})",
        &a.to_hex()[..16]
    );
    restore_through_nbd(dir, &snap.snapshot, &agents[0].addr, &image, a)?;
    drop(agents);
    println!(
        "demo passed in {:.1}s; agents stopped",
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
