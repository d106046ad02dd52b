//! Nodes that know each other by DNS name only, as the StatefulSet in deploy/kubernetes/
//! has them: each node runs with the ConfigMap's node.toml, the StatefulSet's
//! `STAMPEDE_BOOTSTRAP` (every pod's name, its own included) and nothing else to find
//! the others. Each runs in a private mount namespace (`unshare --mount`) where
//! /etc/hosts maps `stampede-N.stampede.loadtest.svc.cluster.local` to its own loopback
//! address 127.0.0.(11+N), standing in for the cluster DNS, and /etc/resolv.conf is a
//! pod's (search path, `ndots:5`) with a nameserver on loopback, so no name lookup
//! leaves the machine. The mounts live only as long as the node's process; nothing is
//! left behind on any path.
//!
//! Then a run with exact counts against stampede-target, and the StatefulSet's restart
//! case: a member killed and started again with the same data dir under the same name
//! at a new address rejoins as the same member and takes part in the next run, started
//! the way docs/kubernetes.md starts one from outside the cluster (control address and
//! token only, as through `kubectl port-forward`).
//!
//! Needs root and `unshare`; without them the test prints why and skips.

mod mesh_support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_support::{all_see, rate_plan, show, start_node, wait_until, Mesh, Node, BIN};
use serde_json::Value;
use stampede_tools::TargetConfig;

const NODES: usize = 3;
const NAMESPACE: &str = "loadtest";

/// The pod's DNS name under the headless Service.
fn pod_name(i: usize) -> String {
    format!("stampede-{i}.stampede.{NAMESPACE}.svc.cluster.local")
}

fn node_toml() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/node.toml")
}

/// Why this test cannot run here, or None when it can.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (a private mount namespace needs it)".into());
    }
    // The whole mechanism, once: a private mount namespace with a file bound over
    // /etc/hosts, which vanishes with the process.
    match Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind /etc/hosts /etc/hosts")
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`unshare --mount` with a bind mount over /etc/hosts failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`unshare` is unavailable: {e}")),
    }
}

/// One port free on every given loopback address, as every pod listens on the same
/// port. Held until the caller drops the listeners, just before the nodes bind.
fn common_port(ips: &[Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    for _ in 0..50 {
        let first = TcpListener::bind(SocketAddr::from((ips[0], 0))).expect("bind a port");
        let port = first.local_addr().unwrap().port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind(SocketAddr::from((*ip, port))))
            .collect();
        if let Ok(mut held) = rest {
            held.push(first);
            return (port, held);
        }
    }
    panic!("no port free on all of {ips:?} in 50 tries");
}

/// The hosts file a node sees: the headless Service's names of every pod.
fn write_hosts(path: &Path, ips: &[Ipv4Addr]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for (i, ip) in ips.iter().enumerate() {
        text.push_str(&format!("{ip} {}\n", pod_name(i)));
    }
    std::fs::write(path, text).expect("write hosts");
}

/// Starts pod `i` as the StatefulSet would, inside its own mount namespace with `hosts`
/// over /etc/hosts. `unshare` and `sh` exec the node, so the child's pid is the node's.
fn start_pod(mesh: &Mesh, i: usize, ip: Ipv4Addr, port: u16, hosts: &Path) -> Node {
    let name = format!("stampede-{i}");
    let dir = mesh.tmp.path().join(&name);
    std::fs::create_dir_all(&dir).expect("data dir");
    let log = mesh
        .tmp
        .path()
        .join(format!("{name}-{}.log", ip.octets()[3]));
    let bootstrap: Vec<String> = (0..NODES)
        .map(|j| format!("/dns4/{}/tcp/{port}", pod_name(j)))
        .collect();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#)
        .arg(hosts)
        .arg(mesh.tmp.path().join("resolv.conf"))
        .arg(BIN)
        .args(["node", "--config"])
        .arg(node_toml())
        // What differs from a pod: loopback addresses and this test's own paths.
        .args(["--listen", &format!("/ip4/{ip}/tcp/{port}")])
        .args(["--http", "127.0.0.1:0", "--allow-target", "loopback"])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--key-file")
        .arg(&mesh.key)
        .env("STAMPEDE_CONTROL", "127.0.0.1:0")
        .env("STAMPEDE_NAME", &name)
        .env("STAMPEDE_LABELS", format!("region=r{i},zone=z{i}"))
        .env("STAMPEDE_BOOTSTRAP", bootstrap.join(","))
        .env("STAMPEDE_CAPACITY", "1")
        // node.toml turns mDNS off already; said again so that no edit of that file
        // can make this test multicast on the machine's interfaces.
        .env("STAMPEDE_MDNS", "false")
        .env("STAMPEDE_LOG", "info,stampede=debug");
    start_node(&name, dir, log, cmd)
}

/// How the CLI reaches the node, as docs/kubernetes.md starts runs.
enum Via {
    /// Inside the pod (`kubectl exec`): the node's data dir.
    DataDir,
    /// Outside the cluster through `kubectl port-forward` of the control port: only the
    /// control address and the token from the environment, no data dir.
    ControlAddr,
}

/// `stampede run --mesh` through `node`; the summary as written to `json`.
fn run(node: &Node, via: Via, plan: &Path, json: &Path) -> Value {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--mesh", "--quiet"]);
    match via {
        Via::DataDir => {
            cmd.arg("--data-dir").arg(&node.dir);
        }
        Via::ControlAddr => {
            let control = node.control().expect("node is up");
            cmd.args(["--node", control["addr"].as_str().expect("control address")])
                .env(
                    "STAMPEDE_CONTROL_TOKEN",
                    control["token"].as_str().expect("token"),
                )
                .env("STAMPEDE_DATA_DIR", json.with_extension("no-data-dir"));
        }
    }
    let out = cmd
        .arg(plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run stampede");
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_str(&std::fs::read_to_string(json).expect("summary written"))
        .expect("summary is JSON")
}

/// Checks a 3-node run of `iterations` single-request iterations: exact, no failure,
/// every node completed its share.
fn assert_exact(s: &Value, iterations: u64, target_requests: u64) {
    assert_eq!(s["totals"]["iterations"], iterations, "{}", s["totals"]);
    assert_eq!(s["totals"]["requests"], iterations, "{}", s["totals"]);
    assert_eq!(s["totals"]["failed"], 0, "{}", s["totals"]);
    assert_eq!(target_requests, iterations, "requests the target counted");
    let nodes = s["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), NODES, "{}", s["nodes"]);
    for n in nodes {
        assert_eq!(n["status"], "completed", "{n}");
    }
}

#[test]
fn nodes_bootstrap_by_dns_name_only_and_run_exactly() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED nodes_bootstrap_by_dns_name_only_and_run_exactly: {why}");
        return;
    }
    let mesh = Mesh::new();
    let tmp = mesh.tmp.path();
    // A pod's resolv.conf, with the nameserver on loopback where nothing answers: a
    // name missing from the hosts file fails here instead of reaching a real server.
    std::fs::write(
        tmp.join("resolv.conf"),
        format!(
            "search {NAMESPACE}.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 127.0.0.1\noptions ndots:5\n"
        ),
    )
    .unwrap();
    let mut ips: Vec<Ipv4Addr> = (0..NODES)
        .map(|i| Ipv4Addr::new(127, 0, 0, 11 + i as u8))
        .collect();
    // The restarted pod's new address must be free on the same port too.
    let new_ip = Ipv4Addr::new(127, 0, 0, 22);
    let (port, held) = common_port(&[ips[0], ips[1], ips[2], new_ip]);
    let hosts = tmp.join("hosts");
    write_hosts(&hosts, &ips);
    drop(held);

    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| start_pod(&mesh, i, ips[i], port, &hosts))
        .collect();
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id()).collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&refs, &ids)),
        "the mesh did not form by DNS names; node 0 sees {:?}",
        nodes[0].peers()
    );
    // Each node reached the others at the addresses the names resolve to.
    for n in &nodes {
        for m in n.peers().unwrap_or_default() {
            let addrs = m["addrs"].to_string();
            assert!(
                ips.iter()
                    .any(|ip| addrs.contains(&format!("/ip4/{ip}/tcp/{port}"))),
                "{} lists {} at {addrs}",
                n.name,
                m["name"]
            );
        }
    }

    let target = stampede_tools::spawn(TargetConfig::default()).expect("start stampede-target");
    let plan = rate_plan(tmp, &target.url(), 60, "3s");
    let s = run(&nodes[2], Via::DataDir, &plan, &tmp.join("first.json"));
    assert_exact(&s, 180, target.requests());

    // Pod stampede-1 is rescheduled: same data dir (its volume), same name, new address.
    nodes[1].kill9();
    ips[1] = new_ip;
    let hosts2 = tmp.join("hosts-after-restart");
    write_hosts(&hosts2, &ips);
    nodes[1] = start_pod(&mesh, 1, new_ip, port, &hosts2);
    assert_eq!(
        nodes[1].peer_id(),
        ids[1],
        "the data dir keeps the identity"
    );
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&refs, &ids)),
        "the restarted pod did not rejoin; node 0 sees {:?}",
        nodes[0].peers()
    );
    let before = target.requests();
    let s = run(&nodes[0], Via::ControlAddr, &plan, &tmp.join("second.json"));
    assert_exact(&s, 180, target.requests() - before);
}
