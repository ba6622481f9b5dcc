//! Plain-HTTP forwarding request by request (issue 18), through the server and again through
//! `sluice local`: each request reaches its own origin in origin-form without the proxy's
//! credentials, bodies are framed both ways (length, chunked, close, none), kept connections
//! are reused or retried as RFC 9110 allows, and the server checks every request's credentials.
//!
//! Each scenario is one function taking a [`Proxy`]; `both!` runs it through each proxy.

use crate::support::*;
use sluice::local::{self, LocalConfig, LocalHandle};
use sluice::store::{self, UserChange};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

const USER: &str = "alice";
const PASS: &str = "wonderland";

/// A proxy to send plain HTTP through, and the `Proxy-Authorization` line its requests carry.
struct Proxy {
    addr: SocketAddr,
    /// `sluice local` ignores an app's credentials: these must never reach an origin either.
    auth: String,
    /// For curl: `http://user:pass@addr` for the server, `http://addr` for local.
    url: String,
    local: Option<LocalHandle>,
    srv: TestServer,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(l) = self.local.take() {
            l.shutdown();
        }
    }
}

impl Proxy {
    fn server() -> Proxy {
        Self::server_with(|_| {})
    }

    fn server_with(f: impl FnOnce(&std::path::Path)) -> Proxy {
        let srv = TestServer::start_with(&[(USER, PASS, 0), ("bob", "builder", 0)], |c| {
            f(c.db.path().expect("an SQLite test store"))
        });
        Proxy {
            addr: srv.addr,
            auth: basic(USER, PASS),
            url: format!("http://{USER}:{PASS}@{}", srv.addr),
            local: None,
            srv,
        }
    }

    fn local() -> Proxy {
        let srv = TestServer::start(&[(USER, PASS, 0)]);
        let cfg = LocalConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            server: srv.addr.to_string(),
            user: USER.into(),
            password: PASS.into(),
            allow_lan: false,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            tls: None,
        };
        let l = local::start(&cfg).unwrap();
        let addr = l.local_addr();
        Proxy {
            addr,
            auth: basic("app-user", "app-secret"),
            url: format!("http://{addr}"),
            local: Some(l),
            srv,
        }
    }

    /// A request head for `url` with this proxy's credentials and `extra` header lines.
    fn head(&self, method: &str, url: &str, extra: &str) -> String {
        format!(
            "{method} {url} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {}\r\n{extra}\r\n",
            authority(url),
            self.auth
        )
    }

    fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

fn authority(url: &str) -> &str {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
}

fn url(o: &HttpOrigin, path: &str) -> String {
    format!("http://{}{path}", o.addr)
}

/// Sends one request and reads its response on `s`.
fn ask(s: &mut TcpStream, p: &Proxy, method: &str, url: &str, extra: &str) -> HttpReply {
    s.write_all(p.head(method, url, extra).as_bytes()).unwrap();
    read_reply(s, method)
}

/// No origin ever sees the proxy's credentials or hop-by-hop fields; every head is origin-form.
fn assert_clean(o: &HttpOrigin) {
    for r in o.requests() {
        let lower = r.head.to_ascii_lowercase();
        assert!(!lower.contains("proxy-authorization"), "{}", r.head);
        assert!(!lower.contains("proxy-connection"), "{}", r.head);
        let target = r.head.split_whitespace().nth(1).unwrap_or("");
        assert!(target.starts_with('/'), "not origin-form: {}", r.head);
        assert!(r.head.contains("\r\nVia: 1.1 sluice\r\n"), "{}", r.head);
    }
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[test]
            fn server() {
                super::$name(&super::Proxy::server());
            }
            #[test]
            fn local() {
                super::$name(&super::Proxy::local());
            }
        }
    };
}

both!(curl_keep_alive_sends_each_request_to_its_own_origin);
both!(pipelined_requests_to_two_origins_come_back_in_order);
both!(chunked_request_and_response_bodies_keep_the_connection_in_step);
both!(head_204_and_304_have_no_body);
both!(a_response_without_length_ends_when_the_origin_closes);
both!(te_with_content_length_is_refused_with_400_and_closed);
both!(expect_100_continue_reaches_the_client_before_the_body);
both!(a_stale_origin_connection_retries_get_and_answers_post_502);
both!(upgrade_turns_the_connection_into_a_tunnel);

/// The repro: curl on one keep-alive proxy connection, two origins.
fn curl_keep_alive_sends_each_request_to_its_own_origin(p: &Proxy) {
    assert!(have_curl(), "curl is needed: apt-get install -y curl");
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let first = format!("http://127.0.0.1:{}/first", a.addr.port());
    let second = format!("http://localhost:{}/second", b.addr.port());
    let out = curl(&["-x", &p.url, &first, &second]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "A GET /first body=B GET /second body="
    );
    let (ra, rb) = (a.requests(), b.requests());
    assert_eq!(ra.len(), 1, "{ra:?}");
    assert_eq!(rb.len(), 1, "{rb:?}");
    assert_eq!(
        ra[0].header("host").as_deref(),
        Some(authority(&first)),
        "{ra:?}"
    );
    assert_eq!(
        rb[0].header("host").as_deref(),
        Some(authority(&second)),
        "{rb:?}"
    );
    assert_clean(&a);
    assert_clean(&b);
}

fn pipelined_requests_to_two_origins_come_back_in_order(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let all = [
        p.head("GET", &url(&a, "/one"), ""),
        p.head("GET", &url(&b, "/two"), ""),
        p.head("GET", &url(&a, "/three"), ""),
    ]
    .concat();
    s.write_all(all.as_bytes()).unwrap();
    for want in ["A GET /one body=", "B GET /two body=", "A GET /three body="] {
        let r = read_reply(&mut s, "GET");
        assert_eq!(r.status(), 200, "{}", r.head);
        assert_eq!(r.text(), want);
    }
    assert_eq!(a.requests().len(), 2);
    assert_eq!(b.requests().len(), 1);
    assert_clean(&a);
    assert_clean(&b);
}

fn chunked_request_and_response_bodies_keep_the_connection_in_step(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let head = p.head("POST", &url(&a, "/echo"), "Transfer-Encoding: chunked\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // Split oddly, with an extension and a trailer, and the next request right behind.
    s.write_all(b"5\r\nhel").unwrap();
    s.write_all(b"lo\r\n6;x=y\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut s, "POST");
    assert_eq!(r.text(), "A POST /echo body=hello world", "{}", r.head);
    let seen = a.requests();
    assert_eq!(seen[0].body, b"hello world");
    assert_eq!(
        seen[0].header("transfer-encoding").as_deref(),
        Some("chunked")
    );

    let r = ask(&mut s, p, "GET", &url(&b, "/chunked"), "");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert!(r.head.contains("Transfer-Encoding: chunked"), "{}", r.head);
    assert_eq!(r.text(), "B chunked");
    assert!(r.trailers.contains("X-Trailer: t"), "{:?}", r.trailers);
    let r = ask(&mut s, p, "GET", &url(&a, "/after"), "");
    assert_eq!(r.text(), "A GET /after body=");
    assert_clean(&a);
    assert_clean(&b);
}

fn head_204_and_304_have_no_body(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, p, "HEAD", &url(&a, "/bytes/100"), "");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(
        header_value(&r.head, "content-length").as_deref(),
        Some("100")
    );
    let r = ask(&mut s, p, "GET", &url(&b, "/204"), "");
    assert_eq!(r.status(), 204, "{}", r.head);
    let r = ask(&mut s, p, "GET", &url(&a, "/304"), "");
    assert_eq!(r.status(), 304, "{}", r.head);
    // Had any of them been given a body, this answer would be out of step.
    let r = ask(&mut s, p, "GET", &url(&b, "/last"), "");
    assert_eq!(r.text(), "B GET /last body=");
    assert_clean(&a);
    assert_clean(&b);
}

fn a_response_without_length_ends_when_the_origin_closes(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, p, "GET", &url(&b, "/first"), "");
    assert_eq!(r.text(), "B GET /first body=");
    s.write_all(p.head("GET", &url(&a, "/close"), "").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let head = read_head(&mut s);
    assert_eq!(status_code(&head), 200, "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    // The body is whatever comes until the proxy closes too.
    assert_eq!(read_to_close(&mut s), b"A close");
    assert_clean(&a);
}

fn te_with_content_length_is_refused_with_400_and_closed(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    for framing in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ] {
        let mut s = p.connect();
        let r = ask(&mut s, p, "GET", &url(&b, "/ok"), "");
        assert_eq!(r.text(), "B GET /ok body=");
        let smuggle = p.head("POST", &url(&a, "/x"), framing);
        s.write_all(smuggle.as_bytes()).unwrap();
        s.write_all(b"0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
        let got = String::from_utf8_lossy(&read_to_close(&mut s)).into_owned();
        assert!(got.starts_with("HTTP/1.1 400 "), "{framing:?}: {got}");
        assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got}");
    }
    assert!(a.requests().is_empty(), "{:?}", a.requests());
}

fn expect_100_continue_reaches_the_client_before_the_body(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, p, "GET", &url(&b, "/warm"), "");
    assert_eq!(r.text(), "B GET /warm body=");
    let head = p.head(
        "POST",
        &url(&a, "/upload"),
        "Content-Length: 5\r\nExpect: 100-continue\r\n",
    );
    s.write_all(head.as_bytes()).unwrap();
    // No body until the 100 arrives.
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let interim = read_head(&mut s);
    assert_eq!(status_code(&interim), 100, "{interim:?}");
    s.write_all(b"hello").unwrap();
    let r = read_reply(&mut s, "POST");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(r.text(), "A POST /upload body=hello");
    assert_clean(&a);
}

fn a_stale_origin_connection_retries_get_and_answers_post_502(p: &Proxy) {
    let o = HttpOrigin::start_with("S", OriginMode::OneShot);
    let mut s = p.connect();
    let r = ask(&mut s, p, "GET", &url(&o, "/a"), "");
    assert_eq!(r.text(), "S GET /a body=");
    // The kept connection swallows /b and closes: a GET is sent again on a new one.
    let r = ask(&mut s, p, "GET", &url(&o, "/b"), "");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(r.text(), "S GET /b body=");
    assert_eq!(o.connections(), 2);
    // A POST is not: it might have been acted on.
    let post = p.head("POST", &url(&o, "/c"), "Content-Length: 1\r\n");
    s.write_all(format!("{post}x").as_bytes()).unwrap();
    let r = read_reply(&mut s, "POST");
    assert_eq!(r.status(), 502, "{}", r.head);
    assert_eq!(o.connections(), 2, "the POST was sent again");
    let paths: Vec<String> = o
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.conn, r.head.split_whitespace().nth(1).unwrap()))
        .collect();
    assert_eq!(paths, ["1 /a", "1 /b", "2 /b", "2 /c"]);
}

fn upgrade_turns_the_connection_into_a_tunnel(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, p, "GET", &url(&b, "/before"), "");
    assert_eq!(r.text(), "B GET /before body=");
    let r = ask(
        &mut s,
        p,
        "GET",
        &url(&a, "/upgrade"),
        "Connection: Upgrade\r\nUpgrade: echo\r\n",
    );
    assert_eq!(r.status(), 101, "{}", r.head);
    assert!(r.head.contains("Upgrade: echo"), "{}", r.head);
    s.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let seen = a.requests();
    assert_eq!(seen[0].header("upgrade").as_deref(), Some("echo"));
}

// ---- the server alone: per-request credentials ----

#[test]
fn a_wrong_password_on_a_later_request_gets_407_on_the_same_connection() {
    let p = Proxy::server();
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, &p, "GET", &url(&a, "/one"), "");
    assert_eq!(r.text(), "A GET /one body=");
    let wrong = format!(
        "GET {} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
        url(&b, "/two"),
        basic(USER, "wrong")
    );
    s.write_all(wrong.as_bytes()).unwrap();
    let r = read_reply(&mut s, "GET");
    assert_eq!(r.status(), 407, "{}", r.head);
    assert!(
        r.head
            .contains("Proxy-Authenticate: Basic realm=\"sluice\", charset=\"UTF-8\"\r\n"),
        "{}",
        r.head
    );
    // Same connection, right credentials again.
    let r = ask(&mut s, &p, "GET", &url(&b, "/three"), "");
    assert_eq!(r.text(), "B GET /three body=");
    let seen: Vec<String> = b.requests().iter().map(|r| r.head.clone()).collect();
    assert_eq!(
        seen.len(),
        1,
        "the refused request reached the origin: {seen:?}"
    );
}

#[test]
fn a_connection_moves_its_slot_when_the_user_changes() {
    let cap_alice = |db: &std::path::Path| {
        let c = UserChange {
            max_connections: Some(1),
            ..UserChange::default()
        };
        store::open(db, false).unwrap().change(USER, &c).unwrap();
    };
    let p = Proxy::server_with(cap_alice);
    let a = HttpOrigin::start("A");
    let mut s1 = p.connect();
    let r = ask(&mut s1, &p, "GET", &url(&a, "/alice"), "");
    assert_eq!(r.status(), 200, "{}", r.head);
    // alice holds her one slot on s1: a second connection of hers is refused.
    let mut s2 = p.connect();
    let r = ask(&mut s2, &p, "GET", &url(&a, "/alice2"), "");
    assert_eq!(r.status(), 429, "{}", r.head);
    // s1 now speaks for bob: alice's slot is free again.
    let bob = format!(
        "GET {} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
        url(&a, "/bob"),
        basic("bob", "builder")
    );
    s1.write_all(bob.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut s1, "GET").status(), 200);
    let r = ask(&mut s2, &p, "GET", &url(&a, "/alice3"), "");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(p.srv.handle.as_ref().map(|h| h.local_addr()), Some(p.addr));
}

#[test]
fn other_auth_schemes_get_407_with_the_basic_challenge() {
    let p = Proxy::server();
    let a = HttpOrigin::start("A");
    for value in [
        "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
        "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag",
    ] {
        for head in [
            format!(
                "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {value}\r\n\r\n",
                a.addr
            ),
            format!(
                "GET {} HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n",
                url(&a, "/x")
            ),
        ] {
            let (_s, h) = http_exchange(p.addr, &head);
            assert_eq!(status_code(&h), 407, "{value}: {h}");
            assert!(
                h.contains("Proxy-Authenticate: Basic realm=\"sluice\""),
                "{h}"
            );
        }
    }
    assert!(a.requests().is_empty());
}

/// "jürgen" / "grüße" as ISO-8859-1 bytes, as python requests sends them.
#[test]
fn latin1_basic_credentials_log_in() {
    let srv = TestServer::start(&[("jürgen", "grüße", 0)]);
    let a = HttpOrigin::start("A");
    let raw: Vec<u8> = "jürgen:grüße".chars().map(|c| c as u8).collect();
    let head = format!(
        "GET {} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
        url(&a, "/latin1"),
        sluice::wire::http::base64_encode(&raw)
    );
    let mut s = connect(srv.addr);
    s.write_all(head.as_bytes()).unwrap();
    let r = read_reply(&mut s, "GET");
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(r.text(), "A GET /latin1 body=");
    // And as UTF-8, as curl sends them.
    let head = format!(
        "GET {} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
        url(&a, "/utf8"),
        basic("jürgen", "grüße")
    );
    let mut s = connect(srv.addr);
    s.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut s, "GET").status(), 200);
}

#[test]
fn python_requests_logs_in_with_a_latin1_password() {
    let srv = TestServer::start(&[("jürgen", "grüße", 0)]);
    let a = HttpOrigin::start("A");
    let script = format!(
        "import requests\n\
         r = requests.get('{}', proxies={{'http': 'http://jürgen:grüße@{}'}}, timeout=20)\n\
         print(r.status_code, r.text)\n",
        url(&a, "/py"),
        srv.addr
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "no_proxy",
        "NO_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(v);
    }
    let out = run_command(cmd, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'requests'"),
        "python3-requests is needed: apt-get install -y python3-requests"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 A GET /py body=",
        "{err}"
    );
}

both!(a_connect_after_plain_requests_opens_a_tunnel);

fn a_connect_after_plain_requests_opens_a_tunnel(p: &Proxy) {
    let a = HttpOrigin::start("A");
    let b = HttpOrigin::start("B");
    let mut s = p.connect();
    let r = ask(&mut s, p, "GET", &url(&b, "/plain"), "");
    assert_eq!(r.text(), "B GET /plain body=");
    let connect = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {1}\r\n\r\n",
        a.addr, p.auth
    );
    s.write_all(connect.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert_eq!(status_code(&head), 200, "{head}");
    // Inside the tunnel the client speaks to A directly, in origin-form.
    s.write_all(b"GET /inside HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut s, "GET");
    assert_eq!(r.text(), "A GET /inside body=");
}

/// After a first request, a later head that trickles in is cut at `--handshake-timeout` from its
/// first byte (no slowloris on a kept-alive connection), while an idle kept connection stays.
#[test]
fn a_later_head_must_arrive_within_the_handshake_timeout() {
    let srv = TestServer::start_with(&[(USER, PASS, 0)], |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    let p = Proxy {
        addr: srv.addr,
        auth: basic(USER, PASS),
        url: String::new(),
        local: None,
        srv,
    };
    let a = HttpOrigin::start("A");
    let mut s = p.connect();
    // Idle past the handshake timeout: a kept connection is not cut for that.
    let r = ask(&mut s, &p, "GET", &url(&a, "/one"), "");
    assert_eq!(r.text(), "A GET /one body=");
    std::thread::sleep(Duration::from_millis(1500));
    let r = ask(&mut s, &p, "GET", &url(&a, "/two"), "");
    assert_eq!(r.text(), "A GET /two body=");
    // Now a head a byte at a time, never finished.
    let t = std::time::Instant::now();
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let mut cut = false;
    for b in p.head("GET", &url(&a, "/slow"), "").bytes() {
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    if !cut {
        assert!(read_to_close(&mut s).is_empty());
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(a.requests().len(), 2);
}
