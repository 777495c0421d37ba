//! What a client's packets after CONNECT mean: PUBLISH (topic aliases, the incoming QoS 2 state,
//! the acknowledgement), the acknowledgements of our own PUBLISHes, SUBSCRIBE and UNSUBSCRIBE
//! (with the interest round that makes a SUBACK safe), PINGREQ and DISCONNECT.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::conn::{CloseKind, ConnKey};
use super::deliver::View;
use super::mailbox::{InterestChange, Mail, Then};
use super::{Deferred, DeferredSubscribe, Worker, TOPIC_ALIAS_MAXIMUM};
use crate::codec::{
    Ack, MqttStr, Packet, Properties, PublishRef, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use crate::router::Member;
use crate::session::{Backlog, Delivery, GroupKey, OutState, PubRecOutcome, Publisher, SessionKey, Subscription};
use crate::topic;

fn failure(v5: bool, code: ReasonCode) -> ReasonCode {
    if v5 {
        code
    } else {
        ReasonCode::SUBACK_FAILURE
    }
}

impl Worker {
    /// The reason code for an ACL refusal (`acl_denial_reason`).
    fn acl_denial(&self) -> ReasonCode {
        if self.shared.config.acl_denial_reason == "unspecified" {
            ReasonCode::UNSPECIFIED_ERROR
        } else {
            ReasonCode::NOT_AUTHORIZED
        }
    }

    /// Every packet after CONNECT except PUBLISH (which takes the borrowed path).
    pub(super) fn on_packet(&mut self, k: ConnKey, packet: Packet) {
        let Some(sk) = self.conns[k].session else {
            // The codec only lets CONNECT through before a session exists; during an enhanced
            // authentication exchange only AUTH (handled before this) and DISCONNECT may come.
            self.close(k, CloseKind::NoSession);
            return;
        };
        let v5 = self.sessions[sk].version.is_v5();
        match packet {
            Packet::PubAck(a) => self.completed(sk, a.packet_id, OutState::AwaitAck),
            Packet::PubComp(a) => self.completed(sk, a.packet_id, OutState::AwaitComp),
            Packet::PubRec(a) => {
                let mut rel = Ack::new(a.packet_id);
                let outcome = self.sessions[sk].on_pubrec(a.packet_id, a.reason.is_error());
                self.touch(sk);
                match outcome {
                    PubRecOutcome::Ended => return self.pump(sk),
                    PubRecOutcome::Release => {}
                    PubRecOutcome::Unknown if v5 => rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                    PubRecOutcome::Unknown => {}
                }
                self.send(k, &Packet::PubRel(rel));
            }
            Packet::PubRel(a) => {
                // [MQTT-4.3.3-2]: release the id; the message was delivered on PUBLISH.
                let mut comp = Ack::new(a.packet_id);
                if !self.sessions[sk].release_qos2(a.packet_id) && v5 {
                    comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.touch_meta(sk);
                self.send(k, &Packet::PubComp(comp));
            }
            Packet::Subscribe(subscribe) => {
                // Handled after this turn's mail, so it sees every retained message routed before
                // it arrived; the connection's later packets wait for it.
                let conn_uid = self.conns[k].uid;
                self.conns[k].flags.blocked = true;
                let arrived = self.conns[k].arrived;
                let d = DeferredSubscribe { conn: k, conn_uid, arrived, session: sk, subscribe };
                self.turn.deferred.push(Deferred::Subscribe(d));
            }
            Packet::Unsubscribe(u) => self.on_unsubscribe(k, sk, *u),
            Packet::PingReq => self.send(k, &Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    if self.sessions[sk].expiry_interval == 0 && e != 0 {
                        // [MQTT-3.14.2-2]
                        self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0");
                        return;
                    }
                    self.sessions[sk].expiry_interval = e;
                }
                // [MQTT-3.14.4-3]: a normal DISCONNECT discards the will; 5.0 reason 0x04 keeps it.
                let kind =
                    if d.reason == ReasonCode::DISCONNECT_WITH_WILL { CloseKind::Abnormal } else { CloseKind::Normal };
                self.close(k, kind);
            }
            other => {
                let why = format!("{} is not sent by clients", other.name());
                self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, &why);
            }
        }
    }

    fn completed(&mut self, sk: SessionKey, id: crate::codec::PacketId, waiting: OutState) {
        self.touch(sk);
        let s = &mut self.sessions[sk];
        if let Some(done) = s.complete(id, waiting) {
            s.last_progress = Some(self.clock.now);
            s.stalled = false;
            self.scratch.made.give_back(done.msg);
            self.pump(sk);
        }
    }

    /// A PUBLISH from a client, parsed in place.
    pub(super) fn on_publish(&mut self, k: ConnKey, p: PublishRef<'_>) {
        let Some(sk) = self.conns[k].session else {
            // Only during an enhanced authentication exchange, where only AUTH may come.
            let why = "PUBLISH before CONNACK during authentication [MQTT-3.1.2-30]";
            return self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
        };
        let v5 = self.sessions[sk].version.is_v5();
        let mut alias_topic: Option<MqttStr> = None;
        let mut stripped: Option<Properties> = None;
        if let Some(props) = p.properties.as_deref() {
            if !props.subscription_identifiers.is_empty() {
                let why = "subscription identifier from a client [MQTT-3.3.4-6]";
                return self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
            }
            if let Some(alias) = props.topic_alias {
                // [MQTT-3.3.2-8]/[MQTT-3.3.2-9]: 1 to our advertised maximum.
                if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
                    let why = "topic alias outside 1..topic alias maximum [MQTT-3.3.2-9]";
                    return self.disconnect_with(k, ReasonCode::TOPIC_ALIAS_INVALID, why);
                }
                let slot = alias as usize - 1;
                let aliases = self.conns[k].aliases.get_or_insert_with(Default::default);
                if aliases.len() <= slot {
                    aliases.resize(slot + 1, None);
                }
                if p.topic.is_empty() {
                    match &aliases[slot] {
                        Some(t) => alias_topic = Some(t.clone()),
                        None => {
                            let why = "unknown topic alias with an empty topic [MQTT-3.3.2-12]";
                            return self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
                        }
                    }
                } else {
                    aliases[slot] = Some(MqttStr::from(p.topic));
                }
                let mut rest = props.clone();
                rest.topic_alias = None; // an alias is per connection: never forwarded
                stripped = Some(rest);
            }
        }
        let topic: &str = alias_topic.as_deref().unwrap_or(p.topic);
        // From a remote broker we bridge to: its topic remapped by the `in` rules (none matching:
        // acknowledged and dropped).
        let mut unmapped = false;
        let bridged = match self.conns[k].bridge {
            Some(b) => {
                let t = self.bridge_in(b, topic);
                unmapped = t.is_none();
                t
            }
            None => None,
        };
        let topic: &str = bridged.as_deref().unwrap_or(topic);
        let properties = match &stripped {
            Some(s) => (!s.is_empty()).then_some(s),
            None => p.properties.as_deref(),
        };
        self.counters.received_qos[p.qos as usize] += 1;
        self.counters.received_bytes[p.qos as usize] += p.payload.len() as u64;
        if p.qos != QoS::AtMostOnce && self.store_failed() {
            let ack = match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => Packet::PubAck(Ack::new(id)),
                (_, Some(id)) => Packet::PubRec(Ack::new(id)),
                _ => return,
            };
            return self.refuse_unstored(k, ack);
        }
        let fresh = match (p.qos, p.packet_id) {
            (QoS::ExactlyOnce, Some(id)) => {
                // 3.1.1 has no receive maximum: there the 65,535 packet ids bound the set.
                let limit = v5.then_some(self.shared.config.max_inflight_messages as usize);
                match self.sessions[sk].receive_qos2(id, limit) {
                    Ok(fresh) => {
                        if fresh {
                            self.touch_meta(sk);
                        }
                        fresh
                    }
                    Err(_) => {
                        let why = "more QoS 2 messages in flight than the receive maximum [MQTT-3.3.4-7]";
                        return self.disconnect_with(k, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, why);
                    }
                }
            }
            _ => true,
        };
        let mut matched = true;
        let mut denied = false;
        let mut too_big = false;
        let mut stamp = 0;
        let size_limit = self.shared.config.message_size_limit;
        if unmapped || topic.starts_with("$SYS") {
            // Clients do not publish into the broker's own statistics: acknowledged, dropped.
        } else if size_limit != 0 && p.payload.len() > size_limit {
            // mosquitto's `message_size_limit`: the flow completes, nothing is delivered (5.0:
            // the acknowledgement says 0x83; PUBACK and PUBREC have no "too large").
            log::debug!(
                "client {}: dropped a {} byte payload (message_size_limit)",
                self.sessions[sk].client_id,
                p.payload.len()
            );
            self.counters.dropped(crate::metrics::Drop::Size);
            too_big = true;
        } else if !self.may(sk, topic, crate::auth::acl::Access::Write) {
            // No write access: not delivered (5.0: the acknowledgement says 0x87; 3.1.1 has no
            // way to say it, so it is acknowledged and dropped, as mosquitto does).
            log::debug!("client {}: no write access to {topic}", self.sessions[sk].client_id);
            self.counters.dropped(crate::metrics::Drop::Acl);
            denied = true;
        } else if p.qos == QoS::AtMostOnce && self.budget.over_memory {
            // Past `memory_limit` QoS 0 is shed first: nothing was promised for it.
            self.counters.dropped(crate::metrics::Drop::Memory);
            let what = || format!("memory_limit reached: shedding QoS 0 messages (to {topic})");
            self.over_budget(super::limits::Limit::MemoryQos0, what);
        } else if fresh {
            if p.qos != QoS::AtMostOnce && self.ack_after_commit() {
                stamp = self.next_stamp();
            }
            let m = View {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                origin: Some((self.id as u16, sk.0 as u32)),
                publisher: Some(Publisher { worker: self.id as u16, conn: k.0 as u32, conn_uid: self.conns[k].uid }),
                expires_at: properties
                    .and_then(|p| p.message_expiry_interval)
                    .map(|s| self.clock.now + Duration::from_secs(s as u64)),
                stamp,
                read_at: Some(self.clock.read_ns),
                arrived: self.conns[k].arrived,
            };
            matched = self.route_view(&m, None);
        }
        let reason = if v5 && denied {
            self.acl_denial()
        } else if v5 && too_big {
            ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR
        } else if v5 && p.qos != QoS::AtMostOnce && !matched {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        let ack = match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => Packet::PubAck(Ack { reason, ..Ack::new(id) }),
            (QoS::ExactlyOnce, Some(id)) => {
                if reason.0 >= 0x80 && self.sessions[sk].release_qos2(id) {
                    // A failing PUBREC ends the flow: no PUBREL follows, the id is free again
                    // and takes no room in the receive maximum (a PUBREL follows only
                    // a PUBREC below 0x80 [MQTT-4.3.3-4]).
                    self.touch_meta(sk);
                }
                Packet::PubRec(Ack { reason, ..Ack::new(id) })
            }
            _ => return,
        };
        if stamp != 0 {
            // Acknowledged once every worker it went to has it on disk.
            let peers = std::mem::take(&mut self.scratch.peers);
            self.hold_ack(stamp, &peers, k, ack);
            self.scratch.peers = peers;
        } else {
            self.acknowledge(k, ack);
        }
    }

    /// The CONNECTs and SUBSCRIBEs read this turn, now that the turn's mail is applied.
    pub(super) fn run_deferred(&mut self) {
        for d in std::mem::take(&mut self.turn.deferred) {
            match d {
                Deferred::Connect { conn, conn_uid, connect, assigned_id } => {
                    if self.conns.alive(conn, conn_uid) {
                        self.conns[conn].flags.blocked = false;
                        self.attach(conn, connect, assigned_id);
                        self.turn.more_to_read.push((conn, conn_uid));
                    }
                }
                Deferred::Subscribe(d) => {
                    let attached = self.conns.alive(d.conn, d.conn_uid)
                        && self.sessions.get(d.session).is_some_and(|s| s.conn == Some(d.conn));
                    if attached {
                        self.on_subscribe(d);
                    }
                }
            }
        }
    }

    /// Adds the subscriptions. Filters new to this worker are announced to every peer, shared
    /// groups joined on their home worker; the SUBACK (then the retained messages [MQTT-3.3.1-6])
    /// goes once all of them have acknowledged, so a message published after it, from a client on
    /// any worker, is delivered here.
    fn on_subscribe(&mut self, d: DeferredSubscribe) {
        let DeferredSubscribe { conn: k, conn_uid, arrived, session: sk, subscribe: sub } = d;
        let Subscribe { packet_id, filters, properties } = *sub;
        let v5 = self.sessions[sk].version.is_v5();
        let identifier = properties.subscription_identifiers.first().copied().unwrap_or(0);
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        let mut announce = Vec::new();
        let mut joins = Vec::new();
        let mut fresh = Vec::new();
        let max_subs = self.shared.config.max_subscriptions_per_client;
        for (filter, opts) in &filters {
            let mut subscription = Subscription { options: *opts, identifier, acl_whole: 0 };
            let s = &self.sessions[sk];
            if s.bridge_peer && topic::parse_shared(filter).is_ok_and(|sf| sf.is_none()) {
                // A broker bridging to us: its own messages never go back to it, and retained
                // ones keep their flag (mosquitto's bridge convention).
                subscription.options.no_local = true;
                subscription.options.retain_as_published = true;
            }
            let new = !s.subscriptions.contains_key(filter);
            if s.subscriptions.len() >= max_subs && new {
                log::info!("client {}: max_subscriptions_per_client reached, refusing {filter:?}", s.client_id);
                codes.push(failure(v5, ReasonCode::QUOTA_EXCEEDED));
                continue;
            }
            if new && !self.subscription_fits(sk, filter.len()) {
                codes.push(failure(v5, ReasonCode::QUOTA_EXCEEDED));
                continue;
            }
            // ACL: a filter nothing can ever be read through is refused; one that covers some
            // denied topics is granted, and those are filtered per message.
            let readable = match topic::parse_shared(filter) {
                Ok(Some(sf)) => sf.filter.to_string(),
                _ => filter.to_string(),
            };
            if !self.may_subscribe(sk, &readable) {
                log::debug!("client {}: no read access through {filter:?}", self.sessions[sk].client_id);
                codes.push(failure(v5, self.acl_denial()));
                continue;
            }
            if self.sessions[sk].access.is_some() {
                subscription.acl_whole = self.whole_grant(sk, &readable);
            }
            let code = match topic::parse_shared(filter) {
                Ok(Some(sf)) => {
                    if opts.no_local {
                        // [MQTT-3.8.3-4]: a protocol error on a shared subscription.
                        self.conns[k].flags.blocked = false;
                        return self.disconnect_with(
                            k,
                            ReasonCode::PROTOCOL_ERROR,
                            "no local on a shared subscription",
                        );
                    }
                    let key = (MqttStr::from(sf.group), MqttStr::from(sf.filter));
                    self.sessions[sk].subscriptions.insert(MqttStr::from(filter.as_str()), subscription);
                    joins.push((key, subscription));
                    ReasonCode(opts.qos as u8)
                }
                Err(_) => failure(v5, ReasonCode::TOPIC_FILTER_INVALID),
                Ok(None) => match topic::validate_filter(filter) {
                    Err(e) => {
                        log::debug!("rejecting filter {filter:?}: {e}");
                        failure(v5, ReasonCode::TOPIC_FILTER_INVALID)
                    }
                    Ok(()) => {
                        let filter = MqttStr::from(filter.as_str());
                        let r = self.router.subscribe(&filter, sk.0 as u32, subscription);
                        self.sessions[sk].subscriptions.insert(filter.clone(), subscription);
                        if r.announce {
                            announce.push(filter.clone());
                        }
                        if !r.existed && self.recent.on {
                            fresh.push(filter.clone());
                        }
                        let wanted = match opts.retain_handling {
                            RetainHandling::OnSubscribe => true,
                            RetainHandling::OnNewSubscribe => !r.existed,
                            RetainHandling::Never => false,
                        };
                        if wanted {
                            retained.push((filter, subscription));
                        }
                        ReasonCode(opts.qos as u8)
                    }
                },
            };
            if new && code.0 < 0x80 {
                self.sessions[sk].subscription_bytes += filter.len();
                self.shared.subscription_bytes.fetch_add(filter.len(), Ordering::Relaxed);
            }
            codes.push(code);
        }
        self.touch_meta(sk);
        let ack = Box::new(SubAck { packet_id, codes, properties: Default::default() });
        let then = Then::SubAck { conn: k, conn_uid, session: sk, ack, retained };
        let remote_joins: Vec<_> = joins
            .into_iter()
            .filter_map(|(key, sub)| {
                let home = self.shared.home_of_group(&key.0, &key.1);
                let member = self.member(sk, sub);
                if home != self.id {
                    return Some((home, key, member));
                }
                // A group homed here: its filter is announced with this worker's own.
                if self.router.groups.join(key.clone(), member) && self.router.want(&key.1) {
                    announce.push(key.1.clone());
                }
                None
            })
            .collect();
        let peers = if announce.is_empty() { 0 } else { self.mailbox.peer_count() };
        let waiting = peers + remote_joins.len();
        if waiting == 0 {
            self.finish(then);
        } else {
            let ticket = self.pending.start(waiting, then);
            if peers > 0 {
                self.announce(announce, true, Some(ticket));
            }
            for (home, key, member) in remote_joins {
                self.mailbox.send(home, Mail::SharedJoin(Box::new((key, member, ticket))));
            }
        }
        // Behind the announcement in each ring: what arrived after this SUBSCRIBE but was routed
        // before its filters were in place.
        self.catch_up_subscribe(sk, arrived, fresh);
    }

    fn member(&self, sk: SessionKey, sub: Subscription) -> Member {
        Member { worker: self.id as u16, session: sk.0 as u32, session_uid: self.sessions[sk].uid, sub }
    }

    /// Tells every peer this worker now wants (or no longer wants) messages matching `filters`.
    pub(super) fn announce(&mut self, filters: Vec<MqttStr>, present: bool, ticket: Option<u32>) {
        let peers: Vec<usize> = self.mailbox.peers().collect();
        for peer in peers {
            let change = InterestChange { filters: filters.clone(), worker: self.id as u16, present, ticket };
            let m = Mail::Interest(Box::new(change));
            self.mailbox.send(peer, m);
        }
    }

    /// Completes an operation whose acknowledgements have all arrived.
    pub(super) fn finish(&mut self, then: Then) {
        match then {
            Then::Ack { worker, ticket } => {
                if worker as usize == self.id {
                    if let Some(then) = self.pending.ack(ticket) {
                        self.finish(then);
                    }
                } else {
                    self.mailbox.send(worker as usize, Mail::Ack { ticket });
                }
            }
            Then::SubAck { conn: k, conn_uid, session: sk, ack, retained } => {
                if !self.conns.alive(k, conn_uid) || self.sessions.get(sk).is_none_or(|s| s.conn != Some(k)) {
                    return;
                }
                // [MQTT-3.8.4-1]: SUBACK first, then the retained messages [MQTT-3.3.1-6],
                // streamed as the client reads them: never dropped at the output bound, never
                // copied into the output buffer all at once.
                self.send(k, &Packet::SubAck(ack));
                let mut items = std::collections::VecDeque::new();
                for (filter, subscription) in retained {
                    self.router.retained.for_each_match(&filter, self.clock.now, |msg| {
                        let qos = msg.qos.min(subscription.options.qos);
                        let ids = if subscription.identifier != 0 { vec![subscription.identifier] } else { vec![] };
                        // [MQTT-3.3.1-8]: retained messages for a new subscription go out with retain set.
                        // Not a live delivery: left out of the delivery latency.
                        let msg = match msg.read_at {
                            Some(_) => {
                                std::sync::Arc::new(crate::session::Message { read_at: None, ..(**msg).clone() })
                            }
                            None => msg.clone(),
                        };
                        let d = Delivery { msg, qos, retain: true, sub_ids: ids, group: None, seq: 0 };
                        items.push_back((d, false));
                    });
                }
                if !items.is_empty() {
                    let s = &mut self.sessions[sk];
                    match s.backlog.as_deref_mut() {
                        // Still streaming an earlier SUBSCRIBE's: these go after it.
                        Some(b) => b.items.extend(items),
                        None => s.backlog = Some(Box::new(Backlog { items, live: 0 })),
                    }
                    self.feed_backlog(sk);
                }
                self.conns[k].flags.blocked = false;
                self.turn.more_to_read.push((k, conn_uid));
            }
        }
    }

    fn on_unsubscribe(&mut self, k: ConnKey, sk: SessionKey, unsub: Unsubscribe) {
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for filter in &unsub.filters {
            let removed = self.sessions[sk].subscriptions.remove(filter).is_some();
            if removed {
                self.sessions[sk].subscription_bytes -= filter.len();
                self.shared.subscription_bytes.fetch_sub(filter.len(), Ordering::Relaxed);
                self.drop_subscription(sk, filter);
            }
            codes.push(if removed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        self.touch_meta(sk);
        let ack = UnsubAck { packet_id: unsub.packet_id, codes, properties: Default::default() };
        self.send(k, &Packet::UnsubAck(Box::new(ack)));
    }

    /// Takes one of a session's subscriptions out of the router (or its shared group).
    pub(super) fn drop_subscription(&mut self, sk: SessionKey, filter: &str) {
        if let Ok(Some(sf)) = topic::parse_shared(filter) {
            let key: GroupKey = (MqttStr::from(sf.group), MqttStr::from(sf.filter));
            let home = self.shared.home_of_group(&key.0, &key.1);
            if home == self.id {
                self.leave_group(&key, self.id as u16, sk.0 as u32);
            } else {
                let m = Mail::SharedLeave { key: Box::new(key), worker: self.id as u16, session: sk.0 as u32 };
                self.mailbox.send(home, m);
            }
        } else if self.router.unsubscribe(filter, sk.0 as u32) {
            self.announce(vec![MqttStr::from(filter)], false, None);
        }
    }

    /// A member leaves a group homed here; the group's filter is retracted with its last member.
    pub(super) fn leave_group(&mut self, key: &GroupKey, worker: u16, session: u32) {
        if let Some(filter) = self.router.groups.leave(key, worker, session) {
            if self.router.unwant(&filter) {
                self.announce(vec![filter], false, None);
            }
        }
    }
}
