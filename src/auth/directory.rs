//! The user directory: the in-memory snapshot of the users and password checks with a
//! verified-credential cache.
//!
//! The cache is keyed by user and source and keeps an HMAC of the password under a per-process
//! random key, never the password. How many checks run at once, and who may try, is `login.rs`'s
//! and `throttle.rs`'s business.
//!
//! Logins and limits read only the snapshot, so a database locked by a long write never stalls a
//! relay or a login. [`reload`] applies the store to it: new rates to the limiter and the
//! accounts, deleted users revoked, changed password hashes dropped from the cache. The server's
//! watcher (`server::watcher`) calls it when the store changes; the store itself is `store`'s.

use crate::error::{Error, Result};
use crate::flow::account::Account;
use crate::flow::limiter::Limiter;
use crate::flow::usage;
use crate::net::source::Source;
use crate::store::{UserRow, UserStore};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use log::warn;
use parking_lot::{Mutex, RwLock};
use ring::hmac;
use ring::rand::SystemRandom;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest username or password accepted (the RFC 1929 limit).
pub const MAX_CREDENTIAL_LEN: usize = 255;

/// Checks a username or password against the rules: 1..=255 bytes, no control characters.
///
/// # Errors
/// [`Error::Invalid`] naming the rule broken.
pub fn check_credential(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_CREDENTIAL_LEN {
        return Err(Error::Invalid(format!("{what} must be 1 to 255 bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

/// Hashes a password as an argon2id PHC string with a random salt (blocking, ~tens of ms).
///
/// # Errors
/// [`Error::Invalid`] if the hasher refuses (it should not for 1..=255-byte input).
pub fn hash_password(password: &str) -> Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Invalid(format!("cannot hash password: {e}")))
}

struct Entry {
    hash: String,
    account: Arc<Account>,
}

/// A keyed digest of a password: what the verify cache keeps instead of the password.
pub type Digest = [u8; 32];

/// A verification remembered for one user at one source.
struct Verified {
    hash: String,
    digest: Digest,
    at: Instant,
}

/// What the verify cache says about a login.
pub enum Cached {
    /// These credentials verified from this source against the current hash.
    Hit(Arc<Account>),
    /// Other credentials verified from this source: these are wrong.
    Mismatch,
    /// Nothing known for this user at this source.
    Unknown,
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Users new to the snapshot.
    pub added: usize,
    /// Users whose bandwidth or password hash changed.
    pub changed: usize,
    /// Users gone from the database (their connections were closed).
    pub removed: usize,
}

/// A cached verification unused for this long is dropped (it only saves one argon2 run).
pub const CACHE_TTL: Duration = Duration::from_secs(3600);
/// Cached verifications held at most; past it, the oldest half go.
pub const MAX_CACHED: usize = 65_536;

/// The in-memory snapshot of the users and the verified-credential cache.
pub struct Directory {
    users: RwLock<HashMap<String, Entry>>,
    /// Keyed by user and source: a verification from one address is no use to another.
    cache: Mutex<HashMap<(String, Source), Verified>>,
    limiter: Arc<Limiter>,
    /// A hash to verify against for unknown users, so they cost the same time as known ones.
    dummy_hash: String,
    /// HMAC-SHA256 under a random per-process key: the cache holds no password.
    digest_key: hmac::Key,
    /// argon2 verifications run since start.
    argon2_runs: AtomicU64,
}

/// Most argon2 verifications running at once. Each holds ~19 MiB; a burst of new logins (or a
/// crowd of guessers on many addresses) queues here instead of taking gigabytes.
pub const MAX_CONCURRENT_ARGON2: usize = 4;

/// The hash unknown users are checked against: made once at start, and checked to parse, so an
/// unknown user always costs an argon2 run.
///
/// # Errors
/// The hasher failed or made something that does not parse: the server must not start.
pub fn dummy_hash(hasher: impl Fn(&str) -> Result<String>) -> Result<String> {
    // Random enough per process: nobody can log in with it; it is only ever verified against.
    let dummy = format!("sluice-dummy-{:?}-{}", Instant::now(), std::process::id());
    let hash = hasher(&dummy).map_err(|e| {
        Error::Invalid(format!(
            "cannot make the hash unknown users are checked against: {e}"
        ))
    })?;
    PasswordHash::new(&hash).map_err(|e| {
        Error::Invalid(format!(
            "the hash unknown users are checked against does not parse: {e}"
        ))
    })?;
    Ok(hash)
}

impl Directory {
    /// An empty directory feeding `limiter`.
    ///
    /// # Errors
    /// The dummy hash or the digest key cannot be made (see [`dummy_hash`]).
    pub fn new(limiter: Arc<Limiter>) -> Result<Arc<Directory>> {
        Self::with_hasher(limiter, hash_password)
    }

    /// As [`Directory::new`], with the dummy hash made by `hasher`.
    ///
    /// # Errors
    /// As [`Directory::new`].
    pub fn with_hasher(
        limiter: Arc<Limiter>,
        hasher: impl Fn(&str) -> Result<String>,
    ) -> Result<Arc<Directory>> {
        let digest_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| Error::Invalid("cannot make a random key for the verify cache".into()))?;
        Ok(Arc::new(Directory {
            users: RwLock::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            limiter,
            dummy_hash: dummy_hash(hasher)?,
            digest_key,
            argon2_runs: AtomicU64::new(0),
        }))
    }

    /// How many users the snapshot holds.
    pub fn len(&self) -> usize {
        self.users.read().len()
    }

    /// True when there are no users.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// argon2 verifications run since start.
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    /// Every account in the snapshot, sorted by name.
    pub fn accounts(&self) -> Vec<Arc<Account>> {
        let mut v: Vec<_> = self
            .users
            .read()
            .values()
            .map(|e| e.account.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The account of `name`, if the snapshot has the user.
    pub fn account(&self, name: &str) -> Option<Arc<Account>> {
        self.users.read().get(name).map(|e| e.account.clone())
    }

    fn forget(&self, name: &str) {
        self.cache.lock().retain(|(n, _), _| n != name);
    }

    /// Replaces the snapshot with `rows`, applying rate changes, revocations and cache drops.
    pub fn apply(&self, rows: Vec<UserRow>) -> Changes {
        let mut changes = Changes::default();
        let mut users = self.users.write();
        let mut fresh: HashMap<String, Entry> = HashMap::with_capacity(rows.len());
        for row in rows {
            let old = users.remove(&row.username);
            let (name, entry) = self.update(old, row, &mut changes);
            fresh.insert(name, entry);
        }
        for (name, gone) in users.drain() {
            self.remove(&name, &gone, &mut changes);
        }
        *users = fresh;
        changes
    }

    /// Applies `rows` and the deletion of `deleted` to those users alone, each exactly as
    /// [`Directory::apply`] would; everyone else's entry is left as it is. A name in both
    /// counts as its row.
    pub fn apply_users(&self, rows: Vec<UserRow>, deleted: &[String]) -> Changes {
        let mut changes = Changes::default();
        let mut users = self.users.write();
        for name in deleted {
            if rows.iter().any(|r| &r.username == name) {
                continue;
            }
            if let Some(gone) = users.remove(name) {
                self.remove(name, &gone, &mut changes);
            }
        }
        for row in rows {
            let old = users.remove(&row.username);
            let (name, entry) = self.update(old, row, &mut changes);
            users.insert(name, entry);
        }
        changes
    }

    /// One user's step of a reload: `row` over the entry it had (if any). The same id keeps
    /// its account (new rate and limits, the cache dropped if the hash changed); a new id is a
    /// new account and the old one goes like a deleted one.
    fn update(&self, old: Option<Entry>, row: UserRow, changes: &mut Changes) -> (String, Entry) {
        let entry = match old {
            Some(old) if old.account.id == row.id => {
                let moved = old.account.rate() != row.bandwidth || old.hash != row.password_hash;
                changes.changed += usize::from(moved);
                if old.hash != row.password_hash {
                    self.forget(&row.username);
                }
                old.account.set_rate(row.bandwidth);
                old.account
                    .set_limits(row.quota_bytes, row.quota_period, row.max_connections);
                Entry {
                    hash: row.password_hash,
                    account: old.account,
                }
            }
            replaced => {
                // Same name, new id: the user was deleted and added again. The old account
                // goes like any deleted one (its bucket, keyed by name, is reused).
                if let Some(old) = replaced {
                    changes.removed += 1;
                    self.forget(&row.username);
                    old.account.revoke();
                }
                changes.added += 1;
                let account = Account::new(row.id, &row.username, row.bandwidth);
                account.set_limits(row.quota_bytes, row.quota_period, row.max_connections);
                Entry {
                    account,
                    hash: row.password_hash,
                }
            }
        };
        self.limiter
            .set_rate(&entry.account.name, entry.account.rate());
        (row.username, entry)
    }

    /// One user's step of a reload for a user gone from the store: its connections closed, its
    /// bucket and cached logins dropped.
    fn remove(&self, name: &str, gone: &Entry, changes: &mut Changes) {
        changes.removed += 1;
        self.forget(name);
        gone.account.revoke();
        self.limiter.remove(name);
    }

    /// The keyed digest of a password (cheap: one HMAC).
    pub fn digest(&self, password: &[u8]) -> Digest {
        let tag = hmac::sign(&self.digest_key, password);
        let mut d = [0u8; 32];
        d.copy_from_slice(tag.as_ref());
        d
    }

    fn lookup(&self, username: &[u8]) -> Option<(String, String, Arc<Account>)> {
        let name = std::str::from_utf8(username).ok()?;
        let users = self.users.read();
        users
            .get(name)
            .map(|e| (name.to_string(), e.hash.clone(), e.account.clone()))
    }

    /// What the verify cache knows of these credentials at `src`. Never runs argon2.
    pub fn cached(&self, username: &[u8], src: Source, digest: &Digest) -> Cached {
        let Some((name, hash, account)) = self.lookup(username) else {
            return Cached::Unknown;
        };
        let mut cache = self.cache.lock();
        let Some(v) = cache.get_mut(&(name, src)) else {
            return Cached::Unknown;
        };
        let now = Instant::now();
        if v.hash != hash || now.saturating_duration_since(v.at) >= CACHE_TTL {
            return Cached::Unknown;
        }
        if constant_time_eq(&v.digest, digest) {
            v.at = now;
            Cached::Hit(account)
        } else {
            Cached::Mismatch
        }
    }

    /// Checks a username and password with argon2 (blocking, tens of milliseconds; the caller
    /// bounds how many run at once) and remembers a success for `src`. Unknown users are checked
    /// against the dummy hash, so they cost the same time as wrong passwords.
    pub fn check(
        &self,
        username: &[u8],
        password: &[u8],
        src: Source,
        digest: &Digest,
    ) -> Option<Arc<Account>> {
        let Some((name, hash, account)) = self.lookup(username) else {
            self.argon2_check(&self.dummy_hash, password);
            return None;
        };
        if !self.argon2_check(&hash, password) {
            return None;
        }
        self.remember(name, src, hash, *digest);
        Some(account)
    }

    fn remember(&self, name: String, src: Source, hash: String, digest: Digest) {
        let now = Instant::now();
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, v| now.saturating_duration_since(v.at) < CACHE_TTL);
        }
        if cache.len() >= MAX_CACHED {
            let mut ats: Vec<Instant> = cache.values().map(|v| v.at).collect();
            let mid = ats.len() / 2;
            let cut = *ats.select_nth_unstable(mid).1;
            cache.retain(|_, v| v.at > cut);
        }
        cache.insert(
            (name, src),
            Verified {
                hash,
                digest,
                at: now,
            },
        );
    }

    /// Checks credentials from nowhere in particular: the cache first, then argon2 (unbounded;
    /// for tools and tests, not for a listener — that goes through `login::Logins`).
    pub fn verify(&self, username: &[u8], password: &[u8]) -> Option<Arc<Account>> {
        let src = Source::of(IpAddr::from([0, 0, 0, 0]));
        let digest = self.digest(password);
        match self.cached(username, src, &digest) {
            Cached::Hit(a) => Some(a),
            _ => self.check(username, password, src, &digest),
        }
    }

    fn argon2_check(&self, hash: &str, password: &[u8]) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => {
                self.argon2_runs.fetch_add(1, Ordering::Relaxed);
                Argon2::default().verify_password(password, &parsed).is_ok()
            }
            Err(e) => {
                warn!("stored password hash is not a valid PHC string ({e}); login refused");
                false
            }
        }
    }

    /// The cached secret for `name` at `src`, for tests that check what the cache keeps.
    #[cfg(test)]
    fn cached_secret(&self, name: &str, src: Source) -> Option<Vec<u8>> {
        let cache = self.cache.lock();
        cache
            .get(&(name.to_string(), src))
            .map(|v| v.digest.to_vec())
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Loads the store into the directory, logging rows that cannot be used, and applies the usage
/// rows (quota counts, resets).
///
/// # Errors
/// The tables cannot be read.
pub fn reload(store: &dyn UserStore, dir: &Directory) -> Result<Changes> {
    let (rows, bad) = store.load()?;
    let usage = store.load_usage()?;
    for b in bad {
        warn!("user {:?} ignored: {}", b.username, b.reason);
    }
    let changes = dir.apply(rows);
    usage::apply_usage(&dir.accounts(), &usage, usage::unix_now());
    Ok(changes)
}

/// Loads the users `names` from the store into the directory, as [`reload`] would for them
/// (a name without a usable row is a deleted user), and applies their usage rows.
///
/// # Errors
/// The tables cannot be read.
pub fn reload_users(store: &dyn UserStore, dir: &Directory, names: &[String]) -> Result<Changes> {
    let (rows, bad) = store.load_users(names)?;
    let usage = store.load_usage_of(names)?;
    for b in bad {
        warn!("user {:?} ignored: {}", b.username, b.reason);
    }
    let deleted: Vec<String> = names
        .iter()
        .filter(|n| !rows.iter().any(|r| &r.username == *n))
        .cloned()
        .collect();
    let changes = dir.apply_users(rows, &deleted);
    let touched: Vec<Arc<Account>> = {
        let users = dir.users.read();
        names
            .iter()
            .filter_map(|n| users.get(n).map(|e| e.account.clone()))
            .collect()
    };
    usage::apply_usage(&touched, &usage, usage::unix_now());
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, hash: &str, bw: u64) -> UserRow {
        UserRow {
            id: name.bytes().map(u64::from).sum(),
            username: name.into(),
            password_hash: hash.into(),
            bandwidth: bw,
            quota_bytes: 0,
            quota_period: crate::store::QuotaPeriod::None,
            max_connections: 0,
        }
    }

    #[test]
    fn credentials_follow_the_rules() {
        assert!(check_credential("username", "a b ü").is_ok());
        assert!(check_credential("username", "").is_err());
        assert!(check_credential("username", &"x".repeat(256)).is_err());
        assert!(check_credential("password", "a\tb").is_err());
    }

    #[test]
    fn verify_uses_the_cache_and_drops_it_when_the_hash_changes() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        let h1 = hash_password("pw1").unwrap();
        dir.apply(vec![row("u", &h1, 0)]);
        assert!(dir.verify(b"u", b"pw1").is_some());
        let t = Instant::now();
        assert!(dir.verify(b"u", b"pw1").is_some());
        assert!(
            t.elapsed() < Duration::from_millis(5),
            "cached login ran argon2"
        );
        assert!(dir.verify(b"u", b"wrong").is_none());
        assert!(dir.verify(b"nobody", b"pw1").is_none());
        let h2 = hash_password("pw2").unwrap();
        let c = dir.apply(vec![row("u", &h2, 0)]);
        assert_eq!(c.changed, 1);
        assert!(
            dir.verify(b"u", b"pw1").is_none(),
            "old password still accepted"
        );
        assert!(dir.verify(b"u", b"pw2").is_some());
    }

    #[test]
    fn apply_revokes_deleted_users_and_updates_rates() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        let h = hash_password("p").unwrap();
        dir.apply(vec![row("a", &h, 100), row("b", &h, 0)]);
        let a = dir.verify(b"a", b"p").unwrap();
        let c = dir.apply(vec![row("b", &h, 5)]);
        assert_eq!(
            c,
            Changes {
                added: 0,
                changed: 1,
                removed: 1
            }
        );
        assert!(a.is_revoked());
        assert_eq!(dir.accounts()[0].rate(), 5);
    }

    #[test]
    fn a_re_added_user_is_a_new_account() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        let h = hash_password("p").unwrap();
        dir.apply(vec![row("dz", &h, 0)]);
        let old = dir.verify(b"dz", b"p").unwrap();
        let again = UserRow {
            id: old.id + 1,
            ..row("dz", &h, 0)
        };
        let c = dir.apply(vec![again]);
        assert_eq!((c.added, c.removed), (1, 1));
        assert!(old.is_revoked());
        let new = dir.verify(b"dz", b"p").unwrap();
        assert!(!Arc::ptr_eq(&old, &new) && !new.is_revoked());
        assert_eq!(new.id, old.id + 1);
    }

    /// Each touched user's account: id, rate, revoked, and whether `before` still is it.
    fn outcome(
        dir: &Directory,
        name: &str,
        before: &Arc<Account>,
    ) -> (Option<(u64, u64)>, bool, bool) {
        let now = dir.accounts().into_iter().find(|a| &*a.name == name);
        (
            now.as_ref().map(|a| (a.id, a.rate())),
            before.is_revoked(),
            now.is_some_and(|a| Arc::ptr_eq(&a, before)),
        )
    }

    #[test]
    fn apply_users_does_to_the_users_named_what_apply_does_and_nothing_else() {
        let h = hash_password("p").unwrap();
        let h2 = hash_password("q").unwrap();
        let start = || {
            vec![
                row("keep", &h, 1),
                row("rate", &h, 1),
                row("pw", &h, 1),
                row("del", &h, 1),
                row("again", &h, 1),
            ]
        };
        let touched = ["rate", "pw", "del", "again", "new"];
        let new_rows = || {
            vec![
                row("rate", &h, 9),
                row("pw", &h2, 1),
                UserRow {
                    id: 999,
                    ..row("again", &h, 1)
                },
                row("new", &h, 3),
            ]
        };
        let (whole, part) = (
            Directory::new(Limiter::new(Duration::from_millis(10))).unwrap(),
            Directory::new(Limiter::new(Duration::from_millis(10))).unwrap(),
        );
        whole.apply(start());
        part.apply(start());
        let olds = |d: &Directory| {
            let v: Vec<Arc<Account>> = ["keep", "rate", "pw", "del", "again"]
                .iter()
                .map(|n| d.verify(n.as_bytes(), b"p").unwrap())
                .collect();
            v
        };
        let (whole_old, part_old) = (olds(&whole), olds(&part));
        let mut everyone = new_rows();
        everyone.push(row("keep", &h, 1));
        let c1 = whole.apply(everyone);
        let deleted = vec!["del".to_string()];
        let c2 = part.apply_users(new_rows(), &deleted);
        assert_eq!(c1, c2);
        assert_eq!(
            c2,
            Changes {
                added: 2,
                changed: 2,
                removed: 2
            }
        );
        for (i, name) in ["keep", "rate", "pw", "del", "again"].iter().enumerate() {
            assert_eq!(
                outcome(&whole, name, &whole_old[i]),
                outcome(&part, name, &part_old[i]),
                "{name}"
            );
        }
        for name in touched {
            assert_eq!(
                whole
                    .verify(name.as_bytes(), b"p")
                    .map(|a| (a.id, a.rate())),
                part.verify(name.as_bytes(), b"p").map(|a| (a.id, a.rate())),
                "{name}"
            );
        }
        // The untouched user keeps the very same account.
        let keep = part
            .accounts()
            .into_iter()
            .find(|a| &*a.name == "keep")
            .unwrap();
        assert!(Arc::ptr_eq(&keep, &part_old[0]));
        assert!(
            part.verify(b"pw", b"p").is_none(),
            "the old password still works"
        );
        assert!(part_old[3].is_revoked() && part_old[4].is_revoked());
        assert_eq!(part.len(), 5);
    }

    #[test]
    fn a_corrupt_hash_refuses_without_panicking() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        dir.apply(vec![row("x", "not-a-phc-string", 0)]);
        assert!(dir.verify(b"x", b"anything").is_none());
        assert!(dir.verify(&[0xff, 0xfe], b"p").is_none());
    }

    #[test]
    fn the_verify_cache_keeps_a_keyed_digest_not_the_password() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        let pw = b"correct horse battery";
        dir.apply(vec![row(
            "u",
            &hash_password("correct horse battery").unwrap(),
            0,
        )]);
        assert!(dir.verify(b"u", pw).is_some());
        let src = Source::of(IpAddr::from([0, 0, 0, 0]));
        let kept = dir.cached_secret("u", src).expect("nothing cached");
        assert!(
            !kept.windows(pw.len()).any(|w| w == pw),
            "the cache holds the password"
        );
        // Keyed: another process (another key) makes another digest of the same password.
        let other = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        assert_ne!(other.digest(pw).to_vec(), kept);
    }

    #[test]
    fn the_verify_cache_is_per_source() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        dir.apply(vec![row("u", &hash_password("pw").unwrap(), 0)]);
        let (a, b) = (
            Source::of("192.0.2.1".parse().unwrap()),
            Source::of("192.0.2.2".parse().unwrap()),
        );
        let d = dir.digest(b"pw");
        assert!(dir.check(b"u", b"pw", a, &d).is_some());
        assert!(matches!(dir.cached(b"u", a, &d), Cached::Hit(_)));
        assert!(matches!(
            dir.cached(b"u", a, &dir.digest(b"no")),
            Cached::Mismatch
        ));
        assert!(matches!(dir.cached(b"u", b, &d), Cached::Unknown));
    }

    #[test]
    fn a_dummy_hash_that_cannot_be_made_stops_the_start() {
        let lim = Limiter::new(Duration::from_millis(10));
        let failing = |_: &str| Err(Error::Invalid("no memory".into()));
        let e = Directory::with_hasher(lim.clone(), failing)
            .err()
            .expect("started without a dummy hash");
        assert!(e.to_string().contains("unknown users"), "{e}");
        let garbage = |_: &str| Ok(String::new());
        assert!(
            Directory::with_hasher(lim, garbage).is_err(),
            "an empty dummy hash was taken"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
