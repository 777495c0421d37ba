//! A real browser over WebSockets: headless Chromium opens a page that uses the `mqtt` npm
//! package (installed here into target/, not committed) to connect to tern's `ws://` listener,
//! publish, subscribe and answer; the test talks to it from a plain TCP client.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tern::codec::*;
use tern::config::{ListenerConfig, Protocol};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok())
}

/// `node_modules/mqtt/dist/mqtt.min.js`, installed with npm on first use.
fn mqtt_js() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-test");
    let js = dir.join("node_modules/mqtt/dist/mqtt.min.js");
    if !js.exists() {
        std::fs::create_dir_all(&dir).ok()?;
        let out = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("mqtt@5")
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("npm install mqtt failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
    }
    js.exists().then_some(js)
}

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn chromium_with_mqtt_js_publishes_and_subscribes_over_websockets() {
    let Some(chromium) = chromium() else {
        eprintln!("chromium not installed: skipped (.ci/run installs it)");
        return;
    };
    let Some(js) = mqtt_js() else {
        eprintln!("the mqtt npm package could not be installed: skipped");
        return;
    };
    let mut ws = ListenerConfig::plain("127.0.0.1".parse().unwrap(), 0);
    ws.protocol = Protocol::Websockets;
    let b = start_with(tern::Config { listener: vec![ws], ..config(2) });
    let (plain, ws) = (b.local_addrs()[0], b.local_addrs()[1]);
    let (mut c, _) = Client::connect(plain, "browser-watch", true);
    c.subscribe("browser/#", QoS::AtLeastOnce);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-page-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("page.html");
    std::fs::write(
        &page,
        format!(
            r#"<!doctype html><meta charset="utf-8"><title>tern</title>
<script src="file://{js}"></script>
<script>
const c = mqtt.connect("ws://127.0.0.1:{port}/mqtt", {{ clientId: "chromium-1", protocolVersion: 4 }});
c.on("connect", () => {{
  c.subscribe("browser/in", {{ qos: 1 }}, () => c.publish("browser/hello", "hello from " + navigator.userAgent.split(" ").pop(), {{ qos: 1 }}));
}});
c.on("message", (topic, payload) => c.publish("browser/echo", "echo:" + payload.toString(), {{ qos: 1 }}));
c.on("error", (e) => document.title = "error " + e);
</script>"#,
            js = js.display(),
            port = ws.port()
        ),
    )
    .unwrap();
    let profile = dir.join("profile");
    let _browser = Browser(
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--allow-file-access-from-files",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("file://{}", page.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts"),
    );
    // The browser connected and published.
    let end = Instant::now() + Duration::from_secs(60);
    let hello = loop {
        assert!(Instant::now() < end, "nothing from the browser within 60 s");
        if let Some(Packet::Publish(p)) = c.try_recv(Duration::from_secs(1)) {
            c.ack(&p);
            if p.topic == "browser/hello" {
                break p;
            }
        }
    };
    assert!(hello.payload.starts_with(b"hello from "), "{:?}", hello.payload);
    // And it receives: what we publish comes back from it.
    c.publish("browser/in", Bytes::from_static(b"ping"), QoS::AtLeastOnce, false);
    loop {
        let p = c.recv_publish();
        c.ack(&p);
        if p.topic == "browser/echo" {
            assert_eq!(&p.payload[..], b"echo:ping");
            break;
        }
    }
    b.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
