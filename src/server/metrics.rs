//! Live metrics: counters kept by the connection threads, and a small HTTP endpoint serving
//! `GET /metrics` (Prometheus text format 0.0.4), `GET /api/users` (JSON) and `GET /` (a
//! self-contained status page with per-user rates and a minute of sparkline).
//!
//! The endpoint runs on its own threads with short socket timeouts and a cap on concurrent
//! scrapers, and reads only atomics and short locks, so a slow scraper cannot stall a relay.

use crate::auth::Directory;
use crate::flow::account::Account;
use crate::flow::lease::LeaseStats;
use crate::flow::limiter::Limiter;
use crate::net::admission::Full;
use crate::units::format_rate;
use log::{info, warn};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// Most scrapers served at once; more are closed at once. Generous, so a few silent connections
/// cannot lock monitoring out; each costs one small thread until its timeout.
pub const MAX_SCRAPERS: usize = 64;
/// Socket timeout for a scraper: a request is one small head, sent at once.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: usize = 8 * 1024;

/// Server-wide counters.
#[derive(Default)]
pub struct Counters {
    conns: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    auth_failures: AtomicU64,
    /// Connections closed unserved because a handshake cap was full, per source and in all.
    handshakes_refused: [AtomicU64; 2],
}

impl Counters {
    /// Counts one connection's outcome (`ok`, `auth_failed`, `rejected`, `refused`, `dial_failed`).
    pub fn connection(&self, protocol: &'static str, result: &'static str) {
        *self.conns.lock().entry((protocol, result)).or_insert(0) += 1;
    }

    /// Counts a refused login (and the connection it ended).
    pub fn auth_failure(&self, protocol: &'static str) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        self.connection(protocol, "auth_failed");
    }

    /// Refused logins since start.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Counts a connection closed because a handshake cap was full.
    pub fn handshake_refused(&self, cap: Full) {
        self.handshakes_refused[cap as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed because this handshake cap was full, since start.
    pub fn handshakes_refused(&self, cap: Full) -> u64 {
        self.handshakes_refused[cap as usize].load(Ordering::Relaxed)
    }
}

/// What the endpoint reads.
pub struct Sources {
    /// The users.
    pub directory: Arc<Directory>,
    /// For the wake-up counter.
    pub limiter: Arc<Limiter>,
    /// Connection outcomes.
    pub counters: Arc<Counters>,
    /// The fleet lease thread's figures, when in a fleet.
    pub fleet: Option<Arc<LeaseStats>>,
}

/// The fleet's lines: Redis up, round trips, leases, fallback time, servers alive.
fn render_fleet(o: &mut String, f: &LeaseStats) {
    let lines: [(&str, &str, &str, String); 7] = [
        (
            "sluice_fleet_redis_up",
            "gauge",
            "1 while Redis answers the lease round trips.",
            u8::from(f.redis_up()).to_string(),
        ),
        (
            "sluice_fleet_lease_rounds_total",
            "counter",
            "Lease round trips answered.",
            f.rounds().to_string(),
        ),
        (
            "sluice_fleet_lease_round_trip_seconds_total",
            "counter",
            "Time spent in answered lease round trips.",
            format!("{:.6}", f.round_trip_total().as_secs_f64()),
        ),
        (
            "sluice_fleet_lease_round_trip_last_seconds",
            "gauge",
            "The last lease round trip.",
            format!("{:.6}", f.round_trip_last().as_secs_f64()),
        ),
        (
            "sluice_fleet_leases_total",
            "counter",
            "Per-user lease script calls answered.",
            f.leases().to_string(),
        ),
        (
            "sluice_fleet_leased_bytes_total",
            "counter",
            "Bytes leased from the fleet.",
            f.tokens_leased().to_string(),
        ),
        (
            "sluice_fleet_fallback_seconds_total",
            "counter",
            "Time run on rate / servers alive because Redis did not answer.",
            format!("{:.3}", f.fallback().as_secs_f64()),
        ),
    ];
    for (name, kind, help, v) in lines {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        o,
        "sluice_fleet_servers_alive",
        "gauge",
        "Servers with a live heartbeat, last known.",
    );
    let _ = writeln!(o, "sluice_fleet_servers_alive {}", f.servers_alive());
}

/// A per-user gauge or counter: name, type, help, and how to read it.
type PerUser = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Account) -> String,
);

/// Escapes a Prometheus label value: backslash, double quote and newline.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Escapes a JSON string body.
pub fn escape_json(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric in the Prometheus text exposition format, version 0.0.4.
pub fn render_prometheus(src: &Sources) -> String {
    let accounts = src.directory.accounts();
    let mut o = String::with_capacity(1024 + accounts.len() * 512);
    family(&mut o, "sluice_build_info", "gauge", "Build information.");
    let _ = writeln!(
        o,
        "sluice_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let per_user: [PerUser; 4] = [
        (
            "sluice_user_connections",
            "gauge",
            "Connections open now.",
            |a| a.open_connections().to_string(),
        ),
        (
            "sluice_user_bandwidth_bytes_per_second",
            "gauge",
            "Configured bandwidth (0 = unlimited).",
            |a| a.rate().to_string(),
        ),
        (
            "sluice_user_throttled_seconds_total",
            "counter",
            "Time relays waited for tokens.",
            |a| format!("{:.6}", a.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9),
        ),
        (
            "sluice_user_quota_used_bytes",
            "gauge",
            "Bytes counted against the quota this period.",
            |a| a.quota_used().to_string(),
        ),
    ];
    family(
        &mut o,
        "sluice_user_bytes_total",
        "counter",
        "Bytes forwarded since start.",
    );
    for a in &accounts {
        let u = escape_label(&a.name);
        let _ = writeln!(
            o,
            "sluice_user_bytes_total{{user=\"{u}\",direction=\"up\"}} {}",
            a.bytes_up.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "sluice_user_bytes_total{{user=\"{u}\",direction=\"down\"}} {}",
            a.bytes_down.load(Ordering::Relaxed)
        );
    }
    for (name, kind, help, f) in per_user {
        family(&mut o, name, kind, help);
        for a in &accounts {
            let _ = writeln!(o, "{name}{{user=\"{}\"}} {}", escape_label(&a.name), f(a));
        }
    }
    family(
        &mut o,
        "sluice_connections_total",
        "counter",
        "Connections by protocol and outcome.",
    );
    for ((p, r), n) in src.counters.conns.lock().iter() {
        let _ = writeln!(
            o,
            "sluice_connections_total{{protocol=\"{p}\",result=\"{r}\"}} {n}"
        );
    }
    family(
        &mut o,
        "sluice_auth_failures_total",
        "counter",
        "Refused logins.",
    );
    let _ = writeln!(
        o,
        "sluice_auth_failures_total {}",
        src.counters.auth_failures()
    );
    family(
        &mut o,
        "sluice_handshakes_refused_total",
        "counter",
        "Connections closed unserved: a handshake cap (per source or in all) was full.",
    );
    for cap in [Full::Source, Full::All] {
        let _ = writeln!(
            o,
            "sluice_handshakes_refused_total{{cap=\"{}\"}} {}",
            cap.label(),
            src.counters.handshakes_refused(cap)
        );
    }
    family(
        &mut o,
        "sluice_limiter_wakeups_total",
        "counter",
        "Relays woken with a grant.",
    );
    let _ = writeln!(o, "sluice_limiter_wakeups_total {}", src.limiter.wakeups());
    if let Some(f) = &src.fleet {
        render_fleet(&mut o, f);
    }
    o
}

/// The users as JSON for the status page: name, bandwidth, rate, share throttled, connections,
/// quota, and the last minute of rate samples.
pub fn render_json(src: &Sources) -> String {
    let mut o = String::from("[");
    for (i, a) in src.directory.accounts().iter().enumerate() {
        let h = a.history.lock().clone();
        let (rate, thr) = h.back().copied().unwrap_or((0, 0.0));
        let hist: Vec<String> = h.iter().map(|x| x.0.to_string()).collect();
        let _ = write!(
            o,
            "{}{{\"user\":\"{}\",\"bandwidth\":{},\"bandwidth_text\":\"{}\",\"rate\":{rate},\"throttled\":{thr:.3},\"connections_open\":{},\"bytes_up\":{},\"bytes_down\":{},\"quota\":{},\"quota_used\":{},\"history\":[{}]}}",
            if i > 0 { "," } else { "" },
            escape_json(&a.name),
            a.rate(),
            format_rate(a.rate()),
            a.open_connections(),
            a.bytes_up.load(Ordering::Relaxed),
            a.bytes_down.load(Ordering::Relaxed),
            a.quota(),
            a.quota_used(),
            hist.join(",")
        );
    }
    o.push(']');
    o
}

/// Starts the endpoint on `addr`. Returns the bound address and the accept thread.
///
/// # Errors
/// The address cannot be bound or the thread cannot be spawned.
pub fn serve(
    addr: SocketAddr,
    src: Arc<Sources>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, thread::JoinHandle<()>)> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    info!("metrics on http://{local}/metrics, status page on http://{local}/");
    let busy = Arc::new(AtomicUsize::new(0));
    let h = thread::Builder::new()
        .name("metrics".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for s in l.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else {
                    thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if busy.fetch_add(1, Ordering::Relaxed) >= MAX_SCRAPERS {
                    busy.fetch_sub(1, Ordering::Relaxed);
                    continue; // dropped: closes the socket
                }
                let (src, busy2) = (src.clone(), busy.clone());
                let spawned = thread::Builder::new()
                    .name("metrics conn".into())
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        answer(s, &src);
                        busy2.fetch_sub(1, Ordering::Relaxed);
                    });
                if let Err(e) = spawned {
                    busy.fetch_sub(1, Ordering::Relaxed);
                    warn!("metrics: cannot spawn a thread: {e}");
                }
            }
        })?;
    Ok((local, h))
}

fn answer(mut s: TcpStream, src: &Sources) {
    let _ = s.set_read_timeout(Some(SCRAPE_TIMEOUT));
    let _ = s.set_write_timeout(Some(SCRAPE_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST {
            return;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render_prometheus(src),
        ),
        ("GET", "/api/users") => ("200 OK", "application/json", render_json(src)),
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", render_page(src)),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body.as_bytes());
}

/// The status page: plain HTML, inline CSS and script, no external resources.
pub const PAGE: &str = include_str!("status.html");

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The status page with its first rows rendered on the server (readable without script; the
/// script then refreshes them every second).
pub fn render_page(src: &Sources) -> String {
    let mut rows = String::new();
    for a in src.directory.accounts() {
        let (rate, thr) = a.history.lock().back().copied().unwrap_or((0, 0.0));
        let _ = write!(
            rows,
            "<tr><td>{}</td><td class=\"num\">{}/s</td><td></td><td class=\"num\">{}</td><td class=\"num\">{:.0}%</td><td class=\"num\">{}</td><td></td><td></td></tr>",
            escape_html(&a.name),
            crate::units::human_bytes(rate),
            format_rate(a.rate()),
            thr * 100.0,
            a.open_connections()
        );
    }
    PAGE.replace("<!--ROWS-->", &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_json_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_json("a\"b\\\u{1}"), "a\\\"b\\\\\\u0001");
    }

    #[test]
    fn prometheus_text_has_help_and_type_for_every_family() {
        let lim = Limiter::new(Duration::from_millis(10));
        let dir = Directory::new(lim.clone()).unwrap();
        let hash = crate::auth::hash_password("p").unwrap();
        dir.apply(vec![crate::store::UserRow {
            id: 1,
            username: "we\"ird\\user".into(),
            password_hash: hash,
            bandwidth: 1024,
            quota_bytes: 0,
            quota_period: crate::store::QuotaPeriod::None,
            max_connections: 0,
        }]);
        assert!(
            !render_prometheus(&Sources {
                directory: dir.clone(),
                limiter: lim.clone(),
                counters: Arc::new(Counters::default()),
                fleet: None,
            })
            .contains("we\\\"ird"),
            "a user who never logged in is listed"
        );
        assert!(dir.verify(b"we\"ird\\user", b"p").is_some());
        let counters = Arc::new(Counters::default());
        counters.auth_failure("socks5");
        let src = Sources {
            directory: dir,
            limiter: lim,
            counters,
            fleet: Some(Arc::new(LeaseStats::default())),
        };
        let text = render_prometheus(&src);
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line before it");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
            }
        }
        assert!(
            text.contains(r#"sluice_user_bandwidth_bytes_per_second{user="we\"ird\\user"} 1024"#)
        );
        assert!(text.contains("sluice_auth_failures_total 1"));
        assert!(
            text.contains(r#"sluice_connections_total{protocol="socks5",result="auth_failed"} 1"#)
        );
        let page = render_page(&src);
        assert!(
            page.contains("<td>we&quot;ird\\user</td>"),
            "page does not name the user"
        );
        let json = render_json(&src);
        assert!(json.contains(r#""user":"we\"ird\\user""#), "{json}");
    }
}
