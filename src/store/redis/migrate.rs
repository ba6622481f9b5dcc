//! `sluice migrate`: copies a store's users (hashes, limits and account ids as they are) and
//! their usage into a Redis store. A user whose name the target already has is left alone, so a
//! second run changes nothing.

use super::RedisStore;
use crate::error::Result;
use crate::store::{BadRow, UserStore};

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Users copied, with their account ids in the target.
    pub copied: Vec<(String, u64)>,
    /// Of those, how many had a usage row copied with them.
    pub with_usage: usize,
    /// Users copied under a new account id (their old one was taken in the target).
    pub renumbered: Vec<String>,
    /// Users the target already had: left as they are.
    pub skipped: Vec<String>,
    /// Rows of the source that could not be read: not copied.
    pub unreadable: Vec<BadRow>,
}

/// Copies every user of `from`, with its usage, into `to`.
///
/// # Errors
/// Either store failed; users copied before the failure stay (a rerun copies the rest).
pub fn migrate(from: &dyn UserStore, to: &RedisStore) -> Result<Migrated> {
    let (rows, unreadable) = from.load()?;
    let usage = from.load_usage()?;
    let mut m = Migrated {
        unreadable,
        ..Migrated::default()
    };
    for row in &rows {
        let u = usage.iter().find(|u| u.account_id == row.id);
        match to.import(row, u)? {
            None => m.skipped.push(row.username.clone()),
            Some(id) => {
                if id != row.id {
                    m.renumbered.push(row.username.clone());
                }
                if u.is_some() {
                    m.with_usage += 1;
                }
                m.copied.push((row.username.clone(), id));
            }
        }
    }
    Ok(m)
}
