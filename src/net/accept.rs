//! Accepting connections, for both proxies: the accept loop (one thread per connection, with a
//! stack sized for a handshake, taken from the loop's pool of parked threads and spawned only
//! when none is parked), the global connection cap checked before a thread is taken, the count of
//! live connections kept by a guard, and waking a blocked `accept` to stop.
//!
//! What a connection does once accepted is the proxy's [`Service::serve`]; parking is `pool.rs`.

use crate::net::os;
use crate::net::pool::{MAX_PARKED, PARK_TIME, Pool};
use log::warn;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Stack size of a connection thread: it runs the handshake, argon2 (heap-allocated) and
/// getaddrinfo, which needs more stack than a plain relay.
pub const CONN_STACK: usize = 256 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accept loop's state, the same for both proxies: the stop flag, connection threads alive
/// now, the next connection number, and the cap past which new connections are closed at once.
pub struct Intake {
    stop: Arc<AtomicBool>,
    active: AtomicUsize,
    next_id: AtomicU64,
    max_connections: usize,
    cap_name: &'static str,
}

impl Intake {
    /// State for a loop that stops when `stop` is set and holds at most `max_connections`;
    /// `cap_name` names the cap in the log (the flag that sets it, where there is one).
    pub fn new(stop: Arc<AtomicBool>, max_connections: usize, cap_name: &'static str) -> Intake {
        Intake {
            stop,
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            max_connections,
            cap_name,
        }
    }

    /// True once the owner asked the loop to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Asks the loop to stop (it notices at its next accept; see [`wake`]).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The stop flag, for a handle that stops the loop from another thread.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Connections being served now (each on its own thread).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The connection cap.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
}

/// What an accept loop serves: the server, or the local proxy.
pub trait Service: Send + Sync + 'static {
    /// The loop's state.
    fn intake(&self) -> &Intake;
    /// Serves one connection to its end, on its own thread.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, id: u64);
}

/// Accepts until the service stops. Past the connection cap a connection is closed at once,
/// without a thread, and said so at most once a second; a failed accept (EMFILE) is logged at most
/// once a second and followed by a short sleep, not a spin. On return the loop's parked threads
/// exit (busy ones when their connection ends).
pub fn accept_loop<S: Service>(listener: &TcpListener, svc: &Arc<S>) {
    if let Err(e) = os::tune_listener(listener) {
        warn!("cannot set TCP_NODELAY and keepalive on the listening socket: {e}");
    }
    let pool = Pool::new("conn", CONN_STACK, PARK_TIME, MAX_PARKED);
    accept_into(listener, svc, &pool);
    pool.close();
}

fn accept_into<S: Service>(listener: &TcpListener, svc: &Arc<S>, pool: &Arc<Pool>) {
    let mut last_warn: Option<Instant> = None;
    let mut last_full: Option<Instant> = None;
    let mut shed = 0u64;
    let once_a_second =
        |t: &Option<Instant>| t.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
    let intake = svc.intake();
    loop {
        let accepted = listener.accept();
        if intake.stopping() {
            return;
        }
        match accepted {
            Ok((stream, peer)) if intake.active() >= intake.max_connections => {
                drop(stream);
                shed += 1;
                if once_a_second(&last_full) {
                    warn!(
                        "{peer} and {} more closed: {} connections open, the {}",
                        shed - 1,
                        intake.max_connections,
                        intake.cap_name
                    );
                    last_full = Some(Instant::now());
                    shed = 0;
                }
            }
            Ok((stream, peer)) => start_connection(stream, peer, svc, pool),
            Err(e) => {
                if once_a_second(&last_warn) {
                    warn!("accept failed: {e}; backing off");
                    last_warn = Some(Instant::now());
                }
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Hands a connection to a parked thread, or a new one. Counted live from here until its job
/// ends (or is dropped unrun).
fn start_connection<S: Service>(
    stream: TcpStream,
    peer: SocketAddr,
    svc: &Arc<S>,
    pool: &Arc<Pool>,
) {
    let intake = svc.intake();
    let id = intake.next_id.fetch_add(1, Ordering::Relaxed);
    intake.active.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard(svc.clone());
    // The socket came with TCP_NODELAY and keepalive from the listener (`os::tune_listener`).
    let job = Box::new(move || {
        guard.0.serve(stream, peer, id);
        drop(guard);
    });
    if let Err(e) = pool.run(format!("conn#{id}"), job) {
        warn!("conn#{id} {peer} dropped: cannot spawn a thread: {e}");
    }
}

/// Decrements the live-connection count when a connection's job ends, however it ends (or when
/// it is dropped without running, when no thread could be spawned).
struct ActiveGuard<S: Service>(Arc<S>);

impl<S: Service> Drop for ActiveGuard<S> {
    fn drop(&mut self) {
        self.0.intake().active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Wakes a thread blocked in accept() on `addr` by connecting to it (an unspecified address is
/// reached on loopback).
pub fn wake(mut addr: SocketAddr) {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}
