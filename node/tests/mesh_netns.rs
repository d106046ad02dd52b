//! Nodes in network namespaces (testnet/netns.sh: the project's own test hosts on a
//! bridge, 10.77.0.0/24) find each other by mDNS alone, with no bootstrap.
//!
//! Needs root and `ip netns`; without them the test prints why and skips.

mod mesh_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_support::{netns_script, netns_skip_reason, wait_until, NetnsDown, BIN};

const HOSTS: usize = 3;

fn peers_in(dir: &Path, i: usize) -> Vec<serde_json::Value> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("sp-ns{i}"),
            BIN,
            "peers",
            "--json",
            "--data-dir",
        ])
        .arg(dir.join(format!("n{i}")))
        .output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[test]
fn nodes_in_namespaces_find_each_other_by_mdns() {
    if let Some(why) = netns_skip_reason() {
        eprintln!("SKIPPED nodes_in_namespaces_find_each_other_by_mdns: {why}");
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
        .env_remove("NETNS_BOOTSTRAP")
        .output()
        .expect("run netns.sh");
    assert!(
        up.status.success(),
        "netns.sh up failed:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let start = Instant::now();
    let all_alive = |i: usize| {
        peers_in(&dir, i)
            .iter()
            .filter(|m| m["state"] == "alive")
            .count()
            == HOSTS
    };
    let ok = wait_until(Duration::from_secs(60), || (1..=HOSTS).all(all_alive));
    let logs: String = (1..=HOSTS)
        .map(|i| std::fs::read_to_string(dir.join(format!("n{i}.log"))).unwrap_or_default())
        .collect();
    assert!(
        ok,
        "no full view by mDNS; host 1 sees {:?}\nlogs:\n{logs}",
        peers_in(&dir, 1)
    );
    eprintln!(
        "{HOSTS} namespaced nodes found each other by mDNS in {:?}",
        start.elapsed()
    );
    // Regions from the script's round robin, as labels.
    let rows = peers_in(&dir, 1);
    let regions: Vec<&str> = rows
        .iter()
        .map(|m| m["labels"]["region"].as_str().unwrap_or(""))
        .collect();
    for r in ["us", "eu", "ap"] {
        assert!(regions.contains(&r), "no {r} host in {regions:?}");
    }

    // Partition host 3 (its cable pulled): the others mark it lost, then it comes back.
    let id3 = peers_in(&dir, 3)
        .iter()
        .find(|m| m["self"] == true)
        .map(|m| m["id"].clone())
        .expect("host 3 lists itself");
    let state_of_3 = |i: usize| {
        peers_in(&dir, i)
            .iter()
            .find(|m| m["id"] == id3)
            .map(|m| m["state"].as_str().unwrap_or("").to_string())
    };
    let cut = Command::new("ip")
        .args(["link", "set", "sp-veth3", "down"])
        .status()
        .unwrap();
    assert!(cut.success());
    let cut_at = Instant::now();
    let lost = wait_until(Duration::from_secs(30), || {
        (1..=2).all(|i| state_of_3(i).as_deref() == Some("lost"))
    });
    assert!(
        lost,
        "partitioned host 3 not marked lost; host 1 sees {:?}",
        peers_in(&dir, 1)
    );
    eprintln!("partitioned host marked lost after {:?}", cut_at.elapsed());
    let heal = Command::new("ip")
        .args(["link", "set", "sp-veth3", "up"])
        .status()
        .unwrap();
    assert!(heal.success());
    let healed_at = Instant::now();
    let back = wait_until(Duration::from_secs(90), || (1..=HOSTS).all(all_alive));
    assert!(
        back,
        "host 3 did not rejoin; host 1 sees {:?}",
        peers_in(&dir, 1)
    );
    eprintln!("healed host rejoined after {:?}", healed_at.elapsed());
}
