//! The handshake layer both proxies share: reads under a deadline computed once, the first byte
//! looked at and put back (how a connection says which protocol it speaks), an HTTP request head
//! read whole, the answers and log reasons of a handshake that ends early, the protocol's name
//! and the one info line a connection ends with.
//!
//! What each proxy does with a handshake (who may log in, where a tunnel goes) stays in
//! `server::conn` and `local::conn`; the wire formats are in `wire`.

use crate::net::stream::{self, Stream};
use crate::wire::http::{self, HttpError};
use crate::wire::socks5::{self, SocksError};
use crate::wire::target::Target;
use log::{info, warn};
use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes read at a time while collecting an HTTP head.
const HEAD_CHUNK: usize = 4096;
/// A handshake read re-arms the socket's timeouts (two `setsockopt`s) only when this long has
/// passed since it last did, so a read may end at most this much past the deadline. A SOCKS5
/// handshake reads a dozen small fields; arming before each was 24 of a set-up's ~40 syscalls.
const ARM_SLACK: Duration = Duration::from_millis(100);

/// Handshake-time reads: they fail with `TimedOut` once a deadline computed at the start has
/// passed, however the client spaces its bytes (a byte a minute still hits the deadline). The
/// first byte can be looked at and put back ([`DeadlineReader::peek_byte`]), which works the same
/// over TLS, where the socket cannot be peeked.
///
/// A reader made with [`DeadlineReader::reading_ahead`] serves the decoders' small reads (a
/// SOCKS5 handshake reads a dozen fields of 1–255 bytes) from one socket read of up to
/// [`READ_AHEAD`] bytes, so a handshake costs a read per message the client sends rather than one
/// per field. Bytes it read past the handshake are the tunnel's first bytes: whoever ends the
/// handshake takes them with [`DeadlineReader::take_rest`] and sends them on.
pub(crate) struct DeadlineReader<'a> {
    pub stream: &'a Stream,
    pub deadline: Instant,
    /// Bytes read from the socket and not yet handed out (a peeked byte, or a read-ahead).
    held: Vec<u8>,
    /// How much of `held` was handed out already.
    used: usize,
    /// Reads smaller than this go through `held` (0: never).
    ahead: usize,
    /// When the socket's timeouts were last set to what was left before the deadline.
    armed: Option<Instant>,
}

/// The most a read-ahead takes from the socket at once: a SOCKS5 greeting, login and request are
/// at most 257 + 513 + 262 bytes.
pub(crate) const READ_AHEAD: usize = 1024;

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.used < self.held.len() {
            let n = buf.len().min(self.held.len() - self.used);
            buf[..n].copy_from_slice(&self.held[self.used..self.used + n]);
            self.used += n;
            return Ok(n);
        }
        if buf.len() < self.ahead {
            let got = self.fill(self.ahead)?;
            let n = got.min(buf.len());
            buf[..n].copy_from_slice(&self.held[..n]);
            self.used = n;
            return Ok(n);
        }
        self.read_socket(buf)
    }
}

impl<'a> DeadlineReader<'a> {
    /// A reader over `stream` that gives up at `deadline`, reading only what it is asked for.
    pub fn new(stream: &'a Stream, deadline: Instant) -> DeadlineReader<'a> {
        DeadlineReader {
            stream,
            deadline,
            held: Vec::new(),
            used: 0,
            ahead: 0,
            armed: None,
        }
    }

    /// A reader over `stream` that gives up at `deadline` and reads ahead (see the type's docs):
    /// for a client's handshake, ended by [`DeadlineReader::take_rest`].
    pub fn reading_ahead(stream: &'a Stream, deadline: Instant) -> DeadlineReader<'a> {
        DeadlineReader {
            ahead: READ_AHEAD,
            ..DeadlineReader::new(stream, deadline)
        }
    }

    /// The bytes read from the socket and not handed out yet: what the client sent past its
    /// handshake, to be relayed before anything else it sends.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.held);
        rest.drain(..self.used.min(rest.len()));
        self.used = 0;
        rest
    }

    /// The first byte, without consuming it (`None` if the peer closed).
    pub fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        if self.used >= self.held.len() && self.fill(self.ahead.max(1))? == 0 {
            return Ok(None);
        }
        Ok(Some(self.held[self.used]))
    }

    /// Replaces what is held (all of it handed out) with one socket read of up to `max` bytes;
    /// returns how many came (0: the peer closed).
    fn fill(&mut self, max: usize) -> io::Result<usize> {
        let mut held = std::mem::take(&mut self.held);
        held.resize(max, 0);
        let got = self.read_socket(&mut held);
        held.truncate(*got.as_ref().unwrap_or(&0));
        self.held = held;
        self.used = 0;
        got
    }

    /// One read from the socket, within the deadline.
    fn read_socket(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if self
            .armed
            .is_none_or(|t| now.duration_since(t) >= ARM_SLACK)
        {
            stream::arm(self.stream.socket(), self.deadline)?;
            self.armed = Some(now);
        }
        self.stream.read(buf)
    }
}

/// Why an HTTP head could not be read.
pub(crate) enum HeadError {
    /// The client went away or timed out; nothing to answer.
    Io(io::Error),
    /// The head is bad; answer with its status.
    Http(HttpError),
}

/// Reads until a full HTTP request head is in; returns it and the bytes that came after it.
pub(crate) fn read_http_head(
    r: &mut DeadlineReader<'_>,
) -> Result<(http::Request, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(HEAD_CHUNK);
    let mut chunk = [0u8; HEAD_CHUNK];
    loop {
        let n = r.read(&mut chunk).map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        // A head can only complete with a newline, so a client trickling bytes does not make us
        // rescan the whole buffer per byte.
        if !chunk[..n].contains(&b'\n') && buf.len() <= http::MAX_HEAD_BYTES {
            continue;
        }
        match http::try_parse_request(&buf) {
            Ok(Some((used, req))) => return Ok((req, buf.split_off(used))),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Http(e)),
        }
    }
}

/// Answers the client (the handshake's deadline armed the socket's write timeout).
pub(crate) fn send(s: &Stream, bytes: &[u8]) -> bool {
    s.write_all(bytes).is_ok()
}

/// Why a handshake ended early, for the log.
pub(crate) fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "handshake deadline passed".into(),
        io::ErrorKind::UnexpectedEof => "peer closed mid-handshake".into(),
        _ => e.to_string(),
    }
}

/// Logs why a SOCKS handshake failed (through `refused`) and gives up on it.
pub(crate) fn socks_fail<T>(refused: &dyn Fn(String), e: SocksError) -> Option<T> {
    match e {
        SocksError::Io(io) => refused(io_reason(&io)),
        other => refused(other.to_string()),
    }
    None
}

/// Reads a SOCKS5 request after the login, for both proxies: a request that does not decode is
/// answered with the reply RFC 1928 §6 gives it (one mapping, `socks5::request_error_reply`), a
/// command other than CONNECT with "command not supported"; each is logged through `refused` and
/// ends the handshake. Returns where the client wants to go.
pub(crate) fn read_socks5_connect(
    r: &mut DeadlineReader<'_>,
    refused: &dyn Fn(String),
) -> Option<Target> {
    let req = match socks5::read_request(r) {
        Ok(req) => req,
        Err(e) => {
            if let Some(reply) = socks5::request_error_reply(&e) {
                send(r.stream, &socks5::encode_reply(reply, None));
            }
            return socks_fail(refused, e);
        }
    };
    if req.command != socks5::Command::Connect {
        send(
            r.stream,
            &socks5::encode_reply(socks5::Reply::CommandNotSupported, None),
        );
        refused(format!("command {:?} not supported", req.command));
        return None;
    }
    Some(req.target)
}

/// The protocol a connection spoke, as log lines (and metrics labels) name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// SOCKS5 (RFC 1928).
    Socks5,
    /// SOCKS4 with an IPv4 destination.
    Socks4,
    /// SOCKS4a: SOCKS4 with a name for the proxy to resolve.
    Socks4a,
    /// An HTTP `CONNECT` tunnel.
    HttpConnect,
    /// Plain HTTP requests, forwarded one by one.
    Http,
}

impl Proto {
    /// `socks5`, `socks4`, `socks4a`, `http-connect` or `http`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Socks5 => "socks5",
            Proto::Socks4 => "socks4",
            Proto::Socks4a => "socks4a",
            Proto::HttpConnect => "http-connect",
            Proto::Http => "http",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a connection's first byte says it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// Byte 0x05: a SOCKS5 greeting.
    Socks5,
    /// Byte 0x04: a SOCKS4 or SOCKS4a request.
    Socks4,
    /// A letter: the method of an HTTP request.
    Http,
    /// Anything else, with the byte for the log.
    Unknown(u8),
}

impl Sniffed {
    /// Which protocol starts with `first`.
    pub fn from_first_byte(first: u8) -> Sniffed {
        match first {
            socks5::VERSION => Sniffed::Socks5,
            socks5::SOCKS4_VERSION => Sniffed::Socks4,
            b'A'..=b'Z' | b'a'..=b'z' => Sniffed::Http,
            other => Sniffed::Unknown(other),
        }
    }
}

/// Looks at the first byte (it stays for the handshake to read) and says which protocol it
/// starts. `None`: the peer closed without a byte (not logged), or its read failed or the
/// deadline passed (logged at warn: `conn#{id} {peer} closed before a handshake: …`).
pub(crate) fn sniff(r: &mut DeadlineReader<'_>, peer: SocketAddr, id: u64) -> Option<Sniffed> {
    match r.peek_byte() {
        Ok(Some(b)) => Some(Sniffed::from_first_byte(b)),
        Ok(None) => None,
        Err(e) => {
            warn!(
                "conn#{id} {peer} closed before a handshake: {}",
                io_reason(&e)
            );
            None
        }
    }
}

/// Logs (warn) a connection closed because its first byte starts no protocol this proxy serves:
/// `conn#{id} {peer} unknown protocol (first byte 0x…); closed`.
pub(crate) fn unknown_protocol(peer: SocketAddr, id: u64, first: u8) {
    warn!("conn#{id} {peer} unknown protocol (first byte 0x{first:02x}); closed");
}

/// The one info line a connection ends with, or a tunnel that could not be opened:
/// `conn#{id} {peer} user={user} proto={proto} dest={dest} up={up} down={down} secs={secs} end={end}`,
/// `secs` counted from `started` with three decimals. The README's log description and the
/// tests rely on this shape.
pub(crate) struct EndLine<'a> {
    /// The connection's number.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The account the connection used.
    pub user: &'a str,
    /// The protocol it spoke.
    pub proto: Proto,
    /// Where it went.
    pub dest: &'a Target,
    /// When the time in `secs=` began.
    pub started: Instant,
}

impl EndLine<'_> {
    /// The line for a connection that moved `up` and `down` bytes and ended for reason `end`.
    pub fn text(&self, up: u64, down: u64, end: impl fmt::Display) -> String {
        self.text_after(self.started.elapsed(), up, down, end)
    }

    /// Logs [`EndLine::text`] at info, formatted once, straight into the logger (no `String`
    /// in between: the line was a sixth of a set-up's user-space instructions).
    pub fn info(&self, up: u64, down: u64, end: impl fmt::Display) {
        let secs = self.started.elapsed();
        info!(
            "{}",
            Line {
                e: self,
                secs,
                up,
                down,
                end
            }
        );
    }

    fn text_after(&self, secs: Duration, up: u64, down: u64, end: impl fmt::Display) -> String {
        Line {
            e: self,
            secs,
            up,
            down,
            end,
        }
        .to_string()
    }
}

/// An [`EndLine`] with its figures, as it is written.
struct Line<'a, 'b, E> {
    e: &'a EndLine<'b>,
    secs: Duration,
    up: u64,
    down: u64,
    end: E,
}

impl<E: fmt::Display> fmt::Display for Line<'_, '_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.e;
        write!(
            f,
            "conn#{} {} user={} proto={} dest={} up={} down={} secs={:.3} end={}",
            e.id,
            e.peer,
            e.user,
            e.proto,
            e.dest,
            self.up,
            self.down,
            self.secs.as_secs_f64(),
            self.end
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::stream::loopback_pair;

    #[test]
    fn protocols_have_their_log_names() {
        let names = [
            Proto::Socks5,
            Proto::Socks4,
            Proto::Socks4a,
            Proto::HttpConnect,
            Proto::Http,
        ]
        .map(|p| p.to_string());
        assert_eq!(
            names,
            ["socks5", "socks4", "socks4a", "http-connect", "http"]
        );
    }

    #[test]
    fn a_read_ahead_handshake_keeps_what_came_after_it_for_the_tunnel() {
        use std::io::Write;
        let (server, mut client) = loopback_pair();
        let target = Target::parse("example.invalid:443", None).unwrap();
        // Greeting, login, request and the tunnel's first bytes, in one write.
        let mut all = socks5::encode_greeting(&[socks5::METHOD_USER_PASS]);
        all.extend(socks5::encode_userpass(b"u", b"pw").unwrap());
        all.extend(socks5::encode_request(socks5::Command::Connect, &target).unwrap());
        all.extend_from_slice(b"tunnel bytes");
        client.write_all(&all).unwrap();
        let mut r = DeadlineReader::reading_ahead(&server, Instant::now() + Duration::from_secs(5));
        assert_eq!(r.peek_byte().unwrap(), Some(5));
        socks5::read_greeting(&mut r).unwrap();
        assert_eq!(socks5::read_userpass(&mut r).unwrap().username, b"u");
        assert_eq!(socks5::read_request(&mut r).unwrap().target, target);
        assert_eq!(r.take_rest(), b"tunnel bytes");
        assert_eq!(r.take_rest(), b"", "taken once");
        // Later bytes are read from the socket again, in order.
        client.write_all(b"more").unwrap();
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"more");
    }

    #[test]
    fn a_plain_reader_takes_only_what_it_is_asked_for() {
        use std::io::Write;
        let (server, mut client) = loopback_pair();
        client.write_all(b"\x05abc").unwrap();
        let mut r = DeadlineReader::new(&server, Instant::now() + Duration::from_secs(5));
        assert_eq!(r.peek_byte().unwrap(), Some(5));
        let mut one = [0u8; 2];
        r.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"\x05a");
        assert_eq!(r.take_rest(), b"", "nothing was read ahead");
        let mut rest = [0u8; 2];
        server.read(&mut rest).unwrap();
        assert_eq!(&rest, b"bc", "the socket still holds the rest");
    }

    #[test]
    fn the_first_byte_names_the_protocol() {
        assert_eq!(Sniffed::from_first_byte(5), Sniffed::Socks5);
        assert_eq!(Sniffed::from_first_byte(4), Sniffed::Socks4);
        assert_eq!(Sniffed::from_first_byte(b'C'), Sniffed::Http);
        assert_eq!(Sniffed::from_first_byte(b'g'), Sniffed::Http);
        assert_eq!(Sniffed::from_first_byte(0x16), Sniffed::Unknown(0x16));
        assert_eq!(Sniffed::from_first_byte(b'@'), Sniffed::Unknown(b'@'));
        assert_eq!(Sniffed::from_first_byte(b'['), Sniffed::Unknown(b'['));
    }

    #[test]
    fn the_end_line_has_the_servers_shape() {
        let dest = Target::parse("example.invalid:443", None).unwrap();
        let line = EndLine {
            id: 7,
            peer: "127.0.0.1:5000".parse().unwrap(),
            user: "alice",
            proto: Proto::HttpConnect,
            dest: &dest,
            started: Instant::now(),
        };
        assert_eq!(
            line.text_after(Duration::from_millis(1500), 10, 20, "client closed"),
            "conn#7 127.0.0.1:5000 user=alice proto=http-connect dest=example.invalid:443 \
             up=10 down=20 secs=1.500 end=client closed"
        );
        assert!(
            line.text(0, 0, "x")
                .starts_with("conn#7 127.0.0.1:5000 user=alice ")
        );
    }
}
