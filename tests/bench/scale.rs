//! Scenarios 11 and 12, what many connections cost the server: CPU for 1,000 throttled
//! connections, and memory and threads for 1,000 and 9,000 idle tunnels.
//!
//! The idle tunnels are held without a thread each on both ends (the client keeps its sockets
//! in a Vec, the origin's `Hold` endpoint too): with 20,000 open files per process, this process
//! holds 18,000 sockets for 9,000 tunnels, and the server 18,000 more plus two threads per tunnel.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, Route, open_many};
use crate::origin::{Endpoint, Kind};
use crate::proxies::{Server, UNLIMITED, User};
use crate::table::{Samples, Unit, Verdict};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// The limiter-cost load: 10 users × 100 download connections at 1 MiB/s each.
const COST_USERS: usize = 10;
const COST_CONNS: usize = 100;
const COST_BW: u64 = 1 << 20;
/// Time for 1,000 connections to settle into their throttled pace before measuring.
const COST_SETTLE: Duration = Duration::from_secs(1);
/// Server CPU, percent of one core, below this.
const MAX_COST_PCT: f64 = 20.0;
/// Threads opening idle tunnels, each one tunnel at a time: a bounded pace.
const OPENERS: usize = 4;
/// Server RSS growth per idle tunnel, at most.
const MAX_KIB_PER_TUNNEL: f64 = 16.0;
/// How long the server's RSS and thread count may take to settle after the tunnels are open.
const SETTLE_LIMIT: Duration = Duration::from_secs(3);

fn cost_user(i: usize) -> String {
    format!("cost-{i}")
}

/// Users of the limiter-cost scenario.
pub fn users() -> Vec<User> {
    (0..COST_USERS).map(|i| (cost_user(i), COST_BW)).collect()
}

/// Scenario 11: server CPU while 1,000 throttled connections download, over consecutive windows
/// on the same connections (one "run" each).
pub fn cost(ctx: &mut Ctx) -> Result<(), String> {
    let window = ctx.cfg.cost;
    let (mut pct, mut held, mut threads) = (Samples::default(), Samples::default(), 0);
    {
        let server = ctx.server()?;
        let ep = Endpoint::start(Kind::Source)?;
        let meter = Meter::new(false);
        let mut load = Load::default();
        for u in 0..COST_USERS {
            for s in open_many(&server.route(&cost_user(u)), ep.addr(), COST_CONNS)? {
                load.start(Dir::Down, s, &meter)?;
            }
        }
        thread::sleep(COST_SETTLE);
        for _ in 0..ctx.cfg.runs {
            let cpu = || {
                server
                    .proc
                    .cpu_secs()
                    .ok_or("cannot read the server's CPU time")
            };
            let (c0, b0, t0) = (cpu()?, meter.bytes(), Instant::now());
            thread::sleep(window);
            let (c1, b1, took) = (cpu()?, meter.bytes(), t0.elapsed().as_secs_f64());
            pct.push((c1 - c0) / took * 100.0);
            let total = (COST_USERS as u64 * COST_BW) as f64;
            held.push(b1.saturating_sub(b0) as f64 / took / total);
        }
        threads = server.proc.rss_threads().map_or(threads, |(_, t)| t);
        load.stop();
    }
    ctx.table.push(
        "11 · limiter cost: 10 users × 100 conns at 1 MiB/s",
        "server CPU, % of one core",
        pct.show(Unit::Percent),
        format!(
            "{} × total bw delivered · {threads} server threads · {} consecutive {window:?} windows · target < {MAX_COST_PCT:.0} %",
            held.show(Unit::Ratio),
            ctx.cfg.runs
        ),
        Verdict::of(pct.median() < MAX_COST_PCT),
    );
    Ok(())
}

/// Scenario 12: a fresh server per run; RSS growth per tunnel and threads at each step.
pub fn idle_tunnels(ctx: &mut Ctx) -> Result<(), String> {
    let steps = ctx.cfg.scale;
    let db = ctx.dir.path("bench.db");
    let mut per = vec![Samples::default(); steps.len()];
    let mut threads = vec![Samples::default(); steps.len()];
    let mut maps = vec![Samples::default(); steps.len()];
    // Why a step was not reached, per step (the first run that fell short says it).
    let mut short: Vec<Option<String>> = vec![None; steps.len()];
    for run in 0..ctx.cfg.runs {
        let mut server = Server::start(&ctx.bin, &db, &ctx.dir, &format!("scale-{run}"))?;
        let route = server.route(UNLIMITED);
        // One login first, so argon2's working memory belongs to the baseline, not the tunnels.
        drop(route.open(ctx.echo.addr()));
        let ep = Endpoint::start(Kind::Hold)?;
        let (rss0, _) = settled(&mut server)?;
        let mut socks: Vec<TcpStream> = Vec::new();
        for (i, &n) in steps.iter().enumerate() {
            let opened = open_idle(&route, ep.addr(), n - socks.len().min(n), &mut socks);
            // A dying server resets tunnels before it is gone: its own account of why comes
            // first, the client's error only if it lives on.
            let (rss, thr) = match (settled(&mut server), opened) {
                (Err(dead), _) => {
                    short[i] = Some(format!("{} of {n} opened, then {dead}", socks.len()));
                    break;
                }
                (Ok(x), Err(e)) => {
                    short[i].get_or_insert(format!("{} of {n} opened: {e}", socks.len()));
                    x
                }
                (Ok(x), Ok(())) => x,
            };
            // A tunnel counts as held only if it reached the origin.
            if ep.held() < socks.len() {
                short[i].get_or_insert(format!(
                    "{} tunnels open at the client but {} at the origin",
                    socks.len(),
                    ep.held()
                ));
            }
            per[i].push(rss.saturating_sub(rss0) as f64 / socks.len().max(1) as f64);
            threads[i].push(thr as f64);
            if let Some(m) = server.proc.map_count() {
                maps[i].push(m as f64);
            }
        }
        // The origin closes first and the server passes the close on, so the TIME_WAIT of
        // 18,000 connections lands on listening ports, not on ephemeral ones (see `Kind::Echo`).
        drop(ep);
        let _ = settled(&mut server);
        drop(socks);
        drop(server);
    }
    for (i, n) in steps.iter().enumerate() {
        let held = match &short[i] {
            Some(e) => format!("NOT held: {e} · "),
            None if i + 1 == steps.len() => format!("{n} held · "),
            None => String::new(),
        };
        ctx.table.push(
            &format!("12 · scale: {n} idle tunnels"),
            "server RSS growth per tunnel",
            per[i].show(Unit::KiB),
            format!(
                "{held}{} server threads, {} memory maps (vm.max_map_count {}) · target ≤ {MAX_KIB_PER_TUNNEL:.0} KiB",
                threads[i].show(Unit::Count),
                maps[i].show(Unit::Count),
                max_map_count()
            ),
            Verdict::of(per[i].median() <= MAX_KIB_PER_TUNNEL && short[i].is_none()),
        );
    }
    Ok(())
}

/// Opens `n` idle tunnels with a few threads, appending them to `socks`.
///
/// # Errors
/// The first failure (the tunnels opened before it are kept).
pub fn open_idle(
    route: &Route,
    target: SocketAddr,
    n: usize,
    socks: &mut Vec<TcpStream>,
) -> Result<(), String> {
    let results: Vec<(Vec<TcpStream>, Option<String>)> = thread::scope(|s| {
        let hs: Vec<_> = (0..OPENERS)
            .map(|k| {
                let share = n / OPENERS + usize::from(k < n % OPENERS);
                s.spawn(move || {
                    let mut mine = Vec::with_capacity(share);
                    for _ in 0..share {
                        match route.open(target) {
                            Ok(t) => mine.push(t),
                            Err(e) => return (mine, Some(e.to_string())),
                        }
                    }
                    (mine, None)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Vec::new(), Some("opener panicked".into())))
            })
            .collect()
    });
    let mut first_err = None;
    for (mine, err) in results {
        socks.extend(mine);
        first_err = first_err.or(err);
    }
    first_err.map_or(Ok(()), Err)
}

/// The server's (RSS KiB, threads) once two readings 200 ms apart agree, or after the limit.
///
/// # Errors
/// The server died (the message says how, from its log) or its status cannot be read.
pub fn settled(server: &mut Server) -> Result<(u64, u64), String> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut last = None;
    loop {
        let Some(now) = server.proc.rss_threads() else {
            return Err(death_note(server));
        };
        if last == Some(now) || Instant::now() >= deadline {
            return Ok(now);
        }
        last = Some(now);
        thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel's per-process limit on memory mappings, as text.
fn max_map_count() -> String {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Why the server's status went away: a dying process loses its /proc status a moment before
/// it can be reaped, so give it a second to finish dying and tell how.
fn death_note(server: &mut Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Some(note) = server.proc.exit_note() {
            return note;
        }
        thread::sleep(Duration::from_millis(50));
    }
    "the server's /proc status cannot be read".into()
}
