//! The QoS 1/2 engine of one session (spec 4.3, 4.4): the outgoing window, the queue behind it,
//! packet ids, the PUBACK / PUBREC / PUBREL / PUBCOMP state machines both ways, and resending on
//! resume. Sans-io: deliveries, acknowledgements and the clock come in; what must go on the wire
//! goes out through an `Outlet`, which the worker implements over a connection's output buffer.

use std::time::Instant;

use super::{Delivery, Inflight, OutState, Session};
use crate::codec::PacketId;

/// Where a session's outgoing packets go: a connection's output buffer, or a test's list.
pub trait Outlet {
    /// Whether the connection can take more output now (its buffer is under its bound).
    fn has_room(&self) -> bool;
    /// Writes a QoS 1/2 PUBLISH. Returns false if the client cannot take it (larger than its 5.0
    /// maximum packet size): then the message is dropped, never in flight [MQTT-3.1.2-25].
    fn publish(&mut self, id: PacketId, d: &Delivery, dup: bool) -> bool;
    /// Writes a PUBREL (resend of a QoS 2 flow past PUBREC).
    fn pubrel(&mut self, id: PacketId);
}

/// What became of a QoS 1/2 delivery offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Written to the connection and now in flight.
    Sent,
    /// Waiting in the session queue for window room or for the client to come back.
    Queued,
    /// The queue is at `max_queued_messages`: dropped (the caller counts it).
    Dropped,
    /// The queue is at `max_queued_bytes`: dropped (the caller counts it).
    DroppedBytes,
    /// Expired [MQTT-3.3.2-5] or too large for the client: nothing to count as sent.
    Discarded,
}

/// How much a session's queue may hold: messages and bytes (topic and payload; 0: no byte bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBound {
    pub messages: usize,
    pub bytes: usize,
}

impl QueueBound {
    pub fn messages(messages: usize) -> QueueBound {
        QueueBound { messages, bytes: 0 }
    }
}

/// An incoming QoS 2 PUBLISH past the receive maximum we advertised [MQTT-3.3.4-7].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveMaximumExceeded;

/// What a PUBREC means for the outgoing QoS 2 flow of its packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubRecOutcome {
    /// Known and accepted: answer PUBREL and wait for PUBCOMP.
    Release,
    /// 5.0: the receiver refused it with an error reason; the flow ends here [MQTT-4.3.3-4].
    Ended,
    /// No such flow: answer PUBREL (5.0 with 0x92) anyway.
    Unknown,
}

impl Session {
    /// The next packet id not used by an in-flight message [MQTT-2.3.1-2]. A free one exists:
    /// the window is capped below 65,535.
    pub fn next_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            let Some(id) = PacketId::new(self.next_packet_id) else { continue };
            if self.inflight_position(id).is_none() {
                return id;
            }
        }
    }

    pub fn inflight_position(&self, id: PacketId) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == id)
    }

    fn window_open(&self) -> bool {
        self.inflight.len() < self.send_window
    }

    /// Offers a QoS 1/2 delivery: sent at once if nothing waits before it and the window and the
    /// connection have room, else queued within `bound`, else dropped.
    pub fn offer(&mut self, d: Delivery, now: Instant, bound: QueueBound, out: Option<&mut dyn Outlet>) -> Offer {
        if let Some(out) = out {
            if self.queue.is_empty() && self.window_open() && out.has_room() {
                return self.send(d, now, out);
            }
        }
        let size = d.msg.size();
        if self.queue.len() >= bound.messages {
            Offer::Dropped
        } else if bound.bytes != 0 && self.queued_bytes + size > bound.bytes {
            Offer::DroppedBytes
        } else {
            let mut d = d;
            if let Some(st) = self.store.as_deref_mut() {
                d.seq = st.next_seq;
                st.next_seq += 1;
                st.journal.push((d.seq, Some((None, d.clone()))));
            }
            self.queued_bytes += size;
            self.queue.push_back(d);
            Offer::Queued
        }
    }

    /// Persistence: entry `seq` is gone (completed, expired, refused).
    fn forget(&mut self, seq: u64) {
        if let (Some(st), true) = (self.store.as_deref_mut(), seq != 0) {
            st.journal.push((seq, None));
        }
    }

    fn send(&mut self, mut d: Delivery, now: Instant, out: &mut dyn Outlet) -> Offer {
        if d.msg.expired(now) {
            self.forget(d.seq);
            return Offer::Discarded;
        }
        let id = self.next_packet_id();
        if !out.publish(id, &d, false) {
            self.forget(d.seq);
            return Offer::Discarded;
        }
        let state = if d.qos == crate::codec::QoS::AtLeastOnce { OutState::AwaitAck } else { OutState::AwaitRec };
        if let Some(st) = self.store.as_deref_mut() {
            if d.seq == 0 {
                d.seq = st.next_seq;
                st.next_seq += 1;
            }
            st.journal.push((d.seq, Some((Some((state, id.get())), d.clone()))));
        }
        self.inflight.push_back(Inflight { packet_id: id, state, delivery: d });
        Offer::Sent
    }

    /// Moves queued messages into the window while it and the connection have room. Returns how
    /// many were written.
    pub fn pump(&mut self, now: Instant, out: &mut dyn Outlet) -> usize {
        let mut sent = 0;
        while self.window_open() && out.has_room() {
            let Some(d) = self.queue.pop_front() else { break };
            self.queued_bytes -= d.msg.size();
            if self.send(d, now, out) == Offer::Sent {
                sent += 1;
            }
        }
        sent
    }

    /// [MQTT-4.4.0-1]: on a resumed session, unacknowledged PUBLISH packets go again with DUP set
    /// and unacknowledged PUBRELs again, in their original order.
    pub fn resend(&self, out: &mut dyn Outlet) {
        for i in &self.inflight {
            match i.state {
                OutState::AwaitAck | OutState::AwaitRec => {
                    out.publish(i.packet_id, &i.delivery, true);
                }
                OutState::AwaitComp => out.pubrel(i.packet_id),
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): ends the flow of `id` if it waited for exactly that.
    /// Returns the delivery it ended, if any: a window slot opened.
    pub fn complete(&mut self, id: PacketId, waiting: OutState) -> Option<Delivery> {
        match self.inflight_position(id) {
            Some(i) if self.inflight[i].state == waiting => {
                let done = self.inflight.remove(i)?;
                self.forget(done.delivery.seq);
                Some(done.delivery)
            }
            _ => None,
        }
    }

    pub fn on_puback(&mut self, id: PacketId) -> bool {
        self.complete(id, OutState::AwaitAck).is_some()
    }

    pub fn on_pubcomp(&mut self, id: PacketId) -> bool {
        self.complete(id, OutState::AwaitComp).is_some()
    }

    /// PUBREC for an outgoing QoS 2 message; `refused` when its 5.0 reason is an error.
    pub fn on_pubrec(&mut self, id: PacketId, refused: bool) -> PubRecOutcome {
        let Some(i) = self.inflight_position(id) else { return PubRecOutcome::Unknown };
        if refused {
            if let Some(done) = self.inflight.remove(i) {
                self.forget(done.delivery.seq);
            }
            return PubRecOutcome::Ended;
        }
        self.inflight[i].state = OutState::AwaitComp;
        if let Some(st) = self.store.as_deref_mut() {
            let f = &self.inflight[i];
            st.journal.push((f.delivery.seq, Some((Some((OutState::AwaitComp, id.get())), f.delivery.clone()))));
        }
        PubRecOutcome::Release
    }

    /// An incoming QoS 2 PUBLISH with `id`. Ok(true): new, deliver it; Ok(false): a duplicate of
    /// one not yet released, acknowledge but do not deliver again [MQTT-4.3.3-2]. Err: more
    /// unreleased than `limit` (the 5.0 receive maximum we advertised) [MQTT-3.3.4-7].
    pub fn receive_qos2(&mut self, id: PacketId, limit: Option<usize>) -> Result<bool, ReceiveMaximumExceeded> {
        let id = id.get();
        if let Some(limit) = limit {
            if !self.incoming_qos2.contains(&id) && self.incoming_qos2.len() >= limit {
                return Err(ReceiveMaximumExceeded);
            }
        }
        Ok(self.incoming_qos2.insert(id))
    }

    /// PUBREL: releases an incoming QoS 2 id. Returns whether it was known.
    pub fn release_qos2(&mut self, id: PacketId) -> bool {
        self.incoming_qos2.remove(&id.get())
    }

    /// Messages given to this session and never acknowledged (queued, or in flight short of
    /// PUBCOMP's last step): what a shared group hands to another member when the session ends.
    pub fn into_unacknowledged(self) -> impl Iterator<Item = Delivery> {
        let backlog = self.backlog.map(|b| b.items).unwrap_or_default();
        let inflight = self.inflight.into_iter().filter(|i| i.state != OutState::AwaitComp).map(|i| i.delivery);
        inflight.chain(self.queue).chain(backlog.into_iter().map(|(d, _)| d))
    }

    /// Messages that arrived while retained messages were still streaming to this session wait
    /// behind them, so each topic keeps its order [MQTT-4.6.0-6]; at most `bound.messages`.
    pub fn append_live(&mut self, d: Delivery, bound: QueueBound) -> Offer {
        let Some(b) = self.backlog.as_deref_mut() else { return Offer::Discarded };
        if b.live >= bound.messages {
            return Offer::Dropped;
        }
        b.live += 1;
        b.items.push_back((d, true));
        Offer::Queued
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::codec::{MqttStr, ProtocolVersion, QoS};
    use crate::session::Message;

    /// What a session wrote, in order: (packet id, payload, dup) or a PUBREL.
    #[derive(Default)]
    struct Wire {
        room: bool,
        max_payload: usize,
        written: Vec<String>,
    }

    impl Outlet for Wire {
        fn has_room(&self) -> bool {
            self.room
        }
        fn publish(&mut self, id: PacketId, d: &Delivery, dup: bool) -> bool {
            if d.msg.payload.len() > self.max_payload {
                return false;
            }
            let p = std::str::from_utf8(&d.msg.payload).unwrap();
            self.written.push(format!("{}publish {} {p}", if dup { "dup " } else { "" }, id.get()));
            true
        }
        fn pubrel(&mut self, id: PacketId) {
            self.written.push(format!("pubrel {}", id.get()));
        }
    }

    fn wire() -> Wire {
        Wire { room: true, max_payload: usize::MAX, written: vec![] }
    }

    fn delivery(payload: &str, qos: QoS, expires_at: Option<Instant>) -> Delivery {
        let mut msg = Message::plain(MqttStr::from("t"), bytes::Bytes::copy_from_slice(payload.as_bytes()), qos, false);
        msg.expires_at = expires_at;
        Delivery { msg: Arc::new(msg), qos, retain: false, sub_ids: vec![], group: None, seq: 0 }
    }

    fn session(window: usize) -> Session {
        let mut s = Session::new(MqttStr::from("c"), ProtocolVersion::V311);
        s.send_window = window;
        s
    }

    fn pid(n: u16) -> PacketId {
        PacketId::new(n).unwrap()
    }

    #[test]
    fn past_max_queued_bytes_a_message_is_dropped_and_sending_frees_its_bytes() {
        let (mut s, mut w, now) = (session(1), wire(), Instant::now());
        // Topic "t" and a one-byte payload weigh 2 bytes; the bound is 5.
        let bound = QueueBound { messages: 100, bytes: 5 };
        assert_eq!(s.offer(delivery("a", QoS::AtLeastOnce, None), now, bound, Some(&mut w)), Offer::Sent);
        assert_eq!(s.offer(delivery("b", QoS::AtLeastOnce, None), now, bound, Some(&mut w)), Offer::Queued);
        assert_eq!(s.offer(delivery("c", QoS::AtLeastOnce, None), now, bound, Some(&mut w)), Offer::Queued);
        assert_eq!(s.offer(delivery("d", QoS::AtLeastOnce, None), now, bound, Some(&mut w)), Offer::DroppedBytes);
        assert_eq!(s.queued_bytes, 4);
        assert!(s.on_puback(pid(1)));
        s.pump(now, &mut w);
        assert_eq!(s.queued_bytes, 2);
        assert_eq!(s.offer(delivery("e", QoS::AtLeastOnce, None), now, bound, Some(&mut w)), Offer::Queued);
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_an_ack_lets_the_next_one_go() {
        let (mut s, mut w, now) = (session(2), wire(), Instant::now());
        for p in ["a", "b", "c", "d"] {
            s.offer(delivery(p, QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w));
        }
        assert_eq!(w.written, ["publish 1 a", "publish 2 b"]);
        assert_eq!(s.queue.len(), 2);
        assert!(!s.on_puback(pid(7)), "an unknown id opens nothing");
        assert!(s.on_puback(pid(1)));
        assert_eq!(s.pump(now, &mut w), 1);
        assert_eq!(w.written.last().unwrap(), "publish 3 c");
        // A queue exists: a new message waits behind it, even with room, to keep order [MQTT-4.6.0-6].
        assert!(s.on_puback(pid(2)));
        assert_eq!(
            s.offer(delivery("e", QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w)),
            Offer::Queued
        );
        s.pump(now, &mut w);
        assert_eq!(&w.written[3..], ["publish 4 d"]);
    }

    #[test]
    fn past_max_queued_a_message_is_dropped_and_offline_sessions_queue() {
        let (mut s, now) = (session(1), Instant::now());
        assert_eq!(s.offer(delivery("a", QoS::AtLeastOnce, None), now, QueueBound::messages(2), None), Offer::Queued);
        assert_eq!(s.offer(delivery("b", QoS::AtLeastOnce, None), now, QueueBound::messages(2), None), Offer::Queued);
        assert_eq!(s.offer(delivery("c", QoS::AtLeastOnce, None), now, QueueBound::messages(2), None), Offer::Dropped);
        let mut w = wire();
        w.room = false;
        assert_eq!(s.pump(now, &mut w), 0, "nothing goes while the connection has no room");
        w.room = true;
        assert_eq!(s.pump(now, &mut w), 1);
        assert_eq!(w.written, ["publish 1 a"]);
    }

    #[test]
    fn qos2_goes_publish_pubrec_pubrel_pubcomp() {
        let (mut s, mut w, now) = (session(5), wire(), Instant::now());
        assert_eq!(
            s.offer(delivery("x", QoS::ExactlyOnce, None), now, QueueBound::messages(10), Some(&mut w)),
            Offer::Sent
        );
        assert!(!s.on_pubcomp(pid(1)), "PUBCOMP before PUBREC does not end the flow");
        assert_eq!(s.on_pubrec(pid(1), false), PubRecOutcome::Release);
        assert!(!s.on_puback(pid(1)), "a PUBACK does not end a QoS 2 flow");
        assert_eq!(s.inflight[0].state, OutState::AwaitComp);
        assert!(s.on_pubcomp(pid(1)));
        assert!(s.inflight.is_empty());
        assert_eq!(s.on_pubrec(pid(1), false), PubRecOutcome::Unknown);
    }

    #[test]
    fn a_refused_pubrec_ends_the_flow() {
        let (mut s, mut w, now) = (session(5), wire(), Instant::now());
        s.offer(delivery("x", QoS::ExactlyOnce, None), now, QueueBound::messages(10), Some(&mut w));
        assert_eq!(s.on_pubrec(pid(1), true), PubRecOutcome::Ended);
        assert!(s.inflight.is_empty());
    }

    #[test]
    fn resume_resends_publishes_with_dup_and_pubrels_in_order() {
        let (mut s, mut w, now) = (session(5), wire(), Instant::now());
        s.offer(delivery("a", QoS::ExactlyOnce, None), now, QueueBound::messages(10), Some(&mut w));
        s.offer(delivery("b", QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w));
        s.offer(delivery("c", QoS::ExactlyOnce, None), now, QueueBound::messages(10), Some(&mut w));
        s.on_pubrec(pid(1), false);
        s.on_puback(pid(2));
        let mut again = wire();
        s.resend(&mut again);
        assert_eq!(again.written, ["pubrel 1", "dup publish 3 c"]);
    }

    #[test]
    fn expired_messages_are_not_sent_and_oversized_ones_never_go_in_flight() {
        let mut s = session(5);
        let now = Instant::now();
        let past = now - Duration::from_millis(1);
        s.offer(delivery("old", QoS::AtLeastOnce, Some(past)), now, QueueBound::messages(10), None);
        s.offer(
            delivery("fresh", QoS::AtLeastOnce, Some(now + Duration::from_secs(60))),
            now,
            QueueBound::messages(10),
            None,
        );
        let mut w = wire();
        s.pump(now, &mut w);
        assert_eq!(w.written, ["publish 1 fresh"], "[MQTT-3.3.2-5]");
        w.max_payload = 3;
        assert_eq!(
            s.offer(delivery("toolong", QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w)),
            Offer::Discarded
        );
        assert_eq!(s.inflight.len(), 1);
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let (mut s, mut w, now) = (session(3), wire(), Instant::now());
        s.next_packet_id = u16::MAX - 1;
        s.offer(delivery("a", QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w));
        s.offer(delivery("b", QoS::AtLeastOnce, None), now, QueueBound::messages(10), Some(&mut w));
        assert_eq!(w.written, ["publish 65535 a", "publish 1 b"], "[MQTT-2.3.1-1]: never 0");
        s.next_packet_id = 0;
        assert_eq!(s.next_packet_id(), pid(2), "1 is in flight [MQTT-2.3.1-2]");
    }

    #[test]
    fn incoming_qos2_is_delivered_once_and_bounded_by_the_receive_maximum() {
        let mut s = session(5);
        assert_eq!(s.receive_qos2(pid(1), Some(2)), Ok(true));
        assert_eq!(s.receive_qos2(pid(1), Some(2)), Ok(false), "a duplicate is not delivered again [MQTT-4.3.3-2]");
        assert_eq!(s.receive_qos2(pid(2), Some(2)), Ok(true));
        assert_eq!(s.receive_qos2(pid(3), Some(2)), Err(ReceiveMaximumExceeded), "[MQTT-3.3.4-7]");
        assert!(s.release_qos2(pid(1)));
        assert!(!s.release_qos2(pid(1)));
        assert_eq!(s.receive_qos2(pid(3), Some(2)), Ok(true));
    }

    #[test]
    fn a_session_expires_its_interval_after_the_disconnect() {
        let mut s = session(5);
        let at = Instant::now();
        assert_eq!(s.expires_at(None), None, "connected");
        s.disconnected_at = Some(at);
        s.expiry_interval = 30;
        assert_eq!(s.expires_at(Some(7)), Some(at + Duration::from_secs(30)), "its own interval");
        s.expiry_interval = crate::session::NEVER;
        assert_eq!(s.expires_at(None), None, "persistent_client_expiration = never");
        assert_eq!(s.expires_at(Some(7)), Some(at + Duration::from_secs(7)), "persistent_client_expiration");
    }

    #[test]
    fn unacknowledged_messages_are_the_queue_and_flows_short_of_pubrel() {
        let (mut s, mut w, now) = (session(2), wire(), Instant::now());
        for (p, q) in [("a", QoS::ExactlyOnce), ("b", QoS::AtLeastOnce), ("c", QoS::AtLeastOnce)] {
            s.offer(delivery(p, q, None), now, QueueBound::messages(10), Some(&mut w));
        }
        s.on_pubrec(pid(1), false); // delivered: its PUBREC says so
        let left: Vec<_> = s.into_unacknowledged().map(|d| d.msg.payload.clone()).collect();
        assert_eq!(left, ["b", "c"]);
    }
}
