//! Sluice under test: the temporary user database, the `sluice server` and `sluice local`
//! processes, and the routes clients take through them. The reference proxies are in `peers.rs`.

use crate::client::Route;
use crate::procs::{Proc, TempDir, free_addr};
use sluice::auth::hash_password;
use sluice::store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Every benchmark user's password (hashed once: argon2 is slow and the hash is per-row anyway).
pub const PASSWORD: &str = "bench-pw";
/// The unlimited user of the throughput, set-up and scale scenarios.
pub const UNLIMITED: &str = "bench";
/// How long a process may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A user to create: name and bandwidth in bytes per second (0 = unlimited).
pub type User = (String, u64);

/// The `sluice` binary Cargo built for this benchmark (`CARGO_BIN_EXE_sluice`, set when a bench
/// target is compiled).
///
/// # Errors
/// The binary is not there (deleted since the build).
pub fn sluice_bin() -> Result<PathBuf, String> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it first (`cargo build --release`)",
            bin.display()
        ))
    }
}

/// Creates the database at `path` holding `users`, all with [`PASSWORD`].
///
/// # Errors
/// The store cannot be created or a user added.
pub fn make_db(path: &Path, users: &[User]) -> Result<(), String> {
    let store = store::open(path, true).map_err(|e| e.to_string())?;
    let hash = hash_password(PASSWORD).map_err(|e| e.to_string())?;
    for (name, bw) in users {
        store
            .add(name, &hash, *bw)
            .map_err(|e| format!("add {name}: {e}"))?;
    }
    Ok(())
}

/// A running `sluice server`.
pub struct Server {
    /// The process (CPU, RSS and threads are read from it).
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its database, for live changes by plain SQL.
    pub db: PathBuf,
}

impl Server {
    /// Starts `sluice server` on a free loopback port with `db`, allowing loopback destinations
    /// (the origin). Its log (default level, as deployed) goes to `TAG.log` in `dir`.
    ///
    /// # Errors
    /// It did not start listening; the message quotes its log.
    pub fn start(bin: &Path, db: &Path, dir: &TempDir, tag: &str) -> Result<Server, String> {
        Self::start_with(bin, db, dir, tag, &[])
    }

    /// As [`Server::start`], with extra arguments (e.g. `--tls-cert`, `--tls-key`).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start_with(
        bin: &Path,
        db: &Path,
        dir: &TempDir,
        tag: &str,
        extra: &[String],
    ) -> Result<Server, String> {
        let addr = free_addr()?;
        let mut cmd = Command::new(bin);
        cmd.arg("server")
            .arg("--db")
            .arg(db)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--allow-private")
            .args(extra);
        let mut proc = Proc::spawn(cmd, "sluice server", &dir.path(&format!("{tag}.log")))?;
        proc.wait_listening(addr, START_LIMIT)?;
        Ok(Server {
            proc,
            addr,
            db: db.to_path_buf(),
        })
    }

    /// The SOCKS5 route for `user`.
    pub fn route(&self, user: &str) -> Route {
        Route::socks(self.addr, user, PASSWORD)
    }
}

/// A running `sluice local` logged in to `server` as `user`.
pub struct Local {
    /// The process.
    pub proc: Proc,
    /// Where apps connect (SOCKS5 without credentials).
    pub addr: SocketAddr,
}

impl Local {
    /// Starts `sluice local` (the password through SLUICE_PASSWORD, as a user would).
    ///
    /// # Errors
    /// It exited or did not listen; the message quotes its log.
    pub fn start(
        bin: &Path,
        server: SocketAddr,
        user: &str,
        dir: &TempDir,
    ) -> Result<Local, String> {
        Self::start_with(bin, server, user, dir, "local", &[])
    }

    /// As [`Local::start`], logging to `TAG.log`, with extra arguments (e.g. `--tls`).
    ///
    /// # Errors
    /// As [`Local::start`].
    pub fn start_with(
        bin: &Path,
        server: SocketAddr,
        user: &str,
        dir: &TempDir,
        tag: &str,
        extra: &[String],
    ) -> Result<Local, String> {
        let addr = free_addr()?;
        let mut cmd = Command::new(bin);
        cmd.arg("local")
            .arg("--server")
            .arg(server.to_string())
            .arg("--user")
            .arg(user)
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .env("SLUICE_PASSWORD", PASSWORD);
        let mut proc = Proc::spawn(cmd, "sluice local", &dir.path(&format!("{tag}.log")))?;
        proc.wait_listening(addr, START_LIMIT)?;
        Ok(Local { proc, addr })
    }

    /// The route apps take: SOCKS5 without credentials.
    pub fn route(&self) -> Route {
        Route::Socks5 {
            proxy: self.addr,
            auth: None,
        }
    }
}
