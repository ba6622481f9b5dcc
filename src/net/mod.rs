//! The connection layer both proxies stand on: the byte stream (plain or TLS), dialing under the
//! destination policy, the two-thread relay through the limiter, and the OS knobs they need.

pub mod accept;
pub mod admission;
pub mod dial;
pub mod forward;
pub mod forward_body;
pub mod handshake;
mod mover;
pub mod os;
pub mod own_addrs;
pub mod pool;
pub mod relay;
pub mod source;
pub mod stream;
pub mod tls;
