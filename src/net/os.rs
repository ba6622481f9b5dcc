//! The operating system's knobs the proxies turn: the open-files limit (raised at start, and what
//! the default connection cap derives from), the kernel's memory-map limit, glibc's allocator, and
//! TCP keepalive (std has no call for it).

use std::io;
use std::net::TcpStream;

/// TCP keepalive: first probe after this much silence, then every interval, giving up after count.
const KEEPALIVE_IDLE_SECS: i32 = 60;
const KEEPALIVE_INTERVAL_SECS: i32 = 10;
const KEEPALIVE_PROBES: i32 = 6;

/// Files kept free for the database, logs and the listener when deriving the connection cap.
const RESERVED_FILES: u64 = 64;

/// Memory maps a connection costs: two threads, each with a stack and its guard page and an
/// alternate signal stack with its guard page (std's stack-overflow handler).
const MAPS_PER_CONNECTION: u64 = 8;
/// Maps kept free for the rest of the process (libraries, heap, the database).
const RESERVED_MAPS: u64 = 2048;

/// The default global connection cap: what both the open-files limit (two sockets each) and the
/// kernel's `vm.max_map_count` (a thread that cannot map its stacks aborts the process) allow.
pub fn default_max_connections() -> usize {
    let files = current_nofile_limit().unwrap_or(1024);
    let by_files = files.saturating_sub(RESERVED_FILES) / 2;
    let by_maps = max_map_count().map_or(u64::MAX, |m| {
        m.saturating_sub(RESERVED_MAPS) / MAPS_PER_CONNECTION
    });
    by_files.min(by_maps).max(1) as usize
}

/// The kernel's limit on memory maps per process, if it can be read.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn current_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

/// Keeps memory in check for a process with thousands of threads: large allocations (argon2's
/// ~19 MiB work area) always come from mmap and go back to the system when freed, instead of
/// glibc raising its mmap threshold and keeping them in a per-thread arena; and the number of
/// arenas is bounded. glibc only; a no-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Raises the soft open-files limit to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// Turns on TCP keepalive (std has no call for it), so a peer that vanished without a FIN or RST
/// is noticed in minutes rather than never.
///
/// # Errors
/// The first `setsockopt` that failed (the socket then keeps the settings made before it).
pub fn set_keepalive(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level, name, v: i32| {
        // SAFETY: setsockopt reads one int from a valid pointer of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL_SECS,
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES)
}

/// Sets TCP_NODELAY and keepalive on a relayed socket; a failure only costs latency or the
/// noticing of a vanished peer, so it is logged at debug and the connection goes on.
pub fn tune_relay_socket(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true).and_then(|()| set_keepalive(s)) {
        log::debug!("cannot tune a relayed socket: {e}");
    }
}
