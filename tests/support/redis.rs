//! A real `redis-server` (the distribution's package) for the fleet tests: started on a free
//! loopback port in a throwaway directory with `--appendonly yes`, so a restart on the same files
//! keeps what was written, as a real deployment does; stopped (and its directory removed) on drop.
//! A missing `redis-server` fails the test with a line saying how to install it, never a skip.

use super::{TempDir, free_port, wait_until};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a start or a restart may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A cluster node also listens on its port + this, for the cluster bus.
const CLUSTER_BUS_OFFSET: u16 = 10_000;
/// Ports tried for a fresh server before the test fails: a port found free can be taken by
/// another test's socket before `redis-server` binds it.
const START_TRIES: usize = 5;

/// A running (or stopped) `redis-server` on 127.0.0.1.
pub struct Redis {
    pub port: u16,
    pub dir: TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

/// The `redis-server` binary, or a panic naming the package.
fn binary() -> &'static str {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "redis-server not found: the fleet tests need it; install it with \
         `apt-get install redis-server` (`make test` does this when run as root)"
    );
    "redis-server"
}

impl Redis {
    /// Starts a fresh server on a free loopback port.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts a fresh server with extra `--option value` arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> Redis {
        let cluster = extra.contains(&"--cluster-enabled");
        let mut r = Redis {
            port: 0,
            dir: TempDir::new("redis"),
            child: None,
            extra: extra.iter().map(|s| (*s).to_string()).collect(),
        };
        for _ in 1..START_TRIES {
            r.port = pick_port(cluster);
            if r.try_launch() {
                return r;
            }
            r.kill();
        }
        r.port = pick_port(cluster);
        r.launch();
        r
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Starts `redis-server` on `self.port`; true once it answers, false if it exited (its port
    /// was taken meanwhile) or did not answer in time.
    fn try_launch(&mut self) -> bool {
        self.spawn();
        wait_until(START_TIMEOUT, || {
            self.try_cmd(&["PING"]).is_some()
                || self
                    .child
                    .as_mut()
                    .is_none_or(|c| c.try_wait().ok().flatten().is_some())
        }) && self.try_cmd(&["PING"]).is_some()
    }

    fn launch(&mut self) {
        self.spawn();
        let up = wait_until(START_TIMEOUT, || self.try_cmd(&["PING"]).is_some());
        assert!(
            up,
            "redis-server did not answer on port {} within {START_TIMEOUT:?}: {}",
            self.port,
            std::fs::read_to_string(self.dir.path("redis.log")).unwrap_or_default()
        );
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(binary());
        cmd.current_dir(&self.dir.0)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.0.to_string_lossy()])
            .args(["--appendonly", "yes", "--save", ""])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.child = Some(child);
    }

    /// Kills the server at once (SIGKILL: no last save beyond what the append-only file has).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and files (after [`Redis::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Sends one command (RESP, arguments as bulk strings) and returns the reply as text, `None`
    /// when the server cannot be reached. Replies: `+OK` → "OK", `:3` → "3", bulk → its text,
    /// nil → "(nil)", `-ERR …` → "ERR …", arrays → elements joined by '\n'.
    pub fn try_cmd(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        read_reply(&mut r)
    }

    /// [`Redis::try_cmd`] that panics when the server cannot be reached.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|| panic!("redis on port {} did not answer {args:?}", self.port))
    }
}

/// A free loopback port; for a cluster node, one whose bus port (+10,000) is a port and free too
/// (ephemeral ports reach 60999 here, and a node on 55536 or above cannot start).
fn pick_port(cluster: bool) -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if !cluster {
            return port;
        }
        let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port with a free cluster bus port in 100 tries");
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1)?;
    match kind {
        "+" | "-" | ":" => Some(rest.to_string()),
        "$" => {
            let n: i64 = rest.parse().ok()?;
            if n < 0 {
                return Some("(nil)".into());
            }
            let mut buf = vec![0; usize::try_from(n).ok()? + 2];
            r.read_exact(&mut buf).ok()?;
            buf.truncate(buf.len() - 2);
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().ok()?;
            let mut parts = Vec::new();
            for _ in 0..n.max(0) {
                parts.push(read_reply(r)?);
            }
            Some(parts.join("\n"))
        }
        _ => None,
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
