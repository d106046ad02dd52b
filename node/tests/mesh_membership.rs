//! Real node processes on 127.0.0.1 forming a mesh: bootstrap, learning the whole mesh
//! through one peer, loss detection after kill -9, key isolation, and protocol
//! version mismatch.

mod mesh_support;

use std::time::{Duration, Instant};

use mesh_support::{all_see, wait_until, Mesh};

const FULL_VIEW_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn three_nodes_see_each_other_via_bootstrap() {
    let mesh = Mesh::new();
    let n1 = mesh.node(
        "n1",
        &["--label", "region=eu", "--allow-target", "10.0.0.0/8"],
        &[],
    );
    let start = Instant::now();
    let a1 = n1.addr();
    // n2 bootstraps with /p2p/ID, n3 by DNS name and without /p2p/ID.
    let port = a1.split('/').nth(4).unwrap().to_string();
    let by_name = format!("/dns4/localhost/tcp/{port}");
    let n2 = mesh.node("n2", &["--bootstrap", &a1, "--label", "region=us"], &[]);
    let n3 = mesh.node("n3", &["--bootstrap", &by_name], &[]);
    let ids = vec![n1.peer_id(), n2.peer_id(), n3.peer_id()];
    let ok = wait_until(FULL_VIEW_LIMIT, || all_see(&[&n1, &n2, &n3], &ids));
    assert!(
        ok,
        "no full view; n1 sees {:?}\nn3 log:\n{}",
        n1.peers(),
        n3.log_text()
    );
    eprintln!(
        "full view of 3 nodes after {:?} (from the first node's start)",
        start.elapsed()
    );

    // The JSON contract (spec §10) as n2 sees it.
    let rows = n2.peers().unwrap();
    assert_eq!(rows.len(), 3);
    let me: Vec<_> = rows.iter().filter(|r| r["self"] == true).collect();
    assert_eq!(me.len(), 1);
    assert_eq!(me[0]["id"], n2.peer_id());
    let r1 = rows.iter().find(|r| r["id"] == n1.peer_id()).unwrap();
    assert_eq!(r1["name"], "n1");
    assert_eq!(r1["labels"]["region"], "eu");
    assert_eq!(r1["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r1["state"], "alive");
    assert_eq!(
        r1["allow_targets"],
        serde_json::json!(["loopback", "10.0.0.0/8"])
    );

    // The table form names every member.
    let out = std::process::Command::new(mesh_support::BIN)
        .args(["peers", "--data-dir"])
        .arg(&n3.dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in ["n1", "n2", "n3 *"] {
        assert!(table.contains(name), "table lacks {name}:\n{table}");
    }

    // /metrics tells the mesh size.
    let http = n1.control().unwrap()["http"].as_str().unwrap().to_string();
    let body = http_get(&http, "/metrics");
    assert!(body.contains("stampede_mesh_size 3"), "{body}");
    assert!(http_get(&http, "/health").contains("\"ok\""));
    assert!(http_get(&http, "/").contains("stampede node"));
    // The startup log names the key's fingerprint, never the key.
    let key_hex = std::fs::read_to_string(&mesh.key)
        .unwrap()
        .lines()
        .nth(2)
        .unwrap()
        .to_string();
    let log = n1.log_text();
    assert!(log.contains("key_fingerprint"), "{log}");
    assert!(!log.contains(&key_hex));
}

#[test]
fn joining_node_learns_the_whole_mesh_from_one_peer() {
    let mesh = Mesh::new();
    let n1 = mesh.node("n1", &[], &[]);
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let n3 = mesh.node("n3", &["--bootstrap", &n2.addr()], &[]);
    let ids3 = vec![n1.peer_id(), n2.peer_id(), n3.peer_id()];
    assert!(
        wait_until(FULL_VIEW_LIMIT, || all_see(&[&n1, &n2, &n3], &ids3)),
        "first three did not converge"
    );
    // The newcomer knows only n3.
    let start = Instant::now();
    let n4 = mesh.node("n4", &["--bootstrap", &n3.addr()], &[]);
    let mut ids = ids3.clone();
    ids.push(n4.peer_id());
    let ok = wait_until(FULL_VIEW_LIMIT, || all_see(&[&n1, &n2, &n3, &n4], &ids));
    assert!(ok, "n4 sees {:?}", n4.peers());
    eprintln!(
        "joining node had the full view of 4 after {:?}",
        start.elapsed()
    );
    // It dialed the members it learned about: a direct connection to n1.
    let connected_to_n1 = wait_until(FULL_VIEW_LIMIT, || {
        n4.peers()
            .unwrap_or_default()
            .iter()
            .any(|r| r["id"] == n1.peer_id() && r["connected"] == true)
    });
    assert!(connected_to_n1, "n4 never connected to n1 directly");
}

#[test]
fn killed_node_is_marked_lost_within_five_seconds() {
    let mesh = Mesh::new();
    let n1 = mesh.node("n1", &[], &[]);
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let mut n3 = mesh.node("n3", &["--bootstrap", &n1.addr()], &[]);
    let victim = n3.peer_id();
    let ids = vec![n1.peer_id(), n2.peer_id(), victim.clone()];
    assert!(
        wait_until(FULL_VIEW_LIMIT, || all_see(&[&n1, &n2, &n3], &ids)),
        "did not converge"
    );
    let killed_at = Instant::now();
    n3.kill9();
    let mut lost_after = Vec::new();
    for n in [&n1, &n2] {
        let ok = wait_until(Duration::from_secs(10), || {
            n.state_of(&victim).as_deref() == Some("lost")
        });
        assert!(
            ok,
            "{} never marked the killed node lost: {:?}",
            n.name,
            n.peers()
        );
        lost_after.push(killed_at.elapsed());
    }
    eprintln!(
        "killed node marked lost by n1 after {:?}, by both after {:?}",
        lost_after[0], lost_after[1]
    );
    assert!(
        lost_after[1] <= Duration::from_secs(5),
        "took {:?}",
        lost_after[1]
    );
    // The survivors still see each other.
    assert_eq!(n1.state_of(&n2.peer_id()).as_deref(), Some("alive"));
}

#[test]
fn node_with_another_key_never_joins() {
    let mesh = Mesh::new();
    let other_key = mesh.tmp.path().join("other.key");
    mesh_support::write_key(&other_key);
    let n1 = mesh.node("n1", &[], &[]);
    // The outsider tries to join through n1 ...
    let outsider = mesh.node_with_key(
        "outsider",
        Some(&other_key),
        &["--bootstrap", &n1.addr()],
        &[],
    );
    // ... and n2 (with the right key) dials both the outsider and n1.
    let n2 = mesh.node(
        "n2",
        &["--bootstrap", &outsider.addr(), "--bootstrap", &n1.addr()],
        &[],
    );
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(
        wait_until(FULL_VIEW_LIMIT, || all_see(&[&n1, &n2], &ids)),
        "keyed nodes did not converge"
    );
    let bad = outsider.peer_id();
    // Watch for a few bootstrap retries of the outsider (every 2 s): it must never appear.
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..100 {
        for n in [&n1, &n2] {
            let rows = n.peers().unwrap_or_default();
            assert!(
                rows.iter().all(|r| r["id"] != bad),
                "{} lists the outsider: {rows:?}",
                n.name
            );
        }
        let seen = outsider.peers().unwrap_or_default();
        assert_eq!(seen.len(), 1, "the outsider sees members: {seen:?}");
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // The outsider's handshake never completes: n1 drops it when the upgrade times out.
    let refused = wait_until(Duration::from_secs(20), || {
        n1.log_text().contains("refused an incoming connection")
    });
    assert!(refused, "n1 never saw the outsider's attempt");
}

#[test]
fn other_protocol_version_is_shown_incompatible() {
    let mesh = Mesh::new();
    let n1 = mesh.node("n1", &[], &[]);
    let future = mesh.node(
        "future",
        &["--bootstrap", &n1.addr()],
        &[("STAMPEDE_TEST_PROTOCOL_VERSION", "99")],
    );
    let f = future.peer_id();
    let p1 = n1.peer_id();
    let ok = wait_until(FULL_VIEW_LIMIT, || {
        n1.state_of(&f).as_deref() == Some("incompatible")
            && future.state_of(&p1).as_deref() == Some("incompatible")
    });
    assert!(
        ok,
        "n1 sees {:?}; future sees {:?}",
        n1.peers(),
        future.peers()
    );
    // Its announcement still names it, so the operator knows who it is.
    let row = n1
        .peers()
        .unwrap()
        .into_iter()
        .find(|r| r["id"] == f)
        .unwrap();
    assert_eq!(row["protocol_version"], 99);
    assert_eq!(row["name"], "future");
    // It never counts as alive.
    assert!(!n1.alive_ids().contains(&f));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn cli_finds_its_node_by_data_dir_or_control_address() {
    let mesh = Mesh::new();
    let n = mesh.node_with_key("solo", None, &[], &[]);
    let ctl = n.control().unwrap();
    let addr = ctl["addr"].as_str().unwrap().to_string();
    assert!(
        n.log_text().contains("WITHOUT a mesh key"),
        "insecure mode is not loud"
    );
    let run = |args: &[&str]| {
        let o = std::process::Command::new(mesh_support::BIN)
            .args(args)
            .env_remove("STAMPEDE_CONTROL_TOKEN")
            .env("STAMPEDE_DATA_DIR", mesh.tmp.path().join("nowhere"))
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let dir = n.dir.to_str().unwrap();
    let (code, out, _) = run(&["status", "--data-dir", dir]);
    assert_eq!((code, out.trim()), (Some(0), "no runs yet"));
    let (code, _, err) = run(&["stop", "run-1", "--data-dir", dir]);
    assert_eq!(code, Some(3));
    assert!(err.contains("no such run: run-1"), "{err}");
    // By address: reading is open, changing needs the token.
    let (code, out, _) = run(&["peers", "--json", "--node", &addr]);
    assert_eq!(code, Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["self"], true);
    let (code, _, err) = run(&["stop", "run-1", "--node", &addr]);
    assert_eq!(code, Some(3));
    assert!(err.contains("control token"), "{err}");
    // No node there at all: one clear sentence.
    let (code, _, err) = run(&[
        "peers",
        "--data-dir",
        mesh.tmp.path().join("empty").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(3));
    assert!(err.contains("no node found"), "{err}");
    // Without a key and without --insecure-no-key the node refuses to start.
    let o = std::process::Command::new(mesh_support::BIN)
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(mesh.tmp.path().join("nokey"))
        .env_remove("STAMPEDE_KEY_FILE")
        .env_remove("STAMPEDE_INSECURE_NO_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no mesh key"));
}
