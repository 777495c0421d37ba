//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (3.8 to 3.11).

use bytes::{BufMut, BytesMut};

use super::wire::{put_str, MqttStr, Reader};
use super::{
    allowed_v5, packet_type, props_len, put_header, put_packet_id, read_packet_id, DecodeError, PacketId, Properties,
    PropertyContext, ProtocolVersion, QoS, ReasonCode, ReasonContext,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    OnSubscribe = 0,
    /// Send them only if the subscription did not exist before.
    OnNewSubscribe = 1,
    /// Never send them for this subscribe.
    Never = 2,
}

/// The subscription options byte (3.8.3.1). In 3.1/3.1.1 only `qos` exists.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions { qos, ..Default::default() }
    }

    pub fn decode(byte: u8, v: ProtocolVersion) -> Result<Self, DecodeError> {
        let reserved = if v.is_v5() { 0xc0 } else { 0xfc };
        if byte & reserved != 0 {
            return Err(DecodeError::SubscriptionOptionsReserved);
        }
        let qos = QoS::from_u8(byte & 0x03).ok_or(DecodeError::InvalidSubscribeQoS)?;
        let retain_handling = match (byte >> 4) & 0x03 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscribe,
            2 => RetainHandling::Never,
            _ => return Err(DecodeError::InvalidRetainHandling),
        };
        Ok(SubscriptionOptions {
            qos,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
        })
    }

    pub fn encode(&self, v: ProtocolVersion) -> u8 {
        let mut b = self.qos as u8;
        if v.is_v5() {
            b |= (self.no_local as u8) << 2 | (self.retain_as_published as u8) << 3 | (self.retain_handling as u8) << 4;
        }
        b
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub filters: Vec<(MqttStr, SubscriptionOptions)>,
    pub properties: Properties,
}

impl Subscribe {
    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties =
            if v.is_v5() { Properties::decode(r, PropertyContext::Subscribe)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            // Each entry takes at least 3 bytes on the wire, so the Vec is bounded by the packet size.
            let filter = r.string()?;
            let options = SubscriptionOptions::decode(r.u8()?, v)?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::NoSubscribeFilters);
        }
        Ok(Subscribe { packet_id, filters, properties })
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        let body = 2 + props_len(v, &self.properties) + self.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
        put_header(out, packet_type::SUBSCRIBE << 4 | 0b0010, body);
        put_packet_id(out, self.packet_id);
        if v.is_v5() {
            self.properties.encode(out);
        }
        for (f, o) in &self.filters {
            put_str(out, f);
            out.put_u8(o.encode(v));
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    /// One per filter, in order: the granted QoS or a failure code.
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

impl SubAck {
    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties =
            if v.is_v5() { Properties::decode(r, PropertyContext::SubAck)? } else { Properties::default() };
        let mut codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let code = ReasonCode(r.u8()?);
            let ok = if v.is_v5() { allowed_v5(ReasonContext::SubAck, code) } else { matches!(code.0, 0..=2 | 0x80) };
            if !ok {
                return Err(DecodeError::InvalidReasonCode { packet: "SUBACK", code: code.0 });
            }
            codes.push(code);
        }
        if codes.is_empty() {
            return Err(DecodeError::NoSubAckCodes);
        }
        Ok(SubAck { packet_id, codes, properties })
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        put_header(out, packet_type::SUBACK << 4, 2 + props_len(v, &self.properties) + self.codes.len());
        put_packet_id(out, self.packet_id);
        if v.is_v5() {
            self.properties.encode(out);
        }
        for c in &self.codes {
            out.put_u8(c.0);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub filters: Vec<MqttStr>,
    pub properties: Properties,
}

impl Unsubscribe {
    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties =
            if v.is_v5() { Properties::decode(r, PropertyContext::Unsubscribe)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string()?);
        }
        if filters.is_empty() {
            return Err(DecodeError::NoUnsubscribeFilters);
        }
        Ok(Unsubscribe { packet_id, filters, properties })
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        let body = 2 + props_len(v, &self.properties) + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
        put_header(out, packet_type::UNSUBSCRIBE << 4 | 0b0010, body);
        put_packet_id(out, self.packet_id);
        if v.is_v5() {
            self.properties.encode(out);
        }
        for f in &self.filters {
            put_str(out, f);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    /// 5.0 only: one reason code per filter. Empty in 3.1/3.1.1.
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

impl UnsubAck {
    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let mut u = UnsubAck { packet_id, codes: Vec::new(), properties: Properties::default() };
        if v.is_v5() {
            u.properties = Properties::decode(r, PropertyContext::UnsubAck)?;
            u.codes.reserve(r.remaining());
            while !r.is_empty() {
                let code = ReasonCode(r.u8()?);
                if !allowed_v5(ReasonContext::UnsubAck, code) {
                    return Err(DecodeError::InvalidReasonCode { packet: "UNSUBACK", code: code.0 });
                }
                u.codes.push(code);
            }
        }
        r.finish()?;
        Ok(u)
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        if !v.is_v5() {
            put_header(out, packet_type::UNSUBACK << 4, 2);
            put_packet_id(out, self.packet_id);
            return;
        }
        put_header(out, packet_type::UNSUBACK << 4, 2 + self.properties.wire_len() + self.codes.len());
        put_packet_id(out, self.packet_id);
        self.properties.encode(out);
        for c in &self.codes {
            out.put_u8(c.0);
        }
    }
}
