//! Tunnels that go quiet give back their pipes (issue 20), and a pipe budget too small for any
//! pipe still relays, through buffers. The server runs in its own process (`process.rs`) so its
//! open descriptors can be counted from /proc/PID/fd without the other suites' sockets.

use super::process::ServerProcess;
use crate::support::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

/// The release period the server is given here, instead of 5 s.
const RELEASE_MS: &str = "200";
/// Longest a quiet tunnel may take to be back to its two sockets (many release periods: the
/// machine is shared and slow at times).
const RELEASED_WITHIN: Duration = Duration::from_secs(10);
/// A server's descriptor count wanders by this much on its own (the database, a log).
const NOISE: usize = 1;

/// A tunnel to the origin's echo, through the server.
fn echo_tunnel(srv: &ServerProcess, origin: &Origin) -> TcpStream {
    let mut s = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    s.write_all(b"ECHO\n").unwrap();
    s
}

/// Sends `n` bytes of a pattern of its own through `s` (from another thread, so neither end
/// waits on the other's buffers) and checks that exactly those come back, in order.
fn echo_exact(s: &TcpStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let mut got = vec![0u8; n];
    (&*s).read_exact(&mut got).unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        got == data,
        "the echo of {n} bytes differs from what was sent"
    );
}

/// Keeps `s` moving a few bytes each way every 20 ms (well inside the release period) until
/// `stop`, checking each echo.
fn keep_busy(s: TcpStream, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut i = 0u8;
        while !stop.load(Ordering::Relaxed) {
            echo_exact(&s, 4096, i);
            i = i.wrapping_add(1);
            thread::sleep(Duration::from_millis(20));
        }
    })
}

/// The most descriptors `srv` held over 50 readings 10 ms apart while `s` was kept busy.
fn most_fds_while_busy(s: &TcpStream, srv: &ServerProcess) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_busy(s.try_clone().unwrap(), stop.clone());
    let most = most_of(50, || srv.fds());
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    most
}

/// The most `count` read over `rounds` readings 10 ms apart.
fn most_of(rounds: usize, count: impl Fn() -> usize) -> usize {
    (0..rounds)
        .map(|_| {
            thread::sleep(Duration::from_millis(10));
            count()
        })
        .max()
        .unwrap_or(0)
}

/// A server process with the one user `u` (unlimited) and `args`, and an origin to tunnel to.
fn quiet_server(name: &str, args: &[&str]) -> (TempDir, Origin, ServerProcess) {
    let dir = TempDir::new(name);
    let db = dir.path("users.db");
    make_db(&db, &[("u", "pw", 0)]);
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, args);
    (dir, origin, srv)
}

#[test]
fn a_quiet_tunnel_gives_back_its_pipes_and_still_relays_exactly() {
    let (_dir, origin, srv) = quiet_server("quiet", &["--release-ms", RELEASE_MS]);
    let before = srv.fds();
    let s = echo_tunnel(&srv, &origin);
    echo_exact(&s, 10, 0);
    // The tunnel's two sockets; the pipes its first bytes took are given back once quiet.
    let quiet = before + 2;
    assert!(
        wait_until(RELEASED_WITHIN, || srv.fds() <= quiet + NOISE),
        "a quiet tunnel kept its pipes: {} descriptors, {before} without the tunnel",
        srv.fds()
    );
    // Busy both ways: each direction holds a pipe (two descriptors each).
    let most = most_fds_while_busy(&s, &srv);
    assert!(
        most > quiet + NOISE,
        "a busy tunnel should hold pipes: {most} descriptors busy, {quiet} quiet"
    );
    // Quiet again: back to the sockets alone.
    assert!(
        wait_until(RELEASED_WITHIN, || srv.fds() <= quiet + NOISE),
        "a quiet tunnel kept its pipes: {} descriptors, {quiet} before it moved data",
        srv.fds()
    );
    // And it relays as before, byte for byte both ways, through pipes taken again.
    echo_exact(&s, 3_000_017, 7);
    assert!(
        wait_until(RELEASED_WITHIN, || srv.fds() <= quiet + NOISE),
        "the pipes taken again were kept: {} descriptors, {quiet} quiet",
        srv.fds()
    );
    echo_exact(&s, 1, 9);
}

#[test]
fn with_no_pipe_budget_tunnels_copy_through_buffers() {
    let (_dir, origin, srv) = quiet_server("nopipes", &["--pipe-budget", "1"]);
    let before = srv.fds();
    let s = echo_tunnel(&srv, &origin);
    echo_exact(&s, 10, 0);
    // The tunnel's two sockets and nothing else, even while it moves bytes.
    let open = before + 2;
    let most = most_fds_while_busy(&s, &srv);
    assert!(
        most <= open + NOISE,
        "a pipe was taken past the budget: {most} descriptors busy, {open} before"
    );
    // Both ways byte-exact through buffers, and a download too.
    echo_exact(&s, 2_000_003, 3);
    let got = download_through(&srv, 3_000_000);
    assert_eq!(got.len(), 3_000_000, "byte count");
    assert!(is_pattern(&got), "bytes differ from what the origin sent");
    assert!(
        srv.log_lines("relay pipes may hold 1 descriptors").len() == 1,
        "{}",
        srv.log_text()
    );

    fn download_through(srv: &ServerProcess, n: u64) -> Vec<u8> {
        let origin = Origin::start();
        let mut d = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
        d.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
        read_all(&mut d)
    }
}

/// Pipe descriptors process `pid` holds now.
fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn busy_tunnels_take_pipes_only_up_to_the_budget() {
    // Two pipes' worth; six tunnels echoing at once want twelve.
    let (_dir, origin, srv) = quiet_server("budget", &["--pipe-budget", "4"]);
    let before = pipe_fds(srv.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = (0..6)
        .map(|_| {
            let s = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut s = s;
                s.write_all(b"ECHO\n").unwrap();
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    echo_exact(&s, 65_536, i);
                    i = i.wrapping_add(1);
                }
            })
        })
        .collect();
    let most = most_of(50, || pipe_fds(srv.pid()));
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.join().unwrap();
    }
    assert!(
        most <= before + 4,
        "pipes past the budget of 4 descriptors: {most} pipe descriptors, {before} before"
    );
    assert!(most > before, "no pipe was taken at all: {most}");
}

#[test]
fn a_busy_direction_without_a_pipe_takes_one_once_the_budget_has_room() {
    // One pipe's worth.
    let (_dir, origin, srv) = quiet_server("upgrade", &["--pipe-budget", "2"]);
    let pid = srv.pid();
    let before = pipe_fds(pid);
    // A uploads and holds the one pipe.
    let mut a = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    a.write_all(b"SINK\n").unwrap();
    let stop_a = Arc::new(AtomicBool::new(false));
    let up = {
        let (mut w, stop) = (a.try_clone().unwrap(), stop_a.clone());
        thread::spawn(move || {
            let chunk = vec![7u8; 65_536];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.write_all(&chunk).unwrap();
                sent += chunk.len() as u64;
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        })
    };
    assert!(
        wait_until(RELEASED_WITHIN, || pipe_fds(pid) == before + 2),
        "the upload never took the pipe: {} pipe descriptors, {before} before",
        pipe_fds(pid)
    );
    // B downloads through a buffer: the budget is used up.
    let mut b = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    b.write_all(b"SEND 1000000000000\n").unwrap();
    let stop_b = Arc::new(AtomicBool::new(false));
    let down = {
        let (mut r, stop) = (b.try_clone().unwrap(), stop_b.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut got = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n as u64,
                }
            }
            got
        })
    };
    let most = most_of(30, || pipe_fds(pid));
    assert!(
        most <= before + 2,
        "past the budget: {most}, {before} before"
    );
    // A ends (its relay with it, once the origin's count came back through it): the pipe is free,
    // and B, still downloading, takes it.
    stop_a.store(true, Ordering::Relaxed);
    let sent = up.join().unwrap();
    let reply = String::from_utf8(read_all(&mut a)).unwrap();
    assert_eq!(reply, sent.to_string(), "the upload's byte count");
    drop(a);
    assert!(
        wait_until(RELEASED_WITHIN, || pipe_fds(pid) == before + 2),
        "the download never took the freed pipe: {} pipe descriptors, {before} before",
        pipe_fds(pid)
    );
    stop_b.store(true, Ordering::Relaxed);
    b.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(down.join().unwrap() > 0);
}
