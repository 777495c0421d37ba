//! The load generator's event loop: every publisher and subscriber is a non-blocking socket on one
//! `mio::Poll`; reads are large and parsed in bulk, writes are batched per socket per iteration.

use std::io::{self, BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;

use crate::link::Link;
use mio::{Events, Interest, Poll, Token};

use crate::mqtt::{self, Frame};
use crate::report::{self, Outcome};
use crate::{RunArgs, Scenario};

const READ_BUF: usize = 256 * 1024;
const WRITE_HIGH: usize = 64 * 1024;

enum Role {
    Publisher {
        index: usize,
        topic: String,
    },
    /// `next_seq[p]`: the sequence number expected next from publisher p.
    Subscriber {
        filter: String,
        next_seq: Vec<u64>,
    },
    Idle,
}

struct Client {
    link: Link,
    rbuf: Vec<u8>,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    connected: bool,
    subscribed: bool,
    role: Role,
    inflight: usize,
    next_pid: u16,
    seq: u64,
    closed: bool,
    /// When the connection was opened, for the CONNECT -> CONNACK latency of `conns`.
    opened_at: Instant,
}

impl Client {
    fn open(addr: std::net::SocketAddr, role: Role, id: &str, args: &RunArgs, read_buf: usize) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let link = crate::link::spec(args).map_err(io::Error::other)?.open(stream, addr)?;
        let mut c = Client {
            link,
            rbuf: vec![0; read_buf],
            rlen: 0,
            wbuf: Vec::with_capacity(if read_buf > 4096 { WRITE_HIGH * 2 } else { 64 }),
            wpos: 0,
            connected: false,
            subscribed: false,
            role,
            inflight: 0,
            next_pid: 0,
            seq: 0,
            closed: false,
            opened_at: Instant::now(),
        };
        let persistent = args.persistent && matches!(c.role, Role::Subscriber { .. });
        let login = args.username.as_deref().map(|u| (u, args.password.as_deref().unwrap_or("")));
        mqtt::connect(&mut c.wbuf, id, args.keepalive, args.v5(), persistent, login);
        if let Role::Subscriber { filter, .. } = &c.role {
            let f = filter.clone();
            mqtt::subscribe(&mut c.wbuf, 1, &f, args.qos, args.v5());
        } else {
            c.subscribed = true;
        }
        Ok(c)
    }

    fn ready(&self) -> bool {
        self.connected && self.subscribed
    }

    fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes what is buffered until done or the socket would block.
    fn flush(&mut self) -> io::Result<()> {
        match self.link.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        while self.wpos < self.wbuf.len() {
            match self.link.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break, // connect in progress
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos > WRITE_HIGH {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }
}

/// What the run measures, shared by the frame handlers.
struct Tally {
    base: Instant,
    hist: Histogram<u64>,
    received: u64,
    duplicates: u64,
    lost: u64,
    last_rx: Instant,
    /// Shared subscriptions: every message must reach one member, so what was seen is kept per
    /// publisher over all subscribers (a bit per sequence number), not per subscriber.
    shared_seen: Option<Vec<Vec<u64>>>,
}

impl Tally {
    fn new(shared_publishers: Option<usize>) -> Tally {
        Tally {
            base: Instant::now(),
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"),
            received: 0,
            duplicates: 0,
            lost: 0,
            last_rx: Instant::now(),
            shared_seen: shared_publishers.map(|n| vec![Vec::new(); n]),
        }
    }
}

/// The payload's first 16 bytes: when the message was due (ns since the run's base), the
/// publisher's sequence number and the publisher's index. 16 B is the Open MQTT Benchmark
/// Suite's message size.
pub const STAMP: usize = 16;

/// Which publishers each subscriber hears, by scenario. In `sharedsub` the subscribers share
/// one group: each message reaches one of them.
fn plan(args: &RunArgs) -> (Vec<String>, Vec<(String, Vec<usize>)>) {
    let p = |default| args.publishers.unwrap_or(default);
    match args.scenario {
        Scenario::Fanin | Scenario::Latency => {
            let n = p(if args.scenario == Scenario::Fanin { 4 } else { 1 });
            let name = if args.scenario == Scenario::Fanin { "fanin" } else { "latency" };
            let pubs = (0..n).map(|i| format!("lt/{name}/{i}")).collect();
            (pubs, vec![(format!("lt/{name}/+"), (0..n).collect())])
        }
        Scenario::Fanout => {
            let s = args.subscribers.unwrap_or(100);
            (vec!["lt/fanout".into()], (0..s).map(|_| ("lt/fanout".to_string(), vec![0])).collect())
        }
        Scenario::Pairs => {
            let n = args.pairs;
            (
                (0..n).map(|i| format!("lt/pair/{i}")).collect(),
                (0..n).map(|i| (format!("lt/pair/{i}"), vec![i])).collect(),
            )
        }
        Scenario::Sharedsub => {
            // The suite's topics test/1 ... test/N under one shared filter.
            let n = p(1000);
            let s = args.subscribers.unwrap_or(5);
            let pubs = (1..=n).map(|i| format!("test/{i}")).collect();
            (pubs, (0..s).map(|_| ("$share/perf/test/#".to_string(), (0..n).collect())).collect())
        }
        Scenario::Conns => (vec![], vec![]),
    }
}

pub fn run(args: RunArgs) -> Result<(), String> {
    if args.scenario == Scenario::Conns {
        return conns(&args);
    }
    if args.size < STAMP {
        return Err(format!("--size must be at least {STAMP} bytes"));
    }
    let shared = args.scenario == Scenario::Sharedsub;
    let addr = args.addr();
    let (pub_topics, subs) = plan(&args);
    let npub = pub_topics.len();
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut clients: Vec<Client> = Vec::new();
    let run_id = args.id_prefix.clone().unwrap_or_else(|| std::process::id().to_string());
    for (i, (filter, _)) in subs.iter().enumerate() {
        let role = Role::Subscriber { filter: filter.clone(), next_seq: vec![0; npub] };
        let sub_addr = args.sub_port.map_or(addr, |p| std::net::SocketAddr::new(addr.ip(), p));
        clients.push(
            Client::open(sub_addr, role, &format!("lt-{run_id}-s{i}"), &args, READ_BUF).map_err(|e| e.to_string())?,
        );
    }
    let first_pub = clients.len();
    for (i, topic) in pub_topics.iter().enumerate() {
        let role = Role::Publisher { index: i, topic: topic.clone() };
        clients
            .push(Client::open(addr, role, &format!("lt-{run_id}-p{i}"), &args, 64 * 1024).map_err(|e| e.to_string())?);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        poll.registry()
            .register(c.link.source(), Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
    }
    let mut tally = Tally::new(shared.then_some(npub));
    let mut events = Events::with_capacity(1024);

    // Phase 1: everyone connected and subscribed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !clients.iter().all(|c| c.ready()) {
        if Instant::now() > deadline {
            return Err("clients did not connect and subscribe within 30 s".into());
        }
        step(&mut poll, &mut events, &mut clients, &mut tally, &args, Duration::from_millis(10))?;
    }

    // Phase 2: publish for the duration (or count), then drain.
    let rate = args.rate.unwrap_or(if args.scenario == Scenario::Latency { 20_000.0 } else { 0.0 });
    let per_pub_rate = rate / npub as f64;
    let cpu_before = args.broker_pid.and_then(report::cpu_seconds);
    let t0 = Instant::now();
    let end = t0 + args.duration();
    tally.last_rx = t0;
    let mut payload = vec![0u8; args.size];
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        let publishing = now < end;
        if publishing {
            for c in clients[first_pub..].iter_mut() {
                let Role::Publisher { index, ref topic } = c.role else { continue };
                // At a fixed rate each publisher keeps its own phase, spread evenly over the
                // period, as independent devices are: in lockstep they would measure a burst.
                let phase = index as f64 / npub as f64;
                let due = if rate > 0.0 {
                    let periods = (now - t0).as_secs_f64() * per_pub_rate - phase;
                    if periods < 0.0 {
                        0
                    } else {
                        periods as u64 + 1
                    }
                } else {
                    u64::MAX
                };
                while c.seq < due
                    && (args.count == 0 || c.seq < args.count)
                    && c.pending() < WRITE_HIGH
                    && (args.qos == 0 || c.inflight < args.window)
                {
                    // Latency counts from when the message was due, not when it went out:
                    // a stalled broker cannot hide its stall (no coordinated omission).
                    let stamp = if rate > 0.0 {
                        t0 + Duration::from_secs_f64((c.seq as f64 + phase) / per_pub_rate)
                    } else {
                        now
                    };
                    payload[..8].copy_from_slice(&((stamp - tally.base).as_nanos() as u64).to_le_bytes());
                    payload[8..12].copy_from_slice(&(c.seq as u32).to_le_bytes());
                    payload[12..16].copy_from_slice(&(index as u32).to_le_bytes());
                    let pid = if args.qos > 0 {
                        c.next_pid = c.next_pid % 65535 + 1;
                        c.next_pid
                    } else {
                        0
                    };
                    mqtt::publish(&mut c.wbuf, topic, args.qos, pid, &payload, args.v5());
                    c.seq += 1;
                    sent += 1;
                    if args.qos > 0 {
                        c.inflight += 1;
                    }
                }
            }
        }
        let all_counted = args.count > 0 && clients[first_pub..].iter().all(|c| c.seq >= args.count);
        let expected: u64 = expected_receipts(&clients, first_pub, &subs, shared);
        let acked = clients[first_pub..].iter().all(|c| c.inflight == 0);
        if !publishing || all_counted {
            let quiet = now.duration_since(tally.last_rx.max(end.min(now))) > Duration::from_millis(500);
            let done = tally.received + tally.lost >= expected && acked;
            let drained = now > end.min(now) + Duration::from_secs_f64(args.drain);
            if done || (args.qos == 0 && quiet) || drained {
                break;
            }
        }
        // epoll waits in whole milliseconds: at a fixed rate, spin (timeout 0) so a message goes out
        // when it is due, not up to a millisecond late. The load generator has its own core.
        let wait = if rate > 0.0 && publishing { Duration::ZERO } else { Duration::from_millis(1) };
        step(&mut poll, &mut events, &mut clients, &mut tally, &args, wait)?;
    }
    let cpu_after = args.broker_pid.and_then(report::cpu_seconds);
    for c in clients.iter_mut() {
        mqtt::disconnect(&mut c.wbuf);
        let _ = c.flush();
    }
    // Loss: what each subscriber never saw, from the publishers' final sequence numbers.
    let expected = expected_receipts(&clients, first_pub, &subs, shared);
    let missing = expected.saturating_sub(tally.received);
    let elapsed = tally.last_rx.max(end.min(tally.last_rx)).duration_since(t0).max(Duration::from_millis(1));
    let outcome = Outcome {
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        case: args.case_name(),
        label: args.label.clone(),
        mqtt: if args.v5() { "5".into() } else { "3.1.1".into() },
        qos: args.qos,
        size: args.size,
        publishers: npub,
        subscribers: subs.len(),
        offered_rate: rate,
        duration_s: args.duration,
        sent,
        expected,
        received: tally.received,
        duplicates: tally.duplicates,
        lost: missing,
        throughput: tally.received as f64 / elapsed.as_secs_f64(),
        hist: Some(tally.hist),
        broker_cpu_s: match (cpu_before, cpu_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        broker_rss: args.broker_pid.and_then(report::rss_bytes),
        connect_rate: None,
        rss_per_connection: None,
        connections: None,
    };
    report::emit(&outcome, args.json.as_deref())?;
    if args.qos > 0 && (outcome.lost > 0 || outcome.duplicates > 0) {
        return Err(format!(
            "QoS {} run lost {} and duplicated {} messages",
            args.qos, outcome.lost, outcome.duplicates
        ));
    }
    Ok(())
}

fn expected_receipts(clients: &[Client], first_pub: usize, subs: &[(String, Vec<usize>)], shared: bool) -> u64 {
    if shared {
        return clients[first_pub..].iter().map(|c| c.seq).sum();
    }
    subs.iter().map(|(_, pubs)| pubs.iter().map(|&p| clients[first_pub + p].seq).sum::<u64>()).sum()
}

/// One poll, then reads and frame handling for every ready socket, then a flush of every socket
/// with output.
fn step(
    poll: &mut Poll,
    events: &mut Events,
    clients: &mut [Client],
    tally: &mut Tally,
    args: &RunArgs,
    timeout: Duration,
) -> Result<(), String> {
    poll.poll(events, Some(timeout)).map_err(|e| e.to_string())?;
    for ev in events.iter() {
        let c = &mut clients[ev.token().0];
        if ev.is_readable() || ev.is_read_closed() {
            read_client(c, tally, args)?;
        }
    }
    for c in clients.iter_mut() {
        // TLS records and WebSocket frames may wait below even with no MQTT bytes pending.
        if c.pending() > 0 || !matches!(c.link, Link::Tcp(_)) {
            c.flush().map_err(|e| format!("write to broker: {e}"))?;
        }
    }
    Ok(())
}

fn read_client(c: &mut Client, tally: &mut Tally, args: &RunArgs) -> Result<(), String> {
    loop {
        if c.rlen == c.rbuf.len() {
            return Err("a packet larger than the read buffer".into());
        }
        match c.link.read(&mut c.rbuf[c.rlen..]) {
            Ok(0) => {
                if !c.closed {
                    c.closed = true;
                    return Err("broker closed a connection".into());
                }
                return Ok(());
            }
            Ok(n) => {
                c.rlen += n;
                handle_frames(c, tally, args)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read from broker: {e}")),
        }
    }
}

fn handle_frames(c: &mut Client, tally: &mut Tally, args: &RunArgs) -> Result<(), String> {
    let v5 = args.v5();
    let mut at = 0;
    let now = Instant::now();
    while let Some((frame, len)) = mqtt::parse(&c.rbuf[at..c.rlen], v5)? {
        match frame {
            Frame::ConnAck { code } => {
                if code != 0 {
                    return Err(format!("CONNACK refused with code {code:#04x}"));
                }
                c.connected = true;
                if matches!(c.role, Role::Idle) {
                    let _ = tally.hist.record((now - c.opened_at).as_nanos().max(1) as u64);
                }
            }
            Frame::SubAck { codes } => {
                if codes.iter().any(|&x| x >= 0x80) {
                    return Err("SUBSCRIBE refused".into());
                }
                c.subscribed = true;
            }
            Frame::Publish { qos, packet_id, payload } => {
                if payload.len() >= STAMP {
                    let stamp = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                    let seq = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as u64;
                    let publisher = u32::from_le_bytes(payload[12..16].try_into().expect("4 bytes")) as usize;
                    let latency = (now - tally.base).as_nanos() as u64;
                    let _ = tally.hist.record(latency.saturating_sub(stamp).max(1));
                    if let Some(seen) = tally.shared_seen.as_mut() {
                        if let Some(bits) = seen.get_mut(publisher) {
                            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                            if bits.len() <= word {
                                bits.resize(word + 1, 0);
                            }
                            if bits[word] & bit != 0 {
                                tally.duplicates += 1;
                            } else {
                                bits[word] |= bit;
                                tally.received += 1;
                            }
                        }
                    } else if let Role::Subscriber { next_seq, .. } = &mut c.role {
                        if let Some(next) = next_seq.get_mut(publisher) {
                            if seq < *next {
                                tally.duplicates += 1;
                            } else {
                                tally.received += 1;
                                *next = seq + 1;
                            }
                        }
                    }
                    tally.last_rx = now;
                }
                match qos {
                    1 => mqtt::ack(&mut c.wbuf, mqtt::PUBACK, packet_id),
                    2 => mqtt::ack(&mut c.wbuf, mqtt::PUBREC, packet_id),
                    _ => {}
                }
            }
            Frame::Ack { kind, packet_id } => match kind {
                mqtt::PUBACK | mqtt::PUBCOMP => c.inflight = c.inflight.saturating_sub(1),
                mqtt::PUBREC => mqtt::ack(&mut c.wbuf, mqtt::PUBREL, packet_id),
                mqtt::PUBREL => mqtt::ack(&mut c.wbuf, mqtt::PUBCOMP, packet_id),
                _ => {}
            },
            Frame::Disconnect => return Err("broker sent DISCONNECT".into()),
            Frame::PingResp | Frame::Other => {}
        }
        at += len;
    }
    c.rbuf.copy_within(at..c.rlen, 0);
    c.rlen -= at;
    Ok(())
}

/// `conns`: opens idle connections (at most 500 handshakes at a time), holds them, and reports
/// the connect rate and the broker's RSS per connection.
fn conns(args: &RunArgs) -> Result<(), String> {
    if args.procs > 1 && !args.child {
        return conns_multi(args);
    }
    let rss_before = args.broker_pid.and_then(report::rss_bytes);
    let cpu_before = args.broker_pid.and_then(report::cpu_seconds);
    let (opened, secs, _held, hist) = open_idle(args)?;
    if args.child {
        println!("ready {opened} {secs}");
        let _ = io::stdout().flush();
        // Hold until the parent closes our stdin.
        let mut sink = String::new();
        let _ = io::stdin().read_to_string(&mut sink);
        return Ok(());
    }
    std::thread::sleep(Duration::from_secs_f64(args.hold));
    let cpu = match (cpu_before, args.broker_pid.and_then(report::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    finish_conns(args, opened, secs, rss_before, Some(hist), cpu)
}

fn conns_multi(args: &RunArgs) -> Result<(), String> {
    let rss_before = args.broker_pid.and_then(report::rss_bytes);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let per = args.connections.div_ceil(args.procs);
    let mut children = Vec::new();
    for i in 0..args.procs {
        let n = per.min(args.connections - i * per);
        let mut link_args: Vec<String> = Vec::new();
        if args.tls {
            link_args.push("--tls".into());
        }
        if let Some(ca) = &args.cafile {
            link_args.extend(["--cafile".into(), ca.display().to_string()]);
        }
        if args.ws {
            link_args.push("--ws".into());
        }
        let child = Command::new(&exe)
            .args(["run", "conns", "--child", "--host", &args.host, "--port", &args.port.to_string()])
            .args(["--connections", &n.to_string(), "--keepalive", &args.keepalive.to_string()])
            .args(&link_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        children.push(child);
    }
    let mut opened = 0;
    let mut secs: f64 = 0.0;
    for child in children.iter_mut() {
        let mut line = String::new();
        io::BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.first() != Some(&"ready") {
            return Err(format!("a conns helper failed: {line:?}"));
        }
        opened += parts[1].parse::<usize>().unwrap_or(0);
        secs = secs.max(parts[2].parse::<f64>().unwrap_or(0.0));
    }
    std::thread::sleep(Duration::from_secs_f64(args.hold));
    let r = finish_conns(args, opened, secs, rss_before, None, None);
    for mut child in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    r
}

/// Reports a `conns` run; `hist` holds CONNECT -> CONNACK times, `cpu` the broker's CPU seconds
/// while connecting and holding.
fn finish_conns(
    args: &RunArgs,
    opened: usize,
    secs: f64,
    rss_before: Option<u64>,
    hist: Option<Histogram<u64>>,
    cpu: Option<f64>,
) -> Result<(), String> {
    let rss_after = args.broker_pid.and_then(report::rss_bytes);
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if opened > 0 => Some(b.saturating_sub(a) as f64 / opened as f64),
        _ => None,
    };
    let outcome = Outcome {
        scenario: "conns".into(),
        case: args.case_name(),
        label: args.label.clone(),
        mqtt: if args.v5() { "5".into() } else { "3.1.1".into() },
        connections: Some(opened),
        connect_rate: Some(opened as f64 / secs.max(1e-6)),
        rss_per_connection: per_conn,
        broker_rss: rss_after,
        hist,
        broker_cpu_s: cpu,
        offered_rate: args.rate.unwrap_or(0.0),
        ..Outcome::default()
    };
    report::emit(&outcome, args.json.as_deref())?;
    if opened < args.connections {
        return Err(format!("only {opened} of {} connections were accepted", args.connections));
    }
    Ok(())
}

/// Opens `args.connections` idle MQTT connections (at `--rate` per second if given); returns
/// (opened, seconds taken, clients, CONNECT -> CONNACK times).
fn open_idle(args: &RunArgs) -> Result<(usize, f64, Vec<Client>, Histogram<u64>), String> {
    let addr = args.addr();
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut clients: Vec<Client> = Vec::with_capacity(args.connections);
    let mut tally = Tally::new(None);
    let start = Instant::now();
    // At `--rate` connections per second the run takes connections / rate seconds.
    let rate = args.rate.unwrap_or(0.0);
    let paced = if rate > 0.0 { args.connections as f64 / rate } else { 0.0 };
    let deadline = start + Duration::from_secs_f64(120.0 + paced);
    let id = std::process::id();
    let mut connected = 0;
    while connected < args.connections {
        let due = if rate > 0.0 { (start.elapsed().as_secs_f64() * rate) as usize + 1 } else { usize::MAX };
        while clients.len() < args.connections && clients.len() - connected < 500 && clients.len() < due {
            let mut c = Client::open(addr, Role::Idle, &format!("lt-{id}-c{}", clients.len()), args, 256)
                .map_err(|e| format!("connect: {e}"))?;
            poll.registry()
                .register(c.link.source(), Token(clients.len()), Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            clients.push(c);
        }
        let wait = if rate > 0.0 { Duration::from_millis(1) } else { Duration::from_millis(5) };
        step(&mut poll, &mut events, &mut clients, &mut tally, args, wait)?;
        connected = clients.iter().filter(|c| c.connected).count();
        if Instant::now() > deadline {
            break;
        }
    }
    Ok((connected, start.elapsed().as_secs_f64(), clients, tally.hist))
}
