//! Scenario 14: plain-HTTP forwarding. 1 KiB GETs over 8 keep-alive client connections, each
//! request in absolute form with Basic proxy credentials, against a keep-alive loopback origin:
//! requests per second through Sluice and through squid (Basic auth), beside the direct path.
//! Target (issue 18): Sluice ≥ 1.25 × squid, with no failed response.

use crate::client::{Auth, Route, base64};
use crate::proxies::{PASSWORD, UNLIMITED};
use crate::table::{Samples, Unit, Verdict};
use crate::{Config, Ctx};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const NAME: &str = "14 · plain HTTP, 1 KiB GETs, 8 keep-alive conns";
/// Sluice must serve at least this multiple of squid's requests per second.
const SQUID_FACTOR: f64 = 1.25;
/// Client connections, each with one request in flight at a time.
const CONNS: usize = 8;
/// Response body size.
const BODY: usize = 1024;
/// Longest a client waits for one response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive HTTP/1.1 origin answering every request with a 1 KiB body; a thread per
/// connection. Stops accepting when dropped (the threads end with their connections).
struct Origin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Origin {
    fn start() -> Result<Origin, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("origin: {e}"))?;
        let addr = l.local_addr().map_err(|e| format!("origin: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(s) = s {
                    thread::spawn(move || serve(s));
                }
            }
        });
        Ok(Origin { addr, stop })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Answers each request head (requests carry no body) until the peer closes.
fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    response.resize(response.len() + BODY, b'x');
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = find_head_end(&buf) {
            buf.drain(..end);
            s.write_all(&response)?;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// How a client reaches the origin: straight, or through a proxy with Basic credentials.
#[derive(Clone)]
struct Path {
    name: String,
    proxy: Option<(SocketAddr, Auth)>,
    is_sluice: bool,
}

impl Path {
    fn request(&self, origin: SocketAddr) -> Vec<u8> {
        match &self.proxy {
            None => format!("GET /1k HTTP/1.1\r\nHost: {origin}\r\n\r\n").into_bytes(),
            Some((_, a)) => format!(
                "GET http://{origin}/1k HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: Basic {}\r\n\r\n",
                base64(format!("{}:{}", a.user, a.pass).as_bytes())
            )
            .into_bytes(),
        }
    }

    fn connect(&self, origin: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::connect(self.proxy.as_ref().map_or(origin, |(p, _)| *p))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }
}

/// Reads one response; Ok(true) for a 200 with the whole body, Ok(false) for another status
/// (the connection then is not trusted further).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_head_end(buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let ok = head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200");
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + len);
            return Ok(ok && len == BODY);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Requests per second over the window and failed responses, `CONNS` clients in a closed loop.
fn measure(cfg: &Config, path: &Path, origin: SocketAddr) -> (f64, u64) {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let counting = AtomicBool::new(false);
    let start = Instant::now();
    let open_at = start + cfg.warmup;
    let end = open_at + cfg.tput * 2;
    let req = path.request(origin);
    thread::scope(|sc| {
        for _ in 0..CONNS {
            sc.spawn(|| {
                let mut s: Option<TcpStream> = None;
                let mut buf = Vec::with_capacity(8192);
                while Instant::now() < end {
                    let ok = (|| -> io::Result<bool> {
                        if s.is_none() {
                            buf.clear();
                            s = Some(path.connect(origin)?);
                        }
                        let c = s.as_mut().ok_or(io::ErrorKind::NotConnected)?;
                        c.write_all(&req)?;
                        read_response(c, &mut buf)
                    })();
                    let counted = counting.load(Ordering::Relaxed);
                    match ok {
                        Ok(true) if counted => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(true) => {}
                        _ => {
                            s = None;
                            failed.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            });
        }
        thread::sleep(open_at.saturating_duration_since(Instant::now()));
        counting.store(true, Ordering::Relaxed);
    });
    let window = end.saturating_duration_since(open_at).as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / window.max(1e-3),
        failed.load(Ordering::Relaxed),
    )
}

/// Scenario 14.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let origin = Origin::start()?;
    let server = ctx.server()?;
    let auth = Auth {
        user: UNLIMITED.into(),
        pass: PASSWORD.into(),
    };
    let mut paths = vec![
        Path {
            name: "direct".into(),
            proxy: None,
            is_sluice: false,
        },
        Path {
            name: "sluice (plain http, basic auth)".into(),
            proxy: Some((server.addr, auth)),
            is_sluice: true,
        },
    ];
    let squid = ctx.peers.iter().find(|p| p.name.starts_with("squid"));
    match squid.map(|p| &p.route) {
        Some(Route::Connect { proxy, auth }) => paths.push(Path {
            name: "squid (plain http, basic auth)".into(),
            proxy: Some((*proxy, auth.clone())),
            is_sluice: false,
        }),
        _ => ctx.table.not_run(
            NAME,
            "squid (plain http, basic auth)",
            "squid is not running: `make bench-peers` installs it",
        ),
    }
    let n = paths.len();
    let (mut rate, mut failed) = (vec![Samples::default(); n], vec![0u64; n]);
    for _ in 0..ctx.cfg.runs {
        for (i, p) in paths.iter().enumerate() {
            let (r, f) = measure(&ctx.cfg, p, origin.addr);
            rate[i].push(r);
            failed[i] += f;
        }
    }
    let squid_rate = paths
        .iter()
        .position(|p| p.name.starts_with("squid"))
        .map(|i| rate[i].median());
    for (i, p) in paths.iter().enumerate() {
        let fails = format!("{} failed", failed[i]);
        let (target, verdict) = match (p.is_sluice, squid_rate) {
            (true, Some(sq)) => {
                let ratio = rate[i].median() / sq.max(1e-9);
                (
                    format!(
                        "{ratio:.2} × squid · {fails} · target ≥ {SQUID_FACTOR} × squid, 0 failed"
                    ),
                    Verdict::of(ratio >= SQUID_FACTOR && failed[i] == 0),
                )
            }
            (true, None) => (
                format!("{fails} · no squid to compare with"),
                Verdict::of(failed[i] == 0),
            ),
            (false, _) => (fails, Verdict::Info),
        };
        ctx.table
            .push(NAME, &p.name, rate[i].show(Unit::PerSec), target, verdict);
    }
    ctx.table.note(format!(
        "Plain HTTP (14): {CONNS} client threads, each one keep-alive connection with one request in \
         flight, `GET http://origin/1k` with Basic proxy credentials on every request (origin-form \
         for direct); the origin is in the benchmark process and answers {BODY} bytes with \
         Content-Length. A window of twice the throughput window; a non-200 or broken response \
         counts as failed and its connection is reopened. Sluice logs one access line per request \
         (squid's access_log is off)."
    ));
    Ok(())
}
