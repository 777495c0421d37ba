//! Budgets in bytes that a client cannot get round by spreading itself thin: partly received
//! packets (per connection and broker-wide, and a deadline for a connection stalled in the middle
//! of one), subscription filters (per session and broker-wide) and the broker's heap
//! (`memory_limit`). Each refusal is logged and counted under `$SYS/broker/limits/...`. The
//! retained store's and session queues' byte bounds sit where those are kept (`deliver`,
//! `session::flow`).

use std::sync::atomic::Ordering;

use super::conn::ConnKey;
use super::timers::Timer;
use super::Worker;
use crate::codec::ReasonCode;
use crate::session::SessionKey;

/// Bytes a connection may keep between reads without counting against `max_partial_bytes`: the
/// tail of an ordinary read. Documented as the per-connection constant in README's Limits table.
pub const PARTIAL_FREE: usize = 4096;

/// What each refusal is counted as, in `$SYS/broker/limits/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Connections closed: their packet in progress would pass `max_partial_bytes`.
    PartialBytes,
    /// Connections closed: silent in the middle of a packet for `partial_packet_timeout`.
    PartialTimeout,
    /// Retained messages not stored: `max_retained_messages`.
    RetainedMessages,
    /// Retained messages not stored: `max_retained_bytes`.
    RetainedBytes,
    /// Filters refused: `max_subscription_bytes_per_client`.
    ClientSubscriptionBytes,
    /// Filters refused: `max_subscription_bytes`.
    SubscriptionBytes,
    /// Messages dropped from a session queue: `max_queued_bytes`.
    QueuedBytes,
    /// CONNECTs refused: `memory_limit`.
    MemoryConnections,
    /// QoS 0 messages shed: `memory_limit`.
    MemoryQos0,
    /// Retained messages not stored: `memory_limit`.
    MemoryRetained,
    /// QoS 1/2 messages not queued for an offline session: `memory_limit`.
    MemoryQueued,
    /// Persistent sessions removed: `persistent_client_expiration`.
    SessionsExpired,
}

pub const LIMITS: usize = Limit::ALL.len();

impl Limit {
    pub const ALL: [Limit; 12] = [
        Limit::PartialBytes,
        Limit::PartialTimeout,
        Limit::RetainedMessages,
        Limit::RetainedBytes,
        Limit::ClientSubscriptionBytes,
        Limit::SubscriptionBytes,
        Limit::QueuedBytes,
        Limit::MemoryConnections,
        Limit::MemoryQos0,
        Limit::MemoryRetained,
        Limit::MemoryQueued,
        Limit::SessionsExpired,
    ];

    /// Its topic under `$SYS/broker/limits/`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::PartialBytes => "partial_bytes/closed",
            Limit::PartialTimeout => "partial_packet_timeout/closed",
            Limit::RetainedMessages => "retained_messages/refused",
            Limit::RetainedBytes => "retained_bytes/refused",
            Limit::ClientSubscriptionBytes => "subscription_bytes_per_client/refused",
            Limit::SubscriptionBytes => "subscription_bytes/refused",
            Limit::QueuedBytes => "queued_bytes/dropped",
            Limit::MemoryConnections => "memory/connections_refused",
            Limit::MemoryQos0 => "memory/qos0_shed",
            Limit::MemoryRetained => "memory/retained_refused",
            Limit::MemoryQueued => "memory/offline_queue_dropped",
            Limit::SessionsExpired => "persistent_client_expiration/expired",
        }
    }
}

/// The worker's view of the broker-wide heap, taken once per loop turn.
#[derive(Default)]
pub struct Budget {
    pub over_memory: bool,
}

impl Worker {
    /// Counts a refusal; returns the count so far on this worker.
    pub(super) fn count(&mut self, limit: Limit) -> u64 {
        let n = &mut self.counters.limits[limit as usize];
        *n += 1;
        *n
    }

    /// Counts a refusal that can come in floods (one per message or filter) and logs it: the
    /// first, then each time the count doubles.
    pub(super) fn over_budget(&mut self, limit: Limit, what: impl FnOnce() -> String) {
        let n = self.count(limit);
        if n.is_power_of_two() {
            log::warn!("worker {}: {} ({n} so far)", self.id, what());
        }
    }

    /// Once per turn: is the heap past `memory_limit`? Logged when it crosses either way.
    pub(super) fn check_memory(&mut self) {
        let limit = self.shared.config.memory_limit;
        if limit == 0 {
            return;
        }
        let over = crate::alloc::allocated() > limit;
        if over != self.budget.over_memory {
            self.budget.over_memory = over;
            if self.id == 0 {
                let mib = crate::alloc::allocated() >> 20;
                if over {
                    log::warn!("memory_limit reached ({mib} MiB in use): refusing connections, shedding QoS 0");
                } else {
                    log::info!("below memory_limit again ({mib} MiB in use)");
                }
            }
        }
    }

    /// Whether session `sk` may add a filter of `len` bytes under the subscription budgets (a
    /// refusal is counted and logged).
    pub(super) fn subscription_fits(&mut self, sk: SessionKey, len: usize) -> bool {
        let config = &self.shared.config;
        let s = &self.sessions[sk];
        let (limit, key) = if s.subscription_bytes + len > config.max_subscription_bytes_per_client {
            (Limit::ClientSubscriptionBytes, "max_subscription_bytes_per_client")
        } else if self.shared.subscription_bytes.load(Ordering::Relaxed) + len > config.max_subscription_bytes {
            (Limit::SubscriptionBytes, "max_subscription_bytes")
        } else {
            return true;
        };
        let client = s.client_id.clone();
        self.over_budget(limit, || format!("{key} reached: refusing a filter of {len} bytes from client {client}"));
        false
    }

    /// Before reading a connection: what it kept from last time is taken back off the budget.
    pub(super) fn release_partial(&mut self, k: ConnKey) {
        let c = &mut self.conns[k];
        if c.partial > 0 {
            self.shared.partial_bytes.fetch_sub(c.partial as usize, Ordering::Relaxed);
            c.partial = 0;
        }
    }

    /// After reading a connection that keeps part of a packet: the buffer it keeps counts against
    /// `max_partial_bytes` (past a small allowance), and a deadline watches for it going silent.
    /// Returns false if it was closed for passing the budget.
    pub(super) fn hold_partial(&mut self, k: ConnKey, uid: u64) -> bool {
        let c = &mut self.conns[k];
        let held = c.rbuf.capacity();
        if held > PARTIAL_FREE {
            let total = self.shared.partial_bytes.fetch_add(held, Ordering::Relaxed) + held;
            c.partial = held as u32;
            if total > self.shared.config.max_partial_bytes {
                self.over_partial_budget(k);
                return false;
            }
        }
        let c = &mut self.conns[k];
        if !c.flags.partial_timer {
            c.flags.partial_timer = true;
            let at = self.clock.ms + self.shared.config.partial_packet_timeout * 1000 + 1;
            self.timers.arm(at, Timer::Partial(k.0, uid));
        }
        true
    }

    /// Whether a packet of `size` bytes may be buffered whole under `max_partial_bytes` (checked
    /// before its buffer is allocated).
    pub(super) fn partial_room(&self, size: usize) -> bool {
        self.shared.partial_bytes.load(Ordering::Relaxed) + size <= self.shared.config.max_partial_bytes
    }

    /// Closes a connection whose packet in progress does not fit in `max_partial_bytes`.
    pub(super) fn over_partial_budget(&mut self, k: ConnKey) {
        let _ = self.count(Limit::PartialBytes);
        let why = "max_partial_bytes reached: too many bytes held by partly received packets";
        self.disconnect_with(k, ReasonCode::QUOTA_EXCEEDED, why);
    }

    /// A partial-packet deadline: a connection still in the middle of a packet and silent for
    /// `partial_packet_timeout` is closed. One that waits on us (paused by flow control, blocked
    /// on peers, or not reading its own output) is not the one stalling.
    pub(super) fn partial_timer(&mut self, k: ConnKey, uid: u64) {
        if !self.conns.alive(k, uid) {
            return;
        }
        let limit = (self.shared.config.partial_packet_timeout * 1000) as u32;
        let now = self.clock.ms32();
        let c = &mut self.conns[k];
        if c.rbuf.is_empty() {
            c.flags.partial_timer = false;
            return;
        }
        let waiting_on_us = c.paused > 0 || c.flags.blocked || c.flags.read_paused || c.flags.starved;
        let silent = now.wrapping_sub(c.last_rx);
        if waiting_on_us || silent <= limit {
            let left = if waiting_on_us { limit } else { limit - silent };
            self.timers.arm(self.clock.ms + left as u64 + 1, Timer::Partial(k.0, uid));
            return;
        }
        c.flags.partial_timer = false;
        let _ = self.count(Limit::PartialTimeout);
        let why = "partial_packet_timeout: silent in the middle of a packet";
        self.disconnect_with(k, ReasonCode::KEEP_ALIVE_TIMEOUT, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_has_its_own_counter_slot_and_name() {
        for (i, l) in Limit::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?} indexes its own counter");
        }
        let names: std::collections::HashSet<_> = Limit::ALL.iter().map(|l| l.name()).collect();
        assert_eq!(names.len(), LIMITS);
    }
}
