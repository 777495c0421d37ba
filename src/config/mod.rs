//! Broker configuration: a TOML file (or mosquitto's `mosquitto.conf`, see [`mosquitto`]), then
//! command-line flags over it. Every field has a default that works with no file at all; an
//! unknown key or a bad value is an error naming the key.

pub mod mosquitto;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub bind: IpAddr,
    /// TCP port; 0 picks a free one (tests).
    pub port: u16,
    /// The plain MQTT listener at `bind`:`port`; `false`: only the `[[listener]]` ones.
    pub plain_listener: bool,
    /// Event-loop threads; 0 means one per core.
    pub workers: usize,
    /// Pin each worker to a core.
    pub pin_workers: bool,
    /// With more than one worker: a SUBSCRIBE is ordered with other clients' PUBLISHes by when
    /// they reached the host (kernel arrival stamps), as one event loop would order them.
    pub arrival_order: bool,
    /// With more than one worker: while the load is light, worker 0's thread serves the workers
    /// whose threads are mostly idle, so fewer threads sleep and wake (`worker::host`).
    pub host_idle_workers: bool,
    /// How the kernel schedules worker threads: `batch` (SCHED_BATCH: a worker woken by a
    /// packet does not preempt the thread running on its CPU, it runs when that one sleeps or at
    /// the next tick), `normal`, or `auto`: batch when the workers leave no CPU of the process's
    /// without one (every worker count from the number of CPUs up), normal when fewer.
    pub worker_scheduling: String,
    /// With more than one worker: the key of the hash that gives each client id (and shared
    /// group) its worker. Unset, a random one per start, so no one can choose client ids that all
    /// land on one worker; set, the same sessions share a worker at every start of the same
    /// build on the same machine, so benchmark runs and builds can be compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement_seed: Option<u64>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// Log to this file (appended) instead of standard error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// Write the broker's process id here at start, removed at a clean exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Connections held at once, over all workers; more are refused.
    pub max_connections: usize,
    /// Largest packet accepted from a client, in bytes.
    pub max_packet_size: u32,
    /// Largest PUBLISH payload accepted, bytes (mosquitto's name; 0: only `max_packet_size`).
    /// A larger one is not delivered; its QoS flow completes (5.0: with reason 0x83).
    pub message_size_limit: usize,
    /// QoS 1/2 messages sent to a client and not yet acknowledged.
    pub max_inflight_messages: u16,
    /// QoS 1/2 messages queued per session beyond the inflight window (also while offline).
    pub max_queued_messages: usize,
    /// Bytes of encoded output a connection may have waiting for its socket; past it QoS 0 is
    /// dropped and QoS 1/2 wait in the session queue.
    pub max_output_bytes: usize,
    /// Seconds a new connection may take to send CONNECT.
    pub connect_timeout: u64,
    /// Seconds between `$SYS` updates; 0 turns them off.
    pub sys_interval: u64,
    /// The longest keep alive a client may have, seconds (mosquitto's name); 65535: any. A 5.0
    /// client asking for more, or for 0, is told this one (Server Keep Alive) and held to it;
    /// a 3.1/3.1.1 client asking for more is refused, as mosquitto does (0, none, is accepted).
    pub max_keepalive: u16,
    /// Accept 3.1/3.1.1 CONNECT with an empty client id and clean session (a generated id).
    pub allow_zero_length_clientid: bool,
    /// Subscriptions one session may hold; more are refused in SUBACK (5.0: 0x97 quota exceeded).
    pub max_subscriptions_per_client: usize,
    /// Sessions kept at once, connected or not (persistent sessions outlive their connections);
    /// a CONNECT that would create one more is refused (3.1.1: server unavailable, 5.0: 0x97).
    pub max_sessions: usize,
    /// Retained messages the broker keeps; a new retained topic past it is not stored (counted as
    /// dropped), replacing or clearing an existing one always works.
    pub max_retained_messages: usize,
    /// Seconds a congested subscriber may go without acknowledging anything before it is treated
    /// as stalled: the publishers it paused resume and `slow_subscriber_policy` applies.
    pub slow_subscriber_timeout: u64,
    /// What a stalled subscriber gets: `drop` (its messages queue up to `max_queued_messages`,
    /// then are dropped and counted) or `disconnect`.
    pub slow_subscriber_policy: String,
    /// Bytes held by partly received packets over all connections; a connection whose packet in
    /// progress would take more is closed (5.0: DISCONNECT 0x97). One connection holds at most
    /// `max_packet_size`.
    pub max_partial_bytes: usize,
    /// Seconds a connection may sit in the middle of a packet without sending a byte, keep alive
    /// or not, before it is closed.
    pub partial_packet_timeout: u64,
    /// Bytes of retained messages (topic and payload) kept; a new or larger retained message past
    /// it is not stored (it is still delivered), counted and logged.
    pub max_retained_bytes: usize,
    /// Bytes of topic filters one session may hold; past it SUBSCRIBE gets 0x97 / 0x80.
    pub max_subscription_bytes_per_client: usize,
    /// Bytes of topic filters over all sessions; past it SUBSCRIBE gets 0x97 / 0x80.
    pub max_subscription_bytes: usize,
    /// Bytes of QoS 1/2 messages queued per session (mosquitto's name; 0: no bound besides
    /// `max_queued_messages`); past it messages are dropped and counted like past the count.
    pub max_queued_bytes: usize,
    /// Heap bytes the broker may use (mosquitto's name; 0: no ceiling). Past it new connections
    /// are refused (CONNACK 0x89 / 3 server unavailable) and QoS 0 messages are shed.
    pub memory_limit: usize,
    /// How long a persistent session (3.1.1 clean session 0, or 5.0 with an infinite expiry)
    /// is kept disconnected: mosquitto's syntax, a number and one of h, d, w, m (months), y, plus
    /// s for seconds; `never` keeps them forever.
    pub persistent_client_expiration: String,
    /// More listeners (`[[listener]]`), beside the plain one at `bind`:`port`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listener: Vec<ListenerConfig>,
    /// `[[bridge]]`: outgoing connections to other brokers (see `Bridging` in the README).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bridge: Vec<BridgeConfig>,
    /// mosquitto's password file (`mosquitto_passwd` or `tern passwd`): `user:$7$...` lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Clients without a username may connect. Unset: only while every listener is on loopback
    /// and there is no `password_file` (mosquitto 2.0's rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// mosquitto's ACL file: who may read and write which topics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// What a 5.0 client is told when the ACL refuses its SUBSCRIBE or PUBLISH: `not_authorized`
    /// (0x87) or `unspecified` (0x80, the spec's code for a server that does not wish to reveal the
    /// reason). 3.1.1 has only 0x80 for a refused subscription either way.
    pub acl_denial_reason: String,
    /// `off` (nothing on disk), `periodic` (written behind the traffic, synced every
    /// `persistence_interval`) or `durable` (a QoS 1/2 PUBLISH is acknowledged once it and its
    /// queue entries are synced).
    pub persistence: String,
    /// The directory of the store (`tern.redb`); needed unless `persistence` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistence_location: Option<PathBuf>,
    /// Seconds between syncs in `periodic` mode.
    pub persistence_interval: u64,
}

/// One `[[bridge]]`: a connection tern dials to another broker, with mosquitto's meaning for
/// topic directions and prefixes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    pub name: String,
    /// `host:port`, or a list tried in order (fail-over).
    pub address: Addresses,
    /// 4 (3.1.1, with mosquitto's bridge bit) or 5.
    #[serde(default = "default_bridge_version")]
    pub protocol_version: u8,
    /// Defaults to `tern-bridge-<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// With `cafile` the connection is TLS, the remote's certificate checked against it;
    /// `certfile` and `keyfile` add a client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cafile: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// Start a new session on the remote at each connection (default: keep it).
    #[serde(default)]
    pub clean_start: bool,
    #[serde(default = "default_bridge_keepalive")]
    pub keepalive: u16,
    pub topics: Vec<BridgeTopic>,
}

fn default_bridge_version() -> u8 {
    4
}

fn default_bridge_keepalive() -> u16 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Addresses {
    One(String),
    Many(Vec<String>),
}

impl Addresses {
    pub fn list(&self) -> Vec<String> {
        match self {
            Addresses::One(a) => vec![a.clone()],
            Addresses::Many(v) => v.clone(),
        }
    }
}

/// A topic rule of a bridge: `pattern` with `local_prefix` is the local topic filter, with
/// `remote_prefix` the remote one; a message crossing loses one prefix and gains the other.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopic {
    pub pattern: String,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local messages go to the remote.
    #[default]
    Out,
    /// Remote messages come here.
    In,
    Both,
}

impl Direction {
    pub fn outgoing(self) -> bool {
        self != Direction::In
    }

    pub fn incoming(self) -> bool {
        self != Direction::Out
    }
}

impl BridgeConfig {
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("tern-bridge-{}", self.name))
    }

    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let bad = |why: String| {
            Err(ConfigError::Invalid { key: "bridge", nth: i, why: format!("bridge {} ({}): {why}", i + 1, self.name) })
        };
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return bad("`name` must be non-empty, without / + #".into());
        }
        if self.address.list().is_empty() {
            return bad("`address` needs at least one host:port".into());
        }
        for a in self.address.list() {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => return bad(format!("`address` {a:?}: expected host:port")),
            }
        }
        if !matches!(self.protocol_version, 4 | 5) {
            return bad("`protocol_version` must be 4 (3.1.1) or 5".into());
        }
        if self.password.is_some() && self.username.is_none() {
            return bad("`password` needs `username`".into());
        }
        if self.certfile.is_some() != self.keyfile.is_some() {
            return bad("`certfile` and `keyfile` go together".into());
        }
        if self.certfile.is_some() && self.cafile.is_none() {
            return bad("a client certificate needs `cafile` (TLS)".into());
        }
        for (key, path) in [("cafile", &self.cafile), ("certfile", &self.certfile), ("keyfile", &self.keyfile)] {
            if let Some(p) = path {
                if let Err(e) = std::fs::metadata(p) {
                    return bad(format!("`{key}` {}: {e}", p.display()));
                }
            }
        }
        if self.topics.is_empty() {
            return bad("`topics` needs at least one rule".into());
        }
        for t in &self.topics {
            if t.qos > 2 {
                return bad(format!("topic {:?}: `qos` must be 0, 1 or 2", t.pattern));
            }
            for (side, prefix) in [("local_prefix", &t.local_prefix), ("remote_prefix", &t.remote_prefix)] {
                let filter = format!("{prefix}{}", t.pattern);
                if crate::topic::validate_filter(&filter).is_err() || prefix.contains(['+', '#']) {
                    return bad(format!("topic {:?} with `{side}` {prefix:?}: not a valid topic filter", t.pattern));
                }
            }
        }
        Ok(())
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Mqtt,
    Websockets,
    /// `GET /metrics` (Prometheus) and `GET /` (the status page); no MQTT.
    Http,
}

/// One `[[listener]]`, with mosquitto's key names. With `certfile` and `keyfile` it is TLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub port: u16,
    /// Defaults to the top-level `bind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// CA certificates (PEM) that client certificates must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cafile: Option<PathBuf>,
    /// The server's certificate chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    /// The server's private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// Revoked client certificates (PEM CRLs), checked with `cafile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crlfile: Option<PathBuf>,
    /// A client certificate signed by `cafile` is required.
    #[serde(default)]
    pub require_certificate: bool,
    /// The client certificate's subject CN is the client's username (the one in CONNECT is
    /// ignored); a client without a certificate is refused.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

impl ListenerConfig {
    pub fn plain(bind: IpAddr, port: u16) -> ListenerConfig {
        ListenerConfig {
            port,
            bind: Some(bind),
            protocol: Protocol::Mqtt,
            cafile: None,
            certfile: None,
            keyfile: None,
            crlfile: None,
            require_certificate: false,
            use_identity_as_username: false,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.certfile.is_some() || self.keyfile.is_some()
    }

    /// mqtt, mqtts, ws or wss.
    pub fn scheme(&self) -> &'static str {
        match (self.protocol, self.is_tls()) {
            (Protocol::Mqtt, false) => "mqtt",
            (Protocol::Mqtt, true) => "mqtts",
            (Protocol::Websockets, false) => "ws",
            (Protocol::Websockets, true) => "wss",
            (Protocol::Http, _) => "http",
        }
    }

    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let bad = |why: String| {
            Err(ConfigError::Invalid { key: "listener", nth: i, why: format!("listener {}: {why}", i + 1) })
        };
        if self.protocol == Protocol::Http && (self.is_tls() || self.cafile.is_some() || self.require_certificate) {
            return bad("`protocol = \"http\"` (metrics and status page) is plain HTTP: no TLS keys".into());
        }
        if self.certfile.is_some() != self.keyfile.is_some() {
            return bad("`certfile` and `keyfile` go together".into());
        }
        if (self.require_certificate || self.use_identity_as_username) && self.cafile.is_none() {
            return bad("`require_certificate` and `use_identity_as_username` need `cafile`".into());
        }
        if self.cafile.is_some() && !self.is_tls() {
            return bad("`cafile` needs `certfile` and `keyfile` (TLS)".into());
        }
        for (key, path) in [
            ("cafile", &self.cafile),
            ("certfile", &self.certfile),
            ("keyfile", &self.keyfile),
            ("crlfile", &self.crlfile),
        ] {
            if let Some(p) = path {
                if let Err(e) = std::fs::metadata(p) {
                    return bad(format!("`{key}` {}: {e}", p.display()));
                }
            }
        }
        Ok(())
    }
}

/// The CPUs this process may run on (its affinity mask and cgroup quota): `workers = 0`'s count.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The line (from 1) of a TOML file that sets `key`: the `nth` `[[key]]` table for a listener or
/// bridge, else the top-level `key = ...` (before any table).
fn line_of(text: &str, key: &str, nth: usize) -> Option<usize> {
    let header = format!("[[{key}]]");
    let mut tables = 0;
    let mut top = true;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            if l.replace([' ', '\t'], "") == header {
                if tables == nth {
                    return Some(i + 1);
                }
                tables += 1;
            }
            top = false;
        } else if top && l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')) {
            return Some(i + 1);
        }
    }
    None
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 1883,
            plain_listener: true,
            workers: 0,
            pin_workers: true,
            arrival_order: true,
            host_idle_workers: true,
            worker_scheduling: "auto".into(),
            placement_seed: None,
            log_level: "info".into(),
            log_file: None,
            pid_file: None,
            max_connections: 100_000,
            max_packet_size: 8 << 20,
            message_size_limit: 0,
            max_inflight_messages: 32,
            max_queued_messages: 1000,
            max_output_bytes: 1 << 20,
            connect_timeout: 10,
            sys_interval: 10,
            max_keepalive: 65535,
            allow_zero_length_clientid: true,
            max_subscriptions_per_client: 10_000,
            max_sessions: 1_000_000,
            max_retained_messages: 100_000,
            slow_subscriber_timeout: 2,
            slow_subscriber_policy: "drop".into(),
            max_partial_bytes: 256 << 20,
            partial_packet_timeout: 30,
            max_retained_bytes: 256 << 20,
            max_subscription_bytes_per_client: 1 << 20,
            max_subscription_bytes: 256 << 20,
            max_queued_bytes: 16 << 20,
            memory_limit: 0,
            persistent_client_expiration: "7d".into(),
            persistence: "off".into(),
            persistence_location: None,
            persistence_interval: 1,
            listener: Vec::new(),
            bridge: Vec::new(),
            password_file: None,
            allow_anonymous: None,
            acl_file: None,
            acl_denial_reason: "not_authorized".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Parse { path: String, err: String },
    /// `nth`: which `[[key]]` table (a listener's or bridge's index), 0 for a top-level key.
    #[error("invalid value for `{key}`: {why}")]
    Invalid { key: &'static str, nth: usize, why: String },
    /// An error in a TOML file, at the line that sets the key.
    #[error("config file {file} line {line}: `{key}`: {why}")]
    At { file: String, line: usize, key: String, why: String },
    #[error("{file} line {line}: `{option}`: {why}")]
    Mosquitto { file: String, line: usize, option: String, why: String },
}

impl Config {
    /// Reads a TOML file, or a mosquitto.conf: a name ending in `.conf`, or any other name but
    /// `.toml` whose first setting has no `=` and is not a `[table]`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.display().to_string(), err })?;
        if mosquitto::looks_like(path, &text) {
            return mosquitto::parse(path, &text);
        }
        let file = path.display().to_string();
        Self::from_toml(&text).map_err(|e| match e {
            // Point at the line that sets the key (TOML's own syntax errors already say where).
            ConfigError::Invalid { key, nth, why } => match line_of(&text, key, nth) {
                Some(line) => ConfigError::At { file, line, key: key.into(), why },
                None => ConfigError::Parse { path: file, err: format!("invalid value for `{key}`: {why}") },
            },
            ConfigError::Parse { err, .. } => {
                // "`key`: why" (a bad value), or "unknown field `key`, expected ...".
                let named = match err.strip_prefix("unknown field `") {
                    Some(rest) => rest.split_once('`').map(|(key, _)| (key, err.as_str())),
                    None => err.strip_prefix('`').and_then(|r| r.split_once("`: ")),
                };
                match named.and_then(|(key, why)| Some((key, why, line_of(&text, key, 0)?))) {
                    Some((key, why, line)) => ConfigError::At { file, line, key: key.into(), why: why.into() },
                    None => ConfigError::Parse { path: file, err },
                }
            }
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let parse_err = |err: String| ConfigError::Parse { path: String::new(), err };
        let table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let c = Config::deserialize(table.clone()).map_err(|e| {
            // Name the key: the first one that fails on its own is the culprit.
            let culprit = table.iter().find(|(k, v)| {
                let mut one = toml::Table::new();
                one.insert((*k).clone(), (*v).clone());
                Config::deserialize(one).is_err()
            });
            match culprit {
                Some((k, _)) if !e.message().contains(k.as_str()) => parse_err(format!("`{k}`: {}", e.message())),
                _ => parse_err(e.message().to_string()),
            }
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: &str| Err(ConfigError::Invalid { key, nth: 0, why: why.to_string() });
        if !matches!(self.log_level.as_str(), "error" | "warn" | "info" | "debug" | "trace" | "off") {
            return bad("log_level", "expected one of error, warn, info, debug, trace, off");
        }
        if self.max_packet_size < 64 || self.max_packet_size as usize > crate::codec::MAX_PACKET_SIZE {
            return bad("max_packet_size", "must be between 64 and 268435460");
        }
        if self.max_inflight_messages == 0 {
            return bad("max_inflight_messages", "must be at least 1");
        }
        if self.max_output_bytes < 4096 {
            return bad("max_output_bytes", "must be at least 4096");
        }
        if self.max_keepalive == 0 {
            return bad("max_keepalive", "must be at least 1 second (65535: any keep alive)");
        }
        if self.connect_timeout == 0 {
            return bad("connect_timeout", "must be at least 1 second");
        }
        if self.workers > 256 {
            return bad("workers", "at most 256");
        }
        if !matches!(self.acl_denial_reason.as_str(), "not_authorized" | "unspecified") {
            return bad("acl_denial_reason", "expected not_authorized or unspecified");
        }
        if !matches!(self.worker_scheduling.as_str(), "auto" | "batch" | "normal") {
            return bad("worker_scheduling", "expected auto, batch or normal");
        }
        if !matches!(self.slow_subscriber_policy.as_str(), "drop" | "disconnect") {
            return bad("slow_subscriber_policy", "expected drop or disconnect");
        }
        if self.slow_subscriber_timeout == 0 {
            return bad("slow_subscriber_timeout", "must be at least 1 second");
        }
        if self.max_queued_messages < 4 {
            return bad("max_queued_messages", "must be at least 4");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.partial_packet_timeout == 0 {
            return bad("partial_packet_timeout", "must be at least 1 second");
        }
        if !self.plain_listener && self.listener.iter().all(|l| l.protocol == Protocol::Http) {
            return bad("plain_listener", "false needs at least one MQTT [[listener]]");
        }
        if self.max_partial_bytes < self.max_packet_size as usize {
            return bad("max_partial_bytes", "must be at least max_packet_size");
        }
        for (i, l) in self.listener.iter().enumerate() {
            l.validate(i)?;
        }
        for (i, b) in self.bridge.iter().enumerate() {
            b.validate(i)?;
            if self.bridge[..i].iter().any(|o| o.name == b.name) {
                return bad("bridge", &format!("two bridges named {:?}", b.name));
            }
        }
        if let Some(p) = &self.password_file {
            if let Err(e) = std::fs::metadata(p) {
                return bad("password_file", &format!("{}: {e}", p.display()));
            }
        }
        if let Some(p) = &self.acl_file {
            if let Err(e) = std::fs::metadata(p) {
                return bad("acl_file", &format!("{}: {e}", p.display()));
            }
        }
        match crate::store::Mode::parse(&self.persistence) {
            None => return bad("persistence", "expected off, periodic or durable"),
            Some(crate::store::Mode::Off) => {}
            Some(mode) => {
                if self.persistence_location.is_none() {
                    return bad("persistence_location", "a directory is needed when persistence is not off");
                }
                if mode == crate::store::Mode::Durable && self.worker_count() > 64 {
                    return bad("persistence", "durable persistence supports at most 64 workers");
                }
            }
        }
        if self.persistence_interval == 0 {
            return bad("persistence_interval", "must be at least 1 second");
        }
        if let Err(why) = parse_expiration(&self.persistent_client_expiration) {
            return bad("persistent_client_expiration", &why);
        }
        // The connection and session tables are reserved at start, about 512 bytes per
        // `max_connections`: a ceiling must leave room for at least as much again.
        let reserved = self.max_connections.saturating_mul(512);
        if self.memory_limit != 0 && self.memory_limit < (16 << 20) + 2 * reserved {
            let why = format!(
                "must be 0 (no ceiling) or at least 16 MiB plus 1 KiB per max_connections ({} bytes here): \
                 tern reserves its connection and session tables at start",
                (16 << 20) + 2 * reserved
            );
            return bad("memory_limit", &why);
        }
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// Every listener: the plain one at `bind`:`port` first (unless `plain_listener` is false),
    /// then `[[listener]]` in order.
    pub fn listeners(&self) -> Vec<ListenerConfig> {
        let mut all = Vec::new();
        if self.plain_listener {
            all.push(ListenerConfig::plain(self.bind, self.port));
        }
        all.extend(
            self.listener.iter().map(|l| ListenerConfig { bind: Some(l.bind.unwrap_or(self.bind)), ..l.clone() }),
        );
        all
    }

    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            cpus()
        } else {
            self.workers
        }
    }

    /// Whether worker threads run as SCHED_BATCH (`worker_scheduling`).
    pub fn batch_scheduling(&self) -> bool {
        match self.worker_scheduling.as_str() {
            "batch" => true,
            "normal" => false,
            _ => self.worker_count() >= cpus(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }

    /// `persistent_client_expiration` in seconds; `None`: never.
    pub fn persistent_expiry_secs(&self) -> Option<u64> {
        parse_expiration(&self.persistent_client_expiration).ok().flatten()
    }
}

/// mosquitto's expiration syntax: a count and a unit, h(ours), d(ays), w(eeks), m(onths of 30
/// days), y(ears of 365 days); tern also takes s(econds), and `never`.
pub fn parse_expiration(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "never" {
        return Ok(None);
    }
    let why = || format!("`{t}`: expected a number followed by s, h, d, w, m or y (e.g. 14d), or never");
    let (digits, unit) = t.split_at(t.len().saturating_sub(1));
    let n: u64 = digits.parse().map_err(|_| why())?;
    let unit_secs = match unit {
        "s" => 1,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "m" => 30 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(why()),
    };
    if n == 0 {
        return Err(why());
    }
    Ok(Some(n.saturating_mul(unit_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        assert_eq!(Config::default().addr().to_string(), "127.0.0.1:1883");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("prot = 1").unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
        let e = Config::from_toml("port = \"x\"").unwrap_err().to_string();
        assert!(e.contains("port") || e.contains("invalid type"), "{e}");
        let e = Config::from_toml("max_inflight_messages = 0").unwrap_err().to_string();
        assert!(e.contains("max_inflight_messages"), "{e}");
    }

    #[test]
    fn expiration_takes_mosquittos_syntax() {
        assert_eq!(parse_expiration("14d"), Ok(Some(14 * 86_400)));
        assert_eq!(parse_expiration("2h"), Ok(Some(7200)));
        assert_eq!(parse_expiration("1m"), Ok(Some(30 * 86_400)));
        assert_eq!(parse_expiration("1y"), Ok(Some(365 * 86_400)));
        assert_eq!(parse_expiration("3s"), Ok(Some(3)));
        assert_eq!(parse_expiration("never"), Ok(None));
        assert!(parse_expiration("14").is_err());
        assert!(parse_expiration("d").is_err());
        assert!(parse_expiration("0d").is_err());
        let e = Config::from_toml("persistent_client_expiration = \"5x\"").unwrap_err().to_string();
        assert!(e.contains("persistent_client_expiration"), "{e}");
    }

    #[test]
    fn a_bad_value_in_a_file_is_refused_naming_file_line_and_key() {
        let dir = std::env::temp_dir().join(format!("tern-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tern.toml");
        let at = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::from_file(&file).unwrap_err().to_string()
        };
        let e = at("port = 1883\n\n  worker_scheduling = \"fifo\"\n");
        assert!(e.contains("tern.toml line 3: `worker_scheduling`: expected auto, batch or normal"), "{e}");
        let e = at("port = 1883\nworkers = \"x\"\n");
        assert!(e.contains("tern.toml line 2: `workers`:"), "{e}");
        let e = at("port = 1883\n\nwrokers = 2\n");
        assert!(e.contains("tern.toml line 3: `wrokers`: unknown field `wrokers`"), "{e}");
        // The key itself, not a longer one it begins.
        let e = at("persistence_interval = 5\npersistence = \"sometimes\"\n");
        assert!(e.contains("tern.toml line 2: `persistence`"), "{e}");
        let e = at("[[listener]]\nport = 9001\n\n[[listener]]\nport = 9002\nkeyfile = \"k.pem\"\n");
        assert!(e.contains("tern.toml line 4: `listener`: listener 2:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_scheduling_is_auto_batch_or_normal() {
        let cpus = cpus();
        let c = Config::from_toml("workers = 0\n").unwrap();
        assert!(c.batch_scheduling(), "auto: one worker per CPU leaves none free");
        let c = Config::from_toml(&format!("workers = {}\n", cpus + 1)).unwrap();
        assert!(c.batch_scheduling(), "auto: more workers than CPUs");
        if cpus > 1 {
            let c = Config::from_toml(&format!("workers = {}\n", cpus - 1)).unwrap();
            assert!(!c.batch_scheduling(), "auto: fewer workers than CPUs");
        }
        assert!(Config::from_toml("worker_scheduling = \"batch\"\nworkers = 1\n").unwrap().batch_scheduling());
        assert!(!Config::from_toml("worker_scheduling = \"normal\"\nworkers = 0\n").unwrap().batch_scheduling());
        let e = Config::from_toml("worker_scheduling = \"fifo\"\n").unwrap_err().to_string();
        assert!(e.contains("worker_scheduling") && e.contains("auto, batch or normal"), "{e}");
    }

    #[test]
    fn listeners_are_read_and_bad_ones_refused_naming_key_and_path() {
        let c = Config::from_toml("[[listener]]\nport = 9001\nprotocol = \"websockets\"\n").unwrap();
        assert_eq!(c.listeners().len(), 2);
        assert_eq!(c.listeners()[1].scheme(), "ws");
        assert_eq!(c.listeners()[1].bind, Some(c.bind), "bind defaults to the top-level one");
        let e = Config::from_toml("[[listener]]\nport = 1\ncertfle = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("listener") && e.contains("certfle"), "{e}");
        let e = Config::from_toml(
            "[[listener]]\nport = 1\ncertfile = \"/nonexistent/s.pem\"\nkeyfile = \"/nonexistent/k.pem\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("certfile") && e.contains("/nonexistent/s.pem"), "{e}");
        let e = Config::from_toml("[[listener]]\nport = 1\nkeyfile = \"k.pem\"\n").unwrap_err().to_string();
        assert!(e.contains("certfile") && e.contains("keyfile"), "{e}");
        let e = Config::from_toml("password_file = \"/nonexistent/passwd\"\n").unwrap_err().to_string();
        assert!(e.contains("password_file") && e.contains("/nonexistent/passwd"), "{e}");
        let e = Config::from_toml("[[listener]]\nport = 1\nprotocol = \"http2\"\n").unwrap_err().to_string();
        assert!(e.contains("protocol") || e.contains("http2"), "{e}");
    }

    #[test]
    fn values_are_read() {
        let c = Config::from_toml("port = 1884\nworkers = 2\nbind = \"0.0.0.0\"\nlog_level = \"debug\"").unwrap();
        assert_eq!((c.port, c.workers, c.log_level.as_str()), (1884, 2, "debug"));
    }
}
