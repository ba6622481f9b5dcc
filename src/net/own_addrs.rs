//! The proxy host's own interface addresses, which the destination policy refuses like private
//! ones: a client must not reach services bound to `0.0.0.0` on the proxy host (the metrics
//! port, Sluice itself) through the host's public address.
//!
//! The list is read with `getifaddrs(3)` at start and again when a check finds it older than
//! [`REFRESH`], so an address added later is refused within a minute; no thread is needed. The
//! reader is injected, so the refresh and the matching are tested without touching interfaces.
//! How an address embeds another (IPv4 inside IPv6) is the policy's business (`dial.rs`).

use log::warn;
use parking_lot::Mutex;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How old the list may get before a check reads it again.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Reads the addresses (the system's `getifaddrs`, or a test's list).
type Reader = Box<dyn Fn() -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// The host's addresses as last read, and when.
struct Snapshot {
    read_at: Instant,
    addrs: Vec<IpAddr>,
}

/// The host's own addresses, refreshed on use when older than [`REFRESH`].
pub struct OwnAddrs {
    read: Reader,
    state: Mutex<Snapshot>,
}

impl fmt::Debug for OwnAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.state.lock().addrs).finish()
    }
}

impl OwnAddrs {
    /// The interfaces' addresses, read now with `getifaddrs` (blocking, microseconds). A failed
    /// read is logged and leaves the list empty until the next refresh.
    pub fn system() -> OwnAddrs {
        OwnAddrs::with_reader(Box::new(interface_addrs), Instant::now())
    }

    /// An empty list that stays empty (a policy that allows private destinations anyway).
    pub fn none() -> OwnAddrs {
        OwnAddrs::with_reader(Box::new(|| Ok(Vec::new())), Instant::now())
    }

    /// A list read by `read`, first at `now` (tests inject both).
    pub fn with_reader(read: Reader, now: Instant) -> OwnAddrs {
        let addrs = read_or_log(&read);
        OwnAddrs {
            read,
            state: Mutex::new(Snapshot {
                read_at: now,
                addrs,
            }),
        }
    }

    /// True if `ip` is one of the host's addresses, reading the list again first if it is older
    /// than [`REFRESH`] at `now`. Blocking only for that read.
    pub fn contains(&self, ip: IpAddr, now: Instant) -> bool {
        let mut st = self.state.lock();
        if now.saturating_duration_since(st.read_at) >= REFRESH {
            st.addrs = read_or_log(&self.read);
            st.read_at = now;
        }
        st.addrs.contains(&ip)
    }

    /// How many addresses the list holds now (for the start-up log).
    pub fn len(&self) -> usize {
        self.state.lock().addrs.len()
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_or_log(read: &Reader) -> Vec<IpAddr> {
    read().unwrap_or_else(|e| {
        warn!("cannot list this host's interface addresses ({e}); they are not refused until a read works");
        Vec::new()
    })
}

/// Every IPv4 and IPv6 address of every interface (`getifaddrs(3)`), up or not.
///
/// # Errors
/// `getifaddrs` failed (out of memory or file descriptors).
pub fn interface_addrs() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we own until freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            out.push(ip);
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; nothing above outlives it.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The address in a `sockaddr` of family `AF_INET` or `AF_INET6`; `None` for others or null.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr of the size its family implies.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller promises a valid sockaddr; the family says which struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_list_is_read_again_once_a_minute_old() {
        let list = Arc::new(Mutex::new(vec![ip("203.0.113.7")]));
        let l = list.clone();
        let t0 = Instant::now();
        let own = OwnAddrs::with_reader(Box::new(move || Ok(l.lock().clone())), t0);
        assert!(own.contains(ip("203.0.113.7"), t0));
        assert!(!own.contains(ip("198.51.100.1"), t0));
        list.lock().push(ip("198.51.100.1"));
        assert!(
            !own.contains(ip("198.51.100.1"), t0 + REFRESH / 2),
            "read early"
        );
        assert!(
            own.contains(ip("198.51.100.1"), t0 + REFRESH),
            "not read again"
        );
        assert_eq!(own.len(), 2);
    }

    #[test]
    fn a_failed_read_leaves_the_list_empty_until_one_works() {
        let ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let o = ok.clone();
        let t0 = Instant::now();
        let own = OwnAddrs::with_reader(
            Box::new(move || {
                if o.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(vec![ip("2001:db8::7")])
                } else {
                    Err(io::Error::other("no"))
                }
            }),
            t0,
        );
        assert!(own.is_empty());
        ok.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(own.contains(ip("2001:db8::7"), t0 + REFRESH));
    }

    #[test]
    fn the_system_list_has_loopback() {
        let addrs = interface_addrs().unwrap();
        assert!(addrs.iter().any(IpAddr::is_loopback), "{addrs:?}");
    }
}
