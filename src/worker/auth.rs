//! Who may connect and what they may touch, on the worker. Authentication sits between CONNECT
//! and CONNACK: a password check goes to the verifier pool (`crate::auth`) while the connection
//! waits, and its verdict comes back here. Access control applies the ACL file to a session:
//! PUBLISH needs write access to its topic, SUBSCRIBE needs a filter something can be read
//! through, and every delivery needs read access to its topic. Decisions are cached per session
//! and topic (`SessionAccess`), or once per subscription whose whole filter is granted; a reloaded
//! ACL file is picked up by each session at its next decision.

use std::sync::atomic::Ordering;

use super::conn::ConnKey;
use super::Worker;
use crate::auth::acl::{Access, SessionAccess};
use crate::codec::{Connect, ConnectReturnCode, ReasonCode};
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
