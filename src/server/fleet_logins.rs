//! The fleet's shared login throttle (issue 21): once a second this thread sends the server's
//! login outcomes to Redis and raises its throttle's counts to the fleet's totals, for the
//! (source, user) pairs it sent and for those with failures here in the last
//! [`FORGET_AFTER`]. A guesser spreading its tries over servers is then counted (and blocked,
//! with doubling blocks) as one server would count it, a second of propagation aside. Logins
//! never wait on it: a Redis that is down leaves each server counting on its own.

use crate::auth::login::{FleetEvent, FleetEventKind, Logins};
use crate::auth::throttle::{FORGET_AFTER, Source};
use crate::stop::Stop;
use crate::store::RedisSpec;
use crate::store::redis::throttle::{Report, SharedFailures};
use crossbeam_channel::{select, tick};
use log::{info, warn};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How often outcomes are shared and totals read.
pub const SHARE_INTERVAL: Duration = Duration::from_secs(1);
/// (source, user) pairs followed at most; the least recently failed are dropped past it.
pub const MAX_WATCHED: usize = 1024;

/// Starts the thread; it ends when `stop` is given.
///
/// # Errors
/// The thread could not be spawned.
pub fn spawn(
    logins: Arc<Logins>,
    spec: RedisSpec,
    stop: &Stop,
) -> std::io::Result<thread::JoinHandle<()>> {
    logins.share_with_fleet();
    let stop = stop.receiver();
    thread::Builder::new()
        .name("fleet logins".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut s = Sharer {
                shared: SharedFailures::new(spec, FORGET_AFTER.as_secs()),
                watched: HashMap::new(),
                failing: false,
            };
            let t = tick(SHARE_INTERVAL);
            loop {
                select! {
                    recv(t) -> _ => s.round(&logins),
                    recv(stop) -> _ => break,
                }
            }
        })
}

struct Sharer {
    shared: SharedFailures,
    /// (source, raw user name) → when it last failed here.
    watched: HashMap<(Source, Vec<u8>), Instant>,
    /// A failure was logged; the next success is logged too.
    failing: bool,
}

impl Sharer {
    fn round(&mut self, logins: &Logins) {
        let events = logins.take_fleet_events();
        let now = Instant::now();
        for e in &events {
            let key = (e.source, e.user.clone());
            match e.kind {
                FleetEventKind::Verified => {
                    self.watched.remove(&key);
                }
                _ => {
                    self.watched.insert(key, now);
                }
            }
        }
        self.watched
            .retain(|_, t| now.saturating_duration_since(*t) < FORGET_AFTER);
        if self.watched.len() > MAX_WATCHED {
            let mut ages: Vec<Instant> = self.watched.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[self.watched.len() - MAX_WATCHED];
            self.watched.retain(|_, t| *t >= cut);
        }
        let result = self.share(logins, &events);
        match result {
            Ok(()) if self.failing => {
                info!("the fleet's login counts are shared again");
                self.failing = false;
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                warn!("cannot share login counts with the fleet ({e}); counting here alone");
                self.failing = true;
            }
            Err(_) => {}
        }
    }

    /// Sends the outcomes, then reads the totals of every pair followed and raises the
    /// throttle's counts to them.
    fn share(&mut self, logins: &Logins, events: &[FleetEvent]) -> crate::error::Result<()> {
        let name = |u: &[u8]| String::from_utf8_lossy(u).into_owned();
        let reports: Vec<Report> = events
            .iter()
            .map(|e| match e.kind {
                FleetEventKind::Verified => Report::Verified {
                    source: e.source.to_string(),
                    user: name(&e.user),
                },
                k => Report::Failed {
                    source: e.source.to_string(),
                    user: name(&e.user),
                    pair_only: k == FleetEventKind::WrongPairOnly,
                },
            })
            .collect();
        self.shared.publish(&reports)?;
        if self.watched.is_empty() {
            return Ok(());
        }
        let keys: Vec<(Source, Vec<u8>)> = self.watched.keys().cloned().collect();
        let pairs: Vec<(String, String)> =
            keys.iter().map(|(s, u)| (s.to_string(), name(u))).collect();
        let totals = self.shared.totals(&pairs)?;
        for ((source, user), (s, p)) in keys.iter().zip(totals) {
            logins.import_fleet(*source, user, s, p);
        }
        Ok(())
    }
}
