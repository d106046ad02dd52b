//! Where load may go (issue 12 item 10, issue 16 point 1): a long-running node sends
//! load to its own loopback only when its operator says `--allow-target loopback`, and
//! a target no allowlist entry can match is refused before any DNS query, by name.

mod mesh_support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mesh_support::{wait_until, BIN};

/// A `stampede node` started here with exactly the flags given (no implied
/// `--allow-target`); killed and reaped on drop.
struct BareNode(Child);

impl Drop for BareNode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bare_node(dir: &Path, extra: &[&str]) -> BareNode {
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let child = Command::new(BIN)
        .args(["node", "--name", "solo", "--insecure-no-key"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("STAMPEDE_MDNS", "false")
        .env_remove("STAMPEDE_ALLOW_TARGET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start node");
    let pid = child.id() as u64;
    let node = BareNode(child);
    let up = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(dir.join("control.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["pid"].as_u64() == Some(pid))
    });
    assert!(
        up,
        "node did not come up: {}",
        std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
    );
    node
}

fn plan(dir: &Path, base_url: &str) -> std::path::PathBuf {
    let p = dir.join("plan.toml");
    std::fs::write(
        &p,
        format!(
            r#"
name = "allow"
[defaults]
base_url = "{base_url}"
timeout = "1s"
[scenarios.s]
executor = "per-vu-iterations"
vus = 1
iterations = 1
flow = "get"
[[flows.get.steps]]
name = "home"
request = {{ url = "/" }}
"#
        ),
    )
    .unwrap();
    p
}

fn run_mesh(node_dir: &Path, plan: &Path) -> Output {
    Command::new(BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir"])
        .arg(node_dir)
        .arg(plan)
        .output()
        .expect("run stampede")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_node_allows_loopback_only_when_its_operator_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    // A closed port: the plan is only ever refused or fails to connect, on loopback.
    let p = plan(tmp.path(), "http://127.0.0.1:9");

    let without = tmp.path().join("without");
    std::fs::create_dir_all(&without).unwrap();
    let node = bare_node(&without, &[]);
    let out = run_mesh(&without, &p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        err.contains("target 127.0.0.1 is not in this node's allowlist")
            && err.contains("--allow-target 127.0.0.1"),
        "{}",
        show(&out)
    );
    drop(node);

    let with = tmp.path().join("with");
    std::fs::create_dir_all(&with).unwrap();
    let _node = bare_node(&with, &["--allow-target", "loopback"]);
    let out = run_mesh(&with, &p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("allowlist"), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("home"), "the run ran: {}", show(&out));
}

#[test]
fn an_embedded_run_refuses_an_unallowed_host_before_resolving_it() {
    let tmp = tempfile::tempdir().unwrap();
    // `.invalid` never resolves (RFC 6761): if a query were made it would fail as DNS,
    // not be refused by name, and no traffic leaves the machine either way.
    let p = plan(tmp.path(), "http://shop.stampede-test.invalid");
    let out = Command::new(BIN)
        .args(["run", "--quiet"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "target shop.stampede-test.invalid is not in this node's allowlist (loopback)"
        ) && err.contains("not resolved")
            && err.contains("--allow-target shop.stampede-test.invalid"),
        "{}",
        show(&out)
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // Embedded runs still allow loopback by default.
    let p = plan(tmp.path(), "http://127.0.0.1:9");
    let out = Command::new(BIN)
        .args(["run", "--quiet"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("allowlist"),
        "{}",
        show(&out)
    );
}
