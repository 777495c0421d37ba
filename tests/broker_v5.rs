//! MQTT 5.0 over TCP, 1 and 4 workers: CONNACK properties, session expiry, flow control, topic
//! aliases, message expiry, property pass-through, subscription options and identifiers, shared
//! subscriptions, will delay, reason codes, request/response, and 3.1.1 clients alongside.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tern::codec::*;
use tern::Config;

const V5: ProtocolVersion = ProtocolVersion::V5;

fn connect5(id: &str, clean: bool, props: Properties) -> Connect {
    Connect { protocol: V5, clean_start: clean, properties: props, ..Connect::new(id) }
}

fn expect_disconnect(c: &mut Client, code: ReasonCode) {
    let seen = c.expect_closed();
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason == code)),
        "expected DISCONNECT {code:?}, saw {seen:?}"
    );
}

fn publish5(topic: &str, qos: QoS, payload: &'static [u8], props: Properties) -> Publish {
    Publish {
        properties: (!props.is_empty()).then(|| Box::new(props)),
        ..Publish::new(topic, qos, Bytes::from_static(payload))
    }
}

#[test]
fn connack_advertises_what_the_server_supports() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (_c, ack) = Client::connect_with(b.local_addr(), connect5("", true, Properties::default()));
        let p = &ack.properties;
        assert!(p.assigned_client_identifier.as_ref().is_some_and(|id| !id.is_empty()), "[MQTT-3.2.2-16]");
        assert_eq!(p.receive_maximum, Some(32));
        assert_eq!(p.maximum_packet_size, Some(8 << 20), "the default max_packet_size");
        assert_eq!(p.topic_alias_maximum, Some(32));
        assert_eq!(p.retain_available, Some(1));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.subscription_identifier_available, Some(1));
        assert_eq!(p.shared_subscription_available, Some(1));
        let props = Properties { request_response_information: Some(1), ..Default::default() };
        let (_c, ack) = Client::connect_with(b.local_addr(), connect5("rr", true, props));
        assert!(ack.properties.response_information.is_some());
        b.shutdown();
    }
}

#[test]
fn session_expiry_keeps_a_session_exactly_that_long() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let expiring = || Properties { session_expiry_interval: Some(2), ..Default::default() };
        let (mut s, ack) = Client::connect_with(addr, connect5("exp", true, expiring()));
        assert!(!ack.session_present);
        s.subscribe("e/t", QoS::AtLeastOnce);
        s.disconnect();
        let (mut p, _) = Client::connect(addr, "pub", true);
        p.publish("e/t", "while away", QoS::AtLeastOnce, false);
        let (mut s, ack) = Client::connect_with(addr, connect5("exp", false, expiring()));
        assert!(ack.session_present, "resumed within the expiry interval");
        let m = s.recv_publish();
        assert_eq!(&m.payload[..], b"while away");
        s.ack(&m);
        s.disconnect();
        let gone = Instant::now();
        // After the interval the session is gone [MQTT-3.1.2-23]; poll with a deadline.
        loop {
            let (c, ack) = Client::connect_with(addr, connect5("probe", true, Properties::default()));
            c.disconnect();
            if gone.elapsed() > Duration::from_millis(2600) {
                let (_s, ack2) = Client::connect_with(addr, connect5("exp", false, expiring()));
                assert!(!ack2.session_present, "expired after 2 s");
                break;
            }
            assert_eq!(ack.code, ReasonCode::SUCCESS);
            std::thread::sleep(Duration::from_millis(200));
        }
        // Expiry 0 (the default): the session ends with the connection.
        let (s0, _) = Client::connect_with(addr, connect5("zero", true, Properties::default()));
        s0.disconnect();
        let (_s0, ack) = Client::connect_with(addr, connect5("zero", false, Properties::default()));
        assert!(!ack.session_present);
        b.shutdown();
    }
}

#[test]
fn receive_maximum_limits_unacknowledged_deliveries() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let props = Properties { receive_maximum: Some(2), ..Default::default() };
        let (mut s, _) = Client::connect_with(b.local_addr(), connect5("rm", true, props));
        s.subscribe("rm", QoS::AtLeastOnce);
        let (mut p, _) = Client::connect(b.local_addr(), "pub", true);
        for i in 0..6u8 {
            p.publish("rm", vec![i], QoS::AtLeastOnce, false);
        }
        let a = s.recv_publish();
        let c = s.recv_publish();
        // [MQTT-3.3.4-9]: no more than 2 unacknowledged.
        s.expect_silence(Duration::from_millis(300));
        s.ack(&a);
        s.ack(&c);
        let mut got = vec![a.payload[0], c.payload[0]];
        while got.len() < 6 {
            let m = s.recv_publish();
            got.push(m.payload[0]);
            s.ack(&m);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        b.shutdown();
    }
}

#[test]
fn client_maximum_packet_size_is_respected() {
    let b = start(1);
    let props = Properties { maximum_packet_size: Some(100), ..Default::default() };
    let (mut s, _) = Client::connect_with(b.local_addr(), connect5("small", true, props));
    s.subscribe("mp", QoS::AtLeastOnce);
    let (mut p, _) = Client::connect(b.local_addr(), "pub", true);
    p.publish("mp", vec![1u8; 500], QoS::AtLeastOnce, false);
    p.publish("mp", vec![2u8; 10], QoS::AtLeastOnce, false);
    let m = s.recv_publish();
    assert_eq!(&m.payload[..], &[2u8; 10], "[MQTT-3.1.2-24] the large one is not sent");
    s.ack(&m);
    b.shutdown();
}

#[test]
fn topic_aliases_are_resolved_and_never_forwarded() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut s, _) = Client::connect_with(b.local_addr(), connect5("alias-sub", true, Properties::default()));
        s.subscribe("long/topic/name", QoS::AtLeastOnce);
        let (mut p, _) = Client::connect_with(b.local_addr(), connect5("alias-pub", true, Properties::default()));
        let alias = |n| Properties { topic_alias: Some(n), ..Default::default() };
        let mut first = publish5("long/topic/name", QoS::AtLeastOnce, b"one", alias(3));
        first.packet_id = Some(pid(1));
        p.send(&Packet::Publish(first));
        let mut second = publish5("", QoS::AtLeastOnce, b"two", alias(3));
        second.packet_id = Some(pid(2));
        p.send(&Packet::Publish(second));
        for want in [&b"one"[..], b"two"] {
            let m = s.recv_publish();
            assert_eq!((m.topic.as_str(), &m.payload[..]), ("long/topic/name", want));
            assert!(m.properties.as_ref().is_none_or(|p| p.topic_alias.is_none()), "alias not forwarded");
            s.ack(&m);
        }
        // Alias above the maximum: DISCONNECT 0x94 [MQTT-3.3.2-9].
        p.send(&Packet::Publish(publish5("x", QoS::AtMostOnce, b"", alias(33))));
        expect_disconnect(&mut p, ReasonCode::TOPIC_ALIAS_INVALID);
        // An alias never set with an empty topic: protocol error.
        let (mut q, _) = Client::connect_with(b.local_addr(), connect5("alias-bad", true, Properties::default()));
        q.send(&Packet::Publish(publish5("", QoS::AtMostOnce, b"", alias(5))));
        expect_disconnect(&mut q, ReasonCode::PROTOCOL_ERROR);
        // Alias 0 (encoded by hand: our encoder would not write it): DISCONNECT 0x94 [MQTT-3.3.2-8].
        let (mut z, _) = Client::connect_with(b.local_addr(), connect5("alias-zero", true, Properties::default()));
        z.send_raw(&[0x30, 0x07, 0, 1, b'a', 3, 0x23, 0, 0]).unwrap();
        expect_disconnect(&mut z, ReasonCode::TOPIC_ALIAS_INVALID);
        // QoS 3: a Malformed Packet, DISCONNECT 0x81 [MQTT-3.3.1-4].
        let (mut m, _) = Client::connect_with(b.local_addr(), connect5("qos-three", true, Properties::default()));
        m.send_raw(&[0x36, 0x06, 0, 1, b'a', 0, 1, 0]).unwrap();
        expect_disconnect(&mut m, ReasonCode::MALFORMED_PACKET);
        b.shutdown();
    }
}

#[test]
fn the_broker_uses_topic_aliases_a_client_accepts() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let props = Properties { topic_alias_maximum: Some(2), ..Default::default() };
        let (mut s, _) = Client::connect_with(b.local_addr(), connect5("alias-in", true, props));
        s.subscribe("a/#", QoS::AtLeastOnce);
        let (mut p, _) = Client::connect(b.local_addr(), "pub", true);
        // (topic on the wire, alias) for a/1, a/1, a/2, a/3, a/1 with room for two aliases.
        let want = [("a/1", Some(1)), ("", Some(1)), ("a/2", Some(2)), ("a/3", None), ("", Some(1))];
        let mut resolved: std::collections::HashMap<u16, String> = std::collections::HashMap::new();
        for (i, topic) in ["a/1", "a/1", "a/2", "a/3", "a/1"].into_iter().enumerate() {
            p.publish(topic, vec![i as u8], QoS::AtLeastOnce, false);
            let m = s.recv_publish();
            let alias = m.properties.as_ref().and_then(|p| p.topic_alias);
            assert_eq!((m.topic.as_str(), alias), want[i], "[MQTT-3.3.2-12] message {i}");
            let topic_seen = if m.topic.is_empty() { resolved[&alias.unwrap()].clone() } else { m.topic.to_string() };
            if let (Some(a), false) = (alias, m.topic.is_empty()) {
                resolved.insert(a, m.topic.to_string());
            }
            assert_eq!(topic_seen, topic);
            s.ack(&m);
        }
        // Without topic alias maximum the client never sees one [MQTT-3.3.2-10].
        let (mut plain, _) = Client::connect_with(b.local_addr(), connect5("alias-none", true, Properties::default()));
        plain.subscribe("a/#", QoS::AtMostOnce);
        p.publish("a/1", "x", QoS::AtMostOnce, false);
        let m = plain.recv_publish();
        assert_eq!(m.topic, "a/1");
        assert!(m.properties.is_none());
        b.shutdown();
    }
}

#[test]
fn expired_messages_are_not_delivered_and_the_rest_carry_the_remaining_interval() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let keep = Properties { session_expiry_interval: Some(60), ..Default::default() };
        let (mut s, _) = Client::connect_with(addr, connect5("mx", true, keep.clone()));
        s.subscribe("mx", QoS::AtLeastOnce);
        s.disconnect();
        let (mut p, _) = Client::connect_with(addr, connect5("mx-pub", true, Properties::default()));
        let expiry = |secs| Properties { message_expiry_interval: Some(secs), ..Default::default() };
        let mut short = publish5("mx", QoS::AtLeastOnce, b"short", expiry(1));
        short.packet_id = Some(pid(1));
        p.send(&Packet::Publish(short));
        let mut long = publish5("mx", QoS::AtLeastOnce, b"long", expiry(100));
        long.packet_id = Some(pid(2));
        p.send(&Packet::Publish(long));
        p.sync();
        std::thread::sleep(Duration::from_millis(2100)); // let the short one expire while queued
        let (mut s, ack) = Client::connect_with(addr, connect5("mx", false, keep));
        assert!(ack.session_present);
        let m = s.recv_publish();
        assert_eq!(&m.payload[..], b"long", "[MQTT-3.3.2-5] the expired message is not sent");
        let left = m.properties.as_ref().and_then(|p| p.message_expiry_interval).unwrap();
        assert!((95..100).contains(&left), "[MQTT-3.3.2-6] remaining interval forwarded: {left}");
        s.ack(&m);
        s.sync();
        s.expect_silence(Duration::from_millis(200));
        b.shutdown();
    }
}

#[test]
fn publish_properties_pass_through_untouched_and_in_order() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut s, _) = Client::connect_with(b.local_addr(), connect5("props-sub", true, Properties::default()));
        s.subscribe("pp", QoS::AtLeastOnce);
        let (mut p, _) = Client::connect_with(b.local_addr(), connect5("props-pub", true, Properties::default()));
        let props = Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![("z".into(), "1".into()), ("a".into(), "2".into()), ("z".into(), "3".into())],
            ..Default::default()
        };
        let mut m = publish5("pp", QoS::AtLeastOnce, b"{}", props.clone());
        m.packet_id = Some(pid(1));
        p.send(&Packet::Publish(m));
        let got = s.recv_publish();
        assert_eq!(got.properties.as_deref(), Some(&props), "[MQTT-3.3.2-4]/[MQTT-3.3.2-17]/[MQTT-3.3.2-18]");
        s.ack(&got);
        // A 3.1.1 subscriber gets the same message without properties.
        let (mut old, _) = Client::connect(b.local_addr(), "old", true);
        old.subscribe("pp", QoS::AtMostOnce);
        let mut m = publish5("pp", QoS::AtLeastOnce, b"x", props);
        m.packet_id = Some(pid(2));
        p.send(&Packet::Publish(m));
        assert_eq!(&old.recv_publish().payload[..], b"x");
        b.shutdown();
    }
}

#[test]
fn subscription_options_and_identifiers() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut c, _) = Client::connect_with(addr, connect5("opts", true, Properties::default()));
        // Two overlapping subscriptions with identifiers 5 and 7: one copy carrying both.
        for (filter, id) in [("si/+", 5u32), ("si/#", 7)] {
            let pid_ = c.id();
            c.send(&Packet::Subscribe(Box::new(Subscribe {
                packet_id: pid_,
                filters: vec![(filter.into(), SubscriptionOptions::new(QoS::AtLeastOnce))],
                properties: Properties { subscription_identifiers: vec![id], ..Default::default() },
            })));
            c.recv_where(|p| matches!(p, Packet::SubAck(_)));
        }
        let (mut p, _) = Client::connect(addr, "p", true);
        p.publish("si/x", "ids", QoS::AtLeastOnce, false);
        let m = c.recv_publish();
        let mut ids = m.properties.as_ref().unwrap().subscription_identifiers.clone();
        ids.sort();
        assert_eq!(ids, vec![5, 7], "[MQTT-3.3.4-3]");
        c.ack(&m);
        c.sync();
        c.expect_silence(Duration::from_millis(200));

        // No local [MQTT-3.8.3-3]: our own publish does not come back.
        let nl = SubscriptionOptions { no_local: true, ..SubscriptionOptions::new(QoS::AtLeastOnce) };
        c.subscribe_opts("nl", nl);
        c.publish("nl", "mine", QoS::AtLeastOnce, false);
        p.publish("nl", "theirs", QoS::AtLeastOnce, false);
        let m = c.recv_publish();
        assert_eq!(&m.payload[..], b"theirs");
        c.ack(&m);

        // Retain as published keeps the flag on live messages [MQTT-3.3.1-12].
        let rap = SubscriptionOptions { retain_as_published: true, ..SubscriptionOptions::new(QoS::AtLeastOnce) };
        c.subscribe_opts("rap", rap);
        p.publish("rap", "kept", QoS::AtLeastOnce, true);
        let m = c.recv_publish();
        assert!(m.retain);
        c.ack(&m);

        // Retain handling: 0 sends retained each time, 1 only for a new subscription, 2 never.
        p.publish("rh", "stored", QoS::AtLeastOnce, true);
        let rh = |h| SubscriptionOptions { retain_handling: h, ..SubscriptionOptions::new(QoS::AtLeastOnce) };
        for (h, expect) in [
            (RetainHandling::Never, false),
            (RetainHandling::OnNewSubscribe, false), // exists already (from the line above)
            (RetainHandling::OnSubscribe, true),
        ] {
            c.subscribe_opts("rh", rh(h));
            if expect {
                let m = c.recv_publish();
                assert!(m.retain && m.topic == "rh");
                c.ack(&m);
            }
            c.sync();
            c.expect_silence(Duration::from_millis(150));
        }
        let (mut fresh, _) = Client::connect_with(addr, connect5("fresh", true, Properties::default()));
        fresh.subscribe_opts("rh", rh(RetainHandling::OnNewSubscribe));
        assert!(fresh.recv_publish().retain, "retain handling 1 on a new subscription sends it");
        b.shutdown();
    }
}

#[test]
fn shared_subscriptions_spread_messages_and_survive_a_member_leaving() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut p, _) = Client::connect(addr, "p", true);
        p.publish("sh/retained", "r", QoS::AtLeastOnce, true);
        let (mut a, _) = Client::connect_with(addr, connect5("member-a", true, Properties::default()));
        let (mut c311, _) = Client::connect(addr, "member-311", true); // 3.1.1 clients may share too
        assert_eq!(a.subscribe("$share/g/sh/#", QoS::AtLeastOnce), ReasonCode(1));
        assert_eq!(c311.subscribe("$share/g/sh/#", QoS::AtLeastOnce), ReasonCode(1));
        // [MQTT-4.8.2-...]: no retained messages on a shared subscription.
        a.sync();
        c311.sync();
        a.expect_silence(Duration::from_millis(200));
        c311.expect_silence(Duration::from_millis(10));
        for i in 0..20u8 {
            p.publish("sh/x", vec![i], QoS::AtLeastOnce, false);
        }
        let mut got = HashSet::new();
        let (mut na, mut nc) = (0, 0);
        while got.len() < 20 {
            if let Some(Packet::Publish(m)) = a.try_recv(Duration::from_millis(20)) {
                assert!(got.insert(m.payload[0]), "each message to one member only");
                na += 1;
                a.ack(&m);
            }
            if let Some(Packet::Publish(m)) = c311.try_recv(Duration::from_millis(20)) {
                assert!(got.insert(m.payload[0]), "each message to one member only");
                nc += 1;
                c311.ack(&m);
            }
        }
        assert!(na > 0 && nc > 0, "spread over members: {na} / {nc}");
        // A member leaving with unacknowledged messages: they go to the other member.
        let (mut leaver, _) = Client::connect(addr, "leaver", true);
        leaver.subscribe("$share/g2/lv", QoS::AtLeastOnce);
        let (mut stayer, _) = Client::connect(addr, "stayer", true);
        stayer.subscribe("$share/g2/lv", QoS::AtLeastOnce);
        for i in 0..10u8 {
            p.publish("lv", vec![i], QoS::AtLeastOnce, false);
        }
        // The leaver takes what it gets, acknowledges nothing, and goes away (clean session).
        leaver.sync();
        drop(leaver);
        let mut seen = HashSet::new();
        let end = Instant::now() + DEADLINE;
        while seen.len() < 10 {
            assert!(Instant::now() < end, "all 10 reached the remaining member, got {seen:?}");
            if let Some(Packet::Publish(m)) = stayer.try_recv(Duration::from_millis(100)) {
                seen.insert(m.payload[0]);
                stayer.ack(&m);
            }
        }
        b.shutdown();
    }
}

#[test]
fn will_delay_is_cancelled_by_a_timely_reconnect() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut watcher, _) = Client::connect(addr, "watcher", true);
        watcher.subscribe("wd/#", QoS::AtLeastOnce);
        let with_will = |id: &str| {
            let mut c = connect5(id, false, Properties { session_expiry_interval: Some(30), ..Default::default() });
            c.will = Some(Will {
                topic: format!("wd/{id}").as_str().into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties { will_delay_interval: Some(2), ..Default::default() },
            });
            c
        };
        let (back, _) = Client::connect_with(addr, with_will("back"));
        drop(back);
        let (_back, ack) = Client::connect_with(addr, with_will("back"));
        assert!(ack.session_present);
        let (gone, _) = Client::connect_with(addr, with_will("gone"));
        let dropped = Instant::now();
        drop(gone);
        let m = watcher.recv_publish();
        assert_eq!(m.topic, "wd/gone", "only the client that stayed away has its will sent");
        assert!(dropped.elapsed() >= Duration::from_millis(1900), "not before the delay: {:?}", dropped.elapsed());
        watcher.ack(&m);
        watcher.sync();
        watcher.expect_silence(Duration::from_millis(300));
        b.shutdown();
    }
}

#[test]
fn reason_codes_on_acks_and_disconnects() {
    for w in WORKER_COUNTS {
        let b = start_with(Config { max_packet_size: 1024, ..config(w) });
        let addr = b.local_addr();
        let (mut c, _) = Client::connect_with(addr, connect5("rc", true, Properties::default()));
        // PUBACK 0x10: nobody subscribes to it.
        let mut m = publish5("nobody/here", QoS::AtLeastOnce, b"x", Properties::default());
        m.packet_id = Some(pid(9));
        c.send(&Packet::Publish(m));
        let Packet::PubAck(a) = c.recv_where(|p| matches!(p, Packet::PubAck(_))) else { unreachable!() };
        assert_eq!(a.reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
        // SUBACK per filter and UNSUBACK 0x11.
        let id = c.id();
        c.send(&Packet::Subscribe(Box::new(Subscribe {
            packet_id: id,
            filters: vec![
                ("ok".into(), SubscriptionOptions::new(QoS::ExactlyOnce)),
                ("bad/#/x".into(), SubscriptionOptions::new(QoS::AtMostOnce)),
            ],
            properties: Properties::default(),
        })));
        let Packet::SubAck(sa) = c.recv() else { panic!() };
        assert_eq!(sa.codes, vec![ReasonCode::GRANTED_QOS_2, ReasonCode::TOPIC_FILTER_INVALID]);
        let uid = c.id();
        c.send(&Packet::Unsubscribe(Box::new(Unsubscribe {
            packet_id: uid,
            filters: vec!["ok".into(), "never".into()],
            properties: Properties::default(),
        })));
        let Packet::UnsubAck(ua) = c.recv() else { panic!() };
        assert_eq!(ua.codes, vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]);

        // 0x95: a packet over the maximum packet size.
        c.send(&Packet::Publish(publish5("big", QoS::AtMostOnce, &[0u8; 2000], Properties::default())));
        expect_disconnect(&mut c, ReasonCode::PACKET_TOO_LARGE);
        // 0x81: malformed (a property block that runs past the packet).
        let (mut c, _) = Client::connect_with(addr, connect5("rc2", true, Properties::default()));
        c.send_raw(&[0x30, 0x05, 0, 1, b'a', 9, 0x01]).unwrap();
        expect_disconnect(&mut c, ReasonCode::MALFORMED_PACKET);
        // 0x82: a protocol error (AUTH with no authentication method).
        let (mut c, _) = Client::connect_with(addr, connect5("rc3", true, Properties::default()));
        c.send(&Packet::Auth(Box::default()));
        expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR);
        // 0x93: more QoS 2 in flight than the receive maximum we advertised (32).
        let (mut c, _) = Client::connect_with(addr, connect5("rc4", true, Properties::default()));
        for i in 1..=33 {
            let mut m = publish5("q2", QoS::ExactlyOnce, b"x", Properties::default());
            m.packet_id = Some(pid(i));
            c.send(&Packet::Publish(m));
        }
        expect_disconnect(&mut c, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        // 0x8E: session taken over.
        let (mut first, _) = Client::connect_with(addr, connect5("twin", true, Properties::default()));
        let (_second, _) = Client::connect_with(addr, connect5("twin", true, Properties::default()));
        expect_disconnect(&mut first, ReasonCode::SESSION_TAKEN_OVER);
        // 0x8D: keep alive timeout.
        let (mut idle, _) =
            Client::connect_with(addr, Connect { keep_alive: 1, ..connect5("idle", true, Properties::default()) });
        expect_disconnect(&mut idle, ReasonCode::KEEP_ALIVE_TIMEOUT);
        // 0x8C: an authentication method we do not have.
        let auth = Properties { authentication_method: Some("SCRAM-SHA-256".into()), ..Default::default() };
        let (mut c, ack) = Client::connect_with(addr, connect5("auth", true, auth));
        assert_eq!(ack.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
        c.expect_closed();
        b.shutdown();
    }
}

#[test]
fn server_busy_at_the_connection_limit() {
    let b = start_with(Config { max_connections: 1, ..config(1) });
    let (_a, _) = Client::connect_with(b.local_addr(), connect5("a", true, Properties::default()));
    let (mut c, ack) = Client::connect_with(b.local_addr(), connect5("b", true, Properties::default()));
    assert_eq!(ack.code, ReasonCode::SERVER_BUSY);
    c.expect_closed();
    b.shutdown();
}

#[test]
fn disconnect_with_will_message_publishes_the_will() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let (mut watcher, _) = Client::connect(b.local_addr(), "watcher", true);
        watcher.subscribe("w4", QoS::AtMostOnce);
        let mut c = connect5("leaving", true, Properties::default());
        c.will = Some(Will {
            topic: "w4".into(),
            payload: Bytes::from_static(b"as asked"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        let (mut c, _) = Client::connect_with(b.local_addr(), c);
        c.send(&Packet::Disconnect(Box::new(Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL))));
        assert_eq!(&watcher.recv_publish().payload[..], b"as asked");
        b.shutdown();
    }
}

#[test]
fn request_response_across_protocol_versions() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut responder, _) = Client::connect_with(addr, connect5("responder", true, Properties::default()));
        responder.subscribe("service/time", QoS::AtLeastOnce);
        let (mut requester, _) = Client::connect_with(addr, connect5("requester", true, Properties::default()));
        requester.subscribe("reply/requester", QoS::AtLeastOnce);
        let req = Properties {
            response_topic: Some("reply/requester".into()),
            correlation_data: Some(Bytes::from_static(b"req-42")),
            ..Default::default()
        };
        let mut m = publish5("service/time", QoS::AtLeastOnce, b"what time is it", req);
        m.packet_id = Some(pid(1));
        requester.send(&Packet::Publish(m));
        let got = responder.recv_publish();
        responder.ack(&got);
        let props = got.properties.as_ref().unwrap();
        let reply_to = props.response_topic.clone().unwrap();
        let corr = props.correlation_data.clone().unwrap();
        let mut reply = publish5(
            &reply_to,
            QoS::AtLeastOnce,
            b"noon",
            Properties { correlation_data: Some(corr), ..Default::default() },
        );
        reply.packet_id = Some(pid(1));
        responder.send(&Packet::Publish(reply));
        let answer = requester.recv_publish();
        assert_eq!(&answer.payload[..], b"noon");
        assert_eq!(answer.properties.as_ref().unwrap().correlation_data.as_deref(), Some(&b"req-42"[..]));
        requester.ack(&answer);
        // 3.1.1 and 5.0 clients exchange messages both ways.
        let (mut old, _) = Client::connect(addr, "old", true);
        old.subscribe("mix/to311", QoS::AtLeastOnce);
        responder.subscribe("mix/to5", QoS::AtLeastOnce);
        old.publish("mix/to5", "from 3.1.1", QoS::AtLeastOnce, false);
        let m = responder.recv_publish();
        assert_eq!(&m.payload[..], b"from 3.1.1");
        responder.ack(&m);
        responder.publish("mix/to311", "from 5.0", QoS::ExactlyOnce, false);
        let m = old.recv_publish();
        assert_eq!((&m.payload[..], m.qos), (&b"from 5.0"[..], QoS::AtLeastOnce));
        old.ack(&m);
        b.shutdown();
    }
}

#[test]
fn rumqttc_v5_client_works() {
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    use rumqttc::v5::mqttbytes::QoS as Q;
    use rumqttc::v5::{Client as C5, Event, MqttOptions};
    for w in WORKER_COUNTS {
        let b = start(w);
        let mut opts = MqttOptions::new("rumqttc-v5", "127.0.0.1", b.local_addr().port());
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut conn) = C5::new(opts, 100);
        client.subscribe("v5/rumqttc", Q::AtLeastOnce).unwrap();
        let mut state = 0;
        let end = Instant::now() + DEADLINE;
        while state < 2 {
            let ev = conn.recv_timeout(end.saturating_duration_since(Instant::now())).expect("event in time");
            match ev.expect("no connection error") {
                Event::Incoming(P::SubAck(_)) => {
                    client.publish("v5/rumqttc", Q::AtLeastOnce, false, "hello v5").unwrap();
                    state = 1;
                }
                Event::Incoming(P::Publish(p)) => {
                    assert_eq!(&p.payload[..], b"hello v5");
                    state = 2;
                }
                _ => {}
            }
        }
        b.shutdown();
    }
}

#[test]
fn max_keepalive_is_the_server_keep_alive_for_5_0_and_refuses_longer_3_1_1_keep_alives() {
    for w in WORKER_COUNTS {
        let b = start_with(Config { max_keepalive: 1, ..config(w) });
        let addr = b.local_addr();
        // [MQTT-3.2.2-21]: the client asked for 10 s (and another for 0, no keep alive): both are
        // told 1 s, and held to it.
        for asked in [10, 0] {
            let (mut c, ack) = Client::connect_with(
                addr,
                Connect { keep_alive: asked, ..connect5("ka", true, Properties::default()) },
            );
            assert_eq!(ack.code, ReasonCode::SUCCESS);
            assert_eq!(ack.properties.server_keep_alive, Some(1), "asked for {asked}");
            expect_disconnect(&mut c, ReasonCode::KEEP_ALIVE_TIMEOUT);
        }
        // Within the maximum: no Server Keep Alive, the client's own value.
        let (_c, ack) =
            Client::connect_with(addr, Connect { keep_alive: 1, ..connect5("ok", true, Properties::default()) });
        assert_eq!(ack.properties.server_keep_alive, None);
        // 3.1.1 cannot be told: refused with 2 (identifier rejected), as mosquitto does.
        let (mut old, ack) = Client::connect_with(addr, Connect { keep_alive: 10, ..Connect::new("old") });
        assert_eq!(ack.code, ConnectReturnCode::IDENTIFIER_REJECTED);
        old.expect_closed();
        b.shutdown();
    }
}

/// The reason code reaches a client that is still talking when the broker disconnects it. The
/// client exceeds the receive maximum [MQTT-3.3.4-7], goes on writing 512 KiB more, and only then
/// reads, answering each PUBREC with PUBREL as a QoS 2 client does [MQTT-4.3.3]. Had the broker
/// closed at once, with those bytes unread, its kernel would have reset the connection, and the
/// client's first PUBREL would fail (EPIPE) before it reached the DISCONNECT, which is how the
/// Paho suite's client never sees the reason. tern writes what it owes, shuts its side and drains
/// what the client sends, so every PUBREL is taken and DISCONNECT 0x93 is read, then the end of
/// the stream. Another client on the broker is not disturbed.
#[test]
fn a_client_still_sending_when_disconnected_reads_the_reason_code() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let addr = b.local_addr();
        let (mut c, _) = Client::connect_with(addr, connect5("greedy", true, Properties::default()));
        let mut burst = bytes::BytesMut::new();
        for i in 1..=33 {
            let mut m = publish5("q2", QoS::ExactlyOnce, b"x", Properties::default());
            m.packet_id = Some(pid(i));
            Packet::Publish(m).encode(V5, &mut burst);
        }
        // Still talking: PINGREQs the broker will never answer, 512 KiB of them, in the same write.
        burst.extend(std::iter::repeat_n([0xC0u8, 0x00], 256 * 1024).flatten());
        c.send_raw(&burst).unwrap();
        // Read only once the broker has had every chance to close the connection.
        std::thread::sleep(Duration::from_millis(300));
        let mut recs = 0;
        loop {
            match c.recv() {
                Packet::PubRec(a) => {
                    recs += 1;
                    let mut rel = bytes::BytesMut::new();
                    Packet::PubRel(Ack::new(a.packet_id)).encode(V5, &mut rel);
                    if let Err(e) = c.send_raw(&rel) {
                        panic!("PUBREL {recs} refused ({e}) before the DISCONNECT was read");
                    }
                }
                Packet::Disconnect(d) => {
                    assert_eq!(d.reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(recs, 32, "a PUBREC for each message within the receive maximum");
        assert!(c.expect_closed().is_empty(), "nothing after the DISCONNECT but the end of the stream");
        let (mut other, _) = Client::connect_with(addr, connect5("calm", true, Properties::default()));
        other.subscribe("calm/t", QoS::AtLeastOnce);
        other.publish("calm/t", "ok", QoS::AtLeastOnce, false);
        assert_eq!(&other.recv_publish().payload[..], b"ok");
        b.shutdown();
    }
}

/// mosquitto's `message_size_limit`: a larger payload is not delivered, its QoS flow completes
/// (5.0: PUBACK / PUBREC 0x83; 3.1.1 cannot say it). A failing PUBREC ends a QoS 2 flow, so its
/// packet id takes no room in the receive maximum: 40 of them in a row (the maximum is 32) are
/// each refused, never DISCONNECT 0x93 [MQTT-4.3.3-4] [MQTT-3.3.4-7].
#[test]
fn message_size_limit_refuses_the_payload_and_completes_the_flow() {
    for w in WORKER_COUNTS {
        let b = start_with(Config { message_size_limit: 100, ..config(w) });
        let addr = b.local_addr();
        let (mut sub, _) = Client::connect_with(addr, connect5("size-sub", true, Properties::default()));
        sub.subscribe("size/#", QoS::ExactlyOnce);
        let (mut c, _) = Client::connect_with(addr, connect5("size-pub", true, Properties::default()));
        let big = Bytes::from(vec![b'x'; 101]);
        let id = c.id();
        c.send(&Packet::Publish(Publish {
            packet_id: Some(id),
            ..Publish::new("size/1", QoS::AtLeastOnce, big.clone())
        }));
        let Packet::PubAck(a) = c.recv_where(|p| matches!(p, Packet::PubAck(_))) else { unreachable!() };
        assert_eq!((a.packet_id, a.reason), (id, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR));
        for _ in 0..40 {
            let id = c.id();
            c.send(&Packet::Publish(Publish {
                packet_id: Some(id),
                ..Publish::new("size/2", QoS::ExactlyOnce, big.clone())
            }));
            let Packet::PubRec(r) = c.recv_where(|p| matches!(p, Packet::PubRec(_))) else { unreachable!() };
            assert_eq!((r.packet_id, r.reason), (id, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR));
        }
        c.publish("size/ok", vec![b'y'; 100], QoS::ExactlyOnce, false);
        let (mut old, _) = Client::connect(addr, "size-311", true);
        old.publish("size/3", big.clone(), QoS::AtLeastOnce, false); // acknowledged, dropped
        old.publish("size/ok311", vec![b'z'; 100], QoS::AtLeastOnce, false);
        // Two publishers (on different workers with 4): each one's order is kept [MQTT-4.6.0-6],
        // not the order between them.
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = sub.recv_publish();
            got.push((m.topic.to_string(), m.payload.len()));
            sub.ack(&m);
        }
        got.sort();
        let want = [("size/ok".to_string(), 100), ("size/ok311".to_string(), 100)];
        assert_eq!(got, want, "nothing over the limit was delivered");
        sub.expect_silence(Duration::from_millis(200));
        b.shutdown();
    }
}
