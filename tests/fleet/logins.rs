//! The fleet's shared login throttle (issue 21): failed logins spread over two servers on one
//! Redis are counted as one server would count them, and `sluice unban` lifts the blocks on
//! every server.

use crate::support::redis::Redis;
use crate::support::*;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn failures_spread_over_two_servers_block_on_both() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    let port = origin.addr.port();
    let mut c = sluice_command();
    c.env("SLUICE_PASSWORD", "pw")
        .args(["user", "add", "u", "--db", &url]);
    assert!(run_command(c, None).status.success());
    let (a, b) = (
        server_process(Path::new(&url)),
        server_process(Path::new(&url)),
    );
    // 4 wrong passwords on each: fewer than the 5 one server lets through before its first
    // block, 8 over the fleet (blocks of 1, 2, 4 and 8 s).
    for srv in [&a, &b] {
        for i in 0..4 {
            let pass = format!("wrong{i}");
            assert_eq!(
                socks5(srv.addr, "u", &pass, "127.0.0.1", port).err(),
                Some(0xFF)
            );
        }
    }
    let failed = Instant::now();
    // Each server shares and reads back within two of its one-second rounds; the 8 s block
    // outlasts the check (a successful login would clear the count, so it is tried once).
    thread::sleep(Duration::from_millis(2500));
    for (name, srv) in [("a", &a), ("b", &b)] {
        assert_eq!(
            socks5(srv.addr, "u", "pw", "127.0.0.1", port).err(),
            Some(0xFF),
            "server {name} let the right password in {:?} after 8 failures over the fleet",
            failed.elapsed()
        );
    }
    assert!(
        failed.elapsed() < Duration::from_secs(8),
        "too slow to tell"
    );
    assert!(
        redis
            .cmd(&["HGET", "sluice:fail:{127.0.0.1}", "u:u"])
            .parse::<u32>()
            .is_ok_and(|n| n >= 8),
        "the fleet count is not in Redis"
    );

    // `sluice unban` lifts the blocks on both.
    let out = sluice(&["unban", "127.0.0.1", "--db", &url]);
    assert!(out.status.success(), "{out:?}");
    for (name, srv) in [("a", &a), ("b", &b)] {
        assert!(
            wait_until(Duration::from_secs(3), || {
                socks5(srv.addr, "u", "pw", "127.0.0.1", port).is_ok()
            }),
            "server {name} still blocks after sluice unban"
        );
    }
}
