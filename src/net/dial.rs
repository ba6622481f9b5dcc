//! Reaching the destination: resolve, check every address against the policy, connect with a
//! timeout trying each address in turn.
//!
//! The policy refuses loopback, private, shared (CGNAT), link-local (cloud metadata), unspecified,
//! multicast, broadcast and reserved addresses, including IPv4 addresses embedded in IPv6
//! (mapped, compatible, NAT64, 6to4), unless `allow_private` is set; and the host's own interface
//! addresses (`own_addrs.rs`), so a client cannot reach what listens on `0.0.0.0` here. The
//! classifier is pure. A refusal tells the client only that the policy refused; the address a name
//! resolved to goes to the log.

use crate::net::own_addrs::OwnAddrs;
use crate::wire::http::Status;
use crate::wire::socks5::Reply;
use crate::wire::target::{Host, Target};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the server dials.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    /// Allow loopback and private destinations (tests, private deployments).
    pub allow_private: bool,
    /// Time allowed for each connect attempt.
    pub connect_timeout: Duration,
    /// The host's own addresses, refused unless `allow_private`.
    pub own_addrs: Arc<OwnAddrs>,
}

impl DialPolicy {
    /// True if the policy refuses `ip`: an internal range, or one of the host's own addresses
    /// (also when embedded in an IPv6 address). May read the interfaces (see `own_addrs.rs`).
    pub fn refuses(&self, ip: IpAddr) -> bool {
        if self.allow_private {
            return false;
        }
        let now = Instant::now();
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        is_forbidden(ip)
            || self.own_addrs.contains(ip, now)
            || embedded.is_some_and(|v4| self.own_addrs.contains(v4, now))
    }
}

/// Why a destination could not be reached.
#[derive(Debug)]
pub enum DialError {
    /// The destination (or one of its addresses) is refused by policy.
    Forbidden(IpAddr),
    /// The name did not resolve.
    Resolve(io::Error),
    /// Every connect attempt failed; this is the last error.
    Connect(io::Error),
}

impl DialError {
    /// The SOCKS5 reply for this failure.
    pub fn reply(&self) -> Reply {
        match self {
            DialError::Forbidden(_) => Reply::NotAllowed,
            DialError::Resolve(_) => Reply::HostUnreachable,
            DialError::Connect(e) => Reply::from_io_error(e),
        }
    }

    /// The HTTP status for this failure: 403 policy, 504 timeout, else 502.
    pub fn status(&self) -> Status {
        status_for(self.reply())
    }

    /// What the client is told. Unlike `Display` (the log's), a policy refusal does not name the
    /// address: that would tell an outsider what an internal name resolves to.
    pub fn client_reason(&self) -> String {
        match self {
            DialError::Forbidden(_) => "destination refused by policy".into(),
            other => other.to_string(),
        }
    }
}

/// The HTTP status that tells an HTTP client what a SOCKS5 reply tells a SOCKS client: 403 for a
/// destination not allowed, 504 for a timeout, 502 for any other failure. Shared by the server's
/// own dial failures and the local proxy's translation of the server's replies.
pub fn status_for(reply: Reply) -> Status {
    match reply {
        Reply::NotAllowed => Status::Forbidden,
        Reply::TtlExpired => Status::GatewayTimeout,
        _ => Status::BadGateway,
    }
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Forbidden(ip) => write!(f, "destination {ip} refused by policy"),
            DialError::Resolve(e) => write!(f, "name not resolved: {e}"),
            DialError::Connect(e) => write!(f, "connect failed: {e}"),
        }
    }
}

/// Resolves `target` (blocking), checks every address, and connects to the first that answers.
///
/// # Errors
/// [`DialError`] saying which step failed.
pub fn dial(target: &Target, policy: &DialPolicy) -> Result<TcpStream, DialError> {
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        // RFC 6761 §6.4: `.invalid` never resolves; answer at once without asking DNS.
        Host::Domain(name) if is_special_invalid(name) => {
            return Err(DialError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "the .invalid domain never resolves (RFC 6761)",
            )));
        }
        Host::Domain(name) => (name.as_str(), target.port)
            .to_socket_addrs()
            .map_err(DialError::Resolve)?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(DialError::Resolve(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    if let Some(bad) = addrs.iter().find(|a| policy.refuses(a.ip())) {
        return Err(DialError::Forbidden(bad.ip()));
    }
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, policy.connect_timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    // addrs is non-empty, so the loop ran and set `last`.
    Err(DialError::Connect(
        last.unwrap_or_else(|| io::Error::other("no address tried")),
    ))
}

/// True for names under the reserved `.invalid` top-level domain (any case, trailing dot allowed).
fn is_special_invalid(name: &str) -> bool {
    let n = name.strip_suffix('.').unwrap_or(name);
    let tail = n.len().saturating_sub(".invalid".len());
    n.eq_ignore_ascii_case("invalid")
        || (n.is_char_boundary(tail) && n[tail..].eq_ignore_ascii_case(".invalid"))
}

/// True for addresses a public proxy must not reach.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 shared address space
        || a >= 240 // reserved
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // 192.0.0/24 IETF protocol assignments
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_forbidden_v4(v4);
    }
    let seg0 = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg0 & 0xfe00) == 0xfc00 // fc00::/7 unique local
        || (seg0 & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (seg0 & 0xffc0) == 0xfec0 // fec0::/10 deprecated site-local
}

/// The IPv4 address inside a mapped, compatible, NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail); // ::a.b.c.d, deprecated IPv4-compatible
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> bool {
        is_forbidden(s.parse().unwrap())
    }

    #[test]
    fn refuses_every_internal_range() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.255",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "2002:7f00:1::1",
        ] {
            assert!(f(s), "{s} should be refused");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.0.2.1",
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!f(s), "{s} should be allowed");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_refused_unless_private_is_allowed() {
        let own = vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8:7::1".parse().unwrap(),
        ];
        let mut policy = DialPolicy {
            allow_private: false,
            connect_timeout: Duration::from_secs(1),
            own_addrs: Arc::new(OwnAddrs::with_reader(
                Box::new(move || Ok(own.clone())),
                Instant::now(),
            )),
        };
        let refused = |p: &DialPolicy, s: &str| p.refuses(s.parse().unwrap());
        for s in [
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "64:ff9b::cb00:7107",
            "2002:cb00:7107::1",
            "2001:db8:7::1",
            "127.0.0.1",
        ] {
            assert!(refused(&policy, s), "{s} should be refused");
        }
        for s in ["203.0.113.8", "2001:db8:7::2", "8.8.8.8"] {
            assert!(!refused(&policy, s), "{s} should be allowed");
        }
        let t = Target::parse("203.0.113.7:9", None).unwrap();
        assert!(matches!(dial(&t, &policy), Err(DialError::Forbidden(_))));
        policy.allow_private = true;
        assert!(!refused(&policy, "203.0.113.7"));
    }

    #[test]
    fn a_policy_refusal_does_not_tell_the_client_the_address() {
        let e = DialError::Forbidden("10.1.2.3".parse().unwrap());
        assert!(e.to_string().contains("10.1.2.3"), "the log keeps it");
        assert_eq!(e.client_reason(), "destination refused by policy");
    }

    #[test]
    fn dial_errors_map_to_replies_and_statuses() {
        let forbidden = DialError::Forbidden("127.0.0.1".parse().unwrap());
        assert_eq!(
            (forbidden.reply(), forbidden.status()),
            (Reply::NotAllowed, Status::Forbidden)
        );
        let timeout = DialError::Connect(io::ErrorKind::TimedOut.into());
        assert_eq!(
            (timeout.reply(), timeout.status()),
            (Reply::TtlExpired, Status::GatewayTimeout)
        );
        let refused = DialError::Connect(io::ErrorKind::ConnectionRefused.into());
        assert_eq!(
            (refused.reply(), refused.status()),
            (Reply::ConnectionRefused, Status::BadGateway)
        );
        let unresolved = DialError::Resolve(io::ErrorKind::NotFound.into());
        assert_eq!(unresolved.reply(), Reply::HostUnreachable);
    }

    #[test]
    fn dot_invalid_fails_without_a_lookup() {
        let policy = DialPolicy {
            allow_private: true,
            connect_timeout: Duration::from_secs(1),
            own_addrs: Arc::new(OwnAddrs::none()),
        };
        for n in ["nothing.invalid", "A.INVALID.", "invalid"] {
            let t = Target::parse(&format!("{n}:80"), None).unwrap();
            let e = dial(&t, &policy).err().unwrap();
            assert_eq!(e.reply(), Reply::HostUnreachable, "{n}");
        }
        assert!(!is_special_invalid("invalid.example"));
        assert!(!is_special_invalid("notinvalid"));
    }

    #[test]
    fn policy_is_checked_before_connecting() {
        let policy = DialPolicy {
            allow_private: false,
            connect_timeout: Duration::from_secs(1),
            own_addrs: Arc::new(OwnAddrs::none()),
        };
        let t = Target::parse("127.0.0.1:9", None).unwrap();
        assert!(matches!(dial(&t, &policy), Err(DialError::Forbidden(_))));
        let t = Target::parse("localhost:9", None).unwrap();
        assert!(matches!(dial(&t, &policy), Err(DialError::Forbidden(_))));
    }
}
