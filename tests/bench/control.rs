//! Scenarios 9 and 10, the limiter under outside pressure: a user's rate while another user floods
//! the server, and how soon a bandwidth changed by plain SQL governs open connections.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, open_many};
use crate::origin::{Endpoint, Kind};
use crate::proxies::User;
use crate::table::{Samples, Unit, Verdict};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// User A: 1 MiB/s over 4 download connections.
const A_BW: u64 = 1 << 20;
const A_CONNS: usize = 4;
/// User B floods with 64 download connections, limited to 32 MiB/s: a flood of connections and
/// limiter traffic, not of CPU (an unlimited flood would measure the 2-core scheduler instead).
const B_BW: u64 = 32 << 20;
const B_CONNS: usize = 64;
/// Time given to connections to reach a steady state before a window opens.
const SETTLE: Duration = Duration::from_millis(300);
/// A's achieved / bandwidth during the flood, at least.
const MIN_ISOLATION: f64 = 0.98;
/// The live-change user: 1 MiB/s over 4 download connections, changed to 256 KiB/s.
const LIVE_BW: u64 = 1 << 20;
const LIVE_NEW_BW: u64 = 256 << 10;
const LIVE_CONNS: usize = 4;
/// How long it downloads before the change.
const LIVE_BEFORE: Duration = Duration::from_secs(1);
/// The sliding window, its step, and the tolerance for "the new rate holds".
const HOLD_WINDOW: Duration = Duration::from_millis(200);
const HOLD_STEP: Duration = Duration::from_millis(10);
const HOLD_TOLERANCE: f64 = 0.10;
/// Time until the new rate holds, at most.
const MAX_LIVE: Duration = Duration::from_millis(1500);

fn live_user(run: usize) -> String {
    format!("live-{run}")
}

/// Users of these scenarios (a fresh live-change user per run).
pub fn users(runs: usize) -> Vec<User> {
    let mut v: Vec<User> = vec![("iso-a".into(), A_BW), ("iso-b".into(), B_BW)];
    v.extend((0..runs).map(|r| (live_user(r), LIVE_BW)));
    v
}

/// Bytes per second on `meter` over `window`, starting now.
fn rate_over(meter: &Meter, window: Duration) -> f64 {
    let (b0, t0) = (meter.bytes(), Instant::now());
    thread::sleep(window);
    meter.bytes().saturating_sub(b0) as f64 / t0.elapsed().as_secs_f64()
}

/// Scenario 9: A's achieved / bandwidth alone, then while B floods.
pub fn isolation(ctx: &mut Ctx) -> Result<(), String> {
    let window = ctx.cfg.isolation;
    let (route_a, route_b) = {
        let s = ctx.server()?;
        (s.route("iso-a"), s.route("iso-b"))
    };
    let (mut alone, mut flooded, mut b) =
        (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..ctx.cfg.runs {
        let ep = Endpoint::start(Kind::Source)?;
        let (ma, mb) = (Meter::new(false), Meter::new(false));
        let mut load = Load::default();
        for s in open_many(&route_a, ep.addr(), A_CONNS)? {
            load.start(Dir::Down, s, &ma)?;
        }
        thread::sleep(SETTLE);
        alone.push(rate_over(&ma, window) / A_BW as f64);
        for s in open_many(&route_b, ep.addr(), B_CONNS)? {
            load.start(Dir::Down, s, &mb)?;
        }
        thread::sleep(SETTLE);
        let (b0, t0) = (mb.bytes(), Instant::now());
        flooded.push(rate_over(&ma, window) / A_BW as f64);
        b.push(mb.bytes().saturating_sub(b0) as f64 / t0.elapsed().as_secs_f64() / B_BW as f64);
        load.stop();
    }
    ctx.table.push(
        "9 · isolation: B floods with 64 conns (B limited to 32 MiB/s)",
        "A's achieved / bw (1 MiB/s, 4 conns)",
        flooded.show(Unit::Ratio),
        format!(
            "alone {} · B got {} × its bw · target ≥ {MIN_ISOLATION}",
            alone.show(Unit::Ratio),
            b.show(Unit::Ratio)
        ),
        Verdict::of(flooded.median() >= MIN_ISOLATION),
    );
    Ok(())
}

/// Changes a user's bandwidth the way an operator in the sqlite3 shell would.
fn set_bandwidth_by_sql(db: &Path, user: &str, bw: u64) -> Result<(), String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let bw = i64::try_from(bw).map_err(|e| e.to_string())?;
    let n = conn
        .execute(
            "UPDATE users SET bandwidth = ?1 WHERE username = ?2",
            rusqlite::params![bw, user],
        )
        .map_err(|e| format!("update: {e}"))?;
    if n == 1 {
        Ok(())
    } else {
        Err(format!("update: no user {user}"))
    }
}

/// Scenario 10: 4 connections download at 1 MiB/s; the bandwidth is set to 256 KiB/s by SQL.
pub fn live_change(ctx: &mut Ctx) -> Result<(), String> {
    let observe = ctx.cfg.live_observe;
    let (mut took, mut before) = (Samples::default(), Samples::default());
    let mut missed = 0;
    for run in 0..ctx.cfg.runs {
        let (route, db) = {
            let s = ctx.server()?;
            (s.route(&live_user(run)), s.db.clone())
        };
        let ep = Endpoint::start(Kind::Source)?;
        let meter = Meter::new(true);
        let mut load = Load::default();
        for s in open_many(&route, ep.addr(), LIVE_CONNS)? {
            load.start(Dir::Down, s, &meter)?;
        }
        thread::sleep(LIVE_BEFORE);
        set_bandwidth_by_sql(&db, &live_user(run), LIVE_NEW_BW)?;
        let changed = Instant::now();
        thread::sleep(observe);
        let end = Instant::now();
        load.stop();
        let log = meter.timeline();
        let half = Duration::from_millis(500);
        let since = changed.checked_sub(half).unwrap_or(changed);
        before.push(bytes_in(&log, since, changed) as f64 / half.as_secs_f64() / LIVE_BW as f64);
        match time_to_hold(&log, changed, end, LIVE_NEW_BW as f64) {
            Some(t) => took.push(t.as_secs_f64() * 1e3),
            None => {
                missed += 1;
                took.push(observe.as_secs_f64() * 1e3);
            }
        }
    }
    let never = if missed > 0 {
        format!(" · {missed} run(s) never held within {observe:?}")
    } else {
        String::new()
    };
    ctx.table.push(
        "10 · live change by plain SQL: 1 MiB/s → 256 KiB/s, 4 conns",
        "time until the new rate holds",
        took.show(Unit::Ms),
        format!(
            "rate before: {} × 1 MiB/s · target ≤ {} ms{never}",
            before.show(Unit::Ratio),
            MAX_LIVE.as_millis()
        ),
        Verdict::of(took.median() <= MAX_LIVE.as_secs_f64() * 1e3),
    );
    ctx.table.note(format!(
        "Live change (10): time from the UPDATE's commit to the end of the first {w} ms window \
         from which on every {w} ms window (sliding by {s} ms, to the end of the {observe:?} \
         watched) carries the new rate ± {tol:.0}%.",
        w = HOLD_WINDOW.as_millis(),
        s = HOLD_STEP.as_millis(),
        tol = HOLD_TOLERANCE * 100.0
    ));
    Ok(())
}

/// Bytes logged in [a, b).
fn bytes_in(log: &[(Instant, u32)], a: Instant, b: Instant) -> u64 {
    log.iter()
        .filter(|(t, _)| *t >= a && *t < b)
        .map(|(_, n)| u64::from(*n))
        .sum()
}

/// The time from `from` to the end of the first sliding window such that it and every later
/// window up to `end` carry `rate` ± the tolerance; `None` if the last window does not.
pub fn time_to_hold(
    log: &[(Instant, u32)],
    from: Instant,
    end: Instant,
    rate: f64,
) -> Option<Duration> {
    let mut starts = Vec::new();
    let mut s = from;
    while s + HOLD_WINDOW <= end {
        starts.push(s);
        s += HOLD_STEP;
    }
    let good = |a: Instant| {
        let r = bytes_in(log, a, a + HOLD_WINDOW) as f64 / HOLD_WINDOW.as_secs_f64();
        (r - rate).abs() <= HOLD_TOLERANCE * rate
    };
    // Walk back from the end while windows are good; the last good one reached is the answer.
    let mut first_good = None;
    for &a in starts.iter().rev() {
        if !good(a) {
            break;
        }
        first_good = Some(a);
    }
    first_good.map(|a| a - from + HOLD_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_hold_waits_for_the_rate_to_settle() {
        let t0 = Instant::now();
        // 1,000 B every 10 ms (100 kB/s) until 500 ms, then 100 B every 10 ms (10 kB/s).
        let log: Vec<(Instant, u32)> = (0..300)
            .map(|i| {
                (
                    t0 + Duration::from_millis(i * 10),
                    if i < 50 { 1000 } else { 100 },
                )
            })
            .collect();
        let got = time_to_hold(&log, t0, t0 + Duration::from_secs(3), 10_000.0);
        // The first window without any of the fast entries starts at 500 ms.
        assert_eq!(got, Some(Duration::from_millis(700)));
    }

    #[test]
    fn time_to_hold_is_none_if_the_end_is_off_rate() {
        let t0 = Instant::now();
        let log: Vec<(Instant, u32)> = (0..100)
            .map(|i| (t0 + Duration::from_millis(i * 10), 1000))
            .collect();
        assert_eq!(
            time_to_hold(&log, t0, t0 + Duration::from_secs(1), 10_000.0),
            None
        );
    }
}
