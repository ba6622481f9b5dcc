//! A logged-in user as the relays see it: the live rate and limits, a revoked flag, the open
//! connections (so a deleted or over-quota user's sockets can be shut), and counters. Shared as
//! `Arc<Account>`.
//!
//! Everything here is atomics or a short lock never held across I/O; the relay path reads the rate
//! with one relaxed load, which is all an unlimited user without a quota pays. The quota is charged
//! where tokens are taken (`relay::Budget::take`), by reserving before a read and returning what the
//! read did not use, so parallel connections cannot overshoot it.

use crate::flow::limiter::Limiter;
use crate::store::QuotaPeriod;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a directory's accounts share: the limiter their connections hold buckets in, and the
/// accounts active now (a connection open, or counts the database thread has not yet flushed and
/// sampled down to zero). The database thread walks only these, so its work grows with the users
/// that are connected, not with the user table.
pub struct Roster {
    limiter: Arc<Limiter>,
    active: Mutex<HashMap<u64, Arc<Account>>>,
}

impl Roster {
    /// A roster over `limiter`, with nobody active.
    pub fn new(limiter: Arc<Limiter>) -> Arc<Roster> {
        Arc::new(Roster {
            limiter,
            active: Mutex::new(HashMap::new()),
        })
    }

    /// The limiter the accounts' connections hold buckets in.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The active accounts, in no particular order.
    pub fn active(&self) -> Vec<Arc<Account>> {
        self.active.lock().values().cloned().collect()
    }

    /// Takes `a` off the active list if it holds no connection and `quiet` says the rest of its
    /// state is settled (counts flushed, samples at zero). Returns whether it went. An admit racing
    /// with this puts the account back (see [`Account::admit`]).
    pub fn retire_if(&self, a: &Arc<Account>, quiet: impl FnOnce(&Account) -> bool) -> bool {
        let mut active = self.active.lock();
        // Cleared first: an admit from now on lists the account again (after this lock).
        a.listed.store(false, Ordering::SeqCst);
        if a.held.load(Ordering::SeqCst) == 0 && quiet(a) {
            active.remove(&a.id);
            true
        } else {
            a.listed.store(true, Ordering::SeqCst);
            false
        }
    }

    fn list(&self, a: &Arc<Account>) {
        if !a.listed.swap(true, Ordering::SeqCst) {
            self.active.lock().insert(a.id, a.clone());
        }
    }
}

/// Something an account can shut from outside to end a connection (its sockets): implemented
/// by the connection layer's streams, so this room needs no sockets of its own.
pub trait Shut: Send + Sync {
    /// Closes both ways at once, which also wakes a thread blocked on it.
    fn shut(&self);
}

/// A connection slot taken by [`Account::admit`]; dropping it gives the slot back, on every path
/// a connection can end by.
pub struct Slot {
    account: Arc<Account>,
    id: u64,
    /// The limiter bucket the connection holds (when the account is in a [`Roster`]).
    bucket: Option<u64>,
}

impl Slot {
    /// The account the slot belongs to.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Attaches the connection's sockets (one value shutting both) so they can be shut from
    /// outside. False (attaching nothing) if the connection was closed from outside meanwhile.
    pub fn attach(&self, sockets: Box<dyn Shut>) -> bool {
        match self.account.conns.lock().get_mut(&self.id) {
            Some(v) => {
                *v = Some(sockets);
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let a = &self.account;
        a.conns.lock().remove(&self.id);
        if let (Some(serial), Some(roster)) = (self.bucket, &a.roster) {
            roster.limiter.close(&a.name, serial);
        }
        a.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Seconds of per-second rate samples kept for the status page's sparklines.
pub const HISTORY_SECS: usize = 60;

/// Why a user may not open another connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user was deleted.
    Revoked,
    /// The user's quota for this period is used up.
    Quota,
    /// The user has `max_connections` open already.
    TooMany,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Revoked => "user deleted",
            Refusal::Quota => "quota exhausted",
            Refusal::TooMany => "too many connections for this user",
        })
    }
}

/// The quota count: bytes used this period, and bytes reserved by reads in flight.
#[derive(Default)]
struct QuotaState {
    used: u64,
    inflight: u64,
}

/// The answer to a quota reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// This many bytes (≥ 1) may be read.
    Granted(u64),
    /// What is left is reserved by other reads in flight; ask again shortly.
    Busy,
    /// The quota is used up.
    Exhausted,
}

/// One user's runtime state.
pub struct Account {
    /// The account's id in the user store, never reused: usage is counted per id, so a user
    /// deleted and added again under the same name is a different `Account`.
    pub id: u64,
    /// The login name; also the limiter's key.
    pub name: Arc<str>,
    rate: AtomicU64,
    revoked: AtomicBool,
    conns: Mutex<HashMap<u64, Option<Box<dyn Shut>>>>,
    quota: AtomicU64,
    /// Bytes charged against the quota this period, and bytes reserved by reads in flight.
    quota_state: Mutex<QuotaState>,
    period: Mutex<QuotaPeriod>,
    /// Start of the quota period `quota_used` counts (unix seconds).
    pub period_start: AtomicU64,
    /// The `reset_epoch` of the usage row last seen, so `user reset-usage` restarts the count.
    pub reset_epoch: AtomicU64,
    max_connections: AtomicU64,
    /// Connections open on the fleet's other servers, last known (set by the lease thread; 0
    /// without a fleet): `max_connections` counts them too.
    elsewhere: AtomicU64,
    /// Bytes forwarded client → destination since start.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded destination → client since start.
    pub bytes_down: AtomicU64,
    /// Connections opened since start.
    pub opened: AtomicU64,
    /// Nanoseconds relays spent waiting for tokens since start.
    pub throttled_ns: AtomicU64,
    /// Nanoseconds relays spent moving bytes (reading and writing a grant) since start; with
    /// `throttled_ns` it tells the share of working time the limiter held the user back.
    pub busy_ns: AtomicU64,
    /// Per-second samples (bytes/s, share throttled), newest last, for the status page.
    pub history: Mutex<VecDeque<(u64, f64)>>,
    /// The limiter and active list this account's connections report to (none in unit tests).
    roster: Option<Arc<Roster>>,
    /// Slots alive: connections admitted and not yet ended (their relays may still count).
    held: AtomicUsize,
    /// On the roster's active list.
    listed: AtomicBool,
}

impl Account {
    /// A new account `id` named `name`, with a rate in bytes per second (0 = unlimited).
    pub fn new(id: u64, name: &str, rate: u64) -> Arc<Account> {
        Self::build(id, name, rate, None)
    }

    /// As [`Account::new`], in `roster`: each connection holds the user's bucket in the roster's
    /// limiter, and the account is on the active list while it has anything to report.
    pub fn in_roster(id: u64, name: &str, rate: u64, roster: &Arc<Roster>) -> Arc<Account> {
        Self::build(id, name, rate, Some(roster.clone()))
    }

    fn build(id: u64, name: &str, rate: u64, roster: Option<Arc<Roster>>) -> Arc<Account> {
        Arc::new(Account {
            id,
            name: Arc::from(name),
            rate: AtomicU64::new(rate),
            revoked: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            quota: AtomicU64::new(0),
            quota_state: Mutex::new(QuotaState::default()),
            period: Mutex::new(QuotaPeriod::None),
            period_start: AtomicU64::new(0),
            // Unseen: the first usage row read sets the quota count.
            reset_epoch: AtomicU64::new(u64::MAX),
            max_connections: AtomicU64::new(0),
            elsewhere: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SECS)),
            roster,
            held: AtomicUsize::new(0),
            listed: AtomicBool::new(false),
        })
    }

    /// The current rate (bytes per second, 0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate seen by the relays' fast path and, when connections hold a bucket, the
    /// bucket's (stored first: see [`Limiter::open`]).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        if let Some(roster) = &self.roster {
            roster.limiter.change_rate(&self.name, rate);
        }
    }

    /// Connections admitted and not yet ended (a connection closed from outside counts until its
    /// relays are done).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Starts the quota count over when the period containing `now_unix` is not the one counted.
    pub fn roll_period(&self, now_unix: u64) -> u64 {
        let start = self.period().start_of(now_unix);
        if self.period_start.swap(start, Ordering::Relaxed) != start {
            self.restart_quota(0);
        }
        start
    }

    /// Sets the quota (bytes per period, 0 = none), its period, and the connection cap.
    pub fn set_limits(&self, quota: u64, period: QuotaPeriod, max_connections: u64) {
        self.quota.store(quota, Ordering::Relaxed);
        *self.period.lock() = period;
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
    }

    /// The quota in bytes per period (0 = none).
    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// The quota period.
    pub fn period(&self) -> QuotaPeriod {
        *self.period.lock()
    }

    /// Bytes charged against the quota this period.
    pub fn quota_used(&self) -> u64 {
        self.quota_state.lock().used
    }

    /// Starts a new quota count at `used` bytes (new period, reset, or start-up).
    pub fn restart_quota(&self, used: u64) {
        self.quota_state.lock().used = used;
    }

    /// The connection cap (0 = none).
    pub fn max_connections(&self) -> u64 {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// Records the connections the user has open on the fleet's other servers (last known).
    pub fn set_elsewhere(&self, n: u64) {
        self.elsewhere.store(n, Ordering::Relaxed);
    }

    /// True when a quota is set and used up.
    pub fn quota_exhausted(&self) -> bool {
        let q = self.quota();
        q > 0 && self.quota_used() >= q
    }

    /// Reserves up to `want` bytes of quota for a read (all of `want` without a quota).
    pub fn reserve_quota(&self, want: u64) -> Reserve {
        let q = self.quota();
        if q == 0 {
            return Reserve::Granted(want);
        }
        let mut st = self.quota_state.lock();
        if st.used >= q {
            return Reserve::Exhausted;
        }
        let n = want.min(q.saturating_sub(st.used + st.inflight));
        if n == 0 {
            return Reserve::Busy;
        }
        st.inflight += n;
        Reserve::Granted(n)
    }

    /// Settles a reservation: `used` of the `reserved` bytes were read and count against the
    /// quota; the rest is free again.
    pub fn settle_quota(&self, reserved: u64, used: u64) {
        if self.quota() == 0 {
            // No quota: nothing to settle, and no lock on an unlimited user's path.
            return;
        }
        let mut st = self.quota_state.lock();
        st.inflight = st.inflight.saturating_sub(reserved);
        st.used += used;
    }

    /// True once the user was deleted.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Takes a connection slot for `id`, unless the user is deleted, over quota, or at its cap;
    /// the [`Slot`] gives it back when dropped. The flag is true when it is the user's only open
    /// connection (the user was idle).
    ///
    /// # Errors
    /// The [`Refusal`] that applies.
    pub fn admit(self: &Arc<Self>, id: u64) -> Result<(Slot, bool), Refusal> {
        if self.quota() > 0 {
            // An account nobody flushed for a while may still count a period that ended.
            self.roll_period(unix_now());
        }
        let mut conns = self.conns.lock();
        // Checked under the lock so a revoke or a parallel admit cannot slip in between.
        if self.is_revoked() {
            return Err(Refusal::Revoked);
        }
        if self.quota_exhausted() {
            return Err(Refusal::Quota);
        }
        let cap = self.max_connections();
        if cap > 0 && conns.len() as u64 + self.elsewhere.load(Ordering::Relaxed) >= cap {
            return Err(Refusal::TooMany);
        }
        conns.insert(id, None);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let only = conns.len() == 1;
        self.held.fetch_add(1, Ordering::SeqCst);
        drop(conns);
        let bucket = self.roster.as_ref().map(|r| {
            r.list(self);
            r.limiter.open(&self.name, &self.rate)
        });
        let slot = Slot {
            account: self.clone(),
            id,
            bucket,
        };
        Ok((slot, only))
    }

    /// Marks the user deleted and shuts every open connection's sockets, which ends their relays.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Relaxed);
        self.close_all();
    }

    /// Shuts every open connection's sockets (server shutdown, quota used up).
    pub fn close_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        for s in conns.values().flatten() {
            s.shut();
        }
    }
}

/// Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_reservations_never_overshoot() {
        let a = Account::new(1, "q", 0);
        a.set_limits(100, QuotaPeriod::None, 0);
        assert_eq!(a.reserve_quota(60), Reserve::Granted(60));
        assert_eq!(
            a.reserve_quota(60),
            Reserve::Granted(40),
            "only what is left"
        );
        assert_eq!(
            a.reserve_quota(1),
            Reserve::Busy,
            "reads in flight hold the rest"
        );
        assert!(!a.quota_exhausted(), "reserved is not used");
        a.settle_quota(60, 30);
        assert_eq!(a.quota_used(), 30);
        assert_eq!(a.reserve_quota(64), Reserve::Granted(30));
        a.settle_quota(40, 40);
        a.settle_quota(30, 30);
        assert_eq!(a.quota_used(), 100);
        assert!(a.quota_exhausted());
        assert_eq!(a.reserve_quota(1), Reserve::Exhausted);
        a.set_limits(0, QuotaPeriod::None, 0);
        assert_eq!(
            a.reserve_quota(1 << 20),
            Reserve::Granted(1 << 20),
            "no quota, no limit"
        );
    }

    #[test]
    fn admit_enforces_cap_quota_and_revocation() {
        let a = Account::new(1, "c", 0);
        a.set_limits(0, QuotaPeriod::None, 2);
        let only = |r: Result<(Slot, bool), Refusal>| r.map(|(_, only)| only);
        let (first, idle) = a.admit(1).unwrap();
        assert!(idle, "the first connection of an idle user");
        let (_second, idle) = a.admit(2).unwrap();
        assert!(!idle);
        assert_eq!(only(a.admit(3)), Err(Refusal::TooMany));
        drop(first);
        let (_third, idle) = a.admit(3).unwrap();
        assert!(!idle);
        a.set_limits(10, QuotaPeriod::Day, 0);
        a.roll_period(unix_now());
        a.restart_quota(10);
        assert_eq!(only(a.admit(4)), Err(Refusal::Quota));
        // A day that ended while nobody flushed: admit starts the new day's count.
        a.period_start.store(1, Ordering::Relaxed);
        assert!(a.admit(4).is_ok());
        a.restart_quota(10);
        a.revoke();
        assert_eq!(only(a.admit(5)), Err(Refusal::Revoked));
        assert_eq!(a.open_connections(), 0);
    }

    /// A slot given back however its connection ends: dropped on an early return, or after a
    /// revoke emptied the table already (no double remove of a later connection's entry).
    #[test]
    fn a_dropped_slot_gives_its_place_back() {
        struct Flag(Arc<AtomicBool>);
        impl Shut for Flag {
            fn shut(&self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let a = Account::new(1, "s", 0);
        a.set_limits(0, QuotaPeriod::None, 1);
        {
            let (slot, _) = a.admit(7).unwrap();
            assert_eq!(a.open_connections(), 1);
            assert!(slot.attach(Box::new(Flag(Arc::new(AtomicBool::new(false))))));
        }
        assert_eq!(a.open_connections(), 0, "dropping the slot gave it back");
        let shut = Arc::new(AtomicBool::new(false));
        let (slot, _) = a.admit(8).unwrap();
        assert!(slot.attach(Box::new(Flag(shut.clone()))));
        a.close_all();
        assert!(
            shut.load(Ordering::Relaxed),
            "close_all shuts attached sockets"
        );
        assert!(
            !slot.attach(Box::new(Flag(shut.clone()))),
            "closed from outside: nothing to attach to"
        );
        drop(slot);
        assert_eq!(a.open_connections(), 0);
    }

    #[test]
    fn connections_hold_the_bucket_and_the_active_list_keeps_the_account() {
        let lim = Limiter::new(std::time::Duration::from_secs(3600));
        let roster = Roster::new(lim.clone());
        let a = Account::in_roster(1, "r", 1000, &roster);
        assert_eq!((lim.buckets(), roster.active().len()), (0, 0));
        let (s1, _) = a.admit(1).unwrap();
        let (s2, _) = a.admit(2).unwrap();
        assert_eq!((lim.buckets(), roster.active().len(), a.held()), (1, 1, 2));
        assert!(!roster.retire_if(&a, |_| true), "connections open");
        a.close_all(); // shut from outside: the relays still run until the slots go
        assert!(!roster.retire_if(&a, |_| true), "slots alive");
        assert_eq!(lim.buckets(), 1);
        drop(s1);
        drop(s2);
        assert_eq!(
            (lim.buckets(), a.held()),
            (0, 0),
            "the last one dropped the bucket"
        );
        assert!(!roster.retire_if(&a, |_| false), "not settled yet");
        assert!(roster.retire_if(&a, |_| true));
        assert!(roster.active().is_empty());
        // Back again: listed again, a new bucket at the current rate.
        a.set_rate(2000);
        let (_s3, idle) = a.admit(3).unwrap();
        assert!(idle);
        assert_eq!((lim.buckets(), roster.active().len()), (1, 1));
    }
}
