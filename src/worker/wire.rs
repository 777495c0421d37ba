//! A connection's bytes: reading a socket into the worker's buffer and handing each complete
//! packet to the protocol handlers, queueing output and writing it once per turn, freeing the
//! slots of closed connections, and the list of connections left unread while a peer catches up.

use std::io;

use bytes::{Buf, BytesMut};
use mio::{Interest, Token};

use super::conn::{CloseKind, ConnKey};
use super::timers::Timer;
use super::{Worker, READS_PER_TURN, READ_CHUNK};
use crate::codec::{
    decode, next_frame, packet_type, parse_fixed_header, DecodeError, Packet, ProtocolVersion, PublishRef,
};

impl Worker {
    pub(super) fn starve(&mut self, k: ConnKey, uid: u64) {
        let c = &mut self.conns[k];
        if !c.flags.starved {
            c.flags.starved = true;
            self.turn.starved.push((k, uid));
        }
    }

    /// Connections left unread for a peer's sake are read again once it has room and credit.
    pub(super) fn feed_starved(&mut self) {
        if self.turn.starved.is_empty() || self.mailbox.backlogged() || self.mailbox.out_of_credit() {
            return;
        }
        for (k, uid) in std::mem::take(&mut self.turn.starved) {
            if self.conns.alive(k, uid) {
                self.conns[k].flags.starved = false;
                self.turn.more_to_read.push((k, uid));
            }
        }
    }

    /// Reads what the socket has into the worker's read buffer and handles every complete packet.
    pub(super) fn read_conn(&mut self, k: ConnKey, uid: u64) {
        if self.conns[k].flags.blocked || self.conns[k].paused > 0 {
            return;
        }
        self.release_partial(k);
        let mut buf = std::mem::take(&mut self.scratch.read_buf);
        buf.clear();
        {
            let c = &mut self.conns[k];
            if !c.rbuf.is_empty() {
                if c.rbuf.capacity() > READ_CHUNK {
                    // A large packet in progress: keep reading into its own buffer.
                    std::mem::swap(&mut buf, &mut c.rbuf);
                } else {
                    buf.extend_from_slice(&c.rbuf);
                    c.rbuf = BytesMut::new();
                }
            }
        }
        // Bytes kept from before (the rest of a handover, or what waited while blocked) first.
        let mut go_on = buf.is_empty() || self.process(k, uid, &mut buf);
        let mut close = None;
        let mut turn = 0;
        while go_on {
            // A peer's ring is full: read no more until it drains [DESIGN: full rings].
            if turn == READS_PER_TURN {
                self.turn.more_to_read.push((k, uid));
                break;
            }
            // A peer's ring is full, or its credit window used up: read no more until it drains
            // [DESIGN: full rings].
            if self.mailbox.backlogged() || self.mailbox.out_of_credit() {
                self.starve(k, uid);
                break;
            }
            turn += 1;
            // A client that does not read what we owe it is not read from either until it
            // catches up: its output cannot grow without end.
            let c = &mut self.conns[k];
            if c.wbuf.len() > self.shared.config.max_output_bytes {
                c.flags.read_paused = true;
                break;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_CHUNK);
            }
            let room = buf.capacity() - buf.len();
            match c.transport.read_into(&mut buf, &mut c.arrived) {
                Ok(0) => {
                    close = Some(CloseKind::Abnormal);
                    break;
                }
                Ok(n) => {
                    // A short read from a TCP socket took everything it had: anything that
                    // arrives later raises a new edge, so asking again would only hear
                    // WouldBlock (one syscall per message at a steady rate). Not when the
                    // client's end of input may be waiting behind the data: that raises no
                    // edge of its own if it came with the data.
                    let drained = n < room && !c.flags.read_closed && c.transport.is_tcp();
                    self.counters.bytes_received += n as u64;
                    c.last_rx = self.clock.ms32();
                    go_on = self.process(k, uid, &mut buf) && !drained;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("worker {}: read error on {}: {e}", self.id, k.0);
                    close = Some(CloseKind::Abnormal);
                    break;
                }
            }
        }
        if self.conns.alive(k, uid) {
            if let Some(kind) = close {
                self.close(k, kind);
            } else if !buf.is_empty() {
                // Keep the partial packet with its connection; a big one keeps the whole buffer.
                let c = &mut self.conns[k];
                if buf.len() > super::limits::PARTIAL_FREE {
                    c.rbuf = std::mem::take(&mut buf);
                } else {
                    c.rbuf = BytesMut::from(&buf[..]);
                }
                self.hold_partial(k, uid);
            }
        }
        // Handled packets advanced the buffer's start; an empty buffer takes its whole
        // allocation back in place rather than a new one per read.
        buf.clear();
        buf.reserve(READ_CHUNK);
        self.scratch.read_buf = buf;
        // A TLS handshake or WebSocket answer the socket did not take yet.
        if self.conns.alive(k, uid) && self.conns[k].transport.pending_output() {
            self.mark_dirty(k);
        }
    }

    /// Handles every complete packet in `buf`. Returns false when the connection is closed or
    /// blocked (its remaining bytes stay in `buf`).
    pub(super) fn process(&mut self, k: ConnKey, uid: u64, buf: &mut BytesMut) -> bool {
        let mut at = 0;
        let go_on = self.process_from(k, uid, buf, &mut at);
        self.consume(buf, at);
        go_on
    }

    /// Ends a pass over `buf`: its first `at` bytes are handled. Kept by the arrival-order list
    /// if it listed messages from them (sharing the buffer, not copied), else dropped.
    fn consume(&mut self, buf: &mut BytesMut, at: usize) {
        if self.recent.pass_listed() {
            self.recent.end_pass(Some(buf.split_to(at).freeze()));
        } else {
            buf.advance(at);
            self.recent.end_pass(None);
        }
    }

    /// `process` from `at`: handled PUBLISHes stay in `buf` (`at` moves past them) until the
    /// pass ends, at the next other packet or at the end.
    fn process_from(&mut self, k: ConnKey, uid: u64, buf: &mut BytesMut, at: &mut usize) -> bool {
        let max = self.shared.config.max_packet_size as usize;
        loop {
            let version = self.conns[k].version;
            let (first, hl, size) = match next_frame(&buf[*at..], version, max) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.consume(buf, std::mem::take(at));
                    // Make room for the whole packet once its size is known (bounded by `max`),
                    // if `max_partial_bytes` has room for it.
                    if let Ok(Some((_, hl, rem))) = parse_fixed_header(buf) {
                        if hl + rem > buf.capacity() {
                            if !self.partial_room(hl + rem) {
                                buf.clear();
                                self.over_partial_budget(k);
                                return false;
                            }
                            buf.reserve(hl + rem - buf.len());
                        }
                    }
                    return true;
                }
                Err(e) => {
                    self.protocol_error(k, &e);
                    return false;
                }
            };
            if first >> 4 == packet_type::PUBLISH && version.is_some() {
                // A peer's credit window is used up: the PUBLISH waits, in the buffer, for credit.
                if self.mailbox.out_of_credit() {
                    self.starve(k, uid);
                    return false;
                }
                // The messages routed from here on are listed where they lie in `buf`, which
                // does not change until the pass ends.
                self.recent.begin_pass(&buf[..], buf.capacity());
                let v = version.unwrap_or(ProtocolVersion::V311);
                match PublishRef::parse(&buf[*at + hl..*at + size], first & 0x0f, v) {
                    Ok(p) => self.on_publish(k, p),
                    Err(e) => {
                        self.protocol_error(k, &e);
                        return false;
                    }
                }
                *at += size;
            } else {
                self.consume(buf, std::mem::take(at));
                // A CONNECT waits for the end of the turn (and may move to another worker): decode
                // it from its own copy, so it does not keep the 64 KiB read buffer alive meanwhile.
                let mut own;
                let src = if first >> 4 == packet_type::CONNECT {
                    own = BytesMut::from(&buf[..size]);
                    buf.advance(size);
                    &mut own
                } else {
                    &mut *buf
                };
                let packet = match decode(src, version, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => return true,
                    Err(e) => {
                        self.protocol_error(k, &e);
                        return false;
                    }
                };
                match packet {
                    Packet::Connect(connect) => {
                        if let Some(handover) = self.on_connect(k, connect) {
                            self.hand_over(k, handover, buf.split());
                            return false;
                        }
                    }
                    Packet::Auth(auth) => {
                        if let Some(handover) = self.on_auth(k, *auth) {
                            self.hand_over(k, handover, buf.split());
                            return false;
                        }
                    }
                    packet => match self.conns[k].bridge {
                        Some(b) => self.on_bridge_packet(k, b, packet),
                        None => self.on_packet(k, packet),
                    },
                }
            }
            let c = &self.conns[k];
            if !self.conns.alive(k, uid) || c.flags.blocked || c.paused > 0 {
                return false;
            }
        }
    }

    /// Logs a violation, tells a 5.0 client why, and closes the connection (publishing its will).
    pub(super) fn protocol_error(&mut self, k: ConnKey, e: &DecodeError) {
        let c = &mut self.conns[k];
        if c.version.is_none() && e.reason_code() == crate::codec::ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
            // [MQTT-3.1.2-2]: answer an unsupported level with CONNACK 0x01 and close. The level is
            // unknown, so the answer takes the 3.1.1 form, as other brokers do.
            let code = crate::codec::ConnectReturnCode::UNACCEPTABLE_PROTOCOL_VERSION;
            Packet::ConnAck(Box::new(crate::codec::ConnAck { code, ..Default::default() }))
                .encode(ProtocolVersion::V311, &mut c.wbuf);
        }
        self.disconnect_with(k, e.reason_code(), &e.to_string());
    }

    pub(super) fn mark_dirty(&mut self, k: ConnKey) {
        let c = &mut self.conns[k];
        if !c.flags.dirty {
            c.flags.dirty = true;
            self.turn.dirty.push(k);
        }
    }

    /// Queues an encoded control packet on a connection.
    pub(super) fn send(&mut self, k: ConnKey, packet: &Packet) {
        self.conns[k].send(packet);
        self.mark_dirty(k);
    }

    pub(super) fn flush_dirty(&mut self) {
        // A flush can make more output (a session pumps what waited for room): loop until quiet.
        while !self.turn.dirty.is_empty() {
            for k in std::mem::take(&mut self.turn.dirty) {
                if let Some(c) = self.conns.get_mut(k) {
                    c.flags.dirty = false;
                    if !c.flags.closed {
                        self.flush(k);
                    }
                }
            }
        }
    }

    /// Writes a connection's output buffer until done or the socket would block; then lets its
    /// session send what waited for room.
    pub(super) fn flush(&mut self, k: ConnKey) {
        let max_output = self.shared.config.max_output_bytes;
        let c = &mut self.conns[k];
        c.flags.write_blocked = false;
        let (written, mut failed) = c.write_out();
        self.counters.bytes_sent += written as u64;
        if !failed && c.transport.flush_pending().is_err() {
            failed = true;
        }
        if failed {
            self.close(k, CloseKind::Abnormal);
            return;
        }
        if c.flags.read_paused && c.wbuf.len() <= max_output / 2 {
            c.flags.read_paused = false;
            self.turn.more_to_read.push((k, c.uid));
        }
        let pending = !c.wbuf.is_empty() || c.transport.pending_output();
        if pending != c.flags.writable {
            let interest = if pending { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if self.registry.reregister(c.transport.source(), Token(k.0), interest).is_ok() {
                c.flags.writable = pending;
            }
        }
        if pending {
            return;
        }
        if c.flags.close_after_flush {
            self.close(k, CloseKind::Normal);
            return;
        }
        if !c.flags.trim_listed {
            // An idle connection holds no output buffer, not even the few bytes of its last CONNACK
            // or PINGRESP: the first time a buffer empties after a tick, a small one is freed at
            // once, and any buffer is listed for the next tick, which frees it if it is empty
            // then. A connection that empties its buffer again before that tick (a busy one, that
            // writes a little every turn) keeps it: freeing it per turn cost an allocation and a
            // chain of regrowths per turn (with more than one worker, often on another thread's
            // glibc arena, under its lock).
            if c.wbuf.capacity() <= 256 {
                c.wbuf = BytesMut::new();
            }
            c.flags.trim_listed = true;
            self.turn.trim.push((k, c.uid));
        }
        if let Some(sk) = c.session {
            self.pump(sk);
        }
    }

    /// Whether a QoS 0 delivery fits in a connection's output. A full buffer is first written to
    /// the socket (once until the next flush if the socket takes nothing more), so a burst bigger
    /// than `max_output_bytes` within one turn reaches a client that keeps reading; what still
    /// does not fit is dropped and counted. A failed write is left for the flush, which closes.
    #[inline]
    pub(super) fn room_for_qos0(&mut self, k: ConnKey) -> bool {
        let max = self.shared.config.max_output_bytes;
        let c = &mut self.conns[k];
        if c.wbuf.len() < max {
            return true;
        }
        if !c.flags.write_blocked {
            let (written, failed) = c.write_out();
            self.counters.bytes_sent += written as u64;
            c.flags.write_blocked = !c.wbuf.is_empty();
            if failed {
                self.mark_dirty(k);
            }
        }
        let room = self.conns[k].wbuf.len() < max;
        if !room {
            self.counters.dropped(crate::metrics::Drop::OutputBound);
        }
        room
    }

    /// Frees the slots of connections closed this turn.
    pub(super) fn reap(&mut self) {
        for k in std::mem::take(&mut self.turn.closed) {
            let Some(c) = self.conns.remove(k) else { continue };
            let mut transport = c.transport;
            if c.flags.linger && self.lingering.has_room() {
                if let Some((n, uid)) = self.lingering.start(&self.registry, transport, c.wbuf) {
                    self.timers.arm(self.clock.ms + super::linger::LINGER_MS, Timer::Linger(n, uid));
                }
                continue;
            }
            let _ = self.registry.deregister(transport.source());
        }
    }
}
