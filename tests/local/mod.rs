//! `sluice local` end to end (local → server → origin): every app protocol with exact bytes both
//! ways, curl as the app, the user's bandwidth through the local proxy, names passed on
//! unresolved, and the failures an app must be told about promptly.

use crate::support::*;
use parking_lot::Mutex;
use sluice::error::Error;
use sluice::local::{self, LocalConfig, LocalHandle};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const USER: &str = "alice";
const PASS: &str = "wonderland";
/// Well under the 10 s timeouts: what "prompt" means for a failure.
const PROMPT: Duration = Duration::from_secs(3);

fn config(server: SocketAddr, password: &str) -> LocalConfig {
    LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        server: server.to_string(),
        user: USER.into(),
        password: password.into(),
        allow_lan: false,
        handshake_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        tls: None,
    }
}

fn start_local(cfg: &LocalConfig) -> LocalHandle {
    local::start(cfg).unwrap()
}

/// An origin, a server with the one user at `rate`, and a local proxy logged in as that user
/// with `password`. Fields drop in order, so the local proxy stops first.
struct Chain {
    local: LocalHandle,
    _srv: TestServer,
    origin: Origin,
}

impl Chain {
    fn start(rate: u64) -> Chain {
        Self::with_password(rate, PASS)
    }

    fn with_password(rate: u64, password: &str) -> Chain {
        let origin = Origin::start();
        let srv = TestServer::start(&[(USER, PASS, rate)]);
        let local = start_local(&config(srv.addr, password));
        Chain {
            local,
            _srv: srv,
            origin,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.local.local_addr()
    }

    fn port(&self) -> u16 {
        self.origin.addr.port()
    }
}

/// Opens a SOCKS5 tunnel offering only "no authentication", as browsers do. `Err` carries REP.
fn socks5_open(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0], "method choice");
    s.write_all(&socks5_connect_bytes(host, port)).unwrap();
    match socks5_reply(&mut s).unwrap() {
        0 => Ok(s),
        code => Err(code),
    }
}

/// Opens a SOCKS4 tunnel to an IPv4 literal, or SOCKS4a to a name. `Err` carries CD.
fn socks4_open(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    let mut req = vec![4, 1];
    req.extend_from_slice(&port.to_be_bytes());
    match host.parse::<Ipv4Addr>() {
        Ok(ip) => {
            req.extend_from_slice(&ip.octets());
            req.extend_from_slice(b"app\0");
        }
        Err(_) => {
            req.extend_from_slice(&[0, 0, 0, 1]);
            req.extend_from_slice(b"app\0");
            req.extend_from_slice(host.as_bytes());
            req.push(0);
        }
    }
    let mut s = connect(proxy);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 0, "socks4 reply version");
    match reply[1] {
        0x5A => Ok(s),
        code => Err(code),
    }
}

/// CONNECT without credentials; returns the stream and the status code.
fn http_open(proxy: SocketAddr, target: &str) -> (TcpStream, u16) {
    let (s, head) = http_exchange(proxy, &connect_head(target, None));
    (s, status_code(&head))
}

/// A plain proxy GET of /bytes/`n`; returns the response head and body.
fn http_get(proxy: SocketAddr, host: &str, n: u64) -> (String, Vec<u8>) {
    let head = format!(
        "GET http://{host}/bytes/{n} HTTP/1.1\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\n\
         Proxy-Authorization: {}\r\n\r\n",
        basic("ignored", "secret")
    );
    let (mut s, head) = http_exchange(proxy, &head);
    // The connection stays open (keep-alive): read just this response's body.
    let body = read_body(&mut s, &head);
    (head, body)
}

/// Asks the origin for `n` bytes and checks every one of them.
fn download_exact(mut s: TcpStream, n: u64) {
    s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len() as u64, n);
    assert!(is_pattern(&got), "download corrupted");
}

/// Sends `n` bytes to the origin's sink and checks the count it saw.
fn upload_exact(mut s: TcpStream, n: u64) {
    let mut data = b"SINK\n".to_vec();
    data.extend((0..n).map(pattern));
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = String::from_utf8(read_all(&mut s)).unwrap();
    assert_eq!(got, n.to_string());
}

#[test]
fn socks5_without_auth_carries_exact_bytes_both_ways() {
    let c = Chain::start(0);
    download_exact(
        socks5_open(c.addr(), "127.0.0.1", c.port()).unwrap(),
        2_000_000,
    );
    upload_exact(
        socks5_open(c.addr(), "127.0.0.1", c.port()).unwrap(),
        1_000_000,
    );
    echo_exact(
        socks5_open(c.addr(), "127.0.0.1", c.port()).unwrap(),
        300_000,
    );
    assert!(wait_until(SHORT_TIMEOUT, || c.local.active_connections() == 0));
}

#[test]
fn socks5_reaches_domain_and_ipv6_destinations() {
    let c = Chain::start(0);
    download_exact(
        socks5_open(c.addr(), "localhost", c.port()).unwrap(),
        100_000,
    );
    match Origin::try_start_on("[::1]:0") {
        Ok(o6) => echo_exact(
            socks5_open(c.addr(), "::1", o6.addr.port()).unwrap(),
            100_000,
        ),
        Err(e) => eprintln!("note: no IPv6 loopback ({e}); skipping the IPv6 half"),
    }
}

#[test]
fn socks5_app_offering_only_userpass_is_served_as_the_configured_user() {
    let c = Chain::start(0);
    // Credentials the server would refuse: the local proxy ignores them.
    let s = socks5(c.addr(), "someone", "else", "127.0.0.1", c.port()).unwrap();
    download_exact(s, 100_000);
}

#[test]
fn socks5_payload_sent_with_the_request_is_not_lost() {
    let c = Chain::start(0);
    let mut s = connect(c.addr());
    let mut all = vec![5, 1, 0];
    all.extend(socks5_connect_bytes("127.0.0.1", c.port()));
    all.extend_from_slice(b"ECHO\npipelined bytes");
    s.write_all(&all).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    assert_eq!(socks5_reply(&mut s).unwrap(), 0);
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"pipelined bytes");
}

#[test]
fn socks4_and_socks4a_carry_exact_bytes_both_ways() {
    let c = Chain::start(0);
    download_exact(
        socks4_open(c.addr(), "127.0.0.1", c.port()).unwrap(),
        1_000_000,
    );
    echo_exact(
        socks4_open(c.addr(), "localhost", c.port()).unwrap(),
        300_000,
    );
    upload_exact(
        socks4_open(c.addr(), "localhost", c.port()).unwrap(),
        500_000,
    );
}

#[test]
fn http_connect_carries_exact_bytes_both_ways() {
    let c = Chain::start(0);
    let target = format!("127.0.0.1:{}", c.port());
    let (s, code) = http_open(c.addr(), &target);
    assert_eq!(code, 200);
    download_exact(s, 1_000_000);
    let (s, code) = http_open(c.addr(), &format!("localhost:{}", c.port()));
    assert_eq!(code, 200);
    echo_exact(s, 300_000);
    // Bytes sent right behind the CONNECT head go through the tunnel too.
    let mut s = connect(c.addr());
    let mut head = connect_head(&target, None).into_bytes();
    head.extend_from_slice(b"ECHO\nearly bytes");
    s.write_all(&head).unwrap();
    assert_eq!(status_code(&read_head(&mut s)), 200);
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"early bytes");
}

#[test]
fn http_plain_request_is_rewritten_and_carries_exact_bytes() {
    let c = Chain::start(0);
    let (head, body) = http_get(c.addr(), &format!("127.0.0.1:{}", c.port()), 500_000);
    assert_eq!(status_code(&head), 200, "{head}");
    assert_eq!(body.len(), 500_000);
    assert!(is_pattern(&body));
    let seen = c.origin.last_head.lock().clone();
    assert!(seen.starts_with("GET /bytes/500000 HTTP/1.1\r\n"), "{seen}");
    assert!(!seen.to_ascii_lowercase().contains("proxy-"), "{seen}");
}

/// Fetches /bytes/`n` from the chain's origin with curl as the app, by name where the mode
/// allows (proving names travel), and checks every byte.
fn curl_fetch_exact(c: &Chain, mode: &[&str], n: usize) {
    let url = format!("http://localhost:{}/bytes/{n}", c.port());
    let mut args = mode.to_vec();
    args.push(&url);
    let out = curl(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl {args:?}: {err}");
    assert_eq!(out.stdout.len(), n, "curl {args:?}");
    assert!(is_pattern(&out.stdout), "curl {args:?}: body corrupted");
}

#[test]
fn curl_socks5_hostname_fetches_exactly() {
    if !have_curl() {
        return;
    }
    let c = Chain::start(0);
    let proxy = c.addr().to_string();
    curl_fetch_exact(&c, &["--socks5-hostname", &proxy], 1_000_000);
}

#[test]
fn curl_socks4a_fetches_exactly() {
    if !have_curl() {
        return;
    }
    let c = Chain::start(0);
    let proxy = c.addr().to_string();
    curl_fetch_exact(&c, &["--socks4a", &proxy], 1_000_000);
}

#[test]
fn curl_http_proxytunnel_fetches_exactly() {
    if !have_curl() {
        return;
    }
    let c = Chain::start(0);
    let proxy = format!("http://{}", c.addr());
    curl_fetch_exact(&c, &["-x", &proxy, "--proxytunnel"], 1_000_000);
}

#[test]
fn curl_http_proxy_fetches_exactly() {
    if !have_curl() {
        return;
    }
    let c = Chain::start(0);
    let proxy = format!("http://{}", c.addr());
    curl_fetch_exact(&c, &["-x", &proxy], 1_000_000);
}

/// Asserts that `bytes` over `elapsed` is `rate` ±20%.
fn assert_rate(bytes: u64, elapsed: Duration, rate: u64) {
    let got = bytes as f64 / elapsed.as_secs_f64();
    let want = rate as f64;
    assert!(
        (0.8 * want..=1.2 * want).contains(&got),
        "{bytes} bytes in {elapsed:?}: {got:.0} B/s, want {want:.0} ±20%"
    );
}

#[test]
fn users_bandwidth_holds_through_the_local_proxy() {
    const RATE: u64 = 128 * 1024;
    const EACH: u64 = 192 * 1024;
    let c = Chain::start(RATE);
    let (addr, port) = (c.addr(), c.port());
    let t = Instant::now();
    // Two apps, two protocols, one user: together they get the user's rate.
    let a =
        thread::spawn(move || download_exact(socks5_open(addr, "127.0.0.1", port).unwrap(), EACH));
    let b = thread::spawn(move || {
        let (s, code) = http_open(addr, &format!("127.0.0.1:{port}"));
        assert_eq!(code, 200);
        download_exact(s, EACH);
    });
    a.join().unwrap();
    b.join().unwrap();
    assert_rate(2 * EACH, t.elapsed(), RATE);
}

#[test]
fn users_bandwidth_governs_curl_through_the_local_proxy() {
    if !have_curl() {
        return;
    }
    const RATE: u64 = 128 * 1024;
    let c = Chain::start(RATE);
    let proxy = c.addr().to_string();
    let t = Instant::now();
    curl_fetch_exact(&c, &["--socks5-hostname", &proxy], 256 * 1024);
    assert_rate(256 * 1024, t.elapsed(), RATE);
}

#[test]
fn wrong_password_fails_every_app_promptly_and_reaches_no_origin() {
    let c = Chain::with_password(0, "not-the-password");
    let t = Instant::now();
    assert_eq!(
        socks5_open(c.addr(), "127.0.0.1", c.port()).err(),
        Some(0x01)
    );
    assert_eq!(
        socks4_open(c.addr(), "localhost", c.port()).err(),
        Some(0x5B)
    );
    let target = format!("127.0.0.1:{}", c.port());
    assert_eq!(http_open(c.addr(), &target).1, 502);
    let (head, body) = http_get(c.addr(), &target, 10);
    assert_eq!(status_code(&head), 502);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("rejected user alice"), "{body}");
    assert!(!body.contains("not-the-password"));
    assert!(t.elapsed() < 2 * PROMPT, "took {:?}", t.elapsed());
    assert_eq!(c.origin.connections(), 0);
}

#[test]
fn invalid_name_fails_at_the_server_and_the_app_hears_why() {
    let c = Chain::start(0);
    let name = "no-such-host.invalid";
    assert_eq!(socks5_open(c.addr(), name, 80).err(), Some(0x04));
    assert_eq!(socks4_open(c.addr(), name, 80).err(), Some(0x5B));
    assert_eq!(http_open(c.addr(), &format!("{name}:80")).1, 502);
    let (head, _) = http_get(c.addr(), name, 10);
    assert_eq!(status_code(&head), 502);
}

/// Issue 18 §6: a SOCKS5 request that cannot be decoded after login (a domain with a space, a
/// reserved byte not 0) gets the same reply from the server and from `sluice local` (RFC 1928
/// §6: 0x01 general failure), then the connection closes.
#[test]
fn a_bad_socks5_request_gets_the_same_reply_from_the_server_and_from_local() {
    let c = Chain::start(0);
    let port = c.port().to_be_bytes();
    let mut spaced = vec![5, 1, 0, 3, 3];
    spaced.extend_from_slice(b"a b");
    spaced.extend_from_slice(&port);
    let reserved = vec![5, 1, 1, 1, 127, 0, 0, 1, port[0], port[1]];
    for (what, req) in [("a domain with a space", &spaced), ("RSV 0x01", &reserved)] {
        let mut answers = Vec::new();
        for through_local in [false, true] {
            let mut s = if through_local {
                let mut s = connect(c.addr());
                s.write_all(&[5, 1, 0]).unwrap();
                let mut m = [0u8; 2];
                s.read_exact(&mut m).unwrap();
                s
            } else {
                socks5_login(c._srv.addr, USER, PASS)
            };
            s.write_all(req).unwrap();
            s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
            let code = socks5_reply(&mut s).map_err(|e| e.to_string());
            assert!(
                read_to_close(&mut s).is_empty(),
                "{what}: data after the reply"
            );
            answers.push(code);
        }
        assert_eq!(
            answers,
            [Ok(0x01), Ok(0x01)],
            "{what}: [server, local] replies"
        );
    }
    assert_eq!(c.origin.connections(), 0);
}

/// A username and password as the fake server received them.
type Creds = (Vec<u8>, Vec<u8>);

/// A stand-in SOCKS5 server: logs anyone in, records each login and CONNECT request as sent,
/// answers every request with `code`, and closes.
struct FakeServer {
    addr: SocketAddr,
    logins: Arc<Mutex<Vec<Creds>>>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeServer {
    fn start(code: u8) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let logins = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (lg, rq) = (logins.clone(), requests.clone());
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (lg, rq) = (lg.clone(), rq.clone());
                thread::spawn(move || {
                    let _ = fake_serve(s, code, &lg, &rq);
                });
            }
        });
        FakeServer {
            addr,
            logins,
            requests,
        }
    }
}

fn read_vec(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn fake_serve(
    mut s: TcpStream,
    code: u8,
    logins: &Mutex<Vec<Creds>>,
    requests: &Mutex<Vec<Vec<u8>>>,
) -> io::Result<()> {
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let greeting = read_vec(&mut s, 2)?;
    let methods = read_vec(&mut s, usize::from(greeting[1]))?;
    assert!(
        methods.contains(&2),
        "local proxy must offer username/password"
    );
    s.write_all(&[5, 2])?;
    let ulen = read_vec(&mut s, 2)?[1];
    let user = read_vec(&mut s, usize::from(ulen))?;
    let plen = read_vec(&mut s, 1)?[0];
    let pass = read_vec(&mut s, usize::from(plen))?;
    logins.lock().push((user, pass));
    s.write_all(&[1, 0])?;
    let mut req = read_vec(&mut s, 4)?;
    let alen = match req[3] {
        1 => 4,
        4 => 16,
        _ => {
            let l = read_vec(&mut s, 1)?;
            req.extend_from_slice(&l);
            usize::from(l[0])
        }
    };
    req.extend(read_vec(&mut s, alen + 2)?);
    requests.lock().push(req);
    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0])
}

#[test]
fn names_reach_the_server_unresolved_with_the_configured_login() {
    let fake = FakeServer::start(0x04);
    let l = start_local(&config(fake.addr, PASS));
    let name = "unresolved.example";
    assert_eq!(socks5_open(l.local_addr(), name, 443).err(), Some(0x04));
    assert_eq!(socks4_open(l.local_addr(), name, 443).err(), Some(0x5B));
    assert_eq!(http_open(l.local_addr(), &format!("{name}:443")).1, 502);
    let (head, _) = http_get(l.local_addr(), &format!("{name}:443"), 1);
    assert_eq!(status_code(&head), 502);
    let mut want = vec![5, 1, 0, 3, name.len() as u8];
    want.extend_from_slice(name.as_bytes());
    want.extend_from_slice(&443u16.to_be_bytes());
    let requests = fake.requests.lock().clone();
    assert_eq!(requests, vec![want; 4], "ATYP 3 with the name as given");
    let login = (USER.as_bytes().to_vec(), PASS.as_bytes().to_vec());
    assert!(fake.logins.lock().iter().all(|l| *l == login));
}

#[test]
fn server_replies_are_translated_for_each_app() {
    // (server REP, what a SOCKS5 app gets, what an HTTP app gets)
    for (code, http) in [(0x02, 403), (0x06, 504), (0x05, 502), (0x03, 502)] {
        let fake = FakeServer::start(code);
        let l = start_local(&config(fake.addr, PASS));
        let a = l.local_addr();
        assert_eq!(socks5_open(a, "10.9.8.7", 80).err(), Some(code));
        assert_eq!(socks4_open(a, "10.9.8.7", 80).err(), Some(0x5B));
        assert_eq!(http_open(a, "10.9.8.7:80").1, http, "REP {code:#04x}");
        assert_eq!(status_code(&http_get(a, "10.9.8.7", 1).0), http);
    }
}

#[test]
fn server_down_fails_promptly_for_every_app() {
    let mut cfg = config(SocketAddr::from(([127, 0, 0, 1], free_port())), PASS);
    cfg.connect_timeout = Duration::from_secs(10);
    let l = start_local(&cfg);
    let a = l.local_addr();
    let t = Instant::now();
    assert_eq!(socks5_open(a, "127.0.0.1", 80).err(), Some(0x01));
    assert_eq!(socks4_open(a, "example.com", 80).err(), Some(0x5B));
    assert_eq!(http_open(a, "example.com:80").1, 502);
    assert_eq!(status_code(&http_get(a, "example.com", 1).0), 502);
    // A browser's burst: every connection fails at once, none waits for a timeout.
    let apps: Vec<_> = (0..20)
        .map(|_| thread::spawn(move || socks5_open(a, "example.com", 443).err()))
        .collect();
    for app in apps {
        assert_eq!(app.join().unwrap(), Some(0x01));
    }
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
}

#[test]
fn silent_server_is_cut_off_at_the_apps_handshake_deadline() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(silent.local_addr().unwrap(), PASS);
    cfg.handshake_timeout = Duration::from_secs(1);
    let l = start_local(&cfg);
    let t = Instant::now();
    assert_eq!(
        socks5_open(l.local_addr(), "example.com", 80).err(),
        Some(0x06)
    );
    assert_eq!(http_open(l.local_addr(), "example.com:80").1, 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < 2 * PROMPT,
        "took {took:?}"
    );
}

#[test]
fn silent_or_unknown_app_is_closed() {
    let mut cfg = config(SocketAddr::from(([127, 0, 0, 1], free_port())), PASS);
    cfg.handshake_timeout = Duration::from_secs(1);
    let l = start_local(&cfg);
    let mut s = connect(l.local_addr());
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert!(read_to_close(&mut s).is_empty());
    let mut s = connect(l.local_addr());
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.write_all(&[0x16, 3, 1, 0, 0]).unwrap(); // a TLS ClientHello, not a proxy request
    assert!(read_to_close(&mut s).is_empty());
    assert!(wait_until(SHORT_TIMEOUT, || l.active_connections() == 0));
}

#[test]
fn non_loopback_listen_needs_allow_lan() {
    let mut cfg = config(SocketAddr::from(([127, 0, 0, 1], 1)), PASS);
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    match local::start(&cfg) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("--allow-lan"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("listened on 0.0.0.0 without --allow-lan"),
    }
    cfg.allow_lan = true;
    let l = local::start(&cfg).unwrap();
    assert_ne!(l.local_addr().port(), 0);
    l.shutdown();
}

#[test]
fn bad_server_address_is_refused_at_start() {
    let mut cfg = config(SocketAddr::from(([127, 0, 0, 1], 1)), PASS);
    cfg.server = "no-port-here".into();
    match local::start(&cfg) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("HOST:PORT"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started with a server that has no port"),
    }
}

#[test]
fn shutdown_stops_accepting() {
    let l = start_local(&config(SocketAddr::from(([127, 0, 0, 1], 1)), PASS));
    let addr = l.local_addr();
    l.shutdown();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err());
}

#[test]
fn shutdown_stops_accepting_while_a_tunnel_is_still_open() {
    let Chain {
        local,
        _srv,
        origin,
    } = Chain::start(0);
    let addr = local.local_addr();
    let mut open = socks5_open(addr, "127.0.0.1", origin.addr.port()).unwrap();
    open.write_all(b"ECHO\nping").unwrap();
    let mut got = [0u8; 4];
    open.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    // The tunnel's thread outlives the accept loop: it must not keep the listening socket open.
    local.shutdown();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err());
}

/// Issue 18 §3: an app opening 64 connections at once through `sluice local` gets all 64, and
/// the server checks the password once for them (same credentials from one source join one
/// check) instead of queueing 64 argon2 runs behind each other.
#[test]
fn sixty_four_connections_at_once_through_local_all_log_in_on_one_check() {
    let c = Chain::start(0);
    let (addr, port) = (c.addr(), c.port());
    let go = Arc::new(std::sync::Barrier::new(64));
    let apps: Vec<_> = (0..64)
        .map(|_| {
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                let mut s = socks5_open(addr, "127.0.0.1", port)?;
                s.write_all(b"SEND 100\n").map_err(|_| 0xFE)?;
                Ok::<usize, u8>(read_all(&mut s).len())
            })
        })
        .collect();
    let got: Vec<Result<usize, u8>> = apps.into_iter().map(|t| t.join().unwrap()).collect();
    let failed = got.iter().filter(|r| **r != Ok(100)).count();
    assert_eq!(failed, 0, "{failed} of 64 failed: {got:?}");
    let runs = c._srv.handle.as_ref().map_or(0, |h| h.argon2_runs());
    eprintln!("argon2 runs for 64 simultaneous connections: {runs}");
    assert!(
        runs <= 4,
        "{runs} argon2 runs for one password from one source"
    );
}
