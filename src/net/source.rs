//! Who a client is, for counting: an IPv4 address, or an IPv6 prefix (a /64, since one host holds
//! a whole /64; a /48 when the login throttle's table overflows). Handshake admission counts
//! slots per source (`admission.rs`) and the login throttle counts failures per source
//! (`auth/throttle.rs`); both take the type from here. Pure: no sockets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Who a failure is charged to: an IPv4 address, or an IPv6 prefix (/64, or /48 in overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    addr: IpAddr,
    prefix: u8,
}

impl Source {
    /// The source of a client address: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by its /64.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::v4(v4),
                None => Source::v6(v6, 64),
            },
            IpAddr::V4(v4) => Source::v4(v4),
        }
    }

    fn v4(a: Ipv4Addr) -> Source {
        Source {
            addr: IpAddr::V4(a),
            prefix: 32,
        }
    }

    fn v6(a: Ipv6Addr, prefix: u8) -> Source {
        let mask = u128::MAX << (128 - u32::from(prefix));
        Source {
            addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
            prefix,
        }
    }

    /// The prefix length in bits: 32 for IPv4, 64 or 48 for IPv6.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The /48 an IPv6 source lies in (`None` for IPv4).
    pub fn wider(self) -> Option<Source> {
        match self.addr {
            IpAddr::V6(a) if self.prefix > 48 => Some(Source::v6(a, 48)),
            _ => None,
        }
    }

    /// Reads `1.2.3.4`, an IPv6 address (its /64), or `2001:db8::/64` or `/48`.
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(s: &str) -> Result<Source, String> {
        let bad = || {
            format!(
                "bad source {s:?}: expected an IPv4 address, an IPv6 address, or an IPv6 /64 or /48"
            )
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        match (Source::of(ip), prefix) {
            (src, None) => Ok(src),
            (src, Some(32)) if src.addr.is_ipv4() => Ok(src),
            (
                Source {
                    addr: IpAddr::V6(a),
                    ..
                },
                Some(p @ (48 | 64)),
            ) => Ok(Source::v6(a, p)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_addresses_and_ipv6_64s() {
        assert_eq!(Source::of(ip("192.0.2.1")).to_string(), "192.0.2.1");
        assert_eq!(Source::of(ip("::ffff:192.0.2.1")).to_string(), "192.0.2.1");
        assert_eq!(
            Source::of(ip("2001:db8:1:2:3:4:5:6")).to_string(),
            "2001:db8:1:2::/64"
        );
        let s = Source::of(ip("2001:db8:1:2::9"));
        assert_eq!(s.wider().unwrap().to_string(), "2001:db8:1::/48");
        assert_eq!(Source::parse("2001:db8:1:2::9").unwrap(), s);
        assert_eq!(Source::parse("2001:db8:1:2::/64").unwrap(), s);
        assert_eq!(
            Source::parse("2001:db8:1::/48").unwrap(),
            s.wider().unwrap()
        );
        assert_eq!(
            Source::parse("192.0.2.1/32").unwrap(),
            Source::of(ip("192.0.2.1"))
        );
        for bad in ["", "x", "192.0.2.1/24", "2001:db8::/56", "2001:db8::/x"] {
            assert!(Source::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
