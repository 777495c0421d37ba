//! Flow control: a QoS 1/2 publisher faster than its subscribers is paced by them (its
//! acknowledgements withheld, its socket not read) instead of outrunning a queue that would drop
//! what was acknowledged; a subscriber that stops acknowledging holds publishers at most
//! `slow_subscriber_timeout`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tern::codec::*;

/// Publishes `count` QoS `qos` messages keeping up to `window` unacknowledged, as a load tool
/// with a large window does. Returns when every one is acknowledged.
fn publish_windowed(p: &mut Client, topic: &str, count: usize, window: usize, qos: QoS, payload: usize) {
    let mut outstanding = 0usize;
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent < count || outstanding > 0 {
        assert!(Instant::now() < deadline, "publishing took too long: {sent} sent, {outstanding} unacknowledged");
        while sent < count && outstanding < window {
            let mut body = format!("{sent:08}").into_bytes();
            body.resize(payload.max(8), b'.');
            let mut m = Publish::new(topic, qos, Bytes::from(body));
            m.packet_id = Some(p.id());
            p.send(&Packet::Publish(m));
            sent += 1;
            outstanding += 1;
        }
        match p.try_recv(Duration::from_millis(50)) {
            Some(Packet::PubAck(_)) | Some(Packet::PubComp(_)) => outstanding -= 1,
            Some(Packet::PubRec(a)) => p.send(&Packet::PubRel(Ack::new(a.packet_id))),
            _ => {}
        }
    }
}

fn dropped(watcher: &mut Client) -> u64 {
    loop {
        let m = watcher.recv_publish();
        if m.topic == "$SYS/broker/publish/messages/dropped" {
            return std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        }
    }
}

#[test]
fn a_publisher_with_a_window_larger_than_the_subscribers_loses_nothing() {
    for w in [1, 4] {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            // A small queue, so that without pacing the publishers would overflow it at once.
            let b = start_with(tern::Config { max_queued_messages: 100, ..config(w) });
            let addr = b.local_addr();
            let (mut sub, _) = Client::connect(addr, "flow-sub", true);
            sub.subscribe("flow/+", qos);
            let count = 3_000;
            // Two publishers (fan-in), 200 in flight each: ten times the subscriber's window.
            let publishers: Vec<_> = (0..2)
                .map(|n| {
                    std::thread::spawn(move || {
                        let (mut p, _) = Client::connect(addr, &format!("flow-pub-{n}"), true);
                        publish_windowed(&mut p, &format!("flow/{n}"), count, 200, qos, 32);
                    })
                })
                .collect();
            let mut next = [0usize; 2];
            for _ in 0..2 * count {
                let m = sub.recv_publish();
                let n: usize = m.topic[5..].parse().unwrap();
                assert_eq!(
                    &m.payload[..8],
                    format!("{:08}", next[n]).as_bytes(),
                    "{w} worker(s), {qos:?}, publisher {n}: in order, none lost"
                );
                next[n] += 1;
                sub.ack(&m);
            }
            for p in publishers {
                p.join().unwrap();
            }
            let (mut watcher, _) = Client::connect(addr, "flow-watch", true);
            watcher.subscribe("$SYS/broker/publish/messages/dropped", QoS::AtMostOnce);
            assert_eq!(dropped(&mut watcher), 0, "{w} worker(s), {qos:?}: nothing dropped");
            b.shutdown();
        }
    }
}

/// Two subscribers, one stops reading. The publisher is paused while the stalled one's queue is
/// congested, at most `slow_subscriber_timeout` (1 s here); then the healthy subscriber receives
/// at full rate again, every message in order, and the stalled one's drops are counted.
#[test]
fn a_stalled_subscriber_holds_the_publisher_at_most_the_timeout() {
    for w in [1, 4] {
        let b = start_with(tern::Config {
            max_queued_messages: 100,
            max_output_bytes: 64 * 1024,
            slow_subscriber_timeout: 1,
            ..config(w)
        });
        let addr = b.local_addr();
        let (mut stalled, _) = Client::connect(addr, "stall-sub", true);
        stalled.subscribe("stall/t", QoS::AtLeastOnce);
        // From here on it reads nothing: its socket buffers fill, then its output, then its queue.
        let (mut healthy, _) = Client::connect(addr, "healthy-sub", true);
        healthy.subscribe("stall/t", QoS::AtLeastOnce);
        let count = 3_000;
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut gaps = Duration::ZERO;
                let mut last = Instant::now();
                for i in 0..count {
                    let m = healthy.recv_publish();
                    assert_eq!(&m.payload[..8], format!("{i:08}").as_bytes(), "healthy subscriber: {i} in order");
                    healthy.ack(&m);
                    gaps = gaps.max(last.elapsed());
                    last = Instant::now();
                }
                done.store(true, Ordering::SeqCst);
                gaps
            })
        };
        let (mut p, _) = Client::connect(addr, "stall-pub", true);
        let started = Instant::now();
        publish_windowed(&mut p, "stall/t", count, 20, QoS::AtLeastOnce, 4096);
        let longest_gap = reader.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // Paused at most the timeout (1 s), plus the time to notice on a loaded machine.
        assert!(longest_gap < Duration::from_millis(2500), "{w} worker(s): healthy subscriber waited {longest_gap:?}");
        assert!(started.elapsed() < Duration::from_secs(60));
        let (mut watcher, _) = Client::connect(addr, "stall-watch", true);
        watcher.subscribe("$SYS/broker/publish/messages/dropped", QoS::AtMostOnce);
        let deadline = Instant::now() + DEADLINE;
        while dropped(&mut watcher) == 0 {
            assert!(Instant::now() < deadline, "{w} worker(s): the stalled subscriber's drops are counted");
        }
        drop(stalled);
        b.shutdown();
    }
}

/// QoS 0 is at most once, but a subscriber that keeps reading loses nothing to a burst: when a
/// burst of deliveries fills its output buffer (`max_output_bytes`) within one turn of the
/// broker, what the socket takes is written out then and there, and only what the socket refuses
/// is dropped. With 4 workers the publisher is on another worker than the subscriber for some of
/// the rounds, so the burst also comes through a ring at once.
#[test]
fn a_qos0_burst_larger_than_the_output_bound_reaches_a_subscriber_that_keeps_reading() {
    for w in WORKER_COUNTS {
        let b = start_with(tern::Config { max_output_bytes: 4096, ..config(w) });
        let addr = b.local_addr();
        for round in 0..4 {
            let topic = format!("burst/{round}");
            let (mut sub, _) = Client::connect(addr, &format!("burst-sub-{round}"), true);
            sub.subscribe(&topic, QoS::AtMostOnce);
            let (mut publ, _) = Client::connect(addr, &format!("burst-pub-{round}"), true);
            const N: usize = 32; // x 1 KiB: eight times the output bound, in one write
            let mut out = bytes::BytesMut::new();
            for i in 0..N {
                let mut body = format!("{i:08}").into_bytes();
                body.resize(1024, b'.');
                Packet::Publish(Publish::new(topic.as_str(), QoS::AtMostOnce, Bytes::from(body)))
                    .encode(ProtocolVersion::V311, &mut out);
            }
            use std::io::Write;
            publ.stream.write_all(&out).unwrap();
            for i in 0..N {
                let m = sub.recv_publish();
                assert_eq!(&m.payload[..8], format!("{i:08}").as_bytes(), "{w} workers: in order, none dropped");
            }
        }
        b.shutdown();
    }
}
