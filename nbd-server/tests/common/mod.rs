//! Shared test helpers: an in-process server, guarded client processes, and a
//! small raw NBD client for protocol-level tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd_server::proto::*;
use nbd_server::{BlockSource, Export, Exports, Server, ServerConfig};

/// How long any client process or socket read may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A server on 127.0.0.1:0 in its own runtime thread; shut down on drop.
pub struct TestServer {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(exports: Exports) -> TestServer {
        TestServer::start_with(exports, ServerConfig::default())
    }

    pub fn start_with(exports: Exports, config: ServerConfig) -> TestServer {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                port_tx
                    .send(listener.local_addr().expect("addr").port())
                    .expect("port");
                Server::with_config(Arc::new(exports), config)
                    .run(listener, async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("server run");
            });
        });
        let port = port_rx
            .recv_timeout(DEADLINE)
            .expect("server did not start");
        TestServer {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Serves one source as `name` and as the default export `""`.
    pub fn single(name: &str, source: Arc<dyn BlockSource>) -> TestServer {
        TestServer::start(
            Exports::single(Export::new(name, "test export", source)).expect("exports"),
        )
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            if !std::thread::panicking() {
                t.join().expect("server thread panicked");
            }
        }
    }
}

/// Kills the child on drop, so no client outlives a failing test.
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Output of a finished client process.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Fails the test with a clear message when a client binary is missing.
pub fn require(bin: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!(
        "NBD client `{bin}` is not installed; install libnbd-bin, python3-libnbd and qemu-utils \
         (apt-get install -y libnbd-bin python3-libnbd qemu-utils)"
    );
}

/// Runs `bin args` to completion within [`DEADLINE`], killing it otherwise.
pub fn run(bin: &str, args: &[&str]) -> Out {
    let path = require(bin);
    let child = Command::new(&path)
        .args(args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {path}: {e}"));
    let mut guard = ChildGuard(Some(child));
    let c = guard.0.as_mut().expect("child");
    let mut so = c.stdout.take().expect("stdout");
    let mut se = c.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > DEADLINE {
            drop(guard);
            panic!("{bin} {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    guard.0 = None;
    Out {
        code: status.code(),
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// Runs and asserts exit code 0.
pub fn run_ok(bin: &str, args: &[&str]) -> Out {
    let o = run(bin, args);
    assert_eq!(o.code, Some(0), "{bin} {args:?} failed: {o:?}");
    o
}

/// A deterministic xorshift generator (no extra dependencies).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

// ------------------------------------------------------------ raw client

/// A reply as the raw client saw it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawReply {
    pub handle: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data reassembled at request offsets (structured) or the simple payload.
    pub data: Vec<u8>,
    /// Block status descriptors (length, flags).
    pub extents: Vec<(u32, u32)>,
}

/// A blocking NBD client speaking the wire protocol directly.
pub struct RawClient {
    pub s: TcpStream,
    pub structured: bool,
}

impl RawClient {
    /// Connects and reads the greeting; does not send client flags.
    pub fn connect_raw(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut c = RawClient {
            s,
            structured: false,
        };
        let mut g = [0u8; 18];
        c.read(&mut g);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        c
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    pub fn connect(port: u16) -> RawClient {
        let mut c = RawClient::connect_raw(port);
        c.write(&3u32.to_be_bytes());
        c
    }

    pub fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    pub fn read(&mut self, b: &mut [u8]) {
        self.s.read_exact(b).expect("read");
    }

    /// True when the server has closed the connection (EOF or reset), waiting
    /// at most [`DEADLINE`].
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue, // drain whatever was still queued
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.read(&mut h);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.read(&mut d);
        (opt, kind, d)
    }

    /// Sends an option and collects replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data);
        let mut out = Vec::new();
        loop {
            let (opt, kind, d) = self.option_reply();
            assert_eq!(opt, option);
            let last = kind == NBD_REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, d));
            if last {
                return out;
            }
        }
    }

    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Negotiates (optionally) structured replies and base:allocation, then
    /// NBD_OPT_GO; returns (size, transmission flags).
    pub fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            let r = self.option(NBD_OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.last().unwrap().0, NBD_REP_ACK);
            let r = self.option(
                NBD_OPT_SET_META_CONTEXT,
                &RawClient::meta_data(name, &["base:allocation"]),
            );
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
            self.structured = true;
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let r = self.option(NBD_OPT_GO, &d);
        assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{r:?}");
        let info = r
            .iter()
            .find(|(k, d)| *k == NBD_REP_INFO && d[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.1[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(payload);
        self.write(&b);
    }

    /// Reads one complete reply. `read_len` is the request length of a READ
    /// (0 otherwise); `offsets` maps handles to request offsets for reassembly.
    pub fn reply(&mut self, read_lens: &dyn Fn(u64) -> (u64, u32)) -> RawReply {
        let mut magic = [0u8; 4];
        self.read(&mut magic);
        let magic = u32::from_be_bytes(magic);
        if magic == NBD_SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.read(&mut h);
            let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
            let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let (_, len) = read_lens(handle);
            let mut data = Vec::new();
            if error == 0 && !self.structured && len > 0 {
                data = vec![0u8; len as usize];
                self.read(&mut data);
            }
            return RawReply {
                handle,
                error,
                data,
                extents: vec![],
            };
        }
        assert_eq!(magic, NBD_STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut out = RawReply::default();
        let mut first = true;
        loop {
            if !first {
                let mut m = [0u8; 4];
                self.read(&mut m);
                assert_eq!(u32::from_be_bytes(m), NBD_STRUCTURED_REPLY_MAGIC);
            }
            let mut h = [0u8; 16];
            self.read(&mut h);
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            assert!(
                first || handle == out.handle,
                "interleaved chunk in one reply (test client limitation)"
            );
            out.handle = handle;
            first = false;
            let mut p = vec![0u8; len as usize];
            self.read(&mut p);
            match kind {
                NBD_REPLY_TYPE_NONE => assert_eq!(len, 0),
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    let (off, rlen) = read_lens(handle);
                    let at = u64::from_be_bytes(p[0..8].try_into().unwrap());
                    assert!(
                        at >= off && at + (len as u64 - 8) <= off + rlen as u64,
                        "chunk outside request"
                    );
                    if out.data.is_empty() {
                        out.data = vec![0u8; rlen as usize];
                    }
                    let s = (at - off) as usize;
                    out.data[s..s + p.len() - 8].copy_from_slice(&p[8..]);
                }
                NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let (off, rlen) = read_lens(handle);
                    if out.data.is_empty() {
                        out.data = vec![0u8; rlen as usize];
                    }
                    let at = u64::from_be_bytes(p[0..8].try_into().unwrap());
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                    let s = (at - off) as usize;
                    out.data[s..s + n as usize].fill(0);
                }
                NBD_REPLY_TYPE_BLOCK_STATUS => {
                    assert_eq!(
                        u32::from_be_bytes(p[0..4].try_into().unwrap()),
                        BASE_ALLOCATION_ID
                    );
                    for c in p[4..].chunks(8) {
                        out.extents.push((
                            u32::from_be_bytes(c[0..4].try_into().unwrap()),
                            u32::from_be_bytes(c[4..8].try_into().unwrap()),
                        ));
                    }
                }
                k if k & 0x8000 != 0 => {
                    out.error = u32::from_be_bytes(p[0..4].try_into().unwrap());
                    assert_ne!(out.error, 0);
                    let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
                    assert!(6 + mlen <= p.len());
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                return out;
            }
        }
    }

    /// One request, one reply (for simple tests).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> RawReply {
        self.request(kind, flags, 42, offset, len, payload);
        let rlen = if kind == NBD_CMD_READ { len } else { 0 };
        let r = self.reply(&|_| (offset, rlen));
        assert_eq!(r.handle, 42);
        r
    }
}
