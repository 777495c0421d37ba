//! Hostile and heavy clients: a flood of malformed packets and a stalled subscriber must not hurt
//! anyone else, and memory stays bounded. The broker runs in-process here, except where its RSS
//! or its exit is measured (then it is the real `tern` binary).

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use tern::codec::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A packet that breaks a rule: a valid one mutated, or random bytes.
fn malformed(rng: &mut Rng) -> Vec<u8> {
    let mut out = BytesMut::new();
    let samples: Vec<Packet> = vec![
        Packet::Publish(Publish::new("a/b", QoS::AtLeastOnce, Bytes::from_static(b"payload"))),
        Packet::Subscribe(Box::new(Subscribe {
            packet_id: pid(1),
            filters: vec![("x/#".into(), SubscriptionOptions::new(QoS::AtLeastOnce))],
            properties: Properties::default(),
        })),
        Packet::PubRel(Box::new(Ack::new(pid(3))).as_ref().clone()),
        Packet::Unsubscribe(Box::new(Unsubscribe {
            packet_id: pid(2),
            filters: vec!["x".into()],
            properties: Properties::default(),
        })),
    ];
    match rng.below(4) {
        0 => (0..1 + rng.below(40)).map(|_| rng.next() as u8).collect(),
        _ => {
            samples[rng.below(samples.len())].encode(ProtocolVersion::V311, &mut out);
            let mut v = out.to_vec();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(v.len());
                match rng.below(3) {
                    0 => v[i] = rng.next() as u8,
                    1 => v[i] ^= 1 << rng.below(8),
                    _ => v.truncate(i.max(1)),
                }
            }
            if rng.below(2) == 0 {
                v[0] = (v[0] & 0xf0) | (rng.next() as u8 & 0x0f); // break the flags too
            }
            v
        }
    }
}

#[test]
fn ten_thousand_malformed_packets_do_not_disturb_a_healthy_client() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut sub, _) = Client::connect(addr, "healthy-sub", true);
        sub.subscribe("healthy", QoS::AtLeastOnce);
        let (mut publ, _) = Client::connect(addr, "healthy-pub", true);
        let stop = Arc::new(AtomicBool::new(false));

        let attackers: Vec<_> = (0..8u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * 0x1234_5678));
                    for i in 0..1250 {
                        let mut s = std::net::TcpStream::connect(addr).unwrap();
                        let mut bytes = Vec::new();
                        if i % 2 == 0 {
                            // Half come after a valid CONNECT, to reach the packet handlers.
                            let mut c = BytesMut::new();
                            Connect::new(format!("attacker-{t}-{i}").as_str()).encode(&mut c);
                            bytes.extend_from_slice(&c);
                        }
                        bytes.extend(malformed(&mut rng));
                        let _ = s.write_all(&bytes);
                        drop(s);
                    }
                })
            })
            .collect();
        let mut sent = 0u32;
        let started = Instant::now();
        while !attackers.iter().all(|a| a.is_finished()) || sent < 100 {
            publ.publish("healthy", sent.to_be_bytes().to_vec(), QoS::AtLeastOnce, false);
            let m = sub.recv_publish();
            assert_eq!(&m.payload[..], sent.to_be_bytes(), "in order, none lost");
            sub.ack(&m);
            sent += 1;
            assert!(started.elapsed() < Duration::from_secs(300), "bounded in time");
        }
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.join().unwrap();
        }
        assert!(b.is_healthy(), "no worker died");
        // Every worker still serves new clients.
        for i in 0..8 {
            let (mut c, _) = Client::connect(addr, &format!("after-{i}"), true);
            c.subscribe("after", QoS::AtMostOnce);
            c.sync();
        }
        b.shutdown();
    }
}

#[test]
fn a_reset_from_a_subscriber_with_pending_output_harms_no_worker() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let mut resets = Vec::new();
        for i in 0..8 {
            // Subscribers that stop reading, so the broker has output pending and waits for
            // writability; then they vanish with a TCP reset.
            let (mut s, _) = Client::connect(addr, &format!("reset-{i}"), true);
            s.subscribe("flood", QoS::AtMostOnce);
            resets.push(s);
        }
        let (mut p, _) = Client::connect(addr, "flooder", true);
        // 24 MiB each: more than the kernel's socket buffers take, so output stays pending.
        for _ in 0..1600 {
            p.publish("flood", vec![0u8; 16 * 1024], QoS::AtMostOnce, false);
        }
        p.sync();
        for s in resets {
            socket2::SockRef::from(&s.stream).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s); // RST: the broker sees the socket readable, writable and in error at once
        }
        p.publish("flood", "more", QoS::AtMostOnce, false);
        p.sync();
        assert!(b.is_healthy(), "no worker died");
        let (mut after, _) = Client::connect(addr, "after", true);
        after.subscribe("after", QoS::AtLeastOnce);
        p.publish("after", "still here", QoS::AtLeastOnce, false);
        assert_eq!(&after.recv_publish().payload[..], b"still here");
        b.shutdown();
    }
}

#[test]
fn a_publisher_that_never_reads_its_acks_is_paused_not_buffered() {
    for w in WORKER_COUNTS {
        let b = start_with(tern::Config { max_output_bytes: 64 * 1024, ..config(w) });
        let (c, _) = Client::connect(b.local_addr(), "deaf", true);
        let mut writer = c.stream.try_clone().unwrap();
        const N: u32 = 1_000_000; // 4 MB of PUBACKs owed: past the socket buffers and the 64 KiB bound
        let sender = std::thread::spawn(move || {
            let mut out = BytesMut::new();
            for i in 0..N {
                let mut p = Publish::new("deaf/t", QoS::AtLeastOnce, Bytes::from_static(b"x"));
                p.packet_id = Some(pid((i % 65535 + 1) as u16));
                p.encode(ProtocolVersion::V311, &mut out);
            }
            // Blocks while the broker, owed-output bound reached, stops reading us.
            writer.write_all(&out).unwrap();
        });
        // Only now read: every PUBACK arrives, none lost to the pause.
        let mut c = c;
        let mut acks = 0;
        while acks < N {
            if let Packet::PubAck(_) = c.recv() {
                acks += 1;
            }
        }
        sender.join().unwrap();
        assert!(b.is_healthy());
        b.shutdown();
    }
}

#[test]
fn subscriptions_and_retained_topics_are_bounded() {
    let b = start_with(tern::Config { max_subscriptions_per_client: 3, max_retained_messages: 2, ..config(1) });
    let (mut c, _) = Client::connect_v(b.local_addr(), "greedy", true, ProtocolVersion::V5);
    for i in 0..3 {
        assert_eq!(c.subscribe(&format!("s/{i}"), QoS::AtMostOnce), ReasonCode::GRANTED_QOS_0);
    }
    assert_eq!(c.subscribe("s/3", QoS::AtMostOnce), ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(c.subscribe("s/0", QoS::AtLeastOnce), ReasonCode::GRANTED_QOS_1, "replacing one still works");
    for i in 0..3 {
        c.publish(&format!("r/{i}"), "kept?", QoS::AtLeastOnce, true);
    }
    let (mut late, _) = Client::connect(b.local_addr(), "late", true);
    late.subscribe("r/#", QoS::AtLeastOnce);
    let mut got = vec![late.recv_publish().topic.to_string(), late.recv_publish().topic.to_string()];
    got.sort();
    assert_eq!(got, vec!["r/0", "r/1"], "the third retained topic is past the bound");
    late.sync();
    late.expect_silence(Duration::from_millis(200));
    b.shutdown();
}

#[test]
fn sessions_are_bounded() {
    let b = start_with(tern::Config { max_sessions: 2, ..config(1) });
    for id in ["p1", "p2"] {
        let (c, ack) = Client::connect(b.local_addr(), id, false);
        assert_eq!(ack.code, ReasonCode::SUCCESS);
        c.disconnect(); // persistent: the session stays
    }
    let (mut c, ack) = Client::connect(b.local_addr(), "p3", true);
    assert_eq!(ack.code, ConnectReturnCode::SERVER_UNAVAILABLE, "a third session does not fit");
    c.expect_closed();
    let (_c, ack) = Client::connect(b.local_addr(), "p1", false);
    assert!(ack.session_present, "an existing session is still resumed");
    b.shutdown();
}

/// The bound stated in README: a stalled subscriber costs at most its output buffer
/// (`max_output_bytes`, 1 MiB) plus socket buffers, and a session's queue at most
/// `max_queued_messages` messages (here 200 x 64 KiB = 12.5 MiB): the broker stays under 48 MiB.
const RSS_BOUND_KB: u64 = 48 * 1024;

#[test]
fn stalled_subscriber_does_not_grow_memory_or_starve_others() {
    let (mut child, port, dir) = spawn_tern(&["--workers", "2"], "max_queued_messages = 200\n");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // Never reads a byte after SUBACK.
    let (mut stalled, _) = Client::connect(addr, "stalled", true);
    stalled.subscribe("big", QoS::AtMostOnce);
    stalled.stream.set_read_timeout(None).unwrap();
    let (mut healthy, _) = Client::connect(addr, "healthy", true);
    healthy.subscribe("big", QoS::AtLeastOnce);
    let (mut publ, _) = Client::connect(addr, "publisher", true);

    const N: usize = 3200; // x 64 KiB = 200 MiB
    let payload = Bytes::from(vec![0x5a; 64 * 1024]);
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = received.clone();
    let reader = std::thread::spawn(move || {
        for i in 0..N {
            progress.store(i, Ordering::Relaxed);
            let m = healthy.recv_publish();
            assert_eq!(m.payload.len(), 64 * 1024);
            assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()) as usize, i, "in order, none lost");
            healthy.ack(&m);
        }
    });
    for i in 0..N {
        // The healthy subscriber keeps up within 100 messages (it is the stalled one that must
        // not slow anyone): wait for it, with a deadline, rather than outrun its queue.
        let waited = Instant::now();
        while i > received.load(Ordering::Relaxed) + 100 {
            assert!(waited.elapsed() < DEADLINE, "healthy subscriber stuck at {}", received.load(Ordering::Relaxed));
            std::thread::yield_now();
        }
        if i % 200 == 0 && std::env::var("TERN_TRACE_RSS").is_ok() {
            eprintln!(
                "{i}: rss {} KiB, received {}",
                status_kb(child.id(), "VmRSS:"),
                received.load(Ordering::Relaxed)
            );
        }
        let mut p = payload.to_vec();
        p[..4].copy_from_slice(&(i as u32).to_be_bytes());
        publ.publish("big", p, QoS::AtLeastOnce, false);
    }
    reader.join().expect("the healthy subscriber received all 200 MiB");
    let peak = status_kb(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    drop(stalled);
    assert!(peak < RSS_BOUND_KB, "broker peak RSS {peak} KiB exceeds {RSS_BOUND_KB} KiB");
    println!("broker peak RSS over 200 MiB with a stalled subscriber: {peak} KiB");
}

#[test]
fn sigterm_publishes_wills_and_exits_cleanly() {
    let (mut child, port, dir) = spawn_tern(&["--workers", "1"], "");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (mut watcher, _) = Client::connect(addr, "watcher", true);
    watcher.subscribe("will/#", QoS::AtMostOnce);
    let mut c = Connect::new("leaver");
    c.will = Some(Will {
        topic: "will/leaver".into(),
        payload: Bytes::from_static(b"server went away"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    let (mut leaver, _) = Client::connect_with(addr, c);
    leaver.sync();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let m = watcher.recv_publish();
    assert_eq!(m.topic, "will/leaver");
    let code = wait_exit(&mut child, "tern exits after SIGTERM");
    assert!(code.success(), "exit 0 after SIGTERM, got {code:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn invalid_config_names_the_key_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("tern-cfg-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, key) in [
        ("max_inflight_messages = 0\n", "max_inflight_messages"),
        ("prot = 1883\n", "prot"),
        ("port = \"x\"\n", "port"),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tern")).args(["-c", file.to_str().unwrap()]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "message names `{key}`: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
