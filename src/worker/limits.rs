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
    /// Persistent sessions removed: `persistent_client_expiration`.
    SessionsExpired,
}

pub const LIMITS: usize = 10;

pub const LIMIT_NAMES: [&str; LIMITS] = [
    "partial_bytes/closed",
    "partial_packet_timeout/closed",
    "retained_bytes/refused",
    "subscription_bytes_per_client/refused",
    "subscription_bytes/refused",
    "queued_bytes/dropped",
    "memory/connections_refused",
    "memory/qos0_shed",
    "memory/retained_refused",
    "persistent_client_expiration/expired",
];

/// The worker's view of the broker-wide heap, taken once per loop turn.
#[derive(Default)]
pub struct Budget {
    pub over_memory: bool,
}

impl Worker {
    pub(super) fn count(&mut self, limit: Limit) {
        self.counters.limits[limit as usize] += 1;
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

    /// Whether session `sk` may add a filter of `len` bytes: `None`, or the budget it would pass
    /// (logged).
    pub(super) fn subscription_budget(&mut self, sk: SessionKey, len: usize) -> Option<Limit> {
        let config = &self.shared.config;
        let s = &self.sessions[sk];
        let (limit, key) = if s.subscription_bytes + len > config.max_subscription_bytes_per_client {
            (Limit::ClientSubscriptionBytes, "max_subscription_bytes_per_client")
        } else if self.shared.subscription_bytes.load(Ordering::Relaxed) + len > config.max_subscription_bytes {
            (Limit::SubscriptionBytes, "max_subscription_bytes")
        } else {
            return None;
        };
        log::info!("client {}: {key} reached, refusing a filter of {len} bytes", s.client_id);
        Some(limit)
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
        self.count(Limit::PartialBytes);
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
        self.count(Limit::PartialTimeout);
        let why = "partial_packet_timeout: silent in the middle of a packet";
        self.disconnect_with(k, ReasonCode::KEEP_ALIVE_TIMEOUT, why);
    }
}
