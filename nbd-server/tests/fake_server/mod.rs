//! A fake NBD server for the client's hostile-server tests: a one-connection
//! tokio listener on 127.0.0.1:0 running a script, and the server side of
//! the wire format to write such scripts.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use nbd_server::client::{Client, ClientConfig, ClientError, NbdUri};
use nbd_server::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Every test must finish well within this.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const SIZE: u64 = 1 << 20;

/// A one-connection fake server running `script` on the accepted socket.
pub async fn fake<F, Fut>(script: F) -> (NbdUri, JoinHandle<()>)
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

pub fn config() -> ClientConfig {
    ClientConfig {
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        meta_contexts: vec!["base:allocation".into()],
        ..ClientConfig::default()
    }
}

/// Connects with `config`, bounded by [`DEADLINE`].
pub async fn connect(uri: &NbdUri, config: &ClientConfig) -> Result<Client, ClientError> {
    tokio::time::timeout(DEADLINE, Client::connect(uri, config))
        .await
        .expect("the client must give up on its own")
}

/// Waits for whatever the server socket receives next, up to EOF (the
/// server side of "the client hung up").
pub async fn drain(s: &mut TcpStream) {
    let mut b = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(DEADLINE, s.read(&mut b)).await {
        if n == 0 {
            return;
        }
    }
}

// ------------------------------------------------------------ server side

pub async fn greet(s: &mut TcpStream, flags: u16) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    s.write_all(&g).await.unwrap();
    let client = s.read_u32().await.unwrap();
    assert_eq!(client, flags as u32 & 3, "client flags must mirror ours");
}

pub async fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let opt = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    assert!(len < 65536);
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

pub async fn reply(s: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// Serves a well-behaved handshake: structured replies, `base:allocation` as
/// context id 9 when asked, and `NBD_OPT_GO` for a read-only export of SIZE.
pub async fn handshake(s: &mut TcpStream) {
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

pub async fn send_go_info(s: &mut TcpStream) {
    let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&SIZE.to_be_bytes());
    info.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY).to_be_bytes());
    reply(s, NBD_OPT_GO, NBD_REP_INFO, &info).await;
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub async fn read_request(s: &mut TcpStream) -> Request {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    Request::parse(&h).expect("request magic")
}

pub async fn chunk(s: &mut TcpStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let mut b = structured_header(flags, kind, cookie, payload.len() as u32).to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).await.unwrap();
}

pub fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

pub fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

pub fn error_payload(errno: u32, msg: &str, offset: Option<u64>) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}

pub fn root(e: &ClientError) -> &ClientError {
    e.root()
}

/// Connects to a fake server that does a good handshake and then runs `then`.
pub async fn transmission<F, Fut>(then: F) -> (Client, JoinHandle<()>)
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
