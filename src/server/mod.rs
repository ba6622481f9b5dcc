//! The listener: start-up and the `ServerHandle` tests and `main` use to stop it.
//!
//! The accept loop only accepts and spawns, so a slow or silent client never blocks anyone else.
//! The handshake, dialing and relaying happen on the connection's thread (`conn.rs`); the accept
//! loop itself is `net::accept`, shared with `sluice local`.

pub mod conn;
pub mod fleet_logins;
pub mod gate;
pub mod login;
pub mod metrics;
pub mod shared;
pub mod stats;
pub mod watcher;

use self::metrics::{Counters, Sources};
use self::shared::Shared;
use crate::auth::login::Logins;
use crate::auth::{self, Directory};
use crate::error::{Error, Result};
use crate::flow::lease::{self, FleetConfig, LeaseStats};
use crate::flow::limiter::{self, Limiter};
use crate::net::accept::{CONN_STACK, Intake, Service, accept_loop, wake};
use crate::net::admission::{self, Handshakes};
use crate::net::dial::DialPolicy;
use crate::net::os;
use crate::net::own_addrs::OwnAddrs;
use crate::net::relay;
use crate::net::tls;
use crate::stop::Stop;
use crate::store;
use log::{info, warn};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The user store (must exist): an SQLite file or a `redis://…` spec.
    pub db: store::StoreSpec,
    /// Allow loopback and private destinations.
    pub allow_private: bool,
    /// Time a client has to finish its handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for each connect attempt to a destination.
    pub connect_timeout: Duration,
    /// The limiter's refill tick.
    pub tick: Duration,
    /// Where to serve `/metrics` and the status page, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// A relay with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections at once; past it new ones are closed at once. `None`: derived from the
    /// open-files limit (two sockets per connection, some files kept in reserve, a twelfth left
    /// for relay pipes).
    pub max_connections: Option<usize>,
    /// Certificate chain and key (PEM): the port then speaks TLS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Most connections from one source still in their handshake.
    pub max_handshakes_per_source: usize,
    /// Most connections still in their handshake in all. `None`: half the connection cap.
    pub max_handshakes: Option<usize>,
    /// A relay direction quiet this long gives back its pipe or buffer. Process-wide (the last
    /// server started sets it for all).
    pub release_after: Duration,
    /// Most descriptors relay pipes may hold at once. `None`: what the open-files limit leaves
    /// after the connection cap. Process-wide, like the descriptors it counts.
    pub pipe_budget: Option<usize>,
    /// Share each user's one bandwidth (and quota) with the other servers of a fleet, through
    /// Redis leases. `None`: this server alone.
    pub fleet: Option<FleetConfig>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8889)),
            db: store::StoreSpec::default(),
            allow_private: false,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            tick: limiter::DEFAULT_TICK,
            metrics: None,
            idle_timeout: relay::DEFAULT_IDLE_TIMEOUT,
            max_connections: None,
            tls: None,
            max_handshakes_per_source: admission::DEFAULT_PER_SOURCE,
            max_handshakes: None,
            release_after: relay::DEFAULT_RELEASE_AFTER,
            pipe_budget: None,
            fleet: None,
        }
    }
}

impl Service for Shared {
    fn intake(&self) -> &Intake {
        &self.intake
    }
    fn serve(&self, stream: TcpStream, peer: SocketAddr, id: u64) {
        conn::handle(stream, peer, id, self);
    }
}

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    /// Tells the database thread to flush one last time and stop (after the relays ended).
    db_stop: Stop,
    /// Given by a [`Stopper`]: what [`ServerHandle::wait`] waits for.
    asked: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
    fleet: Option<Arc<LeaseStats>>,
}

impl ServerHandle {
    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the metrics endpoint, if one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A handle that can stop this server from another thread (a signal handler's).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.intake.stop_flag(), self.asked.clone())
    }

    /// Connection threads alive now.
    pub fn active_connections(&self) -> usize {
        self.shared.intake.active()
    }

    /// The server's counters (what `/metrics` shows).
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The fleet lease thread's figures, when the server is in a fleet.
    pub fn fleet(&self) -> Option<&Arc<LeaseStats>> {
        self.fleet.as_ref()
    }

    /// argon2 verifications run since start (joined and cached logins run none).
    pub fn argon2_runs(&self) -> u64 {
        self.shared.directory.argon2_runs()
    }

    /// Stops accepting, closes open relays, stops the limiter and the watcher, and waits for
    /// the server's own threads. Blocking.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.shared.intake.stop();
        for addr in [Some(self.local_addr), self.metrics_addr]
            .into_iter()
            .flatten()
        {
            wake(addr);
        }
        self.shared.limiter.shutdown();
        for a in self.shared.directory.accounts() {
            a.close_all();
        }
        // Let the relays finish counting before the last flush (bounded: sockets are shut).
        let t = Instant::now();
        while self.shared.intake.active() > 0 && t.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(10));
        }
        self.db_stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Blocks until a [`Stopper`] asks the server to stop, then stops it as
    /// [`ServerHandle::shutdown`] does (usage flushed).
    pub fn wait(mut self) {
        // Disconnected, not sent: `recv` returns (with an error) once the stop is given.
        let _ = self.asked.receiver().recv();
        info!("stopping: no new connections; closing relays and flushing usage");
        self.stop_all();
        info!("stopped");
    }
}

/// Asks a running server to stop; cheap to clone and safe to use from any thread.
#[derive(Clone)]
pub struct Stopper(Arc<AtomicBool>, Arc<Stop>);

impl Stopper {
    /// Asks the server to stop; [`ServerHandle::wait`] then does the stopping.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
        self.1.stop();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_all();
        }
    }
}

/// Opens the database, loads the users, binds, and starts the server's threads.
///
/// # Errors
/// A missing or unreadable database, an address that cannot be bound, or a thread that cannot be
/// spawned; each as one clear message.
pub fn start(config: &ServerConfig) -> Result<ServerHandle> {
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    // Opened before the load: a change between the load and the watcher's start is noticed.
    let store = store::open(&config.db, false)?;
    warn_if_readable(&store.readable_by_others());
    let store_location = store.location();
    let limiter = Limiter::new(config.tick);
    let directory = Directory::new(limiter.clone())?;
    auth::reload(&*store, &directory)?;
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| Error::Io(format!("cannot listen on {}", config.listen), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::Io("listener address".into(), e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let max_connections = config
        .max_connections
        .unwrap_or_else(os::default_max_connections);
    let max_handshakes = config.max_handshakes.unwrap_or(max_connections / 2).max(1);
    relay::set_release_after(config.release_after);
    os::PIPES.set_limit(config.pipe_budget.unwrap_or_else(|| {
        os::pipe_fd_budget(os::current_nofile_limit().unwrap_or(1024), max_connections)
    }));
    let logins = Arc::new(Logins::new(directory.clone()));
    let shared = Arc::new(Shared {
        directory: directory.clone(),
        limiter: limiter.clone(),
        policy: DialPolicy {
            allow_private: config.allow_private,
            connect_timeout: config.connect_timeout,
            own_addrs: Arc::new(if config.allow_private {
                OwnAddrs::none()
            } else {
                OwnAddrs::system()
            }),
        },
        handshake_timeout: config.handshake_timeout,
        intake: Intake::new(stop.clone(), max_connections, "--max-connections cap"),
        counters: Arc::new(Counters::default()),
        logins: logins.clone(),
        handshakes: Handshakes::new(config.max_handshakes_per_source.max(1), max_handshakes),
        idle_timeout: config.idle_timeout,
        tls,
    });
    let spawn_err = |e| Error::Io("cannot start a server thread".into(), e);
    let mut threads = vec![limiter.spawn_refill().map_err(spawn_err)?];
    let db_stop = Stop::new();
    threads.push(
        watcher::spawn(
            store,
            directory.clone(),
            &db_stop,
            Arc::new(move |src| logins.unban(src)),
        )
        .map_err(spawn_err)?,
    );
    // A fleet shares its failed-login counts through the store's Redis.
    if let Some(spec) = config.db.redis() {
        threads.push(
            fleet_logins::spawn(shared.logins.clone(), spec.clone(), &db_stop)
                .map_err(spawn_err)?,
        );
    }
    // A Redis store makes a fleet: each user's one bandwidth is leased from the same Redis
    // (a config may set its own lease period or server id).
    let fleet = config
        .fleet
        .clone()
        .or_else(|| config.db.redis().map(|spec| FleetConfig::new(spec.clone())));
    let fleet_stats = match &fleet {
        Some(f) => {
            let stats = Arc::new(LeaseStats::default());
            let mut f = f.clone();
            if f.server_id.is_empty() {
                f.server_id = default_server_id(local_addr);
            }
            info!(
                "fleet: bandwidth leased from {} every {} ms as server {}",
                f.redis,
                f.lease_period.as_millis(),
                f.server_id
            );
            let dir = directory.clone();
            let lookup: lease::Lookup = Arc::new(move |name: &str| dir.account(name));
            let dir = directory.clone();
            let capped: lease::Capped = Arc::new(move || {
                let mut v = dir.accounts();
                v.retain(|a| a.max_connections() > 0);
                v
            });
            threads.push(
                lease::spawn(f, limiter.clone(), lookup, capped, stats.clone(), &db_stop)
                    .map_err(spawn_err)?,
            );
            Some(stats)
        }
        None => None,
    };
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics {
        let src = Arc::new(Sources {
            directory: directory.clone(),
            limiter: limiter.clone(),
            counters: shared.counters.clone(),
            fleet: fleet_stats.clone(),
        });
        let (bound, h) = metrics::serve(addr, src, stop.clone())
            .map_err(|e| Error::Io(format!("cannot serve metrics on {addr}"), e))?;
        metrics_addr = Some(bound);
        threads.push(h);
    }
    let sh = shared.clone();
    let accept = thread::Builder::new()
        .name("accept".into())
        .stack_size(CONN_STACK)
        .spawn(move || accept_loop(&listener, &sh))
        .map_err(spawn_err)?;
    threads.push(accept);
    info!(
        "sluice server listening on {local_addr} (users: {}, db {}, tick {} ms{})",
        directory.len(),
        store_location,
        limiter.tick().as_millis(),
        if config.allow_private {
            ", private destinations allowed".to_string()
        } else {
            format!(
                ", this host's {} interface addresses refused",
                shared.policy.own_addrs.len()
            )
        }
    );
    if config.tls.is_some() {
        info!("the port speaks TLS only (SOCKS5 and HTTP inside the TLS session)");
    }
    info!(
        "at most {} connections at once (from the open-files limit and vm.max_map_count {}; --max-connections sets it); idle relays closed after {} s",
        shared.intake.max_connections(),
        os::max_map_count().map_or("unknown".to_string(), |m| m.to_string()),
        config.idle_timeout.as_secs()
    );
    info!(
        "at most {max_handshakes} connections in their handshake at once, {} from one source",
        config.max_handshakes_per_source.max(1)
    );
    info!(
        "relay pipes may hold {} descriptors (what the open-files limit leaves after the cap; past it a direction copies through a buffer); a direction quiet for {} ms gives its pipe or buffer back",
        os::PIPES.limit(),
        relay::release_after().as_millis()
    );
    Ok(ServerHandle {
        local_addr,
        metrics_addr,
        shared,
        db_stop,
        asked: Arc::new(Stop::new()),
        threads,
        fleet: fleet_stats,
    })
}

/// A server's default name in a fleet: host name, process id and port, unique on one host and
/// across hosts with distinct names.
fn default_server_id(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}-{}-{}", std::process::id(), addr.port())
}

/// Warns when group or others can read the database or its `-wal`/`-shm` files (they hold the
/// password hashes), naming the `chmod` that fixes it.
fn warn_if_readable(loose: &[(PathBuf, u32)]) {
    if loose.is_empty() {
        return;
    }
    let modes: Vec<String> = loose
        .iter()
        .map(|(p, m)| format!("{} ({m:04o})", p.display()))
        .collect();
    let paths: Vec<String> = loose.iter().map(|(p, _)| shell_word(p)).collect();
    warn!(
        "group or others can read {}: anyone on this machine can copy the password hashes; fix with `chmod 600 {}`",
        modes.join(", "),
        paths.join(" ")
    );
}

/// A path as one shell word: as it is when that is safe, else in single quotes.
fn shell_word(p: &std::path::Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_chmod_hint_quotes_paths_the_shell_would_split() {
        assert_eq!(
            shell_word(Path::new("/var/lib/sluice.db")),
            "/var/lib/sluice.db"
        );
        assert_eq!(shell_word(Path::new("my db")), "'my db'");
        assert_eq!(shell_word(Path::new("it's")), r"'it'\''s'");
    }
}
