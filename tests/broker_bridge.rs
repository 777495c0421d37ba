//! Bridges with real peers: tern dialling Debian's mosquitto, mosquitto dialling tern with a
//! `connection` block (its 3.1.1 bridge bit), tern to tern both ways with `both` rules and no
//! message looping, and the remote stopped and restarted with QoS 1 `out` messages delivered once
//! it is back. Prefixes are remapped on every path.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tern::codec::*;

fn have_mosquitto() -> bool {
    let ok = Command::new("mosquitto").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !ok {
        eprintln!("mosquitto not installed: skipped (.ci/run installs it)");
    }
    ok
}

fn mosquitto(dir: &Path, port: u16, extra: &str) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n{extra}"))
        .unwrap();
    let child = Command::new("mosquitto").arg("-c").arg(&conf).stderr(Stdio::null()).spawn().unwrap();
    wait_listening(port);
    Proc(child)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Publishes a QoS 1 probe on `topic` every 200 ms until `sub` receives it as `arrives_as`:
/// the bridge is up and its subscriptions are in place both ways. Drains the extra probes.
fn until_bridged(publisher: &mut Client, topic: &str, sub: &mut Client, arrives_as: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < end, "{topic} never arrived as {arrives_as}");
        publisher.publish(topic, "probe", QoS::AtLeastOnce, false);
        if let Some(Packet::Publish(p)) = sub.try_recv(Duration::from_millis(200)) {
            sub.ack(&p);
            if p.topic == arrives_as {
                break;
            }
        }
    }
    // A marker behind the last probe: once it arrives, no probe is still on its way.
    let marker = format!("marker-{}", rand_suffix());
    publisher.publish(topic, marker.clone(), QoS::AtLeastOnce, false);
    receive_until(sub, &marker);
}

/// Counts what `sub` receives until the PUBLISH with payload `marker` arrives, leaving out probes
/// and other markers.
fn receive_until(sub: &mut Client, marker: &str) -> HashMap<(String, Bytes), usize> {
    let mut seen = HashMap::new();
    loop {
        let p = sub.recv_publish();
        sub.ack(&p);
        if &p.payload[..] == marker.as_bytes() {
            return seen;
        }
        if !p.payload.starts_with(b"marker") && !p.payload.starts_with(b"probe") {
            *seen.entry((p.topic.to_string(), p.payload.clone())).or_insert(0) += 1;
        }
    }
}

/// Publishes a fresh marker; returns it.
fn mark(publisher: &mut Client, topic: &str) -> String {
    let marker = format!("marker-{}", rand_suffix());
    publisher.publish(topic, marker.clone(), QoS::AtLeastOnce, false);
    marker
}

fn bridge_block(name: &str, to: u16, version: u8, topics: &str) -> String {
    format!(
        "[[bridge]]\nname = \"{name}\"\naddress = [\"127.0.0.1:{to}\"]\nprotocol_version = {version}\nclient_id = \"{name}-client\"\nkeepalive = 5\ntopics = [\n{topics}\n]\n"
    )
}

#[test]
fn tern_bridges_to_mosquitto_with_prefixes_both_ways() {
    if !have_mosquitto() {
        return;
    }
    for version in [4, 5] {
        let dir = std::env::temp_dir().join(format!("tern-bridge-mosq-{}", rand_suffix()));
        let remote_port = free_port();
        let _remote = mosquitto(&dir, remote_port, "");
        let topics = r#"{ pattern = "sensors/#", direction = "out", qos = 1, remote_prefix = "edge-1/" },
{ pattern = "cmd/#", direction = "in", qos = 1, local_prefix = "from-cloud/", remote_prefix = "edge-1/" },"#;
        let (tern, port, _) = spawn_tern(&[], &bridge_block("cloud", remote_port, version, topics));
        let _tern = Proc(tern);
        let (mut local, _) = Client::connect(addr(port), "local", true);
        local.subscribe("from-cloud/#", QoS::AtLeastOnce);
        let (mut local_pub, _) = Client::connect(addr(port), "local-pub", true);
        let (mut remote, _) = Client::connect(addr(remote_port), "remote", true);
        remote.subscribe("edge-1/#", QoS::AtLeastOnce);
        // Out: sensors/x here is edge-1/sensors/x there.
        until_bridged(&mut local_pub, "sensors/probe", &mut remote, "edge-1/sensors/probe");
        for i in 0..50 {
            local_pub.publish(&format!("sensors/t{}", i % 5), format!("m{i}"), QoS::AtLeastOnce, false);
        }
        let marker = mark(&mut local_pub, "sensors/end");
        let seen = receive_until(&mut remote, &marker);
        assert_eq!(seen.len(), 50, "v{version}: every message forwarded, once: {seen:?}");
        assert!(seen.iter().all(|((t, _), n)| t.starts_with("edge-1/sensors/t") && *n == 1));
        // In: edge-1/cmd/x there is from-cloud/cmd/x here; the rest of edge-1/ is not taken.
        let (mut remote_pub, _) = Client::connect(addr(remote_port), "remote-pub", true);
        until_bridged(&mut remote_pub, "edge-1/cmd/probe", &mut local, "from-cloud/cmd/probe");
        remote_pub.publish("edge-1/cmd/reboot", "now", QoS::AtLeastOnce, false);
        let marker = mark(&mut remote_pub, "edge-1/cmd/end");
        let seen = receive_until(&mut local, &marker);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen.get(&("from-cloud/cmd/reboot".into(), Bytes::from_static(b"now"))), Some(&1));
        // What tern sent out did not come back in (edge-1/sensors is not under an `in` rule,
        // and the remote does not echo the bridge's own messages).
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn mosquitto_bridges_to_tern_and_its_messages_do_not_loop() {
    if !have_mosquitto() {
        return;
    }
    let (tern, port, _) = spawn_tern(&[], "");
    let _tern = Proc(tern);
    let dir = std::env::temp_dir().join(format!("tern-mosq-bridge-{}", rand_suffix()));
    let mport = free_port();
    // mosquitto's own bridge: 3.1.1 with its bridge bit (try_private, the default).
    let block = format!(
        "connection to-tern\naddress 127.0.0.1:{port}\nbridge_protocol_version mqttv311\ncleansession true\n\
         topic sensors/# out 1 \"\" edge-2/\ntopic cmd/# in 1 \"\" edge-2/\ntopic both/# both 1\n"
    );
    let _m = mosquitto(&dir, mport, &block);
    let (mut on_tern, _) = Client::connect(addr(port), "on-tern", true);
    on_tern.subscribe("edge-2/sensors/#", QoS::AtLeastOnce);
    on_tern.subscribe("both/#", QoS::AtLeastOnce);
    let (mut tern_pub, _) = Client::connect(addr(port), "tern-pub", true);
    let (mut on_m, _) = Client::connect(addr(mport), "on-m", true);
    on_m.subscribe("cmd/#", QoS::AtLeastOnce);
    on_m.subscribe("both/#", QoS::AtLeastOnce);
    let (mut m_pub, _) = Client::connect(addr(mport), "m-pub", true);
    until_bridged(&mut m_pub, "sensors/probe", &mut on_tern, "edge-2/sensors/probe");
    until_bridged(&mut tern_pub, "edge-2/cmd/probe", &mut on_m, "cmd/probe");
    // `both` from mosquitto's side: tern gets it once, and does not send it back (the bridge
    // bit makes the bridge's subscriptions on tern no-local).
    m_pub.publish("both/a", "from-m", QoS::AtLeastOnce, false);
    let p = on_tern.recv_publish();
    on_tern.ack(&p);
    assert_eq!((&p.topic[..], &p.payload[..]), ("both/a", &b"from-m"[..]));
    // A marker from tern's side rides the same bridge connection behind any echo.
    let marker = mark(&mut tern_pub, "both/z");
    let seen = receive_until(&mut on_m, &marker);
    assert_eq!(seen.get(&("both/a".into(), Bytes::from_static(b"from-m"))), Some(&1), "no echo: {seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tern_to_tern_both_ways_without_loops() {
    for version in [4, 5] {
        let (b, b_port, _) = spawn_tern(&[], "");
        let _b = Proc(b);
        let topics = r#"{ pattern = "room/#", direction = "both", qos = 1 },
{ pattern = "up/#", direction = "out", qos = 1, local_prefix = "edge/", remote_prefix = "site-1/" },"#;
        let (a, a_port, _) = spawn_tern(&[], &bridge_block("peer", b_port, version, topics));
        let _a = Proc(a);
        let (mut sub_a, _) = Client::connect(addr(a_port), "sub-a", true);
        sub_a.subscribe("room/#", QoS::AtLeastOnce);
        let (mut sub_b, _) = Client::connect(addr(b_port), "sub-b", true);
        sub_b.subscribe("room/#", QoS::AtLeastOnce);
        sub_b.subscribe("site-1/#", QoS::AtLeastOnce);
        let (mut pub_a, _) = Client::connect(addr(a_port), "pub-a", true);
        let (mut pub_b, _) = Client::connect(addr(b_port), "pub-b", true);
        until_bridged(&mut pub_a, "room/probe-a", &mut sub_b, "room/probe-a");
        until_bridged(&mut pub_b, "room/probe-b", &mut sub_a, "room/probe-b");
        // One message each side; each subscriber gets each exactly once, whatever bounces.
        pub_a.publish("room/1", "from-a", QoS::AtLeastOnce, false);
        pub_b.publish("room/1", "from-b", QoS::AtLeastOnce, false);
        pub_a.publish("edge/up/x", "mapped", QoS::AtLeastOnce, false);
        // Markers from the far side ride the bridge behind everything sent before them; a
        // second round gives an echo of an echo the time to show too.
        let mut at_a = HashMap::new();
        let mut at_b = HashMap::new();
        for _ in 0..2 {
            let to_a = mark(&mut pub_b, "room/m");
            let to_b = mark(&mut pub_a, "room/m");
            for (k, n) in receive_until(&mut sub_a, &to_a) {
                *at_a.entry(k).or_insert(0) += n;
            }
            for (k, n) in receive_until(&mut sub_b, &to_b) {
                *at_b.entry(k).or_insert(0) += n;
            }
        }
        for side in [&at_a, &at_b] {
            assert_eq!(side.get(&("room/1".into(), Bytes::from_static(b"from-a"))), Some(&1), "v{version}: {side:?}");
            assert_eq!(side.get(&("room/1".into(), Bytes::from_static(b"from-b"))), Some(&1), "v{version}: {side:?}");
        }
        assert_eq!(at_b.get(&("site-1/up/x".into(), Bytes::from_static(b"mapped"))), Some(&1), "{at_b:?}");
        assert_eq!(at_a.len(), 2, "{at_a:?}");
        assert_eq!(at_b.len(), 3, "{at_b:?}");
    }
}

#[test]
fn qos1_out_messages_wait_for_a_stopped_remote_and_arrive_when_it_returns() {
    let b_port = free_port();
    let b_dir = std::env::temp_dir().join(format!("tern-bridge-remote-{}", rand_suffix()));
    let b_conf = format!(
        "port = {b_port}\npersistence = \"durable\"\npersistence_location = \"{}\"\n",
        b_dir.join("store").display()
    );
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(b_dir.join("tern.toml"), &b_conf).unwrap();
    // On a fixed port, to come back where the bridge dials.
    let start_b = || {
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("-c")
            .arg(b_dir.join("tern.toml"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(b_port);
        Proc(child)
    };
    let b = start_b();
    // On the remote, a persistent subscriber that will be away while the remote restarts.
    let (mut sub, _) = Client::connect(addr(b_port), "cloud-sub", false);
    sub.subscribe("edge-1/#", QoS::AtLeastOnce);
    let topics = r#"{ pattern = "sensors/#", direction = "out", qos = 1, remote_prefix = "edge-1/" },"#;
    let conf = format!("sys_interval = 1\n{}", bridge_block("cloud", b_port, 5, topics));
    let (a, a_port, _) = spawn_tern(&[], &conf);
    let _a = Proc(a);
    let (mut publisher, _) = Client::connect(addr(a_port), "sensor", true);
    until_bridged(&mut publisher, "sensors/probe", &mut sub, "edge-1/sensors/probe");
    sub.disconnect();
    // The remote goes away; the edge goes on taking QoS 1 messages.
    drop(b);
    let (mut watch, _) = Client::connect(addr(a_port), "watch", true);
    watch.subscribe("$SYS/broker/bridges/cloud/#", QoS::AtMostOnce);
    for i in 0..100 {
        publisher.publish("sensors/t", format!("{i}"), QoS::AtLeastOnce, false);
    }
    // The edge says the bridge is down with the 100 queued.
    let end = Instant::now() + DEADLINE;
    let mut state: HashMap<String, String> = HashMap::new();
    let queued = |s: &HashMap<String, String>| s.get("queued").and_then(|q| q.parse::<u32>().ok()).unwrap_or(0);
    while state.get("connected").map(String::as_str) != Some("0") || queued(&state) < 100 {
        assert!(Instant::now() < end, "$SYS never showed the bridge down with 100 queued: {state:?}");
        if let Some(Packet::Publish(p)) = watch.try_recv(Duration::from_millis(100)) {
            let key = p.topic.strip_prefix("$SYS/broker/bridges/cloud/").unwrap().to_string();
            state.insert(key, String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    // Back: the bridge reconnects (back-off) and delivers; the subscriber returns for them.
    let _b = start_b();
    let end = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < 100 {
        assert!(Instant::now() < end, "only {} of 100 arrived after the remote came back", got.len());
        let (mut sub, ack) = Client::connect(addr(b_port), "cloud-sub", false);
        assert!(ack.session_present);
        while let Some(Packet::Publish(p)) = sub.try_recv(Duration::from_secs(2)) {
            sub.ack(&p);
            if p.topic == "edge-1/sensors/t" {
                got.push(String::from_utf8_lossy(&p.payload).parse::<u32>().unwrap());
            }
        }
        sub.disconnect();
    }
    got.dedup();
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "all 100, in order");
    let _ = std::fs::remove_dir_all(&b_dir);
}

#[test]
fn bad_bridge_configuration_is_refused_at_start_up() {
    for (conf, says) in [
        ("[[bridge]]\nname = \"x\"\naddress = \"nohost\"\ntopics = [{ pattern = \"a/#\" }]\n", "host:port"),
        ("[[bridge]]\nname = \"x\"\naddress = \"127.0.0.1:1\"\nprotocol_version = 3\ntopics = [{ pattern = \"a\" }]\n", "protocol_version"),
        ("[[bridge]]\nname = \"x\"\naddress = \"127.0.0.1:1\"\ntopics = [{ pattern = \"a/#/b\" }]\n", "not a valid topic filter"),
        ("[[bridge]]\nname = \"x\"\naddress = \"127.0.0.1:1\"\ntopics = []\n", "at least one rule"),
        ("[[bridge]]\nname = \"x\"\naddress = \"127.0.0.1:1\"\ntopics = [{ pattern = \"a\", direction = \"sideways\" }]\n", "sideways"),
    ] {
        let dir = std::env::temp_dir().join(format!("tern-bridge-bad-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tern.toml");
        std::fs::write(&file, conf).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tern")).args(["-c", file.to_str().unwrap(), "-p", "0"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says) && err.contains("bridge"), "{conf}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn clients_cannot_take_a_bridge_session_id() {
    let b = start_with(config(1));
    let mut c = Connect::new("$bridge/cloud");
    c.clean_start = true;
    let (_, ack) = Client::connect_with(b.local_addr(), c);
    assert_eq!(ack.code, ConnectReturnCode::IDENTIFIER_REJECTED);
    b.shutdown();
}
