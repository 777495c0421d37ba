//! Byte budgets against the hostile patterns they exist for. Each runs the real `tern` binary
//! (its RSS is measured from outside, with the counting allocator `memory_limit` relies on) with
//! one worker, so the healthy QoS 1 pair shares the worker with the attack; each checks that
//! the broker's RSS stays under the budget plus `SLACK_MB` (the constant README's Limits table
//! states), that the pair's p99 stays under 50 ms, and that the budget's `$SYS` counter moves.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use tern::codec::*;

/// What the broker may hold on top of a budget: the runtime, its 64 KiB read buffer, socket and
/// output buffers of the clients in the test, and allocator slack.
const SLACK_MB: u64 = 48;
const MIB: usize = 1 << 20;

struct Tern {
    _serial: std::sync::MutexGuard<'static, ()>,
    child: std::process::Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
    peak_kb: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
    sampler: Option<JoinHandle<()>>,
}

/// One attack at a time: the healthy pair's latency is the broker's, not that of five other
/// brokers under attack on the same two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Tern {
    fn start(config: &str) -> Tern {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let config = format!("workers = 1\nsys_interval = 1\npin_workers = false\n{config}");
        let (child, port, dir) = spawn_tern(&[], &config);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let (pid, peak, on) = (child.id(), peak_kb.clone(), sampling.clone());
        // Sampled every 5 ms from the start: the peak, not a lucky moment after the fact.
        let sampler = std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kb) = s.lines().find(|l| l.starts_with("VmRSS:")) {
                        let kb: u64 = kb.split_whitespace().nth(1).unwrap().parse().unwrap();
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Tern { _serial: serial, child, addr, dir, peak_kb, sampling, sampler: Some(sampler) }
    }

    fn rss_kb(&self) -> u64 {
        status_kb(self.child.id(), "VmRSS:")
    }

    /// Stops sampling; asserts the peak RSS stayed within `budget_mb` of `base_kb` plus slack.
    fn assert_peak_within(&mut self, base_kb: u64, budget_mb: u64, what: &str) {
        self.sampling.store(false, Ordering::Relaxed);
        self.sampler.take().unwrap().join().unwrap();
        let peak = self.peak_kb.load(Ordering::Relaxed);
        let bound = base_kb + (budget_mb + SLACK_MB) * 1024;
        println!("{what}: RSS {base_kb} kB at rest, peak {peak} kB, bound {bound} kB");
        assert!(peak <= bound, "{what}: peak RSS {peak} kB over {bound} kB (base {base_kb} + {budget_mb} MiB + slack)");
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.sampling.store(false, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A QoS 1 publisher and subscriber exchanging a message every 5 ms while an attack runs;
/// `finish` returns the p99 of publish-to-delivery.
struct HealthyPair {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Duration>>,
}

impl HealthyPair {
    fn start(addr: SocketAddr) -> HealthyPair {
        let (mut sub, _) = Client::connect(addr, "healthy-sub", true);
        assert_eq!(sub.subscribe("healthy/t", QoS::AtLeastOnce), ReasonCode(1));
        let (mut publ, _) = Client::connect(addr, "healthy-pub", true);
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                publ.publish("healthy/t", Bytes::from_static(b"ping"), QoS::AtLeastOnce, false);
                let m = sub.recv_publish();
                lat.push(t0.elapsed());
                sub.ack(&m);
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        });
        HealthyPair { stop, handle }
    }

    fn finish(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let mut lat = self.handle.join().expect("the healthy pair kept working");
        assert!(lat.len() >= 10, "the healthy pair exchanged only {} messages", lat.len());
        lat.sort();
        lat[lat.len() * 99 / 100]
    }

    fn assert_p99(self, what: &str) {
        let p99 = self.finish();
        println!("{what}: healthy pair p99 {p99:?}");
        assert!(p99 < Duration::from_millis(50), "{what}: healthy pair p99 {p99:?}");
    }
}

/// A client watching `$SYS/broker/limits/#`, connected before the attack (so a broker that
/// refuses new connections still reports to it).
struct Watcher {
    c: Client,
    values: std::collections::HashMap<String, u64>,
}

impl Watcher {
    fn new(addr: SocketAddr) -> Watcher {
        let (mut c, _) = Client::connect(addr, "limits-watcher", true);
        c.subscribe("$SYS/broker/limits/#", QoS::AtMostOnce);
        Watcher { c, values: Default::default() }
    }

    /// Waits until `$SYS/broker/limits/{name}` reaches at least `min`; returns its value.
    fn reaches(&mut self, name: &str, min: u64) -> u64 {
        let topic = format!("$SYS/broker/limits/{name}");
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(&n) = self.values.get(&topic).filter(|&&n| n >= min) {
                return n;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{topic} did not reach {min}: {:?}", self.values.get(&topic));
            if let Some(Packet::Publish(m)) = self.c.try_recv(left) {
                if let Ok(n) = std::str::from_utf8(&m.payload).unwrap().parse() {
                    self.values.insert(m.topic.to_string(), n);
                }
            }
        }
    }
}

fn settle() -> Duration {
    // Lets the broker's idle RSS settle after start (the sampler's own baseline).
    Duration::from_millis(300)
}

#[test]
fn partly_received_packets_are_bounded_broker_wide_and_closed_when_silent() {
    let mut b = Tern::start(
        "max_connections = 2000\nmax_packet_size = 2097152\nmax_partial_bytes = 33554432\npartial_packet_timeout = 2\n",
    );
    std::thread::sleep(settle());
    let base = b.rss_kb();
    let pair = HealthyPair::start(b.addr);
    let mut watch = Watcher::new(b.addr);
    // 200 clients (keep alive 0), each stopping one byte short of a 1 MiB PUBLISH.
    let addr = b.addr;
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..50 {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut out = BytesMut::new();
                    let mut c = Connect::new(format!("slow-{t}-{i}").as_str());
                    c.keep_alive = 0;
                    Packet::Connect(Box::new(c)).encode(ProtocolVersion::V311, &mut out);
                    let remaining = MIB;
                    out.extend_from_slice(&[0x30, 0x80, 0x80, 0x40]); // remaining length 1 MiB
                    out.extend_from_slice(&[0, 1, b'x']);
                    out.resize(out.len() + remaining - 3 - 1, b'z');
                    let _ = s.write_all(&out); // the broker may close it before it is all written
                    held.push(s);
                }
                held
            })
        })
        .collect();
    let mut held: Vec<TcpStream> = senders.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let refused = watch.reaches("partial_bytes/closed", 100);
    println!("closed at max_partial_bytes: {refused} of 200");
    // The rest are silent mid-packet: closed after partial_packet_timeout, keep alive 0 or not.
    watch.reaches("partial_packet_timeout/closed", 1);
    for s in &mut held {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut sink = [0u8; 64];
        loop {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // Every one of the 200 was closed by one budget or the other.
    let timed_out = watch.reaches("partial_packet_timeout/closed", 200 - refused);
    println!("closed at partial_packet_timeout: {timed_out}");
    pair.assert_p99("partial packets");
    b.assert_peak_within(base, 32, "partial packets");
}

#[test]
fn retained_bytes_are_bounded_and_what_fits_is_delivered() {
    let mut b = Tern::start("max_retained_bytes = 16777216\n");
    std::thread::sleep(settle());
    let base = b.rss_kb();
    let pair = HealthyPair::start(b.addr);
    let mut watch = Watcher::new(b.addr);
    let (mut p, _) = Client::connect(b.addr, "retainer", true);
    let payload = Bytes::from(vec![7u8; 256 * 1024]);
    for i in 0..200 {
        p.publish(&format!("r/{i:03}"), payload.clone(), QoS::AtLeastOnce, true);
    }
    watch.reaches("retained_bytes/refused", 100);
    let (mut s, _) = Client::connect(b.addr, "retained-reader", true);
    s.subscribe("r/#", QoS::AtMostOnce);
    s.sync();
    let mut got = 0;
    while let Some(Packet::Publish(m)) = s.try_recv(Duration::from_millis(500)) {
        assert!(m.retain, "[MQTT-3.3.1-8]");
        got += 1;
    }
    println!("retained kept: {got} of 200 x 256 KiB");
    assert!(got * (256 * 1024 + 5) <= 16 * MIB, "{got} retained messages exceed max_retained_bytes");
    assert!(got >= 60, "only {got} kept: the budget holds 63");
    pair.assert_p99("retained bytes");
    b.assert_peak_within(base, 16, "retained bytes");
}

/// A SUBSCRIBE with `n` filters of `len` bytes each, distinct per client; returns the codes.
fn subscribe_many(c: &mut Client, tag: &str, n: usize, len: usize) -> Vec<ReasonCode> {
    let id = c.id();
    let filters = (0..n)
        .map(|i| {
            let mut f = format!("{tag}/{i:05}/");
            f.push_str(&"f".repeat(len - f.len()));
            (MqttStr::from(f), SubscriptionOptions::new(QoS::AtMostOnce))
        })
        .collect();
    c.send(&Packet::Subscribe(Box::new(Subscribe { packet_id: id, filters, properties: Properties::default() })));
    match c.recv_where(|p| matches!(p, Packet::SubAck(a) if a.packet_id == id)) {
        Packet::SubAck(a) => a.codes,
        _ => unreachable!(),
    }
}

#[test]
fn subscription_bytes_are_bounded_per_client_and_broker_wide() {
    // 256 KiB per client, 1 MiB over all clients.
    let mut b = Tern::start("max_subscription_bytes_per_client = 262144\nmax_subscription_bytes = 1048576\n");
    std::thread::sleep(settle());
    let base = b.rss_kb();
    let pair = HealthyPair::start(b.addr);
    let mut watch = Watcher::new(b.addr);
    let mut accepted = 0;
    let mut clients = Vec::new();
    for n in 0..10 {
        let (mut c, _) = Client::connect(b.addr, &format!("filters-{n}"), true);
        // 12 filters of 30,000 bytes in two SUBSCRIBEs: 360 kB, past the per-client budget.
        let mut codes = subscribe_many(&mut c, &format!("c{n}a"), 6, 30_000);
        codes.extend(subscribe_many(&mut c, &format!("c{n}b"), 6, 30_000));
        let ok = codes.iter().filter(|c| c.0 < 0x80).count();
        assert!(ok <= 8, "client {n}: {ok} filters of 30,000 bytes fit in 256 KiB? [per client]");
        assert!(codes.iter().all(|c| c.0 < 0x80 || *c == ReasonCode::SUBACK_FAILURE), "3.1.1: 0x80");
        accepted += ok;
        clients.push(c);
    }
    println!("filters accepted: {accepted} of 120");
    assert!((32..=35).contains(&accepted), "{accepted} x 30,000 bytes against a 1 MiB broker-wide budget");
    watch.reaches("subscription_bytes_per_client/refused", 16);
    watch.reaches("subscription_bytes/refused", 60);
    // 5.0: the refusal says why, 0x97 quota exceeded.
    let (mut v5, _) = Client::connect_v(b.addr, "filters-v5", true, ProtocolVersion::V5);
    assert_eq!(v5.subscribe(&"g".repeat(30_000), QoS::AtMostOnce), ReasonCode::QUOTA_EXCEEDED);
    // Unsubscribing gives the bytes back.
    drop(clients);
    let (mut late, _) = Client::connect(b.addr, "filters-late", true);
    let end = Instant::now() + DEADLINE;
    while late.subscribe(&"h".repeat(30_000), QoS::AtMostOnce) != ReasonCode(0) {
        assert!(Instant::now() < end, "the budget was not given back when the clients left");
        std::thread::sleep(Duration::from_millis(50));
    }
    pair.assert_p99("subscription bytes");
    b.assert_peak_within(base, 3, "subscription bytes"); // a filter sits in the trie and the session
}

#[test]
fn queued_bytes_are_bounded_per_session() {
    let mut b = Tern::start("max_queued_bytes = 8388608\nmax_packet_size = 2097152\n");
    std::thread::sleep(settle());
    let base = b.rss_kb();
    let pair = HealthyPair::start(b.addr);
    let mut watch = Watcher::new(b.addr);
    let (mut s, _) = Client::connect(b.addr, "queue-owner", false);
    s.subscribe("q/#", QoS::AtLeastOnce);
    s.disconnect();
    let (mut p, _) = Client::connect(b.addr, "queue-filler", true);
    let payload = Bytes::from(vec![1u8; 256 * 1024]);
    for i in 0..200 {
        p.publish(&format!("q/{i:03}"), payload.clone(), QoS::AtLeastOnce, false);
    }
    watch.reaches("queued_bytes/dropped", 100);
    let (mut s, ack) = Client::connect(b.addr, "queue-owner", false);
    assert!(ack.session_present);
    let mut got = 0;
    while let Some(Packet::Publish(m)) = s.try_recv(Duration::from_millis(500)) {
        got += 1;
        s.ack(&m);
    }
    println!("queued while offline: {got} of 200 x 256 KiB");
    assert!((28..=32).contains(&got), "{got} x 256 KiB against max_queued_bytes = 8 MiB");
    pair.assert_p99("queued bytes");
    b.assert_peak_within(base, 8, "queued bytes");
}

#[test]
fn past_memory_limit_connections_are_refused_and_qos0_is_shed() {
    let mut b = Tern::start("max_connections = 1000\nmemory_limit = 67108864\n");
    std::thread::sleep(settle());
    let base = b.rss_kb();
    let pair = HealthyPair::start(b.addr);
    let mut watch = Watcher::new(b.addr);
    // Retained messages fill the heap past 64 MiB (their own budget is 256 MiB).
    let (mut p, _) = Client::connect(b.addr, "hoarder", true);
    let payload = Bytes::from(vec![3u8; 1_000_000]);
    for i in 0..100 {
        p.publish(&format!("m/{i:03}"), payload.clone(), QoS::AtLeastOnce, true);
    }
    watch.reaches("memory/retained_refused", 1);
    // A new client is refused: 3.1.1 server unavailable, 5.0 0x89 server busy.
    let (mut c, ack) = Client::connect(b.addr, "late", true);
    assert_eq!(ack.code, ConnectReturnCode::SERVER_UNAVAILABLE);
    c.expect_closed();
    let (mut c, ack) = Client::connect_v(b.addr, "late-v5", true, ProtocolVersion::V5);
    assert_eq!(ack.code, ReasonCode::SERVER_BUSY);
    c.expect_closed();
    watch.reaches("memory/connections_refused", 2);
    // QoS 0 is shed; the connected QoS 1 pair goes on.
    for _ in 0..10 {
        p.publish("m/zero", Bytes::from_static(b"x"), QoS::AtMostOnce, false);
    }
    watch.reaches("memory/qos0_shed", 10);
    pair.assert_p99("memory limit");
    b.assert_peak_within(base, 64, "memory limit");
    // Clearing the retained messages brings it back under the ceiling: clients are let in again.
    for i in 0..100 {
        p.publish(&format!("m/{i:03}"), Bytes::new(), QoS::AtLeastOnce, true);
    }
    let end = Instant::now() + DEADLINE;
    loop {
        let (c, ack) = Client::connect(b.addr, "later", true);
        if ack.code == ConnectReturnCode::ACCEPTED {
            c.disconnect();
            break;
        }
        assert!(Instant::now() < end, "still refused after the heap was freed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_retained_message_reaches_a_new_wildcard_subscriber() {
    let mut b = Tern::start("max_packet_size = 1048576\n");
    let (mut p, _) = Client::connect(b.addr, "hundred-k", true);
    // 100,000 retained messages, pipelined.
    const N: usize = 100_000;
    let mut out = BytesMut::new();
    for i in 0..N {
        let topic = format!("t/{:03}/{i:06}", i % 997);
        let mut m = Publish::new(topic.as_str(), QoS::AtLeastOnce, Bytes::from(vec![b'r'; 64]));
        m.retain = true;
        m.packet_id = Some(pid((i % 65_535) as u16 + 1));
        Packet::Publish(m).encode(ProtocolVersion::V311, &mut out);
    }
    p.send_raw(&out).unwrap();
    p.sync(); // the PUBACKs came first: every message is stored
    drop(out);
    std::thread::sleep(settle());
    let base = b.rss_kb();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let started = Instant::now();
        let (mut s, _) = Client::connect(b.addr, &format!("all-{qos:?}"), true);
        s.subscribe("#", qos);
        let mut seen = std::collections::HashSet::with_capacity(N);
        while seen.len() < N {
            let m = s.recv_publish();
            assert!(m.retain, "[MQTT-3.3.1-8]");
            assert_eq!(m.qos, qos);
            s.ack(&m);
            seen.insert(m.topic.to_string());
        }
        s.sync();
        println!("{qos:?}: {N} retained messages in {:?}", started.elapsed());
        s.disconnect();
    }
    // The subscriber's share: the backlog of 100,000 references and its output buffer.
    b.assert_peak_within(base, 16, "100,000 retained to one subscriber");
}

#[test]
fn persistent_sessions_expire_after_persistent_client_expiration() {
    let b = start_with(tern::Config { persistent_client_expiration: "2s".into(), ..config(2) });
    let addr = b.local_addr();
    let mut watch = Watcher::new(addr);
    // A 3.1.1 persistent session and a 5.0 session that never expires by its own interval...
    let (mut c, _) = Client::connect(addr, "abandoned-311", false);
    c.subscribe("x", QoS::AtLeastOnce);
    c.disconnect();
    let forever = Properties { session_expiry_interval: Some(u32::MAX), ..Default::default() };
    let mut connect = Connect::new("abandoned-v5");
    connect.protocol = ProtocolVersion::V5;
    connect.clean_start = false;
    connect.properties = forever;
    let (c, _) = Client::connect_with(addr, connect.clone());
    c.disconnect();
    // ...and one with an interval of its own, which the setting leaves alone.
    let mut own = Connect::new("own-interval");
    own.protocol = ProtocolVersion::V5;
    own.clean_start = false;
    own.properties = Properties { session_expiry_interval: Some(3600), ..Default::default() };
    let (c, _) = Client::connect_with(addr, own.clone());
    c.disconnect();
    watch.reaches("persistent_client_expiration/expired", 2);
    let (c, ack) = Client::connect(addr, "abandoned-311", false);
    assert!(!ack.session_present, "removed after persistent_client_expiration");
    c.disconnect();
    let (c, ack) = Client::connect_with(addr, connect);
    assert!(!ack.session_present, "0xFFFFFFFF counts as persistent");
    c.disconnect();
    let (_c, ack) = Client::connect_with(addr, own);
    assert!(ack.session_present, "a finite session expiry interval is the client's to choose");
    b.shutdown();
}
