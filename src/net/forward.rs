//! Plain-HTTP forwarding, request by request, for both proxies: each request head on the client
//! connection is read and checked, authorised ([`Gate::authorize`]), sent to its own origin in
//! origin-form with hop-by-hop fields removed, and its response framed back (RFC 9112 §6), so the
//! bytes after one message are always the next message and never a raw tunnel.
//!
//! What differs between `sluice server` and `sluice local` is behind [`Gate`]: who a request is
//! charged to (the server checks each request's Basic credentials and holds one connection slot
//! for its user; local sends everything as its configured user) and how an origin connection is
//! opened (the server dials under its destination policy; local opens a tunnel through the
//! server). The pure parts (heads, framing, chunked coding) are in `http_framing.rs`; copying a
//! body through the budget is `forward_body.rs`.
//!
//! Threads: the connection's own thread reads requests and responses in turn; a request body
//! goes up on a second (scoped) thread while the response is read, so `Expect: 100-continue` and
//! an origin that answers before the whole body all work. Every byte read from either side of a
//! limited user passes the limiter (`relay::metered_read`); heads the proxy writes are charged
//! before they are sent (`relay::send_prefix`).

use crate::flow::limiter::Waiter;
use crate::net::forward_body::{BodyCopy, BodyError, READ_CHUNK, send_body};
use crate::net::relay::{self, Budget, Direction, End};
use crate::net::stream::{self, Stream};
use crate::wire::http::{self, HttpError, Request, Status};
use crate::wire::http_framing::{
    self as framing, Body, ClientEnd, Response, client_head, origin_head,
};
use crate::wire::target::Target;
use log::{info, warn};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A kept-alive client connection with no request under way is closed after this long (or the
/// relay idle timeout, if shorter).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// After a response is complete, how long the request body's thread may take to finish before
/// the connection is closed instead (an origin that answered without reading the whole body).
const BODY_GRACE: Duration = Duration::from_millis(500);
/// Stack of a request body's thread (its buffer is on the heap).
const BODY_STACK: usize = 64 * 1024;

/// An answer the proxy gives itself instead of forwarding.
#[derive(Debug)]
pub(crate) struct Refused {
    /// The status.
    pub status: Status,
    /// The body text (said to the client, so no secrets and no resolved addresses).
    pub detail: String,
}

/// What differs between the two proxies that forward plain HTTP.
pub(crate) trait Gate {
    /// Decides whom this request is charged to: `Ok(Some(budget))` for a limited user, `Ok(None)`
    /// when this proxy does not limit. Blocking (it may check a password).
    ///
    /// # Errors
    /// The refusal to answer with (407, 429, 403…).
    fn authorize(&mut self, req: &Request) -> Result<Option<Arc<Budget>>, Refused>;

    /// Opens a connection toward `target`. Blocking.
    ///
    /// # Errors
    /// The refusal to answer with (403 by policy, 502, 504).
    fn open(&mut self, target: &Target) -> Result<Stream, Refused>;

    /// The connection's sockets now in use, so they can be shut from outside (user deleted,
    /// quota used up, server stopping). False if that already happened.
    fn attach(&mut self, client: &Stream, origin: &Stream) -> bool;

    /// The user of the current request, for the log ("-" before any).
    fn user(&self) -> String;

    /// True when the proxy is stopping: no further request is taken.
    fn stopping(&self) -> bool;

    /// True once a request on this connection was authorised. Until then the connection lives
    /// under its first handshake deadline: a client refused with 407 may try again on the same
    /// connection, but gets no more time than a handshake.
    fn authenticated(&self) -> bool;

    /// Gives back what the connection holds (its connection slot). Called once at the end.
    fn release(&mut self);
}

/// Per-connection settings.
pub(crate) struct Settings {
    /// Connection number for the log.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// Time a request head has from its first byte.
    pub handshake_timeout: Duration,
    /// Longest wait for a read or write while a request is under way.
    pub idle_timeout: Duration,
    /// The connection's handshake deadline (from accept): the limit for every request head until
    /// one request is authorised.
    pub handshake_deadline: Instant,
}

/// How forwarding ended.
pub(crate) enum Exit {
    /// The connection is done (closed, refused, upgraded and finished).
    Done,
    /// The client asked for a CONNECT on the same connection; the caller takes it from here,
    /// with the bytes that came after its head.
    Connect(Request, Vec<u8>),
}

/// Forwards `first` (whose head is read, with `rest` the bytes after it) and every request that
/// follows on `client`, until either side closes or a request cannot be answered on a connection
/// that stays usable. Blocking; one info line per request.
pub(crate) fn serve(
    client: &Stream,
    first: Request,
    rest: Vec<u8>,
    gate: &mut dyn Gate,
    s: &Settings,
) -> Exit {
    let mut conn = Conn {
        client,
        inbuf: rest,
        origin: None,
        s,
        up: Waiter::new(),
        down: Waiter::new(),
    };
    let mut next = Some(first);
    let mut n = 0u64;
    let exit = loop {
        let Some(req) = next.take() else {
            break Exit::Done;
        };
        if req.is_connect() {
            break Exit::Connect(req, std::mem::take(&mut conn.inbuf));
        }
        n += 1;
        let started = Instant::now();
        let mut t = Tally::default();
        let after = conn.exchange(&req, gate, &mut t);
        log_request(s, n, &req, gate, &t, started, &after);
        if !matches!(after, After::Next) || gate.stopping() {
            break Exit::Done;
        }
        next = conn.next_head(gate.authenticated());
    };
    if let Some(o) = conn.origin.take() {
        o.stream.shutdown_both();
    }
    gate.release();
    exit
}

/// What one request moved and how it was answered.
#[derive(Default)]
struct Tally {
    dest: Option<Target>,
    status: u16,
    up: u64,
    down: u64,
}

/// What comes after a request.
enum After {
    /// The connection stays open for the next request.
    Next,
    /// The connection ends, for this reason.
    Close(String),
}

fn log_request(
    s: &Settings,
    n: u64,
    req: &Request,
    gate: &dyn Gate,
    t: &Tally,
    started: Instant,
    after: &After,
) {
    let dest = t
        .dest
        .as_ref()
        .map_or_else(|| "-".to_string(), |d| d.to_string());
    let end = match after {
        After::Next => "kept",
        After::Close(why) => why,
    };
    info!(
        "conn#{} {} user={} proto=http dest={dest} req={n} method={} status={} up={} down={} secs={:.3} end={end}",
        s.id,
        s.peer,
        gate.user(),
        printable(&req.method),
        t.status,
        t.up,
        t.down,
        started.elapsed().as_secs_f64()
    );
}

fn printable(s: &str) -> String {
    s.escape_debug().to_string()
}

/// An origin connection kept for the next request to the same place.
struct Origin {
    stream: Stream,
    target: Target,
}

/// One client connection's forwarding state.
struct Conn<'a> {
    client: &'a Stream,
    /// Bytes read from the client and not used yet (the start of the next message).
    inbuf: Vec<u8>,
    origin: Option<Origin>,
    s: &'a Settings,
    up: Arc<Waiter>,
    down: Arc<Waiter>,
}

/// Why no response came from the origin.
enum NoResponse {
    /// It closed (or reset) before sending a byte: a kept connection that went stale.
    Closed,
    /// Something else: a timeout, a malformed head, the limiter refusing.
    Failed(Status, String),
}

impl Conn<'_> {
    /// Reads the next request head: waits up to the keep-alive idle time for its first byte, then
    /// gives the whole head the handshake timeout. Before any request was authorised, the
    /// connection's first handshake deadline bounds both. `None` when the client closed or idled
    /// out, or after answering a bad head (logged).
    fn next_head(&mut self, authenticated: bool) -> Option<Request> {
        if self.inbuf.is_empty() {
            let idle = if authenticated {
                KEEPALIVE_IDLE.min(self.s.idle_timeout)
            } else {
                self.s
                    .handshake_deadline
                    .saturating_duration_since(Instant::now())
            };
            if idle.is_zero() {
                return None;
            }
            self.client.socket().set_read_timeout(Some(idle)).ok()?;
            match self.client.wait_readable() {
                Ok(true) => {}
                _ => return None,
            }
        }
        let deadline = if authenticated {
            Instant::now() + self.s.handshake_timeout
        } else {
            self.s.handshake_deadline
        };
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            match http::try_parse_request(&self.inbuf) {
                Ok(Some((used, req))) => {
                    self.inbuf.drain(..used);
                    return Some(req);
                }
                Ok(None) => {}
                Err(e) => {
                    self.answer_bad_head(&e);
                    return None;
                }
            }
            stream::arm(self.client.socket(), deadline).ok()?;
            match self.client.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn answer_bad_head(&self, e: &HttpError) {
        let _ = self
            .client
            .write_all(&http::encode_response(e.status(), &e.to_string()));
        warn!(
            "conn#{} {} http {e}; answered {}",
            self.s.id,
            self.s.peer,
            e.status().code()
        );
    }

    /// Answers `req` with the proxy's own response; the connection stays if `keep`.
    fn refuse(&self, t: &mut Tally, status: Status, detail: &str, keep: bool) -> After {
        t.status = status.code();
        let sent = self
            .client
            .write_all(&http::encode_error(status, detail, keep))
            .is_ok();
        if keep && sent {
            After::Next
        } else {
            After::Close(format!("answered {}: {detail}", status.code()))
        }
    }

    /// Forwards one request and its response.
    fn exchange(&mut self, req: &Request, gate: &mut dyn Gate, t: &mut Tally) -> After {
        let _ = set_timeouts(self.client, self.s.idle_timeout);
        let client_keep = framing::request_keeps_alive(req);
        let body = match framing::request_body(req) {
            Ok(b) => b,
            // The body cannot be told from the next request (smuggling): answer and close.
            Err(e) => return self.refuse(t, Status::BadRequest, &e.to_string(), false),
        };
        // Only a request without a body can be refused and the connection kept: a body not read
        // would be taken for the next request.
        let keep = client_keep && body == Body::None;
        // Credentials first: a client without them learns nothing about its request.
        let budget = match gate.authorize(req) {
            Ok(b) => b,
            Err(r) => return self.refuse(t, r.status, &r.detail, keep),
        };
        let (target, path) = match req.absolute_target() {
            Ok(x) => x,
            Err(e) => return self.refuse(t, e.status(), &e.to_string(), keep),
        };
        t.dest = Some(target.clone());
        let upgrading = framing::wants_upgrade(req);
        let head = origin_head(req, &path, &target, upgrading);
        let retryable = framing::is_idempotent(&req.method) && body == Body::None;
        let mut kept = self.kept_origin(&target);
        loop {
            let reused = kept.is_some();
            let origin = match kept.take() {
                Some(o) => o,
                None => match gate.open(&target) {
                    Ok(o) => o,
                    Err(r) => return self.refuse(t, r.status, &r.detail, keep),
                },
            };
            if !gate.attach(self.client, &origin) {
                origin.shutdown_both();
                return After::Close("closed from outside".into());
            }
            let _ = set_timeouts(&origin, self.s.idle_timeout);
            let ctx = Exchange {
                req,
                target: &target,
                body,
                client_keep,
                upgrading,
                budget: budget.clone(),
            };
            match self.send_and_answer(&ctx, &origin, &head, t) {
                Err(NoResponse::Closed) if reused && retryable => {
                    origin.shutdown_both();
                    // Once, on a fresh connection (RFC 9110 §9.2.2).
                }
                Err(NoResponse::Closed) => {
                    origin.shutdown_both();
                    let why = "the origin closed the connection without answering";
                    return self.refuse(t, Status::BadGateway, why, keep);
                }
                Err(NoResponse::Failed(status, why)) => {
                    origin.shutdown_both();
                    return self.refuse(t, status, &why, false);
                }
                Ok(after) => return after,
            }
        }
    }

    /// The kept origin connection if it goes to `target` and has not been closed; else closes
    /// it.
    fn kept_origin(&mut self, target: &Target) -> Option<Stream> {
        let o = self.origin.take()?;
        if &o.target == target && looks_open(&o.stream) {
            Some(o.stream)
        } else {
            o.stream.shutdown_both();
            None
        }
    }

    /// Sends the head (and body, on its own thread), reads the response and forwards it.
    fn send_and_answer(
        &mut self,
        x: &Exchange<'_>,
        origin: &Stream,
        head: &[u8],
        t: &mut Tally,
    ) -> Result<After, NoResponse> {
        if relay::send_prefix(origin, head, x.budget(), Direction::Up).is_err() {
            return Err(NoResponse::Closed);
        }
        t.up += head.len() as u64;
        if x.body == Body::None {
            return self.answer(x, origin, t, false);
        }
        let pending = std::mem::take(&mut self.inbuf);
        let (tx, rx) = mpsc::channel();
        let client = self.client;
        let up = self.up.clone();
        thread::scope(|scope| {
            let spawned = thread::Builder::new()
                .name(format!("body#{}", self.s.id))
                .stack_size(BODY_STACK)
                .spawn_scoped(scope, move || {
                    let r = send_body(client, origin, pending, x.body, x.budget(), &up);
                    if r.is_err() {
                        origin.shutdown_both();
                    }
                    let _ = tx.send(r);
                });
            if let Err(e) = spawned {
                return Err(NoResponse::Failed(
                    Status::ServiceUnavailable,
                    format!("cannot start a thread: {e}"),
                ));
            }
            let answered = self.answer(x, origin, t, true);
            // Wait for the body a moment; an origin that answered early may not read all of it,
            // and then the client's next bytes cannot be told apart: close.
            let body = match rx.recv_timeout(BODY_GRACE) {
                Ok(r) => r,
                Err(_) => {
                    let _ = client.socket().shutdown(Shutdown::Read);
                    origin.shutdown_both();
                    let _ = rx.recv();
                    Err(BodyError::Io(End::Closed))
                }
            };
            match body {
                Ok((rest, n)) => {
                    t.up += n;
                    self.inbuf = rest;
                    answered
                }
                Err(e) => match answered {
                    Ok(_) => Ok(After::Close(format!("request body: {e}"))),
                    Err(_) => Err(match e {
                        BodyError::Chunk(c) => {
                            NoResponse::Failed(Status::BadRequest, c.to_string())
                        }
                        BodyError::Io(end) => {
                            NoResponse::Failed(Status::BadGateway, format!("request body: {end}"))
                        }
                    }),
                },
            }
        })
    }

    /// Reads the origin's response head(s) and forwards the response. Interim 1xx responses
    /// reach the client at once (the body, if any, is going up on its own thread meanwhile).
    fn answer(
        &mut self,
        x: &Exchange<'_>,
        origin: &Stream,
        t: &mut Tally,
        had_body: bool,
    ) -> Result<After, NoResponse> {
        let mut buf = Vec::new();
        let mut answered_any = false;
        loop {
            let (resp, rest) = self.read_response(origin, &mut buf, x.budget(), t, answered_any)?;
            answered_any = true;
            if resp.code == 101 && x.upgrading {
                return Ok(self.tunnel(x, origin, &resp, rest, t, had_body));
            }
            if resp.code < 200 {
                // 100 Continue and other interim responses go to the client as they come.
                let h = client_head(&resp, ClientEnd::Interim, x.req.minor_version, false);
                if self.client.write_all(&h).is_err() {
                    return Ok(After::Close("client gone".into()));
                }
                buf = rest;
                continue;
            }
            return Ok(self.forward_response(x, origin, resp, rest, t));
        }
    }

    /// Reads one response head; `Closed` if the origin ended before its first byte.
    fn read_response(
        &self,
        origin: &Stream,
        buf: &mut Vec<u8>,
        budget: Option<&Budget>,
        t: &mut Tally,
        answered_any: bool,
    ) -> Result<(Response, Vec<u8>), NoResponse> {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            match framing::try_parse_response(buf) {
                Ok(Some((used, resp))) => return Ok((resp, buf.split_off(used))),
                Ok(None) => {}
                Err(e) => {
                    return Err(NoResponse::Failed(
                        Status::BadGateway,
                        format!("bad response from the origin: {e}"),
                    ));
                }
            }
            match relay::metered_read(origin, &mut chunk, budget, &self.down, Direction::Down) {
                Ok(0) if buf.is_empty() && !answered_any => return Err(NoResponse::Closed),
                Ok(0) => {
                    return Err(NoResponse::Failed(
                        Status::BadGateway,
                        "the origin closed mid-response".into(),
                    ));
                }
                Ok(n) => {
                    t.down += n as u64;
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(End::Error(e)) if buf.is_empty() && !answered_any && is_reset(&e) => {
                    return Err(NoResponse::Closed);
                }
                Err(End::Idle) => {
                    return Err(NoResponse::Failed(
                        Status::GatewayTimeout,
                        "no answer from the origin in time".into(),
                    ));
                }
                Err(e) => {
                    return Err(NoResponse::Failed(
                        Status::BadGateway,
                        format!("reading the origin's answer: {e}"),
                    ));
                }
            }
        }
    }

    /// Sends the final response head and its body to the client; keeps the origin connection
    /// for the next request when both it and the framing allow.
    fn forward_response(
        &mut self,
        x: &Exchange<'_>,
        origin: &Stream,
        resp: Response,
        rest: Vec<u8>,
        t: &mut Tally,
    ) -> After {
        t.status = resp.code;
        let framing = match framing::response_body(&x.req.method, &resp) {
            Ok(f) => f,
            Err(e) => {
                let detail = format!("bad response from the origin: {e}");
                return self.refuse(t, Status::BadGateway, &detail, false);
            }
        };
        let dechunk = framing == Body::Chunked && x.req.minor_version == 0;
        let client_keep = x.client_keep && framing != Body::UntilClose && !dechunk;
        let end = if client_keep {
            ClientEnd::KeepAlive
        } else {
            ClientEnd::Close
        };
        let head = client_head(&resp, end, x.req.minor_version, dechunk);
        let mut copy = BodyCopy {
            from: origin,
            to: self.client,
            budget: x.budget(),
            waiter: &self.down,
            dir: Direction::Down,
            moved: 0,
        };
        let result = copy.run(head, rest, framing, dechunk);
        t.down += copy.moved;
        match result {
            Ok(clean) => {
                if framing::response_keeps_alive(&resp) && framing != Body::UntilClose && clean {
                    self.origin = Some(Origin {
                        stream: origin.clone(),
                        target: x.target.clone(),
                    });
                } else {
                    origin.shutdown_both();
                }
                if client_keep {
                    After::Next
                } else {
                    After::Close("closed".into())
                }
            }
            Err(e) => {
                origin.shutdown_both();
                After::Close(format!("response: {e}"))
            }
        }
    }

    /// A 101 to an upgrade request: the head goes to the client and the connection becomes a
    /// tunnel to the origin, through the same budget.
    fn tunnel(
        &mut self,
        x: &Exchange<'_>,
        origin: &Stream,
        resp: &Response,
        rest: Vec<u8>,
        t: &mut Tally,
        had_body: bool,
    ) -> After {
        t.status = resp.code;
        if had_body {
            // Bytes after a body-carrying upgrade request cannot be told apart; not worth it.
            origin.shutdown_both();
            return After::Close("upgrade with a request body refused".into());
        }
        let mut first = client_head(resp, ClientEnd::Upgrade, x.req.minor_version, false);
        first.extend_from_slice(&rest);
        if self.client.write_all(&first).is_err() {
            origin.shutdown_both();
            return After::Close("client gone".into());
        }
        let pending = std::mem::take(&mut self.inbuf);
        if let Err(e) = relay::send_prefix(origin, &pending, x.budget(), Direction::Up) {
            return After::Close(format!("upgrade: {e}"));
        }
        t.up += pending.len() as u64;
        let budget = x.budget.clone();
        let label = format!("http#{}", self.s.id);
        match relay::relay_idle(
            self.client.clone(),
            origin.clone(),
            budget,
            &label,
            0,
            self.s.idle_timeout,
        ) {
            Ok(o) => {
                t.up += o.up;
                t.down += o.down;
                After::Close(format!("upgraded, then {}", o.end))
            }
            Err(e) => After::Close(format!("upgrade: {e}")),
        }
    }
}

/// What a request's exchange needs to know.
struct Exchange<'a> {
    req: &'a Request,
    target: &'a Target,
    body: Body,
    client_keep: bool,
    upgrading: bool,
    budget: Option<Arc<Budget>>,
}

impl Exchange<'_> {
    fn budget(&self) -> Option<&Budget> {
        self.budget.as_deref()
    }
}

/// Read and write timeouts for a request under way.
fn set_timeouts(s: &Stream, idle: Duration) -> io::Result<()> {
    let t = Some(idle.max(Duration::from_millis(50)));
    s.socket().set_read_timeout(t)?;
    s.socket().set_write_timeout(t)
}

/// False when a kept origin connection has been closed by the origin (or sent something
/// unasked), seen without blocking. Over TLS nothing can be told without reading, so true.
fn looks_open(s: &Stream) -> bool {
    let Stream::Plain(sock) = s else {
        return true;
    };
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    let mut one = [0u8; 1];
    let open = matches!(sock.peek(&mut one), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    sock.set_nonblocking(false).is_ok() && open
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}
