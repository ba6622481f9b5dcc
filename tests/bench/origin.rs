//! The loopback origin the proxies dial: endpoints that send, sink, do both, echo, or just hold
//! connections, each on its own port with its own byte counter.
//!
//! One port per endpoint (rather than a protocol line) means no byte the limiter counts is spent
//! on telling the origin what to do, and bytes received can be attributed to one user's cell of a
//! scenario. Source and sink run a thread per connection with a 256 KiB buffer, which keeps the
//! origin well above any proxy (checked by the direct path in every run). Opening the tunnels is
//! `client.rs`; scenarios choose the endpoints.

use crate::client::Meter;
use crate::procs::bind_low;
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Bytes per read or write on the origin side.
pub const ORIGIN_BUF: usize = 256 * 1024;
/// What a source sends: content does not matter, only its size.
static PAYLOAD: [u8; ORIGIN_BUF] = [0x5a; ORIGIN_BUF];
/// Every origin socket gives up a blocked read or write after this long, so no thread can hang.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Echo connections are short: a proxy that keeps one open this long is not coming back.
const ECHO_TIMEOUT: Duration = Duration::from_secs(2);
/// Stack of an origin thread: its buffer is on the heap.
const STACK: usize = 128 * 1024;
/// Threads accepting and serving echo connections; more than the set-up scenario's 8 clients so
/// a proxy that closes its side late does not make the origin the bottleneck.
const ECHO_WORKERS: usize = 32;

/// What an endpoint does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Writes as fast as the peer takes it; counts bytes sent.
    Source,
    /// Reads and discards; counts bytes received.
    Sink,
    /// Source and sink at once (two threads); counts bytes received.
    Duplex,
    /// Writes back what one read brings, then closes (a small thread pool, for short
    /// connections). Closing first puts the TIME_WAIT of the set-up scenario's tens of thousands
    /// of connections on the origin's and proxy's listening ports, where it hinders nobody,
    /// rather than on the ephemeral ports every other program on the machine draws from.
    Echo,
    /// Accepts and keeps the socket without a thread, for the idle-tunnel scenario.
    Hold,
}

/// A listening endpoint; dropping it stops its threads and closes held sockets.
pub struct Endpoint {
    addr: SocketAddr,
    /// Bytes sent (source) or received (sink, duplex, echo) over all its connections.
    pub meter: Arc<Meter>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Endpoint {
    /// Starts an endpoint of `kind` on a fresh loopback port.
    ///
    /// # Errors
    /// Binding or spawning its accept thread failed.
    pub fn start(kind: Kind) -> Result<Endpoint, String> {
        let listener = bind_low()?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("origin address: {e}"))?;
        let mut ep = Endpoint {
            addr,
            meter: Meter::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            held: Arc::new(Mutex::new(Vec::new())),
            acceptors: Vec::new(),
        };
        let workers = if kind == Kind::Echo { ECHO_WORKERS } else { 1 };
        for i in 0..workers {
            let l = listener
                .try_clone()
                .map_err(|e| format!("origin listener: {e}"))?;
            let (meter, stop, held) = (ep.meter.clone(), ep.stop.clone(), ep.held.clone());
            let h = thread::Builder::new()
                .name(format!("origin {kind:?} {i}"))
                .stack_size(STACK)
                .spawn(move || accept_loop(&l, kind, &meter, &stop, &held))
                .map_err(|e| format!("origin thread: {e}"))?;
            ep.acceptors.push(h);
        }
        Ok(ep)
    }

    /// Where proxies (or the direct path) connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections held by a `Hold` endpoint.
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Each acceptor is blocked in accept(): one connection per acceptor wakes it.
        for _ in &self.acceptors {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        for h in self.acceptors.drain(..) {
            let _ = h.join();
        }
        self.held.lock().clear();
    }
}

fn accept_loop(
    l: &TcpListener,
    kind: Kind,
    meter: &Arc<Meter>,
    stop: &Arc<AtomicBool>,
    held: &Mutex<Vec<TcpStream>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors or similar: back off rather than spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = s.set_nodelay(true);
        match kind {
            Kind::Hold => held.lock().push(s),
            Kind::Echo => echo(&s, meter),
            _ => {
                let (m, st) = (meter.clone(), stop.clone());
                // A failed spawn drops the connection; the client sees it close.
                let _ = thread::Builder::new()
                    .name(format!("origin {kind:?}"))
                    .stack_size(STACK)
                    .spawn(move || serve(s, kind, &m, &st));
            }
        }
    }
}

fn serve(s: TcpStream, kind: Kind, meter: &Arc<Meter>, stop: &Arc<AtomicBool>) {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    match kind {
        Kind::Source => send(&s, Some(meter), stop),
        Kind::Sink => sink(&s, meter, stop),
        Kind::Duplex => {
            if let Ok(w) = s.try_clone() {
                let st = stop.clone();
                let _ = thread::Builder::new()
                    .name("origin duplex send".into())
                    .stack_size(STACK)
                    .spawn(move || send(&w, None, &st));
            }
            sink(&s, meter, stop);
        }
        Kind::Echo | Kind::Hold => {}
    }
}

/// Writes the payload until the peer goes away or the origin stops.
fn send(mut s: &TcpStream, meter: Option<&Arc<Meter>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match s.write(&PAYLOAD) {
            Ok(0) => return,
            Ok(n) => {
                if let Some(m) = meter {
                    m.add(n);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads and discards until EOF, counting.
fn sink(mut s: &TcpStream, meter: &Meter, stop: &AtomicBool) {
    let mut buf = vec![0u8; ORIGIN_BUF];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => meter.add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Echoes one read of one connection, on the acceptor's own thread, then closes it.
fn echo(s: &TcpStream, meter: &Meter) {
    let _ = s.set_read_timeout(Some(ECHO_TIMEOUT));
    let _ = s.set_write_timeout(Some(ECHO_TIMEOUT));
    let mut buf = [0u8; 512];
    let (mut r, mut w) = (s, s);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                meter.add(n);
                let _ = w.write_all(&buf[..n]);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
