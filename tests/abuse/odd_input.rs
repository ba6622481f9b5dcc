//! Odd but legal input works: usernames with spaces and UTF-8, IPv6 literals, header names and
//! the Basic scheme in any case, a head split into one-byte writes, tunnel bytes pipelined
//! right after the head.

use super::*;
use std::thread;

/// Asks the origin for `n` bytes through a fresh tunnel and checks them.
fn assert_download(mut s: TcpStream, n: usize) {
    s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len(), n);
    assert!(is_pattern(&got), "bytes differ from the origin's");
}

#[test]
fn usernames_with_spaces_and_utf8_log_in_by_socks5_and_http() {
    let origin = Origin::start();
    let users = [
        ("jürgen müller", "pä ss wörd", 0),
        ("雪 ☃ 🚀", "ключ", 0),
        ("  padded  ", "a:b:c", 0),
    ];
    let srv = TestServer::start(&users);
    let target = origin.addr.to_string();
    for (user, pass, _) in users {
        let s = socks5(srv.addr, user, pass, "127.0.0.1", origin.addr.port())
            .unwrap_or_else(|e| panic!("socks5 login as {user:?}: 0x{e:02x}"));
        assert_download(s, 1000);
        assert_download(http_connect(srv.addr, user, pass, &target), 1000);
        let get = format!(
            "GET http://{target}/bytes/5 HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
            basic(user, pass)
        );
        let (_s, head) = http_exchange(srv.addr, &get);
        assert_eq!(
            status_code(&head),
            200,
            "absolute-form as {user:?}: {head:?}"
        );
    }
    // The names are matched exactly: no trimming, no case folding, no normalisation.
    assert!(socks5(srv.addr, "padded", "a:b:c", "127.0.0.1", origin.addr.port()).is_err());
    assert!(
        socks5(
            srv.addr,
            "Jürgen Müller",
            "pä ss wörd",
            "127.0.0.1",
            origin.addr.port()
        )
        .is_err()
    );
}

#[test]
fn connect_to_an_ipv6_literal_works_by_each_protocol() {
    let Ok(origin) = Origin::try_start_on("[::1]:0") else {
        eprintln!("note: ::1 is not available here; skipping the IPv6 literal test");
        return;
    };
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let port = origin.addr.port();
    let literal = format!("[::1]:{port}");
    assert_download(http_connect(srv.addr, "u", "pw", &literal), 2000);
    let expanded = format!("[0:0:0:0:0:0:0:1]:{port}");
    assert_download(http_connect(srv.addr, "u", "pw", &expanded), 10);
    assert_download(socks5(srv.addr, "u", "pw", "::1", port).unwrap(), 2000);
    let get = format!(
        "GET http://{literal}/bytes/7 HTTP/1.1\r\nHost: {literal}\r\nProxy-Authorization: {}\r\n\r\n",
        basic("u", "pw")
    );
    let (mut s, head) = http_exchange(srv.addr, &get);
    assert_eq!(status_code(&head), 200, "{head:?}");
    // The connection stays open (keep-alive): read the body by its length.
    assert_eq!(read_body(&mut s, &head).len(), 7);
    assert_eq!(origin.connections(), 4);
}

#[test]
fn header_names_and_the_basic_scheme_match_in_any_case() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let t = origin.addr.to_string();
    let token = sluice::wire::http::base64_encode(b"u:pw");
    for name in [
        "proxy-authorization",
        "PROXY-AUTHORIZATION",
        "Proxy-AUTHORIZATION",
        "pRoXy-AuThOrIzAtIoN",
    ] {
        for scheme in ["Basic", "basic", "BASIC", "bAsIc"] {
            for gap in [" ", "   "] {
                let head = format!(
                    "CONNECT {t} HTTP/1.1\r\nhost: {t}\r\n{name}:{gap}{scheme}{gap}{token}\r\n\r\n"
                );
                let (s, got) = http_exchange(srv.addr, &head);
                assert_eq!(
                    status_code(&got),
                    200,
                    "{name}: {scheme} ({gap:?}): {got:?}"
                );
                assert_download(s, 10);
            }
        }
    }
}

#[test]
fn heads_written_one_byte_at_a_time_are_understood() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let http = connect_head(&origin.addr.to_string(), Some(("u", "pw")));
    let mut socks = vec![5, 1, 2];
    socks.extend_from_slice(&userpass(b"u", b"pw"));
    socks.extend_from_slice(&socks5_request(origin.addr));
    for (name, head) in [("http", http.into_bytes()), ("socks5", socks)] {
        let mut s = connect(srv.addr);
        s.set_nodelay(true).unwrap();
        for b in &head {
            s.write_all(&[*b]).unwrap();
            // Let each byte go out as its own segment.
            thread::sleep(Duration::from_millis(1));
        }
        if name == "http" {
            assert_eq!(status_code(&read_head(&mut s)), 200);
        } else {
            let mut m = [0u8; 4];
            s.read_exact(&mut m).unwrap();
            assert_eq!(m, [5, 2, 1, 0]);
            assert_eq!(socks5_reply(&mut s).unwrap(), 0);
        }
        assert_download(s, 3000);
    }
}

#[test]
fn tunnel_bytes_pipelined_with_the_head_are_forwarded() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let data: Vec<u8> = (0..50_000u64).map(pattern).collect();
    // HTTP: CONNECT head, the origin's command and data, in one write.
    let mut one = connect_head(&origin.addr.to_string(), Some(("u", "pw"))).into_bytes();
    one.extend_from_slice(b"ECHO\n");
    one.extend_from_slice(&data);
    let mut s = connect(srv.addr);
    s.write_all(&one).unwrap();
    assert_eq!(status_code(&read_head(&mut s)), 200);
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "http: pipelined bytes differ");

    // SOCKS5: greeting, login, request and tunnel bytes, in one write.
    let mut one = vec![5, 1, 2];
    one.extend_from_slice(&userpass(b"u", b"pw"));
    one.extend_from_slice(&socks5_request(origin.addr));
    one.extend_from_slice(b"ECHO\n");
    one.extend_from_slice(&data);
    let mut s = connect(srv.addr);
    s.write_all(&one).unwrap();
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2, 1, 0]);
    assert_eq!(socks5_reply(&mut s).unwrap(), 0);
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "socks5: pipelined bytes differ");
}
