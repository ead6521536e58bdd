//! The NBD client against fake servers that break (or legally bend) the
//! transmission phase: bad magic, unknown cookies, oversize or inconsistent
//! chunks, errors, hang-ups, silence. Violations close the connection with a
//! typed error; errors the server reports fail one request only.

mod fake_server;

use std::time::{Duration, Instant};

use fake_server::*;
use nbd_server::client::{ClientConfig, ClientError, ProtocolError};
use nbd_server::proto::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_reply_for_an_unknown_cookie_closes_the_connection() {
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            r.handle ^ 0xdead,
            &[],
        )
        .await;
        drain(&mut s).await;
    })
    .await;
    let mut buf = [0u8; 512];
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert!(
        matches!(
            root(&e),
            ClientError::Protocol(ProtocolError::UnknownCookie { .. })
        ),
        "{e}"
    );
    // Later calls say why the connection is gone.
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert!(matches!(&e, ClientError::Closed { .. }), "{e}");
    assert!(matches!(
        root(&e),
        ClientError::Protocol(ProtocolError::UnknownCookie { .. })
    ));
    h.await.unwrap();
}

#[tokio::test]
async fn a_wrong_reply_magic_closes_the_connection() {
    let (c, h) = transmission(|mut s| async move {
        read_request(&mut s).await;
        s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
            .await
            .unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(
        matches!(
            root(&e),
            ClientError::Protocol(ProtocolError::BadMagic {
                what: "reply",
                got: 0xdeadbeef
            })
        ),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn oversize_chunks_are_refused_before_their_payload() {
    for kind in [
        NBD_REPLY_TYPE_OFFSET_DATA,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        NBD_REPLY_TYPE_ERROR,
    ] {
        let (c, h) = transmission(move |mut s| async move {
            let r = read_request(&mut s).await;
            // Only the header: 4 GiB announced, nothing sent.
            let head = structured_header(0, kind, r.handle, 0xffff_fff4);
            s.write_all(&head).await.unwrap();
            drain(&mut s).await;
        })
        .await;
        let started = Instant::now();
        let e = if kind == NBD_REPLY_TYPE_BLOCK_STATUS {
            c.block_status("base:allocation", 0, 4096)
                .await
                .unwrap_err()
        } else {
            c.read(0, &mut [0u8; 4096]).await.unwrap_err()
        };
        assert!(
            matches!(
                root(&e),
                ClientError::Protocol(ProtocolError::TooLong {
                    len: 0xffff_fff4 | 0xffff_ffec,
                    ..
                })
            ),
            "chunk type {kind}: {e}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(c);
        h.await.unwrap();
    }
}

#[tokio::test]
async fn holes_and_interleaved_chunks_are_reassembled() {
    let (c, h) = transmission(|mut s| async move {
        let a = read_request(&mut s).await;
        let b = read_request(&mut s).await;
        assert_eq!((a.offset, a.len, b.offset, b.len), (0, 8192, 8192, 4096));
        // Chunks of two replies interleaved, each reply out of order.
        chunk(
            &mut s,
            0,
            NBD_REPLY_TYPE_OFFSET_DATA,
            a.handle,
            &data_payload(4096, &[0xaa; 4096]),
        )
        .await;
        chunk(
            &mut s,
            0,
            NBD_REPLY_TYPE_OFFSET_HOLE,
            b.handle,
            &hole_payload(8192 + 2048, 2048),
        )
        .await;
        chunk(
            &mut s,
            0,
            NBD_REPLY_TYPE_OFFSET_HOLE,
            a.handle,
            &hole_payload(0, 4096),
        )
        .await;
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            a.handle,
            &[],
        )
        .await;
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            b.handle,
            &data_payload(8192, &[0xbb; 2048]),
        )
        .await;
        drain(&mut s).await;
    })
    .await;
    // Buffers full of junk: holes must come back as zeroes.
    let ra = c.start_read(0, vec![0x11; 8192]).await.unwrap();
    let rb = c.start_read(8192, vec![0x22; 4096]).await.unwrap();
    let b = rb.finish().await.unwrap();
    let a = ra.finish().await.unwrap();
    assert!(a[..4096].iter().all(|&x| x == 0) && a[4096..].iter().all(|&x| x == 0xaa));
    assert!(b[..2048].iter().all(|&x| x == 0xbb) && b[2048..].iter().all(|&x| x == 0));
    drop(c);
    h.await.unwrap();
}

#[tokio::test]
async fn overlapping_outside_or_short_replies_are_violations() {
    type Script = fn(u64) -> Vec<(u16, u16, Vec<u8>)>;
    let cases: [(&str, Script); 4] = [
        ("overlap", |_| {
            vec![
                (0, NBD_REPLY_TYPE_OFFSET_DATA, data_payload(0, &[1; 3000])),
                (
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    data_payload(2048, &[1; 2048]),
                ),
            ]
        }),
        ("outside", |_| {
            vec![(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_HOLE,
                hole_payload(4000, 200),
            )]
        }),
        ("short", |_| {
            vec![(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                data_payload(0, &[1; 4000]),
            )]
        }),
        ("unknown chunk type", |_| {
            vec![(NBD_REPLY_FLAG_DONE, 77, vec![0; 8])]
        }),
    ];
    for (name, script) in cases {
        let (c, h) = transmission(move |mut s| async move {
            let r = read_request(&mut s).await;
            for (flags, kind, payload) in script(r.handle) {
                chunk(&mut s, flags, kind, r.handle, &payload).await;
            }
            drain(&mut s).await;
        })
        .await;
        let e = c.read(0, &mut [0u8; 4096]).await.unwrap_err();
        assert!(
            matches!(root(&e), ClientError::Protocol(ProtocolError::Invalid(_))),
            "{name}: {e}"
        );
        drop(c);
        h.await.unwrap();
    }
}

#[tokio::test]
async fn a_simple_reply_to_a_structured_read_is_a_violation() {
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        s.write_all(&simple_reply(0, r.handle)).await.unwrap();
        s.write_all(&[0u8; 512]).await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(
        matches!(root(&e), ClientError::Protocol(ProtocolError::Invalid(m)) if m.contains("simple reply")),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn error_chunks_fail_one_request_and_the_connection_goes_on() {
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            NBD_REPLY_TYPE_OFFSET_DATA,
            r.handle,
            &data_payload(0, &[5; 1024]),
        )
        .await;
        let p = error_payload(NBD_EIO, "bad sector", Some(1024));
        chunk(&mut s, 0, NBD_REPLY_TYPE_ERROR_OFFSET, r.handle, &p).await;
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            r.handle,
            &[],
        )
        .await;
        // An unknown error type, with a trailing field: errored, not fatal.
        let r = read_request(&mut s).await;
        let mut p = error_payload(NBD_EPERM, "new kind", None);
        p.extend_from_slice(&[0; 12]);
        chunk(&mut s, NBD_REPLY_FLAG_DONE, 0x8077, r.handle, &p).await;
        let r = read_request(&mut s).await;
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            r.handle,
            &data_payload(0, &[6; 2048]),
        )
        .await;
        drain(&mut s).await;
    })
    .await;
    let e = c.read(0, &mut [0u8; 2048]).await.unwrap_err();
    match &e {
        ClientError::Server {
            errno,
            message,
            offset,
        } => {
            assert_eq!(
                (*errno, message.as_str(), *offset),
                (NBD_EIO, "bad sector", Some(1024))
            )
        }
        e => panic!("{e}"),
    }
    let e = c.read(0, &mut [0u8; 2048]).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server { errno: NBD_EPERM, message, .. } if message.contains("new kind")),
        "{e}"
    );
    let mut buf = [0u8; 2048];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 6));
    drop(c);
    h.await.unwrap();
}

#[tokio::test]
async fn a_server_that_hangs_up_mid_reply_fails_the_waiters() {
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        let head = structured_header(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            r.handle,
            8 + 4096,
        );
        s.write_all(&head).await.unwrap();
        s.write_all(&[0u8; 100]).await.unwrap();
        // and close
    })
    .await;
    let e = c.read(0, &mut [0u8; 4096]).await.unwrap_err();
    assert!(matches!(root(&e), ClientError::ServerClosed { .. }), "{e}");
    h.await.unwrap();
}

#[tokio::test]
async fn a_silent_server_hits_the_request_timeout() {
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..config()
    };
    let (uri, h) = fake(|mut s| async move {
        handshake(&mut s).await;
        drain(&mut s).await; // takes requests, never answers
    })
    .await;
    let c = connect(&uri, &cfg).await.unwrap();
    let started = Instant::now();
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(matches!(root(&e), ClientError::Timeout { .. }), "{e}");
    h.await.unwrap();
}

#[tokio::test]
async fn dropping_every_handle_sends_disc() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        assert_eq!((r.kind, r.offset, r.len), (NBD_CMD_DISC, 0, 0));
        let _ = tx.send(());
        drain(&mut s).await;
    })
    .await;
    let c2 = c.clone();
    drop(c);
    drop(c2);
    tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap();
    h.await.unwrap();
}

#[tokio::test]
async fn eshutdown_makes_the_client_disconnect() {
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        let p = error_payload(NBD_ESHUTDOWN, "going down", None);
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            r.handle,
            &p,
        )
        .await;
        // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
        let r = read_request(&mut s).await;
        assert_eq!(r.kind, NBD_CMD_DISC);
        drain(&mut s).await;
    })
    .await;
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                errno: NBD_ESHUTDOWN,
                ..
            }
        ),
        "{e}"
    );
    let e = c.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(
        matches!(root(&e), ClientError::ServerShutdown { .. }),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn block_status_chunks_are_checked() {
    // A chunk for a context that was never granted, then a good one.
    let (c, h) = transmission(|mut s| async move {
        let r = read_request(&mut s).await;
        let mut p = 4u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        chunk(
            &mut s,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            r.handle,
            &p,
        )
        .await;
        drain(&mut s).await;
    })
    .await;
    let e = c
        .block_status("base:allocation", 0, 4096)
        .await
        .unwrap_err();
    assert!(
        matches!(root(&e), ClientError::Protocol(ProtocolError::Invalid(m)) if m.contains("not granted")),
        "{e}"
    );
    drop(c);
    h.await.unwrap();

    // Replies that cover less than asked make the walk ask again from their
    // end; a descriptor that reaches past the request is clamped to it.
    let (c, h) = transmission(|mut s| async move {
        let steps = [
            (0, SIZE, SIZE / 2, 3u32),
            (SIZE / 2, SIZE / 2, SIZE / 4, 0),
            (SIZE / 2 + SIZE / 4, SIZE / 4, 1 << 31, 2),
        ];
        for (offset, len, reply_len, flags) in steps {
            let r = read_request(&mut s).await;
            assert_eq!(
                (r.kind, r.offset, u64::from(r.len)),
                (NBD_CMD_BLOCK_STATUS, offset, len)
            );
            let mut p = 9u32.to_be_bytes().to_vec();
            p.extend_from_slice(&(reply_len as u32).to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
            chunk(
                &mut s,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                r.handle,
                &p,
            )
            .await;
        }
        drain(&mut s).await;
    })
    .await;
    let got = c.collect_extents("base:allocation", 0, SIZE).await.unwrap();
    let half = SIZE / 2;
    let quarter = SIZE / 4;
    let want = [
        (0, half, 3),
        (half, quarter, 0),
        (half + quarter, quarter, 2),
    ];
    let got: Vec<_> = got.iter().map(|e| (e.offset, e.len, e.flags)).collect();
    assert_eq!(got, want);
    drop(c);
    h.await.unwrap();
}
