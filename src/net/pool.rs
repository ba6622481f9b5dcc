//! Parked threads, so that setting up a tunnel does not spawn any: a thread that has finished a
//! connection (or one direction of a relay) waits here for the next one, for at most
//! [`PARK_TIME`], and only when no thread is parked is a new one spawned.
//!
//! The card's shape stays: each thread runs one job at a time to its end, blocking — a whole
//! connection on a [`conns`](Pool::new) pool, one relay direction on [`relays`]. The pool only
//! saves the spawn, the stack's mmap/mprotect/munmap and glibc's per-thread teardown, which were
//! most of a set-up's CPU (issue 20). A job gets its name as the kernel's thread name (`top -H`,
//! gdb, /proc/PID/task/*/comm); a parked thread is named after its pool ("parked conn").
//!
//! What a job does, and counting live connections, is the caller's (`accept.rs`, `relay.rs`).

use crate::net::relay::RELAY_STACK;
use log::warn;
use parking_lot::{Condvar, Mutex};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// A parked thread with no job for this long exits: long enough to carry steady load between
/// bursts, short enough that a burst's threads are gone well within a leak check's 30 s drain.
pub const PARK_TIME: Duration = Duration::from_secs(10);
/// Threads parked at most per pool; a thread finishing its job when this many wait exits. Each
/// parked thread keeps the stack pages it touched (a few KiB for a relay, more after a handshake).
pub const MAX_PARKED: usize = 256;

/// Work for a thread: runs once, to its end.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A job and the thread name it runs under.
struct Task {
    name: String,
    job: Job,
}

/// What a parked thread finds when it wakes. Handed over under a mutex and a plain
/// `unpark` — a futex wake — because a channel's receive spins and calls `sched_yield` before
/// it sleeps, which cost more than the hand-over itself (perf, issue 20).
enum Handoff {
    Waiting,
    Run(Task),
    Stop,
}

/// A parked thread, as `run` and `close` reach it.
struct Parked {
    id: u64,
    next: Mutex<Handoff>,
    thread: Thread,
}

impl Parked {
    fn hand(&self, h: Handoff) {
        *self.next.lock() = h;
        self.thread.unpark();
    }
}

/// A set of threads of one stack size that run jobs one at a time and park in between.
pub struct Pool {
    /// The kind of job, for thread names: "conn", "down".
    kind: &'static str,
    stack: usize,
    park_time: Duration,
    max_parked: usize,
    /// Parked threads, most recently parked last (taken first: its stack and cache are warm,
    /// and the ones at the bottom age out when load drops).
    parked: Mutex<Vec<Arc<Parked>>>,
    closed: AtomicBool,
    /// Threads alive: running a job or parked.
    threads: AtomicUsize,
    next_id: AtomicU64,
}

/// The pool that runs the second direction of every relay in this process (see `relay.rs`).
pub fn relays() -> &'static Arc<Pool> {
    static RELAYS: OnceLock<Arc<Pool>> = OnceLock::new();
    RELAYS.get_or_init(|| Pool::new("down", RELAY_STACK, PARK_TIME, MAX_PARKED))
}

impl Pool {
    /// A pool of threads with `stack` bytes of stack, named `parked {kind}` while parked,
    /// parking for at most `park_time` and at most `max_parked` at once.
    pub fn new(
        kind: &'static str,
        stack: usize,
        park_time: Duration,
        max_parked: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            kind,
            stack,
            park_time,
            max_parked,
            parked: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            threads: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    /// Runs `job` on a parked thread, or on a new one when none is parked; the thread is named
    /// `name` (the kernel keeps its first 15 bytes) while the job runs. Does not wait for it.
    ///
    /// # Errors
    /// A new thread was needed and could not be spawned; `job` is dropped unrun.
    pub fn run(self: &Arc<Self>, name: String, job: Job) -> io::Result<()> {
        let task = Task { name, job };
        // Popped under the list's lock, handed over after it: a thread whose park time ran out
        // meanwhile finds itself gone from the list and waits for this (see `park`).
        let idle = self.parked.lock().pop();
        match idle {
            Some(p) => {
                p.hand(Handoff::Run(task));
                Ok(())
            }
            None => self.spawn(task),
        }
    }

    /// Runs `f` as [`Pool::run`] does and returns a handle to wait for its result.
    ///
    /// # Errors
    /// As [`Pool::run`].
    pub fn run_joinable<T: Send + 'static>(
        self: &Arc<Self>,
        name: String,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Joinable<T>> {
        let done = Arc::new((Mutex::new(Outcome::Running), Condvar::new()));
        let finish = Finish(done.clone());
        self.run(
            name,
            Box::new(move || {
                // `f`'s captures are dropped when it returns, before the result is handed over.
                let r = f();
                finish.set(Outcome::Done(r));
            }),
        )?;
        Ok(Joinable(done))
    }

    fn spawn(self: &Arc<Self>, task: Task) -> io::Result<()> {
        let pool = self.clone();
        // Counted before the spawn so that `threads` never reads low while it starts.
        self.threads.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name(self.kind.to_string())
            .stack_size(self.stack)
            .spawn(move || pool.work(task));
        if spawned.is_err() {
            self.threads.fetch_sub(1, Ordering::Relaxed);
        }
        spawned.map(drop)
    }

    /// A thread's life: its first job, then each job handed to it while parked.
    fn work(self: Arc<Self>, first: Task) {
        let _alive = Alive(&self.threads);
        let me = Arc::new(Parked {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            next: Mutex::new(Handoff::Waiting),
            thread: thread::current(),
        });
        let mut task = first;
        loop {
            set_thread_name(&task.name);
            (task.job)();
            set_thread_name(&format!("parked {}", self.kind));
            match self.park(&me) {
                Some(t) => task = t,
                None => return,
            }
        }
    }

    /// Waits for the next job: `None` when the pool is closed or full, or nothing came within
    /// the park time.
    fn park(&self, me: &Arc<Parked>) -> Option<Task> {
        *me.next.lock() = Handoff::Waiting;
        {
            let mut parked = self.parked.lock();
            // Checked under the lock that `close` drains under: a thread is never left parked
            // after the pool closed.
            if self.closed.load(Ordering::SeqCst) || parked.len() >= self.max_parked {
                return None;
            }
            parked.push(me.clone());
        }
        let deadline = Instant::now() + self.park_time;
        let mut listed = true;
        loop {
            match std::mem::replace(&mut *me.next.lock(), Handoff::Waiting) {
                Handoff::Run(t) => return Some(t),
                Handoff::Stop => return None,
                Handoff::Waiting => {}
            }
            let now = Instant::now();
            if listed && now >= deadline {
                let mut parked = self.parked.lock();
                if let Some(i) = parked.iter().position(|p| p.id == me.id) {
                    parked.remove(i);
                    return None;
                }
                // Taken by a `run` just as the time ran out: its task is on the way.
                listed = false;
                continue;
            }
            // Wakes on `unpark`, the deadline, or spuriously: the loop looks again.
            if listed {
                thread::park_timeout(deadline - now);
            } else {
                thread::park();
            }
        }
    }

    /// Stops parking: parked threads exit now, busy ones when their job ends. Jobs may still
    /// be run (on new threads, which exit after them).
    pub fn close(&self) {
        let mut parked = self.parked.lock();
        self.closed.store(true, Ordering::SeqCst);
        for p in parked.drain(..) {
            p.hand(Handoff::Stop);
        }
    }

    /// Threads alive now: running a job or parked.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }

    /// Threads parked now.
    pub fn parked(&self) -> usize {
        self.parked.lock().len()
    }
}

/// How a joinable job stands.
enum Outcome<T> {
    Running,
    Done(T),
    /// It panicked, or was dropped unrun.
    Lost,
}

type Shared<T> = Arc<(Mutex<Outcome<T>>, Condvar)>;

/// Hands a joinable job's outcome over; if dropped without one (the job panicked), says so.
struct Finish<T>(Shared<T>);

impl<T> Finish<T> {
    fn set(&self, o: Outcome<T>) {
        let (m, cv) = &*self.0;
        let mut g = m.lock();
        if matches!(*g, Outcome::Running) {
            *g = o;
            cv.notify_one();
        }
    }
}

impl<T> Drop for Finish<T> {
    fn drop(&mut self) {
        self.set(Outcome::Lost);
    }
}

/// A job run by [`Pool::run_joinable`], to wait for.
pub struct Joinable<T>(Shared<T>);

impl<T> Joinable<T> {
    /// Waits for the job's result: `None` if it panicked. Blocking.
    pub fn join(self) -> Option<T> {
        let (m, cv) = &*self.0;
        let mut g = m.lock();
        while matches!(*g, Outcome::Running) {
            cv.wait(&mut g);
        }
        match std::mem::replace(&mut *g, Outcome::Lost) {
            Outcome::Done(t) => Some(t),
            _ => None,
        }
    }
}

/// Counts a pool thread out when it ends, however it ends (a job that panics ends its thread).
struct Alive<'a>(&'a AtomicUsize);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Names the calling thread for the kernel (`top -H`, gdb, /proc/PID/task/*/comm): the first 15
/// bytes of `name`, cut at a character boundary. std names a thread only when spawning it.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let mut n = name.len().min(15);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `buf` is 16 bytes
    // and its last byte is always 0.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        warn!(
            "cannot name thread {name:?}: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    const LONG: Duration = Duration::from_secs(30);

    /// Runs `f` on `pool` and returns what it sent back, waiting at most 10 s.
    fn run_and_wait<T: Send + 'static>(
        pool: &Arc<Pool>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::channel();
        pool.run("job".into(), Box::new(move || tx.send(f()).unwrap()))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// Waits (bounded) until `f` holds.
    fn eventually(f: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn sequential_jobs_reuse_one_thread() {
        let pool = Pool::new("t", 64 * 1024, LONG, 4);
        let first = run_and_wait(&pool, || thread::current().id());
        assert!(eventually(|| pool.parked() == 1));
        for _ in 0..50 {
            assert_eq!(run_and_wait(&pool, || thread::current().id()), first);
            assert!(eventually(|| pool.parked() == 1));
        }
        assert_eq!(pool.threads(), 1);
        pool.close();
    }

    #[test]
    fn a_job_runs_under_its_name_and_a_parked_thread_under_the_pools() {
        let pool = Pool::new("kind", 64 * 1024, LONG, 4);
        let comm = || {
            let tid = unsafe { libc::gettid() };
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default()
        };
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        pool.run(
            "conn#123456789012".into(),
            Box::new(move || tx2.send((comm(), unsafe { libc::gettid() })).unwrap()),
        )
        .unwrap();
        let (name, tid) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.trim_end(), "conn#1234567890", "cut to 15 bytes");
        assert!(eventually(|| pool.parked() == 1));
        let parked = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        assert_eq!(parked.trim_end(), "parked kind");
        pool.run(
            "é".repeat(10),
            Box::new(move || tx.send((comm(), 0)).unwrap()),
        )
        .unwrap();
        let (name, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            name.trim_end(),
            "é".repeat(7),
            "cut at a character boundary"
        );
        pool.close();
    }

    #[test]
    fn concurrent_jobs_each_get_a_thread_and_at_most_the_bound_park() {
        let pool = Pool::new("t", 64 * 1024, LONG, 2);
        let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        for _ in 0..5 {
            let (go, done) = (go_rx.clone(), done_tx.clone());
            pool.run(
                "j".into(),
                Box::new(move || {
                    go.recv().unwrap();
                    done.send(()).unwrap();
                }),
            )
            .unwrap();
        }
        // All five wait at once: none could have run on another's thread.
        assert_eq!(pool.threads(), 5);
        for _ in 0..5 {
            go_tx.send(()).unwrap();
        }
        for _ in 0..5 {
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert!(eventually(|| pool.threads() == 2 && pool.parked() == 2));
        pool.close();
    }

    #[test]
    fn a_parked_thread_exits_after_the_park_time() {
        let pool = Pool::new("t", 64 * 1024, Duration::from_millis(20), 4);
        run_and_wait(&pool, || ());
        assert!(eventually(|| pool.threads() == 0));
        assert_eq!(pool.parked(), 0);
        // And the pool still runs jobs, on a new thread.
        assert_eq!(run_and_wait(&pool, || 7), 7);
    }

    #[test]
    fn close_ends_parked_threads_at_once() {
        let pool = Pool::new("t", 64 * 1024, LONG, 8);
        let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
        for _ in 0..3 {
            let go = go_rx.clone();
            pool.run("j".into(), Box::new(move || go.recv().unwrap()))
                .unwrap();
        }
        for _ in 0..3 {
            go_tx.send(()).unwrap();
        }
        assert!(eventually(|| pool.parked() == 3));
        let t = Instant::now();
        pool.close();
        assert!(eventually(|| pool.threads() == 0));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        // Closed: a job still runs, and its thread does not park.
        assert_eq!(run_and_wait(&pool, || 1), 1);
        assert!(eventually(|| pool.threads() == 0));
    }

    #[test]
    fn a_joinable_job_hands_back_its_result_or_none_if_it_panicked() {
        let pool = Pool::new("t", 64 * 1024, LONG, 4);
        let data = Arc::new(5);
        let d2 = data.clone();
        let h = pool.run_joinable("j".into(), move || *d2 * 2).unwrap();
        assert_eq!(h.join(), Some(10));
        // The job's captures are gone once its result is in.
        assert_eq!(Arc::strong_count(&data), 1);
        let h = pool
            .run_joinable("j".into(), || -> u8 { panic!("job panics on purpose") })
            .unwrap();
        assert_eq!(h.join(), None);
        pool.close();
    }

    #[test]
    fn a_panicking_job_ends_only_its_thread() {
        let pool = Pool::new("t", 64 * 1024, LONG, 4);
        pool.run("boom".into(), Box::new(|| panic!("job panics on purpose")))
            .unwrap();
        assert!(eventually(|| pool.threads() == 0));
        assert_eq!(run_and_wait(&pool, || 3), 3);
        pool.close();
    }
}
