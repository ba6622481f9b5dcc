//! The user store: an SQLite file with one row per user. The only file with SQL in it.
//!
//! The schema is versioned with `PRAGMA user_version` and upgraded in place. The file is opened in
//! WAL mode with a busy timeout so `sluice user …`, the sqlite3 shell and a running server share it.
//! Rows edited by hand are read defensively: a row this code cannot make sense of is reported, not
//! fatal. Password hashing and the in-memory snapshot live in `auth.rs`.

use crate::error::{Error, Result};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;
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

/// One user as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The login name (1..=255 bytes, no control characters).
    pub username: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Bytes per second, both directions together, all connections together; 0 = unlimited.
    pub bandwidth: u64,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("username", &self.username)
            .field("bandwidth", &self.bandwidth)
            .finish_non_exhaustive()
    }
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

    /// Opens a database, creating the file and schema when missing (the `user add` way).
    ///
    /// # Errors
    /// [`Error::Database`] when the file cannot be created or is not a database.
    pub fn open_or_create(path: &Path) -> Result<UserStore> {
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
        Ok(())
    }

    /// The path this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a user.
    ///
    /// # Errors
    /// [`Error::UserExists`] if the name is taken; [`Error::Database`] otherwise.
    pub fn add(&self, username: &str, password_hash: &str, bandwidth: u64) -> Result<()> {
        let bw = to_sql_rate(bandwidth)?;
        let r = self.conn.execute(
            "INSERT INTO users (username, password_hash, bandwidth) VALUES (?1, ?2, ?3)",
            params![username, password_hash, bw],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
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
        let bw = bandwidth.map(to_sql_rate).transpose()?;
        let n = self
            .conn
            .execute(
                "UPDATE users SET password_hash = coalesce(?2, password_hash),
                        bandwidth = coalesce(?3, bandwidth),
                        updated_at = strftime('%s','now')
                 WHERE username = ?1",
                params![username, hash, bw],
            )
            .map_err(|e| db_err(&self.path, e))?;
        if n == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        Ok(())
    }

    /// Deletes a user.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`] if there is no such user; [`Error::Database`] otherwise.
    pub fn delete(&self, username: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM users WHERE username = ?1", params![username])
            .map_err(|e| db_err(&self.path, e))?;
        if n == 0 {
            return Err(Error::NoSuchUser(username.to_string()));
        }
        Ok(())
    }

    /// Reads every user, sorted by name. Rows that cannot be read come back as [`BadRow`]s.
    ///
    /// # Errors
    /// [`Error::Database`] when the table cannot be read at all.
    pub fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let e = |e| db_err(&self.path, e);
        let mut stmt = self
            .conn
            .prepare("SELECT username, password_hash, bandwidth FROM users ORDER BY username")
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next().map_err(e)? {
            let name: Value = row.get(0).map_err(e)?;
            let hash: Value = row.get(1).map_err(e)?;
            let bw: Value = row.get(2).map_err(e)?;
            match row_from_values(name, hash, bw) {
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

fn to_sql_rate(bandwidth: u64) -> Result<i64> {
    i64::try_from(bandwidth).map_err(|_| Error::Invalid(format!("bandwidth {bandwidth} too large")))
}

/// Makes sense of a row whatever types a hand edit left in it (SQLite columns are loosely typed).
fn row_from_values(name: Value, hash: Value, bw: Value) -> std::result::Result<UserRow, BadRow> {
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
    let bandwidth = match bw {
        Value::Integer(i) if i >= 0 => i as u64,
        Value::Integer(i) => return Err(bad(format!("negative bandwidth {i}"))),
        Value::Real(f) if f >= 0.0 && f.is_finite() => f as u64,
        Value::Text(t) => crate::units::parse_rate(&t).map_err(bad)?,
        Value::Null => 0,
        other => return Err(bad(format!("bandwidth {other:?} is not a number"))),
    };
    Ok(UserRow {
        username,
        password_hash,
        bandwidth,
    })
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
