//! Bridges: a connection tern dials to another broker, living on one worker in the same loop as
//! every other connection (no thread of its own). The bridge's local side is an ordinary
//! persistent session, `$bridge/<name>`, homed on the worker that owns that client id: it holds
//! one subscription per `out` rule (no-local, retain-as-published), so what it is sent is queued,
//! bounded, paced and persisted exactly as for any client while the remote is down, and goes to
//! the remote with its topic remapped when it is up. The remote's PUBLISHes for `in` rules enter
//! through the same path as a client's, with their topic remapped, and their origin is the
//! bridge's session, so no-local keeps them from going back out.
//!
//! Loops: on 5.0 the remote subscriptions are no-local; on 3.1.1 the CONNECT carries mosquitto's
//! bridge bit (protocol level | 0x80), which mosquitto and tern both take to mean the same.
//!
//! The subscriptions exist from start-up, before any connection: every worker installs the
//! bridge filters as the home worker's interest itself (as recovery does), so nothing published
//! before the first connection is missed and no announcement round is needed.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use mio::{Interest, Token};

use super::conn::{CloseKind, Conn, ConnKey, ConnOutlet};
use super::deliver::View;
use super::timers::Timer;
use super::Worker;
use crate::codec::{
    ConnAck, Connect, MqttStr, Packet, ProtocolVersion, QoS, RetainHandling, Subscribe, SubscriptionOptions,
};
use crate::config::BridgeConfig;
use crate::session::{Delivery, Message, Session, SessionKey, Subscription, NEVER};
use crate::topic::filter_matches;
use crate::transport::{TlsStream, Transport};

/// The local session's client id; clients may not use the `$bridge/` prefix.
pub fn local_id(name: &str) -> String {
    format!("$bridge/{name}")
}

const BACKOFF_MIN_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 60_000;

/// What every worker knows of a bridge: its configuration and the figures it publishes.
pub struct BridgeShared {
    pub config: BridgeConfig,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connected: AtomicBool,
    /// QoS 1/2 messages queued or in flight for the remote.
    pub queued: AtomicU64,
    pub forwarded_in: AtomicU64,
    pub forwarded_out: AtomicU64,
    pub connects: AtomicU64,
}

impl BridgeShared {
    pub fn new(config: &BridgeConfig) -> Result<BridgeShared, String> {
        let tls = match &config.cafile {
            Some(ca) => Some(
                crate::transport::tls::client_config(ca, config.certfile.as_deref().zip(config.keyfile.as_deref()))
                    .map_err(|e| format!("bridge {}: {e}", config.name))?,
            ),
            None => None,
        };
        Ok(BridgeShared {
            config: config.clone(),
            tls,
            connected: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            forwarded_in: AtomicU64::new(0),
            forwarded_out: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        })
    }

    fn version(&self) -> ProtocolVersion {
        if self.config.protocol_version == 5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        }
    }

    /// The local topic filters of the `out` rules, with their QoS.
    fn local_filters(&self) -> impl Iterator<Item = (String, u8)> + '_ {
        self.config
            .topics
            .iter()
            .filter(|t| t.direction.outgoing())
            .map(|t| (format!("{}{}", t.local_prefix, t.pattern), t.qos))
    }

    /// A local topic as the remote gets it: the first `out` rule whose local filter matches.
    pub fn to_remote(&self, topic: &str) -> Option<String> {
        self.config.topics.iter().filter(|t| t.direction.outgoing()).find_map(|t| {
            let rest = topic.strip_prefix(t.local_prefix.as_str())?;
            filter_matches(&t.pattern, rest).then(|| format!("{}{rest}", t.remote_prefix))
        })
    }

    /// A remote topic as it is published here: the first `in` rule whose remote filter matches.
    pub fn to_local(&self, topic: &str) -> Option<String> {
        self.config.topics.iter().filter(|t| t.direction.incoming()).find_map(|t| {
            let rest = topic.strip_prefix(t.remote_prefix.as_str())?;
            filter_matches(&t.pattern, rest).then(|| format!("{}{rest}", t.local_prefix))
        })
    }
}

enum State {
    /// Not connected; dial at this worker clock millisecond.
    Down {
        retry_at: u64,
    },
    /// Dialled, waiting for CONNACK.
    Connecting {
        conn: ConnKey,
        uid: u64,
    },
    Up {
        conn: ConnKey,
        uid: u64,
    },
}

/// A bridge run by this worker.
pub struct Bridge {
    /// Index in `Shared::bridges`.
    index: usize,
    session: SessionKey,
    state: State,
    /// Which address is tried next (fail-over in order).
    address: usize,
    backoff_ms: u64,
    last_ping_ms: u64,
    rng: u64,
}

impl Worker {
    /// Start-up: every worker records each bridge's `out` filters as its home worker's interest;
    /// the home worker creates (or finds, recovered) the local session and its subscriptions.
    pub(super) fn start_bridges(&mut self) {
        let shared = self.shared.clone();
        for (index, b) in shared.bridges.iter().enumerate() {
            let id = local_id(&b.config.name);
            let home = shared.home_of(&id);
            if home != self.id {
                for (filter, _) in b.local_filters() {
                    self.router.peer_interest(&filter, home as u16, true);
                }
                continue;
            }
            let client_id = MqttStr::from(id.as_str());
            let sk = match self.sessions.find(&client_id) {
                Some(sk) => sk,
                None => {
                    let mut s = Session::new(client_id, b.version());
                    s.expiry_interval = NEVER;
                    s.disconnected_at = Some(self.clock.now);
                    s.send_window = (self.shared.config.max_inflight_messages as usize).min(65_534);
                    self.sessions.insert(s)
                }
            };
            for (filter, qos) in b.local_filters() {
                let sub = Subscription {
                    options: SubscriptionOptions {
                        qos: QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce),
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::Never,
                    },
                    identifier: 0,
                    acl_whole: 0,
                };
                let f = MqttStr::from(filter.as_str());
                if self.sessions[sk].subscriptions.insert(f, sub).is_none() {
                    self.sessions[sk].subscription_bytes += filter.len();
                    self.shared.subscription_bytes.fetch_add(filter.len(), Ordering::Relaxed);
                }
                // Peers know this interest from their own start-up: no announcement.
                let _ = self.router.subscribe(&filter, sk.0 as u32, sub);
            }
            self.sessions[sk].bridge = Some(self.bridges.len() as u16);
            self.persist_attach(sk);
            let seed = self.shared.hasher.hash_one(&id) | 1;
            self.bridges.push(Bridge {
                index,
                session: sk,
                state: State::Down { retry_at: self.clock.ms },
                address: 0,
                backoff_ms: BACKOFF_MIN_MS,
                last_ping_ms: 0,
                rng: seed,
            });
            log::info!("bridge {} on worker {}: to {}", b.config.name, self.id, b.config.address.list().join(", "));
        }
    }

    /// Each tick: dial bridges that are due, keep connected ones alive, publish their figures.
    pub(super) fn bridge_tick(&mut self) {
        for i in 0..self.bridges.len() {
            let b = &self.bridges[i];
            let shared = &self.shared.bridges[b.index];
            let s = &self.sessions[b.session];
            shared.queued.store((s.queue.len() + s.inflight.len()) as u64, Ordering::Relaxed);
            match b.state {
                State::Down { retry_at } if self.clock.ms >= retry_at => self.dial(i),
                State::Up { conn, uid } if self.conns.alive(conn, uid) => {
                    let keepalive = shared.config.keepalive as u64 * 1000;
                    if keepalive > 0 && self.clock.ms >= self.bridges[i].last_ping_ms + keepalive / 2 {
                        self.bridges[i].last_ping_ms = self.clock.ms;
                        self.send(conn, &Packet::PingReq);
                    }
                }
                _ => {}
            }
        }
    }

    fn dial(&mut self, i: usize) {
        let shared = self.shared.clone();
        let b = &shared.bridges[self.bridges[i].index];
        let addresses = b.config.address.list();
        let address = &addresses[self.bridges[i].address % addresses.len()];
        // A host name is resolved here, on the worker (an IP address costs nothing).
        let resolved: Option<SocketAddr> = address.to_socket_addrs().ok().and_then(|mut a| a.next());
        let Some(addr) = resolved else {
            log::warn!("bridge {}: cannot resolve {address}", b.config.name);
            return self.bridge_failed(i);
        };
        let stream = match mio::net::TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("bridge {}: connect to {address}: {e}", b.config.name);
                return self.bridge_failed(i);
            }
        };
        let _ = stream.set_nodelay(true);
        let transport = match &b.tls {
            Some(config) => {
                let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match TlsStream::client(stream, config.clone(), host) {
                    Ok(t) => Transport::Tls(Box::new(t)),
                    Err(e) => {
                        log::warn!("bridge {}: TLS to {address}: {e}", b.config.name);
                        return self.bridge_failed(i);
                    }
                }
            }
            None => Transport::Tcp(stream),
        };
        let mut transport = transport;
        let k = self.conns.next_key();
        // Writable once connected (or failed): the CONNECT waits in the output until then.
        if let Err(e) = self.registry.register(transport.source(), Token(k.0), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("bridge {}: register: {e}", b.config.name);
            return self.bridge_failed(i);
        }
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.ms32();
        let (k, uid) = self.conns.insert(|uid| Conn::new(uid, transport, now, now, false));
        let v = b.version();
        let c = &mut self.conns[k];
        c.bridge = Some(i as u16);
        c.version = Some(v);
        c.flags.writable = true;
        let mut connect = Connect::new(b.config.client_id());
        connect.protocol = v;
        connect.clean_start = b.config.clean_start;
        connect.keep_alive = b.config.keepalive;
        connect.username = b.config.username.as_deref().map(MqttStr::from);
        connect.password = b.config.password.as_ref().map(|p| Bytes::copy_from_slice(p.as_bytes()));
        connect.bridge = !v.is_v5();
        if v.is_v5() {
            connect.properties.session_expiry_interval = Some(if b.config.clean_start { 0 } else { u32::MAX });
            connect.properties.receive_maximum = Some(self.shared.config.max_inflight_messages);
        }
        let mut out = BytesMut::new();
        connect.encode(&mut out);
        c.wbuf.extend_from_slice(&out);
        // CONNACK within the connect timeout, or the connection is closed (and retried).
        self.timers.arm(self.clock.ms + self.shared.config.connect_timeout().as_millis() as u64, Timer::conn(k, uid));
        self.bridges[i].state = State::Connecting { conn: k, uid };
        log::debug!("bridge {}: dialling {address}", b.config.name);
    }

    /// Not connected: the next address, after a back-off that doubles up to a minute, with
    /// jitter so that many edge brokers do not return to a restarted cloud in step.
    fn bridge_failed(&mut self, i: usize) {
        self.bridge_retry(i, true);
    }

    /// Down: dial again after the back-off, at the next address when `next`.
    fn bridge_retry(&mut self, i: usize, next: bool) {
        let b = &mut self.bridges[i];
        b.rng ^= b.rng << 13;
        b.rng ^= b.rng >> 7;
        b.rng ^= b.rng << 17;
        let jitter = b.rng % (b.backoff_ms / 2 + 1);
        let wait = b.backoff_ms / 2 + jitter + b.backoff_ms / 4;
        b.backoff_ms = (b.backoff_ms * 2).min(BACKOFF_MAX_MS);
        if next {
            b.address = b.address.wrapping_add(1);
        }
        b.state = State::Down { retry_at: self.clock.ms + wait };
        self.shared.bridges[b.index].connected.store(false, Ordering::Relaxed);
    }

    /// A bridge connection closed (by either side, or failed to connect).
    pub(super) fn bridge_closed(&mut self, i: u16) {
        let i = i as usize;
        if i >= self.bridges.len() {
            return;
        }
        let name = &self.shared.bridges[self.bridges[i].index].config.name;
        // An address that worked is tried first again.
        let was_up = matches!(self.bridges[i].state, State::Up { .. });
        if was_up {
            log::warn!("bridge {name}: connection lost; reconnecting");
        } else {
            log::info!("bridge {name}: could not connect; retrying");
        }
        self.bridge_retry(i, !was_up);
    }

    /// Packets a remote broker sends us as its client: CONNACK, SUBACK, UNSUBACK, PINGRESP; the
    /// rest (acknowledgements, DISCONNECT) are handled as for a client's connection.
    pub(super) fn on_bridge_packet(&mut self, k: ConnKey, i: u16, packet: Packet) {
        let i = i as usize;
        match packet {
            Packet::ConnAck(ack) => self.bridge_connack(k, i, &ack),
            Packet::SubAck(ack) => {
                let name = &self.shared.bridges[self.bridges[i].index].config.name;
                for code in &ack.codes {
                    if code.is_error() {
                        log::warn!("bridge {name}: the remote refused a subscription ({:#04x})", code.0);
                    }
                }
            }
            Packet::UnsubAck(_) | Packet::PingResp => {}
            packet if self.conns[k].session.is_some() => self.on_packet(k, packet),
            other => {
                log::warn!("bridge {}: unexpected {} before CONNACK", i, other.name());
                self.close(k, CloseKind::NoSession);
            }
        }
    }

    fn bridge_connack(&mut self, k: ConnKey, i: usize, ack: &ConnAck) {
        let shared = self.shared.clone();
        let b = &shared.bridges[self.bridges[i].index];
        let State::Connecting { conn, uid } = self.bridges[i].state else {
            log::warn!("bridge {}: a second CONNACK", b.config.name);
            return self.close(k, CloseKind::NoSession);
        };
        if conn != k || ack.code.is_error() {
            log::warn!("bridge {}: the remote refused the connection ({:#04x})", b.config.name, ack.code.0);
            return self.close(k, CloseKind::NoSession);
        }
        let v = b.version();
        let sk = self.bridges[i].session;
        let max_inflight = self.shared.config.max_inflight_messages as usize;
        self.sessions.set_conn(sk, Some(k));
        let s = &mut self.sessions[sk];
        s.disconnected_at = None;
        s.stalled = false;
        s.last_progress = Some(self.clock.now);
        s.send_window = max_inflight.min(ack.properties.receive_maximum.map_or(usize::MAX, |r| r as usize)).min(65_534);
        let c = &mut self.conns[k];
        c.session = Some(sk);
        c.keep_alive = b.config.keepalive;
        if let Some(max) = ack.properties.maximum_packet_size {
            c.max_packet_out = max as usize;
        }
        // Our keep alive as the remote's client: PINGREQ every half period (the tick), and the
        // connection's own timer closes it after 1.5 periods without a byte from the remote.
        if c.keep_alive > 0 {
            self.timers.arm(self.clock.ms + c.keep_alive as u64 * 1500, Timer::conn(k, uid));
        }
        // The `in` rules, subscribed on the remote: no-local on 5.0 (3.1.1: the bridge bit).
        let filters: Vec<(MqttStr, SubscriptionOptions)> = b
            .config
            .topics
            .iter()
            .filter(|t| t.direction.incoming())
            .map(|t| {
                let options = SubscriptionOptions {
                    qos: QoS::from_u8(t.qos).unwrap_or(QoS::AtMostOnce),
                    no_local: v.is_v5(),
                    retain_as_published: v.is_v5(),
                    retain_handling: RetainHandling::OnSubscribe,
                };
                (MqttStr::from(format!("{}{}", t.remote_prefix, t.pattern)), options)
            })
            .collect();
        if !filters.is_empty() {
            let packet_id = self.sessions[sk].next_packet_id();
            let subscribe = Subscribe { packet_id, filters, properties: Default::default() };
            self.send(k, &Packet::Subscribe(Box::new(subscribe)));
        }
        self.bridges[i].state = State::Up { conn: k, uid };
        self.bridges[i].backoff_ms = BACKOFF_MIN_MS;
        self.bridges[i].last_ping_ms = self.clock.ms;
        b.connected.store(true, Ordering::Relaxed);
        b.connects.fetch_add(1, Ordering::Relaxed);
        log::info!("bridge {}: connected to {}", b.config.name, self.conns[k].peer());
        // What waited while the remote was away goes now, in order.
        let mut out = ConnOutlet::new(&mut self.conns[k], v, usize::MAX, self.clock.now, &mut self.latency);
        self.sessions[sk].resend(&mut out);
        self.counters.sent_through(&out);
        self.pump(sk);
        self.persist_attach(sk);
    }

    /// A message for the bridge's local session: to the remote under its remote topic. QoS 0
    /// goes only while connected; QoS 1/2 are queued like any session's.
    pub(super) fn bridge_out(
        &mut self,
        sk: SessionKey,
        i: u16,
        m: &View<'_>,
        qos: QoS,
        shared: &mut Option<Arc<Message>>,
    ) {
        let Some(b) = self.bridges.get(i as usize) else { return };
        let bs = &self.shared.bridges[b.index];
        let Some(remote) = bs.to_remote(m.topic) else { return };
        let original = shared.get_or_insert_with(|| m.to_message()).clone();
        let msg = Arc::new(Message { topic: MqttStr::from(remote), ..(*original).clone() });
        bs.forwarded_out.fetch_add(1, Ordering::Relaxed);
        // The remote keeps the retain flag as published (it is another broker's retained store).
        let d = Delivery { msg, qos, retain: m.retain, sub_ids: Vec::new(), group: None, seq: 0 };
        self.deliver_one(sk, d, true);
    }

    /// The topic a bridge's remote PUBLISH gets here, or None when no `in` rule takes it.
    pub(super) fn bridge_in(&mut self, i: u16, topic: &str) -> Option<String> {
        let b = self.bridges.get(i as usize)?;
        let bs = &self.shared.bridges[b.index];
        let local = bs.to_local(topic);
        match &local {
            Some(_) => {
                bs.forwarded_in.fetch_add(1, Ordering::Relaxed);
            }
            None => log::debug!("bridge {}: no `in` rule for {topic}: dropped", bs.config.name),
        }
        local
    }
}
