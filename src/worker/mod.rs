//! One worker: a single-threaded `mio` event loop that owns its connections, the sessions whose
//! client ids live here, its router (subscriptions, peers' interest, retained store, shared
//! groups) and its ends of the rings. Nothing here takes a lock.
//!
//! One loop turn, in this order and nowhere else:
//! 1. read the clock once; sleep in `poll` unless work is pending (peers wake us only if parked);
//! 2. accept, write what a writable socket can take, read readable sockets and handle their
//!    packets (`inbound`, `connect`): a PUBLISH is routed at once (`deliver`);
//! 3. take the mail peers sent (`mail`), then the SUBSCRIBEs read this turn, which thus see every
//!    retained message routed before they arrived;
//! 4. fire due timers; flush every connection with output, once; remove closed connections;
//!    move held mail into rings and wake the peers that got mail.
//!
//! Closing a connection detaches it from its session at once but frees its slab slot only in
//! step 4, so no handler ever finds a key it holds pointing at nothing.

mod conn;
mod connect;
mod deliver;
mod flow;
mod inbound;
mod mail;
mod mailbox;
mod stats;
mod timers;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use crate::broker::Shared;
use crate::codec::{
    decode, next_frame, packet_type, parse_fixed_header, DecodeError, Packet, ProtocolVersion, PublishRef,
};
use crate::ring::{Consumer, Producer};
use crate::router::Router;
use crate::session::{SessionKey, Sessions, Subscription};
use conn::{CloseKind, Conn, ConnKey, Conns, Transport};
pub use mailbox::Mail;
use mailbox::{Mailbox, Pending};
use timers::{Timer, Timers};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per connection per event before others get a turn.
const READS_PER_TURN: usize = 16;
/// The longest sleep: `$SYS` and statistics are looked at this often.
const TICK: Duration = Duration::from_millis(250);
/// Topic aliases a 5.0 client may use towards us (advertised in CONNACK).
pub const TOPIC_ALIAS_MAXIMUM: u16 = 32;

/// The worker's clock, read once per loop turn.
pub struct Clock {
    epoch: Instant,
    pub now: Instant,
    /// Milliseconds since the worker started.
    pub ms: u64,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock { epoch: now, now, ms: 0 }
    }

    fn update(&mut self) {
        self.now = Instant::now();
        self.ms = self.now.duration_since(self.epoch).as_millis() as u64;
    }

    /// The millisecond clock in 32 bits, wrapping after 49 days: what connections store (keep
    /// alive and connect timeout intervals are far shorter, and `wrapping_sub` keeps them right).
    pub fn ms32(&self) -> u32 {
        self.ms as u32
    }
}

/// A SUBSCRIBE read this turn, handled after the turn's mail.
pub struct DeferredSubscribe {
    conn: ConnKey,
    conn_uid: u64,
    session: SessionKey,
    subscribe: Box<crate::codec::Subscribe>,
}

/// A packet that must see every message peers routed before it arrived: handled after the turn's
/// mail, while its connection reads nothing more.
pub enum Deferred {
    /// A CONNECT whose session lives here: a resumed session gets what was routed to it first.
    Connect { conn: ConnKey, conn_uid: u64, connect: Box<crate::codec::Connect>, assigned_id: bool },
    /// A SUBSCRIBE: the retained messages routed before it are in the store.
    Subscribe(DeferredSubscribe),
}

/// Work collected during a turn and done at one point of it.
#[derive(Default)]
struct Turn {
    /// Connections with output to write.
    dirty: Vec<ConnKey>,
    /// Connections with input left to read (their turn ran out, or a block lifted).
    more_to_read: Vec<(ConnKey, u64)>,
    /// Connections not read because a peer's ring is full or its credit window used up: read
    /// once it drains or credits.
    starved: Vec<(ConnKey, u64)>,
    /// Closed connections, removed at the end of the turn.
    closed: Vec<ConnKey>,
    deferred: Vec<Deferred>,
    /// Connections whose output buffer emptied while large: trimmed on the tick if still idle.
    trim: Vec<(ConnKey, u64)>,
}

/// Buffers reused from message to message.
#[derive(Default)]
struct Scratch {
    read_buf: BytesMut,
    matches: Vec<(u32, Subscription)>,
    /// A QoS 0 packet encoded once and copied to every subscriber of one protocol family.
    encoded: BytesMut,
    peers: Vec<u16>,
    groups: Vec<crate::router::GroupId>,
    mail: Vec<(u16, Mail)>,
}

/// Plain per-worker counters, copied into `Shared::stats` once per tick.
#[derive(Default)]
pub struct Counters {
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub publish_dropped: u64,
    generated_ids: u64,
}

pub struct Worker {
    id: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Conns,
    sessions: Sessions,
    router: Router,
    mailbox: Mailbox,
    pending: Pending,
    timers: Timers,
    clock: Clock,
    turn: Turn,
    scratch: Scratch,
    counters: Counters,
    sys: stats::SysState,
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
        // Sized for this worker's share of `max_connections` up front: the memory is only
        // reserved, and pages are touched as entries are used, so growth never copies.
        let per_worker = shared.config.max_connections.div_ceil(n);
        Worker {
            id,
            poll,
            listener: Some(listener),
            conns: Conns::with_capacity(per_worker),
            sessions: Sessions::with_capacity(per_worker),
            router: Router::new(n),
            mailbox: {
                let mut m = Mailbox::new(id, outbox, inbox);
                // A quarter of the queue bound over all peers: what a paused publisher may
                // still have on its way to a congested subscriber (see `flow`).
                m.set_credit_window((shared.config.max_queued_messages / (4 * n.saturating_sub(1).max(1))).max(8));
                m
            },
            pending: Pending::default(),
            timers: Timers::default(),
            clock: Clock::new(),
            turn: Turn::default(),
            scratch: Scratch { read_buf: BytesMut::with_capacity(READ_CHUNK), ..Scratch::default() },
            counters: Counters::default(),
            sys: stats::SysState::new(),
            shared,
        }
    }

    pub fn run(&mut self) -> io::Result<()> {
        if let Some(l) = self.listener.as_mut() {
            self.poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(1024);
        loop {
            self.clock.update();
            let idle = self.turn.more_to_read.is_empty() && self.turn.dirty.is_empty();
            // Sleep only after telling producers so and finding the rings still empty.
            let mailbox = &self.mailbox;
            let sleep = idle && self.shared.parking[self.id].park(|| mailbox.inbox_empty());
            let timeout = if sleep { self.sleep_time() } else { Duration::ZERO };
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.shared.parking[self.id].unpark();
            if let Err(e) = polled {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.clock.update();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(k) => {
                        let k = ConnKey(k);
                        let Some(uid) = self.conns.get(k).map(|c| c.uid) else { continue };
                        if ev.is_writable() && self.conns.alive(k, uid) {
                            self.flush(k);
                        }
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        if readable && self.conns.alive(k, uid) {
                            self.read_conn(k, uid);
                        }
                    }
                }
            }
            for (k, uid) in std::mem::take(&mut self.turn.more_to_read) {
                if self.conns.alive(k, uid) {
                    self.read_conn(k, uid);
                }
            }
            self.take_mail();
            self.run_deferred();
            if self.shared.shutdown.load(Ordering::Relaxed) {
                self.shutdown();
                return Ok(());
            }
            self.fire_timers();
            self.end_turn();
        }
    }

    /// Step 4 of the turn: output, closed connections, mail to peers.
    fn end_turn(&mut self) {
        self.flush_dirty();
        self.reap();
        self.mailbox.send_credits();
        self.mailbox.send_overflow();
        self.feed_starved();
        self.mailbox.wake_peers(&self.shared);
        if self.mailbox.lost_connections > 0 {
            self.shared.connections.fetch_sub(std::mem::take(&mut self.mailbox.lost_connections), Ordering::Relaxed);
        }
    }

    fn starve(&mut self, k: ConnKey, uid: u64) {
        let c = &mut self.conns[k];
        if !c.flags.starved {
            c.flags.starved = true;
            self.turn.starved.push((k, uid));
        }
    }

    /// Connections left unread for a peer's sake are read again once it has room and credit.
    fn feed_starved(&mut self) {
        if self.turn.starved.is_empty() || self.mailbox.backlogged() || self.mailbox.out_of_credit() {
            return;
        }
        for (k, uid) in std::mem::take(&mut self.turn.starved) {
            if self.conns.alive(k, uid) {
                self.conns[k].flags.starved = false;
                self.turn.more_to_read.push((k, uid));
            }
        }
    }

    fn sleep_time(&self) -> Duration {
        let tick = self.sys.next_tick_ms.saturating_sub(self.clock.ms);
        let timer = self.timers.next_deadline().map_or(u64::MAX, |at| at.saturating_sub(self.clock.ms));
        // Mail held for a full ring is retried every millisecond, without spinning: on a machine
        // with more workers than cores a spinning sender would starve the very peer it waits for.
        let retry = if self.mailbox.backlogged() { 1 } else { u64::MAX };
        Duration::from_millis(tick.min(timer).min(retry))
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let total = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let over_limit = total > self.shared.config.max_connections;
                    let k = self.conns.next_key();
                    if let Err(e) = self.poll.registry().register(&mut stream, Token(k.0), Interest::READABLE) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    let now = self.clock.ms32();
                    let (k, uid) =
                        self.conns.insert(|uid| Conn::new(uid, Transport::Tcp(stream), now, now, over_limit));
                    self.timers.arm(
                        self.clock.ms + self.shared.config.connect_timeout().as_millis() as u64,
                        Timer::conn(k, uid),
                    );
                    log::debug!("worker {}: connection {} from {peer}", self.id, k.0);
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

    /// Reads what the socket has into the worker's read buffer and handles every complete packet.
    fn read_conn(&mut self, k: ConnKey, uid: u64) {
        if self.conns[k].flags.blocked || self.conns[k].paused > 0 {
            return;
        }
        let mut buf = std::mem::take(&mut self.scratch.read_buf);
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
        // Bytes kept from before (the rest of a handover, or what waited while blocked) first.
        let mut go_on = buf.is_empty() || self.process(k, uid, &mut buf);
        let mut close = None;
        let mut turn = 0;
        while go_on {
            // A peer's ring is full: read no more until it drains [DESIGN: full rings].
            if turn == READS_PER_TURN {
                self.turn.more_to_read.push((k, uid));
                break;
            }
            // A peer's ring is full, or its credit window used up: read no more until it drains
            // [DESIGN: full rings].
            if self.mailbox.backlogged() || self.mailbox.out_of_credit() {
                self.starve(k, uid);
                break;
            }
            turn += 1;
            // A client that does not read what we owe it is not read from either until it
            // catches up: its output cannot grow without end.
            let c = &mut self.conns[k];
            if c.wbuf.len() > self.shared.config.max_output_bytes {
                c.flags.read_paused = true;
                break;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
            match c.transport.read_into(&mut buf) {
                Ok(0) => {
                    close = Some(CloseKind::Abnormal);
                    break;
                }
                Ok(n) => {
                    self.counters.bytes_received += n as u64;
                    c.last_rx = self.clock.ms32();
                    go_on = self.process(k, uid, &mut buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("worker {}: read error on {}: {e}", self.id, k.0);
                    close = Some(CloseKind::Abnormal);
                    break;
                }
            }
        }
        if self.conns.alive(k, uid) {
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
        self.scratch.read_buf = buf;
    }

    /// Handles every complete packet in `buf`. Returns false when the connection is closed or
    /// blocked (its remaining bytes stay in `buf`).
    fn process(&mut self, k: ConnKey, uid: u64, buf: &mut BytesMut) -> bool {
        let max = self.shared.config.max_packet_size as usize;
        loop {
            let version = self.conns[k].version;
            let (first, hl, size) = match next_frame(buf, version, max) {
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
            if first >> 4 == packet_type::PUBLISH && version.is_some() {
                // A peer's credit window is used up: the PUBLISH waits, in the buffer, for credit.
                if self.mailbox.out_of_credit() {
                    self.starve(k, uid);
                    return false;
                }
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
                match packet {
                    Packet::Connect(connect) => {
                        if let Some(handover) = self.on_connect(k, connect) {
                            self.hand_over(k, handover, buf.split());
                            return false;
                        }
                    }
                    packet => self.on_packet(k, packet),
                }
            }
            let c = &self.conns[k];
            if !self.conns.alive(k, uid) || c.flags.blocked || c.paused > 0 {
                return false;
            }
        }
    }

    /// Logs a violation, tells a 5.0 client why, and closes the connection (publishing its will).
    fn protocol_error(&mut self, k: ConnKey, e: &DecodeError) {
        let c = &mut self.conns[k];
        if c.version.is_none() && e.reason_code() == crate::codec::ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
            // [MQTT-3.1.2-2]: answer an unsupported level with CONNACK 0x01 and close. The level is
            // unknown, so the answer takes the 3.1.1 form, as other brokers do.
            let code = crate::codec::ConnectReturnCode::UNACCEPTABLE_PROTOCOL_VERSION;
            Packet::ConnAck(Box::new(crate::codec::ConnAck { code, ..Default::default() }))
                .encode(ProtocolVersion::V311, &mut c.wbuf);
        }
        self.disconnect_with(k, e.reason_code(), &e.to_string());
    }

    fn mark_dirty(&mut self, k: ConnKey) {
        let c = &mut self.conns[k];
        if !c.flags.dirty {
            c.flags.dirty = true;
            self.turn.dirty.push(k);
        }
    }

    /// Queues an encoded control packet on a connection.
    fn send(&mut self, k: ConnKey, packet: &Packet) {
        self.conns[k].send(packet);
        self.mark_dirty(k);
    }

    fn flush_dirty(&mut self) {
        // A flush can make more output (a session pumps what waited for room): loop until quiet.
        while !self.turn.dirty.is_empty() {
            for k in std::mem::take(&mut self.turn.dirty) {
                if let Some(c) = self.conns.get_mut(k) {
                    c.flags.dirty = false;
                    if !c.flags.closed {
                        self.flush(k);
                    }
                }
            }
        }
    }

    /// Writes a connection's output buffer until done or the socket would block; then lets its
    /// session send what waited for room.
    fn flush(&mut self, k: ConnKey) {
        let max_output = self.shared.config.max_output_bytes;
        let c = &mut self.conns[k];
        let mut failed = false;
        while !c.wbuf.is_empty() {
            match c.transport.write(&c.wbuf) {
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
        if c.flags.read_paused && c.wbuf.len() <= max_output / 2 {
            c.flags.read_paused = false;
            self.turn.more_to_read.push((k, c.uid));
        }
        let pending = !c.wbuf.is_empty();
        if pending != c.flags.writable {
            let interest = if pending { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if self.poll.registry().reregister(c.transport.source(), Token(k.0), interest).is_ok() {
                c.flags.writable = pending;
            }
        }
        if pending {
            return;
        }
        if c.flags.close_after_flush {
            self.close(k, CloseKind::Normal);
            return;
        }
        if c.wbuf.capacity() <= 256 {
            // An idle connection holds no output buffer, not even the few bytes of its last CONNACK
            // or PINGRESP. Larger buffers stay while the connection is busy (freeing and faulting
            // them in again per write costs more than the copy they carry); the tick trims them.
            c.wbuf = BytesMut::new();
        } else if c.wbuf.capacity() > 4096 && !c.flags.trim_listed {
            c.flags.trim_listed = true;
            self.turn.trim.push((k, c.uid));
        }
        if let Some(sk) = c.session {
            self.pump(sk);
        }
    }

    /// Frees the slots of connections closed this turn.
    fn reap(&mut self) {
        for k in std::mem::take(&mut self.turn.closed) {
            let Some(c) = self.conns.remove(k) else { continue };
            let mut stream = c.transport.into_tcp();
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    fn fire_timers(&mut self) {
        while let Some(t) = self.timers.pop_due(self.clock.ms) {
            match t {
                Timer::Conn(k, uid) => self.conn_timer(ConnKey(k), uid),
                Timer::Session(sk, uid) => self.session_timer(SessionKey(sk), uid),
                Timer::Stall(sk, uid) => self.stall_check(SessionKey(sk), uid),
            }
        }
        if self.clock.ms >= self.sys.next_tick_ms {
            self.tick();
        }
    }

    /// A connection's timer: no CONNECT in time, or no packet for 1.5 times its keep alive.
    fn conn_timer(&mut self, k: ConnKey, uid: u64) {
        if !self.conns.alive(k, uid) {
            return;
        }
        let now = self.clock.ms32();
        let c = &self.conns[k];
        let (limit, since, why, kind) = if c.version.is_none() {
            let limit = self.shared.config.connect_timeout().as_millis() as u32;
            (limit, c.created, "no CONNECT in time", CloseKind::NoSession)
        } else if c.keep_alive > 0 {
            // [MQTT-3.1.2-24]: one and a half times the keep alive.
            (c.keep_alive as u32 * 1500, c.last_rx, "keep alive timeout", CloseKind::Abnormal)
        } else {
            return;
        };
        // Millisecond clocks truncate: strictly past the limit, so never a moment early.
        let elapsed = now.wrapping_sub(since);
        if elapsed <= limit {
            self.timers.arm(self.clock.ms + (limit - elapsed) as u64 + 1, Timer::conn(k, uid));
            return;
        }
        log::info!("closing connection from {}: {why}", c.peer());
        if kind == CloseKind::NoSession {
            self.close(k, kind);
        } else {
            self.disconnect_with(k, crate::codec::ReasonCode::KEEP_ALIVE_TIMEOUT, why);
        }
    }

    /// Trims output buffers that stayed empty since they were last used.
    fn trim_buffers(&mut self) {
        for (k, uid) in std::mem::take(&mut self.turn.trim) {
            if self.conns.alive(k, uid) {
                let c = &mut self.conns[k];
                c.flags.trim_listed = false;
                if c.wbuf.is_empty() {
                    c.wbuf = BytesMut::new();
                }
            }
        }
    }
}
