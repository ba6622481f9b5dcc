//! The server's side of plain-HTTP forwarding (`net::forward`): each request carries its own Basic
//! credentials and is charged to its own user; the connection holds one `max_connections` slot,
//! for the user of its current request, and moves it when the user changes; origins are dialed
//! under the server's destination policy.
//!
//! Password checks go through `conn::login` (throttle, argon2, cache); a connection remembers
//! the last `Proxy-Authorization` value that verified, so a keep-alive client sending the same
//! header on every request costs one check, not one per request.

use crate::flow::account::{Account, Refusal, Slot};
use crate::net::admission::HandshakeSlot;
use crate::net::dial;
use crate::net::forward::{Gate, Refused};
use crate::net::os;
use crate::net::relay::Budget;
use crate::net::stream::Stream;
use crate::server::login::{Login, login};
use crate::server::shared::Shared;
use crate::wire::http::{ProxyAuth, Request, Status, credential_text};
use crate::wire::target::Target;
use log::warn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// One server connection's authorisation state for plain HTTP.
pub(crate) struct ServerGate<'a> {
    sh: &'a Shared,
    peer: SocketAddr,
    id: u64,
    /// The user whose connection slot this connection holds.
    holder: Option<Slot>,
    /// The last `Proxy-Authorization` value that verified, and its account.
    verified: Option<(Vec<u8>, Arc<Account>)>,
    /// The user of the request under way, for its log line ("-" until authorised).
    current: String,
    /// The connection's handshake slot, given back at its first successful login.
    handshake: Option<HandshakeSlot<'a>>,
}

impl<'a> ServerGate<'a> {
    /// A gate for connection `id` from `peer`, holding no slot yet.
    pub fn new(
        sh: &'a Shared,
        peer: SocketAddr,
        id: u64,
        handshake: Option<HandshakeSlot<'a>>,
    ) -> ServerGate<'a> {
        ServerGate {
            sh,
            peer,
            id,
            handshake,
            holder: None,
            verified: None,
            current: "-".into(),
        }
    }

    /// The account this request's credentials name.
    fn credentials(&mut self, req: &Request) -> Result<Arc<Account>, Refused> {
        let value = req.header("proxy-authorization");
        if let (Some(v), Some((seen, account))) = (value, &self.verified)
            && v == seen.as_slice()
            && !account.is_revoked()
        {
            return Ok(account.clone());
        }
        let challenge = |detail: &str| Refused {
            status: Status::ProxyAuthRequired,
            detail: detail.into(),
        };
        match req.proxy_auth() {
            // Another scheme (NTLM, Negotiate) gets the Basic challenge so the client can fall
            // back (RFC 9110 §11.7.1). Browsers send credentials only after a 407: no warning.
            ProxyAuth::Missing | ProxyAuth::OtherScheme => {
                Err(challenge("proxy authentication required"))
            }
            ProxyAuth::Malformed => {
                self.sh.counters.connection("http", "rejected");
                warn!(
                    "conn#{} {} http malformed Proxy-Authorization; answered 400",
                    self.id, self.peer
                );
                Err(Refused {
                    status: Status::BadRequest,
                    detail: "malformed Proxy-Authorization".into(),
                })
            }
            ProxyAuth::Basic { username, password } => {
                let (user, pass) = (credential_text(&username), credential_text(&password));
                // Each request's check has a handshake's time, from when its head was parsed.
                let deadline = Instant::now() + self.sh.handshake_timeout;
                match login(
                    self.sh,
                    self.peer,
                    self.id,
                    "http",
                    (&user, &pass),
                    deadline,
                ) {
                    Login::Ok(a) => {
                        // Logged in: the connection no longer counts as a handshake.
                        self.handshake.take();
                        self.verified = value.map(|v| (v.to_vec(), a.clone()));
                        Ok(a)
                    }
                    refused => {
                        let (status, detail) = refused.http_answer();
                        Err(Refused { status, detail })
                    }
                }
            }
        }
    }

    /// Holds a connection slot for `account`, giving back the previous user's if it differs.
    fn hold(&mut self, account: &Arc<Account>) -> Result<(), Refused> {
        let refused = |r: Refusal| Refused {
            status: if r == Refusal::TooMany {
                Status::TooManyRequests
            } else {
                Status::Forbidden
            },
            detail: r.to_string(),
        };
        if let Some(cur) = &self.holder
            && Arc::ptr_eq(cur.account(), account)
        {
            if account.is_revoked() {
                return Err(refused(Refusal::Revoked));
            }
            if account.quota_exhausted() {
                return Err(refused(Refusal::Quota));
            }
            return Ok(());
        }
        // The previous user's slot goes back before the new one is taken.
        self.holder = None;
        let slot = match account.admit(self.id) {
            Ok((slot, idle)) => {
                // An idle user starts from an empty bucket: its first second carries at most its
                // rate.
                if idle {
                    self.sh.limiter.start_fresh(&account.name);
                }
                slot
            }
            Err(r) => {
                warn!(
                    "conn#{} {} http user={} refused: {r}",
                    self.id, self.peer, account.name
                );
                self.sh.counters.connection("http", "refused");
                return Err(refused(r));
            }
        };
        self.holder = Some(slot);
        Ok(())
    }
}

impl Gate for ServerGate<'_> {
    fn authorize(&mut self, req: &Request) -> Result<Option<Arc<Budget>>, Refused> {
        self.current = "-".into();
        let account = self.credentials(req)?;
        self.current = account.name.to_string();
        self.hold(&account)?;
        Ok(Some(Arc::new(Budget {
            account,
            limiter: self.sh.limiter.clone(),
        })))
    }

    fn open(&mut self, target: &Target) -> Result<Stream, Refused> {
        match dial::dial(target, &self.sh.policy) {
            Ok(s) => {
                self.sh.counters.connection("http", "ok");
                os::tune_relay_socket(&s);
                Ok(Stream::plain(s))
            }
            Err(e) => {
                self.sh.counters.connection("http", "dial_failed");
                // The log keeps what the name resolved to; the client is told only the reason.
                log::info!(
                    "conn#{} {} http user={} dest={target} dial failed: {e}",
                    self.id,
                    self.peer,
                    self.current
                );
                Err(Refused {
                    status: e.status(),
                    detail: e.client_reason(),
                })
            }
        }
    }

    fn attach(&mut self, client: &Stream, origin: &Stream) -> bool {
        match &self.holder {
            Some(slot) => slot.attach(Box::new([client.clone(), origin.clone()])),
            None => true,
        }
    }

    fn user(&self) -> String {
        self.current.clone()
    }

    fn stopping(&self) -> bool {
        self.sh.intake.stopping()
    }

    fn authenticated(&self) -> bool {
        self.holder.is_some()
    }

    fn release(&mut self) {
        self.holder = None;
    }
}
