//! The worker's tick: counters published to the other threads, `$SYS/broker/...` with mosquitto's
//! names (worker 0 only), plus `$SYS/broker/internal/...`: the costs of routing (ring pushes, trie
//! walks, wake-ups) that `perf/scaling.sh` reads per delivered message.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{Worker, TICK};
use crate::broker::WorkerStats;
use crate::codec::{MqttStr, QoS};
use crate::session::Message;

pub struct SysState {
    /// Worker clock milliseconds of the next tick and the next `$SYS` update.
    pub next_tick_ms: u64,
    next_sys_ms: u64,
    load: crate::sys::Load,
}

impl SysState {
    pub fn new() -> SysState {
        SysState { next_tick_ms: TICK.as_millis() as u64, next_sys_ms: 1000, load: crate::sys::Load::default() }
    }
}

impl Worker {
    pub(super) fn tick(&mut self) {
        self.sys.next_tick_ms = self.clock.ms + TICK.as_millis() as u64;
        self.trim_buffers();
        self.scratch.made.trim();
        self.trim_recent();
        self.bridge_tick();
        self.publish_stats();
        let interval = self.shared.config.sys_interval;
        if self.id == 0 && interval > 0 && self.clock.ms >= self.sys.next_sys_ms {
            self.sys.next_sys_ms = self.clock.ms + interval * 1000;
            self.publish_sys();
        }
    }

    pub(super) fn publish_stats(&mut self) {
        // The tick fires before the turn ends: this turn's deliveries, already in the sent
        // counters below, go into the histogram with them.
        if !self.latency.turn_is_empty() {
            self.latency.end_turn(std::time::Instant::now());
        }
        self.latency.publish(&self.shared.latency[self.id]);
        let s = &self.shared.stats[self.id];
        let c = &self.counters;
        s.messages_received.store(c.received_qos.iter().sum(), Ordering::Relaxed);
        s.messages_sent.store(c.sent_qos.iter().sum(), Ordering::Relaxed);
        s.bytes_received.store(c.bytes_received, Ordering::Relaxed);
        s.bytes_sent.store(c.bytes_sent, Ordering::Relaxed);
        s.publish_dropped.store(c.publish_dropped + self.mailbox.dropped, Ordering::Relaxed);
        s.clients_connected.store(self.sessions.connected as u64, Ordering::Relaxed);
        s.sessions.store(self.sessions.len() as u64, Ordering::Relaxed);
        s.retained.store(self.router.retained.len() as u64, Ordering::Relaxed);
        s.subscriptions.store(self.router.subscription_count() as u64, Ordering::Relaxed);
        s.ring_pushes.store(self.mailbox.pushes, Ordering::Relaxed);
        s.crossed.store(self.mailbox.crossed, Ordering::Relaxed);
        s.trie_walks.store(self.router.walks, Ordering::Relaxed);
        s.caught_up.store(self.recent.caught_up, Ordering::Relaxed);
        s.wakeups.store(self.mailbox.wakeups, Ordering::Relaxed);
        s.helped_turns.store(self.mailbox.helped, Ordering::Relaxed);
        s.interest_filters.store(self.router.announced_count() as u64, Ordering::Relaxed);
        for (to, &n) in s.limits.iter().zip(&c.limits) {
            to.store(n, Ordering::Relaxed);
        }
        for (to, &n) in s.drops.iter().zip(&c.drops) {
            to.store(n, Ordering::Relaxed);
        }
        for (to, from) in [
            (&s.received_qos, &c.received_qos),
            (&s.received_bytes, &c.received_bytes),
            (&s.sent_qos, &c.sent_qos),
            (&s.sent_bytes, &c.sent_bytes),
        ] {
            for (to, &n) in to.iter().zip(from) {
                to.store(n, Ordering::Relaxed);
            }
        }
        s.mail_waiting.store(self.mailbox.waiting() as u64, Ordering::Relaxed);
    }

    /// Publishes the `$SYS/broker/...` topics (retained), with mosquitto's names.
    fn publish_sys(&mut self) {
        let sum = |f: fn(&WorkerStats) -> &std::sync::atomic::AtomicU64| -> u64 {
            self.shared.stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
        };
        let received = sum(|s| &s.messages_received);
        let sent = sum(|s| &s.messages_sent);
        let connected = sum(|s| &s.clients_connected);
        let sessions = sum(|s| &s.sessions);
        let values: Vec<(&str, String)> = vec![
            ("$SYS/broker/version", format!("tern version {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{} seconds", self.shared.started.elapsed().as_secs())),
            ("$SYS/broker/clients/connected", connected.to_string()),
            ("$SYS/broker/clients/active", connected.to_string()),
            ("$SYS/broker/clients/disconnected", sessions.saturating_sub(connected).to_string()),
            ("$SYS/broker/clients/total", sessions.to_string()),
            ("$SYS/broker/clients/maximum", self.shared.clients_maximum.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/messages/received", received.to_string()),
            ("$SYS/broker/messages/sent", sent.to_string()),
            ("$SYS/broker/publish/messages/received", received.to_string()),
            ("$SYS/broker/publish/messages/sent", sent.to_string()),
            ("$SYS/broker/publish/messages/dropped", sum(|s| &s.publish_dropped).to_string()),
            ("$SYS/broker/bytes/received", sum(|s| &s.bytes_received).to_string()),
            ("$SYS/broker/bytes/sent", sum(|s| &s.bytes_sent).to_string()),
            ("$SYS/broker/subscriptions/count", sum(|s| &s.subscriptions).to_string()),
            ("$SYS/broker/retained messages/count", self.router.retained.len().to_string()),
            ("$SYS/broker/heap/current", crate::sys::rss_bytes().to_string()),
            ("$SYS/broker/internal/ring_pushes", sum(|s| &s.ring_pushes).to_string()),
            ("$SYS/broker/internal/crossed", sum(|s| &s.crossed).to_string()),
            ("$SYS/broker/internal/trie_walks", sum(|s| &s.trie_walks).to_string()),
            ("$SYS/broker/internal/caught_up", sum(|s| &s.caught_up).to_string()),
            ("$SYS/broker/internal/wakeups", sum(|s| &s.wakeups).to_string()),
            ("$SYS/broker/internal/helped_turns", sum(|s| &s.helped_turns).to_string()),
            ("$SYS/broker/internal/interest_filters", sum(|s| &s.interest_filters).to_string()),
            ("$SYS/broker/internal/hosted_workers", self.shared.hosting.hosted_count().to_string()),
            ("$SYS/broker/internal/handed_over", self.shared.hosting.handed_over.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/internal/given_back", self.shared.hosting.given_back.load(Ordering::Relaxed).to_string()),
        ];
        let loads = self.sys.load.update(received, sent, connected);
        let mut values: Vec<(String, String)> = values.into_iter().map(|(t, v)| (t.to_string(), v)).collect();
        values.push(("$SYS/broker/heap/allocated".into(), crate::alloc::allocated().to_string()));
        values.push((
            "$SYS/broker/limits/partial_bytes/held".into(),
            self.shared.partial_bytes.load(Ordering::Relaxed).to_string(),
        ));
        values.push((
            "$SYS/broker/limits/subscription_bytes/held".into(),
            self.shared.subscription_bytes.load(Ordering::Relaxed).to_string(),
        ));
        values.push(("$SYS/broker/limits/retained_bytes/held".into(), self.router.retained.bytes().to_string()));
        for b in &self.shared.bridges {
            let base = format!("$SYS/broker/bridges/{}", b.config.name);
            let connected = b.connected.load(Ordering::Relaxed) as u8;
            values.push((format!("{base}/connected"), connected.to_string()));
            values.push((format!("{base}/queued"), b.queued.load(Ordering::Relaxed).to_string()));
            values.push((format!("{base}/forwarded/in"), b.forwarded_in.load(Ordering::Relaxed).to_string()));
            values.push((format!("{base}/forwarded/out"), b.forwarded_out.load(Ordering::Relaxed).to_string()));
        }
        // Delivery latency over the interval since the last update, microseconds.
        let h = crate::metrics::latency::take_window(&self.shared.latency);
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            values.push((format!("$SYS/broker/latency/{name}"), h.value_at_quantile(q).to_string()));
        }
        values.push(("$SYS/broker/latency/max".into(), h.max().to_string()));
        values.push(("$SYS/broker/latency/count".into(), h.len().to_string()));
        for limit in super::limits::Limit::ALL {
            let n: u64 = self.shared.stats.iter().map(|s| s.limits[limit as usize].load(Ordering::Relaxed)).sum();
            values.push((format!("$SYS/broker/limits/{}", limit.name()), n.to_string()));
        }
        for (topic, value) in values.into_iter().chain(loads) {
            let msg = Message::plain(MqttStr::from(topic), Bytes::from(value), QoS::AtMostOnce, true);
            self.route(Arc::new(msg));
        }
    }
}
