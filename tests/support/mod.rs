//! Shared test fixtures: temp databases, a server on 127.0.0.1:0, a loopback origin, and small
//! SOCKS5 / HTTP clients. Every client socket has a read timeout so a hang fails the test.
#![allow(dead_code)]

pub mod json;
pub mod prometheus;
pub mod redis;

use sluice::auth::hash_password;
use sluice::server::{self, ServerConfig, ServerHandle};
use sluice::store::{self, UserStore};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Read timeout on every test client socket.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sluice-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a database at `path` with `(name, password, bandwidth)` users.
pub fn make_db(path: &Path, users: &[(&str, &str, u64)]) {
    let store = store::open(path, true).unwrap();
    for (n, p, bw) in users {
        store.add(n, &hash_password(p).unwrap(), *bw).unwrap();
    }
}

/// A running server with its own temp database.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub dir: TempDir,
}

impl TestServer {
    /// A server allowing private (loopback) destinations, as tests need.
    pub fn start(users: &[(&str, &str, u64)]) -> TestServer {
        Self::start_with(users, |_| {})
    }

    /// A server with the config adjusted by `f` (listen, db and allow_private are preset).
    pub fn start_with(
        users: &[(&str, &str, u64)],
        f: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let dir = TempDir::new("srv");
        let db = dir.path("users.db");
        make_db(&db, users);
        let mut cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            db: db.clone().into(),
            allow_private: true,
            ..ServerConfig::default()
        };
        f(&mut cfg);
        let handle = server::start(&cfg).unwrap();
        TestServer {
            addr: handle.local_addr(),
            handle: Some(handle),
            db,
            dir,
        }
    }

    pub fn store(&self) -> Box<dyn UserStore> {
        store::open(&self.db, false).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// The byte at offset `i` of every origin download: a pattern that catches reordering and loss.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A loopback origin. Each connection sends one line first:
/// - `SEND n\n`: the origin sends n pattern bytes, then closes.
/// - `SINK\n`: the origin reads until EOF, then writes the count as decimal and closes.
/// - `ECHO\n`: the origin echoes until EOF, then shuts down writing (half-close) and waits for
///   the client to close.
/// - `GET /bytes/N HTTP/1.1` (HTTP): a response with N pattern bytes; the request head received
///   is kept in `last_head`.
pub struct Origin {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub received: Arc<AtomicU64>,
    pub last_head: Arc<parking_lot::Mutex<String>>,
}

impl Origin {
    pub fn start() -> Origin {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(bind: &str) -> Origin {
        Self::try_start_on(bind).unwrap()
    }

    /// Like [`Origin::start_on`], but `Err` when `bind` cannot be bound (no IPv6 here, say).
    pub fn try_start_on(bind: &str) -> io::Result<Origin> {
        let l = TcpListener::bind(bind)?;
        let addr = l.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let last_head = Arc::new(parking_lot::Mutex::new(String::new()));
        let (a, r, h) = (accepted.clone(), received.clone(), last_head.clone());
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let (r, h) = (r.clone(), h.clone());
                thread::spawn(move || {
                    let _ = serve(s, &r, &h);
                });
            }
        });
        Ok(Origin {
            addr,
            accepted,
            received,
            last_head,
        })
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn send_pattern(mut w: impl Write, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(off + j as u64);
        }
        w.write_all(&buf[..k])?;
        off += k as u64;
    }
    Ok(())
}

fn serve(
    s: TcpStream,
    received: &AtomicU64,
    last_head: &parking_lot::Mutex<String>,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut w = &s;
    let cmd: Vec<&str> = line.split_whitespace().collect();
    match cmd.as_slice() {
        ["SEND", n] => send_pattern(&s, n.parse().unwrap_or(0))?,
        ["SINK"] => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let k = r.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                total += k as u64;
                received.fetch_add(k as u64, Ordering::Relaxed);
            }
            w.write_all(total.to_string().as_bytes())?;
        }
        ["ECHO"] => {
            io::copy(&mut r, &mut w)?;
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        }
        [_method, path, _ver] => {
            let mut head = line.clone();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 || l == "\r\n" || l == "\n" {
                    break;
                }
                head.push_str(&l);
            }
            *last_head.lock() = head;
            let n: u64 = path
                .strip_prefix("/bytes/")
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            )?;
            send_pattern(&s, n)?;
        }
        _ => {}
    }
    Ok(())
}

/// Checks that `data` is the origin's pattern from offset 0.
pub fn is_pattern(data: &[u8]) -> bool {
    data.iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64))
}

/// A plain TCP connection with the test read timeout.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s
}

/// Opens a SOCKS5 tunnel with username/password. `Err(code)` carries the server's reply code, or
/// 0xFF when the login was refused (or the method was not accepted).
pub fn socks5(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    host: &str,
    port: u16,
) -> Result<TcpStream, u8> {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).map_err(|_| 0xFE)?;
    if m[1] != 2 {
        return Err(0xFF);
    }
    let mut a = vec![1, user.len() as u8];
    a.extend_from_slice(user.as_bytes());
    a.push(pass.len() as u8);
    a.extend_from_slice(pass.as_bytes());
    s.write_all(&a).unwrap();
    s.read_exact(&mut m).map_err(|_| 0xFE)?;
    if m[1] != 0 {
        return Err(0xFF);
    }
    let req = socks5_connect_bytes(host, port);
    s.write_all(&req).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(|_| 0xFE)?;
    let alen = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).unwrap();
            l[0] as usize
        }
        _ => 0,
    };
    let mut rest = vec![0u8; alen + 2];
    s.read_exact(&mut rest).map_err(|_| 0xFE)?;
    if head[1] != 0 {
        return Err(head[1]);
    }
    Ok(s)
}

/// The bytes of a SOCKS5 CONNECT request to `host` (an IP literal or a name) and `port`, from the
/// crate's own encoder.
pub fn socks5_connect_bytes(host: &str, port: u16) -> Vec<u8> {
    let target = sluice::wire::target::Target {
        host: sluice::wire::target::host_from_str(host).unwrap(),
        port,
    };
    sluice::wire::socks5::encode_request(sluice::wire::socks5::Command::Connect, &target).unwrap()
}

/// Sends a raw request head and returns the whole response head (status line and headers).
pub fn http_exchange(proxy: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut s = connect(proxy);
    s.write_all(head.as_bytes()).unwrap();
    let h = read_head(&mut s);
    (s, h)
}

/// Reads up to and including the blank line ending a response head, byte by byte.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut h = Vec::new();
    let mut b = [0u8; 1];
    while !h.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => h.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&h).into_owned()
}

/// The value of header `name` in a response head (case-insensitive), if present.
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads the body that follows `head`: `Content-Length` bytes, or, without one, until the peer
/// closes. A kept-alive connection is left open for the next response.
pub fn read_body(s: &mut TcpStream, head: &str) -> Vec<u8> {
    match header_value(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => {
            let mut v = vec![0u8; n];
            s.read_exact(&mut v).unwrap();
            v
        }
        None => read_all(s),
    }
}

/// The `Proxy-Authorization` value for Basic credentials.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        sluice::wire::http::base64_encode(format!("{user}:{pass}").as_bytes())
    )
}

/// Reads everything until EOF.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

/// Read timeout for checks that expect the server to answer or close soon.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a child process (`sluice`, `curl`) may run before the test kills it and fails.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Greets a SOCKS5 server offering username/password and logs in; panics unless both succeed.
pub fn socks5_login(proxy: SocketAddr, user: &str, pass: &str) -> TcpStream {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2], "method choice");
    let mut a = vec![1, user.len() as u8];
    a.extend_from_slice(user.as_bytes());
    a.push(pass.len() as u8);
    a.extend_from_slice(pass.as_bytes());
    s.write_all(&a).unwrap();
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [1, 0], "login status");
    s
}

/// Reads a whole SOCKS5 reply (VER REP RSV ATYP BND.ADDR BND.PORT) and returns REP.
///
/// # Errors
/// The stream ended or failed first, or VER is not 5.
pub fn socks5_reply(s: &mut TcpStream) -> io::Result<u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[0] != 5 {
        return Err(io::Error::other(format!("reply version {}", head[0])));
    }
    let alen = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            usize::from(l[0])
        }
        t => return Err(io::Error::other(format!("reply address type {t}"))),
    };
    let mut rest = vec![0u8; alen + 2];
    s.read_exact(&mut rest)?;
    Ok(head[1])
}

/// Reads until the peer closes (EOF or reset) and returns what came first; panics if the read
/// times out instead, i.e. the server kept the connection open.
pub fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return got;
            }
            Err(e) => panic!("connection not closed by the server: {e} (after {got:?})"),
        }
    }
}

/// The status code of a response head ("HTTP/1.1 407 ..." → 407), or 0 if there is none.
pub fn status_code(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A `CONNECT target` request head, with Basic credentials when `auth` is given.
pub fn connect_head(target: &str, auth: Option<(&str, &str)>) -> String {
    let mut h = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((u, p)) = auth {
        h.push_str(&format!("Proxy-Authorization: {}\r\n", basic(u, p)));
    }
    h.push_str("\r\n");
    h
}

/// Opens an HTTP CONNECT tunnel; panics unless the proxy answers 200.
pub fn http_connect(proxy: SocketAddr, user: &str, pass: &str, target: &str) -> TcpStream {
    let (s, head) = http_exchange(proxy, &connect_head(target, Some((user, pass))));
    assert_eq!(status_code(&head), 200, "CONNECT {target}: {head:?}");
    s
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `f` every 20 ms until it is true (returns true) or `timeout` passes (returns false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its end with `stdin` fed in, capturing its output; kills it and panics after
/// [`PROCESS_TIMEOUT`].
pub fn run_command(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let input = stdin.unwrap_or_default().to_vec();
    let mut w = child.stdin.take().unwrap();
    let feed = thread::spawn(move || {
        let _ = w.write_all(&input);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {PROCESS_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = feed.join();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The `sluice` binary, with SLUICE_PASSWORD and RUST_LOG cleared so the caller decides.
pub fn sluice_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env_remove("SLUICE_PASSWORD").env_remove("RUST_LOG");
    c
}

/// Runs `sluice ARGS` to its end (see [`run_command`]).
pub fn sluice(args: &[&str]) -> Output {
    let mut c = sluice_command();
    c.args(args);
    run_command(c, None)
}

/// `sluice user set NAME --bandwidth RATE --db DB`; panics unless it succeeds.
pub fn sluice_set_bandwidth(db: &Path, name: &str, rate: &str) {
    let out = sluice(&[
        "user",
        "set",
        name,
        "--bandwidth",
        rate,
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "user set failed: {out:?}");
}

/// True if a `curl` binary runs; else prints a note so the skip shows in the test output.
pub fn have_curl() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: curl not found; skipping this test");
    }
    ok
}

/// Runs `curl -q -sS --max-time 20 ARGS` with every proxy variable cleared, so only `-x` counts.
pub fn curl(args: &[&str]) -> Output {
    let mut c = Command::new("curl");
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(v);
    }
    c.args(["-q", "-sS", "--max-time", "20"]).args(args);
    run_command(c, None)
}

/// A long-running `sluice server` or `sluice local` child started with `--listen 127.0.0.1:0`:
/// its address (from its "listening on" line) and its log lines as they come. Killed on drop.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every log line read so far.
    pub log: Vec<String>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Daemon {
    /// Spawns `cmd` with logging at info and waits (up to 10 s) for its "listening on" line.
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines,
            log: Vec::new(),
            addr: ([127, 0, 0, 1], 0).into(),
        };
        let line = d
            .wait_for_line("listening on", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no start-up line from {cmd:?}: {:?}", d.log));
        d.addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        d
    }

    /// The first line containing `word` within `timeout` (`None` if the child exits first).
    pub fn wait_for_line(&mut self, word: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.lines.recv_timeout(left).ok()?;
            self.log.push(l.clone());
            if l.contains(word) {
                return Some(l);
            }
        }
    }

    /// Sends `sig` to this child (by its pid).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill() only sends a signal to the process we spawned.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Log lines that came after those already read, for a failure message (waits briefly).
    pub fn rest_of_log(&mut self) -> Vec<String> {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.log.push(l);
        }
        self.log.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice server` on 127.0.0.1:0 over `db`, with loopback destinations allowed.
pub fn server_process(db: &Path) -> Daemon {
    let mut c = sluice_command();
    c.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--allow-private",
        "--db",
    ])
    .arg(db);
    Daemon::spawn(c)
}

/// Sends `n` bytes through the origin's echo (writing and reading at once, then half-closing)
/// and checks they come back exactly. The writes run on another thread so the echo flowing back
/// never stalls them.
pub fn echo_exact(mut s: TcpStream, n: u64) {
    let data: Vec<u8> = (0..n).map(pattern).collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(b"ECHO\n").unwrap();
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let got = read_all(&mut s);
    writer.join().unwrap();
    assert_eq!(got.len() as u64, n);
    assert!(got == data, "echo corrupted");
}

/// One request as a [`HttpOrigin`] received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which of the origin's connections it came on (1, 2, …).
    pub conn: usize,
    /// The request line and header lines, as received (CRLF kept, blank line not).
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Seen {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }
}

/// How a [`HttpOrigin`] treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginMode {
    /// Keep-alive: answer every request on a connection.
    KeepAlive,
    /// Answer the first request of each connection as keep-alive, then read the second one and
    /// close without a word: a kept connection gone stale at the worst moment.
    OneShot,
}

/// A keep-alive HTTP/1.1 loopback origin that records every request it receives. It answers by
/// path (the body names the origin, so a response from the wrong one shows):
/// - `/bytes/N`: N pattern bytes with `Content-Length`;
/// - `/chunked`: a chunked body `{name} chunked` in two chunks, then a trailer `X-Trailer: t`;
/// - `/close`: no length, `{name} close` then the origin closes the connection;
/// - `/204`, `/304` (with a `Content-Length: 50` that frames nothing): no body;
/// - `/upgrade`: `101` with `Upgrade: echo`, then echoes bytes until EOF;
/// - anything else: `{name} {METHOD} {path} body={body}` with `Content-Length`.
///
/// `HEAD` gets the headers alone. `Expect: 100-continue` gets a 100 before the body is read.
pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<parking_lot::Mutex<Vec<Seen>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl HttpOrigin {
    /// A keep-alive origin on 127.0.0.1 whose bodies say `name`.
    pub fn start(name: &str) -> HttpOrigin {
        Self::start_with(name, OriginMode::KeepAlive)
    }

    pub fn start_with(name: &str, mode: OriginMode) -> HttpOrigin {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s2, a2, name) = (seen.clone(), accepted.clone(), name.to_string());
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let conn = a2.fetch_add(1, Ordering::SeqCst) + 1;
                let (seen, name) = (s2.clone(), name.clone());
                thread::spawn(move || {
                    let _ = serve_http(s, conn, &name, mode, &seen);
                });
            }
        });
        HttpOrigin {
            addr,
            seen,
            accepted,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve_http(
    s: TcpStream,
    conn: usize,
    name: &str,
    mode: OriginMode,
    seen: &parking_lot::Mutex<Vec<Seen>>,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = &s;
    for n in 1.. {
        let mut head = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                return Ok(());
            }
            if l == "\r\n" || l == "\n" {
                break;
            }
            head.push_str(&l);
        }
        let mut rec = Seen {
            conn,
            head,
            body: Vec::new(),
        };
        if mode == OriginMode::OneShot && n == 2 {
            seen.lock().push(rec);
            return Ok(());
        }
        let first: Vec<String> = rec.head.split_whitespace().map(String::from).collect();
        let (method, path) = (first[0].clone(), first[1].clone());
        if rec
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        if rec
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            rec.body = read_chunked(&mut r)?;
        } else if let Some(n) = rec.header("content-length") {
            rec.body = vec![0u8; n.parse().unwrap_or(0)];
            r.read_exact(&mut rec.body)?;
        }
        let body_text = String::from_utf8_lossy(&rec.body).into_owned();
        seen.lock().push(rec);
        let head_only = method == "HEAD";
        let send = |w: &mut &TcpStream, status: &str, extra: &str, body: &[u8]| {
            let mut out = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if !head_only {
                out.extend_from_slice(body);
            }
            w.write_all(&out)
        };
        match path.as_str() {
            p if p.starts_with("/bytes/") => {
                let n: u64 = p[7..].parse().unwrap_or(0);
                w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())?;
                if !head_only {
                    send_pattern(w, n)?;
                }
            }
            "/chunked" => {
                let text = format!("{name} chunked");
                let (a, b) = text.split_at(3);
                let body = format!(
                    "{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
                    a.len(),
                    b.len()
                );
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                w.write_all(body.as_bytes())?;
            }
            "/close" => {
                w.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{name} close").as_bytes())?;
                return Ok(());
            }
            "/204" => w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?,
            "/304" => w.write_all(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")?,
            "/upgrade" => {
                w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
                )?;
                io::copy(&mut r, &mut w)?;
                return Ok(());
            }
            _ => {
                let text = format!("{name} {method} {path} body={body_text}");
                send(&mut w, "200 OK", "", text.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Reads a chunked body (and its trailer section) and returns the data.
fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 || l.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let mut crlf = String::new();
        r.read_line(&mut crlf)?;
    }
}

/// Reads one line (LF included), a byte at a time so nothing after it is consumed.
pub fn read_line_raw(s: &mut TcpStream) -> String {
    let mut v = Vec::new();
    let mut b = [0u8; 1];
    while !v.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => v.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// One HTTP response read from a client socket: the head, the body (de-chunked; to EOF when it
/// has no length) and the trailer lines, if chunked.
pub struct HttpReply {
    pub head: String,
    pub body: Vec<u8>,
    pub trailers: String,
}

impl HttpReply {
    pub fn status(&self) -> u16 {
        status_code(&self.head)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response to a request with `method`, framed as RFC 9112 §6 says.
pub fn read_reply(s: &mut TcpStream, method: &str) -> HttpReply {
    let head = read_head(s);
    assert!(!head.is_empty(), "no response");
    let code = status_code(&head);
    let mut reply = HttpReply {
        head: head.clone(),
        body: Vec::new(),
        trailers: String::new(),
    };
    if method == "HEAD" || code < 200 || code == 204 || code == 304 {
        return reply;
    }
    if header_value(&head, "transfer-encoding").is_some() {
        loop {
            let line = read_line_raw(s);
            let size = usize::from_str_radix(line.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {line:?}"));
            if size == 0 {
                loop {
                    let l = read_line_raw(s);
                    if l.trim().is_empty() {
                        return reply;
                    }
                    reply.trailers.push_str(&l);
                }
            }
            let start = reply.body.len();
            reply.body.resize(start + size, 0);
            s.read_exact(&mut reply.body[start..]).unwrap();
            assert_eq!(read_line_raw(s), "\r\n", "chunk data not ended by CRLF");
        }
    }
    reply.body = read_body(s, &head);
    reply
}
