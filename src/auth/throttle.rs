//! The failed-login throttle: counts failures per source and per (source, user), and answers
//! whether a login may be checked. Pure over an injected `now`, so it is unit-tested without
//! sleeping; the waiting, the argon2 slots and the verify cache are `login.rs`'s and `directory.rs`'s.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host holds a whole /64). Each key may fail
//! a few times for free, then every further failure blocks it for a step that doubles, from
//! [`FIRST_BLOCK`] up to [`MAX_BLOCK`] (fail2ban's `bantime.increment`). A key with no failure for
//! [`FORGET_AFTER`] starts over. Attempts still being checked count against the free failures
//! (a client cannot get 200 guesses checked at once), and a success clears its (source, user)
//! record — never the source's, or one known account would reset a guesser's count.
//!
//! The table holds [`MAX_ENTRIES`]: when full it drops the oldest half of the records that block
//! nothing, never a live block; once it is full of blocks, a new IPv6 source is counted by its
//! /48 in a small reserve (OpenSSH's `PerSourcePenalties` keeps a bounded table the same way), and
//! past that a new source is refused until blocks expire.

// Sources are the connection layer's type (admission counts them too); re-exported for the
// login code and the CLI, which name them through here.
pub use crate::net::source::Source;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures of one user from one source before the first block.
pub const PAIR_FREE_FAILURES: u32 = 5;
/// Failures from one source, over all users, before the first block: a NAT holds many users.
pub const SOURCE_FREE_FAILURES: u32 = 20;
/// The first block; each further failure doubles it.
pub const FIRST_BLOCK: Duration = Duration::from_secs(1);
/// The longest block.
pub const MAX_BLOCK: Duration = Duration::from_secs(300);
/// A key with no failure for this long is forgotten (longer than [`MAX_BLOCK`], so a guesser
/// pacing itself at one try per block never starts over).
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Records held at most in normal operation.
pub const MAX_ENTRIES: usize = 65_536;
/// Extra records for IPv6 /48 sources once the table is full of blocks.
pub const OVERFLOW_ENTRIES: usize = 4_096;
/// How long a full table is taken as full before it is scanned for room again.
const RESCAN_AFTER: Duration = Duration::from_secs(1);

/// A record's key: a source, or a user (by a keyed hash of its name) at a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Source(Source),
    Pair(Source, u64),
}

impl Key {
    fn source(&self) -> Source {
        match *self {
            Key::Source(s) | Key::Pair(s, _) => s,
        }
    }

    fn free(&self) -> u32 {
        match self {
            Key::Source(_) => SOURCE_FREE_FAILURES,
            Key::Pair(..) => PAIR_FREE_FAILURES,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    blocks: u32,
    until: Option<Instant>,
    last: Instant,
    in_flight: u32,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            blocks: 0,
            until: None,
            last: now,
            in_flight: 0,
        }
    }

    fn blocked(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|u| now < *u)
    }

    /// True when the record neither blocks nor has a check running: safe to drop.
    fn idle(&self, now: Instant) -> bool {
        self.blocked(now).is_none() && self.in_flight == 0
    }

    fn stale(&self, now: Instant) -> bool {
        self.idle(now) && now.saturating_duration_since(self.last) >= FORGET_AFTER
    }

    /// Checks that may start now: the free failures left (at least one once blocks have begun,
    /// each of which re-blocks on failure), less those already running.
    fn room(&self, free: u32) -> bool {
        let budget = free.saturating_sub(self.failures).max(1);
        self.in_flight < budget
    }

    /// Counts a failure; returns the block it started, if any.
    fn fail(&mut self, free: u32, now: Instant) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        self.last = now;
        if self.failures < free {
            return None;
        }
        let step = FIRST_BLOCK.saturating_mul(1u32 << self.blocks.min(16));
        let block = step.min(MAX_BLOCK);
        self.blocks = self.blocks.saturating_add(1);
        self.until = Some(now + block);
        Some(block)
    }
}

/// Where a (source, user) stands before its password is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Nothing blocks: check the password.
    Clear,
    /// The source is blocked, the user there is not: only a cached verification may pass.
    SourceBlocked(Instant),
    /// This user from this source is blocked.
    PairBlocked(Instant),
}

/// Why a check may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Blocked until then.
    Blocked(Instant),
    /// As many checks are running as the key has failures left; retry when they end.
    Busy,
    /// The table is full of live blocks and this source has no record.
    Full,
}

/// A running check: give it back with [`Throttle::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    source: Source,
    pair: Option<u64>,
}

impl Ticket {
    /// The source charged (an IPv6 /48 when the table overflowed).
    pub fn source(&self) -> Source {
        self.source
    }
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The password was right.
    Verified,
    /// The password was wrong (or the user unknown).
    Failed,
    /// The check did not run (deadline, or a block came while it waited).
    NotRun,
}

/// Blocks a failure started, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NewBlocks {
    /// The (source, user) was blocked for this long.
    pub pair: Option<Duration>,
    /// The whole source was blocked for this long.
    pub source: Option<Duration>,
}

/// The failure records. Not thread-safe by itself: its owner holds it under a lock.
#[derive(Debug, Default)]
pub struct Throttle {
    map: HashMap<Key, Record>,
    /// Set when a scan for room found none: no new scan before then.
    no_room_until: Option<Instant>,
}

impl Throttle {
    /// An empty throttle.
    pub fn new() -> Throttle {
        Throttle::default()
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The source a client address is charged to: its own record if it has one, else its /48
    /// while the table is full of blocks, else its own.
    fn source_for(&mut self, ip: IpAddr, now: Instant) -> Source {
        let src = Source::of(ip);
        if self.map.contains_key(&Key::Source(src)) {
            return src;
        }
        match src.wider() {
            Some(wide) if self.map.len() >= MAX_ENTRIES && !self.make_room(now) => wide,
            _ => src,
        }
    }

    fn live(&mut self, key: Key, now: Instant) -> Option<&mut Record> {
        let r = self.map.get_mut(&key)?;
        if r.stale(now) {
            *r = Record::new(now);
        }
        Some(r)
    }

    /// Where `user` at `ip` stands now.
    pub fn standing(&mut self, ip: IpAddr, user: u64, now: Instant) -> Standing {
        let src = self.source_for(ip, now);
        if let Some(until) = self
            .live(Key::Pair(src, user), now)
            .and_then(|r| r.blocked(now))
        {
            return Standing::PairBlocked(until);
        }
        match self
            .live(Key::Source(src), now)
            .and_then(|r| r.blocked(now))
        {
            Some(until) => Standing::SourceBlocked(until),
            None => Standing::Clear,
        }
    }

    /// Starts a check of `user` at `ip`: refused while either key is blocked or has as many
    /// checks running as failures left; otherwise counted as running until [`Throttle::finish`].
    ///
    /// # Errors
    /// The [`Refusal`]; nothing is counted then.
    pub fn begin(&mut self, ip: IpAddr, user: u64, now: Instant) -> Result<Ticket, Refusal> {
        let src = self.source_for(ip, now);
        let skey = Key::Source(src);
        let pkey = Key::Pair(src, user);
        for key in [pkey, skey] {
            if let Some(r) = self.live(key, now) {
                if let Some(until) = r.blocked(now) {
                    return Err(Refusal::Blocked(until));
                }
                if !r.room(key.free()) {
                    return Err(Refusal::Busy);
                }
            }
        }
        if !self.ensure(skey, now) {
            return Err(Refusal::Full);
        }
        // The pair is optional: in overflow the source's own record still counts every failure.
        let pair = self.ensure(pkey, now).then_some(user);
        for key in [Some(skey), pair.map(|u| Key::Pair(src, u))]
            .into_iter()
            .flatten()
        {
            if let Some(r) = self.map.get_mut(&key) {
                r.in_flight += 1;
            }
        }
        Ok(Ticket { source: src, pair })
    }

    /// Ends a check started by [`Throttle::begin`]; returns the blocks a failure started.
    pub fn finish(&mut self, t: Ticket, outcome: Outcome, now: Instant) -> NewBlocks {
        let mut out = NewBlocks::default();
        if let Some(r) = self.map.get_mut(&Key::Source(t.source)) {
            r.in_flight = r.in_flight.saturating_sub(1);
            if outcome == Outcome::Failed {
                out.source = r.fail(SOURCE_FREE_FAILURES, now);
            }
        }
        if let Some(user) = t.pair {
            let key = Key::Pair(t.source, user);
            if let Some(r) = self.map.get_mut(&key) {
                r.in_flight = r.in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Failed => out.pair = r.fail(PAIR_FREE_FAILURES, now),
                    Outcome::Verified if r.in_flight == 0 => {
                        self.map.remove(&key);
                    }
                    Outcome::Verified => r.failures = 0,
                    Outcome::NotRun => {}
                }
            }
        }
        out
    }

    /// Counts a wrong password found without a check (a cached verification that did not match
    /// while the source is blocked) against (source, user) only.
    pub fn wrong(&mut self, ip: IpAddr, user: u64, now: Instant) -> Option<Duration> {
        let src = self.source_for(ip, now);
        let key = Key::Pair(src, user);
        if !self.ensure(key, now) {
            return None;
        }
        self.map
            .get_mut(&key)
            .and_then(|r| r.fail(PAIR_FREE_FAILURES, now))
    }

    /// Raises the failures of `src`, and of `user` at `src` when given, to the totals the whole
    /// fleet counted (read from the shared store), as if the missing ones had failed here now:
    /// blocks start and double as they would have. Never lowers a count; at most 32 failures are
    /// added per call (a block has reached [`MAX_BLOCK`] long before).
    pub fn import(
        &mut self,
        src: Source,
        user: Option<u64>,
        source_total: u32,
        pair_total: u32,
        now: Instant,
    ) {
        let pair = user.map(|u| (Key::Pair(src, u), pair_total));
        for (key, total) in std::iter::once((Key::Source(src), source_total)).chain(pair) {
            let known = self.live(key, now).map_or(0, |r| r.failures);
            if total <= known || !self.ensure(key, now) {
                continue;
            }
            if let Some(r) = self.map.get_mut(&key) {
                for _ in 0..(total - r.failures).min(32) {
                    r.fail(key.free(), now);
                }
            }
        }
    }

    /// Drops every record of `src` (and, for an IPv6 /64, of its /48); returns how many.
    pub fn unban(&mut self, src: Source) -> usize {
        let wide = src.wider();
        let before = self.map.len();
        self.map.retain(|k, _| {
            let s = k.source();
            s != src && Some(s) != wide
        });
        before - self.map.len()
    }

    /// Makes sure `key` has a record; false when there is no room for it.
    fn ensure(&mut self, key: Key, now: Instant) -> bool {
        if self.map.contains_key(&key) {
            return true;
        }
        let room = self.map.len() < MAX_ENTRIES || self.make_room(now);
        // The reserve past MAX_ENTRIES is for /48 sources only, and only their source record.
        let overflow = matches!(key, Key::Source(s) if s.prefix() == 48)
            && self.map.len() < MAX_ENTRIES + OVERFLOW_ENTRIES;
        if !room && !overflow {
            return false;
        }
        self.map.insert(key, Record::new(now));
        true
    }

    /// Drops the stale records, then the oldest half of those that block nothing (never an
    /// overflow /48's: those count what the table had no room for); true when that freed room
    /// below [`MAX_ENTRIES`]. After a fruitless scan it waits [`RESCAN_AFTER`] before the next, so
    /// a flood of new sources does not rescan the whole table per attempt.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.no_room_until.is_some_and(|t| now < t) {
            return false;
        }
        self.map.retain(|_, r| !r.stale(now));
        let evictable = |k: &Key, r: &Record| r.idle(now) && k.source().prefix() != 48;
        let mut idle: Vec<Instant> = self
            .map
            .iter()
            .filter(|(k, r)| evictable(k, r))
            .map(|(_, r)| r.last)
            .collect();
        if !idle.is_empty() && self.map.len() >= MAX_ENTRIES {
            let mid = idle.len() / 2;
            let (_, cut, _) = idle.select_nth_unstable(mid);
            let cut = *cut;
            self.map.retain(|k, r| !(evictable(k, r) && r.last <= cut));
        }
        let room = self.map.len() < MAX_ENTRIES;
        self.no_room_until = (!room).then_some(now + RESCAN_AFTER);
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(t: &mut Throttle, at: &str, user: u64, now: Instant) -> NewBlocks {
        let tk = t.begin(ip(at), user, now).expect("check refused");
        t.finish(tk, Outcome::Failed, now)
    }

    #[test]
    fn a_pair_backs_off_in_doubling_steps_up_to_the_cap() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        for _ in 1..PAIR_FREE_FAILURES {
            assert_eq!(fail(&mut t, "192.0.2.1", 1, t0), NewBlocks::default());
        }
        let mut now = t0;
        let mut steps = Vec::new();
        for _ in 0..12 {
            let b = fail(&mut t, "192.0.2.1", 1, now).pair.expect("no block");
            steps.push(b.as_secs());
            assert_eq!(
                t.standing(ip("192.0.2.1"), 1, now),
                Standing::PairBlocked(now + b)
            );
            assert_eq!(
                t.begin(ip("192.0.2.1"), 1, now + b - Duration::from_millis(1)),
                Err(Refusal::Blocked(now + b))
            );
            now += b;
        }
        assert_eq!(steps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // Another user at the same source is not blocked.
        assert_eq!(t.standing(ip("192.0.2.1"), 2, now), Standing::Clear);
        // Nothing for FORGET_AFTER: it starts over.
        let later = now + FORGET_AFTER;
        for _ in 1..PAIR_FREE_FAILURES {
            assert_eq!(fail(&mut t, "192.0.2.1", 1, later).pair, None);
        }
    }

    #[test]
    fn failures_counted_elsewhere_in_the_fleet_block_here() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        let src = Source::of(ip("192.0.2.1"));
        for _ in 0..3 {
            fail(&mut t, "192.0.2.1", 1, t0);
        }
        assert_eq!(t.standing(ip("192.0.2.1"), 1, t0), Standing::Clear);
        // The fleet counted 6 for the pair (these 3 among them): blocked as after 6 here.
        t.import(src, Some(1), 6, 6, t0);
        assert_eq!(
            t.standing(ip("192.0.2.1"), 1, t0),
            Standing::PairBlocked(t0 + FIRST_BLOCK * 2)
        );
        // A total below what is known changes nothing; another user is untouched.
        t.import(src, Some(1), 2, 2, t0);
        assert_eq!(
            t.standing(ip("192.0.2.1"), 1, t0),
            Standing::PairBlocked(t0 + FIRST_BLOCK * 2)
        );
        assert_eq!(t.standing(ip("192.0.2.1"), 2, t0), Standing::Clear);
        t.import(src, None, SOURCE_FREE_FAILURES, 0, t0);
        assert_eq!(
            t.standing(ip("192.0.2.1"), 2, t0),
            Standing::SourceBlocked(t0 + FIRST_BLOCK)
        );
    }

    #[test]
    fn the_source_blocks_after_its_own_free_failures_spread_over_users() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        for u in 1..SOURCE_FREE_FAILURES {
            assert_eq!(
                fail(&mut t, "192.0.2.1", u.into(), t0),
                NewBlocks::default()
            );
        }
        let b = fail(&mut t, "192.0.2.1", 999, t0);
        assert_eq!(b.source, Some(FIRST_BLOCK));
        assert_eq!(
            t.standing(ip("192.0.2.1"), 1, t0),
            Standing::SourceBlocked(t0 + FIRST_BLOCK)
        );
        assert_eq!(t.standing(ip("192.0.2.2"), 1, t0), Standing::Clear);
    }

    #[test]
    fn checks_in_flight_count_against_the_free_failures() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        let tickets: Vec<Ticket> = (0..PAIR_FREE_FAILURES)
            .map(|_| t.begin(ip("192.0.2.1"), 7, t0).unwrap())
            .collect();
        assert_eq!(t.begin(ip("192.0.2.1"), 7, t0), Err(Refusal::Busy));
        for tk in tickets {
            t.finish(tk, Outcome::Failed, t0);
        }
        assert!(matches!(
            t.begin(ip("192.0.2.1"), 7, t0),
            Err(Refusal::Blocked(_))
        ));
        // After the block, one check at a time.
        let after = t0 + FIRST_BLOCK;
        let tk = t.begin(ip("192.0.2.1"), 7, after).unwrap();
        assert_eq!(t.begin(ip("192.0.2.1"), 7, after), Err(Refusal::Busy));
        t.finish(tk, Outcome::NotRun, after);
        assert!(t.begin(ip("192.0.2.1"), 7, after).is_ok());
    }

    #[test]
    fn a_success_clears_its_pair_but_not_the_source() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        for _ in 1..PAIR_FREE_FAILURES {
            fail(&mut t, "192.0.2.1", 1, t0);
        }
        let tk = t.begin(ip("192.0.2.1"), 1, t0).unwrap();
        t.finish(tk, Outcome::Verified, t0);
        for _ in 1..PAIR_FREE_FAILURES {
            assert_eq!(fail(&mut t, "192.0.2.1", 1, t0).pair, None);
        }
        // 8 source failures so far; the source still counts them.
        for u in 0..(SOURCE_FREE_FAILURES - 2 * (PAIR_FREE_FAILURES - 1) - 1) {
            assert_eq!(
                fail(&mut t, "192.0.2.1", 100 + u64::from(u), t0).source,
                None
            );
        }
        assert!(fail(&mut t, "192.0.2.1", 99, t0).source.is_some());
    }

    #[test]
    fn wrong_counts_against_the_pair_only() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        for _ in 1..PAIR_FREE_FAILURES {
            assert_eq!(t.wrong(ip("192.0.2.1"), 1, t0), None);
        }
        assert_eq!(t.wrong(ip("192.0.2.1"), 1, t0), Some(FIRST_BLOCK));
        assert!(matches!(
            t.standing(ip("192.0.2.1"), 1, t0),
            Standing::PairBlocked(_)
        ));
        assert_eq!(t.standing(ip("192.0.2.1"), 2, t0), Standing::Clear);
    }

    #[test]
    fn unban_drops_the_source_and_its_pairs() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        for u in 0..SOURCE_FREE_FAILURES {
            fail(&mut t, "2001:db8:1:2::5", u.into(), t0);
        }
        fail(&mut t, "192.0.2.1", 1, t0);
        assert!(matches!(
            t.standing(ip("2001:db8:1:2::7"), 0, t0),
            Standing::PairBlocked(_) | Standing::SourceBlocked(_)
        ));
        let n = t.unban(Source::parse("2001:db8:1:2::/64").unwrap());
        assert_eq!(n, 1 + SOURCE_FREE_FAILURES as usize);
        assert_eq!(t.standing(ip("2001:db8:1:2::7"), 0, t0), Standing::Clear);
        assert_eq!(t.len(), 2, "other sources kept");
    }

    /// Fills the table up to [`MAX_ENTRIES`] with source records: live blocks, one per IPv6 /64
    /// in different /48s, or idle ones (one failure each), one per IPv4 address.
    fn fill(t: &mut Throttle, now: Instant, blocks: bool) {
        let mut i = 0u32;
        while t.len() < MAX_ENTRIES {
            let mut r = Record::new(now);
            let src = if blocks {
                r.until = Some(now + MAX_BLOCK);
                Source::of(IpAddr::from(Ipv6Addr::from(
                    (0x2001_0db8_u128 << 96) | (u128::from(i) << 80),
                )))
            } else {
                r.failures = 1;
                Source::of(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)))
            };
            t.map.insert(Key::Source(src), r);
            i += 1;
        }
    }

    #[test]
    fn a_full_table_drops_idle_records_never_blocks() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        fail(&mut t, "192.0.2.1", 1, t0);
        for u in 0..SOURCE_FREE_FAILURES {
            fail(&mut t, "192.0.2.9", u.into(), t0);
        }
        fill(&mut t, t0, false);
        fail(&mut t, "198.51.100.1", 1, t0 + Duration::from_millis(1));
        assert!(t.len() <= MAX_ENTRIES / 2 + 4, "table holds {}", t.len());
        assert!(
            t.standing(ip("192.0.2.9"), 1, t0) != Standing::Clear,
            "a live block was evicted"
        );
    }

    #[test]
    fn a_table_full_of_blocks_counts_new_ipv6_sources_by_48_and_stays_bounded() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        fill(&mut t, t0, true);
        // An attacker cycling /64s inside one /48: all land on the /48's record, which blocks.
        let mut blocked = false;
        for i in 0..(SOURCE_FREE_FAILURES + 5) {
            let a = format!("2001:db8:ffff:{i:x}::1");
            match t.begin(ip(&a), u64::from(i), t0) {
                Ok(tk) => {
                    assert_eq!(tk.source().to_string(), "2001:db8:ffff::/48");
                    t.finish(tk, Outcome::Failed, t0);
                }
                Err(Refusal::Blocked(_)) => blocked = true,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(blocked, "the /48 was never blocked");
        // Cycling /48s fills only the reserve; then new sources are refused, blocks are kept.
        let mut full = false;
        for i in 0..(OVERFLOW_ENTRIES as u32 + 10) {
            let a = Ipv6Addr::from((0x2001_0db9_u128 << 96) | (u128::from(i) << 80) | 1);
            if t.begin(IpAddr::V6(a), 0, t0) == Err(Refusal::Full) {
                full = true;
            }
        }
        assert!(full);
        assert!(t.len() <= MAX_ENTRIES + OVERFLOW_ENTRIES);
        assert!(t.map.values().filter(|r| r.blocked(t0).is_some()).count() >= MAX_ENTRIES);
        // IPv4 sources are refused while full, not let through unthrottled.
        assert_eq!(t.begin(ip("192.0.2.1"), 0, t0), Err(Refusal::Full));
        // When the blocks end, the table makes room again.
        let later = t0 + MAX_BLOCK + FORGET_AFTER + FORGET_AFTER;
        assert!(t.begin(ip("192.0.2.1"), 0, later).is_ok());
    }
}
