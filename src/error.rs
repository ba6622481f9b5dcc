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
    /// The database could not be opened, read or written.
    Database(String),
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
            Error::Database(s) => write!(f, "database: {s}"),
            Error::UserExists(u) => write!(f, "user {u:?} already exists (use `sluice user set`)"),
            Error::NoSuchUser(u) => write!(f, "no user {u:?} (see `sluice user list`)"),
            Error::Invalid(s) => f.write_str(s),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for results carrying [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
