//! One worker: a single-threaded `mio` event loop that owns its connections, the sessions whose
//! client ids live here, its router (subscriptions, peers' interest, retained store, shared
//! groups) and its ends of the rings. The one lock is the worker's own slot (`slot`): its thread
//! holds it for a turn and lets go while it sleeps; nothing in a turn waits for another lock.
//!
//! One loop turn, in this order and nowhere else:
//! 1. read the clock once; sleep in `poll` unless work is pending (peers wake us only if parked);
//! 2. accept, write what a writable socket can take, read readable sockets (`wire`) and handle
//!    their packets (`inbound`, `connect`): a PUBLISH is routed at once (`deliver`);
//! 3. take the mail peers sent (`mail`), then the SUBSCRIBEs read this turn, which thus see every
//!    retained message routed before they arrived;
//! 4. fire due timers; flush every connection with output, once; remove closed connections;
//!    move held mail into rings, and for each peer that got mail while it sleeps, run a turn for
//!    it (`slot::help`: its state is locked by its thread only while it is awake, so a peer can take
//!    it while it sleeps), or wake it when that cannot be done.
//!
//! Closing a connection detaches it from its session at once but frees its slab slot only in
//! step 4, so no handler ever finds a key it holds pointing at nothing.

mod auth;
mod batch;
mod bridge;
mod catchup;
mod conn;
mod connect;
mod deliver;
mod flow;
mod host;
mod inbound;
mod limits;
mod linger;
mod made;
mod mail;
mod mailbox;
mod persist;
mod recent;
mod slot;
mod stats;
mod stop;
mod timers;
mod wire;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::TcpListener;
use mio::{Events, Interest, Registry, Token};

use crate::broker::Shared;
use crate::codec::QoS;
use crate::ring::{Consumer, Producer};
use crate::router::Router;
use crate::session::{SessionKey, Sessions, Subscription};
pub use bridge::BridgeShared;
use conn::{CloseKind, Conn, ConnKey, Conns, Transport};
pub use host::Hosting;
pub use limits::{Limit, LIMITS};
pub use mailbox::Mail;
use mailbox::{Mailbox, Pending};
pub use persist::RecoveryPlan;
pub use slot::run;
use timers::{Timer, Timers};

pub const WAKER: Token = Token(usize::MAX - 2);
/// Listener `i` polls as `Token(LISTENERS - i)`; connections count up from 0.
const LISTENERS: usize = usize::MAX - 16;

fn listener_index(t: Token) -> Option<usize> {
    (t.0 <= LISTENERS && t.0 > LISTENERS - 1024).then(|| LISTENERS - t.0)
}

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
    /// `now` as a read time (`metrics::latency::nanos`).
    pub read_ns: u64,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock { epoch: now, now, ms: 0, read_ns: crate::metrics::latency::nanos(now) }
    }

    fn update(&mut self) {
        self.now = Instant::now();
        self.ms = self.now.duration_since(self.epoch).as_millis() as u64;
        self.read_ns = crate::metrics::latency::nanos(self.now);
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
    /// When it reached the host (`Conn::arrived`).
    arrived: u64,
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
    /// The messages made for what keeps them: the topic a run shares and the spare messages
    /// (`View::to_message_in`).
    made: made::Made,
    /// Sleeping peers this turn sent mail to.
    due: Vec<usize>,
}

/// Plain per-worker counters, copied into `Shared::stats` once per tick.
#[derive(Default)]
pub struct Counters {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub publish_dropped: u64,
    /// Messages not delivered, by cause (`metrics::Drop`).
    pub drops: [u64; crate::metrics::DROPS],
    /// PUBLISH packets received by QoS, and their payload bytes (the totals are their sums).
    pub received_qos: [u64; 3],
    pub received_bytes: [u64; 3],
    /// PUBLISH packets sent by QoS (as delivered, after downgrade), and their payload bytes.
    pub sent_qos: [u64; 3],
    pub sent_bytes: [u64; 3],
    /// Refusals by byte budget, indexed by `limits::Limit`.
    pub limits: [u64; limits::LIMITS],
    generated_ids: u64,
}

impl Counters {
    /// `n` copies of a `payload`-byte message sent at `qos`.
    #[inline]
    pub fn sent(&mut self, qos: QoS, n: u64, payload: usize) {
        self.sent_qos[qos as usize] += n;
        self.sent_bytes[qos as usize] += n * payload as u64;
    }

    /// What a `ConnOutlet` wrote.
    #[inline]
    pub fn sent_through(&mut self, out: &conn::ConnOutlet<'_>) {
        for q in 0..3 {
            self.sent_qos[q] += out.sent_qos[q];
            self.sent_bytes[q] += out.sent_bytes[q];
        }
    }

    /// A message not delivered: counted by cause, and in `$SYS/broker/publish/messages/dropped`
    /// when a bound or the memory limit dropped it (as mosquitto counts).
    #[inline]
    pub fn dropped(&mut self, cause: crate::metrics::Drop) {
        self.drops[cause as usize] += 1;
        if cause.is_bound() {
            self.publish_dropped += 1;
        }
    }
}

pub struct Worker {
    id: usize,
    shared: Arc<Shared>,
    /// Where this worker's sockets are registered; its thread owns the `Poll` and sleeps in it.
    registry: Registry,
    /// This turn is run by a peer for this sleeping worker (`help`).
    helping: bool,
    /// When the worker, going to sleep, planned to wake (its clock's milliseconds).
    wake_at_ms: u64,
    /// While the host's thread serves this worker (`host`): its own thread's `Poll`.
    hosted_poll: Option<mio::Poll>,
    /// One socket per listener (`Shared::listeners` order), shared with the other workers
    /// through SO_REUSEPORT.
    listeners: Vec<TcpListener>,
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
    latency: crate::metrics::latency::Latency,
    sys: stats::SysState,
    budget: limits::Budget,
    auth: auth::AuthState,
    /// Persistence, when it is on: the batch for the store thread, held acknowledgements.
    persist: Option<Box<persist::WorkerStore>>,
    /// The bridges this worker runs (those whose local session is homed here).
    bridges: Vec<bridge::Bridge>,
    /// Closed connections whose client is still reading the reason (`linger`).
    lingering: linger::Lingering,
    /// Messages routed in the last moments, for subscriptions that arrived before them but were
    /// read after them (`catchup`).
    recent: recent::Recent,
    /// Shutting down: the wills are published, the peers' are awaited (`stop::Stopping`).
    stopping: Option<stop::Stopping>,
}

impl Worker {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        registry: Registry,
        listeners: Vec<TcpListener>,
        outbox: Vec<Option<Producer<Mail>>>,
        inbox: Vec<Option<Consumer<Mail>>>,
    ) -> Worker {
        let n = shared.workers;
        crate::metrics::latency::epoch();
        // Sized for this worker's share of `max_connections` up front: the memory is only
        // reserved, and pages are touched as entries are used, so growth never copies.
        let per_worker = shared.config.max_connections.div_ceil(n);
        let tx = shared.store_tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let persist = match (&shared.store, tx) {
            (Some(store), Some(tx)) => {
                Some(Box::new(persist::WorkerStore::new(store.clone(), tx, shared.config.max_inflight_messages)))
            }
            _ => None,
        };
        Worker {
            id,
            registry,
            helping: false,
            wake_at_ms: 0,
            hosted_poll: None,
            listeners,
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
            // Every buffer used for every message gets its room here, on this worker's own thread,
            // and never grows in the common case. Grown later, it could be allocated by another
            // thread (one hosting or helping this worker) or from a chunk another worker freed,
            // both beside what the other worker writes for every message: a cache line the two
            // cores would fight over. With 2 workers that showed as about one run in four of
            // fan-in at saturation costing 20-55% more per message (README: Memory and allocation).
            scratch: Scratch {
                read_buf: BytesMut::with_capacity(READ_CHUNK),
                matches: Vec::with_capacity(64),
                encoded: BytesMut::with_capacity(4096),
                peers: Vec::with_capacity(64),
                groups: Vec::with_capacity(32),
                mail: Vec::with_capacity(64),
                due: Vec::with_capacity(32),
                ..Scratch::default()
            },
            counters: Counters::default(),
            latency: Default::default(),
            sys: stats::SysState::new(),
            budget: limits::Budget::default(),
            auth: auth::AuthState::default(),
            persist,
            bridges: Vec::new(),
            lingering: linger::Lingering::default(),
            recent: recent::Recent::new(n, shared.config.arrival_order),
            stopping: None,
            shared,
        }
    }

    /// Before the loop: recovered sessions, bridges, listeners.
    fn start(&mut self) -> io::Result<()> {
        self.recover();
        self.start_bridges();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            self.registry.register(l, Token(LISTENERS - i), Interest::READABLE)?;
        }
        Ok(())
    }

    /// Step 1 of the turn, before the poll: how long the worker may sleep in it (zero: work is
    /// pending or mail came in after the worker said it sleeps).
    fn before_poll(&mut self) -> Duration {
        self.clock.update();
        let idle = self.turn.more_to_read.is_empty() && self.turn.dirty.is_empty();
        // Sleep only after telling producers so and finding the rings still empty.
        let mailbox = &self.mailbox;
        let sleep = idle && self.shared.parking[self.id].park(|| mailbox.inbox_empty());
        let mut timeout = if sleep { self.sleep_time() } else { Duration::ZERO };
        if self.stopping.is_some() {
            // Waiting for the peers' wills: a peer counting itself wakes nobody.
            timeout = timeout.min(stop::STOPPING_POLL);
        }
        self.wake_at_ms = self.clock.ms + timeout.as_millis() as u64;
        timeout
    }

    /// Steps 2-4 of the turn, for what the poll returned. Returns false once the worker has
    /// shut down. A turn run by a helping peer (`helping`, no events) or by the host
    /// (`hosted_poll`) leaves shutting down to the worker's own thread.
    fn turn(&mut self, events: &Events) -> bool {
        self.clock.update();
        // Mail first: a peer's new interest that arrived with this wake-up applies to the
        // PUBLISHes read below (arrival order, as one loop would see it).
        self.take_mail();
        for ev in events.iter() {
            match ev.token() {
                WAKER => {}
                t if host::hosted_index(t).is_some() => {}
                t if listener_index(t).is_some() => self.accept(LISTENERS - t.0),
                t if linger::Lingering::is_token(t) => self.lingering.ready(&self.registry, t),
                Token(k) => {
                    let k = ConnKey(k);
                    let Some(uid) = self.conns.get(k).map(|c| c.uid) else { continue };
                    if ev.is_writable() && self.conns.alive(k, uid) {
                        self.flush(k);
                    }
                    if ev.is_read_closed() || ev.is_error() {
                        self.conns[k].flags.read_closed = true;
                    }
                    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    if readable && self.conns.alive(k, uid) {
                        self.read_or_wait(k, uid);
                    }
                }
            }
        }
        for (k, uid) in std::mem::take(&mut self.turn.more_to_read) {
            if self.conns.alive(k, uid) {
                self.read_or_wait(k, uid);
            }
        }
        self.take_mail();
        self.take_verdicts();
        self.run_deferred();
        let own = !self.helping && self.hosted_poll.is_none();
        if own && self.shared.shutdown.load(Ordering::Relaxed) && self.stop_step() {
            self.flush_store();
            return false;
        }
        self.fire_timers();
        self.end_turn();
        if own && self.stopping.is_some() {
            self.wills_in_rings();
        }
        true
    }

    /// Reads a connection, unless a SUBSCRIBE or CONNECT read this turn waits for the turn's
    /// mail: then it is read next turn, so whatever it sends (a PUBLISH for the new subscriber,
    /// say) is handled after the packets that arrived before it, as a single loop would.
    fn read_or_wait(&mut self, k: ConnKey, uid: u64) {
        if self.turn.deferred.is_empty() {
            self.read_conn(k, uid);
        } else {
            self.turn.more_to_read.push((k, uid));
        }
    }

    /// Step 4 of the turn: output, closed connections, mail to peers.
    fn end_turn(&mut self) {
        self.flush_store();
        self.release_acks();
        self.flush_dirty();
        if !self.latency.turn_is_empty() {
            self.latency.end_turn(Instant::now());
        }
        self.reap();
        self.mailbox.send_batches();
        self.mailbox.send_credits();
        self.mailbox.send_overflow();
        self.feed_starved();
        self.wake_due(true);
        if self.mailbox.lost_connections > 0 {
            self.shared.connections.fetch_sub(std::mem::take(&mut self.mailbox.lost_connections), Ordering::Relaxed);
        }
    }

    /// The sleeping peers this turn sent mail to: each is helped (`may_help`: its turn run here,
    /// if its lock is free) or woken.
    fn wake_due(&mut self, may_help: bool) {
        let mut due = std::mem::take(&mut self.scratch.due);
        self.mailbox.due_wakes(&self.shared, &mut due);
        for &p in &due {
            if !(may_help && self.help(p)) {
                self.mailbox.wakeups += 1;
                let _ = self.shared.wakers[p].wake();
            }
        }
        self.scratch.due = due;
    }

    fn sleep_time(&self) -> Duration {
        let tick = self.sys.next_tick_ms.saturating_sub(self.clock.ms);
        let timer = self.timers.next_deadline().map_or(u64::MAX, |at| at.saturating_sub(self.clock.ms));
        // Mail held for a full ring is retried every millisecond, without spinning: on a machine
        // with more workers than cores a spinning sender would starve the very peer it waits for.
        let retry = if self.mailbox.backlogged() { 1 } else { u64::MAX };
        Duration::from_millis(tick.min(timer).min(retry))
    }

    /// The transport a new connection on listener `i` gets: TCP, TLS, WebSockets over either.
    fn transport_for(&self, i: usize, stream: mio::net::TcpStream) -> io::Result<Transport> {
        use crate::transport::{Lower, TlsStream, WsStream};
        let spec = &self.shared.listeners[i];
        let lower = match self.shared.tls.get(i) {
            Some(config) => Lower::Tls(Box::new(TlsStream::new(stream, config, spec.use_identity_as_username)?)),
            None => Lower::Tcp(stream),
        };
        Ok(match (spec.protocol, lower) {
            (crate::config::Protocol::Websockets, lower) => {
                Transport::Ws(Box::new(WsStream::new(lower, self.shared.config.max_packet_size as usize)))
            }
            (_, Lower::Tls(t)) => Transport::Tls(t),
            (_, Lower::Tcp(s)) => Transport::Tcp(s),
        })
    }

    fn accept(&mut self, i: usize) {
        loop {
            let Some(listener) = self.listeners.get(i) else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if self.recent.on {
                        let _ = crate::transport::stamp_arrivals(&stream);
                    }
                    let mut transport = match self.transport_for(i, stream) {
                        Ok(t) => t,
                        Err(e) => {
                            log::warn!("cannot start a session for {peer}: {e}");
                            continue;
                        }
                    };
                    let total = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let over_limit = total > self.shared.config.max_connections;
                    let k = self.conns.next_key();
                    if let Err(e) = self.registry.register(transport.source(), Token(k.0), Interest::READABLE) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    let now = self.clock.ms32();
                    let (k, uid) = self.conns.insert(|uid| Conn::new(uid, transport, now, now, over_limit));
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

    fn fire_timers(&mut self) {
        self.check_memory();
        while let Some(t) = self.timers.pop_due(self.clock.ms) {
            match t {
                Timer::Conn(k, uid) => self.conn_timer(ConnKey(k), uid),
                Timer::Session(sk, uid) => self.session_timer(SessionKey(sk), uid),
                Timer::Stall(sk, uid) => self.stall_check(SessionKey(sk), uid),
                Timer::Partial(k, uid) => self.partial_timer(ConnKey(k), uid),
                Timer::Linger(n, uid) => self.lingering.expire(&self.registry, n, uid),
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
        let (limit, since, why, kind) = if c.session.is_none() {
            // No CONNECT yet, or one still being authenticated (a SCRAM exchange, a password
            // check): both must be done within the connect timeout.
            let limit = self.shared.config.connect_timeout().as_millis() as u32;
            let why = if c.version.is_none() { "no CONNECT in time" } else { "authentication not done in time" };
            (limit, c.created, why, CloseKind::NoSession)
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
