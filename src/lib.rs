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

pub mod account;
pub mod admission;
pub mod auth;
pub mod conn;
pub mod dial;
pub mod error;
pub mod forward;
pub mod forward_body;
pub mod http;
pub mod http_framing;
pub mod limiter;
pub mod local;
pub mod local_conn;
pub mod login;
pub mod metrics;
pub mod own_addrs;
pub mod relay;
pub mod server;
pub mod server_gate;
pub mod socks5;
pub mod stats;
pub mod stop;
pub mod stream;
pub mod target;
pub mod throttle;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod usage;
pub mod users;

pub use error::{Error, Result};
pub use server::{ServerConfig, ServerHandle};
