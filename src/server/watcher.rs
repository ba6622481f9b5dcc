//! The database thread: the server's link between the user store and what runs in memory. It
//! asks the store what changed every [`WATCH_INTERVAL`] and reloads the directory (rates, limits,
//! revocations, the verify cache) and applies `sluice unban` requests when something did; it
//! samples the accounts and flushes usage to the store every [`FLUSH_INTERVAL`], and once more
//! when it is stopped.
//!
//! How a change is noticed (SQLite's `data_version`, a file replaced or deleted) is the store's
//! business; what a reload does to the snapshot is `auth`'s. A store that is gone or failing
//! never stops the server: the last good snapshot serves on and usage is counted in memory until
//! a flush succeeds.

use crate::auth::throttle::Source;
use crate::auth::{self, Changes, Directory};
use crate::error::Error;
use crate::flow::usage::{self, Accountant};
use crate::stop::Stop;
use crate::store::{Changed, UserStore};
use crossbeam_channel::{Receiver, select, tick};
use log::{info, warn};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How often the watcher asks the store for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How often usage counters are sampled and flushed to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The thread's stack: it runs SQLite, not relays, and needs little.
const WATCHER_STACK: usize = 256 * 1024;

/// Lifts the login blocks on a source; returns how many records it dropped.
pub type Unban = Arc<dyn Fn(Source) -> usize + Send + Sync>;

/// Starts the database thread over `store` (opened before `dir` was loaded from it, so a change
/// made meanwhile is seen). `sluice unban` requests go to `unban`. It ends, after a last flush,
/// when `stop` is given.
///
/// # Errors
/// The thread could not be spawned.
pub fn spawn(
    store: Box<dyn UserStore>,
    dir: Arc<Directory>,
    stop: &Stop,
    unban: Unban,
) -> std::io::Result<thread::JoinHandle<()>> {
    let stop = stop.receiver();
    thread::Builder::new()
        .name("user watcher".into())
        .stack_size(WATCHER_STACK)
        .spawn(move || Watcher::new(store, unban).run(&dir, &stop))
}

/// The thread's state between rounds.
struct Watcher {
    store: Box<dyn UserStore>,
    accountant: Accountant,
    /// A flush failed and was logged; the next success is logged too.
    flush_failing: bool,
    /// The store's being gone was logged (once until it is back).
    gone_logged: bool,
    /// A change was seen but its reload failed: try again next round.
    reload_due: bool,
    unban: Unban,
}

impl Watcher {
    fn new(store: Box<dyn UserStore>, unban: Unban) -> Watcher {
        Watcher {
            store,
            accountant: Accountant::new(),
            flush_failing: false,
            gone_logged: false,
            reload_due: false,
            unban,
        }
    }

    fn run(mut self, dir: &Directory, stop: &Receiver<()>) {
        let (watch, flush) = (tick(WATCH_INTERVAL), tick(FLUSH_INTERVAL));
        loop {
            select! {
                recv(watch) -> _ => self.poll(dir),
                recv(flush) -> _ => self.flush(dir),
                recv(stop) -> _ => break,
            }
        }
        self.flush(dir);
    }

    /// Samples live figures and writes the usage deltas; on failure they wait for the next flush.
    fn flush(&mut self, dir: &Directory) {
        let accounts = dir.accounts();
        self.accountant.sample(&accounts, Instant::now());
        let (deltas, marks) = self.accountant.deltas(&accounts, usage::unix_now());
        match self.store.flush_usage(&deltas, usage::unix_now()) {
            Ok(()) => {
                self.accountant.commit(marks);
                if self.flush_failing {
                    info!("usage flushes work again");
                    self.flush_failing = false;
                }
            }
            // No store: the counts wait in memory (deltas are taken against the last commit).
            Err(Error::NoDatabase(_)) => {}
            Err(e) if !self.flush_failing => {
                warn!("cannot write usage ({e}); counting on in memory and retrying every second");
                self.flush_failing = true;
            }
            Err(_) => {}
        }
    }

    /// Asks the store what changed and, if anything did, applies unban requests and reloads.
    fn poll(&mut self, dir: &Directory) {
        let changed = match self.store.changes() {
            Ok(c) => c,
            Err(Error::NoDatabase(_)) => {
                if !self.gone_logged {
                    warn!(
                        "database {} is gone; keeping the last snapshot of {} users and counting usage in memory",
                        self.store.location(),
                        dir.len()
                    );
                    self.gone_logged = true;
                }
                return;
            }
            Err(e) => {
                warn!("cannot read database: {e}; keeping the last snapshot");
                return;
            }
        };
        self.gone_logged = false;
        // A store that names the users that changed is still reloaded whole: the snapshot is
        // replaced in one step, so every login sees one consistent version of the users.
        if changed == Changed::None && !self.reload_due {
            return;
        }
        apply_unbans(&*self.store, &self.unban);
        match auth::reload(&*self.store, dir) {
            Ok(c) => {
                self.reload_due = false;
                if c != Changes::default() {
                    info!(
                        "users reloaded: {} added, {} changed, {} removed",
                        c.added, c.changed, c.removed
                    );
                }
            }
            Err(e) => {
                self.reload_due = true;
                warn!("cannot reload users: {e}; keeping the last snapshot");
            }
        }
    }
}

/// Takes the pending `sluice unban` requests and applies them (a bad row is logged and dropped).
fn apply_unbans(store: &dyn UserStore, unban: &Unban) {
    let sources = match store.take_unbans() {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot read unban requests: {e}; trying again at the next change");
            return;
        }
    };
    for s in sources {
        match Source::parse(&s) {
            Ok(src) => {
                // Not inside the macro: its arguments are not evaluated when info is filtered.
                let n = unban(src);
                info!("unban {src}: {n} login records dropped");
            }
            Err(e) => warn!("unban request ignored: {e}"),
        }
    }
}
