//! Never an open proxy: every way in without valid credentials, by each protocol and each
//! malformed variant, gets its refusal (or a bare close) and the origin sees no connection.

use super::*;
use std::net::Shutdown;
use std::thread;

/// What the server must answer before it closes.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly these bytes (possibly none).
    Bytes(&'static [u8]),
    /// An HTTP response with this status.
    Status(u16),
}

/// One way in: a name, the bytes sent, whether the client then shuts down writing, and the answer.
struct Probe {
    name: &'static str,
    send: Vec<u8>,
    half_close: bool,
    expect: Expect,
}

fn probe(name: &'static str, send: impl Into<Vec<u8>>, expect: Expect) -> Probe {
    Probe {
        name,
        send: send.into(),
        half_close: false,
        expect,
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn http(first: &str, headers: &[&str]) -> Vec<u8> {
    let mut h = format!("{first}\r\n");
    for x in headers {
        h.push_str(x);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn socks_probes(dst: SocketAddr) -> Vec<Probe> {
    use Expect::Bytes;
    let req = socks5_request(dst);
    let up = |u: &str, p: &str| userpass(u.as_bytes(), p.as_bytes());
    let mut v = vec![
        probe("socks5 no methods", [5, 0], Bytes(b"")),
        probe("socks5 no-auth only", [5, 1, 0], Bytes(&[5, 0xff])),
        probe(
            "socks5 no-auth and a pipelined request",
            cat(&[&[5, 1, 0], &req]),
            Bytes(&[5, 0xff]),
        ),
        probe("socks5 gssapi only", [5, 1, 1], Bytes(&[5, 0xff])),
        probe(
            "socks5 wrong password",
            cat(&[&[5, 1, 2], &up("u", "nope"), &req]),
            Bytes(&[5, 2, 1, 1]),
        ),
        probe(
            "socks5 unknown user",
            cat(&[&[5, 1, 2], &up("nobody", "pw"), &req]),
            Bytes(&[5, 2, 1, 1]),
        ),
        probe(
            "socks5 empty username",
            cat(&[&[5, 1, 2], &up("", "pw"), &req]),
            Bytes(&[5, 2, 1, 1]),
        ),
        probe(
            "socks5 empty password",
            cat(&[&[5, 1, 2], &up("u", ""), &req]),
            Bytes(&[5, 2, 1, 1]),
        ),
        probe(
            "socks5 password as a prefix",
            cat(&[&[5, 1, 2], &up("u", "p"), &req]),
            Bytes(&[5, 2, 1, 1]),
        ),
        probe(
            "socks5 truncated auth",
            [5, 1, 2, 1, 5, b'u'],
            Bytes(&[5, 2]),
        ),
        probe(
            "socks5 garbage after the greeting",
            cat(&[&[5, 1, 2], b"\xde\xad\xbe\xef"]),
            Bytes(&[5, 2]),
        ),
        probe(
            "socks5 request instead of auth",
            cat(&[&[5, 1, 2], &req]),
            Bytes(&[5, 2]),
        ),
        probe(
            "socks5 auth version 5",
            cat(&[&[5, 1, 2, 5, 1, b'u', 2], b"pw", &req]),
            Bytes(&[5, 2]),
        ),
    ];
    let mut socks4 = vec![4, 1];
    socks4.extend_from_slice(&dst.port().to_be_bytes());
    let mut socks4a = socks4.clone();
    if let SocketAddr::V4(a) = dst {
        socks4.extend_from_slice(&a.ip().octets());
    }
    socks4.extend_from_slice(b"u\0");
    socks4a.extend_from_slice(&[0, 0, 0, 1]);
    socks4a.extend_from_slice(b"u\0localhost\0");
    v.push(probe("socks4", socks4, Bytes(b"")));
    v.push(probe("socks4a", socks4a, Bytes(b"")));
    let mut cut = probe(
        "socks5 truncated auth, then EOF",
        [5, 1, 2, 1, 1, b'u', 9],
        Bytes(&[5, 2]),
    );
    cut.half_close = true;
    v.push(cut);
    v
}

fn http_probes(dst: SocketAddr) -> Vec<Probe> {
    use Expect::{Bytes, Status};
    let t = dst.to_string();
    let connect = format!("CONNECT {t} HTTP/1.1");
    let get = format!("GET http://{t}/bytes/10 HTTP/1.1");
    let host = format!("Host: {t}");
    let auth = |u: &str, p: &str| format!("Proxy-Authorization: {}", basic(u, p));
    let b64 = |s: &str| sluice::wire::http::base64_encode(s.as_bytes());
    vec![
        probe(
            "http CONNECT without auth",
            http(&connect, &[&host]),
            Status(407),
        ),
        probe(
            "http CONNECT wrong password",
            http(&connect, &[&host, &auth("u", "nope")]),
            Status(407),
        ),
        probe(
            "http CONNECT unknown user",
            http(&connect, &[&host, &auth("nobody", "pw")]),
            Status(407),
        ),
        probe(
            "http CONNECT malformed base64",
            http(
                &connect,
                &[&host, "Proxy-Authorization: Basic !!!notbase64***"],
            ),
            Status(400),
        ),
        probe(
            "http CONNECT no colon",
            http(
                &connect,
                &[&host, &format!("Proxy-Authorization: Basic {}", b64("upw"))],
            ),
            Status(400),
        ),
        // Another scheme gets the Basic challenge, so the client can fall back (RFC 9110
        // §11.7.1); until issue 18 it got 400.
        probe(
            "http CONNECT bearer scheme",
            http(&connect, &[&host, "Proxy-Authorization: Bearer dTpwdw=="]),
            Status(407),
        ),
        probe(
            "http CONNECT digest scheme",
            http(
                &connect,
                &[
                    &host,
                    "Proxy-Authorization: Digest username=\"u\", response=\"x\"",
                ],
            ),
            Status(407),
        ),
        probe(
            "http CONNECT scheme alone",
            http(&connect, &[&host, "Proxy-Authorization: Basic"]),
            Status(400),
        ),
        probe(
            "http CONNECT two credentials",
            http(&connect, &[&host, &auth("u", "nope"), &auth("u", "pw")]),
            Status(400),
        ),
        probe(
            "http CONNECT Authorization not Proxy-",
            http(
                &connect,
                &[&host, &format!("Authorization: {}", basic("u", "pw"))],
            ),
            Status(407),
        ),
        probe(
            "http absolute-form without auth",
            http(&get, &[&host]),
            Status(407),
        ),
        probe(
            "http absolute-form wrong password",
            http(&get, &[&host, &auth("u", "nope")]),
            Status(407),
        ),
        probe(
            "http lowercase connect without auth",
            http(&format!("connect {t} HTTP/1.1"), &[&host]),
            Status(407),
        ),
        probe(
            "http/2 preface",
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            Status(400),
        ),
        probe(
            "http request line only",
            format!("{connect}\r\n"),
            Bytes(b""),
        ),
        probe("garbage: NUL", [0u8], Bytes(b"")),
        probe("garbage: 0xff", [0xffu8; 8], Bytes(b"")),
        probe("garbage: blank lines", &b"\r\n\r\n\r\n"[..], Bytes(b"")),
        probe(
            "garbage: leading space",
            &b" GET / HTTP/1.1\r\n\r\n"[..],
            Bytes(b""),
        ),
        probe("tls clienthello", client_hello(), Bytes(b"")),
    ]
}

/// The start of a TLS 1.2/1.3 ClientHello record, as a browser would send to an https proxy.
fn client_hello() -> Vec<u8> {
    let mut body = vec![0x01, 0x00, 0x00, 0x2d, 0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]); // random
    body.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00, 0x00, 0x00]);
    let mut rec = vec![0x16, 0x03, 0x01, 0x00, body.len() as u8];
    rec.extend_from_slice(&body);
    rec
}

/// Sends a probe and reads to the server's close (the 1 s handshake deadline bounds the wait).
fn run(addr: SocketAddr, p: &Probe) -> Vec<u8> {
    let mut s = connect(addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let _ = s.write_all(&p.send);
    if p.half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_to_close(&mut s)
}

#[test]
fn no_way_in_without_valid_credentials_reaches_the_origin() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    // The control: valid credentials do reach this origin, so its counter works.
    let mut ok = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    ok.write_all(b"SEND 1\n").unwrap();
    assert_eq!(read_all(&mut ok).len(), 1);
    drop(ok);
    assert!(wait_until(SETTLE, || origin.connections() == 1));

    let mut probes = socks_probes(origin.addr);
    probes.extend(http_probes(origin.addr));
    let addr = srv.addr;
    let answers: Vec<(Probe, Vec<u8>)> = thread::scope(|sc| {
        let hs: Vec<_> = probes
            .into_iter()
            .map(|p| {
                sc.spawn(move || {
                    let got = run(addr, &p);
                    (p, got)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut wrong = Vec::new();
    for (p, got) in &answers {
        let fine = match p.expect {
            Expect::Bytes(b) => got == b,
            Expect::Status(code) => status_code(&String::from_utf8_lossy(got)) == code,
        };
        if !fine {
            wrong.push(format!(
                "{}: expected {:?}, got {:?}",
                p.name,
                p.expect,
                String::from_utf8_lossy(got)
            ));
        }
    }
    assert_settles(&srv, "after the probes");
    assert_eq!(origin.connections(), 1, "a probe reached the origin");
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
