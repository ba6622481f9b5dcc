//! Wire formats, pure: decoders and encoders for SOCKS5 and HTTP/1.1 and the destination type
//! they carry. Nothing here touches a socket, a clock or a lock; everything above uses it.

pub mod http;
pub mod http_framing;
pub mod socks5;
pub mod target;
