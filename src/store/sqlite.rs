//! The SQLite [`UserStore`]: a file with one row per user. The only file with SQL or rusqlite
//! in it.
//!
//! The schema is versioned with `PRAGMA user_version` and upgraded in place. The file is opened in
//! WAL mode with a busy timeout so `sluice user …`, the sqlite3 shell and a running server share it.
//! Rows edited by hand are read defensively: a row this code cannot make sense of is reported, not
//! fatal. Password hashing and the in-memory snapshot live in `auth`.
//!
//! Changes are noticed with `PRAGMA data_version`, which moves when another connection commits
//! (this one's own writes, the server's usage flushes, do not move it). Which users changed is
//! read from the `user_changes` log, filled by triggers on `users` (and on a usage reset), so a
//! change made in the sqlite3 shell is logged like one made by `sluice user`. A reader remembers
//! the last sequence number it saw; a log trimmed past it, or too long to be worth reading, is
//! a change to everything. The file being deleted or replaced (`mv new.db users.db`) is noticed
//! by its device and inode: a deleted file is let go at once, a replacement is opened and
//! reported as a change to everything.
//!
//! Each account has an id that is never reused (`AUTOINCREMENT`): usage rows belong to an id, not
//! to a name, so a user deleted and added again under the same name starts from zero and nothing
//! counted for the old account reaches the new one.

use super::{BadRow, Changed, QuotaPeriod, Usage, UsageDelta, UserChange, UserRow, UserStore};
use crate::error::{Error, Result};
use log::{info, warn};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 4;
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
/// Version 4: the change log. Every insert, update or delete of a user, and every usage reset,
/// logs the user's name (an update that renames logs both names), whoever made it. Usage
/// flushes change neither `users` nor `reset_epoch` and log nothing. `seq` is AUTOINCREMENT so a
/// number is never given out twice, even after the log is trimmed empty.
const SCHEMA_V4: &str = "
CREATE TABLE user_changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT
);
CREATE TRIGGER user_changes_insert AFTER INSERT ON users BEGIN
    INSERT INTO user_changes (username) VALUES (new.username);
END;
CREATE TRIGGER user_changes_update AFTER UPDATE ON users BEGIN
    INSERT INTO user_changes (username) VALUES (new.username);
    INSERT INTO user_changes (username) SELECT old.username WHERE old.username IS NOT new.username;
END;
CREATE TRIGGER user_changes_delete AFTER DELETE ON users BEGIN
    INSERT INTO user_changes (username) VALUES (old.username);
END;
CREATE TRIGGER user_changes_reset AFTER UPDATE OF reset_epoch ON usage BEGIN
    INSERT INTO user_changes (username) SELECT username FROM users WHERE id = new.account_id;
END;
CREATE TRIGGER user_changes_reset_new AFTER INSERT ON usage WHEN new.reset_epoch <> 0 BEGIN
    INSERT INTO user_changes (username) SELECT username FROM users WHERE id = new.account_id;
END;";
/// Log rows past which a read of the log is not worth it: more changes than this since the last
/// look (a bulk edit) are reported as a change to everything.
pub const MAX_LOGGED_CHANGES: i64 = 1000;
/// The log is trimmed (rows already applied deleted) once this many have been applied since the
/// last trim.
pub const TRIM_AFTER: i64 = 1000;

/// Unban requests from `sluice unban`, applied and deleted by a running server. Not part of the
/// versioned schema: created on open by any build that knows it, ignored by one that does not.
const UNBANS: &str = "
CREATE TABLE IF NOT EXISTS unbans (
    source       TEXT PRIMARY KEY,
    requested_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);";

/// An open SQLite user database.
pub struct SqliteStore {
    /// `None` once the file is gone: holding a connection to a deleted file would keep its
    /// `-wal`/`-shm` files alive at the path, where a re-created database would pick them up.
    conn: Option<Connection>,
    path: PathBuf,
    /// The file's (device, inode) when opened; `None` for a `file:` URI or `:memory:`, which
    /// are not watched as files.
    identity: Option<(u64, u64)>,
    /// A file seen at the path that could not be opened (reported once).
    unreadable: Option<(u64, u64)>,
    /// `PRAGMA data_version` at the last look (`None`: not known, the next look is a change).
    version: Option<i64>,
    /// The last `user_changes` sequence number seen (read at open, before anyone loads the
    /// users).
    seen_seq: i64,
    /// `seen_seq` at the last trim of the log by this store (0: never trimmed).
    trimmed_seq: i64,
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::database(path.display(), e)
}

/// The (device, inode) of the file at `path`, if there is one.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
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

impl SqliteStore {
    /// Opens an existing database (the server's way: it never creates one).
    ///
    /// # Errors
    /// [`Error::NoDatabase`] when the file is missing; [`Error::Database`] when it is not a
    /// readable SQLite database or its schema is newer than this build.
    pub fn open(path: &Path) -> Result<SqliteStore> {
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
    pub fn open_or_create(path: &Path) -> Result<SqliteStore> {
        create_private(path);
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<SqliteStore> {
        let flags = flags | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_err(path, e))?;
        prepare(&conn, path)?;
        // Read now, before anyone loads the users, so a commit after the load is a change.
        let version = data_version(&conn, path)?;
        let seen_seq = last_seq(&conn, path)?;
        let s = path.to_string_lossy();
        let is_file = !(s.starts_with("file:") || s == ":memory:");
        Ok(SqliteStore {
            conn: Some(conn),
            path: path.to_path_buf(),
            identity: if is_file { file_identity(path) } else { None },
            unreadable: None,
            version: Some(version),
            seen_seq,
            trimmed_seq: 0,
        })
    }

    /// The path this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open connection, or [`Error::NoDatabase`] while the file is gone.
    fn conn(&self) -> Result<&Connection> {
        self.conn
            .as_ref()
            .ok_or_else(|| Error::NoDatabase(self.path.clone()))
    }

    /// Looks at the file at the path: `Ok(true)` when the connection is to the file there now
    /// (reopening a replacement first), `Ok(false)` when there is an unreadable file to ignore.
    ///
    /// # Errors
    /// [`Error::NoDatabase`] when no file is there (the connection is let go).
    fn follow_file(&mut self) -> Result<bool> {
        let Some(was) = self.identity else {
            return Ok(true); // a URI or :memory:, not a file to follow
        };
        let now = file_identity(&self.path);
        if now.is_none() {
            self.conn = None;
            return Err(Error::NoDatabase(self.path.clone()));
        }
        if now == self.unreadable {
            return Ok(false); // said so once; wait for the file to change again
        }
        if now == Some(was) && self.conn.is_some() {
            return Ok(true);
        }
        // Let go of the old file before opening the new one, for the reason on `conn`.
        self.conn = None;
        match SqliteStore::open(&self.path) {
            Ok(fresh) => {
                info!(
                    "database {} was replaced; reloading it",
                    self.path.display()
                );
                *self = SqliteStore {
                    version: None,
                    ..fresh
                };
                Ok(true)
            }
            Err(e) => {
                warn!(
                    "database {} was replaced by something unreadable ({e}); keeping the last snapshot",
                    self.path.display()
                );
                self.unreadable = now;
                Ok(false)
            }
        }
    }
}

/// Sets WAL and the busy timeout, then creates or upgrades the schema.
fn prepare(conn: &Connection, path: &Path) -> Result<()> {
    let e = |e| db_err(path, e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(e)?;
    // journal_mode answers with a row; query_row reads it. A read-only medium keeps its mode.
    let _mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(e)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(e)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(e)?;
    if version > SCHEMA_VERSION {
        return Err(Error::database(
            path.display(),
            format!(
                "schema version {version} is newer than this sluice understands ({SCHEMA_VERSION}); upgrade sluice"
            ),
        ));
    }
    if version < 1 {
        let sql = format!("BEGIN; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;");
        conn.execute_batch(&sql).map_err(e)?;
    }
    if version < 2 {
        let sql = format!("BEGIN; {SCHEMA_V2} PRAGMA user_version = 2; COMMIT;");
        conn.execute_batch(&sql).map_err(e)?;
    }
    if version < 3 {
        let sql = format!("BEGIN; {SCHEMA_V3} PRAGMA user_version = 3; COMMIT;");
        conn.execute_batch(&sql).map_err(e)?;
    }
    if version < 4 {
        let sql = format!("BEGIN; {SCHEMA_V4} PRAGMA user_version = 4; COMMIT;");
        conn.execute_batch(&sql).map_err(e)?;
    }
    conn.execute_batch(UNBANS).map_err(e)?;
    Ok(())
}

/// The highest sequence number the change log ever gave out (0 for none): AUTOINCREMENT keeps
/// it in `sqlite_sequence`, which trimming the log leaves alone.
fn last_seq(conn: &Connection, path: &Path) -> Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'user_changes'",
        [],
        |r| r.get(0),
    )
    .map_err(|e| db_err(path, e))
}

/// A name as the log or a hand edit left it (SQLite columns are loosely typed).
fn name_of(v: Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A number that moves whenever another connection commits to the file.
fn data_version(conn: &Connection, path: &Path) -> Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
        .map_err(|e| db_err(path, e))
}

impl UserStore for SqliteStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    /// When another connection committed (`sluice user …`, the sqlite3 shell), the users the
    /// change log names since the last look (none for a commit that touched no user, such as
    /// `sluice unban`); `All` when the file was replaced, the log was trimmed past the last
    /// look, or it holds more than [`MAX_LOGGED_CHANGES`] new rows.
    fn changes(&mut self) -> Result<Changed> {
        if !self.follow_file()? {
            return Ok(Changed::None);
        }
        let e = |e| db_err(&self.path, e);
        let conn = self.conn()?;
        let v = data_version(conn, &self.path)?;
        if Some(v) == self.version {
            return Ok(Changed::None);
        }
        let known = self.version.is_some();
        // Log and high-water mark read in one transaction: a commit between them cannot slip by.
        let tx = conn.unchecked_transaction().map_err(e)?;
        let hi = last_seq(&tx, &self.path)?;
        let from = self.seen_seq;
        let mut all = !known || hi < from || hi - from > MAX_LOGGED_CHANGES;
        let mut names = Vec::new();
        if !all && hi > from {
            let mut st = tx
                .prepare_cached(
                    "SELECT username FROM user_changes WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                )
                .map_err(e)?;
            let mut rows = st.query(params![from, hi]).map_err(e)?;
            let mut count = 0;
            while let Some(row) = rows.next().map_err(e)? {
                count += 1;
                match name_of(row.get(0).map_err(e)?) {
                    Some(n) if !names.contains(&n) => names.push(n),
                    Some(_) => {}
                    None => all = true, // a name no user can have: read everything
                }
            }
            // Numbers are given out without gaps (a rolled-back insert gives its number back),
            // so a missing row was deleted before it was seen: trimmed past the last look.
            all |= count != hi - from;
        }
        drop(tx);
        self.version = Some(v);
        self.seen_seq = hi;
        Ok(if all {
            Changed::All
        } else {
            Changed::Users(names)
        })
    }

    fn load_users(&self, names: &[String]) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let e = |e| db_err(&self.path, e);
        let conn = self.conn()?;
        let tx = conn.unchecked_transaction().map_err(e)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        {
            let mut st = tx
                .prepare_cached(
                    "SELECT username, password_hash, bandwidth, quota_bytes, quota_period,
                            max_connections, id
                     FROM users WHERE username = ?1",
                )
                .map_err(e)?;
            for name in names {
                let mut rows = st.query(params![name]).map_err(e)?;
                while let Some(row) = rows.next().map_err(e)? {
                    match row_from_values(values(row).map_err(e)?) {
                        Ok(u) => good.push(u),
                        Err(b) => bad.push(b),
                    }
                }
            }
        }
        drop(tx);
        Ok((good, bad))
    }

    fn load_usage_of(&self, names: &[String]) -> Result<Vec<Usage>> {
        let e = |e| db_err(&self.path, e);
        let mut st = self
            .conn()?
            .prepare_cached(&format!("{USAGE_SELECT} WHERE u.username = ?1"))
            .map_err(e)?;
        let mut out = Vec::new();
        for name in names {
            let rows = st.query_map(params![name], usage_from_row).map_err(e)?;
            for r in rows {
                out.push(r.map_err(e)?);
            }
        }
        Ok(out)
    }

    /// Deletes the log rows already applied. When that is every row (the usual case: a bulk
    /// insert of a million users leaves a million), the whole table is emptied by one unqualified
    /// `DELETE`, which SQLite does by freeing pages rather than row by row (milliseconds instead
    /// of seconds with the write lock held); the write transaction keeps a commit from adding a
    /// row between the check and the delete.
    fn trim_changes(&mut self) -> Result<()> {
        if self.seen_seq - self.trimmed_seq < TRIM_AFTER {
            return Ok(());
        }
        let e = |e| db_err(&self.path, e);
        let conn = self.conn()?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(e)?;
        let trimmed = (|| {
            let top: i64 =
                conn.query_row("SELECT coalesce(max(seq), 0) FROM user_changes", [], |r| {
                    r.get(0)
                })?;
            if top <= self.seen_seq {
                conn.execute("DELETE FROM user_changes", [])?;
            } else {
                conn.execute(
                    "DELETE FROM user_changes WHERE seq <= ?1",
                    params![self.seen_seq],
                )?;
            }
            conn.execute_batch("COMMIT")
        })();
        if let Err(err) = trimmed {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e(err));
        }
        self.trimmed_seq = self.seen_seq;
        Ok(())
    }

    fn readable_by_others(&self) -> Vec<(PathBuf, u32)> {
        readable_by_others(&self.path)
    }

    fn request_unban(&self, source: &str) -> Result<()> {
        self.conn()?
            .execute(
                "INSERT OR REPLACE INTO unbans (source) VALUES (?1)",
                params![source],
            )
            .map(|_| ())
            .map_err(|e| db_err(&self.path, e))
    }

    fn take_unbans(&self) -> Result<Vec<String>> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn()?.unchecked_transaction().map_err(e)?;
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

    fn add_with(
        &self,
        username: &str,
        password_hash: &str,
        bandwidth: u64,
        limits: &UserChange,
    ) -> Result<()> {
        let r = self.conn()?.execute(
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

    fn change(&self, username: &str, c: &UserChange) -> Result<()> {
        let n = self
            .conn()?
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

    fn delete(&self, username: &str) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn()?.unchecked_transaction().map_err(e)?;
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

    fn reset_usage(&self, username: &str) -> Result<()> {
        let n = self
            .conn()?
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

    fn flush_usage(&self, deltas: &[UsageDelta], now: u64) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let tx = self.conn()?.unchecked_transaction().map_err(e)?;
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

    fn load_usage(&self) -> Result<Vec<Usage>> {
        let e = |e| db_err(&self.path, e);
        let mut st = self
            .conn()?
            .prepare(&format!("{USAGE_SELECT} ORDER BY u.username"))
            .map_err(e)?;
        let rows = st.query_map([], usage_from_row).map_err(e)?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e)
    }

    /// A table scan in rowid order (no sort: the directory is a hash map), one row in memory at
    /// a time. One statement, so one consistent read; WAL lets writers commit meanwhile.
    fn each_user(&self, f: &mut dyn FnMut(std::result::Result<UserRow, BadRow>)) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let mut stmt = self
            .conn()?
            .prepare(
                "SELECT username, password_hash, bandwidth, quota_bytes, quota_period,
                        max_connections, id
                 FROM users",
            )
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        while let Some(row) = rows.next().map_err(e)? {
            f(row_from_values(values(row).map_err(e)?));
        }
        Ok(())
    }

    fn count_users(&self) -> Result<usize> {
        let n: i64 = self
            .conn()?
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .map_err(|e| db_err(&self.path, e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn each_usage(&self, f: &mut dyn FnMut(Usage)) -> Result<()> {
        let e = |e| db_err(&self.path, e);
        let mut st = self.conn()?.prepare(USAGE_SELECT).map_err(e)?;
        let mut rows = st.query([]).map_err(e)?;
        while let Some(row) = rows.next().map_err(e)? {
            f(usage_from_row(row).map_err(e)?);
        }
        Ok(())
    }

    fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let e = |e| db_err(&self.path, e);
        let mut stmt = self
            .conn()?
            .prepare(
                "SELECT username, password_hash, bandwidth, quota_bytes, quota_period,
                        max_connections, id
                 FROM users ORDER BY username",
            )
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next().map_err(e)? {
            match row_from_values(values(row).map_err(e)?) {
                Ok(u) => good.push(u),
                Err(b) => bad.push(b),
            }
        }
        Ok((good, bad))
    }
}

/// The usage columns [`usage_from_row`] reads, with the user's name; a caller adds the rest.
const USAGE_SELECT: &str =
    "SELECT u.username, g.bytes_up, g.bytes_down, g.connections, g.throttled_ms,
            g.active_ms, g.last_seen, g.period_start, g.period_bytes, g.reset_epoch,
            g.open_now, g.rate_now, g.throttled_now, g.live_at, g.account_id
     FROM usage g JOIN users u ON u.id = g.account_id";

/// One row of [`USAGE_SELECT`]; counters a hand edit left negative read as 0.
fn usage_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Usage> {
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
}

/// The seven user columns of a row, as stored, for [`row_from_values`].
fn values(row: &rusqlite::Row<'_>) -> rusqlite::Result<[Value; 7]> {
    let mut v: [Value; 7] = std::array::from_fn(|_| Value::Null);
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = row.get(i)?;
    }
    Ok(v)
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
        Value::Text(t) => QuotaPeriod::parse(&t).map_err(|e| bad(e.to_string()))?,
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
        let s = SqliteStore::open_or_create(&path).unwrap();
        s.add("u1", "h1", 1024).unwrap();
        assert!(matches!(s.add("u1", "h", 0), Err(Error::UserExists(_))));
        let set = |hash: Option<&str>, bandwidth| UserChange {
            password_hash: hash.map(str::to_string),
            bandwidth,
            ..UserChange::default()
        };
        s.change("u1", &set(None, Some(2048))).unwrap();
        s.change("u1", &set(Some("h2"), None)).unwrap();
        let (rows, bad) = s.load().unwrap();
        assert!(bad.is_empty());
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].password_hash.as_str(), rows[0].bandwidth),
            ("h2", 2048)
        );
        assert!(matches!(
            s.change("nobody", &set(None, Some(1))),
            Err(Error::NoSuchUser(_))
        ));
        s.delete("u1").unwrap();
        assert!(matches!(s.delete("u1"), Err(Error::NoSuchUser(_))));
    }

    #[test]
    fn open_refuses_missing_and_garbage_files() {
        let path = temp_db("missing");
        assert!(matches!(
            SqliteStore::open(&path),
            Err(Error::NoDatabase(_))
        ));
        std::fs::write(
            &path,
            b"this is not a database, just some text padding it out....",
        )
        .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(Error::Database { .. })
        ));
    }

    #[test]
    fn hand_edited_rows_are_read_or_reported() {
        let path = temp_db("hand");
        let s = SqliteStore::open_or_create(&path).unwrap();
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
    fn changes_are_another_connections_commits_not_our_own() {
        let path = temp_db("dv");
        let mut s = SqliteStore::open_or_create(&path).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::None);
        // Our own writes (the server's usage flushes) are no change to reload for.
        s.add("mine", "h", 0).unwrap();
        s.flush_usage(&[], 1).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::None);
        let other = SqliteStore::open(&path).unwrap();
        other.add("x", "h", 5).unwrap();
        // Our own user writes are logged too and come with the next commit of another
        // connection (harmless: the server writes no users).
        assert_eq!(
            s.changes().unwrap(),
            Changed::Users(vec!["mine".into(), "x".into()])
        );
        assert_eq!(s.changes().unwrap(), Changed::None, "told twice");
    }

    #[test]
    fn the_change_log_names_users_changed_by_any_connection() {
        let path = temp_db("log");
        let mut s = SqliteStore::open_or_create(&path).unwrap();
        let other = SqliteStore::open(&path).unwrap();
        other.add("a", "h", 0).unwrap();
        other.add("b", "h", 0).unwrap();
        assert_eq!(
            s.changes().unwrap(),
            Changed::Users(vec!["a".into(), "b".into()])
        );
        // A hand edit in the sqlite3 shell: another connection, plain SQL.
        let hand = Connection::open(&path).unwrap();
        hand.execute("UPDATE users SET bandwidth = 7 WHERE username = 'a'", [])
            .unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["a".into()]));
        // A rename names both; repeats come once.
        hand.execute_batch(
            "UPDATE users SET username = 'c' WHERE username = 'b';
             UPDATE users SET bandwidth = 1 WHERE username = 'c';",
        )
        .unwrap();
        assert_eq!(
            s.changes().unwrap(),
            Changed::Users(vec!["c".into(), "b".into()])
        );
        hand.execute("DELETE FROM users WHERE username = 'a'", [])
            .unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["a".into()]));
        // A usage reset is a change to its user; unban requests and usage flushes by another
        // connection are commits that name nobody.
        other.reset_usage("c").unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["c".into()]));
        other.reset_usage("c").unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["c".into()]));
        other.request_unban("192.0.2.1").unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec![]));
        let (rows, _) = other.load().unwrap();
        let delta = UsageDelta {
            account_id: rows[0].id,
            bytes_up: 5,
            ..UsageDelta::default()
        };
        other
            .flush_usage(std::slice::from_ref(&delta), 100)
            .unwrap();
        other.flush_usage(&[delta], 101).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec![]));
        assert_eq!(s.changes().unwrap(), Changed::None);
    }

    #[test]
    fn a_log_trimmed_past_the_last_look_or_too_long_is_a_change_to_everything() {
        let path = temp_db("trim");
        let mut s = SqliteStore::open_or_create(&path).unwrap();
        let mut other = SqliteStore::open(&path).unwrap();
        other.add("a", "h", 0).unwrap();
        other.add("b", "h", 0).unwrap();
        // Another reader trims rows this one has not seen.
        assert_eq!(
            other.changes().unwrap(),
            Changed::None,
            "its own writes are no change"
        );
        other.trimmed_seq = -TRIM_AFTER;
        other.seen_seq = 1;
        other.trim_changes().unwrap();
        assert_eq!(s.changes().unwrap(), Changed::All);
        // Trimming what was seen costs nothing to the reader that saw it.
        other.add("c", "h", 0).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["c".into()]));
        s.trimmed_seq = -TRIM_AFTER;
        s.trim_changes().unwrap();
        let left: i64 = s
            .conn()
            .unwrap()
            .query_row("SELECT count(*) FROM user_changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "applied rows were not trimmed");
        other.add("d", "h", 0).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["d".into()]));
        // A bulk edit past the cap is not read row by row.
        let hand = Connection::open(&path).unwrap();
        hand.execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
             INSERT INTO users (username, password_hash) SELECT 'bulk' || i, 'h' FROM n;",
            MAX_LOGGED_CHANGES + 1
        ))
        .unwrap();
        assert_eq!(s.changes().unwrap(), Changed::All);
        assert_eq!(s.changes().unwrap(), Changed::None);
    }

    #[test]
    fn load_users_reads_just_the_names_given() {
        let path = temp_db("some");
        let s = SqliteStore::open_or_create(&path).unwrap();
        s.add("a", "h", 1).unwrap();
        s.add("b", "h", 2).unwrap();
        s.reset_usage("b").unwrap();
        let names = vec!["b".to_string(), "gone".to_string()];
        let (rows, bad) = s.load_users(&names).unwrap();
        assert!(bad.is_empty());
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].username.as_str(), rows[0].bandwidth), ("b", 2));
        let usage = s.load_usage_of(&names).unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].username.as_str(), usage[0].reset_epoch), ("b", 1));
    }

    #[test]
    fn each_user_streams_what_load_reads() {
        let path = temp_db("each");
        let s = SqliteStore::open_or_create(&path).unwrap();
        s.add("a", "h", 1).unwrap();
        s.add("b", "h", 2).unwrap();
        s.reset_usage("b").unwrap();
        s.conn()
            .unwrap()
            .execute(
                "INSERT INTO users (username, password_hash, bandwidth) VALUES ('bad', 'h', 'x')",
                [],
            )
            .unwrap();
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        s.each_user(&mut |r| match r {
            Ok(u) => good.push(u),
            Err(b) => bad.push(b),
        })
        .unwrap();
        good.sort_by(|x, y| x.username.cmp(&y.username));
        assert_eq!((good, bad), s.load().unwrap());
        assert_eq!(s.count_users().unwrap(), 3);
        let mut usage = Vec::new();
        s.each_usage(&mut |u| usage.push(u)).unwrap();
        assert_eq!(usage, s.load_usage().unwrap());
        assert_eq!(usage.len(), 1);
    }

    #[test]
    fn a_commit_between_open_and_the_first_look_is_a_change() {
        let path = temp_db("dv0");
        drop(SqliteStore::open_or_create(&path).unwrap());
        let mut s = SqliteStore::open(&path).unwrap();
        SqliteStore::open(&path).unwrap().add("x", "h", 5).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["x".into()]));
    }

    #[test]
    fn a_deleted_file_is_let_go_and_a_replacement_followed() {
        let path = temp_db("gone");
        let mut s = SqliteStore::open_or_create(&path).unwrap();
        s.add("old", "h", 0).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        assert!(matches!(s.changes(), Err(Error::NoDatabase(_))));
        assert!(s.conn.is_none(), "holds on to the deleted file");
        assert!(matches!(s.flush_usage(&[], 1), Err(Error::NoDatabase(_))));
        assert!(
            matches!(s.changes(), Err(Error::NoDatabase(_))),
            "came back alone"
        );

        let fresh = path.with_file_name("fresh.db");
        SqliteStore::open_or_create(&fresh)
            .unwrap()
            .add("new", "h", 0)
            .unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::All);
        assert_eq!(s.changes().unwrap(), Changed::None);
        let (rows, _) = s.load().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].username, "new");
    }

    #[test]
    fn an_unreadable_replacement_is_ignored_until_the_file_changes_again() {
        let path = temp_db("junk");
        let mut s = SqliteStore::open_or_create(&path).unwrap();
        s.add("kept", "h", 0).unwrap();
        let junk = path.with_file_name("junk.db");
        std::fs::write(&junk, [b'x'; 4096]).unwrap();
        std::fs::rename(&junk, &path).unwrap();
        // The old file's -wal would be read as part of the new file (SQLite leaves it when the
        // file under an open connection is renamed over); a clean replacement comes without.
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let c = s.changes().unwrap();
        assert_eq!(c, Changed::None);
        assert_eq!(s.changes().unwrap(), Changed::None);
        let fresh = path.with_file_name("fresh.db");
        SqliteStore::open_or_create(&fresh)
            .unwrap()
            .add("good", "h", 0)
            .unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        assert_eq!(s.changes().unwrap(), Changed::All);
        assert_eq!(s.load().unwrap().0[0].username, "good");
    }

    #[test]
    fn open_picks_sqlite_for_a_path() {
        let path = temp_db("open");
        assert!(matches!(
            crate::store::open(&path, false).err(),
            Some(Error::NoDatabase(_))
        ));
        let s = crate::store::open(&path, true).unwrap();
        s.add("u", "h", 1).unwrap();
        assert_eq!(s.location(), path.display().to_string());
        assert_eq!(
            crate::store::open(&path, false)
                .unwrap()
                .load()
                .unwrap()
                .0
                .len(),
            1
        );
    }

    #[test]
    fn a_database_error_keeps_the_sqlite_error_as_its_source() {
        use std::error::Error as _;
        let path = temp_db("src");
        std::fs::write(&path, [b'x'; 4096]).unwrap();
        let e = SqliteStore::open(&path).err().expect("opened junk");
        let src = e.source().expect("no source");
        assert!(src.downcast_ref::<rusqlite::Error>().is_some(), "{src:?}");
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
        let s = SqliteStore::open(&path).unwrap();
        let (rows, _) = s.load().unwrap();
        assert_eq!(
            (rows[0].bandwidth, rows[0].quota_bytes, rows[0].quota_period),
            (7, 0, QuotaPeriod::None)
        );
        let v: i64 = s
            .conn()
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn usage_flushes_add_up_and_periods_start_over() {
        let path = temp_db("usage");
        let s = SqliteStore::open_or_create(&path).unwrap();
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
        let s = SqliteStore::open(&path).unwrap();
        let v: i64 = s
            .conn()
            .unwrap()
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
            .conn()
            .unwrap()
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
    fn a_version_3_database_is_upgraded_in_place_and_logs_changes() {
        let path = temp_db("v3");
        {
            let raw = Connection::open(&path).unwrap();
            raw.execute_batch(&format!(
                "{SCHEMA_V1} {SCHEMA_V2} {SCHEMA_V3} PRAGMA user_version = 3;
                 INSERT INTO users (username, password_hash, bandwidth) VALUES ('a', 'ha', 5);"
            ))
            .unwrap();
        }
        let mut s = SqliteStore::open(&path).unwrap();
        let v: i64 = s
            .conn()
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (rows, _) = s.load().unwrap();
        assert_eq!((rows[0].username.as_str(), rows[0].bandwidth), ("a", 5));
        let hand = Connection::open(&path).unwrap();
        hand.execute("UPDATE users SET bandwidth = 6 WHERE username = 'a'", [])
            .unwrap();
        assert_eq!(s.changes().unwrap(), Changed::Users(vec!["a".into()]));
    }

    #[test]
    fn a_deleted_and_re_added_user_is_a_new_account_with_no_usage() {
        let path = temp_db("readd");
        let s = SqliteStore::open_or_create(&path).unwrap();
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
        let s = SqliteStore::open_or_create(&path).unwrap();
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
        let s = SqliteStore::open_or_create(&path).unwrap();
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
    fn unban_requests_are_taken_once() {
        let p = temp_db("unban");
        let store = SqliteStore::open_or_create(&p).unwrap();
        store.request_unban("192.0.2.1").unwrap();
        store.request_unban("192.0.2.1").unwrap();
        store.request_unban("2001:db8::/64").unwrap();
        let other = SqliteStore::open(&p).unwrap();
        let mut got = other.take_unbans().unwrap();
        got.sort();
        assert_eq!(got, ["192.0.2.1", "2001:db8::/64"]);
        assert!(other.take_unbans().unwrap().is_empty());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn newer_schema_is_refused() {
        let path = temp_db("newer");
        drop(SqliteStore::open_or_create(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}
