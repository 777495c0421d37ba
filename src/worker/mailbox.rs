//! The mailbox between workers: what one worker sends another (`Mail`), the rings it goes
//! through, the batch of plain messages being filled for each peer (its layout is `batch`'s) and
//! the emptied batches given back for reuse, the bounded overflow kept while a peer's ring is
//! full, and wake-ups batched to at most one per sleep of a peer. Also the operations waiting for
//! peers' acknowledgements (`Pending`): a SUBSCRIBE that announced a new filter completes only
//! once every peer applied it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use slab::Slab;

use super::batch::{self, Batch, BATCH_BYTES};
use super::conn::ConnKey;
use super::deliver::View;
use crate::broker::Shared;
use crate::codec::{Connect, MqttStr, SubAck};
use crate::ring::{Consumer, Producer};
use crate::router::Member;
use crate::session::{Delivery, GroupKey, Message, SessionKey, Subscription};

/// Messages a worker holds for a peer whose ring is full, before it drops (and counts) them.
pub const OVERFLOW_LIMIT: usize = 64 * 1024;
/// Bytes of batched QoS 0 messages a worker holds for a peer whose ring is full, before it drops
/// (and counts) them.
pub const OVERFLOW_BYTES: usize = 8 << 20;
/// A batch is pushed only while the ring holds fewer entries than this: what one ring can hold in
/// batches is bounded in bytes (32 x `BATCH_BYTES`), not only in entries.
pub const RING_BATCHES: usize = 32;
/// Empty batches kept per peer for reuse.
const POOL: usize = 4;
/// Batches smaller than this are not given back.
const GIVE_BACK_BYTES: usize = 4096;

/// A ticket for an operation waiting on peers: (the waiting worker's index into its `Pending`).
pub type Ticket = u32;

/// What one worker sends another. Kept to 16 bytes (larger variants are boxed): a ring is an
/// array of these, one ring per ordered pair of workers.
pub enum Mail {
    /// Plain messages to deliver to the receiver's matching sessions, in routing order (`batch`).
    Batch(Box<Batch>),
    /// A batch the sender read, given back empty to be filled again.
    Spent(Box<Batch>),
    /// A message that is not plain (retained, with properties or an expiry) to deliver to the
    /// receiver's matching sessions; a retained one is stored in the receiver's replica if `keep`
    /// (the sender found room for it under the retained budgets, so every replica makes the same
    /// choice).
    Publish {
        msg: Arc<Message>,
        keep: bool,
        /// The sender's latest `recent::Recent` sequence number.
        seq: u32,
    },
    /// A connection whose client id lives on the receiving worker.
    Handover(Box<Handover>),
    /// The sender now wants (or no longer wants) messages matching these filters. With a ticket,
    /// the receiver answers `Ack` once it has applied them.
    Interest(Box<InterestChange>),
    /// Answers an `Interest` or a `SharedJoin` that carried a ticket.
    Ack {
        ticket: Ticket,
    },
    /// To a shared group's home worker: a session joins; answered with `Ack` once the group's
    /// filter is of interest everywhere.
    SharedJoin(Box<(GroupKey, Member, Ticket)>),
    /// To a shared group's home worker: a session leaves the group.
    SharedLeave {
        key: Box<GroupKey>,
        worker: u16,
        session: u32,
    },
    /// From a shared group's home worker: deliver this to the chosen member, if it is still the
    /// session with `uid`.
    SharedDeliver(Box<(u32, u64, Delivery)>),
    /// To a shared group's home worker: a member went away without acknowledging this.
    SharedRedeliver(Box<(GroupKey, Arc<Message>)>),
    /// Flow control: a congested subscriber holds this publishing connection, or lets it go.
    Pause {
        conn: u32,
        uid: u64,
    },
    Resume {
        conn: u32,
        uid: u64,
    },
    /// A subscription added on the sender asks for the messages that arrived after it (`catchup`).
    CatchUpAsk(Box<super::catchup::CatchUpAsk>),
    /// One message a new subscription missed.
    CatchUp(Box<super::catchup::CatchUp>),
    /// The sender took `n` more QoS 1/2 messages from the receiver's credit window.
    Credit {
        n: u32,
    },
}

/// Filters a worker now wants (or no longer wants); with a ticket, to be acknowledged.
pub struct InterestChange {
    pub filters: Vec<MqttStr>,
    pub worker: u16,
    pub present: bool,
    pub ticket: Option<Ticket>,
}

/// A connection moving to the worker that is home to its client id, with its parsed CONNECT and
/// the bytes read after it.
pub struct Handover {
    pub transport: crate::transport::Transport,
    pub rest: BytesMut,
    pub connect: Box<Connect>,
    pub assigned_id: bool,
    pub created: Instant,
}

/// One worker's ends of the rings, and what it owes each peer.
pub struct Mailbox {
    id: usize,
    outbox: Vec<Option<Producer<Mail>>>,
    inbox: Vec<Option<Consumer<Mail>>>,
    overflow: Vec<VecDeque<Mail>>,
    /// Bytes of the batches in `overflow`, per peer.
    held_bytes: Vec<usize>,
    /// The batch being filled for each peer, and the size of the last one sent.
    batches: Vec<Option<Box<Batch>>>,
    last_batch: Vec<usize>,
    /// Batches each peer has read and given back, to be filled again: the buffers circulate
    /// between two workers instead of being allocated by one and freed by the other.
    pool: Vec<Vec<Box<Batch>>>,
    wake: Vec<bool>,
    /// Pushes into rings, and wake-ups sent, for `$SYS/broker/internal/`.
    pub pushes: u64,
    /// Messages routed to a peer, one per peer (a batch carries many in one push).
    pub crossed: u64,
    pub wakeups: u64,
    /// Turns run for a sleeping peer instead of waking it (`Worker::help`).
    pub helped: u64,
    /// Mail dropped past `OVERFLOW_LIMIT`.
    pub dropped: u64,
    /// Handed-over connections dropped past `OVERFLOW_LIMIT`, not yet taken off the broker's
    /// connection count.
    pub lost_connections: usize,
    /// QoS 1/2 messages sent to each peer that it has not yet credited back, at most
    /// `credit_window` each (see `charge`).
    unconfirmed: Vec<usize>,
    credit_window: usize,
    /// QoS 1/2 messages taken from each peer this turn, credited back at the end of the turn.
    credit_due: Vec<u32>,
}

impl Mailbox {
    pub fn new(id: usize, outbox: Vec<Option<Producer<Mail>>>, inbox: Vec<Option<Consumer<Mail>>>) -> Mailbox {
        let n = outbox.len();
        Mailbox {
            id,
            outbox,
            inbox,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            held_bytes: vec![0; n],
            batches: (0..n).map(|_| None).collect(),
            last_batch: vec![0; n],
            pool: (0..n).map(|_| Vec::new()).collect(),
            wake: vec![false; n],
            pushes: 0,
            crossed: 0,
            wakeups: 0,
            helped: 0,
            dropped: 0,
            lost_connections: 0,
            unconfirmed: vec![0; n],
            credit_window: 1,
            credit_due: vec![0; n],
        }
    }

    /// QoS 1/2 messages that may be on their way to one peer: a publisher paused by a congested
    /// subscriber on that peer has sent at most this many more by the time the pause reaches it
    /// (the pause travels in the same ring as, and ahead of, the credit).
    pub fn set_credit_window(&mut self, window: usize) {
        self.credit_window = window.max(1);
    }

    /// Counts a QoS 1/2 message sent to `to` against its credit window.
    pub fn charge(&mut self, to: usize) {
        self.unconfirmed[to] += 1;
    }

    /// Some peer's credit window is used up: stop reading publishers until it credits back.
    pub fn out_of_credit(&self) -> bool {
        self.unconfirmed.iter().any(|&n| n >= self.credit_window)
    }

    /// A peer's credit for `n` QoS 1/2 messages it has taken.
    pub fn credited(&mut self, from: usize, n: u32) {
        self.unconfirmed[from] = self.unconfirmed[from].saturating_sub(n as usize);
    }

    /// A QoS 1/2 message from `from` was taken: credit it at the end of the turn.
    pub fn owe_credit(&mut self, from: usize) {
        self.credit_due[from] += 1;
    }

    /// Sends each peer one credit for what was taken from it, once that is half its window: a
    /// peer is short of credit only while at least half its window waits in the ring for this
    /// worker (which will take it and owe enough to credit), so it never waits on a credit held
    /// back, and a steady trickle costs one credit mail per half window, not one per turn.
    /// Returns whether it sent any.
    pub fn send_credits(&mut self) -> bool {
        let batch = (self.credit_window / 2).max(1) as u32;
        let mut sent = false;
        for from in 0..self.credit_due.len() {
            let n = self.credit_due[from];
            if n >= batch {
                self.credit_due[from] = 0;
                self.send(from, Mail::Credit { n });
                sent = true;
            }
        }
        sent
    }

    pub fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        let id = self.id;
        (0..self.outbox.len()).filter(move |&p| p != id)
    }

    pub fn peer_count(&self) -> usize {
        self.outbox.len().saturating_sub(1)
    }

    /// Adds a plain message (`batch::fits`) to the batch for a peer, sent at the end of the turn
    /// or before it would hold more than `BATCH_BYTES` (unless one message is larger).
    pub fn publish(&mut self, to: usize, m: &View<'_>, seq: u32) {
        let size = batch::size(m);
        // Sent before it would pass `BATCH_BYTES`, not after: a buffer of that size never grows
        // (a regrowth copies it and, past twice that, it is not reused but freed). A batch being
        // filled holds at least one message, so a larger message still goes.
        if self.batches[to].as_ref().is_some_and(|b| b.bytes() + size > BATCH_BYTES) {
            self.send_batch(to);
        }
        let b = match &mut self.batches[to] {
            Some(b) => b,
            slot => slot.insert(self.pool[to].pop().unwrap_or_else(|| {
                // As large as the last batch to this peer (to a power of two): a trickle
                // allocates little, a flood allocates once, `BATCH_BYTES`.
                let mut b = Box::<Batch>::default();
                b.reserve(size.max(self.last_batch[to].next_power_of_two().min(BATCH_BYTES)));
                b
            })),
        };
        b.push(m, seq);
    }

    /// Sends the batch for `to`, if it holds anything.
    fn send_batch(&mut self, to: usize) {
        if let Some(b) = self.batches[to].take() {
            self.last_batch[to] = b.bytes().min(2 * BATCH_BYTES);
            self.push_or_hold(to, Mail::Batch(b));
        }
    }

    /// A batch from `from` was read: a large one goes back to be filled again, without waking
    /// `from` (it finds it when it next takes its mail), or is freed when the ring is full. A
    /// small one (a trickle of messages, whatever its buffer's size) is freed here: allocating
    /// it again costs less than a ring slot.
    pub fn give_back(&mut self, from: usize, mut b: Box<Batch>) {
        // By what it carried, not by its buffer: a large buffer the sender reused for a trickle
        // would otherwise come back after every message, two ring slots per batch.
        if b.bytes() < GIVE_BACK_BYTES {
            return;
        }
        b.clear();
        if let Some(p) = self.outbox[from].as_mut() {
            if p.push(Mail::Spent(b)).is_ok() {
                self.pushes += 1;
            }
        }
    }

    /// A batch given back by `from`, kept for the next batch to it (a few, of bounded size).
    pub fn reuse(&mut self, from: usize, b: Box<Batch>) {
        if self.pool[from].len() < POOL && b.capacity() <= 2 * BATCH_BYTES {
            self.pool[from].push(b);
        }
    }

    /// Sends every peer its batch: at the end of the turn, before the wake-ups.
    pub fn send_batches(&mut self) {
        for to in 0..self.batches.len() {
            self.send_batch(to);
        }
    }

    /// Sends mail to a peer, behind the messages batched for it and the mail that already waits
    /// for room: the ring's order is the order things happened.
    pub fn send(&mut self, to: usize, mail: Mail) {
        self.send_batch(to);
        self.push_or_hold(to, mail);
    }

    fn push_or_hold(&mut self, to: usize, mail: Mail) {
        if self.overflow[to].is_empty() {
            if let Err(mail) = self.push(to, mail) {
                self.hold(to, mail);
            }
        } else {
            self.hold(to, mail);
        }
    }

    /// Pushes into the ring to `to`, unless it is full (for a batch: holds `RING_BATCHES`).
    fn push(&mut self, to: usize, mail: Mail) -> Result<(), Mail> {
        let Some(p) = self.outbox[to].as_mut() else { return Ok(()) };
        if matches!(mail, Mail::Batch(_)) && !p.holds_fewer_than(RING_BATCHES) {
            return Err(mail);
        }
        p.push(mail)?;
        self.pushes += 1;
        self.wake[to] = true;
        Ok(())
    }

    /// Keeps mail for a peer whose ring is full. Past `OVERFLOW_LIMIT` (for batches of QoS 0
    /// messages, `OVERFLOW_BYTES`) a QoS 0 message or a connection being handed over is dropped
    /// (counted); everything else is kept, because losing it would lose an acknowledged message
    /// or leave a SUBSCRIBE or a paused publisher waiting forever. What is kept is bounded
    /// elsewhere: QoS 1/2 messages by the credit window, control mail by one round trip per
    /// connection at a time, and the worker stops reading while any mail is held.
    fn hold(&mut self, to: usize, mail: Mail) {
        let full = self.overflow[to].len() >= OVERFLOW_LIMIT;
        let (droppable, count) = match &mail {
            Mail::Batch(b) => (b.qos0_only && (full || self.held_bytes[to] >= OVERFLOW_BYTES), b.count as u64),
            Mail::Publish { msg, .. } => (full && msg.qos == crate::codec::QoS::AtMostOnce, 1),
            Mail::Handover(_) | Mail::CatchUp(_) => (full, 1),
            _ => (false, 0),
        };
        if droppable {
            if let Mail::Handover(h) = &mail {
                log::warn!(
                    "worker {}: peer {to} saturated, refusing a connection from {}",
                    self.id,
                    h.transport.peer()
                );
                self.lost_connections += 1;
            }
            self.dropped += count;
            return;
        }
        if let Mail::Batch(b) = &mail {
            self.held_bytes[to] += b.bytes();
        }
        self.overflow[to].push_back(mail);
    }

    /// A peer's ring is full and mail waits for it: the worker stops reading its sockets until it
    /// drains, so publishers feel TCP backpressure instead of the overflow growing.
    pub fn backlogged(&self) -> bool {
        self.overflow.iter().any(|o| !o.is_empty())
    }

    /// Everything sent so far is in the peers' rings: no batch being filled, no mail held for a
    /// full ring.
    pub fn nothing_held(&self) -> bool {
        self.batches.iter().all(|b| b.is_none()) && !self.backlogged()
    }

    /// Moves held mail into rings that have room again.
    pub fn send_overflow(&mut self) {
        for to in 0..self.overflow.len() {
            while let Some(mail) = self.overflow[to].pop_front() {
                let bytes = if let Mail::Batch(b) = &mail { b.bytes() } else { 0 };
                match self.push(to, mail) {
                    Ok(()) => self.held_bytes[to] -= bytes,
                    Err(mail) => {
                        self.overflow[to].push_front(mail);
                        self.wake[to] = true;
                        break;
                    }
                }
            }
        }
    }

    /// The peers this turn sent mail to that sleep, into `due` (emptied first): each must be
    /// woken (one eventfd write per sleep of a peer, however much mail it gets) or helped.
    pub fn due_wakes(&mut self, shared: &Shared, due: &mut Vec<usize>) {
        due.clear();
        for to in 0..self.wake.len() {
            if std::mem::take(&mut self.wake[to]) && shared.parking[to].needs_wake() {
                due.push(to);
            }
        }
    }

    /// Mail in this worker's incoming rings, plus its own overflow waiting for full peer rings.
    pub fn waiting(&self) -> usize {
        self.inbox.iter().flatten().map(|c| c.len()).sum::<usize>()
            + self.overflow.iter().map(|o| o.len()).sum::<usize>()
    }

    pub fn inbox_empty(&self) -> bool {
        self.inbox.iter().flatten().all(|c| c.is_empty())
    }

    /// Takes the mail that is in the rings now (not what arrives while it is handled, so I/O is
    /// not starved), in order per sender.
    pub fn take(&mut self, into: &mut Vec<(u16, Mail)>) {
        for (from, c) in self.inbox.iter_mut().enumerate() {
            let Some(c) = c else { continue };
            let n = c.len();
            for _ in 0..n {
                match c.pop() {
                    Some(m) => into.push((from as u16, m)),
                    None => break,
                }
            }
        }
    }
}

/// What completes when every acknowledgement an operation waits for has arrived.
pub enum Then {
    /// Send the SUBACK and the matching retained messages, then handle the connection's next
    /// packets.
    SubAck {
        conn: ConnKey,
        conn_uid: u64,
        session: SessionKey,
        ack: Box<SubAck>,
        retained: Vec<(MqttStr, Subscription)>,
    },
    /// Acknowledge a peer's ticket (a shared group join whose filter is now announced).
    Ack { worker: u16, ticket: Ticket },
}

struct Op {
    waiting: usize,
    then: Then,
}

/// Operations waiting for peers' acknowledgements.
#[derive(Default)]
pub struct Pending {
    ops: Slab<Op>,
}

impl Pending {
    pub fn start(&mut self, waiting: usize, then: Then) -> Ticket {
        self.ops.insert(Op { waiting, then }) as Ticket
    }

    /// One acknowledgement for `ticket`; returns what completes when it was the last.
    pub fn ack(&mut self, ticket: Ticket) -> Option<Then> {
        let op = self.ops.get_mut(ticket as usize)?;
        op.waiting -= 1;
        (op.waiting == 0).then(|| self.ops.remove(ticket as usize).then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_stays_small_because_every_ring_is_an_array_of_it() {
        assert!(std::mem::size_of::<Mail>() <= 16, "Mail is {} bytes", std::mem::size_of::<Mail>());
    }

    /// Worker 1's mailbox, with a ring to worker 0 whose far end is returned.
    fn towards_zero() -> (Mailbox, Consumer<Mail>) {
        let (p, c) = crate::ring::ring(64);
        (Mailbox::new(1, vec![Some(p), None], vec![None, None]), c)
    }

    fn plain(topic: &str, qos: crate::codec::QoS) -> View<'_> {
        View::plain(topic, b"x", qos)
    }

    fn topics(m: &Mail) -> Vec<String> {
        match m {
            Mail::Batch(b) => b.iter().map(|(v, _)| v.topic.to_string()).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn messages_wait_in_one_batch_and_go_ahead_of_any_other_mail() {
        let (mut m, mut to_zero) = towards_zero();
        m.publish(0, &plain("a", crate::codec::QoS::AtMostOnce), 1);
        m.publish(0, &plain("b", crate::codec::QoS::AtLeastOnce), 2);
        assert!(to_zero.pop().is_none(), "batched until the end of the turn");
        m.send(0, Mail::Credit { n: 1 });
        m.publish(0, &plain("c", crate::codec::QoS::AtMostOnce), 3);
        m.send_batches();
        let first = to_zero.pop().expect("the batch");
        assert_eq!(topics(&first), ["a", "b"]);
        assert!(matches!(to_zero.pop(), Some(Mail::Credit { n: 1 })), "other mail after the batch");
        assert_eq!(topics(&to_zero.pop().expect("the next batch")), ["c"]);
        assert_eq!(m.pushes, 3);
        // A batch fills up to BATCH_BYTES and goes without waiting for the turn's end.
        let big = "t".repeat(1000);
        for i in 0..BATCH_BYTES / 1000 {
            m.publish(0, &plain(&big, crate::codec::QoS::AtMostOnce), i as u32);
        }
        let Some(Mail::Batch(b)) = to_zero.pop() else { panic!("a full batch") };
        assert!(b.bytes() <= BATCH_BYTES, "sent before it passes BATCH_BYTES");
        // The next one after a full one is allocated at BATCH_BYTES and never grows.
        for i in 0..BATCH_BYTES / 1000 {
            m.publish(0, &plain(&big, crate::codec::QoS::AtMostOnce), i as u32);
        }
        let Some(Mail::Batch(b)) = to_zero.pop() else { panic!("a second full batch") };
        assert_eq!(b.capacity(), BATCH_BYTES);
    }

    #[test]
    fn a_batch_given_back_is_filled_again() {
        let (mut m, mut to_zero) = towards_zero();
        let big = "t".repeat(GIVE_BACK_BYTES);
        m.publish(0, &plain(&big, crate::codec::QoS::AtMostOnce), 1);
        m.send_batches();
        let Some(Mail::Batch(b)) = to_zero.pop() else { panic!("a batch") };
        let buf = b.as_ptr();
        // The reader gives a batch that carried 4 KiB or more back, emptied.
        m.give_back(0, b);
        let Some(Mail::Spent(b)) = to_zero.pop() else { panic!("given back") };
        assert_eq!((b.count, b.bytes()), (0, 0));
        m.reuse(0, b);
        m.publish(0, &plain("b", crate::codec::QoS::AtMostOnce), 2);
        m.send_batches();
        let Some(Mail::Batch(b)) = to_zero.pop() else { panic!("a batch") };
        assert_eq!((b.as_ptr(), b.count), (buf, 1), "the same buffer, filled again");
        // It carried one small message: freed by the reader, however large its buffer.
        m.give_back(0, b);
        assert!(to_zero.pop().is_none());
    }

    #[test]
    fn a_full_ring_holds_batches_and_drops_only_qos0_ones_past_the_byte_bound() {
        let (mut m, mut to_zero) = towards_zero();
        let big = "t".repeat(60_000);
        // Past RING_BATCHES the ring takes no more batches; the rest is held.
        for i in 0..RING_BATCHES + 10 {
            m.publish(0, &plain(&big, crate::codec::QoS::AtMostOnce), i as u32);
            m.send_batches();
        }
        assert_eq!(to_zero.len(), RING_BATCHES);
        assert!(m.backlogged());
        // QoS 0 batches past OVERFLOW_BYTES are dropped; one with a QoS 1 message is kept.
        for i in 0..OVERFLOW_BYTES / 60_000 + 10 {
            m.publish(0, &plain(&big, crate::codec::QoS::AtMostOnce), i as u32);
            m.send_batches();
        }
        assert!(m.dropped > 0 && m.held_bytes[0] <= OVERFLOW_BYTES + 61_000);
        let dropped = m.dropped;
        m.publish(0, &plain(&big, crate::codec::QoS::AtLeastOnce), 0);
        m.send_batches();
        assert_eq!(m.dropped, dropped, "a batch holding a QoS 1 message is never dropped");
        // Room again: the held batches follow in order.
        while to_zero.pop().is_some() {}
        m.send_overflow();
        assert_eq!(to_zero.len(), RING_BATCHES);
    }

    #[test]
    fn credit_goes_back_once_half_the_window_was_taken() {
        let (mut m, mut to_zero) = towards_zero();
        m.set_credit_window(8);
        for _ in 0..3 {
            m.owe_credit(0);
        }
        assert!(!m.send_credits());
        assert!(to_zero.pop().is_none(), "3 of a window of 8: held back");
        m.owe_credit(0);
        assert!(m.send_credits());
        assert!(matches!(to_zero.pop(), Some(Mail::Credit { n: 4 })));
        assert!(!m.send_credits());
        assert!(to_zero.pop().is_none(), "nothing more is owed");
    }

    #[test]
    fn an_operation_completes_with_its_last_acknowledgement() {
        let mut p = Pending::default();
        let t = p.start(2, Then::Ack { worker: 1, ticket: 9 });
        assert!(p.ack(t).is_none());
        assert!(matches!(p.ack(t), Some(Then::Ack { worker: 1, ticket: 9 })));
        assert!(p.ack(t).is_none(), "a stale ticket completes nothing");
    }
}
