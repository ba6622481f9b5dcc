//! The lease thread: each user's one bandwidth across a fleet of servers, through Redis.
//!
//! Every lease period (its own setting, not the refill tick) the thread reads each user's demand
//! from the limiter ([`Limiter::take_demand`]: bytes its relays wait for and moved, and the leased
//! tokens they left), sends one pipelined round trip to Redis (`store/redis/lease.rs`: a lease
//! script call per user, a heartbeat now and then) and hands the grants to the limiter
//! ([`Limiter::grant`]), whose refill thread tops buckets up from them every tick. Neither the
//! refill thread nor a relay ever waits on the network.
//!
//! A quota is one total over the fleet, charged by the lease script as bytes are leased. A user
//! with a quota and unlimited bandwidth leases quota too: its relays take from a quota allowance
//! in its (rate 0) bucket, which the thread tops up each period in chunks sized from the user's
//! recent use ([`quota_ask`], which states the bound). When the fleet has no more to lease and
//! the allowance is spent, the user is stopped as a local quota would stop it.
//!
//! Redis down: the limiter switches to [`Supply::Split`] (each user's rate ÷ the servers alive
//! when last known), the outage is logged once, and bytes moved meanwhile are kept per user; the
//! thread tries Redis again every [`RETRY`], and the first round that succeeds switches back to
//! leases and charges those bytes to the fleet's quota count. Logins never wait on any of this.
//!
//! A user's `max_connections` holds across the fleet: with each heartbeat, and in the round
//! after a capped user's first connection on this server (within a lease period), the thread
//! writes this server's open connections of every capped user and reads the other live servers'
//! counts into the account, which admission checks without waiting (the counts are at most one
//! heartbeat old, so a burst of logins on several servers at once can pass the cap by what
//! arrives within that time).
//!
//! What it leaves to others: the users themselves (the directory, through a lookup function),
//! the Redis commands (`store/redis/lease.rs`), the metrics' rendering (`server/metrics.rs`).

use crate::flow::account::Account;
use crate::flow::limiter::{Demand, Limiter, Supply};
use crate::stop::Stop;
use crate::store::redis::conn::RedisSpec;
use crate::store::redis::lease::{LeaseLink, LeaseRequest, RedisDown};
use crossbeam_channel::{select, tick};
use log::{info, warn};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default lease period: a new server's share arrives within ~75 ms, and each active user
/// costs Redis about 13 script calls a second per server.
pub const DEFAULT_LEASE_PERIOD: Duration = Duration::from_millis(75);
/// The fleet bucket holds at most this many lease periods of the user's rate.
pub const BURST_PERIODS: u64 = 2;
/// While Redis is down, it is tried again this often (so leasing resumes within about this).
pub const RETRY: Duration = Duration::from_millis(250);
/// A heartbeat is sent at least this often (the servers-alive count is read with it). It is
/// stamped with Redis' clock (`TIME`), so servers with skewed clocks still judge each other's
/// liveness alike.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// The least quota allowance an unlimited user's server keeps on hand (bytes): four relay
/// reads, so a slow user's relays do not wait a lease period for each read.
pub const MIN_QUOTA_LEASE: u64 = 256 * 1024;
/// The most quota allowance an unlimited user's server keeps on hand (bytes): 64 MiB is two
/// lease periods of ~430 MiB/s on one server, so a fast user is not slowed below that.
pub const MAX_QUOTA_LEASE: u64 = 64 * 1024 * 1024;
/// Bound on a connect, and on each read and write of a round trip.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// How a server joins a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// The fleet's Redis (the server's `--db redis://…`).
    pub redis: RedisSpec,
    /// How often leases are asked for.
    pub lease_period: Duration,
    /// This server's name in the fleet (unique per server); empty: derived at start from the
    /// host name, the process id and the listening port.
    pub server_id: String,
    /// Milliseconds added to this server's wall clock as the lease thread reads it (0): only
    /// the quota period's start depends on it, not liveness (heartbeats are scored with Redis'
    /// clock). Tests give a server a skewed clock with it.
    pub clock_offset_ms: i64,
}

impl FleetConfig {
    /// A fleet on `redis` with the default period and a derived server id.
    pub fn new(redis: RedisSpec) -> FleetConfig {
        FleetConfig {
            redis,
            lease_period: DEFAULT_LEASE_PERIOD,
            server_id: String::new(),
            clock_offset_ms: 0,
        }
    }
}

/// How much quota an unlimited user's server asks for this round, given its demand: enough
/// to hold twice what its relays moved last period (at least [`MIN_QUOTA_LEASE`], at most
/// [`MAX_QUOTA_LEASE`], never less than what they wait for up to that), less what it holds;
/// nothing while its relays neither wait nor moved a byte (its allowance is being handed back).
/// Sized from recent use, so a fast user's allowance doubles each period until it keeps up.
///
/// The bound it gives, while Redis answers: every byte is leased (and charged to the fleet's
/// quota count) before it moves, and a lease never exceeds what is left of the quota, so the
/// fleet never moves more than the quota (a datagram may pass a server's last allowance by
/// less than one datagram). It may stop short: what the other servers hold when the quota runs
/// out, at most one lease each (≤ [`MAX_QUOTA_LEASE`]), which they use or hand back within a
/// period of going idle. While Redis is down each server counts on its own (the account's
/// quota) and the bytes are charged when it is back.
pub fn quota_ask(d: &Demand) -> u64 {
    if d.queued == 0 && d.moved == 0 {
        return 0;
    }
    let target = d
        .moved
        .saturating_mul(2)
        .max(d.queued)
        .clamp(MIN_QUOTA_LEASE, MAX_QUOTA_LEASE);
    target.saturating_sub(d.held)
}

/// The fleet bucket's depth for `rate` with leases every `period`: [`BURST_PERIODS`] periods.
pub fn fleet_burst(rate: u64, period: Duration) -> u64 {
    let per_period = u128::from(rate) * period.as_nanos() / 1_000_000_000;
    u64::try_from(per_period)
        .unwrap_or(u64::MAX)
        .saturating_mul(BURST_PERIODS)
        .max(1)
}

/// The lease thread's figures, for the metrics.
#[derive(Default)]
pub struct LeaseStats {
    up: AtomicBool,
    rounds: AtomicU64,
    rtt_ns_total: AtomicU64,
    rtt_ns_last: AtomicU64,
    leases: AtomicU64,
    tokens: AtomicU64,
    fallback_ns: AtomicU64,
    alive: AtomicU64,
}

impl LeaseStats {
    /// True while Redis answers.
    pub fn redis_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    /// Round trips that succeeded since start.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }
    /// Total time of those round trips.
    pub fn round_trip_total(&self) -> Duration {
        Duration::from_nanos(self.rtt_ns_total.load(Ordering::Relaxed))
    }
    /// The last round trip's time.
    pub fn round_trip_last(&self) -> Duration {
        Duration::from_nanos(self.rtt_ns_last.load(Ordering::Relaxed))
    }
    /// Lease script calls answered since start.
    pub fn leases(&self) -> u64 {
        self.leases.load(Ordering::Relaxed)
    }
    /// Bytes leased since start.
    pub fn tokens_leased(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
    /// Time spent without leases (Redis down) since start.
    pub fn fallback(&self) -> Duration {
        Duration::from_nanos(self.fallback_ns.load(Ordering::Relaxed))
    }
    /// Servers alive when last known (this one included).
    pub fn servers_alive(&self) -> u64 {
        self.alive.load(Ordering::Relaxed)
    }
}

/// Finds a user's account by name (the directory's, given by the server).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Arc<Account>> + Send + Sync>;
/// The accounts with a connection cap (`max_connections` > 0), whose open connections are
/// shared with the fleet.
pub type Capped = Arc<dyn Fn() -> Vec<Arc<Account>> + Send + Sync>;

/// Starts the lease thread; it ends when `stop` is given. The limiter is switched to leased
/// supply at once (a user gets nothing until the first grant, a period later).
///
/// # Errors
/// The thread could not be spawned.
pub fn spawn(
    config: FleetConfig,
    limiter: Arc<Limiter>,
    lookup: Lookup,
    capped: Capped,
    stats: Arc<LeaseStats>,
    stop: &Stop,
) -> std::io::Result<thread::JoinHandle<()>> {
    let stop = stop.receiver();
    limiter.set_supply(Supply::Leased);
    stats.alive.store(1, Ordering::Relaxed);
    stats.up.store(true, Ordering::Relaxed);
    let period = config.lease_period.max(Duration::from_millis(5));
    let mut leaser = Leaser {
        link: LeaseLink::new(config.redis.clone(), REDIS_TIMEOUT),
        config,
        limiter,
        lookup,
        capped,
        stats,
        carry: HashMap::new(),
        alive: 1,
        last_heartbeat: None,
        down: None,
        last_try: None,
        exhausted: HashMap::new(),
        unreturned: HashMap::new(),
        shared: Vec::new(),
    };
    thread::Builder::new()
        .name("fleet lease".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let ticks = tick(period);
            loop {
                select! {
                    recv(ticks) -> _ => leaser.round(Instant::now()),
                    recv(stop) -> _ => return,
                }
            }
        })
}

/// An outage in progress.
struct Down {
    since: Instant,
    last_round: Instant,
}

struct Leaser {
    config: FleetConfig,
    link: LeaseLink,
    limiter: Arc<Limiter>,
    lookup: Lookup,
    capped: Capped,
    stats: Arc<LeaseStats>,
    /// Bytes moved without a lease (Redis down), per user, not yet charged.
    carry: HashMap<Arc<str>, u64>,
    alive: u64,
    last_heartbeat: Option<Instant>,
    down: Option<Down>,
    last_try: Option<Instant>,
    /// Users told "quota used up" this period start (logged once each).
    exhausted: HashMap<Arc<str>, u64>,
    /// Leased tokens no bucket took (its last connection closed during the round trip, or
    /// Redis was down when the pool was emptied) or a bucket held when it was dropped, per
    /// user: handed back in the next round, since the fleet already charged them to the bucket
    /// and the quota.
    unreturned: HashMap<Arc<str>, u64>,
    /// Users whose connection count this server last wrote as more than 0: a user that left
    /// the capped list (deleted, or no longer capped) gets its count cleared once.
    shared: Vec<String>,
}

impl Leaser {
    fn round(&mut self, now: Instant) {
        for (user, n) in self.limiter.take_left() {
            let u = self.unreturned.entry(user).or_default();
            *u = u.saturating_add(n);
        }
        let demands = self.limiter.take_demand();
        if let Some(d) = &mut self.down {
            for x in &demands {
                let c = self.carry.entry(x.user.clone()).or_default();
                *c = c.saturating_add(x.moved);
                if x.unused > 0 {
                    let u = self.unreturned.entry(x.user.clone()).or_default();
                    *u = u.saturating_add(x.unused);
                }
            }
            let gap = now.saturating_duration_since(d.last_round);
            self.stats
                .fallback_ns
                .fetch_add(nanos(gap), Ordering::Relaxed);
            d.last_round = now;
            if self
                .last_try
                .is_some_and(|t| now.saturating_duration_since(t) < RETRY)
            {
                return;
            }
        }
        let heartbeat = self.down.is_some()
            || self
                .last_heartbeat
                .is_none_or(|t| now.saturating_duration_since(t) >= HEARTBEAT_EVERY);
        // A capped user's first connection here: its count goes out (and the others' come in)
        // this round, not at the next heartbeat; the login did not wait for it.
        let share = heartbeat || self.joined_capped();
        let (requests, accounts) = self.requests(&demands);
        if requests.is_empty() && !share {
            return;
        }
        self.last_try = Some(now);
        let t = Instant::now();
        let result = self.link.round(
            &self.config.server_id,
            self.config.lease_period,
            &requests,
            heartbeat,
        );
        match result {
            Ok(r) => {
                self.back_up(t.elapsed(), now);
                if heartbeat {
                    self.last_heartbeat = Some(now);
                }
                if let Some(a) = r.alive {
                    self.alive = a.max(1);
                    self.stats.alive.store(self.alive, Ordering::Relaxed);
                }
                self.carry.clear();
                for req in &requests {
                    self.unreturned.remove(req.user.as_str());
                }
                for ((req, g), (account, held)) in requests.iter().zip(&r.grants).zip(&accounts) {
                    if !self.limiter.grant(&req.user, g.tokens) && g.tokens > 0 {
                        let u = self.unreturned.entry(account.name.clone()).or_default();
                        *u = u.saturating_add(g.tokens);
                    }
                    self.stats.tokens.fetch_add(g.tokens, Ordering::Relaxed);
                    // An allowance still held is used first (it was charged): the user stops
                    // when it asks again with none.
                    if g.exhausted && g.tokens == 0 && *held == 0 {
                        self.quota_used_up(account, req.period_start);
                    }
                }
                self.stats
                    .leases
                    .fetch_add(requests.len() as u64, Ordering::Relaxed);
                if share {
                    self.share_connections();
                }
            }
            Err(e) => self.went_down(&e, now),
        }
    }

    /// True when a user with a connection cap made its bucket here since the last round (its
    /// first connection on this server).
    fn joined_capped(&self) -> bool {
        self.limiter
            .take_joined()
            .iter()
            .any(|u| (self.lookup)(u).is_some_and(|a| a.max_connections() > 0))
    }

    /// With each heartbeat, and in the round after a capped user's first connection here: this
    /// server's open connections of every capped user out, the other live servers' in
    /// (admission reads them from the account; it never waits on Redis).
    fn share_connections(&mut self) {
        let accounts = (self.capped)();
        let mut counts: Vec<(String, u64)> = accounts
            .iter()
            .map(|a| (a.name.to_string(), a.open_connections() as u64))
            .collect();
        // Users written before that left the list: their count here is cleared (after the
        // accounts, whose replies are read in order).
        for name in &self.shared {
            if !counts.iter().any(|(n, _)| n == name) {
                counts.push((name.clone(), 0));
            }
        }
        match self.link.conns(&self.config.server_id, &counts) {
            Ok(others) => {
                for (a, n) in accounts.iter().zip(others) {
                    a.set_elsewhere(n);
                }
                self.shared = counts
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, _)| name)
                    .collect();
            }
            // The lease round just worked: the supply stays leased; admission keeps the last
            // known counts.
            Err(e) => warn!("fleet: connection counts not shared this round: {e}"),
        }
    }

    /// The lease requests for this round: one per user with demand (an unlimited user's: the
    /// quota allowance it asks for, [`quota_ask`]), and one per user with bytes moved during an
    /// outage not yet charged. With each, its account and the allowance its server still holds.
    fn requests(&self, demands: &[Demand]) -> (Vec<LeaseRequest>, Vec<(Arc<Account>, u64)>) {
        let mut reqs = Vec::with_capacity(demands.len());
        let mut accounts = Vec::with_capacity(demands.len());
        let now_unix = self.unix_ms() / 1000;
        let mut push = |user: &str, rate: u64, demand: u64, unused: u64, held: u64| {
            let Some(a) = (self.lookup)(user) else {
                return;
            };
            reqs.push(LeaseRequest {
                user: user.to_string(),
                account_id: a.id,
                rate,
                burst: fleet_burst(rate, self.config.lease_period),
                demand,
                unused,
                extra: self.carry.get(user).copied().unwrap_or(0),
                quota: a.quota(),
                period_start: a.period().start_of(now_unix),
            });
            accounts.push((a, held));
        };
        let back = |user: &str| self.unreturned.get(user).copied().unwrap_or(0);
        for d in demands {
            // While down, the pool is not drawn (split supply); what it held is handed back.
            let unused = d.unused.saturating_add(back(&d.user));
            if d.rate > 0 {
                push(&d.user, d.rate, d.bytes(), unused, 0);
                continue;
            }
            let ask = quota_ask(d);
            if ask > 0 || unused > 0 || self.carry.get(&d.user).is_some_and(|c| *c > 0) {
                push(&d.user, 0, ask, unused, d.held);
            }
        }
        let others = self.carry.keys().chain(self.unreturned.keys());
        let mut seen: Vec<&Arc<str>> = Vec::new();
        for user in others {
            let owed = self.carry.get(user).copied().unwrap_or(0) > 0 || back(user) > 0;
            if owed && !seen.contains(&user) && !demands.iter().any(|d| d.user == *user) {
                seen.push(user);
                let rate = (self.lookup)(user).map_or(0, |a| a.rate());
                push(user, rate, 0, back(user), 0);
            }
        }
        (reqs, accounts)
    }

    /// This server's wall clock (unix ms), with the configured offset.
    fn unix_ms(&self) -> u64 {
        unix_ms().saturating_add_signed(self.config.clock_offset_ms)
    }

    fn back_up(&mut self, rtt: Duration, now: Instant) {
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rtt_ns_total
            .fetch_add(nanos(rtt), Ordering::Relaxed);
        self.stats.rtt_ns_last.store(nanos(rtt), Ordering::Relaxed);
        if let Some(d) = self.down.take() {
            let moved: u64 = self.carry.values().sum();
            info!(
                "fleet: redis answers again after {:.1} s: leasing resumes; {moved} bytes moved meanwhile are charged",
                now.saturating_duration_since(d.since).as_secs_f64()
            );
            self.limiter.set_supply(Supply::Leased);
        }
        self.stats.up.store(true, Ordering::Relaxed);
    }

    fn went_down(&mut self, e: &RedisDown, now: Instant) {
        self.stats.up.store(false, Ordering::Relaxed);
        if self.down.is_some() {
            return;
        }
        warn!(
            "fleet: {e}: no leases; each user runs at its bandwidth ÷ {} server(s) (last known alive) until redis answers again; logins go on",
            self.alive
        );
        self.down = Some(Down {
            since: now,
            last_round: now,
        });
        self.limiter.set_supply(Supply::Split(self.alive));
    }

    /// The fleet has leased the user's whole quota: no more comes this period. Its open
    /// connections are closed and new ones refused (the account's quota count is full).
    fn quota_used_up(&mut self, a: &Arc<Account>, period_start: u64) {
        a.restart_quota(a.quota());
        a.close_all();
        self.limiter.quota_used_up(&a.name);
        if self.exhausted.insert(a.name.clone(), period_start) != Some(period_start) {
            info!(
                "fleet: {}: quota used up across the fleet; its connections are closed",
                a.name
            );
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::limiter::fallback_rate;

    #[test]
    fn the_fleet_bucket_holds_two_periods() {
        assert_eq!(fleet_burst(1_000_000, Duration::from_millis(75)), 150_000);
        assert_eq!(fleet_burst(1, Duration::from_millis(75)), 1);
        assert_eq!(fleet_burst(u64::MAX, Duration::from_secs(10)), u64::MAX);
    }

    #[test]
    fn an_unlimited_users_quota_ask_follows_its_use_within_bounds() {
        let d = |queued, moved, held| Demand {
            user: Arc::from("u"),
            rate: 0,
            queued,
            moved,
            unused: 0,
            held,
        };
        assert_eq!(quota_ask(&d(0, 0, 0)), 0, "idle: nothing asked");
        assert_eq!(quota_ask(&d(65_536, 0, 0)), MIN_QUOTA_LEASE);
        assert_eq!(quota_ask(&d(0, 1_000_000, 300_000)), 1_700_000);
        assert_eq!(quota_ask(&d(0, 1 << 40, 0)), MAX_QUOTA_LEASE);
        assert_eq!(quota_ask(&d(0, 1000, 1 << 20)), 0, "holding enough");
        assert_eq!(
            quota_ask(&d(1 << 24, 0, 0)),
            1 << 24,
            "what waits, at least"
        );
        assert_eq!(quota_ask(&d(1 << 30, 0, 0)), MAX_QUOTA_LEASE, "but no more");
    }

    #[test]
    fn an_outage_splits_the_rate_over_the_servers_last_known() {
        assert_eq!(fallback_rate(3_000_000, 3), 1_000_000);
        assert_eq!(fallback_rate(3_000_000, 0), 3_000_000, "never divide by 0");
        assert_eq!(
            fallback_rate(2, 3),
            1,
            "a limited user never becomes unlimited"
        );
        assert_eq!(fallback_rate(0, 3), 0);
    }
}
