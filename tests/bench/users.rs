//! Scenario 16, the server against the size of its user table (issue 20, "Users: today the idle
//! cost is linear in the user table"): for 100,000 and 1,000,000 users, a fresh server's start-up
//! time, idle CPU, resident memory per user, and the cost of a `sluice user set` change.
//!
//! Each size gets its own database, filled by one SQL statement with one shared argon2 hash (set-up
//! takes seconds, not the hours argon2 per row would), and its own server process. Memory per
//! user is measured against the same server with a handful of users.

use crate::Ctx;
use crate::client::{Dir, Load, Meter};
use crate::control::time_to_hold;
use crate::origin::{Endpoint, Kind};
use crate::procs::{Proc, free_addr};
use crate::proxies::PASSWORD;
use crate::table::{Samples, Unit, Verdict};
use sluice::auth::hash_password;
use sluice::store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const SCENARIO: &str = "16 · users";
/// The baseline table: RSS per user is measured against a server with this many users.
const BASELINE: u64 = 10;
/// The sizes measured.
const SIZES: [u64; 2] = [100_000, 1_000_000];
/// Every generated user's bandwidth, and the one a change sets on the watched user.
const BW: u64 = 1 << 20;
const NEW_BW: u64 = 256 << 10;
/// How long start-up may take before the size is given up.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Targets.
const MAX_START: Duration = Duration::from_secs(2);
const MAX_IDLE_PCT: f64 = 1.0;
const MAX_BYTES_PER_USER: f64 = 400.0;
const MAX_CHANGE_MS: f64 = 5.0;
const MAX_REACH: Duration = Duration::from_secs(1);
/// Idle window, and the changes: how many, and how often.
const IDLE: Duration = Duration::from_secs(5);
const CHANGES: usize = 200;
/// At 1,000,000 users fewer changes keep the scenario within its time budget.
const CHANGES_LARGE: usize = 50;
const CHANGE_EVERY: Duration = Duration::from_millis(200);
/// After the last change, time for the server to finish applying it before CPU is read.
const CHANGE_TAIL: Duration = Duration::from_secs(1);
/// The watched connection: download before the change, and time watched after it.
const REACH_BEFORE: Duration = Duration::from_secs(1);
const REACH_OBSERVE: Duration = Duration::from_secs(5);
/// Time after listening before memory and idle CPU are read.
const SETTLE: Duration = Duration::from_secs(1);

/// The name of generated user `i` (1-based).
fn user(i: u64) -> String {
    format!("u{i}")
}

/// Creates `path` with the schema and `n` users u1…uN, all with [`PASSWORD`]'s hash and [`BW`].
fn make_db(path: &Path, n: u64) -> Result<(), String> {
    drop(store::open(path, true).map_err(|e| e.to_string())?);
    let hash = hash_password(PASSWORD).map_err(|e| e.to_string())?;
    let conn = rusqlite::Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let n = i64::try_from(n).map_err(|e| e.to_string())?;
    let bw = i64::try_from(BW).map_err(|e| e.to_string())?;
    conn.execute(
        "INSERT INTO users (username, password_hash, bandwidth)
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?1)
         SELECT 'u' || i, ?2, ?3 FROM c",
        rusqlite::params![n, hash, bw],
    )
    .map_err(|e| format!("insert {n} users: {e}"))?;
    Ok(())
}

/// A server started on `db`, and how long it took to listen.
fn start(
    ctx: &Ctx,
    db: &Path,
    tag: &str,
) -> Result<(Proc, std::net::SocketAddr, Duration), String> {
    let addr = free_addr()?;
    let mut cmd = Command::new(&ctx.bin);
    cmd.arg("server")
        .arg("--db")
        .arg(db)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--allow-private");
    let t = Instant::now();
    let mut proc = Proc::spawn(cmd, "sluice server", &ctx.dir.path(&format!("{tag}.log")))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok((proc, addr, t.elapsed()))
}

/// CPU seconds of each of `proc`'s threads, by thread name (threads of one name summed: the relay
/// threads), from `/proc/PID/task/TID/schedstat` (nanoseconds on a CPU; `stat`'s utime + stime
/// count 10 ms ticks, and an idle server's 1 % of a core over 5 s is five of them). A thread that
/// exits between two readings drops out: none does in the windows measured here (no connections).
fn thread_cpu(proc: &Proc) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", proc.pid())) else {
        return out;
    };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(sched)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("schedstat")),
        ) else {
            continue;
        };
        let name = comm.trim_end().to_string();
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let secs = ns as f64 / 1e9;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += secs,
            None => out.push((name, secs)),
        }
    }
    out
}

/// CPU seconds of all of `proc`'s threads (see [`thread_cpu`]).
fn sched_cpu(proc: &Proc) -> Result<f64, String> {
    let t = thread_cpu(proc);
    if t.is_empty() {
        return Err("cannot read the server's schedstat".into());
    }
    Ok(t.iter().map(|(_, c)| c).sum())
}

/// Per-thread CPU between two [`thread_cpu`] readings, as % of one core over `secs`, busiest
/// first, e.g. "user watcher 60.1 %, limiter refill 40.0 %".
fn busiest(before: &[(String, f64)], after: &[(String, f64)], secs: f64) -> String {
    let mut d: Vec<(String, f64)> = after
        .iter()
        .map(|(n, c)| {
            let c0 = before.iter().find(|(m, _)| m == n).map_or(0.0, |e| e.1);
            (n.clone(), (c - c0) / secs * 100.0)
        })
        .filter(|(_, pct)| *pct >= 0.5)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = d.iter().map(|(n, p)| format!("{n} {p:.1} %")).collect();
    if parts.is_empty() {
        "no thread ≥ 0.5 %".into()
    } else {
        parts.join(", ")
    }
}

/// The CPU seconds of `proc`'s thread named `name` in a [`thread_cpu`] reading.
fn cpu_of(reading: &[(String, f64)], name: &str) -> f64 {
    reading.iter().find(|(n, _)| n == name).map_or(0.0, |e| e.1)
}

/// The 1-minute load average, as /proc/loadavg shows it ("?" if unreadable).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The database thread's name (as /proc shows it).
const WATCHER: &str = "user watcher";

/// The process's CPU over `window` from now, as % of one core.
fn cpu_pct(proc: &Proc, window: Duration) -> Result<f64, String> {
    let cpu = || sched_cpu(proc);
    let (c0, t0) = (cpu()?, Instant::now());
    thread::sleep(window);
    Ok((cpu()? - c0) / t0.elapsed().as_secs_f64() * 100.0)
}

/// Resident memory in bytes, read after the server has settled.
fn rss(proc: &Proc) -> Result<f64, String> {
    let (kib, _) = proc.rss_threads().ok_or("cannot read the server's VmRSS")?;
    Ok(kib as f64 * 1024.0)
}

/// `sluice user set NAME --bandwidth RATE --db DB`.
fn user_set(bin: &Path, db: &Path, name: &str, bw: u64) -> Result<(), String> {
    let out = Command::new(bin)
        .args(["user", "set", name, "--bandwidth", &bw.to_string(), "--db"])
        .arg(db)
        .output()
        .map_err(|e| format!("sluice user set: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "sluice user set {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What [`reach`] saw: the time until the new rate held (None: not while watched), and the rate
/// in the last half second before the change and in the last second watched, in B/s.
struct Reach {
    took: Option<Duration>,
    before: f64,
    last: f64,
}

/// One download connection of user u1 at [`BW`]; its bandwidth is set to [`NEW_BW`] by
/// `sluice user set`, timed from the command's exit until the new rate holds.
fn reach(ctx: &Ctx, addr: std::net::SocketAddr, db: &Path) -> Result<Reach, String> {
    let ep = Endpoint::start(Kind::Source)?;
    let route = crate::client::Route::socks(addr, &user(1), PASSWORD);
    let s = route
        .open(ep.addr())
        .map_err(|e| format!("open a tunnel as {}: {e}", user(1)))?;
    let meter = Meter::new(true);
    let mut load = Load::default();
    load.start(Dir::Down, s, &meter)?;
    thread::sleep(REACH_BEFORE);
    user_set(&ctx.bin, db, &user(1), NEW_BW)?;
    let changed = Instant::now();
    thread::sleep(REACH_OBSERVE);
    let end = Instant::now();
    load.stop();
    let log = meter.timeline();
    let rate = |a: Instant, b: Instant| {
        let n: u64 = log
            .iter()
            .filter(|(t, _)| *t >= a && *t < b)
            .map(|(_, n)| u64::from(*n))
            .sum();
        n as f64 / b.saturating_duration_since(a).as_secs_f64().max(1e-3)
    };
    let half = Duration::from_millis(500);
    let second = Duration::from_secs(1);
    Ok(Reach {
        took: time_to_hold(&log, changed, end, NEW_BW as f64),
        before: rate(changed.checked_sub(half).unwrap_or(changed), changed),
        last: rate(end.checked_sub(second).unwrap_or(end), end),
    })
}

/// What [`changes`] measured.
struct Changes {
    /// Server CPU seconds from the first change to [`CHANGE_TAIL`] after the last.
    cpu: f64,
    /// The database thread's CPU seconds over the same time.
    watcher: f64,
    /// That time.
    over: Duration,
    /// Changes the command could not make, and the first one's error.
    failed: usize,
    first_error: Option<String>,
}

/// `n` changes to users u2…, one every [`CHANGE_EVERY`] (or back to back when one takes
/// longer); a change that fails (the server holding the database locked) is counted, not fatal.
fn changes(ctx: &Ctx, proc: &Proc, db: &Path, n: usize) -> Result<Changes, String> {
    let cpu = || sched_cpu(proc);
    let (c0, w0, t0) = (cpu()?, cpu_of(&thread_cpu(proc), WATCHER), Instant::now());
    let (mut failed, mut first_error) = (0, None);
    for i in 0..n {
        let due = t0 + CHANGE_EVERY * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let bw = BW + 1024 * (i as u64 + 1);
        if let Err(e) = user_set(&ctx.bin, db, &user(i as u64 + 2), bw) {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    thread::sleep(CHANGE_TAIL);
    Ok(Changes {
        cpu: cpu()? - c0,
        watcher: cpu_of(&thread_cpu(proc), WATCHER) - w0,
        over: t0.elapsed(),
        failed,
        first_error,
    })
}

/// Scenario 16.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let load_before = loadavg();
    let base_db = ctx.dir.path("users-base.db");
    make_db(&base_db, BASELINE)?;
    let (base, addr, took) = start(ctx, &base_db, "users-base")?;
    thread::sleep(SETTLE);
    let base_rss = rss(&base)?;
    let base_idle = cpu_pct(&base, IDLE)?;
    let (reached, rates, _) = show_reach(reach(ctx, addr, &base_db));
    drop(base);
    ctx.table.push(
        SCENARIO,
        &format!("{BASELINE} users: start-up · idle CPU · RSS · change reach"),
        format!(
            "{:.0} ms · {base_idle:.2} % · {:.1} MiB · {reached} ({rates})",
            took.as_secs_f64() * 1e3,
            base_rss / 1_048_576.0
        ),
        "the baseline the sizes are measured against (RSS per user is relative to it)".into(),
        Verdict::Info,
    );
    for n in SIZES {
        let size = format!("{SCENARIO} · {n} users");
        if let Err(e) = one_size(ctx, n, base_rss, &size) {
            ctx.table.not_run(&size, "error", &e);
        }
    }
    ctx.table.note(format!(
        "Users (16): load average (1 min) {load_before} before, {} after: CPU figures are the CPU a \
         thread obtained, so a thread that would run flat out shows as the share the machine gave it. \
         Per size a fresh database (one INSERT … WITH RECURSIVE, one shared argon2 \
         hash, every user {BW} B/s) and a fresh server. Start-up is spawn to the first accepted \
         TCP connect (polled every 20 ms); CPU is the sum of the server's threads' \
         /proc/PID/task/*/schedstat run times (ns); idle CPU is that over {IDLE:?} with no \
         traffic, 1 s after start; RSS per user is (VmRSS − VmRSS of a {BASELINE}-user server) / \
         users, with no connection ever made; change cost is (server CPU from the first of the \
         `sluice user set NAME --bandwidth …` changes, one every {CHANGE_EVERY:?}, to {CHANGE_TAIL:?} \
         after the last − idle CPU over the same time) / changes; reach is one download \
         connection of u1 at {BW} B/s set to {NEW_BW} B/s, timed from the command's exit until the \
         new rate holds (as in 10).",
        loadavg()
    ));
    Ok(())
}

/// The reach figure, what the connection's rate was (KiB/s before the change → in the last second
/// watched), and whether it met the target.
fn show_reach(r: Result<Reach, String>) -> (String, String, bool) {
    match r {
        Ok(r) => {
            let rates = format!("{:.0} → {:.0} KiB/s", r.before / 1024.0, r.last / 1024.0);
            match r.took {
                Some(t) => (
                    format!("{:.0} ms", t.as_secs_f64() * 1e3),
                    rates,
                    t <= MAX_REACH,
                ),
                None => (format!("not within {REACH_OBSERVE:?}"), rates, false),
            }
        }
        Err(e) => (format!("n/a ({e})"), String::new(), false),
    }
}

/// The rows of one table size.
fn one_size(ctx: &mut Ctx, n: u64, base_rss: f64, size: &str) -> Result<(), String> {
    let db: PathBuf = ctx.dir.path(&format!("users-{n}.db"));
    let t = Instant::now();
    make_db(&db, n)?;
    eprintln!("  {n} users created in {:.1} s", t.elapsed().as_secs_f64());
    let (proc, addr, took) = start(ctx, &db, &format!("users-{n}"))?;
    ctx.table.push(
        size,
        "start-up: spawn to listening",
        Samples(vec![took.as_secs_f64() * 1e3]).show(Unit::Ms),
        format!("target ≤ {} ms", MAX_START.as_millis()),
        Verdict::of(took <= MAX_START),
    );
    thread::sleep(SETTLE);
    let mem = rss(&proc)?;
    let threads0 = thread_cpu(&proc);
    let idle = cpu_pct(&proc, IDLE)?;
    let threads1 = thread_cpu(&proc);
    let secs = IDLE.as_secs_f64();
    let watcher_idle = (cpu_of(&threads1, WATCHER) - cpu_of(&threads0, WATCHER)) / secs;
    ctx.table.push(
        size,
        "idle CPU, no traffic",
        Samples(vec![idle]).show(Unit::Percent),
        format!(
            "{} · target ≤ {MAX_IDLE_PCT} % of one core",
            busiest(&threads0, &threads1, secs)
        ),
        Verdict::of(idle <= MAX_IDLE_PCT),
    );
    let per_user = (mem - base_rss) / n as f64;
    ctx.table.push(
        size,
        "RSS per user, no connections",
        format!("{per_user:.0} B"),
        format!(
            "VmRSS {:.1} MiB · target ≤ {MAX_BYTES_PER_USER:.0} B",
            mem / 1_048_576.0
        ),
        Verdict::of(per_user <= MAX_BYTES_PER_USER),
    );
    let count = if n >= 1_000_000 {
        CHANGES_LARGE
    } else {
        CHANGES
    };
    let ch = changes(ctx, &proc, &db, count)?;
    let over = ch.over.as_secs_f64();
    let reloads = std::fs::read_to_string(ctx.dir.path(&format!("users-{n}.log")))
        .map_or(0, |l| l.matches("users reloaded").count());
    let cost_ms = (ch.cpu - idle / 100.0 * over) / count as f64 * 1e3;
    let watcher_ms = (ch.watcher - watcher_idle * over) / count as f64 * 1e3;
    let mut fewer = if count < CHANGES {
        format!(" · {count} changes, not {CHANGES}: the time budget")
    } else {
        String::new()
    };
    if let Some(e) = &ch.first_error {
        fewer += &format!(" · {} of {count} changes failed, first: {e}", ch.failed);
    }
    // When the server is as busy at idle as with changes, the difference is noise: then all the
    // server's CPU during the changes, idle included, divided by the changes is an upper bound.
    let upper_ms = ch.cpu / count as f64 * 1e3;
    let (value, verdict) = if cost_ms > 0.0 {
        (
            format!("{cost_ms:.1} ms"),
            Verdict::of(cost_ms <= MAX_CHANGE_MS && watcher_ms <= MAX_CHANGE_MS && ch.failed == 0),
        )
    } else if upper_ms <= MAX_CHANGE_MS && ch.failed == 0 {
        (
            format!("≤ {upper_ms:.2} ms (upper bound: {cost_ms:.2} ms over idle is noise)"),
            Verdict::of(true),
        )
    } else {
        (
            format!("n/a ({cost_ms:.1} ms: lost in the idle CPU)"),
            Verdict::NotRun,
        )
    };
    ctx.table.push(
        size,
        "server CPU per `sluice user set` change",
        value,
        format!(
            "database thread alone {watcher_ms:.1} ms · server at {:.0} % during the changes, {idle:.0} % idle · \
             {reloads} reloads logged · {count} changes, 1 every {} ms, over {over:.1} s{fewer} · \
             target ≤ {MAX_CHANGE_MS} ms",
            ch.cpu / over * 100.0,
            CHANGE_EVERY.as_millis(),
        ),
        verdict,
    );
    let (value, rates, ok) = show_reach(reach(ctx, addr, &db));
    ctx.table.push(
        size,
        "a change reaching an open connection",
        value,
        format!(
            "1 MiB/s → 256 KiB/s, 1 conn; it carried {rates} · target ≤ {} ms",
            MAX_REACH.as_millis()
        ),
        Verdict::of(ok),
    );
    drop(proc);
    let _ = std::fs::remove_file(&db);
    Ok(())
}
