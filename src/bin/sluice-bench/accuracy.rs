//! Scenario 5, limiter accuracy: for each bandwidth (16 KiB/s, 1 MiB/s, 64 MiB/s), connection
//! count (1, 4, 16, 64) and direction (download, upload, both), the bytes a user moved over the
//! window divided by bandwidth × window.
//!
//! Each cell is its own user, so the twelve cells of one direction run at once against one
//! server (three windows per run instead of thirty-six). Bytes are counted where they have really
//! been forwarded: for download at the client, for upload at the origin sink, for both the sum.
//! The window opens when the cell's first tunnel is established.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, Route};
use crate::origin::{Endpoint, Kind};
use crate::procs::own_cpu_secs;
use crate::proxies::User;
use crate::table::{Samples, Unit, Verdict};
use std::thread;
use std::time::{Duration, Instant};

/// Bandwidths tested, with their labels.
const RATES: [(u64, &str); 3] = [
    (16 << 10, "16 KiB/s"),
    (1 << 20, "1 MiB/s"),
    (64 << 20, "64 MiB/s"),
];
/// Connection counts tested.
const CONNS: [usize; 4] = [1, 4, 16, 64];
/// Directions tested.
const DIRS: [(Dir, &str); 3] = [
    (Dir::Down, "download"),
    (Dir::Up, "upload"),
    (Dir::Both, "both"),
];
/// Every cell's achieved / bandwidth must fall within this range.
const RANGE: (f64, f64) = (0.98, 1.02);

fn user(dir: &str, rate: usize, conns: usize) -> String {
    format!("acc-{dir}-{rate}-{conns}")
}

/// The 36 users, one per cell.
pub fn users() -> Vec<User> {
    let mut v = Vec::new();
    for (_, d) in DIRS {
        for (r, (bw, _)) in RATES.iter().enumerate() {
            for c in CONNS {
                v.push((user(d, r, c), *bw));
            }
        }
    }
    v
}

/// Runs every direction `runs` times and adds one row per bandwidth × direction.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let window = ctx.cfg.accuracy;
    // samples[direction][rate][conns]
    let mut samples = vec![vec![vec![Samples::default(); CONNS.len()]; RATES.len()]; DIRS.len()];
    // CPU, % of one core, of the server and of this process while a direction runs: a limiter
    // that misses its figures because the machine is saturated shows here.
    let mut cpu = vec![(Samples::default(), Samples::default()); DIRS.len()];
    let server = ctx.server()?;
    for _ in 0..ctx.cfg.runs {
        for (d, (dir, label)) in DIRS.iter().enumerate() {
            let routes: Vec<Vec<Route>> = (0..RATES.len())
                .map(|r| {
                    CONNS
                        .iter()
                        .map(|&c| server.route(&user(label, r, c)))
                        .collect()
                })
                .collect();
            let (s0, b0, t0) = (server.proc.cpu_secs(), own_cpu_secs(), Instant::now());
            let got = run_direction(&routes, *dir, window)?;
            let took = t0.elapsed().as_secs_f64();
            let (s1, b1) = (server.proc.cpu_secs(), own_cpu_secs());
            if let (Some(s0), Some(s1), Some(b0), Some(b1)) = (s0, s1, b0, b1) {
                cpu[d].0.push((s1 - s0) / took * 100.0);
                cpu[d].1.push((b1 - b0) / took * 100.0);
            }
            for (r, row) in got.into_iter().enumerate() {
                for (c, x) in row.into_iter().enumerate() {
                    samples[d][r][c].push(x);
                }
            }
        }
    }
    for (d, (_, dlabel)) in DIRS.iter().enumerate() {
        for (r, (_, rlabel)) in RATES.iter().enumerate() {
            let cells = &samples[d][r];
            let ok = cells
                .iter()
                .all(|s| (RANGE.0..=RANGE.1).contains(&s.median()));
            let value: Vec<String> = cells.iter().map(|s| s.show(Unit::Ratio)).collect();
            ctx.table.push(
                &format!("5 · accuracy {rlabel}, {dlabel}"),
                "achieved / bw at 1 · 4 · 16 · 64 conns",
                value.join(" · "),
                format!(
                    "each {}–{} over {window:?} · CPU while the 12 cells ran: server {}, bench {}",
                    RANGE.0,
                    RANGE.1,
                    cpu[d].0.show(Unit::Percent),
                    cpu[d].1.show(Unit::Percent)
                ),
                Verdict::of(ok),
            );
        }
    }
    Ok(())
}

/// All twelve cells of one direction at once; returns achieved / bandwidth as [rate][conns].
fn run_direction(
    routes: &[Vec<Route>],
    dir: Dir,
    window: Duration,
) -> Result<Vec<Vec<f64>>, String> {
    thread::scope(|s| {
        let handles: Vec<Vec<_>> = routes
            .iter()
            .enumerate()
            .map(|(r, row)| {
                row.iter()
                    .zip(CONNS)
                    .map(|(route, conns)| {
                        let bw = RATES[r].0;
                        let only = std::env::var("ONLY").ok();
                        let skip = only.is_some_and(|o| o != format!("{r}-{conns}"));
                        s.spawn(move || {
                            if skip {
                                Ok(0.0)
                            } else {
                                cell(route, dir, bw, conns, window)
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        handles
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|h| h.join().map_err(|_| "a cell panicked".to_string())?)
                    .collect()
            })
            .collect()
    })
}

/// One user's cell: `conns` greedy tunnels in `dir`; returns achieved / bandwidth.
fn cell(route: &Route, dir: Dir, bw: u64, conns: usize, window: Duration) -> Result<f64, String> {
    let ep = Endpoint::start(match dir {
        Dir::Down => Kind::Source,
        Dir::Up => Kind::Sink,
        Dir::Both => Kind::Duplex,
    })?;
    let meter = Meter::new(false);
    let moved = || match dir {
        Dir::Down => meter.bytes(),
        Dir::Up => ep.meter.bytes(),
        Dir::Both => meter.bytes() + ep.meter.bytes(),
    };
    let mut load = Load::default();
    let mut start = None;
    for i in 0..conns {
        let s = route
            .open(ep.addr())
            .map_err(|e| format!("{bw} B/s × {conns}: tunnel {}: {e}", i + 1))?;
        start.get_or_insert_with(|| (Instant::now(), moved()));
        load.start(dir, s, &meter)?;
    }
    let (t0, b0) = start.ok_or("no connection")?;
    thread::sleep((t0 + window).saturating_duration_since(Instant::now()));
    let (b1, took) = (moved(), t0.elapsed());
    eprintln!(
        "DEBUG {dir:?} {conns} {bw} down {} up {} origin-write-blocked {} ms",
        meter.bytes(),
        ep.meter.bytes(),
        crate::origin::WBLOCK.swap(0, std::sync::atomic::Ordering::Relaxed) / 1000
    );
    load.stop();
    Ok(b1.saturating_sub(b0) as f64 / (bw as f64 * took.as_secs_f64()))
}
