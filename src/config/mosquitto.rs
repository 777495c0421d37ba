//! mosquitto's configuration format, so that `tern -c /etc/mosquitto/mosquitto.conf` runs a
//! broker set up the way mosquitto was: one `option value` per line, `#` comments, `listener`
//! opening a listener that the listener options below it apply to, `connection` opening a bridge,
//! `include_dir` reading a directory's `*.conf` files in name order.
//!
//! Every option tern has is read into [`Config`]; an option tern does not have, or a value it
//! cannot honour, is refused naming the file, the line and the option, never ignored: a broker
//! that silently drops a setting is not the broker its user configured. `tern --print-config`
//! shows the TOML the file amounts to.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use super::{Addresses, BridgeConfig, BridgeTopic, Config, ConfigError, Direction, ListenerConfig, Protocol};

/// `.conf` is mosquitto's; `.toml` is TOML; otherwise the first setting decides: TOML's have
/// `=` or are `[tables]`.
pub fn looks_like(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("conf") => return true,
        Some("toml") => return false,
        _ => {}
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    first.is_some_and(|l| !l.starts_with('[') && !l.contains('='))
}

/// Reads a mosquitto.conf (and the files it includes).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut r = Reader::default();
    r.file(path, text, 0)?;
    r.finish()
}

/// Where a setting came from, for errors found once the whole file is read.
#[derive(Debug, Clone, Default)]
struct Origin {
    file: String,
    line: usize,
    option: String,
}

impl Origin {
    fn error(&self, why: impl Into<String>) -> ConfigError {
        ConfigError::Mosquitto {
            file: self.file.clone(),
            line: self.line,
            option: self.option.clone(),
            why: why.into(),
        }
    }
}

#[derive(Default)]
struct Reader {
    c: Config,
    /// The TOML key each option set, with its line (the last one wins, as in mosquitto).
    origins: Vec<(&'static str, Origin)>,
    /// Listeners in file order; the default listener (`port`, `bind_address`, or listener
    /// options before any `listener`) is one of them.
    listeners: Vec<(ListenerConfig, Origin)>,
    default_listener: Option<usize>,
    current_listener: Option<usize>,
    bridges: Vec<(BridgeConfig, Origin)>,
    allow_anonymous_set: bool,
    persistence: Option<bool>,
    log_levels: Vec<&'static str>,
    log_off: bool,
}

const MAX_INCLUDE_DEPTH: usize = 8;

/// mosquitto options tern has no setting for, accepted with the one value tern behaves as.
const FIXED: [(&str, bool); 6] = [
    ("log_timestamp", true),
    ("retain_available", true),
    ("set_tcp_nodelay", true),
    ("queue_qos0_messages", false),
    ("upgrade_outgoing_qos", false),
    ("allow_duplicate_messages", false), // one copy per session, its subscriptions merged
];

impl Reader {
    fn file(&mut self, path: &Path, text: &str, depth: usize) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (option, value) = match line.split_once(char::is_whitespace) {
                Some((o, v)) => (o, v.trim()),
                None => (line, ""),
            };
            let at = Origin { file: name.clone(), line: i + 1, option: option.to_string() };
            self.option(option, value, &at, depth)?;
        }
        Ok(())
    }

    fn set(&mut self, key: &'static str, at: &Origin) {
        self.origins.push((key, at.clone()));
    }

    fn option(&mut self, option: &str, value: &str, at: &Origin, depth: usize) -> Result<(), ConfigError> {
        if value.is_empty() && !matches!(option, "listener") {
            return Err(at.error("needs a value"));
        }
        if is_bridge_option(option) {
            return self.bridge_option(option, value, at);
        }
        match option {
            "include_dir" => return self.include_dir(value, at, depth),
            "per_listener_settings" => {
                if boolean(value, at)? {
                    return Err(at.error(
                        "tern's password_file, acl_file and allow_anonymous apply to every listener: \
                         per_listener_settings true is not supported",
                    ));
                }
            }
            "listener" => self.listener(value, at)?,
            "port" => {
                let port = number::<u16>(value, at)?;
                let l = self.default_listener(at);
                self.listeners[l].0.port = port;
            }
            "bind_address" => {
                let bind = address(value, at)?;
                let l = self.default_listener(at);
                self.listeners[l].0.bind = Some(bind);
            }
            "protocol"
            | "cafile"
            | "certfile"
            | "keyfile"
            | "crlfile"
            | "require_certificate"
            | "use_identity_as_username" => {
                let l = match self.current_listener {
                    Some(l) => l,
                    None => self.default_listener(at),
                };
                let listener = &mut self.listeners[l].0;
                match option {
                    "protocol" => {
                        listener.protocol = match value {
                            "mqtt" => Protocol::Mqtt,
                            "websockets" => Protocol::Websockets,
                            _ => return Err(at.error(format!("{value:?}: expected mqtt or websockets"))),
                        }
                    }
                    "cafile" => listener.cafile = Some(PathBuf::from(value)),
                    "certfile" => listener.certfile = Some(PathBuf::from(value)),
                    "keyfile" => listener.keyfile = Some(PathBuf::from(value)),
                    "crlfile" => listener.crlfile = Some(PathBuf::from(value)),
                    "require_certificate" => listener.require_certificate = boolean(value, at)?,
                    _ => listener.use_identity_as_username = boolean(value, at)?,
                }
            }
            "password_file" => {
                self.c.password_file = Some(PathBuf::from(value));
                self.set("password_file", at);
            }
            "acl_file" => {
                self.c.acl_file = Some(PathBuf::from(value));
                self.set("acl_file", at);
            }
            "allow_anonymous" => {
                self.c.allow_anonymous = Some(boolean(value, at)?);
                self.allow_anonymous_set = true;
                self.set("allow_anonymous", at);
            }
            "allow_zero_length_clientid" => {
                self.c.allow_zero_length_clientid = boolean(value, at)?;
                self.set("allow_zero_length_clientid", at);
            }
            "persistence" => {
                self.persistence = Some(boolean(value, at)?);
                self.set("persistence", at);
            }
            "persistence_location" => {
                self.c.persistence_location = Some(PathBuf::from(value));
                self.set("persistence_location", at);
            }
            "autosave_interval" => {
                let secs = number::<u64>(value, at)?;
                if secs == 0 {
                    return Err(at.error(
                        "0 (save only at exit) is not supported: tern syncs its store every so many seconds; \
                         give at least 1",
                    ));
                }
                self.c.persistence_interval = secs;
                self.set("persistence_interval", at);
            }
            "max_inflight_messages" => {
                // mosquitto's 0 is "no limit": the most a 5.0 Receive Maximum can say.
                let n = number::<u32>(value, at)?;
                self.c.max_inflight_messages = if n == 0 { u16::MAX } else { n.min(u16::MAX as u32) as u16 };
                self.set("max_inflight_messages", at);
            }
            "max_queued_messages" => {
                let n = number::<usize>(value, at)?;
                if n == 0 {
                    return Err(at.error("0 (no limit) is not supported: tern bounds every queue; give a count"));
                }
                self.c.max_queued_messages = n;
                self.set("max_queued_messages", at);
            }
            "max_queued_bytes" => {
                self.c.max_queued_bytes = number(value, at)?;
                self.set("max_queued_bytes", at);
            }
            "max_keepalive" => {
                self.c.max_keepalive = number(value, at)?;
                self.set("max_keepalive", at);
            }
            "message_size_limit" => {
                self.c.message_size_limit = number(value, at)?;
                self.set("message_size_limit", at);
            }
            "max_packet_size" => {
                // mosquitto's 0 is "no limit": the largest packet MQTT can frame.
                let n = number::<u32>(value, at)?;
                self.c.max_packet_size = if n == 0 { crate::codec::MAX_PACKET_SIZE as u32 } else { n };
                // The budget for packets in progress must hold at least one.
                self.c.max_partial_bytes = self.c.max_partial_bytes.max(self.c.max_packet_size as usize);
                self.set("max_packet_size", at);
            }
            "max_connections" => {
                // Per listener in mosquitto, over all listeners in tern; -1: no limit of its own.
                let n = number::<i64>(value, at)?;
                if n == 0 || n < -1 {
                    return Err(at.error("expected -1 (no limit) or a positive count"));
                }
                if n > 0 {
                    self.c.max_connections = n as usize;
                }
                self.set("max_connections", at);
            }
            "persistent_client_expiration" => {
                super::parse_expiration(value).map_err(|why| at.error(why))?;
                self.c.persistent_client_expiration = value.to_string();
                self.set("persistent_client_expiration", at);
            }
            "memory_limit" => {
                self.c.memory_limit = number(value, at)?;
                self.set("memory_limit", at);
            }
            "sys_interval" => {
                self.c.sys_interval = number(value, at)?;
                self.set("sys_interval", at);
            }
            "pid_file" => {
                self.c.pid_file = Some(PathBuf::from(value));
                self.set("pid_file", at);
            }
            "log_dest" => {
                let mut words = value.split_whitespace();
                match words.next() {
                    Some("stderr") => self.c.log_file = None,
                    Some("stdout") => self.c.log_file = Some(PathBuf::from("/dev/stdout")),
                    Some("none") => self.log_off = true,
                    Some("file") => {
                        let path = value["file".len()..].trim();
                        if path.is_empty() {
                            return Err(at.error("`log_dest file` needs a path"));
                        }
                        self.c.log_file = Some(PathBuf::from(path));
                    }
                    _ => {
                        return Err(at.error(format!(
                            "{value:?}: tern logs to stderr, stdout or a file (syslog, topic and dlt are not supported)"
                        )))
                    }
                }
                self.set("log_file", at);
            }
            "log_type" => {
                let level = match value {
                    "none" => "off",
                    "error" => "error",
                    "warning" => "warn",
                    "notice" | "information" | "subscribe" | "unsubscribe" | "websockets" => "info",
                    "debug" | "all" => "debug",
                    _ => return Err(at.error(format!("{value:?}: not a mosquitto log type"))),
                };
                self.log_levels.push(level);
                self.set("log_level", at);
            }
            "user" => {
                // mosquitto changes to this user only when started as root.
                if effective_uid() == Some(0) && value != "root" {
                    return Err(at.error(format!(
                        "tern does not change user: start it as {value} (e.g. systemd's User={value})"
                    )));
                }
            }
            _ => {
                // Options whose value may only say what tern does anyway.
                if let Some(&(_, tern_does)) = FIXED.iter().find(|(o, _)| *o == option) {
                    if boolean(value, at)? != tern_does {
                        return Err(at.error(format!("tern always behaves as `{option} {tern_does}`")));
                    }
                    return Ok(());
                }
                return Err(at.error("not supported by tern (README: Configuration, mosquitto.conf)"));
            }
        }
        Ok(())
    }

    /// The listener `port`, `bind_address` and early listener options configure.
    fn default_listener(&mut self, at: &Origin) -> usize {
        if let Some(l) = self.default_listener {
            return l;
        }
        let mut l = ListenerConfig::plain(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 1883);
        l.bind = None;
        self.listeners.push((l, at.clone()));
        self.default_listener = Some(self.listeners.len() - 1);
        self.listeners.len() - 1
    }

    fn listener(&mut self, value: &str, at: &Origin) -> Result<(), ConfigError> {
        let mut words = value.split_whitespace();
        let port = number::<u16>(words.next().unwrap_or(""), at)?;
        let bind = match words.next() {
            None => None,
            Some(b) if b.starts_with('/') => {
                return Err(at.error("unix sockets are not supported: give a port and an address"))
            }
            Some(b) => Some(address(b, at)?),
        };
        if words.next().is_some() {
            return Err(at.error("expected a port and at most one address"));
        }
        let mut l = ListenerConfig::plain(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        l.bind = bind;
        self.listeners.push((l, at.clone()));
        self.current_listener = Some(self.listeners.len() - 1);
        Ok(())
    }

    fn include_dir(&mut self, dir: &str, at: &Origin, depth: usize) -> Result<(), ConfigError> {
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(at.error(format!("includes nested more than {MAX_INCLUDE_DEPTH} deep")));
        }
        let entries = std::fs::read_dir(dir).map_err(|e| at.error(format!("{dir}: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| at.error(format!("{}: {e}", f.display())))?;
            self.file(&f, &text, depth + 1)?;
        }
        Ok(())
    }

    fn bridge_option(&mut self, option: &str, value: &str, at: &Origin) -> Result<(), ConfigError> {
        if option == "connection" {
            if value.contains(char::is_whitespace) {
                return Err(at.error("a bridge name is one word"));
            }
            let b = BridgeConfig {
                name: value.to_string(),
                address: Addresses::Many(Vec::new()),
                protocol_version: 4,
                client_id: None,
                username: None,
                password: None,
                cafile: None,
                certfile: None,
                keyfile: None,
                clean_start: false,
                keepalive: 60,
                topics: Vec::new(),
            };
            self.bridges.push((b, at.clone()));
            return Ok(());
        }
        let Some((b, _)) = self.bridges.last_mut() else {
            return Err(at.error("a bridge option needs a `connection <name>` line above it"));
        };
        match option {
            "address" | "addresses" => {
                let list = value
                    .split_whitespace()
                    .map(|a| if a.contains(':') { a.to_string() } else { format!("{a}:1883") })
                    .collect();
                b.address = Addresses::Many(list);
            }
            "topic" => b.topics.push(bridge_topic(value, at)?),
            "bridge_protocol_version" => {
                b.protocol_version = match value {
                    "mqttv311" => 4,
                    "mqttv50" => 5,
                    _ => return Err(at.error(format!("{value:?}: tern bridges with mqttv311 or mqttv50"))),
                }
            }
            "remote_clientid" | "clientid" => b.client_id = Some(value.to_string()),
            "remote_username" | "username" => b.username = Some(value.to_string()),
            "remote_password" | "password" => b.password = Some(value.to_string()),
            "bridge_cafile" => b.cafile = Some(PathBuf::from(value)),
            "bridge_certfile" => b.certfile = Some(PathBuf::from(value)),
            "bridge_keyfile" => b.keyfile = Some(PathBuf::from(value)),
            "cleansession" => b.clean_start = boolean(value, at)?,
            "keepalive_interval" => b.keepalive = number(value, at)?,
            "try_private" => {
                if !boolean(value, at)? {
                    return Err(at.error("tern always marks its 3.1.1 bridge connections (try_private true)"));
                }
            }
            "notifications" => {
                if boolean(value, at)? {
                    return Err(at.error("bridge state notifications are not supported: set it false"));
                }
            }
            _ => {
                // start_type
                if value != "automatic" {
                    return Err(at.error(format!("{value:?}: tern starts bridges at start-up (automatic)")));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Config, ConfigError> {
        let mut c = std::mem::take(&mut self.c);
        // mosquitto logs every type listed: the most verbose one decides; `log_dest none` none.
        if let Some(most) = self.log_levels.iter().max_by_key(|l| verbosity(l)) {
            c.log_level = most.to_string();
        }
        if self.log_off {
            c.log_level = "off".into();
        }
        match self.persistence {
            Some(true) => {
                c.persistence = "periodic".into();
                // mosquitto's default location is the working directory.
                if c.persistence_location.is_none() {
                    c.persistence_location = Some(PathBuf::from("."));
                }
            }
            _ => c.persistence = "off".into(),
        }
        if !self.listeners.is_empty() {
            // mosquitto 2.0: with listeners configured, anonymous clients need allow_anonymous.
            if !self.allow_anonymous_set {
                c.allow_anonymous = Some(false);
            }
            // The first plain MQTT listener is tern's top-level one; the rest are [[listener]].
            let plain = self.listeners.iter().position(|(l, _)| l.protocol == Protocol::Mqtt && !l.is_tls());
            c.plain_listener = plain.is_some();
            for (i, (l, at)) in self.listeners.iter().enumerate() {
                let bind = l.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                if Some(i) == plain {
                    c.bind = bind;
                    c.port = l.port;
                    continue;
                }
                let l = ListenerConfig { bind: Some(bind), ..l.clone() };
                l.validate(c.listener.len()).map_err(|e| at.error(strip(e)))?;
                c.listener.push(l);
            }
        }
        for (i, (b, at)) in self.bridges.into_iter().enumerate() {
            b.validate(i).map_err(|e| at.error(strip(e)))?;
            if c.bridge.iter().any(|o| o.name == b.name) {
                return Err(at.error(format!("a second bridge named {:?}", b.name)));
            }
            c.bridge.push(b);
        }
        c.validate().map_err(|e| match &e {
            ConfigError::Invalid { key, .. } => match self.origins.iter().rev().find(|(k, _)| k == key) {
                Some((_, at)) => at.error(strip(e)),
                None => e,
            },
            _ => e,
        })?;
        Ok(c)
    }
}

fn verbosity(level: &str) -> u8 {
    match level {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        _ => 4,
    }
}

/// An `Invalid` error's reason without its TOML key (the mosquitto option is named instead).
fn strip(e: ConfigError) -> String {
    match e {
        ConfigError::Invalid { why, .. } => why,
        other => other.to_string(),
    }
}

fn is_bridge_option(option: &str) -> bool {
    matches!(
        option,
        "connection"
            | "address"
            | "addresses"
            | "topic"
            | "bridge_protocol_version"
            | "remote_clientid"
            | "clientid"
            | "remote_username"
            | "username"
            | "remote_password"
            | "password"
            | "bridge_cafile"
            | "bridge_certfile"
            | "bridge_keyfile"
            | "cleansession"
            | "keepalive_interval"
            | "try_private"
            | "notifications"
            | "start_type"
    )
}

/// `topic pattern [[[ out | in | both ] qos] local_prefix remote_prefix]`, `""` for an empty one.
fn bridge_topic(value: &str, at: &Origin) -> Result<BridgeTopic, ConfigError> {
    let words: Vec<&str> = value.split_whitespace().map(|w| if w == "\"\"" { "" } else { w }).collect();
    if words.len() > 5 {
        return Err(at.error("expected: pattern [direction [qos [local_prefix [remote_prefix]]]]"));
    }
    let direction = match words.get(1) {
        None | Some(&"out") => Direction::Out,
        Some(&"in") => Direction::In,
        Some(&"both") => Direction::Both,
        Some(d) => return Err(at.error(format!("direction {d:?}: expected out, in or both"))),
    };
    let qos = match words.get(2) {
        None => 0,
        Some(q) => match q.parse::<u8>() {
            Ok(q) if q <= 2 => q,
            _ => return Err(at.error(format!("qos {q:?}: expected 0, 1 or 2"))),
        },
    };
    let pattern = words[0].to_string();
    let local_prefix = words.get(3).unwrap_or(&"").to_string();
    let remote_prefix = words.get(4).unwrap_or(&"").to_string();
    if pattern.is_empty() && local_prefix.is_empty() && remote_prefix.is_empty() {
        return Err(at.error("an empty pattern needs a prefix"));
    }
    Ok(BridgeTopic { pattern, direction, qos, local_prefix, remote_prefix })
}

fn boolean(value: &str, at: &Origin) -> Result<bool, ConfigError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(at.error(format!("{value:?}: expected true or false"))),
    }
}

fn number<T: std::str::FromStr>(value: &str, at: &Origin) -> Result<T, ConfigError> {
    value.parse().map_err(|_| at.error(format!("{value:?}: expected a number in range")))
}

/// An address or a host name (resolved now, as mosquitto does at start).
fn address(value: &str, at: &Origin) -> Result<IpAddr, ConfigError> {
    if let Ok(ip) = value.parse() {
        return Ok(ip);
    }
    match (value, 0).to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(a) => Ok(a.ip()),
            None => Err(at.error(format!("{value:?} has no address"))),
        },
        Err(e) => Err(at.error(format!("{value:?}: {e}"))),
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Config, String> {
        parse(Path::new("m.conf"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_format_is_told_from_the_name_or_the_first_setting() {
        assert!(looks_like(Path::new("/etc/mosquitto/mosquitto.conf"), "port = 1"));
        assert!(!looks_like(Path::new("tern.toml"), "port 1"));
        assert!(looks_like(Path::new("cfg"), "# c\n\nport 1883\n"));
        assert!(!looks_like(Path::new("cfg"), "# c\nport = 1883\n"));
        assert!(!looks_like(Path::new("cfg"), "[[listener]]\n"));
    }

    #[test]
    fn no_listener_keeps_tern_and_mosquittos_loopback_default() {
        let c = read("# nothing\nmax_queued_messages 200\n").unwrap();
        assert_eq!(c.addr().to_string(), "127.0.0.1:1883");
        assert_eq!(c.allow_anonymous, None);
        assert_eq!(c.max_queued_messages, 200);
    }

    #[test]
    fn listeners_map_to_the_plain_one_and_the_rest() {
        let c = read("listener 8883\ncertfile /etc/hostname\nkeyfile /etc/hostname\nlistener 1884 127.0.0.1\nlistener 9001\nprotocol websockets\n").unwrap();
        assert_eq!(c.addr().to_string(), "127.0.0.1:1884");
        assert!(c.plain_listener);
        assert_eq!(c.listener.len(), 2);
        assert_eq!((c.listener[0].port, c.listener[0].scheme()), (8883, "mqtts"));
        assert_eq!((c.listener[1].port, c.listener[1].scheme()), (9001, "ws"));
        assert_eq!(c.listener[1].bind, Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        assert_eq!(c.allow_anonymous, Some(false), "mosquitto 2.0 with listeners configured");
        let tls_only =
            read("listener 8883\ncertfile /etc/hostname\nkeyfile /etc/hostname\nallow_anonymous true\n").unwrap();
        assert!(!tls_only.plain_listener);
        assert_eq!(tls_only.listeners().len(), 1);
        assert_eq!(tls_only.allow_anonymous, Some(true));
    }

    #[test]
    fn refusals_name_the_file_line_and_option() {
        for (text, option, line) in [
            ("port 1883\nqueue_qos0_messages true\n", "queue_qos0_messages", 2),
            ("port 1883\nauth_plugin /usr/lib/x.so\n", "auth_plugin", 2),
            ("\n\nmax_queued_messages 0\n", "max_queued_messages", 3),
            ("persistence maybe\n", "persistence", 1),
            ("per_listener_settings true\n", "per_listener_settings", 1),
            ("listener 1883 /tmp/sock\n", "listener", 1),
            ("address 10.0.0.1\n", "address", 1),
            ("connection up\naddress 10.0.0.1:1883\ntopic # sideways\n", "topic", 3),
            ("connection up\nbridge_protocol_version mqttv31\n", "bridge_protocol_version", 2),
            ("listener 1883\nlistener 8883\nkeyfile /etc/hostname\n", "listener", 2),
            ("connection up\naddress 10.0.0.1:1883\n", "connection", 1),
            ("max_keepalive 0\n", "max_keepalive", 1),
            ("log_dest syslog\n", "log_dest", 1),
            ("autosave_interval 0\n", "autosave_interval", 1),
            ("max_inflight_messages\n", "max_inflight_messages", 1),
        ] {
            let e = read(text).unwrap_err();
            assert!(e.starts_with(&format!("m.conf line {line}: `{option}`:")), "{text:?} gave {e}");
        }
    }

    #[test]
    fn bridge_blocks_are_read() {
        let c = read(
            "connection cloud\naddress broker.example:8883 10.0.0.2\nbridge_protocol_version mqttv50\n\
             remote_clientid edge-7\nremote_username u\nremote_password p\ncleansession true\n\
             keepalive_interval 30\ntry_private true\nnotifications false\nstart_type automatic\n\
             topic sensors/# out 1 \"\" edge/7/\ntopic cmd/# in 2\ntopic \"\" both 0 local/x remote/x\n",
        )
        .unwrap();
        let b = &c.bridge[0];
        assert_eq!(b.address.list(), vec!["broker.example:8883", "10.0.0.2:1883"]);
        assert_eq!(
            (b.protocol_version, b.client_id.as_deref(), b.clean_start, b.keepalive),
            (5, Some("edge-7"), true, 30)
        );
        assert_eq!((b.username.as_deref(), b.password.as_deref()), (Some("u"), Some("p")));
        assert_eq!(b.topics.len(), 3);
        assert_eq!(
            b.topics[0],
            BridgeTopic {
                pattern: "sensors/#".into(),
                direction: Direction::Out,
                qos: 1,
                local_prefix: "".into(),
                remote_prefix: "edge/7/".into()
            }
        );
        assert_eq!((b.topics[1].direction, b.topics[1].qos), (Direction::In, 2));
        assert_eq!((b.topics[2].pattern.as_str(), b.topics[2].local_prefix.as_str()), ("", "local/x"));
    }

    #[test]
    fn values_follow_mosquittos_meaning() {
        let c = read(
            "persistence true\nautosave_interval 60\nmax_inflight_messages 0\nmax_packet_size 0\n\
             message_size_limit 1000\nlog_type error\nlog_type warning\nlog_type information\n\
             log_dest file /tmp/x.log\npersistent_client_expiration 2w\n",
        )
        .unwrap();
        assert_eq!((c.persistence.as_str(), c.persistence_location.as_deref()), ("periodic", Some(Path::new("."))));
        assert_eq!(c.persistence_interval, 60);
        assert_eq!(c.max_inflight_messages, u16::MAX);
        assert_eq!(c.max_packet_size as usize, crate::codec::MAX_PACKET_SIZE);
        assert!(c.max_partial_bytes >= crate::codec::MAX_PACKET_SIZE);
        assert_eq!(c.message_size_limit, 1000);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_file.as_deref(), Some(Path::new("/tmp/x.log")));
        assert_eq!(c.persistent_expiry_secs(), Some(14 * 86_400));
    }
}
