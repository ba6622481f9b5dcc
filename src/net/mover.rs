//! How one direction of a relay moves its bytes, and when it lets go of what it moves them with:
//! a small heap buffer for a direction's first bytes, then, once a read fills it, a pipe for
//! `splice(2)` between two plain sockets (counted in the process's pipe budget, [`os::PIPES`]),
//! else a full-size heap buffer ([`Mover`]); taken on a direction's first byte and given back once
//! it has been quiet for the release period ([`Quiet`]). The copy loop itself, the
//! limiter and the shared activity clock are `relay.rs`'s; the pipe's system calls are
//! `stream.rs`'s.

use crate::net::os;
use crate::net::stream::{Pipe, Stream};
use std::io;
use std::time::Duration;

/// Bytes read per system call; also the most a relay asks the limiter for at once.
pub const RELAY_BUF: usize = 64 * 1024;
/// The buffer an unthrottled direction starts with (a throttled one starts with its full-size
/// mover, see `relay.rs`). Requests, replies and handshakes (an HTTP head, a TLS
/// ClientHello, a one-byte echo) fit, and move with one `read` and one `write`; making, sizing,
/// filling, draining and closing a pipe for them took six more system calls per direction
/// (`make bench`, scenario 4). A read that fills it means bulk: the direction takes a pipe.
pub const FIRST_BUF: usize = 4 * 1024;

/// How long a direction has been quiet, counted in read timeouts: a timed-out read waited its
/// whole timeout, so consecutive timeouts add up without reading the clock on every chunk. While
/// it holds a pipe or buffer a direction reads with the release period as its timeout (when that
/// is shorter than the idle check's), so one timeout is the whole period.
pub(super) struct Quiet {
    /// Time without a byte, as the sum of the timeouts that fired since the last one.
    so_far: Duration,
    release: Duration,
    check: Duration,
    /// The read timeout is `release` (not `check`) while something is held.
    short: bool,
}

impl Quiet {
    /// A direction that reads with `check` as its timeout when it holds nothing and gives back
    /// what it holds after `release` without a byte.
    pub(super) fn new(release: Duration, check: Duration) -> Quiet {
        Quiet {
            so_far: Duration::ZERO,
            release,
            check,
            short: release < check,
        }
    }

    /// A byte moved: the quiet starts over.
    pub(super) fn moved(&mut self) {
        self.so_far = Duration::ZERO;
    }

    /// A pipe or buffer was just taken: read with the release period as the timeout.
    pub(super) fn taken(&mut self, src: &Stream) -> io::Result<()> {
        self.so_far = Duration::ZERO;
        if self.short {
            src.socket().set_read_timeout(Some(self.release))?;
        }
        Ok(())
    }

    /// A read timed out while `mover` is held: once the quiet reaches the release period, gives
    /// it back (and goes back to the idle check's timeout). True when it was given back.
    pub(super) fn lapse(&mut self, src: &Stream, mover: &mut Mover) -> io::Result<bool> {
        self.so_far += if self.short { self.release } else { self.check };
        if self.so_far < self.release || mover.is_none() {
            return Ok(false);
        }
        *mover = Mover::None;
        self.so_far = Duration::ZERO;
        if self.short {
            src.socket().set_read_timeout(Some(self.check))?;
        }
        Ok(true)
    }
}

/// How bytes get from one stream to the other: first through a small heap buffer; once a read
/// fills it, through a pipe with `splice(2)` when both sides are plain sockets (no copy through
/// user space) and the pipe budget allows, else through a full-size heap buffer. Taken when a
/// byte arrives and given back when the direction goes quiet, so a tunnel that is not moving bytes
/// holds none of them.
pub(super) enum Mover {
    None,
    /// A direction's first bytes ([`FIRST_BUF`]), until a read fills it.
    First(Vec<u8>),
    /// A side is TLS: bytes must pass through user space.
    Buffer(Vec<u8>),
    /// Two plain sockets that got no pipe (budget used up, or a pipe too small): tries again
    /// every [`RETRY_PIPE_EVERY`] chunks (the count since the last try).
    Fallback(Vec<u8>, u32),
    Pipe(Pipe, PipeSlot),
}

/// Chunks (of up to 64 KiB) a direction copying for want of a pipe moves between two tries for
/// one: a failed try is an atomic compare, or at worst a pipe made and closed (7 µs) per 4 MiB.
const RETRY_PIPE_EVERY: u32 = 64;

/// One pipe counted in [`os::PIPES`]; uncounted when dropped (with its pipe).
pub(super) struct PipeSlot(());

impl PipeSlot {
    fn take() -> Option<PipeSlot> {
        // `then`, not `then_some`: a slot built and dropped on refusal would give back a pipe.
        os::PIPES.try_take().then(|| PipeSlot(()))
    }
}

impl Drop for PipeSlot {
    fn drop(&mut self) {
        os::PIPES.give_back();
    }
}

impl Mover {
    /// What a direction starts with when its first bytes (or the first after a quiet spell)
    /// arrive.
    pub(super) fn first() -> Mover {
        Mover::First(vec![0; FIRST_BUF])
    }

    /// What a direction from `src` to `dst` moves bulk with: a pipe between two plain sockets if
    /// one can be had, else a buffer.
    pub(super) fn for_streams(src: &Stream, dst: &Stream) -> Mover {
        if let (Stream::Plain(_), Stream::Plain(_)) = (src, dst) {
            return Mover::pipe().unwrap_or_else(|| Mover::Fallback(vec![0; RELAY_BUF], 0));
        }
        Mover::Buffer(vec![0; RELAY_BUF])
    }

    /// A pipe, if the budget has room and the kernel gives one at least as large as a buffer.
    fn pipe() -> Option<Mover> {
        let slot = PipeSlot::take()?;
        // Out of descriptors, or a pipe smaller than the buffer (a non-root user past
        // `fs.pipe-user-pages-soft` gets two pages): copying serves better.
        match Pipe::new() {
            Ok(p) if p.capacity() >= RELAY_BUF => Some(Mover::Pipe(p, slot)),
            _ => None,
        }
    }

    /// After a chunk went through (nothing is held in the buffer or pipe), `filled` when the read
    /// took all it was allowed: a direction whose first buffer was filled has more waiting, and
    /// moves on to a pipe or a full-size buffer; one copying only for want of a pipe takes one
    /// now and then, once the budget has room again.
    pub(super) fn after_chunk(&mut self, filled: bool, src: &Stream, dst: &Stream) {
        if let Mover::First(_) = self {
            if filled {
                *self = Mover::for_streams(src, dst);
            }
        } else if let Mover::Fallback(_, n) = self {
            *n += 1;
            if *n >= RETRY_PIPE_EVERY {
                *n = 0;
                if let Some(m) = Mover::pipe() {
                    *self = m;
                }
            }
        }
    }

    pub(super) fn is_none(&self) -> bool {
        matches!(self, Mover::None)
    }

    /// The most one fill can move (what a relay asks the limiter for).
    pub(super) fn chunk(&self) -> usize {
        match self {
            Mover::Pipe(p, _) => p.capacity(),
            Mover::First(b) => b.len(),
            _ => RELAY_BUF,
        }
    }

    pub(super) fn fill(&mut self, src: &Stream, max: usize) -> io::Result<usize> {
        match self {
            Mover::Pipe(p, _) => p.fill(src.socket(), max),
            Mover::First(b) | Mover::Buffer(b) | Mover::Fallback(b, _) => {
                let max = max.min(b.len());
                src.read(&mut b[..max])
            }
            Mover::None => Ok(0),
        }
    }

    pub(super) fn flush(
        &mut self,
        dst: &Stream,
        n: usize,
        keep_waiting: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        match self {
            Mover::Pipe(p, _) => p.drain(dst.socket(), keep_waiting),
            Mover::First(b) | Mover::Buffer(b) | Mover::Fallback(b, _) => {
                dst.write_all_patient(&b[..n], keep_waiting)
            }
            Mover::None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::stream::loopback_pair;

    #[test]
    fn a_direction_starts_small_and_takes_a_pipe_once_a_read_fills_its_buffer() {
        let (src, _a) = loopback_pair();
        let (dst, _b) = loopback_pair();
        let mut m = Mover::first();
        assert_eq!(m.chunk(), FIRST_BUF);
        // A request or a reply: the direction keeps its small buffer.
        m.after_chunk(false, &src, &dst);
        assert!(matches!(m, Mover::First(_)));
        // A read that filled it: bulk, through a pipe between two plain sockets (or a full-size
        // buffer where the pipe budget or the kernel refuses one).
        m.after_chunk(true, &src, &dst);
        assert!(matches!(m, Mover::Pipe(..) | Mover::Fallback(..)));
        assert!(m.chunk() >= RELAY_BUF);
    }

    #[test]
    fn a_direction_gives_back_its_buffer_after_the_release_period() {
        let (src, _peer) = loopback_pair();
        // Release sooner than the idle check: one read timeout (of the release period) is enough.
        let (check, release) = (Duration::from_secs(60), Duration::from_secs(5));
        let mut q = Quiet::new(release, check);
        let mut mover = Mover::Buffer(vec![0; 8]);
        q.taken(&src).unwrap();
        assert_eq!(src.socket().read_timeout().unwrap(), Some(release));
        assert!(q.lapse(&src, &mut mover).unwrap());
        assert!(mover.is_none());
        assert_eq!(src.socket().read_timeout().unwrap(), Some(check));
        // Nothing held: nothing to give back.
        assert!(!q.lapse(&src, &mut mover).unwrap());
    }

    #[test]
    fn quiet_adds_up_over_idle_checks_and_starts_over_on_a_byte() {
        let (src, _peer) = loopback_pair();
        // The idle check wakes every second; the release waits for five of them in a row.
        let mut q = Quiet::new(Duration::from_secs(5), Duration::from_secs(1));
        let mut mover = Mover::Buffer(vec![0; 8]);
        q.taken(&src).unwrap();
        for _ in 0..4 {
            assert!(!q.lapse(&src, &mut mover).unwrap());
        }
        q.moved();
        for _ in 0..4 {
            assert!(!q.lapse(&src, &mut mover).unwrap());
        }
        assert!(!mover.is_none());
        assert!(q.lapse(&src, &mut mover).unwrap());
        assert!(mover.is_none());
    }
}
