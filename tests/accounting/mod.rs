//! Usage accounting, quotas, connection caps, `sluice stats` and the metrics endpoint (issue 6),
//! end to end: servers (the library's and the `sluice server` binary) on loopback, bytes moved
//! through the origin, and the figures read back from the database, from `sluice stats` and from
//! `/metrics`, `/api/users` and `/`.
//!
//! Byte counts are exact: a tunnel's bytes up are what the client wrote (the origin's command line
//! included) and its bytes down what the client read, once the connection is closed. The
//! Prometheus text is checked by a small validating parser (`support::prometheus`) rather than by
//! looking for substrings, and JSON by a small reader (`support::json`): the crate has no JSON library.
//!
//! `Daemon` (a `sluice` child process) and `http_get` are `pub(crate)`: the TLS suite uses them.

use crate::support::json::Json;
use crate::support::prometheus::{Exposition, parse_prometheus};
use crate::support::*;
use sluice::store::{self, QuotaPeriod, Usage, UserChange};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

const PASS: &str = "pw";
/// How long a test waits for the server's once-a-second flush to show in the database.
const FLUSH_WAIT: Duration = Duration::from_secs(3);
/// The most a relay takes at once: what a connection may overshoot a quota by (issue 6).
const GRANT: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Moving bytes, counted as the client sees them.

/// Bytes one or more tunnels moved: up = what the client wrote, down = what it read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Moved {
    up: u64,
    down: u64,
}

impl std::ops::Add for Moved {
    type Output = Moved;
    fn add(self, o: Moved) -> Moved {
        Moved {
            up: self.up + o.up,
            down: self.down + o.down,
        }
    }
}

/// Downloads `n` pattern bytes through an open tunnel to the origin, checks them, and closes.
fn download(mut s: TcpStream, n: u64) -> Moved {
    let line = format!("SEND {n}\n");
    s.write_all(line.as_bytes()).unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len() as u64, n, "download length");
    assert!(is_pattern(&got), "download corrupted");
    Moved {
        up: line.len() as u64,
        down: n,
    }
}

/// Uploads `n` bytes to the origin's sink, checks the count it answers, and closes.
fn upload(mut s: TcpStream, n: u64) -> Moved {
    s.write_all(b"SINK\n").unwrap();
    s.write_all(&vec![0x5a; n as usize]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let answer = read_all(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        n.to_string(),
        "sink count"
    );
    Moved {
        up: 5 + n,
        down: answer.len() as u64,
    }
}

/// Sends `n` bytes to the origin's echo (small: they fit the socket buffers) and reads them back;
/// leaves the tunnel open.
fn echo_open(s: &mut TcpStream, n: usize) -> Moved {
    let data: Vec<u8> = (0..n as u64).map(pattern).collect();
    s.write_all(b"ECHO\n").unwrap();
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; n];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data, "echo");
    Moved {
        up: 5 + n as u64,
        down: n as u64,
    }
}

/// Echoes `n` bytes and closes the tunnel in order (half-close first).
fn echo(mut s: TcpStream, n: usize) -> Moved {
    let m = echo_open(&mut s, n);
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut s).is_empty(), "echo sent more after EOF");
    m
}

fn tunnel(srv_addr: SocketAddr, user: &str, origin: &Origin) -> TcpStream {
    socks5(srv_addr, user, PASS, "127.0.0.1", origin.addr.port())
        .unwrap_or_else(|c| panic!("socks5 tunnel for {user}: reply {c:#04x}"))
}

/// Waits until the server has no connection threads left (their counting is done).
fn wait_idle(srv: &TestServer) {
    let h = srv.handle.as_ref().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || h.active_connections() == 0),
        "{} connections still open on the server",
        h.active_connections()
    );
}

// ---------------------------------------------------------------------------------------------
// Reading the figures back.

/// The user's usage row, if it has one.
fn usage_of(db: &Path, user: &str) -> Option<Usage> {
    store::open(db, false)
        .unwrap()
        .load_usage()
        .unwrap()
        .into_iter()
        .find(|u| u.username == user)
}

/// Polls the usage row until `ok` holds (at most [`FLUSH_WAIT`]); returns the last row read.
fn wait_usage(db: &Path, user: &str, ok: impl Fn(&Usage) -> bool) -> Usage {
    let mut last = Usage::default();
    wait_until(FLUSH_WAIT, || {
        last = usage_of(db, user).unwrap_or_default();
        ok(&last)
    });
    last
}

fn moved_in(u: &Usage) -> Moved {
    Moved {
        up: u.bytes_up,
        down: u.bytes_down,
    }
}

/// `sluice stats --db DB --json`, parsed.
fn stats_json(db: &Path) -> Vec<Json> {
    let out = sluice(&["stats", "--db", db.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "sluice stats --json: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    match Json::parse(&text) {
        Ok(Json::Arr(v)) => v,
        other => panic!("stats --json is not a JSON array: {other:?}\n{text}"),
    }
}

fn stats_line<'a>(lines: &'a [Json], user: &str) -> &'a Json {
    lines
        .iter()
        .find(|l| l.get("user").and_then(Json::as_str) == Some(user))
        .unwrap_or_else(|| panic!("no {user} in stats --json: {lines:?}"))
}

/// A GET to the metrics endpoint: (status, Content-Type, body). The endpoint answers once and
/// closes; the Content-Length it sends is checked against the body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let raw = read_all(&mut s);
    let text = String::from_utf8(raw).expect("response is not UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of head");
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    if let Some(len) = header("content-length") {
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(body.len()),
            "Content-Length"
        );
    }
    (
        status_code(head),
        header("content-type").unwrap_or_default(),
        body.to_string(),
    )
}

/// `GET /metrics`, checked for status and Content-Type, and validated.
fn scrape(addr: SocketAddr) -> Exposition {
    let (status, ctype, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "Content-Type {ctype:?}"
    );
    parse_prometheus(&body).unwrap_or_else(|e| panic!("not Prometheus text 0.0.4: {e}\n{body}"))
}

fn with_metrics(cfg: &mut sluice::ServerConfig) {
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
}

fn metrics_addr(srv: &TestServer) -> SocketAddr {
    srv.handle.as_ref().unwrap().metrics_addr().unwrap()
}

/// Sets quota and connection cap on a user in the database (the server reads it at start, or
/// within a second when running).
fn set_limits(
    db: impl Into<sluice::store::StoreSpec>,
    user: &str,
    quota: Option<(u64, QuotaPeriod)>,
    max_conns: Option<u64>,
) {
    let change = UserChange {
        quota_bytes: quota.map(|q| q.0),
        quota_period: quota.map(|q| q.1),
        max_connections: max_conns,
        ..UserChange::default()
    };
    store::open(db, false)
        .unwrap()
        .change(user, &change)
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A `sluice` child process.

// ---------------------------------------------------------------------------------------------
// Counters and the flush.

#[test]
fn counters_match_the_bytes_moved_exactly_once_connections_close() {
    let origin = Origin::start();
    // alice is unlimited (the relay's fast path); bob goes through the limiter.
    let srv = TestServer::start(&[("alice", PASS, 0), ("bob", PASS, 4 << 20)]);
    let port = origin.addr.port();
    let mut alice = download(tunnel(srv.addr, "alice", &origin), 100_000);
    alice = alice + upload(tunnel(srv.addr, "alice", &origin), 50_000);
    let connect = http_connect(srv.addr, "alice", PASS, &origin.addr.to_string());
    alice = alice + echo(connect, 30_000);
    // Plain HTTP forwarding: bytes are counted on the origin's side, as for a tunnel: up is the
    // rewritten head the origin received (plus the blank line), down what the origin sent (the
    // client gets a rewritten head, with Via added, and the same body). Since issue 18 the client
    // connection stays open after the response, so the body is read by its length.
    let head = format!(
        "GET http://127.0.0.1:{port}/bytes/7000 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        basic("alice", PASS)
    );
    let (mut s, resp_head) = http_exchange(srv.addr, &head);
    assert_eq!(status_code(&resp_head), 200, "{resp_head}");
    let body = read_body(&mut s, &resp_head);
    assert_eq!(body.len(), 7000);
    drop(s);
    let origin_head = "HTTP/1.1 200 OK\r\nContent-Length: 7000\r\nConnection: close\r\n\r\n";
    alice = alice
        + Moved {
            up: origin.last_head.lock().len() as u64 + 2,
            down: (origin_head.len() + body.len()) as u64,
        };
    let bob = download(tunnel(srv.addr, "bob", &origin), 40_000)
        + download(tunnel(srv.addr, "bob", &origin), 1);
    wait_idle(&srv);

    let a = wait_usage(&srv.db, "alice", |u| moved_in(u) == alice);
    assert_eq!(moved_in(&a), alice, "alice's usage row: {a:?}");
    assert_eq!(a.connections, 4, "alice's connections");
    assert_eq!(a.period_bytes, alice.up + alice.down, "quota count");
    assert!(a.last_seen.is_some(), "last_seen not set: {a:?}");
    let b = wait_usage(&srv.db, "bob", |u| moved_in(u) == bob);
    assert_eq!(moved_in(&b), bob, "bob's usage row: {b:?}");
    assert_eq!(b.connections, 2, "bob's connections");

    let lines = stats_json(&srv.db);
    for (user, m, conns) in [("alice", alice, 4.0), ("bob", bob, 2.0)] {
        let l = stats_line(&lines, user);
        assert_eq!(l.num("bytes_up"), m.up as f64, "{user} in stats: {l:?}");
        assert_eq!(l.num("bytes_down"), m.down as f64, "{user} in stats: {l:?}");
        assert_eq!(l.num("connections"), conns, "{user} in stats: {l:?}");
    }
}

#[test]
fn the_flush_survives_a_restart_and_totals_keep_adding_up() {
    let origin = Origin::start();
    let mut srv = TestServer::start(&[("carol", PASS, 0)]);
    let first = download(tunnel(srv.addr, "carol", &origin), 60_000)
        + upload(tunnel(srv.addr, "carol", &origin), 9_000);
    // A tunnel still open at shutdown: the server closes it and still counts what it moved.
    let mut open = tunnel(srv.addr, "carol", &origin);
    let open_moved = echo_open(&mut open, 1000);
    // No waiting for the periodic flush: shutdown must flush what was counted.
    srv.handle.take().unwrap().shutdown();
    open.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert!(
        read_to_close(&mut open).is_empty(),
        "open tunnel not closed"
    );
    let before = first + open_moved;
    let row = usage_of(&srv.db, "carol").expect("no usage row after shutdown");
    assert_eq!(moved_in(&row), before, "after shutdown: {row:?}");
    assert_eq!(row.connections, 3);

    // A new server on the same database: the totals are still there and keep adding up.
    let cfg = sluice::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: srv.db.clone().into(),
        allow_private: true,
        ..sluice::ServerConfig::default()
    };
    let h = sluice::server::start(&cfg).unwrap();
    let second = download(tunnel(h.local_addr(), "carol", &origin), 25_000);
    let want = before + second;
    let row = wait_usage(&srv.db, "carol", |u| moved_in(u) == want);
    assert_eq!(moved_in(&row), want, "after the restart: {row:?}");
    assert_eq!(row.connections, 4);
    h.shutdown();
    let row = usage_of(&srv.db, "carol").unwrap();
    assert_eq!(
        moved_in(&row),
        want,
        "a second shutdown counted twice: {row:?}"
    );
}

#[test]
fn the_quota_count_survives_a_restart() {
    const QUOTA: u64 = 150_000;
    let origin = Origin::start();
    let mut srv = TestServer::start_with(&[("dave", PASS, 0)], |cfg| {
        set_limits(&cfg.db, "dave", Some((QUOTA, QuotaPeriod::Month)), None);
    });
    let first = download(tunnel(srv.addr, "dave", &origin), 100_000);
    srv.handle.take().unwrap().shutdown();
    let cfg = sluice::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: srv.db.clone().into(),
        allow_private: true,
        ..sluice::ServerConfig::default()
    };
    let h = sluice::server::start(&cfg).unwrap();
    let mut s = tunnel(h.local_addr(), "dave", &origin);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.write_all(b"SEND 200000\n").unwrap();
    let got = read_to_close(&mut s);
    let left = QUOTA - first.up - first.down - 12;
    assert!(is_pattern(&got), "download corrupted");
    assert!(
        got.len() as u64 <= left + GRANT,
        "after a restart dave got {} bytes with {left} of the quota left",
        got.len()
    );
    assert!(got.len() as u64 >= left / 2, "only {} bytes", got.len());
    h.shutdown();
}

/// Issue 18 §4: `user del` then `user add` under the same name is a new account. The old
/// account's connections close, the new one starts at zero usage (none of the old account's
/// counts reach it, no counter goes negative), and its own quota count survives a restart.
#[test]
fn a_deleted_and_re_added_user_is_a_new_account_with_its_own_usage() {
    const QUOTA: u64 = 100_000;
    let origin = Origin::start();
    let mut srv = TestServer::start_with(&[("dz", PASS, 0)], |cfg| {
        set_limits(&cfg.db, "dz", Some((QUOTA, QuotaPeriod::None)), None);
    });
    let mut idle = tunnel(srv.addr, "dz", &origin);
    let old = echo_open(&mut idle, 10) + download(tunnel(srv.addr, "dz", &origin), 60_000);
    let row = wait_usage(&srv.db, "dz", |u| moved_in(u) == old);
    assert_eq!(moved_in(&row), old, "old account not flushed: {row:?}");

    let hash = sluice::auth::hash_password(PASS).unwrap();
    let store = srv.store();
    store.delete("dz").unwrap();
    store.add("dz", &hash, 0).unwrap();
    set_limits(&srv.db, "dz", Some((QUOTA, QuotaPeriod::None)), None);
    idle.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert!(
        read_to_close(&mut idle).is_empty(),
        "the deleted account's tunnel got data"
    );
    // The new account's 90 kB fit its own 100 kB quota, whatever the old one used.
    let port = origin.addr.port();
    let mut s = None;
    wait_until(Duration::from_secs(3), || {
        s = socks5(srv.addr, "dz", PASS, "127.0.0.1", port).ok();
        s.is_some()
    });
    let new = download(s.expect("re-added user refused"), 90_000);
    let row = wait_usage(&srv.db, "dz", |u| moved_in(u) == new);
    assert_eq!(moved_in(&row), new, "the new account's usage: {row:?}");
    assert_eq!(row.period_bytes, new.up + new.down, "{row:?}");
    wait_idle(&srv);

    srv.handle.take().unwrap().shutdown();
    let row = usage_of(&srv.db, "dz").unwrap();
    assert_eq!(moved_in(&row), new, "after shutdown: {row:?}");
    let cfg = sluice::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: srv.db.clone().into(),
        allow_private: true,
        ..sluice::ServerConfig::default()
    };
    let h = sluice::server::start(&cfg).unwrap();
    let mut s = tunnel(h.local_addr(), "dz", &origin);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.write_all(b"SEND 90000\n").unwrap();
    let got = read_to_close(&mut s);
    let left = QUOTA - new.up - new.down - 11;
    assert!(
        got.len() as u64 <= left + GRANT,
        "after a restart the new account got {} bytes with {left} of its quota left",
        got.len()
    );
    h.shutdown();
}

#[test]
fn sigterm_flushes_usage_and_exits_0() {
    let dir = TempDir::new("sigterm");
    let db = dir.path("users.db");
    make_db(&db, &[("erin", PASS, 0)]);
    let origin = Origin::start();
    let mut server = server_process(&db);
    let closed = download(tunnel(server.addr, "erin", &origin), 80_000);
    let mut open = tunnel(server.addr, "erin", &origin);
    let open_moved = echo_open(&mut open, 2000);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    let log = server.rest_of_log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after SIGTERM: {status:?}\n{log:#?}"
    );
    open.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert!(
        read_to_close(&mut open).is_empty(),
        "open tunnel not closed"
    );
    let row = usage_of(&db, "erin").expect("no usage row");
    assert_eq!(moved_in(&row), closed + open_moved, "{row:?}\n{log:#?}");
    assert_eq!(row.connections, 2);
}

#[test]
fn after_kill_9_the_database_is_intact_and_keeps_what_was_flushed() {
    let dir = TempDir::new("kill9");
    let db = dir.path("users.db");
    make_db(&db, &[("finn", PASS, 0)]);
    let origin = Origin::start();
    let mut server = server_process(&db);
    let flushed = download(tunnel(server.addr, "finn", &origin), 50_000);
    let row = wait_usage(&db, "finn", |u| moved_in(u) == flushed);
    assert_eq!(moved_in(&row), flushed, "not flushed within {FLUSH_WAIT:?}");
    let later = download(tunnel(server.addr, "finn", &origin), 30_000);
    server.signal(libc::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let row = usage_of(&db, "finn").expect("usage row lost");
    let m = moved_in(&row);
    let all = flushed + later;
    assert!(
        m.up >= flushed.up && m.down >= flushed.down && m.up <= all.up && m.down <= all.down,
        "after kill -9: {row:?}, flushed {flushed:?} then moved {later:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Quotas and connection caps.

#[test]
fn a_quota_closes_the_connection_and_refuses_new_ones_until_reset_usage() {
    const QUOTA: u64 = 100_000;
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("gus", PASS, 0), ("other", PASS, 0)], |cfg| {
        set_limits(&cfg.db, "gus", Some((QUOTA, QuotaPeriod::None)), None);
    });
    let mut idle = tunnel(srv.addr, "gus", &origin);
    let idle_moved = echo_open(&mut idle, 10);
    let mut s = tunnel(srv.addr, "gus", &origin);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.write_all(b"SEND 1000000\n").unwrap();
    let got = read_to_close(&mut s);
    let left = QUOTA - idle_moved.up - idle_moved.down - 13;
    assert!(is_pattern(&got), "download corrupted");
    assert!(
        got.len() as u64 <= left + GRANT,
        "got {} bytes with {left} of the quota left",
        got.len()
    );
    assert!(got.len() as u64 >= left / 2, "cut off early: {}", got.len());
    // The user's other, idle connection is closed too.
    idle.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert!(read_to_close(&mut idle).is_empty());
    // New connections are refused: SOCKS5 0x02, HTTP 403 saying why.
    let port = origin.addr.port();
    assert_eq!(
        socks5(srv.addr, "gus", PASS, "127.0.0.1", port).err(),
        Some(0x02)
    );
    let target = origin.addr.to_string();
    let (mut c, head) = http_exchange(srv.addr, &connect_head(&target, Some(("gus", PASS))));
    assert_eq!(status_code(&head), 403, "{head}");
    let body = String::from_utf8_lossy(&read_to_close(&mut c)).to_string();
    assert!(body.contains("quota"), "403 without a reason: {body:?}");
    // Another user is not affected.
    download(tunnel(srv.addr, "other", &origin), 1000);

    let out = sluice(&[
        "user",
        "reset-usage",
        "gus",
        "--db",
        srv.db.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let t = Instant::now();
    let mut s = None;
    wait_until(Duration::from_secs(3), || {
        s = socks5(srv.addr, "gus", PASS, "127.0.0.1", port).ok();
        s.is_some()
    });
    let s = s.expect("still refused 3 s after reset-usage");
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "let in again only after {:?}",
        t.elapsed()
    );
    download(s, 20_000);
}

/// A user limited to 2 MiB/s (so every grant comes from the limiter, where the quota is charged)
/// with `quota` bytes set through `sluice user set` on the running server; waits until it applies.
fn limited_user_with_quota(quota: u64) -> TestServer {
    let srv = TestServer::start_with(&[("hal", PASS, 2 << 20)], with_metrics);
    // Logged in once, so `/api/users` lists hal (it lists users that logged in since start).
    drop(tunnel(srv.addr, "hal", &Origin::start()));
    let db = srv.db.to_str().unwrap();
    let q = quota.to_string();
    let out = sluice(&[
        "user",
        "set",
        "hal",
        "--quota",
        &q,
        "--quota-period",
        "month",
        "--db",
        db,
    ]);
    assert!(out.status.success(), "{out:?}");
    let maddr = metrics_addr(&srv);
    let applied = wait_until(Duration::from_secs(3), || {
        let users = Json::parse(&http_get(maddr, "/api/users").2).unwrap();
        users.as_array()[0].num("quota") == quota as f64
    });
    assert!(applied, "the quota did not reach the server");
    srv
}

/// Runs `conns` greedy downloads at once as hal; returns the bytes they moved in all (their
/// command lines included).
fn parallel_downloads(srv: &TestServer, origin: &Origin, conns: u64) -> u64 {
    // All tunnels open before any byte moves, so none is refused for the quota.
    let tunnels: Vec<TcpStream> = (0..conns)
        .map(|_| tunnel(srv.addr, "hal", origin))
        .collect();
    let flows: Vec<_> = tunnels
        .into_iter()
        .map(|mut s| {
            s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
            thread::spawn(move || {
                s.write_all(b"SEND 1000000\n").unwrap();
                let got = read_to_close(&mut s);
                assert!(is_pattern(&got), "download corrupted");
                got.len() as u64
            })
        })
        .collect();
    let down: u64 = flows.into_iter().map(|f| f.join().unwrap()).sum();
    down + conns * 13
}

/// The server's own figures for its users (`/api/users`), for failure messages.
fn server_view(srv: &TestServer) -> String {
    let users = Json::parse(&http_get(metrics_addr(srv), "/api/users").2).unwrap();
    let keys = [
        "bytes_up",
        "bytes_down",
        "quota",
        "quota_used",
        "connections_open",
    ];
    let figures = |u: &Json| keys.map(|k| format!("{k}={}", u.num(k))).join(" ");
    users
        .as_array()
        .iter()
        .map(figures)
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn parallel_connections_do_not_overshoot_the_quota_by_more_than_a_grant_each() {
    const QUOTA: u64 = 300_000;
    const CONNS: u64 = 4;
    let origin = Origin::start();
    let srv = limited_user_with_quota(QUOTA);
    let total = parallel_downloads(&srv, &origin, CONNS);
    assert!(
        total <= QUOTA + CONNS * GRANT,
        "{CONNS} connections moved {total} bytes against a quota of {QUOTA}"
    );
}

// Regression: quota reserved by relays waiting in the limiter used to count as used, so a limited
// user's connections were closed as "quota exhausted" long before the quota (4 downloads: 45 443
// of 300 000 bytes; one echo busy both ways: 526 bytes back), and then let in again.

#[test]
fn limited_parallel_connections_are_not_closed_before_the_quota_is_used() {
    const QUOTA: u64 = 300_000;
    const CONNS: u64 = 4;
    let origin = Origin::start();
    let srv = limited_user_with_quota(QUOTA);
    let total = parallel_downloads(&srv, &origin, CONNS);
    assert!(
        total >= QUOTA * 9 / 10,
        "{CONNS} connections were closed after {total} bytes of a {QUOTA}-byte quota; server: {}",
        server_view(&srv)
    );
    // They were closed because the quota was used up, so a new one is refused.
    let r = socks5(srv.addr, "hal", PASS, "127.0.0.1", origin.addr.port());
    assert_eq!(
        r.err(),
        Some(0x02),
        "closed for the quota, yet let in again"
    );
}

#[test]
fn a_limited_connection_busy_both_ways_is_not_closed_before_the_quota_is_used() {
    const QUOTA: u64 = 300_000;
    let origin = Origin::start();
    let srv = limited_user_with_quota(QUOTA);
    let s = tunnel(srv.addr, "hal", &origin);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let writer = thread::spawn(move || {
        let _ = w.write_all(b"ECHO\n");
        for _ in 0..100 {
            if w.write_all(&[7u8; 4096]).is_err() {
                return;
            }
        }
    });
    let mut r = s;
    let back = read_to_close(&mut r).len() as u64;
    writer.join().unwrap();
    // Each byte echoed counts twice (up and down): about QUOTA / 2 should come back.
    assert!(
        back >= QUOTA / 3,
        "closed after echoing {back} bytes with a {QUOTA}-byte quota; server: {}",
        server_view(&srv)
    );
    let r = socks5(srv.addr, "hal", PASS, "127.0.0.1", origin.addr.port());
    assert_eq!(
        r.err(),
        Some(0x02),
        "closed for the quota, yet let in again"
    );
}

#[test]
fn max_connections_refuses_one_more_while_the_others_keep_working() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("ivy", PASS, 0)], |cfg| {
        set_limits(&cfg.db, "ivy", None, Some(2));
    });
    let port = origin.addr.port();
    let target = origin.addr.to_string();
    let mut a = tunnel(srv.addr, "ivy", &origin);
    let mut b = http_connect(srv.addr, "ivy", PASS, &target);
    for s in [&mut a, &mut b] {
        s.write_all(b"ECHO\n").unwrap();
    }
    assert_eq!(
        socks5(srv.addr, "ivy", PASS, "127.0.0.1", port).err(),
        Some(0x02)
    );
    let (mut c, head) = http_exchange(srv.addr, &connect_head(&target, Some(("ivy", PASS))));
    assert_eq!(status_code(&head), 429, "{head}");
    let body = read_to_close(&mut c);
    assert!(!body.is_empty(), "429 without a reason");
    // The two open tunnels keep working.
    for (s, msg) in [(&mut a, b"ping-a"), (&mut b, b"ping-b")] {
        s.write_all(msg).unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, msg);
    }
    // A slot frees when one closes.
    drop(a);
    let mut s = None;
    wait_until(Duration::from_secs(3), || {
        s = socks5(srv.addr, "ivy", PASS, "127.0.0.1", port).ok();
        s.is_some()
    });
    download(s.expect("no slot after a tunnel closed"), 1000);
}

// ---------------------------------------------------------------------------------------------
// `sluice stats`.

#[test]
fn stats_prints_a_table_and_json_with_the_promised_fields() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("fast", PASS, 0), ("slow", PASS, 16 * 1024)]);
    let fast = download(tunnel(srv.addr, "fast", &origin), 50_000);
    // 12 KiB at 16 KiB/s: the relay waits for tokens most of the time.
    let slow = download(tunnel(srv.addr, "slow", &origin), 12 * 1024);
    let mut open = tunnel(srv.addr, "fast", &origin);
    let fast = fast + echo_open(&mut open, 100);

    let mut lines = Vec::new();
    let ready = wait_until(Duration::from_secs(4), || {
        lines = stats_json(&srv.db);
        let (f, s) = (stats_line(&lines, "fast"), stats_line(&lines, "slow"));
        f.num("connections_open") == 1.0
            && f.num("bytes_down") == fast.down as f64
            && s.num("bytes_down") == slow.down as f64
            && s.num("throttled_seconds") > 0.0
    });
    assert!(ready, "stats --json never showed the traffic: {lines:?}");
    for l in &lines {
        for k in [
            "user",
            "bandwidth",
            "bytes_up",
            "bytes_down",
            "connections_open",
            "throttled_seconds",
        ] {
            assert!(l.get(k).is_some(), "{k} missing in {l:?}");
        }
    }
    let (f, s) = (stats_line(&lines, "fast"), stats_line(&lines, "slow"));
    assert_eq!(f.num("bandwidth"), 0.0);
    assert_eq!(s.num("bandwidth"), 16.0 * 1024.0);
    assert_eq!(f.num("bytes_up"), fast.up as f64);
    assert_eq!(s.num("bytes_up"), slow.up as f64);
    assert_eq!(s.num("connections_open"), 0.0);
    assert_eq!(
        f.num("throttled_seconds"),
        0.0,
        "an unlimited user throttled"
    );

    let out = sluice(&["stats", "--db", srv.db.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let mut rows = table.lines();
    let header = rows.next().unwrap_or_default();
    for col in [
        "USER",
        "BANDWIDTH",
        "QUOTA",
        "UP",
        "DOWN",
        "OPEN",
        "RATE",
        "THROTTLED",
    ] {
        assert!(header.contains(col), "no {col} column: {table}");
    }
    let row = |user: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|w| w.first().map(String::as_str) == Some(user))
            .unwrap_or_else(|| panic!("no row for {user}: {table}"))
    };
    use sluice::units::{format_rate, human_bytes};
    let fr = row("fast");
    assert_eq!(fr[1], format_rate(0), "{table}");
    assert_eq!(fr[2], "-", "no quota: {table}");
    assert_eq!(fr[3], human_bytes(fast.up), "{table}");
    assert_eq!(fr[4], human_bytes(fast.down), "{table}");
    assert_eq!(fr[5], "1", "one connection open: {table}");
    let sr = row("slow");
    assert_eq!(sr[1], format_rate(16 * 1024), "{table}");
    assert_eq!(sr[4], human_bytes(slow.down), "{table}");
    assert!(
        !table.contains("no server has flushed"),
        "a running server's figures called stale: {table}"
    );
}

// ---------------------------------------------------------------------------------------------
// The metrics endpoint.

/// Users with names that need escaping in Prometheus labels, HTML and JSON.
const ODD_USERS: [&str; 3] = ["plain", "o\"dd\\ünï cödé", "<b>&amp;x"];

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[test]
fn metrics_parse_as_prometheus_text_with_every_required_family() {
    let origin = Origin::start();
    let srv = TestServer::start_with(
        &[("alice", PASS, 0), ("slow", PASS, 16 * 1024)],
        with_metrics,
    );
    let alice = download(tunnel(srv.addr, "alice", &origin), 20_000);
    let mut open = tunnel(srv.addr, "alice", &origin);
    let alice = alice + echo_open(&mut open, 100);
    let slow = download(tunnel(srv.addr, "slow", &origin), 8 * 1024);
    assert_eq!(
        socks5(srv.addr, "alice", "wrong", "127.0.0.1", 9).err(),
        Some(0xFF)
    );
    let maddr = metrics_addr(&srv);
    let mut m = scrape(maddr);
    // The download's last bytes are counted just after they are written: allow a moment.
    wait_until(Duration::from_secs(3), || {
        m = scrape(maddr);
        m.get(
            "sluice_user_bytes_total",
            &[("user", "slow"), ("direction", "down")],
        ) == Some(slow.down as f64)
    });

    for (family, kind) in [
        ("sluice_user_bytes_total", "counter"),
        ("sluice_user_connections", "gauge"),
        ("sluice_user_bandwidth_bytes_per_second", "gauge"),
        ("sluice_user_throttled_seconds_total", "counter"),
        ("sluice_connections_total", "counter"),
        ("sluice_auth_failures_total", "counter"),
        ("sluice_limiter_wakeups_total", "counter"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE {family}"
        );
        assert!(m.helps.contains_key(family), "no # HELP for {family}");
        assert!(!m.of(family).is_empty(), "no samples of {family}");
    }
    let build: Vec<_> = m
        .samples
        .iter()
        .filter(|s| s.name.ends_with("build_info"))
        .collect();
    assert_eq!(build.len(), 1, "build info: {build:?}");
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].label("version"), Some(env!("CARGO_PKG_VERSION")));

    // Label sets are exactly as documented.
    for s in m.of("sluice_user_bytes_total") {
        assert_eq!(s.label_names(), ["direction", "user"], "{s:?}");
        assert!(matches!(s.label("direction"), Some("up" | "down")), "{s:?}");
    }
    for f in [
        "sluice_user_connections",
        "sluice_user_bandwidth_bytes_per_second",
        "sluice_user_throttled_seconds_total",
    ] {
        for s in m.of(f) {
            assert_eq!(s.label_names(), ["user"], "{s:?}");
        }
        for u in ["alice", "slow"] {
            assert!(m.get(f, &[("user", u)]).is_some(), "{f} has no {u}");
        }
    }
    for s in m.of("sluice_connections_total") {
        assert_eq!(s.label_names(), ["protocol", "result"], "{s:?}");
    }

    // The values are the traffic the test made.
    let bytes =
        |u: &str, d: &str| m.get("sluice_user_bytes_total", &[("user", u), ("direction", d)]);
    assert_eq!(bytes("alice", "up"), Some(alice.up as f64));
    assert_eq!(bytes("alice", "down"), Some(alice.down as f64));
    assert_eq!(bytes("slow", "up"), Some(slow.up as f64));
    assert_eq!(bytes("slow", "down"), Some(slow.down as f64));
    assert_eq!(
        m.get("sluice_user_connections", &[("user", "alice")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("sluice_user_connections", &[("user", "slow")]),
        Some(0.0)
    );
    let bw = |u: &str| m.get("sluice_user_bandwidth_bytes_per_second", &[("user", u)]);
    assert_eq!(bw("alice"), Some(0.0));
    assert_eq!(bw("slow"), Some(16384.0));
    let throttled = |u: &str| m.get("sluice_user_throttled_seconds_total", &[("user", u)]);
    assert!(throttled("slow").unwrap() > 0.0, "slow not throttled");
    assert_eq!(throttled("alice"), Some(0.0));
    let socks_ok = m.get(
        "sluice_connections_total",
        &[("protocol", "socks5"), ("result", "ok")],
    );
    assert_eq!(socks_ok, Some(3.0));
    let failed = [("protocol", "socks5"), ("result", "auth_failed")];
    assert_eq!(m.get("sluice_connections_total", &failed), Some(1.0));
    assert_eq!(m.get("sluice_auth_failures_total", &[]), Some(1.0));
    assert!(m.get("sluice_limiter_wakeups_total", &[]).unwrap() > 0.0);
    drop(open);
}

#[test]
fn odd_usernames_are_escaped_in_metrics_the_page_and_json() {
    let origin = Origin::start();
    let users: Vec<_> = ODD_USERS.iter().map(|u| (*u, PASS, 0)).collect();
    let srv = TestServer::start_with(&users, with_metrics);
    let moved: Vec<Moved> = ODD_USERS
        .iter()
        .map(|u| download(tunnel(srv.addr, u, &origin), 1000))
        .collect();
    wait_idle(&srv);
    let maddr = metrics_addr(&srv);

    let (_, _, raw) = http_get(maddr, "/metrics");
    assert!(
        raw.contains(r#"sluice_user_bytes_total{user="o\"dd\\ünï cödé",direction="down"} 1000"#),
        "label not escaped as the format says:\n{raw}"
    );
    let m = scrape(maddr);
    for (u, mv) in ODD_USERS.iter().zip(&moved) {
        let up = m.get(
            "sluice_user_bytes_total",
            &[("user", u), ("direction", "up")],
        );
        assert_eq!(up, Some(mv.up as f64), "{u:?} does not round-trip");
    }

    let (status, ctype, page) = http_get(maddr, "/");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(page.contains("<html"), "not an HTML page");
    for u in ODD_USERS {
        assert!(
            page.contains(&html_escape(u)),
            "the page does not name {u:?}"
        );
    }
    assert!(
        !page.contains("<b>&amp;x"),
        "a username went into the page as markup"
    );
    for external in ["src=", "<link", "@import", "url("] {
        assert!(
            !page.contains(external),
            "the page loads something ({external})"
        );
    }

    let (status, ctype, body) = http_get(maddr, "/api/users");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let api = Json::parse(&body).unwrap_or_else(|e| panic!("/api/users: {e}\n{body}"));
    let mut names: Vec<&str> = api
        .as_array()
        .iter()
        .filter_map(|u| u.get("user")?.as_str())
        .collect();
    names.sort_unstable();
    let mut want = ODD_USERS.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "{body}");
    for u in api.as_array() {
        assert_eq!(u.num("bytes_down"), 1000.0, "{u:?}");
    }

    let lines = stats_json(&srv.db);
    for u in ODD_USERS {
        stats_line(&lines, u);
    }
    assert_eq!(http_get(maddr, "/nothing-here").0, 404);
}

#[test]
fn a_slow_scraper_stalls_neither_relays_nor_other_scrapes() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("alice", PASS, 0)], with_metrics);
    let maddr = metrics_addr(&srv);
    // Scrapers that connect and say nothing (the endpoint waits 5 s for them).
    let silent: Vec<TcpStream> = (0..3).map(|_| connect(maddr)).collect();
    // A half-sent request too.
    let mut half = connect(maddr);
    half.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();

    let t = Instant::now();
    download(tunnel(srv.addr, "alice", &origin), 256 * 1024);
    let relay_took = t.elapsed();
    let t = Instant::now();
    let m = scrape(maddr);
    let scrape_took = t.elapsed();
    assert!(
        relay_took < Duration::from_secs(2),
        "relay took {relay_took:?}"
    );
    assert!(
        scrape_took < Duration::from_secs(2),
        "scrape took {scrape_took:?}"
    );
    let down = m.get(
        "sluice_user_bytes_total",
        &[("user", "alice"), ("direction", "down")],
    );
    assert!(down.is_some());
    drop(silent);
}

/// `/metrics`, `/api/users` and the page list the users that logged in since start, not the
/// whole table: a user who never connected is in none of them until it does.
#[test]
fn the_metrics_list_only_users_that_logged_in() {
    let origin = Origin::start();
    let srv = TestServer::start_with(
        &[("alice", PASS, 0), ("bob", PASS, 0), ("carol", PASS, 0)],
        with_metrics,
    );
    let maddr = metrics_addr(&srv);
    let names = || -> Vec<String> {
        let api = Json::parse(&http_get(maddr, "/api/users").2).unwrap();
        let mut v: Vec<String> = api
            .as_array()
            .iter()
            .filter_map(|u| Some(u.get("user")?.as_str()?.to_string()))
            .collect();
        v.sort_unstable();
        v
    };
    assert!(names().is_empty(), "idle users listed: {:?}", names());
    assert!(scrape(maddr).of("sluice_user_connections").is_empty());
    download(tunnel(srv.addr, "alice", &origin), 1000);
    let mut open = tunnel(srv.addr, "carol", &origin);
    echo_open(&mut open, 10);
    assert_eq!(names(), ["alice", "carol"]);
    let m = scrape(maddr);
    assert_eq!(
        m.get("sluice_user_connections", &[("user", "carol")]),
        Some(1.0)
    );
    assert_eq!(m.get("sluice_user_connections", &[("user", "bob")]), None);
    let (_, _, page) = http_get(maddr, "/");
    assert!(page.contains("alice") && !page.contains("<td>bob</td>"));
}
