//! The failed-login throttle and the argon2 queue (issue 18 §2, §3): failures count per
//! (address, user) and per address, from the moment a check starts; blocks double from 1 s; a
//! user verified from a blocked address still logs in; `sluice unban` lifts a block; a flood from
//! one address does not stall another's first login. Other loopback addresses (127.0.0.x) stand
//! for other sources (all of 127/8 is loopback on Linux).

use super::*;
use sluice::auth::throttle::{PAIR_FREE_FAILURES, SOURCE_FREE_FAILURES};
use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::thread;

const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HOME: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// One SOCKS5 login from `src` in a single write; its status (`None`: closed unanswered).
fn login_from(srv: &TestServer, src: Ipv4Addr, user: &str, pass: &str) -> Option<u8> {
    let mut s = connect_from(src, srv.addr).ok()?;
    socks5_auth_status(&mut s, user, pass).ok()
}

/// A server whose handshake caps do not get in the way of floods from one address.
fn server(users: &[(&str, &str, u64)]) -> TestServer {
    TestServer::start_with(users, |c| {
        c.max_handshakes_per_source = 2000;
        c.max_handshakes = Some(2000);
    })
}

fn argon2_runs(srv: &TestServer) -> u64 {
    srv.handle.as_ref().map_or(0, |h| h.argon2_runs())
}

#[test]
fn parallel_guesses_are_counted_as_they_start_and_the_right_password_last_is_refused() {
    let srv = server(&[("u", "right", 0)]);
    let n = 200;
    let go = Arc::new(Barrier::new(n));
    let addr = srv.addr;
    let wrong: Vec<_> = (0..n - 1)
        .map(|i| {
            let go = go.clone();
            thread::spawn(move || {
                let mut s = connect_from(HOME, addr).unwrap();
                go.wait();
                socks5_auth_status(&mut s, "u", &format!("wrong{i}")).ok()
            })
        })
        .collect();
    let mut s = connect_from(HOME, addr).unwrap();
    go.wait();
    thread::sleep(Duration::from_millis(50));
    let right = socks5_auth_status(&mut s, "u", "right").ok();
    for t in wrong {
        assert_ne!(t.join().unwrap(), Some(0), "a wrong password was accepted");
    }
    let runs = argon2_runs(&srv);
    eprintln!("argon2 runs for 200 parallel logins: {runs}");
    assert_ne!(
        right,
        Some(0),
        "the right password after 199 parallel guesses was accepted"
    );
    assert!(
        runs <= u64::from(PAIR_FREE_FAILURES) + 2,
        "{runs} argon2 runs: guesses in flight were not counted"
    );
}

#[test]
fn guesses_block_the_guessed_user_in_doubling_steps_not_the_other_users_behind_the_address() {
    let origin = Origin::start();
    let srv = server(&[("u", "right", 0), ("v", "other", 0)]);
    // pip retries a wrong proxy password 4–6 times: two mistyped runs.
    let mut blocked_at = None;
    for i in 0..12 {
        let (_s, head) = http_exchange(
            srv.addr,
            &connect_head(&origin.addr.to_string(), Some(("u", &format!("typo{i}")))),
        );
        match status_code(&head) {
            407 => {}
            429 => {
                blocked_at.get_or_insert_with(Instant::now);
            }
            other => panic!("answered {other}: {head:?}"),
        }
    }
    let blocked_at = blocked_at.expect("u was never blocked");
    // Another user behind the same address is not affected.
    assert_eq!(
        login_from(&srv, HOME, "v", "other"),
        Some(0),
        "v was locked out"
    );
    // u's block is seconds, not minutes: the right password gets in soon.
    let back = wait_until(Duration::from_secs(8), || {
        login_from(&srv, HOME, "u", "right") == Some(0)
    });
    assert!(
        back,
        "u still refused {:?} after its block started",
        blocked_at.elapsed()
    );
}

#[test]
fn a_blocked_client_is_told_it_is_blocked_and_for_how_long() {
    let origin = Origin::start();
    let srv = server(&[("u", "right", 0)]);
    for i in 0..PAIR_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, "u", &format!("w{i}")), Some(1));
    }
    let mut s = connect(srv.addr);
    let head = connect_head(&origin.addr.to_string(), Some(("u", "right")));
    s.write_all(head.as_bytes()).unwrap();
    let answer = String::from_utf8_lossy(&read_all(&mut s)).into_owned();
    assert_eq!(status_code(&answer), 429, "{answer:?}");
    assert!(
        answer.contains("blocked for 1 s"),
        "the body does not say for how long: {answer:?}"
    );
}

#[test]
fn a_blocked_address_still_lets_users_verified_from_it_log_in_but_not_guess() {
    let origin = Origin::start();
    let srv = server(&[("a", "pa", 0), ("b", "pb", 0)]);
    assert_eq!(login_from(&srv, HOME, "a", "pa"), Some(0));
    // One guess each at many names: the address, not any one user, gets blocked.
    for i in 0..SOURCE_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, &format!("x{i}"), "guess"), Some(1));
    }
    assert_eq!(
        login_from(&srv, HOME, "b", "pb"),
        Some(1),
        "the address was not blocked"
    );
    // `a` verified from here a moment ago: it still logs in, without argon2.
    let runs = argon2_runs(&srv);
    let s = connect_from(HOME, srv.addr).unwrap();
    let mut s = socks5_on(s, "a", "pa", origin.addr).expect("a, verified from here, refused");
    s.write_all(b"SEND 10\n").unwrap();
    assert_eq!(read_all(&mut s).len(), 10);
    assert_eq!(argon2_runs(&srv), runs, "the cached login ran argon2");
    // The same address may not use `a` as a free oracle: wrong passwords count against it.
    for i in 0..PAIR_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, "a", &format!("g{i}")), Some(1));
    }
    assert_eq!(
        login_from(&srv, HOME, "a", "pa"),
        Some(1),
        "guesses at a cached user from a blocked address were free"
    );
    assert_eq!(argon2_runs(&srv), runs, "a blocked address ran argon2");
    // Elsewhere, b logs in.
    assert_eq!(login_from(&srv, OTHER, "b", "pb"), Some(0));
}

#[test]
fn failures_from_one_address_do_not_count_against_another() {
    let srv = server(&[("u", "right", 0)]);
    for i in 1..PAIR_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, "u", &format!("w{i}")), Some(1));
    }
    // The last free failure, from elsewhere, does not complete 127.0.0.1's count.
    assert_eq!(login_from(&srv, OTHER, "u", "wrong"), Some(1));
    assert_eq!(
        login_from(&srv, HOME, "u", "right"),
        Some(0),
        "127.0.0.1 blocked by a failure from 127.0.0.2"
    );
}

/// A client holding one valid account logs in between guesses at another: if a success wiped
/// the address's failures, it could guess without end.
#[test]
fn a_successful_login_does_not_reset_the_guessing_count() {
    let srv = server(&[("mine", "known", 0), ("victim", "secret", 0)]);
    for i in 0..PAIR_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, "victim", &format!("g{i}")), Some(1));
        assert_eq!(login_from(&srv, HOME, "mine", "known"), Some(0));
    }
    assert_eq!(
        login_from(&srv, HOME, "victim", "secret"),
        Some(1),
        "good logins in between kept the guesses from counting"
    );
}

#[test]
fn sluice_unban_lifts_a_block_within_a_second() {
    let srv = server(&[("u", "right", 0)]);
    // Blocks of 1, 2, 4, then 8 s: long enough that a busy machine cannot pass it off as the
    // block ending by itself.
    for i in 0..PAIR_FREE_FAILURES {
        assert_eq!(login_from(&srv, HOME, "u", &format!("w{i}")), Some(1));
    }
    for (i, wait) in [1100u64, 2100, 4100].into_iter().enumerate() {
        thread::sleep(Duration::from_millis(wait));
        assert_eq!(login_from(&srv, HOME, "u", &format!("v{i}")), Some(1));
    }
    assert_eq!(login_from(&srv, HOME, "u", "right"), Some(1), "not blocked");
    let out = sluice(&["unban", "127.0.0.1", "--db", srv.db.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let t = Instant::now();
    let back = wait_until(Duration::from_secs(5), || {
        login_from(&srv, HOME, "u", "right") == Some(0)
    });
    assert!(back, "still blocked {:?} after `sluice unban`", t.elapsed());
    eprintln!("unban applied within {:?}", t.elapsed());
    let rows = srv.store().take_unbans().unwrap();
    assert!(rows.is_empty(), "the server left the request: {rows:?}");
}

/// Issue 18 §3: 400 logins for an unknown user from one address must not stall another
/// address's first login (it took 5.2 s). The bench holds the strict figure (300 ms).
#[test]
fn a_login_flood_from_one_address_does_not_stall_another_addresss_first_login() {
    let srv = server(&[("u", "right", 0)]);
    let addr = srv.addr;
    let go = Arc::new(Barrier::new(401));
    let flood: Vec<_> = (0..400)
        .map(|i| {
            let go = go.clone();
            thread::spawn(move || {
                let s = connect_from(HOME, addr);
                go.wait();
                let mut s = s.ok()?;
                socks5_auth_status(&mut s, &format!("nobody{}", i % 40), &format!("p{i}")).ok()
            })
        })
        .collect();
    go.wait();
    thread::sleep(Duration::from_millis(30));
    let (took, status) = timed(|| login_from(&srv, OTHER, "u", "right"));
    for t in flood {
        assert_ne!(t.join().unwrap(), Some(0));
    }
    eprintln!("first login from another address under the flood: {took:?}");
    assert_eq!(status, Some(0), "the other address's login failed");
    assert!(
        took < Duration::from_millis(1500),
        "the other address's first login took {took:?} under the flood"
    );
}
