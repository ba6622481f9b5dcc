//! The server end to end: SOCKS5 and HTTP proxying, authentication, policy, half-close.

use crate::support::*;
use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

/// Sends `n` pattern-free bytes to the origin's SINK through `s` and returns the count it reports.
fn upload(mut s: std::net::TcpStream, n: usize) -> String {
    s.write_all(b"SINK\n").unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    String::from_utf8(read_all(&mut s)).unwrap()
}

fn download(mut s: std::net::TcpStream, n: u64) -> Vec<u8> {
    s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
    read_all(&mut s)
}

fn assert_download(got: &[u8], n: usize) {
    assert_eq!(got.len(), n, "byte count");
    assert!(is_pattern(got), "bytes differ from what the origin sent");
}

/// An HTTP request head in absolute form with optional credentials.
fn absolute_get(url: &str, auth: Option<(&str, &str)>) -> String {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    let mut h = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some((u, p)) = auth {
        h.push_str(&format!("Proxy-Authorization: {}\r\n", basic(u, p)));
    }
    h.push_str("\r\n");
    h
}

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

#[test]
fn socks5_upload_exact_bytes_to_ipv4() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let s = socks5(srv.addr, "u1", "p1", "127.0.0.1", origin.addr.port()).unwrap();
    assert_eq!(upload(s, 2_000_003), "2000003");
}

#[test]
fn socks5_download_and_upload_to_ipv6() {
    let origin = match Origin::try_start_on("[::1]:0") {
        Ok(o) => o,
        Err(e) => {
            eprintln!("note: cannot bind [::1]:0 ({e}); skipping the IPv6 test");
            return;
        }
    };
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = origin.addr.port();
    let s = socks5(srv.addr, "u1", "p1", "::1", port).unwrap();
    assert_download(&download(s, 1_000_001), 1_000_001);
    let s = socks5(srv.addr, "u1", "p1", "::1", port).unwrap();
    assert_eq!(upload(s, 500_000), "500000");
    let s = http_connect(srv.addr, "u1", "p1", &format!("[::1]:{port}"));
    assert_download(&download(s, 70_000), 70_000);
    assert_eq!(origin.connections(), 3);
}

#[test]
fn socks5_download_and_upload_to_a_domain() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = origin.addr.port();
    let s = socks5(srv.addr, "u1", "p1", "localhost", port).unwrap();
    assert_download(&download(s, 1_234_567), 1_234_567);
    let s = socks5(srv.addr, "u1", "p1", "localhost", port).unwrap();
    assert_eq!(upload(s, 765_432), "765432");
}

#[test]
fn http_connect_download_and_upload() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let target = origin.addr.to_string();
    let s = http_connect(srv.addr, "u1", "p1", &target);
    assert_download(&download(s, 2_000_000), 2_000_000);
    let s = http_connect(srv.addr, "u1", "p1", &target);
    assert_eq!(upload(s, 1_000_000), "1000000");
    let s = http_connect(
        srv.addr,
        "u1",
        "p1",
        &format!("localhost:{}", origin.addr.port()),
    );
    assert_download(&download(s, 10), 10);
}

#[test]
fn http_connect_forwards_tunnel_bytes_sent_with_the_head() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut req = connect_head(&origin.addr.to_string(), Some(("u1", "p1")));
    req.push_str("SEND 100000\n");
    // One write: the tunnel's first bytes arrive in the same segment as the head.
    let (mut s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 200, "{head:?}");
    assert_download(&read_all(&mut s), 100_000);
}

#[test]
fn http_connect_forwards_a_pipelined_upload() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut req = connect_head(&origin.addr.to_string(), Some(("u1", "p1"))).into_bytes();
    req.extend_from_slice(b"SINK\n");
    req.extend(std::iter::repeat_n(b'x', 5000));
    let mut s = connect(srv.addr);
    s.write_all(&req).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let head = read_head(&mut s);
    assert_eq!(status_code(&head), 200, "{head:?}");
    assert_eq!(read_all(&mut s), b"5000");
}

#[test]
fn http_absolute_form_is_forwarded_in_origin_form() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let url = format!("http://{}/bytes/54321", origin.addr);
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {}\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: yes\r\nUser-Agent: t\r\n\r\n",
        origin.addr,
        basic("u1", "p1")
    );
    let (mut s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 200, "{head:?}");
    assert!(head.contains("Content-Length: 54321"), "{head:?}");
    assert!(head.contains("Via: 1.1 sluice\r\n"), "{head:?}");
    // Keep-alive: the client connection stays open, so read just the body.
    assert_download(&read_body(&mut s, &head), 54321);

    let seen = origin.last_head.lock().clone();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /bytes/54321 HTTP/1.1", "{seen:?}");
    let lower = seen.to_ascii_lowercase();
    assert!(!lower.contains("proxy-authorization"), "{seen:?}");
    assert!(!lower.contains("proxy-connection"), "{seen:?}");
    assert!(
        !lower.contains("x-hop"),
        "a header named by Connection was kept: {seen:?}"
    );
    assert!(!lower.contains("keep-alive"), "{seen:?}");
    // Until issue 18 the server sent `Connection: close` (one request per connection); the
    // origin connection is now kept for the next request, so nothing says close.
    assert!(!lower.contains("connection:"), "{seen:?}");
    assert!(lines.contains(&"Via: 1.1 sluice"), "{seen:?}");
    assert!(lines.contains(&"X-Kept: yes"), "{seen:?}");
    assert!(
        lines.contains(&format!("Host: {}", origin.addr).as_str()),
        "{seen:?}"
    );
    assert_eq!(origin.connections(), 1);
}

#[test]
fn http_absolute_form_without_a_host_header_gets_one() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let req = format!(
        "GET http://{}/bytes/10 HTTP/1.0\r\nProxy-Authorization: {}\r\n\r\n",
        origin.addr,
        basic("u1", "p1")
    );
    let (mut s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 200, "{head:?}");
    assert_download(&read_all(&mut s), 10);
    let seen = origin.last_head.lock().clone();
    // A proxy sends its own HTTP version on (RFC 9110 §6.2), and says what the client spoke in
    // Via.
    assert!(seen.starts_with("GET /bytes/10 HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen.contains("Via: 1.0 sluice\r\n"), "{seen:?}");
    assert!(
        seen.contains(&format!("Host: {}\r\n", origin.addr)),
        "{seen:?}"
    );
}

#[test]
fn socks5_bad_credentials_are_refused_and_nothing_is_dialed() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = origin.addr.port();
    for (user, pass) in [("u1", "wrong"), ("nobody", "p1"), ("", "p1"), ("u1", "p1x")] {
        let r = socks5(srv.addr, user, pass, "127.0.0.1", port);
        assert_eq!(r.err(), Some(0xFF), "login {user:?}/{pass:?}");
    }
    // The refusal is [1, 1] and then the server closes.
    let mut s = connect(srv.addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.write_all(&[5, 1, 2, 1, 2, b'u', b'1', 1, b'x']).unwrap();
    assert_eq!(read_to_close(&mut s), [5, 2, 1, 1]);
    assert_eq!(origin.connections(), 0);
}

#[test]
fn socks5_client_without_the_userpass_method_gets_0xff_and_is_closed() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    for methods in [&[0u8][..], &[0, 1, 0x80], &[1]] {
        let mut s = connect(srv.addr);
        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
        let mut greet = vec![5, methods.len() as u8];
        greet.extend_from_slice(methods);
        s.write_all(&greet).unwrap();
        assert_eq!(read_to_close(&mut s), [5, 0xFF], "methods {methods:?}");
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn http_missing_credentials_get_407_with_the_realm() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    for req in [
        connect_head(&origin.addr.to_string(), None),
        absolute_get(&format!("http://{}/bytes/5", origin.addr), None),
    ] {
        let (_s, head) = http_exchange(srv.addr, &req);
        assert_eq!(status_code(&head), 407, "{head:?}");
        assert!(
            head.contains("\r\nProxy-Authenticate: Basic realm=\"sluice\", charset=\"UTF-8\"\r\n"),
            "{head:?}"
        );
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn http_bad_credentials_are_refused_and_nothing_is_dialed() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let target = origin.addr.to_string();
    let url = format!("http://{target}/bytes/5");
    for (user, pass) in [("u1", "wrong"), ("nobody", "p1"), ("", "p1"), ("u1", "")] {
        for req in [
            connect_head(&target, Some((user, pass))),
            absolute_get(&url, Some((user, pass))),
        ] {
            let (_s, head) = http_exchange(srv.addr, &req);
            assert_eq!(status_code(&head), 407, "{user:?}/{pass:?}: {head:?}");
            assert!(head.contains("Proxy-Authenticate: Basic realm=\"sluice\""));
        }
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn http_malformed_basic_credentials_get_400() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let target = origin.addr.to_string();
    let no_colon = sluice::wire::http::base64_encode(b"u1p1");
    for value in [
        "Basic !!!not-base64!!!".to_string(),
        format!("Basic {no_colon}"),
        "Basic".to_string(),
    ] {
        let req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {value}\r\n\r\n"
        );
        let (_s, head) = http_exchange(srv.addr, &req);
        assert_eq!(status_code(&head), 400, "{value:?}: {head:?}");
    }
    // The header twice is ambiguous, even when both copies are good.
    let good = basic("u1", "p1");
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {good}\r\nProxy-Authorization: {good}\r\n\r\n"
    );
    let (_s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 400, "{head:?}");
    assert_eq!(origin.connections(), 0);
}

#[test]
fn a_refused_port_answers_0x05_and_502() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = free_port();
    assert_eq!(
        socks5(srv.addr, "u1", "p1", "127.0.0.1", port).err(),
        Some(0x05)
    );
    let (_s, head) = http_exchange(
        srv.addr,
        &connect_head(&format!("127.0.0.1:{port}"), Some(("u1", "p1"))),
    );
    assert_eq!(status_code(&head), 502, "{head:?}");
    let (_s, head) = http_exchange(
        srv.addr,
        &absolute_get(&format!("http://127.0.0.1:{port}/"), Some(("u1", "p1"))),
    );
    assert_eq!(status_code(&head), 502, "{head:?}");
}

#[test]
fn an_unresolvable_name_answers_0x04_and_502() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    assert_eq!(
        socks5(srv.addr, "u1", "p1", "nothing.invalid", 80).err(),
        Some(0x04)
    );
    let (_s, head) = http_exchange(
        srv.addr,
        &connect_head("nothing.invalid:80", Some(("u1", "p1"))),
    );
    assert_eq!(status_code(&head), 502, "{head:?}");
    let (_s, head) = http_exchange(
        srv.addr,
        &absolute_get("http://nothing.invalid/", Some(("u1", "p1"))),
    );
    assert_eq!(status_code(&head), 502, "{head:?}");
}

#[test]
fn private_destinations_are_refused_without_allow_private() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u1", "p1", 0)], |c| c.allow_private = false);
    let port = origin.addr.port();
    for host in [
        "127.0.0.1",
        "localhost",
        "::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "127.1.2.3",
    ] {
        assert_eq!(
            socks5(srv.addr, "u1", "p1", host, port).err(),
            Some(0x02),
            "socks5 to {host}"
        );
    }
    for target in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (_s, head) = http_exchange(srv.addr, &connect_head(&target, Some(("u1", "p1"))));
        assert_eq!(status_code(&head), 403, "CONNECT {target}: {head:?}");
    }
    let (_s, head) = http_exchange(
        srv.addr,
        &absolute_get(
            &format!("http://{}/bytes/5", origin.addr),
            Some(("u1", "p1")),
        ),
    );
    assert_eq!(status_code(&head), 403, "{head:?}");
    assert_eq!(origin.connections(), 0);
}

/// Issue 18 §6: a policy refusal tells the client only that policy refused it; what the name
/// resolved to goes to the log, not to the client.
#[test]
fn a_policy_refusal_does_not_tell_the_client_what_a_name_resolved_to() {
    let dir = TempDir::new("policy-msg");
    let db = dir.path("users.db");
    make_db(&db, &[("u1", "p1", 0)]);
    let mut c = sluice_command();
    c.args(["server", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db);
    let mut server = Daemon::spawn(c);
    let port = free_port();
    // A 403 saying only that policy refused it, whatever the request's form.
    let addr = server.addr;
    let refused_without_address = |request: &str| {
        let (mut s, head) = http_exchange(addr, request);
        let body = String::from_utf8_lossy(&read_to_close(&mut s)).to_string();
        assert_eq!(status_code(&head), 403, "{request:?}: {head:?}");
        let answer = format!("{head}{body}");
        assert!(answer.contains("refused by policy"), "{answer:?}");
        for leak in ["127.0.0.1", "::1"] {
            assert!(
                !answer.contains(leak),
                "the client learns {leak}: {answer:?}"
            );
        }
    };
    refused_without_address(&connect_head(
        &format!("localhost:{port}"),
        Some(("u1", "p1")),
    ));
    let line = server
        .wait_for_line("refused by policy", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line: {:?}", server.rest_of_log()));
    assert!(
        line.contains("127.0.0.1") || line.contains("::1"),
        "the log should keep the address: {line}"
    );
    // Plain forwarding is refused in the same words.
    let creds = basic("u1", "p1");
    let get = format!(
        "GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: {creds}\r\nConnection: close\r\n\r\n"
    );
    refused_without_address(&get);
}

/// The address the namespace test gives its interface: TEST-NET-3, which the policy otherwise
/// allows (it is not a private, reserved or special range in `dial.rs`).
const OWN_ADDR: &str = "203.0.113.7";
/// Set in the re-executed test binary that runs inside the private network namespace.
const IN_NETNS: &str = "SLUICE_TEST_IN_NETNS";

/// Issue 18 §6: the policy refuses the host's own interface addresses unless `--allow-private`.
/// The test re-runs itself under `unshare -n` (a private network namespace with loopback and one
/// interface with no ports: nothing can leave it, and it vanishes with the process), gives the
/// interface an address the policy otherwise allows, binds the origin there, and shows the
/// server refuses it while a server with private destinations allowed reaches it.
#[test]
fn the_hosts_own_interface_addresses_are_refused_without_allow_private() {
    if std::env::var_os(IN_NETNS).is_some() {
        return own_addresses_inside_the_namespace();
    }
    let exe = std::env::current_exe().unwrap();
    let mut c = std::process::Command::new("unshare");
    c.arg("-n")
        .arg(exe)
        .args([
            "--exact",
            "server::the_hosts_own_interface_addresses_are_refused_without_allow_private",
            "--nocapture",
        ])
        .env(IN_NETNS, "1");
    let out = run_command(c, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "inside `unshare -n` (needs root, util-linux and iproute2: apt-get install util-linux iproute2):\n{text}"
    );
}

/// Runs `ip ARGS` inside the namespace; panics with its output if it fails.
fn ip_cmd(args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new("ip");
    c.args(args);
    run_command(c, None)
}

fn own_addresses_inside_the_namespace() {
    let up = ip_cmd(&["link", "set", "lo", "up"]);
    assert!(up.status.success(), "ip link set lo up: {up:?}");
    // A dummy interface where the kernel has the module, else a bridge with no ports.
    let added = ["dummy", "bridge"].iter().any(|kind| {
        ip_cmd(&["link", "add", "d0", "type", kind])
            .status
            .success()
    });
    assert!(added, "cannot add an interface in the namespace");
    for args in [
        &["addr", "add", &format!("{OWN_ADDR}/24"), "dev", "d0"][..],
        &["link", "set", "d0", "up"],
    ] {
        let o = ip_cmd(args);
        assert!(o.status.success(), "ip {args:?}: {o:?}");
    }
    let origin = Origin::start_on(&format!("{OWN_ADDR}:0"));
    let port = origin.addr.port();
    let target = format!("{OWN_ADDR}:{port}");
    let srv = TestServer::start_with(&[("u1", "p1", 0)], |c| c.allow_private = false);
    for host in [OWN_ADDR, "::ffff:203.0.113.7"] {
        assert_eq!(
            socks5(srv.addr, "u1", "p1", host, port).err(),
            Some(0x02),
            "socks5 to {host}"
        );
    }
    let (_s, head) = http_exchange(srv.addr, &connect_head(&target, Some(("u1", "p1"))));
    assert_eq!(status_code(&head), 403, "CONNECT {target}: {head:?}");
    assert_eq!(origin.connections(), 0, "the origin was reached");
    // The address itself is reachable: with private destinations allowed, it is served.
    let open = TestServer::start(&[("u1", "p1", 0)]);
    let got = download(http_connect(open.addr, "u1", "p1", &target), 1000);
    assert_download(&got, 1000);
}

#[test]
fn bind_udp_associate_and_unknown_commands_answer_0x07() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = origin.addr.port().to_be_bytes();
    for cmd in [2u8, 3, 0, 9] {
        let mut s = socks5_login(srv.addr, "u1", "p1");
        s.write_all(&[5, cmd, 0, 1, 127, 0, 0, 1, port[0], port[1]])
            .unwrap();
        assert_eq!(socks5_reply(&mut s).unwrap(), 0x07, "command {cmd}");
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn an_unknown_address_type_answers_0x08() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    for atyp in [0u8, 2, 5, 0xFF] {
        let mut s = socks5_login(srv.addr, "u1", "p1");
        s.write_all(&[5, 1, 0, atyp, 127, 0, 0, 1, 0, 80]).unwrap();
        assert_eq!(socks5_reply(&mut s).unwrap(), 0x08, "address type {atyp}");
    }
}

#[test]
fn a_head_over_64_kib_gets_431() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut req = format!(
        "GET http://{}/bytes/5 HTTP/1.1\r\nProxy-Authorization: {}\r\nX-Pad: ",
        origin.addr,
        basic("u1", "p1")
    )
    .into_bytes();
    // One byte over the limit and no end of head: every byte sent is read before the answer, so
    // the close cannot turn into a reset that eats the 431.
    req.resize(sluice::wire::http::MAX_HEAD_BYTES + 1, b'a');
    let mut s = connect(srv.addr);
    s.write_all(&req).unwrap();
    let head = read_head(&mut s);
    assert_eq!(status_code(&head), 431, "{head:?}");
    assert_eq!(origin.connections(), 0);
}

#[test]
fn a_head_of_exactly_64_kib_is_accepted() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let start = format!(
        "GET http://{}/bytes/7 HTTP/1.1\r\nProxy-Authorization: {}\r\nX-Pad: ",
        origin.addr,
        basic("u1", "p1")
    );
    let pad = sluice::wire::http::MAX_HEAD_BYTES - start.len() - "\r\n\r\n".len();
    let req = format!("{start}{}\r\n\r\n", "a".repeat(pad));
    assert_eq!(req.len(), sluice::wire::http::MAX_HEAD_BYTES);
    let (mut s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 200, "{head:?}");
    // The connection stays open (keep-alive): read the body by its length.
    assert_download(&read_body(&mut s, &head), 7);
}

#[test]
fn a_first_byte_of_no_known_protocol_is_closed_without_an_answer() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    for junk in [
        &b"\x16\x03\x01\x00\x05hello"[..],
        b"\x04\x01\x00\x50\x7f\x00\x00\x01u1\x00",
        b"\x00",
        b"\xff\xff\xff\xff",
        b" GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = connect(srv.addr);
        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
        s.write_all(junk).unwrap();
        assert_eq!(read_to_close(&mut s), b"", "after {junk:?}");
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn a_client_half_close_still_gets_the_echo_then_eof() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    for via_http in [false, true] {
        let s = if via_http {
            http_connect(srv.addr, "u1", "p1", &origin.addr.to_string())
        } else {
            socks5(srv.addr, "u1", "p1", "127.0.0.1", origin.addr.port()).unwrap()
        };
        echo_exact(s, 1_500_000);
    }
}

#[test]
fn a_silent_client_is_closed_at_the_handshake_deadline() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u1", "p1", 0)], |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    let t = Instant::now();
    let mut silent = connect(srv.addr);
    silent.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    // While it sits there, others are served.
    let s = socks5(srv.addr, "u1", "p1", "127.0.0.1", origin.addr.port()).unwrap();
    assert_download(&download(s, 1000), 1000);
    assert_eq!(read_to_close(&mut silent), b"");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "closed after {took:?}, deadline 1 s"
    );
}

#[test]
fn a_trickling_client_is_closed_at_the_handshake_deadline() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u1", "p1", 0)], |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    let head = absolute_get(
        &format!("http://{}/bytes/5", origin.addr),
        Some(("u1", "p1")),
    );
    let t = Instant::now();
    let mut s = connect(srv.addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    // A byte every 150 ms, each one well inside any per-read timeout.
    let trickle = thread::spawn(move || {
        for b in head.bytes().take(30) {
            if w.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(150));
        }
    });
    let got = read_to_close(&mut s);
    let took = t.elapsed();
    trickle.join().unwrap();
    assert_eq!(got, b"");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "closed after {took:?}, deadline 1 s"
    );
    assert_eq!(origin.connections(), 0);
}

/// `curl -x PROXY URL` (plus `extra`), returning stdout; panics unless curl succeeds.
fn curl_fetch(proxy: &str, url: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["-x", proxy];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl(&args);
    assert!(
        out.status.success(),
        "curl -x {proxy} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn proxy_url(scheme: &str, user: &str, pass: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{user}:{pass}@{addr}")
}

#[test]
fn curl_through_socks5_fetches_exactly() {
    if !have_curl() {
        return;
    }
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let port = origin.addr.port();
    for (scheme, host) in [
        ("socks5h", "127.0.0.1"),
        ("socks5h", "localhost"),
        ("socks5", "127.0.0.1"),
    ] {
        let url = format!("http://{host}:{port}/bytes/1000003");
        let got = curl_fetch(&proxy_url(scheme, "u1", "p1", srv.addr), &url, &[]);
        assert_download(&got, 1_000_003);
    }
}

#[test]
fn curl_through_http_fetches_exactly_with_and_without_proxytunnel() {
    if !have_curl() {
        return;
    }
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let url = format!("http://{}/bytes/777777", origin.addr);
    let proxy = proxy_url("http", "u1", "p1", srv.addr);
    assert_download(&curl_fetch(&proxy, &url, &[]), 777_777);
    assert!(
        origin
            .last_head
            .lock()
            .starts_with("GET /bytes/777777 HTTP/1.1\r\n")
    );
    assert_download(&curl_fetch(&proxy, &url, &["--proxytunnel"]), 777_777);
    assert_eq!(origin.connections(), 2);
}

#[test]
fn curl_with_a_wrong_password_is_refused_by_each_protocol() {
    if !have_curl() {
        return;
    }
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let url = format!("http://{}/bytes/100", origin.addr);
    for (scheme, extra) in [
        ("socks5h", &[][..]),
        ("http", &["--fail"][..]),
        ("http", &["--proxytunnel"][..]),
    ] {
        let mut args = vec!["-x".to_string(), proxy_url(scheme, "u1", "bad", srv.addr)];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(url.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = curl(&args);
        assert!(!out.status.success(), "{scheme} {extra:?}: curl succeeded");
        let fetched = out.stdout.len() == 100 && is_pattern(&out.stdout);
        assert!(!fetched, "{scheme} {extra:?}: the body came through");
    }
    assert_eq!(origin.connections(), 0);
}

#[test]
fn https_absolute_form_is_refused_with_400() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let req = format!(
        "GET https://{}/ HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
        origin.addr,
        basic("u1", "p1")
    );
    let (_s, head) = http_exchange(srv.addr, &req);
    assert_eq!(status_code(&head), 400, "{head:?}");
    assert_eq!(origin.connections(), 0);
}

/// The whole SOCKS5 exchange for `u1`/`p1` to 127.0.0.1:`port`, then `SEND n`, as one buffer.
fn socks5_all_at_once(port: u16, n: u64) -> Vec<u8> {
    let mut b = vec![
        5, 1, 2, 1, 2, b'u', b'1', 2, b'p', b'1', 5, 1, 0, 1, 127, 0, 0, 1,
    ];
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(format!("SEND {n}\n").as_bytes());
    b
}

/// Reads the method choice, login status and reply that answer [`socks5_all_at_once`].
fn read_socks5_answers(s: &mut std::net::TcpStream) {
    use std::io::Read;
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2, 1, 0], "method choice and login status");
    assert_eq!(socks5_reply(s).unwrap(), 0, "reply");
}

#[test]
fn socks5_handshake_coalesced_into_one_write_is_understood() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut s = connect(srv.addr);
    s.write_all(&socks5_all_at_once(origin.addr.port(), 4321))
        .unwrap();
    read_socks5_answers(&mut s);
    assert_download(&read_all(&mut s), 4321);
}

#[test]
fn handshakes_split_into_single_bytes_are_understood() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut s = connect(srv.addr);
    s.set_nodelay(true).unwrap();
    for b in socks5_all_at_once(origin.addr.port(), 999) {
        s.write_all(&[b]).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    read_socks5_answers(&mut s);
    assert_download(&read_all(&mut s), 999);

    let mut s = connect(srv.addr);
    s.set_nodelay(true).unwrap();
    let mut req = connect_head(&origin.addr.to_string(), Some(("u1", "p1"))).into_bytes();
    req.extend_from_slice(b"SEND 12\n");
    for b in req {
        s.write_all(&[b]).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(status_code(&read_head(&mut s)), 200);
    assert_download(&read_all(&mut s), 12);
}

#[test]
fn many_concurrent_connections_all_complete_exactly() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "p1", 0), ("u2", "p2", 0)]);
    let (addr, port) = (srv.addr, origin.addr.port());
    let clients: Vec<_> = (0..40u64)
        .map(|i| {
            thread::spawn(move || {
                let n = 100_000 + i * 1001;
                let s = if i % 2 == 0 {
                    socks5(addr, "u1", "p1", "127.0.0.1", port).unwrap()
                } else {
                    http_connect(addr, "u2", "p2", &format!("127.0.0.1:{port}"))
                };
                let got = download(s, n);
                got.len() as u64 == n && is_pattern(&got)
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert!(c.join().unwrap(), "client {i} got wrong bytes");
    }
    assert_eq!(origin.connections(), 40);
}

#[test]
fn shutdown_closes_open_tunnels_and_returns_promptly() {
    let origin = Origin::start();
    let mut srv = TestServer::start(&[("free", "p", 0), ("slow", "p", 1000)]);
    let port = origin.addr.port();
    let mut idle = socks5(srv.addr, "free", "p", "127.0.0.1", port).unwrap();
    idle.write_all(b"ECHO\n").unwrap();
    // A relay asleep in the limiter, waiting for its next grant.
    let mut slow = socks5(srv.addr, "slow", "p", "127.0.0.1", port).unwrap();
    slow.write_all(b"SEND 1000000\n").unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut slow, &mut first).unwrap();
    let t = Instant::now();
    srv.handle.take().unwrap().shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    for s in [&mut idle, &mut slow] {
        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
        read_to_close(s);
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "tunnels closed after {:?}",
        t.elapsed()
    );
    assert!(
        std::net::TcpStream::connect(srv.addr).is_err()
            || read_to_close(&mut connect(srv.addr)).is_empty(),
        "the server still answers"
    );
}

#[test]
fn a_server_listening_on_ipv6_serves_and_shuts_down() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("note: cannot bind [::1]:0; skipping the IPv6 listener test");
        return;
    }
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u1", "p1", 0)], |c| {
        c.listen = "[::1]:0".parse().unwrap()
    });
    assert!(srv.addr.is_ipv6());
    let s = socks5(srv.addr, "u1", "p1", "127.0.0.1", origin.addr.port()).unwrap();
    assert_download(&download(s, 5000), 5000);
    let t = Instant::now();
    drop(srv);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
}

/// Median time of `n` SOCKS5 logins with these credentials.
fn login_time(proxy: SocketAddr, user: &str, pass: &str, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let mut s = connect(proxy);
            let mut a = vec![5, 1, 2, 1, user.len() as u8];
            a.extend_from_slice(user.as_bytes());
            a.push(pass.len() as u8);
            a.extend_from_slice(pass.as_bytes());
            s.write_all(&a).unwrap();
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut s, &mut m).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
fn unknown_users_and_wrong_passwords_take_about_as_long_and_cached_logins_skip_argon2() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    // Few failures in a row, and a good login between, so the address is never throttled.
    // Medians of five: one login slowed by the other tests sharing two cores cannot move them.
    // The work is counted (argon2 runs); the times are checked only loosely, since a noisy
    // machine moves single logins by more than any difference the code could make.
    let runs = || srv.handle.as_ref().unwrap().argon2_runs();
    let r0 = runs();
    let wrong = login_time(srv.addr, "u1", "wrong", 5);
    assert_eq!(runs() - r0, 5, "each wrong password runs argon2 once");
    let _good = login_time(srv.addr, "u1", "p1", 1);
    let r1 = runs();
    let unknown = login_time(srv.addr, "nobody", "wrong", 5);
    assert_eq!(
        runs() - r1,
        5,
        "an unknown user runs argon2 (against the dummy hash) as a known one does"
    );
    let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
    assert!(
        (0.2..=5.0).contains(&ratio),
        "unknown user {unknown:?}, wrong password {wrong:?}"
    );
    let r2 = runs();
    let cached = login_time(srv.addr, "u1", "p1", 5);
    assert_eq!(runs(), r2, "a repeated login ran argon2 ({cached:?})");
}
