//! Serves a sparse in-memory disk or a raw image file over NBD.
//!
//! ```text
//! cargo run -p nbd-server --example serve -- [--listen 127.0.0.1:10809]
//!     (--size BYTES [--fill] | --file PATH) [--name NAME] [--read-only]
//!     [--tls-cert PEM --tls-key PEM]
//! ```
//!
//! `--fill` writes a non-zero pattern over the whole memory disk (for
//! throughput tests that must not be served from holes). The export answers to
//! NAME (default `disk`) and to the default name `""`. Prints
//! `listening on ADDR` once ready; stops on Ctrl-C. With `--tls-cert` and
//! `--tls-key` every client must use TLS (`nbds://` URIs).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use nbd_server::{
    load_pem, BlockSource, Export, Exports, MemorySource, Server, ServerConfig, SourceError,
};

/// A raw image file, read with positional reads off the reactor.
struct FileSource {
    file: Arc<std::fs::File>,
    size: u64,
}

#[async_trait]
impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let file = Arc::clone(&self.file);
        let len = buf.len();
        let data = tokio::task::spawn_blocking(move || {
            let mut v = vec![0u8; len];
            file.read_exact_at(&mut v, offset).map(|()| v)
        })
        .await
        .map_err(|e| SourceError::Io(std::io::Error::other(e)))??;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

fn usage() -> ! {
    eprintln!("usage: serve [--listen ADDR] (--size BYTES [--fill] | --file PATH) [--name NAME] [--read-only] [--tls-cert PEM --tls-key PEM]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut listen = "127.0.0.1:10809".to_owned();
    let (mut size, mut file, mut name) = (None, None, "disk".to_owned());
    let (mut fill, mut read_only) = (false, false);
    let (mut tls_cert, mut tls_key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_else(|| usage()),
            "--size" => {
                size = Some(
                    args.next()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--file" => file = Some(args.next().unwrap_or_else(|| usage())),
            "--name" => name = args.next().unwrap_or_else(|| usage()),
            "--tls-cert" => tls_cert = Some(args.next().unwrap_or_else(|| usage())),
            "--tls-key" => tls_key = Some(args.next().unwrap_or_else(|| usage())),
            "--fill" => fill = true,
            "--read-only" => read_only = true,
            _ => usage(),
        }
    }
    let source: Arc<dyn BlockSource> = match (size, file) {
        (Some(size), None) => {
            let m = MemorySource::new(size);
            if fill {
                let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(chunk.len() as u64) as usize;
                    m.write(off, &chunk[..n], false).await?;
                    off += n as u64;
                }
            }
            Arc::new(m.with_read_only(read_only))
        }
        (None, Some(path)) => {
            let f = std::fs::File::open(&path)?;
            let size = f.metadata()?.len();
            Arc::new(FileSource {
                file: Arc::new(f),
                size,
            })
        }
        _ => usage(),
    };
    let tls = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => Some(load_pem(c.as_ref(), k.as_ref(), None)?),
        (None, None) => None,
        _ => usage(),
    };
    let exports = Exports::single(Export::new(name, "served by nbd-server's example", source))?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let config = ServerConfig {
        tls,
        ..ServerConfig::default()
    };
    Server::with_config(Arc::new(exports), config)
        .run(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
