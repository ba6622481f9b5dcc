//! Where a client wants to go: a host (an IP address or a domain name, unresolved) and a port.
//!
//! Shared by the SOCKS and HTTP decoders and by the dialer. Pure: no sockets, no DNS.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Longest domain name accepted anywhere (the SOCKS5 length byte allows 255).
pub const MAX_DOMAIN_LEN: usize = 255;

/// The host part of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A literal IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A name that the dialer resolves (never resolved by `sluice local`).
    Domain(String),
}

/// A destination: host and port, as a client asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host, literal or by name.
    pub host: Host,
    /// The TCP port.
    pub port: u16,
}

/// Why a `host:port` string is not a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError(pub &'static str);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad destination: {}", self.0)
    }
}

impl std::error::Error for TargetError {}

impl Target {
    /// Parses `host:port`, `[v6]:port`, or (when `default_port` is given) a bare host or `[v6]`.
    ///
    /// # Errors
    /// An empty host, a missing or invalid port, an unbalanced bracket, a bare IPv6 literal without
    /// brackets, or a name that is too long or holds characters no hostname has.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest
                .find(']')
                .ok_or(TargetError("unclosed '[' in address"))?;
            let v6: Ipv6Addr = rest[..end]
                .parse()
                .map_err(|_| TargetError("invalid IPv6 literal"))?;
            let after = &rest[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => default_port.ok_or(TargetError("missing port"))?,
                None => return Err(TargetError("junk after ']'")),
            };
            (Host::Ip(IpAddr::V6(v6)), port)
        } else {
            let (h, port) = match s.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (s, default_port.ok_or(TargetError("missing port"))?),
            };
            if h.contains(':') {
                return Err(TargetError("IPv6 literal must be in brackets"));
            }
            (host_from_str(h)?, port)
        };
        Ok(Target { host, port })
    }
}

/// A host from a name or literal (no brackets, no port).
///
/// # Errors
/// Empty, longer than [`MAX_DOMAIN_LEN`], or holding whitespace, control characters or '/'.
pub fn host_from_str(h: &str) -> Result<Host, TargetError> {
    if h.is_empty() {
        return Err(TargetError("empty host"));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    if h.len() > MAX_DOMAIN_LEN {
        return Err(TargetError("host name longer than 255 bytes"));
    }
    if h.bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'/' || b == b'@' || b == b'\\')
    {
        return Err(TargetError("invalid character in host name"));
    }
    Ok(Host::Domain(h.to_string()))
}

fn parse_port(p: &str) -> Result<u16, TargetError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError("port must be 1-65535")),
        Ok(n) => Ok(n),
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Domain(d) => f.write_str(d),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let t = Target::parse("example.com:443", None).unwrap();
        assert_eq!(t.host, Host::Domain("example.com".into()));
        assert_eq!(t.port, 443);
        let t = Target::parse("[::1]:8080", None).unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(t.to_string(), "[::1]:8080");
        let t = Target::parse("127.0.0.1:1", None).unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:1");
        assert_eq!(Target::parse("host", Some(80)).unwrap().port, 80);
        assert_eq!(Target::parse("[::1]", Some(80)).unwrap().port, 80);
    }

    #[test]
    fn refuses_bad_forms() {
        for bad in [
            "",
            ":80",
            "host",
            "host:0",
            "host:65536",
            "host:x",
            "[::1",
            "[zz]:1",
            "::1:80",
            "[::1]x",
            "a b:80",
            "a/b:80",
        ] {
            assert!(Target::parse(bad, None).is_err(), "{bad:?} should fail");
        }
        let long = format!("{}:80", "a".repeat(256));
        assert!(Target::parse(&long, None).is_err());
    }
}
