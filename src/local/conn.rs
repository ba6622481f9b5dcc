//! One app connection of `sluice local`: tell the protocol by its first byte (SOCKS5, SOCKS4/4a or
//! HTTP), read what the app asks for under the handshake deadline, open a tunnel through the
//! server (`upstream.rs`), answer the app in its own protocol, then relay with no limit of ours.
//!
//! Apps are not asked for credentials: whoever reaches the port uses the configured account, which
//! is why `local/mod.rs` listens on loopback unless told otherwise. Refusals of an app are warn lines.
//! Every connection that named a destination ends with one info line, except that a server that
//! cannot be reached or refuses the login is reported once per burst (see `Burst`), not per
//! connection, since a browser opens dozens of connections at once.

use crate::local::shared::{Burst, LocalShared};
use crate::local::upstream::{self, UpstreamError};
use crate::net::forward::{self, Refused};
use crate::net::handshake::{
    self, DeadlineReader, EndLine, HeadError, Proto, Sniffed, io_reason, send, socks_fail,
};
use crate::net::relay::Budget;
use crate::net::relay::{self, Direction, End, Outcome};
use crate::net::stream::Stream;
use crate::wire::http::{self, Status};
use crate::wire::socks5::{self, Command, Reply, SocksError};
use crate::wire::target::{Host, Target};
use log::{debug, info, warn};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

/// What an app asked for: where to, and bytes to send ahead of its own (a plain HTTP request's
/// rewritten head, bytes the app sent right after its request).
struct Ask {
    proto: Proto,
    target: Target,
    prefix: Vec<u8>,
}

/// Serves one app connection to its end. Blocking; runs on the connection's own thread.
pub(crate) fn handle(sock: TcpStream, peer: SocketAddr, id: u64, sh: &LocalShared) {
    let started = Instant::now();
    // TCP_NODELAY came from the listener (`os::tune_listener`).
    let client = Stream::plain(sock);
    let mut r = DeadlineReader::reading_ahead(&client, started + sh.handshake_timeout);
    let Some(ask) = read_ask(&mut r, peer, id, sh) else {
        return;
    };
    let log = EndLine {
        id,
        peer,
        user: &sh.user,
        proto: ask.proto,
        dest: &ask.target,
        started,
    };
    match upstream::open(&sh.login(), &ask.target, r.deadline) {
        Ok((server, bound)) => {
            server_answered(sh);
            if !send(&client, &granted(ask.proto, bound)) {
                log.info(0, 0, "app closed before the answer");
                return;
            }
            let (up, down, end) = run_relay(client, server, &ask, id);
            log.info(up, down, end);
        }
        Err(e) => {
            send(&client, &refusal(ask.proto, &e, &sh.user));
            log_failure(&e, &log, sh);
        }
    }
}

/// Tells the protocol by the first byte and reads the app's request; `None` if there is nothing
/// to open (the app was answered, if it could be, and the reason logged).
fn read_ask(
    r: &mut DeadlineReader<'_>,
    peer: SocketAddr,
    id: u64,
    sh: &LocalShared,
) -> Option<Ask> {
    match handshake::sniff(r, peer, id)? {
        Sniffed::Socks5 => socks5_ask(r, peer, id),
        Sniffed::Socks4 => socks4_ask(r, peer, id),
        Sniffed::Http => http_ask(r, peer, id, sh),
        Sniffed::Unknown(first) => {
            handshake::unknown_protocol(peer, id, first);
            None
        }
    }
}

/// Relays until both directions end; returns bytes up, bytes down and how it ended.
fn run_relay(client: Stream, server: Stream, ask: &Ask, id: u64) -> (u64, u64, String) {
    let outcome = match relay::send_prefix(&server, &ask.prefix, None, Direction::Up) {
        Ok(()) => relay::relay(
            client,
            server,
            None,
            &format!("local#{id}"),
            ask.prefix.len() as u64,
        ),
        Err(end) => Ok(Outcome {
            up: 0,
            down: 0,
            end,
        }),
    };
    match outcome {
        Ok(o) => (o.up, o.down, o.end.to_string()),
        Err(e) => (0, 0, End::Error(e).to_string()),
    }
}

/// The answer that opens the tunnel; a plain HTTP request gets none (the origin answers it).
fn granted(proto: Proto, bound: Option<SocketAddr>) -> Vec<u8> {
    match proto {
        Proto::Socks5 => socks5::encode_reply(Reply::Succeeded, bound),
        Proto::Socks4 | Proto::Socks4a => socks5::encode_socks4_reply(true).to_vec(),
        Proto::HttpConnect => http::encode_response(Status::Ok, ""),
        Proto::Http => Vec::new(),
    }
}

/// The server's failure, told in the app's protocol.
fn refusal(proto: Proto, e: &UpstreamError, user: &str) -> Vec<u8> {
    match proto {
        Proto::Socks5 => socks5::encode_reply(e.reply(), None),
        Proto::Socks4 | Proto::Socks4a => socks5::encode_socks4_reply(false).to_vec(),
        Proto::HttpConnect | Proto::Http => {
            http::encode_response(e.status(), &http_detail(e, user))
        }
    }
}

/// What an HTTP app is told about the server's failure.
fn http_detail(e: &UpstreamError, user: &str) -> String {
    match e {
        UpstreamError::Rejected => format!("the sluice server rejected user {user}"),
        other => other.to_string(),
    }
}

/// The server reached us and took the login: an outage or refusal under way is over.
fn server_answered(sh: &LocalShared) {
    if let Some(n) = sh.unreachable.settle() {
        info!("server {} reachable again{}", sh.server, unlogged(n));
    }
    if let Some(n) = sh.rejected.settle() {
        info!("server accepts user {} again{}", sh.user, unlogged(n));
    }
}

/// Logs a failed tunnel: problems with the server itself once per burst, the rest per connection.
fn log_failure(e: &UpstreamError, log: &EndLine<'_>, sh: &LocalShared) {
    let (burst, what): (&Burst, String) = match e {
        UpstreamError::Unreachable(d) => (
            &sh.unreachable,
            format!("cannot reach server {}: {d}", sh.server),
        ),
        UpstreamError::Rejected => (
            &sh.rejected,
            format!(
                "server rejected user {}: check --user and the password",
                sh.user
            ),
        ),
        UpstreamError::Method(_) => (&sh.rejected, format!("server {}: {e}", sh.server)),
        // A certificate that is not trusted is a problem with the server, reported per burst.
        UpstreamError::Tls(_) => (&sh.unreachable, format!("server {}: {e}", sh.server)),
        UpstreamError::Refused(_) => {
            server_answered(sh);
            log.info(0, 0, e);
            return;
        }
        UpstreamError::Protocol(_) => {
            log.info(0, 0, e);
            return;
        }
    };
    if let Some(n) = burst.record(Instant::now()) {
        warn!("conn#{} {} {what}{}", log.id, log.peer, unlogged(n));
    }
    debug!("{}", log.text(0, 0, e));
}

fn unlogged(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more like this since the last report)"),
    }
}

/// The auth method to choose from an app's offer: none if offered, else username/password (the
/// credentials are read and ignored), else none acceptable.
fn choose_method(offered: &[u8]) -> u8 {
    if offered.contains(&socks5::METHOD_NO_AUTH) {
        socks5::METHOD_NO_AUTH
    } else if offered.contains(&socks5::METHOD_USER_PASS) {
        socks5::METHOD_USER_PASS
    } else {
        socks5::METHOD_NONE_ACCEPTABLE
    }
}

fn socks5_ask(r: &mut DeadlineReader<'_>, peer: SocketAddr, id: u64) -> Option<Ask> {
    let client = r.stream;
    let refused = |what: String| warn!("conn#{id} {peer} socks5 {what}; closed");
    let greeting = match socks5::read_greeting(r) {
        Ok(g) => g,
        Err(e) => return socks_fail(&refused, e),
    };
    let method = choose_method(&greeting.methods);
    if !send(client, &socks5::encode_method_choice(method)) {
        return None;
    }
    if method == socks5::METHOD_NONE_ACCEPTABLE {
        refused("app offers neither no-auth nor username/password".into());
        return None;
    }
    if method == socks5::METHOD_USER_PASS {
        // Whatever the app sends, the server login uses the configured account.
        if let Err(e) = socks5::read_userpass(r) {
            return socks_fail(&refused, e);
        }
        if !send(client, &socks5::encode_userpass_status(true)) {
            return None;
        }
    }
    let target = handshake::read_socks5_connect(r, &refused)?;
    Some(Ask {
        proto: Proto::Socks5,
        target,
        // What the app sent past its request, read ahead with it.
        prefix: r.take_rest(),
    })
}

fn socks4_ask(r: &mut DeadlineReader<'_>, peer: SocketAddr, id: u64) -> Option<Ask> {
    let client = r.stream;
    let refused = |what: String| warn!("conn#{id} {peer} socks4 {what}; closed");
    // The NUL-ended fields are read a byte at a time, from the reader's read-ahead; what it
    // holds past the request goes to the relay first.
    let req = match socks5::read_socks4_request(r) {
        Ok(req) => req,
        Err(e) => {
            if matches!(e, SocksError::Command(_) | SocksError::BadDomain) {
                send(client, &socks5::encode_socks4_reply(false));
            }
            return socks_fail(&refused, e);
        }
    };
    if req.command != Command::Connect {
        send(client, &socks5::encode_socks4_reply(false));
        refused(format!("command {:?} not supported", req.command));
        return None;
    }
    let proto = match req.target.host {
        Host::Domain(_) => Proto::Socks4a,
        Host::Ip(_) => Proto::Socks4,
    };
    Some(Ask {
        proto,
        target: req.target,
        prefix: r.take_rest(),
    })
}

fn http_ask(
    r: &mut DeadlineReader<'_>,
    peer: SocketAddr,
    id: u64,
    sh: &LocalShared,
) -> Option<Ask> {
    let client = r.stream;
    let refuse = |status: Status, why: String| -> Option<Ask> {
        send(client, &http::encode_response(status, &why));
        warn!("conn#{id} {peer} http {why}; answered {}", status.code());
        None
    };
    let (mut req, mut rest) = match handshake::read_http_head(r) {
        Ok(x) => x,
        Err(HeadError::Http(e)) => return refuse(e.status(), e.to_string()),
        Err(HeadError::Io(e)) => {
            warn!("conn#{id} {peer} http {}; closed", io_reason(&e));
            return None;
        }
    };
    // Whatever the reader still holds came after the head.
    rest.extend(r.take_rest());
    if !req.is_connect() {
        // Plain HTTP: request by request, each through its own tunnel to its origin, until the
        // app closes or asks for a CONNECT on the same connection.
        let settings = forward::Settings {
            id,
            peer,
            handshake_timeout: sh.handshake_timeout,
            idle_timeout: relay::DEFAULT_IDLE_TIMEOUT,
            handshake_deadline: r.deadline,
        };
        let mut gate = LocalGate { sh, peer, id };
        match forward::serve(client, req, rest, &mut gate, &settings) {
            forward::Exit::Done => return None,
            forward::Exit::Connect(q, b) => {
                // The CONNECT's tunnel through the server gets a handshake's time of its own.
                r.deadline = Instant::now() + sh.handshake_timeout;
                (req, rest) = (q, b);
            }
        }
    }
    match req.connect_target() {
        Ok(target) => Some(Ask {
            proto: Proto::HttpConnect,
            target,
            prefix: rest,
        }),
        Err(e) => refuse(e.status(), e.to_string()),
    }
}

/// `sluice local`'s side of plain-HTTP forwarding: every request goes as the configured user
/// (the app's own credentials are dropped with the other hop-by-hop fields), each origin through
/// its own tunnel opened by the server; the server limits, so nothing is charged here.
struct LocalGate<'a> {
    sh: &'a LocalShared,
    peer: SocketAddr,
    id: u64,
}

impl forward::Gate for LocalGate<'_> {
    fn authorize(&mut self, _req: &http::Request) -> Result<Option<Arc<Budget>>, Refused> {
        Ok(None)
    }

    fn open(&mut self, target: &Target) -> Result<Stream, Refused> {
        let sh = self.sh;
        let started = Instant::now();
        match upstream::open(&sh.login(), target, started + sh.handshake_timeout) {
            Ok((server, _)) => {
                server_answered(sh);
                Ok(server)
            }
            Err(e) => {
                let log = EndLine {
                    id: self.id,
                    peer: self.peer,
                    user: &sh.user,
                    proto: Proto::Http,
                    dest: target,
                    started,
                };
                log_failure(&e, &log, sh);
                Err(Refused {
                    status: e.status(),
                    detail: http_detail(&e, &sh.user),
                })
            }
        }
    }

    fn attach(&mut self, _client: &Stream, _origin: &Stream) -> bool {
        true
    }

    fn user(&self) -> String {
        self.sh.user.clone()
    }

    fn stopping(&self) -> bool {
        self.sh.intake.stopping()
    }

    fn authenticated(&self) -> bool {
        // Whoever reaches local's port uses its account (see `local/mod.rs`).
        true
    }

    fn release(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_no_auth_then_userpass() {
        assert_eq!(choose_method(&[2, 0]), socks5::METHOD_NO_AUTH);
        assert_eq!(choose_method(&[2]), socks5::METHOD_USER_PASS);
        assert_eq!(choose_method(&[1, 3]), socks5::METHOD_NONE_ACCEPTABLE);
    }

    #[test]
    fn refusals_speak_the_apps_protocol() {
        let e = UpstreamError::Refused(Reply::HostUnreachable);
        assert_eq!(refusal(Proto::Socks5, &e, "u")[1], 0x04);
        assert_eq!(refusal(Proto::Socks4a, &e, "u")[1], 0x5B);
        assert!(refusal(Proto::Http, &e, "u").starts_with(b"HTTP/1.1 502 "));
        let e = UpstreamError::Refused(Reply::NotAllowed);
        assert!(refusal(Proto::HttpConnect, &e, "u").starts_with(b"HTTP/1.1 403 "));
        let e = UpstreamError::Refused(Reply::TtlExpired);
        assert!(refusal(Proto::HttpConnect, &e, "u").starts_with(b"HTTP/1.1 504 "));
        let body = refusal(Proto::Http, &UpstreamError::Rejected, "alice");
        assert!(String::from_utf8_lossy(&body).contains("rejected user alice"));
        assert_eq!(
            refusal(Proto::Socks5, &UpstreamError::Rejected, "u")[1],
            0x01
        );
    }

    #[test]
    fn grants_speak_the_apps_protocol() {
        let bound = "10.0.0.1:4242".parse().ok();
        assert_eq!(
            granted(Proto::Socks5, bound),
            [5, 0, 0, 1, 10, 0, 0, 1, 0x10, 0x92]
        );
        assert_eq!(granted(Proto::Socks4, None), [0, 0x5A, 0, 0, 0, 0, 0, 0]);
        assert!(granted(Proto::HttpConnect, None).starts_with(b"HTTP/1.1 200 "));
        assert!(granted(Proto::Http, None).is_empty());
    }
}
