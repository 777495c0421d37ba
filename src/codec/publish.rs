//! PUBLISH (3.3) and its acknowledgements PUBACK, PUBREC, PUBREL, PUBCOMP (3.4 to 3.7).

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{put_str, MqttStr, Reader};
use super::{
    allowed_v5, header_len, packet_type, put_header, put_packet_id, read_packet_id, DecodeError, PacketId, Properties,
    PropertyContext, ProtocolVersion, QoS, ReasonCode, ReasonContext,
};

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: MqttStr,
    /// Present exactly when `qos` is 1 or 2.
    pub packet_id: Option<PacketId>,
    /// 5.0 only. Boxed so that the common PUBLISH without properties stays small and moves cheaply.
    pub properties: Option<Box<Properties>>,
    pub payload: Bytes,
}

impl Publish {
    pub fn new(topic: impl Into<MqttStr>, qos: QoS, payload: impl Into<Bytes>) -> Self {
        Publish { topic: topic.into(), qos, payload: payload.into(), ..Default::default() }
    }

    pub(super) fn decode(r: &mut Reader, flags: u8, v: ProtocolVersion) -> Result<Publish, DecodeError> {
        // check_flags has already refused QoS 3 and DUP on QoS 0.
        let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let topic = r.string()?;
        if memchr::memchr2(b'+', b'#', topic.as_bytes()).is_some() {
            return Err(DecodeError::WildcardInTopicName);
        }
        let packet_id = if qos == QoS::AtMostOnce { None } else { Some(read_packet_id(r)?) };
        let properties = if v.is_v5() {
            let p = Properties::decode(r, PropertyContext::Publish)?;
            if topic.is_empty() && p.topic_alias.is_none() {
                return Err(DecodeError::EmptyTopicWithoutAlias);
            }
            if p.is_empty() {
                None
            } else {
                Some(Box::new(p))
            }
        } else {
            if topic.is_empty() {
                return Err(DecodeError::EmptyTopicName);
            }
            None
        };
        Ok(Publish {
            dup: flags & 0x08 != 0,
            qos,
            retain: flags & 0x01 != 0,
            topic,
            packet_id,
            properties,
            payload: r.rest(),
        })
    }

    /// The first byte of the fixed header.
    pub fn first_byte(&self) -> u8 {
        packet_type::PUBLISH << 4 | (self.dup as u8) << 3 | (self.qos as u8) << 1 | self.retain as u8
    }

    fn head_body_len(&self, v: ProtocolVersion) -> usize {
        let mut n = 2 + self.topic.len();
        if self.qos != QoS::AtMostOnce {
            n += 2;
        }
        if v.is_v5() {
            n += match &self.properties {
                Some(p) => p.wire_len(),
                None => 1,
            };
        }
        n
    }

    /// Total encoded size in bytes.
    pub fn size(&self, v: ProtocolVersion) -> usize {
        let n = self.head_body_len(v) + self.payload.len();
        header_len(n) + n
    }

    /// Writes everything but the payload; the remaining length counts the payload, so the caller
    /// sends `payload` right after (one shared `Bytes` for every subscriber, written with writev).
    pub fn encode_head(&self, v: ProtocolVersion, out: &mut BytesMut) {
        let head = self.head_body_len(v);
        put_header(out, self.first_byte(), head + self.payload.len());
        put_str(out, &self.topic);
        if self.qos != QoS::AtMostOnce {
            // A QoS 1/2 PUBLISH without an id cannot be expressed; 1 is the broker's bug, not a panic.
            out.put_u16(self.packet_id.map_or(1, |id| id.get()));
        }
        if v.is_v5() {
            match &self.properties {
                Some(p) => p.encode(out),
                None => out.put_u8(0),
            }
        }
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        self.encode_head(v, out);
        out.put_slice(&self.payload);
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: PacketId) -> Self {
        Ack { packet_id, reason: ReasonCode::SUCCESS, properties: Properties::default() }
    }

    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion, ctx: ReasonContext) -> Result<Ack, DecodeError> {
        let mut a = Ack::new(read_packet_id(r)?);
        if v.is_v5() && !r.is_empty() {
            a.reason = ReasonCode(r.u8()?);
            if !allowed_v5(ctx, a.reason) {
                let packet = if ctx == ReasonContext::PubAck { "PUBACK/PUBREC" } else { "PUBREL/PUBCOMP" };
                return Err(DecodeError::InvalidReasonCode { packet, code: a.reason.0 });
            }
            if !r.is_empty() {
                a.properties = Properties::decode(r, PropertyContext::Ack)?;
            }
        }
        r.finish()?;
        Ok(a)
    }

    pub(super) fn encode(&self, first: u8, v: ProtocolVersion, out: &mut BytesMut) {
        // 3.4.2.1: the reason code and properties may be left out when success and empty.
        if !v.is_v5() || (self.reason == ReasonCode::SUCCESS && self.properties.is_empty()) {
            put_header(out, first, 2);
            put_packet_id(out, self.packet_id);
            return;
        }
        put_header(out, first, 3 + self.properties.wire_len());
        put_packet_id(out, self.packet_id);
        out.put_u8(self.reason.0);
        self.properties.encode(out);
    }
}
