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
//!
//! The snapshot is compact, for tables of a million users: per user its name, id, limits and
//! password hash (users loaded with one hash share it), and nothing else until the user logs in.
//! The first login builds the user's [`Account`] (counters, connections, history) from the
//! snapshot and the usage seed loaded with it — never from the store — and the account stays for
//! the server's life; the metrics list these accounts. Per-second work is the roster's: only
//! accounts with connections or unsettled counts are sampled and flushed.

use crate::error::{Error, Result};
use crate::flow::account::{Account, Roster};
use crate::flow::limiter::Limiter;
use crate::flow::usage;
use crate::net::source::Source;
use crate::store::{QuotaPeriod, Usage, UserRow, UserStore};
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

/// A user as the snapshot keeps it: what a login and the limits need, and compact, since a
/// million of these stay resident. The counters and the rest of an [`Account`] exist only once
/// the user has logged in.
struct Entry {
    id: u64,
    /// The PHC string; users loaded with the same one share it (see [`Interner`]).
    hash: Arc<str>,
    bandwidth: u64,
    quota: u64,
    /// The connection cap (0 = none); past `u32::MAX` it is held there, which caps nothing.
    max_connections: u32,
    period: QuotaPeriod,
    /// The stored usage an account built for this user starts from; none when the user has no
    /// usage row worth keeping, or has an account (which holds the count itself).
    seed: Option<Box<Seed>>,
    account: Option<Arc<Account>>,
}

/// What a stored usage row means to an account yet to be built: its quota count and the reset
/// epoch it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seed {
    period_start: u64,
    period_bytes: u64,
    reset_epoch: u64,
}

impl Seed {
    /// The part of `u` worth keeping; none when it reads like no row at all (nothing counted, never
    /// reset).
    fn of(u: &Usage) -> Option<Box<Seed>> {
        (u.period_bytes > 0 || u.reset_epoch > 0).then(|| {
            Box::new(Seed {
                period_start: u.period_start,
                period_bytes: u.period_bytes,
                reset_epoch: u.reset_epoch,
            })
        })
    }

    /// As the usage row it came from, for `usage::apply_usage`.
    fn row(&self, id: u64) -> Usage {
        Usage {
            account_id: id,
            period_start: self.period_start,
            period_bytes: self.period_bytes,
            reset_epoch: self.reset_epoch,
            ..Usage::default()
        }
    }
}

impl Entry {
    fn of(row: UserRow, hash: Arc<str>, seed: Option<Box<Seed>>) -> (Box<str>, Entry) {
        let entry = Entry {
            id: row.id,
            hash,
            bandwidth: row.bandwidth,
            quota: row.quota_bytes,
            max_connections: u32::try_from(row.max_connections).unwrap_or(u32::MAX),
            period: row.quota_period,
            seed,
            account: None,
        };
        (row.username.into_boxed_str(), entry)
    }

    /// The entry's usage seed as rows for `usage::apply_usage` (none: the user has no row).
    fn seed_rows(&self) -> Vec<Usage> {
        self.seed.iter().map(|s| s.row(self.id)).collect()
    }
}

/// Shares identical password hashes between the users of one load: a table filled by script
/// often gives many users one hash. It stops taking new hashes past [`INTERNED_MAX`], so a table
/// of distinct hashes (the usual case) costs it a bounded set, not a second copy of each. A hash
/// equal to the one before is shared without a lookup.
#[derive(Default)]
struct Interner {
    set: std::collections::HashSet<Arc<str>, BuildNameHasher>,
    last: Option<Arc<str>>,
}

/// Distinct hashes an [`Interner`] holds at most.
const INTERNED_MAX: usize = 4096;

impl Interner {
    fn intern(&mut self, hash: String) -> Arc<str> {
        if let Some(last) = &self.last
            && **last == *hash
        {
            return last.clone();
        }
        let h = match self.set.get(hash.as_str()) {
            Some(h) => h.clone(),
            None => {
                let h: Arc<str> = Arc::from(hash);
                if self.set.len() < INTERNED_MAX {
                    self.set.insert(h.clone());
                }
                h
            }
        };
        self.last = Some(h.clone());
        h
    }
}

/// A fast hash for the snapshot's names: the table is filled from the store (by the operator, not
/// by clients), so it needs no keyed hash against crafted collisions, and a million inserts at
/// start-up are a third cheaper without SipHash. Eight bytes at a time, then a 64-bit finalizer.
#[derive(Default, Clone, Copy)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        // MurmurHash3's fmix64: every input bit moves the low bits the table indexes by.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type BuildNameHasher = std::hash::BuildHasherDefault<NameHasher>;

/// The snapshot: one [`Entry`] per user, by name.
type Snapshot = HashMap<Box<str>, Entry, BuildNameHasher>;

/// Rows handed from the store's reader to the snapshot's builder at once, and batches in flight.
const LOAD_BATCH: usize = 4096;
const LOAD_BATCHES: usize = 4;

/// A keyed digest of a password: what the verify cache keeps instead of the password.
pub type Digest = [u8; 32];

/// A verification remembered for one user at one source.
struct Verified {
    hash: Arc<str>,
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
    users: RwLock<Snapshot>,
    /// The accounts built so far (users that logged in since start), by id.
    built: Mutex<HashMap<u64, Arc<Account>>>,
    /// Keyed by user and source: a verification from one address is no use to another.
    cache: Mutex<HashMap<(String, Source), Verified>>,
    /// The limiter the accounts' connections hold buckets in, and the active accounts.
    roster: Arc<Roster>,
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
            users: RwLock::new(Snapshot::default()),
            built: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            roster: Roster::new(limiter),
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

    /// The accounts built so far, sorted by name: the users that logged in since start (a user
    /// of the table who never did has none). What the metrics list.
    pub fn accounts(&self) -> Vec<Arc<Account>> {
        let mut v: Vec<_> = self.built.lock().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The accounts with something to sample or flush (a connection open, or counts not yet
    /// settled), in no particular order; see [`Roster`].
    pub fn roster(&self) -> &Arc<Roster> {
        &self.roster
    }

    /// The account of `name`, if the user is in the snapshot and has logged in since start.
    pub fn account(&self, name: &str) -> Option<Arc<Account>> {
        self.users.read().get(name).and_then(|e| e.account.clone())
    }

    fn forget(&self, name: &str) {
        self.cache.lock().retain(|(n, _), _| n != name);
    }

    /// Replaces the snapshot with `rows`, applying rate changes, revocations and cache drops.
    pub fn apply(&self, rows: Vec<UserRow>) -> Changes {
        let mut interner = Interner::default();
        let fresh: Snapshot = rows
            .into_iter()
            .map(|mut row| {
                let hash = interner.intern(std::mem::take(&mut row.password_hash));
                Entry::of(row, hash, None)
            })
            .collect();
        self.replace(fresh)
    }

    /// Puts `fresh` in place of the snapshot: a user with the same id keeps its account (new
    /// rate, limits and usage seed applied), anyone else's account goes like a deleted one.
    fn replace(&self, mut fresh: Snapshot) -> Changes {
        let mut changes = Changes::default();
        let mut users = self.users.write();
        if users.is_empty() {
            // The start: nobody to compare with.
            changes.added = fresh.len();
        } else {
            for (name, new) in &mut fresh {
                let old = users.remove(name);
                self.update(name, old, new, &mut changes);
            }
            for (name, gone) in users.drain() {
                self.remove(&name, gone, &mut changes);
            }
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
            if let Some(gone) = users.remove(name.as_str()) {
                self.remove(name, gone, &mut changes);
            }
        }
        for row in rows {
            let old = users.remove(row.username.as_str());
            // The same hash as before stays shared with whoever shares it.
            let hash = match &old {
                Some(o) if *o.hash == *row.password_hash => o.hash.clone(),
                _ => Arc::from(row.password_hash.as_str()),
            };
            let (name, mut new) = Entry::of(row, hash, None);
            self.update(&name, old, &mut new, &mut changes);
            users.insert(name, new);
        }
        changes
    }

    /// Applies usage rows of the users `names` (a name without a row has none): a built account
    /// gets them as a reload gives them (a reset restarts its quota count), anyone else keeps
    /// them as the seed its account will start from.
    fn apply_usage_of(&self, names: &[String], rows: &[Usage]) {
        let now = usage::unix_now();
        let mut users = self.users.write();
        for name in names {
            let Some(e) = users.get_mut(name.as_str()) else {
                continue;
            };
            let mine: Vec<Usage> = rows
                .iter()
                .filter(|u| u.account_id == e.id)
                .cloned()
                .collect();
            match &e.account {
                Some(a) => usage::apply_usage(std::slice::from_ref(a), &mine, now),
                None => e.seed = mine.first().and_then(Seed::of),
            }
        }
    }

    /// One user's step of a reload: `new` (made from its row) over the entry it had (if any).
    /// The same id keeps its account (new rate and limits, the usage seed applied, the cache
    /// dropped if the hash changed); a new id starts without one, and the old one goes like a
    /// deleted one.
    fn update(&self, name: &str, old: Option<Entry>, new: &mut Entry, changes: &mut Changes) {
        match old {
            Some(old) if old.id == new.id => {
                let moved = old.bandwidth != new.bandwidth || old.hash != new.hash;
                changes.changed += usize::from(moved);
                if old.hash != new.hash {
                    self.forget(name);
                }
                if let Some(a) = old.account {
                    a.set_rate(new.bandwidth);
                    a.set_limits(new.quota, new.period, u64::from(new.max_connections));
                    let seed = new.seed_rows();
                    usage::apply_usage(std::slice::from_ref(&a), &seed, usage::unix_now());
                    new.seed = None;
                    new.account = Some(a);
                }
            }
            replaced => {
                // Same name, new id: the user was deleted and added again. The old account
                // goes like any deleted one (its bucket, keyed by name, is reused).
                if let Some(old) = replaced {
                    changes.removed += 1;
                    self.forget(name);
                    if let Some(a) = old.account {
                        a.revoke();
                        self.built.lock().remove(&a.id);
                    }
                }
                changes.added += 1;
            }
        }
    }

    /// One user's step of a reload for a user gone from the store: its connections closed, its
    /// bucket and cached logins dropped.
    fn remove(&self, name: &str, gone: Entry, changes: &mut Changes) {
        changes.removed += 1;
        self.forget(name);
        if let Some(a) = gone.account {
            a.revoke();
            self.built.lock().remove(&a.id);
        }
        self.roster.limiter().remove(name);
    }

    /// The account of `name`, built on its first login from the snapshot, if the user is still
    /// the one whose `hash` was checked (a user deleted or given a new password meanwhile gets
    /// none). Never reads the store: an account starts from the usage seed loaded with the users.
    fn account_of(&self, name: &str, hash: &Arc<str>) -> Option<Arc<Account>> {
        {
            let users = self.users.read();
            let e = users.get(name)?;
            if e.hash != *hash {
                return None;
            }
            if let Some(a) = &e.account {
                return Some(a.clone());
            }
        }
        let mut users = self.users.write();
        let e = users.get_mut(name)?;
        if e.hash != *hash {
            return None;
        }
        if let Some(a) = &e.account {
            return Some(a.clone());
        }
        let a = Account::in_roster(e.id, name, e.bandwidth, &self.roster);
        a.set_limits(e.quota, e.period, u64::from(e.max_connections));
        let seed = e.seed_rows();
        usage::apply_usage(std::slice::from_ref(&a), &seed, usage::unix_now());
        e.seed = None;
        e.account = Some(a.clone());
        self.built.lock().insert(a.id, a.clone());
        Some(a)
    }

    /// The keyed digest of a password (cheap: one HMAC).
    pub fn digest(&self, password: &[u8]) -> Digest {
        let tag = hmac::sign(&self.digest_key, password);
        let mut d = [0u8; 32];
        d.copy_from_slice(tag.as_ref());
        d
    }

    fn lookup(&self, username: &[u8]) -> Option<(String, Arc<str>)> {
        let name = std::str::from_utf8(username).ok()?;
        let users = self.users.read();
        users.get(name).map(|e| (name.to_string(), e.hash.clone()))
    }

    /// What the verify cache knows of these credentials at `src`. Never runs argon2.
    pub fn cached(&self, username: &[u8], src: Source, digest: &Digest) -> Cached {
        let Some((name, hash)) = self.lookup(username) else {
            return Cached::Unknown;
        };
        {
            let mut cache = self.cache.lock();
            let Some(v) = cache.get_mut(&(name.clone(), src)) else {
                return Cached::Unknown;
            };
            let now = Instant::now();
            if v.hash != hash || now.saturating_duration_since(v.at) >= CACHE_TTL {
                return Cached::Unknown;
            }
            if !constant_time_eq(&v.digest, digest) {
                return Cached::Mismatch;
            }
            v.at = now;
        }
        match self.account_of(&name, &hash) {
            Some(a) => Cached::Hit(a),
            None => Cached::Unknown,
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
        let Some((name, hash)) = self.lookup(username) else {
            self.argon2_check(&self.dummy_hash, password);
            return None;
        };
        if !self.argon2_check(&hash, password) {
            return None;
        }
        let account = self.account_of(&name, &hash)?;
        self.remember(name, src, hash, *digest);
        Some(account)
    }

    fn remember(&self, name: String, src: Source, hash: Arc<str>, digest: Digest) {
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

/// Loads the store into the directory, logging rows that cannot be used, with the usage rows
/// (quota counts, resets). Rows are streamed into a fresh snapshot, which then takes the old
/// one's place under the write lock for as long as the two are compared (nothing to compare at
/// start): logins never wait on the store.
///
/// # Errors
/// The tables cannot be read.
pub fn reload(store: &dyn UserStore, dir: &Directory) -> Result<Changes> {
    let mut seeds: HashMap<u64, Box<Seed>> = HashMap::new();
    store.each_usage(&mut |u| {
        if let Some(s) = Seed::of(&u) {
            seeds.insert(u.account_id, s);
        }
    })?;
    let capacity = store.count_users()?;
    // Two stages on two threads: this one reads rows from the store (which stays on it), a
    // scoped helper puts them into the snapshot, batch by batch; each is about half the work.
    let (tx, rx) = crossbeam_channel::bounded::<Vec<UserRow>>(LOAD_BATCHES);
    let fresh = std::thread::scope(|s| -> Result<Snapshot> {
        let builder = s.spawn(move || {
            let mut fresh =
                Snapshot::with_capacity_and_hasher(capacity, BuildNameHasher::default());
            let mut interner = Interner::default();
            for batch in rx {
                for mut row in batch {
                    let seed = seeds.remove(&row.id);
                    let hash = interner.intern(std::mem::take(&mut row.password_hash));
                    let (name, entry) = Entry::of(row, hash, seed);
                    fresh.insert(name, entry);
                }
            }
            fresh
        });
        let mut batch = Vec::with_capacity(LOAD_BATCH);
        let read = store.each_user(&mut |r| match r {
            Ok(row) => {
                batch.push(row);
                if batch.len() == LOAD_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
                    // The builder only stops early by panicking, which the join reports.
                    let _ = tx.send(full);
                }
            }
            Err(b) => warn!("user {:?} ignored: {}", b.username, b.reason),
        });
        let _ = tx.send(batch);
        drop(tx);
        let fresh = builder
            .join()
            .map_err(|_| Error::Invalid("the user snapshot could not be built".into()))?;
        read.map(|()| fresh)
    })?;
    Ok(dir.replace(fresh))
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
    dir.apply_usage_of(names, &usage);
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
        assert!(dir.accounts().is_empty(), "b never logged in: no account");
        assert_eq!(dir.verify(b"b", b"p").unwrap().rate(), 5);
        assert_eq!(dir.accounts().len(), 1);
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
    fn the_snapshot_is_compact_and_accounts_come_with_logins() {
        // Per user resident: the entry and its key in the map; everything else on login.
        assert!(
            std::mem::size_of::<Entry>() + std::mem::size_of::<Box<str>>() <= 80,
            "entry {} bytes",
            std::mem::size_of::<Entry>()
        );
        let lim = Limiter::new(Duration::from_millis(10));
        let dir = Directory::new(lim.clone()).unwrap();
        let h = hash_password("p").unwrap();
        let rows: Vec<UserRow> = (0..1000)
            .map(|i| UserRow {
                id: i + 1,
                ..row(&format!("u{i}"), &h, 1024)
            })
            .collect();
        assert_eq!(dir.apply(rows).added, 1000);
        {
            let users = dir.users.read();
            let first = users.get("u0").unwrap().hash.clone();
            assert!(
                users.values().all(|e| Arc::ptr_eq(&e.hash, &first)),
                "one hash loaded 1000 times is not shared"
            );
            assert!(users.values().all(|e| e.account.is_none()));
        }
        assert!(dir.accounts().is_empty());
        assert_eq!((lim.buckets(), dir.roster().active().len()), (0, 0));
        let a = dir.verify(b"u7", b"p").unwrap();
        assert_eq!(dir.accounts().len(), 1);
        assert_eq!(lim.buckets(), 0, "a login is not a connection");
        let (slot, _) = a.admit(1).unwrap();
        assert_eq!((lim.buckets(), dir.roster().active().len()), (1, 1));
        // A change reaches the connected user's bucket, and makes none for anyone else.
        dir.apply_users(
            vec![
                UserRow {
                    id: 8,
                    ..row("u7", &h, 2048)
                },
                UserRow {
                    id: 9,
                    ..row("u8", &h, 4096)
                },
            ],
            &[],
        );
        assert_eq!(a.rate(), 2048);
        assert_eq!(lim.buckets(), 1);
        drop(slot);
        assert_eq!(lim.buckets(), 0);
        assert!(Arc::ptr_eq(&dir.verify(b"u7", b"p").unwrap(), &a));
    }

    #[test]
    fn an_account_built_at_login_starts_from_the_stored_usage() {
        let path = std::env::temp_dir().join(format!(
            "sluice-dir-seed-{}-{:?}.db",
            std::process::id(),
            Instant::now()
        ));
        let store = crate::store::open(&path, true).unwrap();
        let h = hash_password("p").unwrap();
        let day = crate::store::UserChange {
            quota_bytes: Some(1 << 30),
            quota_period: Some(QuotaPeriod::Day),
            ..Default::default()
        };
        store.add_with("q", &h, 0, &day).unwrap();
        store.add_with("r", &h, 0, &day).unwrap();
        let (rows, _) = store.load().unwrap();
        let now = usage::unix_now();
        let deltas: Vec<crate::store::UsageDelta> = rows
            .iter()
            .map(|r| crate::store::UsageDelta {
                account_id: r.id,
                bytes_down: 5000,
                period_start: QuotaPeriod::Day.start_of(now),
                ..Default::default()
            })
            .collect();
        store.flush_usage(&deltas, now).unwrap();
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        reload(&*store, &dir).unwrap();
        assert_eq!(dir.verify(b"q", b"p").unwrap().quota_used(), 5000);
        // Reset while "r" has no account: the seed follows, and its first login starts at 0.
        store.reset_usage("r").unwrap();
        store.reset_usage("q").unwrap();
        let names = vec!["q".to_string(), "r".to_string()];
        reload_users(&*store, &dir, &names).unwrap();
        assert_eq!(dir.verify(b"q", b"p").unwrap().quota_used(), 0);
        assert_eq!(dir.verify(b"r", b"p").unwrap().quota_used(), 0);
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn the_interner_shares_repeats_and_holds_a_bounded_set() {
        let mut i = Interner::default();
        let a = i.intern("x".repeat(97));
        let b = i.intern("y".repeat(97));
        assert!(Arc::ptr_eq(&a, &i.intern("x".repeat(97))), "not shared");
        assert!(Arc::ptr_eq(&b, &i.intern("y".repeat(97))));
        for n in 0..INTERNED_MAX * 2 {
            i.intern(format!("distinct {n}"));
        }
        assert_eq!(i.set.len(), INTERNED_MAX);
        assert!(Arc::ptr_eq(&a, &i.intern("x".repeat(97))), "forgotten");
        // Names hash apart, short or long, in the low bits a table indexes by.
        use std::hash::BuildHasher;
        let low: std::collections::HashSet<u64> = (0..4096)
            .map(|n| BuildNameHasher::default().hash_one(format!("u{n}")) & 0xffff)
            .collect();
        assert!(low.len() > 3800, "{} distinct of 4096", low.len());
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
