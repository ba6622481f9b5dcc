//! The Redis [`UserStore`]: the fleet's shared users and usage (issue 21). With `conn.rs`, the
//! only place the `redis` crate is used for users.
//!
//! Key layout (every key of one user carries the hash tag `{NAME}`, so a script over one user's
//! keys runs on Redis Cluster too; `{`, `}` and `%` in a name are written `%7B`, `%7D`, `%25`):
//!
//! | key                         | type   | holds                                                  |
//! |-----------------------------|--------|--------------------------------------------------------|
//! | `sluice:schema`             | string | the layout version (`1`); its absence = no store       |
//! | `sluice:users`              | set    | every user name (for `load` and `user list`)           |
//! | `sluice:next_id`            | string | the last account id given out (`INCR`: never reused)   |
//! | `sluice:ids`                | hash   | account id → user name (for usage flushes)             |
//! | `sluice:{NAME}:user`        | hash   | `id username password_hash bandwidth quota_bytes quota_period max_connections created_at updated_at` |
//! | `sluice:{NAME}:usage:ID`    | hash   | the usage of account ID: the fields of [`Usage`]       |
//! | `sluice:{NAME}:live:ID`     | hash   | server → `AT_MS OPEN RATE THROTTLED ACTIVE_MS`: each server's live figures of account ID (Redis clock; TTL [`LIVE_TTL_MS`]) |
//! | `sluice:changes`            | stream | `user NAME` or `unban SOURCE` per write, `MAXLEN ~` [`STREAM_MAXLEN`] |
//! | `sluice:fail:{SOURCE}`      | hash   | the fleet's failed logins: `*` of the source, `u:NAME` of a user at it (`throttle.rs`) |
//!
//! A write is made first and announced after, on the change stream, as its own command (Redis
//! Cluster refuses one script over two users' slots, and the stream is a key of its own). Each
//! reader remembers the last stream id it saw and reads on from there; when that entry is gone
//! (trimmed, or a Redis that lost its data) it reports a change to everything.
//!
//! Live figures (connections open, rate and share throttled now) are one field per server in the
//! account's live hash, written by the same script call as the usage deltas (no extra command),
//! stamped with Redis' clock. [`UserStore::load_usage`] (what `sluice stats` reads) sums the
//! fields younger than [`LIVE_FRESH_MS`] over the fleet: see [`sum_live`].
//!
//! The scripts sent in pipelines (usage flush, live figures, and `lease.rs`' lease, heartbeat and
//! live servers) form one function library, [`library`]: `EVALSHA` on one Redis, `FCALL` on a
//! cluster (`conn.rs`). The others (add, change, delete, reset) go one at a time by `EVALSHA`.

pub mod conn;
pub mod conns;
pub mod lease;
pub mod migrate;
pub mod throttle;

use self::conn::{Call, Conn, Function, Library, RedisSpec, is_connection_error};
use super::{BadRow, Changed, QuotaPeriod, Usage, UsageDelta, UserChange, UserRow, UserStore};
use crate::error::{Error, Result};
use ::redis::{Cmd, RedisResult, Script, Value, cmd};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The key layout version this build writes.
pub const SCHEMA_VERSION: u64 = 1;
/// The change stream is capped near this many entries (`XADD … MAXLEN ~`).
pub const STREAM_MAXLEN: u64 = 10_000;
/// More new stream entries than this since the last look are reported as a change to everything.
pub const MAX_LOGGED_CHANGES: usize = 1000;

/// `sluice:schema`.
pub const SCHEMA_KEY: &str = "sluice:schema";
/// `sluice:users`.
pub const USERS_KEY: &str = "sluice:users";
/// `sluice:next_id`.
pub const NEXT_ID_KEY: &str = "sluice:next_id";
/// `sluice:ids`.
pub const IDS_KEY: &str = "sluice:ids";
/// `sluice:changes`.
pub const CHANGES_KEY: &str = "sluice:changes";
/// A server's live figures older than this (by Redis' clock) are left out of the fleet's sum:
/// that server stopped flushing. The same window as `sluice stats`' `LIVE_FRESH_SECS`.
pub const LIVE_FRESH_MS: u64 = 5_000;
/// A live hash nobody wrote for this long is dropped by Redis.
pub const LIVE_TTL_MS: u64 = 3 * LIVE_FRESH_MS;

/// A name as it sits inside a hash tag: `{`, `}` and `%` escaped, so the tag is the whole name
/// and two names never share a key.
pub fn tag(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    for c in name.chars() {
        match c {
            '{' => s.push_str("%7B"),
            '}' => s.push_str("%7D"),
            '%' => s.push_str("%25"),
            c => s.push(c),
        }
    }
    s
}

/// `sluice:{NAME}:user`.
pub fn user_key(name: &str) -> String {
    format!("sluice:{{{}}}:user", tag(name))
}

/// `sluice:{NAME}:usage:ID`.
pub fn usage_key(name: &str, id: u64) -> String {
    format!("sluice:{{{}}}:usage:{id}", tag(name))
}

/// `sluice:{NAME}:live:ID`.
pub fn live_key(name: &str, id: u64) -> String {
    format!("sluice:{{{}}}:live:{id}", tag(name))
}

/// Creates the user hash unless the name is taken. KEYS: user. ARGV: field, value, ...
const ADD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1";

/// Sets fields of an existing user hash. KEYS: user. ARGV: field, value, ...
const CHANGE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1";

/// Deletes a user and its usage if it is still account ARGV[1]. KEYS: user, usage.
const DELETE: &str = r"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1";

/// Zeroes the usage of account ARGV[1] and bumps its reset epoch. KEYS: user, usage.
const RESET: &str = r"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'bytes_up', 0, 'bytes_down', 0, 'connections', 0,
    'throttled_ms', 0, 'active_ms', 0, 'period_bytes', 0)
redis.call('HINCRBY', KEYS[2], 'reset_epoch', 1)
return 1";

/// Adds one account's deltas if the user is still that account (a delta of a deleted account
/// reaches nobody), and sets this server's field of its live hash, stamped with Redis' clock
/// (the servers' clocks may differ). A server new to the hash first drops the fields of servers
/// that stopped writing, so a hash holds about one field per server flushing. KEYS: user, usage,
/// live. ARGV: id, up, down, connections, throttled_ms, active_ms, last_seen (or ''),
/// period_start, up+down, server, open_now, rate_now, throttled_now, fresh_ms, ttl_ms.
const FLUSH: &str = r"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
local u = KEYS[2]
redis.call('HINCRBY', u, 'bytes_up', ARGV[2])
redis.call('HINCRBY', u, 'bytes_down', ARGV[3])
redis.call('HINCRBY', u, 'connections', ARGV[4])
redis.call('HINCRBY', u, 'throttled_ms', ARGV[5])
redis.call('HINCRBY', u, 'active_ms', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', u, 'last_seen', ARGV[7]) end
if redis.call('HGET', u, 'period_start') == ARGV[8] then
    redis.call('HINCRBY', u, 'period_bytes', ARGV[9])
else
    redis.call('HSET', u, 'period_bytes', ARGV[9])
end
redis.call('HSET', u, 'period_start', ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fig = string.format('%d %s %s %s %s', now, ARGV[11], ARGV[12], ARGV[13], ARGV[6])
if redis.call('HSET', KEYS[3], ARGV[10], fig) == 1 then
    local all = redis.call('HGETALL', KEYS[3])
    for i = 1, #all, 2 do
        local at = tonumber(string.match(all[i + 1], '^%d+'))
        if at == nil or now - at > tonumber(ARGV[14]) then redis.call('HDEL', KEYS[3], all[i]) end
    end
end
redis.call('PEXPIRE', KEYS[3], ARGV[15])
return 1";

/// Redis' clock and an account's live hash, so freshness is judged by the clock that stamped
/// it. KEYS: live. Returns [seconds, microseconds, [field, value, ...]].
const LIVE: &str = r"
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}";

/// [`FLUSH`] in the library.
static FLUSH_FN: Function = Function {
    name: "flush",
    body: FLUSH,
    eval_on_one: false,
};

/// [`LIVE`] in the library.
static LIVE_FN: Function = Function {
    name: "live",
    body: LIVE,
    eval_on_one: false,
};

/// The scripts sent in pipelines, as one function library (`conn.rs`): what a cluster calls
/// with `FCALL`, one Redis with `EVALSHA`.
pub fn library() -> &'static Library {
    static LIBRARY: OnceLock<Library> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        Library::new(&[
            &lease::LEASE,
            &lease::HEARTBEAT,
            &lease::LIVE_SERVERS,
            &FLUSH_FN,
            &LIVE_FN,
        ])
    })
}

/// Raises `sluice:next_id` to at least ARGV[1]. KEYS: next_id.
const RAISE_ID: &str = r"
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1";

/// The scripts, with their SHA1s computed once.
struct Scripts {
    add: Script,
    change: Script,
    delete: Script,
    reset: Script,
    raise_id: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            add: Script::new(ADD),
            change: Script::new(CHANGE),
            delete: Script::new(DELETE),
            reset: Script::new(RESET),
            raise_id: Script::new(RAISE_ID),
        }
    }
}

/// The Redis user store. Reconnects lazily after a failure: each call that finds no connection
/// makes one (within the connect timeout) and fails with the address if it cannot.
pub struct RedisStore {
    spec: RedisSpec,
    conn: RefCell<Option<Conn>>,
    scripts: Scripts,
    /// The id of the last change-stream entry this reader saw (`0-0`: the stream was empty).
    seen: String,
    /// `sluice unban` requests read from the stream, waiting for [`UserStore::take_unbans`].
    unbans: RefCell<Vec<String>>,
    /// Accounts whose last flushed delta was not idle: their next idle one is still written
    /// (live figures back to 0), later idle ones are not (Redis work grows with active users).
    live: RefCell<HashSet<u64>>,
    /// This store's field in the live hashes: one per server process, and per store within
    /// it (a test runs several servers in one process).
    writer: String,
}

impl RedisStore {
    /// Connects to the store at `spec`. With `create`, an empty Redis becomes a store (the
    /// `user add` way); without, one holding no store is an error (the server's way).
    ///
    /// # Errors
    /// [`Error::NoDatabase`] (showing the address) when there is no store and none is to be
    /// made; [`Error::Database`] naming the address when Redis cannot be reached or holds a
    /// newer layout.
    pub fn open(spec: &RedisSpec, create: bool) -> Result<RedisStore> {
        let mut s = RedisStore {
            spec: spec.clone(),
            conn: RefCell::new(None),
            scripts: Scripts::new(),
            seen: "0-0".into(),
            unbans: RefCell::new(Vec::new()),
            live: RefCell::new(HashSet::new()),
            writer: writer_id(),
        };
        let version: Option<String> = s.with(|c| {
            if create {
                cmd("SET")
                    .arg(SCHEMA_KEY)
                    .arg(SCHEMA_VERSION)
                    .arg("NX")
                    .exec(c.like())?;
            }
            cmd("GET").arg(SCHEMA_KEY).query(c.like())
        })?;
        match version.map(|v| v.parse::<u64>()) {
            None => return Err(Error::NoDatabase(PathBuf::from(spec.to_string()))),
            Some(Ok(v)) if v <= SCHEMA_VERSION => {}
            Some(_) => {
                return Err(spec.error(format!(
                    "key layout version is newer than this sluice understands ({SCHEMA_VERSION}); upgrade sluice"
                )));
            }
        }
        s.seen = s.with(last_stream_id)?;
        Ok(s)
    }

    /// Runs `f` on the connection, connecting first if there is none; a connection error drops
    /// the connection so the next call makes a new one.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Result<T> {
        let mut slot = self.conn.borrow_mut();
        if slot.is_none() {
            *slot = Some(self.spec.connect()?);
        }
        let Some(c) = slot.as_mut() else {
            return Err(self.spec.error("no connection"));
        };
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_connection_error(&e) {
                    *slot = None;
                }
                Err(self.spec.error(e))
            }
        }
    }

    /// The error for a Redis that is unreachable or holds no store (any more).
    fn gone(&self) -> Error {
        Error::NoDatabase(PathBuf::from(self.spec.to_string()))
    }

    /// Whether the Redis holds a store.
    fn exists(&self) -> Result<bool> {
        self.with(|c| cmd("EXISTS").arg(SCHEMA_KEY).query(c.like()))
    }

    /// The account id of `name`, `None` when there is no such user.
    fn id_of(&self, name: &str) -> Result<Option<u64>> {
        let v: Option<String> =
            self.with(|c| cmd("HGET").arg(user_key(name)).arg("id").query(c.like()))?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    /// Announces a change to `name` on the stream.
    fn announce(&self, field: &str, value: &str) -> Result<()> {
        self.with(|c| announce_cmd(field, value).exec(c.like()))
    }

    /// Runs `script` (keys, args) on an account of `name`, retrying when the account changed
    /// between reading its id and the script (deleted and added again meanwhile).
    fn on_account(&self, name: &str, script: &Script, usage: bool) -> Result<u64> {
        for _ in 0..5 {
            let Some(id) = self.id_of(name)? else {
                return Err(Error::NoSuchUser(name.to_string()));
            };
            let mut inv = script.key(user_key(name));
            if usage {
                inv.key(usage_key(name, id));
            }
            inv.arg(id);
            let done: i64 = self.with(|c| inv.invoke(c.like()))?;
            if done == 1 {
                return Ok(id);
            }
        }
        Err(self
            .spec
            .error(format!("user {name:?} keeps changing; try again")))
    }

    /// The rows of `names` (missing ones skipped), in the order given.
    fn rows(&self, names: &[String]) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let cmds: Vec<Cmd> = names
            .iter()
            .map(|n| {
                let mut c = cmd("HGETALL");
                c.arg(user_key(n));
                c
            })
            .collect();
        let replies = self.with(|c| c.batch(cmds))?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (name, v) in names.iter().zip(replies) {
            let h = hash_of(v);
            if h.is_empty() {
                continue; // deleted, or a name whose add was cut short
            }
            match row_from_hash(name, &h) {
                Ok(r) => good.push(r),
                Err(b) => bad.push(b),
            }
        }
        Ok((good, bad))
    }

    /// The usage of the accounts of `rows` that have any, as their usage hashes hold it.
    fn usage_of_rows(&self, rows: &[UserRow]) -> Result<Vec<Usage>> {
        let cmds: Vec<Cmd> = rows
            .iter()
            .map(|r| {
                let mut c = cmd("HGETALL");
                c.arg(usage_key(&r.username, r.id));
                c
            })
            .collect();
        let replies = self.with(|c| c.batch(cmds))?;
        Ok(rows
            .iter()
            .zip(replies)
            .filter_map(|(r, v)| {
                let h = hash_of(v);
                (!h.is_empty()).then(|| usage_from_hash(r, &h))
            })
            .collect())
    }

    /// As [`RedisStore::usage_of_rows`], with each account's live figures summed over the
    /// servers that wrote them in the last [`LIVE_FRESH_MS`] (one more command per user, in the
    /// same pipeline). An account without a live hash keeps what its usage hash holds (a
    /// migrated one: the figures of the SQLite server, as stale as they were there).
    fn usage_of_rows_live(&self, rows: &[UserRow]) -> Result<Vec<Usage>> {
        let replies = self.with(|c| {
            let calls: Vec<Call> = rows
                .iter()
                .flat_map(|r| {
                    let mut u = cmd("HGETALL");
                    u.arg(usage_key(&r.username, r.id));
                    let live = c.call(library(), &LIVE_FN, &[live_key(&r.username, r.id)]);
                    [Call::again(u), Call::again(live)]
                })
                .collect();
            c.batch_scripts(library(), &calls)
        })?;
        let local_now = unix_now();
        let mut replies = replies.into_iter();
        let mut out = Vec::new();
        for r in rows {
            let (Some(Some(u)), Some(Some(live))) = (replies.next(), replies.next()) else {
                break;
            };
            let h = hash_of(u);
            if h.is_empty() {
                continue;
            }
            let mut usage = usage_from_hash(r, &h);
            if let Some((redis_ms, fields)) = live_reply(live)
                && let Some(l) = sum_live(redis_ms, &fields)
            {
                usage.open_now = l.open;
                usage.rate_now = l.rate;
                usage.throttled_now = l.throttled;
                // In this machine's clock, which `sluice stats` compares with; rounded up so
                // a field just past the window reads as stale there too.
                usage.live_at = local_now.saturating_sub(l.age_ms.div_ceil(1000));
            }
            out.push(usage);
        }
        Ok(out)
    }

    /// Creates `row` as it is (its id, hash and limits) with `usage`, unless its name is taken;
    /// an id another account already holds is replaced by a new one. Returns the id used, or
    /// `None` when the name was taken (migrate's step; nothing is changed then).
    ///
    /// # Errors
    /// Redis failed.
    pub fn import(&self, row: &UserRow, usage: Option<&Usage>) -> Result<Option<u64>> {
        if self.id_of(&row.username)?.is_some() {
            return Ok(None);
        }
        let holder: Option<String> =
            self.with(|c| cmd("HGET").arg(IDS_KEY).arg(row.id).query(c.like()))?;
        let id = match holder {
            None if row.id > 0 => {
                let (s, id) = (&self.scripts.raise_id, row.id);
                self.with(|c| s.key(NEXT_ID_KEY).arg(id).invoke::<i64>(c.like()))?;
                row.id
            }
            _ => self.with(|c| cmd("INCR").arg(NEXT_ID_KEY).query(c.like()))?,
        };
        let fields = user_fields(
            id,
            &row.username,
            &row.password_hash,
            row.bandwidth,
            row.quota_bytes,
            row.quota_period,
            row.max_connections,
        )?;
        let created: i64 = self.with(|c| {
            self.scripts
                .add
                .key(user_key(&row.username))
                .arg(&fields)
                .invoke(c.like())
        })?;
        if created == 0 {
            return Ok(None);
        }
        let mut cmds = Vec::new();
        if let Some(u) = usage {
            let mut h = cmd("HSET");
            h.arg(usage_key(&row.username, id));
            for (k, v) in usage_fields(u) {
                h.arg(k).arg(v);
            }
            cmds.push(h);
        }
        cmds.push(cmd("HSET").arg(IDS_KEY).arg(id).arg(&row.username).clone());
        cmds.push(cmd("SADD").arg(USERS_KEY).arg(&row.username).clone());
        cmds.push(announce_cmd("user", &row.username));
        self.with(|c| c.batch(cmds))?;
        Ok(Some(id))
    }
}

/// `XADD sluice:changes MAXLEN ~ N * FIELD VALUE`.
fn announce_cmd(field: &str, value: &str) -> Cmd {
    let mut c = cmd("XADD");
    c.arg(CHANGES_KEY)
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg(field)
        .arg(value);
    c
}

/// The id of the stream's newest entry, `0-0` for none.
fn last_stream_id(c: &mut Conn) -> RedisResult<String> {
    let v: Value = cmd("XREVRANGE")
        .arg(CHANGES_KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(c.like())?;
    Ok(entries(v)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_string(), |(id, _)| id))
}

/// Stream entries from an XRANGE reply: (id, [(field, value)]).
fn entries(v: Value) -> Vec<(String, Vec<(String, String)>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| {
            let Value::Array(mut parts) = e else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = text(parts.pop()?)?;
            Some((id, pairs(fields)))
        })
        .collect()
}

/// A reply as text, if it is one.
fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A flat `[k, v, k, v]` array (or a RESP3 map) as pairs; non-text entries are skipped.
fn pairs(v: Value) -> Vec<(String, String)> {
    match v {
        Value::Array(a) => {
            let mut out = Vec::new();
            let mut it = a.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(v)) = (text(k), text(v)) {
                    out.push((k, v));
                }
            }
            out
        }
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// An HGETALL reply as a map.
fn hash_of(v: Value) -> HashMap<String, String> {
    pairs(v).into_iter().collect()
}

/// Unix seconds now (0 before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A number as Redis's signed 64-bit integer (what HINCRBY counts in).
fn to_i64(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{what} {v} too large")))
}

/// The fields of a new user hash, flat, for the add script.
fn user_fields(
    id: u64,
    name: &str,
    hash: &str,
    bandwidth: u64,
    quota: u64,
    period: QuotaPeriod,
    maxc: u64,
) -> Result<Vec<String>> {
    let now = unix_now().to_string();
    Ok(vec![
        "id".into(),
        id.to_string(),
        "username".into(),
        name.into(),
        "password_hash".into(),
        hash.into(),
        "bandwidth".into(),
        to_i64("bandwidth", bandwidth)?.to_string(),
        "quota_bytes".into(),
        to_i64("quota", quota)?.to_string(),
        "quota_period".into(),
        period.as_str().into(),
        "max_connections".into(),
        to_i64("max-connections", maxc)?.to_string(),
        "created_at".into(),
        now.clone(),
        "updated_at".into(),
        now,
    ])
}

/// The fields of a usage hash, for an import.
fn usage_fields(u: &Usage) -> Vec<(&'static str, String)> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX).to_string();
    let mut f = vec![
        ("bytes_up", n(u.bytes_up)),
        ("bytes_down", n(u.bytes_down)),
        ("connections", n(u.connections)),
        ("throttled_ms", n(u.throttled_ms)),
        ("active_ms", n(u.active_ms)),
        ("period_start", n(u.period_start)),
        ("period_bytes", n(u.period_bytes)),
        ("reset_epoch", n(u.reset_epoch)),
        ("open_now", n(u.open_now)),
        ("rate_now", n(u.rate_now)),
        ("throttled_now", u.throttled_now.to_string()),
        ("live_at", n(u.live_at)),
    ];
    if let Some(s) = u.last_seen {
        f.push(("last_seen", n(s)));
    }
    f
}

/// A non-negative number from a hash field: an integer, a real, or text like `1M` (a hand edit
/// with redis-cli); absent is 0.
fn number(what: &str, v: Option<&String>) -> std::result::Result<u64, String> {
    let Some(v) = v else { return Ok(0) };
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n);
    }
    if let Ok(f) = v.parse::<f64>() {
        return if f >= 0.0 && f.is_finite() {
            Ok(f as u64)
        } else {
            Err(format!("bad {what} {v:?}"))
        };
    }
    crate::units::parse_rate(v).map_err(|e| format!("{what}: {e}"))
}

/// Makes sense of a user hash whatever a hand edit left in it.
fn row_from_hash(name: &str, h: &HashMap<String, String>) -> std::result::Result<UserRow, BadRow> {
    let bad = |reason: String| BadRow {
        username: name.to_string(),
        reason,
    };
    let id = h
        .get("id")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad(format!("id {:?} is not a number", h.get("id"))))?;
    let password_hash = h
        .get("password_hash")
        .cloned()
        .ok_or_else(|| bad("password_hash is missing".into()))?;
    let quota_period = match h.get("quota_period") {
        Some(p) => QuotaPeriod::parse(p).map_err(|e| bad(e.to_string()))?,
        None => QuotaPeriod::None,
    };
    Ok(UserRow {
        id,
        username: name.to_string(),
        password_hash,
        bandwidth: number("bandwidth", h.get("bandwidth")).map_err(bad)?,
        quota_bytes: number("quota_bytes", h.get("quota_bytes")).map_err(bad)?,
        quota_period,
        max_connections: number("max_connections", h.get("max_connections")).map_err(bad)?,
    })
}

/// A usage hash; counters that cannot be read (or a hand edit left negative) read as 0.
fn usage_from_hash(r: &UserRow, h: &HashMap<String, String>) -> Usage {
    let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Usage {
        account_id: r.id,
        username: r.username.clone(),
        bytes_up: n("bytes_up"),
        bytes_down: n("bytes_down"),
        connections: n("connections"),
        throttled_ms: n("throttled_ms"),
        active_ms: n("active_ms"),
        last_seen: h.get("last_seen").and_then(|v| v.parse().ok()),
        period_start: n("period_start"),
        period_bytes: n("period_bytes"),
        reset_epoch: n("reset_epoch"),
        open_now: n("open_now"),
        rate_now: n("rate_now"),
        throttled_now: h
            .get("throttled_now")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        live_at: n("live_at"),
    }
}

/// This process's name for a store's live figures: host, process id and a count of the
/// stores opened in the process (several servers may run in one).
fn writer_id() -> String {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let n = OPENED.fetch_add(1, Ordering::Relaxed);
    format!("{host}-{}-{n}", std::process::id())
}

/// A share (0..=1) as the live hash holds it: a plain decimal, never `NaN` or `inf`.
fn share(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    format!("{v:.4}")
}

/// The reply of the [`LIVE`] script: Redis' clock in milliseconds and the hash's fields.
fn live_reply(v: Value) -> Option<(u64, Vec<(String, String)>)> {
    let Value::Array(parts) = v else { return None };
    let mut it = parts.into_iter();
    let secs: u64 = text(it.next()?)?.parse().ok()?;
    let micros: u64 = text(it.next()?)?.parse().ok()?;
    let ms = secs.checked_mul(1000)?.checked_add(micros / 1000)?;
    Some((ms, pairs(it.next()?)))
}

/// One account's live figures over the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    /// Connections open now, summed over the servers.
    pub open: u64,
    /// Bytes per second now, summed over the servers.
    pub rate: u64,
    /// Share of the last second the user's relays waited for tokens, over the whole fleet: each
    /// server's share weighted by its relays' working time in its last flush (so it is the
    /// fleet's waiting time over its working time); the plain mean when none worked.
    pub throttled: f64,
    /// Age of the newest field (whether fresh or not), in Redis' clock.
    pub age_ms: u64,
}

/// Sums the fields of a live hash (`server → AT_MS OPEN RATE THROTTLED ACTIVE_MS`) that are at
/// most [`LIVE_FRESH_MS`] older than `now_ms` (Redis' clock); fields that cannot be read (a hand
/// edit) are skipped. `None` when no field can be read.
pub fn sum_live(now_ms: u64, fields: &[(String, String)]) -> Option<Live> {
    let mut l = Live {
        open: 0,
        rate: 0,
        throttled: 0.0,
        age_ms: u64::MAX,
    };
    let (mut weighted, mut worked, mut plain, mut fresh) = (0.0, 0.0, 0.0, 0u32);
    for (_, v) in fields {
        let mut w = v.split_ascii_whitespace();
        let mut num = || w.next().and_then(|x| x.parse::<u64>().ok());
        let (Some(at), Some(open), Some(rate)) = (num(), num(), num()) else {
            continue;
        };
        let thr = w
            .next()
            .and_then(|x| x.parse::<f64>().ok())
            .filter(|x| x.is_finite())
            .map_or(0.0, |x| x.clamp(0.0, 1.0));
        let active = w.next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0) as f64;
        let age = now_ms.saturating_sub(at);
        l.age_ms = l.age_ms.min(age);
        if age > LIVE_FRESH_MS {
            continue;
        }
        l.open = l.open.saturating_add(open);
        l.rate = l.rate.saturating_add(rate);
        weighted += thr * active;
        worked += active;
        plain += thr;
        fresh += 1;
    }
    if l.age_ms == u64::MAX {
        return None;
    }
    l.throttled = if worked > 0.0 {
        weighted / worked
    } else if fresh > 0 {
        plain / f64::from(fresh)
    } else {
        0.0
    };
    Some(l)
}

/// What one look at the stream found.
struct Look {
    /// The last entry was gone, or too many came: read everything.
    all: bool,
    names: Vec<String>,
    unbans: Vec<String>,
    /// The id to read on from.
    seen: String,
    /// Any entry at all.
    any: bool,
}

/// Reads the stream after `seen`.
fn look(c: &mut Conn, seen: &str) -> RedisResult<Look> {
    let fresh = seen == "0-0";
    // Inclusive from `seen`: its own entry comes first while it is still there.
    let v: Value = cmd("XRANGE")
        .arg(CHANGES_KEY)
        .arg(if fresh { "-" } else { seen })
        .arg("+")
        .arg("COUNT")
        .arg(MAX_LOGGED_CHANGES + 2)
        .query(c.like())?;
    let mut es = entries(v);
    let mut look = Look {
        all: false,
        names: Vec::new(),
        unbans: Vec::new(),
        seen: seen.to_string(),
        any: false,
    };
    if !fresh {
        if es.first().is_some_and(|(id, _)| id == seen) {
            es.remove(0);
        } else {
            // Our last entry was trimmed (or Redis lost its data): anything may have changed.
            look.all = true;
        }
    }
    if es.len() > MAX_LOGGED_CHANGES {
        look.all = true;
    }
    if look.all {
        look.any = true;
        look.seen = last_stream_id(c)?;
        return Ok(look);
    }
    for (id, fields) in es {
        look.any = true;
        for (k, v) in fields {
            match k.as_str() {
                "user" if !look.names.contains(&v) => look.names.push(v),
                "unban" => look.unbans.push(v),
                _ => {}
            }
        }
        look.seen = id;
    }
    Ok(look)
}

impl UserStore for RedisStore {
    fn location(&self) -> String {
        self.spec.to_string()
    }

    /// The users named on the change stream since the last look (none for an unban request,
    /// whose source waits for [`UserStore::take_unbans`]); `All` when the last entry seen was
    /// trimmed away or more than [`MAX_LOGGED_CHANGES`] came. Redis unreachable reads as
    /// [`Error::NoDatabase`] (the watcher logs it once and serves on from its snapshot).
    fn changes(&mut self) -> Result<Changed> {
        let seen = self.seen.clone();
        let l = match self.with(|c| look(c, &seen)) {
            Ok(l) => l,
            Err(_) if self.conn.borrow().is_none() => return Err(self.gone()),
            Err(e) => return Err(e),
        };
        // A Redis that lost its data (restarted without its files, flushed) is a store gone,
        // not one with no users: the server keeps its snapshot until the store is back.
        if l.all && !self.exists()? {
            return Err(self.gone());
        }
        self.seen = l.seen;
        self.unbans.borrow_mut().extend(l.unbans);
        Ok(match (l.any, l.all) {
            (false, _) => Changed::None,
            (true, true) => Changed::All,
            (true, false) => Changed::Users(l.names),
        })
    }

    fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let (exists, mut names): (bool, Vec<String>) = self.with(|c| {
            let v = c.batch(vec![
                cmd("EXISTS").arg(SCHEMA_KEY).clone(),
                cmd("SMEMBERS").arg(USERS_KEY).clone(),
            ])?;
            Ok(::redis::from_redis_value(Value::Array(v))?)
        })?;
        if !exists {
            return Err(self.gone());
        }
        names.sort();
        self.rows(&names)
    }

    fn load_users(&self, names: &[String]) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        self.rows(names)
    }

    /// With the live figures summed over the fleet ([`sum_live`]).
    fn load_usage(&self) -> Result<Vec<Usage>> {
        let (rows, _) = self.load()?;
        self.usage_of_rows_live(&rows)
    }

    /// Without the fleet's live figures (a reload needs only the counts, and reading them would
    /// double its commands): they are what the usage hash holds.
    fn each_usage(&self, f: &mut dyn FnMut(Usage)) -> Result<()> {
        let (rows, _) = self.load()?;
        self.usage_of_rows(&rows)?.into_iter().for_each(f);
        Ok(())
    }

    /// Without the fleet's live figures, as [`UserStore::each_usage`].
    fn load_usage_of(&self, names: &[String]) -> Result<Vec<Usage>> {
        let (rows, _) = self.rows(names)?;
        self.usage_of_rows(&rows)
    }

    fn add_with(
        &self,
        username: &str,
        password_hash: &str,
        bandwidth: u64,
        limits: &UserChange,
    ) -> Result<()> {
        // Checked before an id is spent.
        let quota = limits.quota_bytes.unwrap_or(0);
        let maxc = limits.max_connections.unwrap_or(0);
        user_fields(
            0,
            username,
            password_hash,
            bandwidth,
            quota,
            QuotaPeriod::None,
            maxc,
        )?;
        if self.id_of(username)?.is_some() {
            return Err(Error::UserExists(username.to_string()));
        }
        let id: u64 = self.with(|c| cmd("INCR").arg(NEXT_ID_KEY).query(c.like()))?;
        let period = limits.quota_period.unwrap_or(QuotaPeriod::None);
        let fields = user_fields(id, username, password_hash, bandwidth, quota, period, maxc)?;
        let created: i64 = self.with(|c| {
            self.scripts
                .add
                .key(user_key(username))
                .arg(&fields)
                .invoke(c.like())
        })?;
        if created == 0 {
            return Err(Error::UserExists(username.to_string()));
        }
        let cmds = vec![
            cmd("HSET").arg(IDS_KEY).arg(id).arg(username).clone(),
            cmd("SADD").arg(USERS_KEY).arg(username).clone(),
            announce_cmd("user", username),
        ];
        self.with(|c| c.batch(cmds))?;
        Ok(())
    }

    fn change(&self, username: &str, c: &UserChange) -> Result<()> {
        let mut fields: Vec<String> = Vec::new();
        let mut put = |k: &str, v: String| {
            fields.push(k.into());
            fields.push(v);
        };
        if let Some(h) = &c.password_hash {
            put("password_hash", h.clone());
        }
        if let Some(v) = c.bandwidth {
            put("bandwidth", to_i64("bandwidth", v)?.to_string());
        }
        if let Some(v) = c.quota_bytes {
            put("quota_bytes", to_i64("quota", v)?.to_string());
        }
        if let Some(p) = c.quota_period {
            put("quota_period", p.as_str().into());
        }
        if let Some(v) = c.max_connections {
            put("max_connections", to_i64("max-connections", v)?.to_string());
        }
        put("updated_at", unix_now().to_string());
        let done: i64 = self.with(|conn| {
            self.scripts
                .change
                .key(user_key(username))
                .arg(&fields)
                .invoke(conn.like())
        })?;
        if done == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        self.announce("user", username)
    }

    fn delete(&self, username: &str) -> Result<()> {
        let id = self.on_account(username, &self.scripts.delete, true)?;
        let cmds = vec![
            cmd("HDEL").arg(IDS_KEY).arg(id).clone(),
            cmd("SREM").arg(USERS_KEY).arg(username).clone(),
        ];
        self.with(|c| c.batch(cmds))?;
        // Added again meanwhile (its add lists the name after creating the user, but may have
        // done so before the SREM above): list it again.
        let back: bool = self.with(|c| cmd("EXISTS").arg(user_key(username)).query(c.like()))?;
        if back {
            self.with(|c| cmd("SADD").arg(USERS_KEY).arg(username).exec(c.like()))?;
        }
        self.announce("user", username)
    }

    fn reset_usage(&self, username: &str) -> Result<()> {
        self.on_account(username, &self.scripts.reset, true)?;
        self.announce("user", username)
    }

    /// Writes the deltas of accounts that moved something or have connections open (and one
    /// last idle delta after that); an idle account costs Redis nothing. Its usage row then keeps
    /// the last period's `period_start`, which every reader compares with the period now.
    fn flush_usage(&self, deltas: &[UsageDelta], now: u64) -> Result<()> {
        let idle = |d: &UsageDelta| {
            d.bytes_up == 0
                && d.bytes_down == 0
                && d.connections == 0
                && d.throttled_ms == 0
                && d.active_ms == 0
                && d.open_now == 0
                && d.rate_now == 0
                && d.throttled_now == 0.0
        };
        let busy: HashSet<u64> = deltas
            .iter()
            .filter(|d| !idle(d))
            .map(|d| d.account_id)
            .collect();
        let deltas: Vec<&UsageDelta> = {
            let live = self.live.borrow();
            deltas
                .iter()
                .filter(|d| busy.contains(&d.account_id) || live.contains(&d.account_id))
                .collect()
        };
        if deltas.is_empty() {
            *self.live.borrow_mut() = busy;
            return Ok(());
        }
        let ids: Vec<u64> = deltas.iter().map(|d| d.account_id).collect();
        let names: Vec<Option<String>> =
            self.with(|c| cmd("HMGET").arg(IDS_KEY).arg(&ids).query(c.like()))?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX).to_string();
        let calls: Vec<([String; 3], Vec<String>)> = deltas
            .iter()
            .zip(names)
            .filter_map(|(d, name)| {
                let name = name?; // a deleted account: its counts reach nobody
                let seen = if d.open_now > 0 || d.bytes_up.saturating_add(d.bytes_down) > 0 {
                    now.to_string()
                } else {
                    String::new()
                };
                let keys = [
                    user_key(&name),
                    usage_key(&name, d.account_id),
                    live_key(&name, d.account_id),
                ];
                let args = vec![
                    d.account_id.to_string(),
                    n(d.bytes_up),
                    n(d.bytes_down),
                    n(d.connections),
                    n(d.throttled_ms),
                    n(d.active_ms),
                    seen,
                    n(d.period_start),
                    n(d.bytes_up.saturating_add(d.bytes_down)),
                    self.writer.clone(),
                    n(d.open_now),
                    n(d.rate_now),
                    share(d.throttled_now),
                    LIVE_FRESH_MS.to_string(),
                    LIVE_TTL_MS.to_string(),
                ];
                Some((keys, args))
            })
            .collect();
        // Each call counts: one that ran is not sent again after a load (a cluster whose masters
        // did not all have the library), only those that failed.
        let r = self.with(|c| {
            let calls: Vec<Call> = calls
                .iter()
                .map(|(k, a)| {
                    let mut x = c.call(library(), &FLUSH_FN, k);
                    x.arg(a);
                    Call::once(x)
                })
                .collect();
            c.batch_scripts(library(), &calls)
        });
        if r.is_ok() {
            *self.live.borrow_mut() = busy;
        }
        r.map(|_| ())
    }

    /// Also drops the fleet's shared failure counts of `source` (`throttle.rs`), so no server
    /// reads them back after lifting its blocks.
    fn request_unban(&self, source: &str) -> Result<()> {
        let k = throttle::fail_key(source);
        self.with(|c| cmd("DEL").arg(&k).exec(c.like()))?;
        self.announce("unban", source)
    }

    fn take_unbans(&self) -> Result<Vec<String>> {
        Ok(std::mem::take(&mut *self.unbans.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_whole_name_as_their_hash_tag() {
        assert_eq!(user_key("alice"), "sluice:{alice}:user");
        assert_eq!(usage_key("alice", 7), "sluice:{alice}:usage:7");
        assert_eq!(user_key("a}b{%"), "sluice:{a%7Db%7B%25}:user");
        assert_ne!(user_key("%7D"), user_key("}"));
    }

    #[test]
    fn live_figures_sum_over_the_fresh_servers_only() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        let now = 1_000_000;
        // a: 3 open, throttled half of 800 ms of work; b: 2 open, a quarter of 200 ms; c stopped
        // flushing 6 s ago; d is a hand edit.
        let h = f(&[
            ("a", "999000 3 6000 0.5 800"),
            ("b", "998500 2 4000 0.25 200"),
            ("c", "994000 9 9000 1 1000"),
            ("d", "lots"),
        ]);
        let l = sum_live(now, &h).unwrap();
        assert_eq!((l.open, l.rate, l.age_ms), (5, 10_000, 1000));
        assert!((l.throttled - 0.45).abs() < 1e-9, "{}", l.throttled);
        // Only stale fields: nothing open now, and how old the newest is.
        let stale = sum_live(now + 10_000, &h).unwrap();
        assert_eq!((stale.open, stale.rate, stale.age_ms), (0, 0, 11_000));
        assert_eq!(stale.throttled, 0.0);
        // No working time anywhere: the plain mean; no readable field: nothing.
        let idle = sum_live(
            now,
            &f(&[("a", "999000 1 0 0.2 0"), ("b", "999000 1 0 0.4")]),
        );
        assert!((idle.unwrap().throttled - 0.3).abs() < 1e-9);
        assert_eq!(sum_live(now, &f(&[("x", "1 2")])), None);
        assert_eq!(share(f64::NAN), "0.0000");
        assert_eq!(share(2.0), "1.0000");
    }

    #[test]
    fn hand_edited_hashes_are_read_or_reported() {
        let h = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        let r = row_from_hash(
            "u",
            &h(&[("id", "3"), ("password_hash", "x"), ("bandwidth", "1M")]),
        )
        .unwrap();
        assert_eq!(
            (r.id, r.bandwidth, r.quota_period),
            (3, 1 << 20, QuotaPeriod::None)
        );
        let b = row_from_hash(
            "u",
            &h(&[("id", "3"), ("password_hash", "x"), ("bandwidth", "lots")]),
        )
        .unwrap_err();
        assert_eq!(b.username, "u");
        assert!(row_from_hash("u", &h(&[("password_hash", "x")])).is_err());
    }
}
