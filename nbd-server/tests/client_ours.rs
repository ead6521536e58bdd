//! The NBD client against this crate's own server (MemorySource and a
//! failing source), bound on port 0 in the test.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::{Rng, TestServer};
use nbd_server::client::{Client, ClientConfig, ClientError, NbdUri, StatusExtent};
use nbd_server::proto::{MAX_PAYLOAD, NBD_EIO};
use nbd_server::{BlockSource, MemorySource, SourceError};

const MIB: u64 = 1 << 20;

fn uri(srv: &TestServer, export: &str) -> NbdUri {
    NbdUri::parse(&format!("{}/{export}", srv.uri())).unwrap()
}

fn with_allocation() -> ClientConfig {
    ClientConfig {
        meta_contexts: vec!["base:allocation".into()],
        ..ClientConfig::default()
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_byte_exact_across_the_maximum_payload() {
    // 80 MiB: a whole read is three requests of at most 32 MiB.
    let data = random(80 * MIB as usize, 1);
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let cfg = ClientConfig {
        max_read_request: u32::MAX,
        ..ClientConfig::default()
    };
    let c = Client::connect(&uri(&srv, "disk"), &cfg).await.unwrap();
    assert_eq!(c.size(), data.len() as u64);
    // Lowered to the server's advertised maximum payload.
    assert_eq!(c.max_read(), MAX_PAYLOAD);
    assert!(c.info().block_size_advertised);
    let mut all = vec![0u8; data.len()];
    c.read(0, &mut all).await.unwrap();
    assert!(all == data, "whole-export read differs");
    // Ranges around the 32 MiB split points and random ones.
    let mut rng = Rng(2);
    let mut ranges = vec![
        (32 * MIB - 1, 2),
        (MIB, 40 * MIB + 3),
        (0, 1),
        (80 * MIB - 7, 7),
    ];
    for _ in 0..20 {
        let off = rng.below(80 * MIB);
        ranges.push((off, rng.below(80 * MIB - off).min(3 * MIB) + 1));
    }
    for (off, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        c.read(off, &mut buf).await.unwrap();
        assert!(
            buf[..] == data[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
        // The same into a buffer of its own (read straight into it when one request covers it).
        let v = c.read_vec(off, len as usize).await.unwrap();
        assert!(
            v[..] == data[off as usize..(off + len) as usize],
            "read_vec {off}+{len}"
        );
    }
    // read_vec across the split points too.
    let v = c.read_vec(MIB, (40 * MIB + 3) as usize).await.unwrap();
    assert!(v[..] == data[MIB as usize..(41 * MIB + 3) as usize]);
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_pipeline_and_clones_share_the_connection() {
    let data = random(16 * MIB as usize, 3);
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let cfg = ClientConfig {
        max_read_request: 64 * 1024,
        max_in_flight: 8,
        ..ClientConfig::default()
    };
    let c = Client::connect(&uri(&srv, "disk"), &cfg).await.unwrap();
    assert_eq!(c.max_read(), 64 * 1024);
    // Four tasks on clones of one handle, each reading a quarter in 256 requests.
    let mut tasks = Vec::new();
    for q in 0..4u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4 * MIB as usize];
            c.read(q * 4 * MIB, &mut buf).await.map(|()| buf)
        }));
    }
    for (q, t) in tasks.into_iter().enumerate() {
        let buf = t.await.unwrap().unwrap();
        let at = q * 4 * MIB as usize;
        assert!(buf[..] == data[at..at + buf.len()], "quarter {q}");
    }
    // A sequential reader keeping its own pipeline with start_read.
    let mut handles = std::collections::VecDeque::new();
    let mut out = Vec::new();
    for i in 0..64u64 {
        handles.push_back(
            c.start_read(i * 64 * 1024, vec![0; 64 * 1024])
                .await
                .unwrap(),
        );
        if handles.len() == 6 {
            out.extend(handles.pop_front().unwrap().finish().await.unwrap());
        }
    }
    while let Some(h) = handles.pop_front() {
        out.extend(h.finish().await.unwrap());
    }
    assert!(out[..] == data[..4 * MIB as usize]);
    let e = c.start_read(0, vec![0; 64 * 1024 + 1]).await.unwrap_err();
    assert!(
        matches!(e, ClientError::RequestTooLarge { max: 65536, .. }),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_read_the_same_export() {
    let data = random(8 * MIB as usize, 4);
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let clients = Client::connect_many(&uri(&srv, "disk"), &ClientConfig::default(), 3)
        .await
        .unwrap();
    assert_eq!(clients.len(), 3);
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2 * MIB as usize];
            c.read(i as u64 * 2 * MIB, &mut buf).await.unwrap();
            c.disconnect().await.unwrap();
            buf
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let buf = t.await.unwrap();
        let at = i * 2 * MIB as usize;
        assert!(buf[..] == data[at..at + buf.len()]);
    }
}

/// 8 MiB: data in the first MiB and at 4 MiB..4.5 MiB, holes elsewhere.
fn patterned() -> Vec<u8> {
    let mut v = vec![0u8; 8 * MIB as usize];
    Rng(7).fill(&mut v[..MIB as usize]);
    Rng(8).fill(&mut v[4 * MIB as usize..4 * MIB as usize + 512 * 1024]);
    v
}

fn ext(offset: u64, len: u64, flags: u32) -> StatusExtent {
    StatusExtent { offset, len, flags }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_of_a_sparse_source() {
    let data = patterned();
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let cfg = ClientConfig {
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:nope".into()],
        ..ClientConfig::default()
    };
    let c = Client::connect(&uri(&srv, "disk"), &cfg).await.unwrap();
    // Our server offers base:allocation only; the bitmap is simply not granted.
    let names: Vec<_> = c.contexts().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["base:allocation"]);
    let e = c
        .block_status("qemu:dirty-bitmap:nope", 0, 4096)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::ContextNotGranted { ref name } if name == "qemu:dirty-bitmap:nope"),
        "{e}"
    );

    let all = c
        .collect_extents("base:allocation", 0, c.size())
        .await
        .unwrap();
    let want = [
        ext(0, MIB, 0),
        ext(MIB, 3 * MIB, 3),
        ext(4 * MIB, MIB / 2, 0),
        ext(4 * MIB + MIB / 2, 3 * MIB + MIB / 2, 3),
    ];
    assert_eq!(all, want);
    assert!(all[1].is_hole() && all[1].is_zero() && !all[0].is_hole());
    // One request over an unaligned window is clamped to the window.
    let one = c
        .block_status("base:allocation", MIB - 100, 200)
        .await
        .unwrap();
    assert_eq!(one, [ext(MIB - 100, 100, 0), ext(MIB, 100, 3)]);
    // The walk over a sub-range returns contiguous batches covering it exactly.
    let mut walk = c.walk_extents("base:allocation", 3 * MIB, 2 * MIB);
    let mut pos = 3 * MIB;
    while let Some(batch) = walk.next().await.unwrap() {
        for e in batch {
            assert_eq!(e.offset, pos);
            pos = e.end();
        }
    }
    assert_eq!(pos, 5 * MIB);
    // Holes read back as zeroes, data as data.
    let mut buf = vec![1u8; 2 * MIB as usize];
    c.read(3 * MIB, &mut buf).await.unwrap();
    assert!(buf[..] == data[3 * MIB as usize..5 * MIB as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_when_structured_replies_are_off() {
    let data = random(3 * MIB as usize, 9);
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let cfg = ClientConfig {
        structured_replies: false,
        max_read_request: MIB as u32,
        ..with_allocation()
    };
    let c = Client::connect(&uri(&srv, "disk"), &cfg).await.unwrap();
    assert!(!c.info().structured_replies);
    assert!(
        c.contexts().is_empty(),
        "no contexts without structured replies"
    );
    let mut buf = vec![0u8; data.len()];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == data);
    let e = c.block_status("base:allocation", 0, 512).await.unwrap_err();
    assert!(matches!(e, ClientError::ContextNotGranted { .. }), "{e}");
}

/// Reads fail in [1 MiB, 1 MiB + 4 KiB); everything else reads as 0x5a.
struct Flaky;

#[async_trait]
impl BlockSource for Flaky {
    fn size(&self) -> u64 {
        4 * MIB
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset < MIB + 4096 && offset + buf.len() as u64 > MIB {
            return Err(SourceError::Io(std::io::Error::other("bad sector")));
        }
        buf.fill(0x5a);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_fails_alone_in_both_reply_modes() {
    let srv = TestServer::single("disk", Arc::new(Flaky));
    for structured in [true, false] {
        let cfg = ClientConfig {
            structured_replies: structured,
            ..ClientConfig::default()
        };
        let c = Client::connect(&uri(&srv, "disk"), &cfg).await.unwrap();
        let e = c.read(MIB - 512, &mut [0u8; 1024]).await.unwrap_err();
        match &e {
            ClientError::Server { errno, message, .. } => {
                assert_eq!(*errno, NBD_EIO, "{e}");
                // Only structured replies carry the server's message.
                assert_eq!(message.contains("bad sector"), structured, "{e}");
            }
            e => panic!("{e}"),
        }
        let mut buf = [0u8; 4096];
        c.read(2 * MIB, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        c.disconnect().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_before_they_are_sent() {
    let srv = TestServer::single("disk", Arc::new(MemorySource::new(MIB)));
    let c = Client::connect(&uri(&srv, "disk"), &with_allocation())
        .await
        .unwrap();
    let e = c.read(MIB - 10, &mut [0u8; 11]).await.unwrap_err();
    assert!(
        matches!(e, ClientError::OutOfRange { offset, len: 11, size } if offset == MIB - 10 && size == MIB),
        "{e}"
    );
    let e = c.read(u64::MAX, &mut [0u8; 2]).await.unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");
    let e = c.block_status("base:allocation", MIB, 1).await.unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");
    // The connection is still fine.
    c.read(0, &mut [0u8; 512]).await.unwrap();

    let bad = ClientConfig {
        meta_contexts: vec!["allocation".into()],
        ..ClientConfig::default()
    };
    let e = Client::connect(&uri(&srv, "disk"), &bad).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidName { .. }), "{e}");
    assert!(e.to_string().contains("NAMESPACE:LEAF"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_export_is_named() {
    let srv = TestServer::single("disk", Arc::new(MemorySource::new(MIB)));
    let e = Client::connect(&uri(&srv, "nosuch"), &ClientConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::ExportNotFound { ref export, .. } if export == "nosuch"),
        "{e}"
    );
    // The default export "" is the same disk.
    let c = Client::connect(
        &NbdUri::parse(&srv.uri()).unwrap(),
        &ClientConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(c.size(), MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_disconnect_every_clone_is_closed() {
    let srv = TestServer::single("disk", Arc::new(MemorySource::new(MIB)));
    let c = Client::connect(&uri(&srv, "disk"), &ClientConfig::default())
        .await
        .unwrap();
    let other = c.clone();
    c.disconnect().await.unwrap();
    let e = other.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(matches!(e.root(), ClientError::Disconnected), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_connect_error() {
    // Bind and drop a listener to get a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = Client::connect(
        &NbdUri::tcp("127.0.0.1", port, ""),
        &ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    let e = Client::connect(
        &NbdUri::unix("/nonexistent/nbd.sock", ""),
        &ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/nbd.sock"), "{e}");
}
