//! The list of what a worker routed in the last moments, for arrival order across workers
//! (`catchup` says why and how it is asked). It owns the list and its bounds, nothing else: it
//! never sends or delivers.
//!
//! Listing is on the path of every PUBLISH a client sends, and the list is read only when a
//! SUBSCRIBE asks, so listing does as little as it can per message, and copies nothing when it
//! can keep what was read. A read of a connection, from its first PUBLISH on, is a pass
//! (`begin_pass`): each message routed from it becomes a small entry (where its topic and
//! payload lie, its QoS) in a segment whose peers-sent-to and run (arrival stamp, origin,
//! publisher, read time: one per read) are kept once for consecutive entries; when the pass
//! ends, the bytes as read are kept with it (`Bytes` that share the read buffer, which the next
//! reads leave for a new one), counted as the whole read buffer they keep (`KEPT_BUFFER`). A
//! read in a large packet's own buffer is not kept. A short read (a
//! message or two at a steady rate, `PASS_MIN`) and a message from anywhere else (a will,
//! `$SYS`, a bridge's remapped topic) are copied, message after message, into a segment of
//! copies instead. No allocation per message. Segments hold consecutive sequence numbers, so
//! the oldest is at the front, a message's number is its place, and trimming drops a whole
//! segment once it holds nothing listed. A message that is not plain (`batch::fits`: 5.0
//! properties or an expiry) keeps its shared copy on a side list, as does a message's stamp
//! (`Message::stamp`, with a durable store) and what catching up has given to whom, all rare.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::batch::{self, Source};
use super::deliver::View;
use crate::codec::QoS;
use crate::session::Message;

/// How long a routed message stays on the list, by its arrival stamp.
pub const WINDOW_NS: u64 = 500_000_000;
/// At most this many messages, and this many bytes, stay on the list.
pub const MAX_ENTRIES: usize = 4096;
pub const MAX_BYTES: usize = 8 << 20;
/// Sessions one message is remembered as given to; past it the message is caught up no more, so
/// SUBSCRIBEs from many sessions cannot grow an entry without end.
pub const GIVEN_MAX: usize = 64;

/// A segment of copies holds this many bytes (a larger message gets one of its own) and at
/// most `SEGMENT_ENTRIES` entries: the list holds at most one segment more than its bounds.
const CHUNK: usize = 64 * 1024;
const SEGMENT_ENTRIES: usize = 1024;
/// A read shorter than this is copied message by message rather than kept: keeping it would
/// pin a read buffer for a message or two.
const PASS_MIN: usize = 4096;
/// A kept read keeps its whole read buffer from being freed, bytes before it included (handled
/// and dropped, but in the same allocation), and no buffer says how large it is. So a read is
/// kept only from an ordinary read buffer (at most this much from the read's start to the
/// buffer's end: a large packet's own buffer is not one) and counts this much at least.
const KEPT_BUFFER: usize = 2 * super::READ_CHUNK;
/// What an entry costs the list's byte bound.
const ENTRY: usize = std::mem::size_of::<Entry>();

/// What consecutive messages from one read share, kept once for the run.
#[derive(Clone, Copy, Default)]
struct Run {
    arrived: u64,
    source: Source,
}

impl Run {
    fn of(m: &View<'_>) -> Run {
        Run { arrived: m.arrived, source: Source { origin: m.origin, publisher: m.publisher, read_at: m.read_at } }
    }

    /// Whether `m` belongs to this run: compared field by field as read from the message, not
    /// by building a `Run` for each one (most messages continue the run before them).
    #[inline]
    fn continued_by(&self, m: &View<'_>) -> bool {
        self.arrived == m.arrived
            && self.source.publisher == m.publisher
            && self.source.read_at == m.read_at
            && self.source.origin == m.origin
    }
}

/// One listed message: where its topic and payload lie in its segment's bytes, its QoS, and
/// whether its shared copy is on the side list (then only its topic is in the bytes). The
/// peers it was sent to and its run are kept once for consecutive entries that share them.
#[derive(Clone, Copy)]
struct Entry {
    topic_at: u32,
    payload_at: u32,
    payload_len: u32,
    topic_len: u16,
    flags: u8,
}

/// `Entry::flags` beside the QoS.
const SHARED: u8 = 1 << 2;

/// A segment's bytes.
enum Data {
    /// A pass's bytes, as read.
    Kept(Bytes),
    /// Copies, one message after another.
    Copied(Vec<u8>),
}

/// Consecutive entries, the bytes they point into, and what runs of them share.
struct Segment {
    /// The list-wide number of its first entry.
    first: u64,
    /// The latest arrival stamp in it.
    newest: u64,
    data: Data,
    entries: Vec<Entry>,
    /// Peers sent to (one bit per worker), from the entry each value starts at.
    sent: Vec<(u32, u64)>,
    /// Runs, from the entry each starts at.
    runs: Vec<(u32, Run)>,
    /// What it counts against `MAX_BYTES`.
    bytes: usize,
}

impl Segment {
    fn new(first: u64, data: Data, spare: &mut Vec<Vecs>) -> Segment {
        let (entries, sent, runs) = spare.pop().unwrap_or_default();
        Segment { first, newest: 0, data, entries, sent, runs, bytes: 0 }
    }

    fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Kept(b) => b,
            Data::Copied(v) => v,
        }
    }

    /// Whether message `id` is the next entry of this segment.
    fn next_is(&self, id: u64) -> bool {
        self.first + self.entries.len() as u64 == id
    }

    /// The next entry went to `sent`: a new run of peers if the last entry's differ.
    #[inline]
    fn sent_to(&mut self, sent: u64) {
        if self.sent.last().is_none_or(|(_, s)| *s != sent) {
            self.sent.push((self.entries.len() as u32, sent));
        }
    }

    /// Adds an entry; `m` is the message, `sent` where it went.
    #[inline]
    fn push(&mut self, e: Entry, sent: u64, m: &View<'_>) {
        let i = self.entries.len() as u32;
        self.sent_to(sent);
        if !self.runs.last().is_some_and(|(_, r)| r.continued_by(m)) {
            self.runs.push((i, Run::of(m)));
        }
        self.entries.push(e);
        self.newest = self.newest.max(m.arrived);
    }
}

/// A segment's emptied vectors, kept for another.
type Vecs = (Vec<Entry>, Vec<(u32, u64)>, Vec<(u32, Run)>);

/// A session, anywhere in the broker: (worker, session key, session uid).
pub type Who = (u16, u32, u64);

/// One listed message, as `matching` finds it.
pub struct Listed {
    /// The sequence number its mail carried.
    pub seq: u32,
    /// Peers it was sent to, one bit per worker.
    pub sent: u64,
    pub msg: Arc<Message>,
    /// List-wide number, for `given` and `give`.
    id: u64,
}

/// The read being handled: `len` bytes from address `base` in the read buffer, and the segment
/// of the messages listed from it, which goes on the list when the pass ends.
struct Pass {
    base: usize,
    len: usize,
    segment: Segment,
}

impl Pass {
    /// Where `s` is in the read, if it lies in it.
    #[inline]
    fn offset(&self, s: &[u8]) -> Option<u32> {
        let a = s.as_ptr() as usize;
        (a >= self.base && a + s.len() <= self.base + self.len).then(|| (a - self.base) as u32)
    }

    /// Lists a plain message that lies in the read, sent to `sent`, if it can be listed here:
    /// the first, or the next number. One read of one connection is one run (its arrival
    /// stamp, origin, publisher and read time do not change while it is handled), kept with
    /// the first entry.
    #[inline]
    fn add(&mut self, m: &View<'_>, id: u64, sent: u64) -> bool {
        let Some(topic_at) = self.offset(m.topic.as_bytes()) else { return false };
        let payload_at = if m.payload.is_empty() { Some(topic_at) } else { self.offset(m.payload) };
        let Some(payload_at) = payload_at else { return false };
        let s = &mut self.segment;
        let i = s.entries.len();
        // However small its messages, a read lists at most the list's count in place; the rest
        // are copied, and copying trims the list.
        if i == MAX_ENTRIES {
            return false;
        }
        if i == 0 {
            s.first = id;
            s.newest = m.arrived;
            s.runs.push((0, Run::of(m)));
        } else if s.first + i as u64 != id || m.arrived != s.newest {
            return false;
        }
        s.sent_to(sent);
        debug_assert!(s.runs[0].1.continued_by(m), "one read, one run");
        s.entries.push(Entry {
            topic_at,
            payload_at,
            payload_len: m.payload.len() as u32,
            topic_len: m.topic.len() as u16,
            flags: m.qos as u8,
        });
        true
    }
}

/// What a worker routed in the last moments.
pub struct Recent {
    /// `arrival_order` is on and there is more than one worker (at most 64: `sent` is one bit
    /// each).
    pub on: bool,
    /// Oldest first; the list is trimmed a whole segment at a time, so listing a message never
    /// reads an old one.
    segments: VecDeque<Segment>,
    /// Emptied vectors and one emptied copy buffer, kept for the next segments.
    spare: Vec<Vecs>,
    spare_copies: Option<Vec<u8>>,
    /// The read being handled.
    pass: Option<Pass>,
    /// Bytes in the segments.
    bytes: usize,
    /// The list-wide number of the next record; the mail carries the low 32 bits.
    next: u64,
    /// Messages that are not plain, by list-wide number.
    shared: VecDeque<(u64, Arc<Message>)>,
    /// The stamps (`Message::stamp`) of copied messages that have one, by list-wide number
    /// (messages with one are not listed in a pass).
    stamps: VecDeque<(u64, u64)>,
    /// Sessions already given a message by catching up: a second SUBSCRIBE of theirs within the
    /// window must not get it again.
    given: BTreeMap<u64, Vec<Who>>,
    /// The last sequence number taken from each peer.
    taken: Vec<u32>,
    /// Messages delivered by catching up, for `$SYS/broker/internal/caught_up`.
    pub caught_up: u64,
}

impl Recent {
    /// `enabled`: the `arrival_order` setting.
    pub fn new(workers: usize, enabled: bool) -> Recent {
        Recent {
            on: enabled && workers > 1 && workers <= 64,
            segments: VecDeque::new(),
            spare: Vec::new(),
            spare_copies: None,
            pass: None,
            bytes: 0,
            next: 1,
            shared: VecDeque::new(),
            stamps: VecDeque::new(),
            given: BTreeMap::new(),
            taken: vec![0; workers],
            caught_up: 0,
        }
    }

    /// The list-wide number of the oldest listed record.
    fn first(&self) -> u64 {
        self.segments.front().map_or(self.next, |c| c.first)
    }

    pub fn len(&self) -> usize {
        (self.next - self.first()) as usize
    }

    /// The list-wide number of a message about to be routed: a new one if it goes on the list,
    /// else the last one given. Its mail carries the low 32 bits.
    pub fn next_id(&mut self, listed: bool) -> u64 {
        if listed {
            self.next += 1;
        }
        self.next - 1
    }

    /// A message mail from `from` with sequence number `seq` was taken.
    pub fn took(&mut self, from: usize, seq: u32) {
        self.taken[from] = seq;
    }

    pub fn mark(&self, peer: usize) -> u32 {
        self.taken[peer]
    }

    /// A read is handled from here: `read` is what is left of it, and `buffer` the bytes from
    /// its start to the end of the buffer it is in. Its messages routed until `end_pass` are
    /// listed where they lie in it, so until then the bytes must not change.
    pub fn begin_pass(&mut self, read: &[u8], buffer: usize) {
        if self.on && self.pass.is_none() && read.len() >= PASS_MIN && buffer <= KEPT_BUFFER {
            // No bytes until the pass ends and keeps them.
            let segment = Segment::new(0, Data::Copied(Vec::new()), &mut self.spare);
            self.pass = Some(Pass { base: read.as_ptr() as usize, len: read.len(), segment });
        }
    }

    /// Whether the pass has messages listed in it, so its bytes must be kept (`end_pass`).
    pub fn pass_listed(&self) -> bool {
        self.pass.as_ref().is_some_and(|p| !p.segment.entries.is_empty())
    }

    /// The pass has ended; `kept` is its bytes up to where it ended, from its start, if it has
    /// messages listed in it. They count a whole read buffer against `MAX_BYTES`
    /// (`KEPT_BUFFER`). Its segment goes on the list in order.
    pub fn end_pass(&mut self, kept: Option<Bytes>) {
        let Some(Pass { base, mut segment, .. }) = self.pass.take() else { return };
        if segment.entries.is_empty() {
            self.spare.push((segment.entries, segment.sent, segment.runs));
            return;
        }
        // Without its bytes (not the pass's), its entries find nothing; it is trimmed as any.
        if let Some(kept) = kept.filter(|b| b.as_ptr() as usize == base) {
            segment.bytes = kept.len().max(KEPT_BUFFER);
            segment.data = Data::Kept(kept);
        }
        segment.bytes += segment.entries.len() * ENTRY;
        self.bytes += segment.bytes;
        self.trim(segment.newest.saturating_sub(WINDOW_NS));
        let at = self.segments.partition_point(|s| s.first < segment.first);
        self.segments.insert(at, segment);
    }

    /// Puts a routed message on the list, under the number `next_id` gave it.
    pub fn record(&mut self, m: &View<'_>, id: u64, peers: &[u16], shared: &mut Option<Arc<Message>>) {
        let sent = peers.iter().fold(0u64, |s, &p| s | 1 << p);
        // A plain message is kept as bytes even when a shared copy exists (queued for a
        // subscriber): holding it here would free thousands at once when a segment goes, which
        // glibc's allocator takes badly.
        let plain = batch::fits(m);
        if plain && m.stamp == 0 && self.pass.as_mut().is_some_and(|p| p.add(m, id, sent)) {
            return;
        }
        if !plain {
            self.shared.push_back((id, shared.get_or_insert_with(|| m.to_message()).clone()));
        }
        if m.stamp != 0 {
            self.stamps.push_back((id, m.stamp));
        }
        // A message that is not plain is listed by its topic alone (for matching).
        let payload = if plain { m.payload } else { &[] };
        let n = m.topic.len() + payload.len();
        let fits_back = |s: &Segment| {
            s.next_is(id)
                && s.entries.len() < SEGMENT_ENTRIES
                && matches!(&s.data, Data::Copied(v) if v.capacity() - v.len() >= n)
        };
        if !self.segments.back().is_some_and(fits_back) {
            self.trim(m.arrived.saturating_sub(WINDOW_NS));
            let copies = match self.spare_copies.take() {
                Some(v) if v.capacity() >= n => v,
                _ => Vec::with_capacity(CHUNK.max(n)),
            };
            let s = Segment::new(id, Data::Copied(copies), &mut self.spare);
            self.segments.push_back(s);
        }
        let Some(s) = self.segments.back_mut() else { return };
        let Data::Copied(v) = &mut s.data else { return };
        let at = v.len();
        v.extend_from_slice(m.topic.as_bytes());
        v.extend_from_slice(payload);
        let e = Entry {
            topic_at: at as u32,
            payload_at: (at + m.topic.len()) as u32,
            payload_len: payload.len() as u32,
            topic_len: m.topic.len() as u16,
            flags: m.qos as u8 | if plain { 0 } else { SHARED },
        };
        s.push(e, sent, m);
        s.bytes += n + ENTRY;
        self.bytes += n + ENTRY;
    }

    /// Drops the oldest segments while everything in them arrived before `before`, or while the
    /// rest still holds `MAX_ENTRIES` messages or `MAX_BYTES`: the list keeps at least the
    /// window or the bounds, and at most one segment more.
    pub fn trim(&mut self, before: u64) {
        let mut moved = false;
        while let Some(s) = self.segments.front() {
            let old = s.newest < before;
            let rest = (self.next - s.first - s.entries.len() as u64) as usize;
            if !old && rest < MAX_ENTRIES && self.bytes - s.bytes < MAX_BYTES {
                break;
            }
            if let Some(mut s) = self.segments.pop_front() {
                self.bytes -= s.bytes;
                if self.spare.len() < 4 {
                    s.entries.clear();
                    s.sent.clear();
                    s.runs.clear();
                    self.spare.push((s.entries, s.sent, s.runs));
                }
                if let Data::Copied(mut v) = s.data {
                    if v.capacity() == CHUNK {
                        v.clear();
                        self.spare_copies = Some(v);
                    }
                }
            }
            moved = true;
        }
        if !moved {
            return;
        }
        let first = self.first();
        while self.shared.front().is_some_and(|(id, _)| *id < first) {
            self.shared.pop_front();
        }
        while self.stamps.front().is_some_and(|(id, _)| *id < first) {
            self.stamps.pop_front();
        }
        if !self.given.is_empty() {
            self.given = self.given.split_off(&first);
        }
    }

    /// The listed messages that arrived after `since` and whose topic `wanted` says yes to (with
    /// what it says), oldest first.
    pub fn matching<T>(&self, since: u64, mut wanted: impl FnMut(&str) -> Option<T>) -> Vec<(Listed, T)> {
        let mut out = Vec::new();
        for s in self.segments.iter().filter(|s| s.newest > since) {
            let bytes = s.bytes();
            let (mut runs, mut sents) = (s.runs.iter().peekable(), s.sent.iter().peekable());
            let (mut run, mut sent) = (Run::default(), 0);
            for (i, (id, e)) in (s.first..).zip(&s.entries).enumerate() {
                while let Some((_, r)) = runs.next_if(|(at, _)| *at as usize <= i) {
                    run = *r;
                }
                while let Some((_, x)) = sents.next_if(|(at, _)| *at as usize <= i) {
                    sent = *x;
                }
                if run.arrived <= since {
                    continue;
                }
                let (t, p) = (e.topic_at as usize, e.payload_at as usize);
                let topic = bytes.get(t..t + e.topic_len as usize).and_then(|t| std::str::from_utf8(t).ok());
                let payload = bytes.get(p..p + e.payload_len as usize);
                let (Some(topic), Some(payload), Some(qos)) = (topic, payload, QoS::from_u8(e.flags & 3)) else {
                    continue;
                };
                let Some(t) = wanted(topic) else { continue };
                let msg = if e.flags & SHARED == 0 {
                    let i = self.stamps.partition_point(|(i, _)| *i < id);
                    let stamp = self.stamps.get(i).filter(|(i, _)| *i == id).map_or(0, |(_, s)| *s);
                    let view = View {
                        topic,
                        payload,
                        qos,
                        origin: run.source.origin,
                        publisher: run.source.publisher,
                        read_at: run.source.read_at,
                        stamp,
                        ..View::default()
                    };
                    Some(view.to_message())
                } else {
                    let i = self.shared.partition_point(|(i, _)| *i < id);
                    self.shared.get(i).filter(|(i, _)| *i == id).map(|(_, m)| m.clone())
                };
                if let Some(msg) = msg {
                    out.push((Listed { seq: id as u32, sent, msg, id }, t));
                }
            }
        }
        out
    }

    /// Whether catching up may give `l` to `who`: not given to it already, nor to too many.
    pub fn may_give(&self, l: &Listed, who: Who) -> bool {
        self.given.get(&l.id).is_none_or(|g| g.len() < GIVEN_MAX && !g.contains(&who))
    }

    /// Catching up gave `l` to `who`.
    pub fn give(&mut self, l: &Listed, who: Who) {
        if l.id >= self.first() {
            self.given.entry(l.id).or_default().push(who);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, QoS};
    use crate::session::Publisher;

    /// Lists a message on `topic` that arrived at `arrived`, sent to `peers`.
    fn list(r: &mut Recent, arrived: u64, topic: &str, peers: &[u16]) {
        let m = Message::plain(topic, bytes::Bytes::from_static(b"payload"), QoS::AtLeastOnce, false);
        let v = View { arrived, ..super::super::deliver::view(&m) };
        let id = r.next_id(true);
        r.record(&v, id, peers, &mut None);
    }

    fn topics(r: &Recent, since: u64, prefix: &str) -> Vec<String> {
        r.matching(since, |t| t.starts_with(prefix).then_some(()))
            .into_iter()
            .map(|(l, ())| l.msg.topic.to_string())
            .collect()
    }

    #[test]
    fn the_list_is_bounded_by_age_count_and_bytes() {
        let mut r = Recent::new(2, true);
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            list(&mut r, 1_000 + i, "a", &[]);
        }
        // Each message copied alone (no read is being handled): a segment holds as many as it
        // has entries for.
        let per_segment = SEGMENT_ENTRIES;
        assert!(r.len() >= MAX_ENTRIES && r.len() <= MAX_ENTRIES + per_segment, "{}", r.len());
        assert_eq!(topics(&r, 0, "a").len(), r.len());
        // A full segment later, everything older than the window goes but what shares a segment with
        // a newer message.
        for i in 0..=per_segment as u64 {
            list(&mut r, 10 * WINDOW_NS + i, "a", &[1]);
        }
        assert!(r.len() <= 2 * per_segment + 1 && r.segments.len() <= 2, "{} in {}", r.len(), r.segments.len());
        assert_eq!(topics(&r, 10 * WINDOW_NS - 1, "a").len(), per_segment + 1);
        r.trim(u64::MAX);
        assert_eq!((r.len(), r.segments.len(), r.bytes), (0, 0, 0));
        let big = "b".repeat(60_000);
        for i in 0..200 {
            list(&mut r, 20 * WINDOW_NS + i, &big, &[]);
        }
        assert!(r.bytes <= MAX_BYTES + 2 * CHUNK && r.len() < 200, "bounded in bytes: {} in {}", r.len(), r.bytes);
    }

    #[test]
    fn only_what_arrived_after_and_matches_is_found_oldest_first_with_where_it_went() {
        let mut r = Recent::new(4, true);
        for (t, topic, peers) in
            [(100, "a/1", &[1u16][..]), (200, "b/1", &[]), (300, "a/2", &[2, 3]), (400, "a/3", &[])]
        {
            list(&mut r, t, topic, peers);
        }
        let found = r.matching(250, |t| t.starts_with("a/").then(|| t.len()));
        let got: Vec<_> = found.iter().map(|(l, n)| (l.msg.topic.to_string(), l.seq, l.sent, *n)).collect();
        assert_eq!(got, [("a/2".to_string(), 3, 0b1100, 3), ("a/3".to_string(), 4, 0, 3)]);
        assert_eq!(&found[0].0.msg.payload[..], b"payload");
        assert_eq!(found[0].0.msg.qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_message_is_given_to_a_session_once_and_to_at_most_a_bound() {
        let mut r = Recent::new(2, true);
        list(&mut r, 100, "a", &[]);
        let (l, ()) = r.matching(0, |_| Some(())).pop().expect("listed");
        assert!(r.may_give(&l, (1, 2, 3)));
        r.give(&l, (1, 2, 3));
        assert!(!r.may_give(&l, (1, 2, 3)));
        for i in 0..GIVEN_MAX as u32 {
            r.give(&l, (1, 10 + i, 0));
        }
        assert!(!r.may_give(&l, (1, 99, 0)), "past the bound nobody else gets it");
        r.trim(u64::MAX);
        assert!(r.given.is_empty(), "trimmed with its message");
    }

    #[test]
    fn records_cross_segments_and_segments_go_with_their_records() {
        let mut r = Recent::new(2, true);
        let big = "t/".to_string() + &"x".repeat(1000);
        for i in 0..1000u64 {
            list(&mut r, 1_000 + i, &format!("{big}/{i}"), &[]);
        }
        assert!(r.segments.len() > 2);
        let got = topics(&r, 1_500, "t/");
        assert_eq!((got.len(), got[0].clone(), got[498].clone()), (499, format!("{big}/501"), format!("{big}/999")));
        let before = r.segments.len();
        r.trim(1_900);
        let got = topics(&r, 1_899, "t/");
        assert_eq!((got.len(), got[0].clone()), (100, format!("{big}/900")));
        assert!(r.segments.len() < before / 2, "segments of old messages go: {} of {before}", r.segments.len());
        assert!(topics(&r, 0, "t/").len() < 100 + CHUNK / 1000, "at most a segment more is kept");
    }

    #[test]
    fn a_run_of_copies_from_one_read_is_kept_once_and_each_message_keeps_what_routing_needs() {
        let mut r = Recent::new(4, true);
        let one = Publisher { worker: 1, conn: 7, conn_uid: 70 };
        let other = Publisher { worker: 1, conn: 8, conn_uid: 80 };
        let read = |topic: &'static str, qos, publisher, stamp| View {
            topic,
            payload: topic.as_bytes(),
            qos,
            origin: Some((1, 3)),
            publisher: Some(publisher),
            stamp,
            read_at: Some(5_000),
            arrived: 100,
            ..View::default()
        };
        let routed = [
            (read("a/1", QoS::AtMostOnce, one, 0), &[2u16][..]),
            (read("a/2", QoS::AtLeastOnce, one, 9), &[]),
            (read("a/3", QoS::ExactlyOnce, one, 0), &[2, 3]),
            (read("a/4", QoS::AtMostOnce, other, 0), &[]),
        ];
        for (v, peers) in &routed {
            let id = r.next_id(true);
            r.record(v, id, peers, &mut None);
        }
        let c = r.segments.back().expect("a segment");
        let data: usize = routed.iter().map(|(v, _)| 2 * v.topic.len()).sum();
        assert_eq!((c.bytes().len(), c.runs.len()), (data, 2), "one run for the first three, one for the fourth");
        let found = r.matching(99, |t| Some(t.to_string()));
        assert_eq!(found.len(), 4);
        for ((l, topic), (v, peers)) in found.iter().zip(&routed) {
            let m = &l.msg;
            assert_eq!((&m.topic[..], &m.payload[..], m.qos, m.stamp), (v.topic, v.topic.as_bytes(), v.qos, v.stamp));
            assert_eq!((m.origin, m.publisher, m.read_at), (v.origin, v.publisher, v.read_at));
            assert_eq!((topic.as_str(), l.sent), (v.topic, peers.iter().fold(0, |s, &p| s | 1 << p)));
        }
        assert_eq!(found.iter().map(|(l, _)| l.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(r.matching(100, |_| Some(())).is_empty(), "arrived at 100: not after 100");
    }

    #[test]
    fn a_message_with_properties_is_found_whole() {
        let mut r = Recent::new(2, true);
        let mut m = Message::plain("p", bytes::Bytes::from_static(b"x"), QoS::AtMostOnce, false);
        m.properties = Some(Box::new(Properties { content_type: Some("text/plain".into()), ..Default::default() }));
        let v = View { arrived: 5, ..super::super::deliver::view(&m) };
        let id = r.next_id(true);
        r.record(&v, id, &[], &mut None);
        list(&mut r, 6, "p", &[]);
        let found = r.matching(0, |_| Some(()));
        assert_eq!(found.len(), 2);
        assert!(found[0].0.msg.properties.is_some() && found[1].0.msg.properties.is_none());
        assert_eq!(&found[0].0.msg.payload[..], b"x");
    }

    /// Where a message's topic and payload lie in a read.
    type Lies = (std::ops::Range<usize>, std::ops::Range<usize>);

    /// A read of `n` messages on `t/0`.. with payloads `p0`.., each behind a few bytes of
    /// something else, as packets would be; and where each topic and payload lies in it.
    fn read(n: usize) -> (bytes::BytesMut, Vec<Lies>) {
        let mut buf = bytes::BytesMut::new();
        let mut at = Vec::new();
        for i in 0..n {
            buf.extend_from_slice(&[0x30, 0, 0, 0]);
            let t = buf.len();
            buf.extend_from_slice(format!("t/{i}").as_bytes());
            let p = buf.len();
            buf.extend_from_slice(format!("p{i}").as_bytes());
            at.push((t..p, p..buf.len()));
        }
        buf.resize(buf.len().max(PASS_MIN), 0);
        (buf, at)
    }

    /// What one read's messages share.
    fn from_read<'a>(buf: &'a [u8], (t, p): &Lies) -> View<'a> {
        View {
            topic: std::str::from_utf8(&buf[t.clone()]).expect("utf-8"),
            payload: &buf[p.clone()],
            qos: QoS::AtLeastOnce,
            origin: Some((1, 2)),
            publisher: Some(Publisher { worker: 1, conn: 3, conn_uid: 4 }),
            read_at: Some(77),
            arrived: 500,
            ..View::default()
        }
    }

    #[test]
    fn a_read_is_kept_as_it_came_and_its_messages_point_into_it() {
        let mut r = Recent::new(4, true);
        let (mut buf, at) = read(100);
        r.begin_pass(&buf[..], buf.capacity());
        for (i, a) in at.iter().enumerate() {
            let v = from_read(&buf, a);
            let id = r.next_id(true);
            r.record(&v, id, if i < 50 { &[1] } else { &[2, 3] }, &mut None);
        }
        assert!(r.pass_listed() && r.segments.is_empty(), "the pass's segment waits for its bytes");
        let end = at[99].1.end;
        let base = buf.as_ptr();
        let kept = buf.split_to(end).freeze();
        assert_eq!(kept.as_ptr(), base, "the same bytes, not a copy");
        r.end_pass(Some(kept));
        // The buffer goes on being read into: the list's bytes do not change.
        buf.clear();
        buf.extend_from_slice(&[0xff; 64]);
        let s = r.segments.back().expect("listed");
        assert!(matches!(s.data, Data::Kept(_)));
        assert_eq!((s.entries.len(), s.runs.len(), s.sent.len()), (100, 1, 2), "one run, two sets of peers");
        assert_eq!(r.bytes, KEPT_BUFFER + 100 * ENTRY, "counted as the read buffer it keeps");
        let found = r.matching(499, |t| Some(t.to_string()));
        assert_eq!(found.len(), 100);
        for (i, (l, topic)) in found.iter().enumerate() {
            assert_eq!((topic.as_str(), &l.msg.payload[..]), (format!("t/{i}").as_str(), format!("p{i}").as_bytes()));
            assert_eq!((l.seq, l.sent), (i as u32 + 1, if i < 50 { 0b10 } else { 0b1100 }));
            let m = &l.msg;
            assert_eq!((m.qos, m.origin, m.read_at), (QoS::AtLeastOnce, Some((1, 2)), Some(77)));
            assert_eq!(m.publisher, Some(Publisher { worker: 1, conn: 3, conn_uid: 4 }));
        }
        assert!(r.matching(500, |_| Some(())).is_empty(), "arrived at 500: not after 500");
    }

    #[test]
    fn what_is_routed_from_elsewhere_during_a_read_is_copied_in_its_place() {
        let mut r = Recent::new(2, true);
        let (mut buf, at) = read(4);
        r.begin_pass(&buf[..], buf.capacity());
        let route = |r: &mut Recent, v: &View<'_>| {
            let id = r.next_id(true);
            r.record(v, id, &[], &mut None);
        };
        route(&mut r, &from_read(&buf, &at[0]));
        route(&mut r, &from_read(&buf, &at[1]));
        // A will, say: its bytes are not in the read.
        let will = Message::plain("will", bytes::Bytes::from_static(b"gone"), QoS::AtMostOnce, false);
        route(&mut r, &View { arrived: 600, ..super::super::deliver::view(&will) });
        // The read's next messages come after it: copied too, so numbers stay in order.
        route(&mut r, &from_read(&buf, &at[2]));
        route(&mut r, &from_read(&buf, &at[3]));
        let kept = buf.split_to(at[3].1.end).freeze();
        r.end_pass(Some(kept));
        buf.clear();
        buf.resize(PASS_MIN, b'x');
        let got: Vec<_> = r
            .matching(0, |t| Some(t.to_string()))
            .into_iter()
            .map(|(l, t)| (l.seq, t, String::from_utf8_lossy(&l.msg.payload).into_owned()))
            .collect();
        let want = [(1, "t/0", "p0"), (2, "t/1", "p1"), (3, "will", "gone"), (4, "t/2", "p2"), (5, "t/3", "p3")];
        assert_eq!(got, want.map(|(s, t, p)| (s, t.to_string(), p.to_string())));
        assert_eq!(r.segments.len(), 2, "the read's segment, then one of copies");
    }

    #[test]
    fn a_short_read_is_copied_and_a_read_without_its_bytes_lists_nothing() {
        let mut r = Recent::new(2, true);
        let short = b"t/ap";
        r.begin_pass(short, short.len());
        assert!(r.pass.is_none(), "shorter than PASS_MIN: messages are copied");
        let (buf, at) = read(3);
        r.begin_pass(&buf[..], buf.capacity());
        for a in &at {
            let id = r.next_id(true);
            r.record(&from_read(&buf, a), id, &[], &mut None);
        }
        // Bytes that are not the pass's (a broken caller): kept nowhere, found nowhere, trimmed.
        r.end_pass(Some(bytes::Bytes::from_static(b"elsewhere")));
        assert_eq!(r.len(), 3);
        assert!(r.matching(0, |_| Some(())).is_empty());
        r.trim(u64::MAX);
        assert_eq!((r.len(), r.bytes), (0, 0));
    }

    #[test]
    fn kept_reads_count_the_read_buffer_they_keep_and_a_large_packets_buffer_is_not_kept() {
        let mut r = Recent::new(2, true);
        // One message per read, each read keeping a read buffer from being freed.
        for i in 0..500u64 {
            let (mut buf, at) = read(1);
            r.begin_pass(&buf[..], buf.capacity());
            let id = r.next_id(true);
            r.record(&View { arrived: 1_000 + i, ..from_read(&buf, &at[0]) }, id, &[], &mut None);
            let kept = buf.split_to(at[0].1.end).freeze();
            r.end_pass(Some(kept));
        }
        let most = MAX_BYTES / KEPT_BUFFER + 1;
        assert!(r.bytes <= MAX_BYTES + KEPT_BUFFER + 2 * ENTRY, "{}", r.bytes);
        assert!(r.len() <= most && r.segments.len() == r.len(), "{} kept of 500", r.len());
        assert_eq!(topics(&r, 0, "t/").len(), r.len());
        // A read in a buffer larger than an ordinary one (a large packet's): copied, not kept.
        let (buf, at) = read(1);
        r.begin_pass(&buf[..], KEPT_BUFFER + 1);
        assert!(r.pass.is_none());
        let id = r.next_id(true);
        r.record(&View { arrived: 2_000, ..from_read(&buf, &at[0]) }, id, &[], &mut None);
        assert!(matches!(r.segments.back().map(|s| &s.data), Some(Data::Copied(_))));
    }

    #[test]
    fn a_read_of_many_small_messages_lists_at_most_the_count_in_place() {
        let mut r = Recent::new(2, true);
        let (mut buf, at) = read(MAX_ENTRIES + 10);
        r.begin_pass(&buf[..], buf.capacity());
        for a in &at {
            let id = r.next_id(true);
            r.record(&from_read(&buf, a), id, &[], &mut None);
        }
        assert_eq!(r.pass.as_ref().map(|p| p.segment.entries.len()), Some(MAX_ENTRIES));
        let kept = buf.split_to(at[MAX_ENTRIES + 9].1.end).freeze();
        r.end_pass(Some(kept));
        let found = topics(&r, 0, "t/");
        assert_eq!(found.len(), r.len());
        assert_eq!(found.last().map(String::as_str), Some(format!("t/{}", MAX_ENTRIES + 9).as_str()));
    }
}
