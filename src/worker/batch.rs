//! The layout of a routed message copied into a byte buffer: how a batch of messages crosses to a
//! peer worker in one ring slot (`Batch`). It owns the layout and nothing else: no routing, no
//! I/O.
//!
//! Why bytes and not one `Arc<Message>` per message: a shared message costs three allocations on
//! the sender (the `Arc`, topic and payload) and three frees on the receiving thread, which glibc
//! pays for with arena locks; a ring slot per message also costs the receiver a cache miss per
//! message. A batch is one allocation per peer per loop turn (or per `BATCH_BYTES`), read in
//! order, and a QoS 0 message crosses with no allocation at all: the receiver routes it straight
//! from the batch, as it routes a PUBLISH straight from its read buffer. Only what must be kept
//! (a QoS 1/2 queue entry) becomes a `Message` there, allocated and freed on one thread.
//!
//! Only plain messages travel this way: not retained (every replica stores it), without 5.0
//! properties or an expiry (`fits`). The others keep `Mail::Publish`; a batch is sent ahead of any
//! other mail to the same peer, so the ring's order is the routing order either way.

#[cfg(test)]
use std::time::Instant;

use super::deliver::View;
use crate::codec::QoS;
use crate::session::Publisher;

/// A batch is sent once it holds this much, without waiting for the end of the turn.
pub const BATCH_BYTES: usize = 64 * 1024;

/// Bytes before the topic: length, flags, seq, stamp, origin, publisher, read time, topic length.
const HEAD: usize = 4 + 1 + 4 + 8 + 6 + 14 + 8 + 2;

const HAS_ORIGIN: u8 = 1 << 2;
const HAS_PUBLISHER: u8 = 1 << 3;
const HAS_READ_AT: u8 = 1 << 4;

/// Bytes of a `Source`.
const SOURCE: usize = 6 + 14 + 8;

/// Where a message came from: origin, publisher, read time. In a batch each one absent is zeros,
/// with its flag unset; the arrival-order list keeps it as it is, once per run of messages.
#[derive(Clone, Copy, Default, PartialEq)]
pub struct Source {
    pub origin: Option<(u16, u32)>,
    pub publisher: Option<Publisher>,
    pub read_at: Option<u64>,
}

impl Source {
    /// Writes it into `b` (`SOURCE` bytes); returns its flags, which keep clear of bits 0 and 1
    /// (the flag byte's QoS).
    pub fn put(&self, b: &mut [u8]) -> u8 {
        let (ow, os) = self.origin.unwrap_or_default();
        let p = self.publisher.unwrap_or(Publisher { worker: 0, conn: 0, conn_uid: 0 });
        b[0..2].copy_from_slice(&ow.to_le_bytes());
        b[2..6].copy_from_slice(&os.to_le_bytes());
        b[6..8].copy_from_slice(&p.worker.to_le_bytes());
        b[8..12].copy_from_slice(&p.conn.to_le_bytes());
        b[12..20].copy_from_slice(&p.conn_uid.to_le_bytes());
        b[20..28].copy_from_slice(&self.read_at.unwrap_or(0).to_le_bytes());
        (if self.origin.is_some() { HAS_ORIGIN } else { 0 })
            | (if self.publisher.is_some() { HAS_PUBLISHER } else { 0 })
            | (if self.read_at.is_some() { HAS_READ_AT } else { 0 })
    }

    /// Reads what `put` wrote into `b` and the flags it returned.
    pub fn get(b: &[u8], flags: u8) -> Source {
        Source {
            origin: (flags & HAS_ORIGIN != 0)
                .then(|| (u16::from_le_bytes(field(b, 0)), u32::from_le_bytes(field(b, 2)))),
            publisher: (flags & HAS_PUBLISHER != 0).then(|| Publisher {
                worker: u16::from_le_bytes(field(b, 6)),
                conn: u32::from_le_bytes(field(b, 8)),
                conn_uid: u64::from_le_bytes(field(b, 12)),
            }),
            read_at: (flags & HAS_READ_AT != 0).then(|| u64::from_le_bytes(field(b, 20))),
        }
    }
}

/// Messages on their way to one peer, in routing order.
#[derive(Default)]
pub struct Batch {
    /// Whole records, each written by `append` (only `push` writes it): `read` relies on that.
    buf: Vec<u8>,
    pub count: u32,
    /// Every message in it is QoS 0: it may be dropped whole when the peer cannot take it.
    pub qos0_only: bool,
}

impl Batch {
    pub fn push(&mut self, m: &View<'_>, seq: u32) {
        if self.count == 0 {
            self.qos0_only = true;
        }
        self.qos0_only &= m.qos == QoS::AtMostOnce;
        self.count += 1;
        append(&mut self.buf, m, seq);
    }

    /// Bytes it holds, and room for them.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    #[cfg(test)]
    pub fn as_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    /// Empties it, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.qos0_only = true;
    }

    /// The messages, in order, with the sequence number each was sent under.
    pub fn iter(&self) -> impl Iterator<Item = (View<'_>, u32)> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (v, seq, len) = read(&self.buf[at..])?;
            at += len;
            Some((v, seq))
        })
    }
}

/// Whether a message can be copied into a batch (see the module doc).
pub fn fits(m: &View<'_>) -> bool {
    !m.retain && m.properties.is_none() && m.expires_at.is_none() && m.topic.len() <= u16::MAX as usize
}

/// What `append` adds for a message.
pub fn size(m: &View<'_>) -> usize {
    HEAD + m.topic.len() + m.payload.len()
}

/// Copies `m` (which `fits`) to the end of `buf`.
fn append(buf: &mut Vec<u8>, m: &View<'_>, seq: u32) {
    // Its topic length must fit the record's two bytes, or `read` would cut the topic where it
    // may not end a character. `fits` (checked by every caller of `push`) ensures it, as does
    // the protocol; a broken caller stops the worker rather than write such a record.
    assert!(m.topic.len() <= u16::MAX as usize, "a batch record's topic is at most 65,535 bytes");
    let len = size(m);
    // The head is built on the stack and copied in once: one bounds check, not ten.
    let mut head = [0u8; HEAD];
    let source = Source { origin: m.origin, publisher: m.publisher, read_at: m.read_at };
    head[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = m.qos as u8 | source.put(&mut head[17..17 + SOURCE]);
    head[5..9].copy_from_slice(&seq.to_le_bytes());
    head[9..17].copy_from_slice(&m.stamp.to_le_bytes());
    head[45..47].copy_from_slice(&(m.topic.len() as u16).to_le_bytes());
    buf.reserve(len);
    buf.extend_from_slice(&head);
    buf.extend_from_slice(m.topic.as_bytes());
    buf.extend_from_slice(m.payload);
}

/// Reads the fixed-size field at `at` (`at + N` within `b`).
pub fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// The message at the start of `b`, its sequence number and its length; None at the end (or, never
/// expected, a record this module did not write). `b` starts at a record `append` wrote into a
/// batch's buffer.
fn read(b: &[u8]) -> Option<(View<'_>, u32, usize)> {
    if b.len() < HEAD {
        return None;
    }
    let len = u32::from_le_bytes(field(b, 0)) as usize;
    let topic_len = u16::from_le_bytes(field(b, HEAD - 2)) as usize;
    if len > b.len() || HEAD + topic_len > len {
        return None;
    }
    let flags = b[4];
    let qos = QoS::from_u8(flags & 3)?;
    let seq = u32::from_le_bytes(field(b, 5));
    let stamp = u64::from_le_bytes(field(b, 9));
    let Source { origin, publisher, read_at } = Source::get(&b[17..17 + SOURCE], flags);
    let topic = &b[HEAD..HEAD + topic_len];
    debug_assert!(std::str::from_utf8(topic).is_ok());
    // SAFETY: a batch's buffer is private and only `append` writes it, copying the topic from a
    // `&str` whose whole length the record holds (asserted there); `b` starts at one of its
    // records and the record lies within `b` (checked above), so these bytes are that topic. Checking it again
    // cost every crossing message about 2 ns (a tenth of reading it from the batch).
    let topic = unsafe { std::str::from_utf8_unchecked(topic) };
    // Not retained, no properties, no expiry: only plain messages are written (`fits`).
    let view =
        View { topic, payload: &b[HEAD + topic_len..len], qos, origin, publisher, stamp, read_at, ..View::default() };
    Some((view, seq, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(topic: &'a str, payload: &'a [u8], qos: QoS) -> View<'a> {
        View::plain(topic, payload, qos)
    }

    #[test]
    fn a_batch_gives_back_every_message_in_order_with_what_routing_needs() {
        let now = 123_456_789;
        let mut b = Batch::default();
        let mut first = view("a/b", b"one", QoS::AtMostOnce);
        first.origin = Some((3, 77));
        first.read_at = Some(now);
        b.push(&first, 5);
        assert!(b.qos0_only);
        let mut second = view("", b"", QoS::ExactlyOnce);
        second.publisher = Some(Publisher { worker: 1, conn: 9, conn_uid: u64::MAX });
        second.stamp = 1 << 50;
        b.push(&second, 6);
        assert!(!b.qos0_only, "a QoS 2 message makes the batch one that must not be dropped");
        b.push(&view("x", &[0xff; 300], QoS::AtLeastOnce), 7);

        let got: Vec<_> = b.iter().collect();
        assert_eq!(got.len(), 3);
        let (v, seq) = &got[0];
        assert_eq!((v.topic, v.payload, v.qos, *seq), ("a/b", &b"one"[..], QoS::AtMostOnce, 5));
        assert_eq!((v.origin, v.publisher, v.stamp), (Some((3, 77)), None, 0));
        assert_eq!(v.read_at, Some(now), "read time kept");
        let (v, seq) = &got[1];
        assert_eq!((v.topic, v.payload, v.qos, *seq), ("", &b""[..], QoS::ExactlyOnce, 6));
        assert_eq!(v.publisher, Some(Publisher { worker: 1, conn: 9, conn_uid: u64::MAX }));
        assert_eq!((v.origin, v.read_at, v.stamp), (None, None, 1 << 50));
        assert_eq!((got[2].0.payload.len(), got[2].0.qos, got[2].1), (300, QoS::AtLeastOnce, 7));
        assert_eq!(b.buf.len(), size(&first) + size(&second) + size(&view("x", &[0; 300], QoS::AtMostOnce)));
    }

    #[test]
    fn only_plain_messages_fit() {
        assert!(fits(&view("t", b"", QoS::AtMostOnce)));
        let mut retained = view("t", b"", QoS::AtMostOnce);
        retained.retain = true;
        assert!(!fits(&retained));
        let mut expiring = view("t", b"", QoS::AtMostOnce);
        expiring.expires_at = Some(Instant::now());
        assert!(!fits(&expiring));
    }

    #[test]
    fn a_cut_record_reads_as_the_end() {
        let mut b = Batch::default();
        b.push(&view("a", b"xyz", QoS::AtMostOnce), 1);
        let n = b.buf.len();
        assert!(read(&b.buf[..n - 1]).is_none());
        assert!(read(&b.buf[..3]).is_none());
    }
}
