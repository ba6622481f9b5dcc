//! The failed-login throttle: 10 failures from one address within 60 s and that address is
//! refused for 300 s, right password or not, without running argon2; other addresses log in.
//! The second address is 127.0.0.2 (all of 127/8 is loopback on Linux).

use super::*;
use std::net::Ipv4Addr;

const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// One SOCKS5 login from 127.0.0.1 in a single write; its status and how long the answer took.
fn timed_login(srv: &TestServer, user: &str, pass: &str) -> (Duration, u8) {
    let mut s = connect(srv.addr);
    let (took, status) = timed(|| socks5_auth_status(&mut s, user, pass));
    (took, status.expect("no answer to a login"))
}

#[test]
fn ten_failures_block_the_address_without_argon2_and_other_addresses_still_log_in() {
    let origin = Origin::start();
    let srv = TestServer::start(&[("u", "right", 0), ("v", "other", 0)]);
    // Ten wrong passwords: each is checked by argon2.
    let verifies: Vec<Duration> = (0..10)
        .map(|i| {
            let (t, status) = timed_login(&srv, "u", &format!("wrong{i}"));
            assert_eq!(status, 1, "wrong password {i} accepted");
            t
        })
        .collect();
    // Now even the right password, and any user, is refused from this address.
    let refusals: Vec<Duration> = (0..5)
        .map(|_| {
            let (t, status) = timed_login(&srv, "u", "right");
            assert_eq!(
                status, 1,
                "the right password was accepted from a blocked address"
            );
            t
        })
        .collect();
    let (_, status) = timed_login(&srv, "v", "other");
    assert_eq!(status, 1, "another user from the blocked address");
    let target = origin.addr.to_string();
    let (_s, head) = http_exchange(srv.addr, &connect_head(&target, Some(("u", "right"))));
    assert_eq!(
        status_code(&head),
        407,
        "http from the blocked address: {head:?}"
    );

    let (verify, refuse) = (median(verifies), median(refusals));
    eprintln!("argon2 verify (median) {verify:?}, refusal when blocked (median) {refuse:?}");
    assert!(
        refuse * 4 < verify,
        "a blocked refusal took {refuse:?}, an argon2 verify {verify:?}: the hash still runs"
    );

    // Another loopback address is not blocked.
    let s = connect_from(OTHER, srv.addr).expect("cannot connect from 127.0.0.2");
    let mut s = socks5_on(s, "u", "right", origin.addr).expect("login from 127.0.0.2 refused");
    s.write_all(b"SEND 1000\n").unwrap();
    let got = read_all(&mut s);
    assert!(got.len() == 1000 && is_pattern(&got));
    assert_eq!(origin.connections(), 1);
}

#[test]
fn failures_from_one_address_do_not_count_against_another() {
    let srv = TestServer::start(&[("u", "right", 0)]);
    for i in 0..9 {
        let (_, status) = timed_login(&srv, "u", &format!("wrong{i}"));
        assert_eq!(status, 1);
    }
    // A tenth failure from elsewhere does not complete 127.0.0.1's count.
    let mut s = connect_from(OTHER, srv.addr).unwrap();
    assert_eq!(socks5_auth_status(&mut s, "u", "wrong").unwrap(), 1);
    let (_, status) = timed_login(&srv, "u", "right");
    assert_eq!(status, 0, "127.0.0.1 blocked by failures from 127.0.0.2");
}

/// A client holding one valid account interleaves a good login after every nine guesses: if a
/// success wiped the address's failures, it could guess (and burn argon2) without end.
#[test]
fn a_successful_login_does_not_reset_the_guessing_count() {
    let srv = TestServer::start(&[("mine", "known", 0), ("victim", "secret", 0)]);
    let mut blocked_in = None;
    for round in 0..3 {
        for i in 0..9 {
            let (_, status) = timed_login(&srv, "victim", &format!("guess{round}-{i}"));
            assert_eq!(status, 1);
        }
        if timed_login(&srv, "mine", "known").1 != 0 {
            blocked_in = Some(round);
            break;
        }
    }
    // Nine failures, a good login, then the tenth failure blocks: the good login is refused.
    assert_eq!(
        blocked_in,
        Some(1),
        "a good login after every nine guesses kept 127.0.0.1 from ever being blocked"
    );
}
