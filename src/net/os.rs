//! The operating system's knobs the proxies turn: the open-files limit (raised at start, and what
//! the default connection cap and the relays' pipe budget derive from), the kernel's memory-map
//! limit, glibc's allocator, and TCP keepalive (std has no call for it).

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// The default connection cap leaves one open file in this many to relay pipes (see
/// [`pipe_fd_budget`]): with 20,000 files, 9,135 connections and 1,666 pipe descriptors.
const PIPE_FILES_SHARE: u64 = 12;

/// Descriptors one relay pipe holds.
pub const FDS_PER_PIPE: usize = 2;

/// The default global connection cap: what both the open-files limit (two sockets each, after the
/// share kept for relay pipes) and the kernel's `vm.max_map_count` (a thread that cannot map its
/// stacks aborts the process) allow.
pub fn default_max_connections() -> usize {
    let files = current_nofile_limit().unwrap_or(1024);
    let by_files = files
        .saturating_sub(RESERVED_FILES)
        .saturating_sub(files / PIPE_FILES_SHARE)
        / 2;
    let by_maps = max_map_count().map_or(u64::MAX, |m| {
        m.saturating_sub(RESERVED_MAPS) / MAPS_PER_CONNECTION
    });
    by_files.min(by_maps).max(1) as usize
}

/// Descriptors relay pipes may hold at once in a process with `files` open files and a cap of
/// `max_connections`: what is left after the reserve and two sockets for every connection the cap
/// admits, so pipes never take a descriptor a connection under the cap would need. A busy plain
/// tunnel holds six descriptors (two sockets, a pipe each way); past this budget its directions
/// copy through a buffer instead.
pub fn pipe_fd_budget(files: u64, max_connections: usize) -> usize {
    let sockets = (max_connections as u64).saturating_mul(2);
    let left = files.saturating_sub(RESERVED_FILES).saturating_sub(sockets);
    usize::try_from(left).unwrap_or(usize::MAX)
}

/// The process's count of descriptors held by relay pipes, against its budget. Descriptors are a
/// process's, so there is one ([`PIPES`]); a server sets its limit at start, anything else gets
/// the budget of the default cap on first use.
pub struct PipeBudget {
    /// Most descriptors pipes may hold; [`UNSET`](PipeBudget::UNSET) until set or first used.
    limit: AtomicUsize,
    in_use: AtomicUsize,
}

/// The relays' pipe budget (see [`PipeBudget`]).
pub static PIPES: PipeBudget = PipeBudget::new(PipeBudget::UNSET);

impl PipeBudget {
    /// A limit not chosen yet: the first [`PipeBudget::try_take`] derives one.
    const UNSET: usize = usize::MAX;

    /// A budget of `limit` descriptors, none in use.
    pub const fn new(limit: usize) -> PipeBudget {
        PipeBudget {
            limit: AtomicUsize::new(limit),
            in_use: AtomicUsize::new(0),
        }
    }

    /// Sets the most descriptors pipes may hold (pipes already taken stay).
    pub fn set_limit(&self, fds: usize) {
        self.limit
            .store(fds.min(Self::UNSET - 1), Ordering::Relaxed);
    }

    /// The limit in descriptors.
    pub fn limit(&self) -> usize {
        let l = self.limit.load(Ordering::Relaxed);
        if l != Self::UNSET {
            return l;
        }
        let files = current_nofile_limit().unwrap_or(1024);
        let derived = pipe_fd_budget(files, default_max_connections());
        // Whoever set a limit meanwhile wins.
        let _ =
            self.limit
                .compare_exchange(Self::UNSET, derived, Ordering::Relaxed, Ordering::Relaxed);
        self.limit.load(Ordering::Relaxed)
    }

    /// Descriptors pipes hold now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Counts one pipe's descriptors if they fit under the limit; false (nothing counted) if not.
    /// A true must be matched by one [`PipeBudget::give_back`].
    pub fn try_take(&self) -> bool {
        let limit = self.limit();
        self.in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(FDS_PER_PIPE).filter(|&m| m <= limit)
            })
            .is_ok()
    }

    /// Uncounts one pipe taken with [`PipeBudget::try_take`].
    pub fn give_back(&self) {
        let _ = self
            .in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(FDS_PER_PIPE))
            });
    }
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

/// Allocations this large come from mmap: a relay's 64 KiB buffer (its header takes it past the
/// threshold) is then returned to the system when a quiet direction drops it, instead of staying
/// resident in an arena between other connections' allocations.
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;

/// Keeps memory in check for a process with thousands of threads: large allocations (argon2's
/// ~19 MiB work area, relay buffers) always come from mmap and go back to the system when freed,
/// instead of glibc raising its mmap threshold and keeping them in a per-thread arena; and the
/// number of arenas is bounded. glibc only; a no-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
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
pub fn set_keepalive(s: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    set_int_options(s, KEEPALIVE_OPTIONS)
}

/// SO_KEEPALIVE and its timings.
const KEEPALIVE_OPTIONS: &[(i32, i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
    (
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL_SECS,
    ),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
];

/// Sets a listening socket up as [`tune_relay_socket`] sets a relayed one: TCP_NODELAY and
/// keepalive. Linux copies both to every socket `accept` returns, so accepted sockets need no
/// `setsockopt` of their own (five fewer system calls per connection; checked by a test here).
///
/// # Errors
/// The first `setsockopt` that failed.
pub fn tune_listener(l: &std::net::TcpListener) -> io::Result<()> {
    set_nodelay_and_keepalive(l)
}

/// TCP_NODELAY, then SO_KEEPALIVE and its timings.
fn set_nodelay_and_keepalive(s: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    set_int_options(s, &[(libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)])?;
    set_keepalive(s)
}

/// Sets integer socket options in order, stopping at the first that fails.
fn set_int_options(s: &impl std::os::fd::AsRawFd, opts: &[(i32, i32, i32)]) -> io::Result<()> {
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
    opts.iter()
        .try_for_each(|&(level, name, v)| set(level, name, v))
}

/// Sets TCP_NODELAY and keepalive on a relayed socket; a failure only costs latency or the
/// noticing of a vanished peer, so it is logged at debug and the connection goes on.
pub fn tune_relay_socket(s: &TcpStream) {
    if let Err(e) = set_nodelay_and_keepalive(s) {
        log::debug!("cannot tune a relayed socket: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_option(s: &TcpStream, level: i32, name: i32) -> i32 {
        use std::os::fd::AsRawFd;
        let mut v: i32 = -1;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes to a valid i32.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut v as *mut i32).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn accepted_sockets_take_nodelay_and_keepalive_from_the_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (plain, _) = l.accept().unwrap();
        assert!(!plain.nodelay().unwrap());
        assert_eq!(int_option(&plain, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        tune_listener(&l).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(s.nodelay().unwrap());
        assert_eq!(int_option(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        let timings = [
            (libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
            (libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECS),
            (libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        ];
        for (name, want) in timings {
            assert_eq!(int_option(&s, libc::IPPROTO_TCP, name), want);
        }
    }

    #[test]
    fn pipes_get_what_the_connection_cap_leaves() {
        // 20,000 files, 9,000 connections: 18,000 sockets, 64 reserved, 1,936 for pipes.
        assert_eq!(pipe_fd_budget(20_000, 9_000), 1_936);
        // A cap that takes every file leaves nothing, and never underflows.
        assert_eq!(pipe_fd_budget(20_000, 9_968), 0);
        assert_eq!(pipe_fd_budget(20_000, usize::MAX), 0);
        assert_eq!(pipe_fd_budget(10, 0), 0);
        assert_eq!(pipe_fd_budget(1_064, 0), 1_000);
    }

    #[test]
    fn the_default_cap_leaves_a_share_for_pipes() {
        // The cap derived from files alone (vm.max_map_count may lower it further).
        let files: u64 = 20_000;
        let cap = (files - RESERVED_FILES - files / PIPE_FILES_SHARE) / 2;
        assert!(cap >= 9_000, "{cap}");
        let pipes = pipe_fd_budget(files, cap as usize);
        assert!(pipes >= (files / PIPE_FILES_SHARE) as usize, "{pipes}");
        // 9,000 tunnels, 1,000 busy: sockets + the pipes the budget allows stay under the limit.
        let used = 9_000 * 2 + pipes.min(1_000 * 2 * FDS_PER_PIPE) as u64 + RESERVED_FILES;
        assert!(used <= files, "{used}");
    }

    #[test]
    fn the_budget_counts_whole_pipes_and_refuses_past_the_limit() {
        let b = PipeBudget::new(5);
        assert!(b.try_take());
        assert!(b.try_take());
        assert_eq!(b.in_use(), 4);
        // A third pipe would need descriptors 5 and 6.
        assert!(!b.try_take());
        assert_eq!(b.in_use(), 4);
        b.give_back();
        assert!(b.try_take());
        b.set_limit(0);
        assert!(!b.try_take());
        b.give_back();
        b.give_back();
        b.give_back(); // one too many never wraps
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn an_unset_budget_derives_a_limit_on_first_use() {
        let b = PipeBudget::new(PipeBudget::UNSET);
        let files = current_nofile_limit().unwrap_or(1024);
        assert_eq!(b.limit(), pipe_fd_budget(files, default_max_connections()));
        b.set_limit(8);
        assert_eq!(b.limit(), 8);
    }
}
