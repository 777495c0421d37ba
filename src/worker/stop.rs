//! Shutting down a worker, in two steps, so that the will of a client on one worker reaches a
//! subscriber on another before that one is disconnected. First every worker stops accepting and
//! publishes the wills of its connected clients (they did not DISCONNECT) [MQTT-3.1.2-8], and once
//! those are in the peers' rings counts itself in `Shared::wills_sent`. Then, once every worker
//! has counted itself, or `WILLS_WAIT_MS` after the first step (a worker that died never does),
//! each takes the mail sent before that and only then tells its 5.0 clients the server is
//! shutting down and closes every connection. Until then it serves its clients as before.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::conn::CloseKind;
use super::Worker;
use crate::codec::{Disconnect, Packet, ProtocolVersion, ReasonCode};

/// How long a worker shutting down waits for its peers' wills, at most.
const WILLS_WAIT_MS: u64 = 1_000;
/// How often a worker waiting for them looks.
pub(super) const STOPPING_POLL: Duration = Duration::from_millis(1);

/// A worker between the two steps of shutting down (`Worker::stop_step`).
pub(super) struct Stopping {
    /// When it stops waiting for its peers (its clock's milliseconds).
    until: u64,
    /// It has counted itself in `Shared::wills_sent`.
    counted: bool,
}

impl Worker {
    /// A turn of a worker shutting down (see the module doc): the first publishes the wills, the
    /// last, once every peer's are in the rings, takes them and shuts down. Returns true once the
    /// worker has shut down.
    pub(super) fn stop_step(&mut self) -> bool {
        let Some(s) = &self.stopping else {
            self.stop_accepting();
            self.publish_wills();
            self.stopping = Some(Stopping { until: self.clock.ms + WILLS_WAIT_MS, counted: false });
            return false;
        };
        let all = self.shared.wills_sent.load(Ordering::Acquire) >= self.shared.workers;
        if !all && self.clock.ms < s.until {
            return false;
        }
        // Every peer's wills are in the rings ahead of this (acquired with the count).
        self.take_mail();
        self.shutdown();
        true
    }

    /// The end of a turn while stopping: once what this worker routed (its clients' wills among
    /// it) is all in the peers' rings, none held for a full one, it counts itself.
    pub(super) fn wills_in_rings(&mut self) {
        let Some(s) = &mut self.stopping else { return };
        if !s.counted && self.mailbox.nothing_held() {
            s.counted = true;
            self.shared.wills_sent.fetch_add(1, Ordering::Release);
        }
    }

    fn stop_accepting(&mut self) {
        for mut l in std::mem::take(&mut self.listeners) {
            let _ = self.registry.deregister(&mut l);
        }
    }

    /// The wills of the connected clients, published now.
    fn publish_wills(&mut self) {
        for k in self.conns.keys() {
            let Some(sk) = self.conns.get(k).and_then(|c| c.session) else { continue };
            if let Some(w) = self.sessions[sk].will.take() {
                self.publish_will(sk, &w);
            }
        }
    }

    /// Stops accepting, publishes the wills of clients connected since the first step, tells 5.0
    /// clients the server is shutting down, and writes what is pending.
    fn shutdown(&mut self) {
        self.stop_accepting();
        // Wills first, while every subscriber here is still connected to receive them.
        self.publish_wills();
        let keys = self.conns.keys();
        for &k in &keys {
            let Some(c) = self.conns.get_mut(k) else { continue };
            if c.version == Some(ProtocolVersion::V5) && !c.flags.closed {
                c.send(&Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::SERVER_SHUTTING_DOWN))));
                self.mark_dirty(k);
            }
        }
        self.flush_dirty();
        for &k in &keys {
            self.close(k, CloseKind::Normal);
        }
        self.end_turn();
        self.publish_stats();
        log::info!("worker {} stopped", self.id);
    }
}
