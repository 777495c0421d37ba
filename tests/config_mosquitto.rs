//! `tern -c mosquitto.conf`: a real mosquitto 2.0 configuration using every option tern reads
//! (checked first by Debian's mosquitto itself, which must start with it), then the same file
//! run by tern and every setting seen from a client: mosquitto_pub over TLS and with a client
//! certificate, a WebSocket upgrade, the password file made by `mosquitto_passwd`, the ACL, the
//! CONNACK limits, the bridge `connection` block from an `include_dir` file delivering to a second
//! mosquitto, the pid file, the log file and the store. Then one file per refused option: exit
//! status 2 and the file, line and option named.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, rand_suffix, wait_listening, Client, Proc, DEADLINE};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tern::codec::*;

fn have(cmd: &str) -> bool {
    let ok = Command::new(cmd).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !ok {
        eprintln!("{cmd} not installed: skipped (.ci/run installs mosquitto and mosquitto-clients)");
    }
    ok
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-{what}-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate with CN `device-7`.
fn pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "tern test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "device-7");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    std::fs::write(dir.join("client.pem"), p.signed_by(&key, &ca, &ca_key).unwrap().pem()).unwrap();
    std::fs::write(dir.join("client-key.pem"), key.serialize_pem()).unwrap();
}

struct Ports {
    plain: u16,
    tls: u16,
    ws: u16,
    mtls: u16,
    remote: u16,
}

fn mosquitto_conf(dir: &Path, ports: &Ports) -> PathBuf {
    let d = dir.display();
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let conf = format!(
        "# A mosquitto 2.0 configuration, unchanged for tern.
per_listener_settings false
pid_file {d}/broker.pid
log_dest file {d}/broker.log
log_type error
log_type warning
log_type notice
log_type information
log_timestamp true
user {user}
persistence true
persistence_location {d}/data/
autosave_interval 1
password_file {d}/passwd
acl_file {d}/acl
allow_anonymous false
allow_zero_length_clientid true
max_inflight_messages 20
max_queued_messages 100
max_queued_bytes 1000000
max_keepalive 60
message_size_limit 100000
max_packet_size 200000
max_connections 500
persistent_client_expiration 2d
memory_limit 268435456
sys_interval 1

port {plain}
bind_address 127.0.0.1

listener {tls} 127.0.0.1
cafile {d}/ca.pem
certfile {d}/server.pem
keyfile {d}/server-key.pem

listener {ws} 127.0.0.1
protocol websockets

listener {mtls} 127.0.0.1
cafile {d}/ca.pem
certfile {d}/server.pem
keyfile {d}/server-key.pem
require_certificate true
use_identity_as_username true

include_dir {d}/conf.d
",
        user = user.trim(),
        plain = ports.plain,
        tls = ports.tls,
        ws = ports.ws,
        mtls = ports.mtls,
    );
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("conf.d")).unwrap();
    std::fs::write(
        dir.join("conf.d/bridge.conf"),
        format!(
            "connection edge-up
address 127.0.0.1:{remote}
bridge_protocol_version mqttv311
remote_clientid edge-7
cleansession true
keepalive_interval 30
try_private true
notifications false
start_type automatic
topic sensors/# out 1 \"\" edge/7/
",
            remote = ports.remote
        ),
    )
    .unwrap();
    std::fs::write(dir.join("acl"), "user sensor\ntopic readwrite sensors/#\n\nuser device-7\ntopic write sensors/#\n")
        .unwrap();
    let passwd = dir.join("passwd");
    let st = Command::new("mosquitto_passwd").arg("-c").arg("-b").arg(&passwd).args(["sensor", "secret"]).status();
    assert!(st.unwrap().success(), "mosquitto_passwd");
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn connect_as(port: u16, id: &str, user: Option<&str>, v: ProtocolVersion) -> (Client, ConnAck) {
    let mut c = Connect { protocol: v, keep_alive: 0, ..Connect::new(id) };
    if let Some(u) = user {
        c.username = Some(u.into());
        c.password = Some(Bytes::from_static(b"secret"));
    }
    Client::connect_with(SocketAddr::from(([127, 0, 0, 1], port)), c)
}

#[test]
fn a_real_mosquitto_conf_runs_tern_with_every_option_it_names() {
    if !have("mosquitto") || !have("mosquitto_pub") || !have("mosquitto_passwd") {
        return;
    }
    let dir = temp_dir("mosquitto-conf");
    pki(&dir);
    let ports = Ports { plain: free_port(), tls: free_port(), ws: free_port(), mtls: free_port(), remote: free_port() };
    let conf = mosquitto_conf(&dir, &ports);
    let log = dir.join("broker.log");

    // mosquitto itself starts with the file: it is a real mosquitto.conf.
    {
        let _m = Proc(Command::new("mosquitto").arg("-c").arg(&conf).stderr(Stdio::null()).spawn().unwrap());
        wait_for("mosquitto to log that it runs", || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("running"))
        });
        for p in [ports.plain, ports.tls, ports.ws, ports.mtls] {
            wait_listening(p);
        }
    }
    std::fs::remove_file(&log).unwrap();
    let _ = std::fs::remove_file(dir.join("broker.pid"));
    wait_for("mosquitto's ports to be free", || TcpListener::bind(("127.0.0.1", ports.plain)).is_ok());

    // The bridge's remote: a second mosquitto.
    let remote_dir = temp_dir("mosquitto-remote");
    let remote_conf = remote_dir.join("remote.conf");
    std::fs::write(&remote_conf, format!("listener {} 127.0.0.1\nallow_anonymous true\n", ports.remote)).unwrap();
    let _remote = Proc(Command::new("mosquitto").arg("-c").arg(&remote_conf).stderr(Stdio::null()).spawn().unwrap());
    wait_listening(ports.remote);

    let tern =
        Proc(Command::new(env!("CARGO_BIN_EXE_tern")).arg("-c").arg(&conf).stderr(Stdio::null()).spawn().unwrap());
    wait_for("tern to log to log_dest", || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on")));
    wait_listening(ports.mtls);
    let pid = std::fs::read_to_string(dir.join("broker.pid")).unwrap();
    assert_eq!(pid.trim(), tern.0.id().to_string(), "pid_file");
    assert!(dir.join("data/tern.redb").exists(), "persistence true, persistence_location");

    // allow_anonymous false, password_file from mosquitto_passwd.
    let (_, ack) = connect_as(ports.plain, "anon", None, ProtocolVersion::V311);
    assert_eq!(ack.code, ConnectReturnCode::NOT_AUTHORIZED, "allow_anonymous false");
    // CONNACK carries max_keepalive, max_inflight_messages and max_packet_size.
    let (mut sensor, ack) = connect_as(ports.plain, "sensor-1", Some("sensor"), ProtocolVersion::V5);
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert_eq!(ack.properties.server_keep_alive, Some(60), "max_keepalive 60 [MQTT-3.2.2-21]");
    assert_eq!(ack.properties.receive_maximum, Some(20), "max_inflight_messages 20");
    assert_eq!(ack.properties.maximum_packet_size, Some(200_000), "max_packet_size 200000");
    assert_eq!(sensor.subscribe("sensors/#", QoS::AtLeastOnce), ReasonCode::GRANTED_QOS_1);

    // The TLS listener (cafile, certfile, keyfile) with mosquitto_pub and a password.
    let tls = ports.tls.to_string();
    let ca = dir.join("ca.pem");
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tls, "-u", "sensor", "-P", "secret", "-t", "sensors/tls", "-m", "over tls"])
        .arg("--cafile")
        .arg(&ca)
        .args(["-q", "1"])
        .status()
        .unwrap();
    assert!(st.success(), "mosquitto_pub over the TLS listener");
    let m = sensor.recv_publish();
    assert_eq!((&m.topic[..], &m.payload[..]), ("sensors/tls", &b"over tls"[..]));
    sensor.ack(&m);
    // require_certificate and use_identity_as_username: no password, the CN is the user the ACL
    // knows; without a certificate the handshake fails.
    let mtls = ports.mtls.to_string();
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mtls, "-t", "sensors/cert", "-m", "by certificate", "-q", "1"])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(dir.join("client.pem"))
        .arg("--key")
        .arg(dir.join("client-key.pem"))
        .status()
        .unwrap();
    assert!(st.success(), "mosquitto_pub with a client certificate");
    let m = sensor.recv_publish();
    assert_eq!((&m.topic[..], &m.payload[..]), ("sensors/cert", &b"by certificate"[..]));
    sensor.ack(&m);
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mtls, "-t", "sensors/cert", "-m", "x"])
        .arg("--cafile")
        .arg(&ca)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "require_certificate true refuses a client without one");
    // The ACL: `sensor` may not write outside sensors/# (5.0: PUBACK 0x87).
    let id = sensor.id();
    sensor.send(&Packet::Publish(Publish {
        packet_id: Some(id),
        ..Publish::new("other/x", QoS::AtLeastOnce, Bytes::from_static(b"no"))
    }));
    let Packet::PubAck(a) = sensor.recv_where(|p| matches!(p, Packet::PubAck(_))) else { unreachable!() };
    assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED, "acl_file");
    // message_size_limit 100000: over it the flow completes with 0x83 and nothing is delivered.
    let id = sensor.id();
    sensor.send(&Packet::Publish(Publish {
        packet_id: Some(id),
        ..Publish::new("sensors/big", QoS::AtLeastOnce, Bytes::from(vec![0u8; 100_001]))
    }));
    let Packet::PubAck(a) = sensor.recv_where(|p| matches!(p, Packet::PubAck(_))) else { unreachable!() };
    assert_eq!(a.reason, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR, "message_size_limit");

    // protocol websockets: the upgrade is answered with the mqtt subprotocol.
    let mut ws = TcpStream::connect(("127.0.0.1", ports.ws)).unwrap();
    ws.set_read_timeout(Some(DEADLINE)).unwrap();
    ws.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = ws.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("sec-websocket-protocol: mqtt"), "{head}");

    // The bridge from conf.d: sensors/# out at QoS 1 with remote prefix edge/7/.
    let remote = SocketAddr::from(([127, 0, 0, 1], ports.remote));
    let (mut far, _) = Client::connect(remote, "cloud-reader", true);
    far.subscribe("edge/7/#", QoS::AtLeastOnce);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < end, "the bridge never delivered to the remote mosquitto");
        sensor.publish("sensors/temp", "21.5", QoS::AtLeastOnce, false);
        // (What the bridge queued before it was up, sensors/tls and sensors/cert, comes too.)
        if let Some(Packet::Publish(p)) = far.try_recv(Duration::from_millis(300)) {
            assert!(p.topic.starts_with("edge/7/sensors/"), "{:?}", p.topic);
            if &p.topic[..] == "edge/7/sensors/temp" {
                assert_eq!(&p.payload[..], b"21.5");
                break;
            }
        }
    }

    // --print-config gives TOML that reads back as the same configuration.
    let out = Command::new(env!("CARGO_BIN_EXE_tern")).arg("-c").arg(&conf).arg("--print-config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let toml = String::from_utf8(out.stdout).unwrap();
    for line in [
        "port = ".to_string() + &ports.plain.to_string(),
        "max_inflight_messages = 20".into(),
        "max_queued_messages = 100".into(),
        "max_queued_bytes = 1000000".into(),
        "message_size_limit = 100000".into(),
        "max_connections = 500".into(),
        "persistence = \"periodic\"".into(),
        "persistence_interval = 1".into(),
        "persistent_client_expiration = \"2d\"".into(),
        "memory_limit = 268435456".into(),
        "sys_interval = 1".into(),
        "allow_anonymous = false".into(),
        "protocol = \"websockets\"".into(),
        "use_identity_as_username = true".into(),
        "remote_prefix = \"edge/7/\"".into(),
    ] {
        assert!(toml.lines().any(|l| l == line), "--print-config lacks {line:?}:\n{toml}");
    }
    let from_toml = tern::Config::from_toml(&toml).unwrap();
    assert_eq!(from_toml, tern::Config::from_file(&conf).unwrap(), "the printed TOML is the same configuration");

    drop(tern);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&remote_dir);
}

/// Every mosquitto option tern does not have, and every value it cannot honour, stops tern at
/// start with exit status 2 and a message naming the file, the line and the option.
#[test]
fn each_refused_mosquitto_option_names_its_file_and_line() {
    let dir = temp_dir("mosquitto-refused");
    let unsupported = [
        "auth_plugin /usr/lib/x.so",
        "auth_plugin_deny_special_chars true",
        "auth_opt_db host",
        "auto_id_prefix auto-",
        "autosave_on_changes true",
        "check_retain_source true",
        "clientid_prefixes sec",
        "connection_messages true",
        "log_facility 5",
        "log_timestamp_format %Y",
        "max_inflight_bytes 1000",
        "persistence_file mosquitto.db",
        "plugin /usr/lib/x.so",
        "plugin_opt_x y",
        "psk_file /etc/psk",
        "websockets_log_level 0",
        "websockets_headers_size 4096",
        "accept_protocol_versions 5",
        "bind_interface eth0",
        "http_dir /var/www",
        "max_qos 1",
        "max_topic_alias 10",
        "mount_point edge/",
        "socket_domain ipv4",
        "use_username_as_clientid true",
        "use_subject_as_username true",
        "capath /etc/ssl/certs",
        "ciphers HIGH",
        "ciphers_tls1.3 TLS_AES_128_GCM_SHA256",
        "dhparamfile /etc/dh.pem",
        "tls_engine pkcs11",
        "tls_keyform engine",
        "tls_version tlsv1.2",
        "psk_hint hint",
        "bridge_attempt_unsubscribe true",
        "bridge_bind_address 127.0.0.1",
        "bridge_max_packet_size 1000",
        "bridge_outgoing_retain false",
        "bridge_capath /etc/ssl/certs",
        "bridge_insecure true",
        "bridge_require_ocsp true",
        "bridge_tls_version tlsv1.2",
        "bridge_alpn x",
        "bridge_identity id",
        "bridge_psk 00",
        "local_cleansession true",
        "idle_timeout 60",
        "local_clientid l",
        "local_username u",
        "local_password p",
        "notifications_local_only true",
        "notification_topic n",
        "restart_timeout 10",
        "round_robin true",
        "threshold 10",
        "retry_interval 20",
        "store_clean_interval 10",
    ];
    let bad_values = [
        "per_listener_settings true",
        "max_queued_messages 0",
        "autosave_interval 0",
        "log_dest syslog",
        "log_type verbose",
        "protocol mqtts",
        "listener 1883 /run/mosquitto.sock",
        "persistence yes",
        "max_keepalive 0",
        "max_connections 0",
        "persistent_client_expiration 5x",
        "log_timestamp false",
        "retain_available false",
        "set_tcp_nodelay false",
        "queue_qos0_messages true",
        "upgrade_outgoing_qos true",
        "allow_duplicate_messages true",
        "max_inflight_messages many",
        "password_file /nonexistent/passwd",
    ];
    let mut checked = 0;
    for line in unsupported.iter().chain(&bad_values) {
        let option = line.split_whitespace().next().unwrap();
        let conf = dir.join(format!("{checked}.conf"));
        std::fs::write(&conf, format!("# refused\nlistener 1883 127.0.0.1\n{line}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tern")).arg("-c").arg(&conf).arg("--print-config").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{line:?} was accepted: {err}");
        let expect = format!("{} line 3: `{option}`:", conf.display());
        assert!(err.contains(&expect), "{line:?}: expected {expect:?} in {err:?}");
        checked += 1;
    }
    // A bridge option in a bridge block that tern cannot honour, in an included file.
    let inc = dir.join("inc");
    std::fs::create_dir_all(&inc).unwrap();
    std::fs::write(inc.join("b.conf"), "connection up\naddress 127.0.0.1:1884\ntopic # out 1\ntry_private false\n")
        .unwrap();
    let conf = dir.join("include.conf");
    std::fs::write(&conf, format!("include_dir {}\n", inc.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern")).arg("-c").arg(&conf).arg("--print-config").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains(&format!("{} line 4: `try_private`:", inc.join("b.conf").display())), "{err}");
    println!("{} refused options and values, each named with its file and line", checked + 1);
    let _ = std::fs::remove_dir_all(&dir);
}
