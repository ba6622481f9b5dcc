//! The server end to end: SOCKS5 and HTTP proxying, authentication, policy, half-close.

use crate::support::*;
use std::io::Write;

#[test]
fn socks5_download_exact_bytes_to_ipv4() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut s = socks5(srv.addr, "u1", "p1", "127.0.0.1", origin.addr.port()).unwrap();
    s.write_all(b"SEND 3000000\n").unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len(), 3_000_000);
    assert!(is_pattern(&got));
}
