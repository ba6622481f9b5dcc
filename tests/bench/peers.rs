//! The reference proxies, where installed (`make bench-peers` installs the Debian packages):
//! microsocks (SOCKS5, username/password), squid (HTTP CONNECT, Basic auth checked by
//! basic_ncsa_auth) and dante (SOCKS5, method "none": its username method
//! checks system accounts, and adding one to this machine for a benchmark is too invasive).
//! Each runs as a child process with a config written to the scratch directory.
//!
//! Two more are built from source outside the repository and found through the environment:
//! 3proxy 1.0.0 (`THREEPROXY_BIN`: its `bin/3proxy`, SOCKS5 with `auth strong`) and the floor,
//! `../shared/bench/splicerelay.c` (`SPLICE_BIN`): a bare relay of the card's shape, a measuring
//! stick and not a contender, so it never counts as the best peer. A peer the bench cannot find is
//! listed as missing, never silently dropped.
//!
//! The pooled floor, `pooledrelay.c` beside this file, is built with `cc` at bench time: the card's
//! shape with parked threads and nothing else, the set-up scenario's measuring stick (scenario 4
//! only; it copies through a buffer, so it is no floor for throughput).

use crate::client::{Auth, Route};
use crate::procs::{Proc, TempDir, free_addr};
use crate::proxies::{PASSWORD, UNLIMITED};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a peer may take to listen (squid needs a second or two).
const START_LIMIT: Duration = Duration::from_secs(15);

/// A running reference proxy.
pub struct Peer {
    /// Its name in the table, with the auth it does.
    pub name: String,
    /// The process group (CPU is summed over it: dante forks).
    pub proc: Proc,
    /// How clients go through it.
    pub route: Route,
    /// A bare relay (`SPLICE_BIN`, the pooled floor): shown beside the proxies, never the best
    /// peer.
    pub floor: bool,
    /// Runs in the set-up scenario only (the pooled floor).
    pub setups_only: bool,
}

/// Starts every installed peer. Returns the peers that run and one line per peer for the header
/// ("microsocks 1.0.3-2", "squid: not installed", "dante: failed: …").
pub fn start_all(dir: &TempDir) -> (Vec<Peer>, Vec<String>) {
    type Start = fn(&TempDir) -> Result<Peer, String>;
    let all: [(&str, &str, &str, Start); 3] = [
        (
            "microsocks",
            "microsocks",
            "/usr/bin/microsocks",
            microsocks,
        ),
        ("squid", "squid", "/usr/sbin/squid", squid),
        ("dante", "dante-server", "/usr/sbin/danted", dante),
    ];
    let (mut peers, mut lines) = (Vec::new(), Vec::new());
    for (name, package, path, start) in all {
        if !Path::new(path).exists() {
            lines.push(format!("{name}: not installed"));
            continue;
        }
        match start(dir) {
            Ok(p) => {
                lines.push(format!("{} {}", p.name, version(package)));
                peers.push(p);
            }
            Err(e) => lines.push(format!("{name}: failed to start ({e})")),
        }
    }
    for (name, var, start) in [
        (
            "3proxy",
            "THREEPROXY_BIN",
            threeproxy as fn(&TempDir, &Path) -> Result<Peer, String>,
        ),
        ("splicerelay (floor)", "SPLICE_BIN", splicerelay),
    ] {
        let Some(bin) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
            lines.push(format!("{name}: missing (set {var})"));
            continue;
        };
        match start(dir, Path::new(&bin)) {
            Ok(p) => {
                lines.push(format!("{} ({var}={})", p.name, Path::new(&bin).display()));
                peers.push(p);
            }
            Err(e) => lines.push(format!("{name}: failed to start ({e})")),
        }
    }
    match pooled_floor(dir) {
        Ok(p) => {
            lines.push(format!(
                "{} (built with cc from tests/bench/pooledrelay.c)",
                p.name
            ));
            peers.push(p);
        }
        Err(e) => lines.push(format!("pooled floor: failed ({e})")),
    }
    (peers, lines)
}

/// The pooled floor, compiled into the scratch directory and started with the bench's user.
fn pooled_floor(dir: &TempDir) -> Result<Peer, String> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bench/pooledrelay.c");
    let bin = dir.path("pooledrelay");
    let built = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cc: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let addr = free_addr()?;
    let mut cmd = Command::new(&bin);
    cmd.args([&addr.port().to_string(), UNLIMITED, PASSWORD]);
    let mut proc = Proc::spawn(cmd, "pooledrelay", &dir.path("pooledrelay.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "pooled floor (socks5, parked threads, read/write)".into(),
        proc,
        route: Route::Socks5 {
            proxy: addr,
            auth: Some(auth()),
        },
        floor: true,
        setups_only: true,
    })
}

/// 3proxy's SOCKS5 server with one user checked in clear text (`auth strong`), no log, and
/// room for the scale of the set-up scenario.
fn threeproxy(dir: &TempDir, bin: &Path) -> Result<Peer, String> {
    let addr = free_addr()?;
    let conf = dir.path("3proxy.cfg");
    let text = format!(
        "maxconn 20000\nusers {UNLIMITED}:CL:{PASSWORD}\nauth strong\nallow {UNLIMITED}\nsocks -p{port} -i127.0.0.1\n",
        port = addr.port()
    );
    fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg(&conf);
    let mut proc = Proc::spawn(cmd, "3proxy", &dir.path("3proxy.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "3proxy 1.0.0 (socks5, user/pass)".into(),
        proc,
        route: Route::Socks5 {
            proxy: addr,
            auth: Some(auth()),
        },
        floor: false,
        setups_only: false,
    })
}

/// The floor: SOCKS5 login (its fixed user u1/p1), a thread per direction, `splice` through a
/// 1 MiB pipe, nothing else.
fn splicerelay(dir: &TempDir, bin: &Path) -> Result<Peer, String> {
    const PIPE_BYTES: &str = "1048576";
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.args([&addr.port().to_string(), PIPE_BYTES]);
    let mut proc = Proc::spawn(cmd, "splicerelay", &dir.path("splicerelay.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "splicerelay floor (socks5, 1 MiB pipes)".into(),
        proc,
        route: Route::Socks5 {
            proxy: addr,
            auth: Some(Auth {
                user: "u1".into(),
                pass: "p1".into(),
            }),
        },
        floor: true,
        setups_only: false,
    })
}

/// The Debian package version, or "" when dpkg cannot tell.
fn version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn auth() -> Auth {
    Auth {
        user: UNLIMITED.into(),
        pass: PASSWORD.into(),
    }
}

fn microsocks(dir: &TempDir) -> Result<Peer, String> {
    let addr = free_addr()?;
    let mut cmd = Command::new("/usr/bin/microsocks");
    cmd.args(["-i", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-u", UNLIMITED, "-P", PASSWORD]);
    let mut proc = Proc::spawn(cmd, "microsocks", &dir.path("microsocks.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "microsocks (socks5, user/pass)".into(),
        proc,
        route: Route::Socks5 {
            proxy: addr,
            auth: Some(auth()),
        },
        floor: false,
        setups_only: false,
    })
}

/// squid's config: no cache, no access log, no DNS or ICMP beyond loopback, Basic auth for
/// everyone. No delay pool: peers run only the unlimited scenarios (1, 2, 4), where Sluice skips
/// its limiter too, and squid 5.7's class-4 pool misbehaves on tunnels even when it should not
/// limit (with -1/-1 a CONNECT download stalls for good; with a 2 GB/s user bucket eight
/// connections crawl at 30 MB/s).
fn squid_conf(port: u16, work: &Path, passwd: &Path) -> String {
    let w = work.display();
    format!(
        "http_port 127.0.0.1:{port}
pid_filename none
cache_log {w}/cache.log
access_log none
cache deny all
cache_mem 8 MB
coredump_dir {w}
netdb_filename none
dns_nameservers 127.0.0.1
pinger_enable off
shutdown_lifetime 0 seconds
auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}
auth_param basic children 4
auth_param basic credentialsttl 2 hours
acl authed proxy_auth REQUIRED
http_access allow authed
http_access deny all
",
        passwd = passwd.display()
    )
}

fn squid(dir: &TempDir) -> Result<Peer, String> {
    // squid drops root for its own user, which must be able to write its log here.
    let work = dir.path("squid");
    fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("{}: {e}", work.display()))?;
    let hash = Command::new("openssl")
        .args(["passwd", "-1", PASSWORD])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .ok_or("cannot hash a password for basic_ncsa_auth (`openssl passwd` failed)")?;
    let passwd = work.join("passwd");
    let conf = work.join("squid.conf");
    let addr = free_addr()?;
    let write =
        |p: &Path, text: String| fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()));
    write(&passwd, format!("{UNLIMITED}:{hash}\n"))?;
    write(&conf, squid_conf(addr.port(), &work, &passwd))?;
    let mut cmd = Command::new("/usr/sbin/squid");
    cmd.arg("-N").arg("-f").arg(&conf);
    let mut proc = Proc::spawn(cmd, "squid", &work.join("stderr.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "squid (http connect, basic auth)".into(),
        proc,
        route: Route::Connect {
            proxy: addr,
            auth: auth(),
        },
        floor: false,
        setups_only: false,
    })
}

fn dante(dir: &TempDir) -> Result<Peer, String> {
    let addr = free_addr()?;
    let conf = dir.path("danted.conf");
    let text = format!(
        "logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
",
        log = dir.path("danted.out").display(),
        port = addr.port()
    );
    fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
    let mut cmd = Command::new("/usr/sbin/danted");
    cmd.arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path("danted.pid"));
    let mut proc = Proc::spawn(cmd, "danted", &dir.path("danted.log"))?;
    proc.wait_listening(addr, START_LIMIT)?;
    Ok(Peer {
        name: "dante (socks5, no auth)".into(),
        proc,
        route: Route::Socks5 {
            proxy: addr,
            auth: None,
        },
        floor: false,
        setups_only: false,
    })
}
