//! The fleet (issue 21): several servers sharing users, usage and bandwidth through one Redis.
//! Every test starts its own `redis-server` (tests/support/redis.rs) on a free loopback port.

mod logins;
mod store;

use crate::support::redis::Redis;

/// The harness itself: what was written survives a kill and a restart on the same files
/// (`--appendonly yes`), which the outage tests rely on.
#[test]
fn redis_restart_keeps_what_was_written() {
    let mut r = Redis::start();
    assert_eq!(r.cmd(&["SET", "{alice}:probe", "42"]), "OK");
    r.kill();
    assert!(
        r.try_cmd(&["PING"]).is_none(),
        "a killed redis still answers"
    );
    r.restart();
    assert_eq!(r.cmd(&["GET", "{alice}:probe"]), "42");
}

mod lease;
