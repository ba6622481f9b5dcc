//! Child processes under test (the Sluice server, `sluice local`, reference proxies): spawning them
//! so they cannot outlive the benchmark, waiting until they listen, and reading their CPU time,
//! resident memory and thread count from /proc.
//!
//! What the children do and how they are configured is left to `proxies.rs` and `peers.rs`.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Pause between readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Bytes of a child's log quoted when it fails to start.
const LOG_TAIL: usize = 600;

/// A child process in its own process group, killed with the whole group when dropped (on normal
/// exit, on error and on panic alike). It also gets SIGKILL if the benchmark dies without
/// unwinding: the kernel sends PDEATHSIG when the *thread* that spawned it ends, so children are
/// spawned from the main thread only.
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    ///
    /// # Errors
    /// The log cannot be created or the program cannot be started.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> Result<Proc, String> {
        let out = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls a TCP connect to `addr` until it succeeds, the process exits, or `limit` passes.
    ///
    /// # Errors
    /// The process exited or never listened; the message quotes the end of its log.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    self.name,
                    self.log_tail()
                ));
            }
            if TcpStream::connect_timeout(&addr, PROBE_EVERY).is_ok() {
                return Ok(());
            }
            thread::sleep(PROBE_EVERY);
        }
        Err(format!(
            "{} not listening on {addr} after {limit:?}: {}",
            self.name,
            self.log_tail()
        ))
    }

    /// If the process has exited: its status and the first line of its log that says why (a
    /// panic or fatal error), else the end of its log.
    pub fn exit_note(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let why = text
            .lines()
            .skip_while(|l| !l.contains("panicked at") && !l.contains("fatal"))
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let why = if why.is_empty() { self.log_tail() } else { why };
        Some(format!("{} exited ({status}): {why}", self.name))
    }

    /// The last few hundred bytes of the child's log, on one line.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].trim().replace('\n', " | ")
    }

    /// CPU seconds (user + system) used so far by every live process of the child's group, so a
    /// forking proxy (dante) is counted whole.
    pub fn cpu_secs(&self) -> Option<f64> {
        group_cpu_secs(self.pid())
    }

    /// Memory mappings of the child (each thread costs a few; the kernel caps them per process
    /// at vm.max_map_count).
    pub fn map_count(&self) -> Option<usize> {
        fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .ok()
            .map(|m| m.lines().count())
    }

    /// Resident memory (KiB) and thread count of the child itself.
    pub fn rss_threads(&self) -> Option<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some((field("VmRSS:")?, field("Threads:")?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group id is the child's pid (process_group(0)); a negative pid signals the group.
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory effects; the group is ours and not yet reaped.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) used so far by this process, all threads.
pub fn own_cpu_secs() -> Option<f64> {
    stat_fields(std::process::id()).map(|(_, t)| t as f64 / clock_ticks())
}

/// Clock ticks per second for /proc's CPU fields.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Sums utime + stime over the live processes whose process group is `pgid`.
fn group_cpu_secs(pgid: u32) -> Option<f64> {
    let mut ticks = stat_fields(pgid).map(|f| f.1)?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok());
        match pid.filter(|&p| p != pgid).and_then(stat_fields) {
            Some((group, t)) if group == pgid => ticks += t,
            _ => {}
        }
    }
    Some(ticks as f64 / clock_ticks())
}

/// (process group, utime + stime in ticks) from /proc/PID/stat.
fn stat_fields(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) pgrp(2) … utime(11) stime(12).
    let pgrp = f.get(2)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((pgrp, utime + stime))
}

/// Ports the benchmark listens on (its origin) or lets a child listen on: below Linux's ephemeral
/// range (32768–60999). Tens of thousands of short connections leave sockets in TIME_WAIT on
/// ephemeral ports, which makes `bind(port 0)` fail (and squid, which does not set SO_REUSEADDR,
/// fails to bind even a port that looks free).
const LISTEN_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback listener on a free port of [`LISTEN_PORTS`].
///
/// # Errors
/// No port in the range could be bound.
pub fn bind_low() -> Result<TcpListener, String> {
    // Start somewhere different each call so concurrent benchmarks and tests rarely collide.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let span = u32::from(LISTEN_PORTS.end - LISTEN_PORTS.start);
    let first = nanos.wrapping_mul(2_654_435_761) % span;
    for i in 0..span {
        // Below `span`, which fits in u16.
        let port = LISTEN_PORTS.start + ((first + i) % span) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l);
        }
    }
    Err(format!("no free port in {LISTEN_PORTS:?}"))
}

/// A loopback address free right now (bound and released) for a child to listen on.
///
/// # Errors
/// No port in the range could be bound.
pub fn free_addr() -> Result<SocketAddr, String> {
    bind_low()?
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))
}

/// A scratch directory removed with its contents when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `sluice-bench-PID` under the system temp dir, world-readable so a proxy that drops
    /// privileges (squid) can read its files there.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new() -> Result<TempDir, String> {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // SLUICE_BENCH_KEEP=1 keeps the logs and configs for a look after the run.
        if std::env::var_os("SLUICE_BENCH_KEEP").is_some() {
            eprintln!("sluice-bench: kept {}", self.0.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Raises this process's soft open-files limit to the hard one; returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    sluice::net::os::raise_nofile_limit()
}
