//! The Eclipse Paho interoperability client tests (eclipse/paho.mqtt.testing's `client_test.py`,
//! MQTT 3.1.1, and `client_test5.py`, MQTT 5.0), run one test at a time against the real broker
//! with the settings they assume: `max_keepalive = 60` and an ACL denying `test/nosubscribe`.
//! With 1 and 4 workers. The suite is read from `../shared/paho-interop/` beside the checkout (or
//! `PAHO_INTEROP`); without it these tests say so and pass, as nothing of it is part of tern.
//!
//! Every test must pass. Two 5.0 tests (`test_subscribe_options`, `test_request_response`)
//! publish from one client right after another's SUBSCRIBE, waiting on the wrong client's SUBACK
//! (`callback` for `callback2`): with several workers they rely on a SUBSCRIBE being ordered with
//! other clients' PUBLISHes by arrival (`worker::catchup`). `test_subscribe_failure`'s 5.0 client
//! takes only 0, 1, 2 or 0x80 in a SUBACK, so the ACL refusal is configured to say 0x80
//! (`acl_denial_reason = "unspecified"`; 0x87 Not authorized is the default).

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
    // The suite's 5.0 decoder takes only 0, 1, 2 or 0x80 in a SUBACK: ACL refusals say 0x80.
    let conf = format!(
        "workers = {workers}\nmax_keepalive = 60\nacl_file = \"{}\"\nacl_denial_reason = \"unspecified\"\n",
        acl.display()
    );
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
fn paho_interoperability_5_0_all_pass() {
    let Some(dir) = suite_dir() else { return };
    if !have_paho() {
        return;
    }
    for workers in WORKER_COUNTS {
        let (n, failed) = run_suite(&dir, "client_test5.py", workers);
        assert_eq!(n, 27, "the 5.0 suite has 27 tests");
        assert!(failed.is_empty(), "5.0, {workers} workers: failed {failed:?}");
    }
}
