//! The real `stampede` binary against hostile input of its own user: plans whose
//! numbers are out of bounds (a one-line `file:line: field: message`, exit 2, never an
//! abort or a hang), and result files that cannot all be written (every one is
//! attempted, each failure named, exit 3); and a real node given a plan bundle that
//! names a file it did not ship.

mod mesh_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use stampede_tools::{TargetConfig, TargetHandle};

fn stampede() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stampede"))
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn scenario_plan(keys: &str) -> String {
    format!(
        "name = \"bounds\"\n\n[scenarios.s]\n{keys}\n\n[flows.f]\nsteps = [{{ request = {{ url = \"http://127.0.0.1:9/\" }} }}]\n"
    )
}

/// Each bad plan of the hardening issue, under `validate` and `run`: exit 2 within
/// seconds, one line naming file, line and field. Before the bounds, a VU count of
/// 1e12 aborted the process (rc 134, ~4.4 GB) and a huge start_after hung the run.
#[test]
fn out_of_bound_plan_numbers_are_one_line_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "executor = \"constant-vus\"\nvus = 1000000000000\nduration = \"1s\"",
            "p.toml:5: scenarios.s.vus: ",
            "must be at most 1000000",
        ),
        (
            "executor = \"constant-arrival-rate\"\nrate = 10\nduration = \"1s\"\nmax_vus = 1000000000000",
            "p.toml:7: scenarios.s.max_vus: ",
            "must be at most 1000000",
        ),
        (
            "executor = \"ramping-vus\"\nstages = [{ target = 1e12, duration = \"1s\" }]",
            "p.toml:5: scenarios.s.stages: ",
            "stages[0].target (1000000000000) must be at most 1000000",
        ),
        (
            "executor = \"per-vu-iterations\"\nvus = 1000000000000\niterations = 1",
            "p.toml:5: scenarios.s.vus: ",
            "must be at most 1000000",
        ),
        (
            "executor = \"shared-iterations\"\nvus = 1\niterations = 10000000000000",
            "p.toml:6: scenarios.s.iterations: ",
            "must be at most 1000000000000",
        ),
        (
            "executor = \"constant-vus\"\nvus = 1\nduration = \"1s\"\nstart_after = \"100000000000000000s\"",
            "p.toml:7: scenarios.s.start_after: ",
            "is longer than the limit of 720h",
        ),
        (
            "executor = \"constant-vus\"\nvus = 1\nduration = \"20d\"\nstart_after = \"20d\"",
            "p.toml:7: scenarios.s.start_after: ",
            "plus the scenario's length (480h) is over the limit of 720h",
        ),
        (
            "executor = \"constant-arrival-rate\"\nrate = 10\nduration = \"1s\"\nmax_vus = 3\npre_allocated_vus = 5",
            "p.toml:8: scenarios.s.pre_allocated_vus: ",
            "pre_allocated_vus (5) must not exceed max_vus (3)",
        ),
        (
            "executor = \"constant-vus\"\nvus = 1\nduration = \"1s\"\ngraceful_stop = \"31d\"",
            "p.toml:7: scenarios.s.graceful_stop: ",
            "longer than the limit of 720h",
        ),
    ];
    for (keys, at, message) in cases {
        let plan = dir.path().join("p.toml");
        std::fs::write(&plan, scenario_plan(keys)).unwrap();
        for cmd in ["validate", "run"] {
            let started = Instant::now();
            let quiet: &[&str] = if cmd == "run" { &["--quiet"] } else { &[] };
            let out = stampede()
                .arg(cmd)
                .arg(&plan)
                .args(quiet)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let took = started.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {keys:?}\n{}", show(&out));
            assert!(
                took < Duration::from_secs(30),
                "{cmd} {keys:?} took {took:?}"
            );
            let line = stderr.trim();
            assert_eq!(line.lines().count(), 1, "{cmd} {keys:?}: {line}");
            assert!(
                line.contains(at) && line.contains(message),
                "{cmd} {keys:?}: wanted {at}…{message}, got {line}"
            );
        }
    }
}

fn target() -> TargetHandle {
    stampede_tools::spawn(TargetConfig {
        threads: 1,
        ..TargetConfig::default()
    })
    .expect("start stampede-target")
}

/// `--out json=/dev/full --out html=ok.html`: the full device fails, the HTML report
/// is still written, the failure is named, the exit code is 3. Before, the first
/// failure ended the command and `ok.html` was never written.
#[test]
fn every_result_file_is_attempted_and_each_failure_named() {
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full on this machine; skipped");
        return;
    }
    let t = target();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("p.toml");
    std::fs::write(
        &plan,
        format!(
            "[scenarios.s]\nexecutor = \"shared-iterations\"\nvus = 1\niterations = 3\n\n[flows.f]\nsteps = [{{ request = {{ url = \"{}/\" }} }}]\n",
            t.url()
        ),
    )
    .unwrap();
    let html = dir.path().join("ok.html");
    let csv = dir.path().join("missing-dir").join("t.csv");
    let out = stampede()
        .arg("run")
        .arg(&plan)
        .args(["--quiet", "--out", "json=/dev/full", "--out"])
        .arg(format!("html={}", html.display()))
        .arg("--out")
        .arg(format!("csv={}", csv.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(html.exists(), "ok.html was not written\n{}", show(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<html"), "{page:.200}");
    assert!(stderr.contains("/dev/full"), "{stderr}");
    assert!(stderr.contains("t.csv"), "{stderr}");
    // /dev/full is still the device (not replaced by a renamed temp file), and no
    // temp file is left beside ok.html.
    let meta = std::fs::metadata("/dev/full").unwrap();
    assert!(!meta.is_file(), "/dev/full was replaced by a regular file");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        left.iter().all(|n| !n.contains(".tmp")),
        "temp files left: {left:?}"
    );
}

/// A bundle sent straight to a node's control endpoint, naming `../../secret.csv` (the
/// node's own data dir, from `DATA_DIR/runs/<id>/`) and shipping nothing: the node
/// refuses it naming the field, and neither the answer nor the node's log holds
/// anything of the file. Before, the node read its own file, and the refusal sent
/// across the mesh carried its header (`columns: SECRET_1, x`).
#[test]
fn a_node_reads_data_only_from_the_bundle_and_never_echoes_a_file() {
    use stampede::serve::control::{call_streaming, find_node, ControlRequest};
    let mesh = mesh_support::Mesh::new();
    let node = mesh.node("n1", &[], &[]);
    std::fs::write(node.dir.join("secret.csv"), "SECRET_1,x\nhunter2,y\n").unwrap();
    let target = find_node(None, Some(&node.dir)).unwrap();
    for file in ["../../secret.csv", "/etc/passwd"] {
        let plan = format!(
            "[data.s]\nfile = \"{file}\"\nformat = \"csv\"\n\n[scenarios.a]\nexecutor = \"shared-iterations\"\nvus = 1\niterations = 1\n\n[flows.f]\nsteps = [{{ request = {{ url = \"http://127.0.0.1:9/?u={{{{ s.nosuch }}}}\" }} }}]\n"
        );
        let bundle = stampede_protocol::run::Bundle {
            plan_name: "p.toml".into(),
            plan,
            files: Default::default(),
        };
        let mut events = Vec::new();
        let answer = call_streaming(
            &target,
            ControlRequest::Run {
                bundle,
                requirements: Default::default(),
            },
            Duration::from_secs(60),
            |e| events.push(e),
        );
        let seen = format!("{answer:?} {events:?}");
        assert!(answer.is_err(), "the run was not refused: {seen}");
        assert!(seen.contains("data.s.file"), "{file}: {seen}");
        for secret in ["SECRET_1", "hunter2", "root:"] {
            assert!(!seen.contains(secret), "{file}: {secret} leaked: {seen}");
            assert!(
                !node.log_text().contains(secret),
                "{file}: {secret} in the node's log"
            );
        }
    }
}

/// A mesh run's copy of its data files (which often hold credentials) is private:
/// `DATA_DIR/runs` and the run's directory 0700, the files 0600. Before, they were
/// created with the process umask (0755 / 0644) and never removed.
#[test]
fn a_node_keeps_a_run_s_data_files_private() {
    use stampede::serve::control::{call_streaming, find_node, ControlRequest};
    use std::os::unix::fs::PermissionsExt;
    let mesh = mesh_support::Mesh::new();
    let node = mesh.node("n1", &[], &[]);
    let target = find_node(None, Some(&node.dir)).unwrap();
    let plan = "[data.s]\nfile = \"creds/users.csv\"\n\n[scenarios.a]\nexecutor = \"shared-iterations\"\nvus = 1\niterations = 1\n\n[flows.f]\nsteps = [{ request = { url = \"http://127.0.0.1:9/?u={{ s.user }}\", timeout = \"1s\" } }]\n";
    let bundle = stampede_protocol::run::Bundle {
        plan_name: "p.toml".into(),
        plan: plan.into(),
        files: [(
            "creds/users.csv".to_string(),
            b"user,password\nann,hunter2\n".to_vec(),
        )]
        .into(),
    };
    let answer = call_streaming(
        &target,
        ControlRequest::Run {
            bundle,
            requirements: Default::default(),
        },
        Duration::from_secs(60),
        |_| {},
    );
    assert!(answer.is_ok(), "the run failed: {answer:?}");
    let runs = node.dir.join("runs");
    let run_dirs: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(run_dirs.len(), 1, "{run_dirs:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let run = &run_dirs[0];
    assert_eq!(mode(&runs), 0o700, "runs dir");
    assert_eq!(mode(run), 0o700, "run dir");
    assert_eq!(mode(&run.join("creds")), 0o700, "a directory of the bundle");
    assert_eq!(mode(&run.join("creds/users.csv")), 0o600, "a data file");
}
