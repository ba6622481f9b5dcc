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

/// Sluice's throughput must reach this fraction of the floor's (the bare relay, `SPLICE_BIN`),
/// and 3proxy's whole (issue 20).
const FLOOR_FACTOR: f64 = 0.95;
/// Sluice's CPU per GB may be at most this multiple of the floor's (1 MiB pipes) ...
const CPU_FLOOR_FACTOR: f64 = 1.1;
/// ... and at most this multiple of 3proxy's.
const CPU_3PROXY_FACTOR: f64 = 0.5;
/// Without a floor to compare with: server CPU-seconds per GB relayed, at most.
const MAX_CPU_PER_GB: f64 = 0.45;
/// `sluice local` + server must reach this fraction of the server alone.
const LOCAL_FACTOR: f64 = 0.8;
/// Sequential tunnels timed to their first byte, through `sluice local` and without it.
const FIRST_BYTE_TUNNELS: usize = 1000;
/// The most `sluice local` may add to a tunnel's first byte (median), in seconds.
const MAX_FIRST_BYTE_ADDED: f64 = 0.001;
/// Sluice's set-ups per second must reach this multiple of the best peer's that checks passwords.
const SETUP_PEER_FACTOR: f64 = 1.25;
/// Client threads opening tunnels in the set-up scenario: one (sequential) and eight.
const SETUP_THREADS: [usize; 2] = [1, 8];
/// Client threads of [`setup_rate`] (the TLS scenario's figure).
const TLS_SETUP_THREADS: usize = 8;

/// One contender: a name, how clients reach the origin through it, and its process (for CPU).
struct Contender<'a> {
    name: String,
    route: Route,
    proc: Option<&'a Proc>,
    is_sluice: bool,
    /// The bare relay: a measuring stick, never the best peer.
    is_floor: bool,
    /// The pooled floor, run in the set-up scenario only.
    setups_only: bool,
}

/// Direct, Sluice and the peers; the set-up scenario's own floor only when `setups`.
fn contenders(ctx: &Ctx, setups: bool) -> Result<Vec<Contender<'_>>, String> {
    let server = ctx.server()?;
    let mut v = vec![
        Contender {
            name: "direct".into(),
            route: Route::Direct,
            proc: None,
            is_sluice: false,
            is_floor: false,
            setups_only: false,
        },
        Contender {
            name: "sluice".into(),
            route: server.route(UNLIMITED),
            proc: Some(&server.proc),
            is_sluice: true,
            is_floor: false,
            setups_only: false,
        },
    ];
    v.extend(
        ctx.peers
            .iter()
            .filter(|p| setups || !p.setups_only)
            .map(|p| Contender {
                name: p.name.clone(),
                route: p.route.clone(),
                proc: Some(&p.proc),
                is_sluice: false,
                is_floor: p.floor,
                setups_only: p.setups_only,
            }),
    );
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
    let procs: Vec<&Proc> = proc.into_iter().collect();
    let (rate, cpu) = measure_procs(cfg, route, dir, conns, &procs)?;
    Ok((rate, cpu.first().copied().flatten()))
}

/// As [`measure`], with the CPU-seconds per GB of each of `procs` (in order) over one window.
fn measure_procs(
    cfg: &Config,
    route: &Route,
    dir: Dir,
    conns: usize,
    procs: &[&Proc],
) -> Result<(f64, Vec<Option<f64>>), String> {
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
    let cpu = || procs.iter().map(|p| p.cpu_secs()).collect::<Vec<_>>();
    thread::sleep(cfg.warmup);
    let (b0, c0, t0) = (moved(), cpu(), Instant::now());
    thread::sleep(cfg.tput);
    let (b1, c1, took) = (moved(), cpu(), t0.elapsed());
    load.stop();
    let bytes = b1.saturating_sub(b0) as f64;
    let cpu_per_gb = c0
        .into_iter()
        .zip(c1)
        .map(|(a, b)| a.zip(b).map(|(a, b)| (b - a) / (bytes / 1e9)))
        .collect();
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
    compare(ctx, Dir::Down, 8, "2 · unlimited, 8 conns, download", true)
}

/// The order contenders are measured in on run `run`: the direct path first (every ratio is to
/// it), then Sluice and the floor back to back, which goes first alternating from run to run, then
/// the rest. Sluice's targets are ratios to the floor: measured a few seconds apart with other
/// proxies between them, a change in the machine's load (two cores, other builds) lands on one of
/// the pair and not the other, and always measuring one of them first would favour it.
fn run_order(cs: &[Contender<'_>], run: usize) -> Vec<usize> {
    let sluice = cs.iter().position(|c| c.is_sluice);
    let floor = cs.iter().position(|c| c.is_floor);
    let mut pair: Vec<usize> = [sluice, floor].into_iter().flatten().collect();
    if run % 2 == 1 {
        pair.reverse();
    }
    let mut order = vec![0];
    order.extend(&pair);
    order.extend((1..cs.len()).filter(|i| !pair.contains(i)));
    order
}

/// Runs every contender `runs` times (interleaved) and adds a row for each.
fn compare(
    ctx: &mut Ctx,
    dir: Dir,
    conns: usize,
    scenario: &str,
    cpu_target: bool,
) -> Result<(), String> {
    let cs = contenders(ctx, false)?;
    let n = cs.len();
    let (mut rate, mut ratio, mut cpu) = (
        vec![Samples::default(); n],
        vec![Samples::default(); n],
        vec![Samples::default(); n],
    );
    for run in 0..ctx.cfg.tput_runs {
        let mut direct = f64::NAN;
        for i in run_order(&cs, run) {
            let c = &cs[i];
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
    let floor = cs.iter().position(|c| c.is_floor);
    let three = cs.iter().position(|c| c.name.starts_with("3proxy"));
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
            if let Some((peer, r)) = &best_peer {
                target += &format!(" · {:.2} × best peer ({peer})", rate[i].median() / r);
            }
            let (text, v) = rate_target(&rate, i, floor, three);
            target += &text;
            verdict = v;
        }
        ctx.table
            .push(scenario, &names[i], rate[i].show(unit), target, verdict);
        if cpu_target && Some(i) == sluice_idx {
            let (text, v) = cpu_target_of(&cpu, i, floor, three);
            ctx.table.push(
                scenario,
                "sluice server CPU",
                cpu[i].show(Unit::CpuPerGb),
                text,
                v,
            );
        }
    }
    Ok(())
}

/// Sluice's throughput (row `i`) against the floor's and 3proxy's medians: the text for the
/// row and the verdict (not run when either is missing).
fn rate_target(
    rate: &[Samples],
    i: usize,
    floor: Option<usize>,
    three: Option<usize>,
) -> (String, Verdict) {
    let me = rate[i].median();
    let mut text = String::new();
    let mut ok = true;
    match floor {
        Some(f) => {
            let x = me / rate[f].median();
            text += &format!(" · {x:.2} × floor, target ≥ {FLOOR_FACTOR}");
            ok &= x >= FLOOR_FACTOR;
        }
        None => return (" · floor missing (set SPLICE_BIN)".into(), Verdict::NotRun),
    }
    match three {
        Some(t) => {
            let x = me / rate[t].median();
            text += &format!(" · {x:.2} × 3proxy, target ≥ 1");
            ok &= x >= 1.0;
        }
        None => {
            return (
                text + " · 3proxy missing (set THREEPROXY_BIN)",
                Verdict::NotRun,
            );
        }
    }
    (text, Verdict::of(ok))
}

/// Sluice's CPU per GB (row `i`) against the floor's and 3proxy's; with neither, the fixed bound.
fn cpu_target_of(
    cpu: &[Samples],
    i: usize,
    floor: Option<usize>,
    three: Option<usize>,
) -> (String, Verdict) {
    let me = cpu[i].median();
    let of = |j: Option<usize>| j.filter(|&j| !cpu[j].0.is_empty()).map(|j| cpu[j].median());
    let (f, t) = (of(floor), of(three));
    if f.is_none() && t.is_none() {
        return (
            format!("target ≤ {MAX_CPU_PER_GB} CPU-s/GB (no floor, no 3proxy)"),
            Verdict::of(me <= MAX_CPU_PER_GB),
        );
    }
    let mut parts = Vec::new();
    let mut ok = true;
    if let Some(f) = f {
        parts.push(format!(
            "{:.2} × floor's {f:.2}, target ≤ {CPU_FLOOR_FACTOR}",
            me / f
        ));
        ok &= me <= CPU_FLOOR_FACTOR * f;
    }
    if let Some(t) = t {
        parts.push(format!(
            "{:.2} × 3proxy's {t:.2}, target ≤ {CPU_3PROXY_FACTOR}",
            me / t
        ));
        ok &= me <= CPU_3PROXY_FACTOR * t;
    }
    let missing = f.is_none() || t.is_none();
    let v = if missing {
        Verdict::NotRun
    } else {
        Verdict::of(ok)
    };
    (parts.join(" · "), v)
}

/// Scenario 3: one download connection through `sluice local` + server, against the server
/// alone; the CPU per GB of each process over the same window; and what `sluice local` adds to
/// a tunnel's first byte.
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
    let (mut cpu, mut server_cpu) = (Samples::default(), Samples::default());
    for _ in 0..ctx.cfg.tput_runs {
        let (a, _) = measure(&ctx.cfg, &alone_route, Dir::Down, 1, None)?;
        let server = &ctx.server()?.proc;
        let (v, c) = measure_procs(&ctx.cfg, &local_route, Dir::Down, 1, &[&local.proc, server])
            .map_err(|e| format!("via local: {e}"))?;
        alone.push(a);
        via.push(v);
        ratio.push(v / a);
        if let [Some(l), Some(s)] = c[..] {
            cpu.push(l);
            server_cpu.push(s);
        }
    }
    let first = first_byte(&alone_route, &local_route, ctx.echo.addr());
    drop(local);
    ctx.table.push(
        NAME,
        "local + server",
        via.show(Unit::GBps),
        format!(
            "{} × server alone ({}) · target ≥ {LOCAL_FACTOR}",
            ratio.show(Unit::Ratio),
            alone.show(Unit::GBps),
        ),
        Verdict::of(ratio.median() >= LOCAL_FACTOR),
    );
    ctx.table.push(
        NAME,
        "sluice local CPU",
        cpu.show(Unit::CpuPerGb),
        format!(
            "server over the same window {} · target ≤ the server's",
            server_cpu.show(Unit::CpuPerGb)
        ),
        Verdict::of(!cpu.0.is_empty() && cpu.median() <= server_cpu.median()),
    );
    match first {
        Ok(f) => ctx.table.push(
            "3 · via sluice local, first byte",
            "added by local",
            format!("{:.3} ms", f.added_median * 1e3),
            format!(
                "median over {FIRST_BYTE_TUNNELS} sequential tunnels each way: via local {:.3} ms, \
                 server alone {:.3} ms; p99 {:.3} / {:.3} ms (added {:.3} ms) · target ≤ {:.0} ms",
                f.via[0] * 1e3,
                f.alone[0] * 1e3,
                f.via[1] * 1e3,
                f.alone[1] * 1e3,
                (f.via[1] - f.alone[1]) * 1e3,
                MAX_FIRST_BYTE_ADDED * 1e3
            ),
            Verdict::of(f.added_median <= MAX_FIRST_BYTE_ADDED),
        ),
        Err(e) => ctx
            .table
            .not_run("3 · via sluice local, first byte", "added by local", &e),
    }
    Ok(())
}

/// Time to a tunnel's first byte (connect, handshake, one byte to the echo origin and back), in
/// seconds: median and p99 through `sluice local` and through the server alone, and the
/// difference of the medians.
struct FirstByte {
    via: [f64; 2],
    alone: [f64; 2],
    added_median: f64,
}

/// Opens `FIRST_BYTE_TUNNELS` tunnels one at a time each way, alternating, and times each to
/// its first echoed byte.
fn first_byte(alone: &Route, via: &Route, echo: SocketAddr) -> Result<FirstByte, String> {
    let (mut a, mut v) = (Vec::new(), Vec::new());
    for _ in 0..FIRST_BYTE_TUNNELS {
        for (route, out) in [(alone, &mut a), (via, &mut v)] {
            let t = Instant::now();
            let mut s = route.open(echo).map_err(|e| format!("open: {e}"))?;
            s.write_all(b"x").map_err(|e| format!("write: {e}"))?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
            out.push(t.elapsed().as_secs_f64());
        }
    }
    let q = |x: &mut Vec<f64>| {
        x.sort_by(f64::total_cmp);
        [x[x.len() / 2], x[(x.len() * 99 / 100).min(x.len() - 1)]]
    };
    let (via, alone) = (q(&mut v), q(&mut a));
    Ok(FirstByte {
        via,
        alone,
        added_median: via[0] - alone[0],
    })
}

/// Tunnels per second and failures: `TLS_SETUP_THREADS` clients open a tunnel to the echo
/// origin, echo one byte and close, until the time is up.
pub fn setup_rate(route: &Route, echo: SocketAddr, length: Duration) -> (f64, u64) {
    setup_rate_with(route, echo, length, TLS_SETUP_THREADS)
}

/// As [`setup_rate`], with `threads` clients.
fn setup_rate_with(
    route: &Route,
    echo: SocketAddr,
    length: Duration,
    threads: usize,
) -> (f64, u64) {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + length;
    thread::scope(|s| {
        for _ in 0..threads {
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

/// True for a contender that checks a password (dante runs without: shown, not counted).
fn checks_password(route: &Route) -> bool {
    matches!(
        route,
        Route::Socks5 { auth: Some(_), .. } | Route::Connect { .. }
    )
}

/// Scenario 4: authenticated SOCKS5 tunnels opened, one byte echoed, closed; sequential and with
/// eight client threads; the proxy's CPU per set-up beside each rate.
pub fn setup(ctx: &mut Ctx) -> Result<(), String> {
    for threads in SETUP_THREADS {
        setup_with(ctx, threads)?;
    }
    Ok(())
}

fn setup_with(ctx: &mut Ctx, threads: usize) -> Result<(), String> {
    let scenario = format!(
        "4 · set-up: open, echo 1 byte, close; {threads} client thread{} × {:?}",
        if threads == 1 { "" } else { "s" },
        ctx.cfg.setup
    );
    let echo = Endpoint::start(Kind::Echo)?;
    let cs = contenders(ctx, true)?;
    let n = cs.len();
    let (mut rate, mut cpu, mut failed) = (
        vec![Samples::default(); n],
        vec![Samples::default(); n],
        vec![0u64; n],
    );
    for _ in 0..ctx.cfg.runs {
        for (i, c) in cs.iter().enumerate() {
            let c0 = c.proc.and_then(Proc::cpu_secs);
            let t = Instant::now();
            let (r, f) = setup_rate_with(&c.route, echo.addr(), ctx.cfg.setup, threads);
            let c1 = c.proc.and_then(Proc::cpu_secs);
            rate[i].push(r);
            failed[i] += f;
            if let (Some(a), Some(b)) = (c0, c1) {
                let tunnels = r * t.elapsed().as_secs_f64();
                if tunnels > 0.0 {
                    cpu[i].push((b - a) / tunnels * 1e6);
                }
            }
        }
    }
    let best = cs
        .iter()
        .zip(&rate)
        .filter(|(c, _)| {
            c.proc.is_some() && !c.is_sluice && !c.is_floor && checks_password(&c.route)
        })
        .map(|(c, s)| (c.name.clone(), s.median()))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    // The card's shape with nothing else: how far the shape itself is from the target.
    let pooled = cs.iter().position(|c| c.setups_only && c.proc.is_some());
    let rows: Vec<(String, bool)> = cs.iter().map(|c| (c.name.clone(), c.is_sluice)).collect();
    drop(cs);
    for (i, (name, is_sluice)) in rows.into_iter().enumerate() {
        let mut target = if failed[i] > 0 {
            format!("{} failed · ", failed[i])
        } else {
            String::new()
        };
        if !cpu[i].0.is_empty() {
            target += &format!("{:.0} µs CPU per set-up · ", cpu[i].median());
        }
        let verdict = match (&best, is_sluice) {
            (Some((peer, r)), true) => {
                let f = rate[i].median() / r;
                if let Some(p) = pooled {
                    let floor = rate[p].median();
                    target += &format!(
                        "{:.2} × pooled floor (itself {:.2} × {peer}) · ",
                        rate[i].median() / floor,
                        floor / r
                    );
                }
                target += &format!(
                    "{f:.2} × best peer with passwords ({peer}); target ≥ {SETUP_PEER_FACTOR}"
                );
                Verdict::of(f >= SETUP_PEER_FACTOR)
            }
            (None, true) => {
                target += "no peer with passwords present";
                Verdict::NotRun
            }
            _ => Verdict::Info,
        };
        let target = target.trim_end_matches(" · ").to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_and_the_floor_are_measured_back_to_back_taking_turns_first() {
        let contender = |name: &str, is_sluice, is_floor| Contender {
            name: name.into(),
            route: Route::Direct,
            proc: None,
            is_sluice,
            is_floor,
            setups_only: false,
        };
        let cs = [
            contender("direct", false, false),
            contender("sluice", true, false),
            contender("peer", false, false),
            contender("floor", false, true),
        ];
        assert_eq!(run_order(&cs, 0), [0, 1, 3, 2]);
        assert_eq!(run_order(&cs, 1), [0, 3, 1, 2]);
        assert_eq!(run_order(&cs, 2), [0, 1, 3, 2]);
        // Without a floor, everyone once, the direct path first.
        assert_eq!(run_order(&cs[..3], 1), [0, 1, 2]);
    }
}
