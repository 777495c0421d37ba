//! CONNECT (3.1) and CONNACK (3.2).

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{put_bin, put_str, MqttStr, Reader};
use super::{
    allowed_v5, header_len, packet_type, props_len, put_header, DecodeError, Properties, PropertyContext,
    ProtocolVersion, QoS, ReasonCode, ReasonContext,
};
use crate::topic;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// "Clean session" in 3.1.1, "clean start" in 5.0.
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: MqttStr,
    pub will: Option<Will>,
    pub username: Option<MqttStr>,
    pub password: Option<Bytes>,
    pub properties: Properties,
    /// mosquitto's bridge convention for 3.1 and 3.1.1: the protocol level with bit 0x80 set
    /// says the client is a broker bridging to us (no echo of its own messages, retain kept).
    pub bridge: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

impl Connect {
    /// A 3.1.1 CONNECT with clean session and no will or credentials.
    pub fn new(client_id: impl Into<MqttStr>) -> Self {
        Connect {
            protocol: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
            bridge: false,
        }
    }

    pub(super) fn decode(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let raw_level = r.u8()?;
        // mosquitto's bridges set bit 0x80 on 3.1 / 3.1.1 levels.
        let bridge = raw_level & 0x80 != 0 && matches!(raw_level & 0x7f, 3 | 4);
        let level = if bridge { raw_level & 0x7f } else { raw_level };
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) => ProtocolVersion::V311,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQIsdp", 3) => ProtocolVersion::V31,
            (b"MQTT", l) | (b"MQIsdp", l) => return Err(DecodeError::UnsupportedProtocolLevel(l)),
            _ => return Err(DecodeError::InvalidProtocolName),
        };
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::ConnectReservedFlag);
        }
        let will_flag = flags & 0x04 != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let password_flag = flags & 0x40 != 0;
        let username_flag = flags & 0x80 != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(DecodeError::WillFlagsWithoutWill);
        }
        let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillQoS)?;
        // 5.0 allows a password without a user name (3.1.2.9); earlier versions do not.
        if password_flag && !username_flag && protocol != ProtocolVersion::V5 {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties =
            if protocol.is_v5() { Properties::decode(r, PropertyContext::Connect)? } else { Properties::default() };
        let client_id = r.string()?;
        let will = if will_flag {
            let properties =
                if protocol.is_v5() { Properties::decode(r, PropertyContext::Will)? } else { Properties::default() };
            let topic = r.string()?;
            topic::validate_name(&topic).map_err(|e| e.as_decode_error())?;
            let payload = r.binary()?;
            Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if username_flag { Some(r.string()?) } else { None };
        let password = if password_flag { Some(r.binary()?) } else { None };
        r.finish()?;
        Ok(Connect {
            protocol,
            clean_start: flags & 0x02 != 0,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
            bridge,
        })
    }

    fn body_len(&self) -> usize {
        let v = self.protocol;
        let name_len = if v == ProtocolVersion::V31 { 6 } else { 4 };
        let mut n = 2 + name_len + 1 + 1 + 2 + props_len(v, &self.properties) + 2 + self.client_id.len();
        if let Some(w) = &self.will {
            n += props_len(v, &w.properties) + 2 + w.topic.len() + 2 + w.payload.len();
        }
        n += self.username.as_ref().map_or(0, |u| 2 + u.len());
        n += self.password.as_ref().map_or(0, |p| 2 + p.len());
        n
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let v = self.protocol;
        put_header(out, packet_type::CONNECT << 4, self.body_len());
        match v {
            ProtocolVersion::V31 => put_str(out, "MQIsdp"),
            _ => put_str(out, "MQTT"),
        }
        out.put_u8(if self.bridge && !v.is_v5() { v as u8 | 0x80 } else { v as u8 });
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos as u8) << 3;
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        out.put_u8(flags);
        out.put_u16(self.keep_alive);
        if v.is_v5() {
            self.properties.encode(out);
        }
        put_str(out, &self.client_id);
        if let Some(w) = &self.will {
            if v.is_v5() {
                w.properties.encode(out);
            }
            put_str(out, &w.topic);
            put_bin(out, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(out, u);
        }
        if let Some(p) = &self.password {
            put_bin(out, p);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// The 3.1.1 return code or the 5.0 reason code.
    pub code: ReasonCode,
    pub properties: Properties,
}

impl ConnAck {
    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let flags = r.u8()?;
        if flags & 0xfe != 0 {
            return Err(DecodeError::ConnAckReservedFlags);
        }
        let code = ReasonCode(r.u8()?);
        let properties = if v.is_v5() {
            if !allowed_v5(ReasonContext::ConnAck, code) {
                return Err(DecodeError::InvalidReasonCode { packet: "CONNACK", code: code.0 });
            }
            Properties::decode(r, PropertyContext::ConnAck)?
        } else {
            if code.0 > 5 {
                return Err(DecodeError::InvalidReasonCode { packet: "CONNACK", code: code.0 });
            }
            Properties::default()
        };
        r.finish()?;
        Ok(ConnAck { session_present: flags & 1 != 0, code, properties })
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        put_header(out, packet_type::CONNACK << 4, 2 + props_len(v, &self.properties));
        out.put_u8(self.session_present as u8);
        out.put_u8(self.code.0);
        if v.is_v5() {
            self.properties.encode(out);
        }
    }

    /// Encoded size, for checking a client's maximum packet size.
    pub fn size(&self, v: ProtocolVersion) -> usize {
        let n = 2 + props_len(v, &self.properties);
        header_len(n) + n
    }
}
