//! The state every server connection thread reads: the user directory and login gate, the
//! limiter, the destination policy, the caps and timeouts, the counters. Built by `start` in
//! `mod.rs`, read by `conn.rs` and `gate.rs`, owned here so neither reaches into the listener.

use super::metrics::Counters;
use crate::auth::Directory;
use crate::auth::login::Logins;
use crate::flow::limiter::Limiter;
use crate::net::accept::Intake;
use crate::net::admission::Handshakes;
use crate::net::dial::DialPolicy;
use std::sync::Arc;
use std::time::Duration;

/// State every connection thread reads.
pub(crate) struct Shared {
    pub directory: Arc<Directory>,
    pub limiter: Arc<Limiter>,
    pub policy: DialPolicy,
    pub handshake_timeout: Duration,
    /// The accept loop's state: stop flag, live connections, ids, the cap.
    pub intake: Intake,
    /// Connection outcomes for the metrics.
    pub counters: Arc<Counters>,
    /// The login gate: throttle, verify cache, argon2 slots.
    pub logins: Arc<Logins>,
    /// Connections still in their handshake.
    pub handshakes: Handshakes,
    /// Relays idle this long are closed.
    pub idle_timeout: Duration,
    /// TLS on the listening port, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}
