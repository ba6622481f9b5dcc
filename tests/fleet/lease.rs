//! One user's one bandwidth across three servers on one Redis (issue 21): fair shares, all of it
//! on one server, uploads, a Redis outage and its recovery, a quota over the fleet, and the lease
//! script itself. Servers run in this process, each with its own SQLite file holding the same
//! users (account ids match), all leasing from one `redis-server` started by the test. Bounds
//! are loose (a noisy 2-core machine); the exact figures are `make bench`'s (scenario 18).

use crate::support::redis::Redis;
use crate::support::{Origin, TestServer, socks5, wait_until};
use sluice::flow::lease::FleetConfig;
use sluice::store::UserChange;
use sluice::store::redis::conn::RedisSpec;
use sluice::store::redis::lease::{LeaseLink, LeaseRequest};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const PERIOD: Duration = Duration::from_millis(75);

/// `n` servers leasing from `redis`, each with `users` in its own database.
fn fleet(redis: &Redis, n: usize, users: &[(&str, &str, u64)]) -> Vec<TestServer> {
    (0..n)
        .map(|i| {
            TestServer::start_with(users, |c| {
                c.fleet = Some(FleetConfig {
                    redis: RedisSpec::parse(&redis.url()).unwrap(),
                    lease_period: PERIOD,
                    server_id: format!("s{i}"),
                    clock_offset_ms: 0,
                });
            })
        })
        .collect()
}

/// Client relays through one server, counting what they move; they stop when the flag is set.
struct Load {
    bytes: Arc<AtomicU64>,
    /// Relays that ended before they were asked to (the server closed them).
    ended: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn new() -> Load {
        Load {
            bytes: Arc::new(AtomicU64::new(0)),
            ended: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// `n` endless downloads as `user` through `proxy`.
    fn downloads(&mut self, n: usize, proxy: SocketAddr, origin: &Origin, user: &str) {
        for _ in 0..n {
            let mut s = socks5(proxy, user, "p", "127.0.0.1", origin.addr.port()).unwrap();
            s.write_all(b"SEND 1000000000000\n").unwrap();
            let (bytes, ended, stop) = (self.bytes.clone(), self.ended.clone(), self.stop.clone());
            self.threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(k) => {
                            bytes.fetch_add(k as u64, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
    }

    /// `n` endless uploads as `user` through `proxy`; the origin counts what arrives.
    fn uploads(&mut self, n: usize, proxy: SocketAddr, origin: &Origin, user: &str) {
        for _ in 0..n {
            let mut s = socks5(proxy, user, "p", "127.0.0.1", origin.addr.port()).unwrap();
            s.write_all(b"SINK\n").unwrap();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let (ended, stop) = (self.ended.clone(), self.stop.clone());
            // Not joined: a write blocked on a throttled relay ends when the servers stop.
            thread::spawn(move || {
                let buf = vec![7u8; 16 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&buf).is_err() {
                        if !stop.load(Ordering::Relaxed) {
                            ended.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                }
            });
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn ended(&self) -> u64 {
        self.ended.load(Ordering::SeqCst)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What each counter moved over `window` (after the load has run for `warm`).
fn measure(counters: &[&dyn Fn() -> u64], warm: Duration, window: Duration) -> Vec<f64> {
    thread::sleep(warm);
    let before: Vec<u64> = counters.iter().map(|c| c()).collect();
    let t = Instant::now();
    thread::sleep(window);
    let secs = t.elapsed().as_secs_f64();
    counters
        .iter()
        .zip(before)
        .map(|(c, b)| (c() - b) as f64 / secs)
        .collect()
}

fn ratio(rates: &[f64], bandwidth: u64) -> f64 {
    rates.iter().sum::<f64>() / bandwidth as f64
}

#[test]
fn three_servers_share_one_bandwidth_and_split_it_fairly() {
    let redis = Redis::start();
    let bw = MIB;
    let servers = fleet(&redis, 3, &[("u", "p", bw)]);
    let origin = Origin::start();
    let mut loads: Vec<Load> = (0..3).map(|_| Load::new()).collect();
    for (l, s) in loads.iter_mut().zip(&servers) {
        l.downloads(4, s.addr, &origin, "u");
    }
    let c: Vec<Box<dyn Fn() -> u64>> = loads
        .iter()
        .map(|l| Box::new(|| l.bytes()) as Box<dyn Fn() -> u64>)
        .collect();
    let refs: Vec<&dyn Fn() -> u64> = c.iter().map(|b| &**b).collect();
    let rates = measure(&refs, Duration::from_secs(1), Duration::from_secs(10));
    let r = ratio(&rates, bw);
    eprintln!("fleet of 3: {r:.3} x, per server {rates:?}");
    assert!(
        (0.9..=1.1).contains(&r),
        "fleet total {r:.3} x the bandwidth (per server {rates:?})"
    );
    let (lo, hi) = (
        rates.iter().copied().fold(f64::MAX, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
    );
    assert!(lo >= hi / 2.0, "unfair shares: {rates:?}");
    assert!(
        servers[0]
            .handle
            .as_ref()
            .unwrap()
            .fleet()
            .unwrap()
            .leases()
            > 0
    );
}

#[test]
fn all_demand_on_one_server_gets_the_whole_bandwidth() {
    let redis = Redis::start();
    let bw = MIB;
    let servers = fleet(&redis, 3, &[("u", "p", bw)]);
    let origin = Origin::start();
    let mut load = Load::new();
    load.downloads(4, servers[1].addr, &origin, "u");
    let rates = measure(
        &[&|| load.bytes()],
        Duration::from_secs(1),
        Duration::from_secs(5),
    );
    let r = ratio(&rates, bw);
    eprintln!("one busy server: {r:.3} x");
    assert!((0.9..=1.1).contains(&r), "one busy server got {r:.3} x");
}

#[test]
fn uploads_and_both_directions_share_one_bandwidth() {
    let redis = Redis::start();
    let bw = MIB;
    let servers = fleet(&redis, 3, &[("u", "p", bw)]);
    let origin = Origin::start();
    let mut load = Load::new();
    for s in &servers {
        load.uploads(2, s.addr, &origin, "u");
    }
    let up = measure(
        &[&|| origin.received.load(Ordering::Relaxed)],
        Duration::from_secs(1),
        Duration::from_secs(5),
    );
    let r = ratio(&up, bw);
    assert!((0.9..=1.1).contains(&r), "uploads: {r:.3} x");
    for s in &servers {
        load.downloads(2, s.addr, &origin, "u");
    }
    let both = measure(
        &[&|| origin.received.load(Ordering::Relaxed), &|| {
            load.bytes()
        }],
        Duration::from_secs(1),
        Duration::from_secs(5),
    );
    let r = ratio(&both, bw);
    eprintln!("uploads {:.3} x; both directions {r:.3} x", ratio(&up, bw));
    assert!(
        (0.9..=1.1).contains(&r),
        "both directions: {r:.3} x ({both:?})"
    );
    assert_eq!(load.ended(), 0, "a relay was closed");
}

#[test]
fn a_redis_outage_keeps_connections_and_the_bound_and_leasing_resumes_with_its_usage() {
    let mut redis = Redis::start();
    let bw = MIB;
    let servers = fleet(&redis, 3, &[("u", "p", bw), ("v", "p", bw)]);
    let origin = Origin::start();
    let mut load = Load::new();
    for s in &servers {
        load.downloads(4, s.addr, &origin, "u");
    }
    // Heartbeats make each server know the other two before the outage.
    let stats: Vec<_> = servers
        .iter()
        .map(|s| s.handle.as_ref().unwrap().fleet().unwrap().clone())
        .collect();
    assert!(wait_until(Duration::from_secs(5), || stats
        .iter()
        .all(|f| f.servers_alive() == 3)));
    thread::sleep(Duration::from_secs(1));
    redis.kill();
    assert!(
        wait_until(Duration::from_secs(3), || stats
            .iter()
            .all(|f| !f.redis_up())),
        "the servers did not notice the outage"
    );
    let rates = measure(
        &[&|| load.bytes()],
        Duration::from_millis(500),
        Duration::from_secs(4),
    );
    let r = ratio(&rates, bw);
    eprintln!("redis down: {r:.3} x");
    assert!(r <= 1.1, "{r:.3} x the bandwidth while redis is down");
    assert!(
        r >= 0.5,
        "the fleet nearly stopped while redis is down: {r:.3} x"
    );
    assert_eq!(load.ended(), 0, "a connection was dropped by the outage");
    // A known user logs in while Redis is down.
    let mut s = socks5(servers[2].addr, "v", "p", "127.0.0.1", origin.addr.port())
        .expect("a login during the outage");
    s.write_all(b"SEND 1000\n").unwrap();
    let mut got = vec![0; 1000];
    s.read_exact(&mut got).unwrap();
    assert!(stats.iter().all(|f| f.fallback() > Duration::from_secs(1)));
    // Back on its files: leasing resumes within a second and the outage's bytes are charged.
    let rounds: Vec<u64> = stats.iter().map(|f| f.rounds()).collect();
    redis.restart();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || stats
            .iter()
            .zip(&rounds)
            .all(|(f, r0)| f.redis_up() && f.rounds() > *r0)),
        "leasing did not resume"
    );
    let took = t.elapsed();
    eprintln!("leasing resumed {took:?} after the restart");
    assert!(
        took <= Duration::from_secs(1),
        "leasing resumed after {took:?}"
    );
    thread::sleep(Duration::from_millis(500));
    let received = load.bytes();
    drop(load);
    let charged: u64 = redis
        .cmd(&["HGET", "sluice:{u}:usage:1", "lease_bytes"])
        .parse()
        .unwrap();
    eprintln!("charged {charged} of {received} bytes received");
    assert!(
        charged as f64 >= 0.9 * received as f64,
        "charged {charged} of {received} bytes: the outage's usage is missing"
    );
}

/// Gives `user` a quota of `quota` bytes in every server's own database (these servers share
/// only their leases through Redis) and waits for their watchers to apply it.
fn set_quota(servers: &[TestServer], user: &str, quota: u64) {
    let change = UserChange {
        quota_bytes: Some(quota),
        ..UserChange::default()
    };
    for s in servers {
        s.store().change(user, &change).unwrap();
    }
    thread::sleep(Duration::from_millis(1500));
}

/// Two downloads of `user` on every server until its quota ends them all; the bytes they got.
fn download_until_stopped(servers: &[TestServer], origin: &Origin, user: &str) -> u64 {
    let mut load = Load::new();
    for s in servers {
        load.downloads(2, s.addr, origin, user);
    }
    let all_ended = wait_until(Duration::from_secs(15), || {
        load.ended() == 2 * servers.len() as u64
    });
    let got = load.bytes();
    assert!(all_ended, "the quota did not stop {user} ({got} bytes)");
    got
}

/// A new connection of `user`, whose quota is used up, is refused (SOCKS5 reply 2).
fn assert_refused(server: &TestServer, origin: &Origin, user: &str) {
    assert_eq!(
        socks5(server.addr, user, "p", "127.0.0.1", origin.addr.port()).err(),
        Some(2),
        "a new connection after the quota is refused"
    );
}

#[test]
fn a_quota_across_three_servers_stops_the_user_within_one_lease_per_server() {
    let redis = Redis::start();
    let bw = 4 * MIB;
    let quota = 10 * MIB;
    let servers = fleet(&redis, 3, &[("q", "p", bw)]);
    set_quota(&servers, "q", quota);
    let origin = Origin::start();
    let got = download_until_stopped(&servers, &origin, "q");
    // One lease per server at most: the rate over three periods (a lease covers at most that).
    let lease = bw * 3 * PERIOD.as_millis() as u64 / 1000;
    eprintln!("quota {quota}: {got} bytes went through");
    assert!(
        got <= quota + 3 * lease,
        "{got} bytes through a {quota}-byte quota"
    );
    assert!(got as f64 >= 0.9 * quota as f64, "stopped early at {got}");
    assert_refused(&servers[0], &origin, "q");
}

/// Issue 21: "a user with a quota leases quota even when its bandwidth is unlimited". Before,
/// an unlimited user held no lease and each server counted the quota alone: three servers let
/// 3 × the quota through.
#[test]
fn an_unlimited_user_with_a_quota_is_stopped_at_the_fleets_quota() {
    let redis = Redis::start();
    let quota = 10 * MIB;
    let servers = fleet(&redis, 3, &[("uq", "p", 0)]);
    set_quota(&servers, "uq", quota);
    let origin = Origin::start();
    // A connection that moved a little and went quiet: its allowance goes back, and its server
    // asks for no more while it stays quiet.
    let mut idle = socks5(servers[0].addr, "uq", "p", "127.0.0.1", origin.addr.port()).unwrap();
    idle.write_all(b"SEND 1000\n").unwrap();
    idle.read_exact(&mut [0; 1000]).unwrap();
    let stats = servers[0].handle.as_ref().unwrap().fleet().unwrap().clone();
    thread::sleep(Duration::from_millis(400));
    let leases = stats.leases();
    thread::sleep(Duration::from_millis(600));
    assert_eq!(stats.leases(), leases, "a quiet user kept leasing");
    let got = download_until_stopped(&servers, &origin, "uq") + 1000;
    eprintln!("unlimited, quota {quota}: {got} bytes went through");
    // Every byte is leased before it moves: at most the quota (1 MiB of slack for a noisy
    // machine), and far from the 3 × quota three servers counting alone let through.
    assert!(
        got <= quota + MIB,
        "{got} bytes through a {quota}-byte quota over the fleet"
    );
    assert!(got as f64 >= 0.9 * quota as f64, "stopped early at {got}");
    let charged: u64 = redis
        .cmd(&["HGET", "sluice:{uq}:usage:1", "lease_bytes"])
        .parse()
        .unwrap();
    assert!(
        charged <= quota,
        "the fleet's count passed the quota: {charged}"
    );
    assert_refused(&servers[1], &origin, "uq");
}

/// Heartbeats are scored with Redis' clock: a server whose own clock is a minute behind is still
/// counted alive by the others (before, its heartbeat looked a minute old and was trimmed).
#[test]
fn a_server_with_a_skewed_clock_is_counted_alive() {
    let redis = Redis::start();
    let servers: Vec<TestServer> = [0, -60_000]
        .into_iter()
        .enumerate()
        .map(|(i, skew)| {
            TestServer::start_with(&[("k", "p", 0)], |c| {
                c.fleet = Some(FleetConfig {
                    redis: RedisSpec::parse(&redis.url()).unwrap(),
                    lease_period: PERIOD,
                    server_id: format!("s{i}"),
                    clock_offset_ms: skew,
                });
            })
        })
        .collect();
    let stats: Vec<_> = servers
        .iter()
        .map(|s| s.handle.as_ref().unwrap().fleet().unwrap().clone())
        .collect();
    let both = wait_until(Duration::from_secs(5), || {
        stats.iter().all(|f| f.servers_alive() == 2)
    });
    let alive: Vec<u64> = stats.iter().map(|f| f.servers_alive()).collect();
    assert!(both, "servers alive as each counts them: {alive:?}");
}

#[test]
fn the_lease_script_splits_the_rate_in_proportion_to_demand() {
    let redis = Redis::start();
    let mut link = LeaseLink::new(
        RedisSpec::parse(&redis.url()).unwrap(),
        Duration::from_secs(2),
    );
    let rate = 1_000_000;
    let req = |demand: u64| LeaseRequest {
        user: "s".into(),
        account_id: 9,
        rate,
        burst: rate / 5,
        demand,
        unused: 0,
        extra: 0,
        quota: 0,
        period_start: 0,
    };
    let mut got = [0u64; 3];
    let t = Instant::now();
    for round in 0..30 {
        if round == 15 {
            // A restarted Redis forgets its scripts: the link loads it again.
            assert_eq!(redis.cmd(&["SCRIPT", "FLUSH"]), "OK");
        }
        for (i, d) in [100_000u64, 100_000, 200_000].iter().enumerate() {
            let r = link
                .round(&format!("s{i}"), PERIOD, &[req(*d)], true)
                .unwrap();
            got[i] += r.grants[0].tokens;
        }
        thread::sleep(PERIOD);
    }
    let secs = t.elapsed().as_secs_f64();
    let total = got.iter().sum::<u64>() as f64;
    assert!(
        total <= rate as f64 * secs + (rate / 5) as f64,
        "leased {total} in {secs:.2} s at {rate} B/s"
    );
    assert!(total >= 0.8 * rate as f64 * secs, "leased only {total}");
    let share = got[2] as f64 / total;
    eprintln!(
        "script: leased {:.3} x the rate, shares {got:?}",
        total / (rate as f64 * secs)
    );
    assert!(
        (0.4..=0.6).contains(&share),
        "twice the demand got {share:.2} of the rate ({got:?})"
    );
    assert!(
        redis
            .cmd(&["HGET", "sluice:{s}:usage:9", "lease_bytes"])
            .parse::<u64>()
            .unwrap()
            >= got.iter().sum::<u64>() - 3 * (rate / 5),
        "leases are charged to the usage hash"
    );
}

/// What a server hands back while it wants nothing goes back to the fleet, not round again to
/// it; and a grant the quota cuts leaves the rest in the fleet bucket.
#[test]
fn the_lease_script_keeps_hand_backs_of_an_idle_server_and_quota_cuts_in_the_bucket() {
    let redis = Redis::start();
    let mut link = LeaseLink::new(
        RedisSpec::parse(&redis.url()).unwrap(),
        Duration::from_secs(2),
    );
    let rate = 1_000_000;
    let req = |demand: u64, unused: u64, quota: u64| LeaseRequest {
        user: "h".into(),
        account_id: 3,
        rate,
        burst: rate / 5,
        demand,
        unused,
        extra: 0,
        quota,
        period_start: 0,
    };
    // The fleet bucket starts empty on Redis' clock: it fills over a lease period.
    link.round("a", PERIOD, &[req(50_000, 0, 0)], false)
        .unwrap();
    thread::sleep(PERIOD);
    let first = link
        .round("a", PERIOD, &[req(50_000, 0, 0)], false)
        .unwrap();
    assert!(first.grants[0].tokens > 0, "{:?}", first.grants);
    let idle = link
        .round("a", PERIOD, &[req(0, first.grants[0].tokens, 0)], false)
        .unwrap();
    assert_eq!(
        idle.grants[0].tokens, 0,
        "an idle server got its hand-back again"
    );
    let tokens = |r: &Redis| {
        r.cmd(&["HGET", "sluice:{h}:bucket", "tokens"])
            .parse::<f64>()
            .unwrap()
    };
    let before = tokens(&redis);
    // The quota has 10 bytes left (used so far: the first grant).
    let used = redis
        .cmd(&["HGET", "sluice:{h}:usage:3", "lease_bytes"])
        .parse::<u64>()
        .unwrap();
    let cut = link
        .round("a", PERIOD, &[req(200_000, 0, used + 10)], false)
        .unwrap();
    assert_eq!(cut.grants[0].tokens, 10);
    assert!(cut.grants[0].exhausted);
    assert!(
        tokens(&redis) >= before - 10.0,
        "the bucket was charged for what the quota refused: {before} -> {}",
        tokens(&redis)
    );
}

/// A capped user's first connection on a server is shared at that server's next lease round
/// (75 ms), not its next heartbeat (500 ms): a login on a second server soon after sees it.
/// Three users in turn, so a heartbeat that happens to fall in the window cannot pass the test
/// for all three (before: about 1 in 6 per user).
#[test]
fn a_capped_users_first_connection_is_counted_by_the_fleet_within_a_lease_period() {
    let redis = Redis::start();
    let names = ["c1", "c2", "c3"];
    let users: Vec<(&str, &str, u64)> = names.iter().map(|n| (*n, "p", 0)).collect();
    let servers = fleet(&redis, 2, &users);
    for s in &servers {
        for n in names {
            s.store()
                .change(
                    n,
                    &UserChange {
                        max_connections: Some(2),
                        ..UserChange::default()
                    },
                )
                .unwrap();
        }
    }
    // The watchers apply the caps within a second.
    thread::sleep(Duration::from_millis(1500));
    let origin = Origin::start();
    let open = |s: &TestServer, u: &str| socks5(s.addr, u, "p", "127.0.0.1", origin.addr.port());
    let window = Duration::from_millis(200);
    for n in names {
        let first = open(&servers[0], n).expect("a first connection");
        thread::sleep(window);
        let second = open(&servers[1], n).expect("the second connection in the fleet");
        thread::sleep(window);
        assert_eq!(
            open(&servers[1], n).err(),
            Some(2),
            "{n}: a third connection in the fleet was admitted {window:?} after the others"
        );
        drop((first, second));
    }
}

#[test]
fn max_connections_hold_across_the_fleet_and_a_dead_servers_are_released() {
    let redis = Redis::start();
    let mut servers = fleet(&redis, 2, &[("c", "p", 0)]);
    for s in &servers {
        s.store()
            .change(
                "c",
                &UserChange {
                    max_connections: Some(4),
                    ..UserChange::default()
                },
            )
            .unwrap();
    }
    let origin = Origin::start();
    let open = |s: &TestServer| socks5(s.addr, "c", "p", "127.0.0.1", origin.addr.port());
    // The watchers apply the cap within a second; then three connections on the first server.
    assert!(wait_until(Duration::from_secs(3), || {
        let (a, b, c, d, e) = (
            open(&servers[0]),
            open(&servers[0]),
            open(&servers[0]),
            open(&servers[0]),
            open(&servers[0]),
        );
        let refused = e.is_err();
        drop((a, b, c, d, e));
        refused
    }));
    thread::sleep(Duration::from_millis(300));
    let held: Vec<_> = (0..3).map(|_| open(&servers[0]).unwrap()).collect();
    // Two heartbeats later the second server counts them: one more fits, a second does not.
    thread::sleep(Duration::from_millis(1500));
    let fourth = open(&servers[1]).expect("the fourth connection in the fleet");
    // The second server built the user's account at that login (accounts exist only for users
    // who logged in); it learns the others' counts at its next heartbeats.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        open(&servers[1]).err(),
        Some(2),
        "a fifth connection in the fleet was admitted"
    );
    // The first server dies: its heartbeat expires and its connections no longer count.
    drop(servers.remove(0));
    drop(held);
    let t = Instant::now();
    let mut again = None;
    assert!(
        wait_until(Duration::from_secs(8), || {
            again = open(&servers[0]).ok();
            again.is_some()
        }),
        "a dead server's connections were never released"
    );
    eprintln!("released {:?} after the server stopped", t.elapsed());
    drop((fourth, again));
}
