//! `GET /metrics`: every worker's published counters, summed, in the Prometheus text exposition
//! format 0.0.4.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::{Shared, WorkerStats};

/// Upper bounds of the delivery latency histogram's buckets, seconds.
const LATENCY_BUCKETS: [f64; 18] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }
}

pub fn render(shared: &Shared) -> String {
    let stats = &shared.stats;
    let sum = |f: fn(&WorkerStats) -> &AtomicU64| -> u64 { stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum() };
    let mut o = Out(String::with_capacity(8192));
    o.head("tern_info", "gauge", "The broker's version.");
    let _ = writeln!(o.0, "tern_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    o.one("tern_uptime_seconds", "gauge", "Seconds since start.", shared.started.elapsed().as_secs_f64());
    o.one("tern_workers", "gauge", "Event loops.", shared.workers);
    o.one("tern_connections", "gauge", "Open client connections.", shared.connections.load(Ordering::Relaxed));
    o.one("tern_clients_connected", "gauge", "Clients with a session attached.", sum(|s| &s.clients_connected));
    o.one("tern_sessions", "gauge", "Sessions kept, connected or not.", sum(|s| &s.sessions));
    o.one("tern_subscriptions", "gauge", "Subscriptions over all sessions.", sum(|s| &s.subscriptions));
    let retained = stats.first().map_or(0, |s| s.retained.load(Ordering::Relaxed));
    o.one("tern_retained_messages", "gauge", "Retained topics kept.", retained);
    let by_qos: [(&str, &str, fn(&WorkerStats) -> &[AtomicU64; 3]); 4] = [
        ("tern_messages_received_total", "PUBLISH packets received from clients, by QoS.", |s| &s.received_qos),
        ("tern_messages_sent_total", "PUBLISH packets sent to clients, by the QoS delivered.", |s| &s.sent_qos),
        ("tern_payload_bytes_received_total", "Payload bytes of PUBLISH received, by QoS.", |s| &s.received_bytes),
        ("tern_payload_bytes_sent_total", "Payload bytes of PUBLISH sent, by QoS.", |s| &s.sent_bytes),
    ];
    for (name, help, field) in by_qos {
        o.head(name, "counter", help);
        for q in 0..3 {
            let n: u64 = stats.iter().map(|s| field(s)[q].load(Ordering::Relaxed)).sum();
            let _ = writeln!(o.0, "{name}{{qos=\"{q}\"}} {n}");
        }
    }
    o.one("tern_bytes_received_total", "counter", "Bytes read from client sockets.", sum(|s| &s.bytes_received));
    o.one("tern_bytes_sent_total", "counter", "Bytes written to client sockets.", sum(|s| &s.bytes_sent));
    o.head("tern_messages_dropped_total", "counter", "Messages not delivered, by cause.");
    for d in super::Drop::ALL {
        let n: u64 = stats.iter().map(|s| s.drops[d as usize].load(Ordering::Relaxed)).sum();
        let _ = writeln!(o.0, "tern_messages_dropped_total{{cause=\"{}\"}} {n}", d.name());
    }
    o.head("tern_limit_refusals_total", "counter", "Refusals by byte budget or memory limit.");
    for l in crate::worker::Limit::ALL {
        let n: u64 = stats.iter().map(|s| s.limits[l as usize].load(Ordering::Relaxed)).sum();
        let _ = writeln!(o.0, "tern_limit_refusals_total{{limit=\"{}\"}} {n}", l.name());
    }
    let per_worker: [(&str, &str, &str, fn(&WorkerStats) -> &AtomicU64); 9] = [
        ("tern_worker_messages_received_total", "counter", "PUBLISH packets received, per worker.", |s| {
            &s.messages_received
        }),
        ("tern_worker_messages_sent_total", "counter", "PUBLISH packets sent, per worker.", |s| &s.messages_sent),
        ("tern_worker_clients_connected", "gauge", "Clients connected, per worker.", |s| &s.clients_connected),
        ("tern_worker_mail_waiting", "gauge", "Mail in a worker's incoming rings and its overflow.", |s| {
            &s.mail_waiting
        }),
        ("tern_worker_ring_pushes_total", "counter", "Mail pushed into peers' rings, per worker.", |s| &s.ring_pushes),
        (
            "tern_worker_crossed_total",
            "counter",
            "Messages routed to another worker (one per peer), per worker.",
            |s| &s.crossed,
        ),
        ("tern_worker_wakeups_total", "counter", "Wake-ups of sleeping peers, per worker.", |s| &s.wakeups),
        (
            "tern_worker_helped_turns_total",
            "counter",
            "Turns run for a sleeping peer instead of waking it, per worker.",
            |s| &s.helped_turns,
        ),
        (
            "tern_worker_caught_up_total",
            "counter",
            "Messages delivered to a subscription that arrived before them but was read after them.",
            |s| &s.caught_up,
        ),
    ];
    for (name, kind, help, f) in per_worker {
        o.head(name, kind, help);
        for (w, s) in stats.iter().enumerate() {
            let _ = writeln!(o.0, "{name}{{worker=\"{w}\"}} {}", f(s).load(Ordering::Relaxed));
        }
    }
    o.one(
        "tern_hosted_workers",
        "gauge",
        "Workers served by worker 0's thread while the load is light.",
        shared.hosting.hosted_count() as u64,
    );
    o.one(
        "tern_handovers_total",
        "counter",
        "Workers handed to worker 0's thread.",
        shared.hosting.handed_over.load(Ordering::Relaxed),
    );
    o.one(
        "tern_givebacks_total",
        "counter",
        "Workers given back to their own threads by worker 0's.",
        shared.hosting.given_back.load(Ordering::Relaxed),
    );
    o.one("tern_resident_memory_bytes", "gauge", "Resident set size.", crate::sys::rss_bytes());
    o.one("tern_heap_allocated_bytes", "gauge", "Heap bytes allocated.", crate::alloc::allocated());
    if let Some(st) = &shared.store {
        o.one("tern_store_commits_total", "counter", "Store commits.", st.commits.load(Ordering::Relaxed));
        o.one("tern_store_changes_total", "counter", "Changes committed to the store.", st.ops.load(Ordering::Relaxed));
        o.one("tern_store_backlog", "gauge", "Changes waiting for the store.", st.backlog.load(Ordering::Relaxed));
        o.one("tern_store_failed", "gauge", "1 once a store write failed.", st.failed.load(Ordering::Relaxed) as u8);
    }
    if !shared.bridges.is_empty() {
        let each: [(&str, &str, &str); 4] = [
            ("tern_bridge_connected", "gauge", "1 while the bridge is connected to its remote."),
            ("tern_bridge_queued", "gauge", "QoS 1/2 messages queued or in flight for the remote."),
            ("tern_bridge_connects_total", "counter", "Successful connections to the remote."),
            ("tern_bridge_forwarded_total", "counter", "Messages forwarded, by direction."),
        ];
        for (name, kind, help) in each {
            o.head(name, kind, help);
            for b in &shared.bridges {
                let n = &b.config.name;
                match name {
                    "tern_bridge_connected" => {
                        let _ = writeln!(o.0, "{name}{{bridge=\"{n}\"}} {}", b.connected.load(Ordering::Relaxed) as u8);
                    }
                    "tern_bridge_queued" => {
                        let _ = writeln!(o.0, "{name}{{bridge=\"{n}\"}} {}", b.queued.load(Ordering::Relaxed));
                    }
                    "tern_bridge_connects_total" => {
                        let _ = writeln!(o.0, "{name}{{bridge=\"{n}\"}} {}", b.connects.load(Ordering::Relaxed));
                    }
                    _ => {
                        let (i, out) =
                            (b.forwarded_in.load(Ordering::Relaxed), b.forwarded_out.load(Ordering::Relaxed));
                        let _ = writeln!(o.0, "{name}{{bridge=\"{n}\",direction=\"in\"}} {i}");
                        let _ = writeln!(o.0, "{name}{{bridge=\"{n}\",direction=\"out\"}} {out}");
                    }
                }
            }
        }
    }
    let h = super::latency::total(&shared.latency);
    o.head(
        "tern_delivery_latency_seconds",
        "histogram",
        "From the loop turn that read a PUBLISH to the loop turn that wrote it to a subscriber's socket.",
    );
    for le in LATENCY_BUCKETS {
        let n = h.count_between(0, (le * 1e6) as u64);
        let _ = writeln!(o.0, "tern_delivery_latency_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(o.0, "tern_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(o.0, "tern_delivery_latency_seconds_sum {}", h.mean() * h.len() as f64 / 1e6);
    let _ = writeln!(o.0, "tern_delivery_latency_seconds_count {}", h.len());
    o.0
}
