//! Arrival order across workers. One event loop sees its sockets in the order their bytes came;
//! several do not: a SUBSCRIBE that reached the host before another client's PUBLISH may be read
//! by its worker after the publisher's worker has routed that PUBLISH (that worker was busy, or
//! not on a CPU), and the message would miss a subscription the client had asked for first.
//!
//! So, with more than one worker, the kernel stamps every segment with the time it reached the
//! host (`SO_TIMESTAMPNS`, read with each `recvmsg`), and each worker keeps the messages it routed
//! in the last moments (`recent::Recent`: at most `WINDOW_NS` old, `MAX_ENTRIES` and `MAX_BYTES`). A
//! SUBSCRIBE that adds filters to a session asks every peer, behind its interest announcement in
//! the same ring, for the messages that arrived after it and match them (`CatchUpAsk`), and looks
//! in its own worker's list. An answer goes to the session once, only where it missed the message:
//!
//! - a message the peer never sent to the subscriber's worker was not delivered to it at all;
//! - one it sent is marked with the peer's sequence number: the subscriber's worker had taken
//!   the message before the new filters were in place iff that number is at most `mark`, the last
//!   one it had taken from that peer when it added them (rings keep their order). Taken after:
//!   the new filters already delivered it, and nothing is sent;
//! - taken before (or routed by the subscriber's own worker), the session got it only through a
//!   subscription it had already, and is given it iff none of its older filters matches;
//! - and a session is given a message this way once, however many of its SUBSCRIBEs ask.
//!
//! A message delivered this way goes out as an ordinary delivery of the new subscriptions (their
//! QoS, identifiers, no local, ACL). Retained messages are left out: the store hands them to a new
//! subscription. What arrived later than a SUBSCRIBE's worker could know, outside the window, is
//! not caught up; after the SUBACK nothing depends on it [MQTT-3.8.4-1].

use std::sync::Arc;

use super::mailbox::Mail;
use super::recent::{Listed, WINDOW_NS};
use super::Worker;
use crate::codec::{MqttStr, QoS};
use crate::session::{Delivery, Message, SessionKey};
use crate::topic::{self, SubTrie};

/// To a peer: the messages routed since `since` that match `filters`, for `session` on `worker`,
/// which had taken that peer's mail up to `mark` when it added them.
pub struct CatchUpAsk {
    pub filters: Arc<[MqttStr]>,
    pub since: u64,
    pub mark: u32,
    pub worker: u16,
    pub session: u32,
    pub uid: u64,
}

/// The answer, one per message: the asked filters its topic matches; `seen` if the subscriber's
/// worker had taken it before.
pub struct CatchUp {
    pub matched: Vec<MqttStr>,
    pub session: u32,
    pub uid: u64,
    pub msg: Arc<Message>,
    pub seen: bool,
}

/// The filters of one ask, matched against topics: through a trie once there are more than a
/// few, so a SUBSCRIBE of thousands of filters costs a trie walk per message, not thousands.
struct Fresh<'a> {
    list: &'a [MqttStr],
    trie: Option<SubTrie<u32, ()>>,
}

impl<'a> Fresh<'a> {
    fn new(list: &'a [MqttStr]) -> Fresh<'a> {
        let trie = (list.len() > 8).then(|| {
            let mut t = SubTrie::new();
            for (i, f) in list.iter().enumerate() {
                let _ = t.insert(f, i as u32, ());
            }
            t
        });
        Fresh { list, trie }
    }

    /// The filters `topic` matches, if any.
    fn matched(&self, topic: &str) -> Option<Vec<MqttStr>> {
        let out: Vec<MqttStr> = match &self.trie {
            Some(t) => {
                let mut out = Vec::new();
                t.for_each_match(topic, |&i, _| out.push(self.list[i as usize].clone()));
                out
            }
            None => self.list.iter().filter(|f| topic::filter_matches(f, topic)).cloned().collect(),
        };
        (!out.is_empty()).then_some(out)
    }
}

/// `a` comes after `b`, in wrapping order.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Wall clock nanoseconds, as the kernel stamps arrivals.
fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    /// A SUBSCRIBE that arrived at `since` added `filters` to session `sk`: the messages routed
    /// here after it arrived, and a request to every peer for theirs.
    pub(super) fn catch_up_subscribe(&mut self, sk: SessionKey, since: u64, filters: Vec<MqttStr>) {
        if !self.recent.on || since == 0 || filters.is_empty() {
            return;
        }
        let filters: Arc<[MqttStr]> = filters.into();
        let Some(uid) = self.sessions.get(sk).map(|s| s.uid) else { return };
        let fresh = Fresh::new(&filters);
        let own = self.recent.matching(since, |t| fresh.matched(t));
        for (Listed { msg, .. }, matched) in own {
            self.catch_up(sk, uid, &matched, msg, true);
        }
        let peers: Vec<usize> = self.mailbox.peers().collect();
        for p in peers {
            let ask = CatchUpAsk {
                filters: filters.clone(),
                since,
                mark: self.recent.mark(p),
                worker: self.id as u16,
                session: sk.0 as u32,
                uid,
            };
            self.mailbox.send(p, Mail::CatchUpAsk(Box::new(ask)));
        }
    }

    /// A peer's request: what it missed, from the list.
    pub(super) fn on_catch_up_ask(&mut self, ask: CatchUpAsk) {
        let bit = 1u64 << ask.worker;
        let who = (ask.worker, ask.session, ask.uid);
        let fresh = Fresh::new(&ask.filters);
        for (l, matched) in self.recent.matching(ask.since, |t| fresh.matched(t)) {
            let sent = l.sent & bit != 0;
            if sent && after(l.seq, ask.mark) || !self.recent.may_give(&l, who) {
                continue;
            }
            if !sent {
                // Nothing else of this message reached that worker: it is given now, whatever
                // the session's other filters.
                self.recent.give(&l, who);
            }
            let c = CatchUp { matched, session: ask.session, uid: ask.uid, msg: l.msg, seen: sent };
            self.mailbox.send(ask.worker as usize, Mail::CatchUp(Box::new(c)));
        }
    }

    /// Delivers `msg` to session `sk` through its new subscriptions `matched` (those of its
    /// filters the topic matches), unless the session is gone or (`seen`) an older subscription of
    /// it already delivered the message.
    pub(super) fn catch_up(&mut self, sk: SessionKey, uid: u64, matched: &[MqttStr], msg: Arc<Message>, seen: bool) {
        if !self.sessions.is(sk, uid) {
            return;
        }
        let s = &self.sessions[sk];
        if s.bridge.is_some() || msg.expires_at.is_some_and(|t| t <= self.clock.now) {
            return;
        }
        let mut qos: Option<QoS> = None;
        let mut no_local = true;
        let mut ids = Vec::new();
        let mut still = 0;
        for f in matched {
            let Some(sub) = s.subscriptions.get(f) else { continue }; // unsubscribed since
            still += 1;
            qos = Some(qos.map_or(sub.options.qos, |q| q.max(sub.options.qos)));
            no_local &= sub.options.no_local;
            if sub.identifier != 0 {
                ids.push(sub.identifier);
            }
        }
        let Some(granted) = qos else { return };
        if seen {
            // Any other subscription of the session that matches is older: it delivered this.
            let mut all = Vec::new();
            self.router.local_matches(&msg.topic, &mut all);
            if all.iter().filter(|(k, _)| *k as usize == sk.0).count() > still {
                return;
            }
        }
        if no_local && msg.origin == Some((self.id as u16, sk.0 as u32)) {
            return; // [MQTT-3.8.3-3]
        }
        self.recent.caught_up += 1;
        let qos = msg.qos.min(granted);
        self.deliver_one(sk, Delivery { msg, qos, retain: false, sub_ids: ids, group: None, seq: 0 }, false);
    }

    /// On the tick: the list keeps nothing older than the window once traffic stops.
    pub(super) fn trim_recent(&mut self) {
        if self.recent.len() > 0 {
            self.recent.trim(wall_ns().saturating_sub(WINDOW_NS));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_filters_go_through_a_trie_with_the_same_answers() {
        let few = [MqttStr::from("a/+"), MqttStr::from("b/#")];
        let many: Vec<MqttStr> = (0..100).map(|i| MqttStr::from(format!("x/{i}"))).chain(few.clone()).collect();
        for filters in [&few[..], &many[..]] {
            let f = Fresh::new(filters);
            assert_eq!(f.trie.is_some(), filters.len() > 8);
            assert_eq!(f.matched("a/1"), Some(vec![MqttStr::from("a/+")]));
            assert_eq!(f.matched("b/1/2"), Some(vec![MqttStr::from("b/#")]));
            assert_eq!(f.matched("c"), None);
        }
        assert!(after(1, u32::MAX) && !after(u32::MAX, 1), "sequence numbers wrap");
    }
}
