//! `sa-image demo`: the whole story on one machine, on local defaults, with nothing to build or
//! start by hand.
//!
//! Makes a sample disk image (random data, text, and zero runs) and a key; starts six agents in
//! this process ([`sa_engine::local::LocalAgent`]: real agent servers on 127.0.0.2-7, each on its
//! own runtime); snapshots the image with k=4 m=2; stops two agents; restores from the address
//! of one surviving agent alone; serves the snapshot over NBD (the engine's server, in this
//! process) and copies it with a standard NBD client (nbdcopy or qemu-img); and checks that both
//! copies are byte-identical. Everything is stopped and removed at the end, on error, and on
//! Ctrl-C.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sa_core::keys::{Keys, MasterKey};
use sa_core::size::format_size;
use sa_engine::fleet::{Fleet, FleetOptions};
use sa_engine::local::LocalAgent;
use sa_engine::progress::NoProgress;
use sa_engine::restore::{restore, RestoreOptions};
use sa_engine::serve::{open, ServeOptions};
use sa_engine::shutdown::Shutdown;
use sa_engine::snapshot::{snapshot, SnapshotOptions};
use serde::Deserialize;

use crate::config;
use crate::merge;
use crate::progress::Bar;

/// Flags of `demo`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DemoArgs {
    /// Size of the sample disk image [default: 256MiB].
    #[arg(long)]
    pub size: Option<String>,
    /// Keep the demo directory (agents' shards, image, key) instead of removing it.
    #[arg(long)]
    pub keep: bool,
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
        std::process::Command::new(prog)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
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

/// Serves the snapshot over NBD (agents still down) and copies the export with a standard NBD
/// client, as a bare-metal restore would.
async fn restore_through_nbd(
    fleet: &Fleet,
    dir: &Path,
    snap: &str,
    agent: &str,
    size: u64,
    want: blake3::Hash,
) -> Result<()> {
    let Some((client, args)) = nbd_copier() else {
        println!("  skipped the NBD restore: install nbdcopy (libnbd-bin) or qemu-img to see it");
        return Ok(());
    };
    let served = open(fleet, &ServeOptions::new(snap, vec![agent.to_string()])).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("nbd://{}", listener.local_addr()?);
    let stop = Shutdown::new();
    let server = tokio::spawn(served.run(listener, stop.clone()));
    println!("  serving the snapshot over NBD at {url} (2 agents still down)");
    let out = dir.join("nbd-restored.img");
    let t = Instant::now();
    let status = tokio::process::Command::new(client)
        .args(&args)
        .arg(&url)
        .arg(&out)
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("cannot run {client}"))?;
    let secs = t.elapsed().as_secs_f64();
    stop.cancel();
    server.await.context("the NBD server task failed")??;
    if !status.success() {
        bail!("{client} {url} failed ({status})");
    }
    if hash_file(&out)? != want {
        bail!("the image copied through NBD differs from the original");
    }
    println!(
        "  {client} copied the export in {secs:.2}s ({}/s): byte-identical too",
        format_size((size as f64 / secs) as u64)
    );
    Ok(())
}

/// `sa-image demo`.
pub async fn run(mut args: DemoArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: DemoArgs = config::load(cfg)?;
    merge!(args, file; size; bools keep);
    let size = config::size(args.size.as_deref().unwrap_or("256MiB"), "--size")?;
    let size = size.div_ceil(512) * 512;
    let dir = tempfile::Builder::new()
        .prefix("sa-image-demo-")
        .tempdir()
        .context("cannot make a temp dir")?;
    // Handlers first: a Ctrl-C at any point stops the agents and removes the files.
    let stop = crate::signal::on_stop_signals();
    let result = tokio::select! {
        r = demo(dir.path(), size) => r,
        () = stop.cancelled() => Err(anyhow::anyhow!("interrupted; agents stopped and files removed")),
    };
    if args.keep {
        let kept = dir.keep();
        println!("kept the demo files in {}", kept.display());
    }
    result
}

async fn demo(dir: &Path, size: u64) -> Result<u8> {
    let t0 = Instant::now();
    println!("sa-image demo in {}", dir.display());
    let image = dir.join("disk.img");
    let path = image.clone();
    tokio::task::spawn_blocking(move || make_image(&path, size))
        .await
        .context("the image maker failed")??;
    println!(
        "  made a {} sample disk image (random data, text, zero runs)",
        format_size(size)
    );
    let key = MasterKey::generate()?;
    crate::keyfile::write_key_file(&dir.join("master.key"), &key, false)?;
    let keys: Keys = key.derive();
    let owner = keys.owner_id();
    let fleet = Fleet::new(Arc::new(keys), FleetOptions::default());
    let mut agents = Vec::new();
    for i in 0..6 {
        let adir = dir.join(format!("agent{}", i + 1));
        agents.push(LocalAgent::start(
            &adir,
            &format!("127.0.0.{}", i + 2),
            owner,
        )?);
    }
    let addrs: Vec<String> = agents.iter().map(|a| a.addr().to_string()).collect();
    println!("  started 6 shard-agents: {}", addrs.join(" "));
    std::io::stdout().flush()?;

    let never = Shutdown::new();
    let opts = SnapshotOptions::new(image.clone(), "demo-disk", addrs.clone());
    let t = Instant::now();
    let snap = snapshot(&fleet, &opts, &Bar::new(false), &never).await?;
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
        "  stopped 2 of 6 agents: {} and {}",
        agents[1].addr(),
        agents[4].addr()
    );

    let restored = dir.join("restored.img");
    let ropts = RestoreOptions {
        snapshot: snap.snapshot.clone(),
        volume: None,
        target: restored.clone(),
        force: false,
        agents: vec![agents[0].addr().to_string()],
    };
    // A fresh fleet: what a replacement server knows is the key and one address.
    let fresh = Fleet::new(fleet.keys().clone(), FleetOptions::default());
    let t = Instant::now();
    let rep = restore(&fresh, &ropts, &NoProgress, &never).await?;
    let rest_secs = t.elapsed().as_secs_f64();
    println!(
        "  restored from {} alone (the catalog named the rest): {:.2}s ({}/s), {} of {} stripes rebuilt from parity",
        agents[0].addr(),
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
    restore_through_nbd(&fresh, dir, &snap.snapshot, agents[0].addr(), size, a).await?;
    drop(agents);
    println!(
        "demo passed in {:.1}s; agents stopped",
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
