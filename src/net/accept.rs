//! Accepting connections, for both proxies: the accept loop (one thread per connection, with a
//! stack sized for a handshake: the thread that accepted it, from the loop's pool of threads that
//! take turns at `accept` and park in between, spawned only when none is parked), the global
//! connection cap checked before a connection is served, the count of live connections kept by a
//! guard, and waking a blocked `accept` to stop.
//!
//! What a connection does once accepted is the proxy's [`Service::serve`]; parking is `pool.rs`.

use crate::net::os;
use crate::net::pool::{MAX_PARKED, PARK_TIME, Pool, set_thread_name};
use log::warn;
use parking_lot::{Condvar, Mutex};
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

/// Threads kept blocked in `accept` at most, waiting for the next connection (at least one is,
/// while the loop runs). A connection is served on the thread that accepted it, so a set-up
/// crosses no thread hand-over; a thread that finishes a connection goes back to accepting while
/// fewer than this many wait, and parks otherwise.
pub const SPARE_ACCEPTORS: usize = 4;

/// Accepts until the service stops, serving each connection on the thread that accepted it
/// ("leader/follower": one thread wakes per connection, where an accept thread handing the
/// connection to another woke two, and the second's wake-up lay on every set-up's path: issue 20,
/// scenario 4). Up to [`SPARE_ACCEPTORS`] threads of the loop's pool block in `accept` at once;
/// the one that takes the last waiting place hands accepting on to a parked thread (or a new one)
/// before it serves.
///
/// Past the connection cap a connection is closed at once, and said so at most once a second; a
/// failed accept (EMFILE) is logged at most once a second and followed by a short sleep, not a
/// spin. Returns once the service stops and every accepting thread has left `accept` (the
/// stopper wakes one with [`wake`]; each wakes the next); the loop's parked threads then exit,
/// busy ones when their connection ends.
pub fn accept_loop<S: Service>(listener: &TcpListener, svc: &Arc<S>) {
    let pool = Pool::new("conn", CONN_STACK, PARK_TIME, MAX_PARKED);
    let listener = match listener.try_clone() {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot share the listening socket between threads: {e}; not accepting");
            return;
        }
    };
    if let Err(e) = os::tune_listener(&listener) {
        warn!("cannot set TCP_NODELAY and keepalive on the listening socket: {e}");
    }
    let addr = listener.local_addr().ok();
    let loop_ = Arc::new(Acceptors {
        listener,
        addr,
        svc: svc.clone(),
        pool: pool.clone(),
        waiting: Mutex::new(1),
        gone: Condvar::new(),
        log: Mutex::new(LoopLog::default()),
    });
    if loop_.start_accepting().is_err() {
        // No thread to spare: this one accepts (and serves) until the stop.
        loop_.clone().accept();
    }
    let mut waiting = loop_.waiting.lock();
    while *waiting > 0 {
        loop_.gone.wait(&mut waiting);
    }
    drop(waiting);
    // The last accepting thread may still hold the loop (and so the socket) for a moment:
    // stop listening now, so a connection from here on is refused rather than left queued.
    stop_listening(&loop_.listener);
    pool.close();
}

/// Takes a listening socket out of the listening state (new connections are refused) while its
/// descriptor stays open for whoever still holds it.
fn stop_listening(l: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a descriptor this listener owns; it frees nothing.
    if unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RD) } != 0 {
        warn!("cannot stop listening: {}", std::io::Error::last_os_error());
    }
}

/// What the accepting threads of one loop share.
struct Acceptors<S: Service> {
    listener: TcpListener,
    /// Where the listener is reached, for waking the next accepting thread at a stop.
    addr: Option<SocketAddr>,
    svc: Arc<S>,
    pool: Arc<Pool>,
    /// Threads in (or on their way to) `accept`; signalled on `gone` when it drops to 0 at a stop.
    waiting: Mutex<usize>,
    gone: Condvar,
    log: Mutex<LoopLog>,
}

/// What the loop says about a flood: at most a line a second each.
#[derive(Default)]
struct LoopLog {
    /// Failed accepts (out of descriptors).
    failed: Flood,
    /// Connections closed at the cap.
    full: Flood,
    /// Connections dropped because no thread could take over accepting.
    unspawned: Flood,
}

/// One kind of event said at most once a second, with how many were not said.
#[derive(Default)]
struct Flood {
    last: Option<Instant>,
    unsaid: u64,
}

impl Flood {
    /// Counts an event; `Some(others)` when it is to be said now, with the events since the last
    /// line that were not.
    fn note(&mut self) -> Option<u64> {
        self.note_at(Instant::now())
    }

    fn note_at(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            self.unsaid += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

impl<S: Service> Acceptors<S> {
    /// One thread's turn at accepting (counted in `waiting` by whoever started it): accepts, and
    /// serves what it accepts, until the stop or until it finishes a connection while enough
    /// others wait. While it serves, the thread holds only a weak reference to the loop, so a
    /// long connection does not keep the listening socket open past the loop's end.
    fn accept(self: Arc<Self>) {
        let mut me = self;
        loop {
            let Some((stream, peer)) = me.next_connection() else {
                return;
            };
            let (svc, weak) = (me.svc.clone(), Arc::downgrade(&me));
            drop(me);
            serve(stream, peer, &svc);
            match weak.upgrade() {
                Some(m) if m.rejoin() => me = m,
                _ => return,
            }
            set_thread_name("accept");
        }
    }

    /// Accepts until a connection is to be served on this thread (another having taken its
    /// place at `accept`, see [`Acceptors::hand_on`]); `None` at the stop, having left.
    fn next_connection(self: &Arc<Self>) -> Option<(TcpStream, SocketAddr)> {
        let intake = self.svc.intake();
        loop {
            let accepted = self.listener.accept();
            if intake.stopping() {
                self.leave();
                return None;
            }
            match accepted {
                Ok((stream, peer)) if intake.active() >= intake.max_connections => {
                    drop(stream);
                    let said = self.log.lock().full.note();
                    if let Some(more) = said {
                        warn!(
                            "{peer} and {more} more closed: {} connections open, the {}",
                            intake.max_connections, intake.cap_name
                        );
                    }
                }
                Ok((stream, peer)) => {
                    let Err(e) = self.hand_on() else {
                        return Some((stream, peer));
                    };
                    // No other thread could take over accepting: this one keeps at it.
                    drop(stream);
                    let said = self.log.lock().unspawned.note();
                    if let Some(more) = said {
                        warn!(
                            "{peer} and {more} more dropped: cannot start a thread to accept \
                             while one is served ({e})"
                        );
                    }
                }
                Err(e) => {
                    let said = self.log.lock().failed.note();
                    if let Some(more) = said {
                        warn!("accept failed: {e}; backing off ({more} more failures unsaid)");
                    }
                    thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Leaves the accepting threads to serve a connection; when it was the last one waiting,
    /// first starts another. Fails when none could be started (this thread then stays).
    fn hand_on(self: &Arc<Self>) -> std::io::Result<()> {
        let mut waiting = self.waiting.lock();
        if *waiting > 1 {
            *waiting -= 1;
            return Ok(());
        }
        drop(waiting);
        self.start_accepting()
    }

    /// Starts a thread of the pool (a parked one, or a new one) on [`Acceptors::accept`].
    fn start_accepting(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        self.pool
            .run("accept".into(), Box::new(move || me.accept()))
    }

    /// After a connection: back to accepting while fewer than [`SPARE_ACCEPTORS`] wait (true),
    /// else to the pool. Checked under the count's lock, after the stop flag, so a thread never
    /// rejoins a loop whose last accepting thread has already left.
    fn rejoin(&self) -> bool {
        let mut waiting = self.waiting.lock();
        if self.svc.intake().stopping() || *waiting >= SPARE_ACCEPTORS {
            return false;
        }
        *waiting += 1;
        true
    }

    /// Leaves `accept` at a stop: wakes the next accepting thread, or says the last is gone.
    fn leave(&self) {
        let mut waiting = self.waiting.lock();
        *waiting -= 1;
        if *waiting == 0 {
            self.gone.notify_all();
        } else if let Some(addr) = self.addr {
            drop(waiting);
            wake(addr);
        }
    }
}

/// Serves a connection on this thread, counted live until it ends. The socket came with
/// TCP_NODELAY and keepalive from the listener ([`os::tune_listener`]).
fn serve<S: Service>(stream: TcpStream, peer: SocketAddr, svc: &Arc<S>) {
    let intake = svc.intake();
    let id = intake.next_id.fetch_add(1, Ordering::Relaxed);
    intake.active.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard(svc.clone());
    set_thread_name(&format!("conn#{id}"));
    guard.0.serve(stream, peer, id);
}

/// Decrements the live-connection count when a connection's job ends, however it ends.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_said_once_a_second_with_the_count_left_unsaid() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut f = Flood::default();
        assert_eq!(f.note_at(at(0)), Some(0));
        assert_eq!(f.note_at(at(500)), None);
        assert_eq!(f.note_at(at(999)), None);
        assert_eq!(f.note_at(at(1000)), Some(2));
        assert_eq!(f.note_at(at(1500)), None);
        assert_eq!(f.note_at(at(3000)), Some(1));
        assert_eq!(f.note_at(at(4000)), Some(0));
    }
}
