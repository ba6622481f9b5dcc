//! The store's plain types: a user's row, its usage, the changes the CLI makes, and quota periods.
//! No database here: every [`UserStore`](super::UserStore) implementation speaks these.

use std::fmt;

/// When a quota starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    /// Never: the quota is a lifetime total (until `user reset-usage`).
    None,
    /// Every UTC day.
    Day,
    /// Every UTC calendar month.
    Month,
}

impl QuotaPeriod {
    /// Parses `none`, `day` or `month`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms.
    pub fn parse(s: &str) -> Result<QuotaPeriod, BadPeriod> {
        // Compared without folding into a new string: it runs once per user at every load.
        let is = |names: &[&str]| names.iter().any(|n| s.eq_ignore_ascii_case(n));
        if is(&["none", ""]) {
            Ok(QuotaPeriod::None)
        } else if is(&["day", "daily"]) {
            Ok(QuotaPeriod::Day)
        } else if is(&["month", "monthly"]) {
            Ok(QuotaPeriod::Month)
        } else {
            Err(BadPeriod(s.to_string()))
        }
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::None => "none",
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }

    /// The start (unix seconds, UTC) of the period containing `now` (0 for `None`).
    pub fn start_of(self, now: u64) -> u64 {
        match self {
            QuotaPeriod::None => 0,
            QuotaPeriod::Day => now - now % 86_400,
            QuotaPeriod::Month => {
                let (y, m, _) = civil_from_days((now / 86_400) as i64);
                (days_from_civil(y, m, 1) * 86_400) as u64
            }
        }
    }
}

/// A quota period that is not `none`, `day` or `month` (the text as given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPeriod(pub String);

impl fmt::Display for BadPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad quota period {:?}: expected day, month or none",
            self.0
        )
    }
}

impl std::error::Error for BadPeriod {}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What the server adds to a user's usage row at a flush (deltas), plus its live figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageDelta {
    /// The account the counts belong to ([`UserRow::id`]).
    pub account_id: u64,
    /// Bytes client → destination since the last flush.
    pub bytes_up: u64,
    /// Bytes destination → client since the last flush.
    pub bytes_down: u64,
    /// Connections opened since the last flush.
    pub connections: u64,
    /// Milliseconds relays waited for tokens since the last flush.
    pub throttled_ms: u64,
    /// Milliseconds relays worked (waited for tokens or moved bytes) since the last flush.
    pub active_ms: u64,
    /// Start of the user's current quota period (unix seconds).
    pub period_start: u64,
    /// Connections open now.
    pub open_now: u64,
    /// Bytes per second over the last second.
    pub rate_now: u64,
    /// Share of the last second the user's relays spent waiting for tokens (0..=1).
    pub throttled_now: f64,
}

/// A user's usage row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The account ([`UserRow::id`]).
    pub account_id: u64,
    /// The account's user name.
    pub username: String,
    /// Total bytes client → destination.
    pub bytes_up: u64,
    /// Total bytes destination → client.
    pub bytes_down: u64,
    /// Connections opened.
    pub connections: u64,
    /// Milliseconds relays waited for tokens.
    pub throttled_ms: u64,
    /// Milliseconds relays worked (waited for tokens or moved bytes).
    pub active_ms: u64,
    /// Last time a connection was open (unix seconds), if ever.
    pub last_seen: Option<u64>,
    /// Start of the period `period_bytes` counts (unix seconds).
    pub period_start: u64,
    /// Bytes (both directions) in the period starting at `period_start`.
    pub period_bytes: u64,
    /// Bumped by `sluice user reset-usage`, so a running server restarts its quota count.
    pub reset_epoch: u64,
    /// Connections open at the server's last flush.
    pub open_now: u64,
    /// Bytes per second at the server's last flush.
    pub rate_now: u64,
    /// Share of time throttled at the server's last flush.
    pub throttled_now: f64,
    /// When the server last flushed live figures (unix seconds; 0 = never).
    pub live_at: u64,
}

/// One user as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    /// The account's id: never reused, so a user deleted and added again is a new account.
    pub id: u64,
    /// The login name (1..=255 bytes, no control characters).
    pub username: String,
    /// The argon2id PHC string.
    pub password_hash: String,
    /// Bytes per second, both directions together, all connections together; 0 = unlimited.
    pub bandwidth: u64,
    /// Bytes allowed per quota period, both directions; 0 = no quota.
    pub quota_bytes: u64,
    /// When the quota starts over.
    pub quota_period: QuotaPeriod,
    /// Most connections open at once; 0 = no cap.
    pub max_connections: u64,
}

impl fmt::Debug for UserRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRow")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("bandwidth", &self.bandwidth)
            .field("quota_bytes", &self.quota_bytes)
            .field("quota_period", &self.quota_period)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// A change to a user; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    /// A new argon2id PHC string.
    pub password_hash: Option<String>,
    /// A new bandwidth (bytes per second, 0 = unlimited).
    pub bandwidth: Option<u64>,
    /// A new quota (bytes per period, 0 = none).
    pub quota_bytes: Option<u64>,
    /// A new quota period.
    pub quota_period: Option<QuotaPeriod>,
    /// A new connection cap (0 = none).
    pub max_connections: Option<u64>,
}

/// A row that could not be read as a user, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The username, as far as it could be read.
    pub username: String,
    /// What is wrong with the row.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_periods_start_on_utc_boundaries() {
        // 2026-11-27T12:00:00Z
        let now = 1_795_780_800;
        assert_eq!(QuotaPeriod::Day.start_of(now), 1_795_737_600);
        assert_eq!(QuotaPeriod::Month.start_of(now), 1_793_491_200); // 2026-11-01
        assert_eq!(QuotaPeriod::Month.start_of(951_782_400), 949_363_200); // 2000-02-29 → 02-01
        assert_eq!(QuotaPeriod::None.start_of(now), 0);
        assert_eq!(QuotaPeriod::parse("Month"), Ok(QuotaPeriod::Month));
        let bad = QuotaPeriod::parse("week").unwrap_err();
        assert_eq!(
            bad.to_string(),
            "bad quota period \"week\": expected day, month or none"
        );
    }
}
