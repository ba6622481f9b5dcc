//! Admission of connections still in their handshake: at most so many per source and so many in
//! all, so idle or slow handshakes cannot fill the global connection cap and logged-in users
//! always have room. A slot is a guard that gives itself back when dropped.
//!
//! The cap on all connections is the accept loop's (`accept.rs`); this file only counts
//! handshakes. Sources (an IPv4 address or an IPv6 /64) are `source.rs`'s, shared with the login
//! throttle.

use crate::net::source::Source;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshakes one source may have going at once by default: `sluice local` opens dozens at once.
pub const DEFAULT_PER_SOURCE: usize = 64;

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The source has its share of handshakes going.
    Source,
    /// The server has its share of handshakes going.
    All,
}

impl Full {
    /// The label the metrics count it under.
    pub fn label(self) -> &'static str {
        match self {
            Full::Source => "per_source",
            Full::All => "total",
        }
    }
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Full::Source => "too many handshakes from this source (--max-handshakes-per-source)",
            Full::All => "too many handshakes in progress (--max-handshakes)",
        })
    }
}

#[derive(Default)]
struct Counts {
    all: usize,
    by_source: HashMap<Source, usize>,
}

/// Counts the handshakes going on.
pub struct Handshakes {
    per_source: usize,
    total: usize,
    counts: Mutex<Counts>,
    /// When a refusal was last logged, and how many since.
    shed: Mutex<(Option<Instant>, u64)>,
}

/// Refusals are logged at most this often (with a count), so a flood cannot flood the log.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// One admitted handshake; dropping it gives the slot back.
pub struct HandshakeSlot<'a> {
    owner: &'a Handshakes,
    src: Source,
}

impl Handshakes {
    /// At most `per_source` handshakes from one source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Handshakes {
        Handshakes {
            per_source,
            total,
            counts: Mutex::new(Counts::default()),
            shed: Mutex::new((None, 0)),
        }
    }

    /// Admits a handshake from `ip`, or says which cap is full.
    ///
    /// # Errors
    /// [`Full`] naming the cap.
    pub fn admit(&self, ip: IpAddr) -> Result<HandshakeSlot<'_>, Full> {
        let src = Source::of(ip);
        let mut c = self.counts.lock();
        if c.all >= self.total {
            return Err(Full::All);
        }
        let mine = c.by_source.entry(src).or_insert(0);
        if *mine >= self.per_source {
            return Err(Full::Source);
        }
        *mine += 1;
        c.all += 1;
        Ok(HandshakeSlot { owner: self, src })
    }

    /// Notes a refusal at `now`; returns how many were refused since the last log line when one
    /// is due ([`LOG_EVERY`]).
    pub fn note_refusal(&self, now: Instant) -> Option<u64> {
        let mut shed = self.shed.lock();
        shed.1 += 1;
        if shed
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return None;
        }
        let n = shed.1;
        *shed = (Some(now), 0);
        Some(n)
    }

    /// Handshakes going on now.
    pub fn in_progress(&self) -> usize {
        self.counts.lock().all
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock();
        c.all = c.all.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_in_all_and_slots_come_back_on_drop() {
        let h = Handshakes::new(2, 3);
        let a1 = h.admit(ip("192.0.2.1")).unwrap();
        let a2 = h.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(h.admit(ip("192.0.2.1")).err(), Some(Full::Source));
        // One IPv6 host holds a /64.
        let b = h.admit(ip("2001:db8::1")).unwrap();
        assert_eq!(h.admit(ip("192.0.2.9")).err(), Some(Full::All));
        drop(a1);
        assert_eq!(h.in_progress(), 2);
        let a3 = h.admit(ip("192.0.2.1")).unwrap();
        drop((a2, a3, b));
        assert_eq!(h.in_progress(), 0);
        assert!(h.counts.lock().by_source.is_empty());
        let b2 = h.admit(ip("2001:db8::1")).unwrap();
        assert_eq!(h.admit(ip("2001:db8::2")).map(|_| ()), Ok(()));
        drop(b2);
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let h = Handshakes::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(h.note_refusal(t0), Some(1));
        assert_eq!(h.note_refusal(t0), None);
        assert_eq!(h.note_refusal(t0 + Duration::from_millis(500)), None);
        assert_eq!(h.note_refusal(t0 + LOG_EVERY), Some(3));
    }
}
