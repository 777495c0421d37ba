//! The multi-worker broker: routing by interest keeps the SUBACK promise across workers, a
//! SUBSCRIBE is ordered with other clients' PUBLISHes by arrival, shutdown
//! survives a takeover storm, and a SUBSCRIBE costs what it matches, not the retained store's size.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use tern::codec::*;

/// The scheduling policy of each `tern-worker-N` thread of process `pid`, as /proc tells it
/// (field 41 of `stat`: 0 normal, 3 batch).
fn worker_policies(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        // The name is in parentheses and may hold spaces; the fields after it are plain.
        let (name, rest) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") ")).unwrap();
        if name.starts_with("tern-worker-") {
            // `rest` starts at field 3 (state), so field 41 is its 39th.
            out.push(rest.split_whitespace().nth(38).unwrap().parse().unwrap());
        }
    }
    out
}

/// `worker_scheduling`: batch makes every worker thread SCHED_BATCH (3), normal leaves them
/// SCHED_OTHER (0), and auto picks batch when the workers are at least the CPUs.
#[test]
fn worker_threads_are_scheduled_as_configured() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (setting, workers, want) in [("batch", 2, 3), ("normal", 2, 0), ("auto", cpus, 3), ("auto", cpus + 1, 3)] {
        let config = format!("workers = {workers}\nworker_scheduling = \"{setting}\"\npin_workers = false\n");
        let (mut child, _port, _dir) = spawn_tern(&[], &config);
        // Each worker thread sets its policy as it starts, maybe after the broker says it listens.
        let end = Instant::now() + Duration::from_secs(10);
        let mut policies = worker_policies(child.id());
        while policies != vec![want; workers] && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            policies = worker_policies(child.id());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(policies, vec![want; workers], "{setting} with {workers} workers");
    }
}

/// A worker with mail for a sleeping peer runs the peer's turn itself instead of waking it: at a
/// trickle, messages that cross workers arrive, in order, and `$SYS/broker/internal/helped_turns`
/// counts the turns so run; `$SYS/broker/internal/crossed` counts the messages that went to
/// another worker (some of the 160, each to one peer).
#[test]
fn a_trickle_across_workers_is_delivered_by_helped_turns() {
    let b = start(2);
    let addr = b.local_addr();
    // Eight pairs: with two workers some publisher and its subscriber live on different ones.
    let mut pairs = connect_pairs(addr, "trickle", 8, |_| QoS::AtLeastOnce);
    // One message at a time, each awaited: the broker is idle, its workers asleep, between them.
    for n in 0..20 {
        for (i, (publisher, sub)) in pairs.iter_mut().enumerate() {
            let topic = format!("trickle/{i}");
            publisher.publish(&topic, format!("m{n}"), QoS::AtLeastOnce, false);
            let m = sub.recv_publish();
            assert_eq!((m.topic.as_ref(), &m.payload[..]), (topic.as_str(), format!("m{n}").as_bytes()));
            sub.ack(&m);
        }
    }
    let (mut sys, _) = Client::connect(addr, "trickle-sys", true);
    sys.subscribe("$SYS/broker/internal/helped_turns", QoS::AtMostOnce);
    wait_for_sys(&mut sys, "turns run for a sleeping peer", |n| n > 0);
    let (mut crossed, _) = Client::connect(addr, "trickle-crossed", true);
    crossed.subscribe("$SYS/broker/internal/crossed", QoS::AtMostOnce);
    // Only these 160 messages (and $SYS updates to these two clients) are routed.
    wait_for_sys(&mut crossed, "messages routed to another worker", |n| n > 0 && n < 200);
}

/// Spec 3.8.4: once a client has its SUBACK, messages published to a matching
/// topic are delivered to it. With routing by interest the worker that receives the PUBLISH must
/// already know of the new subscriber: the SUBACK waits for every peer to acknowledge it.
#[test]
fn a_suback_means_publishes_from_any_worker_arrive_1000_rounds() {
    let b = start(4);
    let addr = b.local_addr();
    let (mut sub, _) = Client::connect(addr, "order-sub", true);
    // Eight publishers: their sessions live on different workers (homes are hashed client ids).
    let mut pubs: Vec<Client> = (0..8).map(|i| Client::connect(addr, &format!("order-pub-{i}"), true).0).collect();
    for round in 0..1000 {
        let topic = format!("order/{round}");
        assert_eq!(sub.subscribe(&topic, QoS::AtLeastOnce), ReasonCode::GRANTED_QOS_1);
        pubs[round % 8].publish(&topic, format!("m{round}"), QoS::AtLeastOnce, false);
        let m = sub.recv_publish();
        assert_eq!(m.topic, topic.as_str(), "round {round}");
        sub.ack(&m);
        // Unsubscribing retracts the filter everywhere; the next round announces a new one.
        let id = sub.id();
        let u = Unsubscribe { packet_id: id, filters: vec![topic.as_str().into()], properties: Properties::default() };
        sub.send(&Packet::Unsubscribe(Box::new(u)));
        sub.recv_where(|p| matches!(p, Packet::UnsubAck(a) if a.packet_id == id));
    }
    assert!(b.is_healthy());
    assert!(b.shutdown());
}

/// [MQTT-4.6.0-6]: a publisher's messages reach a subscriber in the order it sent them (per topic
/// and QoS), across workers, whatever way each crosses: plain ones in the batch for the
/// subscriber's worker, those with 5.0 properties or an expiry as a shared message of their own,
/// QoS 0 and 1 interleaved. Each message keeps what it was published with.
#[test]
fn a_publishers_messages_arrive_in_order_across_workers_whatever_way_they_cross() {
    let b = start(4);
    let addr = b.local_addr();
    let (mut sub, _) = Client::connect_v(addr, "mix-sub", true, ProtocolVersion::V5);
    assert_eq!(sub.subscribe("mix/#", QoS::AtLeastOnce), ReasonCode::GRANTED_QOS_1);
    // Eight publishers: their sessions live on different workers (homes are hashed client ids).
    let mut pubs: Vec<Client> =
        (0..8).map(|i| Client::connect_v(addr, &format!("mix-pub-{i}"), true, ProtocolVersion::V5).0).collect();
    const N: usize = 300;
    for i in 0..N {
        for (p, c) in pubs.iter_mut().enumerate() {
            let qos = if i % 5 >= 3 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
            let mut m = Publish::new(format!("mix/{p}").as_str(), qos, Bytes::from(i.to_string()));
            match i % 5 {
                1 => {
                    let props = Properties {
                        user_properties: vec![("n".into(), i.to_string().as_str().into())],
                        ..Default::default()
                    };
                    m.properties = Some(Box::new(props));
                }
                3 => {
                    m.properties =
                        Some(Box::new(Properties { message_expiry_interval: Some(600), ..Default::default() }))
                }
                _ => {}
            }
            if qos == QoS::AtLeastOnce {
                m.packet_id = Some(c.id());
            }
            let id = m.packet_id;
            c.send(&Packet::Publish(m));
            if qos == QoS::AtLeastOnce {
                c.recv_where(|p| matches!(p, Packet::PubAck(a) if Some(a.packet_id) == id));
            }
        }
    }
    // What each publisher sent at each QoS, in order: QoS 1 messages wait in the subscriber's
    // window while QoS 0 ones do not, so only the order within a QoS is promised.
    let sent = |qos1: bool| (0..N).filter(move |i| (i % 5 >= 3) == qos1);
    let mut expected: Vec<[std::collections::VecDeque<usize>; 2]> =
        (0..8).map(|_| [sent(false).collect(), sent(true).collect()]).collect();
    for _ in 0..8 * N {
        let m = sub.recv_publish();
        sub.ack(&m);
        let p: usize = m.topic.strip_prefix("mix/").and_then(|t| t.parse().ok()).expect("a mix/ topic");
        let i = expected[p][(m.qos != QoS::AtMostOnce) as usize].pop_front().expect("no more than was sent");
        assert_eq!(&m.payload[..], i.to_string().as_bytes(), "publisher {p}, {:?}: out of order or lost", m.qos);
        let props = m.properties.as_deref();
        match i % 5 {
            1 => assert_eq!(
                props.map(|p| p.user_properties.clone()),
                Some(vec![("n".into(), i.to_string().as_str().into())]),
                "user property kept [MQTT-3.3.2-17]"
            ),
            3 => assert!(props.and_then(|p| p.message_expiry_interval).is_some_and(|e| e <= 600)),
            _ => assert!(props.is_none_or(|p| p.user_properties.is_empty() && p.message_expiry_interval.is_none())),
        }
    }
    assert!(expected.iter().all(|e| e[0].is_empty() && e[1].is_empty()));
    assert!(b.is_healthy());
    assert!(b.shutdown());
}

/// Without waiting for its SUBACK: a SUBSCRIBE that reached the broker before another client's
/// PUBLISH gets that message, once, whichever worker reads which first (as one event loop would
/// order them; the Paho suite's `test_subscribe_options` and `test_request_response` rely on it).
/// The subscriber's worker may read its SUBSCRIBE after the publisher's worker has routed the
/// PUBLISH; the kernel's arrival stamps put them back in order (`worker::catchup`).
#[test]
fn a_subscribe_that_arrived_first_gets_the_message_without_waiting_for_its_suback() {
    let b = start(4);
    let addr = b.local_addr();
    let (mut sub, _) = Client::connect_v(addr, "early-sub", true, ProtocolVersion::V5);
    let mut pubs: Vec<Client> = (0..8).map(|i| Client::connect(addr, &format!("early-pub-{i}"), true).0).collect();
    for round in 0..1000 {
        let topic = format!("early/{round}");
        // Every fourth round two SUBSCRIBEs whose filters both match: still one copy
        // [MQTT-3.3.5-1], however many of them catch up.
        let filters = if round % 4 == 3 { vec![topic.clone(), format!("{topic}/#")] } else { vec![topic.clone()] };
        let mut acks = Vec::new();
        for f in &filters {
            let id = sub.id();
            let opts = SubscriptionOptions::new(QoS::AtLeastOnce);
            let s = Subscribe {
                packet_id: id,
                filters: vec![(f.as_str().into(), opts)],
                properties: Properties::default(),
            };
            sub.send(&Packet::Subscribe(Box::new(s)));
            acks.push(id);
        }
        let qos = if round % 2 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        let p = &mut pubs[round % 8];
        if round % 3 == 2 {
            // At the end of one write of more than 4 KiB (nobody's filler first): one read,
            // whose messages the broker lists where they lie in it rather than one by one.
            let mut burst = BytesMut::new();
            for _ in 0..40 {
                Packet::Publish(Publish::new("filler/early", QoS::AtMostOnce, Bytes::from(vec![b'f'; 128])))
                    .encode(ProtocolVersion::V311, &mut burst);
            }
            let mut m = Publish::new(topic.as_str(), qos, Bytes::from(format!("m{round}")));
            m.packet_id = (qos != QoS::AtMostOnce).then(|| p.id());
            let id = m.packet_id;
            Packet::Publish(m).encode(ProtocolVersion::V311, &mut burst);
            p.send_raw(&burst).unwrap();
            if let Some(id) = id {
                p.recv_where(|a| matches!(a, Packet::PubAck(a) if a.packet_id == id));
            }
        } else {
            p.publish(&topic, format!("m{round}"), qos, false);
        }
        let mut got = false;
        while !(acks.is_empty() && got) {
            match sub.recv() {
                Packet::SubAck(a) if acks.contains(&a.packet_id) => acks.retain(|&id| id != a.packet_id),
                Packet::Publish(m) => {
                    assert_eq!(m.topic, topic.as_str(), "round {round}: once, and only this round's");
                    assert!(!got, "round {round}: delivered twice");
                    got = true;
                    sub.ack(&m);
                }
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        let id = sub.id();
        let filters = filters.iter().map(|f| f.as_str().into()).collect();
        let u = Unsubscribe { packet_id: id, filters, properties: Properties::default() };
        sub.send(&Packet::Unsubscribe(Box::new(u)));
        sub.recv_where(|p| matches!(p, Packet::UnsubAck(a) if a.packet_id == id));
    }
    sub.sync();
    assert!(b.is_healthy());
    assert!(b.shutdown());
}

#[test]
fn each_message_goes_to_exactly_one_member_of_a_shared_group_across_workers() {
    let b = start(4);
    let addr = b.local_addr();
    let (mut shared_a, _) = Client::connect_v(addr, "grp-a", true, ProtocolVersion::V5);
    let (mut shared_b, _) = Client::connect_v(addr, "grp-b", true, ProtocolVersion::V5);
    shared_a.subscribe("$share/g/jobs/#", QoS::AtLeastOnce);
    shared_b.subscribe("$share/g/jobs/#", QoS::AtLeastOnce);
    let (mut p, _) = Client::connect(addr, "grp-pub", true);
    for i in 0..20 {
        p.publish(&format!("jobs/{i}"), "x", QoS::AtLeastOnce, false);
    }
    let mut got = 0;
    for c in [&mut shared_a, &mut shared_b] {
        while let Some(pk) = c.try_recv(Duration::from_millis(500)) {
            if let Packet::Publish(m) = pk {
                c.ack(&m);
                got += 1;
            }
        }
    }
    assert_eq!(got, 20, "each message to exactly one member of the group (spec 4.8.2)");
    b.shutdown();
}

/// One connection of the storm: its id, whether it got CONNACK, what it saw until EOF.
struct Seen {
    connected: bool,
    disconnect: Option<ReasonCode>,
}

fn connect5_with_will(id: &str, generation: usize) -> Connect {
    let mut c = Connect::new(id);
    c.protocol = ProtocolVersion::V5;
    c.will = Some(Will {
        topic: format!("will/{id}").as_str().into(),
        payload: Bytes::from(format!("{id}:{generation}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    c
}

/// Connects and waits for CONNACK; returns the stream (to read to EOF later) if accepted.
fn storm_connect(addr: SocketAddr, id: &str, generation: usize) -> Option<(TcpStream, BytesMut)> {
    let mut s = TcpStream::connect(addr).ok()?;
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(connect5_with_will(id, generation))).encode(ProtocolVersion::V5, &mut out);
    s.write_all(&out).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(p)) = decode(&mut buf, Some(ProtocolVersion::V5), 1 << 20) {
            return match p {
                Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS => Some((s, buf)),
                _ => None,
            };
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Everything left on an accepted connection, to EOF.
fn read_to_end(mut s: TcpStream, mut buf: BytesMut) -> Seen {
    let mut chunk = [0u8; 4096];
    let mut disconnect = None;
    loop {
        while let Ok(Some(p)) = decode(&mut buf, Some(ProtocolVersion::V5), 1 << 20) {
            if let Packet::Disconnect(d) = p {
                disconnect = Some(d.reason);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Seen { connected: true, disconnect },
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The real binary with `args`, logging at info: the child, its address (read from its log) and
/// the rest of its log.
fn spawn_logged(
    args: &[&str],
) -> (std::process::Child, SocketAddr, std::io::Lines<BufReader<std::process::ChildStderr>>) {
    let mut broker = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern starts");
    let mut lines = BufReader::new(broker.stderr.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("tern logs its address").unwrap();
        if let Some(rest) = line.split(" listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    (broker, addr, lines)
}

/// 64 client ids connected, 1,000 takeover CONNECTs from four threads, SIGTERM in the middle of
/// them, 4 workers; 50 times. The real binary must exit 0 without a panic, every accepted 5.0
/// connection must get a DISCONNECT (0x8E taken over or 0x8B shutting down), and no will may be
/// published twice.
#[test]
fn shutdown_in_a_takeover_storm_exits_cleanly_50_times() {
    for run in 0..50 {
        let (mut broker, addr, lines) = spawn_logged(&["-p", "0", "--workers", "4"]);
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            })
        };
        let (mut watcher, _) = Client::connect(addr, "storm-watcher", true);
        watcher.subscribe("will/#", QoS::AtLeastOnce);
        let first: Vec<_> = (0..64).filter_map(|i| storm_connect(addr, &format!("c{i}"), 0)).collect();
        assert_eq!(first.len(), 64);
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let started = started.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for n in 0..250 {
                        started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let generation = 1 + t * 250 + n;
                        if let Some(s) = storm_connect(addr, &format!("c{}", generation % 64), generation) {
                            kept.push(s);
                        }
                    }
                    kept
                })
            })
            .collect();
        while started.load(std::sync::atomic::Ordering::Relaxed) < 500 {
            std::thread::yield_now();
        }
        Command::new("kill").args(["-TERM", &broker.id().to_string()]).status().unwrap();
        let kept: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        // Wills received by the watcher until the broker closed it.
        let mut wills: HashMap<Vec<u8>, usize> = HashMap::new();
        for p in watcher.expect_closed() {
            if let Packet::Publish(m) = p {
                *wills.entry(m.payload.to_vec()).or_default() += 1;
            }
        }
        let status = broker.wait().unwrap();
        log_reader.join().unwrap();
        let log = log.lock().unwrap();
        assert!(status.success(), "run {run}: exit {status:?}\n{}", log.join("\n"));
        assert!(!log.iter().any(|l| l.contains("panicked") || l.contains("died")), "run {run}:\n{}", log.join("\n"));
        for (s, buf) in first.into_iter().chain(kept) {
            let seen = read_to_end(s, buf);
            assert!(seen.connected);
            assert!(
                matches!(
                    seen.disconnect,
                    Some(ReasonCode::SERVER_SHUTTING_DOWN) | Some(ReasonCode::SESSION_TAKEN_OVER)
                ),
                "run {run}: an accepted 5.0 client got {:?}, not DISCONNECT 0x8B or 0x8E",
                seen.disconnect
            );
        }
        for (payload, n) in wills {
            assert_eq!(n, 1, "run {run}: will {:?} published {n} times", String::from_utf8_lossy(&payload));
        }
    }
}

/// With 100,000 retained messages a SUBSCRIBE of 5,000 filters that match none of them must not
/// stall the worker: a pair of clients on the same (only) worker keeps exchanging QoS 1 messages
/// with a p99 under 50 ms.
#[test]
fn a_huge_subscribe_over_a_large_retained_store_does_not_stall_the_worker() {
    let b = start_with(tern::Config { max_retained_messages: 200_000, ..config(1) });
    let addr = b.local_addr();
    let (mut filler, _) = Client::connect(addr, "filler", true);
    for i in 0..100_000 {
        let mut p = Publish::new(format!("ret/{}/{}", i / 100, i % 100), QoS::AtMostOnce, Bytes::from_static(b"r"));
        p.retain = true;
        filler.send(&Packet::Publish(p));
    }
    filler.sync();
    let (mut sub, _) = Client::connect(addr, "pair-sub", true);
    sub.subscribe("pair/t", QoS::AtLeastOnce);
    let (mut publ, _) = Client::connect(addr, "pair-pub", true);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heavy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut heavy, _) = Client::connect(addr, "heavy", true);
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
                let filters = (0..5000)
                    .map(|i| (MqttStr::from(format!("none/{rounds}/{i}")), SubscriptionOptions::new(QoS::AtLeastOnce)))
                    .collect();
                let id = heavy.id();
                let s = Subscribe { packet_id: id, filters, properties: Properties::default() };
                heavy.send(&Packet::Subscribe(Box::new(s)));
                heavy.recv_where(|p| matches!(p, Packet::SubAck(a) if a.packet_id == id));
                rounds += 1;
            }
            rounds
        })
    };
    let mut latencies = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let t = Instant::now();
        publ.publish("pair/t", "ping", QoS::AtLeastOnce, false);
        let m = sub.recv_publish();
        sub.ack(&m);
        latencies.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = heavy.join().unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!("pair p99 {p99:?} over {} messages, {rounds} heavy SUBSCRIBEs of 5,000 filters", latencies.len());
    assert!(rounds >= 1);
    assert!(
        p99 < Duration::from_millis(50),
        "p99 {p99:?} over {} messages, {rounds} heavy SUBSCRIBEs",
        latencies.len()
    );
    b.shutdown();
}

/// `n` pairs of clients: publisher `{name}-pub-{i}` and subscriber `{name}-sub-{i}` to topic
/// `{name}/{i}` at `qos(i)` (granted as asked).
fn connect_pairs(addr: SocketAddr, name: &str, n: usize, qos: impl Fn(usize) -> QoS) -> Vec<(Client, Client)> {
    (0..n)
        .map(|i| {
            let (mut sub, _) = Client::connect(addr, &format!("{name}-sub-{i}"), true);
            assert_eq!(sub.subscribe(&format!("{name}/{i}"), qos(i)).0, qos(i) as u8);
            (Client::connect(addr, &format!("{name}-pub-{i}"), true).0, sub)
        })
        .collect()
}

/// Once the broker at `addr` (4 workers, idle) has handed three workers to worker 0's thread: a
/// client subscribed to `$SYS/broker/internal/hosted_workers`.
fn wait_hosted(addr: SocketAddr, id: &str) -> Client {
    let (mut sys, _) = Client::connect(addr, id, true);
    sys.subscribe("$SYS/broker/internal/hosted_workers", QoS::AtMostOnce);
    wait_for_sys(&mut sys, "workers hosted while idle", |n| n == 3);
    sys
}

/// Reads `$SYS` updates of one counter (already subscribed) until `done` holds.
fn wait_for_sys(sys: &mut Client, what: &str, done: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let m = sys.recv_publish();
        let n: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        if done(n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {n}");
    }
}

/// While the load is light, worker 0's thread serves the workers whose threads are idle
/// (`$SYS/broker/internal/hosted_workers`). They keep their clients, sessions and rings: messages
/// between clients homed on different workers still arrive, each publisher's in order
/// [MQTT-4.6.0-6], QoS 1 and 2 alike.
#[test]
fn idle_workers_are_served_by_one_thread_and_still_deliver_across_workers_in_order() {
    let b = start(4);
    let addr = b.local_addr();
    let _sys = wait_hosted(addr, "hosted-sys");
    // Twelve pairs over four workers: most publishers and subscribers live on different ones.
    let qos = |i: usize| if i.is_multiple_of(2) { QoS::AtLeastOnce } else { QoS::ExactlyOnce };
    let mut pairs = connect_pairs(addr, "hosted", 12, qos);
    for n in 0..20 {
        for (i, (publisher, _)) in pairs.iter_mut().enumerate() {
            publisher.publish(&format!("hosted/{i}"), format!("m{n}"), qos(i), false);
        }
    }
    for (i, (_, sub)) in pairs.iter_mut().enumerate() {
        for n in 0..20 {
            let m = sub.recv_publish();
            assert_eq!(&m.payload[..], format!("m{n}").as_bytes(), "pair {i}: out of order or lost");
            sub.ack(&m);
        }
    }
}

/// A broker whose idle workers are served by worker 0's thread shuts down as any other: each
/// worker's own thread takes it back to shut it down; every 5.0 client gets DISCONNECT 0x8B
/// [MQTT-3.14.2-1], and the process exits 0. The wills of the clients, which did not DISCONNECT,
/// are published [MQTT-3.1.2-8], each once, and all reach the watcher, wherever its session
/// lives: no worker disconnects its clients before every worker has published its wills.
#[test]
fn shutdown_while_workers_are_hosted_exits_cleanly() {
    let conf = std::env::temp_dir().join(format!("tern-hosted-{}.toml", std::process::id()));
    std::fs::write(&conf, "port = 0\nworkers = 4\npin_workers = false\nsys_interval = 1\n").unwrap();
    let (mut broker, addr, lines) = spawn_logged(&["-c", conf.to_str().unwrap()]);
    let log_reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let (mut watcher, _) = Client::connect(addr, "hosted-watcher", true);
    watcher.subscribe("will/#", QoS::AtLeastOnce);
    let clients: Vec<_> = (0..16).map(|i| storm_connect(addr, &format!("h{i}"), 0).expect("accepted")).collect();
    let _sys = wait_hosted(addr, "hosted-sys");
    Command::new("kill").args(["-TERM", &broker.id().to_string()]).status().unwrap();
    let mut wills: HashMap<Vec<u8>, usize> = HashMap::new();
    for p in watcher.expect_closed() {
        if let Packet::Publish(m) = p {
            *wills.entry(m.payload.to_vec()).or_default() += 1;
        }
    }
    let status = wait_exit(&mut broker, "tern did not exit after SIGTERM with hosted workers");
    let log = log_reader.join().unwrap();
    let _ = std::fs::remove_file(&conf);
    assert!(status.success(), "exit {status:?}\n{}", log.join("\n"));
    assert!(!log.iter().any(|l| l.contains("panicked") || l.contains("died")), "{}", log.join("\n"));
    for (s, buf) in clients {
        assert_eq!(read_to_end(s, buf).disconnect, Some(ReasonCode::SERVER_SHUTTING_DOWN));
    }
    assert_eq!(wills.len(), 16, "every will reaches the watcher: {wills:?}");
    assert!(wills.values().all(|&n| n == 1), "a will published twice: {wills:?}");
}

/// When the load rises, the host gives the workers back to their threads
/// (`$SYS/broker/internal/given_back`), and nothing acknowledged is lost on the way.
#[test]
fn a_busy_host_gives_workers_back_and_loses_nothing_acknowledged() {
    let b = start(4);
    let addr = b.local_addr();
    let mut sys = wait_hosted(addr, "busy-sys");
    sys.subscribe("$SYS/broker/internal/given_back", QoS::AtMostOnce);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four pairs flood QoS 0 messages (the broker's host gets busy) while one pair exchanges
    // QoS 1 messages, each acknowledged to its publisher and awaited by its subscriber.
    let floods: Vec<_> = (0..4)
        .map(|i| {
            let stopped = stop.clone();
            let (mut sub, _) = Client::connect(addr, &format!("flood-sub-{i}"), true);
            sub.subscribe(&format!("flood/{i}"), QoS::AtMostOnce);
            let (mut publisher, _) = Client::connect(addr, &format!("flood-pub-{i}"), true);
            let reader = std::thread::spawn(move || {
                let mut chunk = vec![0u8; 1 << 16];
                sub.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                loop {
                    match sub.stream.read(&mut chunk) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(_) if !stopped.load(std::sync::atomic::Ordering::Relaxed) => {}
                        Err(_) => return,
                    }
                }
            });
            let stop = stop.clone();
            let writer = std::thread::spawn(move || {
                let mut burst = BytesMut::new();
                for _ in 0..200 {
                    Packet::Publish(Publish::new(
                        format!("flood/{i}").as_str(),
                        QoS::AtMostOnce,
                        Bytes::from_static(&[7; 64]),
                    ))
                    .encode(ProtocolVersion::V311, &mut burst);
                }
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if publisher.send_raw(&burst).is_err() {
                        return;
                    }
                }
            });
            (reader, writer)
        })
        .collect();
    let (mut sub, _) = Client::connect(addr, "busy-q1-sub", true);
    sub.subscribe("busy/q1", QoS::AtLeastOnce);
    let (mut publisher, _) = Client::connect(addr, "busy-q1-pub", true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        // Each publish returns once PUBACK is in: the message was acknowledged.
        publisher.publish("busy/q1", format!("m{n}"), QoS::AtLeastOnce, false);
        let m = sub.recv_publish();
        assert_eq!(&m.payload[..], format!("m{n}").as_bytes());
        sub.ack(&m);
        n += 1;
        let mut given_back = 0;
        while let Some(Packet::Publish(m)) = sys.try_recv(Duration::from_millis(1)) {
            if &m.topic[..] == "$SYS/broker/internal/given_back" {
                given_back = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            }
        }
        if given_back > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the host never gave a worker back under load");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (reader, writer) in floods {
        writer.join().unwrap();
        reader.join().unwrap();
    }
}
