//! Faults mid-connection: the destination refuses, resets, hangs or closes halfway; the client
//! resets. Each time the client gets the right reply or a clean close (or a reset), and both relay
//! threads end: the server's connection count returns to 0.

use super::*;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;

/// Bytes a faulty origin sends before it misbehaves.
const FIRST: u64 = 200_000;
/// Longest a hung origin holds a connection (it is also let go when the test ends).
const HANG_LIMIT: Duration = Duration::from_secs(20);

/// What a faulty origin's connection handler sees.
pub struct Ctx {
    /// Bytes received from the server.
    pub received: AtomicU64,
    /// Set when the test is done: hung connections are let go.
    pub stop: AtomicBool,
}

/// A loopback origin whose every connection runs `behave`; counts connections accepted and
/// handlers finished.
pub struct FaultOrigin {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    pub ctx: Arc<Ctx>,
}

impl FaultOrigin {
    pub fn start(behave: fn(TcpStream, &Ctx)) -> FaultOrigin {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let ctx = Arc::new(Ctx {
            received: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let (a, f, c) = (accepted.clone(), finished.clone(), ctx.clone());
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let (f, c) = (f.clone(), c.clone());
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
                    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
                    behave(s, &c);
                    f.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        FaultOrigin {
            addr,
            accepted,
            finished,
            ctx,
        }
    }

    /// Polls until every accepted connection's handler has returned.
    pub fn all_finished(&self) -> bool {
        wait_until(SETTLE, || {
            self.finished.load(Ordering::SeqCst) == self.accepted.load(Ordering::SeqCst)
        })
    }
}

impl Drop for FaultOrigin {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
    }
}

fn pattern_bytes(from: u64, n: usize) -> Vec<u8> {
    (from..from + n as u64).map(pattern).collect()
}

/// Sends [`FIRST`] bytes, lets them arrive, then resets the connection.
pub fn send_then_reset(mut s: TcpStream, _: &Ctx) {
    if s.write_all(&pattern_bytes(0, FIRST as usize)).is_ok() {
        thread::sleep(Duration::from_millis(100));
    }
    reset(s);
}

/// Accepts and does nothing at all (reads nothing, sends nothing, never closes) until the test
/// ends.
pub fn hang(s: TcpStream, ctx: &Ctx) {
    let t = Instant::now();
    while !ctx.stop.load(Ordering::SeqCst) && t.elapsed() < HANG_LIMIT {
        thread::sleep(Duration::from_millis(20));
    }
    drop(s);
}

/// Sends [`FIRST`] bytes and shuts down writing, then counts what arrives until EOF.
pub fn send_then_half_close(mut s: TcpStream, ctx: &Ctx) {
    if s.write_all(&pattern_bytes(0, FIRST as usize)).is_err() {
        return;
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        ctx.received.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// Sends the pattern until a write fails (or 1 GB), reading nothing.
pub fn send_endlessly(mut s: TcpStream, _: &Ctx) {
    let mut off = 0u64;
    while off < 1 << 30 {
        if s.write_all(&pattern_bytes(off, 16 * 1024)).is_err() {
            return;
        }
        off += 16 * 1024;
    }
}

/// A tunnel to `dst` by SOCKS5 (`http` false) or HTTP CONNECT.
fn tunnel(srv: &TestServer, user: &str, dst: SocketAddr, http: bool) -> TcpStream {
    if http {
        http_connect(srv.addr, user, "pw", &dst.to_string())
    } else {
        socks5(srv.addr, user, "pw", "127.0.0.1", dst.port()).unwrap()
    }
}

#[test]
fn a_refusing_destination_answers_0x05_and_502_and_leaves_nothing_open() {
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let port = free_port();
    assert_eq!(
        socks5(srv.addr, "u", "pw", "127.0.0.1", port).err(),
        Some(0x05)
    );
    let (mut s, head) = http_exchange(
        srv.addr,
        &connect_head(&format!("127.0.0.1:{port}"), Some(("u", "pw"))),
    );
    assert_eq!(status_code(&head), 502, "{head:?}");
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    read_to_close(&mut s);
    assert_settles(&srv, "after refused dials");
}

#[test]
fn a_destination_reset_mid_transfer_ends_both_relays() {
    let origin = FaultOrigin::start(send_then_reset);
    let srv = TestServer::start(&[("u", "pw", 0), ("slow", "pw", 64 * 1024)]);
    for (user, http) in [("u", false), ("u", true), ("slow", false)] {
        let mut s = tunnel(&srv, user, origin.addr, http);
        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
        let got = read_to_close(&mut s);
        assert!(
            got.len() as u64 <= FIRST && is_pattern(&got),
            "{user} http={http}"
        );
        if user == "u" {
            assert!(
                !got.is_empty(),
                "nothing arrived before the reset (http={http})"
            );
        }
        assert_settles(
            &srv,
            &format!("after a destination reset ({user}, http={http})"),
        );
    }
}

#[test]
fn a_hung_destination_is_let_go_on_a_client_reset_and_at_the_idle_timeout() {
    let origin = FaultOrigin::start(hang);
    let idle = Duration::from_secs(2);
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| c.idle_timeout = idle);
    for http in [false, true] {
        let mut s = tunnel(&srv, "u", origin.addr, http);
        s.write_all(b"hello?").unwrap();
        thread::sleep(Duration::from_millis(100));
        let (took, ()) = timed(|| {
            reset(s);
            assert_settles(&srv, "after the client reset");
        });
        assert!(
            took < Duration::from_millis(1500),
            "took {took:?}: only the idle timeout ended it"
        );
    }
    // A plain close (FIN) reads as a half-close: the relay waits for the destination's answer,
    // which never comes, so the idle timeout ends it.
    let mut s = tunnel(&srv, "u", origin.addr, false);
    s.write_all(b"hello?").unwrap();
    let t = Instant::now();
    drop(s);
    // Idle is checked on socket timeouts of `idle`, so it is noticed within two of them.
    let ended = wait_until(idle * 3 + SETTLE, || active(&srv) == 0);
    let took = t.elapsed();
    assert!(ended, "the relay to a hung destination never ended");
    assert!(
        took >= idle - Duration::from_millis(300),
        "ended after {took:?}, before the idle timeout"
    );
}

#[test]
fn a_destination_half_close_still_carries_the_clients_bytes() {
    let origin = FaultOrigin::start(send_then_half_close);
    let srv = TestServer::start(&[("u", "pw", 0), ("slow", "pw", 256 * 1024)]);
    let upload = 300_000usize;
    for (i, (user, http)) in [("u", false), ("u", true), ("slow", false)]
        .into_iter()
        .enumerate()
    {
        let mut s = tunnel(&srv, user, origin.addr, http);
        let got = read_all(&mut s);
        assert_eq!(got.len() as u64, FIRST, "{user} http={http}");
        assert!(is_pattern(&got));
        // Its side is closed; ours is still open and carries an upload.
        s.write_all(&vec![1u8; upload]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let want = (upload * (i + 1)) as u64;
        assert!(
            wait_until(SETTLE, || origin.ctx.received.load(Ordering::SeqCst)
                == want),
            "the origin got {} of {want}",
            origin.ctx.received.load(Ordering::SeqCst)
        );
        assert_settles(&srv, &format!("after a half-close ({user}, http={http})"));
    }
    assert!(origin.all_finished());
}

#[test]
fn a_client_reset_mid_transfer_ends_both_relays() {
    let origin = FaultOrigin::start(send_endlessly);
    let sink = Origin::start();
    let srv = TestServer::start(&[("u", "pw", 0), ("slow", "pw", 64 * 1024)]);
    for (user, http) in [("u", false), ("u", true), ("slow", false), ("slow", true)] {
        // Downloading: the reset lands while the relay writes toward the client.
        let mut s = tunnel(&srv, user, origin.addr, http);
        let mut first = vec![0u8; 32 * 1024];
        s.read_exact(&mut first).unwrap();
        assert!(is_pattern(&first));
        reset(s);
        assert_settles(
            &srv,
            &format!("after a reset while downloading ({user}, http={http})"),
        );
        // Uploading: the reset lands while the relay reads from the client.
        let mut s = tunnel(&srv, user, sink.addr, http);
        s.write_all(b"SINK\n").unwrap();
        s.write_all(&[0u8; 100_000]).unwrap();
        reset(s);
        assert_settles(
            &srv,
            &format!("after a reset while uploading ({user}, http={http})"),
        );
    }
    assert!(origin.all_finished(), "the origin's side was never closed");
}
