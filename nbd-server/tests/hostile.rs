//! Malformed and hostile input: each case gets an NBD error or a closed
//! connection, and the server keeps serving a good client afterwards.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use common::*;
use nbd_server::proto::*;
use nbd_server::MemorySource;

const SIZE: u64 = 1 << 20;

fn server() -> TestServer {
    let m = MemorySource::new(SIZE);
    TestServer::single("disk", Arc::new(m))
}

/// A good client still gets correct service.
fn still_serves(srv: &TestServer) {
    let mut c = RawClient::connect(srv.port);
    let (size, _) = c.go("disk", true);
    assert_eq!(size, SIZE);
    let w = c.call(NBD_CMD_WRITE, 0, 512, 4, b"good");
    assert_eq!(w.error, 0);
    let r = c.call(NBD_CMD_READ, 0, 512, 4, &[]);
    assert_eq!((r.error, r.data.as_slice()), (0, &b"good"[..]));
    c.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.is_closed(), "server must close after DISC");
}

#[test]
fn garbage_instead_of_client_flags_closes_only_that_connection() {
    let srv = server();
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let mut c = RawClient {
        s,
        structured: false,
    };
    assert!(c.is_closed());
    still_serves(&srv);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let srv = server();
    let mut c = RawClient::connect_raw(srv.port);
    c.write(&0x8000_0001u32.to_be_bytes());
    assert!(c.is_closed());
    still_serves(&srv);
}

#[test]
fn bad_option_magic_and_huge_option_close_the_connection() {
    let srv = server();
    let mut c = RawClient::connect(srv.port);
    c.write(b"NOTAMAGIC_______________");
    assert!(c.is_closed());
    let mut c = RawClient::connect(srv.port);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.write(&b);
    assert!(c.is_closed());
    still_serves(&srv);
}

#[test]
fn truncated_handshakes_do_not_hurt_the_server() {
    let srv = server();
    for cut in [0usize, 2, 4, 10, 20] {
        let mut c = RawClient::connect_raw(srv.port);
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        b.extend_from_slice(&100u32.to_be_bytes());
        c.write(&b[..cut.min(b.len())]);
        drop(c);
    }
    still_serves(&srv);
}

#[test]
fn options_get_the_spec_replies() {
    let srv = server();
    let mut c = RawClient::connect(srv.port);
    assert_eq!(c.option(NBD_OPT_STARTTLS, &[])[0].0, NBD_REP_ERR_UNSUP);
    assert_eq!(c.option(4242, b"whatever")[0].0, NBD_REP_ERR_UNSUP);
    assert_eq!(c.option(NBD_OPT_LIST, b"x")[0].0, NBD_REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let r = c.option(
        NBD_OPT_SET_META_CONTEXT,
        &RawClient::meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(r[0].0, NBD_REP_ERR_INVALID);
    assert_eq!(c.option(NBD_OPT_STRUCTURED_REPLY, &[])[0].0, NBD_REP_ACK);
    // "base:" lists base:allocation; unknown namespaces are ignored.
    let r = c.option(
        NBD_OPT_LIST_META_CONTEXT,
        &RawClient::meta_data("disk", &["base:", "x-foo:bar"]),
    );
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    // An empty query list lists everything.
    let r = c.option(NBD_OPT_LIST_META_CONTEXT, &RawClient::meta_data("", &[]));
    assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
    // SET with only "base:" selects nothing.
    let r = c.option(
        NBD_OPT_SET_META_CONTEXT,
        &RawClient::meta_data("disk", &["base:"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, NBD_REP_ACK);
    // Malformed meta request: query length beyond the data.
    let mut bad = RawClient::meta_data("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    assert_eq!(
        c.option(NBD_OPT_SET_META_CONTEXT, &bad)[0].0,
        NBD_REP_ERR_INVALID
    );
    // Unknown exports.
    assert_eq!(
        c.option(
            NBD_OPT_LIST_META_CONTEXT,
            &RawClient::meta_data("nope", &[])
        )[0]
        .0,
        NBD_REP_ERR_UNKNOWN
    );
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(c.option(NBD_OPT_GO, &d)[0].0, NBD_REP_ERR_UNKNOWN);
    // INFO with name and description requested.
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    d.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
    let r = c.option(NBD_OPT_INFO, &d);
    assert_eq!(r.last().unwrap().0, NBD_REP_ACK);
    assert!(r.iter().any(|(k, d)| *k == NBD_REP_INFO
        && d[..2] == NBD_INFO_NAME.to_be_bytes()
        && &d[2..] == b"disk"));
    assert!(r.iter().any(|(k, d)| *k == NBD_REP_INFO
        && d[..2] == NBD_INFO_BLOCK_SIZE.to_be_bytes()
        && d.len() == 14));
    // ABORT is acknowledged, then the server closes.
    assert_eq!(c.option(NBD_OPT_ABORT, &[])[0].0, NBD_REP_ACK);
    assert!(c.is_closed());
    still_serves(&srv);
}

#[test]
fn export_name_for_unknown_export_closes_and_known_one_works() {
    let srv = server();
    let mut c = RawClient::connect(srv.port);
    c.send_option(NBD_OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
    let mut c = RawClient::connect(srv.port);
    c.send_option(NBD_OPT_EXPORT_NAME, b"");
    let mut b = [0u8; 10]; // NO_ZEROES negotiated: size + flags only
    c.read(&mut b);
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    let r = c.call(NBD_CMD_READ, 0, 0, 8, &[]);
    assert_eq!((r.error, r.data.len()), (0, 8));
}

#[test]
fn bad_requests_get_spec_errors_in_simple_mode() {
    let srv = TestServer::single("disk", Arc::new(MemorySource::new(SIZE)));
    let mut c = RawClient::connect(srv.port);
    c.go("disk", false);
    assert_eq!(
        c.call(NBD_CMD_READ, 0, SIZE - 10, 20, &[]).error,
        NBD_EINVAL
    );
    assert_eq!(
        c.call(NBD_CMD_READ, 0, u64::MAX - 1, 20, &[]).error,
        NBD_EINVAL
    );
    assert_eq!(
        c.call(NBD_CMD_WRITE, 0, SIZE - 1, 2, b"ab").error,
        NBD_ENOSPC
    );
    assert_eq!(
        c.call(NBD_CMD_WRITE_ZEROES, 0, SIZE, 1, &[]).error,
        NBD_ENOSPC
    );
    assert_eq!(c.call(NBD_CMD_TRIM, 0, SIZE, 1, &[]).error, NBD_EINVAL);
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, 64 << 20, &[]).error, NBD_EINVAL);
    assert_eq!(
        c.call(NBD_CMD_BLOCK_STATUS, 0, 0, 512, &[]).error,
        NBD_EINVAL
    );
    assert_eq!(c.call(99, 0, 0, 512, &[]).error, NBD_EINVAL);
    assert_eq!(c.call(NBD_CMD_READ, 0x8000, 0, 512, &[]).error, NBD_EINVAL);
    assert_eq!(
        c.call(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, &[]).error,
        NBD_EINVAL,
        "DF needs structured replies"
    );
    // Zero-length requests succeed without payload.
    for kind in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_CACHE,
    ] {
        let r = c.call(kind, 0, 0, 0, &[]);
        assert_eq!((r.error, r.data.len()), (0, 0), "zero-length cmd {kind}");
    }
    // Huge trims and zeroes inside the export are fine (no payload).
    assert_eq!(c.call(NBD_CMD_TRIM, 0, 0, SIZE as u32, &[]).error, 0);
    // Still in sync after all of that.
    let r = c.call(NBD_CMD_READ, 0, 0, 16, &[]);
    assert_eq!((r.error, r.data.len()), (0, 16));
}

#[test]
fn bad_requests_get_spec_errors_in_structured_mode() {
    let srv = TestServer::single(
        "disk",
        Arc::new(MemorySource::new(SIZE).with_read_only(true)),
    );
    let mut c = RawClient::connect(srv.port);
    let (_, flags) = c.go("disk", true);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(c.call(NBD_CMD_WRITE, 0, 0, 4, b"abcd").error, NBD_EPERM);
    assert_eq!(c.call(NBD_CMD_TRIM, 0, 0, 4, &[]).error, NBD_EPERM);
    assert_eq!(c.call(NBD_CMD_WRITE_ZEROES, 0, 0, 4, &[]).error, NBD_EPERM);
    assert_eq!(
        c.call(NBD_CMD_READ, 0, 0, 64 << 20, &[]).error,
        NBD_EOVERFLOW
    );
    assert_eq!(c.call(NBD_CMD_READ, 0, SIZE, 1, &[]).error, NBD_EINVAL);
    assert_eq!(c.call(NBD_CMD_BLOCK_STATUS, 0, 0, 0, &[]).error, NBD_EINVAL);
    assert_eq!(
        c.call(NBD_CMD_BLOCK_STATUS, 0, SIZE - 1, 2, &[]).error,
        NBD_EINVAL
    );
    let r = c.call(NBD_CMD_READ, 0, 0, 0, &[]);
    assert_eq!((r.error, r.data.len()), (0, 0));
    let r = c.call(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 65536, &[]);
    assert_eq!((r.error, r.data.len()), (0, 65536));
    let r = c.call(
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_FLAG_REQ_ONE,
        0,
        SIZE as u32,
        &[],
    );
    assert_eq!((r.error, r.extents.clone()), (0, vec![(SIZE as u32, 3)]));
    still_serves_ro(&srv);
}

fn still_serves_ro(srv: &TestServer) {
    let mut c = RawClient::connect(srv.port);
    c.go("disk", true);
    let r = c.call(NBD_CMD_READ, 0, 0, 4096, &[]);
    assert_eq!((r.error, r.data.len()), (0, 4096));
}

#[test]
fn bad_request_magic_and_oversized_write_close_the_connection() {
    let srv = server();
    let mut c = RawClient::connect(srv.port);
    c.go("disk", true);
    c.write(&[0x55; 28]);
    assert!(c.is_closed());
    let mut c = RawClient::connect(srv.port);
    c.go("disk", true);
    c.request(NBD_CMD_WRITE, 0, 1, 0, u32::MAX, &[0; 100]);
    assert!(c.is_closed());
    let mut c = RawClient::connect(srv.port);
    c.go("disk", false);
    c.write(b"complete garbage that is not a request at all....");
    assert!(c.is_closed());
    still_serves(&srv);
}

#[test]
fn disc_finishes_in_flight_replies_first() {
    let srv = server();
    let mut c = RawClient::connect(srv.port);
    c.go("disk", true);
    for h in 0..32u64 {
        c.request(NBD_CMD_READ, 0, h, h * 4096, 4096, &[]);
    }
    c.request(NBD_CMD_DISC, 0, 99, 0, 0, &[]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..32 {
        let r = c.reply(&|h| (h * 4096, 4096));
        assert_eq!((r.error, r.data.len()), (0, 4096));
        seen.insert(r.handle);
    }
    assert_eq!(seen.len(), 32);
    assert!(c.is_closed());
}

#[test]
fn many_hostile_connections_at_once_then_a_good_one() {
    let srv = server();
    let mut rng = Rng(99);
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut c = RawClient::connect_raw(srv.port);
        let mut junk = vec![0u8; 1 + rng.below(300) as usize];
        rng.fill(&mut junk);
        if i % 2 == 0 {
            // Valid flags and option magic, then junk.
            let mut b = 3u32.to_be_bytes().to_vec();
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&junk);
            junk = b;
        }
        let _ = c.s.write_all(&junk);
        conns.push(c);
    }
    still_serves(&srv);
    drop(conns);
    still_serves(&srv);
}
