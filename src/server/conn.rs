//! One server connection: tell the protocol by its first byte, run the SOCKS5 or HTTP handshake
//! under a deadline, authenticate, dial, then hand the two sockets to the relay.
//!
//! Protocol parsing is in `wire::socks5` / `wire::http`, credentials in `login.rs` (over `auth`),
//! dialing in `net::dial`; this file only sequences them and answers the client. Refusals are
//! logged at warn with the client address; every connection that got past authentication ends
//! with one info line.

use crate::flow::account::{Account, Refusal, Slot};
use crate::net::admission::HandshakeSlot;
use crate::net::dial::{self, DialError};
use crate::net::forward;
use crate::net::handshake::{
    self, DeadlineReader, EndLine, HeadError, Proto, Sniffed, io_reason, read_http_head, send,
    socks_fail,
};
use crate::net::os;
use crate::net::relay::{self, Budget, Direction, End};
use crate::net::stream::Stream;
use crate::net::tls;
use crate::server::gate::ServerGate;
use crate::server::login::{Login, login};
use crate::server::shared::Shared;
use crate::wire::http::{self, ProxyAuth, Status, credential_text};
use crate::wire::socks5::{self, Reply};
use crate::wire::target::Target;
use log::{info, warn};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

/// What a successful handshake leaves: who, to where, by which protocol, and bytes to forward.
struct Session {
    /// The user's connection slot (given back when the session is dropped) and its account.
    slot: Slot,
    proto: Proto,
    target: Target,
    dest: Stream,
    prefix: Vec<u8>,
}

/// Serves one client connection to its end. Blocking; runs on the connection's own thread.
pub(crate) fn handle(sock: TcpStream, peer: SocketAddr, id: u64, sh: &Shared) {
    let started = Instant::now();
    let mut handshake = match sh.handshakes.admit(peer.ip()) {
        Ok(slot) => Some(slot),
        Err(full) => {
            sh.counters.handshake_refused(full);
            if let Some(n) = sh.handshakes.note_refusal(started) {
                warn!(
                    "conn#{id} {peer} closed unserved: {full} ({n} refused since the last such line)"
                );
            }
            return;
        }
    };
    let deadline = started + sh.handshake_timeout;
    let client = match &sh.tls {
        None => Stream::plain(sock),
        Some(cfg) => match tls::accept(sock, cfg, deadline) {
            Ok(t) => t,
            Err(e) => {
                sh.counters.connection("tls", "rejected");
                warn!(
                    "conn#{id} {peer} tls handshake failed: {}; closed",
                    io_reason(&e)
                );
                return;
            }
        },
    };
    let mut r = DeadlineReader::reading_ahead(&client, deadline);
    let Some(sniffed) = handshake::sniff(&mut r, peer, id) else {
        return;
    };
    let session = match sniffed {
        Sniffed::Socks5 => socks5_handshake(&mut r, peer, id, sh, &mut handshake),
        Sniffed::Http => http_handshake(&mut r, peer, id, sh, &mut handshake),
        // The server speaks SOCKS5 only: SOCKS4 has no password to check.
        Sniffed::Socks4 => {
            handshake::unknown_protocol(peer, id, socks5::SOCKS4_VERSION);
            None
        }
        Sniffed::Unknown(b) => {
            handshake::unknown_protocol(peer, id, b);
            None
        }
    };
    // Gone, or past its handshake: the slot is free for the next one.
    drop(handshake);
    let Some(s) = session else { return };
    run_relay(client, s, peer, id, sh, started);
}

fn run_relay(client: Stream, s: Session, peer: SocketAddr, id: u64, sh: &Shared, started: Instant) {
    // The client's socket has both from the listener (`os::tune_listener`).
    os::tune_relay_socket(s.dest.socket());
    let account = s.slot.account().clone();
    let attached = s.slot.attach(Box::new([client.clone(), s.dest.clone()]));
    let budget = Arc::new(Budget {
        account: account.clone(),
        limiter: sh.limiter.clone(),
    });
    let label = format!("{}#{id}", account.name);
    let outcome = if !attached {
        Err(io::Error::other("closed before the relay started"))
    } else {
        match relay::send_prefix(&s.dest, &s.prefix, Some(&budget), Direction::Up) {
            Ok(()) => relay::relay_idle(
                client,
                s.dest,
                Some(budget),
                &label,
                s.prefix.len() as u64,
                sh.idle_timeout,
            ),
            Err(e) => Ok(relay::Outcome {
                up: 0,
                down: 0,
                end: e,
            }),
        }
    };
    drop(s.slot);
    let (up, down, end) = match outcome {
        Ok(o) => (o.up, o.down, o.end.to_string()),
        Err(e) => (0, 0, End::Error(e).to_string()),
    };
    EndLine {
        id,
        peer,
        user: &account.name,
        proto: s.proto,
        dest: &s.target,
        started,
    }
    .info(up, down, end);
}

/// A connection's handshake slot (see `net::admission`): given back once its login succeeds.
type Admitted<'a> = Option<HandshakeSlot<'a>>;

fn socks5_handshake(
    r: &mut DeadlineReader<'_>,
    peer: SocketAddr,
    id: u64,
    sh: &Shared,
    admitted: &mut Admitted<'_>,
) -> Option<Session> {
    let client = r.stream;
    let refused = |what: String| {
        sh.counters.connection("socks5", "rejected");
        warn!("conn#{id} {peer} socks5 {what}; closed");
    };
    let greeting = match socks5::read_greeting(r) {
        Ok(g) => g,
        Err(e) => return socks_fail(&refused, e),
    };
    if !greeting.methods.contains(&socks5::METHOD_USER_PASS) {
        send(
            client,
            &socks5::encode_method_choice(socks5::METHOD_NONE_ACCEPTABLE),
        );
        refused("client offers no username/password method".into());
        return None;
    }
    if !send(
        client,
        &socks5::encode_method_choice(socks5::METHOD_USER_PASS),
    ) {
        return None;
    }
    let creds = match socks5::read_userpass(r) {
        Ok(c) => c,
        Err(e) => return socks_fail(&refused, e),
    };
    // RFC 1929 has one failure status: a blocked client learns no more than a wrong one.
    let creds = (&creds.username[..], &creds.password[..]);
    let Login::Ok(account) = login(sh, peer, id, "socks5", creds, r.deadline) else {
        send(client, &socks5::encode_userpass_status(false));
        return None;
    };
    admitted.take();
    if !send(client, &socks5::encode_userpass_status(true)) {
        return None;
    }
    let target = handshake::read_socks5_connect(r, &refused)?;
    match admit_and_dial(&target, &account, Proto::Socks5, peer, id, sh) {
        Ok((dest, slot)) => {
            let bound = dest.local_addr().ok();
            let dest = Stream::plain(dest);
            if !send(client, &socks5::encode_reply(Reply::Succeeded, bound)) {
                // Gone: dropping the slot gives it back.
                return None;
            }
            Some(Session {
                slot,
                proto: Proto::Socks5,
                target,
                dest,
                // What the client sent past its request, read ahead with it.
                prefix: r.take_rest(),
            })
        }
        Err(e) => {
            send(client, &socks5::encode_reply(e.reply(), None));
            None
        }
    }
}

/// Why a logged-in client gets no tunnel.
enum Denied {
    /// The user may not open another connection (deleted, over quota, at its cap).
    Refused(Refusal),
    /// The destination could not be reached.
    Dial(DialError),
}

impl Denied {
    fn reply(&self) -> Reply {
        match self {
            Denied::Refused(_) => Reply::NotAllowed,
            Denied::Dial(e) => e.reply(),
        }
    }

    fn status(&self) -> Status {
        match self {
            Denied::Refused(Refusal::TooMany) => Status::TooManyRequests,
            Denied::Refused(_) => Status::Forbidden,
            Denied::Dial(e) => e.status(),
        }
    }

    /// What the client is told (the log says more).
    fn detail(&self) -> String {
        match self {
            Denied::Refused(r) => r.to_string(),
            Denied::Dial(e) => e.client_reason(),
        }
    }
}

/// Takes a connection slot for the user, then dials. Every outcome is counted; a refusal is
/// logged at warn, a dial failure as the connection's one info line.
fn admit_and_dial(
    target: &Target,
    account: &Arc<Account>,
    proto: Proto,
    peer: SocketAddr,
    id: u64,
    sh: &Shared,
) -> Result<(TcpStream, Slot), Denied> {
    let slot = match account.admit(id) {
        Ok((slot, idle)) => {
            // An idle user starts from an empty bucket: its first second carries at most its rate.
            if idle {
                sh.limiter.start_fresh(&account.name);
            }
            slot
        }
        Err(r) => {
            warn!(
                "conn#{id} {peer} {proto} user={} refused: {r}",
                account.name
            );
            sh.counters.connection(proto.name(), "refused");
            return Err(Denied::Refused(r));
        }
    };
    let t = Instant::now();
    match dial::dial(target, &sh.policy) {
        Ok(d) => {
            sh.counters.connection(proto.name(), "ok");
            Ok((d, slot))
        }
        Err(e) => {
            sh.counters.connection(proto.name(), "dial_failed");
            EndLine {
                id,
                peer,
                user: &account.name,
                proto,
                dest: target,
                started: t,
            }
            .info(0, 0, format_args!("dial failed: {e}"));
            Err(Denied::Dial(e))
        }
    }
}

fn http_handshake(
    r: &mut DeadlineReader<'_>,
    peer: SocketAddr,
    id: u64,
    sh: &Shared,
    admitted: &mut Admitted<'_>,
) -> Option<Session> {
    let client = r.stream;
    let refuse = |status: Status, why: String| {
        sh.counters.connection("http", "rejected");
        send(client, &http::encode_response(status, &why));
        warn!("conn#{id} {peer} http {why}; answered {}", status.code());
        None
    };
    let (mut req, mut rest) = match read_http_head(r) {
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
        // Plain HTTP: request by request, each with its own credentials, until the client
        // closes or asks for a CONNECT on the same connection.
        let settings = forward::Settings {
            id,
            peer,
            handshake_timeout: sh.handshake_timeout,
            idle_timeout: sh.idle_timeout,
            handshake_deadline: r.deadline,
        };
        let mut gate = ServerGate::new(sh, peer, id, admitted.take());
        match forward::serve(client, req, rest, &mut gate, &settings) {
            forward::Exit::Done => return None,
            forward::Exit::Connect(q, b) => (req, rest) = (q, b),
        }
    }
    let account = match req.proxy_auth() {
        // Another scheme (NTLM, Negotiate) gets the Basic challenge so the client can fall back
        // (RFC 9110 §11.7.1). Browsers send credentials only after a 407: a challenge, not worth
        // a warning.
        ProxyAuth::Missing | ProxyAuth::OtherScheme => {
            info!("conn#{id} {peer} http challenge: no Basic credentials; answered 407");
            send(
                client,
                &http::encode_response(Status::ProxyAuthRequired, "proxy authentication required"),
            );
            return None;
        }
        ProxyAuth::Malformed => {
            return refuse(Status::BadRequest, "malformed Proxy-Authorization".into());
        }
        ProxyAuth::Basic { username, password } => {
            let (user, pass) = (credential_text(&username), credential_text(&password));
            match login(sh, peer, id, "http", (&user, &pass), r.deadline) {
                Login::Ok(a) => {
                    admitted.take();
                    a
                }
                refused => {
                    let (status, why) = refused.http_answer();
                    send(client, &http::encode_response(status, &why));
                    return None;
                }
            }
        }
    };
    let proto = Proto::HttpConnect;
    let target = match req.connect_target() {
        Ok(t) => t,
        Err(e) => return refuse(e.status(), e.to_string()),
    };
    let (dest, slot) = match admit_and_dial(&target, &account, proto, peer, id, sh) {
        Ok(x) => x,
        Err(e) => {
            send(client, &http::encode_response(e.status(), &e.detail()));
            return None;
        }
    };
    let dest = Stream::plain(dest);
    if !send(client, &http::encode_response(Status::Ok, "")) {
        // Gone: dropping the slot gives it back.
        return None;
    }
    Some(Session {
        slot,
        proto,
        target,
        dest,
        prefix: rest,
    })
}
