//! Independent clients against the real broker: rumqttc (a Rust client library with its own
//! codec) and, when installed, mosquitto_pub / mosquitto_sub.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

fn rumqttc_client(port: u16, id: &str) -> (Client, rumqttc::Connection) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    Client::new(opts, 100)
}

/// Drives a rumqttc connection until `done` says so, with a deadline.
fn pump(conn: &mut rumqttc::Connection, mut done: impl FnMut(&Event) -> bool) {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "rumqttc did not see the expected event in time");
        match conn.recv_timeout(left) {
            Ok(Ok(ev)) => {
                if done(&ev) {
                    return;
                }
            }
            Ok(Err(e)) => panic!("rumqttc connection error: {e}"),
            Err(_) => panic!("rumqttc timed out"),
        }
    }
}

#[test]
fn rumqttc_publishes_and_subscribes_at_every_qos() {
    for w in WORKER_COUNTS {
        let b = start(w);
        let port = b.local_addr().port();
        let (sub, mut sub_conn) = rumqttc_client(port, "rumq-sub");
        sub.subscribe("rq/#", QoS::ExactlyOnce).unwrap();
        pump(&mut sub_conn, |e| matches!(e, Event::Incoming(Packet::SubAck(_))));
        let (publ, mut pub_conn) = rumqttc_client(port, "rumq-pub");
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            publ.publish(format!("rq/{i}"), qos, false, vec![i as u8; 100]).unwrap();
        }
        // The publisher's flows complete (PUBACK, PUBREC/PUBCOMP from the broker).
        let mut acks = 0;
        pump(&mut pub_conn, |e| {
            if matches!(e, Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_))) {
                acks += 1;
            }
            acks == 2
        });
        let mut got = vec![];
        pump(&mut sub_conn, |e| {
            if let Event::Incoming(Packet::Publish(p)) = e {
                got.push((p.topic.clone(), p.qos, p.payload.len()));
            }
            got.len() == 3
        });
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("rq/0".to_string(), QoS::AtMostOnce, 100),
                ("rq/1".to_string(), QoS::AtLeastOnce, 100),
                ("rq/2".to_string(), QoS::ExactlyOnce, 100)
            ],
            "workers={w}"
        );
        b.shutdown();
    }
}

#[test]
fn rumqttc_and_our_codec_talk_through_the_broker() {
    let b = start(4);
    let port = b.local_addr().port();
    let (mut ours, _) = common::Client::connect(b.local_addr(), "ours", true);
    ours.subscribe("mixed", tern::codec::QoS::AtLeastOnce);
    let (theirs, mut conn) = rumqttc_client(port, "theirs");
    theirs.subscribe("back", QoS::AtLeastOnce).unwrap();
    pump(&mut conn, |e| matches!(e, Event::Incoming(Packet::SubAck(_))));
    theirs.publish("mixed", QoS::AtLeastOnce, false, "from rumqttc").unwrap();
    pump(&mut conn, |e| matches!(e, Event::Incoming(Packet::PubAck(_))));
    let m = ours.recv_publish();
    assert_eq!(&m.payload[..], b"from rumqttc");
    ours.ack(&m);
    ours.publish("back", "from tern's codec", tern::codec::QoS::AtLeastOnce, false);
    pump(&mut conn, |e| matches!(e, Event::Incoming(Packet::Publish(p)) if &p.payload[..] == b"from tern's codec"));
    b.shutdown();
}

fn mosquitto_clients() -> bool {
    let found = Command::new("mosquitto_pub").arg("--help").output().is_ok();
    if !found {
        eprintln!("mosquitto-clients not installed: skipping (apt-get install mosquitto-clients; .ci/run installs it)");
    }
    found
}

#[test]
fn mosquitto_pub_and_sub_work_against_tern() {
    if !mosquitto_clients() {
        return;
    }
    for w in WORKER_COUNTS {
        let b = start(w);
        let port = b.local_addr().port().to_string();
        let (mut watcher, _) = common::Client::connect(b.local_addr(), "watcher", true);
        watcher.subscribe("mq/#", tern::codec::QoS::ExactlyOnce);
        for (qos, version) in [("0", "mqttv311"), ("1", "mqttv31"), ("2", "mqttv5")] {
            let st = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-t",
                    &format!("mq/{qos}"),
                    "-m",
                    "hello",
                    "-q",
                    qos,
                    "-V",
                    version,
                ])
                .status()
                .unwrap();
            assert!(st.success(), "mosquitto_pub -q {qos} -V {version}");
            let m = watcher.recv_publish();
            assert_eq!((m.topic.to_string(), &m.payload[..]), (format!("mq/{qos}"), &b"hello"[..]));
            watcher.ack(&m);
        }
        // mosquitto_sub receives a retained message and a live one, then exits (-C 2).
        let (mut p, _) = common::Client::connect(b.local_addr(), "p", true);
        p.publish("ms/ret", "kept", tern::codec::QoS::AtLeastOnce, true);
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-t", "ms/#", "-q", "1", "-C", "2", "-v", "-W", "20"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Publish the live message once the subscription exists: the retained copy shows up
        // first in mosquitto_sub's output, which we cannot watch without blocking, so keep
        // publishing until mosquitto_sub has its two messages and exits.
        let started = Instant::now();
        let out = {
            let mut sub = sub;
            loop {
                p.publish("ms/live", "now", tern::codec::QoS::AtLeastOnce, false);
                if let Some(_status) = sub.try_wait().unwrap() {
                    break sub.wait_with_output().unwrap();
                }
                assert!(started.elapsed() < DEADLINE, "mosquitto_sub finished");
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ms/ret kept"), "retained message reached mosquitto_sub: {text}");
        assert!(text.contains("ms/live now"), "live message reached mosquitto_sub: {text}");
        b.shutdown();
    }
}

/// The default `max_packet_size` (8 MiB) carries a 1 MiB camera frame: mosquitto_pub sends it
/// from a file at every QoS over 3.1.1 and 5.0, retained, and mosquitto_sub gets it back byte for
/// byte. A packet past the limit gets DISCONNECT 0x95 (5.0: the server's Maximum Packet Size,
/// [MQTT-3.2.2-15] holds the client to it; past it "Packet too large").
#[test]
fn mosquitto_clients_carry_a_1_mib_frame_and_an_8_mib_packet_is_refused() {
    if !mosquitto_clients() {
        return;
    }
    use tern::codec::{Packet as P, ProtocolVersion, QoS as Q, ReasonCode};
    for w in WORKER_COUNTS {
        let b = start(w);
        let port = b.local_addr().port().to_string();
        let dir = std::env::temp_dir().join(format!("tern-frame-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let frame: Vec<u8> = (0..1usize << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let file = dir.join("frame.jpg");
        std::fs::write(&file, &frame).unwrap();
        for version in ["mqttv311", "mqttv5"] {
            for qos in ["0", "1", "2"] {
                let topic = format!("cam/{version}/{qos}");
                let st = Command::new("mosquitto_pub")
                    .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos, "-r", "-t", &topic])
                    .arg("-f")
                    .arg(&file)
                    .status()
                    .unwrap();
                assert!(st.success(), "mosquitto_pub -f 1 MiB -q {qos} -V {version}, workers={w}");
                let out = Command::new("mosquitto_sub")
                    .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos, "-t", &topic])
                    .args(["-C", "1", "-N", "-W", "20"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "mosquitto_sub got the frame: -q {qos} -V {version}, workers={w}");
                assert!(out.stdout == frame, "{} bytes back, not the 1 MiB frame sent", out.stdout.len());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        // Just under the limit passes; just over is refused from its header.
        let addr = b.local_addr();
        let (mut c, ack) = common::Client::connect_v(addr, "big", true, ProtocolVersion::V5);
        assert_eq!(ack.properties.maximum_packet_size, Some(8 << 20));
        c.publish("cam/near", vec![7u8; (8 << 20) - 64], Q::AtLeastOnce, false);
        // Refused from its fixed header: the first 64 KiB are enough to be told.
        let over =
            P::Publish(tern::codec::Publish::new("cam/over", Q::AtMostOnce, bytes::Bytes::from(vec![7u8; 8 << 20])));
        let mut wire = bytes::BytesMut::new();
        over.encode(ProtocolVersion::V5, &mut wire);
        c.send_raw(&wire[..64 << 10]).unwrap();
        let seen = c.expect_closed();
        assert!(
            seen.iter().any(|p| matches!(p, P::Disconnect(d) if d.reason == ReasonCode::PACKET_TOO_LARGE)),
            "expected DISCONNECT 0x95, saw {seen:?}"
        );
        b.shutdown();
    }
}
