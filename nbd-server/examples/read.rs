//! Reads a whole NBD export with the client and discards the data, printing
//! the size, the time and the rate (for benchmarks and manual checks).
//!
//! ```text
//! cargo run --release -p nbd-server --example read -- URI
//!     [--connections N] [--request BYTES] [--in-flight N]
//! ```
//!
//! URI is `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
//! Each connection reads every N-th piece of `--request` bytes (default 1 MiB)
//! and keeps `--in-flight` requests (default 16) out at once.

use std::collections::VecDeque;
use std::time::Instant;

use nbd_server::client::{Client, ClientConfig, ClientError, NbdUri};

fn usage() -> ! {
    eprintln!("usage: read URI [--connections N] [--request BYTES] [--in-flight N]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri: NbdUri = args.next().unwrap_or_else(|| usage()).parse()?;
    let (mut connections, mut request, mut in_flight) = (1usize, 1u32 << 20, 16usize);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--connections" => connections = value.parse()?,
            "--request" => request = value.parse()?,
            "--in-flight" => in_flight = value.parse()?,
            _ => usage(),
        }
    }
    let config = ClientConfig {
        max_read_request: request,
        max_in_flight: in_flight,
        ..ClientConfig::default()
    };
    let clients = Client::connect_many(&uri, &config, connections.max(1)).await?;
    let n = clients.len() as u64;
    let size = clients[0].size();
    let piece = u64::from(clients[0].max_read());
    let pieces = size.div_ceil(piece);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut window = VecDeque::new();
            let mut spare: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0u64;
            let mut k = i as u64;
            loop {
                while k < pieces && window.len() < in_flight.max(1) {
                    let offset = k * piece;
                    let mut buf = spare.pop().unwrap_or_default();
                    buf.resize(piece.min(size - offset) as usize, 0);
                    window.push_back(c.start_read(offset, buf).await?);
                    k += n;
                }
                let Some(handle) = window.pop_front() else {
                    break;
                };
                let buf = handle.finish().await?;
                bytes += buf.len() as u64;
                spare.push(buf);
            }
            c.disconnect().await?;
            Ok::<u64, ClientError>(bytes)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "read {total} bytes in {secs:.3} s ({:.0} MiB/s)",
        total as f64 / secs / f64::from(1 << 20)
    );
    Ok(())
}
