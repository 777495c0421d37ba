//! What each packet means to the broker: CONNECT and sessions, PUBLISH routing and the QoS 1/2
//! flows, SUBSCRIBE with retained messages and shared subscriptions, and `$SYS`. Works on the
//! worker's state; never touches a socket (output goes into connection buffers) or a byte layout
//! (the codec does that).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{CloseKind, Conn, Mail, Worker, TOPIC_ALIAS_MAXIMUM};
use crate::codec::{
    Ack, ConnAck, Connect, ConnectReturnCode, Disconnect, MqttStr, Packet, Properties, ProtocolVersion, PublishHeader,
    PublishRef, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe, Will,
};
use crate::session::{Delivery, GroupKey, Inflight, Message, OutState, Session, Subscription, NEVER};
use crate::topic::{self, filter_matches};

/// A message being routed, borrowed from wherever it is: the read buffer or a shared `Message`.
struct View<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: QoS,
    retain: bool,
    properties: Option<&'a Properties>,
    origin: Option<(u16, u32)>,
    expires_at: Option<Instant>,
}

impl View<'_> {
    fn to_message(&self) -> Arc<Message> {
        Arc::new(Message {
            topic: MqttStr::from(self.topic),
            payload: Bytes::copy_from_slice(self.payload),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.map(|p| Box::new(p.clone())),
            origin: self.origin,
            expires_at: self.expires_at,
        })
    }
}

fn view(m: &Message) -> View<'_> {
    View {
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos,
        retain: m.retain,
        properties: m.properties.as_deref(),
        origin: m.origin,
        expires_at: m.expires_at,
    }
}

/// The properties a 5.0 subscriber gets when they differ from the published ones: its
/// subscription identifiers [MQTT-3.3.4-3] and the remaining expiry interval [MQTT-3.3.2-6].
fn custom_properties(base: Option<&Properties>, expires_at: Option<Instant>, ids: &[u32]) -> Option<Properties> {
    if ids.is_empty() && expires_at.is_none() {
        return None;
    }
    let mut p = base.cloned().unwrap_or_default();
    p.subscription_identifiers = ids.to_vec();
    if let Some(at) = expires_at {
        p.message_expiry_interval = Some(at.saturating_duration_since(Instant::now()).as_secs() as u32);
    }
    Some(p)
}

/// Encodes a PUBLISH into a connection's output buffer, unless it exceeds the client's maximum
/// packet size [MQTT-3.1.2-24], in which case it is dropped. Returns whether it was queued.
fn write_publish(c: &mut Conn, v: ProtocolVersion, header: &PublishHeader, payload: &[u8]) -> bool {
    if let Some(aliases) = c.out_aliases.as_deref_mut() {
        // A 5.0 client that accepts topic aliases: the first PUBLISH of a topic names it and
        // sets an alias, later ones send only the alias [MQTT-3.3.2-12].
        let (alias, known) = match aliases.map.get(header.topic) {
            Some(&a) => (Some(a), true),
            None if aliases.map.len() < aliases.max as usize => {
                let a = aliases.map.len() as u16 + 1;
                aliases.map.insert(header.topic.into(), a);
                (Some(a), false)
            }
            None => (None, false),
        };
        if let Some(alias) = alias {
            let mut props = header.properties.cloned().unwrap_or_default();
            props.topic_alias = Some(alias);
            let aliased =
                PublishHeader { topic: if known { "" } else { header.topic }, properties: Some(&props), ..*header };
            if aliased.size(v, payload.len()) > c.max_packet_out {
                if !known {
                    aliases.map.remove(header.topic);
                }
                return false;
            }
            aliased.encode(v, payload.len(), &mut c.wbuf);
            c.wbuf.extend_from_slice(payload);
            return true;
        }
    }
    if header.size(v, payload.len()) > c.max_packet_out {
        return false;
    }
    header.encode(v, payload.len(), &mut c.wbuf);
    c.wbuf.extend_from_slice(payload);
    true
}

fn failure(v: ProtocolVersion, v5: ReasonCode) -> ReasonCode {
    if v.is_v5() {
        v5
    } else {
        ReasonCode::SUBACK_FAILURE
    }
}

impl Worker {
    /// Handles CONNECT on the worker the connection landed on. Returns the CONNECT back when the
    /// client id lives on another worker, for the caller to hand the connection over.
    pub(super) fn on_connect(&mut self, k: usize, connect: Box<Connect>) -> Option<(Box<Connect>, bool)> {
        let c = &mut self.conns[k];
        if c.version.is_some() {
            log::info!("closing connection from {}: second CONNECT [MQTT-3.1.0-2]", c.peer());
            self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, "second CONNECT [MQTT-3.1.0-2]");
            return None;
        }
        let v = connect.protocol;
        c.version = Some(v);
        c.problem_info = connect.properties.request_problem_information != Some(0);
        let refuse = |w: &mut Worker, v3: ReasonCode, v5: ReasonCode, why: &str| {
            let c = &mut w.conns[k];
            log::info!("refusing CONNECT from {}: {why}", c.peer());
            let mut ack = ConnAck { code: if v.is_v5() { v5 } else { v3 }, ..Default::default() };
            if v.is_v5() && c.problem_info {
                ack.properties.reason_string = Some(MqttStr::from(why));
            }
            Packet::ConnAck(Box::new(ack)).encode(v, &mut c.wbuf);
            c.close_after_flush = true;
            super::Worker::mark_dirty(&mut w.dirty, c, k);
        };
        if c.over_limit {
            refuse(self, ConnectReturnCode::SERVER_UNAVAILABLE, ReasonCode::SERVER_BUSY, "max_connections reached");
            return None;
        }
        if connect.properties.authentication_method.is_some() {
            refuse(
                self,
                ConnectReturnCode::NOT_AUTHORIZED,
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                "no authentication method is configured",
            );
            return None;
        }
        let mut connect = connect;
        let mut assigned = false;
        if connect.client_id.is_empty() {
            // [MQTT-3.1.3-7]/[MQTT-3.1.3-8]: 3.1.1 allows it only with clean session; 3.1 not at all.
            let allowed = self.shared.config.allow_zero_length_clientid
                && (v.is_v5() || (v == ProtocolVersion::V311 && connect.clean_start));
            if !allowed {
                refuse(
                    self,
                    ConnectReturnCode::IDENTIFIER_REJECTED,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "empty client id without clean session",
                );
                return None;
            }
            self.generated_ids += 1;
            let id = format!("tern-{}-{}-{:x}", self.id, self.generated_ids, self.shared.hasher.hash_one(k));
            connect.client_id = MqttStr::from(id);
            assigned = true;
        }
        if self.shared.home_of(&connect.client_id) != self.id {
            return Some((connect, assigned));
        }
        self.attach(k, connect, assigned);
        None
    }

    /// Whether one more session fits this worker's share of `max_sessions`.
    fn session_room(&self) -> bool {
        self.sessions.len() < self.shared.config.max_sessions.div_ceil(self.shared.workers)
    }

    /// Applies the mail already in the rings from other workers, so that what happened before
    /// this client's packet was sent (a publish acknowledged to another client) is seen by it.
    /// Returns false if connection `k` (attached to session `sk`, if given) went away meanwhile.
    fn catch_up(&mut self, k: usize, sk: usize) -> bool {
        let uid = self.conns[k].uid;
        self.drain_mail();
        self.alive(k, uid) && self.sessions.get(sk).is_some_and(|s| s.conn == Some(k))
    }

    /// Binds a connection to its session on the client id's home worker and sends CONNACK.
    pub(super) fn attach(&mut self, k: usize, connect: Box<Connect>, assigned_id: bool) {
        let uid = self.conns[k].uid;
        self.drain_mail();
        if !self.alive(k, uid) {
            return;
        }
        let v = connect.protocol;
        // Keep nothing that points into a read buffer: copy what the session keeps.
        let client_id = MqttStr::from(connect.client_id.as_str());
        // [MQTT-3.1.4-2]: an existing connection with this client id is closed.
        if let Some(sk) = self.by_client.get(&self.sessions, &client_id) {
            if let Some(old) = self.sessions[sk].conn {
                log::info!("client {client_id} taken over by {}", self.conns[k].peer());
                self.disconnect_with(old, ReasonCode::SESSION_TAKEN_OVER, "another connection took this client id");
            }
        }
        let expiry = if v.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            NEVER
        };
        let existing = self.by_client.get(&self.sessions, &client_id);
        if existing.is_none() && !self.session_room() {
            log::warn!("max_sessions reached: refusing client {client_id}");
            let code = if v.is_v5() { ReasonCode::QUOTA_EXCEEDED } else { ConnectReturnCode::SERVER_UNAVAILABLE };
            let c = &mut self.conns[k];
            c.version = Some(v);
            Packet::ConnAck(Box::new(ConnAck { code, ..Default::default() })).encode(v, &mut c.wbuf);
            c.close_after_flush = true;
            Worker::mark_dirty(&mut self.dirty, c, k);
            return;
        }
        let (sk, present) = match existing {
            Some(sk) if !connect.clean_start => (sk, true),
            Some(sk) => {
                // The old session ends now: a will still waiting on its delay goes out [MQTT-3.1.3-9].
                if let Some(pending) = self.sessions[sk].pending_will.take() {
                    self.publish_will(sk, &pending.1);
                }
                self.end_session(sk);
                (self.new_session(MqttStr::from(client_id.as_str()), v), false)
            }
            None => (self.new_session(MqttStr::from(client_id.as_str()), v), false),
        };
        let max_inflight = self.shared.config.max_inflight_messages as usize;
        let s = &mut self.sessions[sk];
        s.conn = Some(k);
        s.version = v;
        s.expiry_interval = expiry;
        s.disconnected_at = None;
        // Resumed in time: the delayed will is not sent [MQTT-3.1.3-9].
        s.pending_will = None;
        // At most 65,534 in flight, so a free packet id always exists for the next one.
        s.send_window =
            max_inflight.min(connect.properties.receive_maximum.map_or(usize::MAX, |r| r as usize)).min(65_534);
        s.will = connect.will.as_ref().map(|w| {
            Box::new(Will {
                topic: MqttStr::from(w.topic.as_str()),
                payload: Bytes::copy_from_slice(&w.payload),
                qos: w.qos,
                retain: w.retain,
                properties: w.properties.clone(),
            })
        });
        let c = &mut self.conns[k];
        c.version = Some(v);
        c.session = Some(sk);
        c.keep_alive = connect.keep_alive;
        c.aliases = None;
        // Aliases are per connection [MQTT-3.3.2-7]: a new connection starts with none.
        c.out_aliases = match connect.properties.topic_alias_maximum {
            Some(max) if v.is_v5() && max > 0 => {
                Some(Box::new(super::OutAliases { max: max.min(super::OUT_ALIASES_MAX), map: Default::default() }))
            }
            _ => None,
        };
        if let Some(max) = connect.properties.maximum_packet_size {
            c.max_packet_out = max as usize;
        }
        let mut ack = ConnAck { session_present: present, code: ReasonCode::SUCCESS, ..Default::default() };
        if v.is_v5() {
            let p = &mut ack.properties;
            if assigned_id {
                p.assigned_client_identifier = Some(client_id.clone());
            }
            p.receive_maximum = Some(self.shared.config.max_inflight_messages);
            p.maximum_packet_size = Some(self.shared.config.max_packet_size);
            p.topic_alias_maximum = Some(TOPIC_ALIAS_MAXIMUM);
            p.retain_available = Some(1);
            p.wildcard_subscription_available = Some(1);
            p.subscription_identifier_available = Some(1);
            p.shared_subscription_available = Some(1);
            if connect.properties.request_response_information == Some(1) {
                p.response_information = Some(MqttStr::from(format!("response/{client_id}")));
            }
        }
        self.send(k, &Packet::ConnAck(Box::new(ack)));
        let now_connected = self.shared.connections.load(Ordering::Relaxed) as u64;
        self.shared.clients_maximum.fetch_max(now_connected, Ordering::Relaxed);
        if present {
            self.resend_inflight(sk);
            self.pump(sk);
        }
    }

    fn new_session(&mut self, client_id: MqttStr, v: ProtocolVersion) -> usize {
        self.next_uid += 1;
        let mut session = Session::new(client_id, v);
        session.uid = self.next_uid;
        let sk = self.sessions.insert(session);
        self.by_client.insert(&self.sessions, sk);
        sk
    }

    /// [MQTT-4.4.0-1]: on a resumed session, unacknowledged PUBLISH packets go again with DUP set and
    /// unacknowledged PUBRELs are sent again, in their original order.
    fn resend_inflight(&mut self, sk: usize) {
        let s = &self.sessions[sk];
        let Some(ck) = s.conn else { return };
        let v = s.version;
        let c = &mut self.conns[ck];
        for i in &s.inflight {
            match i.state {
                OutState::AwaitAck | OutState::AwaitRec => {
                    let d = &i.delivery;
                    let custom = if v.is_v5() {
                        custom_properties(d.msg.properties.as_deref(), d.msg.expires_at, &d.sub_ids)
                    } else {
                        None
                    };
                    let header = PublishHeader {
                        dup: true,
                        qos: d.qos,
                        retain: d.retain,
                        topic: &d.msg.topic,
                        packet_id: Some(i.packet_id),
                        properties: custom.as_ref().or(d.msg.properties.as_deref()),
                    };
                    write_publish(c, v, &header, &d.msg.payload);
                }
                OutState::AwaitComp => Packet::PubRel(Ack::new(i.packet_id)).encode(v, &mut c.wbuf),
            }
        }
        Worker::mark_dirty(&mut self.dirty, c, ck);
    }

    /// Sends a 5.0 client a DISCONNECT with `code` (and the reason, if it wants problem
    /// information), then closes the connection; its will is published.
    pub(super) fn disconnect_with(&mut self, k: usize, code: ReasonCode, why: &str) {
        let c = &mut self.conns[k];
        if c.version == Some(ProtocolVersion::V5) {
            let mut d = Disconnect::new(code);
            if c.problem_info {
                d.properties.reason_string = Some(MqttStr::from(why));
            }
            Packet::Disconnect(Box::new(d)).encode(ProtocolVersion::V5, &mut c.wbuf);
        }
        let kind = if code == ReasonCode::SESSION_TAKEN_OVER { CloseKind::TakenOver } else { CloseKind::Abnormal };
        self.close(k, kind);
    }

    /// Every packet after CONNECT except PUBLISH (which takes the borrowed path).
    pub(super) fn on_packet(&mut self, k: usize, packet: Packet) {
        let Some(sk) = self.conns[k].session else {
            // The codec only lets CONNECT through before a session exists.
            self.close(k, CloseKind::NoSession);
            return;
        };
        let v5 = self.sessions[sk].version.is_v5();
        match packet {
            Packet::PubAck(a) => self.complete(sk, a.packet_id, OutState::AwaitAck),
            Packet::PubRec(a) => {
                let s = &mut self.sessions[sk];
                let known = s.inflight_position(a.packet_id);
                if let Some(i) = known {
                    if a.reason.is_error() {
                        // 5.0: the receiver refused it; the flow ends here [MQTT-4.3.3-4].
                        s.inflight.remove(i);
                        self.pump(sk);
                        return;
                    }
                    s.inflight[i].state = OutState::AwaitComp;
                }
                let mut rel = Ack::new(a.packet_id);
                if known.is_none() && v5 {
                    rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(k, &Packet::PubRel(rel));
            }
            Packet::PubComp(a) => self.complete(sk, a.packet_id, OutState::AwaitComp),
            Packet::PubRel(a) => {
                // [MQTT-4.3.3-2]: release the id; the message was delivered on PUBLISH.
                let known = self.sessions[sk].incoming_qos2.remove(&a.packet_id.get());
                let mut comp = Ack::new(a.packet_id);
                if !known && v5 {
                    comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(k, &Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => self.on_subscribe(k, sk, *s),
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
                if d.reason == ReasonCode::DISCONNECT_WITH_WILL {
                    self.close(k, CloseKind::Abnormal);
                } else {
                    self.close(k, CloseKind::Normal);
                }
            }
            Packet::Auth(_) => {
                log::info!("closing connection from {}: AUTH without an authentication method", self.conns[k].peer());
                self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, "no authentication method is in use");
            }
            other => {
                let why = format!("{} is not sent by clients", other.name());
                log::info!("closing connection from {}: {why}", self.conns[k].peer());
                self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, &why);
            }
        }
    }

    /// PUBACK or PUBCOMP: the outgoing flow of `id` ends if it was waiting for exactly that, and
    /// the window has room for the next queued message.
    fn complete(&mut self, sk: usize, id: crate::codec::PacketId, waiting: OutState) {
        let s = &mut self.sessions[sk];
        if let Some(i) = s.inflight_position(id) {
            if s.inflight[i].state == waiting {
                s.inflight.remove(i);
                self.pump(sk);
            }
        }
    }

    /// A PUBLISH from a client, parsed in place.
    pub(super) fn on_publish(&mut self, k: usize, p: PublishRef<'_>) {
        let Some(sk) = self.conns[k].session else { return };
        let v5 = self.sessions[sk].version.is_v5();
        let mut alias_topic: Option<MqttStr> = None;
        let mut stripped: Option<Properties> = None;
        if let Some(props) = p.properties.as_deref() {
            if !props.subscription_identifiers.is_empty() {
                let why = "subscription identifier from a client [MQTT-3.3.4-6]";
                log::info!("closing connection from {}: {why}", self.conns[k].peer());
                self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
                return;
            }
            if let Some(alias) = props.topic_alias {
                // [MQTT-3.3.2-8]/[MQTT-3.3.2-9]: 1 to our advertised maximum.
                if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
                    let why = "topic alias outside 1..topic alias maximum [MQTT-3.3.2-9]";
                    log::info!("closing connection from {}: {why}", self.conns[k].peer());
                    self.disconnect_with(k, ReasonCode::TOPIC_ALIAS_INVALID, why);
                    return;
                }
                let c = &mut self.conns[k];
                let slot = alias as usize - 1;
                let aliases = c.aliases.get_or_insert_with(Default::default);
                if aliases.len() <= slot {
                    aliases.resize(slot + 1, None);
                }
                if p.topic.is_empty() {
                    match &aliases[slot] {
                        Some(t) => alias_topic = Some(t.clone()),
                        None => {
                            let why = "unknown topic alias with an empty topic [MQTT-3.3.2-12]";
                            log::info!("closing connection from {}: {why}", c.peer());
                            self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, why);
                            return;
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
        let properties = match &stripped {
            Some(s) => (!s.is_empty()).then_some(s),
            None => p.properties.as_deref(),
        };
        self.counters.messages_received += 1;
        let fresh = match (p.qos, p.packet_id) {
            (QoS::ExactlyOnce, Some(id)) => {
                let s = &mut self.sessions[sk];
                // 3.1.1 has no receive maximum: there the 65,535 packet ids bound the set.
                if v5
                    && !s.incoming_qos2.contains(&id.get())
                    && s.incoming_qos2.len() >= self.shared.config.max_inflight_messages as usize
                {
                    // [MQTT-3.3.4-7]: more unacknowledged QoS 2 than our receive maximum.
                    let why = "more QoS 2 messages in flight than the receive maximum";
                    log::info!("closing connection from {}: {why}", self.conns[k].peer());
                    self.disconnect_with(k, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, why);
                    return;
                }
                s.incoming_qos2.insert(id.get())
            }
            _ => true,
        };
        let mut matched = true;
        if topic.starts_with("$SYS") {
            // Clients do not publish into the broker's own statistics: acknowledged, dropped.
        } else if fresh {
            let m = View {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                origin: Some((self.id as u16, sk as u32)),
                expires_at: properties
                    .and_then(|p| p.message_expiry_interval)
                    .map(|s| Instant::now() + Duration::from_secs(s as u64)),
            };
            matched = self.route_view(&m);
        }
        let unmatched = v5 && p.qos != QoS::AtMostOnce && !matched && !self.remote_interest(topic);
        let reason = if unmatched { ReasonCode::NO_MATCHING_SUBSCRIBERS } else { ReasonCode::SUCCESS };
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(k, &Packet::PubAck(Ack { reason, ..Ack::new(id) })),
            (QoS::ExactlyOnce, Some(id)) => self.send(k, &Packet::PubRec(Ack { reason, ..Ack::new(id) })),
            _ => {}
        }
    }

    /// Routes a message that already is shared (a will, `$SYS`): peers, retained store, local.
    pub(super) fn route(&mut self, msg: Arc<Message>) {
        for peer in 0..self.shared.workers {
            if peer != self.id {
                self.mail(peer, Mail::Publish(msg.clone()));
            }
        }
        if msg.retain {
            self.store_retained(&msg);
        }
        self.deliver_local(&msg);
    }

    /// Routes a message borrowed from a read buffer, copying it into a shared `Message` only if
    /// something must keep it (a peer worker, the retained store, a QoS 1/2 queue). Returns
    /// whether a subscription on this worker matched.
    fn route_view(&mut self, m: &View<'_>) -> bool {
        let mut shared: Option<Arc<Message>> = None;
        if self.shared.workers > 1 {
            // Every peer gets every message, so a subscriber acknowledged by SUBACK on any worker
            // receives all that is published after it: no interest table can lag behind.
            let msg = shared.get_or_insert_with(|| m.to_message()).clone();
            for peer in 0..self.shared.workers {
                if peer != self.id {
                    self.mail(peer, Mail::Publish(msg.clone()));
                }
            }
        }
        if m.retain {
            let msg = shared.get_or_insert_with(|| m.to_message()).clone();
            self.store_retained(&msg);
        }
        self.deliver(m, &mut shared)
    }

    /// Whether another worker has a subscriber for `topic`, as far as this worker knows: only for
    /// the 5.0 "no matching subscribers" hint, so asked only when that answer is about to be sent.
    fn remote_interest(&self, topic: &str) -> bool {
        let mut any = false;
        self.interest.for_each_match(topic, |_, _| any = true);
        any
    }

    pub(super) fn deliver_local(&mut self, msg: &Arc<Message>) {
        let mut shared = Some(msg.clone());
        self.deliver(&view(msg), &mut shared);
    }

    /// [MQTT-3.3.5-1]: to every matching subscription on this worker, once per session at the
    /// highest granted QoS with every matching subscription identifier, at min(published, granted)
    /// QoS; and to one member of each matching shared group homed here. Returns whether anything
    /// matched.
    fn deliver(&mut self, m: &View<'_>, shared: &mut Option<Arc<Message>>) -> bool {
        let now = Instant::now();
        if m.expires_at.is_some_and(|t| t <= now) {
            return true;
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.subs.for_each_match(m.topic, |&sk, &sub| matches.push((sk, sub)));
        let groups_matched = self.deliver_shared(m, shared);
        if matches.is_empty() {
            self.matches = matches;
            return groups_matched;
        }
        // Group each session's subscriptions; one filter's subscribers are already distinct.
        if matches.len() > 1 && !matches.windows(2).all(|w| w[0].0 < w[1].0) {
            matches.sort_unstable_by_key(|&(sk, _)| sk);
        }
        // A QoS 0 packet is the same bytes for every subscriber of one protocol family: encode it
        // once per family and copy it, rather than encode per subscriber.
        let mut enc = std::mem::take(&mut self.encoded);
        enc.clear();
        let mut cached: [Option<(usize, usize)>; 2] = [None, None];
        let mut ids: Vec<u32> = Vec::new();
        let max_out = self.shared.config.max_output_bytes;
        let mut i = 0;
        while i < matches.len() {
            // Merge every subscription of one session.
            let sk = matches[i].0;
            let mut o = matches[i].1.options;
            ids.clear();
            let mut j = i;
            while j < matches.len() && matches[j].0 == sk {
                let sub = matches[j].1;
                o.qos = o.qos.max(sub.options.qos);
                o.retain_as_published |= sub.options.retain_as_published;
                o.no_local &= sub.options.no_local;
                if sub.identifier != 0 {
                    ids.push(sub.identifier);
                }
                j += 1;
            }
            i = j;
            let sk = sk as usize;
            if o.no_local && m.origin == Some((self.id as u16, sk as u32)) {
                continue; // [MQTT-3.8.3-3]
            }
            let qos = m.qos.min(o.qos);
            // [MQTT-3.3.1-9]: forwarded with retain cleared, unless 5.0 retain-as-published.
            let retain = m.retain && o.retain_as_published;
            if qos != QoS::AtMostOnce {
                let msg = shared.get_or_insert_with(|| m.to_message()).clone();
                self.enqueue(sk, Delivery { msg, qos, retain, sub_ids: ids.clone(), group: None });
                continue;
            }
            let s = &self.sessions[sk];
            let Some(ck) = s.conn else { continue }; // QoS 0 is not kept for offline sessions
            let c = &mut self.conns[ck];
            if c.wbuf.len() >= max_out {
                self.counters.publish_dropped += 1;
                continue;
            }
            let v5 = s.version.is_v5();
            let custom = if v5 { custom_properties(m.properties, m.expires_at, &ids) } else { None };
            let header = PublishHeader {
                dup: false,
                qos,
                retain,
                topic: m.topic,
                packet_id: None,
                properties: custom.as_ref().or(m.properties),
            };
            if retain || custom.is_some() || c.out_aliases.is_some() {
                if write_publish(c, s.version, &header, m.payload) {
                    self.counters.messages_sent += 1;
                }
            } else {
                let slot = &mut cached[v5 as usize];
                let (start, end) = *slot.get_or_insert_with(|| {
                    let start = enc.len();
                    header.encode(s.version, m.payload.len(), &mut enc);
                    enc.extend_from_slice(m.payload);
                    (start, enc.len())
                });
                if end - start > c.max_packet_out {
                    continue;
                }
                c.wbuf.extend_from_slice(&enc[start..end]);
                self.counters.messages_sent += 1;
            }
            Worker::mark_dirty(&mut self.dirty, c, ck);
        }
        self.encoded = enc;
        self.matches = matches;
        true
    }

    /// Shared subscriptions homed on this worker: each matching group sends the message to one
    /// member, in turn.
    fn deliver_shared(&mut self, m: &View<'_>, shared: &mut Option<Arc<Message>>) -> bool {
        if self.shared_trie.is_empty() {
            return false;
        }
        let mut groups = Vec::new();
        self.shared_trie.for_each_match(m.topic, |&g, _| groups.push(g as usize));
        for &g in &groups {
            let msg = shared.get_or_insert_with(|| m.to_message()).clone();
            self.deliver_to_group(g, msg);
        }
        !groups.is_empty()
    }

    /// Picks the next member of group `g` (round robin) and hands it the message.
    pub(super) fn deliver_to_group(&mut self, g: usize, msg: Arc<Message>) {
        let Some(group) = self.groups.get_mut(g) else { return };
        if group.members.is_empty() {
            return;
        }
        group.cursor = (group.cursor + 1) % group.members.len();
        let member = group.members[group.cursor];
        let key = Box::new((group.name.clone(), group.filter.clone()));
        let qos = msg.qos.min(member.sub.options.qos);
        let ids = if member.sub.identifier != 0 { vec![member.sub.identifier] } else { vec![] };
        let retain = msg.retain && member.sub.options.retain_as_published;
        let d = Delivery { msg, qos, retain, sub_ids: ids, group: Some(key) };
        if member.worker as usize == self.id {
            self.deliver_one(member.session as usize, d);
        } else {
            let m = Mail::SharedDeliver { session: member.session, uid: member.session_uid, delivery: d };
            self.mail(member.worker as usize, m);
        }
    }

    /// One delivery to one session on this worker (shared subscriptions, retained messages).
    pub(super) fn deliver_one(&mut self, sk: usize, d: Delivery) {
        if !self.sessions.contains(sk) {
            if let Some(g) = d.group.clone() {
                self.redeliver_shared(*g, d.msg);
            }
            return;
        }
        if d.qos != QoS::AtMostOnce {
            self.enqueue(sk, d);
            return;
        }
        let s = &self.sessions[sk];
        let Some(ck) = s.conn else { return };
        let v = s.version;
        let custom =
            if v.is_v5() { custom_properties(d.msg.properties.as_deref(), d.msg.expires_at, &d.sub_ids) } else { None };
        let header = PublishHeader {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: d.retain,
            topic: &d.msg.topic,
            packet_id: None,
            properties: custom.as_ref().or(d.msg.properties.as_deref()),
        };
        let c = &mut self.conns[ck];
        if c.wbuf.len() >= self.shared.config.max_output_bytes {
            self.counters.publish_dropped += 1;
            return;
        }
        if write_publish(c, v, &header, &d.msg.payload) {
            self.counters.messages_sent += 1;
        }
        Worker::mark_dirty(&mut self.dirty, c, ck);
    }

    /// A message of a shared group whose member went away unacknowledged: to another member.
    pub(super) fn redeliver_shared(&mut self, key: GroupKey, msg: Arc<Message>) {
        let home = self.shared.home_of_group(&key.0, &key.1);
        if home != self.id {
            self.mail(home, Mail::SharedRedeliver { key: Box::new(key), msg });
            return;
        }
        if let Some(&g) = self.group_index.get(&key) {
            self.deliver_to_group(g, msg);
        }
    }

    /// A QoS 1/2 message for a session: sent now if its window and output buffer have room, else
    /// queued up to `max_queued_messages`, else dropped and counted.
    fn enqueue(&mut self, sk: usize, d: Delivery) {
        if self.sessions[sk].queue.is_empty() && self.can_send(sk) {
            self.send_qos(sk, d);
        } else if self.sessions[sk].queue.len() < self.shared.config.max_queued_messages {
            self.sessions[sk].queue.push_back(d);
        } else {
            self.counters.publish_dropped += 1;
        }
    }

    fn can_send(&self, sk: usize) -> bool {
        let s = &self.sessions[sk];
        let Some(ck) = s.conn else { return false };
        s.inflight.len() < s.send_window && self.conns[ck].wbuf.len() < self.shared.config.max_output_bytes
    }

    fn send_qos(&mut self, sk: usize, d: Delivery) {
        if d.msg.expired(Instant::now()) {
            return; // [MQTT-3.3.2-5]
        }
        let s = &mut self.sessions[sk];
        let Some(ck) = s.conn else { return };
        let id = s.next_packet_id();
        let v = s.version;
        let custom =
            if v.is_v5() { custom_properties(d.msg.properties.as_deref(), d.msg.expires_at, &d.sub_ids) } else { None };
        let header = PublishHeader {
            dup: false,
            qos: d.qos,
            retain: d.retain,
            topic: &d.msg.topic,
            packet_id: Some(id),
            properties: custom.as_ref().or(d.msg.properties.as_deref()),
        };
        let c = &mut self.conns[ck];
        if !write_publish(c, v, &header, &d.msg.payload) {
            return; // too large for this client: dropped, never inflight
        }
        self.counters.messages_sent += 1;
        let state = if d.qos == QoS::AtLeastOnce { OutState::AwaitAck } else { OutState::AwaitRec };
        s.inflight.push_back(Inflight { packet_id: id, state, delivery: d });
        Worker::mark_dirty(&mut self.dirty, c, ck);
    }

    /// Sends queued messages while the window and the output buffer have room.
    pub(super) fn pump(&mut self, sk: usize) {
        while self.sessions.contains(sk) && self.can_send(sk) {
            let Some(d) = self.sessions[sk].queue.pop_front() else { return };
            self.send_qos(sk, d);
        }
    }

    pub(super) fn store_retained(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            // [MQTT-3.3.1-10]/[MQTT-3.3.1-11]: an empty retained message clears the topic.
            self.retained.remove(&msg.topic);
        } else if self.retained.len() >= self.shared.config.max_retained_messages
            && !self.retained.contains_key(&msg.topic)
        {
            self.counters.publish_dropped += 1;
            if self.id == 0 {
                log::warn!("max_retained_messages reached: not retaining {}", msg.topic);
            }
        } else {
            let topic = MqttStr::from(msg.topic.as_str());
            self.retained.insert(topic, msg.clone());
        }
    }

    fn on_subscribe(&mut self, k: usize, sk: usize, sub: Subscribe) {
        // Whatever peers had routed before this SUBSCRIBE was sent (a retained message whose
        // PUBACK the subscriber may have seen) is applied first.
        if !self.catch_up(k, sk) {
            return;
        }
        let v = self.sessions[sk].version;
        let identifier = sub.properties.subscription_identifiers.first().copied().unwrap_or(0);
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut send_retained = Vec::new();
        let max_subs = self.shared.config.max_subscriptions_per_client;
        for (filter, opts) in &sub.filters {
            let subscription = Subscription { options: *opts, identifier };
            let s = &self.sessions[sk];
            if s.subscriptions.len() >= max_subs && !s.subscriptions.contains_key(filter) {
                log::info!("client {}: max_subscriptions_per_client reached, refusing {filter:?}", s.client_id);
                codes.push(failure(v, ReasonCode::QUOTA_EXCEEDED));
                continue;
            }
            let code = match topic::parse_shared(filter) {
                Ok(Some(sf)) => {
                    if opts.no_local {
                        // [MQTT-3.8.3-4]: a protocol error on a shared subscription.
                        self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, "no local on a shared subscription");
                        return;
                    }
                    let key = (MqttStr::from(sf.group), MqttStr::from(sf.filter));
                    self.sessions[sk].subscriptions.insert(MqttStr::from(filter.as_str()), subscription);
                    self.join_group(key, sk, subscription);
                    ReasonCode(opts.qos as u8)
                }
                Err(_) => failure(v, ReasonCode::TOPIC_FILTER_INVALID),
                Ok(None) => match topic::validate_filter(filter) {
                    Err(e) => {
                        log::debug!("rejecting filter {filter:?}: {e}");
                        failure(v, ReasonCode::TOPIC_FILTER_INVALID)
                    }
                    Ok(()) => {
                        let filter = MqttStr::from(filter.as_str());
                        let existed = self.subs.insert(&filter, sk as u32, subscription).ok().flatten().is_some();
                        self.sessions[sk].subscriptions.insert(filter.clone(), subscription);
                        if !existed && self.subs.count_at(&filter) == 1 {
                            self.announce_interest(&filter, true);
                        }
                        let wanted = match opts.retain_handling {
                            RetainHandling::OnSubscribe => true,
                            RetainHandling::OnNewSubscribe => !existed,
                            RetainHandling::Never => false,
                        };
                        if wanted {
                            send_retained.push((filter, subscription));
                        }
                        ReasonCode(opts.qos as u8)
                    }
                },
            };
            codes.push(code);
        }
        // [MQTT-3.8.4-1]: SUBACK first, then the retained messages [MQTT-3.3.1-6].
        let ack = SubAck { packet_id: sub.packet_id, codes, properties: Default::default() };
        self.send(k, &Packet::SubAck(Box::new(ack)));
        let now = Instant::now();
        for (filter, subscription) in send_retained {
            let hits: Vec<Arc<Message>> = self
                .retained
                .iter()
                .filter(|(t, m)| filter_matches(&filter, t) && !m.expired(now))
                .map(|(_, m)| m.clone())
                .collect();
            for msg in hits {
                let qos = msg.qos.min(subscription.options.qos);
                let ids = if subscription.identifier != 0 { vec![subscription.identifier] } else { vec![] };
                // [MQTT-3.3.1-8]: retained messages for a new subscription go out with retain set.
                self.deliver_one(sk, Delivery { msg, qos, retain: true, sub_ids: ids, group: None });
            }
        }
    }

    fn on_unsubscribe(&mut self, k: usize, sk: usize, unsub: Unsubscribe) {
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for filter in &unsub.filters {
            let removed = self.sessions[sk].subscriptions.remove(filter).is_some();
            if removed {
                self.drop_subscription(sk, filter);
            }
            codes.push(if removed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        let ack = UnsubAck { packet_id: unsub.packet_id, codes, properties: Default::default() };
        self.send(k, &Packet::UnsubAck(Box::new(ack)));
    }

    /// Takes one of a session's subscriptions out of the trie (or its shared group).
    pub(super) fn drop_subscription(&mut self, sk: usize, filter: &str) {
        if let Ok(Some(sf)) = topic::parse_shared(filter) {
            self.leave_group((MqttStr::from(sf.group), MqttStr::from(sf.filter)), sk);
        } else if self.subs.remove(filter, &(sk as u32)).is_some() && self.subs.count_at(filter) == 0 {
            self.announce_interest(filter, false);
        }
    }

    /// Tells the other workers this one has gained its first (or lost its last) subscriber of a
    /// filter. Used only to answer "no matching subscribers" (5.0 reason 0x10), a hint; delivery
    /// does not depend on it.
    fn announce_interest(&mut self, filter: &str, present: bool) {
        for peer in 0..self.shared.workers {
            if peer != self.id {
                let m = Mail::Interest { filter: MqttStr::from(filter), worker: self.id as u16, present };
                self.mail(peer, m);
            }
        }
    }

    fn join_group(&mut self, key: GroupKey, sk: usize, sub: Subscription) {
        let session_uid = self.sessions[sk].uid;
        let member = super::Member { worker: self.id as u16, session: sk as u32, session_uid, sub };
        let home = self.shared.home_of_group(&key.0, &key.1);
        if home == self.id {
            self.apply_join(key, member);
        } else {
            self.mail(home, Mail::SharedJoin { key: Box::new(key), member });
        }
    }

    fn leave_group(&mut self, key: GroupKey, sk: usize) {
        let home = self.shared.home_of_group(&key.0, &key.1);
        if home == self.id {
            self.apply_leave(&key, self.id as u16, sk as u32);
        } else {
            let m = Mail::SharedLeave { key: Box::new(key), worker: self.id as u16, session: sk as u32 };
            self.mail(home, m);
        }
    }

    pub(super) fn apply_join(&mut self, key: GroupKey, member: super::Member) {
        let g = match self.group_index.get(&key) {
            Some(&g) => g,
            None => {
                let g = self.groups.insert(super::SharedGroup {
                    name: key.0.clone(),
                    filter: key.1.clone(),
                    members: Vec::new(),
                    cursor: 0,
                });
                let _ = self.shared_trie.insert(&key.1, g as u32, ());
                self.group_index.insert(key, g);
                g
            }
        };
        let members = &mut self.groups[g].members;
        match members.iter_mut().find(|m| m.worker == member.worker && m.session == member.session) {
            Some(m) => m.sub = member.sub,
            None => members.push(member),
        }
    }

    pub(super) fn apply_leave(&mut self, key: &GroupKey, worker: u16, session: u32) {
        let Some(&g) = self.group_index.get(key) else { return };
        let group = &mut self.groups[g];
        group.members.retain(|m| !(m.worker == worker && m.session == session));
        if group.members.is_empty() {
            self.shared_trie.remove(&key.1, &(g as u32));
            self.group_index.remove(key);
            self.groups.remove(g);
        }
    }

    /// Publishes a session's will (its delay is over, or its session ended first).
    pub(super) fn publish_will(&mut self, sk: usize, w: &Will) {
        let msg = Arc::new(Message::from_will(w, Some((self.id as u16, sk as u32))));
        self.route(msg);
    }

    /// Publishes the `$SYS/broker/...` topics (retained), with mosquitto's names.
    pub(super) fn publish_sys(&mut self) {
        let sum = |f: fn(&crate::broker::WorkerStats) -> u64| -> u64 { self.shared.stats.iter().map(f).sum() };
        let received = sum(|s| s.messages_received.load(Ordering::Relaxed));
        let sent = sum(|s| s.messages_sent.load(Ordering::Relaxed));
        let connected = sum(|s| s.clients_connected.load(Ordering::Relaxed));
        let sessions = sum(|s| s.sessions.load(Ordering::Relaxed));
        let values: Vec<(&str, String)> = vec![
            ("$SYS/broker/version", format!("tern version {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{} seconds", self.shared.started.elapsed().as_secs())),
            ("$SYS/broker/clients/connected", connected.to_string()),
            ("$SYS/broker/clients/active", connected.to_string()),
            ("$SYS/broker/clients/disconnected", sessions.saturating_sub(connected).to_string()),
            ("$SYS/broker/clients/total", sessions.to_string()),
            ("$SYS/broker/clients/maximum", self.shared.clients_maximum.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/messages/received", received.to_string()),
            ("$SYS/broker/messages/sent", sent.to_string()),
            ("$SYS/broker/publish/messages/received", received.to_string()),
            ("$SYS/broker/publish/messages/sent", sent.to_string()),
            ("$SYS/broker/publish/messages/dropped", sum(|s| s.publish_dropped.load(Ordering::Relaxed)).to_string()),
            ("$SYS/broker/bytes/received", sum(|s| s.bytes_received.load(Ordering::Relaxed)).to_string()),
            ("$SYS/broker/bytes/sent", sum(|s| s.bytes_sent.load(Ordering::Relaxed)).to_string()),
            ("$SYS/broker/subscriptions/count", sum(|s| s.subscriptions.load(Ordering::Relaxed)).to_string()),
            ("$SYS/broker/retained messages/count", self.retained.len().to_string()),
            ("$SYS/broker/heap/current", crate::sys::rss_bytes().to_string()),
        ];
        let loads = self.sys_load.update(received, sent, connected);
        for (topic, value) in values.into_iter().map(|(t, v)| (t.to_string(), v)).chain(loads) {
            let msg = Message {
                topic: MqttStr::from(topic),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: None,
                origin: None,
                expires_at: None,
            };
            self.route(Arc::new(msg));
        }
    }
}
