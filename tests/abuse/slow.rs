//! Slow clients: the handshake deadline (a silent client and one trickling a byte every 300 ms are
//! both closed at it: slowloris) and `--idle-timeout` (a silent relay is closed, one that moves a
//! byte every 300 ms either way is kept).

use super::faults::{Ctx, FaultOrigin};
use super::*;
use std::io::Read;
use std::net::Shutdown;
use std::thread;

/// Time between the bytes of a trickling client.
const TRICKLE: Duration = Duration::from_millis(300);

/// Connects, sends `bytes` one every [`TRICKLE`] until the server closes; returns when it closed
/// (after connecting) and what it answered.
fn trickle_until_closed(addr: SocketAddr, bytes: Vec<u8>) -> (Duration, Vec<u8>) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    let t = Instant::now();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for b in bytes {
            if w.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(TRICKLE);
        }
    });
    let got = read_to_close(&mut s);
    let took = t.elapsed();
    writer.join().unwrap();
    (took, got)
}

fn assert_near_deadline(what: &str, took: Duration) {
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "{what}: closed after {took:?}, handshake deadline 1 s"
    );
}

#[test]
fn silent_and_trickling_clients_are_closed_at_the_handshake_deadline() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| {
        c.handshake_timeout = Duration::from_secs(1)
    });
    let mut socks = vec![5, 1, 2];
    socks.extend_from_slice(&userpass(b"u", b"pw"));
    socks.extend_from_slice(&socks5_request(origin.addr));
    let http = connect_head(&origin.addr.to_string(), Some(("u", "pw"))).into_bytes();
    let addr = srv.addr;
    let clients = [
        ("silent", Vec::new()),
        ("socks5 trickle", socks),
        ("http trickle", http),
    ]
    .map(|(name, bytes)| {
        (
            name,
            thread::spawn(move || trickle_until_closed(addr, bytes)),
        )
    });
    // While they hang on, others are served.
    let mut s = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    s.write_all(b"SEND 100\n").unwrap();
    assert_eq!(read_all(&mut s).len(), 100);
    drop(s);
    for (name, h) in clients {
        let (took, got) = h.join().unwrap();
        assert_near_deadline(name, took);
        // The SOCKS5 client may have been told the method (5 2) before the deadline, no more.
        assert!(got.is_empty() || got == [5, 2], "{name} got {got:?}");
    }
    assert_eq!(origin.connections(), 1, "a slow client reached the origin");
    assert_settles(&srv, "after the slow clients");
}

#[test]
fn an_idle_relay_is_closed_and_one_trickling_either_way_is_kept() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| {
        c.idle_timeout = Duration::from_secs(1)
    });
    let port = origin.addr.port();
    let mut silent = start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap());
    silent.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let idle_from = Instant::now();
    let watch = thread::spawn(move || {
        let got = read_to_close(&mut silent);
        (idle_from.elapsed(), got)
    });

    // One direction only is traffic too: an upload trickled into the origin's sink.
    let mut up = socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap();
    let uploader = thread::spawn(move || {
        up.write_all(b"SINK\n").unwrap();
        for _ in 0..10 {
            thread::sleep(TRICKLE);
            up.write_all(b"x").unwrap();
        }
        up.shutdown(Shutdown::Write).unwrap();
        read_all(&mut up)
    });
    // A byte every 300 ms each way (the echo) for 3 s: three idle timeouts long.
    let mut busy = start_echo(http_connect(srv.addr, "u", "pw", &origin.addr.to_string()));
    for i in 0..10u8 {
        assert_echoes(&mut busy, &[i]);
        thread::sleep(TRICKLE);
    }
    let (took, got) = watch.join().unwrap();
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "the silent relay was closed after {took:?}, idle timeout 1 s"
    );
    assert_echoes(&mut busy, b"still open after 3 s");
    assert_eq!(
        uploader.join().unwrap(),
        b"10",
        "the one-way trickle was cut"
    );

    // Once it stops, the busy one is closed too.
    busy.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let (took, got) = timed(|| read_to_close(&mut busy));
    assert!(got.is_empty() && took < Duration::from_secs(4), "{took:?}");
    assert_settles(&srv, "after the idle timeouts");
}

/// A client that keeps sending but reads nothing while a download piles up: the relay's write
/// toward it stalls, yet bytes move the other way, so the connection is not idle.
#[test]
fn a_stalled_download_is_not_idle_while_the_client_keeps_sending() {
    let origin = FaultOrigin::start(send_and_drain);
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| {
        c.idle_timeout = Duration::from_secs(2)
    });
    let n = DRAINED_DOWNLOAD;
    let mut s = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    // 6 s of a byte every 300 ms upward while nothing is read: the relay's write toward the
    // client blocks all along (before the fix, with a 1 s idle timeout, the server gave up after
    // about 3 s with EAGAIN). The 2 s idle timeout leaves room for a loaded machine's delays.
    for _ in 0..20 {
        thread::sleep(TRICKLE);
        if s.write_all(b".").is_err() {
            break;
        }
    }
    let got = count_pattern_to_close(&mut s);
    assert_eq!(
        got, n,
        "the download was cut after {got} bytes while the client was sending"
    );
}

/// More than every socket buffer on the way can hold (loopback buffers grow to tens of MB).
const DRAINED_DOWNLOAD: u64 = 256 << 20;

/// Sends [`DRAINED_DOWNLOAD`] pattern bytes while reading (and dropping) whatever comes, then
/// closes in order: nothing is left unread, so the close is a FIN, never a RST.
fn send_and_drain(s: TcpStream, _: &Ctx) {
    let mut r = s.try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut w = &s;
    let chunk = 64 * 1024;
    let mut off = 0;
    while off < DRAINED_DOWNLOAD {
        let block: Vec<u8> = (off..off + chunk).map(pattern).collect();
        if w.write_all(&block).is_err() {
            break;
        }
        off += chunk;
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = drain.join();
}

/// Reads until the peer closes, checking the origin's pattern as it goes; returns the count.
fn count_pattern_to_close(s: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return off,
            Ok(k) => {
                for (j, b) in buf[..k].iter().enumerate() {
                    assert_eq!(*b, pattern(off + j as u64), "byte {}", off + j as u64);
                }
                off += k as u64;
            }
        }
    }
}
