//! PUBLISH (3.3) and its acknowledgements PUBACK, PUBREC, PUBREL, PUBCOMP (3.4 to 3.7).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::wire::{parse_varint, put_str, topic_name_str, MqttStr, Reader};
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

    /// Decodes from a packet body: topic and payload are split off it (no copy).
    pub(super) fn decode(mut body: BytesMut, flags: u8, v: ProtocolVersion) -> Result<Publish, DecodeError> {
        let p = PublishRef::parse(&body, flags, v)?;
        let (topic_len, payload_at) = (p.topic.len(), body.len() - p.payload.len());
        let (dup, qos, retain, packet_id, properties) = (p.dup, p.qos, p.retain, p.packet_id, p.properties);
        body.advance(2);
        let topic = MqttStr::from_validated(body.split_to(topic_len).freeze());
        body.advance(payload_at - 2 - topic_len);
        Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload: body.freeze() })
    }

    fn header(&self) -> PublishHeader<'_> {
        PublishHeader {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            packet_id: self.packet_id,
            properties: self.properties.as_deref(),
        }
    }

    /// Total encoded size in bytes.
    pub fn size(&self, v: ProtocolVersion) -> usize {
        self.header().size(v, self.payload.len())
    }

    /// Writes everything but the payload; the remaining length counts the payload, so the caller
    /// sends `payload` right after (one shared `Bytes` for every subscriber, written with writev).
    pub fn encode_head(&self, v: ProtocolVersion, out: &mut BytesMut) {
        self.header().encode(v, self.payload.len(), out)
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        self.encode_head(v, out);
        out.put_slice(&self.payload);
    }
}

/// The fields of a PUBLISH before its payload, borrowed: what the broker fills in per subscriber
/// (QoS, packet id, retain, subscription identifiers) around a topic and payload it does not copy.
#[derive(Clone, Copy, Debug)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: Option<PacketId>,
    pub properties: Option<&'a Properties>,
}

impl PublishHeader<'_> {
    fn body_len(&self, v: ProtocolVersion) -> usize {
        let mut n = 2 + self.topic.len();
        if self.qos != QoS::AtMostOnce {
            n += 2;
        }
        if v.is_v5() {
            n += self.properties.map_or(1, |p| p.wire_len());
        }
        n
    }

    /// Total size of the packet with a payload of `payload_len` bytes.
    pub fn size(&self, v: ProtocolVersion, payload_len: usize) -> usize {
        let n = self.body_len(v) + payload_len;
        header_len(n) + n
    }

    /// Writes the fixed header (whose remaining length counts the payload), topic, packet id and
    /// properties; the caller appends the payload.
    pub fn encode(&self, v: ProtocolVersion, payload_len: usize, out: &mut BytesMut) {
        let first = packet_type::PUBLISH << 4 | (self.dup as u8) << 3 | (self.qos as u8) << 1 | self.retain as u8;
        put_header(out, first, self.body_len(v) + payload_len);
        put_str(out, self.topic);
        if self.qos != QoS::AtMostOnce {
            // A QoS 1/2 PUBLISH without an id cannot be expressed; 1 is the broker's bug, not a panic.
            out.put_u16(self.packet_id.map_or(1, |id| id.get()));
        }
        if v.is_v5() {
            match self.properties {
                Some(p) => p.encode(out),
                None => out.put_u8(0),
            }
        }
    }
}

/// A PUBLISH borrowed from the read buffer: the broker's hot path parses it, routes it and lets
/// the buffer go, with no allocation and no reference counting for topic or payload. Only a 5.0
/// property block, when present, is copied out (into `properties`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: Option<PacketId>,
    pub properties: Option<Box<Properties>>,
    pub payload: &'a [u8],
}

impl<'a> PublishRef<'a> {
    /// Parses a PUBLISH body (what follows the fixed header); `flags` is the header's low nibble.
    pub fn parse(body: &'a [u8], flags: u8, v: ProtocolVersion) -> Result<PublishRef<'a>, DecodeError> {
        let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
        if flags & 0x08 != 0 && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQoS0);
        }
        let (&[t0, t1], rest) = body.split_first_chunk::<2>().ok_or(DecodeError::Truncated)?;
        let tlen = u16::from_be_bytes([t0, t1]) as usize;
        if rest.len() < tlen {
            return Err(DecodeError::Truncated);
        }
        let (topic, mut rest) = rest.split_at(tlen);
        let topic = topic_name_str(topic)?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            let (&[a, b], r) = rest.split_first_chunk::<2>().ok_or(DecodeError::Truncated)?;
            rest = r;
            Some(PacketId::new(u16::from_be_bytes([a, b])).ok_or(DecodeError::ZeroPacketId)?)
        };
        let properties = if v.is_v5() {
            let (len, n) = parse_varint(rest)?.ok_or(DecodeError::Truncated)?;
            let len = len as usize;
            if rest.len() < n + len {
                return Err(DecodeError::Truncated);
            }
            let block = &rest[..n + len];
            rest = &rest[n + len..];
            let p = if len == 0 {
                None
            } else {
                let mut r = Reader::new(BytesMut::from(block));
                Some(Box::new(Properties::decode(&mut r, PropertyContext::Publish)?))
            };
            if topic.is_empty() && p.as_ref().is_none_or(|p| p.topic_alias.is_none()) {
                return Err(DecodeError::EmptyTopicWithoutAlias);
            }
            p
        } else {
            if topic.is_empty() {
                return Err(DecodeError::EmptyTopicName);
            }
            None
        };
        Ok(PublishRef {
            dup: flags & 0x08 != 0,
            qos,
            retain: flags & 0x01 != 0,
            topic,
            packet_id,
            properties,
            payload: rest,
        })
    }

    /// An owned `Publish` whose topic and payload are slices of `body`, which must be the buffer
    /// this was parsed from.
    pub fn to_owned_in(&self, body: &Bytes) -> Publish {
        Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: MqttStr::from_validated(body.slice_ref(self.topic.as_bytes())),
            packet_id: self.packet_id,
            properties: self.properties.clone(),
            payload: body.slice_ref(self.payload),
        }
    }

    /// An owned `Publish` with topic and payload copied: for a message that must outlive the read
    /// buffer (retained, queued) when the buffer is not shared.
    pub fn to_owned_copy(&self) -> Publish {
        Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: MqttStr::from_validated(Bytes::copy_from_slice(self.topic.as_bytes())),
            packet_id: self.packet_id,
            properties: self.properties.clone(),
            payload: Bytes::copy_from_slice(self.payload),
        }
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    /// Boxed for the same reason as in `Publish`: acknowledgements are on the hot path.
    pub properties: Option<Box<Properties>>,
}

impl Ack {
    pub fn new(packet_id: PacketId) -> Self {
        Ack { packet_id, reason: ReasonCode::SUCCESS, properties: None }
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
                let p = Properties::decode(r, PropertyContext::Ack)?;
                a.properties = (!p.is_empty()).then(|| Box::new(p));
            }
        }
        r.finish()?;
        Ok(a)
    }

    pub(super) fn encode(&self, first: u8, v: ProtocolVersion, out: &mut BytesMut) {
        // 3.4.2.1: the reason code and properties may be left out when success and empty.
        let props = self.properties.as_deref().filter(|p| !p.is_empty());
        if !v.is_v5() || (self.reason == ReasonCode::SUCCESS && props.is_none()) {
            put_header(out, first, 2);
            put_packet_id(out, self.packet_id);
            return;
        }
        let empty = Properties::default();
        let props = props.unwrap_or(&empty);
        put_header(out, first, 3 + props.wire_len());
        put_packet_id(out, self.packet_id);
        out.put_u8(self.reason.0);
        props.encode(out);
    }
}
