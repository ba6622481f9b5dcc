//! HTTP/1.x for the proxy: parsing a client's request head, reading its `Proxy-Authorization`
//! (Basic), rewriting a plain request for the origin, and encoding the proxy's own responses.
//! Response heads from an origin are `http_framing.rs`'s (built on this file's line parsers).
//!
//! Pure and incremental: every parser works on a byte slice the caller has read so far and
//! answers "need more", "done after `used` bytes" or an error, and never panics on any input.
//! Sockets, timeouts, deciding whether credentials are good, access rules, dialing, and copying
//! bodies or tunnels are left to others; this module only turns bytes into values and back.

use std::fmt;

use crate::wire::target::Target;

/// Longest request (or response) head accepted: request line, header lines and the blank line,
/// counted with their line endings (and with the one leading empty line that is tolerated).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 128;

/// Port assumed for an `http://` URL that names none.
pub const DEFAULT_HTTP_PORT: u16 = 80;

/// Realm announced in the `Proxy-Authenticate` header of a 407 response.
pub const AUTH_REALM: &str = "sluice";

/// Headers that only concern one hop and never go to the origin (besides those that the
/// `Connection` header names).
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "proxy-authorization",
    "proxy-connection",
    "proxy-authenticate",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// Headers that describe the body, which is passed through unchanged: never dropped, not even
/// when the `Connection` header names them (that would change how the origin frames the body).
pub(crate) const BODY_FRAMING: [&str; 2] = ["content-length", "transfer-encoding"];

/// Why a head cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The head is longer than [`MAX_HEAD_BYTES`] (answered with 431).
    HeadTooLarge,
    /// The head breaks the HTTP/1.x syntax (answered with 400).
    Malformed(&'static str),
    /// More than [`MAX_HEADERS`] header fields (answered with 431).
    TooManyHeaders,
    /// An absolute-form URL with a scheme other than `http`, such as `https://` (answered with 400).
    UnsupportedScheme,
    /// The request-target does not name a destination this proxy can use (answered with 400).
    BadTarget(&'static str),
}

impl HttpError {
    /// The status the proxy answers this error with.
    pub fn status(&self) -> Status {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => Status::HeaderFieldsTooLarge,
            HttpError::Malformed(_) | HttpError::UnsupportedScheme | HttpError::BadTarget(_) => {
                Status::BadRequest
            }
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::HeadTooLarge => {
                write!(f, "http: head larger than {MAX_HEAD_BYTES} bytes")
            }
            HttpError::Malformed(why) => write!(f, "http: malformed head: {why}"),
            HttpError::TooManyHeaders => write!(f, "http: more than {MAX_HEADERS} header fields"),
            HttpError::UnsupportedScheme => {
                f.write_str("http: only http:// URLs can be proxied (use CONNECT for https)")
            }
            HttpError::BadTarget(why) => write!(f, "http: bad request target: {why}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A parsed request head.
///
/// `Debug` prints it with the values of `Proxy-Authorization` and `Authorization` redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (a token; compared case-sensitively).
    pub method: String,
    /// The request-target exactly as sent (visible ASCII, no spaces).
    pub target: String,
    /// The `y` of `HTTP/1.y`: 0 or 1.
    pub minor_version: u8,
    /// Header fields in order: names as sent, values without leading or trailing spaces and tabs.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Headers whose values `Debug` never shows.
const SECRET_HEADERS: [&str; 2] = ["proxy-authorization", "authorization"];

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'a>(&'a [(String, Vec<u8>)]);
        impl fmt::Debug for Headers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut list = f.debug_list();
                for (name, value) in self.0 {
                    if is_one_of(name, &SECRET_HEADERS) {
                        list.entry(&format_args!("{name}: <redacted>"));
                    } else {
                        let value = String::from_utf8_lossy(value);
                        list.entry(&format_args!("{name}: {value:?}"));
                    }
                }
                list.finish()
            }
        }
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("minor_version", &self.minor_version)
            .field("headers", &Headers(&self.headers))
            .finish()
    }
}

/// What the `Proxy-Authorization` header of a request holds.
///
/// `Debug` shows the username (lossily, as text) but never the password.
#[derive(Clone, PartialEq, Eq)]
pub enum ProxyAuth {
    /// No `Proxy-Authorization` header.
    Missing,
    /// A `Proxy-Authorization` header that is not well-formed Basic credentials (bad base64, no
    /// ':' in the decoded text, no scheme token, or the header given more than once).
    Malformed,
    /// Credentials in another scheme (NTLM, Negotiate, Digest…): answered with 407 and the Basic
    /// challenge, so the client can fall back to Basic (RFC 9110 §11.7.1).
    OtherScheme,
    /// Basic credentials, split at the first ':' of the decoded text; bytes, not necessarily UTF-8.
    Basic {
        /// Everything before the first ':'.
        username: Vec<u8>,
        /// Everything after the first ':' (may itself hold ':').
        password: Vec<u8>,
    },
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyAuth::Missing => f.write_str("Missing"),
            ProxyAuth::Malformed => f.write_str("Malformed"),
            ProxyAuth::OtherScheme => f.write_str("OtherScheme"),
            ProxyAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", &String::from_utf8_lossy(username))
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// Tries to parse a request head from the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet, read more. `Ok(Some((used, request)))`: the head
/// took the first `used` bytes; any bytes after them belong to the body or the tunnel.
/// Accepts CRLF and bare LF line endings and ignores one empty line before the request line.
///
/// # Errors
/// [`HttpError::HeadTooLarge`] as soon as `buf` holds more than [`MAX_HEAD_BYTES`] without a
/// complete head within them; [`HttpError::TooManyHeaders`] past [`MAX_HEADERS`] fields;
/// [`HttpError::Malformed`] for a bad request line (method not a token, anything but
/// `HTTP/1.0` or `HTTP/1.1`), a header name that is not a token, a folded (obs-fold) line,
/// control characters, an invalid or conflicting `Content-Length`, or both `Content-Length` and
/// `Transfer-Encoding`. Complete lines are checked as they arrive, so junk fails early.
///
/// Each call scans `buf` from the start. The answer can only change once newly read bytes hold
/// a `\n` or the buffer grows past [`MAX_HEAD_BYTES`], so a caller fed a byte at a time may skip
/// calls until then.
pub fn try_parse_request(buf: &[u8]) -> Result<Option<(usize, Request)>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let start = match window {
        [] | [b'\r'] => return need_more(buf),
        [b'\n', ..] => 1,
        [b'\r', b'\n', ..] => 2,
        [b'\r', ..] => return Err(HttpError::Malformed("bare CR before the request line")),
        _ => 0,
    };
    let Some((line, mut pos)) = next_line(window, start) else {
        return need_more(buf);
    };
    let (method, target, minor_version) = parse_request_line(line)?;
    let Some((headers, end)) = parse_fields(window, pos)? else {
        return need_more(buf);
    };
    pos = end;
    check_body_framing(&headers)?;
    let request = Request {
        method,
        target,
        minor_version,
        headers,
    };
    Ok(Some((pos, request)))
}

/// The answer when no complete head was found in the first [`MAX_HEAD_BYTES`] of `buf`.
/// Header fields in the order they came: names as sent (compare them ignoring case), trimmed values.
pub(crate) type Fields = Vec<(String, Vec<u8>)>;

/// Reads the header fields of a head from `pos` up to and including the empty line that ends
/// them: `Ok(None)` while that line has not arrived, else the fields and where the head ends.
/// Shared by requests (here) and responses (`http_framing`).
///
/// # Errors
/// [`HttpError::TooManyHeaders`] past [`MAX_HEADERS`]; [`HttpError::Malformed`] for a bad line.
pub(crate) fn parse_fields(
    window: &[u8],
    mut pos: usize,
) -> Result<Option<(Fields, usize)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let Some((line, next)) = next_line(window, pos) else {
            return Ok(None);
        };
        pos = next;
        if line.is_empty() {
            return Ok(Some((headers, pos)));
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let (name, value) = parse_header_line(line)?;
        // A token is ASCII, so this never loses anything.
        headers.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
}

pub(crate) fn need_more<T>(buf: &[u8]) -> Result<Option<T>, HttpError> {
    if buf.len() > MAX_HEAD_BYTES {
        Err(HttpError::HeadTooLarge)
    } else {
        Ok(None)
    }
}

/// The complete line starting at `pos` (without its LF or CRLF) and where the next one starts.
pub(crate) fn next_line(window: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = window.get(pos..)?;
    let lf = rest.iter().position(|&b| b == b'\n')?;
    let line = rest.get(..lf)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, pos + lf + 1))
}

/// `method SP request-target SP HTTP-version`, single spaces only.
fn parse_request_line(line: &[u8]) -> Result<(String, String, u8), HttpError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "request line is not: method SP target SP version",
        ));
    };
    if !is_token(method) {
        return Err(HttpError::Malformed("method is not a token"));
    }
    if target.is_empty() || !target.iter().all(|&b| is_visible(b)) {
        return Err(HttpError::Malformed(
            "request target is empty or not visible ASCII",
        ));
    }
    let minor_version = parse_version(version)?;
    // Both are ASCII (checked above), so the conversions are exact.
    Ok((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(target).into_owned(),
        minor_version,
    ))
}

/// `HTTP/1.0` → 0, `HTTP/1.1` → 1.
pub(crate) fn parse_version(version: &[u8]) -> Result<u8, HttpError> {
    match version {
        b"HTTP/1.0" => Ok(0),
        b"HTTP/1.1" => Ok(1),
        _ => Err(HttpError::Malformed("version is not HTTP/1.0 or HTTP/1.1")),
    }
}

/// `HTTP-version SP 3DIGIT [SP reason-phrase]` → (minor version, code, reason phrase).
pub(crate) fn parse_status_line_parts(line: &[u8]) -> Result<(u8, u16, &[u8]), HttpError> {
    let (version, rest) = line
        .split_first_chunk::<8>()
        .ok_or(HttpError::Malformed("status line too short"))?;
    let minor = parse_version(version)?;
    let Some((b' ', rest)) = rest.split_first() else {
        return Err(HttpError::Malformed("no space after the version"));
    };
    let (digits, reason) = rest
        .split_first_chunk::<3>()
        .ok_or(HttpError::Malformed("status code is not three digits"))?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Malformed("status code is not three digits"));
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&code) {
        return Err(HttpError::Malformed("status code out of range"));
    }
    match reason.split_first() {
        None => Ok((minor, code, &[])),
        Some((b' ', text)) if text.iter().all(|&b| is_field_byte(b)) => Ok((minor, code, text)),
        Some(_) => Err(HttpError::Malformed("bad reason phrase")),
    }
}

/// `name ":" OWS value OWS` → (name, trimmed value).
pub(crate) fn parse_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), HttpError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HttpError::Malformed("obsolete line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HttpError::Malformed("header line without ':'"))?;
    let (name, value) = line.split_at(colon);
    if !is_token(name) {
        return Err(HttpError::Malformed("header name is not a token"));
    }
    let value = trim_ows(value.get(1..).unwrap_or_default());
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(HttpError::Malformed("control character in header value"));
    }
    Ok((name, value))
}

/// Refuses bodies whose length two parties could read differently (request smuggling).
fn check_body_framing(headers: &[(String, Vec<u8>)]) -> Result<(), HttpError> {
    let mut length: Option<&[u8]> = None;
    let mut chunked = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::Malformed("content-length is not a number"));
            }
            let digits = trim_leading_zeros(value);
            match length {
                Some(prev) if prev != digits => {
                    return Err(HttpError::Malformed("conflicting content-length headers"));
                }
                _ => length = Some(digits),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(HttpError::Malformed(
            "both content-length and transfer-encoding",
        ));
    }
    Ok(())
}

fn trim_leading_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&b| b == b'0').count();
    let zeros = zeros.min(digits.len().saturating_sub(1));
    digits.get(zeros..).unwrap_or(digits)
}

/// A `tchar` of RFC 9110.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Printable ASCII other than space.
pub(crate) fn is_visible(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// A byte allowed in a field value or reason phrase: HT, SP, VCHAR, obs-text.
pub(crate) fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || is_visible(b) || b >= 0x80
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

pub(crate) fn is_one_of(name: &str, list: &[&str]) -> bool {
    list.iter().any(|n| name.eq_ignore_ascii_case(n))
}

impl Request {
    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether this is a CONNECT request (the method is case-sensitive).
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// The destination of a CONNECT request: authority-form `host:port` or `[v6]:port`; the port
    /// is required.
    ///
    /// # Errors
    /// [`HttpError::BadTarget`] when the request-target is not such an authority.
    pub fn connect_target(&self) -> Result<Target, HttpError> {
        Target::parse(&self.target, None).map_err(|e| HttpError::BadTarget(e.0))
    }

    /// The destination and origin-form path of a plain proxy request, whose target is an
    /// absolute URL `http://host[:port][/path][?query]`.
    ///
    /// The scheme is case-insensitive, the port defaults to 80 (also for an empty port), and an
    /// empty path becomes "/". The returned string is the path and query to send to the origin.
    ///
    /// # Errors
    /// [`HttpError::UnsupportedScheme`] for any scheme but `http` (such as `https`);
    /// [`HttpError::BadTarget`] for origin-form or other non-URL targets, userinfo (`u:p@`) in
    /// the URL, a fragment, or a host and port that are not a destination.
    pub fn absolute_target(&self) -> Result<(Target, String), HttpError> {
        let Some((scheme, rest)) = self.target.split_once("://") else {
            return Err(HttpError::BadTarget("proxy requests need an absolute URL"));
        };
        let scheme_ok = scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok {
            return Err(HttpError::BadTarget("proxy requests need an absolute URL"));
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(HttpError::UnsupportedScheme);
        }
        if rest.contains('#') {
            return Err(HttpError::BadTarget("fragment in the URL"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err(HttpError::BadTarget(
                "credentials in the URL are not allowed",
            ));
        }
        if authority.is_empty() {
            return Err(HttpError::BadTarget("no host in the URL"));
        }
        // RFC 3986: an empty port means the scheme's default.
        let authority = authority.strip_suffix(':').unwrap_or(authority);
        let target = Target::parse(authority, Some(DEFAULT_HTTP_PORT))
            .map_err(|e| HttpError::BadTarget(e.0))?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok((target, path))
    }

    /// The Basic credentials in `Proxy-Authorization`: scheme `Basic` in any case, one or more
    /// spaces, then the base64 (padded or not) of `user:pass`, split at the first ':'. Another
    /// scheme token is [`ProxyAuth::OtherScheme`]. The bytes are as sent: see [`credential_text`].
    pub fn proxy_auth(&self) -> ProxyAuth {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("proxy-authorization"));
        let Some((_, value)) = values.next() else {
            return ProxyAuth::Missing;
        };
        if values.next().is_some() {
            return ProxyAuth::Malformed;
        }
        let space = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
        let (scheme, rest) = value.split_at(space);
        if !is_token(scheme) {
            return ProxyAuth::Malformed;
        }
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return ProxyAuth::OtherScheme;
        }
        let encoded = rest.trim_ascii_start();
        let Some(decoded) = base64_decode(encoded) else {
            return ProxyAuth::Malformed;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return ProxyAuth::Malformed;
        };
        let (username, password) = decoded.split_at(colon);
        ProxyAuth::Basic {
            username: username.to_vec(),
            password: password.get(1..).unwrap_or_default().to_vec(),
        }
    }
}

/// Appends `s`, percent-encoding every byte that is not visible ASCII.
pub(crate) fn push_visible(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        if is_visible(b) {
            out.push(b);
        } else {
            out.push(b'%');
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0x0f)]);
        }
    }
}

/// Appends `name: value\r\n`; skips a name that is not a token, turns bad value bytes to spaces.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    if !is_token(name.as_bytes()) {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(
        value
            .iter()
            .map(|&b| if is_field_byte(b) { b } else { b' ' }),
    );
    out.extend_from_slice(b"\r\n");
}

/// A status the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200 Connection established: the CONNECT tunnel is open.
    Ok,
    /// 400 Bad Request.
    BadRequest,
    /// 403 Forbidden: the destination is not allowed.
    Forbidden,
    /// 407 Proxy Authentication Required.
    ProxyAuthRequired,
    /// 429 Too Many Requests.
    TooManyRequests,
    /// 431 Request Header Fields Too Large.
    HeaderFieldsTooLarge,
    /// 502 Bad Gateway: the destination could not be reached or answered badly.
    BadGateway,
    /// 503 Service Unavailable.
    ServiceUnavailable,
    /// 504 Gateway Timeout: dialing the destination timed out.
    GatewayTimeout,
}

impl Status {
    /// The numeric status code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::ProxyAuthRequired => 407,
            Status::TooManyRequests => 429,
            Status::HeaderFieldsTooLarge => 431,
            Status::BadGateway => 502,
            Status::ServiceUnavailable => 503,
            Status::GatewayTimeout => 504,
        }
    }

    /// The reason phrase sent after the code.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "Connection established",
            Status::BadRequest => "Bad Request",
            Status::Forbidden => "Forbidden",
            Status::ProxyAuthRequired => "Proxy Authentication Required",
            Status::TooManyRequests => "Too Many Requests",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::BadGateway => "Bad Gateway",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::GatewayTimeout => "Gateway Timeout",
        }
    }
}

/// A complete response from the proxy itself, after which the proxy closes the connection.
///
/// For [`Status::Ok`] just `HTTP/1.1 200 Connection established` and the blank line (`detail`
/// is ignored; the tunnel follows). Otherwise the status line, for 407 a
/// `Proxy-Authenticate: Basic realm="sluice", charset="UTF-8"` header (RFC 7617 §2.1),
/// `Content-Type: text/plain; charset=utf-8`, `Content-Length`, `Connection: close`, and
/// `detail` plus "\n" as the body.
pub fn encode_response(status: Status, detail: &str) -> Vec<u8> {
    encode_error(status, detail, false)
}

/// As [`encode_response`], but when `keep_alive` the connection stays open for the client's
/// next request (no `Connection: close`): how a plain-HTTP proxy answers one request of several.
pub fn encode_error(status: Status, detail: &str, keep_alive: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason()).into_bytes();
    if status == Status::Ok {
        out.extend_from_slice(b"\r\n");
        return out;
    }
    if status == Status::ProxyAuthRequired {
        out.extend_from_slice(
            format!("Proxy-Authenticate: Basic realm=\"{AUTH_REALM}\", charset=\"UTF-8\"\r\n")
                .as_bytes(),
        );
    }
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let head = format!(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{connection}\r\n",
        detail.len() + 1
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(detail.as_bytes());
    out.push(b'\n');
    out
}

/// A Basic credential as the user store knows it (UTF-8): as sent when it is valid UTF-8, else
/// read as ISO-8859-1, which is what clients that ignore `charset="UTF-8"` send (python
/// `requests`, older browsers). Usernames and passwords are stored as UTF-8, so bytes that are not
/// UTF-8 could never match as sent.
pub fn credential_text(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if std::str::from_utf8(bytes).is_ok() {
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let text: String = bytes.iter().map(|&b| char::from(b)).collect();
        std::borrow::Cow::Owned(text.into_bytes())
    }
}

/// The standard base64 alphabet of RFC 4648.
const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, `+/`) with `=` padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(BASE64_ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Decodes standard base64 (RFC 4648, `+/`), with correct `=` padding or with none at all.
///
/// Strict otherwise: `None` for any byte outside the alphabet (including whitespace), padding
/// in the middle or of the wrong length, a length no encoding has, or unused low bits that are
/// not zero.
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let pad = s.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 || (pad > 0 && !s.len().is_multiple_of(4)) {
        return None;
    }
    let body = s.get(..s.len() - pad)?;
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for &c in chunk {
            n = (n << 6) | u32::from(base64_value(c)?);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]),
            3 => {
                if n & 0x3 != 0 {
                    return None;
                }
                out.extend_from_slice(&[(n >> 10) as u8, (n >> 2) as u8]);
            }
            2 => {
                if n & 0xf != 0 {
                    return None;
                }
                out.push((n >> 4) as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::target::Host;
    use proptest::prelude::*;
    use std::net::IpAddr;

    /// A response head's length and status code, as the forwarding parser reads it: the status
    /// line parser lives here, the head parser in `http_framing.rs`.
    fn response_status(buf: &[u8]) -> Result<Option<(usize, u16)>, HttpError> {
        crate::wire::http_framing::try_parse_response(buf).map(|r| r.map(|(n, h)| (n, h.code)))
    }

    fn parse(s: &str) -> Request {
        match try_parse_request(s.as_bytes()) {
            Ok(Some((used, req))) => {
                assert_eq!(used, s.len(), "whole head consumed for {s:?}");
                req
            }
            other => panic!("{s:?} gave {other:?}"),
        }
    }

    fn parse_err(s: &[u8]) -> HttpError {
        match try_parse_request(s) {
            Err(e) => e,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(s)),
        }
    }

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse::<IpAddr>().unwrap())
    }

    fn domain(s: &str) -> Host {
        Host::Domain(s.to_string())
    }

    fn auth_request(value: &str) -> Request {
        parse(&format!(
            "CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n"
        ))
    }

    fn basic(user: &str, pass: &str) -> ProxyAuth {
        ProxyAuth::Basic {
            username: user.as_bytes().to_vec(),
            password: pass.as_bytes().to_vec(),
        }
    }

    // ---- request line and CONNECT ----

    #[test]
    fn connect_with_domain() {
        let req = parse("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert!(req.is_connect());
        assert_eq!(req.method, "CONNECT");
        assert_eq!(req.target, "example.com:443");
        assert_eq!(req.minor_version, 1);
        assert_eq!(req.header("host"), Some(&b"example.com:443"[..]));
        let t = req.connect_target().unwrap();
        assert_eq!(t.host, domain("example.com"));
        assert_eq!(t.port, 443);
    }

    #[test]
    fn connect_with_ipv6_and_ipv4() {
        let t = parse("CONNECT [::1]:443 HTTP/1.1\r\n\r\n")
            .connect_target()
            .unwrap();
        assert_eq!(t.host, ip("::1"));
        assert_eq!(t.port, 443);
        let t = parse("CONNECT 10.1.2.3:8080 HTTP/1.0\r\n\r\n")
            .connect_target()
            .unwrap();
        assert_eq!(t.host, ip("10.1.2.3"));
        assert_eq!(t.port, 8080);
    }

    #[test]
    fn connect_target_refuses_bad_authorities() {
        for target in [
            "example.com",
            "[::1]",
            "::1:443",
            "example.com:0",
            "example.com:70000",
            "user@example.com:443",
            "http://example.com:80",
            "/path",
            "a/b:80",
        ] {
            let req = parse(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
            let err = req.connect_target().unwrap_err();
            assert!(matches!(err, HttpError::BadTarget(_)), "{target}: {err:?}");
            assert_eq!(err.status(), Status::BadRequest);
        }
    }

    #[test]
    fn connect_is_case_sensitive() {
        assert!(!parse("connect a:1 HTTP/1.1\r\n\r\n").is_connect());
        assert!(!parse("GET http://a/ HTTP/1.1\r\n\r\n").is_connect());
    }

    #[test]
    fn bad_request_lines() {
        for bad in [
            "GET  /  HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1 \r\n\r\n",
            "GET /\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
            "GET / http/1.1\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            " GET / HTTP/1.1\r\n\r\n",
            "GET /\u{e9} HTTP/1.1\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\n\r\n",
            "\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "\n\nGET / HTTP/1.1\r\n\r\n",
            "\rGET / HTTP/1.1\r\n\r\n",
        ] {
            let err = parse_err(bad.as_bytes());
            assert!(matches!(err, HttpError::Malformed(_)), "{bad:?}: {err:?}");
            assert_eq!(err.status(), Status::BadRequest);
        }
    }

    #[test]
    fn one_leading_empty_line_is_ignored() {
        let req = parse("\r\nGET http://a/ HTTP/1.1\r\n\r\n");
        assert_eq!(req.method, "GET");
        let req = parse("\nGET http://a/ HTTP/1.0\n\n");
        assert_eq!(req.minor_version, 0);
        assert_eq!(try_parse_request(b"\r"), Ok(None));
        assert_eq!(try_parse_request(b"\r\n"), Ok(None));
        assert_eq!(try_parse_request(b""), Ok(None));
    }

    // ---- headers ----

    #[test]
    fn header_names_match_in_any_case_and_values_are_trimmed() {
        let req = parse(
            "GET http://a/ HTTP/1.1\r\nX-ONE: \t first \t\r\nx-one: second\r\nEmpty:\r\nsp:   \r\n\r\n",
        );
        assert_eq!(req.headers[0].0, "X-ONE");
        assert_eq!(req.header("x-one"), Some(&b"first"[..]));
        assert_eq!(req.header("X-One"), Some(&b"first"[..]));
        assert_eq!(req.header("EMPTY"), Some(&b""[..]));
        assert_eq!(req.header("sp"), Some(&b""[..]));
        assert_eq!(req.header("missing"), None);
        assert_eq!(req.headers.len(), 4);
    }

    #[test]
    fn header_values_keep_inner_spaces_and_obs_text() {
        let req = parse("GET http://a/ HTTP/1.1\r\nX: a  b\tc é\r\n\r\n");
        assert_eq!(req.header("x"), Some("a  b\tc é".as_bytes()));
    }

    #[test]
    fn bad_header_lines() {
        for bad in [
            "GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            "GET / HTTP/1.1\r\nName : v\r\n\r\n",
            "GET / HTTP/1.1\r\n: v\r\n\r\n",
            "GET / HTTP/1.1\r\nNa(me: v\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
            "GET / HTTP/1.1\r\n\rX: a\r\n\r\n",
        ] {
            let err = parse_err(bad.as_bytes());
            assert!(matches!(err, HttpError::Malformed(_)), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn obs_fold_is_rejected() {
        for bad in [
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n",
            "GET / HTTP/1.1\r\n X: a\r\n\r\n",
            "GET / HTTP/1.1\nX: a\n b\n\n",
        ] {
            assert_eq!(
                parse_err(bad.as_bytes()),
                HttpError::Malformed("obsolete line folding"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bare_lf_and_mixed_endings() {
        let lf = parse("GET http://a/x HTTP/1.1\nHost: a\nX: 1\n\n");
        let crlf = parse("GET http://a/x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n");
        let mixed = parse("GET http://a/x HTTP/1.1\r\nHost: a\nX: 1\r\n\n");
        assert_eq!(lf, crlf);
        assert_eq!(mixed, crlf);
    }

    #[test]
    fn too_many_headers() {
        let mut head = String::from("GET http://a/ HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            head.push_str(&format!("X-{i}: v\r\n"));
        }
        let ok = format!("{head}\r\n");
        assert_eq!(parse(&ok).headers.len(), MAX_HEADERS);
        head.push_str("One-More: v\r\n");
        // Detected as soon as the extra line is complete, without waiting for the blank line.
        assert_eq!(parse_err(head.as_bytes()), HttpError::TooManyHeaders);
        assert_eq!(
            HttpError::TooManyHeaders.status(),
            Status::HeaderFieldsTooLarge
        );
        let resp = format!("HTTP/1.1 200 OK\r\n{}\r\n", &head[24..]);
        assert_eq!(
            response_status(resp.as_bytes()),
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn content_length_and_transfer_encoding_checks() {
        parse("POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 005\r\n\r\n");
        parse("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        for bad in [
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length:\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse_err(bad.as_bytes()), HttpError::Malformed(_)),
                "{bad:?}"
            );
        }
    }

    // ---- size limits and incremental parsing ----

    /// A complete request head of exactly `len` bytes.
    fn head_of_len(len: usize) -> Vec<u8> {
        let start = b"GET http://a/ HTTP/1.1\r\nX-Pad: ";
        let end = b"\r\n\r\n";
        let pad = len - start.len() - end.len();
        let mut v = start.to_vec();
        v.extend(std::iter::repeat_n(b'p', pad));
        v.extend_from_slice(end);
        assert_eq!(v.len(), len);
        v
    }

    #[test]
    fn head_exactly_at_the_limit_is_accepted() {
        let head = head_of_len(MAX_HEAD_BYTES);
        let (used, req) = try_parse_request(&head).unwrap().unwrap();
        assert_eq!(used, MAX_HEAD_BYTES);
        assert_eq!(
            req.header("x-pad").map(<[u8]>::len),
            Some(MAX_HEAD_BYTES - 35)
        );
        // Bytes beyond the limit after a complete head are body, not part of the head.
        let mut more = head.clone();
        more.extend_from_slice(b"body bytes");
        assert_eq!(try_parse_request(&more).unwrap().unwrap().0, MAX_HEAD_BYTES);
    }

    #[test]
    fn head_over_the_limit_is_431() {
        let head = head_of_len(MAX_HEAD_BYTES + 1);
        let err = parse_err(&head);
        assert_eq!(err, HttpError::HeadTooLarge);
        assert_eq!(err.status(), Status::HeaderFieldsTooLarge);
        assert_eq!(err.status().code(), 431);
        // An incomplete head: None up to the limit, 431 one byte past it.
        let head = head_of_len(MAX_HEAD_BYTES + 10);
        let partial = &head[..head.len() - 4];
        assert!(partial.len() > MAX_HEAD_BYTES);
        assert_eq!(try_parse_request(&partial[..MAX_HEAD_BYTES]), Ok(None));
        let mut over = partial[..MAX_HEAD_BYTES].to_vec();
        over.push(b'p');
        assert_eq!(try_parse_request(&over), Err(HttpError::HeadTooLarge));
        // The same for responses.
        let mut resp = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        resp.resize(MAX_HEAD_BYTES, b'p');
        assert_eq!(response_status(&resp), Ok(None));
        resp.push(b'p');
        assert_eq!(response_status(&resp), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn pipelined_bytes_are_not_consumed() {
        let head = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        let all = format!("{head}GET http://b/ HTTP/1.1\r\n\r\nbody");
        let (used, req) = try_parse_request(all.as_bytes()).unwrap().unwrap();
        assert_eq!(used, head.len());
        assert_eq!(req.target, "http://a/");
        let (used2, req2) = try_parse_request(&all.as_bytes()[used..]).unwrap().unwrap();
        assert_eq!(req2.target, "http://b/");
        assert_eq!(&all.as_bytes()[used + used2..], b"body");
        // A CONNECT followed at once by TLS bytes.
        let mut tunnel = b"CONNECT a:443 HTTP/1.1\r\n\r\n".to_vec();
        let head_len = tunnel.len();
        tunnel.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x00, b'\n', b'\n']);
        assert_eq!(try_parse_request(&tunnel).unwrap().unwrap().0, head_len);
    }

    #[test]
    fn one_byte_at_a_time() {
        let head = b"POST http://example.com:8080/a?b=c HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\nProxy-Authorization: Basic dTpw\r\n\r\n";
        let whole = try_parse_request(head).unwrap().unwrap();
        assert_eq!(whole.0, head.len());
        let mut buf = Vec::new();
        for (i, &b) in head.iter().enumerate() {
            assert_eq!(try_parse_request(&buf), Ok(None), "prefix of {i} bytes");
            buf.push(b);
        }
        assert_eq!(try_parse_request(&buf).unwrap().unwrap(), whole);
    }

    // ---- absolute-form ----

    #[test]
    fn absolute_form_variants() {
        let cases: &[(&str, Host, u16, &str)] = &[
            ("http://example.com", domain("example.com"), 80, "/"),
            ("http://example.com/", domain("example.com"), 80, "/"),
            ("http://example.com:8080", domain("example.com"), 8080, "/"),
            (
                "http://example.com:8080/a/b",
                domain("example.com"),
                8080,
                "/a/b",
            ),
            (
                "http://example.com/a?b=c&d",
                domain("example.com"),
                80,
                "/a?b=c&d",
            ),
            ("http://example.com?q=1", domain("example.com"), 80, "/?q=1"),
            ("HTTP://Example.COM/x", domain("Example.COM"), 80, "/x"),
            ("hTtP://a:/x", domain("a"), 80, "/x"),
            ("http://[::1]/x", ip("::1"), 80, "/x"),
            ("http://[2001:db8::1]:8080/", ip("2001:db8::1"), 8080, "/"),
            ("http://192.0.2.1:81/p", ip("192.0.2.1"), 81, "/p"),
        ];
        for (url, host, port, path) in cases {
            let req = parse(&format!("GET {url} HTTP/1.1\r\n\r\n"));
            let (t, p) = req.absolute_target().unwrap();
            assert_eq!(&t.host, host, "{url}");
            assert_eq!(t.port, *port, "{url}");
            assert_eq!(p, *path, "{url}");
        }
    }

    #[test]
    fn absolute_form_errors() {
        let cases: &[(&str, HttpError)] = &[
            (
                "/x",
                HttpError::BadTarget("proxy requests need an absolute URL"),
            ),
            (
                "*",
                HttpError::BadTarget("proxy requests need an absolute URL"),
            ),
            (
                "example.com:80",
                HttpError::BadTarget("proxy requests need an absolute URL"),
            ),
            ("https://example.com/", HttpError::UnsupportedScheme),
            ("HTTPS://example.com/", HttpError::UnsupportedScheme),
            ("ftp://example.com/", HttpError::UnsupportedScheme),
            (
                "http://u:p@example.com/",
                HttpError::BadTarget("credentials in the URL are not allowed"),
            ),
            (
                "http://u@example.com/",
                HttpError::BadTarget("credentials in the URL are not allowed"),
            ),
            ("http:///x", HttpError::BadTarget("no host in the URL")),
            (
                "http://a/x#frag",
                HttpError::BadTarget("fragment in the URL"),
            ),
        ];
        for (url, want) in cases {
            let req = parse(&format!("GET {url} HTTP/1.1\r\n\r\n"));
            assert_eq!(req.absolute_target().unwrap_err(), *want, "{url}");
            assert_eq!(want.status(), Status::BadRequest);
        }
        for url in [
            "http://a:0/",
            "http://a:99999/",
            "http://::1/",
            "http://[::1/",
            "http://a:b/",
            "1http://a/",
        ] {
            let req = parse(&format!("GET {url} HTTP/1.1\r\n\r\n"));
            assert!(
                matches!(req.absolute_target(), Err(HttpError::BadTarget(_))),
                "{url}"
            );
        }
    }

    // ---- Proxy-Authorization ----

    #[test]
    fn basic_auth_in_any_case_and_spacing() {
        let cred = base64_encode(b"alice:secret");
        for scheme in ["Basic", "basic", "BASIC", "bAsIc"] {
            for spaces in [" ", "   "] {
                let req = auth_request(&format!("{scheme}{spaces}{cred}"));
                assert_eq!(req.proxy_auth(), basic("alice", "secret"), "{scheme}");
            }
        }
        let req = parse(&format!(
            "CONNECT a:1 HTTP/1.1\r\nPROXY-AUTHORIZATION: Basic {cred}\r\n\r\n"
        ));
        assert_eq!(req.proxy_auth(), basic("alice", "secret"));
        // Unpadded base64 is accepted too ("alice:secre" needs padding).
        let padded = base64_encode(b"alice:secre");
        assert!(padded.ends_with('='));
        let req = auth_request(&format!("Basic {}", padded.trim_end_matches('=')));
        assert_eq!(req.proxy_auth(), basic("alice", "secre"));
    }

    #[test]
    fn credentials_with_utf8_spaces_and_colons() {
        for (user, pass) in [
            ("jörg", "pässwörd"),
            ("a user", "a pass word"),
            ("bob", "p:a:ss"),
            ("bob", ""),
            ("", "x"),
            ("", ""),
            ("名前", "パス:ワード "),
        ] {
            let cred = base64_encode(format!("{user}:{pass}").as_bytes());
            let req = auth_request(&format!("Basic {cred}"));
            assert_eq!(req.proxy_auth(), basic(user, pass), "{user}:{pass}");
        }
        // Non-UTF-8 bytes are passed on as they are.
        let cred = base64_encode(b"\xff\x00:\xfe");
        assert_eq!(
            auth_request(&format!("Basic {cred}")).proxy_auth(),
            ProxyAuth::Basic {
                username: vec![0xff, 0],
                password: vec![0xfe]
            }
        );
    }

    #[test]
    fn other_schemes_are_told_apart_from_malformed_basic() {
        for value in [
            "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
            "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnag",
            "Bearer abc",
            "Digest username=\"u\"",
            "Basi dTpw",
            "NTLM",
        ] {
            assert_eq!(
                auth_request(value).proxy_auth(),
                ProxyAuth::OtherScheme,
                "{value:?}"
            );
        }
        assert_eq!(format!("{:?}", ProxyAuth::OtherScheme), "OtherScheme");
    }

    #[test]
    fn credentials_that_are_not_utf8_are_read_as_latin1() {
        // "jürgen" as python requests sends it: ISO-8859-1, ü = 0xFC.
        assert_eq!(&*credential_text(b"j\xfcrgen"), "jürgen".as_bytes());
        assert_eq!(&*credential_text("jürgen".as_bytes()), "jürgen".as_bytes());
        assert_eq!(&*credential_text(b"plain"), b"plain");
        assert_eq!(&*credential_text(b"\xff\x00"), "ÿ\u{0}".as_bytes());
        assert!(matches!(
            credential_text(b"ascii"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn errors_can_keep_the_connection_open() {
        let out = encode_error(Status::ProxyAuthRequired, "x", true);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Connection:"), "{text}");
        assert!(text.ends_with("Content-Length: 2\r\n\r\nx\n"), "{text}");
        let out = encode_error(Status::BadRequest, "x", false);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("Connection: close\r\n")
        );
    }

    #[test]
    fn missing_and_malformed_auth() {
        assert_eq!(
            parse("CONNECT a:1 HTTP/1.1\r\nAuthorization: Basic dTpw\r\n\r\n").proxy_auth(),
            ProxyAuth::Missing
        );
        let no_colon = base64_encode(b"alice");
        for value in [
            "".to_string(),
            "Basic".to_string(),
            "Basic ".to_string(),
            "Basic\tdTpw".to_string(),
            "B@sic dTpw".to_string(),
            "Basic dTpw!".to_string(),
            "Basic dT pw".to_string(),
            "Basic dTpw=".to_string(),
            "Basic d===".to_string(),
            format!("Basic {no_colon}"),
        ] {
            assert_eq!(
                auth_request(&value).proxy_auth(),
                ProxyAuth::Malformed,
                "{value:?}"
            );
        }
        // Given twice: ambiguous, so refused.
        let req = parse(
            "CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
        );
        assert_eq!(req.proxy_auth(), ProxyAuth::Malformed);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cred = base64_encode(b"secret-user:hunter2");
        let req = parse(&format!(
            "GET http://a/ HTTP/1.1\r\nProxy-Authorization: Basic {cred}\r\nAuthorization: Bearer tok3n\r\nX-Seen: visible\r\n\r\n",
        ));
        let dbg = format!("{req:?}");
        assert!(!dbg.contains(&cred), "{dbg}");
        assert!(!dbg.contains("tok3n"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(dbg.contains("visible"), "{dbg}");
        let auth = req.proxy_auth();
        assert_eq!(auth, basic("secret-user", "hunter2"));
        let dbg = format!("{auth:?}");
        assert!(dbg.contains("secret-user"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(format!("{:?}", ProxyAuth::Missing), "Missing");
        assert_eq!(format!("{:?}", ProxyAuth::Malformed), "Malformed");
    }

    // ---- encoding ----

    // ---- responses ----

    #[test]
    fn statuses_and_reasons() {
        let all = [
            (Status::Ok, 200, "Connection established"),
            (Status::BadRequest, 400, "Bad Request"),
            (Status::Forbidden, 403, "Forbidden"),
            (
                Status::ProxyAuthRequired,
                407,
                "Proxy Authentication Required",
            ),
            (Status::TooManyRequests, 429, "Too Many Requests"),
            (
                Status::HeaderFieldsTooLarge,
                431,
                "Request Header Fields Too Large",
            ),
            (Status::BadGateway, 502, "Bad Gateway"),
            (Status::ServiceUnavailable, 503, "Service Unavailable"),
            (Status::GatewayTimeout, 504, "Gateway Timeout"),
        ];
        for (status, code, reason) in all {
            assert_eq!(status.code(), code);
            assert_eq!(status.reason(), reason);
            let out = encode_response(status, "détail");
            let text = String::from_utf8(out.clone()).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {code} {reason}\r\n")),
                "{text}"
            );
            let (used, parsed) = response_status(&out).unwrap().unwrap();
            assert_eq!(parsed, code);
            if status == Status::Ok {
                assert_eq!(text, "HTTP/1.1 200 Connection established\r\n\r\n");
                assert_eq!(used, out.len());
                continue;
            }
            let body = "détail\n";
            let mut want = format!("HTTP/1.1 {code} {reason}\r\n");
            if status == Status::ProxyAuthRequired {
                want.push_str("Proxy-Authenticate: Basic realm=\"sluice\", charset=\"UTF-8\"\r\n");
            }
            want.push_str(&format!(
                "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ));
            assert_eq!(text, want);
            assert_eq!(&out[used..], body.as_bytes());
        }
    }

    #[test]
    fn response_status_parsing() {
        assert_eq!(response_status(b""), Ok(None));
        assert_eq!(response_status(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(
            response_status(b"HTTP/1.1 200 OK\r\n\r\nTLS"),
            Ok(Some((19, 200)))
        );
        assert_eq!(
            response_status(b"HTTP/1.0 407 Auth\nProxy-Authenticate: Basic\n\n"),
            Ok(Some((45, 407)))
        );
        assert_eq!(
            response_status(b"HTTP/1.1 200\r\n\r\n"),
            Ok(Some((16, 200)))
        );
        assert_eq!(
            response_status(b"HTTP/1.1 204 \r\n\r\n"),
            Ok(Some((17, 204)))
        );
        for bad in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 OK\r\n\r\n",
            b"HTTP/1.1 600 OK\r\n\r\n",
            b"HTTP/1.1  200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 O\x00K\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n",
        ] {
            assert!(
                matches!(response_status(bad), Err(HttpError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let resp = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n";
        for i in 0..resp.len() {
            assert_eq!(response_status(&resp[..i]), Ok(None), "{i}");
        }
    }

    #[test]
    fn error_display_and_status() {
        let all = [
            HttpError::HeadTooLarge,
            HttpError::Malformed("x"),
            HttpError::TooManyHeaders,
            HttpError::UnsupportedScheme,
            HttpError::BadTarget("y"),
        ];
        for e in &all {
            let text = e.to_string();
            assert!(text.starts_with("http: "), "{text}");
            assert!(!text.ends_with('.'), "{text}");
            let first = text.chars().nth(6).unwrap();
            assert!(first.is_ascii_lowercase(), "{text}");
            let _: &dyn std::error::Error = e;
        }
        assert_eq!(all[0].status().code(), 431);
        assert_eq!(all[1].status().code(), 400);
        assert_eq!(all[2].status().code(), 431);
        assert_eq!(all[3].status().code(), 400);
        assert_eq!(all[4].status().code(), 400);
    }

    // ---- base64 ----

    #[test]
    fn base64_rfc4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain), encoded);
            assert_eq!(base64_decode(encoded.as_bytes()).as_deref(), Some(plain));
            let unpadded = encoded.trim_end_matches('=');
            assert_eq!(base64_decode(unpadded.as_bytes()).as_deref(), Some(plain));
        }
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(
            base64_decode(b"+/+/").as_deref(),
            Some(&[0xfb, 0xff, 0xbf][..])
        );
    }

    #[test]
    fn base64_rejects_bad_input() {
        for bad in [
            &b"="[..],
            b"==",
            b"Zg=",
            b"Zg===",
            b"Zm9=v",
            b"Z",
            b"Zm9vY",
            b"Zh==",
            b"Zm9=",
            b"Zm 9v",
            b"Zm9v\n",
            b"Zm-_",
            b"Zm9vYg==Zg==",
            b"====",
        ] {
            assert_eq!(
                base64_decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    // ---- properties ----

    /// Exercises every accessor of whatever parsed; none may panic.
    fn poke(req: &Request) {
        let _ = format!("{req:?}");
        let _ = req.is_connect();
        let _ = req.header("host");
        let _ = req.connect_target();
        let _ = format!("{:?}", req.proxy_auth());
        if let Ok((t, p)) = req.absolute_target() {
            let out = crate::wire::http_framing::origin_head(req, &p, &t, false);
            // Whatever we send the origin is itself a well-formed head.
            let (used, _) = try_parse_request(&out).unwrap().unwrap();
            assert_eq!(used, out.len());
        }
    }

    /// A request's bytes and the `Request` they must parse to.
    fn valid_request() -> impl Strategy<Value = (Vec<u8>, Request)> {
        let method = prop_oneof![
            Just("GET".to_string()),
            Just("CONNECT".to_string()),
            "[A-Za-z!#$%&'*+.^_`|~-]{1,10}",
        ];
        let target = prop_oneof![
            "http://[a-z]{1,10}(:[1-9][0-9]{0,3})?(/[a-zA-Z0-9._~%?=&/-]{0,20})?",
            "[a-z]{1,10}\\.[a-z]{2,3}:[1-9][0-9]{0,3}",
            "/[!-~]{0,20}",
        ];
        let header = (
            "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}",
            "([!-~\u{80}-\u{ff}]([ \t!-~]{0,20}[!-~])?)?",
            "[ \t]{0,2}",
            "[ \t]{0,2}",
        );
        (
            method,
            target,
            0u8..=1,
            proptest::collection::vec(header, 0..8),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_filter_map(
                "no framing headers",
                |(method, target, minor, headers, lf_only, leading)| {
                    let eol: &[u8] = if lf_only { b"\n" } else { b"\r\n" };
                    let mut bytes = Vec::new();
                    if leading {
                        bytes.extend_from_slice(eol);
                    }
                    bytes.extend_from_slice(format!("{method} {target} HTTP/1.{minor}").as_bytes());
                    bytes.extend_from_slice(eol);
                    let mut parsed = Vec::new();
                    for (name, value, pre, post) in headers {
                        if is_one_of(&name, &BODY_FRAMING) {
                            return None;
                        }
                        bytes.extend_from_slice(format!("{name}:{pre}{value}{post}").as_bytes());
                        bytes.extend_from_slice(eol);
                        parsed.push((name, value.into_bytes()));
                    }
                    bytes.extend_from_slice(eol);
                    let req = Request {
                        method,
                        target,
                        minor_version: minor,
                        headers: parsed,
                    };
                    Some((bytes, req))
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((used, req))) = try_parse_request(&bytes) {
                prop_assert!(used <= bytes.len());
                poke(&req);
            }
            if let Ok(Some((used, _))) = response_status(&bytes) {
                prop_assert!(used <= bytes.len());
            }
            if let Some(decoded) = base64_decode(&bytes) {
                // Strict decoding is canonical: encoding gives the input back, up to padding.
                let encoded = base64_encode(&decoded);
                let input = String::from_utf8_lossy(&bytes);
                prop_assert_eq!(encoded.trim_end_matches('='), input.trim_end_matches('='));
            }
        }

        #[test]
        fn mutated_requests_never_panic(
            (bytes, _) in valid_request(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = bytes;
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            for end in 0..=bytes.len() {
                if let Ok(Some((used, req))) = try_parse_request(&bytes[..end]) {
                    prop_assert!(used <= end);
                    poke(&req);
                }
                let _ = response_status(&bytes[..end]);
            }
        }

        #[test]
        fn every_proper_prefix_needs_more((bytes, want) in valid_request()) {
            for end in 0..bytes.len() {
                prop_assert_eq!(try_parse_request(&bytes[..end]), Ok(None), "prefix {}", end);
            }
            prop_assert_eq!(try_parse_request(&bytes), Ok(Some((bytes.len(), want.clone()))));
            poke(&want);
        }

        #[test]
        fn suffix_does_not_change_the_head(
            (bytes, want) in valid_request(),
            suffix in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut all = bytes.clone();
            all.extend_from_slice(&suffix);
            prop_assert_eq!(try_parse_request(&all), Ok(Some((bytes.len(), want))));
        }

        #[test]
        fn base64_round_trip(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let encoded = base64_encode(&data);
            prop_assert_eq!(encoded.len() % 4, 0);
            prop_assert_eq!(base64_decode(encoded.as_bytes()), Some(data.clone()));
            let unpadded = encoded.trim_end_matches('=');
            prop_assert_eq!(base64_decode(unpadded.as_bytes()), Some(data));
        }

        #[test]
        fn basic_credentials_round_trip(
            user in proptest::collection::vec(any::<u8>().prop_filter("no colon", |&b| b != b':'), 0..20),
            pass in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut plain = user.clone();
            plain.push(b':');
            plain.extend_from_slice(&pass);
            let head = format!(
                "CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
                base64_encode(&plain)
            );
            let head = head.as_bytes();
            let req = try_parse_request(head).unwrap().unwrap().1;
            prop_assert_eq!(req.proxy_auth(), ProxyAuth::Basic { username: user, password: pass });
        }
    }
}
