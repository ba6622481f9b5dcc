//! Who may log in: the in-memory snapshot of the users, password checks with a verified-credential
//! cache, and the watcher thread that keeps the snapshot in step with the database.
//!
//! Logins and limits read only the snapshot, so a database locked by a long write never stalls a
//! relay or a login. The watcher polls `PRAGMA data_version`, reloads on a change, and applies the
//! difference: new rates to the limiter and the accounts, deleted users revoked, changed password
//! hashes dropped from the cache. SQL stays in `users.rs`.

use crate::account::Account;
use crate::error::{Error, Result};
use crate::limiter::Limiter;
use crate::usage::{self, Accountant};
use crate::users::{UserRow, UserStore};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use log::{info, warn};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Longest username or password accepted (the RFC 1929 limit).
pub const MAX_CREDENTIAL_LEN: usize = 255;
/// How often the watcher looks for changes to the database.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

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

struct Verified {
    hash: String,
    password: Vec<u8>,
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

/// The in-memory snapshot of the users and the verified-credential cache.
pub struct Directory {
    users: RwLock<HashMap<String, Entry>>,
    cache: Mutex<HashMap<String, Verified>>,
    limiter: Arc<Limiter>,
    /// A hash to verify against for unknown users, so they cost the same time as known ones.
    dummy_hash: String,
    /// Bounds how many argon2 verifications (about 19 MiB each) run at once.
    argon2_slots: Slots,
}

/// Most argon2 verifications running at once. Each holds ~19 MiB; a burst of new logins (or a
/// crowd of guessers on many addresses) queues here instead of taking gigabytes.
pub const MAX_CONCURRENT_ARGON2: usize = 4;

/// A counting semaphore (std has none).
struct Slots {
    free: Mutex<usize>,
    cv: parking_lot::Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n),
            cv: parking_lot::Condvar::new(),
        }
    }

    /// Blocks until a slot is free; the guard gives it back.
    fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock();
        while *free == 0 {
            self.cv.wait(&mut free);
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.cv.notify_one();
    }
}

impl Directory {
    /// An empty directory feeding `limiter`.
    pub fn new(limiter: Arc<Limiter>) -> Arc<Directory> {
        // The dummy password is random-enough per process: nobody can log in with it, and it is
        // only ever verified against, never matched.
        let dummy = format!("sluice-dummy-{:?}", std::time::Instant::now());
        Arc::new(Directory {
            users: RwLock::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            limiter,
            dummy_hash: hash_password(&dummy).unwrap_or_default(),
            argon2_slots: Slots::new(MAX_CONCURRENT_ARGON2),
        })
    }

    /// How many users the snapshot holds.
    pub fn len(&self) -> usize {
        self.users.read().len()
    }

    /// True when there are no users.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Replaces the snapshot with `rows`, applying rate changes, revocations and cache drops.
    pub fn apply(&self, rows: Vec<UserRow>) -> Changes {
        let mut changes = Changes::default();
        let mut users = self.users.write();
        let mut fresh: HashMap<String, Entry> = HashMap::with_capacity(rows.len());
        for row in rows {
            let entry = match users.remove(&row.username) {
                Some(old) if old.account.id == row.id => {
                    let moved =
                        old.account.rate() != row.bandwidth || old.hash != row.password_hash;
                    changes.changed += usize::from(moved);
                    if old.hash != row.password_hash {
                        self.cache.lock().remove(&row.username);
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
                        self.cache.lock().remove(&row.username);
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
            fresh.insert(row.username, entry);
        }
        for (name, gone) in users.drain() {
            changes.removed += 1;
            self.cache.lock().remove(&name);
            gone.account.revoke();
            self.limiter.remove(&name);
        }
        *users = fresh;
        changes
    }

    /// Checks a username and password. Blocking: may run argon2 (tens of milliseconds) unless the
    /// same credentials were verified before against the same hash. Unknown users and wrong
    /// passwords both return `None` after about the same time.
    pub fn verify(&self, username: &[u8], password: &[u8]) -> Option<Arc<Account>> {
        let found = std::str::from_utf8(username).ok().and_then(|name| {
            let users = self.users.read();
            users
                .get(name)
                .map(|e| (name.to_string(), e.hash.clone(), e.account.clone()))
        });
        let Some((name, hash, account)) = found else {
            self.argon2_check(&self.dummy_hash, password);
            return None;
        };
        if let Some(v) = self.cache.lock().get(&name)
            && v.hash == hash
            && constant_time_eq(&v.password, password)
        {
            return Some(account);
        }
        if !self.argon2_check(&hash, password) {
            return None;
        }
        self.cache.lock().insert(
            name,
            Verified {
                hash,
                password: password.to_vec(),
            },
        );
        Some(account)
    }

    fn argon2_check(&self, hash: &str, password: &[u8]) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => {
                let _slot = self.argon2_slots.take();
                Argon2::default().verify_password(password, &parsed).is_ok()
            }
            Err(e) => {
                warn!("stored password hash is not a valid PHC string ({e}); login refused");
                false
            }
        }
    }
}

/// Failed logins from one client address tolerated within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// The window failures are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address that failed too often is refused without checking its password.
pub const BLOCK_TIME: Duration = Duration::from_secs(300);
/// Addresses remembered at most; past it, expired entries are dropped first, then everything.
const MAX_TRACKED: usize = 65_536;

/// Failures counted, when the window started, and until when the address is blocked.
type Failures = (u32, Instant, Option<Instant>);

/// Counts failed logins per client address (IPv6 by /64, since one host holds a whole /64) and
/// refuses an address that failed too often, before any password hash runs: a guessing client
/// cannot burn the CPU, and users on other addresses are unaffected. A successful login does not
/// wipe the count — else a client holding one valid account could guess others without limit —
/// failures simply age out of the window.
#[derive(Default)]
pub struct LoginThrottle {
    map: Mutex<HashMap<IpAddr, Failures>>,
}

fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl LoginThrottle {
    /// True if `ip` may try a password now (at `now`).
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        match self.map.lock().get(&throttle_key(ip)) {
            Some((_, _, Some(until))) => now >= *until,
            _ => true,
        }
    }

    /// Records a failed login; returns true if it just got `ip` blocked.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.map.lock();
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (_, start, until)| {
                now.duration_since(*start) < FAILURE_WINDOW || until.is_some_and(|u| u > now)
            });
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let e = map.entry(throttle_key(ip)).or_insert((0, now, None));
        if e.2.is_some_and(|u| now >= u) || now.duration_since(e.1) >= FAILURE_WINDOW {
            *e = (0, now, None);
        }
        e.0 += 1;
        if e.0 >= MAX_FAILURES && e.2.is_none() {
            e.2 = Some(now + BLOCK_TIME);
            return true;
        }
        false
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
pub fn reload(store: &UserStore, dir: &Directory) -> Result<Changes> {
    let (rows, bad) = store.load()?;
    let usage = store.load_usage()?;
    for b in bad {
        warn!("user {:?} ignored: {}", b.username, b.reason);
    }
    let changes = dir.apply(rows);
    usage::apply_usage(&dir.accounts(), &usage, usage::unix_now());
    Ok(changes)
}

/// How often usage counters are sampled and flushed to the database.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the database thread: it notices database changes within [`WATCH_INTERVAL`] and
/// applies them, and samples and flushes usage every [`FLUSH_INTERVAL`] and once more when `stop`
/// is set. If the file is deleted or replaced, it logs that and keeps the last good snapshot
/// (reopening a replacement).
///
/// # Errors
/// The thread could not be spawned.
/// `version` is the `data_version` read *before* the snapshot was loaded, so a commit made
/// between that load and this thread's first look is not missed.
pub fn spawn_watcher(
    store: UserStore,
    version: Option<i64>,
    dir: Arc<Directory>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("user watcher".into())
        .stack_size(256 * 1024)
        .spawn(move || Watcher::new(store, version).run(&dir, &stop))
}

struct Watcher {
    accountant: Accountant,
    last_flush: std::time::Instant,
    flush_failing: bool,
    /// `None` while the file is gone: holding a connection to a deleted file would keep its
    /// `-wal`/`-shm` files alive at the path, where a re-created database would pick them up.
    store: Option<UserStore>,
    path: PathBuf,
    identity: Option<(u64, u64)>,
    /// A file seen at the path that could not be opened (logged once).
    unreadable: Option<(u64, u64)>,
    version: Option<i64>,
    missing_logged: bool,
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Watcher {
    fn new(store: UserStore, version: Option<i64>) -> Watcher {
        let path = store.path().to_path_buf();
        Watcher {
            accountant: Accountant::new(),
            last_flush: std::time::Instant::now(),
            flush_failing: false,
            identity: file_identity(&path),
            version,
            store: Some(store),
            unreadable: None,
            path,
            missing_logged: false,
        }
    }

    fn run(mut self, dir: &Directory, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            thread::sleep(WATCH_INTERVAL);
            self.poll(dir);
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                self.flush(dir);
            }
        }
        self.flush(dir);
    }

    /// Samples live figures and writes the usage deltas; on failure they wait for the next flush.
    fn flush(&mut self, dir: &Directory) {
        let now = std::time::Instant::now();
        self.last_flush = now;
        let accounts = dir.accounts();
        self.accountant.sample(&accounts, now);
        let (deltas, marks) = self.accountant.deltas(&accounts, usage::unix_now());
        // No file: the counts wait in memory (deltas are taken against the last commit).
        let Some(store) = &self.store else { return };
        match store.flush_usage(&deltas, usage::unix_now()) {
            Ok(()) => {
                self.accountant.commit(marks);
                if self.flush_failing {
                    info!("usage flushes work again");
                    self.flush_failing = false;
                }
            }
            Err(e) if !self.flush_failing => {
                warn!("cannot write usage ({e}); counting on in memory and retrying every second");
                self.flush_failing = true;
            }
            Err(_) => {}
        }
    }

    fn poll(&mut self, dir: &Directory) {
        let now_id = file_identity(&self.path);
        if now_id.is_none() {
            if !self.missing_logged {
                warn!(
                    "database {} is gone; keeping the last snapshot of {} users and counting usage in memory",
                    self.path.display(),
                    dir.len()
                );
                self.missing_logged = true;
            }
            // Let go of the deleted file at once (see `store`).
            self.store = None;
            self.identity = None;
            return;
        }
        self.missing_logged = false;
        if now_id == self.unreadable {
            return; // said so once; wait for the file to change again
        }
        if now_id != self.identity || self.store.is_none() {
            // Drop the old connection before opening the new file, for the same reason.
            self.store = None;
            match UserStore::open(&self.path) {
                Ok(s) => {
                    info!(
                        "database {} was replaced; reloading it",
                        self.path.display()
                    );
                    self.store = Some(s);
                    self.identity = now_id;
                    self.version = None;
                }
                Err(e) => {
                    warn!(
                        "database {} was replaced by something unreadable ({e}); keeping the last snapshot",
                        self.path.display()
                    );
                    self.unreadable = now_id;
                    return;
                }
            }
        }
        let Some(store) = &self.store else { return };
        let v = match store.data_version() {
            Ok(v) => v,
            Err(e) => {
                warn!("cannot read database: {e}; keeping the last snapshot");
                return;
            }
        };
        if Some(v) == self.version {
            return;
        }
        match reload(store, dir) {
            Ok(c) => {
                self.version = Some(v);
                if c != Changes::default() {
                    info!(
                        "users reloaded: {} added, {} changed, {} removed",
                        c.added, c.changed, c.removed
                    );
                }
            }
            Err(e) => warn!("cannot reload users: {e}; keeping the last snapshot"),
        }
    }
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
            quota_period: crate::users::QuotaPeriod::None,
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
        let dir = Directory::new(Limiter::new(Duration::from_millis(10)));
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
        let dir = Directory::new(Limiter::new(Duration::from_millis(10)));
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
        let dir = Directory::new(Limiter::new(Duration::from_millis(10)));
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

    #[test]
    fn a_corrupt_hash_refuses_without_panicking() {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10)));
        dir.apply(vec![row("x", "not-a-phc-string", 0)]);
        assert!(dir.verify(b"x", b"anything").is_none());
        assert!(dir.verify(&[0xff, 0xfe], b"p").is_none());
    }

    #[test]
    fn a_guessing_address_is_blocked_and_others_are_not() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        let bad: IpAddr = "203.0.113.9".parse().unwrap();
        let good: IpAddr = "198.51.100.1".parse().unwrap();
        for i in 0..MAX_FAILURES {
            assert!(t.allowed(bad, t0));
            assert_eq!(t.failed(bad, t0), i + 1 == MAX_FAILURES);
        }
        assert!(!t.allowed(bad, t0 + Duration::from_secs(1)));
        assert!(t.allowed(good, t0));
        assert!(t.allowed(bad, t0 + BLOCK_TIME), "the block ends");
        // One IPv6 host holds a /64: its neighbours share its count.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            t.failed(a, t0);
        }
        assert!(!t.allowed(b, t0));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..(3 * MAX_FAILURES) {
            t.failed(ip, t0 + FAILURE_WINDOW * i);
        }
        assert!(t.allowed(ip, t0 + FAILURE_WINDOW * 3 * MAX_FAILURES));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
