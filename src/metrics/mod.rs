//! What the broker counts for operators: delivery latency (`latency`), messages not delivered by
//! cause, and the Prometheus text rendering of every worker's figures (`render`), served with the
//! status page by `http`. Workers count in plain fields and copy them into `Shared::stats` once
//! per tick; a scrape sums the workers' copies, so nothing on the message path takes a lock.

pub mod http;
pub mod latency;
mod prometheus;

pub use prometheus::render;

/// Why a message was not delivered to a subscriber (or not routed at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// QoS 0 to a client whose output already holds `max_output_bytes`.
    OutputBound,
    /// A session queue at `max_queued_messages`.
    QueueBound,
    /// A session queue at `max_queued_bytes`.
    QueueBytes,
    /// `memory_limit` reached (QoS 0 shed, offline queues not grown).
    Memory,
    /// The message expired before it could be sent [MQTT-3.3.2-5].
    Expired,
    /// The ACL denied the publisher's write, or a wildcard subscriber's read of this topic.
    Acl,
    /// A payload over `message_size_limit`.
    Size,
}

pub const DROPS: usize = 7;

impl Drop {
    pub const ALL: [Drop; DROPS] =
        [Drop::OutputBound, Drop::QueueBound, Drop::QueueBytes, Drop::Memory, Drop::Expired, Drop::Acl, Drop::Size];

    pub fn name(self) -> &'static str {
        match self {
            Drop::OutputBound => "output_bound",
            Drop::QueueBound => "queue_bound",
            Drop::QueueBytes => "queue_bytes",
            Drop::Memory => "memory_limit",
            Drop::Expired => "expired",
            Drop::Acl => "acl",
            Drop::Size => "message_size_limit",
        }
    }

    /// Counted in `$SYS/broker/publish/messages/dropped` too (the bounds and memory, as mosquitto).
    pub fn is_bound(self) -> bool {
        !matches!(self, Drop::Expired | Drop::Acl)
    }
}
