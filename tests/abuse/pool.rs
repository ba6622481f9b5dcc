//! The pool of parked threads (`net/pool.rs`, issue 20): tunnels set up one after another and
//! many at once still relay every byte exactly and the live-connection count comes back to 0; a
//! finished tunnel's threads serve the next one instead of new threads being spawned; and a
//! server whose threads are parked still shuts down at once.

use super::process::ServerProcess;
use super::*;
use std::collections::HashSet;
use std::net::Shutdown;
use std::thread;

/// Tunnels opened one after another in the reuse and byte-exact tests.
const SEQUENTIAL: usize = 200;
/// Client threads, and tunnels each opens, in the concurrent test.
const CLIENTS: usize = 16;
const PER_CLIENT: usize = 15;

/// A download of `n` pattern bytes through a fresh tunnel, checked byte for byte.
fn download_exact(proxy: SocketAddr, origin: SocketAddr, n: u64) {
    let mut s = socks5(proxy, "u", "pw", "127.0.0.1", origin.port()).unwrap();
    s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len() as u64, n, "download of {n} bytes came short");
    assert!(is_pattern(&got), "download of {n} bytes corrupted");
}

#[test]
fn pooled_threads_relay_byte_exact_one_after_another_and_many_at_once() {
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let origin = Origin::start();
    for i in 0..SEQUENTIAL {
        let s = socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
        // Sizes from 1 byte to past a pipe's worth, so each reused thread relays differently.
        echo_exact(s, 1 + (i as u64 * 7919) % 300_000);
    }
    thread::scope(|sc| {
        for c in 0..CLIENTS {
            let (proxy, origin) = (srv.addr, origin.addr);
            sc.spawn(move || {
                for k in 0..PER_CLIENT {
                    let n = 1 + ((c * PER_CLIENT + k) as u64 * 104_729) % 500_000;
                    if k % 2 == 0 {
                        download_exact(proxy, origin, n);
                    } else {
                        let s = socks5(proxy, "u", "pw", "127.0.0.1", origin.port()).unwrap();
                        echo_exact(s, n);
                    }
                }
            });
        }
    });
    // Parked threads are not connections: the count is exact again.
    assert_settles(&srv, "after the pooled tunnels");
}

/// The thread ids of a process now.
fn tids(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Opens an echo tunnel, checks one exchange, and returns the server's thread ids sampled while
/// the tunnel is open (both its relay threads exist then); closes it from the client's side
/// first and reads to the end, so the tunnel is over when this returns.
fn tunnel_tids(srv: &ServerProcess, origin: SocketAddr) -> HashSet<u64> {
    let mut s = start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", origin.port()).unwrap());
    assert_echoes(&mut s, b"ping");
    let seen = tids(srv.pid());
    s.shutdown(Shutdown::Write).unwrap();
    let _ = read_all(&mut s);
    seen
}

#[test]
fn sequential_tunnels_reuse_the_same_threads() {
    let dir = TempDir::new("pool-reuse");
    let db = dir.path("users.db");
    make_db(&db, &[("u", "pw", 0)]);
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, &[]);
    let first = tunnel_tids(&srv, origin.addr);
    let mut all = first.clone();
    for _ in 0..SEQUENTIAL {
        all.extend(tunnel_tids(&srv, origin.addr));
    }
    // Spawning two threads per tunnel would show about 400 ids. With parked threads, only the
    // few a tunnel needs while the previous one is still finishing its last line.
    let new = all.len() - first.len();
    assert!(
        new <= 8,
        "{SEQUENTIAL} sequential tunnels used {new} threads beyond the first tunnel's {}: {:?}",
        first.len(),
        srv.thread_names()
    );
    // The last tunnel's threads are done once its end line is written: its relay thread parks
    // and its connection thread goes back to accepting (or parks, past the spare acceptors).
    let parked = |names: &[String]| {
        names.iter().any(|n| n == "parked down")
            && !names
                .iter()
                .any(|n| n.starts_with("conn#") || n.starts_with("down "))
    };
    assert!(
        wait_until(SETTLE, || parked(&srv.thread_names())),
        "no parked threads after the tunnels: {:?}",
        srv.thread_names()
    );
}

#[test]
fn shutdown_with_parked_threads_returns_promptly() {
    let mut srv = TestServer::start(&[("u", "pw", 0)]);
    let origin = Origin::start();
    // Twelve tunnels at once leave a dozen connection threads and relay threads parked.
    thread::scope(|sc| {
        for _ in 0..12 {
            let (proxy, origin) = (srv.addr, origin.addr);
            sc.spawn(move || download_exact(proxy, origin, 10_000));
        }
    });
    assert_settles(&srv, "before the shutdown");
    let h = srv.handle.take().unwrap();
    let (took, ()) = timed(|| h.shutdown());
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with parked threads"
    );
}
