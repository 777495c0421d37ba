//! The ACL file applied to a session: PUBLISH needs write access to its topic, SUBSCRIBE needs a
//! filter something can be read through, and every delivery needs read access to its topic.
//! Decisions are cached per session and topic (`SessionAccess`); a reloaded ACL file is picked up
//! by each session at its next decision.

use std::sync::atomic::Ordering;

use super::Worker;
use crate::auth::acl::{Access, SessionAccess};
use crate::session::SessionKey;

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
