//! The client-side proxy: apps on the user's machine connect without credentials; each of their
//! connections is opened through the Sluice server as one user (SOCKS5 with username/password).
//!
//! (Being written: see issue 4.)

use crate::error::{Error, Result};
use std::net::SocketAddr;
use std::time::Duration;

/// How to run `sluice local`.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where apps connect (default 127.0.0.1:1080).
    pub listen: SocketAddr,
    /// The Sluice server, HOST:PORT (resolved when each connection is opened).
    pub server: String,
    /// The user to log in as.
    pub user: String,
    /// That user's password.
    pub password: String,
    /// Allow a non-loopback `listen` address.
    pub allow_lan: bool,
    /// Time an app has to finish its handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to connect to the server.
    pub connect_timeout: Duration,
}

/// A running local proxy.
pub struct LocalHandle {
    local_addr: SocketAddr,
}

impl LocalHandle {
    /// The address apps connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// Stops the proxy and waits for its accept thread.
    pub fn shutdown(self) {}
    /// Blocks until the proxy stops.
    pub fn wait(self) {}
}

/// Starts the local proxy.
///
/// # Errors
/// A non-loopback listen address without `allow_lan`, or an address that cannot be bound.
pub fn start(cfg: &LocalConfig) -> Result<LocalHandle> {
    Err(Error::Invalid(format!(
        "sluice local is not built yet ({})",
        cfg.listen
    )))
}
