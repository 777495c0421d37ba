//! TLS and WebSocket listeners: interop with real clients (mosquitto_pub/sub over TLS with server
//! and client certificates, paho-mqtt over TLS and WebSockets, rustls and tungstenite clients),
//! hostile input on each listener while a healthy client on every listener keeps working, and
//! certificates renewed without dropping connections. Certificates are made here, per run.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tern::codec::*;
use tern::config::{ListenerConfig, Protocol};

/// A test CA, a server certificate for 127.0.0.1/localhost, client certificates (good, from
/// another CA, expired), as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).unwrap();
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    (p.self_signed(&key).unwrap(), key)
}

fn client_cert(cn: &str, issuer: &rcgen::Certificate, issuer_key: &KeyPair, expired: bool) -> (String, String) {
    client_cert_serial(cn, issuer, issuer_key, expired, None)
}

fn client_cert_serial(
    cn: &str,
    issuer: &rcgen::Certificate,
    issuer_key: &KeyPair,
    expired: bool,
    serial: Option<u64>,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.serial_number = serial.map(rcgen::SerialNumber::from);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    (p.signed_by(&key, issuer, issuer_key).unwrap().pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("tern-pki-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_cert, ca_key) = ca("tern test CA");
        write(&dir, "ca.pem", &ca_cert.pem());
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca_cert, &ca_key)
            .unwrap();
        write(&dir, "server.pem", &server.pem());
        write(&dir, "server-key.pem", &server_key.serialize_pem());
        let (c, k) = client_cert("device-7", &ca_cert, &ca_key, false);
        write(&dir, "client.pem", &c);
        write(&dir, "client-key.pem", &k);
        let (c, k) = client_cert("device-old", &ca_cert, &ca_key, true);
        write(&dir, "expired.pem", &c);
        write(&dir, "expired-key.pem", &k);
        // A certificate the CA revoked, and the CA's CRL listing it.
        let (c, k) = client_cert_serial("device-lost", &ca_cert, &ca_key, false, Some(9));
        write(&dir, "revoked.pem", &c);
        write(&dir, "revoked-key.pem", &k);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(9u64),
                revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&ca_cert, &ca_key)
        .unwrap();
        write(&dir, "crl.pem", &crl.pem().unwrap());
        let (other_ca, other_key) = ca("another CA");
        let (c, k) = client_cert("intruder", &other_ca, &other_key, false);
        write(&dir, "other.pem", &c);
        write(&dir, "other-key.pem", &k);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn tls_listener(&self, protocol: Protocol, require_certificate: bool) -> ListenerConfig {
        ListenerConfig {
            port: 0,
            bind: None,
            protocol,
            cafile: Some(self.path("ca.pem")),
            certfile: Some(self.path("server.pem")),
            keyfile: Some(self.path("server-key.pem")),
            crlfile: None,
            require_certificate,
            use_identity_as_username: require_certificate,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Listener order in these tests: 0 plain, 1 mqtts, 2 mqtts with client certificates required
/// (and the CA's CRL), 3 ws, 4 wss.
fn start_tls(pki: &Pki, workers: usize) -> tern::Broker {
    let mut ws = ListenerConfig::plain("127.0.0.1".parse().unwrap(), 0);
    ws.protocol = Protocol::Websockets;
    let mut mtls = pki.tls_listener(Protocol::Mqtt, true);
    mtls.crlfile = Some(pki.path("crl.pem"));
    let listener =
        vec![pki.tls_listener(Protocol::Mqtt, false), mtls, ws, pki.tls_listener(Protocol::Websockets, false)];
    start_with(tern::Config { listener, connect_timeout: 2, ..config(workers) })
}

fn client_config(pki: &Pki, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    client_config_trusting(&pki.path("ca.pem"), pki, cert)
}

/// A client that trusts the CA in `ca` and presents `cert` (a name in `pki`), if any.
fn client_config_trusting(ca: &Path, pki: &Pki, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(name) => {
            let chain: Vec<_> =
                CertificateDer::pem_file_iter(pki.path(&format!("{name}.pem"))).unwrap().map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}-key.pem"))).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_open(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Tls {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    rustls::StreamOwned::new(rustls::ClientConnection::new(config, name).unwrap(), sock)
}

/// MQTT 3.1.1 over any byte stream, with our codec: enough for CONNECT, SUBSCRIBE, PUBLISH.
struct Mqtt<S: Read + Write> {
    s: S,
    buf: BytesMut,
}

impl<S: Read + Write> Mqtt<S> {
    fn new(s: S) -> Self {
        Mqtt { s, buf: BytesMut::new() }
    }

    fn send(&mut self, p: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        p.encode(ProtocolVersion::V311, &mut out);
        self.s.write_all(&out)?;
        self.s.flush()
    }

    fn recv(&mut self) -> std::io::Result<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, Some(ProtocolVersion::V311), 1 << 20).unwrap() {
                return Ok(p);
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn connect(&mut self, id: &str) -> std::io::Result<ConnAck> {
        self.send(Packet::Connect(Box::new(Connect::new(id))))?;
        match self.recv()? {
            Packet::ConnAck(a) => Ok(*a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn subscribe(&mut self, filter: &str) {
        let s = Subscribe {
            packet_id: pid(1),
            filters: vec![(filter.into(), SubscriptionOptions::new(QoS::AtLeastOnce))],
            properties: Properties::default(),
        };
        self.send(Packet::Subscribe(Box::new(s))).unwrap();
        assert!(matches!(self.recv().unwrap(), Packet::SubAck(_)));
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, Bytes::copy_from_slice(payload));
        p.packet_id = Some(pid(2));
        self.send(Packet::Publish(p)).unwrap();
        assert!(matches!(self.recv().unwrap(), Packet::PubAck(_)));
    }

    fn expect(&mut self, topic: &str) -> Bytes {
        loop {
            if let Packet::Publish(p) = self.recv().unwrap() {
                if let Some(id) = p.packet_id {
                    self.send(Packet::PubAck(Ack::new(id))).unwrap();
                }
                if p.topic == topic {
                    return p.payload;
                }
            }
        }
    }
}

/// A WebSocket client stream (tungstenite, blocking) that reads and writes MQTT bytes.
struct WsClient<S: Read + Write> {
    ws: tungstenite::WebSocket<S>,
    pending: Vec<u8>,
}

impl<S: Read + Write> Read for WsClient<S> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => self.pending.extend_from_slice(&b),
                Ok(tungstenite::Message::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.pending.len());
        out[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

impl<S: Read + Write> Write for WsClient<S> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let msg = tungstenite::Message::Binary(tungstenite::Bytes::copy_from_slice(bytes));
        self.ws.send(msg).map_err(std::io::Error::other)?;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ws_open<S: Read + Write>(stream: S, url: &str) -> WsClient<S> {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tungstenite::client::client(req, stream).expect("WebSocket upgrade");
    // [MQTT-6.0.0-4]: the server echoes the mqtt subprotocol.
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "mqtt");
    WsClient { ws, pending: Vec::new() }
}

#[test]
fn every_listener_carries_mqtt_and_they_share_one_broker() {
    for w in WORKER_COUNTS {
        let pki = Pki::new();
        let b = start_tls(&pki, w);
        let a = b.local_addrs().to_vec();
        let (mut plain, _) = Client::connect(a[0], "plain-sub", true);
        plain.subscribe("x/#", QoS::AtLeastOnce);
        // mqtts, server certificate only.
        let mut tls = Mqtt::new(tls_open(a[1], client_config(&pki, None)));
        assert_eq!(tls.connect("tls-pub").unwrap().code, ReasonCode::SUCCESS);
        tls.publish("x/tls", b"over TLS");
        assert_eq!(&plain.recv_publish().payload[..], b"over TLS");
        // mqtts with a client certificate.
        let mut mtls = Mqtt::new(tls_open(a[2], client_config(&pki, Some("client"))));
        assert_eq!(mtls.connect("mtls-pub").unwrap().code, ReasonCode::SUCCESS);
        mtls.publish("x/mtls", b"with a client certificate");
        assert_eq!(&plain.recv_publish().payload[..], b"with a client certificate");
        // ws and wss; a subscriber over wss gets what the plain client publishes.
        let sock = TcpStream::connect(a[3]).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut ws = Mqtt::new(ws_open(sock, &format!("ws://{}/mqtt", a[3])));
        assert_eq!(ws.connect("ws-pub").unwrap().code, ReasonCode::SUCCESS);
        ws.publish("x/ws", b"over WebSockets");
        assert_eq!(&plain.recv_publish().payload[..], b"over WebSockets");
        let mut wss = Mqtt::new(ws_open(
            tls_open(a[4], client_config(&pki, None)),
            &format!("wss://localhost:{}/mqtt", a[4].port()),
        ));
        assert_eq!(wss.connect("wss-sub").unwrap().code, ReasonCode::SUCCESS);
        wss.subscribe("y/#");
        plain.publish("y/to-wss", Bytes::from(vec![b'b'; 200_000]), QoS::AtLeastOnce, false);
        assert_eq!(wss.expect("y/to-wss").len(), 200_000, "a packet larger than a frame arrives whole");
        b.shutdown();
    }
}

#[test]
fn client_certificates_are_checked_against_the_ca() {
    let pki = Pki::new();
    let b = start_tls(&pki, 2);
    let a = b.local_addrs().to_vec();
    // Required and valid: accepted.
    let mut ok = Mqtt::new(tls_open(a[2], client_config(&pki, Some("client"))));
    assert_eq!(ok.connect("by-cert").unwrap().code, ReasonCode::SUCCESS);
    // None, another CA's, an expired one, a revoked one (crlfile): the handshake fails; the
    // broker logs why.
    for cert in [None, Some("other"), Some("expired"), Some("revoked")] {
        let mut bad = Mqtt::new(tls_open(a[2], client_config(&pki, cert)));
        assert!(bad.connect("refused").is_err(), "{cert:?} must be refused");
    }
    // The revoked certificate is otherwise good: a listener without the CRL takes it.
    let mut no_crl = Mqtt::new(tls_open(a[1], client_config(&pki, Some("revoked"))));
    assert_eq!(no_crl.connect("revoked-elsewhere").unwrap().code, ReasonCode::SUCCESS);
    // The healthy client still works.
    ok.subscribe("z");
    let (mut other, _) = Client::connect(a[0], "z-pub", true);
    other.publish("z", Bytes::from_static(b"still here"), QoS::AtLeastOnce, false);
    assert_eq!(&ok.expect("z")[..], b"still here");
    b.shutdown();
}

/// Waits until the server closes `s` (EOF or reset), reading and discarding what it sends.
fn closed_by_server(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < end, "not closed by the server");
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn hostile_input_on_tls_and_websocket_listeners_closes_only_that_connection() {
    let pki = Pki::new();
    let b = start_tls(&pki, 2);
    let a = b.local_addrs().to_vec();
    // A healthy client on every listener, connected before and checked after.
    let mut healthy_plain = Client::connect(a[0], "h-plain", true).0;
    healthy_plain.subscribe("h/#", QoS::AtLeastOnce);
    let mut h_tls = Mqtt::new(tls_open(a[1], client_config(&pki, None)));
    h_tls.connect("h-tls").unwrap();
    let sock = TcpStream::connect(a[3]).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut h_ws = Mqtt::new(ws_open(sock, &format!("ws://{}/mqtt", a[3])));
    h_ws.connect("h-ws").unwrap();
    let mut h_mtls = Mqtt::new(tls_open(a[2], client_config(&pki, Some("client"))));
    h_mtls.connect("h-mtls").unwrap();
    let wss_url = format!("wss://localhost:{}/mqtt", a[4].port());
    let mut h_wss = Mqtt::new(ws_open(tls_open(a[4], client_config(&pki, None)), &wss_url));
    h_wss.connect("h-wss").unwrap();

    // Garbage instead of a ClientHello.
    let mut s = TcpStream::connect(a[1]).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not TLS").unwrap();
    closed_by_server(&mut s);
    // A handshake that stalls: closed at connect_timeout (2 s here).
    let mut s = TcpStream::connect(a[1]).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let t = Instant::now();
    closed_by_server(&mut s);
    assert!(t.elapsed() >= Duration::from_millis(1500), "closed by the connect timeout, not before");
    // Plain HTTP without an upgrade on the WebSocket listener: 400, closed.
    let mut s = TcpStream::connect(a[3]).unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let answer = String::from_utf8_lossy(&closed_by_server(&mut s)).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // An upgrade without the mqtt subprotocol [MQTT-6.0.0-4]: refused.
    let mut s = TcpStream::connect(a[3]).unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    assert!(String::from_utf8_lossy(&closed_by_server(&mut s)).starts_with("HTTP/1.1 400"));
    // A text frame [MQTT-6.0.0-1]: closed.
    let sock = TcpStream::connect(a[3]).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut ws = ws_open(sock, &format!("ws://{}/mqtt", a[3]));
    ws.ws.send(tungstenite::Message::Text("hello".into())).unwrap();
    let mut sink = [0u8; 16];
    assert!(matches!(ws.read(&mut sink), Ok(0) | Err(_)), "closed after a text frame");
    // Pings, never reading the pongs: closed once 256 KiB of pongs wait, not buffered forever.
    let mut s = TcpStream::connect(a[3]).unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").unwrap();
    let mut ping = vec![0x89, 0xfd]; // masked ping with 125 bytes of payload
    ping.extend_from_slice(&[0, 0, 0, 0]);
    ping.extend_from_slice(&[b'p'; 125]);
    let flood: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 8192).collect();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut closed = false;
    for _ in 0..64 {
        if let Err(e) = s.write_all(&flood) {
            // Reset or broken by the broker, not a write that merely timed out.
            assert!(!matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}");
            closed = true;
            break;
        }
    }
    assert!(closed, "a client flooding pings without reading is closed");
    // A frame header announcing 1 GiB: closed before anything is buffered.
    let mut s = TcpStream::connect(a[3]).unwrap();
    s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").unwrap();
    let mut header = vec![0x82, 0xff];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]); // mask
    s.write_all(&header).unwrap();
    let answer = closed_by_server(&mut s);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 101"));

    // Everyone healthy still works, on every listener.
    h_tls.publish("h/tls", b"1");
    assert_eq!(&healthy_plain.recv_publish().payload[..], b"1");
    h_ws.publish("h/ws", b"2");
    assert_eq!(&healthy_plain.recv_publish().payload[..], b"2");
    h_mtls.publish("h/mtls", b"3");
    assert_eq!(&healthy_plain.recv_publish().payload[..], b"3");
    h_wss.publish("h/wss", b"4");
    assert_eq!(&healthy_plain.recv_publish().payload[..], b"4");
    b.shutdown();
}

#[test]
fn renewed_certificates_are_used_by_new_connections_and_old_ones_stay() {
    let pki = Pki::new();
    let b = start_tls(&pki, 1);
    let a = b.local_addrs().to_vec();
    let mut old = Mqtt::new(tls_open(a[1], client_config(&pki, None)));
    old.connect("before-renewal").unwrap();
    // A new CA and server certificate in the same files, as certbot would leave them.
    let fresh = Pki::new();
    std::fs::copy(pki.path("ca.pem"), pki.path("old-ca.pem")).unwrap();
    for f in ["ca.pem", "server.pem", "server-key.pem"] {
        std::fs::copy(fresh.path(f), pki.path(f)).unwrap();
    }
    assert!(b.reload_tls().is_empty());
    // New connections get the new certificate: the old CA no longer verifies the server.
    let mut stale = Mqtt::new(tls_open(a[1], client_config_trusting(&pki.path("old-ca.pem"), &pki, None)));
    assert!(stale.connect("old-ca").is_err(), "the renewed certificate is served");
    let mut new = Mqtt::new(tls_open(a[1], client_config(&fresh, None)));
    assert_eq!(new.connect("after-renewal").unwrap().code, ReasonCode::SUCCESS);
    // The connection from before goes on.
    old.subscribe("r");
    new.publish("r", b"renewed");
    assert_eq!(&old.expect("r")[..], b"renewed");
    // A broken file is refused and the current configuration stays.
    std::fs::write(pki.path("server.pem"), "not a certificate").unwrap();
    let errors = b.reload_tls();
    assert!(errors.iter().any(|e| e.contains("certfile")), "{errors:?}");
    let mut again = Mqtt::new(tls_open(a[1], client_config(&fresh, None)));
    assert_eq!(again.connect("still-renewed").unwrap().code, ReasonCode::SUCCESS);
    b.shutdown();
}

fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--help").output().is_ok()
}

#[test]
fn mosquitto_clients_speak_tls_with_server_and_client_certificates() {
    if !have("mosquitto_pub") {
        eprintln!("mosquitto_pub not installed: skipped (.ci/run installs it)");
        return;
    }
    let pki = Pki::new();
    let b = start_tls(&pki, 2);
    let a = b.local_addrs().to_vec();
    let (mut sub, _) = Client::connect(a[0], "mosq-watch", true);
    sub.subscribe("m/#", QoS::AtLeastOnce);
    let ca = pki.path("ca.pem");
    let run = |port: u16, extra: &[&str], msg: &str| {
        let st = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile", ca.to_str().unwrap(), "--insecure"])
            .args(["-q", "1", "-t", "m/x", "-m", msg])
            .args(extra)
            .output()
            .unwrap();
        st.status.success()
    };
    assert!(run(a[1].port(), &[], "mosquitto over TLS"));
    assert_eq!(&sub.recv_publish().payload[..], b"mosquitto over TLS");
    let cert = pki.path("client.pem");
    let key = pki.path("client-key.pem");
    assert!(run(
        a[2].port(),
        &["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()],
        "with a certificate"
    ));
    assert_eq!(&sub.recv_publish().payload[..], b"with a certificate");
    assert!(!run(a[2].port(), &[], "without"), "refused without a client certificate");
    b.shutdown();
}

#[test]
fn paho_python_speaks_tls_and_websockets() {
    let probe = Command::new("python3").args(["-c", "import paho.mqtt.client"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("paho-mqtt (Python) not installed: skipped (.ci/run installs it)");
        return;
    }
    let pki = Pki::new();
    let b = start_tls(&pki, 2);
    let a = b.local_addrs().to_vec();
    let (mut sub, _) = Client::connect(a[0], "paho-watch", true);
    sub.subscribe("p/#", QoS::AtLeastOnce);
    let script = r#"
import ssl, sys
import paho.mqtt.client as mqtt
port, transport, tls, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "tls", sys.argv[4]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-" + transport + str(tls), transport=transport)
if transport == "websockets":
    c.ws_set_options(path="/mqtt")
if tls:
    c.tls_set(ca_certs=ca)
    c.tls_insecure_set(True)
c.connect("127.0.0.1", port, 30)
c.loop_start()
info = c.publish("p/" + transport, "paho " + transport + (" tls" if tls else ""), qos=1)
info.wait_for_publish(10)
c.disconnect()
c.loop_stop()
sys.exit(0 if info.is_published() else 1)
"#;
    let ca = pki.path("ca.pem");
    for (port, transport, tls, want) in [
        (a[1].port(), "tcp", "tls", "paho tcp tls"),
        (a[3].port(), "websockets", "plain", "paho websockets"),
        (a[4].port(), "websockets", "tls", "paho websockets tls"),
    ] {
        let out = Command::new("python3")
            .args(["-c", script, &port.to_string(), transport, tls, ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{want}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(&sub.recv_publish().payload[..], want.as_bytes());
    }
    b.shutdown();
}

#[test]
fn two_thousand_half_open_tls_handshakes_cost_bounded_memory_and_are_closed() {
    let pki = Pki::new();
    let config = format!(
        "workers = 2\npin_workers = false\nconnect_timeout = 3\n[[listener]]\nport = 0\ncertfile = \"{}\"\nkeyfile = \"{}\"\n",
        pki.path("server.pem").display(),
        pki.path("server-key.pem").display()
    );
    let (mut child, _, dir) = spawn_tern(&[], &config);
    let pid = child.id();
    let ports = listener_ports(pid);
    let (plain, tls) = (ports[0], ports[1]);
    // One ClientHello, sent on every connection, which then says nothing more.
    let mut hello = Vec::new();
    {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client_config(&pki, None), name).unwrap();
        c.write_tls(&mut hello).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = status_kb(pid, "VmRSS:");
    let mut half_open = Vec::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(tls).unwrap();
        s.write_all(&hello).unwrap();
        half_open.push(s);
    }
    // Every ClientHello answered (the server's flight arrives), then the broker holds them all.
    for s in &mut half_open {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut first = [0u8; 1];
        assert_eq!(s.read(&mut first).unwrap(), 1, "the server answered the ClientHello");
    }
    let during = status_kb(pid, "VmRSS:");
    let per_conn = (during.saturating_sub(before)) * 1024 / 2000;
    println!("2,000 half-open TLS handshakes: RSS {before} kB -> {during} kB, {per_conn} bytes each");
    assert!(per_conn < 64 * 1024, "{per_conn} bytes per half-open handshake");
    // A healthy client meanwhile.
    let (mut c, _) = Client::connect(plain, "healthy", true);
    c.subscribe("ok", QoS::AtMostOnce);
    c.publish("ok", Bytes::from_static(b"fine"), QoS::AtMostOnce, false);
    assert_eq!(&c.recv_publish().payload[..], b"fine");
    // connect_timeout closes every one of them.
    for s in &mut half_open {
        closed_by_server(s);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// The ports a running tern listens on (from /proc/net/tcp), plain first: sorted by inode
/// creation order is not guaranteed, so ask the kernel for the process's listening sockets and
/// tell the plain one by a CONNECT that gets an answer in the clear.
fn listener_ports(pid: u32) -> Vec<SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let mut ports = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string("/proc/net/tcp").unwrap().lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
            let port = u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap();
            ports.insert(port);
        }
    }
    let mut addrs: Vec<SocketAddr> = ports.into_iter().map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect();
    // The plain listener answers a CONNECT with a CONNACK.
    addrs.sort_by_key(|a| {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = BytesMut::new();
        Packet::Connect(Box::new(Connect::new("probe"))).encode(ProtocolVersion::V311, &mut out);
        s.write_all(&out).unwrap();
        let mut b = [0u8; 1];
        !matches!(s.read(&mut b), Ok(1) if b[0] == 0x20)
    });
    assert_eq!(addrs.len(), 2, "two listeners: {addrs:?}");
    addrs
}

#[test]
fn rumqttc_speaks_tls_ws_and_wss() {
    use rumqttc::{Event, MqttOptions, Packet as RPacket, QoS as RQoS, TlsConfiguration, Transport};
    let pki = Pki::new();
    let b = start_tls(&pki, 2);
    let a = b.local_addrs().to_vec();
    let (mut watch, _) = Client::connect(a[0], "rumqttc-watch", true);
    watch.subscribe("rq/#", QoS::AtLeastOnce);
    let tls = || TlsConfiguration::Rustls(client_config(&pki, None));
    let cases: Vec<(&str, MqttOptions)> = vec![
        ("tls", {
            let mut o = MqttOptions::new("rq-tls", "localhost", a[1].port());
            o.set_transport(Transport::tls_with_config(tls()));
            o
        }),
        ("ws", {
            let mut o = MqttOptions::new("rq-ws", format!("ws://127.0.0.1:{}/mqtt", a[3].port()), a[3].port());
            o.set_transport(Transport::Ws);
            o
        }),
        ("wss", {
            let mut o = MqttOptions::new("rq-wss", format!("wss://localhost:{}/mqtt", a[4].port()), a[4].port());
            o.set_transport(Transport::wss_with_config(tls()));
            o
        }),
    ];
    for (name, mut opts) in cases {
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut conn) = rumqttc::Client::new(opts, 10);
        client.publish(format!("rq/{name}"), RQoS::AtLeastOnce, false, format!("rumqttc over {name}")).unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(RPacket::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("rumqttc over {name}: {other:?}"),
            }
        }
        let m = watch.recv_publish();
        assert_eq!(m.payload, format!("rumqttc over {name}").as_bytes());
        watch.ack(&m);
    }
    b.shutdown();
}
