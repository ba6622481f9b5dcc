//! The crate-level error: what can stop a command or the server from starting.
//!
//! Protocol decoders have their own small enums (`SocksError`, `HttpError`); this one is for the
//! command line, the user store and start-up, and `main.rs` maps it to one line and an exit code.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything a command can fail with.
#[derive(Debug)]
pub enum Error {
    /// The command line was wrong (exit 2); the text names the accepted forms.
    Usage(String),
    /// No database file where one was expected.
    NoDatabase(PathBuf),
    /// The user store could not be opened, read or written.
    Database {
        /// Where the store is (its path), as shown to people.
        at: String,
        /// What the store's engine said; kept whole for [`std::error::Error::source`].
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `user add` for a name that is taken.
    UserExists(String),
    /// `user set` / `user del` for a name that is not there.
    NoSuchUser(String),
    /// A value that breaks a rule (bad username, bad password, bad rate).
    Invalid(String),
    /// A socket or file operation failed; the text says which.
    Io(String, io::Error),
}

impl Error {
    /// A store error at `at` (a path or address) caused by `source`: the engine's own error, or
    /// a message saying what is wrong with the store.
    pub fn database(
        at: impl fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Database {
            at: at.to_string(),
            source: source.into(),
        }
    }

    /// The process exit status this error maps to: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(s) => write!(f, "usage: {s}"),
            Error::NoDatabase(p) => write!(
                f,
                "no database at {}: create a user first with `sluice user add NAME --db {}`",
                p.display(),
                p.display()
            ),
            Error::Database { at, source } => write!(f, "database: {at}: {source}"),
            Error::UserExists(u) => write!(f, "user {u:?} already exists (use `sluice user set`)"),
            Error::NoSuchUser(u) => write!(f, "no user {u:?} (see `sluice user list`)"),
            Error::Invalid(s) => f.write_str(s),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database { source, .. } => Some(&**source),
            Error::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_database_error_keeps_its_source() {
        let cause = io::Error::other("disk on fire");
        let e = Error::database("/var/lib/sluice.db", cause);
        assert_eq!(e.to_string(), "database: /var/lib/sluice.db: disk on fire");
        let src = e.source().expect("the cause was dropped");
        assert!(src.downcast_ref::<io::Error>().is_some(), "{src:?}");
    }
}
