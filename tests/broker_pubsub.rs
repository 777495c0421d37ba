//! Publish/subscribe over TCP against the real broker, 1 and 4 workers: QoS levels, overlapping
//! subscriptions, wildcards and `$SYS`, retained messages, SUBACK/UNSUBACK.

mod common;

use std::time::Duration;

use common::*;
use tern::codec::*;

#[test]
fn delivered_qos_is_the_minimum_of_published_and_granted() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let mut subs: Vec<Client> = Vec::new();
        for granted in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let (mut s, _) = Client::connect(addr, &format!("sub-{granted:?}"), true);
            assert_eq!(s.subscribe("q/t", granted), ReasonCode(granted as u8), "SUBACK grants the requested QoS");
            subs.push(s);
        }
        let (mut p, _) = Client::connect(addr, "pub", true);
        for published in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            p.publish("q/t", format!("{published:?}"), published, false);
            for (i, s) in subs.iter_mut().enumerate() {
                let m = s.recv_publish();
                assert_eq!(&m.payload[..], format!("{published:?}").as_bytes());
                // [MQTT-3.3.5-1]... delivered at min(published, granted)
                assert_eq!(m.qos, published.min(QoS::from_u8(i as u8).unwrap()), "workers={w}");
                assert!(!m.retain, "[MQTT-3.3.1-9] retain is cleared on normal forwarding");
                assert_eq!(m.packet_id.is_some(), m.qos != QoS::AtMostOnce);
                s.ack(&m);
            }
        }
        b.shutdown();
    }
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut s, _) = Client::connect(b.local_addr(), "overlap", true);
        s.subscribe("a/+", QoS::AtMostOnce);
        s.subscribe("a/#", QoS::ExactlyOnce);
        s.subscribe("a/b", QoS::AtLeastOnce);
        let (mut p, _) = Client::connect(b.local_addr(), "pub", true);
        p.publish("a/b", "x", QoS::ExactlyOnce, false);
        let m = s.recv_publish();
        assert_eq!(m.qos, QoS::ExactlyOnce);
        s.ack(&m);
        s.sync();
        s.expect_silence(Duration::from_millis(300));
        b.shutdown();
    }
}

#[test]
fn wildcards_follow_the_spec_and_skip_dollar_topics() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut all, _) = Client::connect(b.local_addr(), "all", true);
        all.subscribe("#", QoS::AtMostOnce);
        let (mut plus, _) = Client::connect(b.local_addr(), "plus", true);
        plus.subscribe("+/+", QoS::AtMostOnce);
        let (mut sys, _) = Client::connect(b.local_addr(), "sys", true);
        sys.subscribe("$SYS/broker/uptime", QoS::AtMostOnce);
        // [MQTT-4.7.2-1]: `#` and `+/+` must not see $SYS, which the broker publishes every second.
        let m = sys.recv_publish();
        assert_eq!(m.topic, "$SYS/broker/uptime");
        assert!(std::str::from_utf8(&m.payload).unwrap().ends_with("seconds"));
        let (mut p, _) = Client::connect(b.local_addr(), "pub", true);
        p.publish("x/", "empty level", QoS::AtLeastOnce, false);
        p.publish("x/y/z", "deep", QoS::AtLeastOnce, false);
        assert_eq!(all.recv_publish().topic, "x/");
        assert_eq!(all.recv_publish().topic, "x/y/z");
        assert_eq!(plus.recv_publish().topic, "x/", "+ matches an empty level");
        all.sync();
        plus.sync();
        all.expect_silence(Duration::from_millis(1500));
        plus.expect_silence(Duration::from_millis(10));
        b.shutdown();
    }
}

#[test]
fn sys_topics_carry_mosquitto_names() {
    let b = start(1);
    let (mut s, _) = Client::connect(b.local_addr(), "sys", true);
    s.subscribe("$SYS/#", QoS::AtMostOnce);
    let mut seen = std::collections::HashSet::new();
    let wanted = [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/clients/total",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
        "$SYS/broker/publish/messages/dropped",
        "$SYS/broker/heap/current",
        "$SYS/broker/load/messages/received/1min",
    ];
    while !wanted.iter().all(|t| seen.contains(*t)) {
        let m = s.recv_publish();
        if m.topic == "$SYS/broker/clients/connected" {
            assert!(m.payload != "0", "this client is connected");
        }
        seen.insert(m.topic.to_string());
    }
    b.shutdown();
}

#[test]
fn retained_messages_are_stored_replaced_cleared_and_sent_on_subscribe() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut p, _) = Client::connect(addr, "pub", true);
        p.publish("r/1", "first", QoS::AtLeastOnce, true);
        p.publish("r/1", "second", QoS::AtLeastOnce, true); // replaces [MQTT-3.3.1-5]
        p.publish("r/2", "two", QoS::AtMostOnce, true);
        p.publish("r/3", "three", QoS::AtLeastOnce, true);
        p.publish("r/3", "", QoS::AtLeastOnce, true); // clears [MQTT-3.3.1-10]
        p.sync();
        // The retained store is replicated to every worker: a subscriber on any of them sees it.
        for i in 0..4 {
            let (mut s, _) = Client::connect(addr, &format!("late-{i}"), true);
            s.subscribe("r/#", QoS::AtLeastOnce);
            let mut got = vec![];
            for _ in 0..2 {
                let m = s.recv_publish();
                assert!(m.retain, "[MQTT-3.3.1-8] retain set on messages sent for a new subscription");
                got.push((m.topic.to_string(), String::from_utf8(m.payload.to_vec()).unwrap(), m.qos));
                s.ack(&m);
            }
            got.sort();
            assert_eq!(
                got,
                vec![("r/1".into(), "second".into(), QoS::AtLeastOnce), ("r/2".into(), "two".into(), QoS::AtMostOnce)],
                "workers={w}"
            );
            s.sync();
            s.expect_silence(Duration::from_millis(100));
            // A live publish with the retain flag reaches existing subscribers with it cleared.
            p.publish("r/4", "live", QoS::AtMostOnce, true);
            let m = s.recv_publish();
            assert_eq!((m.topic.as_str(), m.retain), ("r/4", false));
            p.publish("r/4", "", QoS::AtMostOnce, true);
            s.recv_publish();
        }
        b.shutdown();
    }
}

#[test]
fn suback_refuses_invalid_filters_and_unsubscribe_stops_delivery() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut s, _) = Client::connect(b.local_addr(), "s", true);
        let id = s.id();
        let sub = Subscribe {
            packet_id: id,
            filters: vec![
                ("ok/+".into(), SubscriptionOptions::new(QoS::AtLeastOnce)),
                ("bad/#/x".into(), SubscriptionOptions::new(QoS::AtLeastOnce)),
                ("bad+".into(), SubscriptionOptions::new(QoS::AtMostOnce)),
            ],
            properties: Properties::default(),
        };
        s.send(&Packet::Subscribe(Box::new(sub)));
        let Packet::SubAck(ack) = s.recv() else { panic!("SUBACK") };
        assert_eq!(ack.packet_id, id, "[MQTT-3.8.4-2] same packet id");
        assert_eq!(
            ack.codes,
            vec![ReasonCode(1), ReasonCode(0x80), ReasonCode(0x80)],
            "one code per filter [MQTT-3.9.3-1]"
        );
        let (mut p, _) = Client::connect(b.local_addr(), "p", true);
        p.publish("ok/1", "a", QoS::AtLeastOnce, false);
        let m = s.recv_publish();
        s.ack(&m);
        let uid = s.id();
        s.send(&Packet::Unsubscribe(Box::new(Unsubscribe {
            packet_id: uid,
            filters: vec!["ok/+".into()],
            properties: Properties::default(),
        })));
        let Packet::UnsubAck(u) = s.recv() else { panic!("UNSUBACK") };
        assert_eq!(u.packet_id, uid, "[MQTT-3.10.4-4]");
        p.publish("ok/1", "b", QoS::AtLeastOnce, false);
        p.sync();
        s.sync();
        s.expect_silence(Duration::from_millis(300));
        b.shutdown();
    }
}

#[test]
fn messages_of_one_topic_keep_their_order() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut s, _) = Client::connect(b.local_addr(), "order-sub", true);
        s.subscribe("o", QoS::ExactlyOnce);
        let (mut p, _) = Client::connect(b.local_addr(), "order-pub", true);
        for i in 0..300u32 {
            let qos = QoS::from_u8((i % 3) as u8).unwrap();
            let mut m = Publish::new("o", qos, i.to_be_bytes().to_vec());
            if qos != QoS::AtMostOnce {
                m.packet_id = Some(p.id());
            }
            p.send(&Packet::Publish(m));
        }
        // [MQTT-4.6.0-6]: in the order received, for the same topic and QoS.
        let mut last: [Option<u32>; 3] = [None; 3];
        for _ in 0..300 {
            let m = s.recv_publish();
            let i = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
            let q = m.qos as usize;
            assert!(last[q].is_none_or(|l| i > l), "order kept at QoS {q}: {i} after {:?}", last[q]);
            last[q] = Some(i);
            s.ack(&m);
        }
        assert_eq!(last, [Some(297), Some(298), Some(299)], "none lost");
        b.shutdown();
    }
}

#[test]
fn ping_is_answered() {
    let b = start(1);
    let (mut c, _) = Client::connect(b.local_addr(), "ping", true);
    c.send(&Packet::PingReq);
    assert_eq!(c.recv(), Packet::PingResp, "[MQTT-3.12.4-1]");
    b.shutdown();
}
