//! Every scenario, briefly, against an in-process broker: the load generator connects, runs,
//! reports a JSON line, and at QoS 1/2 sees no loss or duplicate (its exit status says so).

use std::process::Command;

use tern::{Broker, Config};

fn run(port: u16, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadtest"))
        .args(["run"])
        .args(args)
        .args(["--port", &port.to_string(), "--duration", "0.5", "--drain", "5", "--broker-pid"])
        .arg(std::process::id().to_string())
        .output()
        .expect("tern-loadtest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with('{')).expect("a JSON result line");
    serde_json::from_str(line).expect("valid JSON")
}

#[test]
fn every_scenario_runs_against_an_in_process_broker() {
    let broker = Broker::start(Config { port: 0, workers: 2, pin_workers: false, ..Config::default() }).unwrap();
    let port = broker.local_addr().port();
    for (args, scenario) in [
        // At QoS 1/2 an offered rate keeps the publishers from outrunning the subscriber's queue
        // (max_queued_messages), past which any broker drops.
        (&["fanin", "--publishers", "3", "--qos", "1", "--rate", "3000"][..], "fanin"),
        (&["fanout", "--subscribers", "5", "--qos", "2", "--rate", "2000"][..], "fanout"),
        (&["pairs", "--pairs", "4", "--qos", "1", "--mqtt", "5", "--rate", "4000"][..], "pairs"),
        (&["fanin", "--qos", "0", "--rate", "2000"][..], "fanin"),
        (&["latency", "--qos", "1", "--rate", "2000"][..], "latency"),
        (
            &["sharedsub", "--publishers", "20", "--subscribers", "3", "--qos", "1", "--mqtt", "5", "--rate", "2000"][..],
            "sharedsub",
        ),
        (&["pairs", "--pairs", "10", "--qos", "1", "--size", "16", "--rate", "1000"][..], "pairs"),
    ] {
        let r = run(port, args);
        assert_eq!(r["scenario"], scenario);
        assert!(r["received"].as_u64().unwrap() > 0, "{args:?}: {r}");
        if r["qos"].as_u64().unwrap() > 0 {
            assert_eq!(r["lost"], 0, "{args:?}");
            assert_eq!(r["duplicates"], 0, "{args:?}");
            assert_eq!(r["received"], r["expected"], "{args:?}");
        }
        assert!(r["p99_us"].as_f64().unwrap() > 0.0);
    }
    let r = run(port, &["conns", "--connections", "200", "--hold", "0.2"]);
    assert_eq!(r["connections"], 200);
    assert!(r["connect_rate"].as_f64().unwrap() > 0.0);
    // Paced: 200 connections at 400/s take about half a second; CONNACK times are recorded.
    let r = run(port, &["conns", "--connections", "200", "--rate", "400", "--hold", "0.2"]);
    assert_eq!(r["connections"], 200);
    assert!(r["connect_rate"].as_f64().unwrap() < 600.0, "{r}");
    assert!(r["p99_us"].as_f64().unwrap() > 0.0);
    // A suite use case by name: 1,000 pairs at 1 msg/s each, QoS 1, 16 B, for 2 s.
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadtest"))
        .args(["suite", "p2p-1K-1K-1K-1K", "--duration", "2", "--port", &port.to_string()])
        .output()
        .expect("tern-loadtest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "suite p2p failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!(
        (r["case"].as_str(), r["publishers"].as_u64(), r["size"].as_u64()),
        (Some("p2p-1K-1K-1K-1K"), Some(1000), Some(16))
    );
    assert_eq!(r["lost"], 0);
    assert!(r["received"].as_u64().unwrap() >= 1000, "{r}");
    broker.shutdown();
}
