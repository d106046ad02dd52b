//! Snapshot aggregation in a tree (docs/protocol.md §10) across real node processes
//! on 127.0.0.1 against a real stampede-target: seven nodes at fan-in 2 (four groups,
//! so members → group aggregators → root → everyone), the merged totals equal the
//! target's own count, and the report's per-member section (fetched from each member
//! at the end) holds every member with its own exact totals, by label too, and
//! node- and label-filtered thresholds read it; with a group's aggregator killed (-9)
//! mid-run the totals stay exact but for the lost member's unreported seconds, which
//! are named, and so is its missing per-member part. Nine nodes without
//! `STAMPEDE_FAN_IN` aggregate in a tree of fan-in 32 by default, with a complete
//! report.

mod mesh_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_support::{
    all_see, finish, kinds, rate_plan, show, start_run, summary, target, wait_until, Mesh, Node,
    BIN,
};
use serde_json::Value;
use stampede_protocol::machine::tree::Tree;
use stampede_protocol::run::RosterEntry;

const NODES: usize = 7;
/// One worker each, and tree aggregation at fan-in 2 (the origin's choice reaches
/// every member with the roster).
const ENV: &[(&str, &str)] = &[("STAMPEDE_CAPACITY", "1"), ("STAMPEDE_FAN_IN", "2")];

/// The label of node `n{i}`: n1–n3 in region eu, the others in us.
fn region(i: usize) -> &'static str {
    if i <= 3 {
        "eu"
    } else {
        "us"
    }
}

fn nodes(mesh: &Mesh) -> Vec<Node> {
    nodes_with(mesh, NODES, ENV)
}

/// `count` nodes n1..n{count}, labelled by [`region`], with this environment.
fn nodes_with(mesh: &Mesh, count: usize, env: &[(&str, &str)]) -> Vec<Node> {
    let l1 = format!("region={}", region(1));
    let n1 = mesh.node("n1", &["--label", &l1], env);
    let a1 = n1.addr();
    let mut all = vec![n1];
    for i in 2..=count {
        let l = format!("region={}", region(i));
        all.push(mesh.node(
            &format!("n{i}"),
            &["--bootstrap", a1.as_str(), "--label", &l],
            env,
        ));
    }
    let ids: Vec<String> = all.iter().map(|n| n.peer_id()).collect();
    let refs: Vec<&Node> = all.iter().collect();
    assert!(
        wait_until(Duration::from_secs(60), || all_see(&refs, &ids)),
        "the mesh did not form"
    );
    all
}

/// The rate plan with thresholds that read the per-member section: one node's
/// requests, one region's, and the whole run's.
fn plan_with_thresholds(dir: &Path, url: &str, rate: u32, duration: &str) -> PathBuf {
    let p = rate_plan(dir, url, rate, duration);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str(
        r#"
[thresholds]
"http_reqs{node=n2}" = ["count >= 1"]
"http_reqs{region=eu}" = ["count >= 1"]
"http_reqs" = ["count >= 1"]
"#,
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// A threshold's measured value, by its metric as written.
fn threshold(s: &Value, metric: &str) -> f64 {
    s["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["metric"] == metric)
        .unwrap_or_else(|| panic!("no threshold {metric}: {}", s["thresholds"]))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_run_aggregated_in_two_levels_counts_exactly_in_total_and_per_member() {
    let mesh = Mesh::new();
    let nodes = nodes(&mesh);
    let t = target();
    let plan = plan_with_thresholds(mesh.tmp.path(), &t.url(), 70, "6s");
    let json = mesh.tmp.path().join("summary.json");
    let out = finish(start_run(&nodes[0], &plan, &json));
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);
    let total = s["totals"]["requests"].as_u64().unwrap();
    assert_eq!(total, t.requests(), "{}", show(&out));
    // Every planned arrival is accounted for: run, or dropped late by a node starved
    // of CPU (seven nodes and the target share two cores).
    let ran = s["totals"]["iterations"].as_u64().unwrap();
    let dropped = s["totals"]["dropped_iterations"].as_u64().unwrap();
    assert_eq!(ran + dropped, 420, "ran {ran}, dropped {dropped}");
    assert_eq!(s["totals"]["failed"], 0);
    let k = kinds(&s);
    assert!(!k.iter().any(|k| k == "snapshots_missing"), "events {k:?}");
    assert!(
        !k.iter().any(|k| k == "node_totals_missing"),
        "events {k:?}"
    );
    // Every second of the run is in the merged timeline.
    assert!(s["timeline"].as_array().unwrap().len() >= 6);

    // The per-member section: every member, each with its own figures, which add up
    // to the run's exactly (nothing was lost).
    let members = s["nodes"].as_array().unwrap();
    let mut names: Vec<&str> = members
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (1..=NODES).map(|i| format!("n{i}")).collect();
    assert_eq!(names, want, "nodes[] of the tree-mode report");
    let sum = |field: &str| -> u64 { members.iter().map(|n| n[field].as_u64().unwrap()).sum() };
    assert_eq!(
        sum("requests"),
        total,
        "members' requests add up to the run's"
    );
    assert_eq!(
        sum("iterations"),
        ran,
        "members' iterations add up to the run's"
    );
    let mut by_region = [0u64; 2];
    for n in members {
        let requests = n["requests"].as_u64().unwrap();
        assert!(requests > 0, "{} sent nothing: {n}", n["name"]);
        let i: usize = n["name"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(n["labels"]["region"], region(i));
        by_region[(region(i) == "us") as usize] += requests;
        // Its own timeline, at the report's resolution, holds exactly its requests.
        let points = n["timeline"].as_array().unwrap();
        assert!(!points.is_empty(), "{} has no timeline", n["name"]);
        let in_timeline: u64 = points.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
        assert_eq!(in_timeline, requests, "{}'s timeline", n["name"]);
        assert_eq!(n["status"], "completed");
    }
    assert_eq!(s["by_label"]["region"]["eu"]["requests"], by_region[0]);
    assert_eq!(s["by_label"]["region"]["us"]["requests"], by_region[1]);
    // Thresholds filtered by node or label read the members' own totals.
    let n2 = members.iter().find(|n| n["name"] == "n2").unwrap();
    assert_eq!(
        threshold(&s, "http_reqs{node=n2}"),
        n2["requests"].as_u64().unwrap() as f64
    );
    assert_eq!(threshold(&s, "http_reqs{region=eu}"), by_region[0] as f64);
    assert_eq!(threshold(&s, "http_reqs"), total as f64);
    assert!(s["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["passed"] == true));
}

/// The row of the running run in a node's `stampede status --json`.
fn running_row(node: &Node) -> Option<Value> {
    let status = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&node.dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["phase"] == "running")
}

/// Without `STAMPEDE_FAN_IN`, a run proposed to more than 8 nodes goes up a tree of
/// fan-in 32 (one level: every member to the root), and its report is complete: every
/// member's own totals, adding up to the target's count.
#[test]
fn a_run_of_nine_nodes_aggregates_in_a_tree_by_default_with_a_complete_report() {
    const COUNT: usize = 9;
    let mesh = Mesh::new();
    let nodes = nodes_with(&mesh, COUNT, &[("STAMPEDE_CAPACITY", "1")]);
    let t = target();
    let rate = 45u64;
    let plan = rate_plan(mesh.tmp.path(), &t.url(), rate as u32, "5s");
    let json = mesh.tmp.path().join("summary.json");
    let cli = start_run(&nodes[0], &plan, &json);
    assert!(
        wait_until(Duration::from_secs(60), || t.requests() >= rate),
        "the run did not get going"
    );
    let mut row = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            row = running_row(&nodes[0]);
            row.is_some()
        }),
        "no running run in `stampede status`"
    );
    let row = row.unwrap();
    assert_eq!(row["fan_in"], 32, "the default for {COUNT} nodes: {row}");
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);
    let total = s["totals"]["requests"].as_u64().unwrap();
    assert_eq!(total, t.requests(), "{}", show(&out));
    let k = kinds(&s);
    assert!(
        !k.iter().any(|k| k == "node_totals_missing"),
        "events {k:?}"
    );
    let members = s["nodes"].as_array().unwrap();
    assert_eq!(members.len(), COUNT, "nodes[] {}", s["nodes"]);
    let sum: u64 = members
        .iter()
        .map(|n| n["requests"].as_u64().unwrap())
        .sum();
    assert!(
        sum >= total,
        "members' sums {sum} < the run's {total}: {}",
        s["nodes"]
    );
    if !k.iter().any(|k| k == "snapshots_missing") {
        assert_eq!(sum, total, "members' requests add up to the run's");
    }
}

#[test]
fn a_killed_aggregator_is_replaced_and_the_totals_stay_exact_or_name_what_is_missing() {
    let mesh = Mesh::new();
    let mut nodes = nodes(&mesh);
    let t = target();
    let rate = 70u64;
    let plan = plan_with_thresholds(mesh.tmp.path(), &t.url(), rate as u32, "12s");
    let json = mesh.tmp.path().join("summary.json");
    let cli = start_run(&nodes[0], &plan, &json);
    assert!(
        wait_until(Duration::from_secs(60), || t.requests() >= 3 * rate),
        "the run did not get going"
    );
    // The run's tree, drawn as every node draws it: roster sorted by peer id.
    let row = running_row(&nodes[0]).expect("a running run in `stampede status`");
    assert_eq!(row["fan_in"], 2, "the origin's fan-in: {row}");
    let run_id = row["run_id"].as_str().unwrap().to_string();
    let mut ids: Vec<(String, usize)> = (0..NODES).map(|i| (nodes[i].peer_id(), i)).collect();
    ids.sort();
    let roster: Vec<RosterEntry> = ids
        .iter()
        .map(|(id, _)| RosterEntry {
            id: id.clone(),
            name: String::new(),
            labels: Default::default(),
            weight: 1,
        })
        .collect();
    let tree = Tree::new(&roster, &run_id, 2);
    assert_eq!(tree.groups(), 4);
    // The aggregator of a group other than the root's, that is neither the origin nor
    // n2 (the plan's `http_reqs{node=n2}` threshold would read a lost member's missing
    // totals: which aggregator is killed follows the run id, so it was n2 now and then).
    let origin_index = ids.iter().position(|(_, i)| *i == 0).unwrap();
    let n2_index = ids.iter().position(|(_, i)| *i == 1).unwrap();
    let victim_index = (1..tree.groups())
        .filter_map(|g| tree.candidates(g).next())
        .find(|&j| j != origin_index && j != n2_index)
        .expect("an aggregator that is neither the origin nor n2");
    let victim = ids[victim_index].1;
    eprintln!(
        "killing n{} (roster {victim_index}), an aggregator",
        victim + 1
    );
    nodes[victim].kill9();
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);
    let k = kinds(&s);
    assert!(k.iter().any(|k| k == "node_lost"), "events {k:?}");
    // The lost member's own part cannot be fetched: named, not silently absent; every
    // other member is in the per-member section.
    let victim_name = format!("n{}", victim + 1);
    let named: Vec<&Value> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "node_totals_missing")
        .collect();
    let listed: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    for i in 1..=NODES {
        let name = format!("n{i}");
        let is_named = named.iter().any(|e| e["node"] == name.as_str());
        assert_ne!(
            listed.contains(&name.as_str()),
            is_named,
            "{name}: in nodes[] {listed:?}, named missing {named:?}"
        );
        if name != victim_name {
            assert!(
                listed.contains(&name.as_str()),
                "{name} not in nodes[] {listed:?}"
            );
        }
    }
    let counted = t.requests();
    let reported = s["totals"]["requests"].as_u64().unwrap();
    eprintln!("target counted {counted}, the summary holds {reported}; events {k:?}");
    assert!(
        reported <= counted,
        "reported {reported} > counted {counted}"
    );
    if reported < counted {
        // Only the lost member's unreported seconds may be missing, and named.
        assert!(
            k.iter().any(|k| k == "snapshots_missing"),
            "{} requests missing and not named: {k:?}",
            counted - reported
        );
        assert!(
            counted - reported <= 2 * rate.div_ceil(NODES as u64) + 5,
            "lost {} requests",
            counted - reported
        );
    }
}
