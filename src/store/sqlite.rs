//! The user store: an SQLite file with one row per user. The only file with SQL in it.
//!
//! The schema is versioned with `PRAGMA user_version` and upgraded in place. The file is opened in
//! WAL mode with a busy timeout so `sluice user …`, the sqlite3 shell and a running server share it.
//! Rows edited by hand are read defensively: a row this code cannot make sense of is reported, not
//! fatal. Password hashing and the in-memory snapshot live in `auth.rs`.
//!
//! Each account has an id that is never reused (`AUTOINCREMENT`): usage rows belong to an id, not
//! to a name, so a user deleted and added again under the same name starts from zero and nothing
//! counted for the old account reaches the new one.

use crate::error::{Error, Result};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 3;
/// How long a statement waits for another writer before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    bandwidth     INTEGER NOT NULL DEFAULT 0 CHECK (bandwidth >= 0),
    created_at    INTEGER NOT NULL DEFAULT (strftime('%s','now')),
    updated_at    INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);";

/// Version 2: per-user quota and connection cap, and the usage table the server flushes into.
const SCHEMA_V2: &str = "
ALTER TABLE users ADD COLUMN quota_bytes INTEGER NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0);
ALTER TABLE users ADD COLUMN quota_period TEXT NOT NULL DEFAULT 'none';
ALTER TABLE users ADD COLUMN max_connections INTEGER NOT NULL DEFAULT 0 CHECK (max_connections >= 0);
CREATE TABLE IF NOT EXISTS usage (
    username         TEXT PRIMARY KEY,
    bytes_up         INTEGER NOT NULL DEFAULT 0,
    bytes_down       INTEGER NOT NULL DEFAULT 0,
    connections      INTEGER NOT NULL DEFAULT 0,
    throttled_ms     INTEGER NOT NULL DEFAULT 0,
    active_ms        INTEGER NOT NULL DEFAULT 0,
    last_seen        INTEGER,
    period_start     INTEGER NOT NULL DEFAULT 0,
    period_bytes     INTEGER NOT NULL DEFAULT 0,
    reset_epoch      INTEGER NOT NULL DEFAULT 0,
    open_now         INTEGER NOT NULL DEFAULT 0,
    rate_now         INTEGER NOT NULL DEFAULT 0,
    throttled_now    REAL NOT NULL DEFAULT 0,
    live_at          INTEGER NOT NULL DEFAULT 0
);";

/// Version 3: accounts get an id that is never reused, and usage rows belong to that id. SQLite
/// cannot add a primary key in place, so both tables are rebuilt; ids are the old rowids, usage
/// rows of names without a user are dropped, and counters a bug left negative are clamped to 0.
const SCHEMA_V3: &str = "
CREATE TABLE users_v3 (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    username        TEXT NOT NULL UNIQUE,
    password_hash   TEXT NOT NULL,
    bandwidth       INTEGER NOT NULL DEFAULT 0 CHECK (bandwidth >= 0),
    created_at      INTEGER NOT NULL DEFAULT (strftime('%s','now')),
    updated_at      INTEGER NOT NULL DEFAULT (strftime('%s','now')),
    quota_bytes     INTEGER NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0),
    quota_period    TEXT NOT NULL DEFAULT 'none',
    max_connections INTEGER NOT NULL DEFAULT 0 CHECK (max_connections >= 0)
);
INSERT INTO users_v3 (id, username, password_hash, bandwidth, created_at, updated_at,
                      quota_bytes, quota_period, max_connections)
    SELECT rowid, username, password_hash, bandwidth, created_at, updated_at,
           quota_bytes, quota_period, max_connections FROM users;
CREATE TABLE usage_v3 (
    account_id       INTEGER PRIMARY KEY,
    bytes_up         INTEGER NOT NULL DEFAULT 0,
    bytes_down       INTEGER NOT NULL DEFAULT 0,
    connections      INTEGER NOT NULL DEFAULT 0,
    throttled_ms     INTEGER NOT NULL DEFAULT 0,
    active_ms        INTEGER NOT NULL DEFAULT 0,
    last_seen        INTEGER,
    period_start     INTEGER NOT NULL DEFAULT 0,
    period_bytes     INTEGER NOT NULL DEFAULT 0,
    reset_epoch      INTEGER NOT NULL DEFAULT 0,
    open_now         INTEGER NOT NULL DEFAULT 0,
    rate_now         INTEGER NOT NULL DEFAULT 0,
    throttled_now    REAL NOT NULL DEFAULT 0,
    live_at          INTEGER NOT NULL DEFAULT 0
);
INSERT INTO usage_v3 (account_id, bytes_up, bytes_down, connections, throttled_ms, active_ms,
                      last_seen, period_start, period_bytes, reset_epoch, open_now, rate_now,
                      throttled_now, live_at)
    SELECT u.id, max(g.bytes_up, 0), max(g.bytes_down, 0), max(g.connections, 0),
           max(g.throttled_ms, 0), max(g.active_ms, 0), g.last_seen, g.period_start,
           max(g.period_bytes, 0), g.reset_epoch, max(g.open_now, 0), max(g.rate_now, 0),
           g.throttled_now, g.live_at
    FROM usage g JOIN users_v3 u ON u.username = g.username;
DROP TABLE usage;
DROP TABLE users;
ALTER TABLE users_v3 RENAME TO users;
ALTER TABLE usage_v3 RENAME TO usage;";
/// Unban requests from `sluice unban`, applied and deleted by a running server. Not part of the
/// versioned schema: created on open by any build that knows it, ignored by one that does not.
const UNBANS: &str = "
CREATE TABLE IF NOT EXISTS unbans (
    source       TEXT PRIMARY KEY,
    requested_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);";

/// When a quota starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    /// Never: the quota is a lifetime total (until `user reset-usage`).
    None,
    /// Every UTC day.
    Day,
    /// Every UTC calendar month.
    Month,
}

impl QuotaPeriod {
    /// Parses `none`, `day` or `month`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms.
    pub fn parse(s: &str) -> std::result::Result<QuotaPeriod, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(QuotaPeriod::None),
            "day" | "daily" => Ok(QuotaPeriod::Day),
            "month" | "monthly" => Ok(QuotaPeriod::Month),
            _ => Err(format!(
                "bad quota period {s:?}: expected day, month or none"
            )),
        }
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::None => "none",
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }

    /// The start (unix seconds, UTC) of the period containing `now` (0 for `None`).
    pub fn start_of(self, now: u64) -> u64 {
        match self {
            QuotaPeriod::None => 0,
            QuotaPeriod::Day => now - now % 86_400,
            QuotaPeriod::Month => {
                let (y, m, _) = civil_from_days((now / 86_400) as i64);
                (days_from_civil(y, m, 1) * 86_400) as u64
            }
        }
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What the server adds to a user's usage row at a flush (deltas), plus its live figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageDelta {
    /// The account the counts belong to ([`UserRow::id`]).
    pub account_id: u64,
    /// Bytes client → destination since the last flush.
    pub bytes_up: u64,
    /// Bytes destination → client since the last flush.
    pub bytes_down: u64,
    /// Connections opened since the last flush.
    pub connections: u64,
    /// Milliseconds relays waited for tokens since the last flush.
    pub throttled_ms: u64,
    /// Milliseconds relays worked (waited for tokens or moved bytes) since the last flush.
    pub active_ms: u64,
    /// Start of the user's current quota period (unix seconds).
    pub period_start: u64,
    /// Connections open now.
    pub open_now: u64,
    /// Bytes per second over the last second.
    pub rate_now: u64,
    /// Share of the last second the user's relays spent waiting for tokens (0..=1).
    pub throttled_now: f64,
}

/// A user's usage row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The account ([`UserRow::id`]).
    pub account_id: u64,
    /// The account's user name.
    pub username: String,
    /// Total bytes client → destination.
    pub bytes_up: u64,
    /// Total bytes destination → client.
    pub bytes_down: u64,
    /// Connections opened.
    pub connections: u64,
    /// Milliseconds relays waited for tokens.
    pub throttled_ms: u64,
    /// Milliseconds relays worked (waited for tokens or moved bytes).
    pub active_ms: u64,
    /// Last time a connection was open (unix seconds), if ever.
    pub last_seen: Option<u64>,
    /// Start of the period `period_bytes` counts (unix seconds).
    pub period_start: u64,
    /// Bytes (both directions) in the period starting at `period_start`.
    pub period_bytes: u64,
    /// Bumped by `sluice user reset-usage`, so a running server restarts its quota count.
    pub reset_epoch: u64,
    /// Connections open at the server's last flush.
    pub open_now: u64,
    /// Bytes per second at the server's last flush.
    pub rate_now: u64,
    /// Share of time throttled at the server's last flush.
    pub throttled_now: f64,
    /// When the server last flushed live figures (unix seconds; 0 = never).
    pub live_at: u64,
}

/// One user as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The account's id: never reused, so a user deleted and added again is a new account.
    pub id: u64,
    /// The login name (1..=255 bytes, no control characters).
    pub username: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Bytes per second, both directions together, all connections together; 0 = unlimited.
    pub bandwidth: u64,
    /// Bytes allowed per quota period, both directions; 0 = no quota.
    pub quota_bytes: u64,
    /// When the quota starts over.
    pub quota_period: QuotaPeriod,
    /// Most connections open at once; 0 = no cap.
    pub max_connections: u64,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("bandwidth", &self.bandwidth)
            .field("quota_bytes", &self.quota_bytes)
            .field("quota_period", &self.quota_period)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// A change to a user; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    /// A new argon2id PHC string.
    pub password_hash: Option<String>,
    /// A new bandwidth (bytes per second, 0 = unlimited).
    pub bandwidth: Option<u64>,
    /// A new quota (bytes per period, 0 = none).
    pub quota_bytes: Option<u64>,
    /// A new quota period.
    pub quota_period: Option<QuotaPeriod>,
    /// A new connection cap (0 = none).
    pub max_connections: Option<u64>,
}

/// A row that could not be read as a user, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The username, as far as it could be read.
    pub username: String,
    /// What is wrong with the row.
    pub reason: String,
}

/// An open user database.
pub struct UserStore {
    conn: Connection,
    path: PathBuf,
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Database(format!("{}: {e}", path.display()))
}

/// Mode bits that let group or others read or write a file.
const NOT_OWNER: u32 = 0o077;

/// Creates `path` empty with mode 0600 unless something is there already (SQLite takes an empty
/// file as a new database). Any failure is left for SQLite's open to report in its words; a
/// `file:` URI or `:memory:` is not a path and is left alone.
fn create_private(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let s = path.to_string_lossy();
    if s.starts_with("file:") || s == ":memory:" {
        return;
    }
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// The database file and its `-wal` and `-shm` files that group or others may read, with their
/// modes, so the server can warn at start: anyone who can read them has the password hashes.
pub fn readable_by_others(path: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if let Ok(m) = std::fs::metadata(&p) {
            let mode = m.permissions().mode() & 0o7777;
            if mode & NOT_OWNER != 0 {
                out.push((p, mode));
            }
        }
    }
    out
}

impl UserStore {
    /// Opens an existing database (the server's way: it never creates one).
    ///
    /// # Errors
    /// [`Error::NoDatabase`] when the file is missing; [`Error::Database`] when it is not a
    /// readable SQLite database or its schema is newer than this build.
    pub fn open(path: &Path) -> Result<UserStore> {
        if !path.exists() {
            return Err(Error::NoDatabase(path.to_path_buf()));
        }
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    /// Opens a database, creating the file and schema when missing (the `user add` way). A new
    /// file is created mode 0600, owner only: it holds the password hashes. SQLite gives the
    /// `-wal` and `-shm` files the database file's mode.
    ///
    /// # Errors
    /// [`Error::Database`] when the file cannot be created or is not a database.
    pub fn open_or_create(path: &Path) -> Result<UserStore> {
        create_private(path);
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<UserStore> {
        let flags = flags | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_err(path, e))?;
        let store = UserStore {
            conn,
            path: path.to_path_buf(),
        };
        store.prepare()?;
        Ok(store)
    }

    /// Sets WAL and the busy timeout, then creates or upgrades the schema.
    fn prepare(&self) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(e)?;
        // journal_mode answers with a row; query_row reads it. A read-only medium keeps its mode.
        let _mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(e)?;
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(e)?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(e)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Database(format!(
                "{}: schema version {version} is newer than this sluice understands ({SCHEMA_VERSION}); upgrade sluice",
                self.path.display()
            )));
        }
        if version < 1 {
            let sql = format!("BEGIN; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;");
            self.conn.execute_batch(&sql).map_err(e)?;
        }
        if version < 2 {
            let sql = format!("BEGIN; {SCHEMA_V2} PRAGMA user_version = 2; COMMIT;");
            self.conn.execute_batch(&sql).map_err(e)?;
        }
        if version < 3 {
            let sql = format!("BEGIN; {SCHEMA_V3} PRAGMA user_version = 3; COMMIT;");
            self.conn.execute_batch(&sql).map_err(e)?;
        }
        self.conn.execute_batch(UNBANS).map_err(e)?;
        Ok(())
    }

    /// Asks a running server to lift its login blocks on `source` (already in canonical form).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub fn request_unban(&self, source: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO unbans (source) VALUES (?1)",
                params![source],
            )
            .map(|_| ())
            .map_err(|e| db_err(&self.path, e))
    }

    /// The pending unban requests, deleted in the same transaction (the server's side).
    ///
    /// # Errors
    /// [`Error::Database`]; the requests then stay for the next try.
    pub fn take_unbans(&self) -> Result<Vec<String>> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        let sources = {
            let mut st = tx.prepare("SELECT source FROM unbans").map_err(e)?;
            st.query_map([], |r| r.get::<_, String>(0))
                .map_err(e)?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(e)?
        };
        if !sources.is_empty() {
            tx.execute("DELETE FROM unbans", []).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(sources)
    }

    /// The path this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a user without quota or connection cap.
    ///
    /// # Errors
    /// [`Error::UserExists`] if the name is taken; [`Error::Database`] otherwise.
    pub fn add(&self, username: &str, password_hash: &str, bandwidth: u64) -> Result<()> {
        self.add_with(username, password_hash, bandwidth, &UserChange::default())
    }

    /// Adds a user with the quota, period and connection cap of `limits` (its other fields are
    /// ignored) in one statement, so a running server never sees the user without its limits.
    ///
    /// # Errors
    /// [`Error::UserExists`] if the name is taken; [`Error::Invalid`] for a number SQLite cannot
    /// hold; [`Error::Database`] otherwise.
    pub fn add_with(
        &self,
        username: &str,
        password_hash: &str,
        bandwidth: u64,
        limits: &UserChange,
    ) -> Result<()> {
        let r = self.conn.execute(
            "INSERT INTO users (username, password_hash, bandwidth, quota_bytes, quota_period,
                                max_connections)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                username,
                password_hash,
                to_sql("bandwidth", bandwidth)?,
                to_sql("quota", limits.quota_bytes.unwrap_or(0))?,
                limits.quota_period.unwrap_or(QuotaPeriod::None).as_str(),
                to_sql("max-connections", limits.max_connections.unwrap_or(0))?,
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Err(Error::UserExists(username.to_string()))
            }
            Err(e) => Err(db_err(&self.path, e)),
        }
    }

    /// Changes a user's password hash and/or bandwidth; `None` leaves a field as it is.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`] if there is no such user; [`Error::Database`] otherwise.
    pub fn update(&self, username: &str, hash: Option<&str>, bandwidth: Option<u64>) -> Result<()> {
        self.change(
            username,
            &UserChange {
                password_hash: hash.map(str::to_string),
                bandwidth,
                ..UserChange::default()
            },
        )
    }

    /// Applies a [`UserChange`]; fields left `None` keep their value.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`] if there is no such user; [`Error::Database`] otherwise.
    pub fn change(&self, username: &str, c: &UserChange) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE users SET password_hash = coalesce(?2, password_hash),
                        bandwidth = coalesce(?3, bandwidth),
                        quota_bytes = coalesce(?4, quota_bytes),
                        quota_period = coalesce(?5, quota_period),
                        max_connections = coalesce(?6, max_connections),
                        updated_at = strftime('%s','now')
                 WHERE username = ?1",
                params![
                    username,
                    c.password_hash,
                    c.bandwidth.map(|v| to_sql("bandwidth", v)).transpose()?,
                    c.quota_bytes.map(|v| to_sql("quota", v)).transpose()?,
                    c.quota_period.map(QuotaPeriod::as_str),
                    c.max_connections
                        .map(|v| to_sql("max-connections", v))
                        .transpose()?,
                ],
            )
            .map_err(|e| db_err(&self.path, e))?;
        if n == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        Ok(())
    }

    /// Deletes a user and its usage row. Its id is never given out again, so a user added later
    /// under the same name is a new account starting from zero.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`] if there is no such user; [`Error::Database`] otherwise.
    pub fn delete(&self, username: &str) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        tx.execute(
            "DELETE FROM usage WHERE account_id IN (SELECT id FROM users WHERE username = ?1)",
            params![username],
        )
        .map_err(e)?;
        let n = tx
            .execute("DELETE FROM users WHERE username = ?1", params![username])
            .map_err(e)?;
        if n == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        tx.commit().map_err(e)
    }

    /// Zeroes a user's usage (totals and quota count); a running server notices and restarts its
    /// quota count.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`] if there is no such user; [`Error::Database`] otherwise.
    pub fn reset_usage(&self, username: &str) -> Result<()> {
        let n = self
            .conn
            .execute(
                "INSERT INTO usage (account_id, reset_epoch)
                    SELECT id, 1 FROM users WHERE username = ?1
                 ON CONFLICT(account_id) DO UPDATE SET bytes_up = 0, bytes_down = 0,
                    connections = 0, throttled_ms = 0, active_ms = 0, period_bytes = 0,
                    reset_epoch = reset_epoch + 1",
                params![username],
            )
            .map_err(|e| db_err(&self.path, e))?;
        if n == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        Ok(())
    }

    /// Adds the server's counters to the usage table in one transaction. `now` is unix seconds.
    /// Deltas of an account deleted meanwhile are dropped: they never reach another account,
    /// not even one added since under the same name.
    ///
    /// # Errors
    /// [`Error::Database`], e.g. when another writer holds the file past the busy timeout; the
    /// caller keeps the deltas and tries again at the next flush.
    pub fn flush_usage(&self, deltas: &[UsageDelta], now: u64) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO usage (account_id, bytes_up, bytes_down, connections, throttled_ms,
                        active_ms, last_seen, period_start, period_bytes, open_now, rate_now,
                        throttled_now, live_at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?2 + ?3, ?9, ?10, ?11, ?12
                        WHERE EXISTS (SELECT 1 FROM users WHERE id = ?1)
                     ON CONFLICT(account_id) DO UPDATE SET
                        bytes_up = bytes_up + excluded.bytes_up,
                        bytes_down = bytes_down + excluded.bytes_down,
                        connections = connections + excluded.connections,
                        throttled_ms = throttled_ms + excluded.throttled_ms,
                        active_ms = active_ms + excluded.active_ms,
                        last_seen = coalesce(excluded.last_seen, last_seen),
                        period_bytes = CASE WHEN period_start = excluded.period_start
                            THEN period_bytes + excluded.period_bytes ELSE excluded.period_bytes END,
                        period_start = excluded.period_start,
                        open_now = excluded.open_now,
                        rate_now = excluded.rate_now,
                        throttled_now = excluded.throttled_now,
                        live_at = excluded.live_at",
                )
                .map_err(e)?;
            for d in deltas {
                let seen = (d.open_now > 0 || d.bytes_up + d.bytes_down > 0).then_some(now as i64);
                // A count past i64::MAX (never in practice) is held at the maximum, not wrapped
                // to a negative number.
                let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                st.execute(params![
                    n(d.account_id),
                    n(d.bytes_up),
                    n(d.bytes_down),
                    n(d.connections),
                    n(d.throttled_ms),
                    n(d.active_ms),
                    seen,
                    n(d.period_start),
                    n(d.open_now),
                    n(d.rate_now),
                    d.throttled_now,
                    now as i64,
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Every account's usage row, with its user's name (users never seen have none).
    ///
    /// # Errors
    /// [`Error::Database`] when the table cannot be read.
    pub fn load_usage(&self) -> Result<Vec<Usage>> {
        let e = |e| db_err(&self.path, e);
        let mut st = self
            .conn
            .prepare(
                "SELECT u.username, g.bytes_up, g.bytes_down, g.connections, g.throttled_ms,
                        g.active_ms, g.last_seen, g.period_start, g.period_bytes, g.reset_epoch,
                        g.open_now, g.rate_now, g.throttled_now, g.live_at, g.account_id
                 FROM usage g JOIN users u ON u.id = g.account_id ORDER BY u.username",
            )
            .map_err(e)?;
        let rows = st
            .query_map([], |r| {
                let n = |i: usize| {
                    r.get::<_, Option<i64>>(i)
                        .map(|v| v.unwrap_or(0).max(0) as u64)
                };
                Ok(Usage {
                    account_id: n(14)?,
                    username: r.get(0)?,
                    bytes_up: n(1)?,
                    bytes_down: n(2)?,
                    connections: n(3)?,
                    throttled_ms: n(4)?,
                    active_ms: n(5)?,
                    last_seen: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
                    period_start: n(7)?,
                    period_bytes: n(8)?,
                    reset_epoch: n(9)?,
                    open_now: n(10)?,
                    rate_now: n(11)?,
                    throttled_now: r.get::<_, Option<f64>>(12)?.unwrap_or(0.0),
                    live_at: n(13)?,
                })
            })
            .map_err(e)?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e)
    }

    /// Reads every user, sorted by name. Rows that cannot be read come back as [`BadRow`]s.
    ///
    /// # Errors
    /// [`Error::Database`] when the table cannot be read at all.
    pub fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let e = |e| db_err(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT username, password_hash, bandwidth, quota_bytes, quota_period,
                        max_connections, id
                 FROM users ORDER BY username",
            )
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next().map_err(e)? {
            let mut v: [Value; 7] = std::array::from_fn(|_| Value::Null);
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = row.get(i).map_err(e)?;
            }
            match row_from_values(v) {
                Ok(u) => good.push(u),
                Err(b) => bad.push(b),
            }
        }
        Ok((good, bad))
    }

    /// A number that changes whenever another connection commits to the file: a cheap way for
    /// the server to notice edits made by `sluice user …` or the sqlite3 shell.
    ///
    /// # Errors
    /// [`Error::Database`] when the file cannot be read.
    pub fn data_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| db_err(&self.path, e))
    }
}

/// A number as SQLite's signed 64-bit integer.
fn to_sql(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{what} {v} too large")))
}

/// Makes sense of a row whatever types a hand edit left in it (SQLite columns are loosely typed).
fn row_from_values(v: [Value; 7]) -> std::result::Result<UserRow, BadRow> {
    let [name, hash, bw, quota, period, maxc, id] = v;
    let username = match name {
        Value::Text(s) => s,
        Value::Integer(i) => i.to_string(),
        other => {
            return Err(BadRow {
                username: format!("{other:?}"),
                reason: "username is not text".into(),
            });
        }
    };
    let bad = |reason: String| BadRow {
        username: username.clone(),
        reason,
    };
    let password_hash = match hash {
        Value::Text(s) => s,
        _ => return Err(bad("password_hash is not text".into())),
    };
    // The id is an INTEGER PRIMARY KEY: SQLite itself keeps it an integer.
    let id = match id {
        Value::Integer(i) if i >= 0 => i as u64,
        other => return Err(bad(format!("id {other:?} is not a number"))),
    };
    let bandwidth = number("bandwidth", bw).map_err(bad)?;
    let quota_bytes = number("quota_bytes", quota).map_err(bad)?;
    let max_connections = number("max_connections", maxc).map_err(bad)?;
    let quota_period = match period {
        Value::Text(t) => QuotaPeriod::parse(&t).map_err(bad)?,
        Value::Null => QuotaPeriod::None,
        other => return Err(bad(format!("quota_period {other:?} is not text"))),
    };
    Ok(UserRow {
        id,
        username,
        password_hash,
        bandwidth,
        quota_bytes,
        quota_period,
        max_connections,
    })
}

/// A non-negative number from a loosely typed column: an integer, a real, or text like `1M`.
fn number(what: &str, v: Value) -> std::result::Result<u64, String> {
    match v {
        Value::Integer(i) if i >= 0 => Ok(i as u64),
        Value::Integer(i) => Err(format!("negative {what} {i}")),
        Value::Real(f) if f >= 0.0 && f.is_finite() => Ok(f as u64),
        Value::Text(t) => crate::units::parse_rate(&t).map_err(|e| format!("{what}: {e}")),
        Value::Null => Ok(0),
        other => Err(format!("{what} {other:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-users-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("t.db")
    }

    #[test]
    fn add_update_delete_round_trip() {
        let path = temp_db("crud");
        let s = UserStore::open_or_create(&path).unwrap();
        s.add("u1", "h1", 1024).unwrap();
        assert!(matches!(s.add("u1", "h", 0), Err(Error::UserExists(_))));
        s.update("u1", None, Some(2048)).unwrap();
        s.update("u1", Some("h2"), None).unwrap();
        let (rows, bad) = s.load().unwrap();
        assert!(bad.is_empty());
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].password_hash.as_str(), rows[0].bandwidth),
            ("h2", 2048)
        );
        assert!(matches!(
            s.update("nobody", None, Some(1)),
            Err(Error::NoSuchUser(_))
        ));
        s.delete("u1").unwrap();
        assert!(matches!(s.delete("u1"), Err(Error::NoSuchUser(_))));
    }

    #[test]
    fn open_refuses_missing_and_garbage_files() {
        let path = temp_db("missing");
        assert!(matches!(UserStore::open(&path), Err(Error::NoDatabase(_))));
        std::fs::write(
            &path,
            b"this is not a database, just some text padding it out....",
        )
        .unwrap();
        assert!(matches!(UserStore::open(&path), Err(Error::Database(_))));
    }

    #[test]
    fn hand_edited_rows_are_read_or_reported() {
        let path = temp_db("hand");
        let s = UserStore::open_or_create(&path).unwrap();
        s.add("int", "h", 0).unwrap();
        s.add("text", "h", 0).unwrap();
        s.add("junk", "h", 0).unwrap();
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "UPDATE users SET bandwidth = '65536' WHERE username = 'int';
             UPDATE users SET bandwidth = '1M' WHERE username = 'text';
             UPDATE users SET bandwidth = 'lots' WHERE username = 'junk';",
        )
        .unwrap();
        let (rows, bad) = s.load().unwrap();
        let bw = |n: &str| rows.iter().find(|r| r.username == n).map(|r| r.bandwidth);
        assert_eq!(bw("int"), Some(65536));
        assert_eq!(bw("text"), Some(1 << 20));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].username, "junk");
    }

    #[test]
    fn data_version_moves_on_another_connections_commit() {
        let path = temp_db("dv");
        let s = UserStore::open_or_create(&path).unwrap();
        let before = s.data_version().unwrap();
        let other = UserStore::open(&path).unwrap();
        other.add("x", "h", 5).unwrap();
        assert_ne!(s.data_version().unwrap(), before);
    }

    #[test]
    fn a_version_1_database_is_upgraded_in_place() {
        let path = temp_db("v1");
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(&format!("{SCHEMA_V1} PRAGMA user_version = 1;"))
            .unwrap();
        raw.execute(
            "INSERT INTO users (username, password_hash, bandwidth) VALUES ('old', 'h', 7)",
            [],
        )
        .unwrap();
        drop(raw);
        let s = UserStore::open(&path).unwrap();
        let (rows, _) = s.load().unwrap();
        assert_eq!(
            (rows[0].bandwidth, rows[0].quota_bytes, rows[0].quota_period),
            (7, 0, QuotaPeriod::None)
        );
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn usage_flushes_add_up_and_periods_start_over() {
        let path = temp_db("usage");
        let s = UserStore::open_or_create(&path).unwrap();
        s.add("u", "h", 0).unwrap();
        let id = s.load().unwrap().0[0].id;
        let d = |up, start| UsageDelta {
            account_id: id,
            bytes_up: up,
            bytes_down: 1,
            connections: 1,
            period_start: start,
            ..UsageDelta::default()
        };
        s.flush_usage(&[d(10, 100)], 150).unwrap();
        s.flush_usage(&[d(5, 100)], 160).unwrap();
        let u = &s.load_usage().unwrap()[0];
        assert_eq!(
            (u.bytes_up, u.bytes_down, u.connections, u.period_bytes),
            (15, 2, 2, 17)
        );
        assert_eq!(u.last_seen, Some(160));
        s.flush_usage(&[d(3, 200)], 210).unwrap();
        let u = &s.load_usage().unwrap()[0];
        assert_eq!((u.bytes_up, u.period_start, u.period_bytes), (18, 200, 4));
        s.reset_usage("u").unwrap();
        let u = &s.load_usage().unwrap()[0];
        assert_eq!((u.bytes_up, u.period_bytes, u.reset_epoch), (0, 0, 1));
        assert!(matches!(s.reset_usage("nobody"), Err(Error::NoSuchUser(_))));
        s.delete("u").unwrap();
        assert!(s.load_usage().unwrap().is_empty());
    }

    /// A version-2 file: the users and usage tables keyed by name, with a usage row the
    /// by-name bug drove negative and one left by a user deleted meanwhile.
    fn version_2_file(path: &Path) {
        let raw = Connection::open(path).unwrap();
        raw.execute_batch(&format!(
            "{SCHEMA_V1} {SCHEMA_V2} PRAGMA user_version = 2;
             INSERT INTO users (username, password_hash, bandwidth, quota_bytes, quota_period)
                VALUES ('a', 'ha', 5, 1000, 'day'), ('b', 'hb', '1M', 0, 'none');
             INSERT INTO usage (username, bytes_up, bytes_down, period_start, period_bytes)
                VALUES ('a', 10, 20, 86400, 30), ('b', 7, -104857600, 0, -104857593),
                       ('gone', 1, 1, 0, 2);"
        ))
        .unwrap();
    }

    #[test]
    fn a_version_2_database_is_upgraded_in_place() {
        let path = temp_db("v2");
        version_2_file(&path);
        let s = UserStore::open(&path).unwrap();
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (rows, bad) = s.load().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        let a = &rows[0];
        assert_eq!(
            (a.username.as_str(), a.password_hash.as_str(), a.bandwidth),
            ("a", "ha", 5)
        );
        assert_eq!((a.quota_bytes, a.quota_period), (1000, QuotaPeriod::Day));
        assert_eq!(
            (rows[1].username.as_str(), rows[1].bandwidth),
            ("b", 1 << 20)
        );
        assert_ne!(a.id, rows[1].id);
        let usage = s.load_usage().unwrap();
        let names: Vec<_> = usage.iter().map(|u| u.username.as_str()).collect();
        assert_eq!(names, ["a", "b"], "the orphan row is dropped");
        assert_eq!(usage[0].account_id, a.id);
        assert_eq!((usage[0].bytes_up, usage[0].period_bytes), (10, 30));
        let neg: (i64, i64) = s
            .conn
            .query_row(
                "SELECT bytes_down, period_bytes FROM usage WHERE account_id = ?1",
                params![rows[1].id as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(neg, (0, 0), "negative counters are clamped");
        // The upgraded file behaves like a new one: new ids are never reused ones.
        s.delete("b").unwrap();
        s.add("b", "hb2", 0).unwrap();
        let (rows, _) = s.load().unwrap();
        assert!(rows[1].id > a.id.max(rows[0].id));
    }

    #[test]
    fn a_deleted_and_re_added_user_is_a_new_account_with_no_usage() {
        let path = temp_db("readd");
        let s = UserStore::open_or_create(&path).unwrap();
        s.add("keep", "h", 0).unwrap();
        s.add("dz", "h", 0).unwrap();
        let old = s.load().unwrap().0[0].id;
        let delta = |id| UsageDelta {
            account_id: id,
            bytes_down: 100,
            ..UsageDelta::default()
        };
        s.flush_usage(&[delta(old)], 10).unwrap();
        s.delete("dz").unwrap();
        s.add("dz", "h", 0).unwrap();
        let new = s.load().unwrap().0[0].id;
        assert!(new > old, "id {old} given out again");
        assert!(s.load_usage().unwrap().iter().all(|u| u.username != "dz"));
        // A flush counted before the delete lands after it: it reaches nobody.
        s.flush_usage(&[delta(old)], 11).unwrap();
        assert!(s.load_usage().unwrap().iter().all(|u| u.username != "dz"));
        s.flush_usage(&[delta(new)], 12).unwrap();
        let u = s.load_usage().unwrap();
        let dz = u.iter().find(|u| u.username == "dz").unwrap();
        assert_eq!((dz.account_id, dz.bytes_down), (new, 100));
    }

    #[test]
    fn add_with_limits_is_one_write_or_none() {
        let path = temp_db("addwith");
        let s = UserStore::open_or_create(&path).unwrap();
        let lim = UserChange {
            quota_bytes: Some(5000),
            quota_period: Some(QuotaPeriod::Month),
            max_connections: Some(3),
            ..UserChange::default()
        };
        s.add_with("q", "h", 9, &lim).unwrap();
        let r = &s.load().unwrap().0[0];
        assert_eq!(
            (
                r.bandwidth,
                r.quota_bytes,
                r.quota_period,
                r.max_connections
            ),
            (9, 5000, QuotaPeriod::Month, 3)
        );
        let huge = UserChange {
            max_connections: Some(u64::MAX),
            ..UserChange::default()
        };
        assert!(s.add_with("r", "h", 0, &huge).is_err());
        assert_eq!(s.load().unwrap().0.len(), 1, "a failed add left a user");
        assert!(matches!(
            s.add_with("q", "h", 0, &lim),
            Err(Error::UserExists(_))
        ));
    }

    #[test]
    fn a_new_database_and_its_wal_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_db("mode");
        let s = UserStore::open_or_create(&path).unwrap();
        s.add("u", "h", 0).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let p = format!("{}{suffix}", path.display());
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{p} is {mode:o}");
        }
        assert!(readable_by_others(&path).is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(readable_by_others(&path), [(path.clone(), 0o644)]);
    }

    #[test]
    fn quota_periods_start_on_utc_boundaries() {
        // 2026-11-27T12:00:00Z
        let now = 1_795_780_800;
        assert_eq!(QuotaPeriod::Day.start_of(now), 1_795_737_600);
        assert_eq!(QuotaPeriod::Month.start_of(now), 1_793_491_200); // 2026-11-01
        assert_eq!(QuotaPeriod::Month.start_of(951_782_400), 949_363_200); // 2000-02-29 → 02-01
        assert_eq!(QuotaPeriod::None.start_of(now), 0);
        assert_eq!(QuotaPeriod::parse("Month"), Ok(QuotaPeriod::Month));
        assert!(QuotaPeriod::parse("week").is_err());
    }

    #[test]
    fn unban_requests_are_taken_once() {
        let p = temp_db("unban");
        let store = UserStore::open_or_create(&p).unwrap();
        store.request_unban("192.0.2.1").unwrap();
        store.request_unban("192.0.2.1").unwrap();
        store.request_unban("2001:db8::/64").unwrap();
        let other = UserStore::open(&p).unwrap();
        let mut got = other.take_unbans().unwrap();
        got.sort();
        assert_eq!(got, ["192.0.2.1", "2001:db8::/64"]);
        assert!(other.take_unbans().unwrap().is_empty());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn newer_schema_is_refused() {
        let path = temp_db("newer");
        drop(UserStore::open_or_create(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = UserStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
