//! Scenario 15, logins under a flood (issue 18 §3): while one address sends 400 logins for an
//! unknown user, another address's first login (one argon2 run) must take under 300 ms; and
//! `sluice local` opening 64 connections at once must log them all in.
//!
//! It runs its own server on its own database, since the flood gets 127.0.0.1 blocked. Other
//! sources are other loopback addresses: the client socket is bound to 127.0.0.x before it
//! connects (std cannot do that, hence the few lines of libc).

use crate::Ctx;
use crate::client::{IO_TIMEOUT, Route};
use crate::origin::{Endpoint, Kind};
use crate::proxies::{self, Local, PASSWORD, Server, User};
use crate::table::{Samples, Unit, Verdict};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Logins in the flood, all from 127.0.0.1, all for one unknown user, each its own password.
const FLOOD: usize = 400;
/// The other source's first login takes less than this under the flood.
const MAX_FIRST_LOGIN: Duration = Duration::from_millis(300);
/// Connections `sluice local` opens at once.
const BURST: usize = 64;
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn fresh_user(run: usize) -> String {
    format!("first-{run}")
}

/// A TCP connection to `dst` from the loopback address `src`, with the I/O timeout.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::other("IPv4 only"));
    };
    let addr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fresh socket is owned by the TcpStream at once (closed on every error path);
    // bind and connect read one sockaddr_in of the stated size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let a = addr(src, 0);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let d = addr(*dst.ip(), dst.port());
        if libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }
}

/// Greets and logs in on `s` in one write; true when the server accepted.
fn socks5_login(s: &mut TcpStream, user: &str, pass: &str) -> bool {
    let mut msg = vec![5, 1, 2, 1, user.len() as u8];
    msg.extend_from_slice(user.as_bytes());
    msg.push(pass.len() as u8);
    msg.extend_from_slice(pass.as_bytes());
    let mut answer = [0u8; 4];
    s.write_all(&msg).is_ok() && s.read_exact(&mut answer).is_ok() && answer == [5, 2, 1, 0]
}

/// Users of this scenario: one never-used user per run, and one for `sluice local`.
pub fn users(runs: usize) -> Vec<User> {
    let mut u: Vec<User> = (0..runs).map(|r| (fresh_user(r), 0)).collect();
    u.push(("burst".into(), 0));
    u
}

/// One run: the flood from 127.0.0.1, and while it is on, a first login from 127.0.0.(2+run).
fn flooded_first_login(server: SocketAddr, run: usize) -> Result<Duration, String> {
    let go = Arc::new(Barrier::new(FLOOD + 1));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let go = go.clone();
            thread::spawn(move || {
                let s = connect_from(FLOODER, server);
                go.wait();
                if let Ok(mut s) = s {
                    socks5_login(&mut s, "nobody", &format!("guess-{run}-{i}"));
                }
            })
        })
        .collect();
    go.wait();
    thread::sleep(Duration::from_millis(20));
    let other = Ipv4Addr::new(127, 0, 0, 2 + run as u8);
    let t = Instant::now();
    let ok = connect_from(other, server)
        .map(|mut s| socks5_login(&mut s, &fresh_user(run), PASSWORD))
        .map_err(|e| format!("connect from {other}: {e}"))?;
    let took = t.elapsed();
    for f in flood {
        let _ = f.join();
    }
    if !ok {
        return Err(format!("the first login from {other} was refused"));
    }
    Ok(took)
}

/// `sluice local` opens [`BURST`] connections at once; returns how many opened and the time.
fn local_burst(
    ctx: &Ctx,
    server: SocketAddr,
    echo: SocketAddr,
) -> Result<(usize, Duration), String> {
    let local = Local::start_with(&ctx.bin, server, "burst", &ctx.dir, "logins-local", &[])?;
    let route = local.route();
    let go = Arc::new(Barrier::new(BURST));
    let t = Instant::now();
    let apps: Vec<_> = (0..BURST)
        .map(|_| {
            let (go, route): (_, Route) = (go.clone(), route.clone());
            thread::spawn(move || {
                go.wait();
                route.open(echo).is_ok()
            })
        })
        .collect();
    let ok = apps
        .into_iter()
        .filter_map(|a| a.join().ok())
        .filter(|opened| *opened)
        .count();
    Ok((ok, t.elapsed()))
}

/// Scenario 15.
pub fn run(ctx: &mut Ctx) -> Result<(), String> {
    let db = ctx.dir.path("logins.db");
    proxies::make_db(&db, &users(ctx.cfg.runs))?;
    let server = Server::start(&ctx.bin, &db, &ctx.dir, "logins")?;
    let mut first = Samples::default();
    for run in 0..ctx.cfg.runs {
        let took = flooded_first_login(server.addr, run)?;
        first.push(took.as_secs_f64() * 1e3);
    }
    let worst = first.max();
    ctx.table.push(
        "15 · logins under a flood",
        "first login from another address while one sends 400",
        first.show(Unit::Ms),
        format!(
            "{FLOOD} logins for an unknown user from one address, each run a new user's first login (argon2) · target < {} ms",
            MAX_FIRST_LOGIN.as_millis()
        ),
        Verdict::of(worst < MAX_FIRST_LOGIN.as_secs_f64() * 1e3),
    );
    let echo = Endpoint::start(Kind::Echo)?;
    let (ok, took) = local_burst(ctx, server.addr, echo.addr())?;
    ctx.table.push(
        "15 · logins under a flood",
        "sluice local opening 64 connections at once",
        format!("{ok} of {BURST} in {:.0} ms", took.as_secs_f64() * 1e3),
        "one password from one source: the server checks it once · target all 64".into(),
        Verdict::of(ok == BURST),
    );
    Ok(())
}
