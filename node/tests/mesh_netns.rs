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

/// Whether host `i` sees every host (itself included) as alive.
fn sees_all_alive(dir: &Path, i: usize) -> bool {
    peers_in(dir, i)
        .iter()
        .filter(|m| m["state"] == "alive")
        .count()
        == HOSTS
}

/// Starts the namespaced nodes and waits until every one sees all as alive; on failure,
/// says what each saw, with their logs and the namespaces' interfaces.
fn bring_up(dir: &Path) -> Result<(), String> {
    let up = Command::new("bash")
        .arg(netns_script())
        .args(["up", &HOSTS.to_string()])
        .env("STAMPEDE_TESTNET_DIR", dir)
        .env("STAMPEDE_BIN", BIN)
        .env_remove("NETNS_BOOTSTRAP")
        .output()
        .expect("run netns.sh");
    if !up.status.success() {
        return Err(format!(
            "netns.sh up failed:\n{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        ));
    }
    if wait_until(Duration::from_secs(60), || {
        (1..=HOSTS).all(|i| sees_all_alive(dir, i))
    }) {
        return Ok(());
    }
    let mut report = String::from("no full view by mDNS\n");
    for i in 1..=HOSTS {
        let names: Vec<String> = peers_in(dir, i)
            .iter()
            .map(|m| format!("{}={}", m["name"], m["state"]))
            .collect();
        let links = Command::new("ip")
            .args(["-n", &format!("sp-ns{i}"), "-br", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let log = std::fs::read_to_string(dir.join(format!("n{i}.log"))).unwrap_or_default();
        report.push_str(&format!(
            "host {i} sees {names:?}\ninterfaces:\n{links}log:\n{log}\n"
        ));
    }
    let bridge = Command::new("bridge")
        .args(["link"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    report.push_str(&format!("bridge ports:\n{bridge}"));
    Err(report)
}

#[test]
fn nodes_in_namespaces_find_each_other_by_mdns() {
    if let Some(why) = netns_skip_reason() {
        eprintln!("SKIPPED nodes_in_namespaces_find_each_other_by_mdns: {why}");
        return;
    }
    // Multicast over a virtual bridge has failed once in many CI runs with one node
    // neither heard nor hearing for a minute, while the other two found each other at
    // once; it never reproduced. One more attempt on fresh namespaces, after printing
    // what the first saw, keeps that from failing the suite, and a second failure in a
    // row still does.
    let mut attempt = 1;
    let (_tmp, dir, _down, start) = loop {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let down = NetnsDown(dir.clone());
        let start = Instant::now();
        match bring_up(&dir) {
            Ok(()) => break (tmp, dir, down, start),
            Err(why) if attempt == 1 => {
                eprintln!("attempt 1 failed, trying once more on fresh namespaces:\n{why}");
                drop(down);
                attempt += 1;
            }
            Err(why) => panic!("{why}"),
        }
    };
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
    let back = wait_until(Duration::from_secs(90), || {
        (1..=HOSTS).all(|i| sees_all_alive(&dir, i))
    });
    assert!(
        back,
        "host 3 did not rejoin; host 1 sees {:?}",
        peers_in(&dir, 1)
    );
    eprintln!("healed host rejoined after {:?}", healed_at.elapsed());
}
