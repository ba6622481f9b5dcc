//! Per-user token buckets, the refill thread, and the Condvar discipline.
//!
//! One bucket per user with connections open, in a global `Mutex<HashMap<user, Bucket>>`: a
//! connection [`Limiter::open`]s its user's bucket when it is admitted (the first one makes it,
//! empty) and [`Limiter::close`]s it when it ends (the last one drops it), so the refill tick walks
//! the users that are connected, never the user table. A relay asks for up to
//! its buffer size and may be granted less; it reads no more than it was granted and gives back
//! what a short read left unused. Tokens are counted in whole bytes, with the sub-byte remainder of
//! `rate × elapsed` carried in nanobytes, so no rounding drifts over time.
//!
//! Fairness and wake-ups: when a bucket is empty a relay joins the bucket's FIFO queue and sleeps
//! on *its own* Condvar. Whoever adds tokens (the refill thread every tick, or a relay giving some
//! back) hands them to the queue in order, each waiter getting at most what it asked for, and
//! wakes exactly the waiters it served. So a tick wakes only relays that can proceed, a relay that
//! wakes first cannot take the whole refill, and a newly joined connection is served after at most
//! one pass over the queue. Invariant: a bucket with waiters has no tokens left over.
//!
//! Two ways to take, for two kinds of traffic. A byte stream (`acquire`) can be cut anywhere, so
//! it takes what is there and reads no more. A datagram (`acquire_whole`) is never split: it
//! takes all its `n` bytes at once, even past what the bucket holds, and the bucket goes into
//! debt by the difference. It waits only while the bucket is empty or already in debt (or others
//! are queued ahead), and later refills pay the debt back before anyone else is served, so the
//! long-run rate stays exact and a stream queued behind a datagram waits its turn. Debt is at
//! most one datagram: a bucket in debt lends nothing more.
//!
//! In a fleet (several servers sharing each user's one bandwidth, `flow/lease.rs`) a bucket's
//! tokens come from elsewhere ([`Supply`]): from a pool of tokens the lease thread obtained, which
//! the refill tick draws from at up to the user's rate, or while the leases cannot be had, from
//! the user's rate divided by the servers alive. The refill thread still tops buckets up every
//! tick and never waits on the network; the lease thread reads each user's demand
//! ([`Limiter::take_demand`]) and hands grants in ([`Limiter::grant`]).
//!
//! An unlimited user's bucket has no rate; in a fleet, a user with a quota still takes its
//! bytes here, from a quota allowance the lease thread leases for it ([`Limiter::leases_quota`]):
//! it waits only while the allowance is spent, and is woken with [`Closed::Quota`] once the
//! fleet's quota is used up.
//!
//! While no bucket has a rate (no limited user is connected) the refill thread sleeps until one
//! appears, so an idle server wakes nothing here; tokens accrue from real elapsed time, so the
//! first tick after such a sleep loses nothing.
//!
//! The lock is never held across I/O: callers do their reads and writes between `acquire` and
//! `give_back`. Nothing here knows about sockets; a user is a name. Unlimited users without a
//! quota (or alone, without a fleet) never wait here (see `Budget` in `net/relay.rs`).

use crate::stop::Stop;
use crossbeam_channel::{Receiver, Sender, bounded, select, tick};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Default refill tick: a waiting relay waits ~10 ms at most for its next grant, and the refill
/// thread wakes 100 times a second.
pub const DEFAULT_TICK: Duration = Duration::from_millis(10);
/// The bucket holds at most this many ticks' worth of tokens while nobody takes them (40 ms at
/// the default tick). Deep enough that a relay kept off the CPU for a few ticks on a busy
/// machine loses nothing; shallow enough that a burst after a pause is 4% of a second. An idle
/// user's first connection starts from an empty bucket ([`Limiter::start_fresh`]).
pub const CAPACITY_TICKS: u64 = 4;
const NANOS: u128 = 1_000_000_000;

/// One relay thread's place to sleep: its own small mutex and Condvar, so a relay woken with a
/// grant returns without touching the limiter's global lock (a tick that serves a hundred
/// waiters would otherwise queue them all on that lock, and a busy user's fast path behind them).
/// Reused for every grant the thread waits for.
#[derive(Default)]
pub struct Waiter {
    lock: Mutex<()>,
    cv: Condvar,
    /// Bytes handed to this waiter while it slept (written under the limiter's lock).
    granted: AtomicU64,
    /// Set when no grant will come: [`SHUT`] (the user was removed or the limiter stopped) or
    /// [`QUOTA_USED_UP`]; 0 while open.
    closed: AtomicU8,
}

/// [`Waiter::closed`]: the user was removed or the limiter stopped.
const SHUT: u8 = 1;
/// [`Waiter::closed`]: the fleet's quota is used up ([`Limiter::quota_used_up`]).
const QUOTA_USED_UP: u8 = 2;

impl Waiter {
    /// A fresh waiter for one relay thread.
    pub fn new() -> Arc<Waiter> {
        Arc::new(Waiter::default())
    }

    /// Wakes the relay sleeping here. Taking its lock first means the wake-up cannot fall between
    /// the relay's check of `granted` and its wait.
    fn notify(&self) {
        let _g = self.lock.lock();
        self.cv.notify_one();
    }

    /// Sleeps until a grant or a close arrives (checked under this waiter's own lock).
    fn wait(&self, stopping: &AtomicBool) -> Result<u64, Closed> {
        let mut g = self.lock.lock();
        loop {
            let n = self.granted.load(Ordering::Acquire);
            if n > 0 {
                return Ok(n);
            }
            match self.closed.load(Ordering::Acquire) {
                0 => {}
                QUOTA_USED_UP => return Err(Closed::Quota),
                _ if stopping.load(Ordering::Relaxed) => return Err(Closed::Stopping),
                _ => return Err(Closed::Revoked),
            }
            self.cv.wait(&mut g);
        }
    }
}

struct Queued {
    waiter: Arc<Waiter>,
    want: u64,
    /// A datagram: all of `want` at once (maybe into debt), never a part of it.
    whole: bool,
}

/// Where a bucket's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supply {
    /// The user's rate, on this server alone (no fleet).
    Own,
    /// Leased from the fleet: the refill draws from the bucket's pool, at most at the user's
    /// rate, and never more than the pool holds.
    Leased,
    /// The fleet's leases cannot be had: the user's rate divided by this many servers.
    Split(u64),
}

/// The rate a server runs a user at while leases cannot be had: its rate divided by the servers
/// alive when last known (at least one), never 0 for a limited user (0 would mean unlimited).
pub fn fallback_rate(rate: u64, servers: u64) -> u64 {
    if rate == 0 {
        return 0;
    }
    (rate / servers.max(1)).max(1)
}

/// One user's demand on this server since the last look ([`Limiter::take_demand`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The user.
    pub user: Arc<str>,
    /// Its rate (bytes per second).
    pub rate: u64,
    /// Bytes its queued relays ask for now.
    pub queued: u64,
    /// Bytes its relays took (net of give-backs) since the last look.
    pub moved: u64,
    /// Leased bytes left in the pool, taken out (handed back to the fleet).
    pub unused: u64,
    /// An unlimited user's quota allowance kept on hand (not handed back: its relays are
    /// using it); 0 for a limited user, whose pool goes back every look.
    pub held: u64,
}

impl Demand {
    /// What this server says it waits for: queued asks plus what was moved last period.
    pub fn bytes(&self) -> u64 {
        self.queued.saturating_add(self.moved)
    }
}

/// A token bucket for one user. Pure arithmetic plus a queue; time is passed in.
pub struct Bucket {
    rate: u64,
    capacity: u64,
    /// The smallest grant worth waking a relay for: half a tick's worth (or all it asked for).
    min_grant: u64,
    tokens: u64,
    /// Bytes a datagram took beyond the tokens there were; refills pay it back first. While it
    /// is above 0, `tokens` is 0.
    debt: u64,
    /// Nanobytes not yet worth a whole byte (always < 1e9).
    frac: u64,
    last: Instant,
    queue: VecDeque<Queued>,
    /// Connections holding the bucket ([`Limiter::open`] less [`Limiter::close`]).
    holders: u32,
    /// Which bucket of this user's it is: a close meant for a bucket removed meanwhile (the user
    /// deleted) must not count against a newer one under the same name.
    serial: u64,
    supply: Supply,
    /// Leased tokens not yet in the bucket ([`Supply::Leased`]).
    pool: u64,
    /// Bytes taken, net of give-backs, since the last [`Bucket::take_demand`].
    moved: u64,
    /// An unlimited user's bucket in a fleet, whose relays take its quota from
    /// [`Bucket::allowance`] (they asked, see [`Limiter::leases_quota`]).
    metered: bool,
    /// Quota bytes leased from the fleet for an unlimited user, not yet taken.
    allowance: u64,
}

/// Why no grant came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The user was deleted (or the limiter forgot it): the connection must end.
    Revoked,
    /// The server is shutting down.
    Stopping,
    /// The user's quota is used up across the fleet.
    Quota,
}

impl Bucket {
    /// A bucket for `rate` bytes per second, starting empty (so a user's first second carries at
    /// most `rate` plus what accrues before its first read).
    pub fn new(rate: u64, tick: Duration, now: Instant) -> Bucket {
        Bucket {
            rate,
            capacity: capacity_for(rate, tick),
            min_grant: min_grant_for(rate, tick),
            tokens: 0,
            debt: 0,
            frac: 0,
            last: now,
            queue: VecDeque::new(),
            holders: 0,
            serial: 0,
            supply: Supply::Own,
            pool: 0,
            moved: 0,
            metered: false,
            allowance: 0,
        }
    }

    /// Where this bucket's tokens come from from now on; what accrued under the old supply up
    /// to `now` is kept. Returns the waiters served, to be woken.
    pub fn set_supply(&mut self, supply: Supply, now: Instant) -> Vec<Arc<Waiter>> {
        if supply == self.supply {
            return Vec::new();
        }
        let mut served = self.refill(now);
        self.supply = supply;
        if self.rate == 0 && supply != Supply::Leased {
            // Without leases an unlimited user's relays run free (counted, for the fleet's
            // quota once it is back): the queue waits for no allowance.
            served.extend(self.release_all());
        }
        served
    }

    /// Adds leased tokens to the pool the refill draws from; for an unlimited user, to its
    /// quota allowance, which is handed to the queue at once. Returns the waiters served.
    pub fn grant(&mut self, tokens: u64) -> Vec<Arc<Waiter>> {
        if self.rate == 0 {
            self.allowance = self.allowance.saturating_add(tokens);
            return self.serve_allowance();
        }
        self.pool = self.pool.saturating_add(tokens);
        Vec::new()
    }

    /// Quota bytes leased for an unlimited user and not yet taken.
    pub fn allowance(&self) -> u64 {
        self.allowance
    }

    /// An unlimited user's relay takes up to `want` bytes of its quota allowance (all of `want`
    /// for a datagram, which may take the allowance's last bytes and pass it by less than one
    /// datagram), if nobody is queued ahead. Returns what it took (maybe 0).
    fn take_allowance(&mut self, want: u64, whole: bool) -> u64 {
        self.metered = true;
        if !self.queue.is_empty() || self.allowance == 0 {
            return 0;
        }
        let n = if whole {
            want
        } else {
            want.min(self.allowance)
        };
        self.allowance = self.allowance.saturating_sub(n);
        self.moved = self.moved.saturating_add(n);
        n
    }

    /// Hands the allowance to the queue in order: a stream what is there up to its ask, a
    /// datagram its whole ask (see [`Bucket::take_allowance`]).
    fn serve_allowance(&mut self) -> Vec<Arc<Waiter>> {
        let mut served = Vec::new();
        while self.allowance > 0 {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let n = if q.whole {
                q.want
            } else {
                q.want.min(self.allowance)
            };
            self.allowance = self.allowance.saturating_sub(n);
            self.moved = self.moved.saturating_add(n);
            q.waiter.granted.store(n, Ordering::Release);
            served.push(q.waiter);
        }
        served
    }

    /// Every waiter gets what it asked for, untaken from anything (an unlimited user's queue
    /// while leases cannot be had); it counts as moved.
    fn release_all(&mut self) -> Vec<Arc<Waiter>> {
        let queue = std::mem::take(&mut self.queue);
        queue
            .into_iter()
            .map(|q| {
                self.moved = self.moved.saturating_add(q.want);
                q.waiter.granted.store(q.want, Ordering::Release);
                q.waiter
            })
            .collect()
    }

    /// Leased tokens not yet drawn.
    pub fn pool(&self) -> u64 {
        self.pool
    }

    /// This bucket's demand since the last call, or `None` when it has nothing to say: no
    /// relay waiting, nothing moved, nothing leased left. Returns (queued, moved, unused,
    /// held): a limited user's pool is taken out (`unused`, back to the fleet); an unlimited
    /// user's quota allowance is kept (`held`) while its relays wait or moved bytes, and taken
    /// out once they did neither for a whole lease period.
    pub fn take_demand(&mut self) -> Option<(u64, u64, u64, u64)> {
        let queued: u64 = self.queue.iter().map(|q| q.want).sum();
        if queued == 0 && self.moved == 0 && self.pool == 0 && self.allowance == 0 {
            return None;
        }
        let idle = queued == 0 && self.moved == 0;
        let mut unused = std::mem::take(&mut self.pool);
        if idle || self.rate > 0 {
            unused = unused.saturating_add(std::mem::take(&mut self.allowance));
        }
        let out = (queued, self.moved, unused, self.allowance);
        self.moved = 0;
        Some(out)
    }

    /// The configured rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Tokens on hand (bytes).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Bytes owed from a datagram taken past the tokens on hand.
    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// How many relays are queued for a grant.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Adds what accrued since the last refill, serves the queue, and caps what is left over.
    /// Returns the waiters served, to be woken.
    pub fn refill(&mut self, now: Instant) -> Vec<Arc<Waiter>> {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now.max(self.last);
        let rate = match self.supply {
            Supply::Own | Supply::Leased => self.rate,
            Supply::Split(n) => fallback_rate(self.rate, n),
        };
        let nanobytes = u128::from(rate) * elapsed + u128::from(self.frac);
        let mut whole = u64::try_from(nanobytes / NANOS).unwrap_or(u64::MAX);
        // frac < 1e9 always fits; the remainder of a division by 1e9.
        self.frac = (nanobytes % NANOS) as u64;
        if self.supply == Supply::Leased {
            // At most the user's rate, and never more than was leased; what the bucket has no
            // room for stays in the pool rather than being capped away.
            let room = self
                .capacity
                .saturating_sub(self.tokens)
                .saturating_add(self.debt);
            let n = whole.min(self.pool).min(room);
            if n < whole {
                self.frac = 0;
            }
            self.pool -= n;
            whole = n;
        }
        self.add(whole);
        let served = self.serve();
        if self.tokens > self.capacity {
            self.tokens = self.capacity;
            self.frac = 0;
        }
        served
    }

    /// Takes up to `want` tokens at once if nobody is queued ahead and at least a minimum grant
    /// is there. Returns the grant (maybe 0). Crumbs are left for the tick to add to: a relay fed
    /// a few bytes at a time would wake, read and write thousands of times a second.
    pub fn try_take(&mut self, want: u64) -> u64 {
        if !self.queue.is_empty() || self.tokens < want.min(self.min_grant) {
            return 0;
        }
        let n = want.min(self.tokens);
        self.tokens -= n;
        self.moved += n;
        n
    }

    /// Takes all of `n` at once if nobody is queued ahead and the bucket is neither empty nor in
    /// debt; what `n` exceeds the tokens by becomes debt. Returns whether it was taken.
    pub fn try_take_whole(&mut self, n: u64) -> bool {
        if !self.queue.is_empty() || self.tokens == 0 {
            return false;
        }
        self.take_whole(n);
        true
    }

    /// Returns tokens a short read left unused; they pay any debt, then go to the queue.
    /// Returns the waiters served.
    pub fn give_back(&mut self, n: u64) -> Vec<Arc<Waiter>> {
        self.moved = self.moved.saturating_sub(n);
        self.add(n);
        self.serve()
    }

    /// New tokens: debt first, the rest on hand.
    fn add(&mut self, n: u64) {
        let paid = n.min(self.debt);
        self.debt -= paid;
        self.tokens = self.tokens.saturating_add(n - paid);
    }

    /// Takes `n` whole, going into debt for what is not there.
    fn take_whole(&mut self, n: u64) {
        self.moved = self.moved.saturating_add(n);
        let have = n.min(self.tokens);
        self.tokens -= have;
        self.debt = self.debt.saturating_add(n - have);
    }

    /// Changes the rate; the next refill accrues at the new rate. Going to 0 (unlimited) releases
    /// every waiter with what it asked for.
    pub fn set_rate(&mut self, rate: u64, tick: Duration, now: Instant) -> Vec<Arc<Waiter>> {
        // Accrue what the old rate earned up to now, so the change takes effect exactly now.
        let mut served = self.refill(now);
        self.rate = rate;
        self.capacity = capacity_for(rate, tick);
        self.min_grant = min_grant_for(rate, tick);
        self.tokens = self.tokens.min(self.capacity);
        if rate == 0 {
            self.debt = 0;
            served.extend(self.queue.drain(..).map(|q| {
                q.waiter.granted.store(q.want, Ordering::Release);
                q.waiter
            }));
        }
        served
    }

    fn enqueue(&mut self, waiter: Arc<Waiter>, want: u64) {
        self.queue.push_back(Queued {
            waiter,
            want,
            whole: false,
        });
    }

    fn enqueue_whole(&mut self, waiter: Arc<Waiter>, n: u64) {
        self.queue.push_back(Queued {
            waiter,
            want: n,
            whole: true,
        });
    }

    /// Hands tokens to queued waiters in FIFO order: a stream at most what it asked for, and
    /// only while there is at least a minimum grant for it; a datagram all it asked for, once
    /// the bucket is out of debt and not empty.
    fn serve(&mut self) -> Vec<Arc<Waiter>> {
        let mut served = Vec::new();
        while let Some(front) = self.queue.front() {
            let ready = if front.whole {
                self.tokens > 0
            } else {
                self.tokens > 0 && self.tokens >= front.want.min(self.min_grant)
            };
            if !ready {
                break;
            }
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let n = if q.whole {
                self.take_whole(q.want);
                q.want
            } else {
                let n = q.want.min(self.tokens);
                self.tokens -= n;
                self.moved += n;
                n
            };
            q.waiter.granted.store(n, Ordering::Release);
            served.push(q.waiter);
        }
        served
    }

    /// Wakes every waiter with no grant: the user removed or the limiter stopped.
    fn close_all(&mut self) -> Vec<Arc<Waiter>> {
        self.end_all(SHUT)
    }

    fn end_all(&mut self, why: u8) -> Vec<Arc<Waiter>> {
        self.queue
            .drain(..)
            .map(|q| {
                q.waiter.closed.store(why, Ordering::Release);
                q.waiter
            })
            .collect()
    }
}

fn min_grant_for(rate: u64, tick: Duration) -> u64 {
    let per_tick = u128::from(rate) * tick.as_nanos() / NANOS;
    u64::try_from(per_tick / 2).unwrap_or(u64::MAX).max(1)
}

fn capacity_for(rate: u64, tick: Duration) -> u64 {
    let per_tick = u128::from(rate) * tick.as_nanos() / NANOS;
    u64::try_from(per_tick)
        .unwrap_or(u64::MAX)
        .saturating_mul(CAPACITY_TICKS)
        .max(1)
}

/// The buckets of the users with connections open, the refill tick, and the counters the metrics
/// read.
pub struct Limiter {
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
    /// The last bucket serial given out.
    serials: AtomicU64,
    tick: Duration,
    stopping: AtomicBool,
    /// Ends the refill thread.
    stop: Stop,
    /// Waiters woken with a grant, since start.
    wakeups: AtomicU64,
    /// The [`Supply`] of every bucket, encoded (0 own, 1 leased, n + 1 split n ways), so a new
    /// bucket starts with the current one.
    supply: AtomicU64,
    /// Leased tokens and quota allowances of buckets dropped (the user's last connection
    /// closed), per user, for the lease thread to hand back to the fleet ([`Limiter::take_left`]).
    left: Mutex<HashMap<Arc<str>, u64>>,
    /// Users whose bucket was made (a first connection on this server) since the lease thread
    /// last looked ([`Limiter::take_joined`]); kept only in a fleet.
    joined: Mutex<Vec<Arc<str>>>,
    /// Wakes the refill thread from its sleep once a bucket has a rate (holds one signal).
    rated: (Sender<()>, Receiver<()>),
    /// Refill rounds since start.
    refills: AtomicU64,
}

fn encode(s: Supply) -> u64 {
    match s {
        Supply::Own => 0,
        Supply::Leased => 1,
        Supply::Split(n) => n.max(1).saturating_add(1),
    }
}

fn decode(v: u64) -> Supply {
    match v {
        0 => Supply::Own,
        1 => Supply::Leased,
        n => Supply::Split(n - 1),
    }
}

impl Limiter {
    /// A limiter that refills every `tick` (at least 1 ms).
    pub fn new(tick: Duration) -> Arc<Limiter> {
        Arc::new(Limiter {
            buckets: Mutex::new(HashMap::new()),
            serials: AtomicU64::new(0),
            tick: tick.max(Duration::from_millis(1)),
            stopping: AtomicBool::new(false),
            stop: Stop::new(),
            wakeups: AtomicU64::new(0),
            supply: AtomicU64::new(0),
            left: Mutex::new(HashMap::new()),
            joined: Mutex::new(Vec::new()),
            rated: bounded(1),
            refills: AtomicU64::new(0),
        })
    }

    /// The refill tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Waiters woken with a grant since start.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Refill rounds since start (none while no bucket has a rate).
    pub fn refills(&self) -> u64 {
        self.refills.load(Ordering::Relaxed)
    }

    /// A bucket has a rate now: wakes the refill thread if it sleeps (a signal already pending
    /// is enough).
    fn rated(&self, rate: u64) {
        if rate > 0 {
            let _ = self.rated.0.try_send(());
        }
    }

    /// Sets (or creates) a user's bucket; rate 0 removes the need for one but keeps it harmless.
    /// A bucket made here is held by nobody: it stays until [`Limiter::remove`]. The server's
    /// buckets come and go with connections instead ([`Limiter::open`], [`Limiter::close`]).
    pub fn set_rate(&self, user: &Arc<str>, rate: u64) {
        let now = Instant::now();
        let mut map = self.buckets.lock();
        let served = match map.get_mut(&**user) {
            Some(b) => b.set_rate(rate, self.tick, now),
            None => {
                let mut b = Bucket::new(rate, self.tick, now);
                b.supply = self.supply();
                map.insert(user.clone(), b);
                Vec::new()
            }
        };
        drop(map);
        self.rated(rate);
        self.wake(served);
    }

    /// Changes the rate of a user's bucket if it has one (connections open); makes none. Tokens
    /// earned at the old rate up to now are kept.
    pub fn change_rate(&self, user: &str, rate: u64) {
        let now = Instant::now();
        let served = match self.buckets.lock().get_mut(user) {
            Some(b) => b.set_rate(rate, self.tick, now),
            None => return,
        };
        self.rated(rate);
        self.wake(served);
    }

    /// One more connection of `user` holds its bucket: the first makes it, empty, at the rate
    /// `rate` holds. The rate is read under the limiter's lock, so a [`Limiter::change_rate`]
    /// made after storing a new rate there cannot fall between the read and the bucket's making.
    /// Returns the serial to [`Limiter::close`] with.
    pub fn open(&self, user: &Arc<str>, rate: &AtomicU64) -> u64 {
        let mut map = self.buckets.lock();
        if let Some(b) = map.get_mut(&**user) {
            b.holders = b.holders.saturating_add(1);
            let serial = b.serial;
            // Still held by connections of an account deleted and added again under this name:
            // the newest account's rate governs.
            let rate = rate.load(Ordering::Relaxed);
            if b.rate != rate {
                let served = b.set_rate(rate, self.tick, Instant::now());
                drop(map);
                self.rated(rate);
                self.wake(served);
            }
            return serial;
        }
        let rate = rate.load(Ordering::Relaxed);
        let mut b = Bucket::new(rate, self.tick, Instant::now());
        b.supply = self.supply();
        if b.supply != Supply::Own {
            // The lease thread shares a capped user's count at its next round, not its next
            // heartbeat (drained every lease period, so it stays short).
            self.joined.lock().push(user.clone());
        }
        b.holders = 1;
        b.serial = self.serials.fetch_add(1, Ordering::Relaxed) + 1;
        let serial = b.serial;
        map.insert(user.clone(), b);
        drop(map);
        self.rated(rate);
        serial
    }

    /// A connection of `user` that [`Limiter::open`]ed bucket `serial` ended: the last one drops
    /// the bucket, even with a relay still queued (it wakes with [`Closed::Revoked`]: its
    /// connection is gone), so no bucket outlives its holders. A close for a bucket removed
    /// meanwhile does nothing.
    pub fn close(&self, user: &str, serial: u64) {
        let mut map = self.buckets.lock();
        let Some(b) = map.get_mut(user) else { return };
        if b.serial != serial || b.holders == 0 {
            return;
        }
        b.holders -= 1;
        if b.holders > 0 {
            return;
        }
        let removed = map.remove_entry(user);
        drop(map);
        if let Some((name, b)) = removed {
            self.drop_bucket(name, b);
        }
    }

    /// A bucket leaves: its waiters wake with no grant, and what it held leased is kept for the
    /// lease thread to hand back (the fleet charged it).
    fn drop_bucket(&self, user: Arc<str>, mut b: Bucket) {
        for w in b.close_all() {
            w.notify();
        }
        let held = b.pool.saturating_add(b.allowance);
        if held > 0 {
            let mut left = self.left.lock();
            let n = left.entry(user).or_default();
            *n = n.saturating_add(held);
        }
    }

    /// Users whose first connection on this server made their bucket since the last call (in a
    /// fleet; alone, none are kept).
    pub fn take_joined(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.joined.lock())
    }

    /// Leased tokens and quota allowances of buckets dropped since the last call, per user
    /// (to be handed back to the fleet).
    pub fn take_left(&self) -> Vec<(Arc<str>, u64)> {
        std::mem::take(&mut *self.left.lock()).into_iter().collect()
    }

    /// How many buckets there are (users with connections open, plus any made by
    /// [`Limiter::set_rate`]).
    pub fn buckets(&self) -> usize {
        self.buckets.lock().len()
    }

    /// Where every bucket's tokens come from now.
    pub fn supply(&self) -> Supply {
        decode(self.supply.load(Ordering::Relaxed))
    }

    /// Changes where every bucket's tokens come from (the lease thread: leased while Redis
    /// answers, split while it does not). What accrued under the old supply is kept.
    pub fn set_supply(&self, supply: Supply) {
        if self.supply.swap(encode(supply), Ordering::Relaxed) == encode(supply) {
            return;
        }
        let now = Instant::now();
        let mut served = Vec::new();
        for b in self.buckets.lock().values_mut() {
            served.extend(b.set_supply(supply, now));
        }
        self.wake(served);
    }

    /// Each limited user's demand since the last call, for users with relays waiting, bytes
    /// moved, or leased tokens left (taken out of the pool: they go back to the fleet); and
    /// each unlimited user's whose relays take a leased quota allowance (rate 0 in the
    /// [`Demand`]).
    pub fn take_demand(&self) -> Vec<Demand> {
        let mut map = self.buckets.lock();
        map.iter_mut()
            .filter(|(_, b)| b.rate > 0 || b.metered || b.pool > 0)
            .filter_map(|(user, b)| {
                let (queued, moved, unused, held) = b.take_demand()?;
                Some(Demand {
                    user: user.clone(),
                    rate: b.rate,
                    queued,
                    moved,
                    unused,
                    held,
                })
            })
            .collect()
    }

    /// Adds leased tokens to a user's pool (the refill tick draws from it), or for an
    /// unlimited user to its quota allowance (its waiting relays are served at once). Tokens
    /// for a user this server no longer has are dropped (returns false).
    pub fn grant(&self, user: &str, tokens: u64) -> bool {
        let served = match self.buckets.lock().get_mut(user) {
            Some(b) => b.grant(tokens),
            None => return false,
        };
        self.wake(served);
        true
    }

    /// True in a fleet (leased or split supply): an unlimited user with a quota then takes its
    /// bytes through [`Limiter::acquire`] too, from a quota allowance the lease thread leases
    /// for it, so the quota holds over the fleet. Alone, it never asks (one relaxed load).
    pub fn leases_quota(&self) -> bool {
        self.supply() != Supply::Own
    }

    /// The fleet's quota for `user` is used up: its waiting relays wake with
    /// [`Closed::Quota`] (new ones are refused by the account's own count).
    pub fn quota_used_up(&self, user: &str) {
        let ended = match self.buckets.lock().get_mut(user) {
            Some(b) => b.end_all(QUOTA_USED_UP),
            None => return,
        };
        for w in ended {
            w.notify();
        }
    }

    /// Empties a user's bucket (its first connection after being idle): the first second then
    /// carries at most the rate itself.
    pub fn start_fresh(&self, user: &str) {
        if let Some(b) = self.buckets.lock().get_mut(user) {
            b.tokens = 0;
            b.frac = 0;
            b.last = Instant::now();
        }
    }

    /// Forgets a user: its waiting relays wake with [`Closed::Revoked`].
    pub fn remove(&self, user: &str) {
        let removed = self.buckets.lock().remove_entry(user);
        if let Some((name, b)) = removed {
            self.drop_bucket(name, b);
        }
    }

    /// Blocks until some tokens are granted: at most `want` (> 0), maybe fewer. Returns
    /// immediately with `want` when the user's rate is 0, except in a fleet with leases: then
    /// the caller has a quota ([`Limiter::leases_quota`]) and takes from its allowance, waiting
    /// while there is none (the lease thread asks for more at its next round).
    ///
    /// # Errors
    /// [`Closed`] when the user is gone or the limiter stops.
    pub fn acquire(&self, user: &str, waiter: &Arc<Waiter>, want: u64) -> Result<u64, Closed> {
        self.acquire_as(user, waiter, want, false)
    }

    /// Blocks until all `n` bytes are granted at once, for a datagram that cannot be split: the
    /// bucket may go into debt by what it lacks, which later refills pay back before anyone
    /// else is served. Waits only while the bucket is empty or in debt, or others are queued.
    /// Returns at once when `n` is 0 or the user's rate is 0.
    ///
    /// # Errors
    /// [`Closed`] when the user is gone or the limiter stops.
    pub fn acquire_whole(&self, user: &str, waiter: &Arc<Waiter>, n: u64) -> Result<(), Closed> {
        if n == 0 {
            return Ok(());
        }
        self.acquire_as(user, waiter, n, true).map(|_| ())
    }

    fn acquire_as(
        &self,
        user: &str,
        waiter: &Arc<Waiter>,
        want: u64,
        whole: bool,
    ) -> Result<u64, Closed> {
        let mut map = self.buckets.lock();
        if self.stopping.load(Ordering::Relaxed) {
            return Err(Closed::Stopping);
        }
        let Some(b) = map.get_mut(user) else {
            return Err(Closed::Revoked);
        };
        if b.rate == 0 {
            match self.supply() {
                Supply::Own => return Ok(want),
                Supply::Split(_) => {
                    // Redis down: free, but counted (charged to the quota when it is back).
                    b.metered = true;
                    b.moved = b.moved.saturating_add(want);
                    return Ok(want);
                }
                Supply::Leased => {
                    let n = b.take_allowance(want, whole);
                    if n > 0 {
                        return Ok(n);
                    }
                    waiter.granted.store(0, Ordering::Release);
                    waiter.closed.store(0, Ordering::Release);
                    b.queue.push_back(Queued {
                        waiter: waiter.clone(),
                        want,
                        whole,
                    });
                    drop(map);
                    return waiter.wait(&self.stopping);
                }
            }
        }
        // With relays queued, accrual is the tick's to hand out (in order, in useful amounts);
        // refilling here would feed the front waiter a few bytes at a time.
        let served = if b.queue.is_empty() {
            b.refill(Instant::now())
        } else {
            Vec::new()
        };
        let n = if whole {
            if b.try_take_whole(want) { want } else { 0 }
        } else {
            b.try_take(want)
        };
        if n > 0 {
            drop(map);
            self.wake(served);
            return Ok(n);
        }
        waiter.granted.store(0, Ordering::Release);
        waiter.closed.store(0, Ordering::Release);
        if whole {
            b.enqueue_whole(waiter.clone(), want);
        } else {
            b.enqueue(waiter.clone(), want);
        }
        drop(map);
        self.wake(served);
        waiter.wait(&self.stopping)
    }

    /// Gives back tokens a short read did not use.
    pub fn give_back(&self, user: &str, n: u64) {
        if n == 0 {
            return;
        }
        let leased = self.supply() == Supply::Leased;
        let served = match self.buckets.lock().get_mut(user) {
            Some(b) if b.rate == 0 => {
                b.moved = b.moved.saturating_sub(n);
                if !leased {
                    return;
                }
                b.allowance = b.allowance.saturating_add(n);
                b.serve_allowance()
            }
            Some(b) => b.give_back(n),
            None => return,
        };
        self.wake(served);
    }

    /// One refill pass over every bucket, waking the waiters served. Called by the refill thread,
    /// which sleeps once this says no bucket has a rate.
    pub fn refill_all(&self, now: Instant) -> bool {
        self.refills.fetch_add(1, Ordering::Relaxed);
        let mut served = Vec::new();
        let mut rated = false;
        {
            let mut map = self.buckets.lock();
            for b in map.values_mut() {
                if b.rate > 0 {
                    rated = true;
                    served.extend(b.refill(now));
                }
            }
        }
        // Woken outside the global lock: each relay returns on its own waiter's lock.
        self.wake(served);
        rated
    }

    /// Starts the refill thread; it stops when [`Limiter::shutdown`] is called.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn_refill(self: &Arc<Self>) -> std::io::Result<thread::JoinHandle<()>> {
        let me = self.clone();
        thread::Builder::new()
            .name("limiter refill".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // The refill uses real elapsed time, so a late tick loses no tokens.
                let ticks = tick(me.tick);
                let stop = me.stop.receiver();
                let mut rated = true;
                loop {
                    if rated {
                        select! {
                            recv(ticks) -> _ => rated = me.refill_all(Instant::now()),
                            recv(stop) -> _ => return,
                        }
                    } else {
                        // No bucket has a rate: sleep until one does. A bucket rated after the
                        // last round's look has left its signal in `rated`.
                        select! {
                            recv(me.rated.1) -> _ => rated = true,
                            recv(stop) -> _ => return,
                        }
                    }
                }
            })
    }

    /// Stops the refill thread and wakes every waiter with [`Closed::Stopping`].
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.stop();
        let closed: Vec<Arc<Waiter>> = self
            .buckets
            .lock()
            .values_mut()
            .flat_map(Bucket::close_all)
            .collect();
        for w in closed {
            w.notify();
        }
    }

    fn wake(&self, served: Vec<Arc<Waiter>>) {
        if served.is_empty() {
            return;
        }
        self.wakeups
            .fetch_add(served.len() as u64, Ordering::Relaxed);
        for w in served {
            w.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn refill_accrues_exactly_with_fractions() {
        let t0 = Instant::now();
        // 16 KiB/s × 10 ms = 163.84 bytes: fractions must carry, not round away.
        let mut b = Bucket::new(16 * 1024, TICK, t0);
        let mut total = 0;
        for i in 1..=1000 {
            b.refill(ms(t0, 10 * i));
            total += b.try_take(u64::MAX);
        }
        assert_eq!(total, 16 * 1024 * 10);
    }

    #[test]
    fn capacity_caps_idle_accrual() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1 << 20, TICK, t0);
        b.refill(ms(t0, 5_000));
        let cap = (1u64 << 20) * 10 / 1000 * CAPACITY_TICKS;
        assert_eq!(b.tokens(), cap);
        assert!(cap as f64 <= 0.05 * (1 << 20) as f64, "burst bound");
    }

    #[test]
    fn partial_grants_and_give_back() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, TICK, t0);
        b.refill(ms(t0, 10)); // 10 bytes
        assert_eq!(
            b.try_take(64 * 1024),
            10,
            "a big ask gets only what is there"
        );
        assert_eq!(b.try_take(1), 0);
        b.give_back(6);
        assert_eq!(b.try_take(100), 6);
        b.give_back(3);
        assert_eq!(
            b.try_take(100),
            0,
            "3 bytes are crumbs: half a tick (5) is the least grant"
        );
        assert_eq!(b.try_take(2), 2, "but a small ask is served whole");
    }

    #[test]
    fn waiters_are_served_in_order_and_share_a_refill() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // 1000 bytes a tick
        let ws: Vec<_> = (0..3).map(|_| Waiter::new()).collect();
        for w in &ws {
            b.enqueue(w.clone(), 400);
        }
        let served = b.refill(ms(t0, 10));
        assert_eq!(served.len(), 2);
        let got = |ws: &[Arc<Waiter>]| -> Vec<u64> {
            ws.iter()
                .map(|w| w.granted.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(
            got(&ws),
            vec![400, 400, 0],
            "no waiter takes the whole refill"
        );
        // 200 bytes would be a crumb for a 400-byte ask: the third waits for the next tick.
        assert_eq!(b.tokens(), 200);
        assert_eq!(b.refill(ms(t0, 20)).len(), 1);
        assert_eq!(got(&ws), vec![400, 400, 400]);
    }

    #[test]
    fn equal_waiters_get_equal_shares_over_time() {
        // 4 greedy relays that re-queue after each grant: round robin must even out.
        let t0 = Instant::now();
        let mut b = Bucket::new(16 * 1024, TICK, t0);
        let ws: Vec<_> = (0..4).map(|_| Waiter::new()).collect();
        let mut got = [0u64; 4];
        for w in &ws {
            b.enqueue(w.clone(), 64 * 1024);
        }
        for i in 1..=500 {
            for w in b.refill(ms(t0, 10 * i)) {
                let k = ws.iter().position(|x| Arc::ptr_eq(x, &w)).unwrap();
                got[k] += w.granted.load(Ordering::Relaxed);
                b.enqueue(w, 64 * 1024);
            }
        }
        let (lo, hi) = (got.iter().min().unwrap(), got.iter().max().unwrap());
        assert!(*hi - *lo <= 200, "shares {got:?}");
        assert_eq!(got.iter().sum::<u64>(), 16 * 1024 * 5);
    }

    #[test]
    fn a_newcomer_is_served_within_one_pass() {
        let t0 = Instant::now();
        let mut b = Bucket::new(15 * 1000 * 100, TICK, t0); // 15,000 bytes a tick
        let olds: Vec<_> = (0..15).map(|_| Waiter::new()).collect();
        for w in &olds {
            b.enqueue(w.clone(), 64 * 1024);
        }
        let newcomer = Waiter::new();
        b.enqueue(newcomer.clone(), 64 * 1024);
        let mut ticks = 0;
        while newcomer.granted.load(Ordering::Relaxed) == 0 {
            ticks += 1;
            for w in b.refill(ms(t0, 10 * ticks)) {
                if !Arc::ptr_eq(&w, &newcomer) {
                    b.enqueue(w, 64 * 1024);
                }
            }
        }
        assert!(ticks <= 70, "newcomer waited {ticks} ticks");
    }

    #[test]
    fn rate_change_applies_from_now_and_zero_releases_waiters() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, TICK, t0);
        b.refill(ms(t0, 10));
        assert_eq!(b.try_take(u64::MAX), 10);
        b.set_rate(100_000, TICK, ms(t0, 20)); // the old rate accrues up to the change
        assert_eq!(b.tokens(), 10);
        b.refill(ms(t0, 30));
        assert_eq!(b.try_take(u64::MAX), 1010);
        let w = Waiter::new();
        b.enqueue(w.clone(), 5000);
        let served = b.set_rate(0, TICK, ms(t0, 30));
        assert_eq!(served.len(), 1);
        assert_eq!(w.granted.load(Ordering::Relaxed), 5000);
    }

    #[test]
    fn acquire_blocks_until_the_refill_thread_grants() {
        let lim = Limiter::new(Duration::from_millis(5));
        let user: Arc<str> = Arc::from("u");
        lim.set_rate(&user, 10_000);
        let h = lim.spawn_refill().unwrap();
        let w = Waiter::new();
        let mut total = 0;
        while total < 500 {
            let g = lim.acquire("u", &w, 64 * 1024).unwrap();
            assert!(g <= 64 * 1024);
            total += g;
        }
        lim.remove("u");
        assert_eq!(lim.acquire("u", &w, 1), Err(Closed::Revoked));
        lim.shutdown();
        h.join().unwrap();
    }

    #[test]
    fn a_give_back_of_crumbs_does_not_wake_a_waiter() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // 1000 bytes a tick, least grant 500
        let w = Waiter::new();
        b.enqueue(w.clone(), 64 * 1024);
        assert!(b.give_back(3).is_empty());
        assert_eq!(b.refill(ms(t0, 10)).len(), 1);
        assert_eq!(w.granted.load(Ordering::Relaxed), 1003);
    }

    #[test]
    fn a_datagram_takes_all_at_once_and_the_debt_is_paid_from_later_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // 1000 bytes a tick
        assert!(!b.try_take_whole(1500), "an empty bucket lends nothing");
        b.refill(ms(t0, 10));
        assert!(b.try_take_whole(1500), "never split: 1500 of 1000 tokens");
        assert_eq!((b.tokens(), b.debt()), (0, 500));
        assert!(!b.try_take_whole(1), "a bucket in debt lends no more");
        assert_eq!(b.try_take(u64::MAX), 0, "nor does a stream get a byte");
        b.give_back(200); // a stream's short read pays the debt too
        assert_eq!((b.tokens(), b.debt()), (0, 300));
        b.refill(ms(t0, 20));
        assert_eq!((b.tokens(), b.debt()), (700, 0));
        // Over a second the datagrams get the rate, not a byte more.
        let mut sent = 1500;
        for i in 3..=100 {
            b.refill(ms(t0, 10 * i));
            while b.try_take_whole(1500) {
                sent += 1500;
            }
        }
        assert!((100_000..=100_000 + 1500).contains(&sent), "sent {sent}");
    }

    #[test]
    fn a_stream_queued_behind_a_datagram_waits_until_the_debt_is_paid() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // 1000 bytes a tick, least grant 500
        let (dgram, stream, late) = (Waiter::new(), Waiter::new(), Waiter::new());
        b.enqueue_whole(dgram.clone(), 1800);
        b.enqueue(stream.clone(), 64 * 1024);
        b.enqueue_whole(late.clone(), 100);
        let served = b.refill(ms(t0, 10));
        assert_eq!(served.len(), 1);
        assert!(Arc::ptr_eq(&served[0], &dgram));
        assert_eq!(dgram.granted.load(Ordering::Relaxed), 1800);
        assert_eq!(b.debt(), 800);
        // The next tick pays 800 of debt; 200 left is a crumb for the stream, and the datagram
        // behind it must not jump the queue.
        assert!(b.refill(ms(t0, 20)).is_empty());
        assert_eq!((b.tokens(), b.debt()), (200, 0));
        let served = b.refill(ms(t0, 30));
        assert_eq!(served.len(), 1, "the stream first, with all there is");
        assert!(Arc::ptr_eq(&served[0], &stream));
        assert_eq!(stream.granted.load(Ordering::Relaxed), 1200);
        assert_eq!(late.granted.load(Ordering::Relaxed), 0);
        assert_eq!(b.refill(ms(t0, 40)).len(), 1, "then the datagram behind it");
        assert_eq!(late.granted.load(Ordering::Relaxed), 100);
        assert_eq!((b.tokens(), b.debt()), (900, 0));
    }

    /// Polls `ok` every millisecond for up to 5 s.
    fn wait_for(mut ok: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        ok()
    }

    #[test]
    fn the_refill_thread_sleeps_while_no_bucket_has_a_rate() {
        // A 1 ms tick: awake, it would make about 50 rounds in each 50 ms window below.
        let window = Duration::from_millis(50);
        let lim = Limiter::new(Duration::from_millis(1));
        let h = lim.spawn_refill().unwrap();
        let (u, free): (Arc<str>, Arc<str>) = (Arc::from("u"), Arc::from("free"));
        let (unlimited, limited) = (AtomicU64::new(0), AtomicU64::new(10_000));
        // An unlimited user's connection holds a bucket with no rate: nothing to refill.
        let sf = lim.open(&free, &unlimited);
        assert!(wait_for(|| lim.refills() >= 1), "no first round");
        let asleep = lim.refills();
        thread::sleep(window);
        assert!(
            lim.refills() <= asleep + 1,
            "{} rounds with no rate to refill",
            lim.refills() - asleep
        );
        // A limited user's first connection wakes it, and it ticks while that bucket lives.
        let s = lim.open(&u, &limited);
        assert!(
            wait_for(|| lim.refills() >= asleep + 10),
            "not woken by a rated bucket"
        );
        lim.close("u", s);
        assert!(wait_for(|| {
            let r = lim.refills();
            thread::sleep(window);
            lim.refills() <= r + 1
        }));
        // A rate given to a connected user wakes it too.
        let r = lim.refills();
        lim.change_rate("free", 1000);
        assert!(
            wait_for(|| lim.refills() >= r + 10),
            "not woken by a rate change"
        );
        lim.close("free", sf);
        lim.shutdown();
        h.join().unwrap();
    }

    #[test]
    fn acquire_whole_returns_the_whole_datagram() {
        let lim = Limiter::new(Duration::from_millis(5));
        let user: Arc<str> = Arc::from("d");
        lim.set_rate(&user, 10_000);
        let h = lim.spawn_refill().unwrap();
        let w = Waiter::new();
        for _ in 0..3 {
            lim.acquire_whole("d", &w, 1200).unwrap();
        }
        assert_eq!(lim.acquire_whole("d", &w, 0), Ok(()));
        lim.remove("d");
        assert_eq!(lim.acquire_whole("d", &w, 1), Err(Closed::Revoked));
        lim.shutdown();
        h.join().unwrap();
    }

    #[test]
    fn buckets_come_with_the_first_connection_and_go_with_the_last() {
        let lim = Limiter::new(Duration::from_secs(3600));
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let rate = AtomicU64::new(1000);
        assert_eq!(lim.buckets(), 0);
        // A rate change for a user without connections makes no bucket.
        lim.change_rate("a", 5);
        assert_eq!(lim.buckets(), 0);
        let s1 = lim.open(&a, &rate);
        let s2 = lim.open(&a, &rate);
        assert_eq!(s1, s2, "one bucket per user");
        let sb = lim.open(&b, &rate);
        assert_eq!(lim.buckets(), 2);
        lim.change_rate("a", 7);
        assert_eq!(lim.buckets.lock().get("a").map(Bucket::rate), Some(7));
        lim.close("a", s1);
        assert_eq!(lim.buckets(), 2, "a still has a connection");
        lim.close("a", s2);
        lim.close("b", sb);
        assert_eq!(lim.buckets(), 0, "idle users hold no bucket");
        lim.refill_all(Instant::now());
        assert_eq!(lim.buckets(), 0, "the tick makes none");
        // The next connection starts from an empty bucket at the rate it reads then.
        rate.store(3000, Ordering::Relaxed);
        lim.open(&a, &rate);
        let m = lim.buckets.lock();
        let bk = m.get("a").unwrap();
        assert_eq!((bk.rate(), bk.tokens()), (3000, 0));
    }

    #[test]
    fn a_bucket_goes_with_its_last_holder_even_with_a_waiter_queued() {
        let lim = Limiter::new(Duration::from_secs(3600)); // no refill thread: nothing accrues
        let u: Arc<str> = Arc::from("wq");
        let serial = lim.open(&u, &AtomicU64::new(1000));
        let l2 = lim.clone();
        let t = thread::spawn(move || l2.acquire("wq", &Waiter::new(), 500));
        while lim.buckets.lock().get("wq").map(Bucket::waiting) != Some(1) {
            thread::yield_now();
        }
        lim.set_supply(Supply::Leased);
        assert!(lim.grant("wq", 300));
        lim.close("wq", serial);
        assert_eq!(lim.buckets(), 0, "a bucket outlived its last connection");
        assert_eq!(t.join().unwrap(), Err(Closed::Revoked));
        assert_eq!(
            lim.take_left(),
            vec![(u.clone(), 300)],
            "its lease goes back"
        );
        assert!(lim.take_left().is_empty());
        // In a fleet, a user's first connection here is told to the lease thread once.
        let serial = lim.open(&u, &AtomicU64::new(1000));
        lim.open(&u, &AtomicU64::new(1000));
        assert_eq!(lim.take_joined(), vec![u.clone()]);
        assert!(lim.take_joined().is_empty());
        lim.close("wq", serial);
        lim.set_supply(Supply::Own);
        lim.open(&Arc::from("alone"), &AtomicU64::new(1000));
        assert!(lim.take_joined().is_empty(), "alone, nobody keeps the list");
    }

    #[test]
    fn the_newest_account_under_a_name_sets_the_rate_of_a_bucket_still_held() {
        let lim = Limiter::new(Duration::from_secs(3600));
        let u: Arc<str> = Arc::from("re");
        let old = lim.open(&u, &AtomicU64::new(1000)); // the deleted account's last connection
        lim.open(&u, &AtomicU64::new(5000)); // the account added again
        assert_eq!(lim.buckets.lock().get("re").map(Bucket::rate), Some(5000));
        lim.close("re", old);
        assert_eq!(lim.buckets(), 1);
    }

    #[test]
    fn a_close_for_a_removed_bucket_leaves_the_new_one_alone() {
        let lim = Limiter::new(Duration::from_secs(3600));
        let u: Arc<str> = Arc::from("dz");
        let rate = AtomicU64::new(1000);
        let old = lim.open(&u, &rate);
        lim.remove("dz"); // deleted while connected
        let new = lim.open(&u, &rate); // added again, a new connection
        assert_ne!(old, new);
        lim.close("dz", old); // the old connection ends late
        assert_eq!(lim.buckets(), 1, "the new connection lost its bucket");
        let w = Waiter::new();
        lim.give_back("dz", 10);
        assert_eq!(lim.acquire("dz", &w, 10), Ok(10));
        lim.close("dz", new);
        assert_eq!(lim.buckets(), 0);
    }

    #[test]
    fn a_leased_bucket_draws_its_pool_at_most_at_the_rate_and_never_more() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // 1000 bytes a tick
        b.set_supply(Supply::Leased, t0);
        b.refill(ms(t0, 10));
        assert_eq!(b.tokens(), 0, "nothing leased, nothing accrues");
        b.grant(2500);
        b.refill(ms(t0, 20));
        assert_eq!(
            b.try_take(u64::MAX),
            1000,
            "the pool is drawn at the user's rate"
        );
        b.refill(ms(t0, 100)); // 8 ticks of accrual, but only 1500 left in the pool
        assert_eq!(b.try_take(u64::MAX), 1500);
        assert_eq!(b.pool(), 0);
        b.refill(ms(t0, 200));
        assert_eq!(b.tokens(), 0, "an empty pool gives nothing");
    }

    #[test]
    fn a_full_leased_bucket_keeps_the_rest_in_the_pool() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0); // capacity 4000
        b.set_supply(Supply::Leased, t0);
        b.grant(10_000);
        b.refill(ms(t0, 1000));
        assert_eq!(
            (b.tokens(), b.pool()),
            (4000, 6000),
            "nothing leased is capped away"
        );
    }

    #[test]
    fn a_split_bucket_runs_at_its_share_of_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(300_000, TICK, t0);
        b.set_supply(Supply::Split(3), t0);
        let mut total = 0;
        for i in 1..=100 {
            b.refill(ms(t0, 10 * i));
            total += b.try_take(u64::MAX);
        }
        assert_eq!(total, 100_000, "a second at a third of the rate");
    }

    #[test]
    fn demand_is_what_waits_plus_what_moved_and_the_pool_goes_back() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000, TICK, t0);
        b.set_supply(Supply::Leased, t0);
        assert_eq!(b.take_demand(), None, "an idle user says nothing");
        b.grant(3000);
        b.refill(ms(t0, 10));
        assert_eq!(b.try_take(800), 800);
        b.give_back(300);
        let w = Waiter::new();
        b.enqueue(w, 64 * 1024);
        assert_eq!(b.take_demand(), Some((64 * 1024, 500, 2000, 0)));
        assert_eq!(b.pool(), 0);
        assert_eq!(
            b.take_demand(),
            Some((64 * 1024, 0, 0, 0)),
            "counts restart"
        );
    }

    #[test]
    fn an_unlimited_users_relays_take_a_leased_quota_allowance_in_a_fleet() {
        let lim = Limiter::new(Duration::from_secs(3600)); // no refill thread
        let user: Arc<str> = Arc::from("uq");
        lim.set_rate(&user, 0);
        let w = Waiter::new();
        assert!(!lim.leases_quota());
        assert_eq!(lim.acquire("uq", &w, 5000), Ok(5000), "alone: free");
        assert!(lim.take_demand().is_empty(), "alone: nothing to lease");
        lim.set_supply(Supply::Leased);
        assert!(lim.leases_quota());
        // No allowance yet: the relay waits for the lease thread's grant.
        let l2 = lim.clone();
        let t = thread::spawn(move || l2.acquire("uq", &Waiter::new(), 64 * 1024));
        while lim.buckets.lock().get("uq").map(Bucket::waiting) != Some(1) {
            thread::yield_now();
        }
        let d = lim.take_demand();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].rate, d[0].queued, d[0].held), (0, 64 * 1024, 0));
        assert!(lim.grant("uq", 100_000));
        assert_eq!(t.join().unwrap(), Ok(64 * 1024), "served at the grant");
        assert_eq!(lim.acquire("uq", &w, 64 * 1024), Ok(100_000 - 64 * 1024));
        lim.give_back("uq", 1000);
        assert_eq!(
            lim.acquire_whole("uq", &w, 1500),
            Ok(()),
            "a datagram whole"
        );
        // Busy: the allowance is kept (held), and what moved is told.
        let d = lim.take_demand();
        assert_eq!((d[0].moved, d[0].unused, d[0].held), (100_500, 0, 0));
        assert!(lim.grant("uq", 7000));
        assert_eq!(lim.acquire("uq", &w, 2000), Ok(2000));
        let d = lim.take_demand();
        assert_eq!((d[0].moved, d[0].unused, d[0].held), (2000, 0, 5000));
        // A period without a byte: the allowance goes back to the fleet.
        let d = lim.take_demand();
        assert_eq!((d[0].moved, d[0].unused, d[0].held), (0, 5000, 0));
        assert!(lim.take_demand().is_empty());
        // Redis down: free but counted; a quota used up wakes a waiter with `Quota`.
        lim.set_supply(Supply::Split(2));
        assert_eq!(lim.acquire("uq", &w, 3000), Ok(3000));
        assert_eq!(lim.take_demand()[0].moved, 3000);
        lim.set_supply(Supply::Leased);
        let l2 = lim.clone();
        let t = thread::spawn(move || l2.acquire("uq", &Waiter::new(), 10));
        while lim.buckets.lock().get("uq").map(Bucket::waiting) != Some(1) {
            thread::yield_now();
        }
        lim.quota_used_up("uq");
        assert_eq!(t.join().unwrap(), Err(Closed::Quota));
    }

    #[test]
    fn the_limiter_hands_grants_to_its_buckets_and_reports_demand() {
        let lim = Limiter::new(Duration::from_secs(3600));
        let user: Arc<str> = Arc::from("f");
        lim.set_supply(Supply::Leased);
        lim.set_rate(&user, 10_000);
        assert!(lim.grant("f", 700));
        assert!(!lim.grant("nobody", 700), "no bucket, no tokens");
        let d = lim.take_demand();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].rate, d[0].unused, d[0].bytes()), (10_000, 700, 0));
        assert_eq!(lim.supply(), Supply::Leased);
        lim.set_supply(Supply::Split(4));
        assert_eq!(lim.supply(), Supply::Split(4));
    }

    #[test]
    fn removing_a_user_wakes_its_waiters() {
        let lim = Limiter::new(Duration::from_secs(3600)); // no refill thread: nothing accrues
        let user: Arc<str> = Arc::from("gone");
        lim.set_rate(&user, 1);
        let l2 = lim.clone();
        let t = thread::spawn(move || l2.acquire("gone", &Waiter::new(), 10));
        while lim.buckets.lock().get("gone").map(Bucket::waiting) != Some(1) {
            thread::yield_now();
        }
        lim.remove("gone");
        assert_eq!(t.join().unwrap(), Err(Closed::Revoked));
    }
}
