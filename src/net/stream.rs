//! One side of a relayed connection: a plain TCP socket, or a TLS session over one.
//!
//! The card's shape is a thread per direction, but a TLS session is one state machine for both.
//! [`TlsStream`] shares it between the two relay threads without ever holding its lock across a
//! blocking read: the reading thread reads raw bytes from the socket *outside* the lock and only
//! feeds them to the session under it; the writing thread encrypts under the lock and writes the
//! records outside it. Records must reach the socket in the order they were sealed (TLS sequence
//! numbers), so a writer takes the `write_order` lock *before* releasing the session lock and
//! holds it while it writes: sealing order and socket order are then the same. No thread ever
//! waits for the session while holding `write_order`, so the two locks cannot deadlock.

use crate::flow::account::Shut;
use parking_lot::Mutex;
use rustls::Connection;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Raw bytes read from a TLS socket at a time: one maximal record with its overhead.
const TLS_READ_CHUNK: usize = 16 * 1024 + 2048;

/// A plain socket or a TLS session; cloning shares the same connection.
#[derive(Clone)]
pub enum Stream {
    /// Clear text.
    Plain(Arc<TcpStream>),
    /// A TLS session (client or server side) over a socket.
    Tls(Arc<TlsStream>),
}

impl Stream {
    /// A clear-text stream.
    pub fn plain(s: TcpStream) -> Stream {
        Stream::Plain(Arc::new(s))
    }

    /// The underlying socket (for timeouts, keepalive, addresses and shutting it from outside).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// Blocks until there is something to read (true) or the peer closed (false).
    ///
    /// # Errors
    /// Socket errors, including the timeouts the socket was armed with; TLS errors as
    /// `InvalidData`.
    pub fn wait_readable(&self) -> io::Result<bool> {
        match self {
            Stream::Plain(s) => {
                let mut one = [0u8; 1];
                Ok(s.peek(&mut one)? > 0)
            }
            Stream::Tls(t) => t.wait_readable(),
        }
    }

    /// Reads what is there (blocking if nothing is); 0 means the peer closed.
    ///
    /// # Errors
    /// As [`Stream::wait_readable`].
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => (&**s).read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }

    /// Writes all of `buf` (blocking).
    ///
    /// # Errors
    /// Socket errors and timeouts.
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        self.write_all_patient(buf, &|| false)
    }

    /// Writes all of `buf`; when the socket's write timeout fires, asks `keep_waiting` whether to
    /// go on (the relay does while the other direction is active). Progress is never lost: unlike
    /// `Write::write_all`, a timeout in the middle does not forget what was already written.
    ///
    /// # Errors
    /// Socket errors, and a timeout once `keep_waiting` says no.
    pub fn write_all_patient(&self, buf: &[u8], keep_waiting: &dyn Fn() -> bool) -> io::Result<()> {
        match self {
            Stream::Plain(s) => write_fully(s, buf, keep_waiting),
            Stream::Tls(t) => t.write_all(buf, keep_waiting),
        }
    }

    /// Half-close: no more bytes this way (a FIN; for TLS a close_notify first).
    pub fn shutdown_write(&self) {
        if let Stream::Tls(t) = self {
            t.close_notify();
        }
        let _ = self.socket().shutdown(Shutdown::Write);
    }

    /// Closes both ways at once, which also wakes a thread blocked reading it.
    pub fn shutdown_both(&self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }
}

/// A relayed connection's two sides, attached to its account as one value (one allocation).
impl Shut for [Stream; 2] {
    fn shut(&self) {
        for s in self {
            s.shutdown_both();
        }
    }
}

/// True for the errors a socket timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes all of `buf` to a socket, going on after a timeout while `keep_waiting` says so.
fn write_fully(
    mut sock: &TcpStream,
    mut buf: &[u8],
    keep_waiting: &dyn Fn() -> bool,
) -> io::Result<()> {
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) && keep_waiting() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TLS session shared by the two relay threads of a connection (see the module docs).
pub struct TlsStream {
    sock: TcpStream,
    session: Mutex<Session>,
    write_order: Mutex<()>,
}

/// The session and the raw bytes read from the socket that it could not take yet: rustls holds
/// at most 16 KiB of decrypted plaintext, so feeding stops while plaintext waits to be read.
struct Session {
    conn: Connection,
    backlog: Vec<u8>,
}

impl Session {
    /// Feeds backlog bytes to the session while it wants them; returns whether any went in.
    fn feed(&mut self) -> io::Result<bool> {
        let mut fed = false;
        while !self.backlog.is_empty() && self.conn.wants_read() {
            let mut input = &self.backlog[..];
            let n = self.conn.read_tls(&mut input)?;
            if n == 0 {
                break;
            }
            self.backlog.drain(..n);
            fed = true;
            self.conn.process_new_packets().map_err(tls_err)?;
        }
        Ok(fed)
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the TLS handshake on `sock` until done or `deadline`. Blocking.
    ///
    /// # Errors
    /// A socket error, the deadline (`TimedOut`), or the peer's TLS failing (`InvalidData`).
    pub fn handshake(
        sock: TcpStream,
        mut conn: Connection,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        while conn.is_handshaking() {
            arm(&sock, deadline)?;
            let mut s = &sock;
            let (rd, wr) = conn.complete_io(&mut s)?;
            if rd == 0 && wr == 0 && conn.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(TlsStream {
            sock,
            session: Mutex::new(Session {
                conn,
                backlog: Vec::new(),
            }),
            write_order: Mutex::new(()),
        })
    }

    /// Feeds the session: from the backlog if it has bytes the session now takes, else by reading
    /// raw bytes from the socket (outside the lock). False at socket EOF.
    fn pull(&self) -> io::Result<bool> {
        {
            let mut sess = self.session.lock();
            if !sess.backlog.is_empty() && sess.feed()? {
                self.flush_locked(sess, &|| false)?;
                return Ok(true);
            }
        }
        // On the heap: relay threads have small stacks (see relay.rs) and hold no buffers there.
        let mut raw = vec![0u8; TLS_READ_CHUNK];
        let n = (&self.sock).read(&mut raw)?;
        if n == 0 {
            return Ok(false);
        }
        let mut sess = self.session.lock();
        sess.backlog.extend_from_slice(&raw[..n]);
        sess.feed()?;
        // Reading can owe the peer records (key updates, alerts): send them in order.
        self.flush_locked(sess, &|| false)?;
        Ok(true)
    }

    fn wait_readable(&self) -> io::Result<bool> {
        loop {
            {
                let mut sess = self.session.lock();
                let st = sess.conn.process_new_packets().map_err(tls_err)?;
                if st.plaintext_bytes_to_read() > 0 {
                    return Ok(true);
                }
                if st.peer_has_closed() {
                    return Ok(false);
                }
            }
            if !self.pull()? {
                return Ok(false);
            }
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.session.lock().conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: treat as EOF, as browsers do.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if !self.pull()? {
                return Ok(0);
            }
        }
    }

    fn write_all(&self, mut buf: &[u8], keep_waiting: &dyn Fn() -> bool) -> io::Result<()> {
        while !buf.is_empty() {
            let mut sess = self.session.lock();
            let n = sess.conn.writer().write(buf)?;
            buf = &buf[n..];
            self.flush_locked(sess, keep_waiting)?;
        }
        Ok(())
    }

    /// Seals what the session has to send, then writes it outside the session lock but under
    /// `write_order`, taken before the session lock is released (see the module docs).
    fn flush_locked(
        &self,
        mut sess: parking_lot::MutexGuard<'_, Session>,
        keep_waiting: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        if !sess.conn.wants_write() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(TLS_READ_CHUNK);
        while sess.conn.wants_write() {
            sess.conn.write_tls(&mut out)?;
        }
        let order = self.write_order.lock();
        drop(sess);
        let r = write_fully(&self.sock, &out, keep_waiting);
        drop(order);
        r
    }

    fn close_notify(&self) {
        let mut sess = self.session.lock();
        sess.conn.send_close_notify();
        let _ = self.flush_locked(sess, &|| false);
    }
}

/// Sets the socket's read and write timeouts to what is left before `deadline`.
///
/// # Errors
/// `TimedOut` once the deadline has passed.
pub fn arm(sock: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

/// A pipe for zero-copy relaying between two plain sockets with `splice(2)`: bytes move
/// socket → pipe → socket inside the kernel, never through a user-space buffer.
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    /// Bytes in the pipe not yet written out.
    pending: usize,
    capacity: usize,
    /// One of the [`MAX_LARGE_PIPES`] large pipes (given back on drop).
    large: bool,
}

/// Pipe size asked for once the large pipes are all taken (the kernel default is 64 KiB).
pub const PIPE_SIZE: usize = 1 << 18;
/// Pipe size asked for while fewer than [`MAX_LARGE_PIPES`] are that large: each splice moves more,
/// so a busy tunnel costs less CPU per byte (issue 20, one download: 0.32 CPU-s per GB with 1 MiB
/// pipes against 0.36–0.48 with 256 KiB).
pub const LARGE_PIPE_SIZE: usize = 1 << 20;
/// Large pipes at once: 32 MiB of pipe buffer, half of what `fs.pipe-user-pages-soft` (16,384
/// pages by default) lets a non-root user hold in all pipes, so the other pipes still get
/// [`PIPE_SIZE`] rather than the two pages the kernel gives past that limit.
pub const MAX_LARGE_PIPES: usize = 32;

static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);

/// Takes one of the large pipes if any is left.
fn take_large() -> bool {
    LARGE_PIPES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_LARGE_PIPES).then_some(n + 1)
        })
        .is_ok()
}

fn give_back_large() {
    LARGE_PIPES.fetch_sub(1, Ordering::AcqRel);
}

/// Asks the kernel to make the pipe `size` bytes; what it holds now (0 if it cannot say).
fn set_pipe_size(fd: libc::c_int, size: usize) -> usize {
    // SAFETY: fcntl on a descriptor the caller owns.
    let got = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) };
    if got > 0 {
        return got as usize;
    }
    // SAFETY: as above.
    let now = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    usize::try_from(now).unwrap_or(0)
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.large {
            give_back_large();
        }
    }
}

impl Pipe {
    /// A new pipe, as large as the kernel allows up to [`PIPE_SIZE`] (see [`Pipe::capacity`]).
    ///
    /// # Errors
    /// No descriptors left (the caller falls back to copying through a buffer).
    pub fn new() -> io::Result<Pipe> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer system calls per byte. If refused (a non-root user past
        // `fs.pipe-user-pages-soft` gets EPERM, and its new pipes only two pages), the size the
        // kernel gave serves, and the caller may prefer a buffer to a tiny pipe.
        let mut large = take_large();
        let mut got = 0;
        if large {
            got = set_pipe_size(fds[1], LARGE_PIPE_SIZE);
            if got < LARGE_PIPE_SIZE {
                give_back_large();
                large = false;
            }
        }
        if !large {
            got = set_pipe_size(fds[1], PIPE_SIZE);
        }
        Ok(Pipe {
            read,
            write,
            pending: 0,
            capacity: if got > 0 { got } else { 4096 },
            large,
        })
    }

    /// How many bytes one [`Pipe::fill`] can take at most.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `max` bytes from `src` into the pipe, blocking until some arrive (or the
    /// socket's read timeout passes). 0 means EOF.
    ///
    /// # Errors
    /// Socket errors; a timeout as `WouldBlock`.
    pub fn fill(&mut self, src: &TcpStream, max: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let want = max.min(self.capacity - self.pending);
        loop {
            // SAFETY: splice between two descriptors we hold; null offsets for non-seekable ends.
            let r = unsafe {
                libc::splice(
                    src.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    libc::SPLICE_F_MOVE,
                )
            };
            match cvt(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => {
                    self.pending += n;
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes everything in the pipe to `dst` (blocking).
    ///
    /// # Errors
    /// Socket errors; a write timeout as `WouldBlock` (what is left stays pending).
    pub fn drain(&mut self, dst: &TcpStream, keep_waiting: &dyn Fn() -> bool) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        while self.pending > 0 {
            // SAFETY: as in `fill`.
            let r = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.pending,
                    libc::SPLICE_F_MOVE,
                )
            };
            match cvt(r) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) && keep_waiting() => continue,
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.pending -= n,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// For tests: a loopback connection, the accepted end as a plain `Stream` and the connecting
/// end as a socket.
#[cfg(test)]
pub(crate) fn loopback_pair() -> (Stream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (Stream::plain(l.accept().unwrap().0), c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_than_the_large_pipes_are_large_and_the_rest_get_the_usual_size() {
        let pipes: Vec<Pipe> = (0..MAX_LARGE_PIPES + 4)
            .map(|_| Pipe::new().unwrap())
            .collect();
        let large = pipes.iter().filter(|p| p.large).count();
        assert!(large <= MAX_LARGE_PIPES, "{large} large pipes");
        for p in &pipes {
            if p.large {
                assert_eq!(p.capacity(), LARGE_PIPE_SIZE);
            } else {
                assert!(p.capacity() <= PIPE_SIZE, "{}", p.capacity());
            }
        }
        drop(pipes);
        // Other tests' pipes may hold large slots meanwhile, but never more than the cap.
        assert!(LARGE_PIPES.load(Ordering::Acquire) <= MAX_LARGE_PIPES);
    }
}
