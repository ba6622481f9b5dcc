//! Scenario 18, the fleet (issue 21): three `sluice server` processes leasing each user's one
//! bandwidth from one `redis-server`, with 1,000 throttled download connections of 100 users.
//!
//! Each user has 10 connections, 4 on one server and 3 on each of the others (the 4 rotate over
//! the servers, so each server carries a third of the demand). Figures: the fleet total against
//! the users' summed bandwidth over the window, each server's share, Redis' work (commands and
//! bytes a second, from `INFO`), the lease round trip (from the servers' `/metrics`), the three
//! servers' CPU beside one server without a fleet carrying the same 1,000 connections, and the
//! fleet total while Redis is down (killed mid-transfer).

use crate::Ctx;
use crate::client::{Dir, Load, Meter, open_many};
use crate::origin::{Endpoint, Kind};
use crate::procs::{Proc, free_addr};
use crate::proxies::{Server, User, make_db};
use crate::table::{Samples, Unit, Verdict};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const SCENARIO: &str = "18 · fleet";
const USERS: usize = 100;
const CONNS_PER_USER: [usize; 3] = [4, 3, 3];
const BW: u64 = 100 << 10;
const SETTLE: Duration = Duration::from_secs(2);
/// Targets (issue 21).
const TOTAL: (f64, f64) = (0.97, 1.03);
const MAX_SHARE_SPREAD: f64 = 0.10;
const MAX_OUTAGE: f64 = 1.05;

/// A user of its own for the burst: its first second on the fleet, 4 connections per server.
const BURST_USER: &str = "fleet-burst";
const BURST_BW: u64 = 1 << 20;

/// The first second of a fresh user's traffic over the fleet, against its bandwidth (the fleet
/// bucket starts empty; a server's first lease comes a period after its first demand).
fn burst(ctx: &mut Ctx, servers: &[Server], ep: &Endpoint) -> Result<(), String> {
    // Logged in first (argon2 runs once per server), then idle long enough to forget demand.
    for s in servers {
        drop(s.route(BURST_USER).open(ep.addr()));
    }
    thread::sleep(Duration::from_secs(1));
    let mut tunnels = Vec::new();
    for s in servers {
        tunnels.extend(open_many(&s.route(BURST_USER), ep.addr(), 4)?);
    }
    let meter = Meter::new(false);
    let mut load = Load::default();
    let t0 = Instant::now();
    for t in tunnels {
        load.start(Dir::Down, t, &meter)?;
    }
    thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    let first = meter.bytes() as f64 / BURST_BW as f64;
    load.stop();
    let mut b = Samples::default();
    b.push(first);
    ctx.table.push(
        SCENARIO,
        "burst: first second of a fresh user over 3 servers / bandwidth",
        b.show(Unit::Ratio),
        "1 MiB/s, 4 connections per server opened at once · bound 1 + 2 lease periods (1.15)"
            .into(),
        Verdict::of(first <= 1.15),
    );
    Ok(())
}

fn user(i: usize) -> String {
    format!("fleet-{i}")
}

/// Scenario 18. Its own database, Redis and servers (the shared server is left alone).
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let quick = ctx.cfg.runs == 1 && ctx.cfg.accuracy < Duration::from_secs(5);
    let window = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let short = window / 2;
    let mut few_conns_cmds = f64::NAN;
    let db = ctx.dir.path("fleet.db");
    let mut users: Vec<User> = (0..USERS).map(|i| (user(i), BW)).collect();
    users.push((BURST_USER.into(), BURST_BW));
    make_db(&db, &users)?;
    let mut redis = start_redis(ctx)?;
    let redis_addr = redis.1;
    let url = format!("redis://{redis_addr}");
    // The users go to Redis the way an operator moves them: `sluice migrate`.
    let out = std::process::Command::new(&ctx.bin)
        .args(["migrate", "--from"])
        .arg(&db)
        .args(["--to", &url])
        .output()
        .map_err(|e| format!("sluice migrate: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sluice migrate: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut servers = Vec::new();
    let mut metrics = Vec::new();
    for k in 0..3 {
        let m = free_addr()?;
        let extra = ["--metrics".to_string(), m.to_string()];
        servers.push(Server::start_with(
            &ctx.bin,
            std::path::Path::new(&url),
            &ctx.dir,
            &format!("fleet-{k}"),
            &extra,
        )?);
        metrics.push(m);
    }
    let ep = Endpoint::start(Kind::Source)?;
    burst(ctx, &servers, &ep)?;
    let meters: Vec<Arc<Meter>> = (0..3).map(|_| Meter::new(false)).collect();
    let mut load = Load::default();
    // First one connection per user and server (300), then the rest (1,000 in all): Redis'
    // work follows the active users, not their connections.
    for first in [true, false] {
        for u in 0..USERS {
            for (k, s) in servers.iter().enumerate() {
                let n = CONNS_PER_USER[(k + u) % 3];
                let n = if first { 1 } else { n - 1 };
                for t in open_many(&s.route(&user(u)), ep.addr(), n)? {
                    load.start(Dir::Down, t, &meters[k])?;
                }
            }
        }
        if first {
            thread::sleep(SETTLE);
            let (i0, t0) = (redis_info(redis_addr)?, Instant::now());
            thread::sleep(short);
            let i1 = redis_info(redis_addr)?;
            let took = t0.elapsed().as_secs_f64();
            few_conns_cmds = ((stat_of(&i1, "total_commands_processed") - script_calls(&i1))
                - (stat_of(&i0, "total_commands_processed") - script_calls(&i0)))
                / took;
        }
    }
    thread::sleep(SETTLE);
    let total_bw = (USERS as u64 * BW) as f64;
    // Equal demand, Redis up.
    let info0 = redis_info(redis_addr)?;
    let rtt0 = rtts(&metrics);
    let cpu = |ss: &[Server]| -> Result<f64, String> {
        ss.iter()
            .map(|s| {
                s.proc
                    .cpu_secs()
                    .ok_or_else(|| "cannot read a server's CPU time".to_string())
            })
            .sum::<Result<f64, String>>()
    };
    let (c0, b0, t0) = (
        cpu(&servers)?,
        meters.iter().map(|m| m.bytes()).collect::<Vec<_>>(),
        Instant::now(),
    );
    thread::sleep(window);
    let took = t0.elapsed().as_secs_f64();
    let (c1, b1) = (
        cpu(&servers)?,
        meters.iter().map(|m| m.bytes()).collect::<Vec<_>>(),
    );
    let info1 = redis_info(redis_addr)?;
    let rtt1 = rtts(&metrics);
    let per: Vec<f64> = b1
        .iter()
        .zip(&b0)
        .map(|(a, b)| a.saturating_sub(*b) as f64 / took)
        .collect();
    let total = per.iter().sum::<f64>() / total_bw;
    let (lo, hi) = (
        per.iter().copied().fold(f64::MAX, f64::min),
        per.iter().copied().fold(0.0, f64::max),
    );
    let spread = (hi - lo) / hi.max(1.0);
    let fleet_cpu = (c1 - c0) / took * 100.0;
    let stat = |i: &str, k: &str| stat_of(i, k);
    let cmds = (stat(&info1, "total_commands_processed")
        - stat(&info0, "total_commands_processed"))
        / took;
    let inner = (script_calls(&info1) - script_calls(&info0)) / took;
    let bytes = (stat(&info1, "total_net_input_bytes") + stat(&info1, "total_net_output_bytes")
        - stat(&info0, "total_net_input_bytes")
        - stat(&info0, "total_net_output_bytes"))
        / took;
    let redis_cpu = (stat(&info1, "used_cpu_sys") + stat(&info1, "used_cpu_user")
        - stat(&info0, "used_cpu_sys")
        - stat(&info0, "used_cpu_user"))
        / took
        * 100.0;
    let rtt_ms = match (rtt0, rtt1) {
        (Some((s0, n0)), Some((s1, n1))) if n1 > n0 => (s1 - s0) / (n1 - n0) * 1000.0,
        _ => f64::NAN,
    };
    let mut t = Samples::default();
    t.push(total);
    ctx.table.push(
        SCENARIO,
        "fleet total / bandwidth, 3 servers, equal demand",
        t.show(Unit::Ratio),
        format!(
            "100 users × 10 conns at 100 KiB/s over {window:?} · per-server shares {:.3}/{:.3}/{:.3} (spread {:.1}%, target ≤ 10%) · target {:.2}–{:.2}",
            per[0] / total_bw,
            per[1] / total_bw,
            per[2] / total_bw,
            spread * 100.0,
            TOTAL.0,
            TOTAL.1
        ),
        Verdict::of((TOTAL.0..=TOTAL.1).contains(&total) && spread <= MAX_SHARE_SPREAD),
    );
    // Commands run inside a script count in total_commands_processed too.
    let sent = cmds - inner;
    let mut c = Samples::default();
    c.push(sent);
    ctx.table.push(
        SCENARIO,
        "Redis commands/s sent (100 active users, 3 servers)",
        c.show(Unit::Count),
        format!(
            "{:.1} per active user per server (EVALSHA, heartbeats); with 300 connections instead of 1,000: {few_conns_cmds:.0}/s; {inner:.0}/s more inside the script; {bytes:.0} B/s in+out ({:.0} B/s per active user per server); Redis CPU {redis_cpu:.1}% of a core; lease round trip {rtt_ms:.2} ms (mean, 100 users in one pipeline)",
            sent / USERS as f64 / 3.0,
            bytes / USERS as f64 / 3.0
        ),
        Verdict::Info,
    );
    // Redis down: each server falls back to bandwidth / 3.
    let b0: u64 = meters.iter().map(|m| m.bytes()).sum();
    redis.0 = None;
    thread::sleep(Duration::from_millis(500));
    let b_mid: u64 = meters.iter().map(|m| m.bytes()).sum();
    let t0 = Instant::now();
    thread::sleep(short);
    let took_down = t0.elapsed().as_secs_f64();
    let b1: u64 = meters.iter().map(|m| m.bytes()).sum();
    let _ = b0;
    let outage = b1.saturating_sub(b_mid) as f64 / took_down / total_bw;
    let mut o = Samples::default();
    o.push(outage);
    ctx.table.push(
        SCENARIO,
        "fleet total / bandwidth, Redis killed",
        o.show(Unit::Ratio),
        format!("each server at bandwidth ÷ 3 (servers alive, last known) · over {short:?} · target ≤ {MAX_OUTAGE:.2}"),
        Verdict::of(outage <= MAX_OUTAGE),
    );
    load.stop();
    drop(servers);
    // The same 1,000 connections through one server without a fleet.
    let single = Server::start(&ctx.bin, &db, &ctx.dir, "fleet-single")?;
    let meter = Meter::new(false);
    let mut load = Load::default();
    for u in 0..USERS {
        for t in open_many(&single.route(&user(u)), ep.addr(), 10)? {
            load.start(Dir::Down, t, &meter)?;
        }
    }
    thread::sleep(SETTLE);
    let c0 = single
        .proc
        .cpu_secs()
        .ok_or("cannot read the server's CPU")?;
    let t0 = Instant::now();
    thread::sleep(short);
    let c1 = single
        .proc
        .cpu_secs()
        .ok_or("cannot read the server's CPU")?;
    let single_cpu = (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0;
    load.stop();
    let mut f = Samples::default();
    f.push(fleet_cpu);
    ctx.table.push(
        SCENARIO,
        "CPU of the 3 fleet servers together, % of one core",
        f.show(Unit::Percent),
        format!("one server without a fleet, same 1,000 connections: {single_cpu:.1}%"),
        Verdict::Info,
    );
    Ok(())
}

/// A `redis-server` on a free loopback port in the scratch directory, and its address. The
/// process is in the first field: setting it to `None` kills it.
fn start_redis(ctx: &Ctx) -> Result<(Option<Proc>, SocketAddr), String> {
    let addr = free_addr()?;
    let dir = ctx.dir.path("redis");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args([
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "no",
        ]);
    let mut p = Proc::spawn(cmd, "redis-server", &ctx.dir.path("redis.log"))
        .map_err(|e| format!("{e} (install it with `apt-get install redis-server`)"))?;
    p.wait_listening(addr, Duration::from_secs(10))?;
    Ok((Some(p), addr))
}

/// `INFO all` as text.
fn redis_info(addr: SocketAddr) -> Result<String, String> {
    let err = |e: std::io::Error| format!("redis INFO: {e}");
    let mut s = TcpStream::connect(addr).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        .map_err(err)?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).map_err(err)?;
    let n: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("redis INFO: unexpected reply {head:?}"))?;
    let mut body = vec![0; n];
    r.read_exact(&mut body).map_err(err)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A numeric `key:value` line of `INFO` (0 when absent).
fn stat_of(info: &str, key: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Calls of the commands the lease script runs inside Redis (HGET & co.), from commandstats.
fn script_calls(info: &str) -> f64 {
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_evalsha"))
        .filter(|l| !l.starts_with("cmdstat_info") && !l.starts_with("cmdstat_z"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// Each server's (round-trip seconds total, rounds) from `/metrics`, summed.
fn rtts(metrics: &[SocketAddr]) -> Option<(f64, f64)> {
    let mut sum = (0.0, 0.0);
    for m in metrics {
        let text = scrape(*m)?;
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        sum.0 += get("sluice_fleet_lease_round_trip_seconds_total")?;
        sum.1 += get("sluice_fleet_lease_rounds_total")?;
    }
    Some(sum)
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
