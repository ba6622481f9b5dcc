//! The two copy loops of a connection, one thread per direction, and the one function every
//! relayed byte passes through ([`pump`]), where the per-user limiter is applied.
//!
//! Half-close is carried through: EOF from one side shuts down writing toward the other while the
//! other direction keeps flowing; an error in either direction shuts both sockets, which ends the
//! other thread too. Either side may be TLS (`stream.rs`). A limited relay first waits until its
//! source is readable (a one-byte peek, or plaintext in the TLS session), then asks the limiter
//! for up to a buffer's worth, reads at most what it was granted and gives back the rest, so it
//! never holds tokens while blocked and never reads past its grant. An unthrottled direction's
//! first bytes go through a small buffer (one `read`, one `write`: requests and replies); once a
//! read fills it, and from the start for a throttled one, bulk between two plain sockets moves
//! through a pipe with `splice(2)`, never through user space. Pipes and buffers are
//! made only once data arrives and given back once a direction has been quiet for
//! [`DEFAULT_RELEASE_AFTER`] (taken again on its next byte), so a tunnel that is not moving bytes
//! costs two sleeping threads and its two sockets, whether it never moved any or moved gigabytes
//! an hour ago; a pipe is taken only while the process's pipe budget allows, else a buffer
//! serves. How a direction moves its bytes and when it lets go is `mover.rs`'s.
//!
//! A datagram relay (SOCKS5 UDP ASSOCIATE) goes beside this one, in `net/datagram.rs`: it shares
//! [`Budget`] and charges each datagram whole before sending it with
//! [`Budget::take_datagram`] (the limiter's `acquire_whole`, which may leave the bucket in debt),
//! where a stream takes what it may read and settles after the read.

use crate::flow::account::{Account, Reserve};
use crate::flow::limiter::{Closed, Limiter, Waiter};
use crate::net::mover::{Mover, Quiet};
use crate::net::pool;
use crate::net::stream::{Stream, is_timeout};
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::thread;
use std::time::{Duration, Instant};

pub use crate::net::mover::RELAY_BUF;
/// Stack size of a relay thread: it holds no buffer on its stack (the buffer is on the heap).
pub const RELAY_STACK: usize = 64 * 1024;
/// A relay with no traffic either way for this long is closed (`--idle-timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// A direction with no bytes for this long gives back its pipe or buffer; its next byte takes
/// one again (a pipe costs about 7 µs of CPU to make, size and close: `make bench`, scenario 17).
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(5);

/// The release period in milliseconds, for every relay of the process (see [`set_release_after`]).
static RELEASE_AFTER_MS: AtomicU64 = AtomicU64::new(DEFAULT_RELEASE_AFTER.as_millis() as u64);

/// Sets how long a direction stays quiet before it gives back its pipe or buffer, for the relays
/// started from now on (at least 1 ms). Process-wide, like the pipe budget it serves.
pub fn set_release_after(d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    RELEASE_AFTER_MS.store(ms, Ordering::Relaxed);
}

/// The release period relays started now use.
pub fn release_after() -> Duration {
    Duration::from_millis(RELEASE_AFTER_MS.load(Ordering::Relaxed))
}

/// When either direction of a connection last moved a byte, shared by its two relay threads.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    idle: Duration,
    /// The read timeout a direction without a pipe or buffer waits with (to check `idle`).
    check: Duration,
    /// A direction quiet this long gives back its pipe or buffer.
    release: Duration,
    /// Set when a direction ended on an error and shut both sockets: the other direction will
    /// not deliver another byte, so a grant it waited for goes back at once.
    broken: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// True when neither direction moved a byte for the idle timeout.
    fn expired(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) >= self.idle.as_millis() as u64
    }
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → destination.
    Up,
    /// Destination → client.
    Down,
}

/// A user's limit as a relay sees it: the account (rate, counters) and the shared limiter.
pub struct Budget {
    /// The user whose bandwidth this traffic counts against.
    pub account: Arc<Account>,
    /// The server's limiter.
    pub limiter: Arc<Limiter>,
}

impl Budget {
    /// Bytes the relay may read next, up to `want`: bandwidth first — at once for an unlimited
    /// user (in a fleet, one with a quota takes its leased quota allowance from the limiter),
    /// else from the limiter (blocking until granted; the wait is added to the account) —
    /// then quota for exactly that grant, reserved so parallel relays cannot overshoot it. While
    /// other relays' reads hold the last of the quota, this one waits a tick rather than calling
    /// the quota used up.
    fn take(&self, waiter: &Arc<Waiter>, want: usize) -> Result<usize, End> {
        let a = &self.account;
        loop {
            let g = if !self.metered() {
                want as u64
            } else {
                let g = self.throttled(|| self.limiter.acquire(&a.name, waiter, want as u64));
                // A grant never exceeds `want`, which came from a usize.
                g.map_err(End::from)?.min(want as u64)
            };
            match a.reserve_quota(g) {
                Reserve::Granted(n) => {
                    self.limiter_back(g - n);
                    return Ok(n as usize);
                }
                Reserve::Busy => {
                    self.limiter_back(g);
                    thread::sleep(self.limiter.tick());
                }
                Reserve::Exhausted => {
                    self.limiter_back(g);
                    // Used up: close the user's other connections too, not only this one.
                    a.close_all();
                    return Err(End::Quota);
                }
            }
        }
    }

    /// Charges one whole datagram of `n` bytes toward `dir`, before it is sent: bandwidth all at
    /// once (never split; the bucket may go into debt, see `Limiter::acquire_whole`; the wait is
    /// added to the account), then quota. A datagram that crosses the end of the quota is charged
    /// whole and may be sent, overshooting by less than one datagram as the bucket's debt does;
    /// the next one finds the quota used up. Blocking.
    ///
    /// # Errors
    /// [`End::Revoked`] or [`End::Stopping`] from the limiter; [`End::Quota`] once the quota is
    /// used up (the user's other connections are closed too).
    pub fn take_datagram(&self, waiter: &Arc<Waiter>, n: usize, dir: Direction) -> Result<(), End> {
        let a = &self.account;
        if n == 0 {
            return Ok(());
        }
        if self.metered() {
            self.throttled(|| self.limiter.acquire_whole(&a.name, waiter, n as u64))?;
        }
        loop {
            match a.reserve_quota(n as u64) {
                Reserve::Granted(m) => {
                    a.settle_quota(m, n as u64);
                    self.count(dir, n);
                    return Ok(());
                }
                Reserve::Busy => thread::sleep(self.limiter.tick()),
                Reserve::Exhausted => {
                    self.limiter_back(n as u64);
                    a.close_all();
                    return Err(End::Quota);
                }
            }
        }
    }

    /// Runs a limiter wait, adding its time to the account's throttled total.
    fn throttled<T>(&self, wait: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = wait();
        let waited = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.account
            .throttled_ns
            .fetch_add(waited, Ordering::Relaxed);
        r
    }

    /// Settles a grant after the read: `used` bytes were read of `granted`; the rest goes back
    /// to the quota and the bucket.
    fn settle(&self, granted: usize, used: usize) {
        self.account.settle_quota(granted as u64, used as u64);
        self.limiter_back((granted - used.min(granted)) as u64);
    }

    /// True when the limiter meters this user: a rate, or in a fleet a quota (leased from
    /// the fleet in allowances, see `Limiter::leases_quota`).
    fn metered(&self) -> bool {
        let a = &self.account;
        a.rate() != 0 || (a.quota() != 0 && self.limiter.leases_quota())
    }

    fn limiter_back(&self, n: u64) {
        if n > 0 && self.metered() {
            self.limiter.give_back(&self.account.name, n);
        }
    }

    fn count(&self, dir: Direction, n: usize) {
        let c = match dir {
            Direction::Up => &self.account.bytes_up,
            Direction::Down => &self.account.bytes_down,
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// How a direction (or a whole connection) ended.
#[derive(Debug)]
pub enum End {
    /// Orderly EOF.
    Closed,
    /// A read or write failed.
    Error(io::Error),
    /// The user was deleted while connected.
    Revoked,
    /// The server is stopping.
    Stopping,
    /// The user's quota is used up.
    Quota,
    /// No traffic either way for the idle timeout.
    Idle,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Error(e) => write!(f, "error: {e}"),
            End::Revoked => f.write_str("user revoked"),
            End::Stopping => f.write_str("server stopping"),
            End::Quota => f.write_str("quota exhausted"),
            End::Idle => f.write_str("idle timeout"),
        }
    }
}

impl From<Closed> for End {
    fn from(c: Closed) -> End {
        match c {
            Closed::Revoked => End::Revoked,
            Closed::Stopping => End::Stopping,
            Closed::Quota => End::Quota,
        }
    }
}

/// What a finished relay moved and how it ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes client → destination (including any prefix sent before the relay started).
    pub up: u64,
    /// Bytes destination → client.
    pub down: u64,
    /// The first abnormal end of either direction, else `Closed`.
    pub end: End,
}

/// Sends bytes that arrived with the handshake (pipelined tunnel data, a rewritten HTTP head)
/// through the limiter, as [`pump`] would. Blocking.
///
/// # Errors
/// The write failed or the limiter refused (user gone, server stopping).
pub fn send_prefix(
    dst: &Stream,
    mut data: &[u8],
    budget: Option<&Budget>,
    dir: Direction,
) -> Result<(), End> {
    let waiter = Waiter::new();
    while !data.is_empty() {
        let n = match budget {
            Some(b) => {
                let n = b.take(&waiter, data.len().min(RELAY_BUF))?;
                b.settle(n, n);
                n
            }
            None => data.len(),
        };
        dst.write_all(&data[..n]).map_err(End::Error)?;
        if let Some(b) = budget {
            b.count(dir, n);
        }
        data = &data[n..];
    }
    Ok(())
}

/// Reads once from `src` into `buf`, through the budget as [`pump`] does: a limited user first
/// waits for data, then takes tokens (and quota) for at most `buf.len()`, reads no more than it
/// was granted and gives the rest back; the bytes read count toward `dir`. Without a budget, a
/// plain read. Blocking; 0 means the peer closed. A socket timeout is [`End::Idle`].
///
/// # Errors
/// The read failed or timed out, or the limiter refused (user gone, server stopping, quota).
pub fn metered_read(
    src: &Stream,
    buf: &mut [u8],
    budget: Option<&Budget>,
    waiter: &Arc<Waiter>,
    dir: Direction,
) -> Result<usize, End> {
    let as_end = |e: io::Error| {
        if is_timeout(&e) {
            End::Idle
        } else {
            End::Error(e)
        }
    };
    let Some(b) = budget else {
        return src.read(buf).map_err(as_end);
    };
    let limited = b.account.rate() != 0 || b.account.quota() != 0;
    // Never hold tokens while blocked in a read: wait for data first.
    if limited && !src.wait_readable().map_err(as_end)? {
        return Ok(0);
    }
    let grant = b.take(waiter, buf.len())?;
    match src.read(&mut buf[..grant]) {
        Ok(n) => {
            b.settle(grant, n);
            b.count(dir, n);
            Ok(n)
        }
        Err(e) => {
            b.settle(grant, 0);
            Err(as_end(e))
        }
    }
}

/// Copies `src` to `dst` until EOF or error, through the budget. Blocking; returns the bytes moved
/// and how it ended. On EOF it shuts down writing on `dst`; on any other end it shuts both sockets
/// so the opposite direction ends too.
fn pump(
    src: &Stream,
    dst: &Stream,
    budget: Option<&Budget>,
    dir: Direction,
    activity: &Activity,
) -> (u64, End) {
    let mut moved = 0u64;
    let end = match copy(src, dst, budget, dir, activity, &mut moved) {
        Ok(()) => {
            dst.shutdown_write();
            End::Closed
        }
        Err(e) => {
            activity.broken.store(true, Ordering::Release);
            src.shutdown_both();
            dst.shutdown_both();
            e
        }
    };
    (moved, end)
}

fn copy(
    src: &Stream,
    dst: &Stream,
    budget: Option<&Budget>,
    dir: Direction,
    activity: &Activity,
    moved: &mut u64,
) -> Result<(), End> {
    let waiter = budget.map(|_| Waiter::new());
    let mut mover = Mover::None;
    let mut quiet = Quiet::new(activity.release, activity.check);
    loop {
        let limited = budget.is_some_and(|b| b.account.rate() != 0 || b.account.quota() != 0);
        // Wait for data before taking tokens (or allocating a buffer): a relay blocked in read
        // must not hold tokens that other connections of the user could use.
        if mover.is_none() || limited {
            match wait_readable(src, activity, !mover.is_none())? {
                Wait::Data => {}
                Wait::Eof => return Ok(()),
                Wait::Quiet => {
                    quiet.lapse(src, &mut mover).map_err(End::Error)?;
                    continue;
                }
            }
        }
        if mover.is_none() {
            // A throttled direction takes its full-size mover at once: the small first buffer
            // would cost it one more turn in the limiter's queue before its first full grant (a
            // round of the user's other connections: 150 ms in `make bench`'s scenario 8).
            mover = if limited {
                Mover::for_streams(src, dst)
            } else {
                Mover::first()
            };
            quiet.taken(src).map_err(End::Error)?;
        }
        let grant = match (budget, &waiter) {
            (Some(b), Some(w)) => {
                let grant = b.take(w, mover.chunk())?;
                // While this relay queued for its grant, the connection may have broken (a client
                // that closes with bytes unread resets its socket; the other direction sees that
                // first and shuts both sockets). Hand the grant on to the user's other connections
                // rather than spend it on bytes nobody can receive.
                if limited && let Some(e) = broken(activity, dst) {
                    b.settle(grant, 0);
                    return Err(End::Error(e));
                }
                grant
            }
            _ => mover.chunk(),
        };
        // Time moving bytes, against time waiting for tokens: the user's "throttled" share.
        let busy_since = Instant::now();
        let n = loop {
            match mover.fill(src, grant) {
                Ok(n) => break Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Quiet with the pipe or buffer in hand: give it back once the period is over.
                Err(e) if is_timeout(&e) && !activity.expired() => {
                    if quiet.lapse(src, &mut mover).map_err(End::Error)? {
                        break None;
                    }
                }
                Err(e) => {
                    if let Some(b) = budget {
                        b.settle(grant, 0);
                    }
                    return Err(if is_timeout(&e) {
                        End::Idle
                    } else {
                        End::Error(e)
                    });
                }
            }
        };
        let Some(n) = n else {
            if let Some(b) = budget {
                b.settle(grant, 0);
            }
            continue;
        };
        if let Some(b) = budget {
            b.settle(grant, n);
        }
        if n == 0 {
            return Ok(());
        }
        quiet.moved();
        activity.touch();
        // A write stalled past the socket timeout goes on while the other direction is active.
        let keep_waiting = || !activity.expired();
        mover
            .flush(dst, n, &keep_waiting)
            .map_err(|e| write_end(e, activity))?;
        *moved += n as u64;
        mover.after_chunk(n >= grant, src, dst);
        if let Some(b) = budget {
            let busy = u64::try_from(busy_since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            b.account.busy_ns.fetch_add(busy, Ordering::Relaxed);
            b.count(dir, n);
        }
    }
}

/// What a wait for data found.
enum Wait {
    Data,
    Eof,
    /// The read timeout passed with no data (reported only to a direction holding a pipe or
    /// buffer, which may give it back).
    Quiet,
}

/// Blocks until `src` has data or is at EOF; ends with `Idle` once neither direction moved for
/// the idle timeout. With `holding`, a read timeout is reported as [`Wait::Quiet`].
fn wait_readable(src: &Stream, activity: &Activity, holding: bool) -> Result<Wait, End> {
    loop {
        match src.wait_readable() {
            Ok(true) => return Ok(Wait::Data),
            Ok(false) => return Ok(Wait::Eof),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                if activity.expired() {
                    return Err(End::Idle);
                }
                if holding {
                    return Ok(Wait::Quiet);
                }
            }
            Err(e) => return Err(End::Error(e)),
        }
    }
}

/// Why the connection can deliver nothing more, if it cannot: the other direction ended on an
/// error, or a reset left its error on `dst`'s socket (`SO_ERROR`; reading it clears it, and the
/// relay ends on it).
fn broken(activity: &Activity, dst: &Stream) -> Option<io::Error> {
    if activity.broken.load(Ordering::Acquire) {
        return Some(io::Error::from(io::ErrorKind::ConnectionAborted));
    }
    match dst.socket().take_error() {
        Ok(e) => e,
        Err(e) => Some(e),
    }
}

/// A write that timed out means the peer stopped reading for the whole idle timeout.
fn write_end(e: io::Error, activity: &Activity) -> End {
    if is_timeout(&e) && activity.expired() {
        End::Idle
    } else {
        End::Error(e)
    }
}

/// Relays both directions of a connection: destination → client runs on a parked relay thread
/// (spawned only when none is parked; named `down {label}` while it runs) and client →
/// destination on the calling thread. Blocking until both directions are done.
///
/// The calling thread, already running, takes the direction whose first byte comes first in
/// most protocols (the client's, right after the reply); the relay thread's wake-up then happens
/// while that byte makes its round trip to the destination, not before it (`make bench`,
/// scenario 4).
///
/// # Errors
/// Returns `Err` (with both sockets shut) only when no thread is parked and none can be spawned.
pub fn relay(
    client: Stream,
    dest: Stream,
    budget: Option<Arc<Budget>>,
    label: &str,
    up_already: u64,
) -> io::Result<Outcome> {
    relay_idle(
        client,
        dest,
        budget,
        label,
        up_already,
        DEFAULT_IDLE_TIMEOUT,
    )
}

/// [`relay`] with an idle timeout: the connection ends when neither direction moved a byte for
/// `idle` (checked on socket timeouts, so a relay never sleeps past it by more than `idle`).
///
/// # Errors
/// As [`relay`].
pub fn relay_idle(
    client: Stream,
    dest: Stream,
    budget: Option<Arc<Budget>>,
    label: &str,
    up_already: u64,
    idle: Duration,
) -> io::Result<Outcome> {
    // Reads and writes wake up at least every `check` to look at the shared activity clock.
    let check = idle.clamp(Duration::from_millis(50), Duration::from_secs(60));
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
        idle,
        check,
        release: release_after(),
        broken: AtomicBool::new(false),
    });
    for s in [&client, &dest] {
        s.socket().set_read_timeout(Some(check))?;
        s.socket()
            .set_write_timeout(Some(idle.max(Duration::from_millis(50))))?;
    }
    // Both threads share each socket (no dup), so a tunnel costs two descriptors.
    let (c2, d2, b2, a2) = (
        client.clone(),
        dest.clone(),
        budget.clone(),
        activity.clone(),
    );
    // The second direction runs on a parked relay thread (`pool.rs`), spawned only when none is.
    let down = pool::relays().run_joinable(format!("down {label}"), move || {
        pump(&d2, &c2, b2.as_deref(), Direction::Down, &a2)
    });
    let down = match down {
        Ok(h) => h,
        Err(e) => {
            client.shutdown_both();
            dest.shutdown_both();
            return Err(e);
        }
    };
    let (up_n, up_end) = pump(&client, &dest, budget.as_deref(), Direction::Up, &activity);
    let (down, down_end) = down
        .join()
        .unwrap_or_else(|| (0, End::Error(io::Error::other("relay thread panicked"))));
    let end = match (up_end, down_end) {
        (End::Closed, e) | (e, End::Closed) => e,
        (e, _) => e,
    };
    let end = match (&end, &budget) {
        (End::Error(_), Some(b)) if b.account.is_revoked() => End::Revoked,
        (End::Error(_), Some(b)) if b.account.quota_exhausted() => End::Quota,
        _ => end,
    };
    Ok(Outcome {
        up: up_n + up_already,
        down,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QuotaPeriod;

    fn budget(rate: u64, quota: u64) -> Budget {
        let account = Account::new(1, "u", rate);
        account.set_limits(quota, QuotaPeriod::None, 0);
        let limiter = Limiter::new(Duration::from_millis(5));
        limiter.set_rate(&account.name, rate);
        Budget { account, limiter }
    }

    #[test]
    fn datagrams_are_charged_whole_against_the_quota() {
        let b = budget(0, 1000);
        let w = Waiter::new();
        for _ in 0..3 {
            // The third crosses the end of the quota: charged whole, not cut to 200.
            b.take_datagram(&w, 400, Direction::Up).unwrap();
        }
        assert_eq!(b.account.quota_used(), 1200);
        assert_eq!(b.account.bytes_up.load(Ordering::Relaxed), 1200);
        assert!(matches!(
            b.take_datagram(&w, 400, Direction::Up),
            Err(End::Quota)
        ));
        b.take_datagram(&w, 0, Direction::Down).unwrap();
        assert_eq!(b.account.bytes_down.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn datagrams_wait_for_the_bucket_and_count_the_wait() {
        let b = budget(200_000, 0); // 1000 bytes a 5 ms tick
        let refill = b.limiter.spawn_refill().unwrap();
        let w = Waiter::new();
        let t = Instant::now();
        for _ in 0..8 {
            b.take_datagram(&w, 1500, Direction::Down).unwrap();
        }
        // 12,000 bytes at 200,000 B/s: at least ~55 ms, whatever the debt lent at the end.
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(b.account.bytes_down.load(Ordering::Relaxed), 12_000);
        assert!(b.account.throttled_ns.load(Ordering::Relaxed) > 0);
        b.limiter.shutdown();
        refill.join().unwrap();
    }
}
