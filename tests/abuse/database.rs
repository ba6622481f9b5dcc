//! The database misbehaving under a running server: locked by another writer (logins and relays
//! carry on from the in-memory snapshot; usage flushes wait, fail after the busy timeout, are
//! logged, and are written once the lock goes), deleted or
//! replaced (logged; the last good snapshot is kept, a readable replacement is loaded), and the
//! server killed with SIGKILL during a flood of `sluice user set` and usage flushes (the file
//! still passes `PRAGMA integrity_check`).

use super::process::ServerProcess;
use super::*;
use rusqlite::Connection;
use sluice::auth::hash_password;
use sluice::store;
use std::net::Ipv4Addr;
use std::path::Path;
use std::thread;

/// Another writer holding the database: a write transaction left open, so no other connection
/// can write (in WAL mode readers still read the last commit). Rolled back when dropped.
struct Lock {
    _writer: Connection,
}

impl Lock {
    fn take(db: &Path) -> Lock {
        let c = Connection::open(db).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE; UPDATE users SET updated_at = updated_at;")
            .unwrap();
        // Prove it: a writer that does not wait is turned away.
        let other = Connection::open(db).unwrap();
        other.busy_timeout(Duration::ZERO).unwrap();
        let write = other.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        assert!(write.is_err(), "the lock does not keep writers out");
        Lock { _writer: c }
    }
}

/// Bytes down recorded in the usage table for `user` (a fresh connection, waiting for locks).
fn usage_down(db: &Path, user: &str) -> u64 {
    store::open(db, false)
        .and_then(|s| s.load_usage())
        .map(|rows| {
            rows.iter()
                .find(|u| u.username == user)
                .map_or(0, |u| u.bytes_down)
        })
        .unwrap_or(0)
}

fn integrity(db: &Path) -> String {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// A SOCKS5 or HTTP tunnel downloading `n` bytes; checks them and returns how long it all took.
fn fetch(
    addr: SocketAddr,
    user: &str,
    pass: &str,
    origin: SocketAddr,
    n: u64,
    http: bool,
) -> Duration {
    let (took, got) = timed(|| {
        let mut s = if http {
            http_connect(addr, user, pass, &origin.to_string())
        } else {
            socks5(addr, user, pass, "127.0.0.1", origin.port())
                .unwrap_or_else(|e| panic!("socks5 as {user}: 0x{e:02x}"))
        };
        s.write_all(format!("SEND {n}\n").as_bytes()).unwrap();
        read_all(&mut s)
    });
    assert!(
        got.len() as u64 == n && is_pattern(&got),
        "{user}: {} of {n} bytes",
        got.len()
    );
    took
}

#[test]
fn logins_and_relays_carry_on_while_another_writer_holds_the_database() {
    let origin = Origin::start();
    let srv = TestServer::start(&[
        ("known", "pw", 0),
        ("fresh", "pw", 0),
        ("slow", "pw", 64 * 1024),
    ]);
    fetch(srv.addr, "known", "pw", origin.addr, 1000, false);
    // A tunnel open across the lock, limited, so the limiter is exercised too.
    let mut long =
        start_echo(socks5(srv.addr, "slow", "pw", "127.0.0.1", origin.addr.port()).unwrap());

    let lock = Lock::take(&srv.db);
    let locked = Instant::now();
    let mut worst = Duration::ZERO;
    // Logins never seen before (argon2 against the snapshot) and cached ones, both protocols.
    for (i, user) in ["fresh", "known", "fresh", "known"].into_iter().enumerate() {
        worst = worst.max(fetch(
            srv.addr,
            user,
            "pw",
            origin.addr,
            100_000,
            i % 2 == 1,
        ));
        assert_echoes(&mut long, &[i as u8; 10_000]);
    }
    assert!(
        worst < Duration::from_secs(2),
        "a tunnel took {worst:?} under the lock"
    );
    thread::sleep(Duration::from_secs(3).saturating_sub(locked.elapsed()));
    assert_echoes(&mut long, b"still relaying");
    drop(lock);

    // The watcher comes back: usage counted under the lock reaches the file, changes are seen.
    assert!(
        wait_until(SETTLE, || usage_down(&srv.db, "fresh") >= 200_000),
        "usage from the locked period never reached the database"
    );
    store::open(&srv.db, false)
        .unwrap()
        .add("later", &hash_password("pw").unwrap(), 0)
        .unwrap();
    assert!(
        wait_for_login(srv.addr, "later", "pw", origin.addr),
        "a user added after the lock never reached the server"
    );
    assert_eq!(integrity(&srv.db), "ok");
}

#[test]
#[ignore = "soak: run with make soak"]
fn soak_a_database_locked_for_30_s_does_not_stop_logins_or_relays() {
    let dir = TempDir::new("lock30");
    let db = dir.path("users.db");
    let users: Vec<(String, u64)> = (0..6).map(|i| (format!("user{i}"), 0)).collect();
    let refs: Vec<(&str, &str, u64)> = users
        .iter()
        .map(|(n, bw)| (n.as_str(), "pw", *bw))
        .collect();
    make_db(&db, &refs);
    store::open(&db, false)
        .unwrap()
        .add("slow", &hash_password("pw").unwrap(), 64 * 1024)
        .unwrap();
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, &[]);
    let mut long =
        start_echo(socks5(srv.addr, "slow", "pw", "127.0.0.1", origin.addr.port()).unwrap());
    fetch(srv.addr, "user0", "pw", origin.addr, 1000, false);
    thread::sleep(Duration::from_millis(1500));

    let lock = Lock::take(&db);
    let t = Instant::now();
    let (mut worst, mut tunnels) = (Duration::ZERO, 0u64);
    while t.elapsed() < Duration::from_secs(30) {
        let user = &users[tunnels as usize % users.len()].0;
        worst = worst.max(fetch(
            srv.addr,
            user,
            "pw",
            origin.addr,
            50_000,
            tunnels % 2 == 1,
        ));
        assert_echoes(&mut long, &[tunnels as u8; 5_000]);
        tunnels += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let warned = srv.wait_for_log("cannot write usage", Duration::from_secs(1));
    drop(lock);
    report(&format!(
        "30 s lock: {tunnels} tunnels, slowest {worst:?}; flush warning logged: {warned}"
    ));
    assert!(
        worst < Duration::from_secs(2),
        "a tunnel took {worst:?} under the lock"
    );
    assert!(
        warned,
        "the failing flushes were not logged:\n{}",
        srv.log_text()
    );
    assert!(
        srv.wait_for_log("usage flushes work again", Duration::from_secs(10)),
        "flushes did not resume:\n{}",
        srv.log_text()
    );
    assert!(usage_down(&db, "user1") >= 50_000);
    sluice_set_bandwidth(&db, "user0", "1M");
    assert!(
        srv.wait_for_log("users re", Duration::from_secs(5)),
        "{}",
        srv.log_text()
    );
    assert_eq!(integrity(&db), "ok");
}

/// Makes a database beside `db` with `users` and renames it over `db` (`mv new.db users.db`).
fn replace_by_rename(db: &Path, users: &[(&str, &str, u64)]) {
    let fresh = db.with_file_name("replacement.db");
    make_db(&fresh, users);
    // Closed above, so the replacement is one self-contained file.
    std::fs::rename(&fresh, db).unwrap();
}

/// Usernames in the file, read by a fresh connection.
fn users_in(db: &Path) -> Vec<String> {
    let mut v: Vec<String> = store::open(db, false)
        .and_then(|s| s.load())
        .map(|(rows, _)| rows.into_iter().map(|r| r.username).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_deleted_database_keeps_the_snapshot_and_a_replacement_is_loaded() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("old", "pw", 0), ("both", "pw", 0)]);
    fetch(srv.addr, "old", "pw", origin.addr, 1000, false);
    // A flush or two goes into the file before it goes.
    thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(&srv.db).unwrap();
    // Several watcher rounds with no file: the snapshot serves on.
    thread::sleep(Duration::from_secs(1));
    fetch(srv.addr, "old", "pw", origin.addr, 1000, true);
    fetch(srv.addr, "both", "pw", origin.addr, 1000, false);

    replace_by_rename(&srv.db, &[("new", "pw2", 0), ("both", "pw2", 0)]);
    assert!(
        wait_for_login(srv.addr, "new", "pw2", origin.addr),
        "the replacement was not loaded"
    );
    fetch(srv.addr, "both", "pw2", origin.addr, 1000, false);
    let s = connect_from(Ipv4Addr::new(127, 0, 2, 1), srv.addr).unwrap();
    assert_eq!(
        socks5_on(s, "old", "pw", origin.addr).err(),
        Some(0xFF),
        "a user of the old file"
    );
    // The server follows the new file from then on.
    store::open(&srv.db, false)
        .unwrap()
        .add("third", &hash_password("pw3").unwrap(), 0)
        .unwrap();
    assert!(
        wait_for_login(srv.addr, "third", "pw3", origin.addr),
        "a later change was not seen"
    );
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(integrity(&srv.db), "ok");
    assert_eq!(users_in(&srv.db), ["both", "new", "third"]);
}

/// Users as `sluice user list` (another process, as an admin would) prints them.
fn listed(db: &Path) -> Vec<String> {
    let out = sluice(&["user", "list", "--db", db.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// `rm users.db` while the server runs, then `sluice user add` makes a new one at the same path
/// (the old file's -wal and -shm are still there: the server holds them open).
#[test]
fn a_database_deleted_then_recreated_by_user_add_is_loaded_with_its_users() {
    let dir = TempDir::new("recreate");
    let db = dir.path("users.db");
    make_db(&db, &[("old", "pw", 0)]);
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, &[]);
    fetch(srv.addr, "old", "pw", origin.addr, 1000, false);
    thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(&db).unwrap();
    assert!(srv.wait_for_log("is gone", SETTLE));
    let mut add = sluice_command();
    add.args(["user", "add", "fresh", "--password", "pw2", "--db"])
        .arg(&db);
    let out = run_command(add, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(listed(&db), ["fresh"], "right after `user add`");
    let served = wait_for_login(srv.addr, "fresh", "pw2", origin.addr);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        listed(&db),
        ["fresh"],
        "the file lost the added user:\n{}",
        srv.log_text()
    );
    assert!(
        served,
        "the re-created database's user was never served:\n{}",
        srv.log_text()
    );
}

#[test]
#[ignore = "soak: run with make soak"]
fn soak_the_database_deleted_replaced_and_garbled_while_running() {
    let dir = TempDir::new("replace");
    let db = dir.path("users.db");
    make_db(&db, &[("a", "pw", 0), ("b", "pw", 0)]);
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, &[]);
    fetch(srv.addr, "a", "pw", origin.addr, 10_000, false);
    thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();

    std::fs::remove_file(&db).unwrap();
    assert!(
        srv.wait_for_log("is gone; keeping the last snapshot", SETTLE),
        "{}",
        srv.log_text()
    );
    for i in 0..10 {
        fetch(
            srv.addr,
            ["a", "b"][i % 2],
            "pw",
            origin.addr,
            10_000,
            i % 3 == 0,
        );
    }

    replace_by_rename(&db, &[("b", "pw2", 0), ("c", "pw", 0)]);
    assert!(
        srv.wait_for_log("was replaced; reloading it", SETTLE),
        "{}",
        srv.log_text()
    );
    assert!(wait_for_login(srv.addr, "c", "pw", origin.addr));
    fetch(srv.addr, "b", "pw2", origin.addr, 10_000, true);

    let garbage = dir.path("garbage.db");
    std::fs::write(
        &garbage,
        "not a database, only text long enough to look like a file".repeat(100),
    )
    .unwrap();
    std::fs::rename(&garbage, &db).unwrap();
    assert!(
        srv.wait_for_log("replaced by something unreadable", SETTLE),
        "{}",
        srv.log_text()
    );
    for i in 0..10 {
        fetch(
            srv.addr,
            ["b", "c"][i % 2],
            ["pw2", "pw"][i % 2],
            origin.addr,
            10_000,
            i % 2 == 0,
        );
    }

    replace_by_rename(&db, &[("d", "pw", 0)]);
    assert!(
        wait_for_login(srv.addr, "d", "pw", origin.addr),
        "{}",
        srv.log_text()
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(integrity(&db), "ok");
    assert_eq!(users_in(&db), ["d"]);
    report(&format!(
        "deleted, replaced, garbled and replaced again in {:?}; served throughout",
        t.elapsed()
    ));
    assert!(srv.log_lines("panicked").is_empty(), "{}", srv.log_text());
}

/// Kills the server with SIGKILL at random moments while `sluice user set` processes change
/// users and the server flushes usage every second; the file must stay sound every time.
#[test]
#[ignore = "soak: run with make soak"]
fn soak_kill_9_during_user_set_and_usage_flushes_leaves_a_sound_database() {
    const ROUNDS: usize = 20;
    let dir = TempDir::new("kill9");
    let db = dir.path("users.db");
    let names: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let users: Vec<(&str, &str, u64)> = names.iter().map(|n| (n.as_str(), "pw", 0)).collect();
    make_db(&db, &users);
    let origin = Origin::start();
    let mut rng = Rng::seeded();
    let (mut sets, mut killed_sets) = (0usize, 0usize);
    let t = Instant::now();
    for round in 0..ROUNDS {
        let srv = ServerProcess::start(&db, &[]);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (addr, origin_addr) = (srv.addr, origin.addr);
        thread::scope(|sc| {
            // Traffic for every user, so every flush has something to write.
            for name in &names {
                let stop = &stop;
                sc.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // The server may be dead already: no unwrapping here.
                        let Some(mut s) = std::net::TcpStream::connect(addr)
                            .ok()
                            .and_then(|s| s.set_read_timeout(Some(SHORT_TIMEOUT)).ok().map(|()| s))
                            .and_then(|s| socks5_on(s, name, "pw", origin_addr).ok())
                        else {
                            return;
                        };
                        s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
                        let _ = s.write_all(b"SEND 200000\n");
                        let mut buf = Vec::new();
                        let _ = s.read_to_end(&mut buf);
                    }
                });
            }
            // The server dies somewhere in 0.5-3 s, while `user set` processes run.
            let die_at = Instant::now() + Duration::from_millis(500 + rng.below(2500));
            let mut kids = Vec::new();
            while Instant::now() < die_at {
                let name = &names[rng.below(names.len() as u64) as usize];
                let mut c = sluice_command();
                c.args([
                    "user",
                    "set",
                    name,
                    "--bandwidth",
                    &format!("{}K", 1 + rng.below(4096)),
                ])
                .args(["--max-connections", &rng.below(5).to_string(), "--db"])
                .arg(&db)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
                let mut kid = c.spawn().unwrap();
                sets += 1;
                // One in four is itself killed, a few milliseconds in: maybe mid-write.
                if rng.below(4) == 0 {
                    thread::sleep(Duration::from_millis(rng.below(15)));
                    if matches!(kid.try_wait(), Ok(None)) {
                        let _ = kid.kill();
                        killed_sets += 1;
                    }
                }
                kids.push(kid);
                thread::sleep(Duration::from_millis(20 + rng.below(60)));
                kids.retain_mut(|k| matches!(k.try_wait(), Ok(None)));
            }
            srv.kill9();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for mut k in kids {
                let _ = k.wait();
            }
        });
        let check = integrity(&db);
        assert_eq!(check, "ok", "round {round}: integrity_check");
    }
    // The last round's file still serves.
    let srv = ServerProcess::start(&db, &[]);
    fetch(srv.addr, "user0", "pw", origin.addr, 1000, false);
    let usage = store::open(&db, false).unwrap().load_usage().unwrap();
    let total: u64 = usage.iter().map(|u| u.bytes_down).sum();
    report(&format!(
        "{ROUNDS} kill -9 rounds in {:?}: {sets} `user set` runs ({killed_sets} killed too), \
         {total} bytes down recorded, integrity ok each time",
        t.elapsed()
    ));
    assert!(total > 0, "no usage was ever flushed");
}
