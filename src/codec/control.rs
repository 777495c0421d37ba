//! DISCONNECT (3.14) and AUTH (3.15).

use bytes::{BufMut, BytesMut};

use super::wire::Reader;
use super::{
    allowed_v5, packet_type, put_header, DecodeError, Properties, PropertyContext, ProtocolVersion, ReasonCode,
    ReasonContext,
};

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Self {
        Disconnect { reason, properties: Properties::default() }
    }

    pub(super) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        if v.is_v5() && !r.is_empty() {
            d.reason = ReasonCode(r.u8()?);
            if !allowed_v5(ReasonContext::Disconnect, d.reason) {
                return Err(DecodeError::InvalidReasonCode { packet: "DISCONNECT", code: d.reason.0 });
            }
            if !r.is_empty() {
                d.properties = Properties::decode(r, PropertyContext::Disconnect)?;
            }
        }
        r.finish()?;
        Ok(d)
    }

    pub fn encode(&self, v: ProtocolVersion, out: &mut BytesMut) {
        let first = packet_type::DISCONNECT << 4;
        if !v.is_v5() || (self.reason == ReasonCode::SUCCESS && self.properties.is_empty()) {
            put_header(out, first, 0);
            return;
        }
        put_header(out, first, 1 + self.properties.wire_len());
        out.put_u8(self.reason.0);
        self.properties.encode(out);
    }
}

/// AUTH exists only in 5.0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Auth {
    pub(super) fn decode(r: &mut Reader) -> Result<Auth, DecodeError> {
        let mut a = Auth::default();
        if !r.is_empty() {
            a.reason = ReasonCode(r.u8()?);
            if !allowed_v5(ReasonContext::Auth, a.reason) {
                return Err(DecodeError::InvalidReasonCode { packet: "AUTH", code: a.reason.0 });
            }
            if !r.is_empty() {
                a.properties = Properties::decode(r, PropertyContext::Auth)?;
            }
        }
        r.finish()?;
        Ok(a)
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let first = packet_type::AUTH << 4;
        if self.reason == ReasonCode::SUCCESS && self.properties.is_empty() {
            put_header(out, first, 0);
            return;
        }
        put_header(out, first, 1 + self.properties.wire_len());
        out.put_u8(self.reason.0);
        self.properties.encode(out);
    }
}
