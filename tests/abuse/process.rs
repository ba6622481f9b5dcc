//! `sluice server` in its own process, for the tests that count its threads, open files and
//! memory (from /proc/PID, which no other test touches), read its log, limit its open files, or
//! kill it with SIGKILL.

use crate::support::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Longest a server process may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `sluice server` process on 127.0.0.1 (a free port), killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts `sluice server --listen 127.0.0.1:0 --db DB --allow-private EXTRA...` with
    /// RUST_LOG=info and waits until it listens.
    pub fn start(db: &Path, extra: &[&str]) -> ServerProcess {
        Self::start_limited(db, extra, None)
    }

    /// As [`ServerProcess::start`], with RLIMIT_NOFILE (soft and hard) set to `nofile` before
    /// the program runs: the server raises its soft limit to the hard one, so both must be set.
    pub fn start_limited(db: &Path, extra: &[&str], nofile: Option<u64>) -> ServerProcess {
        let mut cmd = sluice_command();
        cmd.args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--allow-private",
            "--db",
        ])
        .arg(db)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
            // async-signal-safe, on a struct it owns.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("cannot start sluice server");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(a) = rest.split_whitespace().next()
                    && let Ok(a) = a.parse::<SocketAddr>()
                {
                    let _ = tx.send(a);
                }
                lines.lock().push(line);
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start: {:?}", log.lock());
            }
        };
        ServerProcess { child, addr, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Threads of the process now.
    pub fn threads(&self) -> usize {
        count_dir(&format!("/proc/{}/task", self.pid()))
    }

    /// The names of the process's threads now.
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                    .map(|n| n.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Open file descriptors of the process now.
    pub fn fds(&self) -> usize {
        count_dir(&format!("/proc/{}/fd", self.pid()))
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("server process gone");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the process used so far, from /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at state (field 3).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads no memory of ours.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Log lines holding `needle` so far.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// The whole log so far, for failure messages.
    pub fn log_text(&self) -> String {
        self.log.lock().join("\n")
    }

    /// Polls the log for a line holding `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || !self.log_lines(needle).is_empty())
    }

    /// SIGKILL, then reaps the process.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .count()
}
