//! Scenario 17, tunnels that go quiet (issue 20): what re-taking a pipe costs; 5,000 tunnels
//! that each moved 1 MiB each way and then went quiet for 10 s, against the same tunnels before
//! they moved a byte (descriptors and RSS per tunnel); and 9,000 tunnels, 1,000 of them busy
//! downloading, under the 20,000-file limit, where the pipe budget sends the busy directions it
//! has no pipe for through buffers.
//!
//! Each scenario starts its own server, as the scale scenario (12) does, and runs after it: the
//! 9,000 tunnels need every descriptor this process has.

use crate::Ctx;
use crate::client::{Dir, Load, Meter, Route};
use crate::origin::{Endpoint, Kind};
use crate::procs::bind_low;
use crate::proxies::{Server, UNLIMITED};
use crate::scale::{open_idle, settled};
use crate::table::{Samples, Unit, Verdict};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Tunnels that move data, then go quiet.
const QUIET_TUNNELS: usize = 5000;
/// What each of them moves each way, in round trips of `ROUND` bytes.
const MOVED: usize = 1 << 20;
const ROUND: usize = 64 * 1024;
/// How long they stay quiet before the server is measured (the release period is 5 s).
const QUIET_FOR: Duration = Duration::from_secs(10);
/// Threads moving the data, each one tunnel at a time.
const MOVERS: usize = 4;
/// Targets: descriptors per quiet tunnel (its two sockets), and RSS above a never-used one.
const MAX_FDS_PER_TUNNEL: f64 = 2.0;
const MAX_KIB_ABOVE_NEVER_USED: f64 = 4.0;
/// The mixed load: tunnels in all, busy ones among them, and the open-files limit they share.
const MIXED_TUNNELS: usize = 9000;
const MIXED_BUSY: usize = 1000;
const FILE_LIMIT: usize = 20_000;
/// How long the busy tunnels download while the server's descriptors are watched.
const BUSY_FOR: Duration = Duration::from_secs(5);
/// Pipes made and closed to time one.
const PIPE_ROUNDS: u32 = 20_000;
/// Stack of an echo thread (its buffer is on the heap).
const ECHO_STACK: usize = 64 * 1024;

/// Scenario 17.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    retake_cost(ctx);
    let quiet = quiet_tunnels(ctx);
    if let Err(e) = quiet {
        ctx.table.not_run("17 · quiet tunnels", "error", &e);
    }
    mixed(ctx)
}

/// CPU per pipe taken and given back as a quiet direction does: pipe2, F_SETPIPE_SZ, two closes.
fn retake_cost(ctx: &mut Ctx) {
    let (c0, t0) = (thread_cpu(), Instant::now());
    let mut cap = 0;
    for _ in 0..PIPE_ROUNDS {
        match sluice::net::stream::Pipe::new() {
            Ok(p) => cap = p.capacity(),
            Err(e) => {
                ctx.table
                    .not_run("17 · re-taking a pipe", "error", &e.to_string());
                return;
            }
        }
    }
    let cpu = (thread_cpu() - c0) / f64::from(PIPE_ROUNDS) * 1e6;
    let wall = t0.elapsed().as_secs_f64() / f64::from(PIPE_ROUNDS) * 1e6;
    ctx.table.push(
        "17 · re-taking a pipe",
        "CPU per pipe2 + F_SETPIPE_SZ + 2 close",
        format!("{cpu:.2} µs"),
        format!(
            "wall {wall:.2} µs · {} KiB pipes · {PIPE_ROUNDS} rounds, this process (same kernel calls as the server)",
            cap / 1024
        ),
        Verdict::Info,
    );
}

/// This thread's CPU seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Open descriptors of process `pid`, and how many of them are pipes.
fn fds(pid: u32) -> Option<(usize, usize)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let (mut all, mut pipes) = (0, 0);
    for e in dir.flatten() {
        all += 1;
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:")) {
            pipes += 1;
        }
    }
    Some((all, pipes))
}

/// Per run: never-used and quiet descriptors and RSS per tunnel, on a fresh server.
fn quiet_tunnels(ctx: &mut Ctx) -> Result<(), String> {
    let db = ctx.dir.path("bench.db");
    let n = QUIET_TUNNELS;
    let (mut fd_never, mut fd_quiet) = (Samples::default(), Samples::default());
    let mut fd_moved = Samples::default();
    let (mut kib_never, mut kib_above) = (Samples::default(), Samples::default());
    let mut cpu_per_gb = Samples::default();
    for run in 0..ctx.cfg.runs {
        let mut server = Server::start(&ctx.bin, &db, &ctx.dir, &format!("quiet-{run}"))?;
        let pid = server.proc.pid();
        let route = server.route(UNLIMITED);
        drop(route.open(ctx.echo.addr()));
        let echo = EchoEach::start()?;
        let (rss0, _) = settled(&mut server)?;
        let (f0, _) = fds(pid).ok_or("cannot read the server's descriptors")?;
        let mut socks = Vec::new();
        open_idle(&route, echo.addr, n, &mut socks)?;
        let (rss1, _) = settled(&mut server)?;
        let (f1, _) = fds(pid).ok_or("cannot read the server's descriptors")?;
        let c0 = server.proc.cpu_secs().unwrap_or(0.0);
        move_through_all(&socks)?;
        let c1 = server.proc.cpu_secs().unwrap_or(0.0);
        let (fm, _) = fds(pid).ok_or("cannot read the server's descriptors")?;
        thread::sleep(QUIET_FOR);
        let (rss2, _) = settled(&mut server)?;
        let (f2, _) = fds(pid).ok_or("cannot read the server's descriptors")?;
        let per = |a: usize, b: usize| a.saturating_sub(b) as f64 / n as f64;
        fd_never.push(per(f1, f0));
        fd_quiet.push(per(f2, f0));
        fd_moved.push(per(fm, f0));
        let never = rss1.saturating_sub(rss0) as f64 / n as f64;
        kib_never.push(never);
        kib_above.push(rss2 as f64 / n as f64 - rss1 as f64 / n as f64);
        cpu_per_gb.push((c1 - c0) / (2.0 * n as f64 * MOVED as f64 / 1e9));
        drop(socks);
        drop(echo);
    }
    let name = format!("17 · quiet: {n} tunnels moved 1 MiB each way, then {QUIET_FOR:?} quiet");
    ctx.table.push(
        &name,
        "server descriptors per tunnel",
        fd_quiet.show(Unit::Ratio),
        format!(
            "{} before the first byte, {} right after the last · target ≤ {MAX_FDS_PER_TUNNEL:.0}",
            fd_never.show(Unit::Ratio),
            fd_moved.show(Unit::Ratio)
        ),
        Verdict::of(fd_quiet.median() <= MAX_FDS_PER_TUNNEL + 0.01),
    );
    ctx.table.push(
        &name,
        "server RSS per tunnel above never-used",
        kib_above.show(Unit::KiB),
        format!(
            "never-used {} per tunnel · server {} moving it · target ≤ {MAX_KIB_ABOVE_NEVER_USED:.0} KiB",
            kib_never.show(Unit::KiB),
            cpu_per_gb.show(Unit::CpuPerGb)
        ),
        Verdict::of(kib_above.median() <= MAX_KIB_ABOVE_NEVER_USED),
    );
    Ok(())
}

/// Moves `MOVED` bytes each way through every tunnel (to an echo), `MOVERS` tunnels at a time.
fn move_through_all(socks: &[TcpStream]) -> Result<(), String> {
    let share = socks.len().div_ceil(MOVERS).max(1);
    thread::scope(|s| {
        let hs: Vec<_> = socks
            .chunks(share)
            .map(|part| s.spawn(move || part.iter().try_for_each(round_trips)))
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("mover panicked")))
                .map_err(|e| format!("moving 1 MiB through a tunnel: {e}"))
        })
    })
}

fn round_trips(mut s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    let out = vec![0x33u8; ROUND];
    let mut back = vec![0u8; ROUND];
    for _ in 0..MOVED / ROUND {
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
    }
    Ok(())
}

/// An origin that echoes on a thread per connection until the peer closes.
struct EchoEach {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl EchoEach {
    fn start() -> Result<EchoEach, String> {
        let l: TcpListener = bind_low()?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let acceptor = thread::Builder::new()
            .name("echo-each".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    let Ok((s, _)) = l.accept() else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = thread::Builder::new()
                        .stack_size(ECHO_STACK)
                        .spawn(move || echo(s));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(EchoEach {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

fn echo(s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = Vec::new();
    loop {
        let mut one = [0u8; 1];
        // Wait for the first byte before allocating, so idle echoes cost little.
        match s.peek(&mut one) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        buf.resize(ROUND, 0);
        match (&s).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                if (&s).write_all(&buf[..k]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for EchoEach {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// 9,000 tunnels, 1,000 of them downloading as fast as they can, on a server with the default
/// cap: all held, no descriptor shortage, the busiest moment's descriptors under the limit.
fn mixed(ctx: &mut Ctx) -> Result<(), String> {
    let name = format!("17 · {MIXED_TUNNELS} tunnels, {MIXED_BUSY} busy downloading");
    let db = ctx.dir.path("bench.db");
    let mut server = Server::start(&ctx.bin, &db, &ctx.dir, "mixed")?;
    let pid = server.proc.pid();
    let route: Route = server.route(UNLIMITED);
    drop(route.open(ctx.echo.addr()));
    let hold = Endpoint::start(Kind::Hold)?;
    let source = Endpoint::start(Kind::Source)?;
    let mut idle = Vec::new();
    let mut short = open_idle(&route, hold.addr(), MIXED_TUNNELS - MIXED_BUSY, &mut idle).err();
    let mut busy = Vec::new();
    if short.is_none() {
        short = open_idle(&route, source.addr(), MIXED_BUSY, &mut busy).err();
    }
    let opened = idle.len() + busy.len();
    let meter = Meter::new(false);
    let mut load = Load::default();
    for s in busy {
        load.start(Dir::Down, s, &meter)?;
    }
    let (b0, t0) = (meter.bytes(), Instant::now());
    let (mut most, mut most_pipes) = (0, 0);
    while t0.elapsed() < BUSY_FOR {
        if let Some((all, pipes)) = fds(pid) {
            most = most.max(all);
            most_pipes = most_pipes.max(pipes);
        }
        thread::sleep(Duration::from_millis(200));
    }
    let rate = meter.bytes().saturating_sub(b0) as f64 / t0.elapsed().as_secs_f64();
    load.stop();
    let alive = settled(&mut server).is_ok();
    let log = std::fs::read_to_string(ctx.dir.path("mixed.log")).unwrap_or_default();
    let emfile = log.matches("os error 24").count();
    let budget = log
        .split("relay pipes may hold ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    let held = opened == MIXED_TUNNELS && hold.held() == MIXED_TUNNELS - MIXED_BUSY;
    let why = match (&short, alive) {
        (Some(e), _) => format!("NOT held: {opened} opened: {e} · "),
        (None, false) => "NOT held: the server died · ".to_string(),
        (None, true) if !held => format!("NOT held: {opened} opened · "),
        _ => format!("{opened} held · "),
    };
    ctx.table.push(
        &name,
        "server descriptors, most over the busy time",
        format!("{most}"),
        format!(
            "{why}{most_pipes} of them pipes (budget {budget}) · {:.2} GB/s delivered · {emfile} `too many open files` in its log · target < {FILE_LIMIT}, all held",
            rate / 1e9
        ),
        Verdict::of(held && alive && most < FILE_LIMIT && emfile == 0),
    );
    drop(hold);
    drop(idle);
    Ok(())
}
