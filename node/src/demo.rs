//! `stampede demo`: one command, no setup. It starts a local mesh of three real nodes
//! (child processes of this binary, on loopback, with a fresh mesh key) and the demo
//! shop, runs the retail example across the mesh, prints the merged summary, writes
//! the JSON and HTML reports, and cleans everything up — even when the run fails.
//!
//! It drives the nodes exactly as a user would (`stampede node`, then `run --mesh`
//! through the control endpoint), so the demo exercises the real distributed path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::DemoArgs;
use crate::commands::{accounts_csv, finish, follow_run, parse_outputs, RETAIL_PLAN};
use crate::exit::{Failure, Outcome};
use crate::reports::outputs::{Format, Output};
use crate::serve::control::{self, ControlInfo, ControlRequest};

const NODES: usize = 3;

/// The node processes; killed and reaped on drop, whatever happened.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn demo(args: DemoArgs) -> Result<Outcome, Failure> {
    let mut outs = parse_outputs(&args.outputs)?;
    if outs.is_empty() {
        outs = vec![
            Output {
                format: Format::Json,
                path: PathBuf::from("stampede-demo.json"),
                baseline: None,
            },
            Output {
                format: Format::Html,
                path: PathBuf::from("stampede-demo.html"),
                baseline: None,
            },
        ];
    }
    let duration = stampede_protocol::duration::parse_duration(&args.duration)
        .map_err(|e| Failure::usage(format!("--duration \"{}\": {e}", args.duration)))?;
    if duration < Duration::from_secs(3) || duration > Duration::from_secs(3600) {
        return Err(Failure::usage(
            "--duration: the demo runs between 3s and 1h",
        ));
    }
    let dir = std::env::temp_dir().join(format!("stampede-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::run(format!("cannot create {}: {e}", dir.display())))?;
    let result = run_demo(&args, duration, &dir, &outs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_demo(
    args: &DemoArgs,
    duration: Duration,
    dir: &Path,
    outs: &[Output],
) -> Result<Outcome, Failure> {
    let key = dir.join("swarm.key");
    crate::mesh::key::write_private(&key, crate::mesh::key::generate_key_text().as_bytes())
        .map_err(|e| Failure::run(format!("cannot write the demo mesh key: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::run(format!("cannot find this program: {e}")))?;
    let mut nodes = Nodes(Vec::new());
    let mut dirs = Vec::new();
    let mut bootstrap: Option<String> = None;
    let regions = ["eu", "us", "ap"];
    for i in 0..NODES {
        let data = dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&data).map_err(|e| Failure::run(e.to_string()))?;
        let log = std::fs::File::create(dir.join(format!("node{}.log", i + 1)))
            .map_err(|e| Failure::run(e.to_string()))?;
        let mut cmd = Command::new(&exe);
        cmd.args([
            "node",
            "--name",
            &format!("demo-{}", i + 1),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args([
            "--http",
            "127.0.0.1:0",
            "--label",
            &format!("region={}", regions[i % regions.len()]),
            // The demo shop runs on this machine's loopback.
            "--allow-target",
            "loopback",
        ])
        .arg("--key-file")
        .arg(&key)
        .arg("--data-dir")
        .arg(&data);
        if let Some(b) = &bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        // mDNS would multicast on the machine's real interfaces; loopback needs none.
        cmd.env("STAMPEDE_MDNS", "false")
            .env("STAMPEDE_CAPACITY", "1");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Failure::run(format!("cannot start a demo node: {e}")))?;
        let pid = child.id();
        nodes.0.push(child);
        let info = wait_for_control(&data, pid, dir, i + 1)?;
        if bootstrap.is_none() {
            bootstrap = info.listen_addrs.first().cloned();
        }
        dirs.push(data);
    }
    let target = control::find_node(None, Some(&dirs[1])).map_err(Failure::run)?;
    wait_for_mesh(&target, dir)?;
    eprintln!("local mesh of {NODES} nodes is up (demo-1 eu, demo-2 us, demo-3 ap)");

    let shop = stampede_tools::spawn(stampede_tools::TargetConfig {
        latency: "normal:3ms,1ms"
            .parse()
            .unwrap_or(stampede_tools::Latency::None),
        threads: 1,
        ..Default::default()
    })
    .map_err(|e| Failure::run(format!("cannot start the demo shop: {e}")))?;
    eprintln!("demo shop (stampede-target) listening on {}", shop.url());

    let ramp = (duration.as_secs() / 5).max(1);
    let hold = duration.as_secs().saturating_sub(2 * ramp).max(1);
    let sets = vec![
        format!("defaults.base_url=\"{}\"", shop.url()),
        format!(
            "scenarios.shoppers.stages=[{{target = 150, duration = \"{ramp}s\"}}, {{target = 150, duration = \"{hold}s\"}}, {{target = 0, duration = \"{ramp}s\"}}]"
        ),
    ];
    let text = crate::commands::apply_sets("examples/retail.toml", RETAIL_PLAN, &sets)?;
    let csv = accounts_csv(2000);
    std::fs::write(dir.join("accounts.csv"), &csv).map_err(|e| Failure::run(e.to_string()))?;
    let plan = crate::commands::compile_text("examples/retail.toml", &text, &[], dir)?;
    let bundle = stampede_protocol::run::Bundle {
        plan_name: "retail.toml".into(),
        plan: text,
        files: [("accounts.csv".to_string(), csv.into_bytes())].into(),
    };
    eprintln!(
        "running the retail example (60% browse, 25% purchase, 15% account) for {}s across the mesh, started from demo-2…",
        duration.as_secs()
    );
    let request = ControlRequest::Run {
        bundle,
        requirements: plan.plan.requirements.clone(),
    };
    let summary = follow_run(
        &target,
        request,
        args.quiet,
        crate::run::embedded::plan_duration(&plan),
    )?;
    let counted = shop.requests();
    let out = finish(&summary, outs, plan.plan.expect_failures);
    eprintln!(
        "the shop counted {counted} requests; the mesh measured {} ({})",
        summary.totals.requests,
        if counted == summary.totals.requests {
            "exact"
        } else {
            "MISMATCH"
        }
    );
    shop.shutdown();
    drop(nodes);
    out
}

fn wait_for_control(data: &Path, pid: u32, dir: &Path, n: usize) -> Result<ControlInfo, Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(info) = ControlInfo::read(data) {
            if info.pid == pid {
                return Ok(info);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join(format!("node{n}.log"))).unwrap_or_default();
    Err(Failure::run(format!(
        "demo node {n} did not start within 30 s:\n{log}"
    )))
}

fn wait_for_mesh(target: &control::Target, dir: &Path) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(v) = control::call(target, ControlRequest::Peers) {
            let alive = v
                .as_array()
                .map(|a| a.iter().filter(|m| m["state"] == "alive").count())
                .unwrap_or(0);
            if alive == NODES {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.join("node2.log")).unwrap_or_default();
    Err(Failure::run(format!(
        "the demo mesh did not form within 30 s:\n{log}"
    )))
}
