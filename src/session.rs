//! Session state (spec 4.1): what survives a connection of a client that asked for it. Plain data,
//! owned by the client id's home worker; no I/O here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ahash::{HashMap, HashSet};
use bytes::Bytes;

use crate::codec::{MqttStr, PacketId, Properties, ProtocolVersion, QoS, SubscriptionOptions, Will};

/// A message on its way to subscribers: shared by every queue it sits in, across workers.
#[derive(Debug)]
pub struct Message {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Box<Properties>>,
    /// The publishing session, for 5.0 no-local: (worker, session key).
    pub origin: Option<(u16, u32)>,
}

impl Message {
    pub fn from_will(will: &Will, origin: Option<(u16, u32)>) -> Message {
        Message {
            topic: will.topic.clone(),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            properties: (!will.properties.is_empty()).then(|| Box::new(will.properties.clone())),
            origin,
        }
    }
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
    pub qos: QoS,
    pub state: OutState,
    pub msg: Arc<Message>,
    pub retain: bool,
}

#[derive(Debug)]
pub struct Session {
    pub client_id: MqttStr,
    /// Slab key of the connection attached now, if any.
    pub conn: Option<usize>,
    pub version: ProtocolVersion,
    /// 3.1.1 clean session: the session ends with the connection.
    pub clean: bool,
    pub subscriptions: HashMap<MqttStr, SubscriptionOptions>,
    /// Outgoing QoS 1/2 messages not yet completed, oldest first; at most the inflight window.
    pub inflight: VecDeque<Inflight>,
    /// QoS 1/2 messages waiting for room in the inflight window (or for the client to return), with
    /// the QoS to deliver them at and whether the retain flag goes out set; at most
    /// `max_queued_messages`.
    pub queue: VecDeque<(Arc<Message>, QoS, bool)>,
    next_packet_id: u16,
    /// QoS 2 packet ids received and not yet released [MQTT-4.3.3-2]: a duplicate PUBLISH with one
    /// of these is acknowledged but not delivered again. Bounded by the 65,535 possible ids.
    pub incoming_qos2: HashSet<u16>,
    pub will: Option<Will>,
    pub disconnected_at: Option<Instant>,
}

impl Session {
    pub fn new(client_id: MqttStr, version: ProtocolVersion, clean: bool) -> Session {
        Session {
            client_id,
            conn: None,
            version,
            clean,
            subscriptions: HashMap::default(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            next_packet_id: 0,
            incoming_qos2: HashSet::default(),
            will: None,
            disconnected_at: None,
        }
    }

    /// The next packet id not used by an inflight message [MQTT-2.3.1-2].
    pub fn next_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            let Some(id) = PacketId::new(self.next_packet_id) else { continue };
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    pub fn inflight_position(&self, id: PacketId) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == id)
    }
}
