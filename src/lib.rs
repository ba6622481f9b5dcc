//! Sluice: a per-user bandwidth-limiting proxy.
//!
//! `sluice server` speaks SOCKS5 (RFC 1928/1929) and HTTP proxy (CONNECT and plain forwarding,
//! Basic auth) on one port, takes its users from an SQLite file, and holds each user to a
//! bandwidth shared by all of its connections, both directions together. `sluice local` is the
//! client-side proxy that logs in for the apps on a user's machine.
//!
//! The design is synchronous: blocking sockets, a thread per connection direction, and a global
//! `Mutex<HashMap<user, Bucket>>` topped up by a refill thread (see `limiter`). Modules follow the
//! path of a byte: `server` (accept) → `conn` (handshake, using `socks5` / `http`) → `auth` →
//! `dial` → `relay` (through `limiter`) → close.

pub mod auth;
pub mod error;
pub mod flow;
pub mod local;
pub mod net;
pub mod server;
pub mod stop;
pub mod store;
pub mod units;
pub mod wire;

pub use error::{Error, Result};
pub use server::{ServerConfig, ServerHandle};
