//! Usage accounting: once a second, turn the active accounts' in-memory counters into live samples
//! (rate, share of time throttled, a minute of history) and into deltas for the `usage` table; roll
//! quota periods over. The relay path only adds to atomics; nothing here runs per chunk. Only the
//! accounts on the roster's active list are sampled and flushed (see `account::Roster`): an account
//! leaves it once [`Accountant::settled`] says everything it counted is in the store and its
//! samples are down to zero, so a second's work follows the users that are connected.
//!
//! Deltas are measured against the last *committed* flush, so a flush that fails (database locked)
//! loses nothing: the next one carries the difference. Everything is kept per account id, never
//! per name: a user deleted and added again is a new account whose counts start from zero, and
//! the old account's marks never apply to it. SQL stays in `store::sqlite`.

use crate::flow::account::{Account, HISTORY_SECS};
use crate::store::{Usage, UsageDelta};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub use crate::flow::account::unix_now;

/// One account's counters at a moment (what a flush is measured against).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    up: u64,
    down: u64,
    opened: u64,
    throttled_ns: u64,
    busy_ns: u64,
}

fn counts(a: &Account) -> Counts {
    Counts {
        up: a.bytes_up.load(Ordering::Relaxed),
        down: a.bytes_down.load(Ordering::Relaxed),
        opened: a.opened.load(Ordering::Relaxed),
        throttled_ns: a.throttled_ns.load(Ordering::Relaxed),
        busy_ns: a.busy_ns.load(Ordering::Relaxed),
    }
}

impl Counts {
    /// What was counted since `before`; never negative (a mark from another account would make
    /// it so — they are keyed by id so it cannot happen — and a wrapped u64 would be 16 EB).
    fn since(self, before: Counts) -> Counts {
        Counts {
            up: self.up.saturating_sub(before.up),
            down: self.down.saturating_sub(before.down),
            opened: self.opened.saturating_sub(before.opened),
            throttled_ns: self.throttled_ns.saturating_sub(before.throttled_ns),
            busy_ns: self.busy_ns.saturating_sub(before.busy_ns),
        }
    }
}

/// Counters per account id as of a flush, to commit once the database took it.
pub type Marks = Vec<(u64, Counts)>;

/// Remembers what was flushed and what was last sampled, per account id.
#[derive(Default)]
pub struct Accountant {
    flushed: HashMap<u64, Counts>,
    sampled: HashMap<u64, (Counts, Instant)>,
}

impl Accountant {
    /// A fresh accountant: the first flush writes everything counted since start.
    pub fn new() -> Accountant {
        Accountant::default()
    }

    /// Takes one per-second sample of every account: rate, share throttled, history. The share is
    /// the time relays waited for tokens over the time they worked (waited or moved bytes); a relay
    /// idle for lack of data does not count, so a throttled download reads ~100%, not 50%.
    pub fn sample(&mut self, accounts: &[Arc<Account>], now: Instant) {
        for a in accounts {
            let (prev, at) = self.sampled.get(&a.id).copied().unwrap_or((counts(a), now));
            let dt = now.saturating_duration_since(at);
            let c = counts(a);
            let d = c.since(prev);
            let waited = d.throttled_ns;
            let worked = waited + d.busy_ns;
            let secs = dt.as_secs_f64();
            let rate = if secs > 0.0 {
                ((d.up + d.down) as f64 / secs) as u64
            } else {
                0
            };
            let thr = if worked > 0 {
                (waited as f64 / worked as f64).min(1.0)
            } else {
                0.0
            };
            let mut h = a.history.lock();
            if h.len() == HISTORY_SECS {
                h.pop_front();
            }
            h.push_back((rate, thr));
            drop(h);
            self.sampled.insert(a.id, (c, now));
        }
        // Forget accounts gone from the snapshot: one pass with a set, not a scan per entry (a
        // scan would be users² comparisons every second).
        if self.sampled.len() > accounts.len() {
            let live: std::collections::HashSet<u64> = accounts.iter().map(|a| a.id).collect();
            self.sampled.retain(|k, _| live.contains(k));
        }
    }

    /// Rolls quota periods over and returns the deltas since the last committed flush, with the
    /// pending marks to [`Accountant::commit`] once the database took them.
    pub fn deltas(&self, accounts: &[Arc<Account>], now_unix: u64) -> (Vec<UsageDelta>, Marks) {
        let mut out = Vec::new();
        let mut marks = Vec::new();
        for a in accounts {
            let start = a.roll_period(now_unix);
            let c = counts(a);
            let p = self.flushed.get(&a.id).copied().unwrap_or_default();
            let d = c.since(p);
            let ms = |ns: u64| ns / 1_000_000;
            let (rate, thr) = a.history.lock().back().copied().unwrap_or((0, 0.0));
            out.push(UsageDelta {
                account_id: a.id,
                bytes_up: d.up,
                bytes_down: d.down,
                connections: d.opened,
                // Milliseconds of the totals, so rounding never loses a millisecond over flushes.
                throttled_ms: ms(c.throttled_ns).saturating_sub(ms(p.throttled_ns)),
                active_ms: ms(c.throttled_ns + c.busy_ns)
                    .saturating_sub(ms(p.throttled_ns + p.busy_ns)),
                period_start: start,
                open_now: a.open_connections() as u64,
                rate_now: rate,
                throttled_now: thr,
            });
            marks.push((a.id, c));
        }
        (out, marks)
    }

    /// Records that the deltas from [`Accountant::deltas`] are in the database. Marks of accounts
    /// not in this flush are kept: an account that went quiet and comes back is measured from them.
    pub fn commit(&mut self, marks: Marks) {
        self.flushed.extend(marks);
    }

    /// True when everything `a` counted is in the database and its last minute of samples is all
    /// zero (so the status page's sparkline and the stored live figures show it idle): nothing is
    /// left to sample or flush until it is used again.
    pub fn settled(&self, a: &Account) -> bool {
        self.flushed.get(&a.id).is_some_and(|m| *m == counts(a))
            && a.history.lock().iter().all(|&(rate, _)| rate == 0)
    }

    /// Forgets the sample of an account that left the active list (its next sample, when it is
    /// used again, starts a new measurement); a deleted account's flush mark goes too.
    pub fn forget(&mut self, a: &Account) {
        self.sampled.remove(&a.id);
        if a.is_revoked() {
            self.flushed.remove(&a.id);
        }
    }
}

/// Applies usage rows read from the database to the accounts (matched by id): at start (or for a
/// new account) the quota count resumes from the row; after `user reset-usage` (a new epoch) it
/// starts over.
pub fn apply_usage(accounts: &[Arc<Account>], rows: &[Usage], now_unix: u64) {
    let by_id: HashMap<u64, &Usage> = rows.iter().map(|u| (u.account_id, u)).collect();
    for a in accounts {
        let row = by_id.get(&a.id).copied();
        let epoch = row.map_or(0, |u| u.reset_epoch);
        let seen = a.reset_epoch.swap(epoch, Ordering::Relaxed);
        if seen == epoch {
            continue;
        }
        let start = a.period().start_of(now_unix);
        let used = match row {
            // First sight of the row: resume the period's count if it is the same period.
            Some(u) if seen == u64::MAX && u.period_start == start => u.period_bytes,
            _ => 0,
        };
        a.period_start.store(start, Ordering::Relaxed);
        a.restart_quota(used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QuotaPeriod;
    use std::time::Duration;

    #[test]
    fn deltas_carry_over_until_committed() {
        let a = Account::new(1, "u", 0);
        let accts = vec![a.clone()];
        let mut acc = Accountant::new();
        assert!(!acc.settled(&a), "never flushed: not settled");
        a.bytes_up.fetch_add(100, Ordering::Relaxed);
        let (d, _lost) = acc.deltas(&accts, 1000);
        assert_eq!(d[0].bytes_up, 100);
        // The flush failed (not committed): the next one still carries the 100 bytes.
        a.bytes_up.fetch_add(5, Ordering::Relaxed);
        let (d, marks) = acc.deltas(&accts, 1001);
        assert_eq!(d[0].bytes_up, 105);
        acc.commit(marks);
        let (d, _) = acc.deltas(&accts, 1002);
        assert_eq!(d[0].bytes_up, 0);
        assert!(acc.settled(&a), "flushed and never sampled busy");
        a.bytes_down.fetch_add(1, Ordering::Relaxed);
        assert!(!acc.settled(&a), "a byte not yet flushed");
    }

    #[test]
    fn an_account_stays_unsettled_until_its_samples_are_back_to_zero() {
        let a = Account::new(1, "u", 0);
        let accts = vec![a.clone()];
        let mut acc = Accountant::new();
        let t0 = Instant::now();
        acc.sample(&accts, t0);
        a.bytes_down.fetch_add(5000, Ordering::Relaxed);
        acc.sample(&accts, t0 + Duration::from_secs(1));
        let (_, marks) = acc.deltas(&accts, 1000);
        acc.commit(marks);
        assert!(
            !acc.settled(&a),
            "the sparkline still shows the busy second"
        );
        for s in 2..=HISTORY_SECS as u64 + 1 {
            acc.sample(&accts, t0 + Duration::from_secs(s));
        }
        assert!(acc.settled(&a));
        // Gone quiet and back: the marks are kept, so only the new bytes are flushed.
        acc.forget(&a);
        a.bytes_down.fetch_add(7, Ordering::Relaxed);
        let (d, _) = acc.deltas(&accts, 1100);
        assert_eq!(d[0].bytes_down, 7);
    }

    #[test]
    fn samples_give_rate_and_history() {
        let a = Account::new(1, "u", 0);
        let accts = vec![a.clone()];
        let mut acc = Accountant::new();
        let t0 = Instant::now();
        acc.sample(&accts, t0);
        a.bytes_down.fetch_add(2000, Ordering::Relaxed);
        acc.sample(&accts, t0 + Duration::from_secs(2));
        assert_eq!(a.history.lock().back().map(|h| h.0), Some(1000));
    }

    #[test]
    fn a_new_period_restarts_the_quota_and_a_reset_epoch_too() {
        let a = Account::new(1, "u", 0);
        a.set_limits(1000, QuotaPeriod::Day, 0);
        let accts = vec![a.clone()];
        let day = 86_400;
        let row = Usage {
            account_id: 1,
            username: "u".into(),
            period_start: 10 * day,
            period_bytes: 700,
            ..Usage::default()
        };
        a.reset_epoch.store(u64::MAX, Ordering::Relaxed);
        apply_usage(&accts, std::slice::from_ref(&row), 10 * day + 5);
        assert_eq!(a.quota_used(), 700, "resumes the day's count at start");
        Accountant::new().deltas(&accts, 11 * day + 1);
        assert_eq!(a.quota_used(), 0, "a new day starts over");
        a.restart_quota(500);
        let reset = Usage {
            reset_epoch: 1,
            ..row
        };
        apply_usage(&accts, &[reset], 11 * day + 2);
        assert_eq!(a.quota_used(), 0, "reset-usage starts over");
    }

    #[test]
    fn a_new_account_under_an_old_name_starts_from_zero() {
        let old = Account::new(1, "dz", 0);
        let mut acc = Accountant::new();
        old.bytes_down.fetch_add(100_000, Ordering::Relaxed);
        let (d, marks) = acc.deltas(std::slice::from_ref(&old), 1000);
        assert_eq!(d[0].bytes_down, 100_000);
        acc.commit(marks);
        // `user del dz; user add dz` before the next flush: a new account under the same name.
        let new = Account::new(2, "dz", 0);
        new.bytes_down.fetch_add(10, Ordering::Relaxed);
        let (d, _) = acc.deltas(std::slice::from_ref(&new), 1001);
        assert_eq!((d[0].account_id, d[0].bytes_down), (2, 10));
        acc.sample(std::slice::from_ref(&new), Instant::now());
        assert_eq!(new.history.lock().back().map(|h| h.0), Some(0));
    }
}
