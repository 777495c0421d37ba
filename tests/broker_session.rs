//! Sessions over TCP, 1 and 4 workers: clean and persistent sessions, exactly-once across a
//! reconnect, client-id takeover, wills, keepalive and the connect timeout.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tern::codec::*;
use tern::Config;

#[test]
fn persistent_session_keeps_subscriptions_and_queues_while_offline() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut s, ack) = Client::connect(addr, "durable", false);
        assert!(!ack.session_present, "[MQTT-3.2.2-2]... new session");
        s.subscribe("d/#", QoS::AtLeastOnce);
        s.disconnect();
        let (mut p, _) = Client::connect(addr, "pub", true);
        for i in 0..5 {
            p.publish(&format!("d/{i}"), "q", QoS::AtLeastOnce, false);
        }
        p.publish("d/zero", "dropped for offline sessions", QoS::AtMostOnce, false);
        p.sync(); // routed (to every worker's ring) before the subscriber comes back
        let (mut s, ack) = Client::connect(addr, "durable", false);
        assert!(ack.session_present, "[MQTT-3.2.2-2] session present on resume");
        for i in 0..5 {
            let m = s.recv_publish();
            assert_eq!(m.topic, format!("d/{i}").as_str(), "queued in order");
            s.ack(&m);
        }
        s.sync();
        s.expect_silence(Duration::from_millis(200));
        s.disconnect();
        // Clean session discards it [MQTT-3.1.2-6].
        let (c, ack) = Client::connect(addr, "durable", true);
        assert!(!ack.session_present, "[MQTT-3.2.2-1]");
        c.disconnect();
        let (_c, ack) = Client::connect(addr, "durable", false);
        assert!(!ack.session_present, "the clean session ended with its connection");
        b.shutdown();
    }
}

#[test]
fn qos2_is_exactly_once_when_the_subscriber_drops_mid_flow() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut s, _) = Client::connect(addr, "eo-sub", false);
        s.subscribe("eo", QoS::ExactlyOnce);
        let (mut p, _) = Client::connect(addr, "eo-pub", true);
        for i in 0..10u8 {
            p.publish("eo", vec![i], QoS::ExactlyOnce, false);
        }
        // Take three messages: complete the first, PUBREC the second, ignore the third; drop.
        let m0 = s.recv_publish();
        s.ack(&m0);
        let m1 = s.recv_publish();
        s.send(&Packet::PubRec(Ack::new(m1.packet_id.unwrap())));
        s.recv_where(|p| matches!(p, Packet::PubRel(_)));
        let _m2 = s.recv_publish();
        drop(s); // socket closed without DISCONNECT, mid-flow

        let (mut s, ack) = Client::connect(addr, "eo-sub", false);
        assert!(ack.session_present);
        let mut got: Vec<u8> = vec![m0.payload[0]];
        let mut dup_seen = false;
        loop {
            match s.recv_where(|p| matches!(p, Packet::Publish(_) | Packet::PubRel(_))) {
                // [MQTT-4.4.0-1]: the PUBREL for m1 is sent again; m1 is not.
                Packet::PubRel(r) => {
                    assert_eq!(r.packet_id, m1.packet_id.unwrap());
                    got.push(m1.payload[0]);
                    s.send(&Packet::PubComp(Ack::new(r.packet_id)));
                }
                Packet::Publish(m) => {
                    if m.dup {
                        dup_seen = true;
                    }
                    got.push(m.payload[0]);
                    s.ack(&m);
                }
                _ => unreachable!(),
            }
            if got.len() == 10 {
                break;
            }
        }
        assert!(dup_seen, "[MQTT-3.3.1-1] the unacknowledged PUBLISH comes again with DUP");
        let distinct: HashSet<u8> = got.iter().copied().collect();
        assert_eq!(distinct.len(), 10, "each message exactly once: {got:?}");
        s.sync();
        s.expect_silence(Duration::from_millis(300));
        b.shutdown();
    }
}

#[test]
fn duplicate_qos2_publish_is_not_delivered_twice() {
    let b = start(1);
    let (mut s, _) = Client::connect(b.local_addr(), "s", true);
    s.subscribe("t", QoS::ExactlyOnce);
    let (mut p, _) = Client::connect(b.local_addr(), "p", true);
    let mut m = Publish::new("t", QoS::ExactlyOnce, Bytes::from_static(b"once"));
    m.packet_id = Some(pid(7));
    p.send(&Packet::Publish(m.clone()));
    p.recv_where(|x| matches!(x, Packet::PubRec(_)));
    m.dup = true;
    p.send(&Packet::Publish(m)); // a resend before PUBREL [MQTT-4.3.3-2]
    p.recv_where(|x| matches!(x, Packet::PubRec(_)));
    p.send(&Packet::PubRel(Ack::new(pid(7))));
    p.recv_where(|x| matches!(x, Packet::PubComp(_)));
    let got = s.recv_publish();
    s.ack(&got);
    s.sync();
    s.expect_silence(Duration::from_millis(300));
    b.shutdown();
}

#[test]
fn second_connection_with_same_client_id_takes_over() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut watcher, _) = Client::connect(addr, "watcher", true);
        watcher.subscribe("will/#", QoS::AtLeastOnce);
        let mut c = Connect::new("twin");
        c.will = Some(Will {
            topic: "will/twin".into(),
            payload: Bytes::from_static(b"first gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        });
        let (mut first, _) = Client::connect_with(addr, c);
        first.subscribe("x", QoS::AtMostOnce);
        let (mut second, ack) = Client::connect(addr, "twin", true);
        assert_eq!(ack.code, ReasonCode::SUCCESS);
        first.expect_closed(); // [MQTT-3.1.4-2]
        let w = watcher.recv_publish();
        assert_eq!(w.topic, "will/twin", "the first connection ended without DISCONNECT");
        watcher.ack(&w);
        second.sync();
        b.shutdown();
    }
}

fn will_connect(id: &str, keep_alive: u16) -> Connect {
    let mut c = Connect::new(id);
    c.keep_alive = keep_alive;
    c.will = Some(Will {
        topic: format!("will/{id}").as_str().into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
    });
    c
}

#[test]
fn will_is_published_on_abnormal_close_and_not_after_disconnect() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut watcher, _) = Client::connect(addr, "watcher", true);
        watcher.subscribe("will/#", QoS::AtLeastOnce);

        let (polite, _) = Client::connect_with(addr, will_connect("polite", 60));
        polite.disconnect(); // [MQTT-3.14.4-3]: will discarded

        let (rude, _) = Client::connect_with(addr, will_connect("rude", 60));
        drop(rude); // [MQTT-3.1.2-8]: network closed without DISCONNECT

        let (mut bad, _) = Client::connect_with(addr, will_connect("bad", 60));
        bad.send_raw(&[0x00, 0x00]).unwrap(); // reserved packet type: protocol error
        bad.expect_closed();

        let mut got = vec![watcher.recv_publish(), watcher.recv_publish()];
        got.sort_by(|a, b| a.topic.cmp(&b.topic));
        assert_eq!(got[0].topic, "will/bad");
        assert_eq!(got[1].topic, "will/rude");
        for m in &got {
            watcher.ack(m);
        }
        watcher.sync();
        watcher.expect_silence(Duration::from_millis(300));
        // The will was retained: a late subscriber gets it [MQTT-3.1.2-17].
        let (mut late, _) = Client::connect(addr, "late", true);
        late.subscribe("will/rude", QoS::AtLeastOnce);
        let m = late.recv_publish();
        assert!(m.retain);
        b.shutdown();
    }
}

/// A client that sends its last PUBLISH and closes at once: the broker reads the message and the
/// end of the stream from one readiness event (the broker stops reading at a short read unless
/// the event said the input ended). No keepalive, so only the end of the stream can end the
/// session: the PUBLISH is delivered and the will published [MQTT-3.1.2-8], for every client.
#[test]
fn a_publish_followed_at_once_by_the_close_is_read_and_the_close_seen() {
    const CLIENTS: usize = 50;
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut watcher, _) = Client::connect(addr, "watcher", true);
        watcher.subscribe("last/#", QoS::AtLeastOnce);
        watcher.subscribe("will/#", QoS::AtLeastOnce);
        for i in 0..CLIENTS {
            let (mut c, _) = Client::connect_with(addr, will_connect(&format!("quick{i}"), 0));
            c.publish(&format!("last/quick{i}"), "bye", QoS::AtMostOnce, false);
            c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let (mut last, mut wills) = (0, 0);
        while last + wills < 2 * CLIENTS {
            let m = watcher.recv_publish();
            watcher.ack(&m);
            if m.topic.starts_with("last/") {
                last += 1;
            } else {
                wills += 1;
            }
        }
        assert_eq!((last, wills), (CLIENTS, CLIENTS), "{w} worker(s)");
        b.shutdown();
    }
}

#[test]
fn keepalive_timeout_closes_and_publishes_the_will() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut watcher, _) = Client::connect(addr, "watcher", true);
        watcher.subscribe("will/#", QoS::AtLeastOnce);
        let started = std::time::Instant::now();
        let (mut silent, _) = Client::connect_with(addr, will_connect("silent", 1));
        silent.expect_closed();
        // [MQTT-3.1.2-24]: not before one and a half times the keep alive.
        assert!(started.elapsed() >= Duration::from_millis(1500), "closed after {:?}", started.elapsed());
        assert_eq!(watcher.recv_publish().topic, "will/silent");
        // A client that pings stays.
        let (mut pinger, _) = Client::connect_with(addr, will_connect("pinger", 1));
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(500)); // the client's own keepalive schedule
            pinger.sync();
        }
        b.shutdown();
    }
}

#[test]
fn a_socket_that_never_sends_connect_is_closed() {
    let b = start_with(Config { connect_timeout: 1, ..config(1) });
    let mut idle = Client::open(b.local_addr(), ProtocolVersion::V311);
    assert!(idle.expect_closed().is_empty());
    b.shutdown();
}

#[test]
fn empty_client_id_needs_clean_session() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut c, ack) = Client::connect(b.local_addr(), "", true);
        assert_eq!(ack.code, ReasonCode::SUCCESS, "[MQTT-3.1.3-6] an id is assigned");
        c.subscribe("a", QoS::AtMostOnce);
        let (mut c2, ack) = Client::connect(b.local_addr(), "", false);
        assert_eq!(ack.code, ConnectReturnCode::IDENTIFIER_REJECTED, "[MQTT-3.1.3-8]");
        c2.expect_closed();
        let (_c3, ack) = Client::connect_v(b.local_addr(), "", true, ProtocolVersion::V31);
        assert_eq!(ack.code, ConnectReturnCode::IDENTIFIER_REJECTED, "3.1 requires an id");
        b.shutdown();
    }
}

#[test]
fn protocol_level_and_second_connect_are_enforced() {
    let b = start(1);
    // [MQTT-3.1.2-2]: unsupported level -> CONNACK 0x01 and close.
    let mut c = Client::open(b.local_addr(), ProtocolVersion::V311);
    c.send_raw(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60, 0, 0]).unwrap();
    let seen = c.expect_closed();
    assert!(
        matches!(&seen[..], [Packet::ConnAck(a)] if a.code == ConnectReturnCode::UNACCEPTABLE_PROTOCOL_VERSION),
        "{seen:?}"
    );
    // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation.
    let (mut c, _) = Client::connect(b.local_addr(), "twice", true);
    c.send(&Packet::Connect(Box::new(Connect::new("twice"))));
    c.expect_closed();
    // MQTT 3.1 (MQIsdp) clients are served.
    let (mut old, ack) = Client::connect_v(b.local_addr(), "old", true, ProtocolVersion::V31);
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    old.subscribe("v31", QoS::AtLeastOnce);
    let (mut p, _) = Client::connect(b.local_addr(), "new", true);
    p.publish("v31", "hi", QoS::AtLeastOnce, false);
    assert_eq!(&old.recv_publish().payload[..], b"hi");
    b.shutdown();
}

#[test]
fn max_connections_is_enforced_with_a_refusal() {
    let b = start_with(Config { max_connections: 2, ..config(1) });
    let (_a, _) = Client::connect(b.local_addr(), "a", true);
    let (_b, _) = Client::connect(b.local_addr(), "b", true);
    let (mut c, ack) = Client::connect(b.local_addr(), "c", true);
    assert_eq!(ack.code, ConnectReturnCode::SERVER_UNAVAILABLE);
    c.expect_closed();
    b.shutdown();
}
