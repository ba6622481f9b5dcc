//! A stop signal for the periodic threads (the limiter's refill tick, the database watcher):
//! each waits in `crossbeam_channel::select!` on its `tick(..)` and on [`Stop::receiver`], so it
//! says what it waits for and ends at once when [`Stop::stop`] is called, instead of sleeping and
//! polling a flag. (A blocked `accept` is still woken by connecting to it; see `net::accept`.)

use crossbeam_channel::{Receiver, Sender, bounded};
use parking_lot::Mutex;

/// Fires once for every receiver, forever after: stopping drops the only sender, and a
/// disconnected channel is ready to every `select!` that waits on it.
pub struct Stop {
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop::new()
    }
}

impl Stop {
    /// A signal not yet given.
    pub fn new() -> Stop {
        let (tx, rx) = bounded(0);
        Stop {
            tx: Mutex::new(Some(tx)),
            rx,
        }
    }

    /// A receiver that becomes ready (disconnected) once [`Stop::stop`] was called.
    pub fn receiver(&self) -> Receiver<()> {
        self.rx.clone()
    }

    /// Gives the signal; later calls do nothing.
    pub fn stop(&self) {
        self.tx.lock().take();
    }

    /// Whether the signal was given.
    pub fn is_stopped(&self) -> bool {
        self.tx.lock().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{select, tick};
    use std::time::Duration;

    #[test]
    fn a_stop_wakes_every_waiter_at_once() {
        let stop = std::sync::Arc::new(Stop::new());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let rx = stop.receiver();
                std::thread::spawn(move || {
                    let ticks = tick(Duration::from_secs(3600));
                    select! {
                        recv(ticks) -> _ => false,
                        recv(rx) -> _ => true,
                    }
                })
            })
            .collect();
        assert!(!stop.is_stopped());
        stop.stop();
        stop.stop();
        assert!(stop.is_stopped());
        for w in waiters {
            assert!(
                w.join().unwrap(),
                "woken by the stop, not the hour-long tick"
            );
        }
    }
}
