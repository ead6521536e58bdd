//! `sa-image serve --tls-cert --tls-key`: NBD over TLS to libnbd's nbdinfo and nbdcopy
//! (`nbds://` URIs), plain clients refused, the same settings from a config file, and clear
//! errors for half-given or broken certificate settings.

use std::path::{Path, PathBuf};

use sa_tests::cluster::{expect_fail, str_of, u64_of};
use sa_tests::nbd_client::{client, client_ok};
use sa_tests::{sha256, Cluster, ImageSpec, Serve, MIB};

fn make_pki(dir: &Path) {
    sa_tests::pki::make_pki(dir, "sa-image");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The libnbd URI for `url` (`nbds://HOST:PORT`) with the CA directory.
fn with_ca(url: &str, pki: &Path) -> String {
    format!("{url}/?tls-certificates={}", pki.display())
}

#[test]
fn serve_over_tls_gives_nbds_clients_the_exact_disk_and_refuses_plain_ones() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(24 * MIB + 4096, 0x7150_0001)
        .zero_mib(8..12)
        .write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let pki = c.path("pki");
    make_pki(&pki);
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let s = Serve::start(
        &c,
        "latest",
        &c.agents_arg(),
        &["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)],
    );
    assert!(s.url.starts_with("nbds://"), "{}", s.url);
    let url = with_ca(&s.url, &pki);

    let size = client_ok(&c, "nbdinfo", &["--size", &url]);
    assert_eq!(size.trim(), img.size.to_string());
    let out = c.path("nbdcopy.raw");
    client_ok(&c, "nbdcopy", &[&url, path_str(&out)]);
    assert_eq!(sha256(&out), img.sha256(), "nbdcopy over TLS differs");

    // A plain client is refused (every option gets NBD_REP_ERR_TLS_REQD) ...
    let plain = s.url.replacen("nbds://", "nbd://", 1);
    let o = client(&c, "nbdinfo", &["--size", &plain]);
    assert!(!o.status.success(), "a plain client got the export");
    // ... and so is a TLS client that does not trust the certificate.
    let empty = c.path("empty-ca");
    std::fs::create_dir_all(&empty).unwrap();
    make_pki(&empty); // a different CA
    let o = client(&c, "nbdinfo", &["--size", &with_ca(&s.url, &empty)]);
    assert!(!o.status.success(), "a client with another CA got in");

    // The server still serves, and stops cleanly.
    let out2 = c.path("nbdcopy2.raw");
    client_ok(&c, "nbdcopy", &[&url, path_str(&out2)]);
    assert_eq!(sha256(&out2), img.sha256());
    let log = s.log();
    let report = s.stop();
    assert!(
        u64_of(&report, "bytes_read") >= 2 * (img.size - 4 * MIB),
        "{report}"
    );
    assert!(
        str_of(&report, "listen").starts_with("127.0.0.1:"),
        "{report}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// All three TLS settings as config-file keys; with `tls_client_ca` only a client holding a
/// certificate from that CA gets the export.
#[test]
fn tls_settings_come_from_the_config_file_too() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(8 * MIB, 0x7150_0002).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let pki = c.path("pki");
    make_pki(&pki);
    let cfg = c.path("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
            path_str(&pki.join("server-cert.pem")),
            path_str(&pki.join("server-key.pem")),
            path_str(&pki.join("ca-cert.pem"))
        ),
    )
    .unwrap();
    let s = Serve::start(&c, "latest", &c.agents_arg(), &["--config", path_str(&cfg)]);
    assert!(s.url.starts_with("nbds://"), "{}", s.url);
    let o = client(&c, "nbdinfo", &["--size", &with_ca(&s.url, &pki)]);
    assert!(
        !o.status.success(),
        "a client without a certificate got the export"
    );
    let out = c.path("copy.raw");
    client_ok(
        &c,
        "nbdcopy",
        &[&with_ca(&s.url, &pki.join("client")), path_str(&out)],
    );
    assert_eq!(sha256(&out), img.sha256());
    s.stop();
}

#[test]
fn bad_tls_settings_fail_at_once_naming_the_file() {
    let c = Cluster::start(1);
    let pki = c.path("pki");
    make_pki(&pki);
    let cert = pki.join("server-cert.pem");
    let key = pki.join("server-key.pem");
    let missing: PathBuf = pki.join("no-such.pem");
    let garbage = pki.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "latest", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        c.sa(&args)
    };

    let t = expect_fail(&serve(&["--tls-cert", path_str(&cert)]), None, "cert only");
    assert!(t.contains("--tls-key"), "{t}");
    let t = expect_fail(&serve(&["--tls-key", path_str(&key)]), None, "key only");
    assert!(t.contains("--tls-cert"), "{t}");
    let ca = pki.join("ca-cert.pem");
    let t = expect_fail(
        &serve(&["--tls-client-ca", path_str(&ca)]),
        None,
        "client CA only",
    );
    assert!(t.contains("--tls-cert"), "{t}");
    let t = expect_fail(
        &serve(&[
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
            "--tls-client-ca",
            path_str(&key),
        ]),
        None,
        "key as client CA",
    );
    assert!(t.contains("server-key.pem"), "{t}");
    let t = expect_fail(
        &serve(&[
            "--tls-cert",
            path_str(&missing),
            "--tls-key",
            path_str(&key),
        ]),
        None,
        "missing cert",
    );
    assert!(t.contains("no-such.pem"), "{t}");
    let t = expect_fail(
        &serve(&[
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&garbage),
        ]),
        None,
        "garbage key",
    );
    assert!(t.contains("garbage.pem"), "{t}");
    let t = expect_fail(
        &serve(&[
            "--tls-cert",
            path_str(&garbage),
            "--tls-key",
            path_str(&key),
        ]),
        None,
        "garbage cert",
    );
    assert!(t.contains("garbage.pem"), "{t}");
    // The certificate where the key belongs.
    let t = expect_fail(
        &serve(&["--tls-cert", path_str(&cert), "--tls-key", path_str(&cert)]),
        None,
        "cert as key",
    );
    assert!(t.contains("server-cert.pem"), "{t}");
}

/// `--idle-timeout`: a client that enters transmission and then sends nothing is dropped after
/// it; a bad value is refused naming the flag.
#[test]
fn idle_clients_are_dropped_after_the_idle_timeout() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let c = Cluster::start(6);
    let img = ImageSpec::random(4 * MIB, 0x7150_0003).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let bad = c.sa(&["serve", "latest", "--idle-timeout", "soon"]);
    let t = expect_fail(&bad, None, "bad idle timeout");
    assert!(t.contains("--idle-timeout"), "{t}");

    let s = Serve::start(&c, "latest", &c.agents_arg(), &["--idle-timeout", "2s"]);
    let addr = s.url.trim_start_matches("nbd://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut greeting = [0u8; 18];
    sock.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Fixed newstyle + no zeroes, then NBD_OPT_GO for the default export.
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&6u32.to_be_bytes());
    msg.extend_from_slice(&[0u8; 6]); // empty name, no information requests
    sock.write_all(&msg).unwrap();
    loop {
        let mut head = [0u8; 20];
        sock.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        sock.read_exact(&mut data).unwrap();
        assert_eq!(kind & (1 << 31), 0, "NBD_OPT_GO failed: {kind:#x}");
        if kind == 1 {
            break; // NBD_REP_ACK: in transmission
        }
    }
    let entered = Instant::now();
    let mut b = [0u8; 16];
    match sock.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
        other => panic!("an idle client was not dropped: {other:?}"),
    }
    let waited = entered.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "dropped too early: {waited:?}"
    );
    // Others are still served.
    let out = c.path("copy.raw");
    client_ok(&c, "nbdcopy", &[&s.url, path_str(&out)]);
    assert_eq!(sha256(&out), img.sha256());
    s.stop();
}
