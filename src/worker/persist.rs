//! The worker's side of persistence (`crate::store`): what changed in its persistent sessions
//! and retained messages during a turn goes to the store thread in one batch at the end of the
//! turn; in `durable` mode QoS 1/2 acknowledgements wait until everything they depend on is on
//! disk; at start-up the sessions homed here are put back from the store.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use bytes::BytesMut;

use super::conn::ConnKey;
use super::Worker;
use crate::codec::{Ack, MqttStr, Packet, PacketId, ReasonCode};
use crate::session::{Delivery, Inflight, Message, Session, SessionKey, SessionStore};
use crate::store::record::{self, EntryRecord, SessionRecord};
use crate::store::{Batch, Mode, Op, RecoveredSession, StoreShared};

const SEQ_BITS: u64 = 48;

/// An acknowledgement waiting for the store: sent once every worker in `targets` has
/// committed its routing of stamp `seq`.
struct Held {
    seq: u64,
    targets: u64,
    conn: ConnKey,
    uid: u64,
    ack: Packet,
}

pub struct WorkerStore {
    shared: Arc<StoreShared>,
    tx: Sender<Batch>,
    ops: Vec<Op>,
    /// Per origin worker: the highest stamp routed here, and the last one reported.
    routed: Vec<u64>,
    reported: Vec<u64>,
    touched: Vec<(SessionKey, u64)>,
    held: VecDeque<Held>,
    /// Per connection with acknowledgements held: (connection uid, how many, paused by us).
    /// A connection with `max_held` held is not read until half of them are released, so a
    /// publisher that never waits for its PUBACKs cannot grow `held` without bound while the
    /// disk is slower than it (3.1.1 has no receive maximum to stop it).
    per_conn: std::collections::HashMap<usize, (u64, u32, bool)>,
    max_held: u32,
    /// Acknowledgements ready to go, reused from turn to turn.
    ready: Vec<(Held, bool)>,
    next_stamp: u64,
}

impl WorkerStore {
    pub fn new(shared: Arc<StoreShared>, tx: Sender<Batch>, max_inflight: u16) -> WorkerStore {
        let n = shared.workers;
        WorkerStore {
            shared,
            tx,
            ops: Vec::new(),
            routed: vec![0; n],
            reported: vec![0; n],
            touched: Vec::new(),
            held: VecDeque::new(),
            per_conn: Default::default(),
            max_held: 2 * max_inflight.max(1) as u32,
            ready: Vec::new(),
            next_stamp: 0,
        }
    }
}

/// Sessions to put back on one worker, in slab order, and the shared groups homed there.
pub struct WorkerRecovery {
    pub sessions: Vec<RecoveredSession>,
    pub groups: Vec<(crate::session::GroupKey, crate::router::Member)>,
}

/// What every worker needs to rebuild the broker's state at start-up.
pub struct RecoveryPlan {
    pub workers: Vec<std::sync::Mutex<Option<WorkerRecovery>>>,
    /// The filters each worker wants (its subscriptions and the groups homed on it).
    pub wants: Vec<Vec<MqttStr>>,
    pub retained: Vec<Arc<Message>>,
    pub last_alive: u64,
}

impl RecoveryPlan {
    /// Places every recovered session on its client id's home worker (`home`), each group on
    /// its home (`group_home`). A worker inserts its sessions into an empty slab in this order,
    /// so session `i` of worker `w` has key `i` and uid `i + 1` there.
    pub fn new(
        recovered: crate::store::Recovered,
        workers: usize,
        home: impl Fn(&str) -> usize,
        group_home: impl Fn(&str, &str) -> usize,
    ) -> RecoveryPlan {
        let mut per: Vec<WorkerRecovery> =
            (0..workers).map(|_| WorkerRecovery { sessions: Vec::new(), groups: Vec::new() }).collect();
        let mut wants: Vec<Vec<MqttStr>> = vec![Vec::new(); workers];
        for rs in recovered.sessions {
            let w = home(&rs.record.client_id);
            let i = per[w].sessions.len();
            for (filter, sub) in &rs.record.subscriptions {
                match crate::topic::parse_shared(filter) {
                    Ok(Some(sf)) => {
                        let g = group_home(sf.group, sf.filter);
                        let key = (MqttStr::from(sf.group), MqttStr::from(sf.filter));
                        let member = crate::router::Member {
                            worker: w as u16,
                            session: i as u32,
                            session_uid: i as u64 + 1,
                            sub: *sub,
                        };
                        per[g].groups.push((key, member));
                        wants[g].push(MqttStr::from(sf.filter));
                    }
                    _ => wants[w].push(filter.clone()),
                }
            }
            per[w].sessions.push(rs);
        }
        for w in &mut wants {
            w.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
            w.dedup_by(|a, b| a.as_str() == b.as_str());
        }
        RecoveryPlan {
            workers: per.into_iter().map(|w| std::sync::Mutex::new(Some(w))).collect(),
            wants,
            retained: recovered.retained,
            last_alive: recovered.last_alive,
        }
    }
}

impl Worker {
    /// Whether a QoS 1/2 PUBLISH read now is acknowledged only once it is on disk: always in
    /// durable mode; in periodic mode while the store is more than `BACKLOG_MAX` changes behind,
    /// so a publisher faster than the disk is paced instead of growing the store's queue.
    pub(super) fn ack_after_commit(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| {
            p.shared.mode == Mode::Durable || p.shared.backlog.load(Ordering::Relaxed) > crate::store::BACKLOG_MAX
        })
    }

    /// Durable mode, and the store can no longer write: QoS 1/2 publishes are refused.
    pub(super) fn store_failed(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| p.shared.mode == Mode::Durable && p.shared.failed.load(Ordering::Relaxed))
    }

    /// A session was attached: one that outlives its connection is persisted from now on.
    pub(super) fn persist_attach(&mut self, sk: SessionKey) {
        let Some(p) = self.persist.as_deref() else { return };
        let s = &mut self.sessions[sk];
        if s.store.is_none() && s.expiry_interval > 0 {
            let sid = p.shared.next_sid.fetch_add(1, Ordering::Relaxed);
            s.store = Some(Box::new(SessionStore::new(sid)));
        }
        self.touch_meta(sk);
    }

    /// Session `sk`'s queue may have changed this turn: write it at the end of the turn.
    pub(super) fn touch(&mut self, sk: SessionKey) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        let Some(s) = self.sessions.get_mut(sk) else { return };
        let uid = s.uid;
        if let Some(st) = s.store.as_deref_mut() {
            if !st.listed {
                st.listed = true;
                p.touched.push((sk, uid));
            }
        }
    }

    /// Session `sk`'s own record changed (subscriptions, expiry, will, QoS 2 ids).
    pub(super) fn touch_meta(&mut self, sk: SessionKey) {
        if let Some(st) = self.sessions.get_mut(sk).and_then(|s| s.store.as_deref_mut()) {
            st.dirty = true;
        }
        self.touch(sk);
    }

    /// Session `sk` ends: it and its queue go from the store.
    pub(super) fn persist_end(&mut self, sk: SessionKey) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        if let Some(st) = self.sessions[sk].store.take() {
            p.ops.push(Op::SessionEnd { sid: st.sid });
        }
    }

    /// A retained message kept (or a topic cleared) on the worker it was published to.
    pub(super) fn persist_retained(&mut self, msg: &Arc<Message>, keep: bool) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        if msg.topic.starts_with('$') {
            return;
        }
        if msg.payload.is_empty() {
            p.ops.push(Op::Retain { topic: msg.topic.clone(), msg: None });
        } else if keep {
            p.ops.push(Op::Retain { topic: msg.topic.clone(), msg: Some(msg.clone()) });
        }
    }

    /// A stamp for a QoS 1/2 message published here (durable mode).
    pub(super) fn next_stamp(&mut self) -> u64 {
        let Some(p) = self.persist.as_deref_mut() else { return 0 };
        p.next_stamp += 1;
        (self.id as u64) << SEQ_BITS | p.next_stamp
    }

    /// This worker has routed the message with `stamp` (durable mode).
    pub(super) fn routed(&mut self, stamp: u64) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        let origin = (stamp >> SEQ_BITS) as usize;
        if let Some(r) = p.routed.get_mut(origin) {
            *r = (*r).max(stamp & ((1 << SEQ_BITS) - 1));
        }
    }

    /// Holds the acknowledgement of the message stamped `stamp`, handed to `peers` and this
    /// worker, until all of them have its routing on disk.
    pub(super) fn hold_ack(&mut self, stamp: u64, peers: &[u16], k: ConnKey, ack: Packet) {
        self.routed(stamp);
        let uid = self.conns[k].uid;
        let Some(p) = self.persist.as_deref_mut() else { return };
        let targets = peers.iter().fold(1u64 << self.id, |m, &w| m | 1 << w);
        p.held.push_back(Held { seq: stamp & ((1 << SEQ_BITS) - 1), targets, conn: k, uid, ack });
        let entry = p.per_conn.entry(k.0).or_insert((uid, 0, false));
        if entry.0 != uid {
            // The slot was reused: the old connection's count goes with it.
            *entry = (uid, 0, false);
        }
        entry.1 += 1;
        if entry.1 >= p.max_held && !entry.2 {
            entry.2 = true;
            log::debug!("not reading {}: {} acknowledgements wait for the disk", self.conns[k].peer(), entry.1);
            self.pause(k, uid);
        }
    }

    /// Sends the acknowledgements whose messages are now on disk (or, if the store failed,
    /// refuses them: 5.0 with 0x80, 3.1.1 by closing the connection).
    pub(super) fn release_acks(&mut self) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        if p.held.is_empty() {
            return;
        }
        let failed = p.shared.failed.load(Ordering::Relaxed);
        let mut ready = std::mem::take(&mut p.ready);
        while let Some(h) = p.held.front() {
            let mut left = h.targets;
            let mut done = true;
            while left != 0 {
                let t = left.trailing_zeros() as usize;
                left &= left - 1;
                if p.shared.committed(t, self.id) < h.seq {
                    done = false;
                    break;
                }
            }
            if !done && !failed {
                break;
            }
            let Some(h) = p.held.pop_front() else { break };
            ready.push((h, done));
        }
        let mut resume = Vec::new();
        for (h, _) in &ready {
            if let Some(e) = p.per_conn.get_mut(&h.conn.0).filter(|e| e.0 == h.uid) {
                e.1 -= 1;
                if e.2 && e.1 <= p.max_held / 2 {
                    e.2 = false;
                    resume.push((h.conn, h.uid));
                }
                if e.1 == 0 {
                    p.per_conn.remove(&h.conn.0);
                }
            }
        }
        for (h, done) in ready.drain(..) {
            if !self.conns.alive(h.conn, h.uid) {
                continue;
            }
            if done {
                self.acknowledge(h.conn, h.ack);
            } else {
                self.refuse_unstored(h.conn, h.ack);
            }
        }
        for (k, uid) in resume {
            self.resume(k, uid);
        }
        if let Some(p) = self.persist.as_deref_mut() {
            p.ready = ready;
        }
    }

    /// A QoS 1/2 PUBLISH the store cannot keep (durable mode, the store failed).
    pub(super) fn refuse_unstored(&mut self, k: ConnKey, ack: Packet) {
        let why = "persistence failed: the message cannot be stored";
        let v5 = self.conns[k].version.is_some_and(|v| v.is_v5());
        if !v5 {
            return self.disconnect_with(k, ReasonCode::UNSPECIFIED_ERROR, why);
        }
        let refused = |a: Ack| Ack { reason: ReasonCode::UNSPECIFIED_ERROR, ..a };
        let ack = match ack {
            Packet::PubAck(a) => Packet::PubAck(refused(a)),
            Packet::PubRec(a) => Packet::PubRec(refused(a)),
            other => other,
        };
        log::warn!("refusing a QoS 1/2 PUBLISH from {}: {why}", self.conns[k].peer());
        self.send(k, &ack);
    }

    /// End of the turn: what changed goes to the store thread, in one batch.
    pub(super) fn flush_store(&mut self) {
        let Some(p) = self.persist.as_deref_mut() else { return };
        if !p.touched.is_empty() {
            let now = self.clock.now;
            let wall_now = record::wall_ms();
            for (sk, uid) in p.touched.drain(..) {
                if !self.sessions.is(sk, uid) {
                    continue;
                }
                let s = &mut self.sessions[sk];
                let Some(mut st) = s.store.take() else { continue };
                st.listed = false;
                if std::mem::take(&mut st.dirty) {
                    let mut out = BytesMut::new();
                    record::put_session(&mut out, &session_record(s, now, wall_now));
                    p.ops.push(Op::Session { sid: st.sid, record: out.freeze() });
                }
                for (seq, change) in st.journal.drain(..) {
                    p.ops.push(match change {
                        None => Op::EntryDel { sid: st.sid, seq },
                        Some((state, d)) => Op::Entry {
                            sid: st.sid,
                            seq,
                            entry: EntryRecord { state, qos: d.qos, retain: d.retain, sub_ids: d.sub_ids, msg: d.msg },
                        },
                    });
                }
                s.store = Some(st);
            }
        }
        let mut routed = Vec::new();
        for (origin, (r, sent)) in p.routed.iter().zip(p.reported.iter_mut()).enumerate() {
            if r > sent {
                *sent = *r;
                routed.push((origin as u16, *r));
            }
        }
        if p.ops.is_empty() && routed.is_empty() {
            return;
        }
        p.shared.backlog.fetch_add(p.ops.len(), Ordering::Relaxed);
        let batch = Batch { worker: self.id as u16, ops: std::mem::take(&mut p.ops), routed };
        if p.tx.send(batch).is_err() {
            p.shared.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Start-up: the sessions homed here, their subscriptions, the shared groups homed here, the
    /// peers' interest and the retained messages, as the store had them.
    pub(super) fn recover(&mut self) {
        let Some(plan) = self.shared.recovery.as_ref().map(Arc::clone) else { return };
        let Some(mine) = plan.workers[self.id].lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let now = self.clock.now;
        let wall_now = record::wall_ms();
        let max_inflight = self.shared.config.max_inflight_messages as usize;
        for rs in mine.sessions {
            let r = rs.record;
            let mut s = Session::new(r.client_id.clone(), r.version);
            s.expiry_interval = r.expiry_interval;
            let gone = if r.disconnected_at == 0 { plan.last_alive } else { r.disconnected_at };
            s.disconnected_at = Some(record::from_wall(gone, now, wall_now).unwrap_or(now));
            s.next_packet_id = r.next_packet_id;
            s.incoming_qos2.extend(r.incoming_qos2);
            s.send_window = max_inflight.min(65_534);
            s.pending_will =
                r.pending_will.map(|(due, w)| Box::new((record::from_wall(due, now, wall_now).unwrap_or(now), w)));
            let mut st = SessionStore::new(rs.sid);
            st.dirty = false;
            for (seq, e) in rs.entries {
                st.next_seq = st.next_seq.max(seq + 1);
                let d = Delivery { msg: e.msg, qos: e.qos, retain: e.retain, sub_ids: e.sub_ids, group: None, seq };
                match e.state.and_then(|(state, pid)| PacketId::new(pid).map(|id| (state, id))) {
                    Some((state, packet_id)) => s.inflight.push_back(Inflight { packet_id, state, delivery: d }),
                    None => {
                        s.queued_bytes += d.msg.size();
                        s.queue.push_back(d);
                    }
                }
            }
            s.store = Some(Box::new(st));
            let subs = r.subscriptions;
            let sk = self.sessions.insert(s);
            for (filter, sub) in subs {
                self.sessions[sk].subscription_bytes += filter.len();
                self.shared.subscription_bytes.fetch_add(filter.len(), Ordering::Relaxed);
                if !matches!(crate::topic::parse_shared(&filter), Ok(Some(_))) {
                    self.router.subscribe(&filter, sk.0 as u32, sub);
                }
                self.sessions[sk].subscriptions.insert(filter, sub);
            }
            self.arm_session_timer(sk);
        }
        for (key, member) in mine.groups {
            let filter = key.1.clone();
            if self.router.groups.join(key, member) {
                self.router.want(&filter);
            }
        }
        for (w, filters) in plan.wants.iter().enumerate() {
            if w != self.id {
                for f in filters {
                    self.router.peer_interest(f, w as u16, true);
                }
            }
        }
        for m in &plan.retained {
            self.router.retained.insert(m.clone());
        }
    }
}

/// A session's record as the store keeps it.
fn session_record(s: &Session, now: std::time::Instant, wall_now: u64) -> SessionRecord {
    let disconnected_at = if s.conn.is_some() { 0 } else { record::to_wall(s.disconnected_at, now, wall_now) };
    SessionRecord {
        client_id: s.client_id.clone(),
        version: s.version,
        expiry_interval: s.expiry_interval,
        disconnected_at,
        next_packet_id: s.next_packet_id,
        incoming_qos2: s.incoming_qos2.iter().copied().collect(),
        subscriptions: s.subscriptions.iter().map(|(f, sub)| (f.clone(), *sub)).collect(),
        pending_will: s.pending_will.as_deref().map(|(at, w)| (record::to_wall(Some(*at), now, wall_now), w.clone())),
    }
}
