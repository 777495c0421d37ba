//! tern-loadtest: drives any MQTT broker with publishers and subscribers on one non-blocking event
//! loop, records end-to-end latency in an HDR histogram, checks every message for loss and
//! duplication, and prints a table and one JSON line per run.

mod client;
mod fuzz;
mod link;
mod mqtt;
mod plot;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one load scenario against a broker.
    Run(RunArgs),
    /// Run an Open MQTT Benchmark Suite use case by name, at the rates the suite defines, scaled
    /// to one edge box (names: publishers-subscribers-topics-delivered rate; conn: count-rate).
    Suite(SuiteArgs),
    /// Mutated packets from many connections with random client ids, and a healthy pair that
    /// must keep working (loopback only).
    Fuzz(fuzz::FuzzArgs),
    /// Draw SVG charts from JSON result lines (as written with --json).
    Plot {
        /// JSON-lines file of results.
        #[arg(long)]
        input: PathBuf,
        /// Directory for the SVG files.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Write a markdown table of medians and ratios from JSON result lines.
    Summarize {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The label whose figures are divided ...
        #[arg(long, default_value = "tern")]
        first: String,
        /// ... by this label's.
        #[arg(long, default_value = "mosquitto")]
        second: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// P publishers -> 1 wildcard subscriber.
    Fanin,
    /// 1 publisher -> S subscribers of one topic.
    Fanout,
    /// N publisher/subscriber pairs on distinct topics.
    Pairs,
    /// A fixed offered rate, for honest latency percentiles (no coordinated omission).
    Latency,
    /// N idle connections with keepalive: connect rate and broker RSS per connection.
    Conns,
    /// P publishers on test/1 ... test/P -> S subscribers sharing `$share/perf/test/#` (MQTT 5).
    Sharedsub,
}

/// The Open MQTT Benchmark Suite's use cases (EMQ, 2023), at sizes one edge box takes: QoS 1,
/// 16-byte payloads, keep alive 300, clean sessions, every publisher at its own phase.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuiteCase {
    /// 1,000 publishers -> 1,000 subscribers on 1,000 topics, 1 msg/s each: 1,000 msg/s.
    #[value(name = "p2p-1K-1K-1K-1K")]
    P2p,
    /// 1 publisher -> 1,000 subscribers of 1 topic, 1 msg/s: 1,000 deliveries/s.
    #[value(name = "fanout-1-1k-1-1K")]
    Fanout,
    /// 1,000 publishers on test/1..1000 -> 5 subscribers sharing $share/perf/test/#, MQTT 5,
    /// 1 msg/s each: 1,000 msg/s.
    #[value(name = "sharedsub-1K-5-1K-1K")]
    Sharedsub,
    /// 10,000 connections at 100 per second, held.
    #[value(name = "conn-tcp-10k-100")]
    Conn,
}

#[derive(Parser, Debug, Clone)]
pub struct SuiteArgs {
    #[arg(value_enum)]
    pub case: SuiteCase,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Seconds of publishing (the suite runs 30 minutes).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds the connections of conn-tcp-10k-100 are held once open.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    #[arg(long)]
    pub pin: Option<usize>,
    #[arg(long)]
    pub broker_pid: Option<u32>,
    #[arg(long, default_value = "broker")]
    pub label: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl SuiteArgs {
    /// The `run` arguments the use case stands for.
    pub fn run_args(&self) -> RunArgs {
        let mut argv: Vec<String> = vec!["tern-loadtest".into(), "run".into()];
        let mut add = |a: &[&str]| argv.extend(a.iter().map(|s| s.to_string()));
        match self.case {
            SuiteCase::P2p => add(&["pairs", "--pairs", "1000", "--rate", "1000"]),
            SuiteCase::Fanout => add(&["fanout", "--subscribers", "1000", "--rate", "1"]),
            SuiteCase::Sharedsub => {
                add(&["sharedsub", "--publishers", "1000", "--subscribers", "5", "--rate", "1000", "--mqtt", "5"])
            }
            SuiteCase::Conn => add(&["conns", "--connections", "10000", "--rate", "100"]),
        }
        add(&["--qos", "1", "--size", "16", "--keepalive", "300", "--drain", "10"]);
        let duration = self.duration.to_string();
        let hold = self.hold.to_string();
        let port = self.port.to_string();
        add(&["--duration", &duration, "--hold", &hold, "--host", &self.host, "--port", &port]);
        add(&["--label", &self.label]);
        if let Some(p) = self.pin {
            add(&["--pin", &p.to_string()]);
        }
        if let Some(p) = self.broker_pid {
            add(&["--broker-pid", &p.to_string()]);
        }
        if let Some(j) = &self.json {
            add(&["--json", &j.display().to_string()]);
        }
        let Command::Run(mut args) = Cli::parse_from(&argv).command else { unreachable!("a run command") };
        args.suite = Some(self.case);
        args
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttVersion {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(Parser, Debug, Clone)]
pub struct RunArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (at least 16: timestamp, sequence, publisher).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Stop each publisher after this many messages (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Offered messages per second over all publishers (0: as fast as the broker takes them).
    /// Defaults to 20000 for `latency`.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishers (fanin default 4, latency 1).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Subscribers (fanout default 100).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Publisher/subscriber pairs (pairs default 50).
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Connections for `conns`.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Split `conns` over this many processes (each process may hold fewer open files).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Seconds to hold the idle connections in `conns` before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// Keepalive seconds sent in CONNECT.
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// QoS 1/2 messages a publisher may have unacknowledged. A window larger than the broker's
    /// outgoing one (mosquitto 20, tern 32) lets a fast publisher outrun its subscribers: a broker
    /// without flow control then drops acknowledged messages once its queue is full.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Seconds to wait after publishing for the last messages and acknowledgements.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    pub pin: Option<usize>,
    /// Subscribers keep persistent sessions (3.1.1 clean session 0, 5.0 session expiry 1 h),
    /// so a broker with persistence writes what it queues for them.
    #[arg(long)]
    pub persistent: bool,
    /// Subscribers connect to this port instead of --port (a bridge between two brokers: the
    /// publishers on one, the subscribers on the other).
    #[arg(long)]
    pub sub_port: Option<u16>,
    /// Client ids are `lt-<this>-s<i>` and `lt-<this>-p<i>` (default: the process id). A broker
    /// that places sessions by client id (tern's workers) then places them alike in every run
    /// given the same value, so runs of different builds or worker counts compare like for like.
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Username every client sends in CONNECT.
    #[arg(long)]
    pub username: Option<String>,
    /// Password sent with --username.
    #[arg(long)]
    pub password: Option<String>,
    #[arg(long = "mqtt", value_enum, default_value = "3.1.1")]
    pub mqtt: MqttVersion,
    /// The broker's pid: report its CPU time and RSS.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// A name for the broker in the output (e.g. tern, mosquitto).
    #[arg(long, default_value = "broker")]
    pub label: String,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Connect over TLS (server certificate checked against --cafile, for the broker's IP).
    #[arg(long)]
    pub tls: bool,
    /// CA certificate (PEM) for --tls.
    #[arg(long)]
    pub cafile: Option<PathBuf>,
    /// Connect over WebSockets (path /mqtt, subprotocol mqtt); with --tls, wss.
    #[arg(long)]
    pub ws: bool,
    /// Internal: run as a `conns` helper process.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Set by `suite`: the use case this run is, named in the report.
    #[arg(skip)]
    pub suite: Option<SuiteCase>,
}

impl RunArgs {
    pub fn addr(&self) -> SocketAddr {
        format!("{}:{}", self.host, self.port).parse().expect("--host must be an IP address")
    }
    pub fn v5(&self) -> bool {
        self.mqtt == MqttVersion::V5
    }
    /// The suite use case's name, when the run is one.
    pub fn case_name(&self) -> Option<String> {
        self.suite.and_then(|c| c.to_possible_value()).map(|v| v.get_name().to_string())
    }
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }
}

/// Pins the load generator to `cpu`, if given.
fn pin(cpu: Option<usize>) {
    if let Some(id) = cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            eprintln!("tern-loadtest: cannot pin to CPU {id}");
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            pin(args.pin);
            client::run(args)
        }
        Command::Suite(suite) => {
            let args = suite.run_args();
            pin(args.pin);
            client::run(args)
        }
        Command::Fuzz(args) => fuzz::run(args),
        Command::Plot { input, out_dir } => plot::plot(&input, &out_dir),
        Command::Summarize { input, out, first, second } => plot::summarize(&input, &out, &first, &second),
    };
    if let Err(e) = result {
        eprintln!("tern-loadtest: {e}");
        std::process::exit(1);
    }
}
