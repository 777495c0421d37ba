//! The list of what a worker routed in the last moments, for arrival order across workers
//! (`catchup` says why and how it is asked). It owns the list and its bounds, nothing else: it
//! never sends or delivers.
//!
//! Listing is on the path of every PUBLISH a client sends, so it costs one copy and nothing more:
//! each message goes to the end of a log of chunks, as a record of what is its own (peers it was
//! sent to, QoS, stamp, topic, payload) behind a run head of what the messages of one read share
//! (arrival stamp, origin, publisher, read time), written once per run. Its sequence number is its
//! place in the log. No allocation per message, no index beside the log: records are in sequence
//! order, so the oldest is at the front, the count is a difference of sequence numbers, and
//! trimming moves the front forward, dropping a chunk once it holds nothing listed. A message that
//! is not plain (`batch::fits`: 5.0 properties or an expiry) keeps its shared copy on a side
//! list, and what catching up has given to whom is kept on another, both rare.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::batch::{self, field, Source, SOURCE};
use super::deliver::View;
use crate::codec::QoS;
use crate::session::Message;

/// How long a routed message stays on the list, by its arrival stamp.
pub const WINDOW_NS: u64 = 500_000_000;
/// At most this many messages, and this many bytes of log, stay on the list.
pub const MAX_ENTRIES: usize = 4096;
pub const MAX_BYTES: usize = 8 << 20;
/// Sessions one message is remembered as given to; past it the message is caught up no more, so
/// SUBSCRIBEs from many sessions cannot grow an entry without end.
pub const GIVEN_MAX: usize = 64;

/// Log chunks are this large (a larger message gets a chunk of its own): the list holds at most
/// one chunk more than its bounds.
const CHUNK: usize = 64 * 1024;
/// A message record: flags (QoS, on the shared side list), peers sent to, stamp, topic length,
/// payload length; then topic and payload.
const MSG_HEAD: usize = 1 + 8 + 8 + 2 + 4;
const SHARED: u8 = 1 << 2;
/// A run head: flags, arrival stamp, origin, publisher, read time. It comes before a run of
/// messages that share them (one read of one connection), and at the start of each chunk.
const RUN_HEAD: usize = 1 + 8 + SOURCE;
const RUN_MARK: u8 = 1 << 7;

/// What consecutive messages from one read share, written once for the run.
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
    fn continued_by(&self, m: &View<'_>) -> bool {
        self.arrived == m.arrived
            && self.source.publisher == m.publisher
            && self.source.read_at == m.read_at
            && self.source.origin == m.origin
    }

    fn head(&self) -> [u8; RUN_HEAD] {
        let mut h = [0u8; RUN_HEAD];
        h[0] = RUN_MARK | self.source.put(&mut h[9..9 + SOURCE]);
        h[1..9].copy_from_slice(&self.arrived.to_le_bytes());
        h
    }

    fn read(r: &[u8]) -> Option<Run> {
        if r.len() < RUN_HEAD {
            return None;
        }
        Some(Run { arrived: u64::from_le_bytes(field(r, 1)), source: Source::get(&r[9..9 + SOURCE], r[0]) })
    }
}

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

/// A run of records, in list order.
struct Chunk {
    /// The list-wide number of its first record, and how many it holds.
    first: u64,
    count: u64,
    /// The latest arrival stamp in it.
    newest: u64,
    buf: Vec<u8>,
}

/// What a worker routed in the last moments.
pub struct Recent {
    /// `arrival_order` is on and there is more than one worker (at most 64: `sent` is one bit
    /// each).
    pub on: bool,
    /// Oldest first; the list is trimmed a whole chunk at a time, so listing a message never
    /// reads an old one.
    chunks: VecDeque<Chunk>,
    /// One emptied chunk, kept for the next.
    spare: Option<Vec<u8>>,
    /// The run the back chunk's last message belongs to.
    run: Option<Run>,
    /// Bytes in the chunks.
    bytes: usize,
    /// The list-wide number of the next record; the mail carries the low 32 bits.
    next: u64,
    /// Messages that are not plain, by list-wide number.
    shared: VecDeque<(u64, Arc<Message>)>,
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
            chunks: VecDeque::new(),
            spare: None,
            run: None,
            bytes: 0,
            next: 1,
            shared: VecDeque::new(),
            given: BTreeMap::new(),
            taken: vec![0; workers],
            caught_up: 0,
        }
    }

    /// The list-wide number of the oldest listed record.
    fn first(&self) -> u64 {
        self.chunks.front().map_or(self.next, |c| c.first)
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

    /// Puts a routed message on the list, under the number `next_id` gave it.
    pub fn record(&mut self, m: &View<'_>, id: u64, peers: &[u16], shared: &mut Option<Arc<Message>>) {
        let sent = peers.iter().fold(0u64, |s, &p| s | 1 << p);
        // A plain message is copied even when a shared copy exists (queued for a subscriber):
        // holding it here would free thousands at once when a chunk goes, which glibc's
        // allocator takes badly.
        let plain = batch::fits(m);
        if !plain {
            self.shared.push_back((id, shared.get_or_insert_with(|| m.to_message()).clone()));
        }
        // A message that is not plain is listed by its topic alone (for matching).
        let payload = if plain { m.payload } else { &[] };
        let n = MSG_HEAD + m.topic.len() + payload.len();
        // A chunk holds consecutive numbers (routing one message never routes another, but a
        // chunk would not be misread if it did), and starts with a run head of its own.
        if !self
            .chunks
            .back()
            .is_some_and(|c| c.buf.capacity() - c.buf.len() >= RUN_HEAD + n && c.first + c.count == id)
        {
            self.trim(m.arrived.saturating_sub(WINDOW_NS));
            let buf = match self.spare.take() {
                Some(c) if c.capacity() >= RUN_HEAD + n => c,
                _ => Vec::with_capacity(CHUNK.max(RUN_HEAD + n)),
            };
            self.chunks.push_back(Chunk { first: id, count: 0, newest: 0, buf });
            self.run = None;
        }
        let Some(c) = self.chunks.back_mut() else { return };
        let before = c.buf.len();
        if !self.run.as_ref().is_some_and(|r| r.continued_by(m)) {
            let run = Run::of(m);
            self.run = Some(run);
            c.buf.extend_from_slice(&run.head());
        }
        let mut head = [0u8; MSG_HEAD];
        head[0] = m.qos as u8 | if plain { 0 } else { SHARED };
        head[1..9].copy_from_slice(&sent.to_le_bytes());
        head[9..17].copy_from_slice(&m.stamp.to_le_bytes());
        head[17..19].copy_from_slice(&(m.topic.len() as u16).to_le_bytes());
        head[19..23].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        c.buf.extend_from_slice(&head);
        c.buf.extend_from_slice(m.topic.as_bytes());
        c.buf.extend_from_slice(payload);
        c.count += 1;
        c.newest = c.newest.max(m.arrived);
        self.bytes += c.buf.len() - before;
    }

    /// Drops the oldest chunks while everything in them arrived before `before`, or while the
    /// rest still holds `MAX_ENTRIES` messages or `MAX_BYTES`: the list keeps at least the
    /// window or the bounds, and at most one chunk more.
    pub fn trim(&mut self, before: u64) {
        let mut moved = false;
        while let Some(c) = self.chunks.front() {
            let old = c.newest < before;
            let rest = (self.next - c.first - c.count) as usize;
            if !old && rest < MAX_ENTRIES && self.bytes - c.buf.len() < MAX_BYTES {
                break;
            }
            if let Some(mut c) = self.chunks.pop_front() {
                self.bytes -= c.buf.len();
                if c.buf.capacity() == CHUNK {
                    c.buf.clear();
                    self.spare = Some(c.buf);
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
        if !self.given.is_empty() {
            self.given = self.given.split_off(&first);
        }
    }

    /// The listed messages that arrived after `since` and whose topic `wanted` says yes to (with
    /// what it says), oldest first.
    pub fn matching<T>(&self, since: u64, mut wanted: impl FnMut(&str) -> Option<T>) -> Vec<(Listed, T)> {
        let mut out = Vec::new();
        for c in self.chunks.iter().filter(|c| c.newest > since) {
            let (mut at, mut id, mut run) = (0, c.first, Run::default());
            while let Some(r) = c.buf.get(at..).filter(|r| !r.is_empty()) {
                if r[0] & RUN_MARK != 0 {
                    let Some(next) = Run::read(r) else { break };
                    run = next;
                    at += RUN_HEAD;
                    continue;
                }
                if r.len() < MSG_HEAD {
                    break;
                }
                let topic_len = u16::from_le_bytes(field(r, 17)) as usize;
                let len = MSG_HEAD + topic_len + u32::from_le_bytes(field(r, 19)) as usize;
                if len > r.len() {
                    break;
                }
                let Some(qos) = QoS::from_u8(r[0] & 3) else { break };
                let topic = std::str::from_utf8(&r[MSG_HEAD..MSG_HEAD + topic_len]).ok();
                if let Some((topic, t)) = topic.filter(|_| run.arrived > since).and_then(|tp| Some((tp, wanted(tp)?))) {
                    let msg = if r[0] & SHARED == 0 {
                        let view = View {
                            topic,
                            payload: &r[MSG_HEAD + topic_len..len],
                            qos,
                            origin: run.source.origin,
                            publisher: run.source.publisher,
                            stamp: u64::from_le_bytes(field(r, 9)),
                            read_at: run.source.read_at,
                            ..View::default()
                        };
                        Some(view.to_message())
                    } else {
                        let i = self.shared.partition_point(|(i, _)| *i < id);
                        self.shared.get(i).filter(|(i, _)| *i == id).map(|(_, m)| m.clone())
                    };
                    if let Some(msg) = msg {
                        let sent = u64::from_le_bytes(field(r, 1));
                        out.push((Listed { seq: id as u32, sent, msg, id }, t));
                    }
                }
                at += len;
                id += 1;
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
        let per_chunk = CHUNK / (RUN_HEAD + MSG_HEAD + 1 + 7);
        assert!(r.len() >= MAX_ENTRIES && r.len() <= MAX_ENTRIES + per_chunk, "{}", r.len());
        assert_eq!(topics(&r, 0, "a").len(), r.len());
        // A full chunk later, everything older than the window goes but what shares a chunk with
        // a newer message.
        for i in 0..=per_chunk as u64 {
            list(&mut r, 10 * WINDOW_NS + i, "a", &[1]);
        }
        assert!(r.len() <= 2 * per_chunk + 1 && r.chunks.len() <= 2, "{} in {}", r.len(), r.chunks.len());
        assert_eq!(topics(&r, 10 * WINDOW_NS - 1, "a").len(), per_chunk + 1);
        r.trim(u64::MAX);
        assert_eq!((r.len(), r.chunks.len(), r.bytes), (0, 0, 0));
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
    fn records_cross_chunks_and_chunks_go_with_their_records() {
        let mut r = Recent::new(2, true);
        let big = "t/".to_string() + &"x".repeat(1000);
        for i in 0..1000u64 {
            list(&mut r, 1_000 + i, &format!("{big}/{i}"), &[]);
        }
        assert!(r.chunks.len() > 2);
        let got = topics(&r, 1_500, "t/");
        assert_eq!((got.len(), got[0].clone(), got[498].clone()), (499, format!("{big}/501"), format!("{big}/999")));
        let before = r.chunks.len();
        r.trim(1_900);
        let got = topics(&r, 1_899, "t/");
        assert_eq!((got.len(), got[0].clone()), (100, format!("{big}/900")));
        assert!(r.chunks.len() < before / 2, "chunks of old messages go: {} of {before}", r.chunks.len());
        assert!(topics(&r, 0, "t/").len() < 100 + CHUNK / 1000, "at most a chunk more is kept");
    }

    #[test]
    fn a_run_from_one_read_shares_one_head_and_each_message_keeps_what_routing_needs() {
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
        let c = r.chunks.back().expect("a chunk");
        let data: usize = routed.iter().map(|(v, _)| MSG_HEAD + 2 * v.topic.len()).sum();
        assert_eq!(c.buf.len(), 2 * RUN_HEAD + data, "one head for the first three, one for the fourth");
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
}
