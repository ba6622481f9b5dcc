//! `sluice-bench`: measures Sluice against the direct path and the reference proxies on this
//! machine, and prints a Markdown table (also written to bench-out/latest.md). See issue 5 for the
//! scenarios and targets; `make bench` runs it after a release build.
//!
//! usage: sluice-bench [--quick] [--runs N] [--only 1,5,12] [--no-peers]
//! (SLUICE_BENCH_KEEP=1 keeps the scratch directory with the proxies' logs and configs.)
//!
//! Everything runs on loopback: an origin inside this process (`origin.rs`), the proxies as child
//! processes (`proxies.rs`, `peers.rs`), clients in this process (`client.rs`). Each scenario file
//! measures and adds rows; this file sets the stage, runs them in order and writes the table.

// `clippy --all-targets` checks this harness-less root with `cfg(test)` on but `#[test]`s dropped,
// which leaves the modules' test blocks with unused imports; `units.rs` runs those tests.
#![cfg_attr(test, allow(unused_imports))]

mod accuracy;
mod client;
mod control;
mod fleet;
mod http_forward;
mod logins;
mod origin;
mod peers;
mod procs;
mod proxies;
mod quiet;
mod scale;
mod shares;
mod stage;
mod table;
mod throughput;
mod tls;
mod users;

pub use stage::{Config, Ctx};

use client::Route;
use origin::{Endpoint, Kind};
use procs::TempDir;
use proxies::{Server, User};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use table::Table;

const USAGE: &str = "usage: sluice-bench [--quick] [--runs N] [--only 1,5,12] [--no-peers]
  --quick      every scenario once, with short windows (a smoke test)
  --runs N     runs per figure (default 3, 9 for throughput; the median is reported)
  --only LIST  scenario numbers to run (1-18)
  --no-peers   skip the reference proxies
  SLUICE_BENCH_KEEP=1 keeps the scratch directory (logs, configs)";

struct Args {
    quick: bool,
    runs: Option<usize>,
    only: Option<Vec<u32>>,
    peers: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        runs: None,
        only: None,
        peers: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            // `cargo bench` passes `--bench` to a harness-less bench target.
            "--bench" => {}
            "--no-peers" => a.peers = false,
            "--runs" => {
                let n = it.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0);
                a.runs = Some(n.ok_or("--runs needs a number ≥ 1")?);
            }
            "--only" => {
                let v = it.next().ok_or("--only needs a list such as 1,5,12")?;
                let nums: Result<Vec<u32>, _> = v.split(',').map(str::parse).collect();
                a.only = Some(nums.map_err(|_| format!("bad --only {v:?}"))?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Scenarios in the order they run; the number is the one `--only` takes.
type Scenario = fn(&mut Ctx) -> Result<(), String>;
const SCENARIOS: [(u32, &str, Scenario); 16] = [
    (1, "1 · unlimited, 1 conn", throughput::single),
    (2, "2 · unlimited, 8 conns", throughput::eight),
    // Before 4, after which the peers are stopped.
    (14, "14 · plain HTTP forwarding", http_forward::run),
    (3, "3 · via sluice local", throughput::local),
    (4, "4 · connection set-up", throughput::setup),
    (5, "5 · limiter accuracy", accuracy::run),
    (6, "6 · fairness", shares::fairness),
    (7, "7 · burst", shares::burst),
    (8, "8 · joining", shares::joining),
    (9, "9 · isolation", control::isolation),
    (10, "10 · live change", control::live_change),
    (11, "11 · limiter cost", scale::cost),
    (13, "13 · TLS between local and server", tls::run),
    (15, "15 · logins under a flood", logins::run),
    (16, "16 · users", users::run),
    (18, "18 · fleet", fleet::run),
];

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let mut cfg = if args.quick {
        Config::quick()
    } else {
        Config::full()
    };
    cfg.runs = args.runs.unwrap_or(cfg.runs);
    cfg.tput_runs = args.runs.unwrap_or(cfg.tput_runs);
    let wanted = |n: u32| args.only.as_ref().is_none_or(|o| o.contains(&n));
    let nofile = procs::raise_nofile_limit().unwrap_or(0);
    let dir = TempDir::new()?;
    let bin = proxies::sluice_bin()?;
    let users = all_users(&cfg);
    let db = dir.path("bench.db");
    eprintln!(
        "sluice-bench: creating {} users in {}",
        users.len(),
        db.display()
    );
    proxies::make_db(&db, &users)?;
    let server = Server::start(&bin, &db, &dir, "server")?;
    let echo = Endpoint::start(Kind::Echo)?;
    log_in_everyone(&server, &users, &echo);
    let (peers, present) = if args.peers && [1, 2, 4, 14].into_iter().any(wanted) {
        peers::start_all(&dir)
    } else {
        (Vec::new(), vec!["peers not run".to_string()])
    };
    let mut ctx = Ctx {
        cfg,
        dir,
        bin,
        server: Some(server),
        peers,
        echo,
        table: Table::default(),
    };
    let mut times = Vec::new();
    for (n, name, f) in SCENARIOS {
        if !wanted(n) {
            continue;
        }
        eprintln!("sluice-bench: scenario {name}");
        let t = Instant::now();
        if let Err(e) = f(&mut ctx) {
            ctx.table.not_run(name, "error", &e);
        }
        times.push(format!("{n}: {:.0} s", t.elapsed().as_secs_f64()));
        if n == 4 {
            // The peers are done: free their threads and sockets for the scenarios to come.
            ctx.peers.clear();
        }
    }
    // The scale scenario starts a server per run and needs every descriptor it can get.
    ctx.server = None;
    if wanted(12) {
        eprintln!("sluice-bench: scenario 12 · scale");
        let t = Instant::now();
        if let Err(e) = scale::idle_tunnels(&mut ctx) {
            ctx.table.not_run("12 · scale", "error", &e);
        }
        times.push(format!("12: {:.0} s", t.elapsed().as_secs_f64()));
    }
    if wanted(17) {
        eprintln!("sluice-bench: scenario 17 · quiet tunnels");
        let t = Instant::now();
        if let Err(e) = quiet::run(&mut ctx) {
            ctx.table.not_run("17 · quiet tunnels", "error", &e);
        }
        times.push(format!("17: {:.0} s", t.elapsed().as_secs_f64()));
    }
    ctx.table
        .note(format!("Time per scenario: {}.", times.join(", ")));
    for n in NOTES {
        ctx.table.note(n.to_string());
    }
    let header = header(&ctx.cfg, &present, started.elapsed(), nofile);
    finish(&ctx.table.render(&header))
}

/// How the figures were taken, printed under the table.
const NOTES: [&str; 8] = [
    "Everything runs on 127.0.0.1 and shares the 2 cores: origin and clients in the benchmark \
     process, `sluice server` (default log level, to a file) and the peers as child processes. \
     \"direct\" is the client straight to the origin, measured in the same run: the ceiling, and \
     the check that the origin is not the bottleneck. Contenders alternate run by run.",
    "CPU figures are utime + stime from /proc of the proxy's process group over the window; \
     CPU-s/GB divides by the bytes that arrived (at the client for download, at the origin for \
     upload).",
    "Limiter scenarios (5–11) use Sluice alone. Accuracy (5): each cell is its own user; the \
     cells run in three groups of all directions: the 16 KiB/s and 1 MiB/s cells, then the 64 MiB/s cells \
     with 16 and 64 connections, then those with 1 and 4; the window opens when the cell's first tunnel \
     is established; bytes are counted at the client (download), at the origin sink (upload), \
     or both summed.",
    "Set-up (4): each tunnel is opened (SOCKS5 username/password, HTTP CONNECT with Basic for \
     squid, no auth for dante), one byte goes to the echo origin and back, the origin closes \
     and the client waits for that close to come through the proxy.",
    "Scale (12): a fresh server per run; RSS growth is (VmRSS with N tunnels − VmRSS after one \
     login) / N; tunnels are opened by 4 client threads one at a time and held idle.",
    "Logins (15): a server of its own (the flood gets 127.0.0.1 blocked); 400 threads connect \
     from 127.0.0.1, then log in at once as an unknown user, each with its own password; 20 ms \
     later a never-used user logs in from 127.0.0.x (the client socket bound before connecting), \
     timed from connect to the login status. As deployed: the default handshake caps apply.",
    "Users (16): servers of their own, one per table size (100,000 and 1,000,000 users) and a \
     10-user baseline; see its note above for how each figure is taken.",
    "Fleet (18): three `sluice server --db redis://…` processes on one redis-server (users moved there by `sluice migrate`; its own \
     database and Redis); 100 users at 100 KiB/s, 10 download connections each (4 on one server, \
     3 on each other, rotating); one run; Redis figures from INFO over the window; Redis is \
     then killed and the fallback measured; last, one server without a fleet carries the same \
     1,000 connections for the CPU comparison.",
];

/// Every user any scenario needs, created before the server starts.
fn all_users(cfg: &Config) -> Vec<User> {
    let mut users: Vec<User> = vec![(proxies::UNLIMITED.into(), 0)];
    users.extend(accuracy::users());
    users.extend(shares::users(cfg.runs));
    users.extend(control::users(cfg.runs));
    users.extend(scale::users());
    users.extend(tls::users());
    users
}

/// Logs every user in once (two at a time: each first login runs argon2 in the server), so the
/// scenarios measure relaying, not password hashing. Users whose first connection is the point
/// of a scenario (`shares::is_fresh`) are left alone. A failure here shows up in the scenario.
fn log_in_everyone(server: &Server, users: &[User], echo: &Endpoint) {
    let names: Vec<&str> = users
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !shares::is_fresh(n))
        .collect();
    let target = echo.addr();
    thread::scope(|s| {
        for half in names.chunks(names.len().div_ceil(2).max(1)) {
            let routes: Vec<Route> = half.iter().map(|n| server.route(n)).collect();
            s.spawn(move || {
                for r in routes {
                    let _ = r.open(target);
                }
            });
        }
    });
}

/// Date, machine, peers and settings, for the top of the table.
fn header(cfg: &Config, present: &[String], took: Duration, nofile: u64) -> String {
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "## `make bench` — {date}\n\n{uname} · {model} × {cores} cores · open-files limit {nofile} · \
         {runs} run(s) per figure ({tput} for throughput, scenarios 1–3), median (min–max) · took \
         {took:.0?}\n\nReference proxies: {peers}",
        date = utc_now(),
        runs = cfg.runs,
        tput = cfg.tput_runs,
        peers = present.join("; "),
    )
}

/// Now as "YYYY-MM-DD HH:MM UTC" (civil-from-days, so no date crate is needed).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Prints the table and writes it to bench-out/latest.md.
fn finish(markdown: &str) -> Result<(), String> {
    println!("{markdown}");
    let dir = PathBuf::from("bench-out");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join("latest.md");
    std::fs::write(&out, markdown).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("sluice-bench: wrote {}", out.display());
    Ok(())
}
