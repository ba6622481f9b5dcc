//! Connection caps: a user's `max_connections` (the next one refused with SOCKS5 0x02 / HTTP 429
//! while the open ones keep working) and the global `--max-connections` (past it, new
//! connections are closed at once with no reply, no thread, and a log line at most once a second).

use super::process::ServerProcess;
use super::*;
use sluice::store::{self, UserChange};

fn cap(db: impl Into<store::StoreSpec>, user: &str, n: u64) {
    let change = UserChange {
        max_connections: Some(n),
        ..UserChange::default()
    };
    store::open(db, false)
        .unwrap()
        .change(user, &change)
        .unwrap();
}

#[test]
fn a_user_at_its_cap_is_refused_0x02_and_429_while_its_tunnels_keep_working() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("capped", "pw", 0), ("free", "pw", 0)], |c| {
        cap(&c.db, "capped", 2)
    });
    let port = origin.addr.port();
    let target = origin.addr.to_string();
    let mut a = start_echo(socks5(srv.addr, "capped", "pw", "127.0.0.1", port).unwrap());
    let mut b = start_echo(http_connect(srv.addr, "capped", "pw", &target));
    assert_echoes(&mut a, b"first");
    assert_echoes(&mut b, b"second");

    assert_eq!(
        socks5(srv.addr, "capped", "pw", "127.0.0.1", port).err(),
        Some(0x02),
        "socks5: the third connection"
    );
    let (_s, head) = http_exchange(srv.addr, &connect_head(&target, Some(("capped", "pw"))));
    assert_eq!(
        status_code(&head),
        429,
        "http: the third connection: {head:?}"
    );
    let get = format!(
        "GET http://{target}/bytes/3 HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
        basic("capped", "pw")
    );
    let (_s, head) = http_exchange(srv.addr, &get);
    assert_eq!(status_code(&head), 429, "http absolute-form: {head:?}");
    assert_eq!(
        origin.connections(),
        2,
        "a refused connection reached the origin"
    );

    // The two open tunnels are untouched, and other users are not capped.
    assert_echoes(&mut a, &[7u8; 100_000]);
    assert_echoes(&mut b, &[9u8; 100_000]);
    let mut other = start_echo(socks5(srv.addr, "free", "pw", "127.0.0.1", port).unwrap());
    assert_echoes(&mut other, b"not capped");

    // Closing one frees its slot.
    drop(a);
    let again = wait_until(SETTLE, || {
        socks5(srv.addr, "capped", "pw", "127.0.0.1", port).is_ok()
    });
    assert!(again, "a closed connection's slot was never given back");
    assert_echoes(&mut b, b"still here");
}

#[test]
fn a_cap_lowered_while_running_keeps_open_tunnels_and_refuses_new_ones() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u", "pw", 0)]);
    let port = origin.addr.port();
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap()))
        .collect();
    cap(&srv.db, "u", 1);
    let applied = wait_until(SETTLE, || {
        socks5(srv.addr, "u", "pw", "127.0.0.1", port).err() == Some(0x02)
    });
    assert!(applied, "the new cap was never applied");
    for (i, s) in open.iter_mut().enumerate() {
        assert_echoes(s, format!("tunnel {i}").as_bytes());
    }
    cap(&srv.db, "u", 0);
    let lifted = wait_until(SETTLE, || {
        socks5(srv.addr, "u", "pw", "127.0.0.1", port).is_ok()
    });
    assert!(lifted, "removing the cap was never applied");
}

/// Connects and reads until the server closes; returns what came and how long the close took.
fn closed_at_once(addr: SocketAddr, greet: &[u8]) -> (Vec<u8>, Duration) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    let t = Instant::now();
    let _ = s.write_all(greet);
    let got = read_to_close(&mut s);
    (got, t.elapsed())
}

#[test]
fn past_the_global_cap_connections_are_closed_at_once_and_service_resumes() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| c.max_connections = Some(3));
    let port = origin.addr.port();
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap()))
        .collect();
    assert_eq!(active(&srv), 3);
    for greet in [&b""[..], &[5, 1, 2], b"CONNECT x:1 HTTP/1.1\r\n\r\n"] {
        let (got, took) = closed_at_once(srv.addr, greet);
        assert_eq!(got, b"", "an over-cap connection got an answer");
        // The handshake deadline is 10 s: a close this fast means it was never served.
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
    }
    assert!(wait_until(SETTLE, || origin.connections() == 3));
    for s in &mut open {
        assert_echoes(s, b"still served");
    }
    drop(open.pop());
    assert!(
        wait_until(SETTLE, || active(&srv) < 3),
        "the closed tunnel is still counted"
    );
    let mut s = start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap());
    assert_echoes(&mut s, b"served again");
}

#[test]
fn the_global_cap_sheds_without_a_thread_and_logs_at_most_once_a_second() {
    let dir = TempDir::new("cap-proc");
    let db = dir.path("users.db");
    make_db(&db, &[("u", "pw", 0)]);
    let origin = Origin::start();
    let srv = ServerProcess::start(&db, &["--max-connections", "2"]);
    let port = origin.addr.port();
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| start_echo(socks5(srv.addr, "u", "pw", "127.0.0.1", port).unwrap()))
        .collect();
    // An echo needs both relay threads of a tunnel: only then is the count settled.
    for s in &mut open {
        assert_echoes(s, b"up and down");
    }
    let threads = srv.threads();
    let t = Instant::now();
    let (mut most, mut names) = (threads, Vec::new());
    for i in 0..300 {
        let (got, _) = closed_at_once(srv.addr, &[5, 1, 2]);
        assert_eq!(got, b"", "over-cap connection {i} got an answer");
        if i % 10 == 0 && srv.threads() > most {
            most = srv.threads();
            names = srv.thread_names();
        }
    }
    let flood = t.elapsed();
    assert!(
        most <= threads,
        "threads rose from {threads} to {most} while shedding: {names:?}"
    );
    let warned = srv.log_lines("the --max-connections cap").len();
    let allowed = flood.as_secs() as usize + 2;
    assert!(
        (1..=allowed).contains(&warned),
        "{warned} cap warnings in {flood:?}:\n{}",
        srv.log_text()
    );
    drop(open);
    // The next connection gets the next id: the 300 shed ones never reached spawn_connection.
    let next = wait_until(SETTLE, || {
        socks5(srv.addr, "u", "pw", "127.0.0.1", port).is_ok_and(|mut s| {
            s.write_all(b"SEND 10\n").unwrap();
            read_all(&mut s).len() == 10
        })
    });
    assert!(
        next,
        "no service after the tunnels closed:\n{}",
        srv.log_text()
    );
    let ids = || -> Vec<u64> {
        let mut v: Vec<u64> = srv
            .log_lines(" user=u ")
            .iter()
            .filter_map(|l| l.split("conn#").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        v.sort();
        v
    };
    wait_until(SETTLE, || ids().len() >= 3);
    assert_eq!(ids(), [1, 2, 3], "connection ids:\n{}", srv.log_text());
}

/// Regression: a client that resets right after its CONNECT request can be gone when the server
/// writes the success reply; that failed write used to leave the admitted connection on the
/// account, and with `max_connections = 1` the user was then refused for good.
#[test]
fn a_client_gone_before_the_reply_gives_its_slot_back() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("one", "pw", 0)], |c| cap(&c.db, "one", 1));
    for _ in 0..20 {
        let mut s = connect(srv.addr);
        assert_eq!(socks5_auth_status(&mut s, "one", "pw").unwrap(), 0);
        s.write_all(&socks5_request(origin.addr)).unwrap();
        reset(s);
    }
    assert_settles(&srv, "after 20 clients reset before the reply");
    let mut s = start_echo(socks5(srv.addr, "one", "pw", "127.0.0.1", origin.addr.port()).unwrap());
    assert_echoes(&mut s, b"still admitted");
}

/// Issue 18 §5: 200 idle connections from one address filled `--max-connections 200` and a
/// valid user was reset until the handshake deadline. Handshakes now have their own caps (64 per
/// source, half the global cap in all), so logged-in users keep room.
#[test]
fn idle_handshakes_from_one_address_cannot_fill_the_connection_cap() {
    let origin = Origin::start();
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| c.max_connections = Some(200));
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 1), srv.addr).ok())
        .collect();
    // The refused ones are closed at once; the admitted ones hold their threads.
    assert!(
        wait_until(SETTLE, || active(&srv) <= 64),
        "{} alive",
        active(&srv)
    );
    let s = connect_from(Ipv4Addr::new(127, 0, 0, 3), srv.addr).unwrap();
    let mut s = start_echo(socks5_on(s, "u", "pw", origin.addr).expect("a valid user was refused"));
    assert_echoes(&mut s, b"room for a logged-in user");
    let refused = srv.handle.as_ref().map_or(0, |h| {
        h.counters()
            .handshakes_refused(sluice::net::admission::Full::Source)
    });
    assert!(refused >= 100, "refusals not counted: {refused}");
    drop(idle);
}

#[test]
fn one_source_holds_at_most_its_share_of_handshakes() {
    let srv = TestServer::start_with(&[("u", "pw", 0)], |c| c.max_handshakes_per_source = 4);
    let held: Vec<TcpStream> = (0..4).map(|_| connect(srv.addr)).collect();
    assert!(wait_until(SETTLE, || active(&srv) == 4));
    let mut fifth = connect(srv.addr);
    // The handshake deadline is 10 s: a close within 2 s means it was never served.
    fifth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        fifth.read(&mut b).ok(),
        Some(0),
        "the fifth was not closed at once"
    );
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), srv.addr).unwrap();
    assert_eq!(socks5_auth_status(&mut other, "u", "pw").unwrap(), 0);
    drop(held);
    // Slots come back when the handshakes end.
    assert!(wait_until(SETTLE, || active(&srv) <= 1));
    let mut again = connect(srv.addr);
    assert_eq!(socks5_auth_status(&mut again, "u", "pw").unwrap(), 0);
}
