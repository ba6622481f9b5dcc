//! Who may log in: the user directory with its verify cache (`directory`), the login gate that
//! decides how many checks run and for whom (`login`), and the failed-login throttle it asks
//! (`throttle`, pure). The listeners go through `login::Logins`; the server's watcher keeps the
//! directory in step with the store.

pub mod directory;
pub mod login;
pub mod throttle;

pub use directory::{Changes, Directory, check_credential, hash_password, reload, reload_users};
