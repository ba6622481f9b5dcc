//! The benchmark's client side: opening a tunnel to an origin endpoint (directly, through SOCKS5
//! with or without username/password, or through HTTP CONNECT with Basic auth), and the greedy
//! loads (download, upload, both) that run on open tunnels until stopped.
//!
//! Every client does the handshake step by step, waiting for each reply as ordinary clients do,
//! so no proxy is penalised for mishandling pipelined bytes. Counting what the loads move is the
//! `Meter`'s job; choosing windows and figures is the scenarios'.

use crate::origin::ORIGIN_BUF;
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Time allowed for a TCP connect to the proxy or origin.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for each handshake reply, and for each blocked read or write of a load (after
/// which the load looks at its stop flag again).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most entries a timeline meter keeps (about 16 MB), so a long run cannot grow it without bound.
const MAX_LOG: usize = 1_000_000;
/// Largest HTTP response head accepted from a proxy.
const MAX_HEAD: usize = 8192;
/// Stack of a load thread: its buffer is on the heap.
const STACK: usize = 128 * 1024;
/// What an uploader sends.
static PAYLOAD: [u8; ORIGIN_BUF] = [0xa5; ORIGIN_BUF];

/// A byte counter shared by threads, optionally with a timeline of (when, how many) per read.
pub struct Meter {
    bytes: AtomicU64,
    log: Option<Mutex<Vec<(Instant, u32)>>>,
}

impl Meter {
    /// A counter; with `timeline`, every addition is also logged with its time.
    pub fn new(timeline: bool) -> Arc<Meter> {
        Arc::new(Meter {
            bytes: AtomicU64::new(0),
            log: timeline.then(|| Mutex::new(Vec::new())),
        })
    }

    /// Counts `n` bytes now.
    pub fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(log) = &self.log {
            let mut log = log.lock();
            if log.len() < MAX_LOG {
                log.push((Instant::now(), u32::try_from(n).unwrap_or(u32::MAX)));
            }
        }
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A copy of the timeline (empty without one).
    pub fn timeline(&self) -> Vec<(Instant, u32)> {
        self.log
            .as_ref()
            .map(|l| l.lock().clone())
            .unwrap_or_default()
    }
}

/// A username and password.
#[derive(Clone, Debug)]
pub struct Auth {
    /// Username.
    pub user: String,
    /// Password.
    pub pass: String,
}

/// How the client reaches an origin endpoint.
#[derive(Clone, Debug)]
pub enum Route {
    /// Straight to the origin: the physical limit every proxy is compared with.
    Direct,
    /// SOCKS5 CONNECT, with username/password when `auth` is set (else method "no auth").
    Socks5 {
        /// The proxy.
        proxy: SocketAddr,
        /// Credentials, if the proxy wants them.
        auth: Option<Auth>,
    },
    /// HTTP CONNECT with Basic proxy authorisation.
    Connect {
        /// The proxy.
        proxy: SocketAddr,
        /// Credentials.
        auth: Auth,
    },
}

impl Route {
    /// A Sluice (or any SOCKS5) route with credentials.
    pub fn socks(proxy: SocketAddr, user: &str, pass: &str) -> Route {
        Route::Socks5 {
            proxy,
            auth: Some(Auth {
                user: user.into(),
                pass: pass.into(),
            }),
        }
    }

    /// Opens a tunnel to `target`. Blocking, bounded by the connect and I/O timeouts.
    ///
    /// # Errors
    /// Connect, handshake or proxy refusal, with what the proxy answered.
    pub fn open(&self, target: SocketAddr) -> io::Result<TcpStream> {
        let to = match self {
            Route::Direct => target,
            Route::Socks5 { proxy, .. } | Route::Connect { proxy, .. } => *proxy,
        };
        let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        match self {
            Route::Direct => {}
            Route::Socks5 { auth, .. } => socks5_connect(&s, auth.as_ref(), target)?,
            Route::Connect { auth, .. } => http_connect(&s, auth, target)?,
        }
        Ok(s)
    }
}

fn refused(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, what)
}

fn socks5_connect(mut s: &TcpStream, auth: Option<&Auth>, target: SocketAddr) -> io::Result<()> {
    let method = if auth.is_some() { 2 } else { 0 };
    s.write_all(&[5, 1, method])?;
    let mut two = [0u8; 2];
    s.read_exact(&mut two)?;
    if two != [5, method] {
        return Err(refused(format!("socks5: method reply {two:?}")));
    }
    if let Some(a) = auth {
        let (u, p) = (a.user.as_bytes(), a.pass.as_bytes());
        let mut msg = vec![1, u.len() as u8];
        msg.extend_from_slice(u);
        msg.push(p.len() as u8);
        msg.extend_from_slice(p);
        s.write_all(&msg)?;
        s.read_exact(&mut two)?;
        if two[1] != 0 {
            return Err(refused(format!("socks5: login refused ({})", two[1])));
        }
    }
    let IpAddr::V4(ip) = target.ip() else {
        return Err(refused("socks5: origin must be IPv4".into()));
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    if head[1] != 0 {
        return Err(refused(format!("socks5: connect reply {}", head[1])));
    }
    // The bound address that follows; its length depends on its type.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len)?;
            usize::from(len[0]) + 2
        }
        t => return Err(refused(format!("socks5: address type {t}"))),
    };
    let mut skip = [0u8; 258];
    s.read_exact(&mut skip[..rest])
}

fn http_connect(mut s: &TcpStream, auth: &Auth, target: SocketAddr) -> io::Result<()> {
    let cred = base64(format!("{}:{}", auth.user, auth.pass).as_bytes());
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {cred}\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    // Bytes after the head (tunnel data that came with it) are dropped: at most one chunk, before
    // any measuring window opens.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk)?;
        if n == 0 || head.len() > MAX_HEAD {
            return Err(refused("http: no complete response head".into()));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    if line.split_whitespace().nth(1) != Some("200") {
        return Err(refused(format!("http: {line}")));
    }
    Ok(())
}

/// Standard base64 with padding (for the Basic credential).
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - c.len()));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Which way a load pushes bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The client reads from a source.
    Down,
    /// The client writes to a sink.
    Up,
    /// Both at once on the same tunnel.
    Both,
}

/// Greedy loads on open tunnels; stopping (or dropping) shuts every socket and joins every thread.
#[derive(Default)]
pub struct Load {
    stop: Arc<AtomicBool>,
    socks: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `dir` on `s`; downloaded bytes are counted on `meter`.
    ///
    /// # Errors
    /// A thread could not be spawned or the socket cloned.
    pub fn start(&mut self, dir: Dir, s: TcpStream, meter: &Arc<Meter>) -> Result<(), String> {
        let err = |e: io::Error| format!("load: {e}");
        self.socks.push(s.try_clone().map_err(err)?);
        if dir != Dir::Down {
            let (w, stop) = (s.try_clone().map_err(err)?, self.stop.clone());
            self.spawn(move || upload(&w, &stop))?;
        }
        if dir != Dir::Up {
            let (m, stop) = (meter.clone(), self.stop.clone());
            self.spawn(move || download(&s, &m, &stop))?;
        }
        Ok(())
    }

    fn spawn(&mut self, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let h = thread::Builder::new()
            .name("load".into())
            .stack_size(STACK)
            .spawn(f)
            .map_err(|e| format!("load thread: {e}"))?;
        self.threads.push(h);
        Ok(())
    }

    /// Stops every load and waits for its threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.socks.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

fn download(mut s: &TcpStream, meter: &Meter, stop: &AtomicBool) {
    let mut buf = vec![0u8; ORIGIN_BUF];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => meter.add(n),
            Err(e) if retry(&e) => {}
            Err(_) => return,
        }
    }
}

fn upload(mut s: &TcpStream, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match s.write(&PAYLOAD) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if retry(&e) => {}
            Err(_) => return,
        }
    }
}

/// Errors after which a load just looks at its stop flag and carries on (a timeout on a throttled
/// tunnel is normal).
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Opens `n` tunnels one after another.
///
/// # Errors
/// The first tunnel that fails to open.
pub fn open_many(route: &Route, target: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    (0..n)
        .map(|i| {
            route
                .open(target)
                .map_err(|e| format!("tunnel {} of {n}: {e}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in cases {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }
}
