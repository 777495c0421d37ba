//! How sessions, queued messages and retained messages look on disk: small length-prefixed
//! binary records, read back with the codec's bounds-checked `Reader` so a corrupt record is an
//! error, never a panic. Times are wall-clock milliseconds since the Unix epoch, so expiry counts
//! the time the broker was down.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::wire::{put_bin, put_str, Reader};
use crate::codec::{MqttStr, Properties, PropertyContext, ProtocolVersion, QoS, SubscriptionOptions, Will};
use crate::session::{Message, OutState, Subscription};

/// Wall-clock milliseconds now.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A monotonic instant as wall-clock milliseconds (0 for none).
pub fn to_wall(at: Option<Instant>, now: Instant, wall_now: u64) -> u64 {
    match at {
        None => 0,
        Some(t) if t >= now => wall_now + (t - now).as_millis() as u64,
        Some(t) => wall_now.saturating_sub((now - t).as_millis() as u64).max(1),
    }
}

/// Wall-clock milliseconds back to an instant (None for 0).
pub fn from_wall(ms: u64, now: Instant, wall_now: u64) -> Option<Instant> {
    if ms == 0 {
        return None;
    }
    Some(if ms >= wall_now {
        now + Duration::from_millis(ms - wall_now)
    } else {
        now.checked_sub(Duration::from_millis(wall_now - ms)).unwrap_or(now)
    })
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct Corrupt(pub String);

impl From<crate::codec::DecodeError> for Corrupt {
    fn from(e: crate::codec::DecodeError) -> Corrupt {
        Corrupt(e.to_string())
    }
}

fn put_u64(out: &mut BytesMut, v: u64) {
    out.put_u64(v);
}

fn get_u64(r: &mut Reader) -> Result<u64, Corrupt> {
    let hi = r.u32()? as u64;
    let lo = r.u32()? as u64;
    Ok(hi << 32 | lo)
}

fn put_props(out: &mut BytesMut, p: Option<&Properties>) {
    match p {
        Some(p) => p.encode(out),
        None => out.put_u8(0),
    }
}

fn qos(b: u8) -> Result<QoS, Corrupt> {
    QoS::from_u8(b).ok_or_else(|| Corrupt(format!("QoS {b}")))
}

/// A message, with its expiry as a wall-clock time.
pub fn put_message(out: &mut BytesMut, m: &Message, now: Instant, wall_now: u64) {
    put_str(out, &m.topic);
    put_bin(out, &m.payload);
    out.put_u8(m.qos as u8 | (m.retain as u8) << 2);
    put_props(out, m.properties.as_deref());
    put_u64(out, to_wall(m.expires_at, now, wall_now));
}

pub fn get_message(r: &mut Reader, now: Instant, wall_now: u64) -> Result<Message, Corrupt> {
    let topic = r.string()?;
    let payload = r.binary()?;
    let flags = r.u8()?;
    let properties = Properties::decode(r, PropertyContext::Publish)?;
    let expires_at = from_wall(get_u64(r)?, now, wall_now);
    let mut m = Message::plain(topic, payload, qos(flags & 3)?, flags & 4 != 0);
    m.properties = (!properties.is_empty()).then(|| Box::new(properties));
    m.expires_at = expires_at;
    Ok(m)
}

/// One queued or in-flight QoS 1/2 delivery of a session.
#[derive(Debug, Clone)]
pub struct EntryRecord {
    /// None: queued; else in flight with this packet id.
    pub state: Option<(OutState, u16)>,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    pub msg: Arc<Message>,
}

pub fn put_entry(out: &mut BytesMut, e: &EntryRecord, now: Instant, wall_now: u64) {
    let (state, pid) = match e.state {
        None => (0, 0),
        Some((OutState::AwaitAck, p)) => (1, p),
        Some((OutState::AwaitRec, p)) => (2, p),
        Some((OutState::AwaitComp, p)) => (3, p),
    };
    out.put_u8(state);
    out.put_u16(pid);
    out.put_u8(e.qos as u8 | (e.retain as u8) << 2);
    out.put_u16(e.sub_ids.len().min(u16::MAX as usize) as u16);
    for id in e.sub_ids.iter().take(u16::MAX as usize) {
        out.put_u32(*id);
    }
    put_message(out, &e.msg, now, wall_now);
}

pub fn get_entry(bytes: &[u8], now: Instant, wall_now: u64) -> Result<EntryRecord, Corrupt> {
    let mut r = Reader::new(BytesMut::from(bytes));
    let state = r.u8()?;
    let pid = r.u16()?;
    let state = match (state, pid) {
        (0, _) => None,
        (_, 0) => return Err(Corrupt("packet id 0".into())),
        (1, p) => Some((OutState::AwaitAck, p)),
        (2, p) => Some((OutState::AwaitRec, p)),
        (3, p) => Some((OutState::AwaitComp, p)),
        (s, _) => return Err(Corrupt(format!("state {s}"))),
    };
    let flags = r.u8()?;
    let n = r.u16()? as usize;
    let mut sub_ids = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        sub_ids.push(r.u32()?);
    }
    let msg = Arc::new(get_message(&mut r, now, wall_now)?);
    Ok(EntryRecord { state, qos: qos(flags & 3)?, retain: flags & 4 != 0, sub_ids, msg })
}

/// What a session is, beside its queue.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub client_id: MqttStr,
    pub version: ProtocolVersion,
    pub expiry_interval: u32,
    /// When its client went away (0: connected when last written).
    pub disconnected_at: u64,
    pub next_packet_id: u16,
    pub incoming_qos2: Vec<u16>,
    pub subscriptions: Vec<(MqttStr, Subscription)>,
    /// A will waiting out its delay: when it is due.
    pub pending_will: Option<(u64, Will)>,
}

pub fn put_session(out: &mut BytesMut, s: &SessionRecord) {
    put_str(out, &s.client_id);
    out.put_u8(s.version as u8);
    out.put_u32(s.expiry_interval);
    put_u64(out, s.disconnected_at);
    out.put_u16(s.next_packet_id);
    out.put_u16(s.incoming_qos2.len() as u16);
    for id in &s.incoming_qos2 {
        out.put_u16(*id);
    }
    out.put_u32(s.subscriptions.len() as u32);
    for (filter, sub) in &s.subscriptions {
        put_str(out, filter);
        out.put_u8(sub.options.encode(ProtocolVersion::V5));
        out.put_u32(sub.identifier);
    }
    match &s.pending_will {
        None => out.put_u8(0),
        Some((due, w)) => {
            out.put_u8(1);
            put_u64(out, *due);
            put_str(out, &w.topic);
            put_bin(out, &w.payload);
            out.put_u8(w.qos as u8 | (w.retain as u8) << 2);
            w.properties.encode(out);
        }
    }
}

pub fn get_session(bytes: &[u8]) -> Result<SessionRecord, Corrupt> {
    let mut r = Reader::new(BytesMut::from(bytes));
    let client_id = r.string()?;
    let version = match r.u8()? {
        3 => ProtocolVersion::V31,
        4 => ProtocolVersion::V311,
        5 => ProtocolVersion::V5,
        v => return Err(Corrupt(format!("protocol level {v}"))),
    };
    let expiry_interval = r.u32()?;
    let disconnected_at = get_u64(&mut r)?;
    let next_packet_id = r.u16()?;
    let n = r.u16()? as usize;
    let mut incoming_qos2 = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        incoming_qos2.push(r.u16()?);
    }
    let n = r.u32()? as usize;
    let mut subscriptions = Vec::with_capacity(n.min(r.remaining() / 7));
    for _ in 0..n {
        let filter = r.string()?;
        let options = SubscriptionOptions::decode(r.u8()?, ProtocolVersion::V5)?;
        let identifier = r.u32()?;
        subscriptions.push((filter, Subscription { options, identifier, acl_whole: 0 }));
    }
    let pending_will = match r.u8()? {
        0 => None,
        _ => {
            let due = get_u64(&mut r)?;
            let topic = r.string()?;
            let payload = r.binary()?;
            let flags = r.u8()?;
            let properties = Properties::decode(&mut r, PropertyContext::Will)?;
            Some((due, Will { topic, payload, qos: qos(flags & 3)?, retain: flags & 4 != 0, properties }))
        }
    };
    Ok(SessionRecord {
        client_id,
        version,
        expiry_interval,
        disconnected_at,
        next_packet_id,
        incoming_qos2,
        subscriptions,
        pending_will,
    })
}

pub fn message_bytes(m: &Message, now: Instant, wall_now: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(m.size() + 32);
    put_message(&mut out, m, now, wall_now);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corrupt_ones_are_errors() {
        let now = Instant::now();
        let wall = wall_ms();
        let mut m = Message::plain("a/b", Bytes::from_static(b"hello"), QoS::ExactlyOnce, true);
        m.expires_at = Some(now + Duration::from_secs(60));
        let e = EntryRecord {
            state: Some((OutState::AwaitRec, 7)),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![1, 9],
            msg: Arc::new(m),
        };
        let mut out = BytesMut::new();
        put_entry(&mut out, &e, now, wall);
        let back = get_entry(&out, now, wall).unwrap();
        assert_eq!(back.state, Some((OutState::AwaitRec, 7)));
        assert_eq!(back.sub_ids, vec![1, 9]);
        assert_eq!(&back.msg.payload[..], b"hello");
        assert!(back.msg.retain && back.msg.qos == QoS::ExactlyOnce);
        let left = back.msg.expires_at.unwrap() - now;
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        for cut in 0..out.len() {
            assert!(get_entry(&out[..cut], now, wall).is_err());
        }
        let s = SessionRecord {
            client_id: MqttStr::from("c1"),
            version: ProtocolVersion::V5,
            expiry_interval: 3600,
            disconnected_at: wall,
            next_packet_id: 12,
            incoming_qos2: vec![3, 4],
            subscriptions: vec![(MqttStr::from("x/#"), Subscription::default())],
            pending_will: None,
        };
        let mut out = BytesMut::new();
        put_session(&mut out, &s);
        let back = get_session(&out).unwrap();
        assert_eq!(back.client_id.as_str(), "c1");
        assert_eq!(back.subscriptions.len(), 1);
        assert_eq!(back.incoming_qos2, vec![3, 4]);
        for cut in 0..out.len() {
            assert!(get_session(&out[..cut]).is_err());
        }
    }
}
