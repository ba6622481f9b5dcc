//! The handshake layer both proxies share: reads under a deadline computed once, the first byte
//! looked at and put back (how a connection says which protocol it speaks), an HTTP request head
//! read whole, and the answers and log reasons of a handshake that ends early.
//!
//! What each proxy does with a handshake (who may log in, where a tunnel goes) stays in
//! `server::conn` and `local::conn`; the wire formats are in `wire`.

use crate::net::stream::{self, Stream};
use crate::wire::http::{self, HttpError};
use crate::wire::socks5::SocksError;
use std::io::{self, Read};
use std::time::Instant;

/// Bytes read at a time while collecting an HTTP head.
const HEAD_CHUNK: usize = 4096;

/// Handshake-time reads: they fail with `TimedOut` once a deadline computed at the start has
/// passed, however the client spaces its bytes (a byte a minute still hits the deadline). The
/// first byte can be looked at and put back ([`DeadlineReader::peek_byte`]), which works the same
/// over TLS, where the socket cannot be peeked.
pub(crate) struct DeadlineReader<'a> {
    pub stream: &'a Stream,
    pub deadline: Instant,
    peeked: Option<u8>,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(b) = self.peeked.take() {
            buf[0] = b;
            return Ok(1);
        }
        stream::arm(self.stream.socket(), self.deadline)?;
        self.stream.read(buf)
    }
}

impl<'a> DeadlineReader<'a> {
    /// A reader over `stream` that gives up at `deadline`.
    pub fn new(stream: &'a Stream, deadline: Instant) -> DeadlineReader<'a> {
        DeadlineReader {
            stream,
            deadline,
            peeked: None,
        }
    }

    /// The first byte, without consuming it (`None` if the peer closed).
    pub fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        if self.peeked.is_none() {
            let mut b = [0u8; 1];
            if self.read(&mut b)? == 0 {
                return Ok(None);
            }
            self.peeked = Some(b[0]);
        }
        Ok(self.peeked)
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
