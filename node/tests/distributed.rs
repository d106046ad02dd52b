//! Distributed runs across real node processes on 127.0.0.1 against a real
//! stampede-target: a run started anywhere runs everywhere and counts exactly; it
//! survives `kill -9` of a member and of its leader; refusals reach the CLI by name;
//! two runs proposed at once do not corrupt each other.

mod mesh_support;

use std::process::Command;
use std::time::{Duration, Instant};

use mesh_support::{
    all_see, finish, rate_plan, show, start_run, summary, target, wait_until, Mesh, Node, BIN,
};
use serde_json::Value;
use stampede_tools::TargetHandle;

/// Nodes with one worker each: three of them share this 2-core machine with the target.
const NODE_ENV: &[(&str, &str)] = &[("STAMPEDE_CAPACITY", "1")];

fn three_nodes(mesh: &Mesh, extra: [&[&str]; 3]) -> Vec<Node> {
    three_nodes_with(mesh, extra, NODE_ENV)
}

fn three_nodes_with(mesh: &Mesh, extra: [&[&str]; 3], env: &[(&str, &str)]) -> Vec<Node> {
    let n1 = mesh.node("n1", extra[0], env);
    let a1 = n1.addr();
    let mut e2 = vec!["--bootstrap", a1.as_str()];
    e2.extend_from_slice(extra[1]);
    let mut e3 = vec!["--bootstrap", a1.as_str()];
    e3.extend_from_slice(extra[2]);
    let n2 = mesh.node("n2", &e2, env);
    let n3 = mesh.node("n3", &e3, env);
    let ids = vec![n1.peer_id(), n2.peer_id(), n3.peer_id()];
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&[&n1, &n2, &n3], &ids)),
        "the mesh did not form"
    );
    vec![n1, n2, n3]
}

/// The target's requests per whole second, oldest first.
fn per_second(t: &TargetHandle) -> Vec<(u64, u64)> {
    serde_json::to_value(t.stats()).unwrap()["per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect()
}

fn unix_s_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_run_started_on_node_2_runs_on_all_three_and_counts_exactly() {
    let mesh = Mesh::new();
    let nodes = three_nodes(&mesh, [&[], &[], &[]]);
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 90, "6s");
    let json = mesh.tmp.path().join("summary.json");
    let out = finish(start_run(&nodes[1], &plan, &json));
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);
    assert_eq!(
        s["totals"]["requests"].as_u64().unwrap(),
        t.requests(),
        "{}",
        show(&out)
    );
    assert_eq!(s["totals"]["iterations"], 540);
    assert_eq!(s["totals"]["failed"], 0);
    let ns = s["nodes"].as_array().unwrap();
    assert_eq!(ns.len(), 3, "{}", s["nodes"]);
    // Equal capacities: each node's segment is a third of the 540 arrivals.
    for n in ns {
        let r = n["requests"].as_i64().unwrap();
        assert!((r - 180).abs() <= 1, "node {} ran {r} of 540", n["name"]);
        assert_eq!(n["status"], "completed");
    }
    let skew = s["start_skew_us"].as_u64().unwrap();
    eprintln!("start skew across 3 nodes: {skew} µs");
    assert!(skew < 100_000, "start skew {skew} µs");
    // Each node says how late it started and how far its clock was from the run clock
    // (the origin's);
    // the spread of the lateness is the start skew. On one machine every clock is the
    // same one, so (late - offset) is each node's start on that clock: its spread is the
    // true skew, offset-estimate error included.
    let late: Vec<i64> = ns
        .iter()
        .map(|n| n["start_late_us"].as_i64().unwrap())
        .collect();
    let offsets: Vec<i64> = ns
        .iter()
        .map(|n| n["clock_offset_us"].as_i64().unwrap())
        .collect();
    let spread = |v: &[i64]| v.iter().max().unwrap() - v.iter().min().unwrap();
    assert_eq!(spread(&late) as u64, skew, "late {late:?}");
    let on_one_clock: Vec<i64> = late.iter().zip(&offsets).map(|(l, o)| l - o).collect();
    eprintln!(
        "offsets {offsets:?} µs; true skew {} µs",
        spread(&on_one_clock)
    );
    assert!(spread(&on_one_clock) < 100_000, "{on_one_clock:?}");
    // The merged report has per-node timelines' worth of seconds and a per-label view.
    assert!(s["timeline"].as_array().unwrap().len() >= 6);
}

/// Kills one member mid-run and checks that the run completes, the load returns to
/// its planned rate within 3 s, the loss is recorded, the survivors ran every event
/// the takeover handed them, and nothing but the lost member's last unreported second
/// is missing from the totals.
fn survive_kill(kill_leader: bool) {
    survive_kill_with(kill_leader, NODE_ENV, 60);
}

fn survive_kill_with(kill_leader: bool, env: &[(&str, &str)], rate: u32) {
    let mesh = Mesh::new();
    let mut nodes = three_nodes_with(&mesh, [&[], &[], &[]], env);
    // The leader is the member with the lowest id. The CLI talks to the highest, which
    // leads neither before nor after the loss: it may hear the leader's reassignment
    // before its own membership notices the loss, and must still report the loss.
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|i| nodes[*i].peer_id());
    let leader = order[0];
    let victim = if kill_leader { leader } else { order[1] };
    let origin = order[2];
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), rate, "12s");
    let json = mesh.tmp.path().join("summary.json");
    let cli = start_run(&nodes[origin], &plan, &json);
    // Kill once the run has been going for about 4 s.
    let went = wait_until(Duration::from_secs(30), || t.requests() >= 4 * rate as u64);
    assert!(went, "the run did not get going");
    let killed_at = unix_s_f64();
    nodes[victim].kill9();
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);

    let events = s["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        s["nodes"].as_array().unwrap().len(),
        3,
        "a node was left out of the run: {}",
        show(&out)
    );
    assert!(kinds.contains(&"node_lost"), "events {kinds:?}");
    assert!(kinds.contains(&"reassigned"), "events {kinds:?}");
    if kill_leader {
        assert!(kinds.contains(&"leader_elected"), "events {kinds:?}");
    }
    let lost: Vec<&Value> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "lost")
        .collect();
    assert_eq!(lost.len(), 1, "{}", s["nodes"]);

    // The survivors ran every event but the lost member's third of those before the
    // takeover point (equal capacities: a third, give or take the striping's rest).
    let moved = events
        .iter()
        .find(|e| e["kind"] == "reassigned")
        .and_then(|e| e["moved"].as_str())
        .unwrap_or_default();
    let from_event: u64 = moved
        .split('#')
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no takeover point in {moved:?}"));
    let survivors: u64 = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "completed")
        .map(|n| n["requests"].as_u64().unwrap())
        .sum();
    let planned = rate as u64 * 12;
    let kept_by_lost = (from_event / 3)..=from_event.div_ceil(3);
    assert!(
        kept_by_lost.contains(&(planned - survivors.min(planned))),
        "survivors ran {survivors} of {planned} events; the takeover was from #{from_event}: {}",
        s["nodes"]
    );

    // The planned rate is back within 3 s of the kill (whole seconds at the target).
    let seconds = per_second(&t);
    let back: Vec<u64> = seconds
        .iter()
        // Whole seconds that start 3 s or more after the kill.
        .filter(|(sec, _)| *sec as f64 >= killed_at + 3.0 && (*sec as f64) < killed_at + 7.0)
        .map(|(_, n)| *n)
        .collect();
    eprintln!("target per second around the kill at {killed_at}: {seconds:?}");
    assert!(!back.is_empty());
    for n in &back {
        assert!(
            (*n as f64 - rate as f64).abs() <= rate as f64 * 0.15,
            "rate {n}/s after the kill: {back:?}"
        );
    }

    // Totals: the target's count minus at most the lost member's unreported last
    // second (its share is a third of the rate), plus the requests in flight.
    let counted = t.requests();
    let reported = s["totals"]["requests"].as_u64().unwrap();
    eprintln!("target counted {counted}, the summary holds {reported}");
    assert!(
        reported <= counted,
        "reported {reported} > counted {counted}"
    );
    assert!(
        counted - reported <= (rate as u64 / 3) * 2,
        "lost {} requests",
        counted - reported
    );
}

#[test]
fn a_run_survives_kill_9_of_a_member() {
    survive_kill(false);
}

#[test]
fn a_run_survives_kill_9_of_its_leader() {
    survive_kill(true);
}

/// Two workers per node and a higher rate, as the benchmark harness runs it: the
/// survivors deal the taken-over events over both their workers and VU pools.
#[test]
fn a_run_with_two_workers_per_node_gets_its_rate_back_after_kill_9_of_a_member() {
    survive_kill_with(false, &[("STAMPEDE_CAPACITY", "2")], 150);
}

#[test]
fn a_refusing_node_is_named_and_the_run_goes_on_or_refuses_as_a_whole() {
    let mesh = Mesh::new();
    // n1 and n2 allow the plan's target host, n3 does not.
    let allow: &[&str] = &["--allow-target", "shop.stampede-test.invalid"];
    let nodes = three_nodes(&mesh, [allow, allow, &[]]);
    let plan = mesh.tmp.path().join("refuse.toml");
    let text = r#"
name = "refusal"
[defaults]
base_url = "http://shop.stampede-test.invalid:8080"
timeout = "1s"
[scenarios.s]
executor = "per-vu-iterations"
vus = 1
iterations = 1
flow = "get"
[[flows.get.steps]]
name = "home"
request = { url = "/" }
"#;
    std::fs::write(&plan, text).unwrap();
    let json = mesh.tmp.path().join("summary.json");
    // Started from the refusing node itself: it sends no load but still follows the
    // run and reports the others' measurements to its CLI.
    let out = finish(start_run(&nodes[2], &plan, &json));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("n3"),
        "{}",
        show(&out)
    );
    assert!(err.contains("allowlist"), "{}", show(&out));
    // The run went on without n3 (its single request fails DNS: .invalid never
    // resolves, so no traffic leaves this machine).
    let s = summary(&json);
    let names: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"n3"), "{names:?}");

    // With `require_all`, the same refusal stops the run as a whole.
    std::fs::write(
        &plan,
        format!("{text}\n[requirements]\nrequire_all = true\n"),
    )
    .unwrap();
    let out = finish(start_run(
        &nodes[0],
        &plan,
        &mesh.tmp.path().join("none.json"),
    ));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requires all nodes") && err.contains("n3"),
        "{}",
        show(&out)
    );
}

#[test]
fn two_runs_proposed_at_once_do_not_corrupt_each_other() {
    let mesh = Mesh::new();
    let nodes = three_nodes(&mesh, [&[], &[], &[]]);
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 30, "3s");
    let (ja, jb) = (
        mesh.tmp.path().join("a.json"),
        mesh.tmp.path().join("b.json"),
    );
    let started = Instant::now();
    let a = start_run(&nodes[0], &plan, &ja);
    let b = start_run(&nodes[2], &plan, &jb);
    let (oa, ob) = (finish(a), finish(b));
    eprintln!("both ended after {:?}", started.elapsed());
    let mut total = 0;
    let mut completed = 0;
    for (o, j) in [(&oa, &ja), (&ob, &jb)] {
        if o.status.success() {
            completed += 1;
            let s = summary(j);
            // Each run ran its whole schedule on the nodes it got.
            assert_eq!(s["totals"]["iterations"], 90, "{}", show(o));
            total += s["totals"]["requests"].as_u64().unwrap();
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("busy"), "a refused run names why: {}", show(o));
        }
    }
    assert!(completed >= 1, "{}\n{}", show(&oa), show(&ob));
    // Nothing was counted twice or lost between the runs.
    assert_eq!(total, t.requests());
}

#[test]
fn stop_ends_a_run_on_every_node_and_still_reports() {
    let mesh = Mesh::new();
    let nodes = three_nodes(&mesh, [&[], &[], &[]]);
    let t = target();
    let plan = rate_plan(mesh.tmp.path(), &t.url(), 30, "60s");
    let json = mesh.tmp.path().join("summary.json");
    let started = Instant::now();
    let cli = start_run(&nodes[0], &plan, &json);
    assert!(
        wait_until(Duration::from_secs(30), || t.requests() >= 60),
        "the run did not get going"
    );
    // Any member can stop it: ask n3, which did not start it.
    let status = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&nodes[2].dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    let run_id = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["phase"] == "running")
        .and_then(|r| r["run_id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no running run in `stampede status`: {text}"));
    let stop = Command::new(BIN)
        .args(["stop", &run_id, "--data-dir"])
        .arg(&nodes[2].dir)
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", show(&stop));
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the run did not stop early"
    );
    let s = summary(&json);
    let kinds: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"stop"), "events {kinds:?}");
    assert_eq!(s["totals"]["requests"].as_u64().unwrap(), t.requests());
    assert!(s["totals"]["iterations"].as_u64().unwrap() < 1800);
}

/// A member paused past the failure timeout (SIGSTOP 20 s, then SIGCONT) — here the
/// leader of term 1 — must not send the load it held when it resumes: the survivors
/// fenced it and took its share over, and its lease lapsed. The target never sees
/// more than the plan in any second (10 % for the second boundaries), the merged
/// total is at most the schedule, and the paused node is named.
#[test]
fn a_member_paused_past_its_lease_sends_no_load_when_it_resumes() {
    let mesh = Mesh::new();
    let nodes = three_nodes(&mesh, [&[], &[], &[]]);
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|i| nodes[*i].peer_id());
    let (paused, origin) = (order[0], order[2]);
    let t = target();
    let rate = 60u32;
    let plan = rate_plan(mesh.tmp.path(), &t.url(), rate, "30s");
    let json = mesh.tmp.path().join("summary.json");
    let cli = start_run(&nodes[origin], &plan, &json);
    let went = wait_until(Duration::from_secs(30), || t.requests() >= 3 * rate as u64);
    assert!(went, "the run did not get going");
    let pid = nodes[paused].pid() as i32;
    // SAFETY: signals to a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(20));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);

    let seconds = per_second(&t);
    eprintln!("target per second: {seconds:?}");
    let limit = (rate as f64 * 1.1).ceil() as u64;
    for (sec, n) in &seconds {
        assert!(
            *n <= limit,
            "second {sec}: the target saw {n} requests, the plan is {rate}/s: {seconds:?}"
        );
    }
    let reported = s["totals"]["requests"].as_u64().unwrap();
    let planned = rate as u64 * 30;
    assert!(
        reported <= planned,
        "merged {reported} > the schedule's {planned}"
    );
    assert!(
        t.requests() <= planned,
        "the target saw {} > the schedule's {planned}",
        t.requests()
    );
    let paused_id = nodes[paused].peer_id();
    let entry = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == paused_id.as_str())
        .unwrap_or_else(|| panic!("the paused node is not in the report: {}", s["nodes"]));
    assert_ne!(
        entry["status"], "completed",
        "the paused node is not named: {entry}"
    );
    let named = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "node_lost" && e["id"] == paused_id.as_str());
    assert!(
        named,
        "no node_lost event names the paused node: {}",
        s["events"]
    );
}

/// A threshold with `abort_on_fail` in a mesh run is judged on the merged data: the
/// origin stops the run on every node soon after `delay_abort_eval`, the summary names
/// the threshold and the time, the CLI exits 99, and the report holds what the target
/// counted up to the stop.
#[test]
fn an_abort_on_fail_threshold_stops_a_mesh_run_on_every_node() {
    abort_on_fail_stops_a_mesh_run("http_req_failed");
}

/// The same with the threshold filtered by a node label: judged live on the labelled
/// node's own figures (it was judged on nothing, so it never stopped the run).
#[test]
fn an_abort_on_fail_threshold_filtered_by_label_stops_a_mesh_run() {
    abort_on_fail_stops_a_mesh_run("http_req_failed{region=eu}");
}

fn abort_on_fail_stops_a_mesh_run(metric: &str) {
    let mesh = Mesh::new();
    let nodes = three_nodes(&mesh, [&["--label", "region=eu"], &[], &[]]);
    let t = stampede_tools::spawn(stampede_tools::TargetConfig {
        threads: 1,
        error_rate: 0.5,
        ..Default::default()
    })
    .expect("start stampede-target");
    let plan = mesh.tmp.path().join("abort.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "mesh-abort"
[defaults]
base_url = "{}"
timeout = "2s"
[scenarios.s]
executor = "constant-arrival-rate"
rate = 60
duration = "60s"
max_vus = 30
flow = "f"
[[flows.f.steps]]
name = "product"
request = {{ url = "/products/7" }}
[thresholds]
"{metric}" = [{{ threshold = "rate < 10%", abort_on_fail = true, delay_abort_eval = "2s" }}]
"#,
            t.url()
        ),
    )
    .unwrap();
    let json = mesh.tmp.path().join("summary.json");
    let began = std::time::Instant::now();
    let out = finish(start_run(&nodes[1], &plan, &json));
    let took = began.elapsed();
    assert_eq!(out.status.code(), Some(99), "{}", show(&out));
    assert!(
        took < Duration::from_secs(40),
        "took {took:?}: {}",
        show(&out)
    );
    let s = summary(&json);
    let event = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "threshold_abort")
        .unwrap_or_else(|| panic!("no threshold_abort event: {}", s["events"]));
    let at = event["t"].as_f64().unwrap();
    assert!((2.0..8.0).contains(&at), "stopped at {at}: {event}");
    // Every node stopped: the target hears nothing more once the CLI is back.
    let after = t.requests();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(t.requests(), after, "load went on after the run ended");
    let reported = s["totals"]["requests"].as_u64().unwrap();
    assert!(
        reported < 60 * 20,
        "the run was not stopped early: {reported} requests"
    );
    assert_eq!(
        reported,
        t.requests(),
        "the report is not complete up to the stop"
    );
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3);
}

/// Counted executors hand a lost member's unclaimed work to the survivors: a
/// shared-iterations pool and per-vu-iterations both finish after `kill -9` of a
/// member, and nothing runs twice — the target never sees more than the plan.
#[test]
fn counted_work_of_a_killed_member_is_taken_over_and_never_run_twice() {
    let mesh = Mesh::new();
    let mut nodes = three_nodes(&mesh, [&[], &[], &[]]);
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|i| nodes[*i].peer_id());
    // Neither the leader nor the CLI's node.
    let (victim, origin) = (order[1], order[2]);
    let t = target();
    // 6 VUs, each about 10 iterations a second (100 ms think): ~10 s of work each.
    let (pool, vus, per_vu) = (540u64, 6u64, 90u64);
    let plan = mesh.tmp.path().join("counted.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "mesh-counted"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.pool]
executor = "shared-iterations"
vus = {vus}
iterations = {pool}
max_duration = "60s"
flow = "product"
[scenarios.each]
executor = "per-vu-iterations"
vus = {vus}
iterations = {per_vu}
max_duration = "60s"
flow = "search"
[[flows.product.steps]]
name = "product"
request = {{ url = "/products/5" }}
check = {{ status = 200 }}
think = "100ms"
[[flows.search.steps]]
name = "search"
request = {{ url = "/products?q=a" }}
check = {{ status = 200 }}
think = "100ms"
"#,
            url = t.url()
        ),
    )
    .unwrap();
    let json = mesh.tmp.path().join("summary.json");
    let cli = start_run(&nodes[origin], &plan, &json);
    let went = wait_until(Duration::from_secs(30), || t.requests() >= 200);
    assert!(went, "the run did not get going");
    nodes[victim].kill9();
    let out = finish(cli);
    assert!(out.status.success(), "{}", show(&out));
    let s = summary(&json);
    let kinds: Vec<&str> = (s["events"].as_array().unwrap().iter())
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"reassigned"), "events {kinds:?}");
    let moved = (s["events"].as_array().unwrap().iter())
        .find(|e| e["kind"] == "reassigned")
        .and_then(|e| e["moved"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(moved.contains("counted iterations beyond"), "{moved}");

    let stats = serde_json::to_value(t.stats()).unwrap();
    let got_pool = stats["endpoints"]["GET /products/{id}"].as_u64().unwrap();
    let got_each = stats["endpoints"]["GET /products"].as_u64().unwrap();
    eprintln!(
        "pool {got_pool}/{pool}, per-vu {got_each}/{}; {moved}",
        vus * per_vu
    );
    // At most once: never more than planned.
    assert!(got_pool <= pool, "pool ran {got_pool} of {pool}");
    assert!(got_each <= vus * per_vu, "per-vu ran {got_each}");
    // Taken over: only what the lost member had claimed but not started is missing —
    // about a second of its share (a third of 60 it/s per scenario) — plus what was
    // in flight when it died.
    assert!(got_pool + 40 >= pool, "pool ran only {got_pool} of {pool}");
    assert!(
        got_each + 2 * 20 + vus >= vus * per_vu,
        "per-vu ran only {got_each} of {}",
        vus * per_vu
    );
    // The report counts what the survivors and the lost member's reported seconds hold.
    let reported = s["totals"]["requests"].as_u64().unwrap();
    assert!(reported <= got_pool + got_each, "reported {reported}");
}
