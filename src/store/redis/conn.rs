//! Where a Redis store is and how to reach it: the `redis://…` spec, parsed without the crate (so
//! the rest of the program can hold and print one), and the connection, one Redis or a Redis
//! Cluster behind the same few calls. The password never reaches a message: [`RedisSpec`]'s
//! `Display` and `Debug` leave it out, and it is handed to the crate as a setting, not in a URL.
//!
//! Also how a script runs in a pipeline on each: on one Redis `EVALSHA` (the script loaded with
//! `SCRIPT LOAD`); on a cluster `FCALL` of a function of one Redis Functions library ([`Library`],
//! Redis ≥ 7), loaded on every master with `FUNCTION LOAD REPLACE`. A cluster could send only
//! `EVAL` with the whole script text before (about 2.5 KB per user per lease round); `FCALL`
//! names the function and routes by its first key as `EVAL` does. Which scripts there are is
//! the callers' (`lease.rs`, `mod.rs`); when to load them again is [`Conn::batch_scripts`]'.

use crate::error::{Error, Result};
use ::redis::cluster::{ClusterClientBuilder, ClusterConnection, cluster_pipe};
use ::redis::{
    Client, Cmd, ConnectionAddr, ConnectionLike, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, RedisResult, Script, ServerError, Value, cmd,
};
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How long a connect may take before the command fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply may take: a Redis that stopped answering fails the call, never hangs it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// The environment variable read for a password when the URL has none.
pub const PASSWORD_ENV: &str = "SLUICE_REDIS_PASSWORD";

/// A parsed `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` spec.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSpec {
    /// TLS (`rediss`).
    pub tls: bool,
    /// A Redis Cluster: `nodes` are seed nodes, the cluster names the rest.
    pub cluster: bool,
    /// `(host, port)` of each node given (one unless `cluster`).
    pub nodes: Vec<(String, u16)>,
    /// The database number (`/N`; 0 on a cluster).
    pub db: i64,
    /// The ACL user, if any (`redis://USER:PASS@…`).
    pub username: Option<String>,
    /// The password: from the URL, else from [`PASSWORD_ENV`].
    password: Option<String>,
    /// For `rediss`: the CA (PEM) the server's certificate must chain to, from `?ca=PATH` or
    /// [`CA_ENV`]; without, the public webpki roots.
    pub ca: Option<PathBuf>,
}

/// The environment variable read for a CA file when the URL has no `?ca=`.
pub const CA_ENV: &str = "SLUICE_REDIS_CA";

impl RedisSpec {
    /// True for the schemes this module reads.
    pub fn is_redis_url(s: &str) -> bool {
        [
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|p| s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p))
    }

    /// Parses `redis[s][+cluster]://[[USER]:PASS@]HOST:PORT[,HOST:PORT…][/N][?ca=PATH]`; the port
    /// defaults to 6379. Without a password in the URL, [`PASSWORD_ENV`] is read; without a CA,
    /// [`CA_ENV`].
    ///
    /// # Errors
    /// [`Error::Usage`] naming the accepted form.
    pub fn parse(s: &str) -> Result<RedisSpec> {
        let form = "expected redis://HOST:PORT[/N], rediss://… for TLS, or redis+cluster://HOST:PORT,HOST:PORT";
        let bad = |why: &str| Error::Usage(format!("bad --db {}: {why}; {form}", redact(s)));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.rsplit_once('?') {
            Some((r, q)) if !q.contains('@') => (r, Some(q)),
            _ => (rest, None),
        };
        let mut ca = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("ca", p)) if !p.is_empty() => {
                    ca = Some(PathBuf::from(
                        percent_decode(p).ok_or_else(|| bad("bad ca path"))?,
                    ));
                }
                _ => return Err(bad(&format!("unknown option {kv:?} (known: ca=PATH)"))),
            }
        }
        let scheme = scheme.to_ascii_lowercase();
        let tls = scheme.starts_with("rediss");
        let cluster = scheme.ends_with("+cluster");
        // Userinfo ends at the last '@' (a password may hold one).
        let (userinfo, hostpart) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hosts, path) = match hostpart.find('/') {
            Some(i) => (&hostpart[..i], &hostpart[i + 1..]),
            None => (hostpart, ""),
        };
        let db = match path.trim_end_matches('/') {
            "" => 0,
            n => n
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=1_000_000).contains(n))
                .ok_or_else(|| bad("the database after / is not a number"))?,
        };
        if cluster && db != 0 {
            return Err(bad("a cluster has database 0 only"));
        }
        let mut nodes = Vec::new();
        for h in hosts.split(',') {
            nodes.push(host_port(h).ok_or_else(|| bad(&format!("bad address {h:?}")))?);
        }
        if nodes.len() > 1 && !cluster {
            return Err(bad("several addresses need redis+cluster://"));
        }
        let (mut username, mut password) = (None, None);
        if let Some(u) = userinfo {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            if !user.is_empty() {
                username = Some(percent_decode(user).ok_or_else(|| bad("bad user name"))?);
            }
            if let Some(p) = pass.filter(|p| !p.is_empty()) {
                password = Some(percent_decode(p).ok_or_else(|| bad("bad password"))?);
            }
        }
        if password.is_none() {
            password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        }
        if ca.is_none() {
            ca = std::env::var_os(CA_ENV)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from);
        }
        if ca.is_some() && !tls {
            return Err(bad("ca= goes with rediss://"));
        }
        Ok(RedisSpec {
            tls,
            cluster,
            nodes,
            db,
            username,
            password,
            ca,
        })
    }

    /// The CA given, read, as the crate takes it (`None`: the public roots).
    fn certificates(&self) -> Result<Option<::redis::TlsCertificates>> {
        let Some(path) = self.ca.as_ref().filter(|_| self.tls) else {
            return Ok(None);
        };
        let pem = std::fs::read(path).map_err(|e| {
            Error::Io(
                format!("cannot read the Redis CA file {}", path.display()),
                e,
            )
        })?;
        Ok(Some(::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// Whether a password will be sent.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    fn addr(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.tls {
            ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_string(), port)
        }
    }

    /// Connects (within [`CONNECT_TIMEOUT`]; replies within [`IO_TIMEOUT`]).
    ///
    /// # Errors
    /// [`Error::Database`] naming the address (never the password) and what went wrong.
    pub fn connect(&self) -> Result<Conn> {
        self.connect_within(CONNECT_TIMEOUT, IO_TIMEOUT)
    }

    /// [`RedisSpec::connect`] with its own bounds: the lease thread waits a lease period or so,
    /// not seconds.
    ///
    /// # Errors
    /// As [`RedisSpec::connect`].
    pub fn connect_within(&self, connect: Duration, io: Duration) -> Result<Conn> {
        let err = |e: RedisError| self.error(e);
        if self.cluster {
            let mut b = ClusterClientBuilder::new(
                self.nodes
                    .iter()
                    .map(|(h, p)| self.addr(h, *p).into_connection_info())
                    .collect::<RedisResult<Vec<_>>>()
                    .map_err(err)?,
            )
            .connection_timeout(connect)
            .response_timeout(io)
            .retries(1);
            if let Some(p) = &self.password {
                b = b.password(p);
            }
            if let Some(u) = &self.username {
                b = b.username(u);
            }
            if self.tls {
                b = b.tls(::redis::TlsMode::Secure);
            }
            if let Some(certs) = self.certificates()? {
                b = b.certs(certs);
            }
            let c = b.build().map_err(err)?.get_connection().map_err(err)?;
            return Ok(Conn::Cluster(Box::new(c)));
        }
        let (host, port) = &self.nodes[0];
        let mut settings = RedisConnectionInfo::default().set_db(self.db);
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        let info = self
            .addr(host, *port)
            .into_connection_info()
            .map_err(err)?
            .set_redis_settings(settings);
        let client = match self.certificates()? {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        };
        let c = client
            .map_err(err)?
            .get_connection_with_timeout(connect)
            .map_err(err)?;
        c.set_read_timeout(Some(io)).map_err(err)?;
        c.set_write_timeout(Some(io)).map_err(err)?;
        Ok(Conn::One(Box::new(c)))
    }

    /// A store error at this spec's address.
    pub fn error(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::database(self, e)
    }
}

impl fmt::Display for RedisSpec {
    /// The spec without credentials: `redis://127.0.0.1:6379/2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.tls, self.cluster) {
            (false, false) => "redis",
            (true, false) => "rediss",
            (false, true) => "redis+cluster",
            (true, true) => "rediss+cluster",
        };
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        write!(f, "{scheme}://{}", hosts.join(","))?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RedisSpec({self}{})",
            if self.has_password() {
                ", with password"
            } else {
                ""
            }
        )
    }
}

/// The spec as given, with whatever sits before an '@' replaced (for a parse error's message).
fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(j)) if j > i => format!("{}://…@{}", &s[..i], &s[j + 1..]),
        _ => s.to_string(),
    }
}

/// `host:port`, `host` (port 6379), `[v6]:port`.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 6379,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (s.to_string(), 6379),
        }
    };
    let ok = !host.is_empty()
        && port != 0
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:%".contains(&b));
    ok.then_some((host, port))
}

/// `%XX` decoding of URL userinfo; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A connection to one Redis or to a Redis Cluster.
pub enum Conn {
    /// One server.
    One(Box<::redis::Connection>),
    /// A cluster: each command goes to the node holding its key's slot.
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    /// The connection for single commands and scripts.
    pub fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::One(c) => &mut **c,
            Conn::Cluster(c) => &mut **c,
        }
    }

    /// True on a cluster (no EVALSHA in a pipeline, no MULTI).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Sends `cmds` in one pipeline (one round trip on a single server; one per node on a
    /// cluster) and returns their replies in order. Not atomic.
    ///
    /// # Errors
    /// The first error, from the connection or any command.
    pub fn batch(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        self.batch_some(cmds.into_iter().map(|c| (c, false)).collect())
    }

    /// As [`Conn::batch`], but the commands marked `true` give no reply (pipeline `ignore`):
    /// the replies that come back are those of the unmarked commands, in order.
    ///
    /// # Errors
    /// The first error, from the connection or any command.
    pub fn batch_some(&mut self, cmds: Vec<(Cmd, bool)>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::One(c) => {
                let mut p = ::redis::pipe();
                for (cmd, ignore) in cmds {
                    p.add_command(cmd);
                    if ignore {
                        p.ignore();
                    }
                }
                p.query(&mut **c)
            }
            Conn::Cluster(c) => {
                let mut p = cluster_pipe();
                for (cmd, ignore) in cmds {
                    p.add_command(cmd);
                    if ignore {
                        p.ignore();
                    }
                }
                p.query(c)
            }
        }
    }
}

/// Hex digits of the library text's SHA1 in its name: enough to tell versions apart.
const LIBRARY_ID_HEX: usize = 12;

/// A Lua script the store runs in pipelines: its short name and its body, written for `EVAL`
/// (`KEYS`, `ARGV`). On a cluster it runs as a function of a [`Library`] with the same keys,
/// arguments and reply.
pub struct Function {
    /// The short name (`lease`): the function is `<library>_<name>`.
    pub name: &'static str,
    /// The Lua body.
    pub body: &'static str,
    /// On one Redis, sent whole with `EVAL` (a short script sent twice a second: nothing to
    /// load after a restart); otherwise by `EVALSHA`.
    pub eval_on_one: bool,
}

/// Scripts as one Redis Functions library, `sluice_<hash>`, whose name carries a hash of its
/// scripts: a server calls only the functions of its own build's library, so two builds on one
/// cluster (a rolling upgrade) each keep theirs instead of replacing each other's on every
/// reload; what a changed script says never runs under an old name. A superseded library stays
/// until an operator deletes it (`FUNCTION DELETE sluice_<hash>`: a few KB).
pub struct Library {
    name: String,
    text: String,
    entries: Vec<Entry>,
}

struct Entry {
    function: &'static Function,
    /// Its name in the library (`FCALL`).
    fcall: String,
    /// The SHA1 of its body (`EVALSHA`).
    sha: String,
}

impl Library {
    /// The library of `functions` (names distinct).
    pub fn new(functions: &[&'static Function]) -> Library {
        let mut all = String::new();
        for f in functions {
            all.push_str(f.name);
            all.push('\n');
            all.push_str(f.body);
            all.push('\n');
        }
        let hash = Script::new(&all).get_hash().to_string();
        let name = format!("sluice_{}", &hash[..LIBRARY_ID_HEX.min(hash.len())]);
        let mut text = format!("#!lua name={name}\n");
        let mut entries = Vec::new();
        for f in functions {
            let fcall = format!("{name}_{}", f.name);
            text.push_str(&format!(
                "redis.register_function('{fcall}', function(KEYS, ARGV)\n{}\nend)\n",
                f.body
            ));
            entries.push(Entry {
                function: f,
                fcall,
                sha: Script::new(f.body).get_hash().to_string(),
            });
        }
        Library {
            name,
            text,
            entries,
        }
    }

    /// `sluice_<hash>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text `FUNCTION LOAD` takes.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The name `FCALL` takes for `f` (`None`: not in this library).
    pub fn fcall_name(&self, f: &Function) -> Option<&str> {
        self.entry(f).map(|e| e.fcall.as_str())
    }

    fn entry(&self, f: &Function) -> Option<&Entry> {
        self.entries.iter().find(|e| e.function.name == f.name)
    }
}

/// A command of [`Conn::batch_scripts`]: whether its reply is wanted, and whether it may run a
/// second time when the batch is sent again after the scripts were loaded.
pub struct Call {
    cmd: Cmd,
    reply: bool,
    repeat: bool,
}

impl Call {
    /// A command that may run twice (a read, a write of the same value), its reply wanted.
    pub fn again(cmd: Cmd) -> Call {
        Call {
            cmd,
            reply: true,
            repeat: true,
        }
    }

    /// A command that must run at most once (a script that counts), its reply wanted.
    pub fn once(cmd: Cmd) -> Call {
        Call {
            cmd,
            reply: true,
            repeat: false,
        }
    }

    /// A command that may run twice, its reply not wanted (pipeline `ignore`).
    pub fn quiet(cmd: Cmd) -> Call {
        Call {
            cmd,
            reply: false,
            repeat: true,
        }
    }
}

/// True for a server error saying the script or function called is not loaded there.
fn is_missing_script(e: &ServerError) -> bool {
    e.code() == "NOSCRIPT"
        || e.details()
            .is_some_and(|d| d.to_ascii_lowercase().starts_with("function not found"))
}

impl Conn {
    /// The call of `f` on `keys` for a pipeline: `FCALL` on a cluster, `EVALSHA` (or `EVAL`,
    /// [`Function::eval_on_one`]) on one Redis. Its arguments follow (`.arg(…)`).
    pub fn call(&self, lib: &Library, f: &Function, keys: &[String]) -> Cmd {
        let entry = lib.entry(f);
        let mut c = match (self, entry) {
            (Conn::Cluster(_), Some(e)) => {
                let mut c = cmd("FCALL");
                c.arg(&e.fcall);
                c
            }
            (Conn::One(_), Some(e)) if !f.eval_on_one => {
                let mut c = cmd("EVALSHA");
                c.arg(&e.sha);
                c
            }
            // A script outside the library goes whole: it runs all the same.
            _ => {
                let mut c = cmd("EVAL");
                c.arg(f.body);
                c
            }
        };
        c.arg(keys.len()).arg(keys);
        c
    }

    /// Loads `lib`: on a cluster `FUNCTION LOAD REPLACE` (the crate sends it to every master
    /// and fails unless all took it; a replica gets it from its master, so a failover keeps
    /// it); on one Redis `SCRIPT LOAD` of each script called by `EVALSHA`, in one pipeline.
    /// Blocking.
    ///
    /// # Errors
    /// Redis unreachable or refusing the library (a Redis before 7 has no functions).
    pub fn load(&mut self, lib: &Library) -> RedisResult<()> {
        match self {
            Conn::Cluster(c) => {
                let mut load = cmd("FUNCTION");
                load.arg("LOAD").arg("REPLACE").arg(lib.text());
                let _: Value = load.query(&mut **c)?;
                Ok(())
            }
            Conn::One(c) => {
                let mut p = ::redis::pipe();
                for e in lib.entries.iter().filter(|e| !e.function.eval_on_one) {
                    p.cmd("SCRIPT").arg("LOAD").arg(e.function.body).ignore();
                }
                if p.is_empty() {
                    return Ok(());
                }
                p.exec(&mut **c)
            }
        }
    }

    /// Sends `calls` in one pipeline, as [`Conn::batch_some`]. When some of them failed because
    /// the server did not have `lib`'s scripts (a restarted Redis, a flushed library, a master
    /// added later) and nothing else failed, loads `lib` and sends again the calls that failed
    /// and those that may run twice ([`Call::again`], [`Call::quiet`]). Returns one reply per
    /// call whose reply is wanted, in order; `None` for a [`Call::once`] that ran the first time
    /// while others failed (on a cluster whose masters did not all have the library): it ran, its
    /// reply is lost.
    ///
    /// # Errors
    /// The first error, from the connection, any command, or the load.
    pub fn batch_scripts(
        &mut self,
        lib: &Library,
        calls: &[Call],
    ) -> RedisResult<Vec<Option<Value>>> {
        let send = |c: &mut Conn, which: &[usize]| {
            c.batch_some(
                which
                    .iter()
                    .map(|&i| (calls[i].cmd.clone(), !calls[i].reply))
                    .collect(),
            )
        };
        let all: Vec<usize> = (0..calls.len()).collect();
        let failed: HashSet<usize> = match send(self, &all) {
            Ok(v) => return Ok(v.into_iter().map(Some).collect()),
            Err(e) => match e.clone().into_server_errors() {
                Some(errs)
                    if !errs.is_empty() && errs.iter().all(|(_, s)| is_missing_script(s)) =>
                {
                    errs.iter().map(|(i, _)| *i).collect()
                }
                _ => return Err(e),
            },
        };
        self.load(lib)?;
        let again: Vec<usize> = all
            .into_iter()
            .filter(|i| failed.contains(i) || calls[*i].repeat)
            .collect();
        let mut replies = send(self, &again)?.into_iter();
        let mut out = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            if !c.reply {
                continue;
            }
            out.push(if again.contains(&i) {
                replies.next()
            } else {
                None
            });
        }
        Ok(out)
    }
}

/// True for an error after which the connection is no use (closed, timed out, refused).
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_cluster_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    static A: Function = Function {
        name: "a",
        body: "return KEYS[1]",
        eval_on_one: false,
    };
    static B: Function = Function {
        name: "b",
        body: "return ARGV[1]",
        eval_on_one: true,
    };
    static B2: Function = Function {
        name: "b",
        body: "return ARGV[2]",
        eval_on_one: true,
    };

    #[test]
    fn a_library_is_named_by_its_scripts_and_registers_each() {
        let lib = Library::new(&[&A, &B]);
        let id = lib.name().strip_prefix("sluice_").unwrap();
        assert_eq!(id.len(), LIBRARY_ID_HEX);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{}", lib.name());
        assert!(
            lib.text()
                .starts_with(&format!("#!lua name={}\n", lib.name()))
        );
        for f in [&A, &B] {
            let name = lib.fcall_name(f).unwrap();
            assert_eq!(name, format!("{}_{}", lib.name(), f.name));
            assert!(lib.text().contains(&format!(
                "redis.register_function('{name}', function(KEYS, ARGV)\n{}\nend)",
                f.body
            )));
        }
        // Another build's scripts: another library, so both can live on one cluster.
        let other = Library::new(&[&A, &B2]);
        assert_ne!(other.name(), lib.name());
        assert_eq!(Library::new(&[&A, &B]).name(), lib.name());
        assert_eq!(Library::new(&[&A]).fcall_name(&B), None);
    }

    #[test]
    fn specs_parse_and_print_without_their_password() {
        let s = RedisSpec::parse("redis://:s3cr%40t@127.0.0.1:7000/2").unwrap();
        assert_eq!(s.nodes, [("127.0.0.1".to_string(), 7000)]);
        assert_eq!((s.db, s.tls, s.cluster), (2, false, false));
        assert_eq!(s.password.as_deref(), Some("s3cr@t"));
        assert_eq!(s.to_string(), "redis://127.0.0.1:7000/2");
        assert!(!format!("{s:?}").contains("s3cr"));
        let c = RedisSpec::parse("rediss+cluster://u:p@a:1,[::1]:2").unwrap();
        assert_eq!(c.to_string(), "rediss+cluster://a:1,[::1]:2");
        assert_eq!(c.username.as_deref(), Some("u"));
        let t = RedisSpec::parse("rediss://h:1/2?ca=/etc/ca%20x.pem").unwrap();
        assert_eq!(t.ca, Some(PathBuf::from("/etc/ca x.pem")));
        assert_eq!(t.to_string(), "rediss://h:1/2");
        assert_eq!(
            RedisSpec::parse("REDIS://localhost").unwrap().nodes,
            [("localhost".to_string(), 6379)]
        );
        for bad in [
            "redis://",
            "redis://h:0",
            "redis://h:x",
            "redis://h/x",
            "redis://a:1,b:2",
            "redis+cluster://a:1/3",
            "redis://:pw@h:99999",
            "redis://h:1?ca=/x",
            "rediss://h:1?verify=no",
        ] {
            let e = RedisSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected redis://"), "{bad}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }
}
