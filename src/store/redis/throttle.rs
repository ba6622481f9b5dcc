//! Failed-login counts shared by a fleet (issue 21), so a guesser gains nothing by spreading its
//! tries over servers. One hash per source, `sluice:fail:{SOURCE}` (the source as `Source`
//! prints it, hash-tagged): field `*` counts the source's failures, `u:NAME` those of one user
//! at it. Each increment renews the key's time to live, so a source quiet for that long starts
//! over everywhere, as it does in one server's throttle. A verified login deletes its pair's
//! field; `sluice unban` deletes the source's key.

use super::conn::{Conn, RedisSpec, is_connection_error};
use super::tag;
use crate::error::Result;
use ::redis::{Cmd, Value, cmd};

/// `sluice:fail:{SOURCE}`.
pub fn fail_key(source: &str) -> String {
    format!("sluice:fail:{{{}}}", tag(source))
}

/// The field of a user at a source.
fn pair_field(user: &str) -> String {
    format!("u:{user}")
}

/// One login outcome to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A wrong password: the source's and the pair's counts go up (the source's not when
    /// `pair_only`).
    Failed {
        /// The source (as `Source` prints it).
        source: String,
        /// The user name.
        user: String,
        /// Count against the pair only.
        pair_only: bool,
    },
    /// A verified login: the pair's count starts over.
    Verified {
        /// The source.
        source: String,
        /// The user name.
        user: String,
    },
}

/// A connection for sharing failure counts; reconnects at the next call after a failure.
pub struct SharedFailures {
    spec: RedisSpec,
    conn: Option<Conn>,
    ttl_secs: u64,
}

impl SharedFailures {
    /// Counts kept `ttl_secs` after a source's last failure.
    pub fn new(spec: RedisSpec, ttl_secs: u64) -> SharedFailures {
        SharedFailures {
            spec,
            conn: None,
            ttl_secs: ttl_secs.max(1),
        }
    }

    /// Sends `cmds` in one pipeline and returns the replies.
    fn send(&mut self, cmds: Vec<Cmd>) -> Result<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if self.conn.is_none() {
            self.conn = Some(self.spec.connect()?);
        }
        let Some(c) = self.conn.as_mut() else {
            return Err(self.spec.error("no connection"));
        };
        c.batch(cmds).map_err(|e| {
            if is_connection_error(&e) {
                self.conn = None;
            }
            self.spec.error(e)
        })
    }

    /// Adds `reports` to the shared counts; returns, for each, the fleet's (source, pair)
    /// totals after a failure, `None` for a verified login.
    ///
    /// # Errors
    /// Redis failed; nothing is known to have been counted.
    pub fn publish(&mut self, reports: &[Report]) -> Result<Vec<Option<(u32, u32)>>> {
        let mut cmds = Vec::new();
        for r in reports {
            match r {
                Report::Failed {
                    source,
                    user,
                    pair_only,
                } => {
                    let k = fail_key(source);
                    cmds.push(
                        cmd("HINCRBY")
                            .arg(&k)
                            .arg("*")
                            .arg(i64::from(!pair_only))
                            .clone(),
                    );
                    cmds.push(cmd("HINCRBY").arg(&k).arg(pair_field(user)).arg(1).clone());
                    cmds.push(cmd("EXPIRE").arg(&k).arg(self.ttl_secs).clone());
                }
                Report::Verified { source, user } => {
                    cmds.push(
                        cmd("HDEL")
                            .arg(fail_key(source))
                            .arg(pair_field(user))
                            .clone(),
                    );
                }
            }
        }
        let replies = self.send(cmds)?;
        let mut it = replies.into_iter();
        let mut out = Vec::with_capacity(reports.len());
        for r in reports {
            match r {
                Report::Failed { .. } => {
                    let s = count(it.next());
                    let p = count(it.next());
                    it.next();
                    out.push(Some((s, p)));
                }
                Report::Verified { .. } => {
                    it.next();
                    out.push(None);
                }
            }
        }
        Ok(out)
    }

    /// The fleet's (source, pair) totals for each (source, user).
    ///
    /// # Errors
    /// Redis failed.
    pub fn totals(&mut self, pairs: &[(String, String)]) -> Result<Vec<(u32, u32)>> {
        let cmds = pairs
            .iter()
            .map(|(s, u)| {
                cmd("HMGET")
                    .arg(fail_key(s))
                    .arg("*")
                    .arg(pair_field(u))
                    .clone()
            })
            .collect();
        let replies = self.send(cmds)?;
        Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::Array(a) => {
                    let mut it = a.into_iter();
                    (count(it.next()), count(it.next()))
                }
                _ => (0, 0),
            })
            .collect())
    }
}

/// A count from a reply (an integer, a number as text, or nil = 0).
fn count(v: Option<Value>) -> u32 {
    let n = match v {
        Some(Value::Int(i)) => i,
        Some(Value::BulkString(b)) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}
