//! Usage accounting: once a second, turn the accounts' in-memory counters into live samples (rate,
//! share of time throttled, a minute of history) and into deltas for the `usage` table; roll quota
//! periods over. The relay path only adds to atomics; nothing here runs per chunk.
//!
//! Deltas are measured against the last *committed* flush, so a flush that fails (database locked)
//! loses nothing: the next one carries the difference. SQL stays in `users.rs`.

use crate::account::{Account, HISTORY_SECS};
use crate::users::{Usage, UsageDelta};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One account's counters at a moment (what a flush is measured against).
#[derive(Clone, Copy, Default)]
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

/// Counters per user as of a flush, to commit once the database took it.
pub type Marks = Vec<(Arc<str>, Counts)>;

/// Remembers what was flushed and what was last sampled, per user.
#[derive(Default)]
pub struct Accountant {
    flushed: HashMap<Arc<str>, Counts>,
    sampled: HashMap<Arc<str>, (Counts, Instant)>,
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
            let (prev, at) = self
                .sampled
                .get(&a.name)
                .copied()
                .unwrap_or((counts(a), now));
            let dt = now.saturating_duration_since(at);
            let c = counts(a);
            let waited = c.throttled_ns - prev.throttled_ns;
            let worked = waited + (c.busy_ns - prev.busy_ns);
            let secs = dt.as_secs_f64();
            let rate = if secs > 0.0 {
                ((c.up + c.down - prev.up - prev.down) as f64 / secs) as u64
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
            self.sampled.insert(a.name.clone(), (c, now));
        }
        // Forget users gone from the snapshot: one pass with a set, not a scan per entry (a
        // scan would be users² string comparisons every second).
        if self.sampled.len() > accounts.len() {
            let live: std::collections::HashSet<&str> = accounts.iter().map(|a| &*a.name).collect();
            self.sampled.retain(|k, _| live.contains(&**k));
        }
    }

    /// Rolls quota periods over and returns the deltas since the last committed flush, with the
    /// pending marks to [`Accountant::commit`] once the database took them.
    pub fn deltas(&self, accounts: &[Arc<Account>], now_unix: u64) -> (Vec<UsageDelta>, Marks) {
        let mut out = Vec::new();
        let mut marks = Vec::new();
        for a in accounts {
            let start = a.period().start_of(now_unix);
            if a.period_start.swap(start, Ordering::Relaxed) != start {
                a.restart_quota(0);
            }
            let c = counts(a);
            let p = self.flushed.get(&a.name).copied().unwrap_or_default();
            let (rate, thr) = a.history.lock().back().copied().unwrap_or((0, 0.0));
            out.push(UsageDelta {
                username: a.name.to_string(),
                bytes_up: c.up - p.up,
                bytes_down: c.down - p.down,
                connections: c.opened - p.opened,
                throttled_ms: c.throttled_ns / 1_000_000 - p.throttled_ns / 1_000_000,
                active_ms: (c.throttled_ns + c.busy_ns) / 1_000_000
                    - (p.throttled_ns + p.busy_ns) / 1_000_000,
                period_start: start,
                open_now: a.open_connections() as u64,
                rate_now: rate,
                throttled_now: thr,
            });
            marks.push((a.name.clone(), c));
        }
        (out, marks)
    }

    /// Records that the deltas from [`Accountant::deltas`] are in the database.
    pub fn commit(&mut self, marks: Marks) {
        self.flushed = marks.into_iter().collect();
    }
}

/// Applies usage rows read from the database to the accounts: at start (or for a new user) the
/// quota count resumes from the row; after `user reset-usage` (a new epoch) it starts over.
pub fn apply_usage(accounts: &[Arc<Account>], rows: &[Usage], now_unix: u64) {
    let by_name: HashMap<&str, &Usage> = rows.iter().map(|u| (u.username.as_str(), u)).collect();
    for a in accounts {
        let row = by_name.get(&*a.name).copied();
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
    use crate::users::QuotaPeriod;
    use std::time::Duration;

    #[test]
    fn deltas_carry_over_until_committed() {
        let a = Account::new("u", 0);
        let accts = vec![a.clone()];
        let mut acc = Accountant::new();
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
    }

    #[test]
    fn samples_give_rate_and_history() {
        let a = Account::new("u", 0);
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
        let a = Account::new("u", 0);
        a.set_limits(1000, QuotaPeriod::Day, 0);
        let accts = vec![a.clone()];
        let day = 86_400;
        let row = Usage {
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
}
