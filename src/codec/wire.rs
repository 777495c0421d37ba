//! Primitive wire types of MQTT: variable byte integers, two-byte-length strings and binary data.
//!
//! Owns the `Reader` cursor that every packet decoder uses to slice fields out of a frozen packet
//! body without copying, and the `put_*` helpers every encoder uses. Knows nothing of packets.

use std::fmt;
use std::ops::Deref;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::DecodeError;

/// A UTF-8 string as MQTT defines it: well-formed UTF-8 with no U+0000 [MQTT-1.5.3-1/2], at most
/// 65,535 bytes. When decoded it is a slice of the read buffer, never a copy.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// Validates `bytes` as an MQTT string.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        validate_utf8(&bytes)?;
        Ok(MqttStr(bytes))
    }

    /// Wraps bytes already validated (e.g. by `topic_name_str`).
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        MqttStr(bytes)
    }

    pub const fn from_static(s: &'static str) -> Self {
        MqttStr(Bytes::from_static(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either validated the bytes as UTF-8 or took them from a `str`.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for MqttStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for MqttStr {
    fn from(s: &str) -> Self {
        MqttStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for MqttStr {
    fn from(s: String) -> Self {
        MqttStr(Bytes::from(s.into_bytes()))
    }
}

impl fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for MqttStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MqttStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Validates a PUBLISH topic name's bytes in one pass for the common all-ASCII case: no U+0000
/// [MQTT-1.5.3-2], no wildcard [MQTT-3.3.2-2]; anything else goes through the full UTF-8 check.
pub fn topic_name_str(bytes: &[u8]) -> Result<&str, DecodeError> {
    // b in 1..=0x7f, and not '+' or '#'.
    let plain = |b: &u8| b.wrapping_sub(1) < 0x7f && *b != b'+' && *b != b'#';
    if !bytes.iter().all(plain) {
        validate_utf8(bytes)?;
        if memchr::memchr2(b'+', b'#', bytes).is_some() {
            return Err(DecodeError::WildcardInTopicName);
        }
    }
    // SAFETY: all bytes are ASCII, or validate_utf8 accepted them.
    Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
}

pub(crate) fn validate_utf8(bytes: &[u8]) -> Result<(), DecodeError> {
    // Rust's validator rejects overlong forms and surrogates, as [MQTT-1.5.3-1] requires.
    std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    if memchr::memchr(0, bytes).is_some() {
        return Err(DecodeError::NullCharacter);
    }
    Ok(())
}

/// Parses a variable byte integer from the front of `buf`.
/// `Ok(None)`: more bytes are needed. `Ok(Some((value, len)))` otherwise.
pub fn parse_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // [MQTT-1.5.5-1]: the minimum number of bytes; a trailing zero byte is not minimal.
            if i > 0 && byte == 0 {
                return Err(DecodeError::MalformedVarInt);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedVarInt)
}

pub const MAX_VARINT: u32 = 268_435_455;

pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_varint(out: &mut BytesMut, mut value: usize) {
    debug_assert!(value <= MAX_VARINT as usize, "variable byte integer out of range");
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

pub fn put_str(out: &mut BytesMut, s: &str) {
    put_bin(out, s.as_bytes());
}

pub fn put_bin(out: &mut BytesMut, b: &[u8]) {
    debug_assert!(b.len() <= u16::MAX as usize, "MQTT string or binary over 65535 bytes");
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

/// A cursor over one packet's body, consuming it from the front. Every read is bounds-checked
/// against the remaining length; string and binary fields are split off the shared read buffer
/// (one reference-count increment each, no copy), and the last field takes the rest outright.
pub struct Reader {
    buf: BytesMut,
}

impl Reader {
    pub fn new(buf: BytesMut) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let a: [u8; N] = self.buf.get(..N).ok_or(DecodeError::Truncated)?.try_into().expect("slice of length N");
        self.buf.advance(N);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take_array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }

    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        match parse_varint(&self.buf)? {
            Some((v, n)) => {
                self.buf.advance(n);
                Ok(v)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    /// `n` bytes as a shared slice of the body.
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        if n == 0 {
            return Ok(Bytes::new());
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Binary data: a two-byte length then that many bytes.
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub fn string(&mut self) -> Result<MqttStr, DecodeError> {
        MqttStr::from_bytes(self.binary()?)
    }

    /// Everything that is left, e.g. a PUBLISH payload.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf).freeze()
    }

    /// A sub-reader over the next `n` bytes (a property block).
    pub fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        Ok(Reader::new(self.buf.split_to(n)))
    }

    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_at_every_boundary() {
        for v in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, MAX_VARINT as usize] {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            assert_eq!(parse_varint(&out).unwrap(), Some((v as u32, out.len())));
        }
    }

    #[test]
    fn varint_rejects_fifth_byte_and_non_minimal_forms() {
        assert_eq!(parse_varint(&[0xff, 0xff, 0xff, 0xff, 0x01]), Err(DecodeError::MalformedVarInt));
        assert_eq!(parse_varint(&[0x80, 0x00]), Err(DecodeError::MalformedVarInt));
        assert_eq!(parse_varint(&[0x80, 0x80]), Ok(None));
    }

    #[test]
    fn strings_reject_bad_utf8_and_nul() {
        assert_eq!(MqttStr::from_bytes(Bytes::from_static(b"a\xc0\xafb")), Err(DecodeError::InvalidUtf8));
        assert_eq!(MqttStr::from_bytes(Bytes::from_static(b"\xed\xa0\x80")), Err(DecodeError::InvalidUtf8));
        assert_eq!(MqttStr::from_bytes(Bytes::from_static(b"a\0b")), Err(DecodeError::NullCharacter));
        assert_eq!(MqttStr::from_bytes(Bytes::from_static("ü/x".as_bytes())).unwrap(), "ü/x");
    }
}
