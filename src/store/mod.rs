//! The user store: users, their limits and their usage, behind the [`UserStore`] trait. Logins
//! (the directory's reload), the server's watcher, usage flushes and the command line all work
//! through it and see only the plain structs of `types.rs`.
//!
//! SQLite (`sqlite.rs`, the only file with SQL or rusqlite in it) is the one implementation
//! today; [`open`] picks the implementation from the store's spec, so another one (Redis for a
//! `redis://…` spec) slots in beside it.

pub mod redis_conns;
pub mod redis_lease;
pub mod sqlite;
pub mod types;

pub use self::types::{BadPeriod, BadRow, QuotaPeriod, Usage, UsageDelta, UserChange, UserRow};
use crate::error::Result;
use std::path::{Path, PathBuf};

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

/// Opens the store `spec` names: today always an SQLite file. With `create`, a missing file is
/// created (the `user add` way); without, a missing one is an error (the server's way).
///
/// # Errors
/// [`Error::NoDatabase`](crate::error::Error::NoDatabase) when the file is missing and not to be
/// created; [`Error::Database`](crate::error::Error) when it cannot be opened or is not a store
/// this build understands.
pub fn open(spec: &Path, create: bool) -> Result<Box<dyn UserStore>> {
    let store = if create {
        sqlite::SqliteStore::open_or_create(spec)?
    } else {
        sqlite::SqliteStore::open(spec)?
    };
    Ok(Box::new(store))
}
