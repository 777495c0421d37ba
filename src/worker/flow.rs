//! Flow control from subscribers back to publishers: QoS 1/2 publishers are paced by delivery,
//! not by a queue that drops what was acknowledged.
//!
//! When a connected subscriber's queue reaches the high-water mark (twice
//! `max_inflight_messages`, at most a quarter of `max_queued_messages`), each publisher whose QoS 1/2 message lands there is paused: its
//! socket is not read and the acknowledgement of the message that paused it is withheld, so TCP
//! (and, for 5.0, the publisher's receive maximum) pushes back. Publishers on other workers are
//! paused and resumed through the rings. Below the low-water mark (half the high-water mark) they
//! all resume. The remaining three quarters of the queue absorb what was already in flight.
//!
//! A subscriber that acknowledges nothing for `slow_subscriber_timeout` while it holds publishers
//! is stalled: they resume, and it gets `slow_subscriber_policy` (its queue drops past
//! `max_queued_messages`, counted, or it is disconnected). That bounds head-of-line blocking: a
//! publisher whose traffic to other topics shares a connection with a hot, slow topic is held at
//! most that long by a subscriber that is not making progress, and only while it is congested
//! by one that is.

use std::time::Duration;

use super::conn::ConnKey;
use super::mailbox::Mail;
use super::timers::Timer;
use super::Worker;
use crate::codec::{Packet, ReasonCode};
use crate::session::{Publisher, SessionKey};

/// Publishers one congested session holds at most; more are not paused (and so cannot be lost
/// track of): they are counted against the queue bound like any others.
const MAX_WAITERS: usize = 4096;

impl Worker {
    /// Twice the subscriber's window: enough queued to keep its window full across a round trip,
    /// not so much that a message waits behind seconds of others (latency is queue / rate).
    pub(super) fn high_water(&self) -> usize {
        let c = &self.shared.config;
        (2 * c.max_inflight_messages as usize).min(c.max_queued_messages / 4).max(1)
    }

    /// After a QoS 1/2 message from `publisher` was offered to session `sk`: pause the publisher
    /// if the session is congested.
    pub(super) fn pace(&mut self, sk: SessionKey, publisher: Publisher) {
        let high = self.high_water();
        let s = &mut self.sessions[sk];
        if s.stalled || s.queue.len() + s.backlog_live() < high || s.waiters.len() >= MAX_WAITERS {
            return;
        }
        let Some(conn) = s.conn else { return };
        // A client publishing to itself is not paused by itself: it could not read the
        // acknowledgements that would drain its queue.
        if publisher.worker as usize == self.id && publisher.conn as usize == conn.0 || s.waiters.contains(&publisher) {
            return;
        }
        s.waiters.push(publisher);
        if !s.stall_timer {
            s.stall_timer = true;
            let uid = s.uid;
            self.timers.arm(self.clock.ms + self.shared.config.slow_subscriber_timeout * 1000, Timer::Stall(sk.0, uid));
        }
        if publisher.worker as usize == self.id {
            self.pause(ConnKey(publisher.conn as usize), publisher.conn_uid);
        } else {
            let m = Mail::Pause { conn: publisher.conn, uid: publisher.conn_uid };
            self.mailbox.send(publisher.worker as usize, m);
        }
    }

    /// After session `sk`'s queue shrank: below the low-water mark its publishers resume.
    pub(super) fn drained(&mut self, sk: SessionKey) {
        let low = self.high_water() / 2;
        if let Some(s) = self.sessions.get(sk) {
            if !s.waiters.is_empty() && s.queue.len() + s.backlog_live() <= low {
                self.release(sk);
            }
        }
    }

    /// Resumes every publisher session `sk` holds.
    pub(super) fn release(&mut self, sk: SessionKey) {
        for p in std::mem::take(&mut self.sessions[sk].waiters) {
            if p.worker as usize == self.id {
                self.resume(ConnKey(p.conn as usize), p.conn_uid);
            } else {
                self.mailbox.send(p.worker as usize, Mail::Resume { conn: p.conn, uid: p.conn_uid });
            }
        }
    }

    /// A congested session held publishers for `slow_subscriber_timeout`: has it acknowledged
    /// anything in that time?
    pub(super) fn stall_check(&mut self, sk: SessionKey, uid: u64) {
        if !self.sessions.is(sk, uid) {
            return;
        }
        let timeout = Duration::from_secs(self.shared.config.slow_subscriber_timeout);
        let now = self.clock.now;
        let s = &mut self.sessions[sk];
        s.stall_timer = false;
        if s.waiters.is_empty() {
            return;
        }
        let quiet = s.last_progress.map_or(timeout, |t| now.saturating_duration_since(t));
        if quiet < timeout {
            s.stall_timer = true;
            let ms = self.clock.ms + (timeout - quiet).as_millis() as u64 + 1;
            self.timers.arm(ms, Timer::Stall(sk.0, uid));
            return;
        }
        s.stalled = true;
        let conn = s.conn;
        log::info!("client {}: no acknowledgement for {timeout:?} while congested: slow subscriber", s.client_id);
        self.release(sk);
        if let Some(k) = conn {
            if self.shared.config.slow_subscriber_policy == "disconnect" {
                let why = "slow subscriber: no acknowledgement within slow_subscriber_timeout";
                self.disconnect_with(k, ReasonCode::QUOTA_EXCEEDED, why);
            }
        }
    }

    /// A congested subscriber holds this connection: read nothing more from it.
    pub(super) fn pause(&mut self, k: ConnKey, uid: u64) {
        if self.conns.alive(k, uid) {
            self.conns[k].paused += 1;
        }
    }

    /// One subscriber fewer holds this connection; with none left, its withheld acknowledgements
    /// go out and it is read again.
    pub(super) fn resume(&mut self, k: ConnKey, uid: u64) {
        if !self.conns.alive(k, uid) {
            return;
        }
        let c = &mut self.conns[k];
        c.paused = c.paused.saturating_sub(1);
        if c.paused > 0 {
            return;
        }
        if let Some(held) = c.held.take() {
            for p in held.iter() {
                c.send(p);
            }
            self.mark_dirty(k);
        }
        self.turn.more_to_read.push((k, uid));
    }

    /// The acknowledgement of a PUBLISH from connection `k`: sent, or withheld while it is paused.
    pub(super) fn acknowledge(&mut self, k: ConnKey, ack: Packet) {
        let c = &mut self.conns[k];
        if c.paused > 0 {
            c.held.get_or_insert_with(Default::default).push(ack);
        } else {
            self.send(k, &ack);
        }
    }
}
