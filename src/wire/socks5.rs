//! SOCKS5 (RFC 1928), its username/password sub-negotiation (RFC 1929), and the SOCKS4/4a
//! request, as pure decoders and encoders.
//!
//! Decoders read exactly one message from any [`Read`] with `read_exact`, so a message split
//! over many reads (or a read holding more than one message) decodes the same. They never read
//! past the end of the message, so bytes the client pipelined after it (its first payload) stay
//! in the stream for the relay. SOCKS4 fields end in a NUL and are read one byte at a time;
//! wrap a raw socket in a `BufReader` for speed, and then relay from that `BufReader` so the
//! bytes it buffered are not lost. Encoders return the bytes to write.
//!
//! Left to others: sockets and timeouts, choosing an auth method and checking credentials,
//! resolving and dialing the target, relaying, and UDP datagrams.
//!
//! To accept SOCKS4 and SOCKS5 on one port, look at the first byte without consuming it
//! (`BufReader::fill_buf`) or put it back (`[first].chain(stream)`) before calling
//! [`read_greeting`] or [`read_socks4_request`]: each decoder checks the version byte itself.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::wire::target::{Host, MAX_DOMAIN_LEN, Target, host_from_str};

/// The SOCKS5 protocol version byte.
pub const VERSION: u8 = 5;
/// The SOCKS4 (and 4a) protocol version byte in requests.
pub const SOCKS4_VERSION: u8 = 4;
/// Auth method: none.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Auth method: username/password (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// Method choice meaning none of the client's methods is acceptable; the server then closes.
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
/// The version byte of the RFC 1929 sub-negotiation (not the SOCKS version).
pub const USERPASS_VERSION: u8 = 1;
/// Longest SOCKS4 userid or SOCKS4a domain, in bytes before the NUL. The protocol sets no
/// limit, so this one keeps a client from making us read forever; 255 matches SOCKS5's.
pub const MAX_SOCKS4_FIELD: usize = 255;

/// Most methods a greeting can list: NMETHODS is one byte.
const MAX_METHODS: usize = u8::MAX as usize;
/// Longest RFC 1929 username or password: ULEN and PLEN are one byte each.
const MAX_USERPASS_FIELD: usize = u8::MAX as usize;
/// The RSV byte of requests and replies; RFC 1928 fixes it at zero.
const RESERVED: u8 = 0x00;
/// ATYP values of RFC 1928.
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
/// RFC 1929 STATUS: zero is success, anything else failure; we send 1 for failure.
const USERPASS_OK: u8 = 0x00;
const USERPASS_FAILED: u8 = 0x01;
/// A SOCKS4 reply starts with VN 0, not 4.
const SOCKS4_REPLY_VERSION: u8 = 0;
const SOCKS4_GRANTED: u8 = 0x5A;
const SOCKS4_REJECTED: u8 = 0x5B;
/// Linux errno values, spelled out so this file needs no libc; only consulted on Linux.
const LINUX_ENETUNREACH: i32 = 101;
const LINUX_ETIMEDOUT: i32 = 110;
const LINUX_ECONNREFUSED: i32 = 111;
const LINUX_EHOSTUNREACH: i32 = 113;

/// Why a SOCKS message could not be decoded or encoded.
#[derive(Debug)]
pub enum SocksError {
    /// The stream failed or ended early (`UnexpectedEof` from `read_exact` stays here).
    Io(io::Error),
    /// A version byte other than 5 (or other than 4 from [`read_socks4_request`]).
    Version(u8),
    /// An RFC 1929 sub-negotiation version other than 1.
    UserPassVersion(u8),
    /// A greeting that lists no methods.
    NoMethods,
    /// An ATYP other than 1, 3 or 4; the server answers [`Reply::AddressTypeNotSupported`].
    AddressType(u8),
    /// An unknown CMD byte; the server answers [`Reply::CommandNotSupported`].
    Command(u8),
    /// A domain that is empty, not UTF-8, or holds characters no host name has.
    BadDomain,
    /// A field longer than its length byte or [`MAX_SOCKS4_FIELD`] allows.
    FieldTooLong,
    /// An unknown reply code in a server's reply.
    BadReply(u8),
    /// A non-zero RSV byte.
    Reserved(u8),
}

impl fmt::Display for SocksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // read_exact's own message ("failed to fill whole buffer") says nothing useful.
            SocksError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("socks: stream ended in the middle of a message")
            }
            SocksError::Io(e) => write!(f, "socks: i/o error: {e}"),
            // Only the SOCKS4 decoder can see a 5 here, and it wanted a 4.
            SocksError::Version(VERSION) => write!(
                f,
                "socks4: unsupported protocol version {VERSION:#04x}, expected {SOCKS4_VERSION:#04x}"
            ),
            SocksError::Version(v) => write!(
                f,
                "socks: unsupported protocol version {v:#04x}, expected {VERSION:#04x} \
                 (or {SOCKS4_VERSION:#04x} where socks4 is accepted)"
            ),
            SocksError::UserPassVersion(v) => write!(
                f,
                "socks5: unsupported username/password version {v:#04x}, \
                 expected {USERPASS_VERSION:#04x}"
            ),
            SocksError::NoMethods => {
                f.write_str("socks5: greeting lists no auth methods, expected at least one")
            }
            SocksError::AddressType(t) => write!(
                f,
                "socks5: unsupported address type {t:#04x}, expected 0x01, 0x03 or 0x04"
            ),
            SocksError::Command(c) => write!(
                f,
                "socks: unsupported command {c:#04x}, expected 0x01 (connect), 0x02 (bind) \
                 or 0x03 (udp associate, socks5 only)"
            ),
            SocksError::BadDomain => {
                f.write_str("socks: invalid domain name, expected 1-255 bytes of utf-8 host name")
            }
            SocksError::FieldTooLong => f.write_str("socks: field longer than 255 bytes"),
            SocksError::BadReply(r) => write!(
                f,
                "socks5: unknown reply code {r:#04x}, expected 0x00 to 0x08"
            ),
            SocksError::Reserved(b) => {
                write!(f, "socks5: reserved byte is {b:#04x}, expected 0x00")
            }
        }
    }
}

// The I/O error's text is already in Display, so `source` stays None to avoid printing it twice.
impl std::error::Error for SocksError {}

impl From<io::Error> for SocksError {
    fn from(e: io::Error) -> Self {
        SocksError::Io(e)
    }
}

/// What a SOCKS client asks the server to do (CMD).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Open a TCP connection to the target.
    Connect = 1,
    /// Listen for one inbound TCP connection.
    Bind = 2,
    /// Relay UDP datagrams.
    UdpAssociate = 3,
}

impl Command {
    /// The command for a CMD byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Command> {
        match b {
            1 => Some(Command::Connect),
            2 => Some(Command::Bind),
            3 => Some(Command::UdpAssociate),
            _ => None,
        }
    }
}

/// The REP field of a SOCKS5 reply.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// 0x00: succeeded.
    Succeeded = 0,
    /// 0x01: general SOCKS server failure.
    GeneralFailure,
    /// 0x02: connection not allowed by ruleset.
    NotAllowed,
    /// 0x03: network unreachable.
    NetworkUnreachable,
    /// 0x04: host unreachable.
    HostUnreachable,
    /// 0x05: connection refused.
    ConnectionRefused,
    /// 0x06: TTL expired (also used for dial timeouts).
    TtlExpired,
    /// 0x07: command not supported.
    CommandNotSupported,
    /// 0x08: address type not supported.
    AddressTypeNotSupported,
}

impl Reply {
    /// The reply for a REP byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Reply> {
        match b {
            0 => Some(Reply::Succeeded),
            1 => Some(Reply::GeneralFailure),
            2 => Some(Reply::NotAllowed),
            3 => Some(Reply::NetworkUnreachable),
            4 => Some(Reply::HostUnreachable),
            5 => Some(Reply::ConnectionRefused),
            6 => Some(Reply::TtlExpired),
            7 => Some(Reply::CommandNotSupported),
            8 => Some(Reply::AddressTypeNotSupported),
            _ => None,
        }
    }

    /// The reply for an error from dialing the target; pure, no I/O.
    ///
    /// By kind: `ConnectionRefused` → [`Reply::ConnectionRefused`], `TimedOut` (and
    /// `WouldBlock`, which a connect with a timeout can give) → [`Reply::TtlExpired`],
    /// `NetworkUnreachable` and `HostUnreachable` → the replies of those names. Failing that,
    /// on Linux, by `raw_os_error()`: ENETUNREACH (101), EHOSTUNREACH (113), ECONNREFUSED (111)
    /// and ETIMEDOUT (110) the same way. Anything else → [`Reply::GeneralFailure`].
    pub fn from_io_error(e: &io::Error) -> Reply {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Reply::TtlExpired,
            io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
            io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
            // An errno whose kind std leaves uncategorized still says what happened.
            _ => e
                .raw_os_error()
                .and_then(reply_from_linux_errno)
                .unwrap_or(Reply::GeneralFailure),
        }
    }

    /// RFC 1928's words for this reply, lowercase ("connection refused").
    pub fn description(self) -> &'static str {
        match self {
            Reply::Succeeded => "succeeded",
            Reply::GeneralFailure => "general socks server failure",
            Reply::NotAllowed => "connection not allowed by ruleset",
            Reply::NetworkUnreachable => "network unreachable",
            Reply::HostUnreachable => "host unreachable",
            Reply::ConnectionRefused => "connection refused",
            Reply::TtlExpired => "ttl expired",
            Reply::CommandNotSupported => "command not supported",
            Reply::AddressTypeNotSupported => "address type not supported",
        }
    }
}

/// The reply for a Linux errno; errno numbers differ on other systems, so elsewhere none.
fn reply_from_linux_errno(code: i32) -> Option<Reply> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    match code {
        LINUX_ENETUNREACH => Some(Reply::NetworkUnreachable),
        LINUX_EHOSTUNREACH => Some(Reply::HostUnreachable),
        LINUX_ECONNREFUSED => Some(Reply::ConnectionRefused),
        LINUX_ETIMEDOUT => Some(Reply::TtlExpired),
        _ => None,
    }
}

/// A client's opening message: the auth methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The METHODS bytes, in the client's order, never empty once decoded.
    pub methods: Vec<u8>,
}

/// Reads VER NMETHODS METHODS.
///
/// # Errors
/// [`SocksError::Version`] if VER is not 5 (nothing after VER is read), [`SocksError::NoMethods`]
/// if NMETHODS is 0, [`SocksError::Io`] if the stream fails or ends early.
pub fn read_greeting<R: Read>(r: &mut R) -> Result<Greeting, SocksError> {
    read_version(r, VERSION)?;
    let [count] = read_array(r)?;
    if count == 0 {
        return Err(SocksError::NoMethods);
    }
    let methods = read_vec(r, count)?;
    Ok(Greeting { methods })
}

/// Encodes a client greeting offering `methods`. NMETHODS is one byte, so only the first 255
/// methods are sent (there are only 256 method values); an empty list encodes a greeting the
/// server refuses.
pub fn encode_greeting(methods: &[u8]) -> Vec<u8> {
    let methods = methods.get(..MAX_METHODS).unwrap_or(methods);
    let mut out = vec![
        VERSION,
        len_byte(methods.len(), MAX_METHODS).unwrap_or(u8::MAX),
    ];
    out.extend_from_slice(methods);
    out
}

/// Encodes the server's choice of auth method (VER METHOD).
pub fn encode_method_choice(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// Reads the server's choice of auth method (VER METHOD), client side. The method may be
/// [`METHOD_NONE_ACCEPTABLE`]; what to do then is the caller's call.
///
/// # Errors
/// [`SocksError::Version`] if VER is not 5, [`SocksError::Io`] if the stream fails or ends early.
pub fn read_method_choice<R: Read>(r: &mut R) -> Result<u8, SocksError> {
    let [version, method] = read_array(r)?;
    check_version(version, VERSION)?;
    Ok(method)
}

/// RFC 1929 credentials, as sent: bytes, not necessarily UTF-8.
#[derive(Clone)]
pub struct UserPass {
    /// UNAME, 0 to 255 bytes.
    pub username: Vec<u8>,
    /// PASSWD, 0 to 255 bytes. Never printed by `Debug`.
    pub password: Vec<u8>,
}

impl fmt::Debug for UserPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs; a password must not.
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Reads RFC 1929's VER ULEN UNAME PLEN PASSWD. Empty fields are allowed here: whether they
/// are acceptable credentials is for the authenticator to say.
///
/// # Errors
/// [`SocksError::UserPassVersion`] if VER is not 1 (nothing after it is read),
/// [`SocksError::Io`] if the stream fails or ends early.
pub fn read_userpass<R: Read>(r: &mut R) -> Result<UserPass, SocksError> {
    let [version] = read_array(r)?;
    if version != USERPASS_VERSION {
        return Err(SocksError::UserPassVersion(version));
    }
    let username = read_length_prefixed(r)?;
    let password = read_length_prefixed(r)?;
    Ok(UserPass { username, password })
}

/// Encodes RFC 1929 credentials, client side.
///
/// # Errors
/// [`SocksError::FieldTooLong`] if either field is over 255 bytes.
pub fn encode_userpass(username: &[u8], password: &[u8]) -> Result<Vec<u8>, SocksError> {
    let ulen = len_byte(username.len(), MAX_USERPASS_FIELD)?;
    let plen = len_byte(password.len(), MAX_USERPASS_FIELD)?;
    let mut out = Vec::with_capacity(3 + username.len() + password.len());
    out.extend_from_slice(&[USERPASS_VERSION, ulen]);
    out.extend_from_slice(username);
    out.push(plen);
    out.extend_from_slice(password);
    Ok(out)
}

/// Encodes the RFC 1929 status: `[1, 0]` if `ok`, else `[1, 1]`.
pub fn encode_userpass_status(ok: bool) -> [u8; 2] {
    let status = if ok { USERPASS_OK } else { USERPASS_FAILED };
    [USERPASS_VERSION, status]
}

/// Reads the RFC 1929 status, client side: true on success (STATUS 0), false on any other.
///
/// # Errors
/// [`SocksError::UserPassVersion`] if VER is not 1, [`SocksError::Io`] if the stream fails or
/// ends early.
pub fn read_userpass_status<R: Read>(r: &mut R) -> Result<bool, SocksError> {
    let [version, status] = read_array(r)?;
    if version != USERPASS_VERSION {
        return Err(SocksError::UserPassVersion(version));
    }
    Ok(status == USERPASS_OK)
}

/// A SOCKS5 request: what to do, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CMD.
    pub command: Command,
    /// DST.ADDR and DST.PORT. Port 0 is passed through: BIND and UDP ASSOCIATE may use it.
    pub target: Target,
}

/// Reads VER CMD RSV ATYP DST.ADDR DST.PORT. ATYP 1 = IPv4, 3 = domain (length byte, then
/// name; must be non-empty valid UTF-8 else BadDomain; a domain that parses as an IP literal
/// becomes Host::Ip), 4 = IPv6.
///
/// The order of checks keeps the stream usable for an answer: VER is checked first (a wrong
/// version means the rest cannot be framed); then CMD, RSV and ATYP are read, and an unknown
/// ATYP returns [`SocksError::AddressType`] at once, since the address length is unknown (the
/// caller answers 0x08 and closes). Otherwise the whole address and port are read before CMD,
/// RSV and the domain are judged, so after [`SocksError::Command`] (answer 0x07),
/// [`SocksError::Reserved`] or [`SocksError::BadDomain`] the stream sits at the end of the
/// request.
///
/// # Errors
/// The ones above, in that order of precedence, and [`SocksError::Io`] if the stream fails or
/// ends early. A domain is also refused if it holds whitespace, control characters, '/', '@'
/// or '\\', as [`host_from_str`] does for every other way a target comes in.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, SocksError> {
    let frame = read_frame(r)?;
    let command = Command::from_u8(frame.code).ok_or(SocksError::Command(frame.code))?;
    let target = frame.into_target()?;
    Ok(Request { command, target })
}

/// The reply for a request [`read_request`] could not decode (RFC 1928 §6), sent before closing;
/// `None` when no reply fits (the stream failed, or the bytes are not a SOCKS5 request). The
/// server and the local proxy both answer by this one mapping. Pure.
pub fn request_error_reply(e: &SocksError) -> Option<Reply> {
    match e {
        SocksError::AddressType(_) => Some(Reply::AddressTypeNotSupported),
        SocksError::Command(_) => Some(Reply::CommandNotSupported),
        // A well-framed request with a value no server accepts: the stream sits at its end.
        SocksError::BadDomain | SocksError::Reserved(_) | SocksError::FieldTooLong => {
            Some(Reply::GeneralFailure)
        }
        SocksError::Io(_)
        | SocksError::Version(_)
        | SocksError::UserPassVersion(_)
        | SocksError::NoMethods
        | SocksError::BadReply(_) => None,
    }
}

/// Encodes a SOCKS5 request, client side. A domain is sent as given, even an IP literal.
///
/// # Errors
/// [`SocksError::FieldTooLong`] for a domain over 255 bytes, [`SocksError::BadDomain`] for an
/// empty one (no server would accept it).
pub fn encode_request(command: Command, target: &Target) -> Result<Vec<u8>, SocksError> {
    let mut out = vec![VERSION, command as u8, RESERVED];
    push_host(&mut out, &target.host)?;
    out.extend_from_slice(&target.port.to_be_bytes());
    Ok(out)
}

/// Encodes a SOCKS5 reply with the bound address, or 0.0.0.0:0 (ATYP 1) when there is none to
/// tell, as for failures.
pub fn encode_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let mut out = vec![VERSION, reply as u8, RESERVED];
    push_ip(&mut out, bound.ip());
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// A server's reply to a request, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMsg {
    /// REP.
    pub reply: Reply,
    /// BND.ADDR and BND.PORT, of any address type.
    pub bound: Target,
}

/// Reads a whole SOCKS5 reply (VER REP RSV ATYP BND.ADDR BND.PORT), client side, with the same
/// order of checks as [`read_request`]: VER, then ATYP, then (after the address is read) REP,
/// RSV and the domain.
///
/// # Errors
/// [`SocksError::Version`], [`SocksError::AddressType`], [`SocksError::BadReply`],
/// [`SocksError::Reserved`], [`SocksError::BadDomain`], or [`SocksError::Io`] if the stream
/// fails or ends early.
pub fn read_reply<R: Read>(r: &mut R) -> Result<ReplyMsg, SocksError> {
    let frame = read_frame(r)?;
    let reply = Reply::from_u8(frame.code).ok_or(SocksError::BadReply(frame.code))?;
    let bound = frame.into_target()?;
    Ok(ReplyMsg { reply, bound })
}

/// A SOCKS4 or SOCKS4a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks4Request {
    /// CD: only [`Command::Connect`] or [`Command::Bind`]; SOCKS4 has no UDP.
    pub command: Command,
    /// The destination: an IPv4 address, or with SOCKS4a a host name.
    pub target: Target,
    /// USERID, without its NUL; at most [`MAX_SOCKS4_FIELD`] bytes.
    pub userid: Vec<u8>,
}

/// VN=4 CD DSTPORT(2) DSTIP(4) USERID NUL; if DSTIP is 0.0.0.x with x != 0, SOCKS4a: a DOMAIN
/// NUL follows. Fields longer than MAX_SOCKS4_FIELD before the NUL → FieldTooLong (read byte by
/// byte; never unbounded).
///
/// As with [`read_request`], the whole request is read before CD and the domain are judged, so
/// after [`SocksError::Command`] or [`SocksError::BadDomain`] the caller can still answer with
/// [`encode_socks4_reply`]`(false)`.
///
/// # Errors
/// [`SocksError::Version`] if VN is not 4, [`SocksError::FieldTooLong`],
/// [`SocksError::Command`] for a CD other than 1 or 2, [`SocksError::BadDomain`], or
/// [`SocksError::Io`] if the stream fails or ends early.
pub fn read_socks4_request<R: Read>(r: &mut R) -> Result<Socks4Request, SocksError> {
    read_version(r, SOCKS4_VERSION)?;
    let [code, port_hi, port_lo, a, b, c, d] = read_array(r)?;
    let userid = read_nul_terminated(r)?;
    let ip = Ipv4Addr::new(a, b, c, d);
    let host = if is_socks4a_marker(ip) {
        RawHost::Domain(read_nul_terminated(r)?)
    } else {
        RawHost::Ip(IpAddr::V4(ip))
    };
    let command = match Command::from_u8(code) {
        Some(cmd @ (Command::Connect | Command::Bind)) => cmd,
        _ => return Err(SocksError::Command(code)),
    };
    let port = u16::from_be_bytes([port_hi, port_lo]);
    let target = Target {
        host: host.into_host()?,
        port,
    };
    Ok(Socks4Request {
        command,
        target,
        userid,
    })
}

/// Encodes a SOCKS4 reply: VN 0, CD 0x5A granted or 0x5B rejected, port and address zero
/// (clients of a CONNECT ignore them).
pub fn encode_socks4_reply(granted: bool) -> [u8; 8] {
    let code = if granted {
        SOCKS4_GRANTED
    } else {
        SOCKS4_REJECTED
    };
    [SOCKS4_REPLY_VERSION, code, 0, 0, 0, 0, 0, 0]
}

/// SOCKS4a marks "a domain follows" with DSTIP 0.0.0.x, x non-zero (an invalid address).
fn is_socks4a_marker(ip: Ipv4Addr) -> bool {
    let [a, b, c, d] = ip.octets();
    a == 0 && b == 0 && c == 0 && d != 0
}

/// An address as read off the wire, before a domain is judged, so that judging it can wait
/// until the port has been read and the stream is at the end of the message.
enum RawHost {
    Ip(IpAddr),
    Domain(Vec<u8>),
}

impl RawHost {
    fn into_host(self) -> Result<Host, SocksError> {
        match self {
            RawHost::Ip(ip) => Ok(Host::Ip(ip)),
            RawHost::Domain(bytes) => {
                let name = String::from_utf8(bytes).map_err(|_| SocksError::BadDomain)?;
                // One definition of a host name for all ways in; it also turns IP literals into Ip.
                host_from_str(&name).map_err(|_| SocksError::BadDomain)
            }
        }
    }
}

/// The common shape of a SOCKS5 request and reply: VER CODE RSV ATYP ADDR PORT.
struct Frame {
    code: u8,
    reserved: u8,
    host: RawHost,
    port: u16,
}

impl Frame {
    /// Checks RSV and the domain, which waited until the whole frame was read.
    fn into_target(self) -> Result<Target, SocksError> {
        if self.reserved != RESERVED {
            return Err(SocksError::Reserved(self.reserved));
        }
        let host = self.host.into_host()?;
        Ok(Target {
            host,
            port: self.port,
        })
    }
}

/// Reads a request or reply frame; only VER and ATYP are judged here.
fn read_frame<R: Read>(r: &mut R) -> Result<Frame, SocksError> {
    read_version(r, VERSION)?;
    let [code, reserved, atyp] = read_array(r)?;
    let host = read_raw_host(r, atyp)?;
    let port = u16::from_be_bytes(read_array(r)?);
    Ok(Frame {
        code,
        reserved,
        host,
        port,
    })
}

fn read_raw_host<R: Read>(r: &mut R, atyp: u8) -> Result<RawHost, SocksError> {
    match atyp {
        ATYP_IPV4 => Ok(RawHost::Ip(IpAddr::from(read_array::<4, R>(r)?))),
        ATYP_IPV6 => Ok(RawHost::Ip(IpAddr::from(read_array::<16, R>(r)?))),
        ATYP_DOMAIN => Ok(RawHost::Domain(read_length_prefixed(r)?)),
        other => Err(SocksError::AddressType(other)),
    }
}

fn push_host(out: &mut Vec<u8>, host: &Host) -> Result<(), SocksError> {
    match host {
        Host::Ip(ip) => push_ip(out, *ip),
        Host::Domain(name) => {
            if name.is_empty() {
                return Err(SocksError::BadDomain);
            }
            let len = len_byte(name.len(), MAX_DOMAIN_LEN)?;
            out.extend_from_slice(&[ATYP_DOMAIN, len]);
            out.extend_from_slice(name.as_bytes());
        }
    }
    Ok(())
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// A length as its one-byte wire form, if within `max` (and so, as every max here is, a byte).
fn len_byte(len: usize, max: usize) -> Result<u8, SocksError> {
    if len > max {
        return Err(SocksError::FieldTooLong);
    }
    u8::try_from(len).map_err(|_| SocksError::FieldTooLong)
}

/// Reads one version byte and checks it, before anything else, since the rest of a message in
/// another version cannot be framed.
fn read_version<R: Read>(r: &mut R, expected: u8) -> Result<(), SocksError> {
    let [version] = read_array(r)?;
    check_version(version, expected)
}

fn check_version(version: u8, expected: u8) -> Result<(), SocksError> {
    if version == expected {
        Ok(())
    } else {
        Err(SocksError::Version(version))
    }
}

fn read_array<const N: usize, R: Read>(r: &mut R) -> Result<[u8; N], SocksError> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads `len` bytes; `len` is a wire length byte, so at most 255 are ever allocated.
fn read_vec<R: Read>(r: &mut R, len: u8) -> Result<Vec<u8>, SocksError> {
    let mut buf = vec![0u8; usize::from(len)];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_length_prefixed<R: Read>(r: &mut R) -> Result<Vec<u8>, SocksError> {
    let [len] = read_array(r)?;
    read_vec(r, len)
}

/// Reads up to the NUL, one byte at a time so nothing past it is consumed, and refuses a field
/// over [`MAX_SOCKS4_FIELD`] bytes so a client cannot make us read or buffer without end.
fn read_nul_terminated<R: Read>(r: &mut R) -> Result<Vec<u8>, SocksError> {
    let mut field = Vec::new();
    loop {
        let [byte] = read_array(r)?;
        if byte == 0 {
            return Ok(field);
        }
        if field.len() >= MAX_SOCKS4_FIELD {
            return Err(SocksError::FieldTooLong);
        }
        field.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    /// A reader that hands out its data in chunks of the given sizes, cycling (0 counts as 1).
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        next: usize,
    }

    impl<'a> Chunked<'a> {
        fn new(data: &'a [u8], sizes: &[usize]) -> Self {
            Chunked {
                data,
                sizes: sizes.to_vec(),
                next: 0,
            }
        }
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let size = match self.sizes.len() {
                0 => 1,
                n => self.sizes[self.next % n].max(1),
            };
            self.next += 1;
            let n = size.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// A reader that returns Interrupted before every byte, which read_exact must retry.
    struct Interrupting<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Interrupting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = 1.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn ip(addr: SocketAddr) -> Target {
        Target {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> Target {
        ip(SocketAddr::from(([a, b, c, d], port)))
    }

    fn domain(name: &str, port: u16) -> Target {
        Target {
            host: Host::Domain(name.to_string()),
            port,
        }
    }

    fn is_eof(e: &SocksError) -> bool {
        matches!(e, SocksError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof)
    }

    /// Test-only SOCKS4(a) client encoder: the module only decodes SOCKS4 requests.
    fn encode_socks4(
        cd: u8,
        port: u16,
        ip: [u8; 4],
        userid: &[u8],
        name: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut out = vec![SOCKS4_VERSION, cd];
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(userid);
        out.push(0);
        if let Some(name) = name {
            out.extend_from_slice(name);
            out.push(0);
        }
        out
    }

    const REQ_V4: &[u8] = &[5, 1, 0, 1, 10, 0, 0, 1, 0x01, 0xbb];
    const REQ_DOMAIN: &[u8] = &[
        5, 1, 0, 3, 11, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', 0, 80,
    ];

    fn req_v6() -> Vec<u8> {
        let mut out = vec![5, 3, 0, 4];
        out.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        out.extend_from_slice(&[0x1f, 0x90]);
        out
    }

    fn socks4_frame() -> Vec<u8> {
        encode_socks4(1, 80, [93, 184, 216, 34], b"alice", None)
    }

    fn socks4a_frame() -> Vec<u8> {
        encode_socks4(2, 443, [0, 0, 0, 7], b"", Some(b"example.org"))
    }

    /// Every decoder with a valid frame for it; the output is the Debug of the result.
    type Decoder = fn(&mut dyn Read) -> String;

    fn decoders() -> Vec<(&'static str, Decoder)> {
        vec![
            ("greeting", |r| format!("{:?}", read_greeting(&mut &mut *r))),
            ("method", |r| {
                format!("{:?}", read_method_choice(&mut &mut *r))
            }),
            ("userpass", |r| {
                // Debug hides the password, so show it here to compare results fully.
                format!(
                    "{:?}",
                    read_userpass(&mut &mut *r).map(|u| (u.username, u.password))
                )
            }),
            ("status", |r| {
                format!("{:?}", read_userpass_status(&mut &mut *r))
            }),
            ("request", |r| format!("{:?}", read_request(&mut &mut *r))),
            ("reply", |r| format!("{:?}", read_reply(&mut &mut *r))),
            ("socks4", |r| {
                format!("{:?}", read_socks4_request(&mut &mut *r))
            }),
        ]
    }

    fn valid_frames() -> Vec<(&'static str, Vec<u8>)> {
        let bound = SocketAddr::from((Ipv6Addr::LOCALHOST, 1080));
        vec![
            (
                "greeting",
                encode_greeting(&[METHOD_NO_AUTH, METHOD_USER_PASS]),
            ),
            ("method", encode_method_choice(METHOD_USER_PASS).to_vec()),
            ("userpass", encode_userpass(b"user", b"secret").unwrap()),
            ("status", encode_userpass_status(true).to_vec()),
            ("request", REQ_V4.to_vec()),
            ("request", REQ_DOMAIN.to_vec()),
            ("request", req_v6()),
            ("reply", encode_reply(Reply::Succeeded, Some(bound))),
            ("reply", encode_reply(Reply::ConnectionRefused, None)),
            ("reply", vec![5, 0, 0, 3, 1, b'h', 0, 1]),
            ("socks4", socks4_frame()),
            ("socks4", socks4a_frame()),
        ]
    }

    fn decode(name: &str, r: &mut dyn Read) -> String {
        let (_, f) = decoders().into_iter().find(|(n, _)| *n == name).unwrap();
        f(r)
    }

    #[test]
    fn reads_ipv4_request() {
        let req = read_request(&mut &REQ_V4[..]).unwrap();
        assert_eq!(req.command, Command::Connect);
        assert_eq!(req.target, v4(10, 0, 0, 1, 443));
    }

    #[test]
    fn reads_ipv6_request() {
        let req = read_request(&mut &req_v6()[..]).unwrap();
        assert_eq!(req.command, Command::UdpAssociate);
        assert_eq!(req.target.host, Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(req.target.port, 8080);
    }

    #[test]
    fn reads_domain_request() {
        let req = read_request(&mut &REQ_DOMAIN[..]).unwrap();
        assert_eq!(req.target, domain("example.com", 80));
    }

    #[test]
    fn domain_holding_an_ip_literal_becomes_ip() {
        for (name, ip) in [
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("fe80::2", "fe80::2"),
        ] {
            let frame = encode_request(Command::Connect, &domain(name, 22)).unwrap();
            assert_eq!(frame[3], ATYP_DOMAIN);
            let req = read_request(&mut &frame[..]).unwrap();
            assert_eq!(req.target.host, Host::Ip(ip.parse().unwrap()), "{name}");
        }
    }

    #[test]
    fn refuses_bad_domains_after_reading_the_whole_request() {
        let bad: [&[u8]; 6] = [b"", b"\xff\xfe", b"a b", b"a/b", b"a\x00b", b"a\nb"];
        for name in bad {
            let mut frame = vec![5, 1, 0, 3, name.len() as u8];
            frame.extend_from_slice(name);
            frame.extend_from_slice(&[0, 80, 0xAA]);
            let mut r = &frame[..];
            assert!(
                matches!(read_request(&mut r), Err(SocksError::BadDomain)),
                "{name:?}"
            );
            assert_eq!(r, &[0xAA], "stream left in sync after {name:?}");
        }
    }

    #[test]
    fn reads_longest_domain() {
        let name = "a".repeat(MAX_DOMAIN_LEN);
        let frame = encode_request(Command::Connect, &domain(&name, 1)).unwrap();
        assert_eq!(frame.len(), 4 + 1 + 255 + 2);
        assert_eq!(
            read_request(&mut &frame[..]).unwrap().target,
            domain(&name, 1)
        );
    }

    #[test]
    fn reads_greeting_and_method_choice() {
        let g = read_greeting(&mut &[5, 2, 0, 2][..]).unwrap();
        assert_eq!(g.methods, vec![METHOD_NO_AUTH, METHOD_USER_PASS]);
        assert_eq!(encode_method_choice(METHOD_NO_AUTH), [5, 0]);
        assert_eq!(read_method_choice(&mut &[5, 0xFF][..]).unwrap(), 0xFF);
        assert!(matches!(
            read_method_choice(&mut &[4, 0][..]),
            Err(SocksError::Version(4))
        ));
    }

    #[test]
    fn greeting_with_every_method() {
        let all: Vec<u8> = (0..=255).collect();
        let frame = encode_greeting(&all);
        assert_eq!(frame[1], 255);
        assert_eq!(frame.len(), 2 + 255);
        assert_eq!(read_greeting(&mut &frame[..]).unwrap().methods, all[..255]);
        assert_eq!(encode_greeting(&[]), vec![5, 0]);
    }

    #[test]
    fn refuses_bad_greetings() {
        assert!(matches!(
            read_greeting(&mut &[5, 0][..]),
            Err(SocksError::NoMethods)
        ));
        // An HTTP client on the SOCKS port: refused on the first byte, nothing more read.
        let mut r = &b"GET / HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_greeting(&mut r),
            Err(SocksError::Version(b'G'))
        ));
        assert_eq!(r.len(), 15);
        assert!(matches!(
            read_greeting(&mut &[4, 1, 0][..]),
            Err(SocksError::Version(4))
        ));
    }

    #[test]
    fn userpass_round_trip_and_limits() {
        let frame = encode_userpass(b"bob", b"hunter2").unwrap();
        assert_eq!(frame, b"\x01\x03bob\x07hunter2");
        let up = read_userpass(&mut &frame[..]).unwrap();
        assert_eq!(
            (up.username.as_slice(), up.password.as_slice()),
            (&b"bob"[..], &b"hunter2"[..])
        );

        let empty = read_userpass(&mut &[1, 0, 0][..]).unwrap();
        assert!(empty.username.is_empty() && empty.password.is_empty());

        let max = vec![b'x'; 255];
        let frame = encode_userpass(&max, &max).unwrap();
        let up = read_userpass(&mut &frame[..]).unwrap();
        assert_eq!((up.username, up.password), (max.clone(), max.clone()));

        let long = vec![b'x'; 256];
        assert!(matches!(
            encode_userpass(&long, b"p"),
            Err(SocksError::FieldTooLong)
        ));
        assert!(matches!(
            encode_userpass(b"u", &long),
            Err(SocksError::FieldTooLong)
        ));
        assert!(matches!(
            read_userpass(&mut &[5, 1, b'a', 0][..]),
            Err(SocksError::UserPassVersion(5))
        ));
    }

    #[test]
    fn userpass_debug_hides_password() {
        let up = UserPass {
            username: b"bob".to_vec(),
            password: b"hunter2".to_vec(),
        };
        let shown = format!("{up:?} {up:#?}");
        assert!(shown.contains("bob"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn userpass_status() {
        assert_eq!(encode_userpass_status(true), [1, 0]);
        assert_eq!(encode_userpass_status(false), [1, 1]);
        assert!(read_userpass_status(&mut &[1, 0][..]).unwrap());
        assert!(!read_userpass_status(&mut &[1, 1][..]).unwrap());
        assert!(!read_userpass_status(&mut &[1, 0xFF][..]).unwrap());
        assert!(matches!(
            read_userpass_status(&mut &[5, 0][..]),
            Err(SocksError::UserPassVersion(5))
        ));
    }

    #[test]
    fn request_round_trips() {
        let targets = [
            v4(1, 2, 3, 4, 5),
            v4(0, 0, 0, 0, 0),
            ip(SocketAddr::V6(SocketAddrV6::new(
                "2001:db8::1".parse().unwrap(),
                65535,
                0,
                0,
            ))),
            domain("a", 1),
            domain("xn--bcher-kva.example", 443),
            domain("bücher.example", 443),
        ];
        for cmd in [Command::Connect, Command::Bind, Command::UdpAssociate] {
            for t in &targets {
                let frame = encode_request(cmd, t).unwrap();
                let req = read_request(&mut &frame[..]).unwrap();
                assert_eq!(
                    req,
                    Request {
                        command: cmd,
                        target: t.clone()
                    }
                );
            }
        }
    }

    #[test]
    fn encode_request_refuses_unsendable_domains() {
        let long = domain(&"a".repeat(256), 80);
        assert!(matches!(
            encode_request(Command::Connect, &long),
            Err(SocksError::FieldTooLong)
        ));
        assert!(matches!(
            encode_request(Command::Connect, &domain("", 80)),
            Err(SocksError::BadDomain)
        ));
    }

    #[test]
    fn encodes_replies() {
        assert_eq!(
            encode_reply(Reply::GeneralFailure, None),
            vec![5, 1, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        let bound = SocketAddr::from(([192, 0, 2, 1], 0x1234));
        assert_eq!(
            encode_reply(Reply::Succeeded, Some(bound)),
            vec![5, 0, 0, 1, 192, 0, 2, 1, 0x12, 0x34]
        );
        let bound6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 1));
        let frame = encode_reply(Reply::Succeeded, Some(bound6));
        assert_eq!(frame.len(), 4 + 16 + 2);
        assert_eq!(frame[3], ATYP_IPV6);
    }

    #[test]
    fn reply_round_trips_every_code() {
        for b in 0..=8u8 {
            let reply = Reply::from_u8(b).unwrap();
            for bound in [None, Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 9)))] {
                let frame = encode_reply(reply, bound);
                let msg = read_reply(&mut &frame[..]).unwrap();
                let want = bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                assert_eq!(
                    msg,
                    ReplyMsg {
                        reply,
                        bound: ip(want)
                    }
                );
            }
        }
    }

    #[test]
    fn reads_reply_with_domain() {
        let msg = read_reply(&mut &[5, 0, 0, 3, 3, b'f', b'o', b'o', 0, 21][..]).unwrap();
        assert_eq!(msg.bound, domain("foo", 21));
    }

    #[test]
    fn refuses_bad_replies_after_reading_them_whole() {
        let mut r = &[5, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0xAA][..];
        assert!(matches!(read_reply(&mut r), Err(SocksError::BadReply(9))));
        assert_eq!(r, &[0xAA]);
        let mut r = &[5, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0xAA][..];
        assert!(matches!(read_reply(&mut r), Err(SocksError::Reserved(7))));
        assert_eq!(r, &[0xAA]);
        assert!(matches!(
            read_reply(&mut &[5, 0, 0, 2, 0][..]),
            Err(SocksError::AddressType(2))
        ));
        assert!(matches!(
            read_reply(&mut &[0, 0x5A, 0, 0][..]),
            Err(SocksError::Version(0))
        ));
    }

    #[test]
    fn unknown_atyp_stops_right_after_atyp() {
        for atyp in [0u8, 2, 5, 9, 0xFF] {
            let mut r = &[5, 1, 0, atyp, 0xAA, 0xBB][..];
            match read_request(&mut r) {
                Err(SocksError::AddressType(b)) => assert_eq!(b, atyp),
                other => panic!("atyp {atyp}: {other:?}"),
            }
            assert_eq!(r, &[0xAA, 0xBB]);
        }
        // Unknown ATYP wins over unknown CMD: the address cannot be skipped.
        assert!(matches!(
            read_request(&mut &[5, 9, 0, 9][..]),
            Err(SocksError::AddressType(9))
        ));
    }

    #[test]
    fn unknown_command_leaves_stream_at_end_of_request() {
        for cmd in [0u8, 4, 0x80, 0xFF] {
            let mut frame = REQ_DOMAIN.to_vec();
            frame[1] = cmd;
            frame.push(0xAA);
            let mut r = &frame[..];
            match read_request(&mut r) {
                Err(SocksError::Command(b)) => assert_eq!(b, cmd),
                other => panic!("cmd {cmd}: {other:?}"),
            }
            assert_eq!(r, &[0xAA]);
        }
    }

    #[test]
    fn nonzero_reserved_is_refused_in_sync() {
        let mut frame = REQ_V4.to_vec();
        frame[2] = 1;
        frame.push(0xAA);
        let mut r = &frame[..];
        assert!(matches!(read_request(&mut r), Err(SocksError::Reserved(1))));
        assert_eq!(r, &[0xAA]);
    }

    #[test]
    fn wrong_version_is_refused_on_the_first_byte() {
        for v in [0u8, 4, 6, 0xFF] {
            let mut r = &[v, 1, 0, 1][..];
            assert!(matches!(read_request(&mut r), Err(SocksError::Version(b)) if b == v));
            assert_eq!(r.len(), 3);
        }
        assert!(matches!(
            read_socks4_request(&mut &REQ_V4[..]),
            Err(SocksError::Version(5))
        ));
    }

    #[test]
    fn reads_socks4_request() {
        let req = read_socks4_request(&mut &socks4_frame()[..]).unwrap();
        assert_eq!(req.command, Command::Connect);
        assert_eq!(req.target, v4(93, 184, 216, 34, 80));
        assert_eq!(req.userid, b"alice");
    }

    #[test]
    fn reads_socks4a_request() {
        let req = read_socks4_request(&mut &socks4a_frame()[..]).unwrap();
        assert_eq!(req.command, Command::Bind);
        assert_eq!(req.target, domain("example.org", 443));
        assert!(req.userid.is_empty());
        let ip_name = encode_socks4(1, 1, [0, 0, 0, 1], b"u", Some(b"10.1.2.3"));
        let req = read_socks4_request(&mut &ip_name[..]).unwrap();
        assert_eq!(req.target, v4(10, 1, 2, 3, 1));
    }

    #[test]
    fn socks4_zero_address_is_not_socks4a() {
        let mut frame = encode_socks4(1, 80, [0, 0, 0, 0], b"", None);
        frame.extend_from_slice(b"payload");
        let mut r = &frame[..];
        let req = read_socks4_request(&mut r).unwrap();
        assert_eq!(req.target, v4(0, 0, 0, 0, 80));
        assert_eq!(r, b"payload");
    }

    #[test]
    fn socks4_field_limits() {
        let max = vec![b'u'; MAX_SOCKS4_FIELD];
        let frame = encode_socks4(1, 80, [1, 2, 3, 4], &max, None);
        assert_eq!(read_socks4_request(&mut &frame[..]).unwrap().userid, max);

        let long = vec![b'u'; MAX_SOCKS4_FIELD + 1];
        let frame = encode_socks4(1, 80, [1, 2, 3, 4], &long, None);
        assert!(matches!(
            read_socks4_request(&mut &frame[..]),
            Err(SocksError::FieldTooLong)
        ));

        let name = vec![b'd'; MAX_SOCKS4_FIELD];
        let frame = encode_socks4(1, 80, [0, 0, 0, 1], b"", Some(&name));
        assert!(read_socks4_request(&mut &frame[..]).is_ok());
        let long_name = vec![b'd'; MAX_SOCKS4_FIELD + 1];
        let frame = encode_socks4(1, 80, [0, 0, 0, 1], b"", Some(&long_name));
        assert!(matches!(
            read_socks4_request(&mut &frame[..]),
            Err(SocksError::FieldTooLong)
        ));
    }

    #[test]
    fn socks4_field_reading_is_bounded_on_an_endless_stream() {
        // A stream with no NUL at all: must stop after MAX_SOCKS4_FIELD + 1 field bytes.
        let mut r = [SOCKS4_VERSION, 1, 0, 80, 1, 2, 3, 4].chain(io::repeat(b'x'));
        assert!(matches!(
            read_socks4_request(&mut r),
            Err(SocksError::FieldTooLong)
        ));
    }

    #[test]
    fn socks4_bad_command_and_domain_in_sync() {
        for cd in [0u8, 3, 0x5A] {
            let mut frame = encode_socks4(cd, 80, [1, 2, 3, 4], b"id", None);
            frame.push(0xAA);
            let mut r = &frame[..];
            assert!(matches!(read_socks4_request(&mut r), Err(SocksError::Command(b)) if b == cd));
            assert_eq!(r, &[0xAA]);
        }
        for name in [&b""[..], b"a b", b"\xff"] {
            let mut frame = encode_socks4(1, 80, [0, 0, 0, 9], b"id", Some(name));
            frame.push(0xAA);
            let mut r = &frame[..];
            assert!(
                matches!(read_socks4_request(&mut r), Err(SocksError::BadDomain)),
                "{name:?}"
            );
            assert_eq!(r, &[0xAA]);
        }
    }

    #[test]
    fn socks4_reply() {
        assert_eq!(encode_socks4_reply(true), [0, 0x5A, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_socks4_reply(false), [0, 0x5B, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_strict_prefix_is_an_eof_error() {
        for (name, frame) in valid_frames() {
            for n in 0..frame.len() {
                let mut r = &frame[..n];
                let out = decode(name, &mut r);
                assert!(out.starts_with("Err(Io("), "{name} prefix {n}: {out}");
                assert!(out.contains("UnexpectedEof"), "{name} prefix {n}: {out}");
            }
        }
        // And with the typed error, for one kind: EOF stays SocksError::Io.
        let e = read_request(&mut &REQ_V4[..5]).unwrap_err();
        assert!(is_eof(&e));
    }

    #[test]
    fn whole_frame_decodes_and_stops_at_its_end() {
        for (name, frame) in valid_frames() {
            let mut with_tail = frame.clone();
            with_tail.extend_from_slice(b"TAIL");
            let mut r = &with_tail[..];
            let out = decode(name, &mut r);
            assert!(out.starts_with("Ok("), "{name}: {out}");
            assert_eq!(r, b"TAIL", "{name} read past its end");
        }
    }

    #[test]
    fn one_byte_reads_and_interruptions_give_the_same_result() {
        for (name, frame) in valid_frames() {
            let whole = decode(name, &mut &frame[..]);
            let bytewise = decode(name, &mut Chunked::new(&frame, &[1]));
            assert_eq!(whole, bytewise, "{name}");
            let mut interrupting = Interrupting {
                data: &frame,
                interrupt: false,
            };
            assert_eq!(whole, decode(name, &mut interrupting), "{name}");
        }
    }

    #[test]
    fn io_errors_other_than_eof_stay_io() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        let e = read_request(&mut Broken).unwrap_err();
        assert!(matches!(&e, SocksError::Io(io) if io.kind() == io::ErrorKind::ConnectionReset));
        assert!(e.to_string().starts_with("socks: i/o error: "));
    }

    #[test]
    fn undecodable_requests_get_the_rfc_reply() {
        let r = |bytes: &[u8]| request_error_reply(&read_request(&mut &bytes[..]).unwrap_err());
        let spaced = [5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80];
        assert_eq!(r(&spaced), Some(Reply::GeneralFailure));
        assert_eq!(
            r(&[5, 1, 1, 1, 127, 0, 0, 1, 0, 80]),
            Some(Reply::GeneralFailure)
        );
        assert_eq!(
            r(&[5, 9, 0, 1, 127, 0, 0, 1, 0, 80]),
            Some(Reply::CommandNotSupported)
        );
        assert_eq!(r(&[5, 1, 0, 9]), Some(Reply::AddressTypeNotSupported));
        assert_eq!(r(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80]), None);
        assert_eq!(
            r(&[5, 1, 0, 1, 127]),
            None,
            "a truncated request gets no reply"
        );
    }

    #[test]
    fn reply_from_u8_covers_every_byte() {
        for b in 0..=255u8 {
            match Reply::from_u8(b) {
                Some(r) => {
                    assert!(b <= 8, "{b}");
                    assert_eq!(r as u8, b);
                }
                None => assert!(b > 8, "{b}"),
            }
        }
    }

    #[test]
    fn command_from_u8_covers_every_byte() {
        for b in 0..=255u8 {
            match Command::from_u8(b) {
                Some(c) => assert_eq!(c as u8, b),
                None => assert!(b == 0 || b > 3, "{b}"),
            }
        }
    }

    #[test]
    fn reply_from_io_error_kinds() {
        use io::ErrorKind as K;
        let cases = [
            (K::ConnectionRefused, Reply::ConnectionRefused),
            (K::TimedOut, Reply::TtlExpired),
            (K::WouldBlock, Reply::TtlExpired),
            (K::NetworkUnreachable, Reply::NetworkUnreachable),
            (K::HostUnreachable, Reply::HostUnreachable),
            (K::PermissionDenied, Reply::GeneralFailure),
            (K::ConnectionReset, Reply::GeneralFailure),
            (K::AddrNotAvailable, Reply::GeneralFailure),
            (K::Other, Reply::GeneralFailure),
            (K::NotFound, Reply::GeneralFailure),
        ];
        for (kind, want) in cases {
            assert_eq!(
                Reply::from_io_error(&io::Error::from(kind)),
                want,
                "{kind:?}"
            );
        }
        // A wrapped error keeps its kind.
        let wrapped = io::Error::new(K::TimedOut, "connect timed out");
        assert_eq!(Reply::from_io_error(&wrapped), Reply::TtlExpired);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reply_from_raw_linux_errno() {
        let cases = [
            (101, Reply::NetworkUnreachable),
            (113, Reply::HostUnreachable),
            (111, Reply::ConnectionRefused),
            (110, Reply::TtlExpired),
            (1, Reply::GeneralFailure),
            (104, Reply::GeneralFailure),
            (99, Reply::GeneralFailure),
        ];
        for (errno, want) in cases {
            assert_eq!(
                Reply::from_io_error(&io::Error::from_raw_os_error(errno)),
                want,
                "{errno}"
            );
            assert_eq!(
                reply_from_linux_errno(errno).unwrap_or(Reply::GeneralFailure),
                want
            );
        }
    }

    #[test]
    fn reply_descriptions_follow_rfc_1928() {
        assert_eq!(Reply::ConnectionRefused.description(), "connection refused");
        assert_eq!(Reply::TtlExpired.description(), "ttl expired");
        assert_eq!(
            Reply::NotAllowed.description(),
            "connection not allowed by ruleset"
        );
        for b in 0..=8u8 {
            let d = Reply::from_u8(b).unwrap().description();
            assert!(!d.is_empty() && d == d.to_lowercase(), "{d}");
        }
    }

    #[test]
    fn error_messages_are_lowercase_and_say_what_came() {
        let errors = [
            SocksError::Io(io::ErrorKind::UnexpectedEof.into()),
            SocksError::Io(io::ErrorKind::BrokenPipe.into()),
            SocksError::Version(6),
            SocksError::UserPassVersion(2),
            SocksError::NoMethods,
            SocksError::AddressType(9),
            SocksError::Command(4),
            SocksError::BadDomain,
            SocksError::FieldTooLong,
            SocksError::BadReply(0x0A),
            SocksError::Reserved(1),
        ];
        for e in &errors {
            let s = e.to_string();
            assert!(s.starts_with("socks"), "{s}");
            assert!(!s.ends_with('.'), "{s}");
            let _: &dyn std::error::Error = e;
        }
        assert_eq!(
            SocksError::AddressType(9).to_string(),
            "socks5: unsupported address type 0x09, expected 0x01, 0x03 or 0x04"
        );
        assert!(SocksError::Version(6).to_string().contains("0x06"));
        assert_eq!(
            SocksError::Version(5).to_string(),
            "socks4: unsupported protocol version 0x05, expected 0x04"
        );
        assert!(SocksError::Command(4).to_string().contains("0x04"));
        assert!(SocksError::BadReply(0x0A).to_string().contains("0x0a"));
        assert!(SocksError::Reserved(1).to_string().contains("0x01"));
        let from: SocksError = io::Error::from(io::ErrorKind::UnexpectedEof).into();
        assert!(is_eof(&from));
    }

    fn arb_host() -> impl Strategy<Value = Host> {
        let name = "[a-z0-9-]{1,63}(\\.[a-z0-9-]{1,63}){0,3}"
            .prop_filter("an IP literal decodes as Ip", |s| {
                s.parse::<IpAddr>().is_err()
            });
        prop_oneof![
            any::<Ipv4Addr>().prop_map(|a| Host::Ip(IpAddr::V4(a))),
            any::<Ipv6Addr>().prop_map(|a| Host::Ip(IpAddr::V6(a))),
            name.prop_map(Host::Domain),
        ]
    }

    fn arb_target() -> impl Strategy<Value = Target> {
        (arb_host(), any::<u16>()).prop_map(|(host, port)| Target { host, port })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Connect),
            Just(Command::Bind),
            Just(Command::UdpAssociate)
        ]
    }

    /// A valid SOCKS4 or 4a request and what it decodes to.
    fn arb_socks4() -> impl Strategy<Value = (Vec<u8>, Socks4Request)> {
        let userid = vec(1u8..=255, 0..=MAX_SOCKS4_FIELD);
        let cmd = prop_oneof![Just(Command::Connect), Just(Command::Bind)];
        (cmd, arb_target(), userid).prop_filter_map(
            "SOCKS4 carries IPv4 or a name",
            |(command, target, userid)| {
                let (ip, name) = match &target.host {
                    Host::Ip(IpAddr::V4(a)) if is_socks4a_marker(*a) => return None,
                    Host::Ip(IpAddr::V4(a)) => (a.octets(), None),
                    Host::Ip(IpAddr::V6(_)) => return None,
                    Host::Domain(d) => ([0, 0, 0, 1], Some(d.as_bytes())),
                };
                let frame = encode_socks4(command as u8, target.port, ip, &userid, name);
                Some((
                    frame,
                    Socks4Request {
                        command,
                        target,
                        userid,
                    },
                ))
            },
        )
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..600)) {
            for (_, f) in decoders() {
                let _ = f(&mut &bytes[..]);
            }
        }

        #[test]
        fn decoders_never_panic_on_mutated_frames(
            pick in any::<prop::sample::Index>(),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let frames = valid_frames();
            let (_, frame) = &frames[pick.index(frames.len())];
            let mut frame = frame.clone();
            let at = pos.index(frame.len());
            frame[at] = byte;
            frame.truncate(1 + cut.index(frame.len()));
            for (_, f) in decoders() {
                let _ = f(&mut &frame[..]);
            }
        }

        #[test]
        fn request_round_trips_in_any_chunks(
            command in arb_command(),
            target in arb_target(),
            sizes in vec(1usize..8, 1..16),
        ) {
            let frame = encode_request(command, &target).unwrap();
            let whole = read_request(&mut &frame[..]).unwrap();
            prop_assert_eq!(&whole, &Request { command, target });
            let chunked = read_request(&mut Chunked::new(&frame, &sizes)).unwrap();
            prop_assert_eq!(whole, chunked);
        }

        #[test]
        fn reply_round_trips_in_any_chunks(
            code in 0u8..=8,
            bound in proptest::option::of(any::<SocketAddr>()),
            sizes in vec(1usize..8, 1..16),
        ) {
            let reply = Reply::from_u8(code).unwrap();
            let frame = encode_reply(reply, bound);
            let whole = read_reply(&mut &frame[..]).unwrap();
            prop_assert_eq!(whole.reply, reply);
            let chunked = read_reply(&mut Chunked::new(&frame, &sizes)).unwrap();
            prop_assert_eq!(whole, chunked);
        }

        #[test]
        fn socks4_in_any_chunks((frame, want) in arb_socks4(), sizes in vec(1usize..8, 1..16)) {
            let whole = read_socks4_request(&mut &frame[..]).unwrap();
            prop_assert_eq!(&whole, &want);
            let chunked = read_socks4_request(&mut Chunked::new(&frame, &sizes)).unwrap();
            prop_assert_eq!(whole, chunked);
        }

        #[test]
        fn userpass_and_greeting_in_any_chunks(
            user in vec(any::<u8>(), 0..=255),
            pass in vec(any::<u8>(), 0..=255),
            methods in vec(any::<u8>(), 1..=255),
            sizes in vec(1usize..8, 1..16),
        ) {
            let frame = encode_userpass(&user, &pass).unwrap();
            let up = read_userpass(&mut Chunked::new(&frame, &sizes)).unwrap();
            prop_assert_eq!((up.username, up.password), (user, pass));
            let frame = encode_greeting(&methods);
            let g = read_greeting(&mut Chunked::new(&frame, &sizes)).unwrap();
            prop_assert_eq!(g.methods, methods);
        }
    }
}
