//! NBD over TLS (`NBD_OPT_STARTTLS`, FORCEDTLS) with real clients (libnbd's
//! nbdinfo and nbdcopy with `nbds://` URIs, qemu-img with x509 credentials), and the limits against hostile
//! clients: plain clients refused, garbage instead of a ClientHello, slow
//! readers, silent connections and more connections than the cap.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd_server::proto::*;
use nbd_server::rustls;
use nbd_server::{load_pem, Export, Exports, MemorySource, ServerConfig};

const MIB: u64 = 1 << 20;

/// A CA and a server certificate for `localhost` and 127.0.0.1, made at test
/// time. `dir` holds `ca-cert.pem` (what libnbd's `tls-certificates` wants),
/// `server-cert.pem` and `server-key.pem`; `dir/client` holds `ca-cert.pem`
/// and a client certificate signed by the same CA (`client-cert.pem`,
/// `client-key.pem`: the names libnbd looks for).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        sa_tests::pki::make_pki(dir.path(), "nbd-server");
        Pki { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        load_pem(
            &self.path().join("server-cert.pem"),
            &self.path().join("server-key.pem"),
            None,
        )
        .expect("load the test certificate")
    }

    /// A rustls client that trusts the test CA.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_file(self.path().join("ca-cert.pem")).unwrap();
        roots.add(ca).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }

    /// The server configuration that requires client certificates of the CA.
    fn server_config_with_clients(&self) -> Arc<rustls::ServerConfig> {
        load_pem(
            &self.path().join("server-cert.pem"),
            &self.path().join("server-key.pem"),
            Some(&self.path().join("ca-cert.pem")),
        )
        .expect("load the test certificate and client CA")
    }

    /// The libnbd URI of export `name` over TLS (trusting the CA, no client certificate).
    fn uri(&self, port: u16, name: &str) -> String {
        format!(
            "nbds://127.0.0.1:{port}/{name}?tls-certificates={}",
            self.path().display()
        )
    }

    /// The same, presenting the client certificate.
    fn client_uri(&self, port: u16, name: &str) -> String {
        format!(
            "nbds://127.0.0.1:{port}/{name}?tls-certificates={}",
            self.path().join("client").display()
        )
    }
}

/// Random bytes of `len`.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

fn tls_server(pki: &Pki, data: &[u8], config: ServerConfig) -> TestServer {
    let config = ServerConfig {
        tls: Some(pki.server_config()),
        ..config
    };
    let source = Arc::new(MemorySource::from_bytes(data));
    TestServer::start_with(
        Exports::single(Export::new("disk", "TLS test export", source)).unwrap(),
        config,
    )
}

/// nbdcopy of the export over TLS into a file; the file must equal `data`.
fn nbdcopy_tls_matches(pki: &Pki, port: u16, data: &[u8], out: &Path) {
    let _ = std::fs::remove_file(out);
    run_ok("nbdcopy", &[&pki.uri(port, "disk"), out.to_str().unwrap()]);
    let got = std::fs::read(out).unwrap();
    assert!(got == data, "nbdcopy over TLS returned different bytes");
}

// ------------------------------------------------------- raw option helpers

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("send option");
    s.flush().expect("flush");
}

/// One option reply: (option, reply type, data).
fn option_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("option reply data");
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        d,
    )
}

/// Sends `option` and returns the reply types up to the final one.
fn option(s: &mut (impl Read + Write), option: u32, data: &[u8]) -> Vec<u32> {
    send_option(s, option, data);
    let mut kinds = Vec::new();
    loop {
        let (opt, kind, _) = option_reply(s);
        assert_eq!(opt, option);
        kinds.push(kind);
        if kind == NBD_REP_ACK || kind & (1 << 31) != 0 {
            return kinds;
        }
    }
}

/// `NBD_OPT_GO` data for `name` with no information requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Connects, reads the greeting, sends fixed-newstyle + no-zeroes.
fn plain_session(port: u16) -> TcpStream {
    let c = RawClient::connect(port);
    c.s.set_read_timeout(Some(DEADLINE)).unwrap();
    c.s
}

/// True when the peer closes within the read timeout (EOF or reset).
fn closes(s: &mut impl Read) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

// ----------------------------------------------------------------- tests

#[test]
fn nbdinfo_and_nbdcopy_over_tls_get_the_data() {
    let pki = Pki::new();
    let data = random(8 * MIB as usize, 11);
    let srv = tls_server(&pki, &data, ServerConfig::default());
    let o = run_ok("nbdinfo", &["--size", &pki.uri(srv.port, "disk")]);
    assert_eq!(o.stdout.trim(), (8 * MIB).to_string());
    // The default export name over TLS too.
    let o = run_ok("nbdinfo", &[&pki.uri(srv.port, "")]);
    assert!(o.stdout.contains("base:allocation"), "{}", o.stdout);
    let out = pki.path().join("copy.raw");
    nbdcopy_tls_matches(&pki, srv.port, &data, &out);
    // qemu's NBD client over TLS (its x509 credentials read `ca-cert.pem` from the directory).
    let q = pki.path().join("qemu.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                pki.path().display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
                srv.port
            ),
            "-O",
            "raw",
            q.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&q).unwrap() == data,
        "qemu-img over TLS returned other bytes"
    );
    // And back: nbdcopy writes a file into the export over TLS.
    let other = random(8 * MIB as usize, 12);
    let src = pki.path().join("other.raw");
    std::fs::write(&src, &other).unwrap();
    run_ok(
        "nbdcopy",
        &[src.to_str().unwrap(), &pki.uri(srv.port, "disk")],
    );
    nbdcopy_tls_matches(&pki, srv.port, &other, &out);
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_given() {
    let pki = Pki::new();
    let data = random(4 * MIB as usize, 81);
    let config = ServerConfig {
        tls: Some(pki.server_config_with_clients()),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(
        Exports::single(Export::new(
            "disk",
            "client-cert test",
            Arc::new(MemorySource::from_bytes(&data)),
        ))
        .unwrap(),
        config,
    );
    // Without a client certificate the TLS handshake fails.
    let o = run("nbdinfo", &["--size", &pki.uri(srv.port, "disk")]);
    assert_ne!(
        o.code,
        Some(0),
        "a client without a certificate got in: {o:?}"
    );
    // With one signed by the CA, nbdcopy gets the data.
    let out = pki.path().join("copy.raw");
    run_ok(
        "nbdcopy",
        &[&pki.client_uri(srv.port, "disk"), out.to_str().unwrap()],
    );
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn plain_clients_are_refused_when_tls_is_required() {
    let pki = Pki::new();
    let data = random(MIB as usize, 21);
    let srv = tls_server(&pki, &data, ServerConfig::default());
    // libnbd without TLS: every option gets NBD_REP_ERR_TLS_REQD (libnbd
    // 1.14 reports it as "Operation not supported").
    for args in [vec![srv.uri()], vec!["--list".into(), srv.uri()]] {
        let o = run(
            "nbdinfo",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_ne!(o.code, Some(0), "a plain client must not get in: {o:?}");
    }
    // The same at the wire level.
    let mut s = plain_session(srv.port);
    assert_eq!(option(&mut s, NBD_OPT_LIST, &[]), [NBD_REP_ERR_TLS_REQD]);
    assert_eq!(
        option(&mut s, NBD_OPT_GO, &go_data("disk")),
        [NBD_REP_ERR_TLS_REQD]
    );
    assert_eq!(
        option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]),
        [NBD_REP_ERR_TLS_REQD]
    );
    assert_eq!(
        option(&mut s, NBD_OPT_STARTTLS, b"x"),
        [NBD_REP_ERR_INVALID]
    );
    assert_eq!(option(&mut s, NBD_OPT_ABORT, &[]), [NBD_REP_ACK]);
    assert!(closes(&mut s));
    // NBD_OPT_EXPORT_NAME cannot be refused with an error: the server closes.
    let mut s = plain_session(srv.port);
    send_option(&mut s, NBD_OPT_EXPORT_NAME, b"disk");
    assert!(
        closes(&mut s),
        "EXPORT_NAME without TLS must close the session"
    );
    // A client without fixed newstyle cannot do TLS at all.
    let mut c = RawClient::connect_raw(srv.port);
    c.write(&0u32.to_be_bytes());
    assert!(c.is_closed());
    // The server still serves TLS clients.
    nbdcopy_tls_matches(&pki, srv.port, &data, &pki.path().join("copy.raw"));
}

#[test]
fn starttls_without_a_certificate_is_unsupported() {
    let data = random(MIB as usize, 31);
    let srv = TestServer::single("disk", Arc::new(MemorySource::from_bytes(&data)));
    let mut s = plain_session(srv.port);
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), [NBD_REP_ERR_UNSUP]);
    // ... and the session goes on in plain text.
    assert_eq!(option(&mut s, NBD_OPT_LIST, &[]).last(), Some(&NBD_REP_ACK));
    let pki = Pki::new();
    // libnbd's nbds:// insists on TLS and must fail against a plain server.
    let o = run("nbdinfo", &[&pki.uri(srv.port, "disk")]);
    assert_ne!(o.code, Some(0), "{o:?}");
}

#[test]
fn options_inside_tls_and_a_second_starttls() {
    let pki = Pki::new();
    let data = random(MIB as usize, 41);
    let srv = tls_server(&pki, &data, ServerConfig::default());
    let mut tcp = plain_session(srv.port);
    assert_eq!(option(&mut tcp, NBD_OPT_STARTTLS, &[]), [NBD_REP_ACK]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(pki.client_config(), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // "The server MUST NOT send `NBD_REP_ERR_TLS_REQD` in reply to any option
    // if TLS has already been initiated"; a second STARTTLS is INVALID.
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), [NBD_REP_ERR_INVALID]);
    let list = option(&mut s, NBD_OPT_LIST, &[]);
    assert_eq!(list.last(), Some(&NBD_REP_ACK), "{list:?}");
    assert_eq!(option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]), [NBD_REP_ACK]);
    let go = option(&mut s, NBD_OPT_GO, &go_data("disk"));
    assert_eq!(go.last(), Some(&NBD_REP_ACK), "{go:?}");
    // One read over TLS, structured reply: header, offset, data.
    let req = Request {
        flags: 0,
        kind: NBD_CMD_READ,
        handle: 7,
        offset: 4096,
        len: 4096,
    };
    s.write_all(&req.encode()).unwrap();
    s.flush().unwrap();
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        u32::from_be_bytes(head[0..4].try_into().unwrap()),
        NBD_STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), 7);
    let mut body = vec![0u8; 8 + 4096];
    s.read_exact(&mut body).unwrap();
    assert_eq!(&body[8..], &data[4096..8192]);
}

#[test]
fn garbage_instead_of_a_client_hello_is_dropped() {
    let pki = Pki::new();
    let data = random(2 * MIB as usize, 51);
    let srv = tls_server(&pki, &data, ServerConfig::default());
    let mut s = plain_session(srv.port);
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), [NBD_REP_ACK]);
    s.write_all(&[0x55; 512]).unwrap();
    assert!(
        closes(&mut s),
        "the server must drop a failed TLS handshake"
    );
    // Another one sends an NBD option where the ClientHello belongs.
    let mut s = plain_session(srv.port);
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), [NBD_REP_ACK]);
    send_option(&mut s, NBD_OPT_GO, &go_data("disk"));
    assert!(closes(&mut s));
    // And one that sends a ClientHello's start, then nothing: the handshake
    // timeout drops it (tested with the cap below); meanwhile others are served.
    let mut stuck = plain_session(srv.port);
    assert_eq!(option(&mut stuck, NBD_OPT_STARTTLS, &[]), [NBD_REP_ACK]);
    stuck.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    nbdcopy_tls_matches(&pki, srv.port, &data, &pki.path().join("copy.raw"));
}

/// A server with short timeouts, so that the tests see them fire.
fn impatient(max_connections: usize) -> ServerConfig {
    ServerConfig {
        max_connections,
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Some(Duration::from_secs(3)),
        reply_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

#[test]
fn slow_and_silent_clients_do_not_stall_a_concurrent_copy() {
    let data = random(64 * MIB as usize, 61);
    let srv = TestServer::start_with(
        Exports::single(Export::new(
            "disk",
            "slow-client test",
            Arc::new(MemorySource::from_bytes(&data)),
        ))
        .unwrap(),
        impatient(16),
    );
    // A client that asks for 8 x 32 MiB and never reads a byte of it.
    let mut slow = RawClient::connect(srv.port);
    slow.go("disk", false);
    for h in 0..8 {
        slow.request(NBD_CMD_READ, 0, h, 0, 32 << 20, &[]);
    }
    // One that connects and sends nothing, and one stuck mid-handshake.
    let silent = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut half = RawClient::connect(srv.port);
    half.write(&IHAVEOPT.to_be_bytes());

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    let started = Instant::now();
    run_ok("nbdcopy", &[&srv.uri(), out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy got other bytes"
    );
    eprintln!("nbdcopy beside a slow reader took {:?}", started.elapsed());
    // The server drops all three (handshake timeout, reply timeout) and
    // goes on serving.
    let mut silent = RawClient {
        s: silent,
        structured: false,
    };
    assert!(silent.is_closed(), "a silent client must be dropped");
    assert!(half.is_closed(), "a half-open handshake must be dropped");
    assert!(
        slow.is_closed(),
        "a client that does not read must be dropped"
    );
    let o = run_ok("nbdinfo", &["--size", &srv.uri()]);
    assert_eq!(o.stdout.trim(), (64 * MIB).to_string());
}

#[test]
fn connections_beyond_the_cap_wait_and_the_server_recovers() {
    let pki = Pki::new();
    let data = random(MIB as usize, 71);
    let srv = tls_server(&pki, &data, impatient(2));
    // Two clients take both slots and never finish the handshake.
    let a = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let b = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let started = Instant::now();
    // A third waits in the backlog until the handshake timeout frees a slot.
    let o = run_ok("nbdinfo", &["--size", &pki.uri(srv.port, "disk")]);
    assert_eq!(o.stdout.trim(), MIB.to_string());
    eprintln!(
        "nbdinfo behind two stuck clients took {:?}",
        started.elapsed()
    );
    for s in [a, b] {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut c = RawClient {
            s,
            structured: false,
        };
        assert!(
            c.is_closed(),
            "stuck clients are dropped after the handshake timeout"
        );
    }
    // Many at once: all are served, some after waiting for a slot.
    let uri = pki.uri(srv.port, "disk");
    let copies: Vec<_> = (0..6)
        .map(|_| {
            let uri = uri.clone();
            std::thread::spawn(move || run("nbdinfo", &["--size", &uri]))
        })
        .collect();
    for c in copies {
        let o = c.join().unwrap();
        assert_eq!(o.code, Some(0), "{o:?}");
    }
}
