//! Sluice: a per-user bandwidth-limiting proxy.
//!
//! `sluice server` speaks SOCKS5 (RFC 1928/1929) and HTTP proxy (CONNECT and plain forwarding,
//! Basic auth) on one port, takes its users from an SQLite file, and holds each user to a
//! bandwidth shared by all of its connections, both directions together. `sluice local` is the
//! client-side proxy that logs in for the apps on a user's machine.
//!
//! The design is synchronous: blocking sockets, a thread per connection direction, and a global
//! `Mutex<HashMap<user, Bucket>>` topped up by a refill thread (`flow::limiter`).
//!
//! The folders are layers; each imports only those below it:
//! - `server`, `local`: the two proxies, each small — what they accept, whom they let in, where
//!   a tunnel goes.
//! - `auth`: the user directory, the verify cache and the login gate (throttle, argon2 slots).
//! - `net`: the connection layer both proxies share — accept and its gate, the handshake, plain
//!   HTTP forwarding, dialing under the policy, the stream (plain or TLS), the relay, OS knobs.
//! - `flow`: the limiter and the accounts the relays charge.
//! - `store`: the user store behind one trait (SQLite).
//! - `wire`: the wire formats, pure (SOCKS5, HTTP/1.1, destinations).
//! - `error`, `units`, `stop`: the crate's error, byte-size units, the periodic threads' stop
//!   signal.
//!
//! A byte's path: `net::accept` → `server::conn` (handshake through `net::handshake` and `wire`)
//! → `server::login` → `net::dial` → `net::relay` (through `flow::limiter`) → close.

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
