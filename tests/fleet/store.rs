//! The Redis user store (issue 21): every `--db` command against Redis with the output SQLite
//! gives, a server on Redis following `sluice user` through the change stream (just the users
//! named; everything after the stream was trimmed past it), account ids, `migrate`, a dead or
//! password-protected Redis, and a three-master Redis Cluster.

use crate::support::json::Json;
use crate::support::redis::Redis;
use crate::support::*;
use sluice::store::redis::conn::RedisSpec;
use sluice::store::redis::lease::{LeaseLink, LeaseRequest};
use sluice::store::{self, Changed, UsageDelta};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `sluice ARGS --db DB` with SLUICE_PASSWORD=pw, its output with DB written as `<db>`.
fn run(db: &str, args: &[&str]) -> String {
    let mut c = sluice_command();
    c.env("SLUICE_PASSWORD", "pw").args(args).args(["--db", db]);
    text(&run_command(c, None)).replace(db, "<db>")
}

/// A download through `srv` as `user`, counted on its own thread.
struct Download {
    count: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    sock: TcpStream,
}

impl Download {
    fn start(srv: std::net::SocketAddr, user: &str, origin: &Origin) -> Download {
        let mut s = socks5(srv, user, "pw", "127.0.0.1", origin.addr.port()).unwrap();
        s.write_all(format!("SEND {}\n", 1u64 << 30).as_bytes())
            .unwrap();
        let (count, closed) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, d) = (count.clone(), closed.clone());
        let mut r = s.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            }
            d.store(true, Ordering::SeqCst);
        });
        Download {
            count,
            closed,
            sock: s,
        }
    }

    fn bytes(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Bytes per second over `d` (a measurement, so a plain sleep).
    fn rate_over(&self, d: Duration) -> f64 {
        let (b, t) = (self.bytes(), Instant::now());
        thread::sleep(d);
        (self.bytes() - b) as f64 / t.elapsed().as_secs_f64()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

/// Every `--db` command, with each error path, gives the same output (exit code, stdout,
/// stderr) against Redis as against SQLite.
#[test]
fn every_command_prints_the_same_against_redis_as_against_sqlite() {
    let redis = Redis::start();
    let dir = TempDir::new("same");
    let file = dir.path("users.db");
    let dbs = [file.to_str().unwrap().to_string(), redis.url()];
    let script: &[&[&str]] = &[
        &["user", "list"],
        &["user", "set", "nobody", "--bandwidth", "1M"],
        &["stats"],
        &["unban", "127.0.0.1"],
        &["user", "add", "alice", "--bandwidth", "1M"],
        &["user", "add", "alice"],
        &[
            "user",
            "add",
            "bob",
            "--quota",
            "1G",
            "--quota-period",
            "month",
            "--max-connections",
            "3",
        ],
        &["user", "add", "we{ir}d:name"],
        &[
            "user",
            "add",
            "huge",
            "--max-connections",
            "18446744073709551615",
        ],
        &["user", "add", "bad", "--quota-period", "week"],
        &[
            "user",
            "set",
            "alice",
            "--bandwidth",
            "256K",
            "--quota",
            "10M",
        ],
        &["user", "set", "alice"],
        &["user", "set", "nobody", "--bandwidth", "1M"],
        &["user", "list"],
        &["user", "reset-usage", "bob"],
        &["user", "reset-usage", "nobody"],
        &["stats"],
        &["stats", "--json"],
        &["unban", "127.0.0.1"],
        &["unban", "not-an-address"],
        &["user", "del", "alice"],
        &["user", "del", "alice"],
        &["user", "list"],
    ];
    for args in script {
        let [sqlite, redis] = [run(&dbs[0], args), run(&dbs[1], args)];
        assert_eq!(sqlite, redis, "sluice {args:?}");
    }
    // Sanity: the list did show the users.
    let list = run(&dbs[1], &["user", "list"]);
    assert!(
        list.contains("we{ir}d:name") && list.contains("1G/month"),
        "{list}"
    );
}

#[test]
fn a_dead_redis_fails_a_command_quickly_naming_it_and_never_its_password() {
    let mut redis = Redis::start_with(&["--requirepass", "hunter2"]);
    let url = redis.url();
    // The password from the environment, or in the URL.
    let mut c = sluice_command();
    c.env("SLUICE_PASSWORD", "pw")
        .env("SLUICE_REDIS_PASSWORD", "hunter2")
        .args(["user", "add", "a", "--db", &url]);
    let out = run_command(c, None);
    assert!(out.status.success(), "{}", text(&out));
    let with_pw = url.replace("redis://", "redis://:hunter2@");
    let out = text(&sluice(&["user", "list", "--db", &with_pw]));
    assert!(
        out.contains("exit Some(0)") && out.contains("\na "),
        "{out}"
    );
    // No password, a wrong one: refused, and the message shows neither.
    let out = text(&sluice(&["user", "list", "--db", &url]));
    assert!(out.contains("exit Some(1)") && out.contains(&url), "{out}");
    let wrong = url.replace("redis://", "redis://:guess@");
    let out = text(&sluice(&["user", "list", "--db", &wrong]));
    assert!(
        out.contains("exit Some(1)") && !out.contains("guess"),
        "{out}"
    );

    redis.kill();
    let t = Instant::now();
    let out = text(&sluice(&["user", "list", "--db", &with_pw]));
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert!(out.contains("exit Some(1)"), "{out}");
    assert!(out.contains(&url), "the address is not named: {out}");
    assert!(!out.contains("hunter2"), "the password is shown: {out}");
    // A bad URL is a usage error naming the accepted form.
    let out = text(&sluice(&[
        "user",
        "list",
        "--db",
        "redis://:hunter2@host:notaport",
    ]));
    assert!(
        out.contains("exit Some(2)") && out.contains("expected redis://"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "{out}");
}

/// A server on Redis: logs users in, applies `user set` to an open connection within a second
/// (just that user reread), lets a user added through Redis in within a second, and closes a
/// deleted user's connections.
#[test]
fn a_server_on_redis_follows_user_commands_through_the_change_stream() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u", "--bandwidth", "32K"]).contains("exit Some(0)"));
    assert!(run(&url, &["user", "add", "gone"]).contains("exit Some(0)"));
    let mut srv = server_process(Path::new(&url));
    assert!(
        srv.log.iter().any(|l| l.contains("users: 2, db redis://")),
        "{:?}",
        srv.log
    );
    let flow = Download::start(srv.addr, "u", &origin);
    thread::sleep(Duration::from_millis(300));
    let r = flow.rate_over(Duration::from_secs(1));
    assert!(
        (0.7..1.3).contains(&(r / (32 * KIB) as f64)),
        "{r:.0} B/s at 32K"
    );

    assert!(run(&url, &["user", "set", "u", "--bandwidth", "256K"]).contains("exit Some(0)"));
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || flow
            .rate_over(Duration::from_millis(200))
            > (128 * KIB) as f64),
        "the new bandwidth never reached the open connection"
    );
    assert!(
        t.elapsed() <= Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );
    let line = srv.wait_for_line("users re", Duration::from_secs(2));
    assert!(
        line.is_some_and(|l| l.ends_with("1 users reread: 0 added, 1 changed, 0 removed")),
        "not applied as a change to one user: {:?}",
        srv.log
    );

    // A user added through Redis logs in within a second.
    assert!(run(&url, &["user", "add", "new"]).contains("exit Some(0)"));
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || {
            socks5(srv.addr, "new", "pw", "127.0.0.1", origin.addr.port()).is_ok()
        }),
        "the new user never logged in"
    );
    assert!(
        t.elapsed() <= Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );

    // A deleted user's connections close.
    let idle = Download::start(srv.addr, "gone", &origin);
    assert!(wait_until(Duration::from_secs(3), || idle.bytes() > 0));
    assert!(run(&url, &["user", "del", "gone"]).contains("exit Some(0)"));
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || idle.is_closed()),
        "the deleted user's connection is still open"
    );
    assert!(
        t.elapsed() <= Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        socks5(srv.addr, "gone", "pw", "127.0.0.1", origin.addr.port()).err(),
        Some(0xFF)
    );
    assert!(!flow.is_closed(), "another user's connection was closed");

    // Usage reaches Redis (flushed each second, by account id).
    assert!(
        wait_until(Duration::from_secs(5), || {
            run(&url, &["stats", "--json"]).contains("\"bytes_down\":")
                && store::open(store::StoreSpec::parse(&url).unwrap(), false)
                    .unwrap()
                    .load_usage()
                    .unwrap()
                    .iter()
                    .any(|u| u.username == "u" && u.bytes_down > 0)
        }),
        "no usage in Redis"
    );
}

/// A change stream trimmed past the server's last entry: the server reloads everything.
#[test]
fn a_stream_trimmed_past_a_server_makes_it_reload_everyone() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u", "--bandwidth", "32K"]).contains("exit Some(0)"));
    let mut srv = server_process(Path::new(&url));
    let flow = Download::start(srv.addr, "u", &origin);
    // By hand: a new bandwidth, and the stream trimmed to nothing (no entry names the change).
    let key = "sluice:{u}:user";
    redis.cmd(&["HSET", key, "bandwidth", "262144"]);
    redis.cmd(&["XTRIM", "sluice:changes", "MAXLEN", "0"]);
    let line = srv.wait_for_line("users reloaded", Duration::from_secs(3));
    assert!(
        line.is_some_and(|l| l.ends_with("users reloaded: 0 added, 1 changed, 0 removed")),
        "no full reload: {:?}",
        srv.rest_of_log()
    );
    assert!(
        wait_until(Duration::from_secs(3), || flow
            .rate_over(Duration::from_millis(200))
            > (128 * KIB) as f64),
        "the new bandwidth never reached the open connection"
    );
    // And after the reload it follows the stream again, user by user.
    assert!(run(&url, &["user", "set", "u", "--bandwidth", "64K"]).contains("exit Some(0)"));
    let line = srv.wait_for_line("users re", Duration::from_secs(3));
    assert!(
        line.is_some_and(|l| l.ends_with("1 users reread: 0 added, 1 changed, 0 removed")),
        "{:?}",
        srv.log
    );
}

/// The store's side of the stream: another writer's changes are named, unban requests reach
/// every reader, a trim past the reader is a change to everything.
#[test]
fn the_change_stream_names_users_and_carries_unbans_to_every_reader() {
    let redis = Redis::start();
    let spec = store::StoreSpec::parse(&redis.url()).unwrap();
    let writer = store::open(&spec, true).unwrap();
    let (mut a, mut b) = (
        store::open(&spec, false).unwrap(),
        store::open(&spec, false).unwrap(),
    );
    assert_eq!(a.changes().unwrap(), Changed::None);
    writer.add("x", "h", 1).unwrap();
    writer.add("y", "h", 1).unwrap();
    writer
        .change(
            "x",
            &store::UserChange {
                bandwidth: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        a.changes().unwrap(),
        Changed::Users(vec!["x".into(), "y".into()])
    );
    assert_eq!(a.changes().unwrap(), Changed::None);
    writer.request_unban("192.0.2.1").unwrap();
    for r in [&mut a, &mut b] {
        assert!(matches!(r.changes().unwrap(), Changed::Users(_)));
        assert_eq!(r.take_unbans().unwrap(), ["192.0.2.1"]);
        assert!(r.take_unbans().unwrap().is_empty());
    }
    redis.cmd(&["XTRIM", "sluice:changes", "MAXLEN", "0"]);
    assert_eq!(a.changes().unwrap(), Changed::All);
    assert_eq!(a.changes().unwrap(), Changed::None);
    writer.delete("y").unwrap();
    assert_eq!(a.changes().unwrap(), Changed::Users(vec!["y".into()]));
    let (rows, bad) = a.load().unwrap();
    assert!(bad.is_empty());
    assert_eq!(
        rows.iter().map(|r| r.username.as_str()).collect::<Vec<_>>(),
        ["x"]
    );
    assert_eq!(rows[0].bandwidth, 2);
}

/// Account ids are never given out twice: a deleted and re-added user starts from zero, and a
/// flush counted for the old account reaches nobody.
#[test]
fn a_deleted_and_re_added_user_starts_from_zero_usage() {
    let redis = Redis::start();
    let s = store::open(store::StoreSpec::parse(&redis.url()).unwrap(), true).unwrap();
    s.add("keep", "h", 0).unwrap();
    s.add("dz", "h", 0).unwrap();
    let id_of = |name: &str| {
        s.load()
            .unwrap()
            .0
            .iter()
            .find(|r| r.username == name)
            .unwrap()
            .id
    };
    let old = id_of("dz");
    let delta = |id| UsageDelta {
        account_id: id,
        bytes_down: 100,
        period_start: 0,
        ..UsageDelta::default()
    };
    s.flush_usage(&[delta(old)], 10).unwrap();
    s.flush_usage(&[delta(old)], 11).unwrap();
    let u = s.load_usage_of(&["dz".into()]).unwrap();
    assert_eq!(
        (u[0].bytes_down, u[0].period_bytes, u[0].last_seen),
        (200, 200, Some(11))
    );
    s.delete("dz").unwrap();
    s.add("dz", "h", 0).unwrap();
    let new = id_of("dz");
    assert!(new > old, "id {old} given out again");
    assert!(s.load_usage().unwrap().iter().all(|u| u.username != "dz"));
    s.flush_usage(&[delta(old)], 12).unwrap();
    assert!(s.load_usage().unwrap().iter().all(|u| u.username != "dz"));
    s.flush_usage(&[delta(new)], 13).unwrap();
    let u = s.load_usage_of(&["dz".into()]).unwrap();
    assert_eq!((u[0].account_id, u[0].bytes_down), (new, 100));
    s.reset_usage("dz").unwrap();
    let u = s.load_usage_of(&["dz".into()]).unwrap();
    assert_eq!((u[0].bytes_down, u[0].reset_epoch), (0, 1));
}

/// Every key and value in the Redis, for comparing before and after.
fn dump(redis: &Redis) -> Vec<String> {
    let mut keys: Vec<String> = redis
        .cmd(&["KEYS", "*"])
        .lines()
        .map(String::from)
        .collect();
    keys.sort();
    keys.iter()
        .map(|k| {
            let kind = redis.cmd(&["TYPE", k]);
            let v = match kind.as_str() {
                "hash" => {
                    let mut f: Vec<String> = redis
                        .cmd(&["HGETALL", k])
                        .lines()
                        .map(String::from)
                        .collect();
                    let mut pairs: Vec<String> = f.chunks(2).map(|c| c.join("=")).collect();
                    pairs.sort();
                    f.clear();
                    pairs.join(",")
                }
                "set" => {
                    let mut m: Vec<String> = redis
                        .cmd(&["SMEMBERS", k])
                        .lines()
                        .map(String::from)
                        .collect();
                    m.sort();
                    m.join(",")
                }
                "stream" => redis.cmd(&["XLEN", k]),
                _ => redis.cmd(&["GET", k]),
            };
            format!("{k} {kind} {v}")
        })
        .collect()
}

/// `migrate` copies users (hashes, limits, account ids) and usage; the Redis store then lists
/// and reports what the file did; a second run changes nothing.
#[test]
fn migrate_copies_users_and_usage_and_a_second_run_changes_nothing() {
    let redis = Redis::start();
    let url = redis.url();
    let dir = TempDir::new("migrate");
    let file = dir.path("users.db");
    let db = file.to_str().unwrap();
    assert!(
        run(
            db,
            &[
                "user",
                "add",
                "a",
                "--bandwidth",
                "1M",
                "--quota",
                "1G",
                "--quota-period",
                "day"
            ]
        )
        .contains("exit Some(0)")
    );
    assert!(run(db, &["user", "add", "b", "--max-connections", "2"]).contains("exit Some(0)"));
    assert!(run(db, &["user", "add", "c"]).contains("exit Some(0)"));
    assert!(run(db, &["user", "del", "c"]).contains("exit Some(0)"));
    assert!(run(db, &["user", "add", "c"]).contains("exit Some(0)"));
    let sqlite = store::open(&file, false).unwrap();
    let (rows, _) = sqlite.load().unwrap();
    let a = rows.iter().find(|r| r.username == "a").unwrap().id;
    sqlite
        .flush_usage(
            &[UsageDelta {
                account_id: a,
                bytes_up: 5000,
                bytes_down: 70_000,
                connections: 3,
                period_start: 86_400,
                ..UsageDelta::default()
            }],
            100_000,
        )
        .unwrap();

    let out = text(&sluice(&["migrate", "--from", db, "--to", &url]));
    assert!(
        out.contains(&format!("copied 3 users (1 with usage) from {db} to {url}")),
        "{out}"
    );
    let target = store::open(store::StoreSpec::parse(&url).unwrap(), false).unwrap();
    assert_eq!(
        target.load().unwrap(),
        sqlite.load().unwrap(),
        "users differ"
    );
    assert_eq!(
        target.load_usage().unwrap(),
        sqlite.load_usage().unwrap(),
        "usage differs"
    );
    for args in [&["user", "list"][..], &["stats", "--json"]] {
        assert_eq!(run(db, args), run(&url, args), "{args:?}");
    }
    // A user added in Redis after the migration gets an id past every migrated one.
    assert!(run(&url, &["user", "add", "d"]).contains("exit Some(0)"));
    let max = rows.iter().map(|r| r.id).max().unwrap();
    let d = target
        .load()
        .unwrap()
        .0
        .into_iter()
        .find(|r| r.username == "d")
        .unwrap();
    assert!(d.id > max, "id {} reuses a migrated one (max {max})", d.id);

    let before = dump(&redis);
    let out = text(&sluice(&["migrate", "--from", db, "--to", &url]));
    assert!(out.contains("copied 0 users (0 with usage)"), "{out}");
    assert!(
        out.contains("left as they are (already in the target): a, b, c"),
        "{out}"
    );
    assert_eq!(dump(&redis), before, "a second run changed the store");
    // Usage errors.
    let out = text(&sluice(&["migrate", "--from", db, "--to", db]));
    assert!(
        out.contains("exit Some(2)") && out.contains("--to must be a Redis"),
        "{out}"
    );
    let out = text(&sluice(&["migrate", "--to", &url]));
    assert!(
        out.contains("exit Some(2)") && out.contains("--from"),
        "{out}"
    );
}

/// A server whose Redis goes away logs known users in from its snapshot, and follows the
/// stream again once Redis is back.
#[test]
fn a_server_serves_on_from_its_snapshot_while_redis_is_down() {
    let mut redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u"]).contains("exit Some(0)"));
    let mut srv = server_process(Path::new(&url));
    redis.kill();
    assert!(
        srv.wait_for_line("is gone", Duration::from_secs(3))
            .is_some(),
        "{:?}",
        srv.rest_of_log()
    );
    assert!(socks5(srv.addr, "u", "pw", "127.0.0.1", origin.addr.port()).is_ok());
    redis.restart();
    assert!(run(&url, &["user", "add", "v"]).contains("exit Some(0)"));
    assert!(
        wait_until(Duration::from_secs(5), || {
            socks5(srv.addr, "v", "pw", "127.0.0.1", origin.addr.port()).is_ok()
        }),
        "a user added after Redis came back never logged in: {:?}",
        srv.rest_of_log()
    );
    // A Redis that loses its data is a store gone, not one without users: the snapshot stays.
    redis.cmd(&["FLUSHALL"]);
    assert!(
        srv.wait_for_line("is gone", Duration::from_secs(3))
            .is_some(),
        "{:?}",
        srv.rest_of_log()
    );
    for user in ["u", "v"] {
        assert!(socks5(srv.addr, user, "pw", "127.0.0.1", origin.addr.port()).is_ok());
    }
}

/// Three masters on loopback, made a cluster by `redis-cli --cluster create`.
fn cluster() -> Vec<Redis> {
    let nodes: Vec<Redis> = (0..3)
        .map(|_| {
            Redis::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli not found: install it with `apt-get install redis-tools`");
    assert!(out.status.success(), "cluster create: {out:?}");
    for n in &nodes {
        assert!(
            wait_until(Duration::from_secs(10), || n
                .cmd(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")),
            "the cluster never came up"
        );
    }
    nodes
}

#[test]
fn a_three_master_redis_cluster_holds_users_and_logs_them_in() {
    let nodes = cluster();
    let url = format!("redis+cluster://{},{}", nodes[0].addr(), nodes[1].addr());
    let origin = Origin::start();
    // Names whose keys land on different masters.
    for n in ["alice", "bob", "carol", "dave", "erin"] {
        assert!(run(&url, &["user", "add", n, "--bandwidth", "1M"]).contains("exit Some(0)"));
    }
    let list = run(&url, &["user", "list"]);
    for n in ["alice", "bob", "carol", "dave", "erin"] {
        assert!(list.contains(&format!("\n{n} ")), "{list}");
    }
    let holders: std::collections::HashSet<usize> = ["alice", "bob", "carol", "dave", "erin"]
        .iter()
        .filter_map(|n| {
            let key = format!("sluice:{{{n}}}:user");
            nodes.iter().position(|r| r.cmd(&["EXISTS", &key]) == "1")
        })
        .collect();
    assert!(holders.len() >= 2, "all users on one master: {holders:?}");
    let mut srv = server_process(Path::new(&url));
    let flow = Download::start(srv.addr, "carol", &origin);
    assert!(wait_until(Duration::from_secs(3), || flow.bytes() > 0));
    assert!(run(&url, &["user", "set", "carol", "--bandwidth", "32K"]).contains("exit Some(0)"));
    let line = srv.wait_for_line("users re", Duration::from_secs(3));
    assert!(
        line.is_some_and(|l| l.ends_with("1 users reread: 0 added, 1 changed, 0 removed")),
        "{:?}",
        srv.rest_of_log()
    );
    assert!(run(&url, &["user", "del", "bob"]).contains("exit Some(0)"));
    assert!(
        wait_until(Duration::from_secs(5), || {
            store::open(store::StoreSpec::parse(&url).unwrap(), false)
                .unwrap()
                .load_usage()
                .unwrap()
                .iter()
                .any(|u| u.username == "carol" && u.bytes_down > 0)
        }),
        "no usage flushed to the cluster"
    );
}

/// `rediss://`: the crate's synchronous rustls TLS, against a CA given with `?ca=` (here the
/// Redis's own self-signed certificate); without it the certificate is refused, naming the
/// address.
#[test]
fn rediss_with_a_ca_file_works_and_an_unknown_issuer_is_refused() {
    let certs = TempDir::new("redis-tls");
    let out = sluice(&[
        "cert",
        "--name",
        "127.0.0.1",
        "--out-dir",
        certs.0.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (cert, key) = (certs.path("cert.pem"), certs.path("key.pem"));
    let tls_port = free_port().to_string();
    let _redis = Redis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    let plain = format!("rediss://127.0.0.1:{tls_port}");
    let with_ca = format!("{plain}?ca={}", cert.display());
    let out = run(&with_ca, &["user", "add", "t", "--bandwidth", "1M"]);
    assert!(out.contains("exit Some(0)"), "{out}");
    assert!(run(&with_ca, &["user", "list"]).contains("\nt "));
    let out = text(&sluice(&["user", "list", "--db", &plain]));
    assert!(
        out.contains("exit Some(1)") && out.contains(&plain),
        "{out}"
    );
    assert!(out.to_lowercase().contains("certificate"), "{out}");
}

/// An idle account's delta costs Redis nothing; the first idle one after activity is still
/// written, so live figures go back to 0.
#[test]
fn idle_accounts_are_not_flushed_but_the_end_of_activity_is() {
    let redis = Redis::start();
    let s = store::open(store::StoreSpec::parse(&redis.url()).unwrap(), true).unwrap();
    s.add("a", "h", 0).unwrap();
    let id = s.load().unwrap().0[0].id;
    let idle = UsageDelta {
        account_id: id,
        ..UsageDelta::default()
    };
    let busy = UsageDelta {
        bytes_down: 10,
        open_now: 2,
        rate_now: 10,
        ..idle.clone()
    };
    let calls = || -> u64 {
        redis
            .cmd(&["INFO", "commandstats"])
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|r| r.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let before = calls();
    s.flush_usage(std::slice::from_ref(&idle), 1).unwrap();
    assert_eq!(calls(), before, "an idle account was flushed");
    assert!(s.load_usage().unwrap().is_empty());
    s.flush_usage(&[busy], 2).unwrap();
    s.flush_usage(std::slice::from_ref(&idle), 3).unwrap();
    let u = &s.load_usage().unwrap()[0];
    assert_eq!((u.bytes_down, u.open_now, u.rate_now), (10, 0, 0));
    let now = sluice::flow::usage::unix_now();
    assert!(
        u.live_at + 2 >= now && u.live_at <= now,
        "live figures stamped {} at {now}",
        u.live_at
    );
    let before = calls();
    s.flush_usage(&[idle], 4).unwrap();
    assert_eq!(calls(), before, "a second idle delta was flushed");
}

/// One download as `user` through each of `servers`: their bytes per second together over 3 s
/// (a measurement, so plain sleeps).
fn together(servers: &[Daemon], user: &str, origin: &Origin) -> f64 {
    let flows: Vec<Download> = servers
        .iter()
        .map(|s| Download::start(s.addr, user, origin))
        .collect();
    thread::sleep(Duration::from_millis(500));
    let before: u64 = flows.iter().map(Download::bytes).sum();
    let t = Instant::now();
    thread::sleep(Duration::from_secs(3));
    (flows.iter().map(Download::bytes).sum::<u64>() - before) as f64 / t.elapsed().as_secs_f64()
}

/// `--db redis://…` alone makes a fleet: two server processes on one Redis hold a user to its one
/// bandwidth together (leases), not each to the whole of it.
#[test]
fn servers_on_one_redis_store_share_a_users_one_bandwidth() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u", "--bandwidth", "64K"]).contains("exit Some(0)"));
    let servers: Vec<Daemon> = (0..2).map(|_| server_process(Path::new(&url))).collect();
    for s in &servers {
        assert!(
            s.log
                .iter()
                .any(|l| l.contains(&format!("fleet: bandwidth leased from {url}"))),
            "no fleet line: {:?}",
            s.log
        );
    }
    let r = together(&servers, "u", &origin) / (64 * KIB) as f64;
    assert!(
        (0.7..1.3).contains(&r),
        "two servers together moved {r:.2} x the user's bandwidth"
    );
}

/// Leases over a Redis Cluster: two servers on a three-master cluster hold a user to its one
/// bandwidth together (the lease script goes as FCALL in each node's pipeline).
#[test]
fn servers_on_a_redis_cluster_share_a_users_one_bandwidth() {
    let nodes = cluster();
    let url = format!("redis+cluster://{},{}", nodes[0].addr(), nodes[1].addr());
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u", "--bandwidth", "64K"]).contains("exit Some(0)"));
    let servers: Vec<Daemon> = (0..2).map(|_| server_process(Path::new(&url))).collect();
    let r = together(&servers, "u", &origin) / (64 * KIB) as f64;
    assert!(
        (0.7..1.3).contains(&r),
        "two servers on a cluster together moved {r:.2} x the user's bandwidth"
    );
    let bucket = "sluice:{u}:bucket";
    assert!(
        nodes.iter().any(|n| n.cmd(&["EXISTS", bucket]) == "1"),
        "no lease bucket on any master"
    );
}

/// What `args` answers on the master holding `key` (the others answer MOVED).
fn on_holder(nodes: &[Redis], key: &str, args: &[&str]) -> String {
    let n = nodes
        .iter()
        .find(|n| n.cmd(&["EXISTS", key]) == "1")
        .unwrap_or_else(|| panic!("{key} is on no master"));
    n.cmd(args)
}

/// Calls of `command` (lowercase) a master has served (`INFO commandstats`).
fn calls_of(node: &Redis, command: &str) -> u64 {
    node.cmd(&["INFO", "commandstats"])
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|r| r.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A cluster runs the store's pipelined scripts as functions (`FCALL`, never `EVAL` with the
/// script text) of one library loaded on every master. With the library deleted (`FUNCTION
/// FLUSH` on every master, then on one only), leases, usage flushes and live figures go on
/// after the store loads it again, and no call runs twice: each user's leased bytes are what
/// was granted, its usage what was flushed.
#[test]
fn a_cluster_store_loads_its_function_library_again_when_it_is_gone() {
    let nodes = cluster();
    let url = format!("redis+cluster://{},{}", nodes[0].addr(), nodes[1].addr());
    let s = store::open(store::StoreSpec::parse(&url).unwrap(), true).unwrap();
    let names = ["alice", "bob", "carol", "dave", "erin"];
    for n in names {
        s.add(n, "h", 0).unwrap();
    }
    let rows = s.load().unwrap().0;
    assert_eq!(rows.len(), names.len());
    let period = Duration::from_millis(75);
    let rate = 1_000_000;
    let requests: Vec<LeaseRequest> = rows
        .iter()
        .map(|r| LeaseRequest {
            user: r.username.clone(),
            account_id: r.id,
            rate,
            burst: rate / 5,
            demand: 50_000,
            unused: 0,
            extra: 0,
            quota: 0,
            period_start: 0,
        })
        .collect();
    let deltas: Vec<UsageDelta> = rows
        .iter()
        .map(|r| UsageDelta {
            account_id: r.id,
            bytes_down: 100,
            ..UsageDelta::default()
        })
        .collect();
    let mut link = LeaseLink::new(RedisSpec::parse(&url).unwrap(), Duration::from_secs(2));
    let mut granted = vec![0u64; rows.len()];
    let round = |link: &mut LeaseLink, granted: &mut Vec<u64>| {
        let r = link.round("s0", period, &requests, true).unwrap();
        assert_eq!(r.alive, Some(1));
        for (g, t) in granted.iter_mut().zip(&r.grants) {
            *g += t.tokens;
        }
    };
    let leased = |r: &sluice::store::UserRow| -> u64 {
        let key = format!("sluice:{{{}}}:usage:{}", r.username, r.id);
        on_holder(&nodes, &key, &["HGET", &key, "lease_bytes"])
            .parse()
            .unwrap()
    };
    let has_library = |n: &Redis| n.cmd(&["FUNCTION", "LIST"]).contains("sluice_");
    round(&mut link, &mut granted);
    assert!(
        nodes.iter().all(has_library),
        "the library is not on every master"
    );
    s.flush_usage(&deltas, 1).unwrap();
    let mut flushed = 1;
    // The library gone from every master, then from the master of the first user only.
    let flushes: [&[usize]; 2] = [
        &[0, 1, 2],
        &[nodes
            .iter()
            .position(|n| {
                n.cmd(&["EXISTS", &format!("sluice:{{{}}}:user", rows[0].username)]) == "1"
            })
            .unwrap()],
    ];
    for (step, which) in flushes.iter().enumerate() {
        for &i in *which {
            assert_eq!(nodes[i].cmd(&["FUNCTION", "FLUSH"]), "OK");
        }
        thread::sleep(period);
        round(&mut link, &mut granted);
        assert!(
            nodes.iter().all(has_library),
            "step {step}: the library was not loaded again on every master"
        );
        for &i in *which {
            assert_eq!(nodes[i].cmd(&["FUNCTION", "FLUSH"]), "OK");
        }
        s.flush_usage(&deltas, 1).unwrap();
        flushed += 1;
        for &i in *which {
            assert_eq!(nodes[i].cmd(&["FUNCTION", "FLUSH"]), "OK");
        }
        let usage = s.load_usage().unwrap();
        for r in &rows {
            let u = usage.iter().find(|u| u.username == r.username).unwrap();
            assert_eq!(
                u.bytes_down,
                100 * flushed,
                "step {step}: {}'s usage after {flushed} flushes",
                r.username
            );
        }
    }
    for _ in 0..3 {
        thread::sleep(period);
        round(&mut link, &mut granted);
    }
    assert!(granted.iter().all(|g| *g > 0), "grants {granted:?}");
    // The first user's master lost the library last: its leases failed there and ran once on
    // the retry. Another master's lease may have run with its reply lost (charged, not granted).
    assert_eq!(
        leased(&rows[0]),
        granted[0],
        "{}'s lease ran twice",
        rows[0].username
    );
    for (r, g) in rows.iter().zip(&granted) {
        assert!(
            leased(r) >= *g,
            "{}: leased {} < granted {g}",
            r.username,
            leased(r)
        );
    }
    let fcalls: u64 = nodes.iter().map(|n| calls_of(n, "fcall")).sum();
    let evals: u64 = nodes.iter().map(|n| calls_of(n, "eval")).sum();
    assert!(fcalls > 0, "no FCALL on the cluster");
    assert_eq!(evals, 0, "scripts sent whole with EVAL on the cluster");
}

/// A server's count of a user's connections leaves Redis when the user is deleted: a user
/// added again under the name is not refused for connections of the old one.
#[test]
fn a_deleted_users_connection_count_leaves_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    let add = ["user", "add", "c", "--max-connections", "2"];
    assert!(run(&url, &add).contains("exit Some(0)"));
    let srv = server_process(Path::new(&url));
    let held = socks5(srv.addr, "c", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    let key = "sluice:{c}:conns";
    assert!(
        wait_until(Duration::from_secs(3), || redis.cmd(&["HLEN", key]) == "1"),
        "the open connection was never counted in redis"
    );
    assert!(run(&url, &["user", "del", "c"]).contains("exit Some(0)"));
    assert!(
        wait_until(Duration::from_secs(3), || redis.cmd(&["HLEN", key]) == "0"),
        "the deleted user's count stayed in redis: {}",
        redis.cmd(&["HGETALL", key])
    );
    drop(held);
}

/// `sluice stats --db redis://… --json` as (connections_open, rate, throttled_now) of `user`.
fn live_of(url: &str, user: &str) -> (f64, f64, f64) {
    let out = sluice(&["stats", "--db", url, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let Ok(Json::Arr(lines)) = Json::parse(&body) else {
        panic!("stats --json is not a JSON array: {body}");
    };
    let l = lines
        .iter()
        .find(|l| l.get("user").and_then(Json::as_str) == Some(user))
        .unwrap_or_else(|| panic!("no {user} in {body}"));
    (
        l.num("connections_open"),
        l.num("rate"),
        l.num("throttled_now"),
    )
}

/// Each server flushes its live figures under its own id: `sluice stats` on a fleet shows a
/// user's connections open and rate summed over the servers, not the last flusher's.
#[test]
fn stats_on_a_fleet_sums_the_live_figures_of_every_server() {
    let redis = Redis::start();
    let url = redis.url();
    let origin = Origin::start();
    assert!(run(&url, &["user", "add", "u", "--bandwidth", "64K"]).contains("exit Some(0)"));
    let servers: Vec<Daemon> = (0..2).map(|_| server_process(Path::new(&url))).collect();
    // Two downloads on each server (equal demand, so each has about half the rate), and one
    // idle tunnel more on the second: 5 open, 2 or 3 on either server alone.
    let flows: Vec<Download> = servers
        .iter()
        .flat_map(|s| [0, 1].map(|_| Download::start(s.addr, "u", &origin)))
        .collect();
    let _idle = socks5(servers[1].addr, "u", "pw", "127.0.0.1", origin.addr.port()).unwrap();
    let mut last = (0.0, 0.0, 0.0);
    assert!(
        wait_until(Duration::from_secs(5), || {
            last = live_of(&url, "u");
            last.0 == 5.0
        }),
        "stats showed {last:?}, not 5 connections open"
    );
    // The rate stats shows (each server's last second, summed) against what the clients got
    // over the same seconds; one server's alone would be about half.
    let bytes = || flows.iter().map(Download::bytes).sum::<u64>();
    let (b0, t0) = (bytes(), Instant::now());
    let mut shown = Vec::new();
    for _ in 0..3 {
        thread::sleep(Duration::from_secs(1));
        let l = live_of(&url, "u");
        assert_eq!(l.0, 5.0, "connections open: {l:?}");
        assert!((0.3..=1.0).contains(&l.2), "throttled now: {l:?}");
        shown.push(l.1);
    }
    let got = (bytes() - b0) as f64 / t0.elapsed().as_secs_f64();
    let r = shown.iter().sum::<f64>() / shown.len() as f64 / got;
    assert!(
        (0.75..1.3).contains(&r),
        "stats showed rates {shown:?} while the clients got {got:.0} B/s ({r:.2} x)"
    );
    let fields = redis.cmd(&["HKEYS", &format!("sluice:{{u}}:live:{}", 1)]);
    assert_eq!(fields.lines().count(), 2, "live fields: {fields}");
}
