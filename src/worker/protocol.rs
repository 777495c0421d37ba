//! What each packet means to the broker: CONNECT and sessions, PUBLISH routing and the QoS 1/2
//! flows, SUBSCRIBE with retained messages, and `$SYS`. Works on the worker's state; never
//! touches a socket (output goes into connection buffers) or a byte layout (the codec does that).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{CloseKind, Conn, Mail, Worker};
use crate::codec::{
    Ack, ConnAck, Connect, ConnectReturnCode, Disconnect, MqttStr, Packet, ProtocolVersion, PublishHeader, PublishRef,
    QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::session::{Inflight, Message, OutState, Session};
use crate::topic::{self, filter_matches};

/// A message being routed, borrowed from wherever it is: the read buffer or a shared `Message`.
struct View<'a> {
    topic: &'a str,
    payload: &'a [u8],
    qos: QoS,
    retain: bool,
    properties: Option<&'a crate::codec::Properties>,
    origin: Option<(u16, u32)>,
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
    }
}

/// Encodes a PUBLISH into a connection's output buffer, unless it exceeds the client's maximum
/// packet size [MQTT-3.1.2-24], in which case it is dropped. Returns whether it was queued.
fn write_publish(c: &mut Conn, v: ProtocolVersion, header: &PublishHeader, payload: &[u8]) -> bool {
    if header.size(v, payload.len()) > c.max_packet_out {
        return false;
    }
    header.encode(v, payload.len(), &mut c.wbuf);
    c.wbuf.extend_from_slice(payload);
    true
}

impl Worker {
    /// Handles CONNECT on the worker the connection landed on. Returns the CONNECT back when the
    /// client id lives on another worker, for the caller to hand the connection over.
    pub(super) fn on_connect(&mut self, k: usize, connect: Box<Connect>) -> Option<(Box<Connect>, bool)> {
        let c = &mut self.conns[k];
        if c.version.is_some() {
            log::info!("closing connection from {}: second CONNECT [MQTT-3.1.0-2]", c.peer);
            self.close(k, CloseKind::Abnormal);
            return None;
        }
        let v = connect.protocol;
        c.version = Some(v);
        let refuse = |w: &mut Worker, v3: ReasonCode, v5: ReasonCode, why: &str| {
            let c = &mut w.conns[k];
            log::info!("refusing CONNECT from {}: {why}", c.peer);
            let code = if v.is_v5() { v5 } else { v3 };
            Packet::ConnAck(Box::new(ConnAck { code, ..Default::default() })).encode(v, &mut c.wbuf);
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

    /// Binds a connection to its session on the client id's home worker and sends CONNACK.
    pub(super) fn attach(&mut self, k: usize, connect: Box<Connect>, assigned_id: bool) {
        let v = connect.protocol;
        // Keep nothing that points into a read buffer: copy what the session keeps.
        let client_id = MqttStr::from(connect.client_id.as_str());
        // [MQTT-3.1.4-2]: an existing connection with this client id is closed.
        if let Some(&sk) = self.by_client.get(&client_id) {
            if let Some(old) = self.sessions[sk].conn {
                log::info!("client {client_id} taken over by {}", self.conns[k].peer);
                if self.conns[old].version == Some(ProtocolVersion::V5) {
                    self.send(old, &Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER))));
                }
                self.close(old, CloseKind::TakenOver);
            }
        }
        let ends_with_connection =
            if v.is_v5() { connect.properties.session_expiry_interval.unwrap_or(0) == 0 } else { connect.clean_start };
        let existing = self.by_client.get(&client_id).copied();
        let (sk, present) = match existing {
            Some(sk) if !connect.clean_start => (sk, true),
            Some(sk) => {
                self.end_session(sk);
                (self.new_session(client_id.clone(), v), false)
            }
            None => (self.new_session(client_id.clone(), v), false),
        };
        let s = &mut self.sessions[sk];
        s.conn = Some(k);
        s.version = v;
        s.clean = ends_with_connection;
        s.disconnected_at = None;
        s.will = connect.will.as_ref().map(|w| crate::codec::Will {
            topic: MqttStr::from(w.topic.as_str()),
            payload: Bytes::copy_from_slice(&w.payload),
            qos: w.qos,
            retain: w.retain,
            properties: w.properties.clone(),
        });
        let c = &mut self.conns[k];
        c.version = Some(v);
        c.session = Some(sk);
        c.keep_alive = connect.keep_alive;
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
            p.topic_alias_maximum = Some(0);
            p.retain_available = Some(1);
            p.wildcard_subscription_available = Some(1);
            p.subscription_identifier_available = Some(1);
            p.shared_subscription_available = Some(0);
        }
        self.send(k, &Packet::ConnAck(Box::new(ack)));
        let max_clients = self.shared.connections.load(Ordering::Relaxed) as u64;
        self.shared.clients_maximum.fetch_max(max_clients, Ordering::Relaxed);
        if present {
            self.resend_inflight(sk);
            self.pump(sk);
        }
    }

    fn new_session(&mut self, client_id: MqttStr, v: ProtocolVersion) -> usize {
        let sk = self.sessions.insert(Session::new(client_id.clone(), v, true));
        self.by_client.insert(client_id, sk);
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
                    let header = PublishHeader {
                        dup: true,
                        qos: i.qos,
                        retain: i.retain,
                        topic: &i.msg.topic,
                        packet_id: Some(i.packet_id),
                        properties: i.msg.properties.as_deref(),
                    };
                    write_publish(c, v, &header, &i.msg.payload);
                }
                OutState::AwaitComp => Packet::PubRel(Ack::new(i.packet_id)).encode(v, &mut c.wbuf),
            }
        }
        Worker::mark_dirty(&mut self.dirty, c, ck);
    }

    /// Every packet after CONNECT except PUBLISH (which takes the borrowed path).
    pub(super) fn on_packet(&mut self, k: usize, packet: Packet) {
        let Some(sk) = self.conns[k].session else {
            // The codec only lets CONNECT through before a session exists.
            self.close(k, CloseKind::NoSession);
            return;
        };
        match packet {
            Packet::PubAck(a) => {
                if let Some(i) = self.sessions[sk].inflight_position(a.packet_id) {
                    if self.sessions[sk].inflight[i].state == OutState::AwaitAck {
                        self.sessions[sk].inflight.remove(i);
                        self.pump(sk);
                    }
                }
            }
            Packet::PubRec(a) => {
                let s = &mut self.sessions[sk];
                if let Some(i) = s.inflight_position(a.packet_id) {
                    if a.reason.is_error() {
                        // 5.0: the receiver refused it; the flow ends here [MQTT-4.3.3-4].
                        s.inflight.remove(i);
                        self.pump(sk);
                        return;
                    }
                    s.inflight[i].state = OutState::AwaitComp;
                }
                // A PUBREC for an unknown id still gets a PUBREL so the client can finish [MQTT-4.3.3].
                let mut rel = Ack::new(a.packet_id);
                if self.sessions[sk].inflight_position(a.packet_id).is_none()
                    && self.conns[k].version == Some(ProtocolVersion::V5)
                {
                    rel.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(k, &Packet::PubRel(rel));
            }
            Packet::PubComp(a) => {
                let s = &mut self.sessions[sk];
                if let Some(i) = s.inflight_position(a.packet_id) {
                    if s.inflight[i].state == OutState::AwaitComp {
                        s.inflight.remove(i);
                        self.pump(sk);
                    }
                }
            }
            Packet::PubRel(a) => {
                // [MQTT-4.3.3-2]: release the id; the message was delivered on PUBLISH.
                let known = self.sessions[sk].incoming_qos2.remove(&a.packet_id.get());
                let mut comp = Ack::new(a.packet_id);
                if !known && self.conns[k].version == Some(ProtocolVersion::V5) {
                    comp.reason = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(k, &Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => self.on_subscribe(k, sk, *s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(k, sk, *u),
            Packet::PingReq => self.send(k, &Packet::PingResp),
            Packet::Disconnect(d) => {
                // [MQTT-3.14.4-3]: a normal DISCONNECT discards the will; 5.0 reason 0x04 keeps it.
                if d.reason == ReasonCode::DISCONNECT_WITH_WILL {
                    self.close(k, CloseKind::Abnormal);
                } else {
                    self.close(k, CloseKind::Normal);
                }
            }
            Packet::Auth(_) => {
                log::info!("closing connection from {}: AUTH without an authentication method", self.conns[k].peer);
                self.send(k, &Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::PROTOCOL_ERROR))));
                self.close(k, CloseKind::Abnormal);
            }
            other => {
                log::info!(
                    "closing connection from {}: {} is not sent by clients [MQTT-4.8.0-1]",
                    self.conns[k].peer,
                    other.name()
                );
                if self.conns[k].version == Some(ProtocolVersion::V5) {
                    self.send(k, &Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::PROTOCOL_ERROR))));
                }
                self.close(k, CloseKind::Abnormal);
            }
        }
    }

    /// A PUBLISH from a client, parsed in place.
    pub(super) fn on_publish(&mut self, k: usize, p: PublishRef<'_>) {
        let Some(sk) = self.conns[k].session else { return };
        let v = self.sessions[sk].version;
        if let Some(props) = p.properties.as_deref() {
            // We advertise a topic alias maximum of 0, and clients never send subscription ids.
            let why = if props.topic_alias.is_some() {
                Some((ReasonCode::TOPIC_ALIAS_INVALID, "topic alias above the maximum of 0 [MQTT-3.3.2-9]"))
            } else if !props.subscription_identifiers.is_empty() {
                Some((ReasonCode::PROTOCOL_ERROR, "subscription identifier from a client [MQTT-3.3.4-6]"))
            } else {
                None
            };
            if let Some((code, why)) = why {
                log::info!("closing connection from {}: {why}", self.conns[k].peer);
                self.send(k, &Packet::Disconnect(Box::new(Disconnect::new(code))));
                self.close(k, CloseKind::Abnormal);
                return;
            }
        }
        self.counters.messages_received += 1;
        if p.topic.starts_with("$SYS") {
            // Clients do not publish into the broker's own statistics; acknowledge and drop.
            self.ack_publish(k, &p, v);
            return;
        }
        let fresh = match (p.qos, p.packet_id) {
            (QoS::ExactlyOnce, Some(id)) => self.sessions[sk].incoming_qos2.insert(id.get()),
            _ => true,
        };
        if fresh {
            let m = View {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.properties.as_deref(),
                origin: Some((self.id as u16, sk as u32)),
            };
            self.route_view(&m);
        }
        self.ack_publish(k, &p, v);
    }

    fn ack_publish(&mut self, k: usize, p: &PublishRef<'_>, _v: ProtocolVersion) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(k, &Packet::PubAck(Ack::new(id))),
            (QoS::ExactlyOnce, Some(id)) => self.send(k, &Packet::PubRec(Ack::new(id))),
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
    /// something must keep it (a peer worker, the retained store, a QoS 1/2 queue).
    fn route_view(&mut self, m: &View<'_>) {
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
        self.deliver(m, &mut shared);
    }

    pub(super) fn deliver_local(&mut self, msg: &Arc<Message>) {
        let mut shared = Some(msg.clone());
        self.deliver(&view(msg), &mut shared);
    }

    /// [MQTT-3.3.5-1]: to every matching subscription on this worker, once per session at the
    /// highest granted QoS, at min(published, granted) QoS.
    fn deliver(&mut self, m: &View<'_>, shared: &mut Option<Arc<Message>>) {
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.subs.for_each_match(m.topic, |&sk, &o| matches.push((sk, o)));
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|&(sk, _)| sk);
            matches.dedup_by(|later, kept| {
                if later.0 == kept.0 {
                    if later.1.qos > kept.1.qos {
                        kept.1.qos = later.1.qos;
                    }
                    kept.1.retain_as_published |= later.1.retain_as_published;
                    kept.1.no_local &= later.1.no_local;
                    true
                } else {
                    false
                }
            });
        }
        // A QoS 0 packet is the same bytes for every subscriber of one protocol family: encode it
        // once per family and copy it, rather than encode per subscriber.
        let mut enc = std::mem::take(&mut self.encoded);
        enc.clear();
        let mut cached: [Option<(usize, usize)>; 2] = [None, None];
        let max_out = self.shared.config.max_output_bytes;
        for &(sk, o) in &matches {
            let sk = sk as usize;
            if o.no_local && m.origin == Some((self.id as u16, sk as u32)) {
                continue; // [MQTT-3.8.3-3]
            }
            let qos = m.qos.min(o.qos);
            // [MQTT-3.3.1-9]: forwarded with retain cleared, unless 5.0 retain-as-published.
            let retain = m.retain && o.retain_as_published;
            if qos != QoS::AtMostOnce {
                let msg = shared.get_or_insert_with(|| m.to_message()).clone();
                self.enqueue(sk, msg, qos, retain);
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
            if retain {
                let header = PublishHeader {
                    dup: false,
                    qos,
                    retain,
                    topic: m.topic,
                    packet_id: None,
                    properties: m.properties,
                };
                if write_publish(c, s.version, &header, m.payload) {
                    self.counters.messages_sent += 1;
                }
            } else {
                let slot = &mut cached[v5 as usize];
                let (start, end) = *slot.get_or_insert_with(|| {
                    let start = enc.len();
                    let header = PublishHeader {
                        dup: false,
                        qos,
                        retain,
                        topic: m.topic,
                        packet_id: None,
                        properties: m.properties,
                    };
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
    }

    /// A QoS 1/2 message for a session: sent now if its window and output buffer have room, else
    /// queued up to `max_queued_messages`, else dropped and counted.
    fn enqueue(&mut self, sk: usize, msg: Arc<Message>, qos: QoS, retain: bool) {
        if self.sessions[sk].queue.is_empty() && self.can_send(sk) {
            self.send_qos(sk, msg, qos, retain);
        } else if self.sessions[sk].queue.len() < self.shared.config.max_queued_messages {
            self.sessions[sk].queue.push_back((msg, qos, retain));
        } else {
            self.counters.publish_dropped += 1;
        }
    }

    fn can_send(&self, sk: usize) -> bool {
        let s = &self.sessions[sk];
        let Some(ck) = s.conn else { return false };
        s.inflight.len() < self.shared.config.max_inflight_messages as usize
            && self.conns[ck].wbuf.len() < self.shared.config.max_output_bytes
    }

    fn send_qos(&mut self, sk: usize, msg: Arc<Message>, qos: QoS, retain: bool) {
        let s = &mut self.sessions[sk];
        let Some(ck) = s.conn else { return };
        let id = s.next_packet_id();
        let header = PublishHeader {
            dup: false,
            qos,
            retain,
            topic: &msg.topic,
            packet_id: Some(id),
            properties: msg.properties.as_deref(),
        };
        let c = &mut self.conns[ck];
        if !write_publish(c, s.version, &header, &msg.payload) {
            return; // too large for this client: dropped, never inflight
        }
        self.counters.messages_sent += 1;
        let state = if qos == QoS::AtLeastOnce { OutState::AwaitAck } else { OutState::AwaitRec };
        s.inflight.push_back(Inflight { packet_id: id, qos, state, msg, retain });
        Worker::mark_dirty(&mut self.dirty, c, ck);
    }

    /// Sends queued messages while the window and the output buffer have room.
    pub(super) fn pump(&mut self, sk: usize) {
        while self.sessions.contains(sk) && self.can_send(sk) {
            let Some((msg, qos, retain)) = self.sessions[sk].queue.pop_front() else { return };
            self.send_qos(sk, msg, qos, retain);
        }
    }

    pub(super) fn store_retained(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            // [MQTT-3.3.1-10]/[MQTT-3.3.1-11]: an empty retained message clears the topic.
            self.retained.remove(&msg.topic);
        } else {
            let topic = MqttStr::from(msg.topic.as_str());
            self.retained.insert(topic, msg.clone());
        }
    }

    fn on_subscribe(&mut self, k: usize, sk: usize, sub: Subscribe) {
        let v = self.sessions[sk].version;
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut send_retained = Vec::new();
        for (filter, opts) in &sub.filters {
            let code = match topic::parse_shared(filter) {
                Ok(Some(_)) => {
                    if v.is_v5() {
                        ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                    } else {
                        ReasonCode::SUBACK_FAILURE
                    }
                }
                Err(_) => {
                    if v.is_v5() {
                        ReasonCode::TOPIC_FILTER_INVALID
                    } else {
                        ReasonCode::SUBACK_FAILURE
                    }
                }
                Ok(None) => match topic::validate_filter(filter) {
                    Err(e) => {
                        log::debug!("rejecting filter {filter:?}: {e}");
                        if v.is_v5() {
                            ReasonCode::TOPIC_FILTER_INVALID
                        } else {
                            ReasonCode::SUBACK_FAILURE
                        }
                    }
                    Ok(()) => {
                        let filter = MqttStr::from(filter.as_str());
                        let existed = self.subs.insert(&filter, sk as u32, *opts).ok().flatten().is_some();
                        self.sessions[sk].subscriptions.insert(filter.clone(), *opts);
                        let wanted = match opts.retain_handling {
                            RetainHandling::OnSubscribe => true,
                            RetainHandling::OnNewSubscribe => !existed,
                            RetainHandling::Never => false,
                        };
                        if wanted {
                            send_retained.push((filter, *opts));
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
        for (filter, opts) in send_retained {
            let hits: Vec<Arc<Message>> =
                self.retained.iter().filter(|(t, _)| filter_matches(&filter, t)).map(|(_, m)| m.clone()).collect();
            for msg in hits {
                let qos = msg.qos.min(opts.qos);
                if qos == QoS::AtMostOnce {
                    let Some(ck) = self.sessions[sk].conn else { return };
                    let header = PublishHeader {
                        dup: false,
                        qos,
                        retain: true,
                        topic: &msg.topic,
                        packet_id: None,
                        properties: msg.properties.as_deref(),
                    };
                    let c = &mut self.conns[ck];
                    if write_publish(c, v, &header, &msg.payload) {
                        self.counters.messages_sent += 1;
                    }
                    Worker::mark_dirty(&mut self.dirty, c, ck);
                } else {
                    self.enqueue(sk, msg, qos, true);
                }
            }
        }
    }

    fn on_unsubscribe(&mut self, k: usize, sk: usize, unsub: Unsubscribe) {
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for filter in &unsub.filters {
            let removed = self.sessions[sk].subscriptions.remove(filter).is_some();
            if removed {
                self.subs.remove(filter, &(sk as u32));
            }
            codes.push(if removed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        let ack = UnsubAck { packet_id: unsub.packet_id, codes, properties: Default::default() };
        self.send(k, &Packet::UnsubAck(Box::new(ack)));
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
            };
            self.route(Arc::new(msg));
        }
    }
}
