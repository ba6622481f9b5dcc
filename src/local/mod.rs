//! The client-side proxy: apps on the user's machine connect without credentials; each of their
//! connections is opened through the Sluice server as one user (SOCKS5 with username/password).
//!
//! This file is the listener: checking the configuration, the accept loop (one thread per
//! connection) and the `LocalHandle` that stops it. The state every connection reads is in
//! `shared.rs`; what an app says and how it is answered is in `conn.rs`; the SOCKS5 client side
//! toward the server is in `upstream.rs`. Nothing here
//! limits bandwidth: the server does, for all of the user's connections together.

pub mod conn;
pub mod shared;
pub mod upstream;

use crate::auth::check_credential;
use crate::error::{Error, Result};
use crate::local::shared::{Burst, LocalShared};
use crate::net::accept::{self, CONN_STACK, Intake, Service, accept_loop};
use crate::net::os;
use crate::net::tls::{self, Trust};
use crate::wire::target::{Host, Target};
use log::{info, warn};
use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How to run `sluice local`.
///
/// `Debug` never shows the password.
#[derive(Clone)]
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
    /// Time an app has to finish its handshake; the handshake with the server counts too.
    pub handshake_timeout: Duration,
    /// Time allowed to connect to the server.
    pub connect_timeout: Duration,
    /// Encrypt the hop to the server, if set.
    pub tls: Option<LocalTls>,
}

/// TLS to the server: how to trust its certificate and which name to check.
#[derive(Debug, Clone)]
pub struct LocalTls {
    /// System roots, a CA file, or a pinned fingerprint.
    pub trust: Trust,
    /// The name the certificate must carry (default: the host of `--server`).
    pub server_name: Option<String>,
}

impl fmt::Debug for LocalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConfig")
            .field("listen", &self.listen)
            .field("server", &self.server)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("allow_lan", &self.allow_lan)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A running local proxy.
pub struct LocalHandle {
    local_addr: SocketAddr,
    shared: Arc<LocalShared>,
    accept: Option<JoinHandle<()>>,
}

impl LocalHandle {
    /// The address apps connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connection threads alive now.
    pub fn active_connections(&self) -> usize {
        self.shared.intake.active()
    }

    /// Stops accepting and waits for the accept thread; connections already open run to their
    /// end. Blocking.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the proxy stops (it runs until the process ends).
    pub fn wait(mut self) {
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    fn stop(&mut self) {
        let Some(t) = self.accept.take() else { return };
        self.shared.intake.stop();
        // Wake accept() by connecting to ourselves (an unspecified address is reached on loopback).
        accept::wake(self.local_addr);
        let _ = t.join();
    }
}

impl Drop for LocalHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks the configuration, binds, and starts the accept thread.
///
/// # Errors
/// [`Error::Invalid`] for a non-loopback listen address without `allow_lan`, a `server` that is
/// not HOST:PORT, or a username or password the protocol cannot carry; [`Error::Io`] for an
/// address that cannot be bound or a thread that cannot be started.
pub fn start(cfg: &LocalConfig) -> Result<LocalHandle> {
    let loopback = cfg.listen.ip().to_canonical().is_loopback();
    if !loopback && !cfg.allow_lan {
        return Err(Error::Invalid(format!(
            "refusing to listen on {}: anyone who can reach it would use the account of user {}; \
             listen on 127.0.0.1 or pass --allow-lan",
            cfg.listen, cfg.user
        )));
    }
    let server = Target::parse(&cfg.server, None).map_err(|e| {
        Error::Invalid(format!(
            "bad --server {:?}: {e}; expected HOST:PORT such as proxy.example.com:8889",
            cfg.server
        ))
    })?;
    check_credential("username", &cfg.user)?;
    check_credential("password", &cfg.password)?;
    let tls = match &cfg.tls {
        None => None,
        Some(t) => {
            let name = t.server_name.clone().unwrap_or_else(|| match &server.host {
                Host::Ip(ip) => ip.to_string(),
                Host::Domain(d) => d.clone(),
            });
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
                Error::Invalid(format!(
                    "bad --server-name {name:?}: not a DNS name or IP address"
                ))
            })?;
            Some((tls::client_config(&t.trust)?, name))
        }
    };
    let listener = TcpListener::bind(cfg.listen)
        .map_err(|e| Error::Io(format!("cannot listen on {}", cfg.listen), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::Io("listener address".into(), e))?;
    let shared = Arc::new(LocalShared {
        server,
        user: cfg.user.clone(),
        password: cfg.password.clone(),
        handshake_timeout: cfg.handshake_timeout,
        connect_timeout: cfg.connect_timeout,
        unreachable: Burst::default(),
        rejected: Burst::default(),
        tls,
        intake: Intake::new(
            Arc::new(AtomicBool::new(false)),
            os::default_max_connections(),
            "connection cap",
        ),
    });
    let sh = shared.clone();
    let accept = thread::Builder::new()
        .name("local accept".into())
        .stack_size(CONN_STACK)
        .spawn(move || accept_loop(&listener, &sh))
        .map_err(|e| Error::Io("cannot start the accept thread".into(), e))?;
    info!(
        "sluice local listening on {local_addr} (SOCKS5, SOCKS4/4a, HTTP), through server {} as user {}",
        shared.server, shared.user
    );
    if !loopback {
        warn!(
            "listening on {local_addr} (--allow-lan): anyone who can reach this address uses the account of user {}",
            shared.user
        );
    }
    Ok(LocalHandle {
        local_addr,
        shared,
        accept: Some(accept),
    })
}

impl Service for LocalShared {
    fn intake(&self) -> &Intake {
        &self.intake
    }
    fn serve(&self, stream: TcpStream, peer: SocketAddr, id: u64) {
        conn::handle(stream, peer, id, self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn debug_hides_the_password() {
        let cfg = LocalConfig {
            listen: "127.0.0.1:1080".parse().unwrap(),
            server: "s:1".into(),
            user: "u".into(),
            password: "hunter2".into(),
            allow_lan: false,
            handshake_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            tls: None,
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn mapped_loopback_counts_as_loopback() {
        let ip: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(ip.to_canonical().is_loopback());
        let ip: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(!ip.to_canonical().is_loopback());
    }
}
