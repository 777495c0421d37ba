//! The little MQTT the load generator speaks: just enough of 3.1.1 and 5.0 to connect, subscribe,
//! publish and acknowledge, written for speed (append to a Vec, parse frames in place). It is its
//! own code on purpose: the load generator must not share the broker's codec, so it can measure
//! any broker and cannot hide a bug the two would share.

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

fn varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT with clean session / clean start, or with `persistent` a session the broker keeps
/// (3.1.1 clean session 0; 5.0 clean start 0 and a session expiry of one hour); `login` is a
/// username and password.
pub fn connect(
    out: &mut Vec<u8>,
    client_id: &str,
    keep_alive: u16,
    v5: bool,
    persistent: bool,
    login: Option<(&str, &str)>,
) {
    let props = if v5 && persistent { 5 } else { 0 };
    let creds = login.map_or(0, |(u, p)| 4 + u.len() + p.len());
    let body = 10 + v5 as usize + props + 2 + client_id.len() + creds;
    out.push(0x10);
    varint(out, body);
    string(out, b"MQTT");
    out.push(if v5 { 5 } else { 4 });
    let mut flags = if persistent { 0x00 } else { 0x02 };
    if login.is_some() {
        flags |= 0xC0;
    }
    out.push(flags);
    out.extend_from_slice(&keep_alive.to_be_bytes());
    if v5 {
        out.push(props as u8);
        if persistent {
            out.push(0x11); // Session Expiry Interval
            out.extend_from_slice(&3600u32.to_be_bytes());
        }
    }
    string(out, client_id.as_bytes());
    if let Some((u, p)) = login {
        string(out, u.as_bytes());
        string(out, p.as_bytes());
    }
}

pub fn subscribe(out: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8, v5: bool) {
    out.push(0x82);
    varint(out, 2 + v5 as usize + 2 + filter.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    if v5 {
        out.push(0);
    }
    string(out, filter.as_bytes());
    out.push(qos);
}

pub fn publish(out: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload: &[u8], v5: bool) {
    out.push(0x30 | qos << 1);
    let pid_len = if qos > 0 { 2 } else { 0 };
    varint(out, 2 + topic.len() + pid_len + v5 as usize + payload.len());
    string(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    if v5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
pub fn ack(out: &mut Vec<u8>, kind: u8, packet_id: u16) {
    out.push(kind << 4 | if kind == PUBREL { 2 } else { 0 });
    out.push(2);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

pub fn disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xe0, 0]);
}

pub enum Frame<'a> {
    ConnAck { code: u8 },
    SubAck { codes: &'a [u8] },
    Publish { qos: u8, packet_id: u16, payload: &'a [u8] },
    Ack { kind: u8, packet_id: u16 },
    PingResp,
    Disconnect,
    Other,
}

/// The next complete frame at the front of `buf` and its length; `Ok(None)` if incomplete.
pub fn parse(buf: &[u8], v5: bool) -> Result<Option<(Frame<'_>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("malformed remaining length".into());
        }
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let need = |n: usize| if body.len() < n { Err(format!("short packet type {}", buf[0] >> 4)) } else { Ok(()) };
    let frame = match buf[0] >> 4 {
        CONNACK => {
            need(2)?;
            Frame::ConnAck { code: body[1] }
        }
        SUBACK => {
            need(3)?;
            let mut at = 2;
            if v5 {
                let (plen, n) = prop_len(&body[at..])?;
                at += n + plen;
            }
            Frame::SubAck { codes: body.get(at..).unwrap_or(&[]) }
        }
        PUBLISH => {
            let qos = (buf[0] >> 1) & 3;
            need(2)?;
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + tlen;
            let mut packet_id = 0;
            if qos > 0 {
                need(at + 2)?;
                packet_id = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
            }
            if v5 {
                need(at + 1)?;
                let (plen, n) = prop_len(&body[at..])?;
                at += n + plen;
            }
            need(at)?;
            Frame::Publish { qos, packet_id, payload: &body[at..] }
        }
        kind @ (PUBACK | PUBREC | PUBREL | PUBCOMP) => {
            need(2)?;
            Frame::Ack { kind, packet_id: u16::from_be_bytes([body[0], body[1]]) }
        }
        PINGRESP => Frame::PingResp,
        DISCONNECT => Frame::Disconnect,
        _ => Frame::Other,
    };
    Ok(Some((frame, total)))
}

fn prop_len(b: &[u8]) -> Result<(usize, usize), String> {
    let mut v = 0usize;
    for (i, &x) in b.iter().take(4).enumerate() {
        v |= ((x & 0x7f) as usize) << (7 * i);
        if x & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err("malformed property length".into())
}
