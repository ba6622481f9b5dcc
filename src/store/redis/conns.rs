//! A user's `max_connections` over the fleet: each server's open connections of every capped
//! user in Redis, one hash per user (`sluice:{name}:conns`, field = server id, under the user's
//! hash tag), written and read with each heartbeat over the lease link. A server whose heartbeat
//! expired (on Redis' clock) is not counted, so a dead server's connections are released by that
//! expiry.
//!
//! The `redis` crate appears only in the store's Redis files; callers see counts.

use super::conn::{Call, Conn};
use super::lease::{LIVE_SERVERS, LeaseLink, RedisDown, SERVERS_KEY, ttl_ms};
use super::library;
use redis::Value;
use std::collections::HashMap;

/// The connection-count hash of `user`: server id → connections open there.
pub fn conns_key(user: &str) -> String {
    format!("sluice:{{{user}}}:conns")
}

/// Writes this server's open connections of each `(user, count)` and reads every live
/// server's, in one pipelined round trip: returns, per user, the connections open on the
/// *other* servers with a heartbeat younger than [`HEARTBEAT_TTL`](super::lease::HEARTBEAT_TTL) on Redis' clock
/// ([`LIVE_SCRIPT`](super::lease::LIVE_SCRIPT); a dead server's count is dropped, so its connections are released by its
/// heartbeat's expiry). Every command may run twice: when the library was missing (a cluster),
/// it is loaded and the round sent again. Blocking.
///
/// # Errors
/// Redis unreachable, timed out, or answering with an error.
pub fn conns_round(
    con: &mut Conn,
    server: &str,
    counts: &[(String, u64)],
) -> Result<Vec<u64>, RedisDown> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let lib = library();
    let mut calls: Vec<Call> = Vec::new();
    let mut live = con.call(lib, &LIVE_SERVERS, &[SERVERS_KEY.to_string()]);
    live.arg(ttl_ms());
    calls.push(Call::again(live));
    for (user, n) in counts {
        let key = conns_key(user);
        let write = if *n > 0 {
            let mut c = redis::cmd("HSET");
            c.arg(&key).arg(server).arg(*n);
            c
        } else {
            let mut c = redis::cmd("HDEL");
            c.arg(&key).arg(server);
            c
        };
        calls.push(Call::quiet(write));
        let mut read = redis::cmd("HGETALL");
        read.arg(&key);
        calls.push(Call::again(read));
    }
    let (alive, tables): (Vec<String>, Vec<Vec<(String, u64)>>) = {
        let mut v: Vec<Value> = con
            .batch_scripts(lib, &calls)?
            .into_iter()
            .map(|v| v.unwrap_or(Value::Nil))
            .collect();
        if v.is_empty() {
            return Err(RedisDown("no reply to the connection counts".into()));
        }
        let rest = v.split_off(1);
        let alive: Vec<String> = redis::from_redis_value(v.remove(0))?;
        let tables = rest
            .into_iter()
            .map(|t| {
                let m: HashMap<String, u64> = redis::from_redis_value(t)?;
                Ok(m.into_iter().collect())
            })
            .collect::<Result<Vec<_>, redis::ParsingError>>()?;
        (alive, tables)
    };
    if tables.len() != counts.len() {
        return Err(RedisDown(format!(
            "expected {} connection counts, got {}",
            counts.len(),
            tables.len()
        )));
    }
    Ok(tables
        .iter()
        .map(|t| {
            t.iter()
                .filter(|(s, _)| s != server && alive.contains(s))
                .map(|(_, n)| n)
                .sum()
        })
        .collect())
}

impl LeaseLink {
    /// [`conns_round`] over this link, connecting first if needed; an error drops the
    /// connection. Blocking.
    ///
    /// # Errors
    /// As [`connect`] and [`conns_round`].
    pub fn conns(&mut self, server: &str, counts: &[(String, u64)]) -> Result<Vec<u64>, RedisDown> {
        let r = conns_round(self.connection()?, server, counts);
        if r.is_err() {
            self.reset();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_hash_carries_the_users_hash_tag() {
        assert_eq!(conns_key("bob"), "sluice:{bob}:conns");
    }
}
