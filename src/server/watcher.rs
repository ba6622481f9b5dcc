//! The database thread: the server's link between the user store and what runs in memory. It
//! asks the store what changed every [`WATCH_INTERVAL`] and applies `sluice unban` requests and
//! the changed users to the directory (rates, limits, revocations, the verify cache) when
//! something did: only the users named when the store can name them, everyone otherwise. It
//! samples the active accounts (see `flow::account::Roster`) and flushes their usage to the store
//! every [`FLUSH_INTERVAL`] (trimming the store's record of applied changes then), and once more
//! when it is stopped. Nothing here walks the user table: a quiet server's second is a look at
//! `data_version` four times and an empty active list.
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
    /// A change was seen but its reload failed: reload everything next round.
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
    /// Then trims the store's record of changes already applied.
    fn flush(&mut self, dir: &Directory) {
        self.write_usage(dir);
        // Only changes already applied are trimmed; a failure is retried at the next flush.
        if !self.reload_due
            && let Err(e) = self.store.trim_changes()
            && !matches!(e, Error::NoDatabase(_))
        {
            warn!("cannot trim the change log: {e}");
        }
    }

    /// Samples and flushes the active accounts only (connections open, or counts not yet
    /// settled), then lets go of those with nothing left to report: with nobody connected a
    /// second costs nothing, whatever the size of the user table.
    fn write_usage(&mut self, dir: &Directory) {
        let roster = dir.roster();
        let accounts = roster.active();
        if accounts.is_empty() {
            return;
        }
        self.accountant.sample(&accounts, Instant::now());
        let (deltas, marks) = self.accountant.deltas(&accounts, usage::unix_now());
        match self.store.flush_usage(&deltas, usage::unix_now()) {
            Ok(()) => {
                self.accountant.commit(marks);
                if self.flush_failing {
                    info!("usage flushes work again");
                    self.flush_failing = false;
                }
                for a in &accounts {
                    if roster.retire_if(a, |a| self.accountant.settled(a)) {
                        self.accountant.forget(a);
                    }
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
        let (result, what) = match changed {
            Changed::None if !self.reload_due => return,
            // A few users changed: reread just them. A failure is made good by a whole reload.
            Changed::Users(names) if !self.reload_due => {
                apply_unbans(&*self.store, &self.unban);
                if names.is_empty() {
                    return;
                }
                let what = format!("{} users reread", names.len());
                (auth::reload_users(&*self.store, dir, &names), what)
            }
            _ => {
                apply_unbans(&*self.store, &self.unban);
                let what = "users reloaded".to_string();
                (auth::reload(&*self.store, dir), what)
            }
        };
        match result {
            Ok(c) => {
                self.reload_due = false;
                if c != Changes::default() {
                    info!(
                        "{what}: {} added, {} changed, {} removed",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use crate::flow::limiter::Limiter;
    use crate::store::{BadRow, QuotaPeriod, Usage, UsageDelta, UserChange, UserRow};
    use parking_lot::Mutex;
    use std::collections::VecDeque;

    /// What the fake store was asked and answers.
    #[derive(Default)]
    struct Script {
        changes: VecDeque<Changed>,
        users: Vec<UserRow>,
        fail_load: bool,
        looks: usize,
        loads: usize,
        flushes: usize,
        /// Every delta flushed.
        flushed: Vec<UsageDelta>,
    }

    /// A store that is not SQLite: the watcher works through the trait alone.
    struct Fake(Arc<Mutex<Script>>);

    fn nope<T>() -> Result<T> {
        Err(Error::Invalid("not in this fake".into()))
    }

    impl UserStore for Fake {
        fn location(&self) -> String {
            "fake".into()
        }
        fn changes(&mut self) -> Result<Changed> {
            let mut s = self.0.lock();
            s.looks += 1;
            Ok(s.changes.pop_front().unwrap_or(Changed::None))
        }
        fn load(&self) -> Result<(Vec<UserRow>, Vec<BadRow>)> {
            let mut s = self.0.lock();
            s.loads += 1;
            if s.fail_load {
                return Err(Error::database("fake", "down"));
            }
            Ok((s.users.clone(), Vec::new()))
        }
        fn load_usage(&self) -> Result<Vec<Usage>> {
            Ok(Vec::new())
        }
        fn add_with(&self, _: &str, _: &str, _: u64, _: &UserChange) -> Result<()> {
            nope()
        }
        fn change(&self, _: &str, _: &UserChange) -> Result<()> {
            nope()
        }
        fn delete(&self, _: &str) -> Result<()> {
            nope()
        }
        fn reset_usage(&self, _: &str) -> Result<()> {
            nope()
        }
        fn flush_usage(&self, d: &[UsageDelta], _: u64) -> Result<()> {
            let mut s = self.0.lock();
            s.flushes += 1;
            s.flushed.extend_from_slice(d);
            Ok(())
        }
        fn request_unban(&self, _: &str) -> Result<()> {
            nope()
        }
        fn take_unbans(&self) -> Result<Vec<String>> {
            Ok(Vec::new())
        }
    }

    fn user(name: &str) -> UserRow {
        UserRow {
            id: 1,
            username: name.into(),
            password_hash: "h".into(),
            bandwidth: 0,
            quota_bytes: 0,
            quota_period: QuotaPeriod::None,
            max_connections: 0,
        }
    }

    fn start(script: &Arc<Mutex<Script>>, stop: &Stop) -> (Arc<Directory>, thread::JoinHandle<()>) {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        start_on(dir, script, stop)
    }

    fn start_on(
        dir: Arc<Directory>,
        script: &Arc<Mutex<Script>>,
        stop: &Stop,
    ) -> (Arc<Directory>, thread::JoinHandle<()>) {
        let h = spawn(
            Box::new(Fake(script.clone())),
            dir.clone(),
            stop,
            Arc::new(|_| 0),
        )
        .unwrap();
        (dir, h)
    }

    fn wait_until(mut ok: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A directory with user "a" (password "p") logged in and one connection open.
    fn connected() -> (Arc<Directory>, crate::flow::account::Slot) {
        let dir = Directory::new(Limiter::new(Duration::from_millis(10))).unwrap();
        let hash = crate::auth::hash_password("p").unwrap();
        dir.apply(vec![UserRow {
            password_hash: hash,
            ..user("a")
        }]);
        let a = dir.verify(b"a", b"p").unwrap();
        a.bytes_down
            .fetch_add(42, std::sync::atomic::Ordering::Relaxed);
        let (slot, _) = a.admit(1).unwrap();
        (dir, slot)
    }

    #[test]
    fn a_stop_ends_the_watcher_at_once_with_a_last_flush() {
        let script = Arc::new(Mutex::new(Script::default()));
        let stop = Stop::new();
        stop.stop();
        let (dir, _slot) = connected();
        let (_dir, h) = start_on(dir, &script, &stop);
        h.join().unwrap();
        let s = script.lock();
        assert_eq!((s.looks, s.flushes), (0, 1), "a round ran before the stop");
        assert_eq!(s.flushed.len(), 1);
        assert_eq!((s.flushed[0].bytes_down, s.flushed[0].open_now), (42, 1));
    }

    #[test]
    fn with_nobody_connected_a_second_flushes_nothing() {
        let script = Arc::new(Mutex::new(Script::default()));
        script.lock().users = (0..1000).map(|i| user(&format!("u{i}"))).collect();
        script.lock().changes.push_back(Changed::All);
        let stop = Stop::new();
        let (dir, h) = start(&script, &stop);
        // Five looks: more than a flush interval went by.
        assert!(wait_until(|| script.lock().looks >= 5));
        assert_eq!(dir.len(), 1000);
        stop.stop();
        h.join().unwrap();
        let s = script.lock();
        assert_eq!(
            s.flushes,
            0,
            "flushed {} deltas of idle users",
            s.flushed.len()
        );
        // Logged in and connected: that user alone is flushed, every second.
        drop(s);
        let (dir, slot) = connected();
        let stop = Stop::new();
        let (_dir, h) = start_on(dir, &script, &stop);
        assert!(wait_until(|| script.lock().flushes >= 2));
        stop.stop();
        h.join().unwrap();
        drop(slot);
        let s = script.lock();
        assert!(
            s.flushed.iter().all(|d| d.account_id == 1),
            "{:?}",
            s.flushed
        );
    }

    #[test]
    fn a_change_naming_users_reloads_the_directory() {
        let script = Arc::new(Mutex::new(Script::default()));
        script.lock().users = vec![user("a")];
        script
            .lock()
            .changes
            .push_back(Changed::Users(vec!["a".into()]));
        let stop = Stop::new();
        let (dir, h) = start(&script, &stop);
        assert!(wait_until(|| dir.len() == 1), "the change was not applied");
        stop.stop();
        h.join().unwrap();
        assert_eq!(
            script.lock().flushes,
            0,
            "nobody logged in: nothing to flush"
        );
    }

    #[test]
    fn a_failed_reload_is_tried_again_without_another_change() {
        let script = Arc::new(Mutex::new(Script::default()));
        script.lock().users = vec![user("a")];
        script.lock().fail_load = true;
        script.lock().changes.push_back(Changed::All);
        let stop = Stop::new();
        let (dir, h) = start(&script, &stop);
        assert!(wait_until(|| script.lock().loads >= 1));
        script.lock().fail_load = false;
        assert!(
            wait_until(|| dir.len() == 1),
            "the change was forgotten after a failed reload"
        );
        stop.stop();
        h.join().unwrap();
    }
}
