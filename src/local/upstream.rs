//! The local proxy's side of the Sluice server: one SOCKS5 connection per app connection, logged
//! in with username/password (RFC 1929), asking CONNECT for the app's destination as given.
//!
//! A destination name is sent unresolved (ATYP 3): the user's machine never looks it up. Only the
//! server's own name is resolved here. The whole exchange runs under the app's handshake deadline.
//! The codec is `wire::socks5`; how each failure is told to the app (SOCKS5 reply, SOCKS4 reject,
//! HTTP status) is [`UpstreamError::reply`] and [`UpstreamError::status`], pure and tested below.

use crate::net::dial::{self, DialError, DialPolicy};
use crate::net::handshake::DeadlineReader;
use crate::net::stream::{self, Stream, is_timeout};
use crate::net::tls;
use crate::wire::http::Status;
use crate::wire::socks5::{self, Command, Reply, SocksError};
use crate::wire::target::{Host, Target};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why no tunnel through the server was opened.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The server's name did not resolve or no connect to it succeeded.
    Unreachable(DialError),
    /// The server refused the username and password.
    Rejected,
    /// The server chose an auth method other than username/password (0xFF: none acceptable).
    Method(u8),
    /// The server logged us in but could not open the destination.
    Refused(Reply),
    /// The exchange broke: a timeout, the server closing, or bytes that are not SOCKS5.
    Protocol(SocksError),
    /// TLS to the server failed: its certificate was not trusted, or the handshake broke.
    Tls(io::Error),
}

impl UpstreamError {
    /// The SOCKS5 reply for the app: the server's own code when it sent one, 0x06 when the
    /// deadline passed while waiting for the server, else 0x01 (general failure).
    pub fn reply(&self) -> Reply {
        match self {
            UpstreamError::Refused(r) => *r,
            UpstreamError::Protocol(SocksError::Io(e)) if is_timeout(e) => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }

    /// The HTTP status for the app: 403 for a destination the server does not allow, 504 for
    /// a timeout, 502 for everything else (as the server answers its own HTTP clients).
    pub fn status(&self) -> Status {
        dial::status_for(self.reply())
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Unreachable(e) => write!(f, "sluice server unreachable: {e}"),
            UpstreamError::Rejected => f.write_str("sluice server rejected the login"),
            UpstreamError::Method(m) => write!(
                f,
                "sluice server does not offer username/password login (chose method {m:#04x})"
            ),
            UpstreamError::Refused(r) => write!(f, "server: {}", r.description()),
            UpstreamError::Protocol(SocksError::Io(e)) if is_timeout(e) => {
                f.write_str("no answer from the sluice server in time")
            }
            UpstreamError::Protocol(e) => write!(f, "sluice server handshake failed: {e}"),
            UpstreamError::Tls(e) => write!(f, "tls to the sluice server failed: {e}"),
        }
    }
}

impl From<SocksError> for UpstreamError {
    fn from(e: SocksError) -> Self {
        UpstreamError::Protocol(e)
    }
}

impl From<io::Error> for UpstreamError {
    fn from(e: io::Error) -> Self {
        UpstreamError::Protocol(SocksError::Io(e))
    }
}

/// Where and as whom to open tunnels.
pub(crate) struct Login<'a> {
    /// The server (its name, if any, is resolved when dialing).
    pub server: &'a Target,
    pub user: &'a str,
    pub password: &'a str,
    /// Time allowed to connect to the server (also capped by the deadline).
    pub connect_timeout: Duration,
    /// TLS to the server, if configured: the client config and the name to verify.
    pub tls: Option<&'a (Arc<ClientConfig>, ServerName<'static>)>,
}

/// Connects to the server, logs in and asks for a CONNECT to `target`, all before `deadline`.
/// Returns the tunnel, ready for the relay, and the address the server bound when it told one.
/// Blocking.
///
/// # Errors
/// [`UpstreamError`] saying which step failed.
pub(crate) fn open(
    login: &Login<'_>,
    target: &Target,
    deadline: Instant,
) -> Result<(Stream, Option<SocketAddr>), UpstreamError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::from(io::ErrorKind::TimedOut).into());
    }
    let policy = DialPolicy {
        // The user chose this server; any address it has is fine.
        allow_private: true,
        connect_timeout: login.connect_timeout.min(left),
        own_addrs: std::sync::Arc::new(crate::net::own_addrs::OwnAddrs::none()),
    };
    let sock = dial::dial(login.server, &policy).map_err(UpstreamError::Unreachable)?;
    let _ = sock.set_nodelay(true);
    let server = match login.tls {
        None => Stream::plain(sock),
        Some((cfg, name)) => {
            tls::connect(sock, cfg, name.clone(), deadline).map_err(UpstreamError::Tls)?
        }
    };
    let bound = handshake(&server, login, target, deadline)?;
    Ok((server, bound))
}

/// Greeting, login, request, reply, one step at a time (some servers mishandle pipelining).
fn handshake(
    server: &Stream,
    login: &Login<'_>,
    target: &Target,
    deadline: Instant,
) -> Result<Option<SocketAddr>, UpstreamError> {
    let mut r = DeadlineReader::new(server, deadline);
    stream::arm(server.socket(), deadline)?;
    let w = server;
    w.write_all(&socks5::encode_greeting(&[socks5::METHOD_USER_PASS]))?;
    let method = socks5::read_method_choice(&mut r)?;
    if method != socks5::METHOD_USER_PASS {
        return Err(UpstreamError::Method(method));
    }
    let creds = socks5::encode_userpass(login.user.as_bytes(), login.password.as_bytes())?;
    w.write_all(&creds)?;
    if !socks5::read_userpass_status(&mut r)? {
        return Err(UpstreamError::Rejected);
    }
    w.write_all(&socks5::encode_request(Command::Connect, target)?)?;
    let msg = socks5::read_reply(&mut r)?;
    if msg.reply != Reply::Succeeded {
        return Err(UpstreamError::Refused(msg.reply));
    }
    Ok(match msg.bound.host {
        Host::Ip(ip) => Some(SocketAddr::new(ip, msg.bound.port)),
        Host::Domain(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_pass_through_to_socks5_and_map_to_http() {
        let cases = [
            (Reply::NotAllowed, Status::Forbidden),
            (Reply::TtlExpired, Status::GatewayTimeout),
            (Reply::HostUnreachable, Status::BadGateway),
            (Reply::ConnectionRefused, Status::BadGateway),
            (Reply::NetworkUnreachable, Status::BadGateway),
            (Reply::GeneralFailure, Status::BadGateway),
        ];
        for (reply, status) in cases {
            let e = UpstreamError::Refused(reply);
            assert_eq!(e.reply(), reply);
            assert_eq!(e.status(), status, "{reply:?}");
        }
    }

    #[test]
    fn local_failures_are_general_failure_and_502() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        for e in [
            UpstreamError::Rejected,
            UpstreamError::Method(0xFF),
            UpstreamError::Unreachable(DialError::Connect(refused)),
            UpstreamError::Protocol(SocksError::BadReply(9)),
            UpstreamError::Protocol(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
        ] {
            assert_eq!(e.reply(), Reply::GeneralFailure, "{e}");
            assert_eq!(e.status(), Status::BadGateway, "{e}");
        }
    }

    #[test]
    fn a_silent_server_is_a_gateway_timeout() {
        let e: UpstreamError = io::Error::from(io::ErrorKind::TimedOut).into();
        assert_eq!(e.reply(), Reply::TtlExpired);
        assert_eq!(e.status(), Status::GatewayTimeout);
    }

    #[test]
    fn display_says_what_failed() {
        assert_eq!(
            UpstreamError::Refused(Reply::HostUnreachable).to_string(),
            "server: host unreachable"
        );
        assert!(UpstreamError::Method(0xFF).to_string().contains("0xff"));
    }
}
