//! The user store: users, their limits and their usage, behind the [`UserStore`] trait. Logins
//! (the directory's reload), the server's watcher, usage flushes and the command line all work
//! through it and see only the plain structs of `types.rs`.
//!
//! SQLite (`sqlite.rs`, the only file with SQL or rusqlite in it) is the embedded default; Redis
//! (`redis/`, the only files with the redis crate in them) is the fleet's shared store. [`open`]
//! picks the implementation from the store's [`StoreSpec`]: a path, or a `redis://…` URL.

pub mod redis;
pub mod sqlite;
pub mod types;

pub use self::redis::conn::RedisSpec;
pub use self::types::{BadPeriod, BadRow, QuotaPeriod, Usage, UsageDelta, UserChange, UserRow};
use crate::error::Result;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a store is: an SQLite file, or a Redis (`redis://`, `rediss://`, `redis+cluster://`).
/// Shown (`Display`, `Debug`) without any password.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A Redis or a Redis Cluster.
    Redis(RedisSpec),
}

impl StoreSpec {
    /// A `redis…://` URL as a Redis spec, anything else as a path.
    ///
    /// # Errors
    /// A Redis URL that cannot be read ([`Error::Usage`](crate::error::Error::Usage), naming
    /// the accepted forms).
    pub fn parse(s: &str) -> Result<StoreSpec> {
        if RedisSpec::is_redis_url(s) {
            RedisSpec::parse(s).map(StoreSpec::Redis)
        } else {
            Ok(StoreSpec::Sqlite(PathBuf::from(s)))
        }
    }

    /// The file, for an SQLite spec.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StoreSpec::Sqlite(p) => Some(p),
            StoreSpec::Redis(_) => None,
        }
    }

    /// The Redis, for a Redis spec.
    pub fn redis(&self) -> Option<&RedisSpec> {
        match self {
            StoreSpec::Redis(r) => Some(r),
            StoreSpec::Sqlite(_) => None,
        }
    }
}

impl Default for StoreSpec {
    fn default() -> StoreSpec {
        StoreSpec::Sqlite(PathBuf::from("sluice.db"))
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Sqlite(p) => write!(f, "{}", p.display()),
            StoreSpec::Redis(r) => write!(f, "{r}"),
        }
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Sqlite(p) => write!(f, "Sqlite({p:?})"),
            StoreSpec::Redis(r) => write!(f, "{r:?}"),
        }
    }
}

impl From<PathBuf> for StoreSpec {
    fn from(p: PathBuf) -> StoreSpec {
        StoreSpec::Sqlite(p)
    }
}

impl From<&PathBuf> for StoreSpec {
    fn from(p: &PathBuf) -> StoreSpec {
        StoreSpec::Sqlite(p.clone())
    }
}

impl From<&Path> for StoreSpec {
    fn from(p: &Path) -> StoreSpec {
        StoreSpec::Sqlite(p.to_path_buf())
    }
}

impl From<&StoreSpec> for StoreSpec {
    fn from(s: &StoreSpec) -> StoreSpec {
        s.clone()
    }
}

impl From<RedisSpec> for StoreSpec {
    fn from(r: RedisSpec) -> StoreSpec {
        StoreSpec::Redis(r)
    }
}

/// What changed in a store since its last look ([`UserStore::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Nothing.
    None,
    /// These users were added, changed, deleted or had their usage reset; nobody else changed.
    /// Empty when something was written that touched no user (an unban request).
    Users(Vec<String>),
    /// Anything may have changed: read everything again (SQLite: another connection committed,
    /// or the file was replaced).
    All,
}

/// A place users, their usage and unban requests are kept. Calls block (a database round trip);
/// none is made on the relay path.
pub trait UserStore: Send {
    /// Where the store is, for messages (a path or an address; never a password).
    fn location(&self) -> String;

    /// What changed since the last call (the first call: since the store was opened), so a
    /// server that loaded the users right after opening misses no commit made meanwhile.
    ///
    /// # Errors
    /// [`Error::NoDatabase`](crate::error::Error::NoDatabase) while the store is gone (the file
    /// deleted; it is looked for again at every call); [`Error::Database`](crate::error::Error)
    /// when it cannot be read.
    fn changes(&mut self) -> Result<Changed>;

    /// Every user, sorted by name; rows that cannot be read come back as [`BadRow`]s.
    ///
    /// # Errors
    /// The store cannot be read at all.
    fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)>;

    /// Every user, in no particular order, handed to `f` one row at a time ([`BadRow`]s for rows
    /// that cannot be read), so a million users are never all in memory as rows at once. The
    /// default goes through [`UserStore::load`]; a store that can stream does better.
    ///
    /// # Errors
    /// The store cannot be read (`f` may have seen some rows already).
    fn each_user(&self, f: &mut dyn FnMut(std::result::Result<UserRow, BadRow>)) -> Result<()> {
        let (good, bad) = self.load()?;
        good.into_iter().for_each(|r| f(Ok(r)));
        bad.into_iter().for_each(|b| f(Err(b)));
        Ok(())
    }

    /// How many users there are, to size the snapshot before [`UserStore::each_user`] (0 when
    /// the store cannot say cheaply).
    ///
    /// # Errors
    /// The store cannot be read.
    fn count_users(&self) -> Result<usize> {
        Ok(0)
    }

    /// Every usage row, as [`UserStore::load_usage`] has them, handed to `f` one at a time. The
    /// default goes through `load_usage`.
    ///
    /// # Errors
    /// The store cannot be read.
    fn each_usage(&self, f: &mut dyn FnMut(Usage)) -> Result<()> {
        self.load_usage()?.into_iter().for_each(f);
        Ok(())
    }

    /// The rows of the users named (a name with no row is a deleted user and is simply not
    /// there); rows that cannot be read come back as [`BadRow`]s. The default filters
    /// [`UserStore::load`]; a store that can read single users does better.
    ///
    /// # Errors
    /// The store cannot be read.
    fn load_users(&self, names: &[String]) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
        let (good, bad) = self.load()?;
        Ok((
            good.into_iter()
                .filter(|r| names.contains(&r.username))
                .collect(),
            bad.into_iter()
                .filter(|b| names.contains(&b.username))
                .collect(),
        ))
    }

    /// Every account's usage, with its user's name (users never seen have none).
    ///
    /// # Errors
    /// The store cannot be read.
    fn load_usage(&self) -> Result<Vec<Usage>>;

    /// The usage of the users named, as [`UserStore::load_usage`] has it. The default filters
    /// that.
    ///
    /// # Errors
    /// The store cannot be read.
    fn load_usage_of(&self, names: &[String]) -> Result<Vec<Usage>> {
        let all = self.load_usage()?;
        Ok(all
            .into_iter()
            .filter(|u| names.contains(&u.username))
            .collect())
    }

    /// Drops bookkeeping of changes this store has already reported (SQLite: the change log's
    /// applied rows, once there are enough to matter). Called by the server now and then.
    ///
    /// # Errors
    /// The write failed; the rows stay until the next try.
    fn trim_changes(&mut self) -> Result<()> {
        Ok(())
    }

    /// Adds a user with the quota, period and connection cap of `limits` (its other fields are
    /// ignored) in one write, so a running server never sees the user without its limits.
    ///
    /// # Errors
    /// [`Error::UserExists`](crate::error::Error::UserExists) if the name is taken;
    /// [`Error::Invalid`](crate::error::Error::Invalid) for a number the store cannot hold.
    fn add_with(
        &self,
        username: &str,
        password_hash: &str,
        bandwidth: u64,
        limits: &UserChange,
    ) -> Result<()>;

    /// Adds a user without quota or connection cap.
    ///
    /// # Errors
    /// As [`UserStore::add_with`].
    fn add(&self, username: &str, password_hash: &str, bandwidth: u64) -> Result<()> {
        self.add_with(username, password_hash, bandwidth, &UserChange::default())
    }

    /// Applies a [`UserChange`]; fields left `None` keep their value.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`](crate::error::Error::NoSuchUser) if there is no such user.
    fn change(&self, username: &str, change: &UserChange) -> Result<()>;

    /// Deletes a user and its usage. Its account id is never given out again, so a user added
    /// later under the same name is a new account starting from zero.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`](crate::error::Error::NoSuchUser) if there is no such user.
    fn delete(&self, username: &str) -> Result<()>;

    /// Zeroes a user's usage (totals and quota count); a running server notices and restarts
    /// its quota count.
    ///
    /// # Errors
    /// [`Error::NoSuchUser`](crate::error::Error::NoSuchUser) if there is no such user.
    fn reset_usage(&self, username: &str) -> Result<()>;

    /// Adds the server's counters to the usage in one write; `now` is unix seconds. Deltas of
    /// an account deleted meanwhile are dropped, never given to another account.
    ///
    /// # Errors
    /// The write failed (e.g. another writer held the store too long); the caller keeps the
    /// deltas and tries again at its next flush.
    fn flush_usage(&self, deltas: &[UsageDelta], now: u64) -> Result<()>;

    /// Asks a running server to lift its login blocks on `source` (already canonical).
    ///
    /// # Errors
    /// The write failed.
    fn request_unban(&self, source: &str) -> Result<()>;

    /// The pending unban requests, removed as they are read (the server's side).
    ///
    /// # Errors
    /// The read failed; the requests then stay for the next try.
    fn take_unbans(&self) -> Result<Vec<String>>;

    /// Files of the store that group or others may read, with their modes: anyone who can read
    /// them has the password hashes. None for a store that is not files.
    fn readable_by_others(&self) -> Vec<(PathBuf, u32)> {
        Vec::new()
    }
}

/// Opens the store `spec` names (a path, or a [`StoreSpec`]): an SQLite file or a Redis. With
/// `create`, a missing store is created (the `user add` way); without, a missing one is an
/// error (the server's way).
///
/// # Errors
/// [`Error::NoDatabase`](crate::error::Error::NoDatabase) when the store is missing and not to
/// be created; [`Error::Database`](crate::error::Error) when it cannot be opened or reached, or
/// is not a store this build understands.
pub fn open(spec: impl Into<StoreSpec>, create: bool) -> Result<Box<dyn UserStore>> {
    match spec.into() {
        StoreSpec::Sqlite(p) if create => Ok(Box::new(sqlite::SqliteStore::open_or_create(&p)?)),
        StoreSpec::Sqlite(p) => Ok(Box::new(sqlite::SqliteStore::open(&p)?)),
        StoreSpec::Redis(r) => Ok(Box::new(redis::RedisStore::open(&r, create)?)),
    }
}
