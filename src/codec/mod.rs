//! Sans-io MQTT 3.1, 3.1.1 and 5.0 codec.
//!
//! Owns the byte layout of every control packet. `decode` parses one packet in place from a
//! read buffer (strings and payloads are `Bytes` slices of it, never copies); `Packet::encode`
//! appends one to a write buffer. It must never touch a socket, a clock or broker state, and never
//! panic or allocate beyond what the input's declared (and bounded) length allows.

mod connect;
mod control;
mod error;
mod properties;
mod publish;
mod reason;
mod subscribe;
pub mod wire;

use bytes::{Buf, BufMut, BytesMut};

pub use connect::{ConnAck, Connect, Will};
pub use control::{Auth, Disconnect};
pub use error::DecodeError;
pub use properties::{id as property_id, Properties, PropertyContext, MAX_REPEATED};
pub use publish::{Ack, Publish, PublishHeader, PublishRef};
pub use reason::{allowed_v5, ConnectReturnCode, ReasonCode, ReasonContext};
pub use subscribe::{RetainHandling, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe};
pub use wire::MqttStr;

use wire::{parse_varint, put_varint, varint_len, Reader};

/// A packet identifier; zero is not a valid one [MQTT-2.3.1-1], so the type forbids it.
pub type PacketId = std::num::NonZeroU16;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum ProtocolVersion {
    /// 3.1, protocol name "MQIsdp", level 3.
    V31 = 3,
    /// 3.1.1, level 4.
    V311 = 4,
    /// 5.0, level 5.
    V5 = 5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Fixed-header packet type numbers (section 2.1.2).
pub mod packet_type {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Box<Subscribe>),
    SubAck(Box<SubAck>),
    Unsubscribe(Box<Unsubscribe>),
    UnsubAck(Box<UnsubAck>),
    PingReq,
    PingResp,
    Disconnect(Box<Disconnect>),
    Auth(Box<Auth>),
}

/// The largest packet the protocol can express: a 4-byte remaining length plus the fixed header.
pub const MAX_PACKET_SIZE: usize = 1 + 4 + wire::MAX_VARINT as usize;

/// Parses the fixed header at the front of `buf`: (first byte, header length, remaining length).
/// `Ok(None)` when the header itself is incomplete.
pub fn parse_fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match parse_varint(&buf[1..])? {
        Some((remaining, n)) => Ok(Some((first, 1 + n, remaining as usize))),
        None => Ok(None),
    }
}

/// The next complete frame in `buf`, checked but not decoded: (first header byte, header length,
/// total length). For the hot path: the caller parses a PUBLISH in place with `PublishRef::parse`
/// and advances the buffer itself, and hands anything else to `decode`. `Ok(None)`: incomplete.
pub fn next_frame(
    buf: &[u8],
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some((first, header_len, remaining)) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    check_flags(first >> 4, first & 0x0f, version)?;
    if buf.len() < size {
        return Ok(None);
    }
    Ok(Some((first, header_len, size)))
}

/// Decodes one packet from the front of `buf`, consuming its bytes.
///
/// `version` is the connection's protocol version, `None` before CONNECT (then only CONNECT is
/// accepted [MQTT-3.1.0-1]). A packet whose total size exceeds `max_packet_size` is rejected as
/// soon as its fixed header is read, before any of it is buffered. `Ok(None)`: need more bytes;
/// nothing was consumed.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, header_len, remaining)) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    let kind = first >> 4;
    let flags = first & 0x0f;
    // Check the header before waiting for the body, so garbage is refused at its first bytes.
    check_flags(kind, flags, version)?;
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size);
    frame.advance(header_len);
    if kind == packet_type::PUBLISH {
        if let Some(v) = version {
            return Ok(Some(Packet::Publish(Publish::decode(frame, flags, v)?)));
        }
    }
    let mut r = Reader::new(frame);
    let Some(v) = version else {
        return Ok(Some(Packet::Connect(Box::new(Connect::decode(&mut r)?))));
    };
    use packet_type::*;
    let packet = match kind {
        CONNECT => Packet::Connect(Box::new(Connect::decode(&mut r)?)),
        CONNACK => Packet::ConnAck(Box::new(ConnAck::decode(&mut r, v)?)),
        PUBLISH => unreachable!("PUBLISH is decoded above"),
        PUBACK => Packet::PubAck(Ack::decode(&mut r, v, ReasonContext::PubAck)?),
        PUBREC => Packet::PubRec(Ack::decode(&mut r, v, ReasonContext::PubAck)?),
        PUBREL => Packet::PubRel(Ack::decode(&mut r, v, ReasonContext::PubRel)?),
        PUBCOMP => Packet::PubComp(Ack::decode(&mut r, v, ReasonContext::PubRel)?),
        SUBSCRIBE => Packet::Subscribe(Box::new(Subscribe::decode(&mut r, v)?)),
        SUBACK => Packet::SubAck(Box::new(SubAck::decode(&mut r, v)?)),
        UNSUBSCRIBE => Packet::Unsubscribe(Box::new(Unsubscribe::decode(&mut r, v)?)),
        UNSUBACK => Packet::UnsubAck(Box::new(UnsubAck::decode(&mut r, v)?)),
        PINGREQ => {
            r.finish()?;
            Packet::PingReq
        }
        PINGRESP => {
            r.finish()?;
            Packet::PingResp
        }
        DISCONNECT => Packet::Disconnect(Box::new(Disconnect::decode(&mut r, v)?)),
        AUTH => Packet::Auth(Box::new(Auth::decode(&mut r)?)),
        _ => return Err(DecodeError::ReservedPacketType(kind)),
    };
    Ok(Some(packet))
}

fn check_flags(kind: u8, flags: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    use packet_type::*;
    if version.is_none() && kind != CONNECT {
        return Err(DecodeError::ExpectedConnect);
    }
    let expected = match kind {
        0 => return Err(DecodeError::ReservedPacketType(0)),
        AUTH if version != Some(ProtocolVersion::V5) => return Err(DecodeError::ReservedPacketType(AUTH)),
        PUBLISH => {
            if flags & 0b0110 == 0b0110 {
                return Err(DecodeError::InvalidQoS);
            }
            if flags & 0b1110 == 0b1000 {
                return Err(DecodeError::DupOnQoS0);
            }
            return Ok(());
        }
        // [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1]
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::InvalidFlags { packet_type: kind, flags });
    }
    Ok(())
}

/// Writes a fixed header for a body of `remaining` bytes.
pub(crate) fn put_header(out: &mut BytesMut, first: u8, remaining: usize) {
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(first);
    put_varint(out, remaining);
}

/// Bytes a fixed header for a body of `remaining` bytes takes.
pub(crate) fn header_len(remaining: usize) -> usize {
    1 + varint_len(remaining)
}

fn put_packet_id(out: &mut BytesMut, id: PacketId) {
    out.put_u16(id.get());
}

fn read_packet_id(r: &mut Reader) -> Result<PacketId, DecodeError> {
    PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)
}

/// Properties are written only in 5.0; this is their cost in bytes for `v`.
fn props_len(v: ProtocolVersion, p: &Properties) -> usize {
    if v.is_v5() {
        p.wire_len()
    } else {
        0
    }
}

impl Packet {
    /// Appends the encoded packet to `out`. Fields that `version` cannot express (5.0 properties and
    /// reason codes on a 3.1.1 connection) are left out.
    pub fn encode(&self, version: ProtocolVersion, out: &mut BytesMut) {
        use packet_type::*;
        match self {
            Packet::Connect(c) => c.encode(out),
            Packet::ConnAck(c) => c.encode(version, out),
            Packet::Publish(p) => p.encode(version, out),
            Packet::PubAck(a) => a.encode(PUBACK << 4, version, out),
            Packet::PubRec(a) => a.encode(PUBREC << 4, version, out),
            Packet::PubRel(a) => a.encode(PUBREL << 4 | 0b0010, version, out),
            Packet::PubComp(a) => a.encode(PUBCOMP << 4, version, out),
            Packet::Subscribe(s) => s.encode(version, out),
            Packet::SubAck(s) => s.encode(version, out),
            Packet::Unsubscribe(u) => u.encode(version, out),
            Packet::UnsubAck(u) => u.encode(version, out),
            Packet::PingReq => out.put_slice(&[PINGREQ << 4, 0]),
            Packet::PingResp => out.put_slice(&[PINGRESP << 4, 0]),
            Packet::Disconnect(d) => d.encode(version, out),
            Packet::Auth(a) => a.encode(out),
        }
    }

    /// The packet's type name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}
