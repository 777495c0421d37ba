//! Results: a readable table on stdout and one JSON line per run (optionally appended to a file);
//! the broker's CPU time and RSS read from /proc.

use std::io::Write;
use std::path::Path;

use hdrhistogram::Histogram;

#[derive(Default)]
pub struct Outcome {
    pub scenario: String,
    /// The Open MQTT Benchmark Suite use case, when the run is one.
    pub case: Option<String>,
    pub label: String,
    pub mqtt: String,
    pub qos: u8,
    pub size: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub offered_rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Delivered messages per second at the subscribers.
    pub throughput: f64,
    pub hist: Option<Histogram<u64>>,
    pub broker_cpu_s: Option<f64>,
    pub broker_rss: Option<u64>,
    pub connections: Option<usize>,
    pub connect_rate: Option<f64>,
    pub rss_per_connection: Option<f64>,
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn emit(o: &Outcome, file: Option<&Path>) -> Result<(), String> {
    let mut json = serde_json::json!({
        "scenario": o.scenario, "label": o.label, "mqtt": o.mqtt,
    });
    let m = json.as_object_mut().expect("object");
    let mut put = |k: &str, v: serde_json::Value| {
        m.insert(k.to_string(), v);
    };
    if let Some(case) = &o.case {
        println!("use case {case}");
        put("case", case.as_str().into());
    }
    if o.scenario == "conns" {
        let conns = o.connections.unwrap_or(0);
        let rate = o.connect_rate.unwrap_or(0.0);
        println!("scenario   broker        connections  connect/s   broker RSS     RSS/conn");
        println!(
            "{:<10} {:<13} {:>11} {:>10.0} {:>10} KiB {:>9}",
            o.scenario,
            o.label,
            conns,
            rate,
            o.broker_rss.map_or("-".into(), |r| (r / 1024).to_string()),
            o.rss_per_connection.map_or("-".into(), |r| format!("{r:.0} B")),
        );
        if let Some(h) = o.hist.as_ref().filter(|h| !h.is_empty()) {
            println!(
                "  CONNECT -> CONNACK us: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                us(h, 0.5),
                us(h, 0.9),
                us(h, 0.99),
                h.max() as f64 / 1000.0
            );
            put("p50_us", us(h, 0.5).into());
            put("p90_us", us(h, 0.9).into());
            put("p99_us", us(h, 0.99).into());
            put("max_us", (h.max() as f64 / 1000.0).into());
        }
        if let Some(cpu) = o.broker_cpu_s {
            println!("  broker CPU {cpu:.2} s");
        }
        put("broker_cpu_s", o.broker_cpu_s.into());
        put("offered_rate", o.offered_rate.into());
        put("connections", conns.into());
        put("connect_rate", rate.into());
        put("broker_rss", o.broker_rss.into());
        put("rss_per_connection", o.rss_per_connection.into());
    } else {
        let h = o.hist.as_ref().expect("throughput runs record latency");
        let cpu_per_m = o.broker_cpu_s.map(|c| if o.received > 0 { c / (o.received as f64 / 1e6) } else { f64::NAN });
        println!(
            "scenario {} | broker {} | MQTT {} QoS {} | {} B | {} pub -> {} sub | offered {}",
            o.scenario,
            o.label,
            o.mqtt,
            o.qos,
            o.size,
            o.publishers,
            o.subscribers,
            if o.offered_rate > 0.0 { format!("{:.0} msg/s", o.offered_rate) } else { "max".into() }
        );
        println!(
            "  sent {}  expected {}  received {}  duplicates {}  lost {}",
            o.sent, o.expected, o.received, o.duplicates, o.lost
        );
        println!("  delivered {:.0} msg/s", o.throughput);
        println!(
            "  latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            us(h, 0.5),
            us(h, 0.9),
            us(h, 0.99),
            us(h, 0.999),
            h.max() as f64 / 1000.0
        );
        if let (Some(cpu), Some(per_m)) = (o.broker_cpu_s, cpu_per_m) {
            println!("  broker CPU {cpu:.2} s, {per_m:.3} CPU-s per million delivered");
        }
        put("qos", o.qos.into());
        put("size", o.size.into());
        put("publishers", o.publishers.into());
        put("subscribers", o.subscribers.into());
        put("offered_rate", o.offered_rate.into());
        put("duration_s", o.duration_s.into());
        put("sent", o.sent.into());
        put("expected", o.expected.into());
        put("received", o.received.into());
        put("duplicates", o.duplicates.into());
        put("lost", o.lost.into());
        put("throughput", o.throughput.into());
        put("p50_us", us(h, 0.5).into());
        put("p90_us", us(h, 0.9).into());
        put("p99_us", us(h, 0.99).into());
        put("p999_us", us(h, 0.999).into());
        put("max_us", (h.max() as f64 / 1000.0).into());
        put("broker_cpu_s", o.broker_cpu_s.into());
        put("cpu_s_per_million", cpu_per_m.into());
        put("broker_rss", o.broker_rss.into());
    }
    let line = json.to_string();
    println!("{line}");
    if let Some(path) = file {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// User + system CPU seconds of a process (Linux clock ticks are 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
