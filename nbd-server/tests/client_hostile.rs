//! The NBD client against fake servers that break the protocol (and a few
//! that bend it legally): every case ends in a clean, typed error, quickly,
//! without reading or allocating what an oversize length announces.

use std::future::Future;
use std::time::{Duration, Instant};

use nbd_server::client::{Client, ClientConfig, ClientError, NbdUri, ProtocolError};
use nbd_server::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Every test must finish well within this.
const DEADLINE: Duration = Duration::from_secs(20);
const SIZE: u64 = 1 << 20;

/// A one-connection fake server running `script` on the accepted socket.
async fn fake<F, Fut>(script: F) -> (NbdUri, JoinHandle<()>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        script(s).await;
    });
    (NbdUri::tcp("127.0.0.1", port, "disk"), h)
}

fn config() -> ClientConfig {
    ClientConfig {
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        meta_contexts: vec!["base:allocation".into()],
        ..ClientConfig::default()
    }
}

/// Connects with `config`, bounded by [`DEADLINE`].
async fn connect(uri: &NbdUri, config: &ClientConfig) -> Result<Client, ClientError> {
    tokio::time::timeout(DEADLINE, Client::connect(uri, config))
        .await
        .expect("the client must give up on its own")
}

/// Waits for whatever the server socket receives next, up to EOF (the
/// server side of "the client hung up").
async fn drain(s: &mut TcpStream) {
    let mut b = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(DEADLINE, s.read(&mut b)).await {
        if n == 0 {
            return;
        }
    }
}

// ------------------------------------------------------------ server side

async fn greet(s: &mut TcpStream, flags: u16) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    s.write_all(&g).await.unwrap();
    let client = s.read_u32().await.unwrap();
    assert_eq!(client, flags as u32 & 3, "client flags must mirror ours");
}

async fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let opt = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    assert!(len < 65536);
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

async fn reply(s: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// Serves a well-behaved handshake: structured replies, `base:allocation` as
/// context id 9 when asked, and `NBD_OPT_GO` for a read-only export of SIZE.
async fn handshake(s: &mut TcpStream) {
    greet(s, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).await;
    loop {
        let (opt, data) = read_option(s).await;
        match opt {
            NBD_OPT_STRUCTURED_REPLY => reply(s, opt, NBD_REP_ACK, &[]).await,
            NBD_OPT_SET_META_CONTEXT => {
                if contains(&data, b"base:allocation") {
                    let mut d = 9u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    reply(s, opt, NBD_REP_META_CONTEXT, &d).await;
                }
                reply(s, opt, NBD_REP_ACK, &[]).await;
            }
            NBD_OPT_GO => {
                send_go_info(s).await;
                reply(s, opt, NBD_REP_ACK, &[]).await;
                return;
            }
            o => panic!("unexpected option {o}"),
        }
    }
}

async fn send_go_info(s: &mut TcpStream) {
    let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&SIZE.to_be_bytes());
    info.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY).to_be_bytes());
    reply(s, NBD_OPT_GO, NBD_REP_INFO, &info).await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn read_request(s: &mut TcpStream) -> Request {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    Request::parse(&h).expect("request magic")
}

async fn chunk(s: &mut TcpStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let mut b = structured_header(flags, kind, cookie, payload.len() as u32).to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).await.unwrap();
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

fn error_payload(errno: u32, msg: &str, offset: Option<u64>) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}

fn root(e: &ClientError) -> &ClientError {
    e.root()
}

// ------------------------------------------------------------ handshake

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

// ------------------------------------------------------------ transmission

/// Connects to a fake server that does a good handshake and then runs `then`.
async fn transmission<F, Fut>(then: F) -> (Client, JoinHandle<()>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (uri, h) = fake(|mut s| async move {
        handshake(&mut s).await;
        then(s).await;
    })
    .await;
    let c = connect(&uri, &config()).await.unwrap();
    assert_eq!(c.context("base:allocation").map(|c| c.id), Some(9));
    (c, h)
}

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
