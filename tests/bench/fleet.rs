//! Scenario 18, the fleet (issue 21): three `sluice server` processes leasing each user's one
//! bandwidth from one `redis-server`, with 1,000 throttled download connections of 100 users.
//!
//! Each user has 10 connections, 4 on one server and 3 on each of the others (the 4 rotate over
//! the servers, so each server carries a third of the demand). Figures: the fleet total against
//! the users' summed bandwidth over the window, each server's share, Redis' work (commands and
//! bytes a second, from `INFO`), the lease round trip (from the servers' `/metrics`), the three
//! servers' CPU beside one server without a fleet carrying the same 1,000 connections, and the
//! fleet total while Redis is down (killed mid-transfer). Then the same equal-demand window on
//! three fresh servers over a three-master Redis Cluster on loopback (`redis-server
//! --cluster-enabled yes`, `redis-cli --cluster create`), Redis' work summed over the masters.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, open_many};
use crate::origin::{Endpoint, Kind};
use crate::procs::{Proc, free_addr};
use crate::proxies::{Server, User, make_db};
use crate::table::{Samples, Unit, Verdict};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
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
    let mut redis = start_redis(ctx, "redis", &[])?;
    let redis_addr = redis.1;
    let url = format!("redis://{redis_addr}");
    migrate(ctx, &db, &url)?;
    let (servers, metrics) = start_fleet(ctx, &url, "fleet")?;
    let ep = Endpoint::start(Kind::Source)?;
    burst(ctx, &servers, &ep)?;
    let meters: Vec<Arc<Meter>> = (0..3).map(|_| Meter::new(false)).collect();
    let mut load = Load::default();
    // First one connection per user and server (300), then the rest (1,000 in all): Redis'
    // work follows the active users, not their connections.
    for first in [true, false] {
        open_load(&servers, &ep, &meters, &mut load, first)?;
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
    let w = measure(&servers, &meters, &metrics, &[redis_addr], window)?;
    let total = w.total(total_bw);
    let spread = w.spread();
    let mut t = Samples::default();
    t.push(total);
    ctx.table.push(
        SCENARIO,
        "fleet total / bandwidth, 3 servers, equal demand",
        t.show(Unit::Ratio),
        format!(
            "100 users × 10 conns at 100 KiB/s over {window:?} · {} · target {:.2}–{:.2}",
            w.shares(total_bw),
            TOTAL.0,
            TOTAL.1
        ),
        Verdict::of((TOTAL.0..=TOTAL.1).contains(&total) && spread <= MAX_SHARE_SPREAD),
    );
    // Commands run inside a script count in total_commands_processed too.
    let sent = w.cmds - w.inner;
    let mut c = Samples::default();
    c.push(sent);
    ctx.table.push(
        SCENARIO,
        "Redis commands/s sent (100 active users, 3 servers)",
        c.show(Unit::Count),
        format!(
            "{:.1} per active user per server (EVALSHA, heartbeats); with 300 connections instead of 1,000: {few_conns_cmds:.0}/s; {:.0}/s more inside the script; {:.0} B/s in+out ({:.0} B/s per active user per server); Redis CPU {:.1}% of a core; lease round trip {:.2} ms (mean, 100 users in one pipeline)",
            sent / USERS as f64 / 3.0,
            w.inner,
            w.bytes,
            w.bytes / USERS as f64 / 3.0,
            w.redis_cpu,
            w.rtt_ms
        ),
        Verdict::Info,
    );
    // Redis down: each server falls back to bandwidth / 3.
    redis.0 = None;
    thread::sleep(Duration::from_millis(500));
    let b_mid: u64 = meters.iter().map(|m| m.bytes()).sum();
    let t0 = Instant::now();
    thread::sleep(short);
    let took_down = t0.elapsed().as_secs_f64();
    let b1: u64 = meters.iter().map(|m| m.bytes()).sum();
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
    on_a_cluster(ctx, &db, &ep, window)?;
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
    f.push(w.fleet_cpu);
    ctx.table.push(
        SCENARIO,
        "CPU of the 3 fleet servers together, % of one core",
        f.show(Unit::Percent),
        format!("one server without a fleet, same 1,000 connections: {single_cpu:.1}%"),
        Verdict::Info,
    );
    Ok(())
}

/// The same measurement against a three-master Redis Cluster on loopback: the users moved
/// there by `sluice migrate`, three fresh servers on `redis+cluster://…`, the same 1,000
/// connections, one window of equal demand; Redis' work summed over the masters.
fn on_a_cluster(ctx: &mut Ctx, db: &Path, ep: &Endpoint, window: Duration) -> Result<(), String> {
    let nodes = start_cluster(ctx)?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.1).collect();
    let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    let url = format!("redis+cluster://{}", list.join(","));
    migrate(ctx, db, &url)?;
    let (servers, metrics) = start_fleet(ctx, &url, "fleet-cluster")?;
    let meters: Vec<Arc<Meter>> = (0..3).map(|_| Meter::new(false)).collect();
    let mut load = Load::default();
    for first in [true, false] {
        open_load(&servers, ep, &meters, &mut load, first)?;
    }
    thread::sleep(SETTLE);
    let w = measure(&servers, &meters, &metrics, &addrs, window)?;
    load.stop();
    let total_bw = (USERS as u64 * BW) as f64;
    let total = w.total(total_bw);
    let mut t = Samples::default();
    t.push(total);
    ctx.table.push(
        SCENARIO,
        "fleet total / bandwidth, 3 servers on a 3-master Redis Cluster",
        t.show(Unit::Ratio),
        format!(
            "the same 1,000 connections over {window:?} · {} · target {:.2}–{:.2}",
            w.shares(total_bw),
            TOTAL.0,
            TOTAL.1
        ),
        Verdict::of((TOTAL.0..=TOTAL.1).contains(&total) && w.spread() <= MAX_SHARE_SPREAD),
    );
    let sent = w.cmds - w.inner;
    let per_node: Vec<String> = w.per_node.iter().map(|c| format!("{c:.0}")).collect();
    let mut c = Samples::default();
    c.push(sent);
    ctx.table.push(
        SCENARIO,
        "Redis Cluster commands/s sent, summed over the 3 masters",
        c.show(Unit::Count),
        format!(
            "{:.1} per active user per server (FCALL of the store's function library); per master {} (all commands); {:.0}/s more inside the scripts; {:.0} B/s in+out; Redis CPU {:.1}% of a core summed; lease round trip {:.2} ms (mean, one pipeline per master)",
            sent / USERS as f64 / 3.0,
            per_node.join("/"),
            w.inner,
            w.bytes,
            w.redis_cpu,
            w.rtt_ms
        ),
        Verdict::Info,
    );
    Ok(())
}

/// Copies the users of `db` to `url` the way an operator does: `sluice migrate`.
fn migrate(ctx: &Ctx, db: &Path, url: &str) -> Result<(), String> {
    let out = Command::new(&ctx.bin)
        .args(["migrate", "--from"])
        .arg(db)
        .args(["--to", url])
        .output()
        .map_err(|e| format!("sluice migrate: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sluice migrate: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Three `sluice server --db URL` processes, each with its `/metrics` address.
fn start_fleet(ctx: &Ctx, url: &str, tag: &str) -> Result<(Vec<Server>, Vec<SocketAddr>), String> {
    let mut servers = Vec::new();
    let mut metrics = Vec::new();
    for k in 0..3 {
        let m = free_addr()?;
        let extra = ["--metrics".to_string(), m.to_string()];
        servers.push(Server::start_with(
            &ctx.bin,
            Path::new(url),
            &ctx.dir,
            &format!("{tag}-{k}"),
            &extra,
        )?);
        metrics.push(m);
    }
    Ok((servers, metrics))
}

/// Opens every user's download connections over `servers` ([`CONNS_PER_USER`], rotating):
/// with `first`, one per user and server; else the rest.
fn open_load(
    servers: &[Server],
    ep: &Endpoint,
    meters: &[Arc<Meter>],
    load: &mut Load,
    first: bool,
) -> Result<(), String> {
    for u in 0..USERS {
        for (k, s) in servers.iter().enumerate() {
            let n = CONNS_PER_USER[(k + u) % 3];
            let n = if first { 1 } else { n - 1 };
            for t in open_many(&s.route(&user(u)), ep.addr(), n)? {
                load.start(Dir::Down, t, &meters[k])?;
            }
        }
    }
    Ok(())
}

/// What one window of equal demand measured.
struct Window {
    /// Each server's bytes per second.
    per: Vec<f64>,
    /// Commands per second, all Redis nodes together (those run inside scripts included).
    cmds: f64,
    /// Of those, the ones run inside scripts.
    inner: f64,
    /// Commands per second of each node.
    per_node: Vec<f64>,
    /// Bytes per second in and out of Redis.
    bytes: f64,
    /// Redis' CPU, % of one core, nodes summed.
    redis_cpu: f64,
    /// Mean lease round trip, milliseconds (NaN when no round was made).
    rtt_ms: f64,
    /// The servers' CPU together, % of one core.
    fleet_cpu: f64,
}

impl Window {
    /// The fleet total against `total_bw`.
    fn total(&self, total_bw: f64) -> f64 {
        self.per.iter().sum::<f64>() / total_bw
    }

    /// (largest share − smallest) / largest.
    fn spread(&self) -> f64 {
        let lo = self.per.iter().copied().fold(f64::MAX, f64::min);
        let hi = self.per.iter().copied().fold(0.0, f64::max);
        (hi - lo) / hi.max(1.0)
    }

    /// The per-server shares and their spread, for a note.
    fn shares(&self, total_bw: f64) -> String {
        let s: Vec<String> = self
            .per
            .iter()
            .map(|p| format!("{:.3}", p / total_bw))
            .collect();
        format!(
            "per-server shares {} (spread {:.1}%, target ≤ {:.0}%)",
            s.join("/"),
            self.spread() * 100.0,
            MAX_SHARE_SPREAD * 100.0
        )
    }
}

/// Measures `servers` (and the Redis nodes `redis`) over `window`.
fn measure(
    servers: &[Server],
    meters: &[Arc<Meter>],
    metrics: &[SocketAddr],
    redis: &[SocketAddr],
    window: Duration,
) -> Result<Window, String> {
    let cpu = || -> Result<f64, String> {
        servers
            .iter()
            .map(|s| {
                s.proc
                    .cpu_secs()
                    .ok_or_else(|| "cannot read a server's CPU time".to_string())
            })
            .sum::<Result<f64, String>>()
    };
    let infos = || {
        redis
            .iter()
            .map(|a| redis_info(*a))
            .collect::<Result<Vec<_>, _>>()
    };
    let bytes = || meters.iter().map(|m| m.bytes()).collect::<Vec<_>>();
    let (i0, rtt0, c0, b0, t0) = (infos()?, rtts(metrics), cpu()?, bytes(), Instant::now());
    thread::sleep(window);
    let took = t0.elapsed().as_secs_f64();
    let (c1, b1, i1, rtt1) = (cpu()?, bytes(), infos()?, rtts(metrics));
    let per = b1
        .iter()
        .zip(&b0)
        .map(|(a, b)| a.saturating_sub(*b) as f64 / took)
        .collect();
    let rate = |f: &dyn Fn(&str) -> f64| -> Vec<f64> {
        i0.iter()
            .zip(&i1)
            .map(|(a, b)| (f(b) - f(a)) / took)
            .collect()
    };
    let per_node = rate(&|i| stat_of(i, "total_commands_processed"));
    let sum = |v: Vec<f64>| v.iter().sum::<f64>();
    Ok(Window {
        per,
        cmds: per_node.iter().sum(),
        inner: sum(rate(&script_calls)),
        per_node,
        bytes: sum(rate(&|i| {
            stat_of(i, "total_net_input_bytes") + stat_of(i, "total_net_output_bytes")
        })),
        redis_cpu: sum(rate(&|i| {
            stat_of(i, "used_cpu_sys") + stat_of(i, "used_cpu_user")
        })) * 100.0,
        rtt_ms: match (rtt0, rtt1) {
            (Some((s0, n0)), Some((s1, n1))) if n1 > n0 => (s1 - s0) / (n1 - n0) * 1000.0,
            _ => f64::NAN,
        },
        fleet_cpu: (c1 - c0) / took * 100.0,
    })
}

/// Three masters on loopback, each started by [`start_redis`] in cluster mode, made one
/// cluster by `redis-cli --cluster create` (as the fleet tests' `cluster()` does); ready when
/// every node says `cluster_state:ok`. Each node is killed when its entry is dropped.
fn start_cluster(ctx: &Ctx) -> Result<Vec<(Option<Proc>, SocketAddr)>, String> {
    let mode = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
    ];
    let nodes = (0..3)
        .map(|k| start_redis(ctx, &format!("redis-node-{k}"), &mode))
        .collect::<Result<Vec<_>, _>>()?;
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(nodes.iter().map(|n| n.1.to_string()))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli: {e} (install it with `apt-get install redis-tools`)"))?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        while !redis_query(n.1, &["CLUSTER", "INFO"])?.contains("cluster_state:ok") {
            if Instant::now() > deadline {
                return Err(format!("the Redis Cluster never came up ({} not ok)", n.1));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(nodes)
}

/// A `redis-server` on a free loopback port in the scratch directory `tag` (its log `TAG.log`),
/// with `extra` arguments, and its address. The process is in the first field: setting it to
/// `None` kills it.
fn start_redis(ctx: &Ctx, tag: &str, extra: &[&str]) -> Result<(Option<Proc>, SocketAddr), String> {
    let addr = if extra.contains(&"--cluster-enabled") {
        cluster_addr()?
    } else {
        free_addr()?
    };
    let dir = ctx.dir.path(tag);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = Command::new("redis-server");
    cmd.current_dir(&dir)
        .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args([
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "no",
        ])
        .args(extra);
    let mut p = Proc::spawn(cmd, "redis-server", &ctx.dir.path(&format!("{tag}.log")))
        .map_err(|e| format!("{e} (install it with `apt-get install redis-server`)"))?;
    p.wait_listening(addr, Duration::from_secs(10))?;
    Ok((Some(p), addr))
}

/// A free loopback address for a cluster node, whose bus port (+10,000) is a port and free too:
/// ephemeral ports reach 60999, and a node on 55536 or above cannot start.
fn cluster_addr() -> Result<SocketAddr, String> {
    for _ in 0..100 {
        let addr = free_addr()?;
        let Some(bus) = addr.port().checked_add(10_000) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return Ok(addr);
        }
    }
    Err("no loopback port with a free cluster bus port in 100 tries".into())
}

/// `INFO all` as text.
fn redis_info(addr: SocketAddr) -> Result<String, String> {
    redis_query(addr, &["INFO", "all"])
}

/// One command whose reply is a bulk string (`INFO`, `CLUSTER INFO`), as text.
fn redis_query(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    let err = |e: std::io::Error| format!("redis {}: {e}", args.join(" "));
    let mut s = TcpStream::connect(addr).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).map_err(err)?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).map_err(err)?;
    let n: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("redis {}: unexpected reply {head:?}", args.join(" ")))?;
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

/// Calls of the commands the scripts run inside Redis (HGET & co.), from commandstats: all but
/// the script calls themselves (`EVALSHA`, or `FCALL` on a cluster), `INFO`, the heartbeats'
/// sorted-set commands and the cluster client's topology queries (`CLUSTER SLOTS`).
fn script_calls(info: &str) -> f64 {
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_eval"))
        .filter(|l| !l.starts_with("cmdstat_fcall"))
        .filter(|l| !l.starts_with("cmdstat_info") && !l.starts_with("cmdstat_z"))
        .filter(|l| !l.starts_with("cmdstat_cluster"))
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
