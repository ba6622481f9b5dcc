//! A logged-in user as the relays see it: the live rate, a revoked flag, the open connections
//! (so a deleted user's sockets can be shut), and counters. Shared as `Arc<Account>`.
//!
//! Everything here is atomics or a short lock never held across I/O; the relay path reads the rate
//! with one relaxed load, which is all an unlimited user pays.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One user's runtime state.
pub struct Account {
    /// The login name; also the limiter's key.
    pub name: Arc<str>,
    rate: AtomicU64,
    revoked: AtomicBool,
    conns: Mutex<HashMap<u64, Vec<TcpStream>>>,
    /// Bytes forwarded client → destination.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded destination → client.
    pub bytes_down: AtomicU64,
    /// Connections opened since start.
    pub opened: AtomicU64,
    /// Nanoseconds relays spent waiting for tokens.
    pub throttled_ns: AtomicU64,
}

impl Account {
    /// A new account with a rate in bytes per second (0 = unlimited).
    pub fn new(name: &str, rate: u64) -> Arc<Account> {
        Arc::new(Account {
            name: Arc::from(name),
            rate: AtomicU64::new(rate),
            revoked: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        })
    }

    /// The current rate (bytes per second, 0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate seen by the relays' fast path (the limiter's bucket is set separately).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// True once the user was deleted.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Registers an open connection's sockets so [`Account::revoke`] can shut them.
    /// Returns false (and registers nothing) if the account is already revoked.
    pub fn register(&self, id: u64, sockets: Vec<TcpStream>) -> bool {
        let mut conns = self.conns.lock();
        // Checked under the lock so a revoke cannot slip between the check and the insert.
        if self.is_revoked() {
            return false;
        }
        conns.insert(id, sockets);
        self.opened.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Forgets a connection that ended.
    pub fn unregister(&self, id: u64) {
        self.conns.lock().remove(&id);
    }

    /// Marks the user deleted and shuts every open connection's sockets, which ends their relays.
    pub fn revoke(&self) {
        let conns = {
            let mut c = self.conns.lock();
            self.revoked.store(true, Ordering::Relaxed);
            std::mem::take(&mut *c)
        };
        for s in conns.values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Account {
    /// Shuts every open connection's sockets without revoking the user (server shutdown).
    pub fn close_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        for s in conns.values().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
