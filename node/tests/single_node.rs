//! End-to-end runs of the real `stampede` binary against a real stampede-target on
//! loopback: exact request accounting, open-model accuracy, no coordinated omission,
//! unique data, thresholds and plan errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use stampede_tools::{TargetConfig, TargetHandle};

fn stampede() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stampede"))
}

fn target(cfg: TargetConfig) -> TargetHandle {
    stampede_tools::spawn(TargetConfig { threads: 2, ..cfg }).expect("start stampede-target")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs `stampede run` and returns its output and the parsed JSON summary.
fn run(plan: &Path, extra: &[&str], dir: &Path) -> (Output, Option<Value>) {
    let json = dir.join("summary.json");
    let out = stampede()
        .arg("run")
        .arg(plan)
        .args(["--quiet", "--out"])
        .arg(format!("json={}", json.display()))
        .args(extra)
        .output()
        .expect("run stampede");
    let summary = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("summary is JSON"));
    (out, summary)
}

fn write_plan(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
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
fn retail_example_counts_every_request_exactly() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let base = format!("defaults.base_url=\"{}\"", t.url());
    let (out, s) = run(
        &examples().join("retail.toml"),
        &[
            "--set",
            &base,
            "--set",
            "scenarios.shoppers.stages=[{target=40,duration=\"2s\"},{target=40,duration=\"4s\"}]",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", show(&out));
    let s = s.expect("summary written");
    assert_eq!(
        s["totals"]["requests"].as_u64().unwrap(),
        t.requests(),
        "{}",
        show(&out)
    );
    // The ramp's area: 40/s × 2 s / 2 + 40/s × 4 s.
    assert_eq!(s["totals"]["iterations"], 200);
    assert_eq!(s["totals"]["failed"], 0, "{}", show(&out));
    for key in [
        "run_id",
        "plan",
        "started_at",
        "duration_s",
        "requests",
        "flows",
        "scenarios",
        "nodes",
        "by_label",
        "timeline",
        "thresholds",
        "events",
        "generator",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}");
    }
    for key in ["min", "mean", "p50", "p90", "p95", "p99", "p999", "max"] {
        assert!(
            s["totals"]["latency_us"][key].is_number(),
            "latency_us lacks {key}"
        );
    }
    let flows = s["flows"].as_object().unwrap();
    assert_eq!(flows.len(), 3);
    let browse = flows["browse"]["iterations"].as_u64().unwrap() as f64;
    assert!(
        (browse / 200.0 - 0.6).abs() < 0.15,
        "browse share {browse}/200"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("TOTAL") && stdout.contains("checkout"),
        "{}",
        show(&out)
    );
}

#[test]
fn constant_arrival_rate_holds_its_rate() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "rate.toml",
        &format!(
            r#"
name = "rate"
[defaults]
base_url = "{}"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = 200
duration = "20s"
max_vus = 200
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/7" }}
check = {{ status = 200 }}
"#,
            t.url()
        ),
    );
    let started = Instant::now();
    let (out, s) = run(&plan, &[], dir.path());
    assert!(out.status.success(), "{}", show(&out));
    let s = s.unwrap();
    let sent = t.requests();
    assert_eq!(s["totals"]["requests"].as_u64().unwrap(), sent);
    assert_eq!(s["totals"]["dropped_iterations"], 0, "{}", show(&out));
    // 200/s for 20 s is 4000 iterations: within 1 % (the schedule makes it exact).
    let its = s["totals"]["iterations"].as_u64().unwrap() as f64;
    assert!((its - 4000.0).abs() <= 40.0, "iterations {its}");
    // The target saw the rate too: its busiest full seconds stay near 200/s.
    let stats = t.stats();
    let per_second: Vec<u64> = serde_json::to_value(&stats).unwrap()["per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap())
        .filter(|n| *n > 0)
        .collect();
    let inner = &per_second[1..per_second.len().saturating_sub(1)];
    let mean = inner.iter().sum::<u64>() as f64 / inner.len() as f64;
    eprintln!(
        "achieved {its} iterations in {:?}; target saw {mean:.1}/s over {} full seconds",
        started.elapsed(),
        inner.len()
    );
    assert!(
        (mean - 200.0).abs() / 200.0 < 0.05,
        "mean rate seen by the target {mean}"
    );
}

/// Runs `plan` while the target stalls each request by 1 s from its `from`th request to
/// its `until`th; the JSON summary.
fn run_through_a_stall(t: &TargetHandle, plan: &Path, dir: &Path, from: u64, until: u64) -> Value {
    let json = dir.join("summary.json");
    let mut child = stampede()
        .arg("run")
        .arg(plan)
        .args(["--quiet", "--out"])
        .arg(format!("json={}", json.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while t.requests() < from && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    t.set_stall(Duration::from_secs(1));
    while t.requests() < until && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    t.set_stall(Duration::ZERO);
    assert!(child.wait().unwrap().success());
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn a_stalled_target_shows_in_latency_no_coordinated_omission() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "stall.toml",
        &format!(
            r#"
name = "stall"
[defaults]
base_url = "{}"
[scenarios.open]
executor = "constant-arrival-rate"
rate = 100
duration = "6s"
max_vus = 400
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/1" }}
"#,
            t.url()
        ),
    );
    // Stall the target for the run's middle third: from its 150th request to its 350th.
    let s = run_through_a_stall(&t, &plan, dir.path(), 150, 350);
    // The open model kept sending through the stall: every planned iteration went out.
    assert_eq!(s["totals"]["iterations"], 600);
    assert_eq!(s["totals"]["dropped_iterations"], 0);
    assert_eq!(s["totals"]["requests"].as_u64().unwrap(), t.requests());
    // About a third of the requests waited for the stall; latency from the intended
    // time shows it (a closed-model tool would have sent only a handful during it).
    let lat = &s["totals"]["latency_us"];
    assert!(lat["p90"].as_u64().unwrap() >= 900_000, "p90 {lat}");
    assert!(lat["p50"].as_u64().unwrap() < 500_000, "p50 {lat}");
}

#[test]
fn unique_accounts_never_collide_and_shared_ones_do() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accounts.csv"), {
        let mut s = String::from("user,password\n");
        for i in 1..=300 {
            s.push_str(&format!("user{i},pass{i}\n"));
        }
        s
    })
    .unwrap();
    let plan_for = |mode: &str, vus: u32| {
        format!(
            r#"
name = "accounts"
[defaults]
base_url = "{}"
[data.accounts]
file = "accounts.csv"
mode = "{mode}"
[scenarios.users]
executor = "constant-vus"
vus = {vus}
duration = "3s"
flow = "account"
[[flows.account.steps]]
name = "login"
request = {{ method = "POST", url = "/login", json = {{ user = "{{{{ accounts.user }}}}", password = "{{{{ accounts.password }}}}" }} }}
check = {{ status = 200 }}
extract = {{ token = {{ json = "$.token" }} }}
[[flows.account.steps]]
name = "account page"
request = {{ url = "/account", headers = {{ authorization = "Bearer {{{{ token }}}}" }} }}
check = {{ status = 200 }}
"#,
            t.url()
        )
    };
    let unique = write_plan(dir.path(), "unique.toml", &plan_for("unique", 100));
    let (out, s) = run(&unique, &[], dir.path());
    assert!(out.status.success(), "{}", show(&out));
    let s = s.unwrap();
    assert!(
        s["totals"]["requests"].as_u64().unwrap() > 200,
        "{}",
        show(&out)
    );
    assert_eq!(
        s["totals"]["failed"], 0,
        "unique accounts must never collide: {}",
        s["totals"]
    );
    let statuses = serde_json::to_value(t.stats()).unwrap()["statuses"].clone();
    assert!(
        statuses.get("409").is_none(),
        "target answered 409: {statuses}"
    );

    // The control: VUs drawing accounts at random from the same rows do collide, so
    // the check above can see a collision when there is one.
    let shared = write_plan(dir.path(), "random.toml", &plan_for("random", 100));
    std::fs::write(
        dir.path().join("accounts.csv"),
        "user,password\nuser1,pass1\nuser2,pass2\nuser3,pass3\n",
    )
    .unwrap();
    let (_, s) = run(&shared, &[], dir.path());
    let s = s.unwrap();
    assert!(
        s["totals"]["errors"]["http_4xx"].as_u64().unwrap_or(0) > 0,
        "expected 409s: {}",
        s["totals"]
    );
}

#[test]
fn a_failing_threshold_exits_99_and_writes_junit() {
    let t = target(TargetConfig {
        latency: "5ms".parse().unwrap(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "th.toml",
        &format!(
            r#"
name = "thresholds"
[defaults]
base_url = "{}"
[scenarios.s]
executor = "per-vu-iterations"
vus = 2
iterations = 10
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/3" }}
[thresholds]
"http_req_duration" = ["p(50) < 1"]
"http_req_failed" = ["rate < 1%"]
"#,
            t.url()
        ),
    );
    let junit = dir.path().join("junit.xml");
    let (out, s) = run(
        &plan,
        &["--out", &format!("junit={}", junit.display())],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(99), "{}", show(&out));
    let s = s.unwrap();
    assert_eq!(s["totals"]["iterations"], 20);
    let th = s["thresholds"].as_array().unwrap();
    assert_eq!(th.len(), 2);
    let dur = th
        .iter()
        .find(|x| x["metric"] == "http_req_duration")
        .unwrap();
    assert_eq!(dur["passed"], false);
    assert!(dur["value"].as_f64().unwrap() >= 5000.0);
    let failed = th
        .iter()
        .find(|x| x["metric"] == "http_req_failed")
        .unwrap();
    assert_eq!(failed["passed"], true);
    let xml = std::fs::read_to_string(junit).unwrap();
    assert!(
        xml.contains("<failure") && xml.contains("tests=\"2\" failures=\"1\""),
        "{xml}"
    );
}

/// Writes `text` as a plan and returns `stampede validate`'s exit code and stderr.
fn validate(dir: &Path, text: &str) -> (Option<i32>, String) {
    let p = write_plan(dir, "bad.toml", text);
    let out = stampede().arg("validate").arg(&p).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_plans_get_one_line_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"name = "ok"
[defaults]
base_url = "http://127.0.0.1:1"
[scenarios.s]
executor = "constant-vus"
vus = 1
duration = "1s"
flow = "f"
[[flows.f.steps]]
name = "home"
request = { url = "/?q={{ random_int(1, 9) }}" }
"#;
    let (code, err) = validate(dir.path(), good);
    assert_eq!(code, Some(0), "{err}");
    let cases: &[(&str, &str, &str)] = &[
        // (what to break, expected "file:line", expected field)
        ("[scenarios.s]", "[scenarios.s", "bad.toml:4"),
        (
            "executor = \"constant-vus\"",
            "executor = \"constant-vu\"",
            "bad.toml:5: scenarios.s.executor",
        ),
        ("vus = 1\n", "", "bad.toml:4: scenarios.s.vus"),
        (
            "duration = \"1s\"",
            "duration = \"1 sec\"",
            "bad.toml:7: scenarios.s.duration",
        ),
        (
            "random_int(1, 9)",
            "randint(1, 9)",
            "bad.toml:9: flows.f.steps[0].request.url",
        ),
    ];
    for (from, to, want) in cases {
        let text = good.replacen(from, to, 1);
        let (code, err) = validate(dir.path(), &text);
        assert_eq!(code, Some(2), "breaking {from:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line expected: {err}"
        );
        assert!(
            err.contains(want),
            "breaking {from:?}: expected {want:?} in {err:?}"
        );
        assert!(
            err.contains(&dir.path().display().to_string()),
            "names the file: {err}"
        );
    }
    // A missing file and a bad --out are usage errors too, before anything runs.
    let out = stampede()
        .args(["validate", "/nonexistent/plan.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let p = write_plan(dir.path(), "ok.toml", good);
    let out = stampede()
        .arg("run")
        .arg(&p)
        .args(["--out", "xml=x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown format \"xml\""));
}

#[test]
fn demo_runs_with_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let out = stampede()
        .args(["demo", "--duration", "5s", "--quiet", "--out"])
        .arg(format!("json={}", json.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(exact)"), "{}", show(&out));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert!(s["totals"]["requests"].as_u64().unwrap() > 100);
}

#[test]
fn max_vus_holds_for_the_node_not_per_worker() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "one_vu.toml",
        &format!(
            r#"
name = "one-vu"
[defaults]
base_url = "{}"
[scenarios.s]
executor = "constant-arrival-rate"
rate = 10
duration = "3s"
max_vus = 1
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/2" }}
"#,
            t.url()
        ),
    );
    // Two workers, one VU: the fast target frees the VU long before the next arrival,
    // so nothing may be dropped.
    let (out, s) = run(&plan, &["--workers", "2"], dir.path());
    assert!(out.status.success(), "{}", show(&out));
    let s = s.unwrap();
    assert_eq!(s["totals"]["dropped_iterations"], 0, "{}", s["totals"]);
    assert_eq!(s["totals"]["iterations"], 30);
}

/// A stall makes the open model take on many VUs; once the load needs few again, the
/// ones left idle are retired (the pool shrinks back) and their slots can be claimed
/// again, without a lost or extra iteration and without two live VUs on one account.
#[test]
fn an_open_models_idle_vus_are_retired_after_a_spike() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accounts.csv"), {
        let mut s = String::from("user,password\n");
        for i in 1..=300 {
            s.push_str(&format!("user{i},pass{i}\n"));
        }
        s
    })
    .unwrap();
    let plan = write_plan(
        dir.path(),
        "spike.toml",
        &format!(
            r#"
name = "spike"
[defaults]
base_url = "{}"
[data.accounts]
file = "accounts.csv"
mode = "unique"
[scenarios.open]
executor = "constant-arrival-rate"
rate = 100
duration = "16s"
max_vus = 300
flow = "account"
[[flows.account.steps]]
name = "login"
request = {{ method = "POST", url = "/login", json = {{ user = "{{{{ accounts.user }}}}", password = "{{{{ accounts.password }}}}" }} }}
check = {{ status = 200 }}
extract = {{ token = {{ json = "$.token" }} }}
[[flows.account.steps]]
name = "account page"
request = {{ url = "/account", headers = {{ authorization = "Bearer {{{{ token }}}}" }} }}
check = {{ status = 200 }}
"#,
            t.url()
        ),
    );
    // A one-second stall early in the run: each arrival during it needs a VU of its own.
    let s = run_through_a_stall(&t, &plan, dir.path(), 100, 200);
    assert_eq!(s["totals"]["iterations"], 1600, "{}", s["totals"]);
    assert_eq!(s["totals"]["dropped_iterations"], 0, "{}", s["totals"]);
    assert_eq!(s["totals"]["requests"].as_u64().unwrap(), t.requests());
    // No session was ended by a second login of its account (409): each account's VU
    // slot had one live VU at a time, retired or not.
    assert_eq!(s["totals"]["failed"], 0, "{}", s["totals"]);
    let vus: Vec<(u64, u64)> = s["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t"].as_u64().unwrap(), p["vus"].as_u64().unwrap()))
        .collect();
    let peak = vus.iter().map(|(_, n)| *n).max().unwrap();
    assert!(peak >= 40, "the stall must have needed many VUs: {vus:?}");
    // Second 14, the last full one before the scenario ends (the final report counts
    // no VUs, retired or not): the stall's VUs have idled for over ten seconds.
    let late = vus.iter().find(|(t, _)| *t == 14).map(|(_, n)| *n);
    assert!(
        late.is_some_and(|n| n * 4 <= peak),
        "the pool must shrink back once its VUs idle: {vus:?}"
    );
}

/// A target that stops answering: once a scenario's graceful window after its end has
/// passed, its in-flight iterations are cut off — closed and open model alike — and the
/// run ends, reporting what completed, instead of waiting for 60 s request timeouts.
#[test]
fn a_hung_target_is_cut_off_after_the_graceful_stop() {
    let t = target(TargetConfig {
        stall: Duration::from_secs(120),
        ..TargetConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "hung.toml",
        &format!(
            r#"
name = "hung"
[defaults]
base_url = "{}"
timeout = "60s"
[scenarios.closed]
executor = "constant-vus"
vus = 3
duration = "1s"
graceful_stop = "300ms"
flow = "get"
[scenarios.open]
executor = "constant-arrival-rate"
rate = 10
duration = "1s"
max_vus = 20
graceful_stop = "300ms"
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/7" }}
"#,
            t.url()
        ),
    );
    let started = Instant::now();
    let (out, s) = run(&plan, &[], dir.path());
    let took = started.elapsed();
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    // Generous: 1 s + 300 ms of schedule, plus start-up and report on a loaded box.
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: {}",
        show(&out)
    );
    // Every request hung, so none completed; the VUs and the arrivals were all in flight.
    assert_eq!(s["totals"]["requests"], 0, "{}", show(&out));
    assert!(t.requests() >= 3 + 5, "target saw {}", t.requests());
}

/// A per-vu-iterations VU that is done stays done while another scenario still runs
/// (a finished VU was once started again from iteration 0 while the node waited to be
/// handed a lost node's work); shared-iterations runs its pool exactly.
#[test]
fn counted_scenarios_run_exactly_their_iterations_beside_a_longer_one() {
    let t = target(TargetConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(
        dir.path(),
        "counted.toml",
        &format!(
            r#"
name = "counted"
[defaults]
base_url = "{}"
[scenarios.each]
executor = "per-vu-iterations"
vus = 3
iterations = 4
flow = "search"
[scenarios.pool]
executor = "shared-iterations"
vus = 2
iterations = 30
flow = "product"
[[flows.search.steps]]
name = "search"
request = {{ url = "/products?q=a" }}
[[flows.product.steps]]
name = "product"
request = {{ url = "/products/5" }}
think = "50ms"
"#,
            t.url()
        ),
    );
    let (out, s) = run(&plan, &[], dir.path());
    assert!(out.status.success(), "{}", show(&out));
    let stats = serde_json::to_value(t.stats()).unwrap();
    assert_eq!(stats["endpoints"]["GET /products"], 12, "{}", show(&out));
    assert_eq!(stats["endpoints"]["GET /products/{id}"], 30);
    assert_eq!(s.expect("summary")["totals"]["requests"], 42);
}
