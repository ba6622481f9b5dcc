//! Scenarios 1–4: how fast an unlimited user's bytes go through — one connection each way, eight
//! connections, through `sluice local` — and how fast tunnels are set up, each beside the direct
//! path and the reference proxies measured in the same run, interleaved run by run so that the
//! machine's drift hits every contender alike.

use crate::client::{Dir, Load, Meter, Route, open_many};
use crate::origin::{Endpoint, Kind};
use crate::procs::Proc;
use crate::proxies::{Local, UNLIMITED};
use crate::table::{Samples, Unit, Verdict};
use crate::{Config, Ctx};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Sluice must move at least this multiple of the best peer's throughput.
const PEER_FACTOR: f64 = 1.25;
/// Server CPU-seconds per GB relayed, at most (one connection).
const MAX_CPU_PER_GB: f64 = 0.45;
/// `sluice local` + server must reach this fraction of the server alone.
const LOCAL_FACTOR: f64 = 0.8;
/// Tunnels per second to reach in the set-up scenario.
const MIN_SETUP_RATE: f64 = 4000.0;
/// Client threads opening tunnels in the set-up scenario.
const SETUP_THREADS: usize = 8;

/// One contender: a name, how clients reach the origin through it, and its process (for CPU).
struct Contender<'a> {
    name: String,
    route: Route,
    proc: Option<&'a Proc>,
    is_sluice: bool,
    /// The bare relay: a measuring stick, never the best peer.
    is_floor: bool,
}

fn contenders(ctx: &Ctx) -> Result<Vec<Contender<'_>>, String> {
    let server = ctx.server()?;
    let mut v = vec![
        Contender {
            name: "direct".into(),
            route: Route::Direct,
            proc: None,
            is_sluice: false,
            is_floor: false,
        },
        Contender {
            name: "sluice".into(),
            route: server.route(UNLIMITED),
            proc: Some(&server.proc),
            is_sluice: true,
            is_floor: false,
        },
    ];
    v.extend(ctx.peers.iter().map(|p| Contender {
        name: p.name.clone(),
        route: p.route.clone(),
        proc: Some(&p.proc),
        is_sluice: false,
        is_floor: p.floor,
    }));
    Ok(v)
}

/// Bytes per second over the window, and the proxy's CPU-seconds per GB if it has a process.
pub fn measure(
    cfg: &Config,
    route: &Route,
    dir: Dir,
    conns: usize,
    proc: Option<&Proc>,
) -> Result<(f64, Option<f64>), String> {
    let ep = Endpoint::start(if dir == Dir::Down {
        Kind::Source
    } else {
        Kind::Sink
    })?;
    let meter = Meter::new(false);
    let mut load = Load::default();
    for s in open_many(route, ep.addr(), conns)? {
        load.start(dir, s, &meter)?;
    }
    // Upload bytes count where they arrive, at the origin: the client's socket buffers would
    // otherwise flatter the figure.
    let moved = || match dir {
        Dir::Down => meter.bytes(),
        _ => ep.meter.bytes(),
    };
    let cpu = || proc.and_then(Proc::cpu_secs);
    thread::sleep(cfg.warmup);
    let (b0, c0, t0) = (moved(), cpu(), Instant::now());
    thread::sleep(cfg.tput);
    let (b1, c1, took) = (moved(), cpu(), t0.elapsed());
    load.stop();
    let bytes = b1.saturating_sub(b0) as f64;
    let cpu_per_gb = c0.zip(c1).map(|(a, b)| (b - a) / (bytes / 1e9));
    Ok((bytes / took.as_secs_f64(), cpu_per_gb))
}

/// Scenario 1: one connection, download then upload.
pub fn single(ctx: &mut Ctx) -> Result<(), String> {
    for (dir, label) in [(Dir::Down, "download"), (Dir::Up, "upload")] {
        compare(
            ctx,
            dir,
            1,
            &format!("1 · unlimited, 1 conn, {label}"),
            true,
        )?;
    }
    Ok(())
}

/// Scenario 2: eight connections of one user, download, aggregate.
pub fn eight(ctx: &mut Ctx) -> Result<(), String> {
    compare(ctx, Dir::Down, 8, "2 · unlimited, 8 conns, download", false)
}

/// Runs every contender `runs` times (interleaved) and adds a row for each.
fn compare(
    ctx: &mut Ctx,
    dir: Dir,
    conns: usize,
    scenario: &str,
    cpu_target: bool,
) -> Result<(), String> {
    let cs = contenders(ctx)?;
    let n = cs.len();
    let (mut rate, mut ratio, mut cpu) = (
        vec![Samples::default(); n],
        vec![Samples::default(); n],
        vec![Samples::default(); n],
    );
    for _ in 0..ctx.cfg.runs {
        let mut direct = f64::NAN;
        for (i, c) in cs.iter().enumerate() {
            let (r, cpg) = measure(&ctx.cfg, &c.route, dir, conns, c.proc)
                .map_err(|e| format!("{}: {e}", c.name))?;
            if i == 0 {
                direct = r;
            }
            rate[i].push(r);
            ratio[i].push(r / direct);
            if let Some(x) = cpg {
                cpu[i].push(x);
            }
        }
    }
    // The best peer: the highest median among the reference proxies.
    let best_peer = cs
        .iter()
        .zip(&rate)
        .filter(|(c, _)| c.proc.is_some() && !c.is_sluice && !c.is_floor)
        .map(|(c, s)| (c.name.clone(), s.median()))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let unit = if rate[0].median() >= 1e9 {
        Unit::GBps
    } else {
        Unit::MBps
    };
    let names: Vec<String> = cs.iter().map(|c| c.name.clone()).collect();
    let sluice_idx = cs.iter().position(|c| c.is_sluice);
    drop(cs);
    for i in 0..n {
        let mut target = format!("{} × direct", ratio[i].show(Unit::Ratio));
        if !cpu[i].0.is_empty() {
            target += &format!(" · {}", cpu[i].show(Unit::CpuPerGb));
        }
        let mut verdict = Verdict::Info;
        if Some(i) == sluice_idx {
            match &best_peer {
                Some((peer, r)) => {
                    let f = rate[i].median() / r;
                    target += &format!(
                        " · {f:.2} × best peer ({peer}); target ≥ {PEER_FACTOR} × best peer"
                    );
                    verdict = Verdict::of(f >= PEER_FACTOR);
                }
                None => {
                    target += &format!(" · target ≥ {PEER_FACTOR} × best peer: no peer present");
                    verdict = Verdict::NotRun;
                }
            }
        }
        ctx.table
            .push(scenario, &names[i], rate[i].show(unit), target, verdict);
        if cpu_target && Some(i) == sluice_idx {
            let ok = cpu[i].median() <= MAX_CPU_PER_GB;
            ctx.table.push(
                scenario,
                "sluice server CPU",
                cpu[i].show(Unit::CpuPerGb),
                format!("target ≤ {MAX_CPU_PER_GB} CPU-s/GB"),
                Verdict::of(ok),
            );
        }
    }
    Ok(())
}

/// Scenario 3: one download connection through `sluice local` + server, against the server alone.
pub fn local(ctx: &mut Ctx) -> Result<(), String> {
    const NAME: &str = "3 · via sluice local, 1 conn, download";
    let (server_addr, alone_route) = {
        let s = ctx.server()?;
        (s.addr, s.route(UNLIMITED))
    };
    let local = match Local::start(&ctx.bin, server_addr, UNLIMITED, &ctx.dir) {
        Ok(l) => l,
        Err(e) => {
            ctx.table.note(format!("`sluice local` did not start: {e}"));
            ctx.table
                .not_run(NAME, "local + server", "local failed to start");
            return Ok(());
        }
    };
    let local_route = local.route();
    let (mut alone, mut via, mut ratio) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut cpu = Samples::default();
    for _ in 0..ctx.cfg.runs {
        let (a, _) = measure(&ctx.cfg, &alone_route, Dir::Down, 1, None)?;
        let (v, c) = measure(&ctx.cfg, &local_route, Dir::Down, 1, Some(&local.proc))
            .map_err(|e| format!("via local: {e}"))?;
        alone.push(a);
        via.push(v);
        ratio.push(v / a);
        if let Some(c) = c {
            cpu.push(c);
        }
    }
    drop(local);
    ctx.table.push(
        NAME,
        "local + server",
        via.show(Unit::GBps),
        format!(
            "{} × server alone ({}) · local {} · target ≥ {LOCAL_FACTOR}",
            ratio.show(Unit::Ratio),
            alone.show(Unit::GBps),
            cpu.show(Unit::CpuPerGb)
        ),
        Verdict::of(ratio.median() >= LOCAL_FACTOR),
    );
    Ok(())
}

/// Tunnels per second and failures: `SETUP_THREADS` clients open a tunnel to the echo origin,
/// echo one byte and close, until the time is up.
pub fn setup_rate(route: &Route, echo: SocketAddr, length: Duration) -> (f64, u64) {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + length;
    thread::scope(|s| {
        for _ in 0..SETUP_THREADS {
            s.spawn(|| {
                while Instant::now() < deadline {
                    if echo_once(route, echo).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        // A refusing proxy must not turn this loop into a spin.
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            });
        }
    });
    let n = done.load(Ordering::Relaxed) as f64;
    (
        n / start.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

/// One tunnel: open, send a byte, read it back, then wait for the origin's close to come through
/// (so the client is not the first to close: see `Kind::Echo`).
fn echo_once(route: &Route, echo: SocketAddr) -> std::io::Result<()> {
    let mut s = route.open(echo)?;
    s.write_all(b"x")?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf[..1])?;
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

/// Scenario 4: authenticated SOCKS5 tunnels opened, one byte echoed, closed.
pub fn setup(ctx: &mut Ctx) -> Result<(), String> {
    let scenario = format!(
        "4 · set-up: open, echo 1 byte, close; {SETUP_THREADS} threads × {:?}",
        ctx.cfg.setup
    );
    let echo = Endpoint::start(Kind::Echo)?;
    let cs = contenders(ctx)?;
    let n = cs.len();
    let (mut rate, mut failed) = (vec![Samples::default(); n], vec![0u64; n]);
    for _ in 0..ctx.cfg.runs {
        for (i, c) in cs.iter().enumerate() {
            let (r, f) = setup_rate(&c.route, echo.addr(), ctx.cfg.setup);
            rate[i].push(r);
            failed[i] += f;
        }
    }
    let rows: Vec<(String, bool)> = cs.iter().map(|c| (c.name.clone(), c.is_sluice)).collect();
    drop(cs);
    for (i, (name, is_sluice)) in rows.into_iter().enumerate() {
        let mut target = if failed[i] > 0 {
            format!("{} failed · ", failed[i])
        } else {
            String::new()
        };
        let verdict = if is_sluice {
            target += &format!("target ≥ {MIN_SETUP_RATE:.0}/s");
            Verdict::of(rate[i].median() >= MIN_SETUP_RATE)
        } else {
            Verdict::Info
        };
        ctx.table.push(
            &scenario,
            &name,
            rate[i].show(Unit::PerSec),
            target,
            verdict,
        );
    }
    Ok(())
}
