//! Where a message goes. Per worker: one trie holding the subscriptions of its own sessions and
//! the interest of every other worker (which filters each has subscribers or shared groups for),
//! so routing a message walks its topic once (and a run of one topic walks once: `Memo`); the
//! retained store and the shared groups homed here. Pure data: the worker asks, the router
//! answers; it never sends anything itself.
//!
//! Interest is counted per filter: a worker announces a filter to its peers when its first
//! reason to want it appears (a subscriber, or a shared group homed here) and retracts it when the
//! last one goes. Peers acknowledge an announcement only after applying it, and a SUBACK waits for
//! those acknowledgements, so a message published after the SUBACK, on any worker, is routed here.

mod retained;
mod shared;

pub use retained::RetainedTree;
pub use shared::{GroupId, Member, SharedGroups};

use hashbrown::HashMap;

use crate::session::Subscription;
use crate::topic::SubTrie;

/// Who wants messages matching a filter: a session of this worker, or a peer worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Session(u32),
    Peer(u16),
}

#[derive(Default)]
pub struct Router {
    /// filter -> this worker's sessions (with their subscription) and the peer workers that want
    /// it: one trie, so routing a PUBLISH walks its topic once for both.
    routes: SubTrie<Target, Subscription>,
    /// Session entries and peer entries in `routes`.
    local: usize,
    interest: usize,
    /// Why this worker wants each filter it announced: subscribed sessions count once per
    /// filter, each shared group homed here once.
    announced: HashMap<Box<str>, u32, ahash::RandomState>,
    pub retained: RetainedTree,
    pub groups: SharedGroups,
    /// Dedup scratch for `matches`: `seen[w] == round` marks a peer already listed.
    seen: Vec<u64>,
    round: u64,
    /// Trie walks so far (local, peers, shared), for `$SYS/broker/internal/trie_walks`.
    pub walks: u64,
    /// What the last walk found, while the trie is unchanged.
    memo: Memo,
}

/// The last topic routed and everything it matched (sessions and peers), valid until the trie
/// next changes: a client publishing a run of messages on one topic, read from one socket read or
/// one peer's batch, costs one walk per run, not one per message. Exactly what a walk would
/// return, since nothing but `subscribe`, `unsubscribe` and `peer_interest` changes the trie and
/// each of them forgets it.
#[derive(Default)]
struct Memo {
    valid: bool,
    topic: String,
    local: Vec<(u32, Subscription)>,
    peers: Vec<u16>,
}

/// What a local subscription change means for peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// The session already had this filter (5.0 retain handling 1 asks).
    pub existed: bool,
    /// The filter is new to this worker: announce it and wait for the peers' acknowledgements.
    pub announce: bool,
}

impl Router {
    pub fn new(workers: usize) -> Router {
        // With room from the start, on the worker's own thread (see `Worker::new`'s scratch).
        let memo = Memo {
            valid: false,
            topic: String::with_capacity(256),
            local: Vec::with_capacity(64),
            peers: Vec::with_capacity(64),
        };
        Router { seen: vec![0; workers], memo, ..Default::default() }
    }

    /// Subscriptions held by this worker's sessions.
    pub fn subscription_count(&self) -> usize {
        self.local
    }

    /// This worker's sessions subscribed to exactly `filter`.
    fn sessions_at(&self, filter: &str) -> usize {
        self.routes.count_at_where(filter, |t| matches!(t, Target::Session(_)))
    }

    /// Filters this worker has announced: the size of every peer's interest table due to it.
    pub fn announced_count(&self) -> usize {
        self.announced.len()
    }

    pub fn subscribe(&mut self, filter: &str, session: u32, sub: Subscription) -> Subscribed {
        self.memo.valid = false;
        let inserted = self.routes.insert(filter, Target::Session(session), sub);
        let existed = matches!(inserted, Ok(Some(_)));
        if matches!(inserted, Ok(None)) {
            self.local += 1;
        }
        let announce = !existed && self.sessions_at(filter) == 1 && self.want(filter);
        Subscribed { existed, announce }
    }

    /// Returns true when the filter should now be retracted from the peers.
    pub fn unsubscribe(&mut self, filter: &str, session: u32) -> bool {
        self.memo.valid = false;
        if self.routes.remove(filter, &Target::Session(session)).is_none() {
            return false;
        }
        self.local -= 1;
        self.sessions_at(filter) == 0 && self.unwant(filter)
    }

    /// One more reason to want `filter`; true when it is the first (announce it).
    pub fn want(&mut self, filter: &str) -> bool {
        let n = self.announced.entry_ref(filter).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// One reason fewer; true when it was the last (retract it).
    pub fn unwant(&mut self, filter: &str) -> bool {
        match self.announced.get_mut(filter) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.announced.remove(filter);
                true
            }
            None => false,
        }
    }

    /// A peer announced or retracted a filter.
    pub fn peer_interest(&mut self, filter: &str, worker: u16, present: bool) {
        self.memo.valid = false;
        if present {
            if let Ok(None) = self.routes.insert(filter, Target::Peer(worker), Subscription::default()) {
                self.interest += 1;
            }
        } else if self.routes.remove(filter, &Target::Peer(worker)).is_some() {
            self.interest -= 1;
        }
    }

    /// This worker's subscriptions matching `topic`, appended to `out`.
    pub fn local_matches(&mut self, topic: &str, out: &mut Vec<(u32, Subscription)>) {
        if self.local == 0 {
            return;
        }
        self.remember(topic);
        out.extend_from_slice(&self.memo.local);
    }

    /// In one walk: this worker's subscriptions matching `topic`, appended to `local`, and the
    /// peers that want it, each once, appended to `peers`.
    pub fn matches(&mut self, topic: &str, local: &mut Vec<(u32, Subscription)>, peers: &mut Vec<u16>) {
        if self.local == 0 && self.interest == 0 {
            return;
        }
        self.remember(topic);
        local.extend_from_slice(&self.memo.local);
        peers.extend_from_slice(&self.memo.peers);
    }

    /// Makes the memo hold what `topic` matches, walking the trie unless it already does.
    fn remember(&mut self, topic: &str) {
        let memo = &mut self.memo;
        if memo.valid && memo.topic == topic {
            return;
        }
        memo.valid = true;
        memo.topic.clear();
        memo.topic.push_str(topic);
        memo.local.clear();
        memo.peers.clear();
        self.walks += 1;
        self.round += 1;
        let (seen, round) = (&mut self.seen, self.round);
        self.routes.for_each_match(topic, |t, &sub| match *t {
            Target::Session(sk) => memo.local.push((sk, sub)),
            Target::Peer(w) => {
                if seen[w as usize] != round {
                    seen[w as usize] = round;
                    memo.peers.push(w);
                }
            }
        });
    }

    /// The shared groups homed here that match `topic`.
    pub fn groups_matching(&mut self, topic: &str, out: &mut Vec<GroupId>) {
        if !self.groups.is_empty() {
            self.walks += 1;
            self.groups.matching(topic, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_is_announced_once_for_all_its_reasons_and_retracted_with_the_last() {
        let mut r = Router::new(2);
        let sub = Subscription::default();
        assert_eq!(r.subscribe("a/+", 1, sub), Subscribed { existed: false, announce: true });
        assert_eq!(r.subscribe("a/+", 2, sub), Subscribed { existed: false, announce: false });
        assert_eq!(r.subscribe("a/+", 2, sub), Subscribed { existed: true, announce: false });
        assert!(!r.want("a/+"), "a shared group on the same filter adds a reason, not an announcement");
        assert!(!r.unsubscribe("a/+", 1));
        assert!(!r.unsubscribe("a/+", 2), "the group still wants it");
        assert!(r.unwant("a/+"));
        assert_eq!(r.announced_count(), 0);
    }

    #[test]
    fn a_run_on_one_topic_walks_once_and_any_change_to_the_trie_walks_again() {
        let mut r = Router::new(3);
        let sub = Subscription::default();
        r.subscribe("a/b", 1, sub);
        let find = |r: &mut Router, topic: &str| {
            let (mut local, mut peers) = (vec![], vec![]);
            r.matches(topic, &mut local, &mut peers);
            (local.iter().map(|&(sk, _)| sk).collect::<Vec<_>>(), peers)
        };
        assert_eq!(find(&mut r, "a/b"), (vec![1], vec![]));
        assert_eq!(find(&mut r, "a/b"), (vec![1], vec![]));
        let mut local = vec![];
        r.local_matches("a/b", &mut local);
        assert_eq!((local.len(), r.walks), (1, 1), "the same topic again: no walk");
        r.subscribe("a/+", 2, sub);
        assert_eq!(find(&mut r, "a/b"), (vec![1, 2], vec![]), "a new subscription is seen");
        r.peer_interest("a/#", 2, true);
        assert_eq!(find(&mut r, "a/b"), (vec![1, 2], vec![2]), "a peer's new interest is seen");
        assert_eq!(find(&mut r, "a/c"), (vec![2], vec![2]), "another topic walks");
        r.unsubscribe("a/+", 2);
        assert_eq!(find(&mut r, "a/c"), (vec![], vec![2]), "a gone subscription is not found");
        r.peer_interest("a/#", 2, false);
        assert_eq!(find(&mut r, "a/c"), (vec![], vec![]));
        assert_eq!(r.walks, 6);
    }

    #[test]
    fn peers_are_listed_once_per_message_however_many_filters_match() {
        let mut r = Router::new(4);
        r.peer_interest("a/#", 1, true);
        r.peer_interest("a/b", 1, true);
        r.peer_interest("+/b", 3, true);
        r.subscribe("a/b", 7, Subscription::default());
        let (mut local, mut out) = (vec![], vec![]);
        r.matches("a/b", &mut local, &mut out);
        out.sort();
        assert_eq!(out, [1, 3]);
        assert_eq!(local, [(7, Subscription::default())], "one walk finds both");
        out.clear();
        r.peer_interest("+/b", 3, false);
        r.matches("a/b", &mut vec![], &mut out);
        assert_eq!(out, [1]);
        assert_eq!((r.subscription_count(), r.walks), (1, 2));
    }
}
