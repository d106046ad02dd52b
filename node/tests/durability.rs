//! No result is lost (issue 11, item 7): real node processes on 127.0.0.1 against a
//! real stampede-target. A run whose CLI is killed mid-run is still reported, saved in
//! the origin's data dir, listed by `stampede status` after the origin restarts, and
//! recovered by `stampede report`; a node that did not build a report fetches it from
//! the mesh; a run no node has is one clear sentence and its own exit code.

mod mesh_support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mesh_support::{all_see, rate_plan, show, wait_until, Mesh, Node, BIN};
use serde_json::Value;
use stampede_tools::{TargetConfig, TargetHandle};

/// Nodes with one worker each: they share this 2-core machine with the target.
const NODE_ENV: &[(&str, &str)] = &[("STAMPEDE_CAPACITY", "1")];

fn two_nodes(mesh: &Mesh) -> (Node, Node) {
    let n1 = mesh.node("n1", &[], NODE_ENV);
    let a1 = n1.addr();
    let n2 = mesh.node("n2", &["--bootstrap", a1.as_str()], NODE_ENV);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&[&n1, &n2], &ids)),
        "the mesh did not form"
    );
    (n1, n2)
}

fn target() -> TargetHandle {
    stampede_tools::spawn(TargetConfig::default()).expect("start stampede-target")
}

fn stampede(args: &[&str], dir_flag: (&str, &str)) -> Output {
    Command::new(BIN)
        .args(args)
        .args([dir_flag.0, dir_flag.1])
        .stdin(Stdio::null())
        .output()
        .expect("run stampede")
}

/// `stampede status --json` of a node: one object per run.
fn status(node: &Node) -> Vec<Value> {
    let out = stampede(&["status", "--json"], ("--data-dir", path(&node.dir)));
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Starts `stampede run --mesh` on `origin` and returns once the target has seen more
/// than `requests`.
fn run_until_load(origin: &Node, plan: &Path, t: &TargetHandle, requests: u64) -> Child {
    let cli = Command::new(BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir", path(&origin.dir)])
        .arg(plan)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run stampede");
    assert!(
        wait_until(Duration::from_secs(30), || t.requests() > requests),
        "the run did not start"
    );
    cli
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("file written")).expect("JSON")
}

#[test]
fn a_run_whose_cli_was_killed_is_saved_listed_after_a_restart_and_reported() {
    let mesh = Mesh::new();
    let (n1, n2) = two_nodes(&mesh);
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 20, "4s");
    // The CLI goes away once the load is flowing.
    let mut cli = run_until_load(&n1, &plan, &t, 0);
    cli.kill().expect("kill the CLI");
    let _ = cli.wait();
    let mut run_id = String::new();
    let saved = wait_until(Duration::from_secs(60), || {
        status(&n1).iter().any(|r| {
            run_id = r["run_id"].as_str().unwrap_or("").to_string();
            r["saved"] == true
        })
    });
    assert!(saved, "the origin did not save the run: {:?}", status(&n1));
    let file = n1.dir.join("results").join(&run_id).join("summary.json");
    let on_disk = read_json(&file);
    assert_eq!(on_disk["totals"]["requests"].as_u64(), Some(t.requests()));
    assert_eq!(on_disk["totals"]["iterations"], 80);
    // Once the report is built, the origin's snapshot log of the run is gone.
    assert!(!n1.dir.join(format!("snapshots/{run_id}.log")).exists());

    // The origin restarts: the run is still listed, and reported.
    let n2_addr = n2.addr();
    drop(n1);
    let n1 = mesh.node("n1", &["--bootstrap", n2_addr.as_str()], NODE_ENV);
    let listed = status(&n1);
    let row = listed
        .iter()
        .find(|r| r["run_id"] == run_id.as_str())
        .unwrap_or_else(|| panic!("status after a restart lacks {run_id}: {listed:?}"));
    assert_eq!(row["phase"], "done");
    assert_eq!(row["plan"], "mesh-rate");
    assert_eq!(row["requests"].as_u64(), Some(t.requests()));
    let table = stampede(&["status"], ("--data-dir", path(&n1.dir)));
    assert!(
        String::from_utf8_lossy(&table.stdout).contains(&run_id),
        "{}",
        show(&table)
    );

    let json = mesh.tmp.path().join("report.json");
    let csv = mesh.tmp.path().join("report.csv");
    let out = stampede(
        &[
            "report",
            &run_id,
            "--out",
            &format!("json={}", json.display()),
            "--out",
            &format!("csv={}", csv.display()),
        ],
        ("--data-dir", path(&n1.dir)),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(read_json(&json), on_disk);
    assert!(std::fs::read_to_string(&csv)
        .unwrap()
        .starts_with("t,requests"));
    // The same table as at a run's end.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&run_id), "{}", show(&out));

    // With no node running on the data dir, the report is read from it directly.
    drop(n1);
    let again = mesh.tmp.path().join("again.json");
    let out = stampede(
        &[
            "report",
            &run_id,
            "--out",
            &format!("json={}", again.display()),
        ],
        ("--data-dir", path(&mesh.tmp.path().join("n1"))),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(read_json(&again), on_disk);
}

#[test]
fn a_node_that_did_not_build_the_report_fetches_it_from_the_mesh() {
    let mesh = Mesh::new();
    let (n1, n2) = two_nodes(&mesh);
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 20, "4s");
    let ran = mesh.tmp.path().join("ran.json");
    let out = Command::new(BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir", path(&n1.dir)])
        .arg(&plan)
        .arg("--out")
        .arg(format!("json={}", ran.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run stampede");
    assert!(out.status.success(), "{}", show(&out));
    let ran = read_json(&ran);
    let run_id = ran["run_id"].as_str().unwrap().to_string();
    assert!(
        !n2.dir
            .join("runs")
            .join(&run_id)
            .join("summary.json")
            .exists(),
        "n2 did not build the report, so it must not have it"
    );

    let n2_control = n2.control().unwrap()["addr"].as_str().unwrap().to_string();
    let fetched = mesh.tmp.path().join("fetched.json");
    let out = stampede(
        &[
            "report",
            &run_id,
            "--out",
            &format!("json={}", fetched.display()),
        ],
        ("--node", &n2_control),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(read_json(&fetched), ran);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&n1.peer_id()),
        "{}",
        show(&out)
    );

    // A run no node has: one sentence and exit code 5, after asking the mesh.
    let out = stampede(&["report", "1-0000"], ("--node", &n2_control));
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no node has run 1-0000") && err.contains("1 alive member"),
        "{}",
        show(&out)
    );
    // Not a run id at all: a usage error before anything is asked.
    let out = stampede(&["report", "../../etc"], ("--node", &n2_control));
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a run id"),
        "{}",
        show(&out)
    );
}

#[test]
fn when_the_origin_dies_mid_run_the_leader_saves_the_report_and_any_node_finds_it() {
    let mesh = Mesh::new();
    let (mut n1, n2) = two_nodes(&mesh);
    let n3 = mesh.node("n3", &["--bootstrap", n2.addr().as_str()], NODE_ENV);
    let ids = vec![n1.peer_id(), n2.peer_id(), n3.peer_id()];
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&[&n1, &n2, &n3], &ids)),
        "the mesh did not form"
    );
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 30, "6s");
    let mut cli = run_until_load(&n1, &plan, &t, 30);
    let run_id = status(&n2)[0]["run_id"].as_str().unwrap().to_string();
    n1.kill9();
    let _ = cli.wait();

    // Ask the survivor that is not the leader: it finds the report on the one that is.
    let leader = ids[1..].iter().min().unwrap().clone();
    let asked = if leader == ids[1] { &n3 } else { &n2 };
    let control = asked.control().unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let json = mesh.tmp.path().join("recovered.json");
    let mut last = None;
    let found = wait_until(Duration::from_secs(90), || {
        let out = stampede(
            &[
                "report",
                &run_id,
                "--out",
                &format!("json={}", json.display()),
            ],
            ("--node", &control),
        );
        let ok = out.status.success();
        last = Some(out);
        ok
    });
    assert!(found, "{}", show(last.as_ref().unwrap()));
    let s = read_json(&json);
    let leader_dir = if leader == ids[1] { &n2.dir } else { &n3.dir };
    assert_eq!(
        read_json(
            &leader_dir
                .join("results")
                .join(&run_id)
                .join("summary.json")
        ),
        s
    );
    let requests = s["totals"]["requests"].as_u64().unwrap();
    assert!(
        requests > 0 && requests <= t.requests(),
        "{requests} of {}",
        t.requests()
    );
    let origin = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(origin["status"], "lost", "{}", s["nodes"]);
}
