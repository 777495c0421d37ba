//! MQTT 5.0 properties (section 2.2.2): one struct for every packet, with the identifiers each
//! packet type may carry checked on decode. Absent properties cost nothing on the wire and no
//! allocation in memory (empty `Vec`s, `None`s).

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{put_bin, put_str, put_varint, varint_len, MqttStr, Reader};
use super::DecodeError;

/// Which packet a property block belongs to; decides the identifiers allowed in it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyContext {
    fn name(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Will => "will properties",
            Self::ConnAck => "CONNACK",
            Self::Publish => "PUBLISH",
            Self::Ack => "PUBACK/PUBREC/PUBREL/PUBCOMP",
            Self::Subscribe => "SUBSCRIBE",
            Self::SubAck => "SUBACK",
            Self::Unsubscribe => "UNSUBSCRIBE",
            Self::UnsubAck => "UNSUBACK",
            Self::Disconnect => "DISCONNECT",
            Self::Auth => "AUTH",
        }
    }
}

pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

fn allowed(pid: u8, ctx: PropertyContext) -> Option<bool> {
    use PropertyContext::*;
    let ok = match pid {
        id::PAYLOAD_FORMAT_INDICATOR
        | id::MESSAGE_EXPIRY_INTERVAL
        | id::CONTENT_TYPE
        | id::RESPONSE_TOPIC
        | id::CORRELATION_DATA => matches!(ctx, Publish | Will),
        id::SUBSCRIPTION_IDENTIFIER => matches!(ctx, Publish | Subscribe),
        id::SESSION_EXPIRY_INTERVAL => matches!(ctx, Connect | ConnAck | Disconnect),
        id::ASSIGNED_CLIENT_IDENTIFIER
        | id::SERVER_KEEP_ALIVE
        | id::RESPONSE_INFORMATION
        | id::MAXIMUM_QOS
        | id::RETAIN_AVAILABLE
        | id::WILDCARD_SUBSCRIPTION_AVAILABLE
        | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | id::SHARED_SUBSCRIPTION_AVAILABLE => ctx == ConnAck,
        id::AUTHENTICATION_METHOD | id::AUTHENTICATION_DATA => matches!(ctx, Connect | ConnAck | Auth),
        id::REQUEST_PROBLEM_INFORMATION | id::REQUEST_RESPONSE_INFORMATION => ctx == Connect,
        id::WILL_DELAY_INTERVAL => ctx == Will,
        id::SERVER_REFERENCE => matches!(ctx, ConnAck | Disconnect),
        id::REASON_STRING => matches!(ctx, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth),
        id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM | id::MAXIMUM_PACKET_SIZE => matches!(ctx, Connect | ConnAck),
        id::TOPIC_ALIAS => ctx == Publish,
        id::USER_PROPERTY => true,
        _ => return None,
    };
    Some(ok)
}

/// Every 5.0 property. Fields are named after the spec; `None`/empty means absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttStr>,
    pub response_topic: Option<MqttStr>,
    pub correlation_data: Option<Bytes>,
    /// Several in a forwarded PUBLISH, at most one in SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<MqttStr>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<MqttStr>,
    pub server_reference: Option<MqttStr>,
    pub reason_string: Option<MqttStr>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    /// Kept in order, as [MQTT-3.3.2-18] requires when forwarding.
    pub user_properties: Vec<(MqttStr, MqttStr)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

fn set<T>(slot: &mut Option<T>, pid: u8, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(pid));
    }
    *slot = Some(v);
    Ok(())
}

fn boolean(pid: u8, v: u8) -> Result<u8, DecodeError> {
    if v > 1 {
        return Err(DecodeError::InvalidPropertyValue(pid));
    }
    Ok(v)
}

fn nonzero16(pid: u8, v: u16) -> Result<u16, DecodeError> {
    if v == 0 {
        return Err(DecodeError::InvalidPropertyValue(pid));
    }
    Ok(v)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads a property length and the block that follows it.
    pub fn decode(r: &mut Reader, ctx: PropertyContext) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut p = Properties::default();
        if len == 0 {
            return Ok(p);
        }
        let mut r = r.sub(len)?;
        while !r.is_empty() {
            let pid = r.u8()?;
            match allowed(pid, ctx) {
                None => return Err(DecodeError::UnknownProperty(pid)),
                Some(false) => return Err(DecodeError::PropertyNotAllowed { id: pid, packet: ctx.name() }),
                Some(true) => {}
            }
            match pid {
                id::PAYLOAD_FORMAT_INDICATOR => set(&mut p.payload_format_indicator, pid, boolean(pid, r.u8()?)?)?,
                id::MESSAGE_EXPIRY_INTERVAL => set(&mut p.message_expiry_interval, pid, r.u32()?)?,
                id::CONTENT_TYPE => set(&mut p.content_type, pid, r.string()?)?,
                id::RESPONSE_TOPIC => {
                    let t = r.string()?;
                    // [MQTT-3.3.2-14]: the response topic is a topic name, so no wildcards.
                    if t.is_empty() || memchr::memchr2(b'+', b'#', t.as_bytes()).is_some() {
                        return Err(DecodeError::InvalidPropertyValue(pid));
                    }
                    set(&mut p.response_topic, pid, t)?
                }
                id::CORRELATION_DATA => set(&mut p.correlation_data, pid, r.binary()?)?,
                id::SUBSCRIPTION_IDENTIFIER => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(pid));
                    }
                    if ctx == PropertyContext::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::DuplicateProperty(pid));
                    }
                    if p.subscription_identifiers.len() >= MAX_REPEATED {
                        return Err(DecodeError::InvalidPropertyValue(pid));
                    }
                    p.subscription_identifiers.push(v);
                }
                id::SESSION_EXPIRY_INTERVAL => set(&mut p.session_expiry_interval, pid, r.u32()?)?,
                id::ASSIGNED_CLIENT_IDENTIFIER => set(&mut p.assigned_client_identifier, pid, r.string()?)?,
                id::SERVER_KEEP_ALIVE => set(&mut p.server_keep_alive, pid, r.u16()?)?,
                id::AUTHENTICATION_METHOD => set(&mut p.authentication_method, pid, r.string()?)?,
                id::AUTHENTICATION_DATA => set(&mut p.authentication_data, pid, r.binary()?)?,
                id::REQUEST_PROBLEM_INFORMATION => {
                    set(&mut p.request_problem_information, pid, boolean(pid, r.u8()?)?)?
                }
                id::WILL_DELAY_INTERVAL => set(&mut p.will_delay_interval, pid, r.u32()?)?,
                id::REQUEST_RESPONSE_INFORMATION => {
                    set(&mut p.request_response_information, pid, boolean(pid, r.u8()?)?)?
                }
                id::RESPONSE_INFORMATION => set(&mut p.response_information, pid, r.string()?)?,
                id::SERVER_REFERENCE => set(&mut p.server_reference, pid, r.string()?)?,
                id::REASON_STRING => set(&mut p.reason_string, pid, r.string()?)?,
                id::RECEIVE_MAXIMUM => set(&mut p.receive_maximum, pid, nonzero16(pid, r.u16()?)?)?,
                id::TOPIC_ALIAS_MAXIMUM => set(&mut p.topic_alias_maximum, pid, r.u16()?)?,
                id::TOPIC_ALIAS => {
                    let alias = r.u16()?;
                    if alias == 0 {
                        return Err(DecodeError::ZeroTopicAlias);
                    }
                    set(&mut p.topic_alias, pid, alias)?
                }
                id::MAXIMUM_QOS => set(&mut p.maximum_qos, pid, boolean(pid, r.u8()?)?)?,
                id::RETAIN_AVAILABLE => set(&mut p.retain_available, pid, boolean(pid, r.u8()?)?)?,
                id::USER_PROPERTY => {
                    let kv = (r.string()?, r.string()?);
                    if p.user_properties.len() >= MAX_REPEATED {
                        return Err(DecodeError::InvalidPropertyValue(pid));
                    }
                    p.user_properties.push(kv);
                }
                id::MAXIMUM_PACKET_SIZE => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::InvalidPropertyValue(pid));
                    }
                    set(&mut p.maximum_packet_size, pid, v)?
                }
                id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    set(&mut p.wildcard_subscription_available, pid, boolean(pid, r.u8()?)?)?
                }
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    set(&mut p.subscription_identifier_available, pid, boolean(pid, r.u8()?)?)?
                }
                id::SHARED_SUBSCRIPTION_AVAILABLE => {
                    set(&mut p.shared_subscription_available, pid, boolean(pid, r.u8()?)?)?
                }
                _ => unreachable!("allowed() returned Some for an unknown identifier"),
            }
        }
        Ok(p)
    }

    /// Length of the encoded properties, without the property-length prefix.
    pub fn len(&self) -> usize {
        let s = |o: &Option<MqttStr>| o.as_ref().map_or(0, |v| 3 + v.len());
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 3 + v.len());
        let n = |present: bool, size: usize| if present { 1 + size } else { 0 };
        n(self.payload_format_indicator.is_some(), 1)
            + n(self.message_expiry_interval.is_some(), 4)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self.subscription_identifiers.iter().map(|&v| 1 + varint_len(v as usize)).sum::<usize>()
            + n(self.session_expiry_interval.is_some(), 4)
            + s(&self.assigned_client_identifier)
            + n(self.server_keep_alive.is_some(), 2)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n(self.request_problem_information.is_some(), 1)
            + n(self.will_delay_interval.is_some(), 4)
            + n(self.request_response_information.is_some(), 1)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n(self.receive_maximum.is_some(), 2)
            + n(self.topic_alias_maximum.is_some(), 2)
            + n(self.topic_alias.is_some(), 2)
            + n(self.maximum_qos.is_some(), 1)
            + n(self.retain_available.is_some(), 1)
            + self.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
            + n(self.maximum_packet_size.is_some(), 4)
            + n(self.wildcard_subscription_available.is_some(), 1)
            + n(self.subscription_identifier_available.is_some(), 1)
            + n(self.shared_subscription_available.is_some(), 1)
    }

    /// Length including the property-length prefix.
    pub fn wire_len(&self) -> usize {
        let len = self.len();
        varint_len(len) + len
    }

    /// Writes the property length and the properties.
    pub fn encode(&self, out: &mut BytesMut) {
        put_varint(out, self.len());
        let u8p = |out: &mut BytesMut, pid: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(pid);
                out.put_u8(v);
            }
        };
        let u16p = |out: &mut BytesMut, pid: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(pid);
                out.put_u16(v);
            }
        };
        let u32p = |out: &mut BytesMut, pid: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(pid);
                out.put_u32(v);
            }
        };
        let strp = |out: &mut BytesMut, pid: u8, v: &Option<MqttStr>| {
            if let Some(v) = v {
                out.put_u8(pid);
                put_str(out, v);
            }
        };
        let binp = |out: &mut BytesMut, pid: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                out.put_u8(pid);
                put_bin(out, v);
            }
        };
        u8p(out, id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        u32p(out, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        strp(out, id::CONTENT_TYPE, &self.content_type);
        strp(out, id::RESPONSE_TOPIC, &self.response_topic);
        binp(out, id::CORRELATION_DATA, &self.correlation_data);
        for &v in &self.subscription_identifiers {
            out.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(out, v as usize);
        }
        u32p(out, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        strp(out, id::ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        u16p(out, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        strp(out, id::AUTHENTICATION_METHOD, &self.authentication_method);
        binp(out, id::AUTHENTICATION_DATA, &self.authentication_data);
        u8p(out, id::REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        u32p(out, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        u8p(out, id::REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        strp(out, id::RESPONSE_INFORMATION, &self.response_information);
        strp(out, id::SERVER_REFERENCE, &self.server_reference);
        strp(out, id::REASON_STRING, &self.reason_string);
        u16p(out, id::RECEIVE_MAXIMUM, self.receive_maximum);
        u16p(out, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        u16p(out, id::TOPIC_ALIAS, self.topic_alias);
        u8p(out, id::MAXIMUM_QOS, self.maximum_qos);
        u8p(out, id::RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(id::USER_PROPERTY);
            put_str(out, k);
            put_str(out, v);
        }
        u32p(out, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        u8p(out, id::WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        u8p(out, id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        u8p(out, id::SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
    }
}

/// Bound on repeated properties (user properties, subscription identifiers) in one packet, so a
/// hostile packet cannot make us build a huge `Vec` of tiny entries. The packet size limit bounds
/// it too; this keeps the per-entry overhead (a `Vec` slot is larger than its 5 wire bytes) small.
pub const MAX_REPEATED: usize = 1024;
