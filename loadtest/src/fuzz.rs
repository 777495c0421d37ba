//! `fuzz`: mutated MQTT over TCP from many short connections with random client ids (half of
//! them asking for persistent sessions), a few connections that stop in the middle of a packet,
//! and one healthy QoS 1 pair that must keep working throughout. Loopback only, bounded in time
//! and in connections held. Prints one JSON line: what was sent, and how the healthy pair fared.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mqtt;

#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Threads opening connections one after another.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Seed for the mutations (each thread derives its own).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    packets: AtomicU64,
    mutated: AtomicU64,
    bytes: AtomicU64,
    stalled: AtomicU64,
}

/// One packet a client might send, valid before mutation.
fn packet(rng: &mut Rng, out: &mut Vec<u8>, v5: bool) {
    let topic = format!("fuzz/{}/{}", rng.below(1000), rng.below(100));
    let id = rng.below(65_535) as u16 + 1;
    match rng.below(8) {
        0 | 1 | 2 => {
            let qos = rng.below(3) as u8;
            let mut payload = vec![0u8; rng.below(512) as usize];
            for b in payload.iter_mut() {
                *b = rng.next() as u8;
            }
            let start = out.len();
            mqtt::publish(out, &topic, qos, id, &payload, v5);
            if rng.chance(20) {
                out[start] |= 0x01; // retained
            }
        }
        3 => {
            let filter = match rng.below(4) {
                0 => "fuzz/#".to_string(),
                1 => format!("fuzz/{}/+", rng.below(1000)),
                2 => format!("$share/g{}/fuzz/#", rng.below(10)),
                _ => topic,
            };
            mqtt::subscribe(out, id, &filter, rng.below(3) as u8, v5);
        }
        4 => mqtt::ack(out, mqtt::PUBACK, id),
        5 => mqtt::ack(out, mqtt::PUBREC, id),
        6 => out.extend_from_slice(&[0xc0, 0x00]), // PINGREQ
        _ => {
            // UNSUBSCRIBE
            let body = 2 + 2 + topic.len() + v5 as usize;
            out.extend_from_slice(&[0xa2, body as u8]);
            out.extend_from_slice(&id.to_be_bytes());
            if v5 {
                out.push(0);
            }
            out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            out.extend_from_slice(topic.as_bytes());
        }
    }
}

/// Damages the bytes from `start` on: flipped bits, a byte replaced, the packet cut short,
/// garbage appended, or a length field lying.
fn mutate(rng: &mut Rng, out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len == 0 {
        return;
    }
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = start + rng.below(len as u64) as usize;
                out[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let i = start + rng.below(len as u64) as usize;
            out[i] = rng.next() as u8;
        }
        2 => out.truncate(start + rng.below(len as u64) as usize),
        3 => {
            for _ in 0..rng.below(64) {
                out.push(rng.next() as u8);
            }
        }
        4 if len > 1 => out[start + 1] = rng.next() as u8 | 0x80, // remaining length continues
        _ => out[start] = rng.next() as u8,                       // any packet type and flags
    }
}

fn fuzz_thread(addr: SocketAddr, seed: u64, end: Instant, totals: Arc<Totals>) {
    let mut rng = Rng(seed | 1);
    // Connections that stop in the middle of a packet, closed by us after 30 s at the latest:
    // the broker's partial-packet deadline should close them first.
    let mut stalled: Vec<(Instant, TcpStream)> = Vec::new();
    let mut out = Vec::with_capacity(16 * 1024);
    let mut sink = [0u8; 16 * 1024];
    while Instant::now() < end {
        stalled.retain(|(at, _)| at.elapsed() < Duration::from_secs(30));
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        totals.connections.fetch_add(1, Ordering::Relaxed);
        let v5 = rng.chance(50);
        out.clear();
        let id = format!("fz{:016x}", rng.next());
        let start = out.len();
        mqtt::connect(&mut out, &id, rng.below(120) as u16, v5, false, None);
        if rng.chance(50) {
            out[start + 9] &= !0x02; // flags byte: clean session off, a persistent session
        }
        if rng.chance(5) {
            mutate(&mut rng, &mut out, start);
            totals.mutated.fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..1 + rng.below(20) {
            let start = out.len();
            packet(&mut rng, &mut out, v5);
            if rng.chance(30) {
                mutate(&mut rng, &mut out, start);
                totals.mutated.fetch_add(1, Ordering::Relaxed);
            }
            totals.packets.fetch_add(1, Ordering::Relaxed);
        }
        let slow = rng.chance(1) && stalled.len() < 50;
        if slow {
            // Declare a large PUBLISH and send only part of it.
            out.extend_from_slice(&[0x30, 0xff, 0xff, 0x03, 0, 1, b's']);
        }
        totals.bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
        let _ = s.write_all(&out);
        // Read what the broker answers, briefly, then go.
        let read_until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < read_until {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if slow {
            totals.stalled.fetch_add(1, Ordering::Relaxed);
            stalled.push((Instant::now(), s));
        }
    }
}

/// A QoS 1 publisher and subscriber on their own topic, one exchange every 100 ms: how many
/// went through, how many took more than 5 s or never came, and the slowest.
fn healthy_pair(addr: SocketAddr, stop: Arc<AtomicBool>) -> Result<(u64, u64, Duration), String> {
    let open = |id: &str| -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).ok();
        let mut out = Vec::new();
        mqtt::connect(&mut out, id, 30, false, false, None);
        s.write_all(&out).map_err(|e| e.to_string())?;
        Ok(s)
    };
    let mut sub = open("fuzz-healthy-sub")?;
    let mut publ = open("fuzz-healthy-pub")?;
    let mut out = Vec::new();
    mqtt::subscribe(&mut out, 1, "healthy/fuzz", 1, false);
    sub.write_all(&out).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(200));
    sub.set_read_timeout(Some(Duration::from_millis(100))).ok();
    publ.set_read_timeout(Some(Duration::from_millis(1))).ok();
    let (mut ok, mut failed, mut worst) = (0u64, 0u64, Duration::ZERO);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut n: u16 = 0;
    while !stop.load(Ordering::Relaxed) {
        n = n % 65_000 + 1;
        let payload = n.to_be_bytes();
        out.clear();
        mqtt::publish(&mut out, "healthy/fuzz", 1, n, &payload, false);
        let t0 = Instant::now();
        if publ.write_all(&out).is_err() {
            return Err("the healthy publisher was disconnected".into());
        }
        let _ = publ.read(&mut chunk); // PUBACKs: drained, not checked
        let mut got = false;
        while !got && t0.elapsed() < Duration::from_secs(5) {
            match sub.read(&mut chunk) {
                Ok(0) => return Err("the healthy subscriber was disconnected".into()),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(_) => continue,
            }
            while let Ok(Some((frame, used))) = mqtt::parse(&buf, false) {
                if let mqtt::Frame::Publish { qos, packet_id, payload: p } = frame {
                    got |= p == payload;
                    if qos > 0 {
                        let mut ack = Vec::new();
                        mqtt::ack(&mut ack, mqtt::PUBACK, packet_id);
                        let _ = sub.write_all(&ack);
                    }
                }
                buf.drain(..used);
            }
        }
        if got {
            ok += 1;
            worst = worst.max(t0.elapsed());
        } else {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((ok, failed, worst))
}

pub fn run(args: FuzzArgs) -> Result<(), String> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port).parse().map_err(|e| format!("--host: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err("fuzz targets loopback only".into());
    }
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pair = {
        let stop = stop.clone();
        std::thread::spawn(move || healthy_pair(addr, stop))
    };
    let threads: Vec<_> = (0..args.threads)
        .map(|t| {
            let totals = totals.clone();
            let seed = args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(t as u64 + 1);
            std::thread::spawn(move || fuzz_thread(addr, seed, end, totals))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    stop.store(true, Ordering::Relaxed);
    let pair = pair.join().map_err(|_| "the healthy pair thread panicked".to_string())?;
    let (ok, failed, worst, pair_error) = match pair {
        Ok((ok, failed, worst)) => (ok, failed, worst, String::new()),
        Err(e) => (0, 0, Duration::ZERO, e),
    };
    let line = serde_json::json!({
        "connections": totals.connections.load(Ordering::Relaxed),
        "packets": totals.packets.load(Ordering::Relaxed),
        "mutated": totals.mutated.load(Ordering::Relaxed),
        "bytes": totals.bytes.load(Ordering::Relaxed),
        "stalled_connections": totals.stalled.load(Ordering::Relaxed),
        "healthy_exchanges": ok,
        "healthy_failures": failed,
        "healthy_worst_ms": worst.as_secs_f64() * 1000.0,
        "healthy_error": pair_error,
    });
    println!("{line}");
    if !pair_error.is_empty() || failed > 0 {
        return Err(format!("the healthy pair did not keep working: {line}"));
    }
    Ok(())
}
