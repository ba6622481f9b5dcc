//! Shared test fixtures: temp databases, a server on 127.0.0.1:0, a loopback origin, and small
//! SOCKS5 / HTTP clients. Every client socket has a read timeout so a hang fails the test.
#![allow(dead_code)]

use sluice::auth::hash_password;
use sluice::server::{self, ServerConfig, ServerHandle};
use sluice::users::UserStore;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

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
    let store = UserStore::open_or_create(path).unwrap();
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
            db: db.clone(),
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

    pub fn store(&self) -> UserStore {
        UserStore::open(&self.db).unwrap()
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
        let l = TcpListener::bind(bind).unwrap();
        let addr = l.local_addr().unwrap();
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
        Origin {
            addr,
            accepted,
            received,
            last_head,
        }
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
    let mut req = vec![5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
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

/// The `Proxy-Authorization` value for Basic credentials.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        sluice::http::base64_encode(format!("{user}:{pass}").as_bytes())
    )
}

/// Reads everything until EOF.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}
