//! TLS on the hop to the server (issue 8), end to end: `sluice local --tls` → TLS server → origin
//! with exact bytes both ways; curl as an HTTPS-proxy client straight to the server; untrusted
//! certificates refused with nothing reaching the origin; clear text to the TLS port refused
//! within the handshake deadline without holding anyone up; a key that does not fit refused at
//! start; the per-user limit through TLS; and `sluice cert`.
//!
//! Certificates are made per test with `sluice::net::tls::self_signed("localhost")` (it also names
//! 127.0.0.1). The library's own TLS client is used where the test needs one in-process, rustls
//! configs built here where the test needs a particular protocol version, and curl where an
//! independent client matters.

use crate::accounting::http_get;
use crate::support::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::local::{self, LocalConfig, LocalHandle, LocalTls};
use sluice::net::stream::Stream;
use sluice::net::tls::{self, Trust};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const USER: &str = "tess";
const PASS: &str = "tls-pass";
const KIB: u64 = 1024;
/// What "at once" means for a refusal an app must be told about.
const PROMPT: Duration = Duration::from_secs(3);

/// A self-signed certificate for localhost and its key, as PEM files in a temp dir.
struct Cert {
    _dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    /// SHA-256 of the certificate's DER, 64 hex digits.
    fp: String,
}

impl Cert {
    fn new() -> Cert {
        let dir = TempDir::new("cert");
        let (cert_pem, key_pem, fp) = tls::self_signed("localhost").unwrap();
        let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        Cert {
            _dir: dir,
            cert,
            key,
            fp,
        }
    }

    fn pin(&self) -> Trust {
        Trust::Pin(tls::parse_pin(&self.fp).unwrap())
    }
}

/// A TLS-only server using `cert`, with the one test user at `rate`, adjusted by `f`.
fn tls_server(cert: &Cert, rate: u64, f: impl FnOnce(&mut sluice::ServerConfig)) -> TestServer {
    let pair = (cert.cert.clone(), cert.key.clone());
    TestServer::start_with(&[(USER, PASS, rate)], move |cfg| {
        cfg.tls = Some(pair);
        f(cfg);
    })
}

fn local_config(server: SocketAddr, tls: Option<LocalTls>) -> LocalConfig {
    LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        server: server.to_string(),
        user: USER.into(),
        password: PASS.into(),
        allow_lan: false,
        handshake_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        tls,
    }
}

/// `sluice local` to `server` over TLS trusting `trust`.
fn tls_local(server: SocketAddr, trust: Trust, name: Option<&str>) -> LocalHandle {
    let t = LocalTls {
        trust,
        server_name: name.map(str::to_string),
    };
    local::start(&local_config(server, Some(t))).unwrap()
}

/// Opens a tunnel through a local proxy as an app does (SOCKS5, no authentication). `Err`
/// carries the reply code, or 0xFE if the proxy closed without one.
fn app_socks5(local: SocketAddr, port: u16) -> Result<TcpStream, u8> {
    let mut s = connect(local);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).map_err(|_| 0xFE)?;
    assert_eq!(m, [5, 0], "method choice");
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    match socks5_reply(&mut s).map_err(|_| 0xFE)? {
        0 => Ok(s),
        code => Err(code),
    }
}

/// A `Stream` (here a TLS session) used as a socket.
struct Io<'a>(&'a Stream);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS connection to `addr` as "localhost" with `cfg`, with the test timeouts armed after the
/// handshake (which arms its own deadline).
fn tls_client(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> io::Result<Stream> {
    let name = ServerName::try_from("localhost").unwrap();
    let s = tls::connect(connect(addr), cfg, name, Instant::now() + SHORT_TIMEOUT)?;
    s.socket().set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.socket().set_write_timeout(Some(CLIENT_TIMEOUT))?;
    Ok(s)
}

/// A rustls client trusting `cert` and speaking only `version`.
fn client_config(
    cert: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// SOCKS5 login and CONNECT to 127.0.0.1:`port` over any stream; `Err` carries REP (0xFF for a
/// refused login).
fn socks5_over(rw: &mut (impl Read + Write), port: u16) -> Result<(), u8> {
    rw.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    rw.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2], "method choice");
    let mut a = vec![1, USER.len() as u8];
    a.extend_from_slice(USER.as_bytes());
    a.push(PASS.len() as u8);
    a.extend_from_slice(PASS.as_bytes());
    rw.write_all(&a).unwrap();
    rw.read_exact(&mut m).unwrap();
    if m != [1, 0] {
        return Err(0xFF);
    }
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    rw.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    rw.read_exact(&mut reply).unwrap();
    match reply[1] {
        0 => Ok(()),
        code => Err(code),
    }
}

/// Asks the origin for `n` bytes over `rw` and checks every one of them.
fn download_over(rw: &mut impl Read, n: u64) {
    let mut got = Vec::new();
    rw.read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, n, "download length");
    assert!(is_pattern(&got), "download corrupted");
}

/// Downloads `n` bytes through a plain tunnel and checks them.
fn download(mut s: TcpStream, n: u64) {
    s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
    download_over(&mut s, n);
}

/// Sends `n` bytes through the origin's echo while reading them back on another thread (both
/// directions of every hop busy at once), then half-closes; checks the bytes and the order.
fn echo_both_ways(s: TcpStream, n: usize) {
    let data: Vec<u8> = (0..n as u64).map(|i| pattern(i * 7 + 3)).collect();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let out = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(b"ECHO\n").unwrap();
        for chunk in out.chunks(7 * 1024 + 13) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut back = Vec::with_capacity(n);
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), n, "echo length");
    assert!(back == data, "echo corrupted");
}

// ---------------------------------------------------------------------------------------------
// local → TLS server → origin.

#[test]
fn local_to_a_tls_server_carries_exact_bytes_both_ways_with_a_pin() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |_| {});
    let local = tls_local(srv.addr, cert.pin(), None);
    let (app, port) = (local.local_addr(), origin.addr.port());
    download(app_socks5(app, port).unwrap(), 300_000);
    echo_both_ways(app_socks5(app, port).unwrap(), 512 * 1024);
    let mut up = app_socks5(app, port).unwrap();
    up.write_all(b"SINK\n").unwrap();
    up.write_all(&vec![0xa5; 200_000]).unwrap();
    up.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut up), b"200000");
    // Several tunnels at once over separate TLS sessions.
    let flows: Vec<_> = (0..4)
        .map(|i| {
            let s = app_socks5(app, port).unwrap();
            thread::spawn(move || download(s, 50_000 + i))
        })
        .collect();
    for f in flows {
        f.join().unwrap();
    }
}

#[test]
fn local_trusts_a_tls_server_by_its_ca_file_and_name() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |_| {});
    // The certificate names localhost; the server is dialed by address.
    let local = tls_local(srv.addr, Trust::Ca(cert.cert.clone()), Some("localhost"));
    download(
        app_socks5(local.local_addr(), origin.addr.port()).unwrap(),
        100_000,
    );
    // Without --server-name the name checked is 127.0.0.1, which the certificate names too.
    let local = tls_local(srv.addr, Trust::Ca(cert.cert.clone()), None);
    echo_both_ways(
        app_socks5(local.local_addr(), origin.addr.port()).unwrap(),
        64 * 1024,
    );
}

#[test]
fn both_tls_1_2_and_tls_1_3_clients_are_served() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |_| {});
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let s = tls_client(srv.addr, &client_config(&cert.cert, version))
            .unwrap_or_else(|e| panic!("{version:?} handshake: {e}"));
        let mut io = Io(&s);
        socks5_over(&mut io, origin.addr.port()).unwrap();
        io.write_all(b"SEND 70000\n").unwrap();
        download_over(&mut io, 70_000);
    }
}

/// Checks that an app behind `local` is refused promptly and that nothing reached the origin.
fn assert_refused(local: &LocalHandle, origin: &Origin, what: &str) {
    let t = Instant::now();
    let r = app_socks5(local.local_addr(), origin.addr.port());
    assert!(r.is_err(), "{what}: the app got a tunnel");
    assert!(
        t.elapsed() < PROMPT,
        "{what}: refused after {:?}",
        t.elapsed()
    );
    // An HTTP app is told why.
    let target = origin.addr.to_string();
    let (mut s, head) = http_exchange(local.local_addr(), &connect_head(&target, None));
    assert_eq!(status_code(&head), 502, "{what}: {head}");
    let body = String::from_utf8_lossy(&read_to_close(&mut s)).to_string();
    assert!(
        body.contains("tls"),
        "{what}: the app is not told why: {body:?}"
    );
    assert_eq!(origin.connections(), 0, "{what}: the origin was reached");
}

#[test]
fn a_wrong_ca_a_wrong_pin_and_the_system_roots_are_refused() {
    let cert = Cert::new();
    let other = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |_| {});
    let wrong_ca = tls_local(srv.addr, Trust::Ca(other.cert.clone()), Some("localhost"));
    assert_refused(&wrong_ca, &origin, "wrong CA");
    let wrong_pin = tls_local(srv.addr, other.pin(), None);
    assert_refused(&wrong_pin, &origin, "wrong pin");
    let system = tls_local(srv.addr, Trust::System, Some("localhost"));
    assert_refused(&system, &origin, "system roots");
    // The right CA but the wrong name.
    let wrong_name = tls_local(srv.addr, Trust::Ca(cert.cert.clone()), Some("example.com"));
    assert_refused(&wrong_name, &origin, "wrong name");
    // And the server was working all along.
    let good = tls_local(srv.addr, cert.pin(), None);
    download(
        app_socks5(good.local_addr(), origin.addr.port()).unwrap(),
        1000,
    );
}

#[test]
fn local_with_tls_never_falls_back_to_clear_text() {
    let cert = Cert::new();
    let origin = Origin::start();
    let plain = TestServer::start(&[(USER, PASS, 0)]);
    let local = tls_local(plain.addr, cert.pin(), None);
    assert_refused(&local, &origin, "TLS local to a clear-text server");
    // And a clear-text local gets nothing from a TLS server.
    let tls_srv = tls_server(&cert, 0, |_| {});
    let clear = local::start(&local_config(tls_srv.addr, None)).unwrap();
    let r = app_socks5(clear.local_addr(), origin.addr.port());
    assert!(r.is_err(), "clear text got through a TLS port");
    assert_eq!(origin.connections(), 0);
}

// ---------------------------------------------------------------------------------------------
// curl as an HTTPS-proxy client.

#[test]
fn curl_uses_the_tls_server_as_an_https_proxy() {
    if !have_curl() {
        return;
    }
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |c| {
        c.metrics = Some("127.0.0.1:0".parse().unwrap())
    });
    let maddr = srv.handle.as_ref().unwrap().metrics_addr().unwrap();
    let proxy = format!("https://{USER}:{PASS}@localhost:{}", srv.addr.port());
    let cacert = cert.cert.to_str().unwrap();
    let url = format!("http://127.0.0.1:{}/bytes/200000", origin.addr.port());
    for (tunnel, protocol) in [(false, "http"), (true, "http-connect")] {
        let mut args = vec!["-x", &proxy, "--proxy-cacert", cacert];
        if tunnel {
            args.push("-p");
        }
        args.push(&url);
        let out = curl(&args);
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), 200_000, "curl {args:?}");
        assert!(is_pattern(&out.stdout), "curl {args:?}: body corrupted");
        // The request went the way asked: forwarded, or through a CONNECT tunnel.
        let metrics = http_get(maddr, "/metrics").2;
        let line = format!("sluice_connections_total{{protocol=\"{protocol}\",result=\"ok\"}} 1");
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    assert_eq!(origin.connections(), 2);
    // A CA that did not sign the server's certificate: curl refuses, the origin sees nothing.
    let other = Cert::new();
    let out = curl(&[
        "-x",
        &proxy,
        "--proxy-cacert",
        other.cert.to_str().unwrap(),
        &url,
    ]);
    assert!(!out.status.success(), "curl trusted the wrong CA");
    assert!(out.stdout.is_empty());
    assert_eq!(origin.connections(), 2, "the origin was reached");
}

// ---------------------------------------------------------------------------------------------
// Clear text and broken handshakes on the TLS port.

/// Handshake deadline for these tests: short, but long enough to tell "at once" from "at the
/// deadline".
const HANDSHAKE: Duration = Duration::from_secs(2);

/// Reads until the server closes; returns what came and when.
fn closed_after(s: &mut TcpStream, since: Instant) -> (Vec<u8>, Duration) {
    s.set_read_timeout(Some(HANDSHAKE + SHORT_TIMEOUT)).unwrap();
    let got = read_to_close(s);
    (got, since.elapsed())
}

#[test]
fn clear_text_on_the_tls_port_is_refused_and_closed() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |c| c.handshake_timeout = HANDSHAKE);
    let target = origin.addr.to_string();
    let requests: [(&str, Vec<u8>); 3] = [
        ("socks5 greeting", vec![5, 1, 2]),
        (
            "http connect",
            connect_head(&target, Some((USER, PASS))).into_bytes(),
        ),
        (
            "http get",
            format!("GET http://{target}/bytes/10 HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes(),
        ),
    ];
    for (what, bytes) in requests {
        let mut s = connect(srv.addr);
        let t = Instant::now();
        s.write_all(&bytes).unwrap();
        let (got, took) = closed_after(&mut s, t);
        assert!(took <= HANDSHAKE + PROMPT, "{what}: closed after {took:?}");
        // Nothing in clear comes back: at most a TLS alert record (content type 21).
        assert!(
            got.is_empty() || got[0] == 21,
            "{what}: answered in clear: {got:?}"
        );
        assert!(
            !got.starts_with(b"HTTP/") && !got.starts_with(&[5]),
            "{what}: {got:?}"
        );
    }
    assert_eq!(origin.connections(), 0, "clear text reached the origin");
}

#[test]
fn silent_and_broken_handshakes_are_closed_at_the_deadline_without_blocking_others() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |c| c.handshake_timeout = HANDSHAKE);
    let t0 = Instant::now();
    // Clients that connect and say nothing, and clients that stop inside a ClientHello.
    let mut stuck: Vec<TcpStream> = (0..3).map(|_| connect(srv.addr)).collect();
    for _ in 0..2 {
        let mut s = connect(srv.addr);
        s.write_all(&[22, 3, 1, 0, 200, 1, 0]).unwrap();
        stuck.push(s);
    }
    // Meanwhile a real client gets its tunnel at once.
    let cfg = client_config(&cert.cert, &rustls::version::TLS13);
    let s = tls_client(srv.addr, &cfg).unwrap();
    let mut io = Io(&s);
    socks5_over(&mut io, origin.addr.port()).unwrap();
    io.write_all(b"SEND 100000\n").unwrap();
    download_over(&mut io, 100_000);
    // The stuck clients were still waiting while it was served: nothing queued behind them.
    for s in &stuck {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let e = s
            .peek(&mut b)
            .expect_err("a stuck client was closed before the real one ended");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        s.set_nonblocking(false).unwrap();
    }
    for (i, s) in stuck.iter_mut().enumerate() {
        let (_, took) = closed_after(s, t0);
        assert!(
            took >= HANDSHAKE - Duration::from_millis(300) && took <= HANDSHAKE + PROMPT,
            "stuck client {i} closed after {took:?} (deadline {HANDSHAKE:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up with a bad key or certificate.

#[test]
fn a_key_that_does_not_fit_the_certificate_is_refused_at_start() {
    let cert = Cert::new();
    let other = Cert::new();
    let dir = TempDir::new("badkey");
    let db = dir.path("users.db");
    make_db(&db, &[(USER, PASS, 0)]);
    let garbage = dir.path("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let missing = dir.path("missing.pem");
    let cases = [
        ("mismatched key", &cert.cert, &other.key, "does not fit"),
        ("missing key", &cert.cert, &missing, "missing.pem"),
        ("garbage key", &cert.cert, &garbage, "garbage.pem"),
        ("key as certificate", &cert.key, &cert.key, "key.pem"),
        ("missing certificate", &missing, &cert.key, "missing.pem"),
    ];
    for (what, c, k, word) in cases {
        let cfg = sluice::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            db: db.clone().into(),
            tls: Some((c.clone(), k.clone())),
            ..sluice::ServerConfig::default()
        };
        match sluice::server::start(&cfg) {
            Ok(h) => {
                h.shutdown();
                panic!("{what}: the server started");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(word), "{what}: {msg:?} does not say {word:?}");
                assert!(!msg.contains('\n'), "{what}: more than one line: {msg:?}");
            }
        }
    }
    let out = server_binary(&db, &cert.cert, &other.key);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("sluice: ") && last.contains("does not fit") && last.contains("key.pem"),
        "{err}"
    );
}

fn server_binary(db: &Path, cert: &Path, key: &Path) -> std::process::Output {
    let mut c = sluice_command();
    c.args(["server", "--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key);
    run_command(c, None)
}

/// Regression: the server used to log its open-files limit before reading the key, so the
/// error was the second line.
#[test]
fn a_key_that_does_not_fit_prints_one_line() {
    let cert = Cert::new();
    let other = Cert::new();
    let dir = TempDir::new("badkey1");
    let db = dir.path("users.db");
    make_db(&db, &[(USER, PASS, 0)]);
    let out = server_binary(&db, &cert.cert, &other.key);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Limits through TLS.

#[test]
fn the_user_limit_holds_through_tls() {
    const RATE: u64 = 128 * KIB;
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, RATE, |_| {});
    let local = tls_local(srv.addr, cert.pin(), None);
    let mut s = app_socks5(local.local_addr(), origin.addr.port()).unwrap();
    s.write_all(b"SEND 1073741824\n").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    let mut read_for = |d: Duration| {
        let (t, mut n) = (Instant::now(), 0u64);
        while t.elapsed() < d {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0, "the download ended");
            assert!(
                buf[..k]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(offset + i as u64)),
                "download corrupted at {offset}"
            );
            offset += k as u64;
            n += k as u64;
        }
        (n, t.elapsed())
    };
    read_for(Duration::from_millis(300));
    let (n, took) = read_for(Duration::from_millis(2500));
    let rate = n as f64 / took.as_secs_f64();
    assert!(
        (0.8..=1.2).contains(&(rate / RATE as f64)),
        "{rate:.0} B/s through TLS for a {RATE} B/s user ({n} bytes in {took:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// `sluice cert`.

#[test]
fn sluice_cert_writes_a_pair_whose_fingerprint_pins_the_server() {
    let dir = TempDir::new("cert-cli");
    let out_dir = dir.path("deploy/tls");
    let out = sluice(&[
        "cert",
        "--name",
        "localhost",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let fp = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 64 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no 64-hex fingerprint in {stdout:?}"))
        .to_string();
    let (cert, key) = (out_dir.join("cert.pem"), out_dir.join("key.pem"));
    let der = CertificateDer::from_pem_file(&cert).unwrap();
    assert_eq!(
        tls::fingerprint(der.as_ref()),
        fp,
        "fingerprint of cert.pem"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key.pem mode {mode:o}");
    // Existing files are not overwritten.
    let before = std::fs::read(&key).unwrap();
    let again = sluice(&[
        "cert",
        "--name",
        "localhost",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert_eq!(std::fs::read(&key).unwrap(), before, "key.pem overwritten");

    // As a new user would: the pair serves TLS, `sluice local --tls --pin-sha256` trusts it, and
    // curl goes through the local proxy.
    let origin = Origin::start();
    let srv = TestServer::start_with(&[(USER, PASS, 0)], |c| c.tls = Some((cert, key)));
    let mut c = sluice_command();
    c.args(["local", "--listen", "127.0.0.1:0", "--server"])
        .arg(srv.addr.to_string())
        .args(["--user", USER, "--tls", "--pin-sha256", &fp])
        .env("SLUICE_PASSWORD", PASS);
    let local = Daemon::spawn(c);
    download(app_socks5(local.addr, origin.addr.port()).unwrap(), 120_000);
    if have_curl() {
        let proxy = format!("socks5h://{}", local.addr);
        let url = format!("http://127.0.0.1:{}/bytes/90000", origin.addr.port());
        let out = curl(&["-x", &proxy, &url]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout.len(), 90_000);
        assert!(is_pattern(&out.stdout));
    }
    // A pin for another certificate gets nothing through.
    let other = Cert::new();
    let mut c = sluice_command();
    c.args(["local", "--listen", "127.0.0.1:0", "--server"])
        .arg(srv.addr.to_string())
        .args(["--user", USER, "--tls", "--pin-sha256", &other.fp])
        .env("SLUICE_PASSWORD", PASS);
    let mut wrong = Daemon::spawn(c);
    assert!(app_socks5(wrong.addr, origin.addr.port()).is_err());
    let line = wrong.wait_for_line("pin", Duration::from_secs(3));
    assert!(
        line.is_some(),
        "the log does not say why: {:?}",
        wrong.rest_of_log()
    );
}

/// A stand-in for a TLS sluice server: accepts one client, takes any SOCKS5 login and CONNECT,
/// then sends `total` pattern bytes as TLS records of `record` bytes each, as fast as it can, and
/// closes in order (close_notify, FIN).
fn record_sender(cert: &Cert, record: usize, total: usize) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = tls::server_config(&cert.cert, &cert.key).unwrap();
    thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        let s = tls::accept(sock, &cfg, Instant::now() + SHORT_TIMEOUT).unwrap();
        s.socket().set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s.socket().set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        let mut io = Io(&s);
        let mut b = [0u8; 300];
        io.read_exact(&mut b[..3]).unwrap(); // greeting offering one method
        io.write_all(&[5, 2]).unwrap();
        io.read_exact(&mut b[..2]).unwrap(); // VER ULEN
        let ulen = usize::from(b[1]);
        io.read_exact(&mut b[..ulen + 1]).unwrap(); // UNAME PLEN
        let plen = usize::from(b[ulen]);
        io.read_exact(&mut b[..plen]).unwrap();
        io.write_all(&[1, 0]).unwrap();
        io.read_exact(&mut b[..10]).unwrap(); // CONNECT to an IPv4 address
        io.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 1]).unwrap();
        let data: Vec<u8> = (0..total as u64).map(pattern).collect();
        for chunk in data.chunks(record) {
            if s.write_all(chunk).is_err() {
                return;
            }
        }
        s.shutdown_write();
        let _ = io.read_to_end(&mut Vec::new());
    });
    addr
}

// Regression: records smaller than 16 KiB arriving back to back. `TlsStream::pull` used to feed
// all of an 18 KiB raw read to rustls at once; rustls refuses input ("received plaintext buffer
// full") while over 16 KiB of plaintext waits, so the connection broke after 135 000 of 1 000 000
// bytes and the far side saw an orderly close of a truncated stream.

#[test]
fn tls_records_under_16_kib_sent_back_to_back_reach_the_origin_whole() {
    let cert = Cert::new();
    let origin = Origin::start();
    let srv = tls_server(&cert, 0, |_| {});
    let s = tls_client(
        srv.addr,
        &client_config(&cert.cert, &rustls::version::TLS13),
    )
    .unwrap();
    let mut io = Io(&s);
    socks5_over(&mut io, origin.addr.port()).unwrap();
    io.write_all(b"SINK\n").unwrap();
    const TOTAL: usize = 900_000;
    for _ in 0..TOTAL / 9000 {
        // One write, one 9000-byte record.
        if s.write_all(&[0x42; 9000]).is_err() {
            break;
        }
    }
    s.shutdown_write();
    let mut answer = Vec::new();
    let _ = io.read_to_end(&mut answer);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        TOTAL.to_string(),
        "the origin's count; it had {} bytes",
        origin.received.load(std::sync::atomic::Ordering::SeqCst)
    );
}

#[test]
fn tls_records_under_16_kib_from_the_server_reach_the_app_whole() {
    const TOTAL: usize = 1_000_000;
    let cert = Cert::new();
    let server = record_sender(&cert, 9000, TOTAL);
    let local = tls_local(server, cert.pin(), None);
    let mut s = app_socks5(local.local_addr(), 9).unwrap();
    let mut got = Vec::new();
    let end = s.read_to_end(&mut got);
    assert!(is_pattern(&got), "download corrupted");
    assert_eq!(got.len(), TOTAL, "the app's download (ended with {end:?})");
}
