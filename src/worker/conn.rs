//! A network connection: its byte transport, its input and output buffers and the per-connection
//! protocol state (version, keep alive, topic aliases). Plain data owned by its worker's slab;
//! `Conns` is that slab, with typed keys and a uid per connection so a reused slab key is never
//! mistaken for the connection that had it before.
//!
//! The transport (`crate::transport`: TCP, TLS, WebSockets) sits below: everything here sees
//! MQTT bytes only.

use std::ops::{Index, IndexMut};

use bytes::{Buf, BytesMut};
use slab::Slab;

use crate::codec::{Ack, MqttStr, Packet, PacketId, Properties, ProtocolVersion, PublishHeader};
pub use crate::session::ConnKey;
use crate::session::{Delivery, Outlet, SessionKey};

pub use crate::transport::Transport;

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

pub struct Conn {
    pub uid: u64,
    pub transport: Transport,
    /// Bytes of an incomplete packet kept between reads (empty for an idle connection), or of
    /// packets not yet handled while the connection is blocked.
    pub rbuf: BytesMut,
    /// Encoded packets waiting for the socket; bounded by `max_output_bytes` for QoS 0.
    pub wbuf: BytesMut,
    pub version: Option<ProtocolVersion>,
    pub session: Option<SessionKey>,
    pub keep_alive: u16,
    /// Worker clock milliseconds of the last read, and of the accept.
    pub last_rx: u32,
    pub created: u32,
    /// When the last bytes read reached the host (kernel stamp, wall clock ns); 0: not known.
    pub arrived: u64,
    pub flags: Flags,
    /// The client's 5.0 maximum packet size: larger packets are not sent to it.
    pub max_packet_out: usize,
    /// Inbound 5.0 topic aliases: alias n is `aliases[n - 1]`. Boxed: most clients use none.
    #[allow(clippy::box_collection)]
    pub aliases: Option<Box<Vec<Option<MqttStr>>>>,
    /// Outbound topic aliases, for a 5.0 client that accepts them.
    pub out_aliases: Option<Box<OutAliases>>,
    /// Congested subscribers holding this publisher: while any does, it is not read.
    pub paused: u16,
    /// Bytes of `rbuf` counted against `max_partial_bytes`.
    pub partial: u32,
    /// Acknowledgements withheld while paused, sent on resume.
    #[allow(clippy::box_collection)]
    pub held: Option<Box<Vec<Packet>>>,
    /// This worker's bridge number n dialled this connection: we are the client.
    pub bridge: Option<u16>,
}

/// A connection's yes/no state, one byte each.
#[derive(Default, Debug, Clone, Copy)]
pub struct Flags {
    /// On the worker's list of connections to flush.
    pub dirty: bool,
    /// Registered for WRITABLE because a write would have blocked.
    pub writable: bool,
    /// Refused at accept time (over `max_connections`): answer CONNECT with a refusal.
    pub over_limit: bool,
    /// Close once the output buffer is written.
    pub close_after_flush: bool,
    /// Its last output tells the client why it is closed: once closed, the socket lingers so the
    /// client reads it (`linger`).
    pub linger: bool,
    /// The 5.0 client wants reason strings (request problem information).
    pub problem_info: bool,
    /// Not read until its output drains below half of `max_output_bytes`.
    pub read_paused: bool,
    /// A packet it sent waits for other workers (a SUBSCRIBE's interest round): nothing more of
    /// its input is handled until that completes, so its packets keep their order.
    pub blocked: bool,
    /// Closed: its session is detached; the socket goes at the end of the loop turn.
    pub closed: bool,
    /// On the list of output buffers the tick trims if they stay empty.
    pub trim_listed: bool,
    /// On the list of connections waiting for a peer's ring room or credit.
    pub starved: bool,
    /// A `partial_packet_timeout` timer is armed.
    pub partial_timer: bool,
    /// Its socket took no more output since the last flush: a full output buffer drops QoS 0
    /// without trying the socket again.
    pub write_blocked: bool,
    /// The socket reported the end of the client's input, or an error: read it until the end,
    /// even past a short read (see `wire::read_conn`).
    pub read_closed: bool,
}

/// Topic aliases we use towards one client: topic -> alias, assigned first come, first served.
pub struct OutAliases {
    pub max: u16,
    pub map: std::collections::HashMap<Box<str>, u16, crate::session::FixedState>,
}

/// At most this many outbound aliases per connection, whatever the client accepts: each keeps a
/// copy of its topic.
pub const OUT_ALIASES_MAX: u16 = 64;

impl Conn {
    pub fn new(uid: u64, transport: Transport, now: u32, created: u32, over_limit: bool) -> Conn {
        Conn {
            uid,
            transport,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            version: None,
            session: None,
            keep_alive: 0,
            last_rx: now,
            created,
            arrived: 0,
            flags: Flags { over_limit, problem_info: true, ..Flags::default() },
            max_packet_out: usize::MAX,
            aliases: None,
            out_aliases: None,
            paused: 0,
            partial: 0,
            held: None,
            bridge: None,
        }
    }

    pub fn peer(&self) -> String {
        self.transport.peer()
    }

    /// Writes the output buffer until it is empty or the socket would block. Returns the bytes
    /// written and whether the connection failed (the caller closes it).
    pub fn write_out(&mut self) -> (usize, bool) {
        let mut written = 0;
        while !self.wbuf.is_empty() {
            match self.transport.write(&self.wbuf) {
                Ok(0) => return (written, true),
                Ok(n) => {
                    written += n;
                    self.wbuf.advance(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return (written, true),
            }
        }
        (written, false)
    }

    /// Queues an encoded control packet.
    pub fn send(&mut self, packet: &Packet) {
        packet.encode(self.version.unwrap_or(ProtocolVersion::V311), &mut self.wbuf);
    }

    /// Encodes a PUBLISH into the output buffer, unless it exceeds the client's maximum packet
    /// size [MQTT-3.1.2-24], in which case it is dropped. Returns whether it was queued.
    pub fn write_publish(&mut self, v: ProtocolVersion, header: &PublishHeader, payload: &[u8]) -> bool {
        if let Some(aliases) = self.out_aliases.as_deref_mut() {
            // A 5.0 client that accepts topic aliases: the first PUBLISH of a topic names it and
            // sets an alias, later ones send only the alias [MQTT-3.3.2-12].
            let (alias, known) = match aliases.map.get(header.topic) {
                Some(&a) => (Some(a), true),
                None if aliases.map.len() < aliases.max as usize => {
                    let a = aliases.map.len() as u16 + 1;
                    aliases.map.insert(header.topic.into(), a);
                    (Some(a), false)
                }
                None => (None, false),
            };
            if let Some(alias) = alias {
                let mut props = header.properties.cloned().unwrap_or_default();
                props.topic_alias = Some(alias);
                let aliased =
                    PublishHeader { topic: if known { "" } else { header.topic }, properties: Some(&props), ..*header };
                if aliased.size(v, payload.len()) > self.max_packet_out {
                    if !known {
                        aliases.map.remove(header.topic);
                    }
                    return false;
                }
                aliased.encode(v, payload.len(), &mut self.wbuf);
                self.wbuf.extend_from_slice(payload);
                return true;
            }
        }
        if header.size(v, payload.len()) > self.max_packet_out {
            return false;
        }
        header.encode(v, payload.len(), &mut self.wbuf);
        self.wbuf.extend_from_slice(payload);
        true
    }

    /// Writes a delivery as a PUBLISH (QoS 0 when `id` is None).
    pub fn write_delivery(
        &mut self,
        v: ProtocolVersion,
        d: &Delivery,
        id: Option<PacketId>,
        dup: bool,
        now: std::time::Instant,
    ) -> bool {
        let m = &d.msg;
        let custom =
            if v.is_v5() { custom_properties(m.properties.as_deref(), m.expires_at, &d.sub_ids, now) } else { None };
        let header = PublishHeader {
            dup,
            qos: if id.is_some() { d.qos } else { crate::codec::QoS::AtMostOnce },
            retain: d.retain,
            topic: &m.topic,
            packet_id: id,
            properties: custom.as_ref().or(m.properties.as_deref()),
        };
        self.write_publish(v, &header, &m.payload)
    }
}

/// The properties a 5.0 subscriber gets when they differ from the published ones: its
/// subscription identifiers [MQTT-3.3.4-3] and the remaining expiry interval [MQTT-3.3.2-6].
pub fn custom_properties(
    base: Option<&Properties>,
    expires_at: Option<std::time::Instant>,
    ids: &[u32],
    now: std::time::Instant,
) -> Option<Properties> {
    if ids.is_empty() && expires_at.is_none() {
        return None;
    }
    let mut p = base.cloned().unwrap_or_default();
    p.subscription_identifiers = ids.to_vec();
    if let Some(at) = expires_at {
        p.message_expiry_interval = Some(at.saturating_duration_since(now).as_secs() as u32);
    }
    Some(p)
}

/// A session's outgoing QoS 1/2 packets written into its connection.
pub struct ConnOutlet<'a> {
    pub conn: &'a mut Conn,
    pub version: ProtocolVersion,
    pub max_output: usize,
    pub now: std::time::Instant,
    /// PUBLISH packets written by QoS, and their payload bytes (for `$SYS` and `/metrics`).
    pub sent_qos: [u64; 3],
    pub sent_bytes: [u64; 3],
    pub latency: &'a mut crate::metrics::latency::Latency,
}

impl<'a> ConnOutlet<'a> {
    pub fn new(
        conn: &'a mut Conn,
        version: ProtocolVersion,
        max_output: usize,
        now: std::time::Instant,
        latency: &'a mut crate::metrics::latency::Latency,
    ) -> Self {
        ConnOutlet { conn, version, max_output, now, sent_qos: [0; 3], sent_bytes: [0; 3], latency }
    }
}

impl Outlet for ConnOutlet<'_> {
    fn has_room(&self) -> bool {
        self.conn.wbuf.len() < self.max_output
    }

    fn publish(&mut self, id: PacketId, d: &Delivery, dup: bool) -> bool {
        let ok = self.conn.write_delivery(self.version, d, Some(id), dup, self.now);
        if ok {
            self.sent_qos[d.qos as usize] += 1;
            self.sent_bytes[d.qos as usize] += d.msg.payload.len() as u64;
            if !dup {
                self.latency.note(d.msg.read_at, 1);
            }
        }
        ok
    }

    fn pubrel(&mut self, id: PacketId) {
        Packet::PubRel(Ack::new(id)).encode(self.version, &mut self.conn.wbuf);
    }
}

/// Every connection of one worker.
pub struct Conns {
    slab: Slab<Conn>,
    next_uid: u64,
}

impl Conns {
    pub fn with_capacity(n: usize) -> Conns {
        Conns { slab: Slab::with_capacity(n), next_uid: 0 }
    }

    pub fn next_key(&self) -> ConnKey {
        ConnKey(self.slab.vacant_key())
    }

    /// Inserts a connection at `next_key()`; returns its key and uid.
    pub fn insert(&mut self, make: impl FnOnce(u64) -> Conn) -> (ConnKey, u64) {
        self.next_uid += 1;
        let uid = self.next_uid;
        (ConnKey(self.slab.insert(make(uid))), uid)
    }

    pub fn remove(&mut self, k: ConnKey) -> Option<Conn> {
        self.slab.try_remove(k.0)
    }

    pub fn get(&self, k: ConnKey) -> Option<&Conn> {
        self.slab.get(k.0)
    }

    pub fn get_mut(&mut self, k: ConnKey) -> Option<&mut Conn> {
        self.slab.get_mut(k.0)
    }

    /// Connection `k` is still the one with `uid` and not closed.
    pub fn alive(&self, k: ConnKey, uid: u64) -> bool {
        self.slab.get(k.0).is_some_and(|c| c.uid == uid && !c.flags.closed)
    }

    pub fn keys(&self) -> Vec<ConnKey> {
        self.slab.iter().map(|(k, _)| ConnKey(k)).collect()
    }
}

impl Index<ConnKey> for Conns {
    type Output = Conn;
    fn index(&self, k: ConnKey) -> &Conn {
        &self.slab[k.0]
    }
}

impl IndexMut<ConnKey> for Conns {
    fn index_mut(&mut self, k: ConnKey) -> &mut Conn {
        &mut self.slab[k.0]
    }
}
