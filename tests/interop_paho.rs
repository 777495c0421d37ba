//! The Eclipse Paho interoperability client tests (eclipse/paho.mqtt.testing's `client_test.py`,
//! MQTT 3.1.1, and `client_test5.py`, MQTT 5.0), run one test at a time against the real broker
//! with the settings they assume: `max_keepalive = 60` and an ACL denying `test/nosubscribe`.
//! With 1 and 4 workers. The suite is read from `../shared/paho-interop/` beside the checkout (or
//! `PAHO_INTEROP`); without it these tests say so and pass, as nothing of it is part of tern.
//!
//! Known gaps, each allowed to fail (and reported) until it is closed; every other test must pass:
//! - 5.0 `test_subscribe_options` with more than one worker: the suite publishes from one client
//!   right after another's SUBSCRIBE, waiting on the wrong client's SUBACK (`callback` for
//!   `callback2`). On one worker a connection read after a SUBSCRIBE of the same turn waits for the
//!   next turn, and a worker takes its peers' mail before it reads its sockets, so a new filter
//!   announced before a PUBLISH is read applies to it (`test_request_response`, the same pattern,
//!   passed 15 of 15 runs with 4 workers); but when the publisher's worker reads the PUBLISH before
//!   the subscriber's worker has read the SUBSCRIBE, nothing orders the two connections (release
//!   build, 4 workers on 2 cores: 3 of 6 runs pass). After the SUBACK delivery is guaranteed.
//! - 5.0 `test_subscribe_failure`: the suite's own 5.0 client refuses a SUBACK reason code other
//!   than 0, 1, 2 or 0x80; tern refuses a subscription the ACL denies with 0x87 (Not authorized),
//!   which [MQTT-3.9.3] provides for (as VerneMQ does; mosquitto grants it and filters delivery).
///
/// (test, fewest workers at which it may fail).
const KNOWN_GAPS: [(&str, usize); 2] = [("test_subscribe_options", 2), ("test_subscribe_failure", 1)];

fn known_gap(test: &str, workers: usize) -> bool {
    KNOWN_GAPS.iter().any(|&(t, from)| t == test && workers >= from)
}

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn suite_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PAHO_INTEROP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/paho-interop"));
    if !dir.join("run_one.py").exists() {
        eprintln!("SKIPPED: the Paho interoperability suite is not at {} (set PAHO_INTEROP)", dir.display());
        return None;
    }
    Some(dir)
}

fn tests_in(dir: &std::path::Path, script: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(script)).unwrap();
    text.lines()
        .filter_map(|l| {
            l.trim_start().strip_prefix("def test").map(|rest| format!("test{}", rest.split('(').next().unwrap()))
        })
        .collect()
}

/// Runs every test of `script` against a fresh broker with `workers`; returns the failures.
fn run_suite(dir: &std::path::Path, script: &str, workers: usize) -> (usize, Vec<String>) {
    let acl_dir = std::env::temp_dir().join(format!("tern-paho-{}", rand_suffix()));
    std::fs::create_dir_all(&acl_dir).unwrap();
    let acl = acl_dir.join("acl");
    std::fs::write(&acl, "topic deny test/nosubscribe\ntopic readwrite #\n").unwrap();
    let conf = format!("workers = {workers}\nmax_keepalive = 60\nacl_file = \"{}\"\n", acl.display());
    let tests = tests_in(dir, script);
    let mut failed = Vec::new();
    for test in &tests {
        // A fresh broker per test: no retained message or session of one test leaks into the next.
        let (mut broker, port, _) = spawn_tern(&[], &conf);
        let mut child = Command::new("python3")
            .arg(dir.join("run_one.py"))
            .args([script, "127.0.0.1", &port.to_string(), test])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        // Some tests wait forever on a broker that does not do what they expect.
        let end = Instant::now() + Duration::from_secs(90);
        let ok = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st.success();
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !ok {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            eprintln!(
                "{script} {test} ({workers} workers) FAILED:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            failed.push(test.clone());
        }
        let _ = broker.kill();
        let _ = broker.wait();
    }
    let _ = std::fs::remove_dir_all(&acl_dir);
    eprintln!("{script} with {workers} worker(s): {}/{} passed", tests.len() - failed.len(), tests.len());
    (tests.len(), failed)
}

fn have_paho() -> bool {
    let ok = Command::new("python3").args(["-c", "import sys"]).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: python3 not found");
    }
    ok
}

#[test]
fn paho_interoperability_3_1_1_all_pass() {
    let Some(dir) = suite_dir() else { return };
    if !have_paho() {
        return;
    }
    for workers in WORKER_COUNTS {
        let (n, failed) = run_suite(&dir, "client_test.py", workers);
        assert_eq!(n, 10, "the 3.1.1 suite has 10 tests");
        assert!(failed.is_empty(), "3.1.1, {workers} workers: failed {failed:?}");
    }
}

#[test]
fn paho_interoperability_5_0_pass_but_the_known_gaps() {
    let Some(dir) = suite_dir() else { return };
    if !have_paho() {
        return;
    }
    for workers in WORKER_COUNTS {
        let (n, failed) = run_suite(&dir, "client_test5.py", workers);
        assert_eq!(n, 27, "the 5.0 suite has 27 tests");
        let unexpected: Vec<_> = failed.iter().filter(|t| !known_gap(t, workers)).collect();
        eprintln!(
            "5.0, {workers} workers: known gaps that failed this run: {:?}",
            failed.iter().filter(|t| known_gap(t, workers)).collect::<Vec<_>>()
        );
        assert!(unexpected.is_empty(), "5.0, {workers} workers: failed {unexpected:?}");
    }
}
