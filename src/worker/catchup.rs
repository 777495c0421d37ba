//! Arrival order across workers. One event loop sees its sockets in the order their bytes came;
//! several do not: a SUBSCRIBE that reached the host before another client's PUBLISH may be read
//! by its worker after the publisher's worker has routed that PUBLISH (that worker was busy, or
//! not on a CPU), and the message would miss a subscription the client had asked for first.
//!
//! So, with more than one worker, the kernel stamps every segment with the time it reached the
//! host (`SO_TIMESTAMPNS`, read with each `recvmsg`), and each worker keeps the messages it routed
//! in the last moments (`Recent`: at most `WINDOW_NS` old, `MAX_ENTRIES` and `MAX_BYTES`). A
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

use std::collections::VecDeque;
use std::sync::Arc;

use super::batch;
use super::deliver::View;
use super::mailbox::Mail;
use super::Worker;
use crate::codec::{MqttStr, QoS};
use crate::session::{Delivery, Message, SessionKey};
use crate::topic::{self, SubTrie};

/// How long a routed message stays on the list, by its arrival stamp.
pub const WINDOW_NS: u64 = 500_000_000;
/// At most this many messages, and this many topic and payload bytes, stay on the list.
pub const MAX_ENTRIES: usize = 4096;
pub const MAX_BYTES: usize = 8 << 20;
/// Arrival stamps of messages routed one after another are out of order by at most a scheduling
/// delay: a search from the newest stops at the first message this much older than the SUBSCRIBE.
const SKEW_NS: u64 = 100_000_000;
/// Sessions one message is remembered as given to; past it the message is caught up no more, so
/// SUBSCRIBEs from many sessions cannot grow an entry without end.
const GIVEN_MAX: usize = 64;

struct Entry {
    arrived: u64,
    seq: u32,
    /// Peers the message was sent to, one bit per worker.
    sent: u64,
    /// What it counts against `MAX_BYTES` (kept here: trimming reads no message).
    cost: usize,
    msg: Kept,
    /// Sessions (worker, session, uid) already given this message by catching up: a second
    /// SUBSCRIBE of theirs within the window must not get it again.
    given: Option<Box<Vec<(u16, u32, u64)>>>,
}

/// Where a listed message is: a plain one (`batch::fits`) is copied into the log, so listing it
/// allocates nothing; the others are shared.
enum Kept {
    Log(u64),
    Shared(Arc<Message>),
}

/// Listed plain messages, one after another in chunks that are never moved or grown (so nothing
/// is copied twice), addressed by their offset since the worker started; a chunk goes once the
/// list holds nothing in it.
#[derive(Default)]
struct Log {
    /// (offset of the chunk's first byte, chunk), oldest first.
    chunks: VecDeque<(u64, Vec<u8>)>,
    end: u64,
    /// One emptied chunk, kept for the next.
    spare: Option<Vec<u8>>,
}

const CHUNK: usize = 256 * 1024;

impl Log {
    fn append(&mut self, m: &View<'_>, seq: u32) -> u64 {
        let n = batch::size(m);
        let room = self.chunks.back().is_some_and(|(_, c)| c.capacity() - c.len() >= n);
        if !room {
            let chunk = match self.spare.take() {
                Some(c) if c.capacity() >= n => c,
                _ => Vec::with_capacity(CHUNK.max(n)),
            };
            self.chunks.push_back((self.end, chunk));
        }
        let at = self.end;
        if let Some((_, c)) = self.chunks.back_mut() {
            batch::append(c, m, seq);
        }
        self.end += n as u64;
        at
    }

    fn get(&self, at: u64) -> Option<View<'_>> {
        let i = self.chunks.partition_point(|(start, _)| *start <= at).checked_sub(1)?;
        let (start, c) = &self.chunks[i];
        batch::read(c.get((at - start) as usize..)?).map(|(v, _, _)| v)
    }

    /// Drops the chunks that end at or before `at`.
    fn release(&mut self, at: u64) {
        while let Some((start, c)) = self.chunks.front() {
            if start + c.len() as u64 > at || (self.chunks.len() == 1 && at < self.end) {
                break;
            }
            if let Some((_, mut c)) = self.chunks.pop_front() {
                c.clear();
                if c.capacity() == CHUNK {
                    self.spare = Some(c);
                }
            }
        }
    }
}

/// What a worker routed in the last moments.
pub struct Recent {
    /// `arrival_order` is on and there is more than one worker (at most 64: `sent` is one bit
    /// each).
    pub on: bool,
    entries: VecDeque<Entry>,
    log: Log,
    bytes: usize,
    /// The sequence number of the last message put on the list; every `Mail::Publish` carries
    /// the current one.
    seq: u32,
    /// The last sequence number taken from each peer.
    taken: Vec<u32>,
    /// Messages delivered by catching up, for `$SYS/broker/internal/caught_up`.
    pub caught_up: u64,
}

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

    /// The filters `topic` matches.
    fn matched(&self, topic: &str) -> Vec<MqttStr> {
        match &self.trie {
            Some(t) => {
                let mut out = Vec::new();
                t.for_each_match(topic, |&i, _| out.push(self.list[i as usize].clone()));
                out
            }
            None => self.list.iter().filter(|f| topic::filter_matches(f, topic)).cloned().collect(),
        }
    }
}

/// `a` comes after `b`, in wrapping order.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Recent {
    /// `enabled`: the `arrival_order` setting.
    pub fn new(workers: usize, enabled: bool) -> Recent {
        Recent {
            on: enabled && workers > 1 && workers <= 64,
            entries: VecDeque::new(),
            log: Log::default(),
            bytes: 0,
            seq: 0,
            taken: vec![0; workers],
            caught_up: 0,
        }
    }

    /// The sequence number a message's mail carries; a new one if the message goes on the list.
    pub fn next_seq(&mut self, listed: bool) -> u32 {
        if listed {
            self.seq = self.seq.wrapping_add(1);
        }
        self.seq
    }

    /// Puts a routed message on the list, under the sequence number `next_seq` gave it: a copy in
    /// the log if it is plain, else the shared message (made now if there is none yet).
    pub fn record(&mut self, m: &View<'_>, seq: u32, peers: &[u16], shared: &mut Option<Arc<Message>>) {
        let sent = peers.iter().fold(0u64, |m, &p| m | 1 << p);
        let cost = m.topic.len() + m.payload.len() + 64;
        let msg = if batch::fits(m) {
            Kept::Log(self.log.append(m, seq))
        } else {
            Kept::Shared(shared.get_or_insert_with(|| m.to_message()).clone())
        };
        self.bytes += cost;
        self.entries.push_back(Entry { arrived: m.arrived, seq, sent, cost, msg, given: None });
        self.trim(m.arrived.saturating_sub(WINDOW_NS));
    }

    /// Drops what arrived before `before`, and the oldest past the bounds.
    pub fn trim(&mut self, before: u64) {
        let mut dropped = false;
        while let Some(e) = self.entries.front() {
            if e.arrived >= before && self.entries.len() <= MAX_ENTRIES && self.bytes <= MAX_BYTES {
                break;
            }
            self.bytes -= e.cost;
            self.entries.pop_front();
            dropped = true;
        }
        if dropped {
            // The log holds nothing older than the oldest entry still listed in it.
            let oldest = self.entries.iter().find_map(|e| match e.msg {
                Kept::Log(at) => Some(at),
                Kept::Shared(_) => None,
            });
            self.log.release(oldest.unwrap_or(self.log.end));
        }
    }

    /// A message mail from `from` with sequence number `seq` was taken.
    pub fn took(&mut self, from: usize, seq: u32) {
        self.taken[from] = seq;
    }

    pub fn mark(&self, peer: usize) -> u32 {
        self.taken[peer]
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Messages on the list that arrived after `since` and match one of `filters` (with those
    /// they match), newest first.
    fn matching(&mut self, since: u64, filters: &Fresh<'_>, mut f: impl FnMut(&mut Entry, Vec<MqttStr>, &Log)) {
        let Recent { entries, log, .. } = self;
        for e in entries.iter_mut().rev() {
            if e.arrived.saturating_add(SKEW_NS) < since {
                break;
            }
            if e.arrived > since {
                let matched = e.topic(log).map(|t| filters.matched(t)).unwrap_or_default();
                if !matched.is_empty() {
                    f(e, matched, log);
                }
            }
        }
    }
}

impl Entry {
    fn topic<'a>(&'a self, log: &'a Log) -> Option<&'a str> {
        match &self.msg {
            Kept::Log(at) => log.get(*at).map(|v| v.topic),
            Kept::Shared(m) => Some(&m.topic),
        }
    }

    /// The message, shared.
    fn message(&self, log: &Log) -> Option<Arc<Message>> {
        match &self.msg {
            Kept::Log(at) => log.get(*at).map(|v| v.to_message()),
            Kept::Shared(m) => Some(m.clone()),
        }
    }
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
        let mut own = Vec::new();
        let fresh = Fresh::new(&filters);
        self.recent.matching(since, &fresh, |e, matched, log| own.extend(e.message(log).map(|m| (m, matched))));
        // Oldest first, as they were routed.
        for (msg, matched) in own.into_iter().rev() {
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
        let mut found = Vec::new();
        let who = (ask.worker, ask.session, ask.uid);
        let fresh = Fresh::new(&ask.filters);
        self.recent.matching(ask.since, &fresh, |e, matched, log| {
            let sent = e.sent & bit != 0;
            if sent && after(e.seq, ask.mark)
                || e.given.as_ref().is_some_and(|g| g.len() >= GIVEN_MAX || g.contains(&who))
            {
                return;
            }
            let Some(msg) = e.message(log) else { return };
            found.push((msg, matched, sent));
            if !sent {
                // Nothing else of this message reached that worker: it is given now, whatever
                // the session's other filters.
                e.given.get_or_insert_with(Default::default).push(who);
            }
        });
        for (msg, matched, seen) in found.into_iter().rev() {
            let c = CatchUp { matched, session: ask.session, uid: ask.uid, msg, seen };
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

    /// Lists a plain message on topic `topic` that arrived at `arrived`, sent to `peers`.
    fn list(r: &mut Recent, arrived: u64, topic: &str, peers: &[u16]) {
        let m = Message::plain(topic, bytes::Bytes::from_static(b"payload"), QoS::AtMostOnce, false);
        let v = View { arrived, ..super::super::deliver::view(&m) };
        let seq = r.next_seq(true);
        r.record(&v, seq, peers, &mut None);
    }

    fn topics(r: &mut Recent, since: u64, filters: &[MqttStr]) -> Vec<(String, Vec<MqttStr>)> {
        let mut got = vec![];
        r.matching(since, &Fresh::new(filters), |e, m, log| {
            got.push((e.message(log).expect("listed").topic.to_string(), m))
        });
        got
    }

    #[test]
    fn the_list_is_bounded_by_age_count_and_bytes() {
        let mut r = Recent::new(2, true);
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            list(&mut r, 1_000 + i, "a", &[]);
        }
        assert_eq!(r.len(), MAX_ENTRIES);
        list(&mut r, 10 * WINDOW_NS, "a", &[1]);
        assert_eq!(r.len(), 1, "everything older than the window goes");
        assert_eq!(r.log.chunks.len(), 1, "and so do the log chunks only it was in");
        r.trim(u64::MAX);
        assert_eq!((r.len(), r.bytes, r.log.chunks.len()), (0, 0, 0));
    }

    #[test]
    fn only_what_arrived_after_the_subscribe_and_matches_is_found() {
        let mut r = Recent::new(2, true);
        for (t, topic) in [(100, "a/1"), (200, "b/1"), (300, "a/2"), (400, "a/3")] {
            list(&mut r, t, topic, &[]);
        }
        let got = topics(&mut r, 250, &[MqttStr::from("a/+")]);
        assert_eq!(got.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["a/3", "a/2"]);
        // Many filters go through a trie, with the same answers.
        let many: Vec<MqttStr> =
            (0..100).map(|i| MqttStr::from(format!("x/{i}"))).chain([MqttStr::from("a/#")]).collect();
        let got = topics(&mut r, 250, &many);
        assert_eq!(
            got,
            [("a/3".to_string(), vec![MqttStr::from("a/#")]), ("a/2".to_string(), vec![MqttStr::from("a/#")])]
        );
        assert!(after(1, u32::MAX) && !after(u32::MAX, 1), "sequence numbers wrap");
    }

    #[test]
    fn the_log_gives_back_messages_across_chunks_and_keeps_the_chunks_still_listed() {
        let mut r = Recent::new(2, true);
        let big = "t/".to_string() + &"x".repeat(1000);
        // About 1 KiB each: several chunks.
        for i in 0..1000u64 {
            list(&mut r, 1_000 + i, &format!("{big}/{i}"), &[]);
        }
        assert!(r.log.chunks.len() > 2);
        let got = topics(&mut r, 1_500, &[MqttStr::from("t/#")]);
        assert_eq!(got.len(), 499);
        assert_eq!(got[0].0, format!("{big}/999"));
        assert_eq!(got[498].0, format!("{big}/501"));
        r.trim(1_900);
        let got = topics(&mut r, 0, &[MqttStr::from("t/#")]);
        assert_eq!((got.len(), got[99].0.clone()), (100, format!("{big}/900")));
        assert!(r.log.chunks.len() <= 2, "chunks of trimmed messages go: {}", r.log.chunks.len());
    }
}
