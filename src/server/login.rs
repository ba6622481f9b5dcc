//! The server's credential check as a connection sees it: the login gate's verdict (`auth::login`)
//! turned into log lines, counters and the answer a client gets. Used by the SOCKS5 and CONNECT
//! handshakes (`conn.rs`) and by each plain-HTTP request (`gate.rs`).

use super::shared::Shared;
use crate::auth::login::Verdict;
use crate::flow::account::Account;
use crate::wire::http::Status;
use log::warn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// How a credential check ended, for the caller to word its answer.
pub(crate) enum Login {
    /// Logged in.
    Ok(Arc<Account>),
    /// Wrong password or unknown user.
    Wrong,
    /// Refused without a check: this user at this address, or the address, failed too often.
    Blocked {
        /// Seconds until a retry may be checked (at least 1).
        for_secs: u64,
    },
    /// Not checked: too many checks under way for this address, or the handshake deadline
    /// passed while waiting for one; a retry in a moment may pass.
    Busy,
}

impl Login {
    /// The HTTP answer to a refused login: 407 for a wrong password (the client may ask again),
    /// 429 saying for how long when blocked, 503 when not checked; the body says which.
    pub(crate) fn http_answer(&self) -> (Status, String) {
        match self {
            Login::Ok(_) => (Status::Ok, String::new()),
            Login::Wrong => (Status::ProxyAuthRequired, "login refused".into()),
            Login::Blocked { for_secs } => (
                Status::TooManyRequests,
                format!(
                    "too many failed logins: blocked for {for_secs} s; retrying sooner is refused unchecked"
                ),
            ),
            Login::Busy => (
                Status::ServiceUnavailable,
                "too many logins under way from this address; retry in a moment".into(),
            ),
        }
    }
}

/// Checks credentials through the login gate (throttle, verify cache, argon2 slots; see
/// `login.rs`), waiting no later than `deadline`. Blocking. Refusals are logged at warn with
/// the address and counted; a block a failure started is logged as such.
pub(crate) fn login(
    sh: &Shared,
    peer: SocketAddr,
    id: u64,
    proto: &'static str,
    (user, pass): (&[u8], &[u8]),
    deadline: Instant,
) -> Login {
    match sh.logins.check(peer.ip(), user, pass, deadline) {
        Verdict::Ok(a) => Login::Ok(a),
        refusal => refused(sh, peer, id, proto, user, refusal),
    }
}

/// A login that did not pass: counted, logged, and what the client is to be told. A passing login
/// makes no printable copy of the name and carries none of this path's formatting.
#[cold]
#[inline(never)]
fn refused(
    sh: &Shared,
    peer: SocketAddr,
    id: u64,
    proto: &'static str,
    user: &[u8],
    verdict: Verdict,
) -> Login {
    let name = printable(user);
    let refused = |what: String| {
        sh.counters.auth_failure(proto);
        warn!("conn#{id} {peer} {proto} login refused for user \"{name}\": {what}");
    };
    match verdict {
        Verdict::Ok(a) => Login::Ok(a),
        Verdict::Wrong(blocks) => {
            refused("wrong password or unknown user".into());
            if let Some(d) = blocks.pair {
                warn!(
                    "conn#{id} {peer} user \"{name}\" blocked from this address for {} s after repeated failures",
                    d.as_secs()
                );
            }
            if let Some(d) = blocks.source {
                warn!(
                    "conn#{id} {peer} address blocked for {} s after repeated failures (users verified from it recently still log in)",
                    d.as_secs()
                );
            }
            Login::Wrong
        }
        Verdict::Blocked(d) => {
            let for_secs = d.as_secs_f64().ceil().max(1.0) as u64;
            refused(format!("blocked, not checked: {for_secs} s left"));
            Login::Blocked { for_secs }
        }
        Verdict::Busy => {
            refused("not checked: too many checks under way for this address".into());
            Login::Busy
        }
        Verdict::TimedOut => {
            refused("not checked: handshake deadline passed waiting for a check slot".into());
            Login::Busy
        }
    }
}

fn printable(name: &[u8]) -> String {
    String::from_utf8_lossy(name).escape_debug().to_string()
}
