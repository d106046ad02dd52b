//! Shared helpers of the mesh integration tests: start real `stampede node` processes
//! on 127.0.0.1 with their own temp data dirs, ask them for `peers --json`, and kill
//! them when the test ends (a Drop guard), whatever happens.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_stampede");

/// A node process; killed (SIGKILL) and reaped on drop.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's control.json, once written by this process.
    pub fn control(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join("control.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        (v["pid"].as_u64() == Some(self.pid() as u64)).then_some(v)
    }

    /// Its first mesh address with `/p2p/ID`.
    pub fn addr(&self) -> String {
        self.control().expect("node is up")["listen_addrs"][0]
            .as_str()
            .expect("listen address")
            .to_string()
    }

    pub fn peer_id(&self) -> String {
        self.control().expect("node is up")["peer_id"]
            .as_str()
            .expect("peer id")
            .to_string()
    }

    /// `stampede peers --json --data-dir DIR`, parsed; None if the command failed.
    pub fn peers(&self) -> Option<Vec<Value>> {
        let out = Command::new(BIN)
            .args(["peers", "--json", "--data-dir"])
            .arg(&self.dir)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Vec<Value>>(&out.stdout).ok()
    }

    /// The state (alive/lost/incompatible) this node shows for `peer_id`, if listed.
    pub fn state_of(&self, peer_id: &str) -> Option<String> {
        self.peers()?
            .iter()
            .find(|m| m["id"] == peer_id)
            .map(|m| m["state"].as_str().unwrap_or("").to_string())
    }

    pub fn alive_ids(&self) -> Vec<String> {
        self.peers()
            .unwrap_or_default()
            .iter()
            .filter(|m| m["state"] == "alive")
            .map(|m| m["id"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A temp dir with a mesh key and the nodes started in it.
pub struct Mesh {
    pub tmp: tempfile::TempDir,
    pub key: PathBuf,
}

impl Mesh {
    pub fn new() -> Mesh {
        let tmp = tempfile::tempdir().expect("temp dir");
        let key = tmp.path().join("swarm.key");
        write_key(&key);
        Mesh { tmp, key }
    }

    /// Starts a node with this mesh's key and waits until its control endpoint is up.
    pub fn node(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let key = self.key.clone();
        self.node_with_key(name, Some(&key), extra, env)
    }

    pub fn node_with_key(
        &self,
        name: &str,
        key: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("data dir");
        let log = self.tmp.path().join(format!("{name}.log"));
        let mut cmd = Command::new(BIN);
        cmd.args([
            "node",
            "--name",
            name,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--http",
            "127.0.0.1:0",
            "--allow-target",
            "loopback",
            "--data-dir",
        ])
        .arg(&dir);
        match key {
            Some(k) => {
                cmd.arg("--key-file").arg(k);
            }
            None => {
                cmd.arg("--insecure-no-key");
            }
        }
        cmd.args(extra);
        // Loopback only: mDNS would send multicast on the machine's real interfaces.
        cmd.env("STAMPEDE_MDNS", "false")
            .env("STAMPEDE_LOG", "info,stampede=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        start_node(name, dir, log, cmd)
    }
}

/// Spawns `cmd` (a `stampede node` command line, or a wrapper that execs one in the same
/// process, so that the pid in control.json is the child's) with its standard error to
/// `log`, and waits until its control endpoint is up in `dir`.
pub fn start_node(name: &str, dir: PathBuf, log: PathBuf, mut cmd: Command) -> Node {
    let logf = std::fs::File::create(&log).expect("log file");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
    let child = cmd.spawn().expect("spawn stampede node");
    let mut node = Node {
        name: name.to_string(),
        dir,
        log,
        child: Some(child),
    };
    let up = wait_until(Duration::from_secs(30), || node.control().is_some());
    assert!(
        up,
        "node {name} did not write its control.json within 30 s; log:\n{}",
        node.log_text()
    );
    assert!(
        node.running(),
        "node {name} exited; log:\n{}",
        node.log_text()
    );
    node
}

/// A failed test shows the end of every node's log: a CI run leaves nothing else behind.
impl Drop for Mesh {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.tmp.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("--- last {} lines of {}:", tail.len(), log.display());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// How much of each node's log a failed test prints.
const LOG_TAIL_LINES: usize = 80;

pub fn write_key(path: &Path) {
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `cond` every 100 ms until it holds or `limit` passes (bounded: at most
/// limit/100ms + 1 polls).
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let max_polls = limit.as_millis() / 100 + 1;
    for _ in 0..max_polls {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// Whether every node sees exactly the given ids alive.
pub fn all_see(nodes: &[&Node], ids: &[String]) -> bool {
    nodes.iter().all(|n| {
        let mut alive = n.alive_ids();
        alive.sort();
        let mut want = ids.to_vec();
        want.sort();
        alive == want
    })
}

/// testnet/netns.sh: the project's own test hosts in network namespaces.
pub fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testnet/netns.sh")
}

/// Why a namespace test cannot run here (not root, no `ip netns`, a testnet already
/// up), or None when it can.
pub fn netns_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("`ip` is unavailable: {e}")),
    }
    let bridge_up = Command::new("ip")
        .args(["link", "show", "sp-br0"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    bridge_up.then(|| "sp-br0 already exists (another netns testnet is up)".into())
}

/// Tears the namespaces (and the bridge) down whatever happens.
pub struct NetnsDown(pub PathBuf);

impl Drop for NetnsDown {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(netns_script())
            .arg("down")
            .env("STAMPEDE_TESTNET_DIR", &self.0)
            .output();
    }
}

/// A constant-arrival-rate plan against `url` (`GET /products/5`, status 200 checked),
/// written to `dir/rate.toml`: `rate` × `duration` iterations in all.
pub fn rate_plan(dir: &Path, url: &str, rate: u32, duration: &str) -> PathBuf {
    let p = dir.join("rate.toml");
    std::fs::write(
        &p,
        format!(
            r#"
name = "mesh-rate"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = {rate}
duration = "{duration}"
max_vus = 100
flow = "get"
[[flows.get.steps]]
name = "product"
request = {{ url = "/products/5" }}
check = {{ status = 200 }}
"#
        ),
    )
    .expect("write the plan");
    p
}

/// A finished command's status and output, for an assertion's message.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A real stampede-target on 127.0.0.1 (counts every request it answers).
pub fn target() -> stampede_tools::TargetHandle {
    stampede_tools::spawn(stampede_tools::TargetConfig::default()).expect("start stampede-target")
}

/// Starts `stampede run --mesh` against a node; the JSON summary goes to `json`.
pub fn start_run(node: &Node, plan: &Path, json: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir"])
        .arg(&node.dir)
        .arg(plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stampede")
}

/// Waits for a CLI started by [`start_run`].
pub fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().expect("wait for the CLI")
}

/// The JSON summary a run wrote.
pub fn summary(json: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(json).expect("summary written")).unwrap()
}

/// The kinds of a summary's events, in order.
pub fn kinds(s: &Value) -> Vec<String> {
    s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

/// A swarm of a peer that holds this mesh's key and speaks `behaviour` (a hostile peer in
/// the robustness tests): the node's own transport, links kept for a minute when idle.
pub fn keyed_swarm<B: libp2p::swarm::NetworkBehaviour>(
    mesh: &Mesh,
    kp: &libp2p::identity::Keypair,
    behaviour: B,
) -> libp2p::Swarm<B> {
    let psk = stampede::mesh::key::read_key_file(&mesh.key).expect("the mesh key");
    libp2p::Swarm::new(
        stampede::mesh::transport::build(kp, Some(psk)).expect("a transport"),
        behaviour,
        kp.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    )
}
