//! Who may connect and what they may touch, on the worker. Authentication sits between CONNECT
//! and CONNACK: a password check goes to the verifier pool (`crate::auth`) while the connection
//! waits, and its verdict comes back here. Access control applies the ACL file to a session:
//! PUBLISH needs write access to its topic, SUBSCRIBE needs a filter something can be read
//! through, and every delivery needs read access to its topic. Decisions are cached per session
//! and topic (`SessionAccess`), or once per subscription whose whole filter is granted; a reloaded
//! ACL file is picked up by each session at its next decision.
//!
//! SCRAM-SHA-256 enhanced authentication [MQTT-4.12] runs here too: CONNECT carries the
//! client-first message, an AUTH 0x18 exchange follows while the connection has no session, and
//! the CONNACK carries the server-final message; a connected client may re-authenticate with
//! AUTH 0x19. Checking a proof costs two HMACs, so it stays on the loop.

use std::sync::atomic::Ordering;

use super::conn::ConnKey;
use super::Worker;
use crate::auth::acl::{Access, SessionAccess};
use crate::auth::scram;
use crate::codec::{Auth, Connect, ConnectReturnCode, MqttStr, Packet, ReasonCode};
use crate::session::SessionKey;

/// Password checks that passed, kept per worker so reconnects cost no hashing; cleared whole
/// when this many are kept.
const AUTH_CACHE_MAX: usize = 16 * 1024;

/// A worker's side of authentication: CONNECTs waiting for the verifier pool, and the cache.
#[derive(Default)]
pub struct AuthState {
    waiting: std::collections::HashMap<usize, (u64, Box<Connect>)>,
    cache: std::collections::HashSet<u64>,
    verdicts: Vec<crate::auth::Verdict>,
    /// SCRAM exchanges in progress, by connection.
    scram: std::collections::HashMap<usize, ScramWait>,
    /// Connections authenticated with SCRAM (they may re-authenticate), and as whom.
    scram_users: std::collections::HashMap<usize, (u64, Box<str>)>,
}

/// A SCRAM exchange waiting for the client's final message: for a CONNECT (which waits with
/// it) or for a connected client's re-authentication (`connect` is None).
struct ScramWait {
    uid: u64,
    connect: Option<Box<Connect>>,
    exchange: scram::Exchange,
}

fn auth_packet(reason: ReasonCode, data: String) -> Packet {
    let mut a = Auth { reason, ..Default::default() };
    a.properties.authentication_method = Some(MqttStr::from(scram::METHOD));
    a.properties.authentication_data = Some(bytes::Bytes::from(data));
    Packet::Auth(Box::new(a))
}

impl Worker {
    /// The credentials of a CONNECT: passed at once (anonymous allowed, a certificate identity,
    /// a cached check), refused at once (no password file entry), or sent to the verifier pool
    /// while the connection waits. Returns the CONNECT when it may go on now.
    pub(super) fn authenticate(&mut self, k: ConnKey, connect: Box<Connect>) -> Option<Box<Connect>> {
        let auth = self.shared.auth.clone();
        if !auth.enabled() || self.conns[k].transport.identity().is_some() {
            return Some(connect);
        }
        let user = connect.username.as_deref();
        match auth.check(user, connect.password.as_deref(), &self.auth.cache) {
            crate::auth::Check::Pass => Some(connect),
            crate::auth::Check::Refuse(v3, v5, why) => {
                self.refuse(k, v3, v5, why);
                None
            }
            crate::auth::Check::Verify => {
                let c = &mut self.conns[k];
                c.flags.blocked = true;
                let req = crate::auth::Request {
                    worker: self.id,
                    conn: k.0,
                    uid: c.uid,
                    user: user.unwrap_or_default().to_string(),
                    password: connect.password.as_deref().unwrap_or_default().to_vec(),
                };
                self.auth.waiting.insert(k.0, (c.uid, connect));
                auth.submit(req);
                None
            }
        }
    }

    /// The verifier pool's answers for this worker's connections.
    pub(super) fn take_verdicts(&mut self) {
        let mut verdicts = std::mem::take(&mut self.auth.verdicts);
        self.shared.auth.take_verdicts(self.id, &mut verdicts);
        for v in verdicts.drain(..) {
            let k = ConnKey(v.conn);
            let Some((uid, connect)) = self.auth.waiting.remove(&v.conn) else { continue };
            if uid != v.uid {
                // The slot was reused; this verdict is for a connection already gone.
                self.auth.waiting.insert(v.conn, (uid, connect));
                continue;
            }
            if !self.conns.alive(k, uid) {
                continue;
            }
            self.conns[k].flags.blocked = false;
            let Some(key) = v.passed else {
                let why = "bad user name or password";
                self.refuse(
                    k,
                    ConnectReturnCode::BAD_USER_NAME_OR_PASSWORD,
                    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                    why,
                );
                continue;
            };
            if self.auth.cache.len() >= AUTH_CACHE_MAX {
                self.auth.cache.clear();
            }
            self.auth.cache.insert(key);
            match self.admit(k, connect) {
                Some(handover) => {
                    self.release_partial(k);
                    let rest = std::mem::take(&mut self.conns[k].rbuf);
                    self.hand_over(k, handover, rest);
                }
                None => self.turn.more_to_read.push((k, uid)),
            }
        }
        self.auth.verdicts = verdicts;
    }
}

impl Worker {
    /// A CONNECT with an Authentication Method: SCRAM-SHA-256 starts its exchange (the client
    /// gets AUTH 0x18 with the server-first message); anything else is refused with 0x8C.
    pub(super) fn start_enhanced_auth(&mut self, k: ConnKey, connect: Box<Connect>) {
        let method = connect.properties.authentication_method.as_deref().unwrap_or_default();
        let v3 = ConnectReturnCode::NOT_AUTHORIZED;
        if method != scram::METHOD || !self.shared.auth.scram_available() {
            let why = if method == scram::METHOD {
                "SCRAM-SHA-256 needs a password_file"
            } else {
                "unsupported authentication method (SCRAM-SHA-256 is supported)"
            };
            return self.refuse(k, v3, ReasonCode::BAD_AUTHENTICATION_METHOD, why);
        }
        if self.conns[k].transport.wants_identity() {
            let why = "use_identity_as_username: the certificate names the client";
            return self.refuse(k, v3, ReasonCode::BAD_AUTHENTICATION_METHOD, why);
        }
        let data = connect.properties.authentication_data.as_deref().unwrap_or_default();
        let first = match scram::ClientFirst::parse(data) {
            Ok(f) => f,
            Err(e) => return self.refuse(k, v3, ReasonCode::NOT_AUTHORIZED, &e.to_string()),
        };
        if connect.username.as_deref().is_some_and(|u| u != first.user) {
            let why = "the SCRAM user name differs from the CONNECT's";
            return self.refuse(k, v3, ReasonCode::NOT_AUTHORIZED, why);
        }
        self.challenge(k, first, Some(connect));
    }

    /// Answers a client-first message with the server-first one (AUTH 0x18) and waits for the
    /// client's proof, with the CONNECT (or None for a re-authentication).
    fn challenge(&mut self, k: ConnKey, first: scram::ClientFirst, connect: Option<Box<Connect>>) {
        let entry = self.shared.auth.scram_entry(&first.user);
        let (exchange, server_first) = scram::Exchange::start(first, entry, &scram::server_nonce());
        self.send(k, &auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, server_first));
        let uid = self.conns[k].uid;
        self.auth.scram.insert(k.0, ScramWait { uid, connect, exchange });
    }

    /// An AUTH packet: the client's final SCRAM message (for its CONNECT or a
    /// re-authentication), or the start of a re-authentication. Returns the CONNECT when the
    /// client id lives on another worker, for the caller to hand the connection over.
    pub(super) fn on_auth(&mut self, k: ConnKey, auth: Auth) -> Option<(Box<Connect>, bool)> {
        let uid = self.conns[k].uid;
        let method_ok = auth.properties.authentication_method.as_deref() == Some(scram::METHOD);
        let data = auth.properties.authentication_data.as_deref().unwrap_or_default();
        let waiting = self.auth.scram.remove(&k.0).filter(|w| w.uid == uid);
        let Some(wait) = waiting else {
            let user = self.auth.scram_users.get(&k.0).filter(|u| u.0 == uid).map(|u| u.1.clone());
            match user {
                Some(user) if auth.reason == ReasonCode::REAUTHENTICATE && method_ok => {
                    self.reauth_start(k, &user, data)
                }
                Some(_) => {
                    // [MQTT-4.12.1-1]: a re-authentication uses the CONNECT's method.
                    let why = "AUTH must be 0x19 with the CONNECT's authentication method [MQTT-4.12.1-1]";
                    self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
                }
                // [MQTT-4.12.0-7]: no method in CONNECT, no AUTH.
                None => self.disconnect_with(
                    k,
                    ReasonCode::PROTOCOL_ERROR,
                    "AUTH without an authentication method [MQTT-4.12.0-7]",
                ),
            }
            return None;
        };
        if auth.reason != ReasonCode::CONTINUE_AUTHENTICATION || !method_ok {
            let why = "AUTH during an exchange must be 0x18 with the same method [MQTT-4.12.0-5]";
            self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
            return None;
        }
        let verdict = wait.exchange.finish(data);
        let user = wait.exchange.user;
        match (verdict, wait.connect) {
            (Ok(server_final), Some(mut connect)) => {
                log::debug!("SCRAM: {user} authenticated from {}", self.conns[k].peer());
                connect.username = Some(MqttStr::from(user));
                // Carried to attach, which puts it in the CONNACK.
                connect.properties.authentication_data = Some(bytes::Bytes::from(server_final));
                self.admit(k, connect)
            }
            (Ok(server_final), None) => {
                self.send(k, &auth_packet(ReasonCode::SUCCESS, server_final));
                None
            }
            (Err(e), Some(_)) => {
                let why = format!("SCRAM authentication of {user} failed: {e}");
                self.refuse(k, ConnectReturnCode::NOT_AUTHORIZED, ReasonCode::NOT_AUTHORIZED, &why);
                None
            }
            (Err(e), None) => {
                // [MQTT-4.12.1-2]: a failed re-authentication closes the connection.
                let why = format!("SCRAM re-authentication of {user} failed: {e}");
                self.disconnect_with(k, ReasonCode::NOT_AUTHORIZED, &why);
                None
            }
        }
    }

    /// AUTH 0x19 from a connected client: the same user starts a new exchange.
    fn reauth_start(&mut self, k: ConnKey, user: &str, data: &[u8]) {
        let first = match scram::ClientFirst::parse(data) {
            Ok(f) if f.user == user => f,
            Ok(_) => return self.disconnect_with(k, ReasonCode::NOT_AUTHORIZED, "re-authentication as another user"),
            Err(e) => return self.disconnect_with(k, ReasonCode::NOT_AUTHORIZED, &e.to_string()),
        };
        self.challenge(k, first, None);
    }

    /// A connection attached after SCRAM: it may re-authenticate as the same user.
    pub(super) fn scram_attached(&mut self, k: ConnKey, user: &str) {
        let uid = self.conns[k].uid;
        self.auth.scram_users.insert(k.0, (uid, user.into()));
    }

    /// A closing connection's SCRAM state goes with it.
    pub(super) fn scram_forget(&mut self, k: ConnKey) {
        if !self.auth.scram.is_empty() {
            self.auth.scram.remove(&k.0);
        }
        if !self.auth.scram_users.is_empty() {
            self.auth.scram_users.remove(&k.0);
        }
    }

    /// Gives a session attaching with `user` its view of the ACL file, if there is one.
    pub(super) fn grant_access(&mut self, sk: SessionKey, user: Option<&str>) {
        let auth = &self.shared.auth;
        let generation = auth.acl_generation.load(Ordering::Acquire);
        let s = &mut self.sessions[sk];
        s.access = auth.client_acl(user, &s.client_id).map(|r| Box::new(SessionAccess::new(r, user, generation)));
    }

    /// Whether session `sk` may read or write `topic` (always, without an ACL file).
    pub(super) fn may(&mut self, sk: SessionKey, topic: &str, access: Access) -> bool {
        let Some(s) = self.sessions.get_mut(sk) else { return false };
        let Some(a) = s.access.as_deref_mut() else { return true };
        let auth = &self.shared.auth;
        let generation = auth.acl_generation.load(Ordering::Relaxed);
        if a.generation != generation {
            match auth.client_acl(a.user(), &s.client_id) {
                Some(rules) => a.replace(rules, generation),
                None => {
                    s.access = None;
                    return true;
                }
            }
        }
        a.allows(topic, access)
    }

    /// For a subscription being added: 1 + the ACL generation if everything `filter` matches
    /// may be read (no check per message), else 0.
    pub(super) fn whole_grant(&mut self, sk: SessionKey, filter: &str) -> u32 {
        self.may(sk, "", Access::Read);
        let generation = self.shared.auth.acl_generation.load(Ordering::Relaxed);
        match self.sessions.get(sk).and_then(|s| s.access.as_deref()) {
            Some(a) if a.generation == generation && a.grants_whole(filter) => generation as u32 + 1,
            _ => 0,
        }
    }

    /// Whether a SUBSCRIBE to `filter` (the filter part of a shared one) can ever deliver.
    pub(super) fn may_subscribe(&mut self, sk: SessionKey, filter: &str) -> bool {
        // Brings the session's rules up to date first.
        self.may(sk, "", Access::Read);
        self.sessions.get(sk).and_then(|s| s.access.as_deref()).is_none_or(|a| a.may_subscribe(filter))
    }
}
