//! The `sluice` binary's command line: help and version, the `user` commands against a temp
//! database, and the error paths with their messages and exit codes (2 usage, 1 otherwise).

use crate::support::*;
use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code and that stderr mentions every one of `words`.
fn assert_fails(o: &Output, code: i32, words: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for w in words {
        assert!(err.contains(w), "stderr lacks {w:?}: {err}");
    }
}

/// A temp dir and the path of a database in it (not created).
fn temp_db() -> (TempDir, String) {
    let dir = TempDir::new("cli");
    let db = dir.path("users.db").to_str().unwrap().to_string();
    (dir, db)
}

fn add(db: &str, name: &str, rate: &str) -> Output {
    sluice(&[
        "user",
        "add",
        name,
        "--password",
        "pw",
        "--bandwidth",
        rate,
        "--db",
        db,
    ])
}

/// The line of `user list` naming `name`, split into words.
fn listed(db: &str, name: &str) -> Option<Vec<String>> {
    let out = sluice(&["user", "list", "--db", db]);
    assert!(out.status.success(), "{out:?}");
    stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|w| w.first().map(String::as_str) == Some(name))
}

#[test]
fn version_prints_the_crate_version() {
    for flag in ["--version", "-V"] {
        let out = sluice(&[flag]);
        assert!(out.status.success());
        assert_eq!(
            stdout(&out).trim(),
            format!("sluice {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn help_is_given_for_each_command() {
    for (args, words) in [
        (
            &["--help"][..],
            &["sluice server", "sluice user add", "--version"][..],
        ),
        (&["-h"], &["sluice server"]),
        (
            &["server", "--help"],
            &["--listen", "--db", "--allow-private", "--handshake-timeout"],
        ),
        (
            &["user", "--help"],
            &[
                "user add",
                "user set",
                "user del",
                "user list",
                "--bandwidth",
            ],
        ),
        (
            &["user", "add", "--help"],
            &["--password-stdin", "SLUICE_PASSWORD"],
        ),
        (&["local", "--help"], &["--server", "--user"]),
        (&["unban", "--help"], &["SOURCE", "--db", "/64"]),
        (
            &["server", "--help"],
            &["--max-handshakes", "--max-handshakes-per-source"],
        ),
    ] {
        let out = sluice(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = stdout(&out);
        for w in words {
            assert!(text.contains(w), "{args:?} help lacks {w:?}: {text}");
        }
    }
}

#[test]
fn unban_takes_an_address_or_an_ipv6_prefix_and_refuses_anything_else() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let db = db.as_str();
    for good in ["192.0.2.1", "2001:db8::1", "2001:db8:1::/48"] {
        let out = sluice(&["unban", good, "--db", db]);
        assert!(out.status.success(), "{good}: {out:?}");
    }
    for bad in ["192.0.2.0/24", "example.invalid", "2001:db8::/56"] {
        let out = sluice(&["unban", bad, "--db", db]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
    }
    let out = sluice(&["unban", "--db", db]);
    assert_eq!(out.status.code(), Some(2), "no SOURCE: {out:?}");
    let mut pending = sluice::store::open(Path::new(db), false)
        .unwrap()
        .take_unbans()
        .unwrap();
    pending.sort();
    assert_eq!(pending, ["192.0.2.1", "2001:db8:1::/48", "2001:db8::/64"]);
}

#[test]
fn user_add_then_list_shows_the_user_and_rate() {
    let (_dir, db) = temp_db();
    let out = add(&db, "alice", "1M");
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("alice"));
    assert_eq!(listed(&db, "alice").unwrap()[1], "1M");
    for (name, given, shown) in [
        ("bob", "65536", "64K"),
        ("carol", "unlimited", "unlimited"),
        ("dan", "0", "unlimited"),
        ("erin", "1000", "1000"),
        ("fay", "3g", "3G"),
    ] {
        assert!(add(&db, name, given).status.success());
        assert_eq!(listed(&db, name).unwrap()[1], shown, "{given}");
    }
    let out = sluice(&["user", "set", "bob", "--bandwidth", "2K", "--db", &db]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(listed(&db, "bob").unwrap()[1], "2K");
    let out = sluice(&["user", "del", "bob", "--db", &db]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(listed(&db, "bob"), None);
    assert!(listed(&db, "alice").is_some());
}

#[test]
fn adding_an_existing_user_exits_1_naming_the_user() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let out = add(&db, "alice", "2M");
    assert_fails(&out, 1, &["alice", "exists"]);
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert_eq!(
        listed(&db, "alice").unwrap()[1],
        "1M",
        "the user was changed"
    );
}

#[test]
fn changing_or_deleting_a_missing_user_exits_1_naming_the_user() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let out = sluice(&["user", "set", "zed", "--bandwidth", "1K", "--db", &db]);
    assert_fails(&out, 1, &["zed"]);
    let out = sluice(&["user", "del", "zed", "--db", &db]);
    assert_fails(&out, 1, &["zed"]);
}

#[test]
fn a_bad_rate_exits_2_naming_the_accepted_forms() {
    let (_dir, db) = temp_db();
    for bad in ["12Q", "fast", "-5", "1.5M", "", "K", "99999999999999999999"] {
        let out = add(&db, "alice", bad);
        assert_fails(&out, 2, &["64K", "1M", "unlimited"]);
    }
    assert!(add(&db, "alice", "1M").status.success());
    let out = sluice(&["user", "set", "alice", "--bandwidth", "x", "--db", &db]);
    assert_fails(&out, 2, &["64K", "1M", "unlimited"]);
    assert_eq!(listed(&db, "alice").unwrap()[1], "1M");
}

#[test]
fn a_missing_name_exits_2_naming_the_accepted_forms() {
    let (_dir, db) = temp_db();
    for sub in ["add", "set", "del"] {
        let out = sluice(&["user", sub, "--password", "pw", "--db", &db]);
        assert_fails(&out, 2, &["NAME", "sluice user add NAME"]);
    }
}

#[test]
fn an_unknown_flag_or_command_exits_2_naming_the_accepted_forms() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let out = sluice(&["user", "list", "--db", &db, "--frobnicate"]);
    assert_fails(&out, 2, &["--frobnicate", "sluice user list"]);
    let out = sluice(&["server", "--db", &db, "--frobnicate"]);
    assert_fails(&out, 2, &["--frobnicate", "--listen"]);
    let out = sluice(&["frobnicate"]);
    assert_fails(&out, 2, &["frobnicate", "sluice server"]);
    let out = sluice(&["user", "frobnicate"]);
    assert_fails(&out, 2, &["frobnicate", "sluice user add"]);
    let out = sluice(&[]);
    assert_fails(&out, 2, &["sluice server", "sluice user"]);
}

#[test]
fn bad_server_options_exit_2() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    for (args, word) in [
        (&["--listen", "nonsense"][..], "HOST:PORT"),
        (&["--handshake-timeout", "0"], "--handshake-timeout"),
        (&["--connect-timeout", "0"], "--connect-timeout"),
        (&["--tick-ms", "0"], "--tick-ms"),
        (&["--tick-ms", "5000"], "--tick-ms"),
    ] {
        let mut all = vec!["server", "--db", &db];
        all.extend_from_slice(args);
        assert_fails(&sluice(&all), 2, &[word]);
    }
}

#[test]
fn a_bad_timeout_value_names_the_flag_and_its_form() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    for flag in ["--handshake-timeout", "--connect-timeout"] {
        let out = sluice(&["server", "--db", &db, flag, "soon"]);
        assert_fails(&out, 2, &[flag]);
        let err = stderr(&out);
        assert!(err.contains("SECS") || err.contains("seconds"), "{err}");
    }
}

#[test]
fn bad_credentials_are_refused() {
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let long = "x".repeat(256);
    for (name, pw) in [
        ("a\tb", "pw"),
        (long.as_str(), "pw"),
        ("ok", "p\u{7}w"),
        ("ok", ""),
    ] {
        let out = sluice(&["user", "add", name, "--password", pw, "--db", &db]);
        assert!(!out.status.success(), "{name:?}/{pw:?} accepted");
        assert!(stderr(&out).contains("username") || stderr(&out).contains("password"));
    }
    let out = sluice(&["user", "add", "ok", "--db", &db]);
    assert_fails(&out, 2, &["--password-stdin", "SLUICE_PASSWORD"]);
    let out = sluice(&[
        "user",
        "add",
        "ok",
        "--password",
        "pw",
        "--password-stdin",
        "--db",
        &db,
    ]);
    assert_fails(&out, 2, &["--password-stdin"]);
    assert_eq!(listed(&db, "ok"), None);
}

#[test]
fn server_with_a_missing_db_exits_1_naming_user_add() {
    let (dir, _) = temp_db();
    let db = dir.path("missing.db");
    let out = sluice(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_fails(&out, 1, &["sluice user add"]);
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("sluice user add") && last.contains("missing.db"),
        "{err}"
    );
    assert!(!db.exists(), "the server created the database");
    let out = sluice(&["user", "list", "--db", db.to_str().unwrap()]);
    assert_fails(&out, 1, &["sluice user add"]);
}

#[test]
fn server_with_a_missing_db_prints_one_line() {
    let (dir, _) = temp_db();
    let db = dir.path("missing.db");
    let out = sluice(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn server_with_a_garbage_db_exits_1() {
    let (dir, _) = temp_db();
    let db = dir.path("garbage.db");
    std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
    let out = sluice(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_fails(&out, 1, &["garbage.db"]);
}

/// Waits until `user` / `pass` can log in to `srv` (the server sees new rows within ~1 s). Tries
/// a few times only, since failed logins from one address are throttled.
fn logs_in(srv: &TestServer, user: &str, pass: &str) -> bool {
    let origin = Origin::start();
    for _ in 0..8 {
        if socks5(srv.addr, user, pass, "127.0.0.1", origin.addr.port()).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    false
}

#[test]
fn password_stdin_sets_the_password() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut c = sluice_command();
    c.args(["user", "add", "dave", "--password-stdin", "--db"])
        .arg(&srv.db);
    let out = run_command(c, Some(b"s3cret pass\n"));
    assert!(out.status.success(), "{out:?}");
    assert!(logs_in(&srv, "dave", "s3cret pass"), "dave cannot log in");
    assert_eq!(
        socks5(srv.addr, "dave", "s3cret pass\n", "127.0.0.1", 9).err(),
        Some(0xFF)
    );
}

#[test]
fn sluice_password_sets_the_password() {
    let srv = TestServer::start(&[("u1", "p1", 0)]);
    let mut c = sluice_command();
    c.args(["user", "add", "erin", "--db"])
        .arg(&srv.db)
        .env("SLUICE_PASSWORD", "from-env");
    let out = run_command(c, None);
    assert!(out.status.success(), "{out:?}");
    assert!(logs_in(&srv, "erin", "from-env"), "erin cannot log in");
    // --password wins over the environment.
    let mut c = sluice_command();
    c.args(["user", "set", "erin", "--password", "flag", "--db"])
        .arg(&srv.db)
        .env("SLUICE_PASSWORD", "ignored");
    assert!(run_command(c, None).status.success());
    assert!(logs_in(&srv, "erin", "flag"));
    assert_eq!(
        socks5(srv.addr, "erin", "ignored", "127.0.0.1", 9).err(),
        Some(0xFF)
    );
}

#[test]
fn a_new_password_holds_for_new_logins() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u1", "old", 0)]);
    let port = origin.addr.port();
    assert!(socks5(srv.addr, "u1", "old", "127.0.0.1", port).is_ok());
    let mut c = sluice_command();
    c.args(["user", "set", "u1", "--password-stdin", "--db"])
        .arg(&srv.db);
    assert!(run_command(c, Some(b"new\n")).status.success());
    assert!(logs_in(&srv, "u1", "new"), "new password refused");
    // The cached old credentials went with the old hash.
    assert_eq!(
        socks5(srv.addr, "u1", "old", "127.0.0.1", port).err(),
        Some(0xFF)
    );
}

#[test]
fn the_server_binary_serves_and_never_logs_a_password() {
    let (_dir, db) = temp_db();
    let pass = "Sekr1t-Pa55";
    let mut c = sluice_command();
    c.args([
        "user",
        "add",
        "carl",
        "--bandwidth",
        "1M",
        "--password-stdin",
        "--db",
        &db,
    ]);
    assert!(
        run_command(c, Some(format!("{pass}\n").as_bytes()))
            .status
            .success()
    );
    let mut srv = server_process(Path::new(&db));
    let addr = srv.addr;
    let origin = Origin::start();

    let mut s = socks5(addr, "carl", pass, "127.0.0.1", origin.addr.port()).unwrap();
    s.write_all(b"SEND 100000\n").unwrap();
    let got = read_all(&mut s);
    assert_eq!(got.len(), 100_000);
    assert!(is_pattern(&got));
    let good = format!(
        "GET http://{}/bytes/10 HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
        origin.addr,
        basic("carl", pass)
    );
    let (get, head) = http_exchange(addr, &good);
    assert_eq!(status_code(&head), 200, "{head:?}");
    let bad = connect_head(&origin.addr.to_string(), Some(("carl", "Wr0ng-Pa55")));
    let (_s, head) = http_exchange(addr, &bad);
    assert_eq!(status_code(&head), 407, "{head:?}");
    // A connection's line comes when both of its directions are done, so close ours.
    drop((s, get));

    let refused = srv.wait_for_line("login refused", Duration::from_secs(5));
    assert!(refused.is_some(), "no warning for the refused login");
    // The finished connections' lines (user, destination, bytes).
    assert!(
        srv.wait_for_line("up=", Duration::from_secs(5)).is_some(),
        "{:?}",
        srv.log
    );
    srv.signal(libc::SIGKILL);
    assert!(
        srv.wait_exit(Duration::from_secs(5)).is_some(),
        "the server did not exit"
    );
    let log = srv.rest_of_log().join("\n");
    assert!(log.contains("carl"), "{log}");
    for secret in [
        pass.to_string(),
        "Wr0ng-Pa55".to_string(),
        basic("carl", pass),
        sluice::wire::http::base64_encode(format!("carl:{pass}").as_bytes()),
    ] {
        assert!(!log.contains(&secret), "the log shows {secret:?}:\n{log}");
    }
}

/// Issue 18 §6: `user add` with limits is one write, so a running server never sees the user
/// without them, and a failed add leaves no user behind.
#[test]
fn user_add_with_limits_is_one_write_and_a_failed_one_leaves_no_user() {
    let (_dir, db) = temp_db();
    let too_many = (1u64 << 63).to_string();
    let out = sluice(&[
        "user",
        "add",
        "dz",
        "--password",
        "pw",
        "--quota",
        "100M",
        "--max-connections",
        &too_many,
        "--db",
        &db,
    ]);
    assert_fails(&out, 1, &["max-connections", "too large"]);
    assert_eq!(listed(&db, "dz"), None, "a failed add left the user");
    let out = sluice(&[
        "user",
        "add",
        "dz",
        "--password",
        "pw",
        "--quota",
        "100M",
        "--quota-period",
        "day",
        "--max-connections",
        "3",
        "--db",
        &db,
    ]);
    assert!(out.status.success(), "{out:?}");
    let w = listed(&db, "dz").expect("dz not listed");
    assert_eq!(w[2..], ["100M/day", "3"], "{w:?}");
}

/// Issue 18 §6: every duration flag is bounded (`--handshake-timeout 18446744073709551615` made
/// every connection thread panic on `Instant` overflow), and a 64-byte `--pin-sha256` of
/// multi-byte characters is a usage error, not a panic. Each command line would otherwise get
/// past the flags and fail later (no database, no CA file) with exit 1, or panic.
#[test]
fn huge_durations_and_a_multi_byte_pin_are_usage_errors() {
    let (dir, db) = temp_db();
    let no_ca = dir.path("no-ca.pem");
    let no_ca = no_ca.to_str().unwrap();
    let huge = u64::MAX.to_string();
    let week = (7 * 86_400 + 1).to_string();
    for value in [huge.as_str(), week.as_str()] {
        for flag in ["--handshake-timeout", "--connect-timeout", "--idle-timeout"] {
            let out = sluice(&["server", "--db", &db, flag, value]);
            assert_fails(&out, 2, &[flag, "604800"]);
        }
        for flag in ["--handshake-timeout", "--connect-timeout"] {
            let out = sluice(&[
                "local",
                "--server",
                "127.0.0.1:9",
                "--user",
                "u",
                "--password",
                "p",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--ca",
                no_ca,
                flag,
                value,
            ]);
            assert_fails(&out, 2, &[flag, "604800"]);
        }
    }
    let euros = format!("{}a", "€".repeat(21));
    let out = sluice(&[
        "local",
        "--server",
        "127.0.0.1:9",
        "--user",
        "u",
        "--password",
        "p",
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "--pin-sha256",
        &euros,
    ]);
    assert_fails(&out, 2, &["--pin-sha256", "hex"]);
}

/// Issue 18 §6: the database holds the password hashes. `user add` creates it, and SQLite its
/// `-wal` and `-shm` files, owner-only (0600); a server started on a database group or others can
/// read warns, naming the `chmod` that fixes it.
#[test]
fn the_database_is_owner_only_and_a_readable_one_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, db) = temp_db();
    assert!(add(&db, "alice", "1M").status.success());
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600, "user add created the database");
    let mut server = server_process(Path::new(&db));
    for suffix in ["-wal", "-shm"] {
        let p = format!("{db}{suffix}");
        assert_eq!(mode(&p), 0o600, "{p}");
    }
    assert!(
        !server.log.iter().any(|l| l.contains("chmod")),
        "{:?}",
        server.log
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = server_process(Path::new(&db));
    let warned = server.log.iter().find(|l| l.contains("chmod 600"));
    let line = warned.unwrap_or_else(|| panic!("no warning at start: {:?}", server.log));
    assert!(line.contains(&db) && line.contains("0644"), "{line}");
}
