//! Fail fast and say why (issue 16): the real `stampede run` against a closed port on
//! 127.0.0.1 says early that every request fails and why, paces its VUs instead of
//! spinning, leads its summary with it and exits non-zero — unless the plan expects
//! failures; thresholds with `abort_on_fail` stop a run early with exit 99.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn stampede() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stampede"))
}

/// A loopback port nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn write_plan(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("plan.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(plan: &Path, dir: &Path) -> (Output, Value, Duration) {
    let json = dir.join("summary.json");
    let started = Instant::now();
    let out = stampede()
        .arg("run")
        .arg(plan)
        .args(["--quiet", "--workers", "2", "--out"])
        .arg(format!("json={}", json.display()))
        .output()
        .expect("run stampede");
    let took = started.elapsed();
    let summary = std::fs::read_to_string(&json)
        .map(|s| serde_json::from_str(&s).expect("summary is JSON"))
        .unwrap_or(Value::Null);
    (out, summary, took)
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dead_target_plan(port: u16, extra_top: &str) -> String {
    format!(
        r#"
name = "dead"
{extra_top}
[defaults]
base_url = "http://127.0.0.1:{port}"
timeout = "1s"
[scenarios.s]
executor = "constant-vus"
vus = 20
duration = "3s"
flow = "f"
[[flows.f.steps]]
name = "home"
request = {{ url = "/" }}
"#
    )
}

#[test]
fn a_run_against_a_closed_port_says_so_early_paces_its_vus_and_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let (out, s, _) = run(
        &write_plan(dir.path(), &dead_target_plan(port, "")),
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let said = format!("127.0.0.1:{port}: connection refused — is the service up?");
    // Said at once, even with --quiet, with the rate of attempts.
    assert!(
        err.contains("every request failed in the first") && err.contains(&said),
        "{}",
        show(&out)
    );
    assert!(err.contains("attempts/s)"), "{}", show(&out));
    assert!(err.contains("every request failed ("), "{}", show(&out));
    // Early: within the first two seconds of a 3 s run.
    let event = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "only_failing")
        .unwrap_or_else(|| panic!("no only_failing event: {s}"));
    assert!(event["t"].as_f64().unwrap() <= 2.5, "{event}");
    // The summary leads with it, before the table.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let said_at = stdout.find(&said).expect("summary names it");
    let table_at = stdout.find("TOTAL").expect("summary table");
    assert!(said_at < table_at, "{}", show(&out));
    // Paced: 20 VUs with a growing pause (10 ms doubling to 1 s) make a few attempts
    // each in 3 s, not the hundreds of thousands of a spinning loop.
    let requests = s["totals"]["requests"].as_u64().unwrap();
    assert!((20..=20 * 12).contains(&requests), "{requests} attempts");
    assert_eq!(s["totals"]["failed"], s["totals"]["requests"]);
    assert!(
        s["generator"]["cpu"].as_f64().unwrap() < 0.25,
        "{}",
        s["generator"]
    );
}

#[test]
fn a_plan_that_expects_failures_exits_0_when_every_request_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (out, s, _) = run(
        &write_plan(
            dir.path(),
            &dead_target_plan(closed_port(), "expect_failures = true"),
        ),
        dir.path(),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(s["totals"]["failed"], s["totals"]["requests"]);
}

#[test]
fn a_templated_host_that_is_not_allowed_is_said_once_per_host() {
    let dir = tempfile::tempdir().unwrap();
    // Hosts known only at run time: refused per request before anything is sent
    // (10.0.0.0/8 is not allowed; nothing leaves the machine).
    let plan = r#"
name = "templated"
[scenarios.s]
executor = "constant-vus"
vus = 20
duration = "2s"
flow = "f"
[[flows.f.steps]]
name = "home"
request = { url = "http://10.{{ random_int(1, 2) }}.0.1/" }
"#;
    let (out, s, _) = run(&write_plan(dir.path(), plan), dir.path());
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("target '10."))
        .collect();
    assert!(
        (1..=2).contains(&lines.len()),
        "one line per host: {}",
        show(&out)
    );
    assert!(lines[0].contains("--allow-target 10."), "{}", lines[0]);
    let refused = s["totals"]["errors"]["refused"].as_u64().unwrap_or(0);
    assert!(refused >= 20, "{s}");
    let events = s["events"].as_array().unwrap();
    let said = events
        .iter()
        .filter(|e| e["kind"] == "target_refused")
        .count();
    assert_eq!(said, lines.len(), "{s}");
}

/// A threshold with `abort_on_fail` stops a 60 s run soon after its
/// `delay_abort_eval`, names itself and the time, exits 99, and the report holds what
/// was measured up to the stop (it equals what the target counted).
#[test]
fn an_abort_on_fail_threshold_stops_the_run_and_exits_99() {
    let t = stampede_tools::spawn(stampede_tools::TargetConfig {
        threads: 1,
        error_rate: 0.5,
        ..Default::default()
    })
    .expect("start stampede-target");
    let dir = tempfile::tempdir().unwrap();
    let plan = format!(
        r#"
name = "abort"
[defaults]
base_url = "{}"
timeout = "2s"
[scenarios.s]
executor = "constant-arrival-rate"
rate = 50
duration = "60s"
max_vus = 20
flow = "f"
[[flows.f.steps]]
name = "product"
request = {{ url = "/products/7" }}
[thresholds]
"http_req_failed" = [{{ threshold = "rate < 10%", abort_on_fail = true, delay_abort_eval = "2s" }}]
"http_req_duration" = ["p(99) < 10s"]
"#,
        t.url()
    );
    let (out, s, took) = run(&write_plan(dir.path(), &plan), dir.path());
    assert_eq!(out.status.code(), Some(99), "{}", show(&out));
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: {}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("threshold http_req_failed: rate < 10% failed at"),
        "{}",
        show(&out)
    );
    let event = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "threshold_abort")
        .unwrap_or_else(|| panic!("no threshold_abort event: {s}"));
    let at = event["t"].as_f64().unwrap();
    assert!((2.0..6.0).contains(&at), "stopped at {at}: {event}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.find("abort_on_fail").unwrap() < stdout.find("TOTAL").unwrap(),
        "the summary leads with it: {stdout}"
    );
    // Complete up to the stop: every request the target saw is in the report.
    let requests = s["totals"]["requests"].as_u64().unwrap();
    assert!(requests >= 100, "{requests}");
    assert!(t.requests() >= requests, "{} < {requests}", t.requests());
    assert!(
        t.requests() - requests <= 20,
        "{} vs {requests}",
        t.requests()
    );
    let failed = s["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["metric"] == "http_req_failed")
        .unwrap();
    assert_eq!(failed["passed"], false, "{s}");
}
