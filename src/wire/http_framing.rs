//! Plain-HTTP forwarding, the pure half: response heads, how long each message body is
//! (RFC 9112 §6), the chunked-coding state machine, whether each side keeps its connection open,
//! and the heads the proxy sends on (hop-by-hop fields removed, `Host` from the request target,
//! a `Via` entry added).
//!
//! Like `http.rs`, nothing here touches a socket: parsers take the bytes read so far and answer
//! "need more" or "done after N bytes". `net::forward` does the reading, writing and charging.

use crate::wire::http::{
    self, BODY_FRAMING, DEFAULT_HTTP_PORT, HOP_BY_HOP, HttpError, MAX_HEAD_BYTES, Request,
    is_one_of, need_more, next_line, parse_header_line, push_header, push_visible, trim_ows,
};
use crate::wire::target::Target;
use std::fmt;

/// Longest chunk-size line accepted (size, extensions and line end).
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most hex digits in a chunk size (a `u64`).
pub const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// Most bytes of trailer fields after the last chunk, line ends included.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The pseudonym this proxy gives itself in `Via` (RFC 9110 §7.6.3).
pub const VIA_NAME: &str = "sluice";

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The `y` of `HTTP/1.y`.
    pub minor_version: u8,
    /// The status code, 100-599.
    pub code: u16,
    /// The reason phrase as sent (may be empty).
    pub reason: Vec<u8>,
    /// Header fields in order, values trimmed.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Tries to parse a response head from the start of `buf`: `Ok(None)` until it is complete,
/// then the bytes it took and the head. Bytes after it are the body.
///
/// # Errors
/// [`HttpError::HeadTooLarge`] past [`MAX_HEAD_BYTES`], [`HttpError::TooManyHeaders`] past
/// [`MAX_HEADERS`], [`HttpError::Malformed`] for a bad status or header line.
pub fn try_parse_response(buf: &[u8]) -> Result<Option<(usize, Response)>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let Some((line, mut pos)) = next_line(window, 0) else {
        return need_more(buf);
    };
    let (minor_version, code, reason) = http::parse_status_line_parts(line)?;
    let reason = reason.to_vec();
    let Some((headers, end)) = http::parse_fields(window, pos)? else {
        return need_more(buf);
    };
    pos = end;
    let resp = Response {
        minor_version,
        code,
        reason,
        headers,
    };
    Ok(Some((pos, resp)))
}

/// How a message body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked coding, ended by the last chunk and the trailer section.
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

/// The comma-separated tokens of every `name` field, lowercased, empty ones skipped.
fn tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(trim_ows(t)).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn has(headers: &[(String, Vec<u8>)], name: &str) -> bool {
    headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// The value of `Content-Length`, which `try_parse_request` has checked to be digits that agree;
/// for a response the check is done here.
fn content_length(headers: &[(String, Vec<u8>)]) -> Result<Option<u64>, HttpError> {
    let mut found: Option<u64> = None;
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let n = std::str::from_utf8(v)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(HttpError::Malformed("content-length is not a number"))?;
        if found.is_some_and(|f| f != n) {
            return Err(HttpError::Malformed("conflicting content-length headers"));
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether the final transfer coding is `chunked`, and it is there only once.
fn chunked_last(headers: &[(String, Vec<u8>)]) -> bool {
    let codings = tokens(headers, "transfer-encoding");
    codings.last().is_some_and(|c| c == "chunked")
        && codings.iter().filter(|c| *c == "chunked").count() == 1
}

/// How the body of a client's request is framed.
///
/// # Errors
/// [`HttpError::Malformed`] (400, then close) for `Transfer-Encoding` in an HTTP/1.0 request or
/// with a final coding other than `chunked`, and for a length that does not fit. Both
/// `Transfer-Encoding` and `Content-Length`, or two lengths, are refused by the head parser.
pub fn request_body(req: &Request) -> Result<Body, HttpError> {
    if has(&req.headers, "transfer-encoding") {
        if req.minor_version == 0 {
            return Err(HttpError::Malformed(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        if !chunked_last(&req.headers) {
            return Err(HttpError::Malformed(
                "transfer-encoding of a request must end in chunked",
            ));
        }
        if has(&req.headers, "content-length") {
            return Err(HttpError::Malformed(
                "both content-length and transfer-encoding",
            ));
        }
        return Ok(Body::Chunked);
    }
    Ok(match content_length(&req.headers)? {
        None | Some(0) => Body::None,
        Some(n) => Body::Length(n),
    })
}

/// How the body of a response to a `method` request is framed.
///
/// # Errors
/// [`HttpError::Malformed`] (502) for a `Content-Length` that is not a number or two that differ.
pub fn response_body(method: &str, resp: &Response) -> Result<Body, HttpError> {
    if method == "HEAD" || resp.code < 200 || resp.code == 204 || resp.code == 304 {
        return Ok(Body::None);
    }
    if has(&resp.headers, "transfer-encoding") {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3 item 3).
        return Ok(if chunked_last(&resp.headers) {
            Body::Chunked
        } else {
            Body::UntilClose
        });
    }
    Ok(match content_length(&resp.headers)? {
        None => Body::UntilClose,
        Some(0) => Body::None,
        Some(n) => Body::Length(n),
    })
}

/// Whether the client wants its connection kept after this request: HTTP/1.1 unless it says
/// `close` (in `Connection` or the old `Proxy-Connection`), HTTP/1.0 only if it says `keep-alive`.
pub fn request_keeps_alive(req: &Request) -> bool {
    let mut t = tokens(&req.headers, "connection");
    t.extend(tokens(&req.headers, "proxy-connection"));
    keeps_alive(req.minor_version, &t)
}

/// Whether the origin lets its connection be used again after this response. A response with
/// both `Transfer-Encoding` and `Content-Length` is framed by the former but never reused
/// (RFC 9112 §6.3 item 3).
pub fn response_keeps_alive(resp: &Response) -> bool {
    if has(&resp.headers, "transfer-encoding") && has(&resp.headers, "content-length") {
        return false;
    }
    keeps_alive(resp.minor_version, &tokens(&resp.headers, "connection"))
}

fn keeps_alive(minor_version: u8, tokens: &[String]) -> bool {
    if tokens.iter().any(|t| t == "close") {
        return false;
    }
    minor_version >= 1 || tokens.iter().any(|t| t == "keep-alive")
}

/// Whether the request asks to switch protocols (`Upgrade` named in `Connection`).
pub fn wants_upgrade(req: &Request) -> bool {
    has(&req.headers, "upgrade") && tokens(&req.headers, "connection").contains(&"upgrade".into())
}

/// Whether a request with this method may be sent again after its first try got no answer
/// (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Headers to drop from a message on its way on: the hop-by-hop list, whatever `Connection`
/// names (never the body's framing headers), and, unless `upgrading`, `Upgrade`.
fn dropped(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    tokens(headers, "connection")
        .into_iter()
        .filter(|t| !is_one_of(t, &BODY_FRAMING))
        .collect()
}

fn push_fields(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)], also_drop: &[&str]) {
    let named = dropped(headers);
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    for (name, value) in headers {
        if is_one_of(name, &HOP_BY_HOP) || is_one_of(name, &named) || is_one_of(name, also_drop) {
            continue;
        }
        push_header(out, name, value);
    }
}

fn push_upgrade(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)]) {
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("upgrade") {
            push_header(out, "Upgrade", value);
        }
    }
    out.extend_from_slice(b"Connection: upgrade\r\n");
}

/// The authority for `Host`: `host` or `host:port` (the port left out when it is 80).
pub fn host_value(target: &Target) -> String {
    if target.port == DEFAULT_HTTP_PORT {
        target.host.to_string()
    } else {
        target.to_string()
    }
}

/// The head to send the origin for a plain request: `METHOD path HTTP/1.1` (this proxy's own
/// version, RFC 9110 §6.2), `Host` from the request target in place of any the client sent
/// (RFC 9112 §3.2.2), hop-by-hop fields removed, `Upgrade` kept with `Connection: upgrade` when
/// `upgrading`, and `Via: 1.x sluice` added after any `Via` already there. No `Connection`
/// otherwise: HTTP/1.1 keeps the origin connection open by default.
pub fn origin_head(req: &Request, path: &str, target: &Target, upgrading: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    push_visible(&mut out, req.method.as_bytes());
    out.push(b' ');
    push_visible(
        &mut out,
        if path.is_empty() {
            b"/"
        } else {
            path.as_bytes()
        },
    );
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    push_visible(&mut out, host_value(target).as_bytes());
    out.extend_from_slice(b"\r\n");
    push_fields(&mut out, &req.headers, &["host"]);
    push_via(&mut out, req.minor_version);
    if upgrading {
        push_upgrade(&mut out, &req.headers);
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_via(out: &mut Vec<u8>, minor_version: u8) {
    out.extend_from_slice(format!("Via: 1.{minor_version} {VIA_NAME}\r\n").as_bytes());
}

/// How the proxy ends the response head it sends the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEnd {
    /// Keep the connection for the next request (`Connection: keep-alive` for an HTTP/1.0 client).
    KeepAlive,
    /// Close after this response (`Connection: close`).
    Close,
    /// A 101: the connection becomes a tunnel (`Upgrade` kept, `Connection: upgrade`).
    Upgrade,
    /// An interim 1xx: no `Connection` field.
    Interim,
}

/// The response head for the client: `HTTP/1.1 code reason`, hop-by-hop fields removed,
/// `Via: 1.x sluice` added, `Connection` as `end` says. With `dechunk` (a chunked response for an
/// HTTP/1.0 client, which cannot read chunks) `Transfer-Encoding` is left out: the proxy sends
/// the decoded body and closes.
pub fn client_head(resp: &Response, end: ClientEnd, client_minor: u8, dechunk: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("HTTP/1.1 {} ", resp.code).as_bytes());
    out.extend(
        resp.reason
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
    let also: &[&str] = if dechunk { &["transfer-encoding"] } else { &[] };
    push_fields(&mut out, &resp.headers, also);
    push_via(&mut out, resp.minor_version);
    match end {
        ClientEnd::KeepAlive if client_minor == 0 => {
            out.extend_from_slice(b"Connection: keep-alive\r\n")
        }
        ClientEnd::KeepAlive | ClientEnd::Interim => {}
        ClientEnd::Close => out.extend_from_slice(b"Connection: close\r\n"),
        ClientEnd::Upgrade => push_upgrade(&mut out, &resp.headers),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why a chunked body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line that is not hex digits, optionally followed by extensions.
    BadSize,
    /// A chunk-size line longer than [`MAX_CHUNK_LINE`].
    LineTooLong,
    /// Chunk data not followed by its line end.
    NoDataEnd,
    /// More than [`MAX_TRAILER_BYTES`] of trailer fields.
    TrailerTooLarge,
    /// A trailer line that is not a header field.
    BadTrailer,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::BadSize => f.write_str("chunked: bad chunk-size line"),
            ChunkError::LineTooLong => {
                write!(f, "chunked: chunk-size line over {MAX_CHUNK_LINE} bytes")
            }
            ChunkError::NoDataEnd => f.write_str("chunked: chunk data not followed by CRLF"),
            ChunkError::TrailerTooLarge => {
                write!(f, "chunked: trailer fields over {MAX_TRAILER_BYTES} bytes")
            }
            ChunkError::BadTrailer => f.write_str("chunked: malformed trailer field"),
        }
    }
}

impl std::error::Error for ChunkError {}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data, reading its CRLF.
    DataEnd,
    /// After the last chunk, reading trailer lines up to the empty one.
    Trailer,
    /// The body is complete.
    Done,
}

/// Reads a chunked body as it arrives and writes it on, normalised: each chunk-size line becomes
/// bare hex (extensions dropped) with CRLF, every line end CRLF, so what the next hop parses is
/// exactly what this one did (no smuggling through lenient line ends). In decode mode only the
/// data is written (for an HTTP/1.0 client), trailers dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    line: Vec<u8>,
    trailer_bytes: usize,
    decode: bool,
}

impl ChunkedDecoder {
    /// A decoder that writes chunked (`decode` false) or only the data (`decode` true).
    pub fn new(decode: bool) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
            decode,
        }
    }

    /// True once the last chunk and the trailer section are in.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// How many data bytes the decoder wants next at most (so a reader need not read past the
    /// body when it is inside chunk data); 0 when not inside data.
    pub fn data_left(&self) -> u64 {
        match self.state {
            State::Data(n) => n,
            _ => 0,
        }
    }

    /// Takes bytes from the front of `input`, appending what to send on to `out`. Returns how
    /// many bytes it took: all of `input`, or fewer once the body is complete (the rest is the
    /// next message).
    ///
    /// # Errors
    /// A [`ChunkError`]; the body cannot be framed and the connection must be closed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut used = 0;
        while used < input.len() && self.state != State::Done {
            let rest = &input[used..];
            used += match self.state {
                State::Data(left) => {
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&rest[..n]);
                    self.state = if left == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data(left - n as u64)
                    };
                    n
                }
                State::Size | State::DataEnd | State::Trailer => self.take_line(rest, out)?,
                State::Done => 0,
            };
        }
        Ok(used)
    }

    /// Collects bytes of a line; at its LF acts on it. Returns the bytes taken.
    fn take_line(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let lf = rest.iter().position(|&b| b == b'\n');
        let take = lf.map_or(rest.len(), |i| i + 1);
        self.line.extend_from_slice(&rest[..take]);
        let limit = match self.state {
            State::Trailer => MAX_TRAILER_BYTES.saturating_sub(self.trailer_bytes),
            _ => MAX_CHUNK_LINE,
        };
        if self.line.len() > limit {
            return Err(match self.state {
                State::Trailer => ChunkError::TrailerTooLarge,
                State::DataEnd => ChunkError::NoDataEnd,
                _ => ChunkError::LineTooLong,
            });
        }
        if lf.is_some() {
            let line = std::mem::take(&mut self.line);
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            self.end_line(text, line.len(), out)?;
        }
        Ok(take)
    }

    fn end_line(
        &mut self,
        text: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        match self.state {
            State::Size => {
                let size = parse_chunk_size(text)?;
                if !self.decode {
                    out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                }
                self.state = if size == 0 {
                    State::Trailer
                } else {
                    State::Data(size)
                };
            }
            State::DataEnd => {
                if !text.is_empty() {
                    return Err(ChunkError::NoDataEnd);
                }
                if !self.decode {
                    out.extend_from_slice(b"\r\n");
                }
                self.state = State::Size;
            }
            State::Trailer => {
                self.trailer_bytes += raw_len;
                if text.is_empty() {
                    if !self.decode {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.state = State::Done;
                } else {
                    let (name, value) =
                        parse_header_line(text).map_err(|_| ChunkError::BadTrailer)?;
                    let name = String::from_utf8_lossy(name);
                    if !self.decode && !is_one_of(&name, &HOP_BY_HOP) {
                        push_header(out, &name, value);
                    }
                }
            }
            State::Data(_) | State::Done => {}
        }
        Ok(())
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]` → the size.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkError::BadSize);
    }
    let significant = &line[..digits];
    let zeros = significant.iter().take_while(|&&b| b == b'0').count();
    if digits - zeros > MAX_CHUNK_SIZE_DIGITS {
        return Err(ChunkError::BadSize);
    }
    let size = significant.iter().try_fold(0u64, |acc, &b| {
        let d = u64::from(char::from(b).to_digit(16).unwrap_or(0));
        acc.checked_mul(16).and_then(|a| a.checked_add(d))
    });
    let size = size.ok_or(ChunkError::BadSize)?;
    let rest = trim_ows(&line[digits..]);
    match rest.first() {
        None => Ok(size),
        Some(b';')
            if rest
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) =>
        {
            Ok(size)
        }
        Some(_) => Err(ChunkError::BadSize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http::try_parse_request;

    fn req(s: &str) -> Request {
        try_parse_request(s.as_bytes()).unwrap().unwrap().1
    }

    fn resp(s: &str) -> Response {
        try_parse_response(s.as_bytes()).unwrap().unwrap().1
    }

    /// Feeds `input` `step` bytes at a time; returns (output, bytes taken, done).
    fn decode_steps(input: &[u8], step: usize, decode: bool) -> (Vec<u8>, usize, bool) {
        let mut d = ChunkedDecoder::new(decode);
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = d.feed(piece, &mut out).unwrap();
            used += n;
            if n < piece.len() {
                break;
            }
        }
        (out, used, d.is_done())
    }

    #[test]
    fn response_heads_parse_whole_or_need_more() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nabc";
        let (used, r) = try_parse_response(text.as_bytes()).unwrap().unwrap();
        assert_eq!(&text[used..], "abc");
        assert_eq!(
            (r.minor_version, r.code, &r.reason[..]),
            (1, 200, &b"OK"[..])
        );
        assert_eq!(r.headers.len(), 2);
        for i in 0..used {
            assert_eq!(try_parse_response(&text.as_bytes()[..i]), Ok(None), "{i}");
        }
        let r = resp("HTTP/1.0 204\n\n");
        assert_eq!((r.minor_version, r.code, r.reason.len()), (0, 204, 0));
        assert!(try_parse_response(b"HTTP/2 200 OK\r\n\r\n").is_err());
        assert!(try_parse_response(b"HTTP/1.1 200 OK\r\nbad line\r\n\r\n").is_err());
    }

    #[test]
    fn oversized_response_heads_are_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(try_parse_response(&big), Err(HttpError::HeadTooLarge));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=http::MAX_HEADERS {
            many.push_str(&format!("X{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            try_parse_response(many.as_bytes()),
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn request_bodies_are_framed_or_refused() {
        let b = |s: &str| request_body(&req(s));
        assert_eq!(b("GET http://a/ HTTP/1.1\r\n\r\n"), Ok(Body::None));
        assert_eq!(
            b("POST http://a/ HTTP/1.1\r\nContent-Length: 005\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            b("POST http://a/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Body::None)
        );
        assert_eq!(
            b("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        for bad in [
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(b(bad).is_err(), "{bad}");
        }
        // The head parser refuses both framings, and two lengths, before this is asked.
        for smuggle in [
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        ] {
            assert!(try_parse_request(smuggle.as_bytes()).is_err(), "{smuggle}");
        }
    }

    #[test]
    fn response_bodies_follow_rfc9112_section_6_3() {
        let ok_len = resp("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(response_body("GET", &ok_len), Ok(Body::Length(7)));
        assert_eq!(response_body("HEAD", &ok_len), Ok(Body::None));
        for code in [
            "100 Continue",
            "204 No Content",
            "304 Not Modified",
            "103 Early",
        ] {
            let r = resp(&format!("HTTP/1.1 {code}\r\nContent-Length: 7\r\n\r\n"));
            assert_eq!(response_body("GET", &r), Ok(Body::None), "{code}");
        }
        let chunked = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(response_body("GET", &chunked), Ok(Body::Chunked));
        let both =
            resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(response_body("GET", &both), Ok(Body::Chunked));
        assert!(!response_keeps_alive(&both));
        let gzip = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(response_body("GET", &gzip), Ok(Body::UntilClose));
        let bare = resp("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(response_body("GET", &bare), Ok(Body::UntilClose));
        let two = resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(response_body("GET", &two).is_err());
        let nan = resp("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n");
        assert!(response_body("GET", &nan).is_err());
    }

    #[test]
    fn keep_alive_by_version_and_connection_tokens() {
        assert!(request_keeps_alive(&req("GET http://a/ HTTP/1.1\r\n\r\n")));
        assert!(!request_keeps_alive(&req(
            "GET http://a/ HTTP/1.1\r\nConnection: Close\r\n\r\n"
        )));
        assert!(!request_keeps_alive(&req(
            "GET http://a/ HTTP/1.1\r\nProxy-Connection: close\r\n\r\n"
        )));
        assert!(!request_keeps_alive(&req("GET http://a/ HTTP/1.0\r\n\r\n")));
        assert!(request_keeps_alive(&req(
            "GET http://a/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n"
        )));
        assert!(response_keeps_alive(&resp("HTTP/1.1 200 OK\r\n\r\n")));
        assert!(!response_keeps_alive(&resp("HTTP/1.0 200 OK\r\n\r\n")));
        assert!(response_keeps_alive(&resp(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        )));
        assert!(!response_keeps_alive(&resp(
            "HTTP/1.1 200 OK\r\nConnection: x, close\r\n\r\n"
        )));
    }

    #[test]
    fn idempotent_methods_and_upgrades() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(m), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "get"] {
            assert!(!is_idempotent(m), "{m}");
        }
        assert!(wants_upgrade(&req(
            "GET http://a/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )));
        assert!(!wants_upgrade(&req(
            "GET http://a/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
        )));
    }

    #[test]
    fn origin_head_drops_hop_by_hop_sets_host_and_adds_via() {
        let r = req(concat!(
            "POST http://example.com:8080/submit?x=1 HTTP/1.1\r\n",
            "Host: evil.example\r\n",
            "Proxy-Authorization: Basic dTpw\r\n",
            "proxy-connection: keep-alive\r\n",
            "Proxy-Authenticate: x\r\n",
            "Connection: keep-alive, X-Secret ,x-other, Content-Length\r\n",
            "Keep-Alive: timeout=5\r\n",
            "TE: trailers\r\n",
            "Trailer: X-T\r\n",
            "Upgrade: websocket\r\n",
            "x-secret: 1\r\n",
            "X-Other: 2\r\n",
            "X-Kept: 3\r\n",
            "Via: 1.0 upstream\r\n",
            "Content-Length: 4\r\n",
            "Authorization: Bearer origin-token\r\n",
            "\r\n",
        ));
        let (target, path) = r.absolute_target().unwrap();
        let out = origin_head(&r, &path, &target, false);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            concat!(
                "POST /submit?x=1 HTTP/1.1\r\n",
                "Host: example.com:8080\r\n",
                "X-Kept: 3\r\n",
                "Via: 1.0 upstream\r\n",
                "Content-Length: 4\r\n",
                "Authorization: Bearer origin-token\r\n",
                "Via: 1.1 sluice\r\n",
                "\r\n",
            )
        );
        let (used, back) = try_parse_request(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(back.target, "/submit?x=1");
        let r = req("GET http://[::1]:80 HTTP/1.0\r\n\r\n");
        let (target, path) = r.absolute_target().unwrap();
        assert_eq!(
            origin_head(&r, &path, &target, false),
            b"GET / HTTP/1.1\r\nHost: [::1]\r\nVia: 1.0 sluice\r\n\r\n"
        );
    }

    #[test]
    fn origin_head_keeps_upgrade_only_when_upgrading() {
        let r = req(
            "GET http://a/ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
        );
        let (target, path) = r.absolute_target().unwrap();
        let text = String::from_utf8(origin_head(&r, &path, &target, true)).unwrap();
        assert!(
            text.ends_with("Sec-WebSocket-Key: k\r\nVia: 1.1 sluice\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "{text}"
        );
        let text = String::from_utf8(origin_head(&r, &path, &target, false)).unwrap();
        assert!(!text.to_ascii_lowercase().contains("upgrade"), "{text}");
    }

    #[test]
    fn origin_head_never_emits_line_breaks_from_fields() {
        let mut r = req("GET http://a/ HTTP/1.1\r\n\r\n");
        r.headers.push(("X".into(), b"a\r\nInjected: 1".to_vec()));
        r.headers.push(("Bad\r\nName".into(), b"v".to_vec()));
        let target = Target::parse("a:80", None).unwrap();
        let out = origin_head(&r, "/p\r\nq", &target, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p%0D%0Aq HTTP/1.1\r\nHost: a\r\nX: a  Injected: 1\r\nVia: 1.1 sluice\r\n\r\n"
        );
    }

    #[test]
    fn client_head_filters_and_says_how_the_connection_ends() {
        let r = resp(
            "HTTP/1.0 200 Fine\r\nConnection: keep-alive, X-Drop\r\nKeep-Alive: 5\r\nX-Drop: 1\r\nProxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\n",
        );
        let head =
            |end, minor, dechunk| String::from_utf8(client_head(&r, end, minor, dechunk)).unwrap();
        assert_eq!(
            head(ClientEnd::KeepAlive, 1, false),
            "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nVia: 1.0 sluice\r\n\r\n"
        );
        assert!(head(ClientEnd::KeepAlive, 0, false).ends_with("Connection: keep-alive\r\n\r\n"));
        assert!(head(ClientEnd::Close, 1, false).ends_with("Connection: close\r\n\r\n"));
        let c = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let text = String::from_utf8(client_head(&c, ClientEnd::Close, 0, true)).unwrap();
        assert!(!text.contains("Transfer-Encoding"), "{text}");
        let up =
            resp("HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        let text = String::from_utf8(client_head(&up, ClientEnd::Upgrade, 1, false)).unwrap();
        assert!(
            text.ends_with("Via: 1.1 sluice\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "{text}"
        );
        let cont = resp("HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(
            client_head(&cont, ClientEnd::Interim, 1, false),
            b"HTTP/1.1 100 Continue\r\nVia: 1.1 sluice\r\n\r\n"
        );
    }

    const CHUNKED: &[u8] =
        b"5;ext=1\r\nhello\r\n00A\n0123456789\n0\r\nX-Sum: 1\r\nConnection: x\r\n\r\nNEXT";

    #[test]
    fn chunked_bodies_are_normalised_whatever_the_split() {
        for step in [1, 2, 3, 7, CHUNKED.len()] {
            let (out, used, done) = decode_steps(CHUNKED, step, false);
            assert!(done, "step {step}");
            assert_eq!(&CHUNKED[used..], b"NEXT", "step {step}");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "5\r\nhello\r\na\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n",
                "step {step}"
            );
            let (out, _, done) = decode_steps(CHUNKED, step, true);
            assert!(done);
            assert_eq!(out, b"hello0123456789");
        }
    }

    #[test]
    fn truncated_chunked_bodies_are_never_done() {
        let end = CHUNKED.len() - 4;
        for cut in 0..end {
            let (_, used, done) = decode_steps(&CHUNKED[..cut], 1, false);
            assert!(!done, "cut {cut}");
            assert_eq!(used, cut);
        }
    }

    #[test]
    fn bad_chunked_framing_is_an_error() {
        let fails = |input: &[u8]| {
            let mut d = ChunkedDecoder::new(false);
            d.feed(input, &mut Vec::new()).err()
        };
        assert_eq!(fails(b"x\r\n"), Some(ChunkError::BadSize));
        assert_eq!(fails(b"\r\n"), Some(ChunkError::BadSize));
        assert_eq!(fails(b"5 junk\r\n"), Some(ChunkError::BadSize));
        assert_eq!(fails(b"-5\r\n"), Some(ChunkError::BadSize));
        assert_eq!(fails(b"11112222333344445\r\n"), Some(ChunkError::BadSize));
        assert_eq!(fails(b"FFFFFFFFFFFFFFFF\r\n"), None);
        assert_eq!(fails(b"00000000000000000000001\r\n"), None);
        assert_eq!(fails(b"3\r\nabcX\r\n"), Some(ChunkError::NoDataEnd));
        assert_eq!(fails(b"0\r\nnot a field\r\n"), Some(ChunkError::BadTrailer));
        let mut long = b"5;".to_vec();
        long.resize(MAX_CHUNK_LINE + 1, b'a');
        assert_eq!(fails(&long), Some(ChunkError::LineTooLong));
        let mut trailer = b"0\r\n".to_vec();
        for i in 0..MAX_TRAILER_BYTES / 10 + 1 {
            trailer.extend_from_slice(format!("X{i:04}: ab\r\n").as_bytes());
        }
        assert_eq!(fails(&trailer), Some(ChunkError::TrailerTooLarge));
        // Fed a byte at a time, the limits still hold.
        let mut d = ChunkedDecoder::new(false);
        let mut out = Vec::new();
        let err = long.iter().find_map(|b| d.feed(&[*b], &mut out).err());
        assert_eq!(err, Some(ChunkError::LineTooLong));
    }

    #[test]
    fn data_left_tells_how_much_body_to_read() {
        let mut d = ChunkedDecoder::new(false);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"10\r\nabc", &mut out), Ok(7));
        assert_eq!(d.data_left(), 13);
        assert_eq!(
            ChunkError::BadSize.to_string(),
            "chunked: bad chunk-size line"
        );
    }
}
