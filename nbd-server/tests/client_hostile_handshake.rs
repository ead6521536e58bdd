//! The NBD client against fake servers that break the handshake: each case
//! ends in a clean, typed error, quickly, without reading or allocating what
//! an oversize length announces.

mod fake_server;

use std::time::{Duration, Instant};

use fake_server::*;
use nbd_server::client::{ClientConfig, ClientError, ProtocolError};
use nbd_server::proto::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_peer_that_is_not_nbd_is_named_as_such() {
    let (uri, h) = fake(|mut s| async move {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(
        matches!(e, ClientError::NotNbd { got } if got == u64::from_be_bytes(*b"HTTP/1.1")),
        "{e}"
    );
    assert!(e.to_string().contains("not an NBD server"), "{e}");
    h.await.unwrap();
}

#[tokio::test]
async fn oldstyle_and_non_fixed_servers_are_refused_clearly() {
    let (uri, h) = fake(|mut s| async move {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        g.extend_from_slice(&SIZE.to_be_bytes());
        g.extend_from_slice(&[0u8; 4 + 124]);
        s.write_all(&g).await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(matches!(e, ClientError::Oldstyle), "{e}");
    assert!(e.to_string().contains("oldstyle"), "{e}");
    h.await.unwrap();

    let (uri, h) = fake(|mut s| async move {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&g).await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(
        matches!(e, ClientError::NotFixedNewstyle { flags: 0 }),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn a_bad_option_reply_magic_is_a_protocol_error() {
    let (uri, h) = fake(|mut s| async move {
        greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await;
        read_option(&mut s).await;
        s.write_all(&[0x42; 20]).await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Protocol(ProtocolError::BadMagic {
                what: "option reply",
                ..
            })
        ),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn an_oversize_option_reply_is_refused_before_reading_it() {
    let (uri, h) = fake(|mut s| async move {
        greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await;
        let (opt, _) = read_option(&mut s).await;
        // Announce 4 GiB, send nothing of it, and wait: a client that tried
        // to read (or allocate) it would hang until its timeout.
        let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&NBD_REP_ACK.to_be_bytes());
        b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
        s.write_all(&b).await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let started = Instant::now();
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Protocol(ProtocolError::TooLong {
                len: 0xffff_fff0,
                ..
            })
        ),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    h.await.unwrap();
}

#[tokio::test]
async fn a_flood_of_granted_contexts_is_bounded() {
    let (uri, h) = fake(|mut s| async move {
        greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await;
        let (opt, _) = read_option(&mut s).await;
        reply(&mut s, opt, NBD_REP_ACK, &[]).await;
        let (opt, _) = read_option(&mut s).await;
        assert_eq!(opt, NBD_OPT_SET_META_CONTEXT);
        for id in 0..10_000u32 {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(format!("x-flood:{id}").as_bytes());
            let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&NBD_REP_META_CONTEXT.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(&d);
            if s.write_all(&b).await.is_err() {
                return; // the client hung up
            }
        }
    })
    .await;
    let e = connect(&uri, &config()).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Protocol(ProtocolError::TooLong { .. })),
        "{e}"
    );
    h.await.unwrap();
}

#[tokio::test]
async fn option_errors_are_typed_and_end_with_a_soft_disconnect() {
    type Check = fn(&ClientError) -> bool;
    let cases: [(u32, u32, Check); 4] = [
        (
            NBD_OPT_GO,
            NBD_REP_ERR_UNKNOWN,
            |e| matches!(e, ClientError::ExportNotFound { export, message } if export == "disk" && message == "said the server"),
        ),
        (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_TLS_REQD, |e| {
            matches!(e, ClientError::TlsRequired { .. })
        }),
        (NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_SHUTDOWN, |e| {
            matches!(e, ClientError::ServerShutdown { .. })
        }),
        (NBD_OPT_GO, NBD_REP_ERR_POLICY, |e| {
            matches!(
                e,
                ClientError::OptionRefused {
                    option: "NBD_OPT_GO",
                    reply: "NBD_REP_ERR_POLICY",
                    ..
                }
            )
        }),
    ];
    for (fail_at, err, is) in cases {
        let (uri, h) = fake(move |mut s| async move {
            greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await;
            loop {
                let (opt, data) = read_option(&mut s).await;
                if opt == fail_at {
                    reply(&mut s, opt, err, b"said the server").await;
                    // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST
                    // initiate a soft disconnect"; likewise for the others.
                    let (next, _) = read_option(&mut s).await;
                    assert_eq!(next, NBD_OPT_ABORT);
                    reply(&mut s, next, NBD_REP_ACK, &[]).await;
                    drain(&mut s).await;
                    return;
                }
                match opt {
                    NBD_OPT_SET_META_CONTEXT => {
                        assert!(contains(&data, b"base:allocation"));
                        reply(&mut s, opt, NBD_REP_ACK, &[]).await
                    }
                    _ => reply(&mut s, opt, NBD_REP_ACK, &[]).await,
                }
            }
        })
        .await;
        let e = connect(&uri, &config()).await.unwrap_err();
        assert!(is(&e), "{}: {e:?}", reply_name(err));
        h.await.unwrap();
    }
}

#[tokio::test]
async fn a_stalled_handshake_times_out() {
    let (uri, h) = fake(|mut s| async move {
        greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await;
        drain(&mut s).await; // reads the option, never answers
    })
    .await;
    let cfg = ClientConfig {
        handshake_timeout: Duration::from_millis(300),
        ..config()
    };
    let started = Instant::now();
    let e = connect(&uri, &cfg).await.unwrap_err();
    assert!(matches!(e, ClientError::HandshakeTimeout { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    h.await.unwrap();
}

#[tokio::test]
async fn a_server_without_opt_go_gets_opt_export_name() {
    let (uri, h) = fake(|mut s| async move {
        greet(&mut s, NBD_FLAG_FIXED_NEWSTYLE).await; // no NO_ZEROES: 124 zeroes follow
        let (opt, _) = read_option(&mut s).await;
        reply(&mut s, opt, NBD_REP_ERR_UNSUP, &[]).await; // no structured replies either
        let (opt, _) = read_option(&mut s).await;
        assert_eq!(opt, NBD_OPT_GO);
        reply(&mut s, opt, NBD_REP_ERR_UNSUP, &[]).await;
        let (opt, name) = read_option(&mut s).await;
        assert_eq!((opt, name.as_slice()), (NBD_OPT_EXPORT_NAME, &b"disk"[..]));
        let mut b = SIZE.to_be_bytes().to_vec();
        b.extend_from_slice(&NBD_FLAG_HAS_FLAGS.to_be_bytes());
        b.extend_from_slice(&[0u8; 124]);
        s.write_all(&b).await.unwrap();
        let r = read_request(&mut s).await;
        assert_eq!((r.kind, r.offset, r.len), (NBD_CMD_READ, 512, 4));
        s.write_all(&simple_reply(0, r.handle)).await.unwrap();
        s.write_all(b"abcd").await.unwrap();
        drain(&mut s).await;
    })
    .await;
    let c = connect(&uri, &config()).await.unwrap();
    assert!(!c.info().structured_replies);
    assert!(
        c.contexts().is_empty(),
        "no structured replies, no contexts"
    );
    assert_eq!(c.size(), SIZE);
    let mut buf = [0u8; 4];
    c.read(512, &mut buf).await.unwrap();
    assert_eq!(&buf, b"abcd");
    c.disconnect().await.unwrap();
    h.await.unwrap();
}
