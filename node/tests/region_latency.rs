//! A far-away region shows separately: three nodes in network namespaces (the project's
//! own test hosts, testnet/netns.sh, regions us/eu/ap), a stampede-target on the
//! bridge whose answers to the ap host carry 150 ms extra (the kernel here has no
//! netem, so the distance is simulated at the service by source address), and a mesh
//! run whose summary and HTML report keep the ap region's latency apart from the
//! others' instead of averaging it away.
//!
//! Needs root and `ip netns`; without them the test prints why and skips.

mod mesh_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_support::{netns_script, netns_skip_reason, wait_until, NetnsDown, BIN};
use serde_json::Value;
use stampede_tools::{SourceDelay, TargetConfig};

const HOSTS: usize = 3;
const BRIDGE_IP: &str = "10.77.0.254";

fn in_ns(i: usize) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("sp-ns{i}"), BIN]);
    c
}

fn alive_seen_by(dir: &Path, i: usize) -> usize {
    let out = in_ns(i)
        .args(["peers", "--json", "--data-dir"])
        .arg(dir.join(format!("n{i}")))
        .output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice::<Vec<Value>>(&o.stdout)
            .unwrap_or_default()
            .iter()
            .filter(|m| m["state"] == "alive")
            .count(),
        _ => 0,
    }
}

#[test]
fn a_far_region_shows_its_own_latency_in_the_summary_and_report() {
    if let Some(why) = netns_skip_reason() {
        eprintln!("SKIPPED a_far_region_shows_its_own_latency_in_the_summary_and_report: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let _down = NetnsDown(dir.clone());
    let up = Command::new("bash")
        .arg(netns_script())
        .args(["up", &HOSTS.to_string()])
        .env("STAMPEDE_TESTNET_DIR", &dir)
        .env("STAMPEDE_BIN", BIN)
        // The nodes may send load to the target on the bridge (our own test host).
        .env("STAMPEDE_ALLOW_TARGET", BRIDGE_IP)
        .env("STAMPEDE_CAPACITY", "1")
        .output()
        .expect("run netns.sh");
    assert!(
        up.status.success(),
        "netns.sh up failed:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let addr = Command::new("ip")
        .args(["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "sp-br0"])
        .status()
        .unwrap();
    assert!(addr.success(), "cannot give the bridge an address");
    assert!(
        wait_until(Duration::from_secs(60), || (1..=HOSTS)
            .all(|i| alive_seen_by(&dir, i) == HOSTS)),
        "the namespaced nodes did not find each other"
    );

    // Host 3 is the ap region (netns.sh deals us, eu, ap): its answers come 150 ms later.
    let far: SourceDelay = "10.77.0.3/32=150ms".parse().unwrap();
    let t = stampede_tools::spawn(TargetConfig {
        listen: format!("{BRIDGE_IP}:0").parse().unwrap(),
        delay_from: vec![far],
        threads: 2,
        ..Default::default()
    })
    .expect("start stampede-target on the bridge");
    let plan = dir.join("region.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "regions"
[defaults]
base_url = "{}"
timeout = "5s"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = 30
duration = "5s"
max_vus = 60
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/9" }}
check = {{ status = 200 }}
"#,
            t.url()
        ),
    )
    .unwrap();
    let (json, html) = (dir.join("summary.json"), dir.join("report.html"));
    let out = in_ns(1)
        .args(["run", "--mesh", "--quiet", "--data-dir"])
        .arg(dir.join("n1"))
        .arg(&plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .arg("--out")
        .arg(format!("html={}", html.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s["totals"]["requests"].as_u64().unwrap(), t.requests());
    let regions = &s["by_label"]["region"];
    let p50 = |r: &str| regions[r]["latency_us"]["p50"].as_u64().unwrap_or(0);
    eprintln!(
        "p50 by region: us {} µs, eu {} µs, ap {} µs; merged p50 {} µs",
        p50("us"),
        p50("eu"),
        p50("ap"),
        s["totals"]["latency_us"]["p50"]
    );
    assert!(p50("ap") >= 150_000, "ap p50 {}", p50("ap"));
    for r in ["us", "eu"] {
        assert!(p50(r) < 50_000, "{r} p50 {}", p50(r));
        assert!(regions[r]["requests"].as_u64().unwrap() > 0);
    }
    // The report carries the per-region rows (its embedded summary is what it draws).
    let report = std::fs::read_to_string(&html).unwrap();
    assert!(report.contains("\"by_label\"") && report.contains("\"ap\""));

    // So does the dashboard of the node the run started from: its /api/live (served on
    // the namespace's own loopback, read from inside it) keeps ap apart too.
    let fetch = Command::new("ip")
        .args(["netns", "exec", "sp-ns1", "python3", "-c"])
        .arg("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7401/api/live', timeout=10).read().decode())")
        .output()
        .expect("python3 inside the namespace");
    assert!(
        fetch.status.success(),
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let live: Value = serde_json::from_slice(&fetch.stdout).expect("/api/live is JSON");
    let run_id = s["run_id"].as_str().unwrap();
    let run = live["runs"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["run_id"] == run_id))
        .expect("the run is on the dashboard");
    let live_p50 = |r: &str| {
        run["by_label"]["region"][r]["latency_us"]["p50"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        live_p50("ap") >= 150_000,
        "dashboard ap p50 {}",
        live_p50("ap")
    );
    assert!(
        live_p50("eu") < 50_000 && live_p50("us") < 50_000,
        "dashboard {}",
        run["by_label"]
    );
}
