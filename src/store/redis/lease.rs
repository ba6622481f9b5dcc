//! Bandwidth and quota leases from Redis: one user's one bandwidth across a fleet of servers.
//!
//! Each lease period a server sends one pipelined round trip: a heartbeat now and then
//! ([`HEARTBEAT_SCRIPT`], on Redis' clock), and one call of the lease script ([`LEASE_SCRIPT`])
//! per user with relays waiting on this server (or wanting quota: an unlimited user with a
//! quota, below). The script runs
//! a token bucket at the user's rate on Redis' own clock (`TIME`), and gives each server a share
//! of the rate **in proportion to its demand** (what its relays wait for), over the time since
//! that server's last lease. Demand per server is kept in the user's keys and forgotten after
//! three periods, so an idle server's share goes to the busy ones. A server hands back what it
//! did not use (`unused`), so leased tokens never pile up on an idle server; a busy server may
//! take back what it handed back on top of its share (it was its share, late).
//!
//! Quota: one total over the fleet, counted in the user's usage hash (`lease_bytes` for the
//! period starting `lease_period`): every grant is charged when leased, what comes back unused is
//! credited, and bytes a server moved while Redis was down are charged when it is back
//! (`extra`). A grant never exceeds what is left, so the overshoot is at most what servers hold
//! leased at once (one lease per server). A user with unlimited bandwidth (rate 0) leases quota
//! alone: its grant is what its server asks for (`flow/lease.rs`: an allowance sized from its
//! recent use), cut to what is left.
//!
//! Keys (all of one user share the hash tag `{name}`, and the script touches only one user's
//! keys, so it runs unchanged on Redis Cluster, as a function of the store's library:
//! `conn.rs`):
//! - `sluice:{name}:bucket`  hash `tokens`, `t` (µs, Redis time): the fleet bucket
//! - `sluice:{name}:demand`  hash server id → "demand last_lease_µs"
//! - `sluice:{name}:usage:<account id>` hash `lease_period`, `lease_bytes` (the store's usage
//!   hash of that account; these two fields are the lease's)
//! - `sluice:{name}:conns`   hash server id → connections open there (`conns.rs`)
//! - `sluice:{servers}` sorted set server id → last heartbeat (ms, Redis' clock): servers alive
//!
//! The `redis` crate appears only in the store's Redis files; the rest of the program sees the
//! plain structs here. Calls block (a network round trip) and are made only by the lease thread.

use super::conn::{Call, Conn, Function, RedisSpec};
use super::library;
use redis::Value;
use std::fmt;
use std::time::Duration;

/// The lease script. KEYS: bucket, demand, usage. ARGV: server id, rate (B/s), burst (B),
/// demand (B), lease period (µs), unused (B), extra (B), quota (B, 0 = none), quota period start.
/// Returns {grant, exhausted (0/1), fleet demand}.
pub const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local server = ARGV[1]
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local demand = tonumber(ARGV[4])
local period = tonumber(ARGV[5])
local unused = tonumber(ARGV[6])
local extra = tonumber(ARGV[7])
local quota = tonumber(ARGV[8])
local pstart = ARGV[9]
local fresh = 3 * period
local u = redis.call('HMGET', KEYS[3], 'lease_period', 'lease_bytes')
local used = 0
if u[1] == pstart then used = tonumber(u[2]) or 0 end
used = math.max(0, used + extra - unused)
local total = demand
local mine = nil
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local d, last = string.match(all[i + 1], '^(%d+) (%d+)$')
  d = tonumber(d) or 0
  last = tonumber(last) or 0
  if all[i] == server then
    mine = last
  elseif now - last <= fresh then
    total = total + d
  else
    redis.call('HDEL', KEYS[2], all[i])
  end
end
local elapsed = period
if mine then elapsed = math.min(math.max(now - mine, 0), fresh) end
local left = nil
if quota > 0 then left = math.max(quota - used, 0) end
local exhausted = 0
local grant = demand
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 't')
  local tokens = tonumber(b[1]) or 0
  local last = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + rate * math.max(now - last, 0) / 1000000 + unused)
  local share = 0
  if total > 0 then share = demand / total end
  -- What a server handed back comes back to it only while it still wants bytes.
  local back = 0
  if demand > 0 then back = unused end
  grant = math.floor(math.min(tokens, rate * elapsed / 1000000 * share + back))
  -- Cut to the quota before the bucket is charged, so what the quota refuses stays there.
  if left and grant >= left then
    grant = left
    exhausted = 1
  end
  tokens = tokens - grant
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.3f', tokens), 't', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], 60000)
elseif left and grant >= left then
  grant = left
  exhausted = 1
end
used = used + grant
redis.call('HSET', KEYS[3], 'lease_period', pstart, 'lease_bytes', string.format('%d', used))
if demand > 0 then
  redis.call('HSET', KEYS[2], server, string.format('%d %d', demand, now))
else
  redis.call('HDEL', KEYS[2], server)
end
redis.call('PEXPIRE', KEYS[2], math.floor(fresh / 1000) + 1000)
return {grant, exhausted, total}
";

/// [`LEASE_SCRIPT`] in the store's library (`EVALSHA` on one Redis, `FCALL` on a cluster).
pub static LEASE: Function = Function {
    name: "lease",
    body: LEASE_SCRIPT,
    eval_on_one: false,
};

/// The heartbeat script. KEYS: the servers-alive set. ARGV: server id, [`HEARTBEAT_TTL`] (ms).
/// Scores the server with Redis' clock (`TIME`, ms), so servers whose own clocks differ still
/// judge each other's liveness alike; trims heartbeats older than the TTL and returns how many
/// servers are left (this one included).
pub const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
return redis.call('ZCARD', KEYS[1])
";

/// [`HEARTBEAT_SCRIPT`] in the store's library (`EVAL` on one Redis, `FCALL` on a cluster).
pub static HEARTBEAT: Function = Function {
    name: "heartbeat",
    body: HEARTBEAT_SCRIPT,
    eval_on_one: true,
};

/// The live-servers script. KEYS: the servers-alive set. ARGV: [`HEARTBEAT_TTL`] (ms). Returns
/// the ids of the servers whose heartbeat is younger than the TTL on Redis' clock.
pub const LIVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
";

/// [`LIVE_SCRIPT`] in the store's library (`EVAL` on one Redis, `FCALL` on a cluster).
pub static LIVE_SERVERS: Function = Function {
    name: "live_servers",
    body: LIVE_SCRIPT,
    eval_on_one: true,
};

/// [`HEARTBEAT_TTL`] in ms, as the scripts take it.
pub(super) fn ttl_ms() -> u64 {
    u64::try_from(HEARTBEAT_TTL.as_millis()).unwrap_or(u64::MAX)
}

/// The servers-alive sorted set (its own hash tag: one slot on a Cluster).
pub const SERVERS_KEY: &str = "sluice:{servers}";

/// A heartbeat older than this on Redis' clock marks a server dead (its share of fallback and
/// its connection counts are let go).
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

/// What one server asks for one user in one lease round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The user's name (its keys' hash tag).
    pub user: String,
    /// The account id its usage hash is keyed by.
    pub account_id: u64,
    /// The user's bandwidth (bytes per second; 0 = unlimited: only the quota is leased).
    pub rate: u64,
    /// The fleet bucket's depth in bytes.
    pub burst: u64,
    /// Bytes this server's relays wait for (queued asks plus what they moved last period).
    pub demand: u64,
    /// Leased bytes this server did not use and hands back.
    pub unused: u64,
    /// Bytes this server moved without a lease (while Redis was down), charged to the quota.
    pub extra: u64,
    /// The quota in bytes per period (0 = none).
    pub quota: u64,
    /// Start of the current quota period (unix seconds).
    pub period_start: u64,
}

/// What the fleet granted one user on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseGrant {
    /// Bytes this server may move for the user.
    pub tokens: u64,
    /// The quota is leased out to its end: no more will come this period.
    pub exhausted: bool,
    /// The demand of all servers for this user (bytes), for metrics.
    pub fleet_demand: u64,
}

/// What one round trip brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRound {
    /// One grant per request, in order.
    pub grants: Vec<LeaseGrant>,
    /// Servers with a heartbeat younger than [`HEARTBEAT_TTL`] (this one included), when the
    /// round carried a heartbeat.
    pub alive: Option<u64>,
}

/// Redis could not be reached or answered with an error (one line, no password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisDown(pub String);

impl fmt::Display for RedisDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis: {}", self.0)
    }
}

impl From<redis::ParsingError> for RedisDown {
    fn from(e: redis::ParsingError) -> RedisDown {
        RedisDown(format!("unexpected reply: {e}").to_lowercase())
    }
}

impl From<redis::RedisError> for RedisDown {
    fn from(e: redis::RedisError) -> RedisDown {
        RedisDown(e.to_string().to_lowercase())
    }
}

/// Opens a connection to `url` with `timeout` for the connect and for every read and write,
/// so a stalled Redis costs a lease round at most that long. Blocking.
///
/// # Errors
/// A URL that is not `redis://…`/`rediss://…`, or a server that does not answer in time.
pub fn connect(spec: &RedisSpec, timeout: Duration) -> Result<Conn, RedisDown> {
    spec.connect_within(timeout, timeout)
        .map_err(|e| RedisDown(e.to_string()))
}

/// The SHA1 of [`LEASE_SCRIPT`] (what `EVALSHA` names).
pub fn script_sha() -> String {
    redis::Script::new(LEASE_SCRIPT).get_hash().to_string()
}

/// Loads the store's scripts (after a connect): the lease script on one Redis, the function
/// library on every master of a cluster. Blocking.
///
/// # Errors
/// Redis unreachable or refusing the scripts (a cluster of Redis before 7 has no functions).
pub fn load_scripts(con: &mut Conn) -> Result<(), RedisDown> {
    con.load(library()).map_err(|e| {
        if con.is_cluster() {
            RedisDown(
                format!(
                    "cannot load the function library {} (Redis Cluster needs Redis 7 or later): {e}",
                    library().name()
                )
                .to_lowercase(),
            )
        } else {
            RedisDown::from(e)
        }
    })
}

/// The keys of `user`'s lease: bucket, demand, usage of `account_id`.
pub fn lease_keys(user: &str, account_id: u64) -> [String; 3] {
    [
        format!("sluice:{{{user}}}:bucket"),
        format!("sluice:{{{user}}}:demand"),
        format!("sluice:{{{user}}}:usage:{account_id}"),
    ]
}

/// One lease round: a heartbeat for `server` (when `heartbeat` is set; scored with Redis' clock,
/// [`HEARTBEAT_SCRIPT`]) and one lease script call per request, in one pipelined round trip.
/// When Redis does not have the scripts (a restarted Redis, a flushed library, a master added
/// later), loads them and sends again what failed, and the heartbeat ([`Conn::batch_scripts`]).
/// A lease that ran on a master that had the library while another did not has its reply lost:
/// it counts as no grant here (its tokens stay charged: the fleet moves less, once, never more).
/// Blocking.
///
/// # Errors
/// Redis unreachable, timed out, or answering with an error.
pub fn lease_round(
    con: &mut Conn,
    server: &str,
    period: Duration,
    requests: &[LeaseRequest],
    heartbeat: bool,
) -> Result<LeaseRound, RedisDown> {
    let lib = library();
    let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX);
    let mut calls: Vec<Call> = Vec::new();
    if heartbeat {
        let mut beat = con.call(lib, &HEARTBEAT, &[SERVERS_KEY.to_string()]);
        beat.arg(server).arg(ttl_ms());
        calls.push(Call::again(beat));
    }
    for r in requests {
        let mut c = con.call(lib, &LEASE, &lease_keys(&r.user, r.account_id));
        c.arg(server)
            .arg(r.rate)
            .arg(r.burst)
            .arg(r.demand)
            .arg(period_us)
            .arg(r.unused)
            .arg(r.extra)
            .arg(r.quota)
            .arg(r.period_start);
        calls.push(Call::once(c));
    }
    if calls.is_empty() {
        return Ok(LeaseRound {
            grants: Vec::new(),
            alive: None,
        });
    }
    let values = con.batch_scripts(lib, &calls)?;
    let mut it = values.into_iter();
    let alive = if heartbeat {
        Some(int(it.next().flatten())?)
    } else {
        None
    };
    let grants = it
        .map(|v| v.map_or(Ok(LeaseGrant::default()), grant_of))
        .collect::<Result<Vec<_>, _>>()?;
    if grants.len() != requests.len() {
        return Err(RedisDown(format!(
            "expected {} lease replies, got {}",
            requests.len(),
            grants.len()
        )));
    }
    Ok(LeaseRound { grants, alive })
}

fn int(v: Option<Value>) -> Result<u64, RedisDown> {
    match v {
        Some(Value::Int(n)) => Ok(u64::try_from(n).unwrap_or(0)),
        other => Err(RedisDown(format!(
            "expected an integer reply, got {other:?}"
        ))),
    }
}

fn grant_of(v: Value) -> Result<LeaseGrant, RedisDown> {
    match v {
        Value::Array(items) if items.len() == 3 => {
            let mut it = items.into_iter();
            Ok(LeaseGrant {
                tokens: int(it.next())?,
                exhausted: int(it.next())? != 0,
                fleet_demand: int(it.next())?,
            })
        }
        Value::ServerError(e) => Err(RedisDown(format!("lease script: {e:?}").to_lowercase())),
        other => Err(RedisDown(format!(
            "expected a lease reply {{grant, exhausted, demand}}, got {other:?}"
        ))),
    }
}

/// A lease connection that opens itself when needed and lets go of itself after an error, so
/// the lease thread names no type of the `redis` crate.
pub struct LeaseLink {
    spec: RedisSpec,
    timeout: Duration,
    con: Option<Conn>,
}

impl LeaseLink {
    /// A link to `url` (not yet connected); `timeout` bounds the connect and every read and
    /// write.
    pub fn new(spec: RedisSpec, timeout: Duration) -> LeaseLink {
        LeaseLink {
            spec,
            timeout,
            con: None,
        }
    }

    /// True while a connection is open (the last round trip succeeded).
    pub fn is_connected(&self) -> bool {
        self.con.is_some()
    }

    /// [`lease_round`] over this link, connecting (and loading the script) first if needed.
    /// After an error the connection is dropped; the next call connects again. Blocking.
    ///
    /// # Errors
    /// As [`connect`] and [`lease_round`].
    pub fn round(
        &mut self,
        server: &str,
        period: Duration,
        requests: &[LeaseRequest],
        heartbeat: bool,
    ) -> Result<LeaseRound, RedisDown> {
        let r = lease_round(self.connection()?, server, period, requests, heartbeat);
        if r.is_err() {
            self.con = None;
        }
        r
    }

    /// The open connection, opened (and the script loaded) first if there is none.
    pub(super) fn connection(&mut self) -> Result<&mut Conn, RedisDown> {
        if self.con.is_none() {
            let mut con = connect(&self.spec, self.timeout)?;
            load_scripts(&mut con)?;
            self.con = Some(con);
        }
        self.con
            .as_mut()
            .ok_or_else(|| RedisDown("not connected".into()))
    }

    /// Lets go of the connection after an error (the next call connects again).
    pub(super) fn reset(&mut self) {
        self.con = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_user_shares_its_hash_tag() {
        for k in lease_keys("alice", 7) {
            assert!(k.contains("{alice}"), "{k}");
        }
        assert_eq!(lease_keys("a", 7)[2], "sluice:{a}:usage:7");
    }

    #[test]
    fn the_script_sha_is_stable_and_forty_hex_digits() {
        let sha = script_sha();
        assert_eq!(sha.len(), 40);
        assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(sha, script_sha());
    }

    #[test]
    fn replies_are_decoded_and_bad_ones_refused() {
        let g = grant_of(Value::Array(vec![
            Value::Int(1000),
            Value::Int(1),
            Value::Int(5000),
        ]))
        .unwrap();
        assert_eq!(
            g,
            LeaseGrant {
                tokens: 1000,
                exhausted: true,
                fleet_demand: 5000
            }
        );
        assert!(grant_of(Value::Nil).is_err());
        assert!(grant_of(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(int(Some(Value::Nil)).is_err());
    }

    #[test]
    fn an_unreachable_redis_is_an_error_not_a_hang() {
        // Port 1 on loopback: refused at once.
        let spec = RedisSpec::parse("redis://127.0.0.1:1").unwrap();
        let Err(e) = connect(&spec, Duration::from_millis(200)) else {
            panic!("connected to a closed port");
        };
        assert!(e.to_string().starts_with("redis: "), "{e}");
    }
}
