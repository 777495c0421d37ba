//! The shared `Message`s a worker makes from the messages it routes, for what keeps them (a peer,
//! the retained store, a QoS 1/2 queue), and the ones it gets back to make again. It owns how a
//! message is made and reused, nothing else: it never routes or delivers.
//!
//! Reuse is for glibc's sake. With more than one worker a worker's turn may run on a peer's thread
//! (`Worker::help`, hosting), and what it allocates there comes from that thread's arena: the free
//! that follows on the worker's own thread takes that arena's lock while the other thread
//! allocates from it. A QoS 1/2 message acknowledged by the only session that held it is given
//! back (`Made::give_back`) and the next one is written into it, so a steady flow of queued
//! messages is made and unmade without the allocator.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::deliver::View;
use crate::codec::MqttStr;
use crate::session::Message;

/// Messages kept to be made again: at most `SPARE`, and at most `SPARE_BYTES` counting each by
/// its `weight`; one whose topic and payload together pass `SPARE_PAYLOAD` is not kept. A batch
/// from a peer brings hundreds of messages at once and their acknowledgements come back in runs,
/// so the pool must hold more than one batch's worth: with 256, 50 pairs QoS 1 with 2 workers
/// found it full on about a third of the acknowledgements, and made as many new messages. What
/// the pool holds is at most about 2 MiB: a spare's payload buffer is at most twice its payload
/// (`View::payload_in`), and `SPARE_OVERHEAD` stands for the message itself.
const SPARE: usize = 4096;
const SPARE_PAYLOAD: usize = 4096;
const SPARE_BYTES: usize = 1 << 20;
const SPARE_OVERHEAD: usize = 256;

/// What a spare message counts against `SPARE_BYTES`: its topic too, which a client chooses (up
/// to 64 KiB) and a spare keeps until it is made again.
fn weight(m: &Message) -> usize {
    m.topic.len() + m.payload.len() + SPARE_OVERHEAD
}

/// What a worker made and got back: the topic of the last message made, which the next may
/// share, and the spare messages, acknowledged by the only session that held them.
#[derive(Default)]
pub(super) struct Made {
    /// The topic being shared: a run of messages on it.
    shared_topic: Option<MqttStr>,
    /// The last topic made, as text: a second message on it starts sharing.
    last_topic: String,
    spare: Vec<Arc<Message>>,
    /// Their `weight`s, summed.
    bytes: usize,
    /// The fewest spare since the last `trim`.
    low: usize,
}

impl Made {
    fn take(&mut self) -> Option<Arc<Message>> {
        let m = self.spare.pop()?;
        self.bytes -= weight(&m);
        self.low = self.low.min(self.spare.len());
        Some(m)
    }

    /// A message no one else holds, kept to be made again; others are simply dropped. Two plain
    /// loads decide, not `Arc::get_mut`'s locked compare-exchange: with one strong reference
    /// (this one) and no weak one (none is ever made) no one can get at it again, and the
    /// `get_mut` that writes it when it is made again orders that after every other holder's
    /// last use.
    pub(super) fn give_back(&mut self, msg: Arc<Message>) {
        if self.spare.len() < SPARE
            && Arc::strong_count(&msg) == 1
            && Arc::weak_count(&msg) == 0
            && msg.properties.is_none()
            && msg.topic.len() + msg.payload.len() <= SPARE_PAYLOAD
            && self.bytes + weight(&msg) <= SPARE_BYTES
        {
            self.bytes += weight(&msg);
            self.spare.push(msg);
        }
    }

    /// The topic for a message made on `topic`: shared with the messages before it on the same
    /// topic (a run, as one client's read brings, allocates it twice however long it is). A lone
    /// message allocates its topic and nothing more: sharing needs a second reference, which
    /// turns the topic's buffer into a shared one (an allocation and an atomic), so it starts
    /// with the second message of a run.
    fn topic(&mut self, topic: &str) -> MqttStr {
        if let Some(t) = self.shared_topic.as_ref().filter(|t| ***t == *topic) {
            return t.clone();
        }
        let t = MqttStr::from(topic);
        if self.last_topic == topic {
            self.shared_topic = Some(t.clone());
        } else {
            self.shared_topic = None;
            self.last_topic.clear();
            self.last_topic.push_str(topic);
        }
        t
    }

    /// Frees the spare messages not drawn on since the last call (the tick's): a steady flow
    /// keeps what it circulates, a quiet worker holds none after two ticks.
    pub(super) fn trim(&mut self) {
        let unused = self.low.min(self.spare.len());
        self.bytes -= self.spare.drain(..unused).map(|m| weight(&m)).sum::<usize>();
        self.low = self.spare.len();
    }
}

impl View<'_> {
    pub(super) fn to_message(&self) -> Arc<Message> {
        Arc::new(self.message(MqttStr::from(self.topic), Bytes::copy_from_slice(self.payload)))
    }

    /// `to_message`, made in a spare message if `made` has one (its topic kept when it is the
    /// same, its payload buffer reused), with the topic of the last message made when it is the
    /// same one (`Made::topic`).
    pub(super) fn to_message_in(&self, made: &mut Made) -> Arc<Message> {
        if let Some(mut spare) = made.take() {
            // A spare is held by nothing else (`give_back`): it can be written.
            if let Some(m) = Arc::get_mut(&mut spare) {
                if *m.topic != *self.topic {
                    m.topic = made.topic(self.topic);
                }
                m.payload = self.payload_in(std::mem::take(&mut m.payload));
                self.fill(m);
                return spare;
            }
        }
        Arc::new(self.message(made.topic(self.topic), Bytes::copy_from_slice(self.payload)))
    }

    /// This message with `topic` and `payload`.
    fn message(&self, topic: MqttStr, payload: Bytes) -> Message {
        let mut m = Message::plain(topic, payload, self.qos, self.retain);
        self.fill(&mut m);
        m
    }

    /// Everything of this message in `m` but its topic and payload, written in place (a spare
    /// message is reused without dropping and rebuilding it whole).
    fn fill(&self, m: &mut Message) {
        m.qos = self.qos;
        m.retain = self.retain;
        m.properties = self.properties.map(|p| Box::new(p.clone()));
        m.origin = self.origin;
        m.publisher = self.publisher;
        m.expires_at = self.expires_at;
        m.stamp = self.stamp;
        m.read_at = self.read_at;
    }

    /// This message's payload, copied into `old`'s buffer unless that is more than twice its size.
    fn payload_in(&self, old: Bytes) -> Bytes {
        let mut buf = old.try_into_mut().unwrap_or_default();
        buf.clear();
        if buf.capacity() > (2 * self.payload.len()).max(256) {
            // A small message in a large buffer: a queue of them would hold every buffer whole.
            buf = BytesMut::new();
        }
        buf.extend_from_slice(self.payload);
        buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    #[test]
    fn an_acknowledged_message_is_filled_again() {
        let mut made = Made::default();
        let a = View::plain("a/b", b"first", QoS::AtLeastOnce).to_message_in(&mut made);
        let at = Arc::as_ptr(&a);
        // Held by no one else, even as the last one made: kept.
        made.give_back(a);
        let c =
            View { origin: Some((1, 2)), ..View::plain("a/b", b"third", QoS::ExactlyOnce) }.to_message_in(&mut made);
        assert_eq!(Arc::as_ptr(&c), at, "the same message, filled again");
        assert_eq!(
            (&*c.topic, &c.payload[..], c.qos, c.origin),
            ("a/b", &b"third"[..], QoS::ExactlyOnce, Some((1, 2)))
        );
        made.give_back(c);
        // A different topic is replaced, the payload too.
        let d = View::plain("x", b"fourth", QoS::AtLeastOnce).to_message_in(&mut made);
        assert_eq!(Arc::as_ptr(&d), at);
        assert_eq!((&*d.topic, &d.payload[..]), ("x", &b"fourth"[..]));
        // Held by someone else (another queue): not kept.
        let held = d.clone();
        made.give_back(d);
        assert!(made.spare.is_empty());
        // With 5.0 properties: not kept.
        let props = crate::codec::Properties::default();
        let p = View { properties: Some(&props), ..View::plain("p", b"5", QoS::AtLeastOnce) }.to_message_in(&mut made);
        made.give_back(p);
        assert!(made.spare.is_empty());
        drop(held);
    }

    #[test]
    fn a_run_on_one_topic_shares_its_topic_from_its_second_message() {
        let mut made = Made::default();
        let a = View::plain("run/topic", b"1", QoS::AtLeastOnce).to_message_in(&mut made);
        let b = View::plain("run/topic", b"2", QoS::AtLeastOnce).to_message_in(&mut made);
        let c = View::plain("run/topic", b"3", QoS::AtLeastOnce).to_message_in(&mut made);
        assert_ne!(a.topic.as_ptr(), b.topic.as_ptr(), "a lone message's topic is its own");
        assert_eq!(b.topic.as_ptr(), c.topic.as_ptr(), "from the second on, one topic for the run");
        let d = View::plain("other", b"4", QoS::AtLeastOnce).to_message_in(&mut made);
        let e = View::plain("run/topic", b"5", QoS::AtLeastOnce).to_message_in(&mut made);
        assert_ne!(e.topic.as_ptr(), c.topic.as_ptr(), "another topic ended the run");
        let all = [&a, &b, &c, &d, &e].map(|m| m.topic.to_string());
        assert_eq!(all, ["run/topic", "run/topic", "run/topic", "other", "run/topic"]);
    }

    #[test]
    fn spare_messages_are_bounded_and_trimmed() {
        let mut made = Made::default();
        let big = vec![0u8; SPARE_PAYLOAD + 1];
        made.give_back(View::plain("t", &big, QoS::AtLeastOnce).to_message());
        assert!(made.spare.is_empty(), "a large payload is not kept");
        for _ in 0..SPARE + 10 {
            made.give_back(View::plain("t", b"p", QoS::AtLeastOnce).to_message());
        }
        assert_eq!(made.spare.len(), SPARE.min(SPARE_BYTES / (2 + SPARE_OVERHEAD)), "bounded by count or bytes");
        assert!(made.spare.len() > 1000, "more than a batch's worth of small messages");
        assert_eq!(made.bytes, made.spare.len() * (2 + SPARE_OVERHEAD));
        // A client's long topic counts: 4 KiB topics are kept by bytes, longer ones not at all.
        let mut long = Made::default();
        let topic = "t".repeat(SPARE_PAYLOAD - 1);
        for _ in 0..SPARE {
            long.give_back(View::plain(&topic, b"p", QoS::AtLeastOnce).to_message());
        }
        assert_eq!(long.spare.len(), SPARE_BYTES / (SPARE_PAYLOAD + SPARE_OVERHEAD));
        let longer = "t".repeat(SPARE_PAYLOAD);
        let mut none = Made::default();
        none.give_back(View::plain(&longer, b"p", QoS::AtLeastOnce).to_message());
        assert!(none.spare.is_empty(), "topic and payload past SPARE_PAYLOAD: not kept");
        let mut large = Made::default();
        let payload = vec![0u8; SPARE_PAYLOAD - 1];
        for _ in 0..SPARE {
            large.give_back(View::plain("t", &payload, QoS::AtLeastOnce).to_message());
        }
        assert_eq!(large.spare.len(), SPARE_BYTES / (SPARE_PAYLOAD + SPARE_OVERHEAD), "bounded by bytes");
        made.trim();
        let _m = View::plain("t", b"p", QoS::AtLeastOnce).to_message_in(&mut made);
        // Only one was drawn on since the last trim, so none was needed: all go at the next.
        made.trim();
        assert!(made.spare.is_empty());
        assert_eq!(made.bytes, 0);
    }
}
