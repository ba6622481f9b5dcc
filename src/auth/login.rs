//! The login gate: where a listener's credential checks go. It asks the throttle whether the
//! (source, user) may try, answers from the verify cache where it can, joins concurrent checks of
//! the same credentials from one source into one, and bounds the argon2 runs: at most
//! [`MAX_CONCURRENT_ARGON2`] at once, at most [`MAX_ARGON2_PER_SOURCE`] of them for one source,
//! queued or running, and no wait past the connection's handshake deadline.
//!
//! The counting rules are in `throttle.rs` (pure); the users, the cache and argon2 in `directory.rs`.
//! This file holds the one lock over the throttle, the slots and the joins, and the waiting.

use crate::auth::directory::{Cached, Digest, Directory, MAX_CONCURRENT_ARGON2};
use crate::auth::throttle::{NewBlocks, Outcome, Refusal, Source, Standing, Throttle, Ticket};
use crate::flow::account::Account;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// argon2 slots one source may hold, queued or running: the rest stay free for everyone else.
pub const MAX_ARGON2_PER_SOURCE: usize = MAX_CONCURRENT_ARGON2 / 2;

/// How a login ended.
#[derive(Clone)]
pub enum Verdict {
    /// Logged in.
    Ok(Arc<Account>),
    /// Wrong password or unknown user, and the blocks this failure started (empty for the
    /// connections that joined another's check: the failure counted once).
    Wrong(NewBlocks),
    /// Refused unchecked: this (source, user) or this source is blocked this much longer.
    Blocked(Duration),
    /// Refused unchecked: as many checks are running for this source or user as it has failures
    /// left, or the throttle's table is full; worth a retry in a moment.
    Busy,
    /// The handshake deadline passed while waiting for an argon2 slot.
    TimedOut,
}

/// A check in progress that other connections with the same credentials wait on.
#[derive(Default)]
struct Join {
    verdict: Mutex<Option<Verdict>>,
    cv: Condvar,
}

impl Join {
    fn publish(&self, v: Verdict) {
        *self.verdict.lock() = Some(v);
        self.cv.notify_all();
    }

    fn wait(&self, deadline: Instant) -> Verdict {
        let mut v = self.verdict.lock();
        while v.is_none() {
            if self.cv.wait_until(&mut v, deadline).timed_out() {
                break;
            }
        }
        match &*v {
            Some(Verdict::Wrong(_)) => Verdict::Wrong(NewBlocks::default()),
            Some(other) => other.clone(),
            None => Verdict::TimedOut,
        }
    }
}

/// Credentials from one source: connections with the same key share one check.
type JoinKey = (Source, u64, Digest);

struct State {
    throttle: Throttle,
    /// argon2 runs going on now.
    running: usize,
    /// Slots held per source.
    held: HashMap<Source, usize>,
    joins: HashMap<JoinKey, Arc<Join>>,
}

/// The gate every login of a listener goes through.
pub struct Logins {
    dir: Arc<Directory>,
    state: Mutex<State>,
    /// Signalled when an argon2 slot frees.
    freed: Condvar,
    /// Hashes user names for the throttle's keys (random per process).
    names: RandomState,
    /// Outcomes waiting to be shared with the fleet; `None` when not shared (one server).
    fleet: Mutex<Option<Vec<FleetEvent>>>,
}

/// A login outcome for the fleet's shared failure counts (issue 21), taken by
/// [`Logins::take_fleet_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEvent {
    /// The source charged.
    pub source: Source,
    /// The user name as the client sent it.
    pub user: Vec<u8>,
    /// What happened.
    pub kind: FleetEventKind,
}

/// What a [`FleetEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetEventKind {
    /// A wrong password, counted against the source and the (source, user).
    Failed,
    /// A wrong password found in the cache while the source was blocked: the pair only.
    WrongPairOnly,
    /// A verified login: the (source, user) count starts over.
    Verified,
}

/// Outcomes held for the fleet at most; more are dropped until the next share.
pub const MAX_FLEET_EVENTS: usize = 4096;

/// Gives an argon2 slot back, however the check ends.
struct Slot<'a> {
    logins: &'a Logins,
    src: Source,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.logins.state.lock();
        st.running = st.running.saturating_sub(1);
        if let Some(n) = st.held.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                st.held.remove(&self.src);
            }
        }
        drop(st);
        self.logins.freed.notify_all();
    }
}

impl Logins {
    /// A gate over `dir`'s users.
    pub fn new(dir: Arc<Directory>) -> Logins {
        Logins {
            dir,
            state: Mutex::new(State {
                throttle: Throttle::new(),
                running: 0,
                held: HashMap::new(),
                joins: HashMap::new(),
            }),
            freed: Condvar::new(),
            names: RandomState::new(),
            fleet: Mutex::new(None),
        }
    }

    /// Starts keeping login outcomes for [`Logins::take_fleet_events`] (a server of a fleet).
    pub fn share_with_fleet(&self) {
        self.fleet.lock().get_or_insert_with(Vec::new);
    }

    /// The outcomes since the last call (none unless shared).
    pub fn take_fleet_events(&self) -> Vec<FleetEvent> {
        self.fleet
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Raises the counts of `source` and (`source`, `user`) to the fleet's totals (see
    /// [`Throttle::import`]).
    pub fn import_fleet(&self, source: Source, user: &[u8], source_total: u32, pair_total: u32) {
        let name = self.names.hash_one(user);
        self.state.lock().throttle.import(
            source,
            Some(name),
            source_total,
            pair_total,
            Instant::now(),
        );
    }

    /// Keeps an outcome for the fleet, if shared.
    fn note(&self, source: Source, user: &[u8], kind: FleetEventKind) {
        if let Some(v) = self.fleet.lock().as_mut()
            && v.len() < MAX_FLEET_EVENTS
        {
            v.push(FleetEvent {
                source,
                user: user.to_vec(),
                kind,
            });
        }
    }

    /// Drops every throttle record of `src` (`sluice unban`); returns how many.
    pub fn unban(&self, src: Source) -> usize {
        self.state.lock().throttle.unban(src)
    }

    /// Checks `user` / `pass` from `ip`. Blocking: may wait for an argon2 slot (never past
    /// `deadline`) and run argon2, or wait for a check of the same credentials from the same
    /// source already running.
    pub fn check(&self, ip: IpAddr, user: &[u8], pass: &[u8], deadline: Instant) -> Verdict {
        let digest = self.dir.digest(pass);
        let name = self.names.hash_one(user);
        let src = Source::of(ip);
        let mut st = self.state.lock();
        let now = Instant::now();
        match st.throttle.standing(ip, name, now) {
            Standing::PairBlocked(until) => {
                return Verdict::Blocked(until.saturating_duration_since(now));
            }
            // Only a verification cached for this user at this source passes; a different
            // password counts against the pair, so the cache is no free oracle.
            Standing::SourceBlocked(until) => {
                return match self.dir.cached(user, src, &digest) {
                    Cached::Hit(a) => Verdict::Ok(a),
                    Cached::Mismatch => {
                        st.throttle.wrong(ip, name, now);
                        self.note(src, user, FleetEventKind::WrongPairOnly);
                        Verdict::Blocked(until.saturating_duration_since(now))
                    }
                    Cached::Unknown => Verdict::Blocked(until.saturating_duration_since(now)),
                };
            }
            Standing::Clear => {}
        }
        if let Cached::Hit(a) = self.dir.cached(user, src, &digest) {
            return Verdict::Ok(a);
        }
        let key = (src, name, digest);
        if let Some(join) = st.joins.get(&key).cloned() {
            drop(st);
            return join.wait(deadline);
        }
        let ticket = match st.throttle.begin(ip, name, now) {
            Ok(t) => t,
            Err(Refusal::Blocked(until)) => {
                return Verdict::Blocked(until.saturating_duration_since(now));
            }
            Err(Refusal::Busy | Refusal::Full) => return Verdict::Busy,
        };
        let join = Arc::new(Join::default());
        st.joins.insert(key, join.clone());
        drop(st);
        let verdict = self.lead(ip, user, pass, src, &digest, ticket, deadline);
        self.state.lock().joins.remove(&key);
        join.publish(verdict.clone());
        verdict
    }

    /// Runs a check others may have joined: waits for a slot, checks the block again, runs
    /// argon2, and counts the outcome.
    #[allow(clippy::too_many_arguments)]
    fn lead(
        &self,
        ip: IpAddr,
        user: &[u8],
        pass: &[u8],
        src: Source,
        digest: &Digest,
        ticket: Ticket,
        deadline: Instant,
    ) -> Verdict {
        let name = self.names.hash_one(user);
        let slot = {
            let mut st = self.state.lock();
            loop {
                let mine = st.held.get(&src).copied().unwrap_or(0);
                if st.running < MAX_CONCURRENT_ARGON2 && mine < MAX_ARGON2_PER_SOURCE {
                    break;
                }
                if self.freed.wait_until(&mut st, deadline).timed_out() {
                    st.throttle.finish(ticket, Outcome::NotRun, Instant::now());
                    return Verdict::TimedOut;
                }
            }
            // Other checks may have ended in a block while this one waited.
            let now = Instant::now();
            if let Standing::PairBlocked(u) | Standing::SourceBlocked(u) =
                st.throttle.standing(ip, name, now)
            {
                st.throttle.finish(ticket, Outcome::NotRun, now);
                return Verdict::Blocked(u.saturating_duration_since(now));
            }
            st.running += 1;
            *st.held.entry(src).or_insert(0) += 1;
            Slot { logins: self, src }
        };
        let found = self.dir.check(user, pass, src, digest);
        drop(slot);
        let outcome = if found.is_some() {
            Outcome::Verified
        } else {
            Outcome::Failed
        };
        let blocks = self
            .state
            .lock()
            .throttle
            .finish(ticket, outcome, Instant::now());
        let kind = match outcome {
            Outcome::Verified => FleetEventKind::Verified,
            _ => FleetEventKind::Failed,
        };
        self.note(src, user, kind);
        match found {
            Some(a) => Verdict::Ok(a),
            None => Verdict::Wrong(blocks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::directory::hash_password;
    use crate::auth::throttle::PAIR_FREE_FAILURES;
    use crate::flow::limiter::Limiter;
    use crate::store::{QuotaPeriod, UserRow};

    fn gate() -> Logins {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        dir.apply(vec![UserRow {
            id: 1,
            username: "u".into(),
            password_hash: hash_password("pw").unwrap(),
            bandwidth: 0,
            quota_bytes: 0,
            quota_period: QuotaPeriod::None,
            max_connections: 0,
        }]);
        Logins::new(dir)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn a_blocked_pair_is_refused_unchecked_until_unbanned() {
        let g = gate();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for i in 0..PAIR_FREE_FAILURES {
            let v = g.check(ip, b"u", format!("w{i}").as_bytes(), soon());
            assert!(matches!(v, Verdict::Wrong(_)));
        }
        let runs = g.dir.argon2_runs();
        assert!(matches!(
            g.check(ip, b"u", b"pw", soon()),
            Verdict::Blocked(_)
        ));
        assert_eq!(g.dir.argon2_runs(), runs, "a blocked login ran argon2");
        assert!(g.unban(Source::parse("127.0.0.1").unwrap()) > 0);
        assert!(matches!(g.check(ip, b"u", b"pw", soon()), Verdict::Ok(_)));
    }

    #[test]
    fn the_wait_for_a_slot_ends_at_the_deadline() {
        let g = gate();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        g.state.lock().running = MAX_CONCURRENT_ARGON2;
        let t = Instant::now();
        let v = g.check(ip, b"u", b"pw", t + Duration::from_millis(50));
        assert!(matches!(v, Verdict::TimedOut));
        assert!(t.elapsed() < Duration::from_secs(2));
        // The check that never ran is not counted as in flight any more.
        g.state.lock().running = 0;
        assert!(matches!(g.check(ip, b"u", b"pw", soon()), Verdict::Ok(_)));
    }

    #[test]
    fn one_source_holds_at_most_its_share_of_argon2_slots() {
        let g = gate();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        g.state
            .lock()
            .held
            .insert(Source::of(ip), MAX_ARGON2_PER_SOURCE);
        let v = g.check(ip, b"u", b"pw", Instant::now() + Duration::from_millis(50));
        assert!(
            matches!(v, Verdict::TimedOut),
            "a source took more than its share"
        );
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(matches!(
            g.check(other, b"u", b"pw", soon()),
            Verdict::Ok(_)
        ));
    }
}
