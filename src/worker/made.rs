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

use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};

use super::deliver::View;
use crate::codec::MqttStr;
use crate::session::Message;

/// Messages kept to be made again: at most this many, each with a payload of at most
/// `SPARE_PAYLOAD` bytes, and at most `SPARE_BYTES` of them counting each as its payload and
/// `SPARE_OVERHEAD` (the message, its buffers up to twice its payload, `View::payload_in`: about
/// 2 MiB at most). A batch from a peer brings hundreds of messages at once and their
/// acknowledgements come back in runs, so the pool must hold more than one batch's worth: with
/// 256, 50 pairs QoS 1 with 2 workers found it full on about a third of the acknowledgements,
/// and made as many new messages.
const SPARE: usize = 4096;
const SPARE_PAYLOAD: usize = 4096;
const SPARE_BYTES: usize = 1 << 20;
const SPARE_OVERHEAD: usize = 256;

/// What a spare message counts against `SPARE_BYTES`.
fn weight(m: &Message) -> usize {
    m.payload.len() + SPARE_OVERHEAD
}

/// What a worker made and got back: the last message made, whose topic the next may share, and
/// the spare ones, acknowledged by the only session that held them.
#[derive(Default)]
pub(super) struct Made {
    last: Weak<Message>,
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

    /// A message no one else holds, kept to be made again; others are simply dropped.
    pub(super) fn give_back(&mut self, mut msg: Arc<Message>) {
        if self.spare.len() < SPARE {
            if let Some(m) = Arc::get_mut(&mut msg) {
                if m.payload.len() <= SPARE_PAYLOAD && self.bytes + weight(m) <= SPARE_BYTES {
                    m.properties = None;
                    self.bytes += weight(m);
                    self.spare.push(msg);
                }
            }
        }
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
    /// same, its payload buffer reused), sharing the topic of the last message made when it is
    /// the same one and still queued somewhere (a run of messages on one topic, as one client's
    /// read brings, allocates its topic once), and leaving itself as the last. The last is weak:
    /// it never keeps a delivered message (payload and all) alive, nor makes it unfit to be
    /// given back once it is no longer the last.
    pub(super) fn to_message_in(&self, made: &mut Made) -> Arc<Message> {
        let last = made.last.upgrade().filter(|l| *l.topic == *self.topic);
        let topic = || last.as_ref().map_or_else(|| MqttStr::from(self.topic), |l| l.topic.clone());
        let mut spare = made.take();
        // A spare is held by nothing else (`give_back`): it can be written.
        let msg = match spare.as_mut().and_then(Arc::get_mut) {
            Some(m) => {
                if *m.topic != *self.topic {
                    m.topic = topic();
                }
                m.payload = self.payload_in(std::mem::take(&mut m.payload));
                self.fill(m);
                spare
            }
            None => None,
        };
        let msg = msg.unwrap_or_else(|| Arc::new(self.message(topic(), Bytes::copy_from_slice(self.payload))));
        made.last = Arc::downgrade(&msg);
        msg
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
        // Held by the last (weakly) only: given back once a newer one is the last.
        let b = View::plain("c", b"second", QoS::AtLeastOnce).to_message_in(&mut made);
        made.give_back(a);
        let c =
            View { origin: Some((1, 2)), ..View::plain("a/b", b"third", QoS::ExactlyOnce) }.to_message_in(&mut made);
        assert_eq!(Arc::as_ptr(&c), at, "the same message, filled again");
        assert_eq!(
            (&*c.topic, &c.payload[..], c.qos, c.origin),
            ("a/b", &b"third"[..], QoS::ExactlyOnce, Some((1, 2)))
        );
        // c is kept once another is the last one made.
        let e = View::plain("e", b"fifth", QoS::AtLeastOnce).to_message_in(&mut made);
        made.give_back(c);
        // A different topic is replaced, the payload too.
        let d = View::plain("x", b"fourth", QoS::AtLeastOnce).to_message_in(&mut made);
        assert_eq!(Arc::as_ptr(&d), at);
        assert_eq!((&*d.topic, &d.payload[..]), ("x", &b"fourth"[..]));
        // Held by someone else (another queue): not kept.
        let held = d.clone();
        made.give_back(d);
        assert!(made.spare.is_empty());
        // The last one made is not kept: the next may share its topic.
        let f = View::plain("f", b"sixth", QoS::AtLeastOnce).to_message_in(&mut made);
        made.give_back(f);
        assert!(made.spare.is_empty());
        drop((held, b, e));
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
        assert_eq!(made.spare.len(), SPARE.min(SPARE_BYTES / (1 + SPARE_OVERHEAD)), "bounded by count or bytes");
        assert!(made.spare.len() > 1000, "more than a batch's worth of small messages");
        assert_eq!(made.bytes, made.spare.len() * (1 + SPARE_OVERHEAD));
        let mut large = Made::default();
        let payload = vec![0u8; SPARE_PAYLOAD];
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
