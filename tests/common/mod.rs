//! Test support: a broker on an ephemeral loopback port, and a small blocking MQTT client built
//! on our codec for exact, packet-level assertions. Every wait has a deadline; nothing sleeps and
//! hopes.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern::codec::*;
use tern::{Broker, Config};

pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn config(workers: usize) -> Config {
    Config { port: 0, workers, pin_workers: false, sys_interval: 1, ..Config::default() }
}

pub fn start(workers: usize) -> Broker {
    start_with(config(workers))
}

pub fn start_with(config: Config) -> Broker {
    let _ = env_logger::builder().is_test(true).try_init();
    Broker::start(config).expect("broker starts")
}

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    pub version: ProtocolVersion,
    /// Packets read while waiting for another kind.
    pending: VecDeque<Packet>,
    next_id: u16,
}

impl Client {
    pub fn open(addr: SocketAddr, version: ProtocolVersion) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to broker");
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: BytesMut::new(), version, pending: VecDeque::new(), next_id: 0 }
    }

    /// Opens a connection and completes CONNECT/CONNACK.
    pub fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Client, ConnAck) {
        Self::connect_v(addr, id, clean, ProtocolVersion::V311)
    }

    pub fn connect_v(addr: SocketAddr, id: &str, clean: bool, v: ProtocolVersion) -> (Client, ConnAck) {
        let mut c = Connect::new(id);
        c.protocol = v;
        c.clean_start = clean;
        Self::connect_with(addr, c)
    }

    pub fn connect_with(addr: SocketAddr, connect: Connect) -> (Client, ConnAck) {
        let mut client = Client::open(addr, connect.protocol);
        client.send(&Packet::Connect(Box::new(connect)));
        match client.recv() {
            Packet::ConnAck(a) => (client, *a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        p.encode(self.version, &mut out);
        self.stream.write_all(&out).expect("write to broker");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn id(&mut self) -> PacketId {
        self.next_id = self.next_id % 65535 + 1;
        pid(self.next_id)
    }

    /// The next packet within `wait`, or None; panics on a closed connection.
    pub fn try_recv(&mut self, wait: Duration) -> Option<Packet> {
        if let Some(p) = self.pending.pop_front() {
            return Some(p);
        }
        let end = Instant::now() + wait;
        loop {
            if let Some(p) = decode(&mut self.buf, Some(self.version), 1 << 28).expect("broker sent a valid packet") {
                return Some(p);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed by broker"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
                // A signal (another test's child exiting) interrupted the read: read again.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("read error: {e}"),
            }
        }
    }

    pub fn recv(&mut self) -> Packet {
        self.try_recv(DEADLINE).expect("a packet from the broker within the deadline")
    }

    /// Waits for a packet matching `pick`, keeping the others for later.
    pub fn recv_where(&mut self, mut pick: impl FnMut(&Packet) -> bool) -> Packet {
        let end = Instant::now() + DEADLINE;
        let mut skipped = VecDeque::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let p = self.try_recv(left).expect("the expected packet within the deadline");
            if pick(&p) {
                skipped.extend(self.pending.drain(..));
                self.pending = skipped;
                return p;
            }
            skipped.push_back(p);
        }
    }

    pub fn recv_publish(&mut self) -> Publish {
        match self.recv_where(|p| matches!(p, Packet::Publish(_))) {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        if let Some(p) = self.try_recv(wait) {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Waits until the broker closes the connection.
    pub fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen: Vec<Packet> = self.pending.drain(..).collect();
        let end = Instant::now() + DEADLINE;
        loop {
            while let Ok(Some(p)) = decode(&mut self.buf, Some(self.version), 1 << 28) {
                seen.push(p);
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "broker did not close the connection; saw {seen:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return seen,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return seen,
            }
        }
    }

    pub fn subscribe(&mut self, filter: &str, qos: QoS) -> ReasonCode {
        self.subscribe_opts(filter, SubscriptionOptions::new(qos))
    }

    pub fn subscribe_opts(&mut self, filter: &str, opts: SubscriptionOptions) -> ReasonCode {
        let id = self.id();
        let s = Subscribe { packet_id: id, filters: vec![(filter.into(), opts)], properties: Properties::default() };
        self.send(&Packet::Subscribe(Box::new(s)));
        match self.recv_where(|p| matches!(p, Packet::SubAck(a) if a.packet_id == id)) {
            Packet::SubAck(a) => a.codes[0],
            _ => unreachable!(),
        }
    }

    /// Publishes and completes the QoS flow as a well-behaved client.
    pub fn publish(&mut self, topic: &str, payload: impl Into<Bytes>, qos: QoS, retain: bool) {
        let mut p = Publish::new(topic, qos, payload.into());
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.packet_id = Some(self.id());
        }
        let id = p.packet_id;
        self.send(&Packet::Publish(p));
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.recv_where(|p| matches!(p, Packet::PubAck(a) if Some(a.packet_id) == id));
            }
            QoS::ExactlyOnce => {
                self.recv_where(|p| matches!(p, Packet::PubRec(a) if Some(a.packet_id) == id));
                self.send(&Packet::PubRel(Ack::new(id.unwrap())));
                self.recv_where(|p| matches!(p, Packet::PubComp(a) if Some(a.packet_id) == id));
            }
        }
    }

    /// Acknowledges a received PUBLISH as a well-behaved client (QoS 2: the whole flow).
    pub fn ack(&mut self, p: &Publish) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(Ack::new(id))),
            (QoS::ExactlyOnce, Some(id)) => {
                self.send(&Packet::PubRec(Ack::new(id)));
                self.recv_where(|p| matches!(p, Packet::PubRel(a) if a.packet_id == id));
                self.send(&Packet::PubComp(Ack::new(id)));
            }
            _ => {}
        }
    }

    /// A PINGREQ answered: everything the broker had queued for us before it has arrived.
    pub fn sync(&mut self) {
        self.send(&Packet::PingReq);
        self.recv_where(|p| matches!(p, Packet::PingResp));
    }

    pub fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Box::default()));
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 1024];
        self.stream.set_read_timeout(Some(DEADLINE)).unwrap();
        while matches!(self.stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Every test runs with one worker and with four, so that clients sit on different workers and
/// handover and cross-worker delivery are exercised.
pub const WORKER_COUNTS: [usize; 2] = [1, 4];

/// Runs the real binary on an ephemeral port; returns it and its port.
pub fn spawn_tern(extra: &[&str], config: &str) -> (Child, u16, std::path::PathBuf) {
    spawn_tern_under(&[], extra, config)
}

/// `spawn_tern` run through `wrapper` (e.g. `prlimit --fsize=N --`).
#[allow(dead_code)]
pub fn spawn_tern_under(wrapper: &[&str], extra: &[&str], config: &str) -> (Child, u16, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tern-test-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tern.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_tern"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_tern")),
    };
    let mut child = cmd
        .args(["-c", file.to_str().unwrap(), "-p", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("tern binary runs");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let port = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("tern logs its address");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (child, port, dir)
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

pub fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

/// A loopback port nobody listens on now (for a broker that must come back on the same port).
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Until something accepts on 127.0.0.1:`port`.
#[allow(dead_code)]
pub fn wait_listening(port: u16) {
    let end = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Until `child` exits (it was told to): its exit status.
#[allow(dead_code)]
pub fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
#[allow(dead_code)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
