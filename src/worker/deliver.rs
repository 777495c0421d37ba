//! Routing and delivery. A message goes to the peers whose interest matches its topic (every peer
//! when it is retained: each keeps a replica of the retained store), to this worker's matching
//! sessions and to the shared groups homed here. QoS 0 is encoded once per protocol family and
//! copied into each subscriber's output; QoS 1/2 go through each session's flow engine.

use std::sync::Arc;
use std::time::Instant;

use super::conn::{custom_properties, ConnOutlet};
use super::mailbox::Mail;
use super::Worker;
use crate::codec::{Properties, PublishHeader, QoS};
use crate::metrics::Drop;
use crate::router::GroupId;
use crate::session::{Delivery, GroupKey, Message, Offer, Publisher, QueueBound, SessionKey};

/// A message being routed, borrowed from wherever it is: the read buffer or a shared `Message`.
/// The default is an empty QoS 0 message with nothing else set.
#[derive(Clone, Copy, Default)]
pub struct View<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<&'a Properties>,
    pub origin: Option<(u16, u32)>,
    pub publisher: Option<Publisher>,
    pub expires_at: Option<Instant>,
    pub stamp: u64,
    pub read_at: Option<u64>,
    /// When the PUBLISH reached the host (`Conn::arrived`); 0: not known, or not a client's.
    pub arrived: u64,
}

#[cfg(test)]
impl<'a> View<'a> {
    /// A message with nothing but a topic, a payload and a QoS, as a client might publish it.
    pub fn plain(topic: &'a str, payload: &'a [u8], qos: QoS) -> View<'a> {
        View { topic, payload, qos, ..View::default() }
    }
}

pub(super) fn view(m: &Message) -> View<'_> {
    View {
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos,
        retain: m.retain,
        properties: m.properties.as_deref(),
        origin: m.origin,
        publisher: m.publisher,
        expires_at: m.expires_at,
        stamp: m.stamp,
        read_at: m.read_at,
        arrived: 0,
    }
}

/// The one shared copy of `m` for everything that keeps it (a peer, the retained store, a queue),
/// made the first time one does (`View::to_message_in`).
fn kept(shared: &mut Option<Arc<Message>>, m: &View<'_>, made: &mut super::made::Made) -> Arc<Message> {
    shared.get_or_insert_with(|| m.to_message_in(made)).clone()
}

impl Worker {
    /// Routes a message that already is shared (a will, `$SYS`).
    pub(super) fn route(&mut self, msg: Arc<Message>) {
        self.route_view(&view(&msg), Some(msg.clone()));
    }

    /// Routes a message borrowed from a read buffer, copying it into a shared `Message` only if
    /// something must keep it (a peer, the retained store, a QoS 1/2 queue). Returns whether any
    /// subscription anywhere matched, as far as this worker knows (the 5.0 0x10 hint).
    pub(super) fn route_view(&mut self, m: &View<'_>, mut shared: Option<Arc<Message>>) -> bool {
        let mut peers = std::mem::take(&mut self.scratch.peers);
        peers.clear();
        let mut matches = std::mem::take(&mut self.scratch.matches);
        matches.clear();
        let mut keep = false;
        if m.retain {
            peers.extend(self.mailbox.peers().map(|p| p as u16));
            let msg = kept(&mut shared, m, &mut self.scratch.made);
            keep = self.room_to_retain(&msg);
            self.store_retained(&msg, keep);
            self.persist_retained(&msg, keep);
            self.router.local_matches(m.topic, &mut matches);
        } else {
            self.router.matches(m.topic, &mut matches, &mut peers);
        }
        let remote = !peers.is_empty();
        // Kept a moment for subscriptions that arrived before it but are read after (`catchup`).
        let listed = self.recent.on && m.arrived != 0 && !m.retain;
        let id = self.recent.next_id(listed);
        let seq = id as u32;
        let plain = super::batch::fits(m);
        self.mailbox.crossed += peers.len() as u64;
        for &p in &peers {
            if m.qos != QoS::AtMostOnce {
                self.mailbox.charge(p as usize);
            }
            if plain {
                self.mailbox.publish(p as usize, m, seq);
            } else {
                let msg = kept(&mut shared, m, &mut self.scratch.made);
                self.mailbox.send(p as usize, Mail::Publish { msg, keep, seq });
            }
        }
        let matched = self.deliver_matched(m, &mut shared, matches) || remote;
        if listed {
            self.recent.record(m, id, &peers, &mut shared);
        }
        self.scratch.peers = peers;
        matched
    }

    pub(super) fn deliver_local(&mut self, msg: &Arc<Message>) {
        let mut shared = Some(msg.clone());
        self.deliver(&view(msg), &mut shared);
    }

    /// [MQTT-3.3.5-1]: to every matching subscription on this worker, once per session at the
    /// highest granted QoS with every matching subscription identifier, at min(published, granted)
    /// QoS; and to one member of each matching shared group homed here. Returns whether anything
    /// matched.
    pub(super) fn deliver(&mut self, m: &View<'_>, shared: &mut Option<Arc<Message>>) -> bool {
        let mut matches = std::mem::take(&mut self.scratch.matches);
        matches.clear();
        self.router.local_matches(m.topic, &mut matches);
        self.deliver_matched(m, shared, matches)
    }

    /// `deliver`, to the subscriptions `matches` that the router found for the topic (the
    /// worker's scratch list, given back).
    fn deliver_matched(
        &mut self,
        m: &View<'_>,
        shared: &mut Option<Arc<Message>>,
        mut matches: Vec<(u32, crate::session::Subscription)>,
    ) -> bool {
        let now = self.clock.now;
        if m.expires_at.is_some_and(|t| t <= now) {
            self.counters.dropped(Drop::Expired);
            self.scratch.matches = matches;
            return true;
        }
        let groups_matched = self.deliver_shared(m, shared);
        if matches.is_empty() {
            self.scratch.matches = matches;
            return groups_matched;
        }
        // Group each session's subscriptions; one filter's subscribers are already distinct.
        if matches.len() > 1 && !matches.windows(2).all(|w| w[0].0 < w[1].0) {
            matches.sort_unstable_by_key(|&(sk, _)| sk);
        }
        let mut enc = std::mem::take(&mut self.scratch.encoded);
        enc.clear();
        let mut cached: [Option<(usize, usize)>; 2] = [None, None];
        let mut ids: Vec<u32> = Vec::new();
        // Subscriptions whose whole filter the ACL grants carry this mark: no check per message.
        let whole_mark = self.shared.auth.acl_generation.load(std::sync::atomic::Ordering::Relaxed) as u32 + 1;
        let mut sent_qos0 = 0u64;
        let mut i = 0;
        while i < matches.len() {
            // Merge every subscription of one session.
            let sk = matches[i].0;
            let mut o = matches[i].1.options;
            let mut whole = true;
            ids.clear();
            let mut j = i;
            while j < matches.len() && matches[j].0 == sk {
                let sub = matches[j].1;
                whole &= sub.acl_whole == whole_mark;
                o.qos = o.qos.max(sub.options.qos);
                o.retain_as_published |= sub.options.retain_as_published;
                o.no_local &= sub.options.no_local;
                if sub.identifier != 0 {
                    ids.push(sub.identifier);
                }
                j += 1;
            }
            i = j;
            if o.no_local && m.origin == Some((self.id as u16, sk)) {
                continue; // [MQTT-3.8.3-3]
            }
            let sk = SessionKey(sk as usize);
            if !whole && self.sessions[sk].access.is_some() && !self.may(sk, m.topic, crate::auth::acl::Access::Read) {
                self.counters.dropped(Drop::Acl);
                continue;
            }
            let qos = m.qos.min(o.qos);
            let s = &self.sessions[sk];
            if let Some(b) = s.bridge {
                self.bridge_out(sk, b, m, qos, shared);
                continue;
            }
            // [MQTT-3.3.1-9]: forwarded with retain cleared, unless 5.0 retain-as-published.
            let retain = m.retain && o.retain_as_published;
            if qos != QoS::AtMostOnce {
                let msg = kept(shared, m, &mut self.scratch.made);
                self.offer(sk, Delivery { msg, qos, retain, sub_ids: ids.clone(), group: None, seq: 0 }, true);
                continue;
            }
            let Some(ck) = s.conn else { continue }; // QoS 0 is not kept for offline sessions
            if s.backlog.is_some() {
                let msg = kept(shared, m, &mut self.scratch.made);
                self.behind_backlog(sk, Delivery { msg, qos, retain, sub_ids: ids.clone(), group: None, seq: 0 });
                continue;
            }
            let version = s.version;
            if !self.room_for_qos0(ck) {
                continue;
            }
            let c = &mut self.conns[ck];
            let v5 = version.is_v5();
            let custom = if v5 { custom_properties(m.properties, m.expires_at, &ids, now) } else { None };
            let header = PublishHeader {
                dup: false,
                qos,
                retain,
                topic: m.topic,
                packet_id: None,
                properties: custom.as_ref().or(m.properties),
            };
            if retain || custom.is_some() || c.out_aliases.is_some() {
                if c.write_publish(version, &header, m.payload) {
                    sent_qos0 += 1;
                }
            } else {
                let (start, end) = *cached[v5 as usize].get_or_insert_with(|| {
                    let start = enc.len();
                    header.encode(version, m.payload.len(), &mut enc);
                    enc.extend_from_slice(m.payload);
                    (start, enc.len())
                });
                if end - start > c.max_packet_out {
                    continue;
                }
                c.wbuf.extend_from_slice(&enc[start..end]);
                sent_qos0 += 1;
            }
            self.mark_dirty(ck);
        }
        // One count for the whole fan-out: the QoS 0 copies share the message's read time.
        self.counters.sent(QoS::AtMostOnce, sent_qos0, m.payload.len());
        self.latency.note(m.read_at, sent_qos0);
        self.scratch.encoded = enc;
        self.scratch.matches = matches;
        true
    }

    /// Shared subscriptions homed on this worker: each matching group sends the message to one
    /// member, in turn.
    fn deliver_shared(&mut self, m: &View<'_>, shared: &mut Option<Arc<Message>>) -> bool {
        let mut groups = std::mem::take(&mut self.scratch.groups);
        groups.clear();
        self.router.groups_matching(m.topic, &mut groups);
        for &g in &groups {
            let msg = kept(shared, m, &mut self.scratch.made);
            self.deliver_to_group(g, msg);
        }
        let any = !groups.is_empty();
        self.scratch.groups = groups;
        any
    }

    /// Picks the next member of group `g` (round robin) and hands it the message.
    fn deliver_to_group(&mut self, g: GroupId, msg: Arc<Message>) {
        let Some((member, key)) = self.router.groups.pick(g) else { return };
        let key = Box::new(key.clone());
        let qos = msg.qos.min(member.sub.options.qos);
        let ids = if member.sub.identifier != 0 { vec![member.sub.identifier] } else { vec![] };
        let retain = msg.retain && member.sub.options.retain_as_published;
        let d = Delivery { msg, qos, retain, sub_ids: ids, group: Some(key), seq: 0 };
        if member.worker as usize == self.id {
            let sk = SessionKey(member.session as usize);
            if self.sessions.is(sk, member.session_uid) {
                self.deliver_one(sk, d, true);
            }
        } else {
            let m = Mail::SharedDeliver(Box::new((member.session, member.session_uid, d)));
            self.mailbox.send(member.worker as usize, m);
        }
    }

    /// A message of a shared group whose member went away unacknowledged: to another member.
    pub(super) fn redeliver_shared(&mut self, key: GroupKey, msg: Arc<Message>) {
        let home = self.shared.home_of_group(&key.0, &key.1);
        if home != self.id {
            self.mailbox.send(home, Mail::SharedRedeliver(Box::new((key, msg))));
        } else if let Some(g) = self.router.groups.find(&key) {
            self.deliver_to_group(g, msg);
        }
    }

    /// One delivery to one session on this worker (shared subscriptions, retained messages).
    /// `pace`: a congested session pauses the message's publisher (not for retained messages
    /// sent on subscribe, whose publisher has nothing to do with this subscriber).
    pub(super) fn deliver_one(&mut self, sk: SessionKey, d: Delivery, pace: bool) {
        let Some(s) = self.sessions.get(sk) else {
            if let Some(g) = d.group {
                self.redeliver_shared(*g, d.msg);
            }
            return;
        };
        if s.backlog.is_some() {
            return self.behind_backlog(sk, d);
        }
        self.deliver_now(sk, d, pace);
    }

    /// A live message for a session still streaming retained messages: it waits behind them.
    fn behind_backlog(&mut self, sk: SessionKey, d: Delivery) {
        let bound = QueueBound::messages(self.shared.config.max_queued_messages);
        if self.sessions[sk].append_live(d, bound) == Offer::Dropped {
            self.counters.dropped(Drop::QueueBound);
        }
    }

    /// Sends (or, QoS 1/2, offers) a delivery now, whatever waits in the session's backlog.
    fn deliver_now(&mut self, sk: SessionKey, d: Delivery, pace: bool) {
        if self.sessions[sk].access.is_some() && !self.may(sk, &d.msg.topic, crate::auth::acl::Access::Read) {
            return;
        }
        if d.qos != QoS::AtMostOnce {
            return self.offer_now(sk, d, pace);
        }
        let s = &self.sessions[sk];
        let Some(ck) = s.conn else { return };
        let v = s.version;
        if !self.room_for_qos0(ck) {
            return;
        }
        let c = &mut self.conns[ck];
        if c.write_delivery(v, &d, None, false, self.clock.now) {
            self.counters.sent(QoS::AtMostOnce, 1, d.msg.payload.len());
            self.latency.note(d.msg.read_at, 1);
        }
        self.mark_dirty(ck);
    }

    /// A QoS 1/2 message for a session: sent now if its window and output have room, else queued
    /// up to `max_queued_messages`, else dropped and counted.
    fn offer(&mut self, sk: SessionKey, d: Delivery, pace: bool) {
        if self.sessions[sk].backlog.is_some() {
            return self.behind_backlog(sk, d);
        }
        self.offer_now(sk, d, pace);
    }

    fn offer_now(&mut self, sk: SessionKey, d: Delivery, pace: bool) {
        if self.budget.over_memory && self.sessions[sk].conn.is_none() {
            // Past `memory_limit` no offline queue grows: the many sessions nobody reads are
            // where a broker's memory goes.
            self.counters.dropped(Drop::Memory);
            let client = self.sessions[sk].client_id.clone();
            let what = || format!("memory_limit reached: not queueing for offline client {client}");
            return self.over_budget(super::limits::Limit::MemoryQueued, what);
        }
        let config = &self.shared.config;
        let max_queued = QueueBound { messages: config.max_queued_messages, bytes: config.max_queued_bytes };
        let publisher = if pace { d.msg.publisher } else { None };
        let s = &mut self.sessions[sk];
        let offer = match s.conn {
            Some(ck) => {
                let max_output = self.shared.config.max_output_bytes;
                let mut out =
                    ConnOutlet::new(&mut self.conns[ck], s.version, max_output, self.clock.now, &mut self.latency);
                let offer = s.offer(d, self.clock.now, max_queued, Some(&mut out));
                if offer == Offer::Sent {
                    self.counters.sent_through(&out);
                    self.mark_dirty(ck);
                }
                offer
            }
            None => s.offer(d, self.clock.now, max_queued, None),
        };
        self.touch(sk);
        match offer {
            Offer::Dropped => self.counters.dropped(Drop::QueueBound),
            Offer::DroppedBytes => {
                self.counters.dropped(Drop::QueueBytes);
                let client = self.sessions[sk].client_id.clone();
                let what = || format!("max_queued_bytes reached: dropping a message for client {client}");
                self.over_budget(super::limits::Limit::QueuedBytes, what);
            }
            Offer::Queued => {
                if let Some(p) = publisher {
                    self.pace(sk, p);
                }
            }
            Offer::Discarded => self.counters.dropped(Drop::Expired),
            _ => {}
        }
    }

    /// Sends a session's queued messages while its window and its connection's output have room.
    pub(super) fn pump(&mut self, sk: SessionKey) {
        let Some(s) = self.sessions.get_mut(sk) else { return };
        let Some(ck) = s.conn else { return };
        let max_output = self.shared.config.max_output_bytes;
        let mut out = ConnOutlet::new(&mut self.conns[ck], s.version, max_output, self.clock.now, &mut self.latency);
        s.pump(self.clock.now, &mut out);
        let wrote = !out.conn.wbuf.is_empty();
        self.counters.sent_through(&out);
        if wrote {
            self.mark_dirty(ck);
        }
        self.touch(sk);
        self.feed_backlog(sk);
        self.drained(sk);
    }

    /// Streams a session's backlog (retained messages after SUBSCRIBE, then what arrived
    /// meanwhile) while there is room: QoS 0 while its output is under half of
    /// `max_output_bytes`, QoS 1/2 while its queue is under the flow-control high-water mark.
    /// Called again whenever its output drains or an acknowledgement opens its window.
    pub(super) fn feed_backlog(&mut self, sk: SessionKey) {
        let half_out = self.shared.config.max_output_bytes / 2;
        let high = self.high_water();
        loop {
            let Some(s) = self.sessions.get_mut(sk) else { return };
            let Some(ck) = s.conn else { return };
            let Some(b) = s.backlog.as_deref_mut() else { return };
            let Some((front, _)) = b.items.front() else {
                s.backlog = None;
                return self.drained(sk);
            };
            let room =
                if front.qos == QoS::AtMostOnce { self.conns[ck].wbuf.len() < half_out } else { s.queue.len() < high };
            if !room {
                return;
            }
            let Some((d, live)) = b.items.pop_front() else { return };
            b.live -= live as usize;
            self.deliver_now(sk, d, false);
        }
    }

    /// A session going offline with retained messages still streaming: its QoS 0 ones go (as
    /// QoS 0 to an offline session always does); QoS 1/2 ones join its queue under the queue's
    /// bounds, like any message for an offline session. A backlog holds a reference per message,
    /// and thousands of abandoned sessions each holding one for every retained message is
    /// where a broker's memory would go.
    pub(super) fn settle_backlog(&mut self, sk: SessionKey) {
        let Some(b) = self.sessions[sk].backlog.take() else { return };
        for (d, _) in b.items {
            if d.qos != QoS::AtMostOnce && self.may(sk, &d.msg.topic, crate::auth::acl::Access::Read) {
                self.offer_now(sk, d, false);
            }
        }
    }

    /// Keeps (`keep`) or clears a topic's retained message in this worker's replica of the
    /// store. The replicas share the messages themselves (`Arc`).
    pub(super) fn store_retained(&mut self, msg: &Arc<Message>, keep: bool) {
        if msg.payload.is_empty() {
            // [MQTT-3.3.1-10]/[MQTT-3.3.1-11]: an empty retained message clears the topic.
            self.router.retained.remove(&msg.topic);
        } else if keep {
            self.router.retained.insert(msg.clone());
        }
    }

    /// On the worker a retained message enters by: is there room to keep it? Replacing a topic's
    /// message with one no larger, or clearing it, always fits; otherwise `max_retained_messages`,
    /// `max_retained_bytes` and `memory_limit` apply. A refusal is counted and logged (the first,
    /// then each time the count doubles); the message is still delivered.
    fn room_to_retain(&mut self, msg: &Message) -> bool {
        use super::limits::Limit;
        let retained = &self.router.retained;
        let old = retained.get(&msg.topic).map(|m| m.size());
        if msg.payload.is_empty() || old.is_some_and(|o| o >= msg.size()) {
            return true;
        }
        let config = &self.shared.config;
        let (key, limit) = if old.is_none() && retained.len() >= config.max_retained_messages {
            ("max_retained_messages", Limit::RetainedMessages)
        } else if retained.bytes() - old.unwrap_or(0) + msg.size() > config.max_retained_bytes {
            ("max_retained_bytes", Limit::RetainedBytes)
        } else if self.budget.over_memory {
            ("memory_limit", Limit::MemoryRetained)
        } else {
            return true;
        };
        self.over_budget(limit, || format!("{key} reached: not retaining {} ({} bytes)", msg.topic, msg.size()));
        false
    }
}
