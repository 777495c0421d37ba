//! A connection's life around its session: CONNECT (refusal, generated client ids, the hand-over
//! to the client id's home worker), attaching to a new or resumed session with CONNACK, takeover,
//! closing (the will, the session's end or its expiry) and the session timers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use mio::{Interest, Token};

use super::conn::{CloseKind, Conn, ConnKey, ConnOutlet, OutAliases, OUT_ALIASES_MAX};
use super::mailbox::{Handover, Mail};
use super::timers::Timer;
use super::{Deferred, Worker, TOPIC_ALIAS_MAXIMUM};
use crate::codec::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, MqttStr, Packet, ProtocolVersion, ReasonCode, Will,
};
use crate::session::{Message, Session, SessionKey, NEVER};

impl Worker {
    /// Handles CONNECT on the worker the connection landed on. Returns the CONNECT back when the
    /// client id lives on another worker, for the caller to hand the connection over.
    pub(super) fn on_connect(&mut self, k: ConnKey, connect: Box<Connect>) -> Option<(Box<Connect>, bool)> {
        let c = &mut self.conns[k];
        if c.version.is_some() {
            self.disconnect_with(k, ReasonCode::PROTOCOL_ERROR, "second CONNECT [MQTT-3.1.0-2]");
            return None;
        }
        let v = connect.protocol;
        c.version = Some(v);
        c.flags.problem_info = connect.properties.request_problem_information != Some(0);
        if c.flags.over_limit {
            self.refuse(k, ConnectReturnCode::SERVER_UNAVAILABLE, ReasonCode::SERVER_BUSY, "max_connections reached");
            return None;
        }
        if self.budget.over_memory {
            let _ = self.count(super::limits::Limit::MemoryConnections);
            self.refuse(k, ConnectReturnCode::SERVER_UNAVAILABLE, ReasonCode::SERVER_BUSY, "memory_limit reached");
            return None;
        }
        if connect.properties.authentication_method.is_some() {
            self.start_enhanced_auth(k, connect);
            return None;
        }
        let mut connect = connect;
        if c.transport.wants_identity() {
            // use_identity_as_username: the certificate names the client, not the CONNECT.
            match c.transport.identity() {
                Some(cn) => connect.username = Some(MqttStr::from(cn)),
                None => {
                    let why = "use_identity_as_username: no client certificate with a common name";
                    self.refuse(k, ConnectReturnCode::NOT_AUTHORIZED, ReasonCode::NOT_AUTHORIZED, why);
                    return None;
                }
            }
        }
        match self.authenticate(k, connect) {
            Some(connect) => self.admit(k, connect),
            None => None,
        }
    }

    /// An authenticated CONNECT: a client id for an empty one, then on to the client id's home
    /// worker (returned for the caller to hand the connection over) or attached here.
    pub(super) fn admit(&mut self, k: ConnKey, mut connect: Box<Connect>) -> Option<(Box<Connect>, bool)> {
        let v = connect.protocol;
        let mut assigned = false;
        if connect.client_id.is_empty() {
            // [MQTT-3.1.3-7]/[MQTT-3.1.3-8]: 3.1.1 allows it only with clean session; 3.1 not at all.
            let allowed = self.shared.config.allow_zero_length_clientid
                && (v.is_v5() || (v == ProtocolVersion::V311 && connect.clean_start));
            if !allowed {
                let why = "empty client id without clean session";
                self.refuse(k, ConnectReturnCode::IDENTIFIER_REJECTED, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, why);
                return None;
            }
            self.counters.generated_ids += 1;
            let id = format!("tern-{}-{}-{:x}", self.id, self.counters.generated_ids, self.shared.hasher.hash_one(k.0));
            connect.client_id = MqttStr::from(id);
            assigned = true;
        }
        if connect.client_id.starts_with("$bridge/") {
            let why = "client ids starting with $bridge/ are the broker's own bridges";
            self.refuse(k, ConnectReturnCode::IDENTIFIER_REJECTED, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, why);
            return None;
        }
        if self.shared.home_of(&connect.client_id) != self.id {
            return Some((connect, assigned));
        }
        self.defer_attach(k, connect, assigned);
        None
    }

    /// Attaches after this turn's mail, so a resumed session first gets what peers routed to it
    /// before this CONNECT arrived; the connection reads nothing more until then.
    fn defer_attach(&mut self, k: ConnKey, connect: Box<Connect>, assigned_id: bool) {
        let c = &mut self.conns[k];
        c.flags.blocked = true;
        let d = Deferred::Connect { conn: k, conn_uid: c.uid, connect, assigned_id };
        self.turn.deferred.push(d);
    }

    /// Answers CONNECT with a refusal and closes once it is written.
    pub(super) fn refuse(&mut self, k: ConnKey, v3: ReasonCode, v5: ReasonCode, why: &str) {
        let c = &mut self.conns[k];
        let v = c.version.unwrap_or(ProtocolVersion::V311);
        log::info!("refusing CONNECT from {}: {why}", c.peer());
        let mut ack = ConnAck { code: if v.is_v5() { v5 } else { v3 }, ..Default::default() };
        if v.is_v5() && c.flags.problem_info {
            ack.properties.reason_string = Some(MqttStr::from(why));
        }
        c.send(&Packet::ConnAck(Box::new(ack)));
        c.flags.close_after_flush = true;
        c.flags.linger = true;
        self.mark_dirty(k);
    }

    /// Binds a connection to its session on the client id's home worker and sends CONNACK.
    pub(super) fn attach(&mut self, k: ConnKey, connect: Box<Connect>, assigned_id: bool) {
        let v = connect.protocol;
        self.conns[k].version = Some(v);
        // Keep nothing that points into a read buffer: copy what the session keeps.
        let client_id = MqttStr::from(connect.client_id.as_str());
        // `max_keepalive`: a 5.0 client is told the server's [MQTT-3.2.2-21]; an older one, which
        // cannot be told, is refused (as mosquitto does).
        let max_keepalive = self.shared.config.max_keepalive;
        let limited = max_keepalive < u16::MAX;
        let server_keep_alive =
            (limited && v.is_v5() && (connect.keep_alive == 0 || connect.keep_alive > max_keepalive))
                .then_some(max_keepalive);
        // 3.1.1 keep alive 0 (none) is accepted, as mosquitto does: only a longer one is refused.
        if limited && !v.is_v5() && connect.keep_alive > max_keepalive {
            let why = format!("keep alive {} s is over max_keepalive ({max_keepalive} s)", connect.keep_alive);
            log::info!("client {client_id}: {why}");
            self.refuse(k, ConnectReturnCode::IDENTIFIER_REJECTED, ReasonCode::UNSPECIFIED_ERROR, &why);
            return;
        }
        // [MQTT-3.1.4-2]: an existing connection with this client id is closed.
        if let Some(sk) = self.sessions.find(&client_id) {
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
        let existing = self.sessions.find(&client_id);
        let room = self.sessions.len() < self.shared.config.max_sessions.div_ceil(self.shared.workers);
        if existing.is_none() && !room {
            log::warn!("max_sessions reached: refusing client {client_id}");
            self.refuse(k, ConnectReturnCode::SERVER_UNAVAILABLE, ReasonCode::QUOTA_EXCEEDED, "max_sessions reached");
            return;
        }
        let (sk, present) = match existing {
            Some(sk) if !connect.clean_start => (sk, true),
            Some(sk) => {
                // The old session ends now: a will still waiting on its delay goes out [MQTT-3.1.3-9].
                self.end_session(sk);
                (self.sessions.insert(Session::new(MqttStr::from(client_id.as_str()), v)), false)
            }
            None => (self.sessions.insert(Session::new(MqttStr::from(client_id.as_str()), v)), false),
        };
        let max_inflight = self.shared.config.max_inflight_messages as usize;
        self.sessions.set_conn(sk, Some(k));
        self.grant_access(sk, connect.username.as_deref());
        let s = &mut self.sessions[sk];
        s.version = v;
        s.expiry_interval = expiry;
        s.bridge_peer = connect.bridge;
        if connect.bridge {
            log::info!("client {client_id} is a bridge (protocol level with 0x80)");
        }
        s.stalled = false;
        s.last_progress = Some(self.clock.now);
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
        c.session = Some(sk);
        c.keep_alive = server_keep_alive.unwrap_or(connect.keep_alive);
        c.aliases = None;
        // Aliases are per connection [MQTT-3.3.2-7]: a new connection starts with none.
        c.out_aliases = match connect.properties.topic_alias_maximum {
            Some(max) if v.is_v5() && max > 0 => {
                Some(Box::new(OutAliases { max: max.min(OUT_ALIASES_MAX), map: Default::default() }))
            }
            _ => None,
        };
        if let Some(max) = connect.properties.maximum_packet_size {
            c.max_packet_out = max as usize;
        }
        // The connection's timer (armed for the connect timeout) re-arms itself for the keep
        // alive when it fires; a second entry is needed only if the keep alive runs out first.
        let connect_left = (self.shared.config.connect_timeout().as_millis() as u32)
            .saturating_sub(self.clock.ms32().wrapping_sub(c.created));
        if c.keep_alive > 0 && (c.keep_alive as u32) * 1500 < connect_left {
            let uid = c.uid;
            self.timers.arm(self.clock.ms + c.keep_alive as u64 * 1500, Timer::conn(k, uid));
        }
        if connect.properties.authentication_method.is_some() {
            self.scram_attached(k, connect.username.as_deref().unwrap_or_default());
        }
        let mut ack = ConnAck { session_present: present, code: ReasonCode::SUCCESS, ..Default::default() };
        if v.is_v5() {
            let p = &mut ack.properties;
            // Enhanced authentication: the method and its last message (SCRAM's server-final).
            p.authentication_method = connect.properties.authentication_method.clone();
            p.authentication_data = connect.properties.authentication_data.clone();
            if assigned_id {
                p.assigned_client_identifier = Some(client_id.clone());
            }
            p.receive_maximum = Some(self.shared.config.max_inflight_messages);
            p.server_keep_alive = server_keep_alive;
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
            let mut out = ConnOutlet::new(&mut self.conns[k], v, usize::MAX, self.clock.now, &mut self.latency);
            self.sessions[sk].resend(&mut out);
            self.pump(sk);
        }
        self.persist_attach(sk);
    }

    /// Sends a 5.0 client a DISCONNECT with `code` (and the reason, if it wants problem
    /// information), logs why, then closes the connection; its will is published.
    pub(super) fn disconnect_with(&mut self, k: ConnKey, code: ReasonCode, why: &str) {
        let c = &mut self.conns[k];
        if c.flags.closed {
            return;
        }
        if code != ReasonCode::SESSION_TAKEN_OVER {
            log::info!("closing connection from {}: {why}", c.peer());
        }
        if c.version == Some(ProtocolVersion::V5) {
            let mut d = Disconnect::new(code);
            if c.flags.problem_info {
                d.properties.reason_string = Some(MqttStr::from(why));
            }
            c.send(&Packet::Disconnect(Box::new(d)));
        }
        // A DISCONNECT, or the CONNACK of an unsupported protocol level, waits to be read.
        c.flags.linger = !c.wbuf.is_empty();
        let kind = if code == ReasonCode::SESSION_TAKEN_OVER { CloseKind::TakenOver } else { CloseKind::Abnormal };
        self.close(k, kind);
    }

    /// Closes a connection: what it had queued is written (best effort), its session is detached
    /// now (publishing the will where `kind` calls for it, ending a session that does not outlive
    /// its connection); its slab slot is freed at the end of the turn.
    pub(super) fn close(&mut self, k: ConnKey, kind: CloseKind) {
        let Some(c) = self.conns.get_mut(k) else { return };
        if c.flags.closed {
            return;
        }
        c.flags.closed = true;
        self.scram_forget(k);
        let c = &mut self.conns[k];
        // Its input is never read again: free it now, not at the end of the turn (a turn can
        // close many connections, each holding up to `max_packet_size`).
        c.rbuf = BytesMut::new();
        if c.partial > 0 {
            self.shared.partial_bytes.fetch_sub(std::mem::take(&mut c.partial) as usize, Ordering::Relaxed);
        }
        self.turn.closed.push(k);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        let bridge = c.bridge;
        if !c.wbuf.is_empty() {
            let written = c.transport.write(&c.wbuf).unwrap_or(0);
            if c.flags.linger {
                // The rest is written while the socket lingers.
                c.wbuf.advance(written);
            } else {
                c.wbuf = BytesMut::new();
            }
        }
        let _ = c.transport.flush_pending();
        log::debug!("worker {}: connection {} from {} closed ({kind:?})", self.id, k.0, c.peer());
        if let Some(sk) = c.session.take() {
            self.detach(sk, k, kind);
        }
        if let Some(b) = bridge {
            self.bridge_closed(b);
        }
    }

    fn detach(&mut self, sk: SessionKey, k: ConnKey, kind: CloseKind) {
        if self.sessions.get(sk).is_none_or(|s| s.conn != Some(k)) {
            return;
        }
        self.sessions.set_conn(sk, None);
        // An offline session cannot push back: its publishers go on, its queue has its bound.
        self.release(sk);
        self.settle_backlog(sk);
        let now = self.clock.now;
        let s = &mut self.sessions[sk];
        s.disconnected_at = Some(now);
        let will = s.will.take();
        let expiry = s.expiry_interval;
        if kind != CloseKind::Normal {
            if let Some(w) = will {
                // 5.0 will delay: held until the delay or the session ends, whichever is first,
                // and dropped if the session is resumed before [MQTT-3.1.3-9].
                let delay = w.properties.will_delay_interval.unwrap_or(0).min(expiry);
                if delay > 0 {
                    s.pending_will = Some(Box::new((now + Duration::from_secs(delay as u64), *w)));
                } else {
                    self.publish_will(sk, &w);
                }
            }
        }
        if expiry == 0 {
            self.end_session(sk);
        } else {
            self.touch_meta(sk);
            self.arm_session_timer(sk);
        }
    }

    /// Arms a timer for the session's next deadline (will delay, expiry) unless one fires first.
    pub(super) fn arm_session_timer(&mut self, sk: SessionKey) {
        let persistent = self.shared.config.persistent_expiry_secs();
        let s = &mut self.sessions[sk];
        let will = s.pending_will.as_ref().map(|p| p.0);
        let expiry = if s.conn.is_none() { s.expires_at(persistent) } else { None };
        let Some(at) = [will, expiry].into_iter().flatten().min() else { return };
        if s.timer_at.is_some_and(|t| t <= at) {
            return;
        }
        s.timer_at = Some(at);
        let uid = s.uid;
        // Rounded up: a timer that fired a moment early would re-arm for the same turn, forever.
        let ms = self.clock.ms + at.saturating_duration_since(self.clock.now).as_millis() as u64 + 1;
        self.timers.arm(ms, Timer::session(sk, uid));
    }

    /// A session's timer: a delayed will that is due, or an expiry interval that ran out.
    pub(super) fn session_timer(&mut self, sk: SessionKey, uid: u64) {
        if !self.sessions.is(sk, uid) {
            return;
        }
        let now = self.clock.now;
        let s = &mut self.sessions[sk];
        s.timer_at = None;
        if s.pending_will.as_ref().is_some_and(|p| p.0 <= now) {
            if let Some(pending) = s.pending_will.take() {
                self.publish_will(sk, &pending.1);
            }
        }
        let persistent = self.shared.config.persistent_expiry_secs();
        let s = &self.sessions[sk];
        if s.conn.is_none() && s.expires_at(persistent).is_some_and(|at| at <= now) {
            if s.expiry_interval == NEVER {
                log::info!("client {}: persistent session expired (persistent_client_expiration)", s.client_id);
                let _ = self.count(super::limits::Limit::SessionsExpired);
            }
            self.end_session(sk);
        } else {
            self.arm_session_timer(sk);
        }
    }

    /// Ends a session: its subscriptions go, its pending will goes out, and QoS 1/2 messages it
    /// received through a shared subscription and never acknowledged go to another member.
    pub(super) fn end_session(&mut self, sk: SessionKey) {
        if let Some(pending) = self.sessions[sk].pending_will.take() {
            self.publish_will(sk, &pending.1);
        }
        if let Some(k) = self.sessions[sk].conn {
            // Only a clean start over a session whose connection is already closed gets here.
            self.conns[k].session = None;
        }
        self.release(sk);
        self.persist_end(sk);
        let s = self.sessions.remove(sk);
        self.shared.subscription_bytes.fetch_sub(s.subscription_bytes, Ordering::Relaxed);
        for filter in s.subscriptions.keys() {
            self.drop_subscription(sk, filter);
        }
        for d in s.into_unacknowledged() {
            if let Some(g) = d.group {
                self.redeliver_shared(*g, d.msg);
            }
        }
    }

    /// Publishes a session's will (its delay is over, or its session ended first).
    pub(super) fn publish_will(&mut self, sk: SessionKey, w: &Will) {
        let msg = Arc::new(Message::from_will(w, Some((self.id as u16, sk.0 as u32))));
        self.route(msg);
    }

    /// Moves a connection to the worker that is home to its client id.
    pub(super) fn hand_over(&mut self, k: ConnKey, (connect, assigned_id): (Box<Connect>, bool), rest: BytesMut) {
        let home = self.shared.home_of(&connect.client_id);
        let Some(c) = self.conns.remove(k) else { return };
        let mut transport = c.transport;
        let _ = self.registry.deregister(transport.source());
        let created = self.clock.now - Duration::from_millis(self.clock.ms32().wrapping_sub(c.created) as u64);
        let h = Handover { transport, rest, connect, assigned_id, created };
        self.mailbox.send(home, Mail::Handover(Box::new(h)));
    }

    pub(super) fn take_handover(&mut self, h: Handover) {
        let Handover { mut transport, rest, connect, assigned_id, created } = h;
        let k = self.conns.next_key();
        // Readable and writable: TLS or WebSocket output may still wait for the socket.
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.registry.register(transport.source(), Token(k.0), interest) {
            log::warn!("cannot register handed-over connection from {}: {e}", transport.peer());
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let now = self.clock.ms32();
        let created = now.wrapping_sub(created.elapsed().as_millis().min(u32::MAX as u128) as u32);
        let (k, uid) = self.conns.insert(|uid| Conn::new(uid, transport, now, created, false));
        self.conns[k].flags.writable = true;
        let left = (self.shared.config.connect_timeout().as_millis() as u32).saturating_sub(now.wrapping_sub(created));
        self.timers.arm(self.clock.ms + left as u64, Timer::conn(k, uid));
        self.conns[k].version = Some(connect.protocol);
        // The bytes read after CONNECT wait with the connection; they, and any that arrived since
        // the socket left its first worker (edge-triggered readiness would not report them
        // again), are read once it is attached. Copied: `rest` shares the first worker's read
        // buffer, and even an empty one would keep that 64 KiB allocation alive for as long as
        // the connection lives.
        if !rest.is_empty() {
            self.conns[k].rbuf = BytesMut::from(&rest[..]);
        }
        self.defer_attach(k, connect, assigned_id);
    }
}
