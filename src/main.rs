//! The command line: parse, set up logging, call into the library, map errors to an exit code.

use pico_args::Arguments;
use sluice::auth::throttle::Source;
use sluice::auth::{check_credential, hash_password};
use sluice::error::{Error, Result};
use sluice::local::{self, LocalConfig, LocalTls};
use sluice::net::os;
use sluice::net::tls::{self, Trust};
use sluice::server::stats;
use sluice::server::{self, ServerConfig};
use sluice::store::{self, QuotaPeriod, UserChange};
use sluice::units::{format_rate, format_size, parse_rate, parse_size};
use std::ffi::OsString;
use std::io::BufRead;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

mod signals;

const VERSION: &str = env!("CARGO_PKG_VERSION");

const HELP: &str = "\
sluice — a per-user bandwidth-limiting proxy (SOCKS5 + HTTP)

usage:
  sluice server [--listen ADDR] [--db PATH] [--allow-private] [--handshake-timeout SECS]
                [--connect-timeout SECS] [--tick-ms N] [--metrics ADDR]
                [--idle-timeout SECS] [--max-connections N] [--tls-cert FILE --tls-key FILE]
                [--max-handshakes N] [--max-handshakes-per-source N]
  sluice user add NAME [--password P | --password-stdin] [--bandwidth RATE] [LIMITS] [--db PATH]
  sluice user set NAME [--password P | --password-stdin] [--bandwidth RATE] [LIMITS] [--db PATH]
  sluice user del NAME [--db PATH]
  sluice user list [--db PATH]
  sluice user reset-usage NAME [--db PATH]
  sluice stats [--db PATH] [--json]
  sluice unban SOURCE [--db PATH]
  sluice local --server HOST:PORT --user NAME [--password P | --password-stdin]
               [--listen ADDR] [--allow-lan] [--handshake-timeout SECS]
               [--tls [--ca FILE | --pin-sha256 HEX] [--server-name NAME]]
  sluice cert --name HOST [--out-dir DIR]
  sluice --version

RATE is bytes per second: 65536, 64K, 1M, 2G (1024-based), or 0 / unlimited.
The password may also come from SLUICE_PASSWORD. `sluice COMMAND --help` for details.
";

const HELP_SERVER: &str = "\
usage: sluice server [options]

  --listen ADDR             address to listen on (default 127.0.0.1:8889; 0.0.0.0:8889 serves a network)
  --db PATH                 user database (default sluice.db; create it with `sluice user add`)
  --allow-private           allow loopback and private destinations (refused by default)
  --handshake-timeout SECS  time a client has to finish its handshake (default 10)
  --connect-timeout SECS    time allowed for each connect to a destination (default 10)
  --tick-ms N               limiter refill tick in milliseconds (default 10)
  --metrics ADDR            serve Prometheus /metrics and a status page / on ADDR (e.g. 127.0.0.1:9889)
  --idle-timeout SECS       close relays with no traffic either way for this long (default 7200)
  --tls-cert FILE           certificate chain (PEM) — with --tls-key, the port speaks TLS only;
  --tls-key FILE            its private key (PEM: PKCS#8, RSA or EC). `sluice cert` makes a pair
  --max-connections N       most connections at once; more are closed at once
                            (default: (open-files limit - 64) / 2)
  --max-handshakes N        most connections still in their handshake (not yet logged in) at once;
                            more are closed at once, so logged-in users keep room (default: half
                            of --max-connections)
  --max-handshakes-per-source N
                            the same from one source, an IPv4 address or an IPv6 /64 (default 64)
  --fleet redis://HOST:PORT share each user's one bandwidth and quota with the other servers on
                            this Redis (temporary: `--db redis://…` will set it)

Failed logins are throttled per address and per (address, user), with blocks that double from
1 s to 5 min; `sluice unban SOURCE` lifts them on a running server.

SIGINT / SIGTERM stop accepting, close the relays, flush usage to the database, and exit 0.

Logs go to stderr; RUST_LOG=debug|info|warn sets the level (default info).
";

const HELP_LOCAL: &str = "\
usage: sluice local --server HOST:PORT --user NAME [--password P | --password-stdin] [options]

Runs on the user's machine: apps connect to it without a password (SOCKS5, SOCKS4/4a, HTTP
CONNECT and plain HTTP) and it opens each connection through the Sluice server as NAME.

  --server HOST:PORT        the Sluice server (required)
  --user NAME               the user to log in as (required)
  --password P              the password (visible in `ps`; prefer the next two)
  --password-stdin          read the password from the first line of standard input
  SLUICE_PASSWORD           environment variable read when neither flag is given
  --listen ADDR             where apps connect (default 127.0.0.1:1080)
  --allow-lan               allow a non-loopback --listen: anyone who reaches it uses the account
  --handshake-timeout SECS  time an app has to finish its handshake (default 10)
  --connect-timeout SECS    time allowed to connect to the server (default 10)
  --tls                     encrypt the hop to the server (which runs with --tls-cert/--tls-key);
                            its certificate is checked against the system roots unless:
  --ca FILE                 trust this CA (or the server's self-signed certificate), PEM
  --pin-sha256 HEX          trust exactly the certificate with this SHA-256 (from `sluice cert`)
  --server-name NAME        the name the certificate must carry (default: the --server host)
";

const HELP_CERT: &str = "\
usage: sluice cert --name HOST [--out-dir DIR]

Writes cert.pem and key.pem (a self-signed certificate for HOST, which may be a DNS name or an IP
address) into DIR (default .), and prints the certificate's SHA-256 fingerprint: give it to
`sluice local --tls --pin-sha256 FINGERPRINT`. Existing files are not overwritten.
";

const HELP_STATS: &str = "\
usage: sluice stats [--db PATH] [--json]

Per user: bandwidth, quota and its use this period, bytes up/down, and — while a server runs on
the database — connections open now, current rate and the share of time the limiter held the
user back (throttled). `--json` prints the same as an array of objects.
";

const HELP_UNBAN: &str = "\
usage: sluice unban SOURCE [--db PATH]

Lifts the login blocks on SOURCE at the server running on the database (within a second): SOURCE
is an IPv4 address, an IPv6 address (its /64 and /48 are lifted), or an IPv6 prefix ending in /64
or /48. Blocks live in the server's memory only; this leaves a request in the database that the
server applies and deletes. Without a running server it waits there, harmlessly, until one starts.

  --db PATH          user database (default sluice.db)
";

const HELP_USER: &str = "\
usage:
  sluice user add NAME [--password P | --password-stdin] [--bandwidth RATE] [--db PATH]
  sluice user set NAME [--password P | --password-stdin] [--bandwidth RATE] [--db PATH]
  sluice user del NAME [--db PATH]
  sluice user list [--db PATH]
  sluice user reset-usage NAME [--db PATH]

  --password P       the password (visible to other users of this machine in `ps`; prefer the next two)
  --password-stdin   read the password from the first line of standard input
  SLUICE_PASSWORD    environment variable read when neither flag is given
  --bandwidth RATE   bytes per second for all of the user's connections together, both directions:
                     65536, 64K, 1M, 2G (1024-based), or 0 / unlimited (the default for add)
  --quota SIZE       bytes per quota period, both directions (1G, 500M, ...; 0 = no quota);
                     when used up, new connections are refused and open ones closed
  --quota-period P   day, month (UTC calendar) or none (a lifetime total until reset-usage)
  --max-connections N  most connections open at once (0 = no cap)
  --db PATH          user database (default sluice.db; `user add` creates it)

Usernames and passwords are 1 to 255 bytes without control characters.
";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let code = match run(Arguments::from_env()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sluice: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

fn run(mut args: Arguments) -> Result<()> {
    if args.contains(["-V", "--version"]) {
        println!("sluice {VERSION}");
        return Ok(());
    }
    let help = args.contains(["-h", "--help"]);
    let cmd = args.subcommand().map_err(|e| usage(e.to_string()))?;
    match cmd.as_deref() {
        Some("server") if help => print(HELP_SERVER),
        Some("server") => cmd_server(args),
        Some("user") if help => print(HELP_USER),
        Some("local") if help => print(HELP_LOCAL),
        Some("stats") if help => print(HELP_STATS),
        Some("cert") if help => print(HELP_CERT),
        Some("unban") if help => print(HELP_UNBAN),
        Some("unban") => cmd_unban(args),
        Some("cert") => cmd_cert(args),
        Some("stats") => cmd_stats(args),
        Some("local") => cmd_local(args),
        Some("user") => cmd_user(args),
        None if help => print(HELP),
        None => Err(usage(format!("a command is required\n{HELP}"))),
        Some(other) => Err(usage(format!("unknown command {other:?}\n{HELP}"))),
    }
}

fn print(text: &str) -> Result<()> {
    print!("{text}");
    Ok(())
}

/// Fails on anything pico-args did not consume.
fn finish(args: Arguments, help: &str) -> Result<()> {
    let rest: Vec<OsString> = args.finish();
    if rest.is_empty() {
        return Ok(());
    }
    let rest: Vec<String> = rest
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    Err(usage(format!(
        "unexpected argument {:?}\n{help}",
        rest.join(" ")
    )))
}

fn opt<T: std::str::FromStr>(
    args: &mut Arguments,
    key: &'static str,
    help: &str,
) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    args.opt_value_from_str(key)
        .map_err(|e| usage(format!("{key}: {e}\n{help}")))
}

fn db_path(args: &mut Arguments, help: &str) -> Result<PathBuf> {
    Ok(opt::<PathBuf>(args, "--db", help)?.unwrap_or_else(|| PathBuf::from("sluice.db")))
}

/// The longest any duration flag may be: a week. Far more than any timeout needs, and far from
/// where `Instant + Duration` overflows (and panics) in the connection threads.
const MAX_FLAG_SECS: u64 = 7 * 86_400;

/// A duration flag in whole seconds, 1 to [`MAX_FLAG_SECS`].
fn secs(args: &mut Arguments, key: &'static str, default: u64) -> Result<Duration> {
    let form = format!("expected a whole number of seconds, 1 to {MAX_FLAG_SECS}");
    let s: Option<u64> = opt(args, key, &form)?;
    match s.unwrap_or(default) {
        n @ 1..=MAX_FLAG_SECS => Ok(Duration::from_secs(n)),
        _ => Err(usage(format!("{key}: {form}"))),
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            usage(format!(
                "bad --listen {s:?}: expected HOST:PORT such as 127.0.0.1:8889 or [::]:8889"
            ))
        })
}

fn cmd_server(mut args: Arguments) -> Result<()> {
    let mut cfg = ServerConfig::default();
    if let Some(l) = opt::<String>(&mut args, "--listen", HELP_SERVER)? {
        cfg.listen = parse_listen(&l)?;
    }
    cfg.db = db_path(&mut args, HELP_SERVER)?;
    cfg.allow_private = args.contains("--allow-private");
    cfg.handshake_timeout = secs(&mut args, "--handshake-timeout", 10)?;
    cfg.connect_timeout = secs(&mut args, "--connect-timeout", 10)?;
    cfg.idle_timeout = secs(&mut args, "--idle-timeout", 7200)?;
    cfg.max_connections = opt::<usize>(&mut args, "--max-connections", HELP_SERVER)?;
    if cfg.max_connections == Some(0) {
        return Err(usage("--max-connections must be at least 1"));
    }
    cfg.max_handshakes = opt::<usize>(&mut args, "--max-handshakes", HELP_SERVER)?;
    if cfg.max_handshakes == Some(0) {
        return Err(usage("--max-handshakes must be at least 1"));
    }
    if let Some(n) = opt::<usize>(&mut args, "--max-handshakes-per-source", HELP_SERVER)? {
        if n == 0 {
            return Err(usage("--max-handshakes-per-source must be at least 1"));
        }
        cfg.max_handshakes_per_source = n;
    }
    let cert: Option<PathBuf> = opt(&mut args, "--tls-cert", HELP_SERVER)?;
    let key: Option<PathBuf> = opt(&mut args, "--tls-key", HELP_SERVER)?;
    cfg.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(usage("--tls-cert and --tls-key go together")),
    };
    cfg.metrics = opt::<String>(&mut args, "--metrics", HELP_SERVER)?
        .map(|m| parse_listen(&m))
        .transpose()?;
    if let Some(ms) = opt::<u64>(&mut args, "--tick-ms", HELP_SERVER)? {
        if !(1..=1000).contains(&ms) {
            return Err(usage("--tick-ms must be 1 to 1000"));
        }
        cfg.tick = Duration::from_millis(ms);
    }
    if let Some(url) = opt::<String>(&mut args, "--fleet", HELP_SERVER)? {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(usage(
                "--fleet takes a redis://HOST:PORT or rediss://HOST:PORT URL",
            ));
        }
        cfg.fleet = Some(sluice::flow::lease::FleetConfig::new(&url));
    }
    finish(args, HELP_SERVER)?;
    // Raised before start (the connection cap derives from it), logged after (so a start-up
    // error stays the only line).
    let files = os::raise_nofile_limit();
    os::tune_allocator();
    let masked = signals::block_stop_signals();
    let handle = server::start(&cfg)?;
    if let Err(e) = masked {
        log::warn!(
            "cannot block SIGINT/SIGTERM ({e}); a signal will stop the server without a last flush"
        );
    }
    match files {
        Some(n) => log::info!("open-files limit: {n}"),
        None => log::warn!("cannot read the open-files limit"),
    }
    signals::stop_on_signal(handle.stopper());
    handle.wait();
    Ok(())
}

fn cmd_local(mut args: Arguments) -> Result<()> {
    let listen = match opt::<String>(&mut args, "--listen", HELP_LOCAL)? {
        Some(l) => parse_listen(&l)?,
        None => SocketAddr::from(([127, 0, 0, 1], 1080)),
    };
    let server: Option<String> = opt(&mut args, "--server", HELP_LOCAL)?;
    let user: Option<String> = opt(&mut args, "--user", HELP_LOCAL)?;
    let allow_lan = args.contains("--allow-lan");
    let handshake_timeout = secs(&mut args, "--handshake-timeout", 10)?;
    let connect_timeout = secs(&mut args, "--connect-timeout", 10)?;
    let tls = local_tls(&mut args)?;
    let pw = password(&mut args, HELP_LOCAL)?;
    finish(args, HELP_LOCAL)?;
    let server =
        server.ok_or_else(|| usage(format!("--server HOST:PORT is required\n{HELP_LOCAL}")))?;
    let user = user.ok_or_else(|| usage(format!("--user NAME is required\n{HELP_LOCAL}")))?;
    check_credential("username", &user)?;
    let password = pw.ok_or_else(|| {
        usage("a password is required: --password-stdin, SLUICE_PASSWORD, or --password P")
    })?;
    let cfg = LocalConfig {
        listen,
        server,
        user,
        password,
        allow_lan,
        handshake_timeout,
        connect_timeout,
        tls,
    };
    let files = os::raise_nofile_limit();
    os::tune_allocator();
    let handle = local::start(&cfg)?;
    if let Some(n) = files {
        log::info!("open-files limit: {n}");
    }
    handle.wait();
    Ok(())
}

/// --tls with its trust options.
fn local_tls(args: &mut Arguments) -> Result<Option<LocalTls>> {
    let on = args.contains("--tls");
    let ca: Option<PathBuf> = opt(args, "--ca", HELP_LOCAL)?;
    let pin: Option<String> = opt(args, "--pin-sha256", HELP_LOCAL)?;
    let server_name: Option<String> = opt(args, "--server-name", HELP_LOCAL)?;
    if !on {
        if ca.is_some() || pin.is_some() || server_name.is_some() {
            return Err(usage("--ca, --pin-sha256 and --server-name need --tls"));
        }
        return Ok(None);
    }
    let trust = match (ca, pin) {
        (Some(_), Some(_)) => return Err(usage("give --ca or --pin-sha256, not both")),
        (Some(c), None) => Trust::Ca(c),
        (None, Some(p)) => Trust::Pin(tls::parse_pin(&p)?),
        (None, None) => Trust::System,
    };
    Ok(Some(LocalTls { trust, server_name }))
}

fn cmd_cert(mut args: Arguments) -> Result<()> {
    let name: Option<String> = opt(&mut args, "--name", HELP_CERT)?;
    let dir: PathBuf =
        opt(&mut args, "--out-dir", HELP_CERT)?.unwrap_or_else(|| PathBuf::from("."));
    finish(args, HELP_CERT)?;
    let name = name.ok_or_else(|| usage(format!("--name HOST is required\n{HELP_CERT}")))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    for p in [&cert, &key] {
        if p.exists() {
            return Err(Error::Invalid(format!(
                "{} exists; remove it or pick another --out-dir",
                p.display()
            )));
        }
    }
    let (cert_pem, key_pem, fp) = tls::self_signed(&name)?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Io(format!("cannot create {}", dir.display()), e))?;
    std::fs::write(&cert, cert_pem)
        .map_err(|e| Error::Io(format!("cannot write {}", cert.display()), e))?;
    write_private(&key, key_pem.as_bytes())?;
    println!("wrote {} and {} for {name}", cert.display(), key.display());
    println!("sha256 fingerprint (for sluice local --tls --pin-sha256):");
    println!("{fp}");
    Ok(())
}

/// Writes a file readable by its owner only (a private key).
fn write_private(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| Error::Io(format!("cannot write {}", path.display()), e))
}

/// The password from --password, --password-stdin or SLUICE_PASSWORD (in that order), if any.
fn password(args: &mut Arguments, help: &str) -> Result<Option<String>> {
    let flag: Option<String> = opt(args, "--password", help)?;
    let stdin = args.contains("--password-stdin");
    let pw = match (flag, stdin) {
        (Some(_), true) => return Err(usage("give --password or --password-stdin, not both")),
        (Some(p), false) => Some(p),
        (None, true) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Error::Io("cannot read the password from stdin".into(), e))?;
            Some(line.trim_end_matches(['\r', '\n']).to_string())
        }
        (None, false) => std::env::var("SLUICE_PASSWORD").ok(),
    };
    if let Some(p) = &pw {
        check_credential("password", p)?;
    }
    Ok(pw)
}

fn name(args: &mut Arguments, help: &str) -> Result<String> {
    let n: String = args
        .free_from_str()
        .map_err(|_| usage(format!("a user NAME is required\n{help}")))?;
    check_credential("username", &n)?;
    Ok(n)
}

fn rate(args: &mut Arguments) -> Result<Option<u64>> {
    let r: Option<String> = opt(args, "--bandwidth", HELP_USER)?;
    r.map(|s| parse_rate(&s).map_err(Error::from)).transpose()
}

fn cmd_user(mut args: Arguments) -> Result<()> {
    let sub = args.subcommand().map_err(|e| usage(e.to_string()))?;
    match sub.as_deref() {
        Some("add") => user_add(args),
        Some("set") => user_set(args),
        Some("del") => user_del(args),
        Some("list") => user_list(args),
        Some("reset-usage") => user_reset_usage(args),
        Some(other) => Err(usage(format!(
            "unknown user command {other:?}\n{HELP_USER}"
        ))),
        None => Err(usage(format!("a user command is required\n{HELP_USER}"))),
    }
}

/// --quota, --quota-period and --max-connections into a change (fields not given stay `None`).
fn limits(args: &mut Arguments) -> Result<UserChange> {
    let quota: Option<String> = opt(args, "--quota", HELP_USER)?;
    let period: Option<String> = opt(args, "--quota-period", HELP_USER)?;
    let maxc: Option<u64> = opt(args, "--max-connections", HELP_USER)?;
    Ok(UserChange {
        quota_bytes: quota.map(|q| parse_size(&q)).transpose()?,
        quota_period: period
            .map(|p| QuotaPeriod::parse(&p).map_err(|e| usage(e.to_string())))
            .transpose()?,
        max_connections: maxc,
        ..UserChange::default()
    })
}

fn user_add(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_USER)?;
    let bw = rate(&mut args)?.unwrap_or(0);
    let lim = limits(&mut args)?;
    let pw = password(&mut args, HELP_USER)?;
    let n = name(&mut args, HELP_USER)?;
    finish(args, HELP_USER)?;
    let pw = pw.ok_or_else(|| {
        usage("a password is required: --password-stdin, SLUICE_PASSWORD, or --password P")
    })?;
    let store = store::open(&db, true)?;
    // One statement: a running server never sees the user without its limits.
    store.add_with(&n, &hash_password(&pw)?, bw, &lim)?;
    println!("added user {n} at {}", format_rate(bw));
    Ok(())
}

fn user_set(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_USER)?;
    let mut change = limits(&mut args)?;
    change.bandwidth = rate(&mut args)?;
    let pw = password(&mut args, HELP_USER)?;
    let n = name(&mut args, HELP_USER)?;
    finish(args, HELP_USER)?;
    change.password_hash = pw.map(|p| hash_password(&p)).transpose()?;
    let c = &change;
    if c.bandwidth.is_none()
        && c.password_hash.is_none()
        && c.quota_bytes.is_none()
        && c.quota_period.is_none()
        && c.max_connections.is_none()
    {
        return Err(usage(
            "nothing to change: give --bandwidth, a password, --quota, --quota-period or --max-connections",
        ));
    }
    store::open(&db, false)?.change(&n, &change)?;
    println!("updated user {n}");
    Ok(())
}

fn user_reset_usage(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_USER)?;
    let n = name(&mut args, HELP_USER)?;
    finish(args, HELP_USER)?;
    store::open(&db, false)?.reset_usage(&n)?;
    println!("usage of user {n} reset");
    Ok(())
}

fn cmd_stats(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_STATS)?;
    let json = args.contains("--json");
    finish(args, HELP_STATS)?;
    let store = store::open(&db, false)?;
    let (users, _) = store.load()?;
    let usage = store.load_usage()?;
    let report = stats::Report::build(&users, &usage, sluice::flow::usage::unix_now());
    print!(
        "{}",
        if json {
            report.to_json()
        } else {
            report.to_table()
        }
    );
    Ok(())
}

fn cmd_unban(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_UNBAN)?;
    let src: String = args
        .free_from_str()
        .map_err(|_| usage(format!("a SOURCE is required\n{HELP_UNBAN}")))?;
    finish(args, HELP_UNBAN)?;
    let src = Source::parse(&src).map_err(usage)?;
    store::open(&db, false)?.request_unban(&src.to_string())?;
    println!("asked the server to lift the login blocks on {src}");
    Ok(())
}

fn user_del(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_USER)?;
    let n = name(&mut args, HELP_USER)?;
    finish(args, HELP_USER)?;
    store::open(&db, false)?.delete(&n)?;
    println!("deleted user {n}");
    Ok(())
}

fn user_list(mut args: Arguments) -> Result<()> {
    let db = db_path(&mut args, HELP_USER)?;
    finish(args, HELP_USER)?;
    let (rows, bad) = store::open(&db, false)?.load()?;
    println!(
        "{:<32} {:>12} {:>14} {:>9}",
        "USER", "BANDWIDTH", "QUOTA", "MAX-CONNS"
    );
    for r in rows {
        let quota = match r.quota_bytes {
            0 => "-".to_string(),
            q => format!("{}/{}", format_size(q), r.quota_period.as_str()),
        };
        let maxc = match r.max_connections {
            0 => "-".to_string(),
            n => n.to_string(),
        };
        println!(
            "{:<32} {:>12} {:>14} {:>9}",
            r.username,
            format_rate(r.bandwidth),
            quota,
            maxc
        );
    }
    for b in bad {
        println!("{:<32} {:>12}  ({})", b.username, "invalid", b.reason);
    }
    Ok(())
}
