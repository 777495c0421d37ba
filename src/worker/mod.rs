//! One worker: a single-threaded `mio` event loop that owns its connections, the sessions whose
//! client ids live here, its subscription trie and its replica of the retained store.
//!
//! The path of a PUBLISH is one straight line: readable -> `read_conn` into the worker's read buffer
//! -> `process` parses frames in place -> `protocol::on_publish` routes to local sessions (encoded
//! into their output buffers) and to peer workers (through the rings) -> `flush_dirty` writes every
//! connection with pending output once, after all events of the iteration. Other workers are
//! reached only through `Mail`; nothing here takes a lock.

mod protocol;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;
use bytes::{Buf, BytesMut};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::broker::Shared;
use crate::codec::{
    decode, next_frame, packet_type, parse_fixed_header, Connect, DecodeError, Disconnect, MqttStr, Packet,
    ProtocolVersion, PublishRef, ReasonCode,
};
use crate::ring::{Consumer, Producer};
use crate::session::{ClientIndex, Delivery, GroupKey, Message, Session, Subscription};
use crate::topic::SubTrie;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per connection per event before others get a turn.
const READS_PER_TURN: usize = 16;
/// Timers (keepalive, connect timeout, stats) run this often.
const TICK: Duration = Duration::from_millis(250);
/// Messages a worker holds for a peer whose ring is full, before it drops (and counts) them.
const OVERFLOW_LIMIT: usize = 64 * 1024;
/// Topic aliases a 5.0 client may use towards us (advertised in CONNACK).
pub const TOPIC_ALIAS_MAXIMUM: u16 = 32;

/// What one worker sends another.
pub enum Mail {
    /// A message to deliver to this worker's matching sessions and to apply to its retained replica.
    Publish(Arc<Message>),
    /// A connection whose client id lives on the receiving worker, with its parsed CONNECT and the
    /// bytes read after it.
    Handover(Box<Handover>),
    /// To a shared group's home worker: a session joins the group.
    SharedJoin { key: Box<GroupKey>, member: Member },
    /// To a shared group's home worker: a session leaves the group.
    SharedLeave { key: Box<GroupKey>, worker: u16, session: u32 },
    /// From a shared group's home worker: deliver this to the chosen member.
    /// `uid` is the session's, so a slab key reused since the member left is not mistaken for it.
    SharedDeliver { session: u32, uid: u64, delivery: Delivery },
    /// To a shared group's home worker: a member went away without acknowledging this.
    SharedRedeliver { key: Box<GroupKey>, msg: Arc<Message> },
    /// The sender gained its first (or lost its last) subscriber of `filter`.
    Interest { filter: MqttStr, worker: u16, present: bool },
}

/// A member of a shared subscription group: a session on some worker.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    worker: u16,
    session: u32,
    session_uid: u64,
    sub: Subscription,
}

/// A `$share/{name}/{filter}` group, kept on its home worker.
pub struct SharedGroup {
    name: MqttStr,
    filter: MqttStr,
    members: Vec<Member>,
    cursor: usize,
}

pub struct Handover {
    stream: TcpStream,
    peer: Option<SocketAddr>,
    rest: BytesMut,
    connect: Box<Connect>,
    assigned_id: bool,
    created: Instant,
}

/// A network connection: plain data owned by the worker's slab.
pub struct Conn {
    /// Unique per worker, so a slab key reused after a close is never mistaken for the old one.
    uid: u64,
    stream: TcpStream,
    /// Bytes of an incomplete packet kept between reads (empty for an idle connection).
    rbuf: BytesMut,
    /// Encoded packets waiting for the socket; bounded by `max_output_bytes` for QoS 0.
    wbuf: BytesMut,
    version: Option<ProtocolVersion>,
    session: Option<usize>,
    keep_alive: u16,
    /// Milliseconds on the worker's clock (`Worker::now_ms`) of the last read, and of the accept.
    last_rx: u32,
    created: u32,
    dirty: bool,
    /// Registered for WRITABLE because a write would have blocked.
    writable: bool,
    /// Refused at accept time (over `max_connections`): answer CONNECT with a refusal.
    over_limit: bool,
    /// The client's 5.0 maximum packet size: larger packets are not sent to it.
    max_packet_out: usize,
    /// Close once the output buffer is written.
    close_after_flush: bool,
    /// Inbound 5.0 topic aliases: alias n is `aliases[n - 1]`. Boxed: most clients use none,
    /// and 8 bytes per idle connection beat a `Vec`'s 24.
    #[allow(clippy::box_collection)]
    aliases: Option<Box<Vec<Option<MqttStr>>>>,
    /// The 5.0 client wants reason strings (request problem information).
    problem_info: bool,
    /// Outbound topic aliases, for a 5.0 client that accepts them.
    out_aliases: Option<Box<OutAliases>>,
    /// Not read from until its output drains below half of `max_output_bytes`.
    read_paused: bool,
}

/// Topic aliases we use towards one client: topic -> alias, assigned first come, first served.
pub struct OutAliases {
    max: u16,
    map: std::collections::HashMap<Box<str>, u16, crate::session::FixedState>,
}

/// At most this many outbound aliases per connection, whatever the client accepts: each keeps a
/// copy of its topic.
pub const OUT_ALIASES_MAX: u16 = 64;

impl Conn {
    fn new(uid: u64, stream: TcpStream, now: u32, created: u32, over_limit: bool) -> Conn {
        Conn {
            uid,
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            version: None,
            session: None,
            keep_alive: 0,
            last_rx: now,
            created,
            dirty: false,
            writable: false,
            over_limit,
            max_packet_out: usize::MAX,
            close_after_flush: false,
            aliases: None,
            problem_info: true,
            out_aliases: None,
            read_paused: false,
        }
    }

    /// The client's address, for log lines (not kept: it would cost every idle connection).
    fn peer(&self) -> String {
        self.stream.peer_addr().map_or_else(|_| "a closed socket".to_string(), |a| a.to_string())
    }
}

/// Why a connection ends: decides whether its will is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// The client sent DISCONNECT: no will [MQTT-3.14.4-3].
    Normal,
    /// Network error, keepalive timeout or protocol violation: the will is published.
    Abnormal,
    /// Another connection took the client id over.
    TakenOver,
    /// Closed before a session existed (refused CONNECT, connect timeout).
    NoSession,
}

/// Plain per-worker counters, copied into `Shared::stats` once per tick.
#[derive(Default)]
struct Counters {
    messages_received: u64,
    messages_sent: u64,
    bytes_received: u64,
    bytes_sent: u64,
    publish_dropped: u64,
}

pub struct Worker {
    id: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    next_uid: u64,
    sessions: Slab<Session>,
    by_client: ClientIndex,
    subs: SubTrie<u32, Subscription>,
    /// Filters other workers have subscribers for (only for the 5.0 "no matching subscribers" hint).
    interest: SubTrie<u16, ()>,
    /// Shared subscription groups homed here, and their filters.
    groups: Slab<SharedGroup>,
    group_index: HashMap<GroupKey, usize>,
    shared_trie: SubTrie<u32, ()>,
    retained: HashMap<MqttStr, Arc<Message>>,
    outbox: Vec<Option<Producer<Mail>>>,
    inbox: Vec<Option<Consumer<Mail>>>,
    overflow: Vec<VecDeque<Mail>>,
    wake: Vec<bool>,
    dirty: Vec<usize>,
    more_to_read: Vec<(usize, u64)>,
    read_buf: BytesMut,
    counters: Counters,
    /// Scratch for one publish's matching subscriptions.
    matches: Vec<(u32, Subscription)>,
    /// Scratch for a QoS 0 packet encoded once and copied to every subscriber of one version.
    encoded: BytesMut,
    next_tick: Instant,
    next_sys: Instant,
    generated_ids: u64,
    sys_load: crate::sys::Load,
    draining: bool,
    /// Origin of the worker's millisecond clock (`now_ms`).
    epoch: Instant,
}

impl Worker {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        poll: Poll,
        listener: TcpListener,
        outbox: Vec<Option<Producer<Mail>>>,
        inbox: Vec<Option<Consumer<Mail>>>,
    ) -> Worker {
        let n = shared.workers;
        let now = Instant::now();
        // Sized for this worker's share of `max_connections` up front: the memory is only
        // reserved, and pages are touched as entries are used, so growth never copies (and
        // never leaves a doubled, touched copy behind).
        let per_worker = shared.config.max_connections.div_ceil(n);
        Worker {
            id,
            poll,
            listener: Some(listener),
            conns: Slab::with_capacity(per_worker),
            next_uid: 0,
            sessions: Slab::with_capacity(per_worker),
            by_client: ClientIndex::with_capacity(per_worker),
            subs: SubTrie::new(),
            interest: SubTrie::new(),
            groups: Slab::new(),
            group_index: HashMap::default(),
            shared_trie: SubTrie::new(),
            retained: HashMap::default(),
            outbox,
            inbox,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            wake: vec![false; n],
            dirty: Vec::new(),
            more_to_read: Vec::new(),
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            counters: Counters::default(),
            matches: Vec::new(),
            encoded: BytesMut::new(),
            next_tick: now + TICK,
            next_sys: now + Duration::from_secs(1),
            generated_ids: 0,
            sys_load: crate::sys::Load::default(),
            draining: false,
            epoch: now,
            shared,
        }
    }

    pub fn run(&mut self) -> io::Result<()> {
        if let Some(l) = self.listener.as_mut() {
            self.poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            // Output queued after the last flush (a window that opened during it) goes out now.
            let idle =
                self.more_to_read.is_empty() && self.dirty.is_empty() && self.overflow.iter().all(|o| o.is_empty());
            // Sleep only after telling producers so and finding the rings still empty: a ring is
            // drained by at most what it held when draining began, and peers wake us only if we
            // are parked.
            let inbox = &self.inbox;
            let sleep = idle && self.shared.parking[self.id].park(|| inbox.iter().flatten().all(|c| c.is_empty()));
            let timeout = if sleep { self.next_tick.saturating_duration_since(now) } else { Duration::ZERO };
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.shared.parking[self.id].unpark();
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(k) => {
                        let uid = match self.conns.get(k) {
                            Some(c) => c.uid,
                            None => continue,
                        };
                        if ev.is_writable() {
                            self.flush(k);
                        }
                        // The flush may have closed it (a reset peer is both writable and readable).
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        if readable && self.alive(k, uid) {
                            self.read_conn(k, uid);
                        }
                    }
                }
            }
            for (k, uid) in std::mem::take(&mut self.more_to_read) {
                if self.alive(k, uid) {
                    self.read_conn(k, uid);
                }
            }
            self.drain_mail();
            if self.shared.shutdown.load(Ordering::Relaxed) {
                self.shutdown();
                return Ok(());
            }
            self.flush_dirty();
            self.send_overflow();
            self.wake_peers();
            let now = Instant::now();
            if now >= self.next_tick {
                self.tick(now);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let total = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let over_limit = total > self.shared.config.max_connections;
                    let entry = self.conns.vacant_entry();
                    let k = entry.key();
                    if let Err(e) = self.poll.registry().register(&mut stream, Token(k), Interest::READABLE) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    let now = now_ms(self.epoch);
                    self.next_uid += 1;
                    entry.insert(Conn::new(self.next_uid, stream, now, now, over_limit));
                    log::debug!("worker {}: connection {k} from {peer}", self.id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog and try on the next event.
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Milliseconds since the worker started, wrapping after 49 days: intervals measured with it
    /// (keep alive, connect timeout) are far shorter, and `wrapping_sub` keeps them right.
    fn now_ms(&self) -> u32 {
        now_ms(self.epoch)
    }

    fn alive(&self, k: usize, uid: u64) -> bool {
        self.conns.get(k).is_some_and(|c| c.uid == uid)
    }

    /// Reads what the socket has into the worker's read buffer and handles every complete packet.
    fn read_conn(&mut self, k: usize, uid: u64) {
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.clear();
        {
            let c = &mut self.conns[k];
            if !c.rbuf.is_empty() {
                if c.rbuf.capacity() > READ_CHUNK {
                    // A large packet in progress: keep reading into its own buffer.
                    std::mem::swap(&mut buf, &mut c.rbuf);
                } else {
                    buf.extend_from_slice(&c.rbuf);
                    c.rbuf = BytesMut::new();
                }
            }
        }
        let mut close = None;
        for turn in 0.. {
            // A peer's ring is full (its overflow holds mail): read no more until it drains, so
            // publishers feel TCP backpressure instead of the overflow growing [DESIGN: full rings].
            if turn == READS_PER_TURN || self.overflow.iter().any(|o| !o.is_empty()) {
                self.more_to_read.push((k, uid));
                break;
            }
            // A client that does not read what we owe it (acknowledgements to its own publishes,
            // say) is not read from either until it catches up: its output cannot grow without end.
            let c = &mut self.conns[k];
            if c.wbuf.len() > self.shared.config.max_output_bytes {
                c.read_paused = true;
                break;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
            let c = &mut self.conns[k];
            match read_into(&mut c.stream, &mut buf) {
                Ok(0) => {
                    close = Some(CloseKind::Abnormal);
                    break;
                }
                Ok(n) => {
                    self.counters.bytes_received += n as u64;
                    c.last_rx = now_ms(self.epoch);
                    if !self.process(k, uid, &mut buf) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("worker {}: read error on {k}: {e}", self.id);
                    close = Some(CloseKind::Abnormal);
                    break;
                }
            }
        }
        if self.alive(k, uid) {
            if let Some(kind) = close {
                self.close(k, kind);
            } else if !buf.is_empty() {
                // Keep the partial packet with its connection; a big one keeps the whole buffer.
                let c = &mut self.conns[k];
                if buf.len() > 4096 {
                    c.rbuf = std::mem::take(&mut buf);
                } else {
                    c.rbuf = BytesMut::from(&buf[..]);
                }
            }
        }
        buf.clear();
        if buf.capacity() < READ_CHUNK {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        self.read_buf = buf;
    }

    /// Handles every complete packet in `buf`. Returns false when the connection is gone.
    fn process(&mut self, k: usize, uid: u64, buf: &mut BytesMut) -> bool {
        let max = self.shared.config.max_packet_size as usize;
        loop {
            let version = self.conns[k].version;
            let frame = match next_frame(buf, version, max) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    // Make room for the whole packet once its size is known (bounded by `max`).
                    if let Ok(Some((_, hl, rem))) = parse_fixed_header(buf) {
                        if hl + rem > buf.capacity() {
                            buf.reserve(hl + rem - buf.len());
                        }
                    }
                    return true;
                }
                Err(e) => {
                    self.protocol_error(k, &e);
                    return false;
                }
            };
            let (first, hl, size) = frame;
            if first >> 4 == packet_type::PUBLISH && version.is_some() {
                let v = version.unwrap_or(ProtocolVersion::V311);
                match PublishRef::parse(&buf[hl..size], first & 0x0f, v) {
                    Ok(p) => self.on_publish(k, p),
                    Err(e) => {
                        self.protocol_error(k, &e);
                        return false;
                    }
                }
                buf.advance(size);
            } else {
                let packet = match decode(buf, version, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => return true,
                    Err(e) => {
                        self.protocol_error(k, &e);
                        return false;
                    }
                };
                if let Packet::Connect(connect) = packet {
                    if let Some(handover) = self.on_connect(k, connect) {
                        self.hand_over(k, handover, buf.split());
                        return false;
                    }
                } else {
                    self.on_packet(k, packet);
                }
            }
            if !self.alive(k, uid) {
                return false;
            }
        }
    }

    /// Logs a violation, tells a 5.0 client why, and closes the connection (publishing its will).
    fn protocol_error(&mut self, k: usize, e: &DecodeError) {
        let c = &mut self.conns[k];
        log::info!("closing connection from {}: {e}", c.peer());
        if c.version.is_none() && e.reason_code() == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
            // [MQTT-3.1.2-2]: answer an unsupported level with CONNACK 0x01 and close. The level is
            // unknown, so the answer takes the 3.1.1 form, as other brokers do.
            let code = crate::codec::ConnectReturnCode::UNACCEPTABLE_PROTOCOL_VERSION;
            Packet::ConnAck(Box::new(crate::codec::ConnAck { code, ..Default::default() }))
                .encode(ProtocolVersion::V311, &mut c.wbuf);
        }
        self.disconnect_with(k, e.reason_code(), &e.to_string());
    }

    fn mark_dirty(dirty: &mut Vec<usize>, c: &mut Conn, k: usize) {
        if !c.dirty {
            c.dirty = true;
            dirty.push(k);
        }
    }

    /// Queues an encoded control packet on a connection.
    fn send(&mut self, k: usize, packet: &Packet) {
        let c = &mut self.conns[k];
        packet.encode(c.version.unwrap_or(ProtocolVersion::V311), &mut c.wbuf);
        Self::mark_dirty(&mut self.dirty, c, k);
    }

    fn flush_dirty(&mut self) {
        for k in std::mem::take(&mut self.dirty) {
            if let Some(c) = self.conns.get_mut(k) {
                c.dirty = false;
                self.flush(k);
            }
        }
    }

    /// Writes a connection's output buffer until done or the socket would block; then lets its
    /// session send what waited for room.
    fn flush(&mut self, k: usize) {
        let c = &mut self.conns[k];
        let mut failed = false;
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    self.counters.bytes_sent += n as u64;
                    c.wbuf.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.close(k, CloseKind::Abnormal);
            return;
        }
        if c.read_paused && c.wbuf.len() <= self.shared.config.max_output_bytes / 2 {
            c.read_paused = false;
            self.more_to_read.push((k, c.uid));
        }
        let pending = !c.wbuf.is_empty();
        if pending != c.writable {
            let interest = if pending { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if self.poll.registry().reregister(&mut c.stream, Token(k), interest).is_ok() {
                c.writable = pending;
            }
        }
        if pending {
            return;
        }
        if c.close_after_flush {
            self.close(k, CloseKind::Normal);
            return;
        }
        if c.wbuf.capacity() <= 256 {
            // An idle connection holds no output buffer, not even the few bytes of its last CONNACK
            // or PINGRESP (tens of thousands of idle clients add up). Larger buffers stay while
            // the connection is busy (freeing and faulting them in again per write costs more than
            // the copy they carry) and are trimmed by `tick` once they sit empty.
            c.wbuf = BytesMut::new();
        }
        if let Some(sk) = c.session {
            self.pump(sk);
        }
    }

    /// Removes a connection. Publishes the will where `kind` calls for it and ends a session that
    /// does not outlive its connection.
    fn close(&mut self, k: usize, kind: CloseKind) {
        let Some(mut c) = self.conns.try_remove(k) else { return };
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        // Best effort: whatever we meant to say last (CONNACK refusal, DISCONNECT reason).
        if !c.wbuf.is_empty() {
            let _ = c.stream.write(&c.wbuf);
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        log::debug!("worker {}: connection {k} from {} closed ({kind:?})", self.id, c.peer());
        let Some(sk) = c.session else { return };
        let Some(s) = self.sessions.get_mut(sk) else { return };
        if s.conn != Some(k) {
            return;
        }
        s.conn = None;
        let now = Instant::now();
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
        }
    }

    /// Ends a session: its subscriptions go, its pending will goes out, and QoS 1/2 messages it
    /// received through a shared subscription and never acknowledged go to another member.
    fn end_session(&mut self, sk: usize) {
        self.by_client.remove(&self.sessions, sk);
        let mut s = self.sessions.remove(sk);
        for filter in s.subscriptions.keys() {
            self.drop_subscription(sk, filter);
        }
        if let Some(pending) = s.pending_will.take() {
            self.publish_will(sk, &pending.1);
        }
        let unacked = s
            .inflight
            .into_iter()
            .filter(|i| i.state != crate::session::OutState::AwaitComp)
            .map(|i| i.delivery)
            .chain(s.queue);
        for d in unacked {
            if let Some(g) = d.group {
                self.redeliver_shared(*g, d.msg);
            }
        }
    }

    /// Moves a connection to the worker that is home to its client id.
    fn hand_over(&mut self, k: usize, (connect, assigned_id): (Box<Connect>, bool), rest: BytesMut) {
        let home = self.shared.home_of(&connect.client_id);
        let mut c = self.conns.remove(k);
        let _ = self.poll.registry().deregister(&mut c.stream);
        let created = self.epoch + Duration::from_millis(c.created as u64);
        let peer = c.stream.peer_addr().ok();
        let h = Handover { stream: c.stream, peer, rest, connect, assigned_id, created };
        self.mail(home, Mail::Handover(Box::new(h)));
    }

    fn take_handover(&mut self, h: Handover) {
        let Handover { mut stream, peer, rest, connect, assigned_id, created } = h;
        let entry = self.conns.vacant_entry();
        let k = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, Token(k), Interest::READABLE) {
            log::warn!("cannot register handed-over connection from {peer:?}: {e}");
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.next_uid += 1;
        let uid = self.next_uid;
        let now = now_ms(self.epoch);
        let created = now.wrapping_sub(created.elapsed().as_millis().min(u32::MAX as u128) as u32);
        entry.insert(Conn::new(uid, stream, now, created, false));
        self.attach(k, connect, assigned_id);
        if self.alive(k, uid) && !rest.is_empty() {
            let mut rest = rest;
            if self.process(k, uid, &mut rest) && self.alive(k, uid) && !rest.is_empty() {
                self.conns[k].rbuf = rest;
            }
        }
        // Bytes may have arrived between the deregistration and now; edge-triggered readiness
        // would not report them again, so read once.
        if self.alive(k, uid) {
            self.read_conn(k, uid);
        }
    }

    fn mail(&mut self, to: usize, mail: Mail) {
        if !self.overflow[to].is_empty() {
            self.overflow_push(to, mail);
            return;
        }
        let Some(p) = self.outbox[to].as_mut() else { return };
        match p.push(mail) {
            Ok(()) => self.wake[to] = true,
            Err(mail) => self.overflow_push(to, mail),
        }
    }

    fn overflow_push(&mut self, to: usize, mail: Mail) {
        if self.overflow[to].len() >= OVERFLOW_LIMIT {
            if let Mail::Handover(h) = mail {
                log::warn!("worker {}: peer {to} saturated, refusing connection from {:?}", self.id, h.peer);
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            }
            self.counters.publish_dropped += 1;
            return;
        }
        self.overflow[to].push_back(mail);
    }

    fn send_overflow(&mut self) {
        for to in 0..self.overflow.len() {
            while let Some(mail) = self.overflow[to].pop_front() {
                let Some(p) = self.outbox[to].as_mut() else { break };
                match p.push(mail) {
                    Ok(()) => self.wake[to] = true,
                    Err(mail) => {
                        self.overflow[to].push_front(mail);
                        self.wake[to] = true;
                        break;
                    }
                }
            }
        }
    }

    /// Wakes the peers this iteration sent mail to, if they sleep: one eventfd write per sleep
    /// of a peer, however much mail it gets.
    fn wake_peers(&mut self) {
        for to in 0..self.wake.len() {
            if std::mem::take(&mut self.wake[to]) && self.shared.parking[to].needs_wake() {
                let _ = self.shared.wakers[to].wake();
            }
        }
    }

    fn drain_mail(&mut self) {
        // A handover taken while draining attaches a session, which catches up on mail itself:
        // never recurse (a burst of handovers would nest as deep as the ring is long).
        if self.draining {
            return;
        }
        self.draining = true;
        for from in 0..self.inbox.len() {
            // Bounded per iteration by what is in the ring now, so I/O is not starved.
            let n = self.inbox[from].as_ref().map_or(0, |c| c.len());
            for _ in 0..n {
                let Some(mail) = self.inbox[from].as_mut().and_then(|c| c.pop()) else { break };
                match mail {
                    Mail::Publish(msg) => {
                        if msg.retain {
                            self.store_retained(&msg);
                        }
                        self.deliver_local(&msg);
                    }
                    Mail::Handover(h) => self.take_handover(*h),
                    Mail::SharedJoin { key, member } => self.apply_join(*key, member),
                    Mail::SharedLeave { key, worker, session } => self.apply_leave(&key, worker, session),
                    Mail::SharedDeliver { session, uid, delivery } => {
                        if self.sessions.get(session as usize).is_some_and(|s| s.uid == uid) {
                            self.deliver_one(session as usize, delivery);
                        } else if let Some(g) = delivery.group {
                            // The member left before this arrived: to someone still in the group.
                            self.redeliver_shared(*g, delivery.msg);
                        }
                    }
                    Mail::SharedRedeliver { key, msg } => self.redeliver_shared(*key, msg),
                    Mail::Interest { filter, worker, present } => {
                        if present {
                            let _ = self.interest.insert(&filter, worker, ());
                        } else {
                            self.interest.remove(&filter, &worker);
                        }
                    }
                }
            }
        }
        self.draining = false;
    }

    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        let connect_timeout = self.shared.config.connect_timeout().as_millis() as u32;
        let now_ms = self.now_ms();
        let mut expired = Vec::new();
        for (k, c) in self.conns.iter() {
            if c.version.is_none() {
                if now_ms.wrapping_sub(c.created) > connect_timeout {
                    expired.push((k, CloseKind::NoSession, "no CONNECT in time"));
                }
            } else if c.keep_alive > 0 {
                // [MQTT-3.1.2-24]: one and a half times the keep alive.
                let limit = c.keep_alive as u32 * 1500;
                if now_ms.wrapping_sub(c.last_rx) > limit {
                    expired.push((k, CloseKind::Abnormal, "keep alive timeout"));
                }
            }
        }
        for (_, c) in self.conns.iter_mut() {
            if c.wbuf.is_empty() && c.wbuf.capacity() > 4096 {
                c.wbuf = BytesMut::new();
            }
        }
        for (k, kind, why) in expired {
            log::info!("closing connection from {}: {why}", self.conns[k].peer());
            if self.conns[k].version == Some(ProtocolVersion::V5) {
                self.send(k, &Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::KEEP_ALIVE_TIMEOUT))));
            }
            self.close(k, kind);
        }
        // Delayed wills that are due, and sessions whose expiry interval has run out.
        let mut due = Vec::new();
        for (sk, s) in self.sessions.iter() {
            let will_due = s.pending_will.as_ref().is_some_and(|p| p.0 <= now);
            let expired = s.conn.is_none() && s.expires_at().is_some_and(|at| at <= now);
            if will_due || expired {
                due.push((sk, expired));
            }
        }
        for (sk, expired) in due {
            if let Some(pending) = self.sessions[sk].pending_will.take() {
                self.publish_will(sk, &pending.1);
            }
            if expired {
                self.end_session(sk);
            }
        }
        self.publish_stats();
        if self.id == 0 && self.shared.config.sys_interval > 0 && now >= self.next_sys {
            self.next_sys = now + Duration::from_secs(self.shared.config.sys_interval);
            self.publish_sys();
        }
    }

    fn publish_stats(&mut self) {
        let s = &self.shared.stats[self.id];
        let c = &self.counters;
        s.messages_received.store(c.messages_received, Ordering::Relaxed);
        s.messages_sent.store(c.messages_sent, Ordering::Relaxed);
        s.bytes_received.store(c.bytes_received, Ordering::Relaxed);
        s.bytes_sent.store(c.bytes_sent, Ordering::Relaxed);
        s.publish_dropped.store(c.publish_dropped, Ordering::Relaxed);
        let connected = self.sessions.iter().filter(|(_, s)| s.conn.is_some()).count();
        s.clients_connected.store(connected as u64, Ordering::Relaxed);
        s.sessions.store(self.sessions.len() as u64, Ordering::Relaxed);
        s.retained.store(self.retained.len() as u64, Ordering::Relaxed);
        s.subscriptions.store(self.subs.len() as u64, Ordering::Relaxed);
    }

    /// Stops accepting, publishes the wills of connected clients (they did not DISCONNECT), tells
    /// 5.0 clients the server is shutting down, and writes what is pending.
    fn shutdown(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        // Wills first, while every subscriber is still connected to receive them.
        for &k in &keys {
            let Some(sk) = self.conns[k].session else { continue };
            if let Some(w) = self.sessions[sk].will.take() {
                self.route(Arc::new(Message::from_will(&w, Some((self.id as u16, sk as u32)))));
            }
        }
        self.drain_mail();
        for &k in &keys {
            if self.conns[k].version == Some(ProtocolVersion::V5) {
                self.send(k, &Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::SERVER_SHUTTING_DOWN))));
            }
        }
        self.flush_dirty();
        for &k in &keys {
            if let Some(c) = self.conns.get_mut(k) {
                // Give slow readers a moment to take what is already queued for them.
                let _ = c.stream.flush();
            }
            self.close(k, CloseKind::Normal);
        }
        self.flush_dirty();
        self.send_overflow();
        self.wake_peers();
        self.publish_stats();
        log::info!("worker {} stopped", self.id);
    }
}

fn now_ms(epoch: Instant) -> u32 {
    epoch.elapsed().as_millis() as u32
}

/// Reads into the spare capacity of `buf` without zeroing it first.
fn read_into(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `read` only writes into the slice and reports how many bytes it wrote; we expose
    // exactly those bytes with set_len. u8 has no invalid bit patterns, and TcpStream::read never
    // reads from the buffer it is given.
    let n = unsafe {
        let slice = std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, spare.len());
        stream.read(slice)?
    };
    // SAFETY: the first n spare bytes were just initialised by read.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
