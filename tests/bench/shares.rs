//! Scenarios 6–8, how one user's bandwidth is shared out over time: fairness among its equal
//! connections, the burst a new user gets in its first second, and how soon a connection joining
//! a saturated user gets its fair share.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, Route, open_many};
use crate::origin::{Endpoint, Kind};
use crate::proxies::User;
use crate::table::{Samples, Unit, Verdict, jain};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Bandwidth of the fairness and burst users.
const BW: u64 = 1 << 20;
/// Connection counts for fairness, each its own user, all run at once.
const FAIR_CONNS: [usize; 3] = [2, 8, 64];
/// Jain's index to reach.
const MIN_JAIN: f64 = 0.99;
/// Greedy download connections of the burst user.
const BURST_CONNS: usize = 4;
/// Most of its bandwidth a new user may move in its first second.
const MAX_BURST: f64 = 1.05;
/// The joining user: 15 connections saturate it, a 16th joins.
const JOIN_BW: u64 = 1_600_000;
const JOIN_CONNS: usize = 16;
/// How long the 15 run before the 16th joins.
const JOIN_SETTLE: Duration = Duration::from_secs(1);
/// The fair-share test window, and the fraction of a fair share it must carry.
const SHARE_WINDOW: Duration = Duration::from_millis(100);
const SHARE_FRACTION: f64 = 0.8;
/// Time to a fair share, at most.
const MAX_JOIN: Duration = Duration::from_millis(200);

fn burst_user(run: usize) -> String {
    format!("burst-{run}")
}

/// Users whose first connection is the measurement: not logged in beforehand.
pub fn is_fresh(name: &str) -> bool {
    name.starts_with("burst-")
}

/// Users of these scenarios (a fresh burst user per run).
pub fn users(runs: usize) -> Vec<User> {
    let mut v: Vec<User> = FAIR_CONNS
        .iter()
        .map(|n| (format!("fair-{n}"), BW))
        .collect();
    v.extend((0..runs).map(|r| (burst_user(r), BW)));
    v.push(("join".into(), JOIN_BW));
    v
}

/// Scenario 6: Jain's index of per-connection bytes among one user's greedy download
/// connections, for 2, 8 and 64 connections (three users at once), over the fairness window.
pub fn fairness(ctx: &mut Ctx) -> Result<(), String> {
    let window = ctx.cfg.fairness;
    let routes: Vec<Route> = {
        let server = ctx.server()?;
        FAIR_CONNS
            .iter()
            .map(|n| server.route(&format!("fair-{n}")))
            .collect()
    };
    let mut index = vec![Samples::default(); FAIR_CONNS.len()];
    let mut total = vec![Samples::default(); FAIR_CONNS.len()];
    for _ in 0..ctx.cfg.runs {
        let got: Result<Vec<(f64, f64)>, String> = thread::scope(|s| {
            let hs: Vec<_> = routes
                .iter()
                .zip(FAIR_CONNS)
                .map(|(r, n)| s.spawn(move || shares_of(r, n, window)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| "fairness thread panicked".to_string())?
                })
                .collect()
        });
        for (i, (j, t)) in got?.into_iter().enumerate() {
            index[i].push(j);
            total[i].push(t);
        }
    }
    for (i, n) in FAIR_CONNS.iter().enumerate() {
        ctx.table.push(
            &format!("6 · fairness, {n} conns at 1 MiB/s"),
            "Jain's index over per-conn bytes",
            index[i].show(Unit::Ratio),
            format!(
                "total {} × bw over {window:?}; target ≥ {MIN_JAIN}",
                total[i].show(Unit::Ratio)
            ),
            Verdict::of(index[i].median() >= MIN_JAIN),
        );
    }
    Ok(())
}

/// Opens `n` download connections; once all are open, counts each one's bytes over `window`.
/// Returns Jain's index and the total as a fraction of the bandwidth.
fn shares_of(route: &Route, n: usize, window: Duration) -> Result<(f64, f64), String> {
    let ep = Endpoint::start(Kind::Source)?;
    let meters: Vec<Arc<Meter>> = (0..n).map(|_| Meter::new(false)).collect();
    let mut load = Load::default();
    for (s, m) in open_many(route, ep.addr(), n)?.into_iter().zip(&meters) {
        load.start(Dir::Down, s, m)?;
    }
    let before: Vec<u64> = meters.iter().map(|m| m.bytes()).collect();
    let t0 = Instant::now();
    thread::sleep(window);
    let got: Vec<f64> = meters
        .iter()
        .zip(before)
        .map(|(m, b)| m.bytes().saturating_sub(b) as f64)
        .collect();
    let took = t0.elapsed().as_secs_f64();
    load.stop();
    let sum: f64 = got.iter().sum();
    Ok((jain(&got), sum / (BW as f64 * took)))
}

/// Scenario 7: bytes in the first second after a new user's first connection opens, over its
/// bandwidth (1 MiB/s, 4 greedy download connections opened one after another).
pub fn burst(ctx: &mut Ctx) -> Result<(), String> {
    let mut ratio = Samples::default();
    for run in 0..ctx.cfg.runs {
        let route = ctx.server()?.route(&burst_user(run));
        let ep = Endpoint::start(Kind::Source)?;
        let meter = Meter::new(false);
        let mut load = Load::default();
        let first = route
            .open(ep.addr())
            .map_err(|e| format!("first tunnel: {e}"))?;
        let t0 = Instant::now();
        load.start(Dir::Down, first, &meter)?;
        for s in open_many(&route, ep.addr(), BURST_CONNS - 1)? {
            load.start(Dir::Down, s, &meter)?;
        }
        thread::sleep((t0 + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
        let bytes = meter.bytes();
        load.stop();
        ratio.push(bytes as f64 / BW as f64);
    }
    ctx.table.push(
        "7 · burst: a new user's first second",
        &format!("bytes / bw, 1 MiB/s, {BURST_CONNS} conns"),
        ratio.show(Unit::Ratio),
        format!("target ≤ {MAX_BURST}"),
        Verdict::of(ratio.median() <= MAX_BURST),
    );
    Ok(())
}

/// Scenario 8: 15 download connections saturate a 1.6 MB/s user; a 16th opens. The figure is
/// T + 100 ms for the first T after it opened such that over [T, T + 100 ms] it received at least
/// 80% of a fair share (bw / 16 × 100 ms).
pub fn joining(ctx: &mut Ctx) -> Result<(), String> {
    let route = ctx.server()?.route("join");
    let observe = ctx.cfg.join_observe;
    let need = SHARE_FRACTION * JOIN_BW as f64 / JOIN_CONNS as f64 * SHARE_WINDOW.as_secs_f64();
    let mut ms = Samples::default();
    let mut missed = 0;
    for _ in 0..ctx.cfg.runs {
        let ep = Endpoint::start(Kind::Source)?;
        let (rest, newcomer) = (Meter::new(false), Meter::new(true));
        let mut load = Load::default();
        for s in open_many(&route, ep.addr(), JOIN_CONNS - 1)? {
            load.start(Dir::Down, s, &rest)?;
        }
        thread::sleep(JOIN_SETTLE);
        let s = route
            .open(ep.addr())
            .map_err(|e| format!("16th tunnel: {e}"))?;
        let opened = Instant::now();
        load.start(Dir::Down, s, &newcomer)?;
        thread::sleep(observe);
        load.stop();
        match time_to_share(&newcomer.timeline(), opened, SHARE_WINDOW, need, observe) {
            Some(t) => ms.push(t.as_secs_f64() * 1e3),
            None => {
                missed += 1;
                ms.push(observe.as_secs_f64() * 1e3);
            }
        }
    }
    let never = if missed > 0 {
        format!(" · {missed} run(s) never got it within {observe:?} (counted as {observe:?})")
    } else {
        String::new()
    };
    ctx.table.push(
        "8 · joining: 16th conn beside 15 saturating 1.6 MB/s",
        "time until it holds its fair share",
        ms.show(Unit::Ms),
        format!("target ≤ {} ms{never}", MAX_JOIN.as_millis()),
        Verdict::of(ms.median() <= MAX_JOIN.as_secs_f64() * 1e3),
    );
    ctx.table.note(format!(
        "Joining (8): the figure is T + {w} ms for the first T ≥ 0 after the 16th tunnel opened \
         such that over [T, T + {w} ms] that connection received ≥ {f:.0}% of bw / 16 × {w} ms \
         ({need:.0} bytes); T is searched on a 1 ms grid.",
        w = SHARE_WINDOW.as_millis(),
        f = SHARE_FRACTION * 100.0
    ));
    Ok(())
}

/// The first T (1 ms grid, up to `horizon`) such that the bytes logged in [opened + T,
/// opened + T + window) reach `need`; returns T + window.
pub fn time_to_share(
    log: &[(Instant, u32)],
    opened: Instant,
    window: Duration,
    need: f64,
    horizon: Duration,
) -> Option<Duration> {
    let step = Duration::from_millis(1);
    let mut t = Duration::ZERO;
    while t + window <= horizon {
        let (a, b) = (opened + t, opened + t + window);
        let got: u64 = log
            .iter()
            .filter(|(at, _)| *at >= a && *at < b)
            .map(|(_, n)| u64::from(*n))
            .sum();
        if got as f64 >= need {
            return Some(t + window);
        }
        t += step;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_share_finds_the_first_full_window() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // 100 bytes every 10 ms from 300 ms on: [T, T + 100) first holds ten of them at T = 291.
        let log: Vec<(Instant, u32)> = (30..100).map(|i| (ms(i * 10), 100)).collect();
        let got = time_to_share(
            &log,
            t0,
            Duration::from_millis(100),
            1000.0,
            Duration::from_secs(2),
        );
        assert_eq!(got, Some(Duration::from_millis(391)));
    }

    #[test]
    fn time_to_share_is_none_when_the_share_never_comes() {
        let t0 = Instant::now();
        let log = vec![(t0 + Duration::from_millis(5), 10)];
        let got = time_to_share(
            &log,
            t0,
            Duration::from_millis(100),
            1000.0,
            Duration::from_secs(1),
        );
        assert_eq!(got, None);
    }
}
