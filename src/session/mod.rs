//! Session state (spec 4.1): what survives a connection of a client that asked for it. Plain data,
//! owned by the client id's home worker; no I/O here. `flow` is the QoS 1/2 engine over it:
//! packets and the clock in, packets to write out through an `Outlet`, testable without a socket.

mod flow;

pub use flow::{Offer, Outlet, PubRecOutcome, QueueBound};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use bytes::Bytes;
use slab::Slab;

use crate::codec::{MqttStr, PacketId, Properties, ProtocolVersion, QoS, SubscriptionOptions, Will};

/// A message on its way to subscribers: shared by every queue it sits in, across workers.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// 5.0 properties as published, minus the topic alias (passed through untouched otherwise).
    pub properties: Option<Box<Properties>>,
    /// The publishing session, for 5.0 no-local: (worker, session key).
    pub origin: Option<(u16, u32)>,
    /// The publishing connection, which a congested subscriber pauses (flow control).
    pub publisher: Option<Publisher>,
    /// From the 5.0 message expiry interval: not delivered after this [MQTT-3.3.2-5].
    pub expires_at: Option<Instant>,
    /// Durable persistence: (origin worker << 48) | sequence, so each worker can report how far
    /// it has routed (see `store`); 0 when not persisted.
    pub stamp: u64,
    /// The loop turn that read the PUBLISH, for delivery latency (`metrics::latency::nanos`);
    /// None for messages that are not a live delivery (the broker's own, retained replays,
    /// recovered from the store).
    pub read_at: Option<u64>,
}

impl Message {
    /// A message with no properties and no publisher (the broker's own, tests, benches).
    pub fn plain(topic: impl Into<MqttStr>, payload: Bytes, qos: QoS, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload,
            qos,
            retain,
            properties: None,
            origin: None,
            publisher: None,
            expires_at: None,
            stamp: 0,
            read_at: None,
        }
    }

    pub fn from_will(will: &Will, origin: Option<(u16, u32)>) -> Message {
        let mut properties = will.properties.clone();
        properties.will_delay_interval = None; // a will property, not a PUBLISH one
        let expires_at =
            properties.message_expiry_interval.map(|s| Instant::now() + std::time::Duration::from_secs(s as u64));
        Message {
            topic: will.topic.clone(),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            properties: (!properties.is_empty()).then(|| Box::new(properties)),
            origin,
            publisher: None,
            expires_at,
            stamp: 0,
            read_at: None,
        }
    }

    /// What the message weighs against byte budgets: its topic and payload.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// A publishing connection, anywhere in the broker: what a congested session pauses and resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publisher {
    pub worker: u16,
    pub conn: u32,
    pub conn_uid: u64,
}

/// One subscription: its options and, in 5.0, its subscription identifier (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: u32,
    /// With an ACL file: 1 + the ACL generation under which everything this filter matches may
    /// be read, so deliveries through it need no check; 0: each message is checked.
    pub acl_whole: u32,
}

/// The shared subscription a delivery came through: `$share/{group}/{filter}`.
pub type GroupKey = (MqttStr, MqttStr);

/// A message as one session receives it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    /// Whether the retain flag goes out set (retained on subscribe, or retain-as-published).
    pub retain: bool,
    /// 5.0 subscription identifiers of every matching subscription [MQTT-3.3.4-3].
    pub sub_ids: Vec<u32>,
    /// Set when it came through a shared subscription: if the session goes away before it is
    /// acknowledged, it goes to another member of the group.
    pub group: Option<Box<GroupKey>>,
    /// Its entry in the session's persisted queue (0: none).
    pub seq: u64,
}

/// Deliveries waiting for a session's output to drain: retained messages matched on SUBSCRIBE
/// [MQTT-3.3.1-6], then live ones (`true`) that arrived while those were still going out.
#[derive(Debug, Default)]
pub struct Backlog {
    pub items: VecDeque<(Delivery, bool)>,
    /// How many of `items` are live.
    pub live: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub state: OutState,
    pub delivery: Delivery,
}

/// A session's own maps hold only what that one client sent, so they use a fixed-key hasher and
/// save the per-map random state (memory that tens of thousands of idle sessions would add up).
pub type FixedState = BuildHasherDefault<ahash::AHasher>;

/// "Never expires" in 5.0, and what a 3.1.1 persistent session gets.
pub const NEVER: u32 = u32::MAX;

#[derive(Debug)]
pub struct Session {
    /// Unique on its worker: tells a session from a later one that reuses its slab key.
    pub uid: u64,
    pub client_id: MqttStr,
    /// The connection attached now, if any.
    pub conn: Option<ConnKey>,
    /// A timer is armed for this session's will delay or expiry at this time.
    pub timer_at: Option<Instant>,
    pub version: ProtocolVersion,
    /// Seconds the session outlives its connection: 0 ends it with the connection (3.1.1 clean
    /// session), `NEVER` keeps it (3.1.1 persistent session).
    pub expiry_interval: u32,
    pub subscriptions: HashMap<MqttStr, Subscription, FixedState>,
    /// Bytes of the filters in `subscriptions`, for `max_subscription_bytes_per_client`.
    pub subscription_bytes: usize,
    /// Outgoing QoS 1/2 messages not yet completed, oldest first; at most `send_window`.
    pub inflight: VecDeque<Inflight>,
    /// QoS 1/2 messages waiting for room in the window (or for the client to return); at most
    /// `max_queued_messages`.
    pub queue: VecDeque<Delivery>,
    /// Bytes (topic and payload) of the messages in `queue`, for `max_queued_bytes`.
    pub queued_bytes: usize,
    /// Retained messages being streamed after a SUBSCRIBE, at the pace the client reads them
    /// (and messages that arrived meanwhile, behind them).
    pub backlog: Option<Box<Backlog>>,
    /// Unacknowledged QoS 1/2 messages we may have out: the lower of our `max_inflight_messages`
    /// and the client's 5.0 receive maximum [MQTT-3.3.4-9].
    pub send_window: usize,
    pub(crate) next_packet_id: u16,
    /// QoS 2 packet ids received and not yet released [MQTT-4.3.3-2]: a duplicate PUBLISH with one
    /// of these is acknowledged but not delivered again. Bounded by the receive maximum.
    pub incoming_qos2: HashSet<u16, FixedState>,
    pub will: Option<Box<Will>>,
    /// A will waiting out its 5.0 will delay interval after an abnormal disconnect.
    pub pending_will: Option<Box<(Instant, Will)>>,
    pub disconnected_at: Option<Instant>,
    /// Flow control: the publishers paused because this session's queue passed its high-water
    /// mark, resumed when it drains below the low-water mark, or when it is found stalled.
    pub waiters: Vec<Publisher>,
    /// No acknowledgement for `slow_subscriber_timeout` while congested: it pauses nobody, and
    /// its queue drops past `max_queued_messages`, until it acknowledges again.
    pub stalled: bool,
    /// When it last completed a QoS 1/2 flow (or attached).
    pub last_progress: Option<Instant>,
    /// A stall check is armed.
    pub stall_timer: bool,
    /// What the ACL file lets this client read and write (none: no ACL file).
    pub access: Option<Box<crate::auth::acl::SessionAccess>>,
    /// Persistence: this session's id in the store and what changed since it was last written
    /// (none: not persisted).
    pub store: Option<Box<SessionStore>>,
    /// The local side of `[[bridge]]` number n on this worker: what it is sent goes to the
    /// remote broker, its topics remapped.
    pub bridge: Option<u16>,
    /// The client is another broker bridging to us (mosquitto's protocol level bit 0x80): its
    /// subscriptions are no-local and retain-as-published, so its own messages never go back.
    pub bridge_peer: bool,
}

/// A queue entry's new state: in flight as (state, packet id), or queued (None), and the delivery.
pub type JournalEntry = (Option<(OutState, u16)>, Delivery);

/// A persisted session's bookkeeping: its id in the store, the next queue entry number, and the
/// queue changes not yet handed to the store thread.
#[derive(Debug, Default)]
pub struct SessionStore {
    pub sid: u64,
    pub next_seq: u64,
    /// The session's own record must be written again.
    pub dirty: bool,
    /// On the worker's list of sessions to write at the end of the turn.
    pub listed: bool,
    /// (entry number, its new state; None: gone).
    pub journal: Vec<(u64, Option<JournalEntry>)>,
}

impl SessionStore {
    pub fn new(sid: u64) -> SessionStore {
        SessionStore { sid, next_seq: 1, dirty: true, ..Default::default() }
    }
}

impl Session {
    pub fn new(client_id: MqttStr, version: ProtocolVersion) -> Session {
        Session {
            uid: 0,
            client_id,
            conn: None,
            timer_at: None,
            version,
            expiry_interval: 0,
            subscriptions: HashMap::default(),
            subscription_bytes: 0,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            backlog: None,
            send_window: 20,
            next_packet_id: 0,
            incoming_qos2: HashSet::default(),
            will: None,
            pending_will: None,
            disconnected_at: None,
            waiters: Vec::new(),
            stalled: false,
            last_progress: None,
            stall_timer: false,
            access: None,
            store: None,
            bridge: None,
            bridge_peer: false,
        }
    }

    /// Live messages waiting behind the retained backlog: they count as queued for flow control.
    pub fn backlog_live(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.live)
    }

    /// When the session ends if nobody reconnects, if ever. A session that never expires by its
    /// own interval (3.1.1 persistent, 5.0 0xFFFFFFFF) ends after `persistent` seconds, if given
    /// (`persistent_client_expiration`).
    pub fn expires_at(&self, persistent: Option<u64>) -> Option<Instant> {
        let at = self.disconnected_at?;
        let secs = if self.expiry_interval == NEVER { persistent? } else { self.expiry_interval as u64 };
        Some(at + std::time::Duration::from_secs(secs))
    }
}

/// A session's key in its home worker's slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey(pub usize);

/// The key of the connection a session is attached to, in the same worker's connection slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey(pub usize);

/// Every session homed on one worker, indexed by client id.
pub struct Sessions {
    slab: Slab<Session>,
    by_client: ClientIndex,
    next_uid: u64,
    /// Sessions with a connection attached.
    pub connected: usize,
}

impl Sessions {
    pub fn with_capacity(n: usize) -> Sessions {
        Sessions { slab: Slab::with_capacity(n), by_client: ClientIndex::with_capacity(n), next_uid: 0, connected: 0 }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn find(&self, client_id: &str) -> Option<SessionKey> {
        self.by_client.get(&self.slab, client_id).map(SessionKey)
    }

    pub fn insert(&mut self, mut session: Session) -> SessionKey {
        self.next_uid += 1;
        session.uid = self.next_uid;
        let sk = self.slab.insert(session);
        self.by_client.insert(&self.slab, sk);
        SessionKey(sk)
    }

    pub fn remove(&mut self, sk: SessionKey) -> Session {
        self.by_client.remove(&self.slab, sk.0);
        let s = self.slab.remove(sk.0);
        if s.conn.is_some() {
            self.connected -= 1;
        }
        s
    }

    pub fn get(&self, sk: SessionKey) -> Option<&Session> {
        self.slab.get(sk.0)
    }

    pub fn get_mut(&mut self, sk: SessionKey) -> Option<&mut Session> {
        self.slab.get_mut(sk.0)
    }

    /// Session `sk` is still the one with `uid`.
    pub fn is(&self, sk: SessionKey, uid: u64) -> bool {
        self.slab.get(sk.0).is_some_and(|s| s.uid == uid)
    }

    /// Attaches or detaches a connection, keeping the connected count.
    pub fn set_conn(&mut self, sk: SessionKey, conn: Option<ConnKey>) {
        let s = &mut self.slab[sk.0];
        match (s.conn.is_some(), conn.is_some()) {
            (false, true) => self.connected += 1,
            (true, false) => self.connected -= 1,
            _ => {}
        }
        s.conn = conn;
    }
}

impl std::ops::Index<SessionKey> for Sessions {
    type Output = Session;
    fn index(&self, k: SessionKey) -> &Session {
        &self.slab[k.0]
    }
}

impl std::ops::IndexMut<SessionKey> for Sessions {
    fn index_mut(&mut self, k: SessionKey) -> &mut Session {
        &mut self.slab[k.0]
    }
}

/// Client id -> session key, storing only the key: the id itself lives once, in the session.
struct ClientIndex {
    table: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
}

impl ClientIndex {
    fn with_capacity(n: usize) -> Self {
        ClientIndex { table: hashbrown::HashTable::with_capacity(n), hasher: ahash::RandomState::new() }
    }

    fn get(&self, sessions: &Slab<Session>, client_id: &str) -> Option<usize> {
        let h = self.hasher.hash_one(client_id);
        self.table.find(h, |&sk| sessions[sk as usize].client_id == client_id).map(|&sk| sk as usize)
    }

    /// Indexes session `sk`, already in `sessions`, by its client id.
    fn insert(&mut self, sessions: &Slab<Session>, sk: usize) {
        let h = self.hasher.hash_one(sessions[sk].client_id.as_str());
        let hasher = &self.hasher;
        self.table.insert_unique(h, sk as u32, |&k| hasher.hash_one(sessions[k as usize].client_id.as_str()));
    }

    /// Forgets session `sk` (call before removing it from `sessions`).
    fn remove(&mut self, sessions: &Slab<Session>, sk: usize) {
        let h = self.hasher.hash_one(sessions[sk].client_id.as_str());
        if let Ok(entry) = self.table.find_entry(h, |&k| k as usize == sk) {
            entry.remove();
        }
    }
}
