//! `sluice stats`: per-user usage read from the database, as a table for people or JSON for
//! scripts. Live figures (connections open, current rate, share throttled) come from the running
//! server's last flush and are shown only while it is fresh; on a Redis fleet the store has
//! already summed them over the servers that flushed in the last [`LIVE_FRESH_SECS`]
//! (`store::redis::sum_live`), so this file reads one set of figures either way.

use crate::server::metrics::escape_json;
use crate::store::{QuotaPeriod, Usage, UserRow};
use crate::units::{format_rate, format_size, human_bytes};
use std::fmt::Write as _;

/// Live figures older than this many seconds mean no server is flushing.
pub const LIVE_FRESH_SECS: u64 = 5;

/// One user's line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The user.
    pub user: String,
    /// Bytes per second, 0 = unlimited.
    pub bandwidth: u64,
    /// Bytes per period, 0 = none.
    pub quota: u64,
    /// The quota period.
    pub quota_period: QuotaPeriod,
    /// Bytes counted this period.
    pub quota_used: u64,
    /// Total bytes client → destination.
    pub bytes_up: u64,
    /// Total bytes destination → client.
    pub bytes_down: u64,
    /// Connections opened in all.
    pub connections: u64,
    /// Connections open now (0 without a live server).
    pub connections_open: u64,
    /// Bytes per second now (0 without a live server).
    pub rate: u64,
    /// Seconds relays waited for tokens.
    pub throttled_seconds: f64,
    /// Share of relays' working time spent waiting for tokens, over the user's lifetime (0..=1).
    pub throttled_share: f64,
    /// The same over the last second (0 without a live server).
    pub throttled_now: f64,
    /// Last time the user had traffic (unix seconds).
    pub last_seen: Option<u64>,
}

/// Every user's line.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Sorted by user.
    pub lines: Vec<Line>,
    /// True when a server flushed live figures in the last [`LIVE_FRESH_SECS`].
    pub live: bool,
}

impl Report {
    /// Joins the users with their usage rows, as of `now` (unix seconds).
    pub fn build(users: &[UserRow], usage: &[Usage], now: u64) -> Report {
        let mut live = false;
        let lines = users
            .iter()
            .map(|u| {
                let z = Usage::default();
                let g = usage.iter().find(|x| x.account_id == u.id).unwrap_or(&z);
                let fresh = g.live_at + LIVE_FRESH_SECS >= now && g.live_at > 0;
                live |= fresh;
                let in_period = g.period_start == u.quota_period.start_of(now);
                Line {
                    user: u.username.clone(),
                    bandwidth: u.bandwidth,
                    quota: u.quota_bytes,
                    quota_period: u.quota_period,
                    quota_used: if in_period && u.quota_bytes > 0 {
                        g.period_bytes
                    } else {
                        0
                    },
                    bytes_up: g.bytes_up,
                    bytes_down: g.bytes_down,
                    connections: g.connections,
                    connections_open: if fresh { g.open_now } else { 0 },
                    rate: if fresh { g.rate_now } else { 0 },
                    throttled_seconds: g.throttled_ms as f64 / 1000.0,
                    throttled_share: if g.active_ms > 0 {
                        (g.throttled_ms as f64 / g.active_ms as f64).min(1.0)
                    } else {
                        0.0
                    },
                    throttled_now: if fresh { g.throttled_now } else { 0.0 },
                    last_seen: g.last_seen,
                }
            })
            .collect();
        Report { lines, live }
    }

    /// A table for people, in the K/M/G units used everywhere.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{:<20} {:>10} {:>22} {:>9} {:>9} {:>6} {:>10} {:>16}",
            "USER", "BANDWIDTH", "QUOTA USED", "UP", "DOWN", "OPEN", "RATE", "THROTTLED now/all"
        );
        for l in &self.lines {
            let quota = match l.quota {
                0 => "-".to_string(),
                q => format!(
                    "{}/{} {} ({:.0}%)",
                    human_bytes(l.quota_used),
                    format_size(q),
                    l.quota_period.as_str(),
                    l.quota_used as f64 * 100.0 / q as f64
                ),
            };
            let _ = writeln!(
                o,
                "{:<20} {:>10} {:>22} {:>9} {:>9} {:>6} {:>10} {:>16}",
                l.user,
                format_rate(l.bandwidth),
                quota,
                human_bytes(l.bytes_up),
                human_bytes(l.bytes_down),
                l.connections_open,
                format!("{}/s", human_bytes(l.rate)),
                format!(
                    "{:.0}% / {:.0}%",
                    l.throttled_now * 100.0,
                    l.throttled_share * 100.0
                ),
            );
        }
        if !self.live {
            o.push_str("(no server has flushed live figures in the last 5 s: OPEN, RATE and THROTTLED now are 0)\n");
        }
        o
    }

    /// The same as a JSON array of objects.
    pub fn to_json(&self) -> String {
        let mut o = String::from("[");
        for (i, l) in self.lines.iter().enumerate() {
            let last = l.last_seen.map_or("null".to_string(), |t| t.to_string());
            let _ = write!(
                o,
                "{}\n  {{\"user\":\"{}\",\"bandwidth\":{},\"quota_bytes\":{},\"quota_period\":\"{}\",\"quota_used\":{},\"bytes_up\":{},\"bytes_down\":{},\"connections\":{},\"connections_open\":{},\"rate\":{},\"throttled_seconds\":{:.3},\"throttled_share\":{:.4},\"throttled_now\":{:.4},\"last_seen\":{last}}}",
                if i > 0 { "," } else { "" },
                escape_json(&l.user),
                l.bandwidth,
                l.quota,
                l.quota_period.as_str(),
                l.quota_used,
                l.bytes_up,
                l.bytes_down,
                l.connections,
                l.connections_open,
                l.rate,
                l.throttled_seconds,
                l.throttled_share,
                l.throttled_now,
            );
        }
        o.push_str("\n]\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, quota: u64) -> UserRow {
        UserRow {
            id: 1,
            username: name.into(),
            password_hash: "h".into(),
            bandwidth: 1 << 20,
            quota_bytes: quota,
            quota_period: QuotaPeriod::Month,
            max_connections: 0,
        }
    }

    #[test]
    fn live_figures_only_while_fresh() {
        let now = 1_795_780_800;
        let u = Usage {
            account_id: 1,
            username: "a".into(),
            bytes_up: 10,
            bytes_down: 20,
            open_now: 3,
            rate_now: 999,
            live_at: now - 1,
            period_start: QuotaPeriod::Month.start_of(now),
            period_bytes: 30,
            throttled_ms: 500,
            active_ms: 1000,
            ..Usage::default()
        };
        let r = Report::build(&[user("a", 100)], std::slice::from_ref(&u), now);
        assert!(r.live);
        assert_eq!(
            (
                r.lines[0].connections_open,
                r.lines[0].rate,
                r.lines[0].quota_used
            ),
            (3, 999, 30)
        );
        assert_eq!(r.lines[0].throttled_share, 0.5);
        let stale = Report::build(&[user("a", 100)], &[u], now + 60);
        assert!(!stale.live);
        assert_eq!(stale.lines[0].rate, 0);
        assert!(stale.to_table().contains("no server"));
    }

    #[test]
    fn json_has_the_promised_fields() {
        let r = Report::build(&[user("we\"ird", 0)], &[], 0);
        let j = r.to_json();
        for k in [
            "user",
            "bandwidth",
            "bytes_up",
            "bytes_down",
            "connections_open",
            "throttled_seconds",
        ] {
            assert!(j.contains(&format!("\"{k}\":")), "{k} missing in {j}");
        }
        assert!(j.contains(r#""user":"we\"ird""#));
    }
}
