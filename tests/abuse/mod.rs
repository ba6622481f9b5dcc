//! Issue 7 end to end: the server under abuse (connection caps, password guessing, slow clients,
//! every way in without credentials), odd but legal input, destinations and clients that fail
//! mid-connection, and a database that is locked, replaced or killed under the server.
//!
//! Quick tests run with `make test`. Floods and leak checks are named `soak_*`, ignored here, and
//! run by `make soak`; the ones that count threads and files run the server in its own process
//! (`process.rs`), since this test binary runs other suites in parallel threads.
//!
//! Helpers shared by the submodules live here; the fixtures they build on are `tests/support`.

mod caps;
mod database;
mod faults;
mod logins;
mod odd_input;
mod open_proxy;
mod pool;
mod process;
mod quiet;
mod slow;
mod soak;

use crate::support::*;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest a test waits for the server to notice that a connection ended.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Connection threads alive in a test server.
pub fn active(srv: &TestServer) -> usize {
    srv.handle.as_ref().map_or(0, |h| h.active_connections())
}

/// Polls until the server has no connection thread left (both relays of every connection ended);
/// panics naming `what` otherwise.
pub fn assert_settles(srv: &TestServer, what: &str) {
    let ok = wait_until(SETTLE, || active(srv) == 0);
    assert!(
        ok,
        "{what}: {} connection(s) still open after {SETTLE:?}",
        active(srv)
    );
}

/// Sets SO_LINGER to {on, 0 s}, so closing the socket sends a RST instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one `linger` from a valid pointer of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Closes `s` with a RST (an abortive close).
pub fn reset(s: TcpStream) {
    set_linger_zero(&s);
    drop(s);
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to `dst` from the loopback address `src` (std cannot bind a client socket
/// before connecting), with the test read timeout.
///
/// # Errors
/// `dst` is not IPv4, or socket, bind or connect fails.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::other("connect_from: IPv4 destinations only"));
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket is owned by the TcpStream at once (closed on every error path); bind
    // and connect read one sockaddr_in of the stated size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let a = sockaddr_in(src, 0);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let d = sockaddr_in(*dst.ip(), dst.port());
        if libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(s)
    }
}

/// Polls until `user` can log in and open a tunnel to `dst`. Each attempt comes from its own
/// loopback address (127.0.1.x), so the failures while waiting never trip the login throttle.
pub fn wait_for_login(addr: SocketAddr, user: &str, pass: &str, dst: SocketAddr) -> bool {
    let mut n = 0u8;
    wait_until(SETTLE, || {
        n = n.wrapping_add(1);
        connect_from(Ipv4Addr::new(127, 0, 1, n), addr)
            .is_ok_and(|s| socks5_on(s, user, pass, dst).is_ok())
    })
}

/// The RFC 1929 sub-negotiation bytes for `user` / `pass`.
pub fn userpass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    let mut a = vec![1, user.len() as u8];
    a.extend_from_slice(user);
    a.push(pass.len() as u8);
    a.extend_from_slice(pass);
    a
}

/// A SOCKS5 CONNECT request to an IP address.
pub fn socks5_request(dst: SocketAddr) -> Vec<u8> {
    socks5_connect_bytes(&dst.ip().to_string(), dst.port())
}

/// Greets and logs in on `s` (one write); returns the RFC 1929 status byte (0 = success).
///
/// # Errors
/// The server closed or did not answer in time.
pub fn socks5_auth_status(s: &mut TcpStream, user: &str, pass: &str) -> io::Result<u8> {
    let mut a = vec![5, 1, 2];
    a.extend_from_slice(&userpass(user.as_bytes(), pass.as_bytes()));
    s.write_all(&a)?;
    let mut m = [0u8; 4];
    s.read_exact(&mut m)?;
    assert_eq!(&m[..3], &[5, 2, 1], "method choice and status version");
    Ok(m[3])
}

/// Opens a SOCKS5 tunnel to `dst` over an already connected `s`. `Err` carries the reply code,
/// 0xFF for a refused login, 0xFE when the server closed first.
pub fn socks5_on(
    mut s: TcpStream,
    user: &str,
    pass: &str,
    dst: SocketAddr,
) -> Result<TcpStream, u8> {
    match socks5_auth_status(&mut s, user, pass) {
        Ok(0) => {}
        Ok(_) => return Err(0xFF),
        Err(_) => return Err(0xFE),
    }
    s.write_all(&socks5_request(dst)).map_err(|_| 0xFE)?;
    match socks5_reply(&mut s) {
        Ok(0) => Ok(s),
        Ok(code) => Err(code),
        Err(_) => Err(0xFE),
    }
}

/// Starts the origin's echo on a fresh tunnel.
pub fn start_echo(mut s: TcpStream) -> TcpStream {
    s.write_all(b"ECHO\n").unwrap();
    s
}

/// Sends `data` through an echo tunnel and checks the same bytes come back.
pub fn assert_echoes(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo of {} bytes: {e}", data.len()));
    assert_eq!(back, data, "echo differs");
}

/// Runs `f` and returns how long it took with its result.
pub fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// Prints a soak test's figures straight to stderr, past the test harness's capture, so that
/// `make soak` shows them even when the test passes.
pub fn report(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// A small xorshift generator, so floods vary without a dependency; the seed is printed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
