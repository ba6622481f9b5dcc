//! What every scenario works with: the run's durations ([`Config`]) and its stage ([`Ctx`]).
//! Its own file so that both crate roots (`bench.rs`, the benchmark, and `units.rs`, its unit
//! tests) share it.

use crate::origin::Endpoint;
use crate::peers::Peer;
use crate::procs::TempDir;
use crate::proxies::Server;
use crate::table::Table;
use std::path::PathBuf;
use std::time::Duration;

/// Durations and repetitions: the full run takes about 15 minutes on 2 cores; `--quick` is a smoke
/// test.
#[derive(Debug, Clone)]
pub struct Config {
    /// Runs per figure (the median of these is reported).
    pub runs: usize,
    /// Runs per figure of the throughput scenarios (1–3): their 1 s windows on 2 cores swing
    /// about ±15% run to run (the floor against a copy of itself: 0.87–1.16 × as a median of 3),
    /// too much for a median of 3 to settle a 5–10% target.
    pub tput_runs: usize,
    /// Time a load runs before its window opens (connection set-up, TCP ramp-up).
    pub warmup: Duration,
    /// Window of a throughput measurement (scenarios 1–3).
    pub tput: Duration,
    /// Length of the set-up scenario (4).
    pub setup: Duration,
    /// Window of the limiter-accuracy scenario (5).
    pub accuracy: Duration,
    /// Window of the fairness scenario (6).
    pub fairness: Duration,
    /// Windows of the isolation scenario (9), alone and flooded.
    pub isolation: Duration,
    /// How long the joining scenario (8) watches the new connection.
    pub join_observe: Duration,
    /// How long the live-change scenario (10) watches after the change.
    pub live_observe: Duration,
    /// Window of the limiter-cost scenario (11).
    pub cost: Duration,
    /// Idle tunnels held by the scale scenario (12), in two steps.
    pub scale: [usize; 2],
}

impl Config {
    /// The full run (`make bench`).
    pub fn full() -> Config {
        Config {
            runs: 3,
            tput_runs: 9,
            warmup: Duration::from_millis(200),
            tput: Duration::from_secs(1),
            setup: Duration::from_millis(1500),
            accuracy: Duration::from_secs(10),
            fairness: Duration::from_secs(5),
            isolation: Duration::from_millis(1500),
            join_observe: Duration::from_millis(1500),
            live_observe: Duration::from_secs(3),
            cost: Duration::from_secs(5),
            scale: [1000, 9000],
        }
    }

    /// `--quick`: every scenario once, briefly.
    pub fn quick() -> Config {
        Config {
            runs: 1,
            tput_runs: 1,
            warmup: Duration::from_millis(100),
            tput: Duration::from_millis(500),
            setup: Duration::from_secs(1),
            accuracy: Duration::from_secs(2),
            fairness: Duration::from_secs(1),
            isolation: Duration::from_secs(1),
            join_observe: Duration::from_secs(1),
            live_observe: Duration::from_secs(2),
            cost: Duration::from_secs(1),
            scale: [1000, 9000],
        }
    }
}

/// What every scenario works with.
pub struct Ctx {
    /// Durations and repetitions.
    pub cfg: Config,
    /// Scratch space: database, configs, logs.
    pub dir: TempDir,
    /// The `sluice` binary.
    pub bin: PathBuf,
    /// The server most scenarios share (scale starts its own).
    pub server: Option<Server>,
    /// Reference proxies that started.
    pub peers: Vec<Peer>,
    /// Where tunnels go to log a user in without moving a byte.
    pub echo: Endpoint,
    /// The results.
    pub table: Table,
}

impl Ctx {
    /// The shared server.
    ///
    /// # Errors
    /// It is not running (it failed to start or was stopped for the scale scenario).
    pub fn server(&self) -> Result<&Server, String> {
        self.server.as_ref().ok_or_else(|| "no server".to_string())
    }
}
