//! What every connection thread of `sluice local` reads: the server and the account to log in
//! with, the timeouts, the accept loop's state, and the two failure bursts (server unreachable,
//! login refused) that are logged once per burst rather than once per connection.
//!
//! `mod.rs` builds it at start; `conn.rs` reads it for every app connection.

use crate::local::upstream::Login;
use crate::net::accept::Intake;
use crate::wire::target::Target;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A recurring failure (server unreachable, login refused) is logged at most this often.
pub const BURST_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts a recurring failure and says when to log it: the first one at once, then at most once
/// per [`BURST_LOG_INTERVAL`], with the number that went unlogged in between.
#[derive(Default)]
pub(crate) struct Burst {
    state: Mutex<BurstState>,
}

#[derive(Default)]
struct BurstState {
    /// When the last line was logged; `None` when no burst is under way.
    logged: Option<Instant>,
    /// Failures since that line.
    unlogged: u64,
}

impl Burst {
    /// Records one failure at `now`. `Some(n)`: log this one, mentioning the `n` failures before
    /// it that were not logged; `None`: stay quiet.
    pub fn record(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match s.logged {
            Some(t) if now.saturating_duration_since(t) < BURST_LOG_INTERVAL => {
                s.unlogged += 1;
                None
            }
            _ => {
                s.logged = Some(now);
                Some(std::mem::take(&mut s.unlogged))
            }
        }
    }

    /// Ends a burst after a success. `Some(n)` if one was under way, with its unlogged failures,
    /// so the recovery can be logged; the next failure is then logged at once.
    pub fn settle(&self) -> Option<u64> {
        let mut s = self.state.lock();
        s.logged.take().map(|_| std::mem::take(&mut s.unlogged))
    }
}

/// State every connection thread reads.
pub(crate) struct LocalShared {
    /// The server, parsed from `LocalConfig::server` (a name stays unresolved until dialing).
    pub server: Target,
    pub user: String,
    pub password: String,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// The server could not be reached.
    pub unreachable: Burst,
    /// The server refused the login.
    pub rejected: Burst,
    /// TLS to the server: the client config and the name its certificate must carry.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The accept loop's state; past its cap (from the open-files limit) new app connections
    /// are closed at once.
    pub intake: Intake,
}

impl LocalShared {
    /// How to log in to the server, for one tunnel.
    pub fn login(&self) -> Login<'_> {
        Login {
            server: &self.server,
            user: &self.user,
            password: &self.password,
            connect_timeout: self.connect_timeout,
            tls: self.tls.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_logs_first_then_once_per_interval_with_count() {
        let b = Burst::default();
        let t0 = Instant::now();
        assert_eq!(b.record(t0), Some(0));
        assert_eq!(b.record(t0 + Duration::from_secs(1)), None);
        assert_eq!(b.record(t0 + Duration::from_secs(9)), None);
        assert_eq!(b.record(t0 + BURST_LOG_INTERVAL), Some(2));
        assert_eq!(b.record(t0 + BURST_LOG_INTERVAL), None);
        assert_eq!(b.settle(), Some(1));
        // After a success the next failure is news again.
        assert_eq!(b.settle(), None);
        assert_eq!(b.record(t0 + BURST_LOG_INTERVAL), Some(0));
    }
}
