//! WebSocket steps end to end, with the real `stampede` binary: against the demo shop's
//! `/ws/orders` (single node and a two-node mesh, message counts checked exactly against
//! the shop's `/_stats`), against Python's `websockets` server (an implementation nobody
//! here wrote, counts checked on its side), and against targets that misbehave (a
//! server that hangs up mid-message, an oversized frame, no such endpoint): one clear
//! error class each, no hang.

mod browser_support;
mod mesh_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use browser_support::http_get;
use mesh_support::{all_see, show, wait_until, Mesh, BIN};
use serde_json::Value;
use stampede_tools::{TargetConfig, TargetHandle};

fn target() -> TargetHandle {
    stampede_tools::spawn(TargetConfig {
        threads: 1,
        ..TargetConfig::default()
    })
    .expect("start stampede-target")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/realtime.toml")
}

/// `stampede run PLAN` (embedded, or `--mesh` through `node`), summary parsed.
fn run(plan: &Path, extra: &[&str], dir: &Path) -> (Output, Option<Value>) {
    let json = dir.join("summary.json");
    let _ = std::fs::remove_file(&json);
    let out = Command::new(BIN)
        .arg("run")
        .args(extra)
        .arg(plan)
        .args(["--quiet", "--out"])
        .arg(format!("json={}", json.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run stampede");
    let s = std::fs::read_to_string(&json)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("summary is JSON"));
    (out, s)
}

fn metric(s: &Value, name: &str) -> u64 {
    s["totals"]["metrics"][name]["count"].as_u64().unwrap_or(0)
}

/// The shop's own counts agree with the run's, message for message.
fn assert_counts_match(s: &Value, t: &TargetHandle, out: &Output) {
    let st = serde_json::to_value(t.stats()).unwrap();
    let ctx = format!("summary totals {}\nshop {st}\n{}", s["totals"], show(out));
    assert_eq!(
        metric(s, "ws_msgs_sent"),
        st["ws_messages_received"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        metric(s, "ws_msgs_received"),
        st["ws_messages_sent"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        metric(s, "ws_sessions"),
        st["endpoints"]["GET /ws/orders"].as_u64().unwrap(),
        "{ctx}"
    );
    // The plan's fixed parts: 5 trackers × 4 iterations send one message and get two
    // back; 20/s × 2 s echoes; 6 sessions each send one binary message.
    assert_eq!(metric(s, "ws_msgs_sent"), 20 + 40 + 6, "{ctx}");
    assert_eq!(metric(s, "ws_msgs_received"), 40 + 40 + 6, "{ctx}");
    assert_eq!(metric(s, "ws_msg_rtt"), 66, "{ctx}");
    assert_eq!(s["totals"]["failed"], 0, "{ctx}");
    assert_eq!(s["totals"]["checks"]["failed"], 0, "{ctx}");
    assert_eq!(s["requests"]["wait for shipped"]["requests"], 20, "{ctx}");
    assert_eq!(metric(s, "ws_session_duration"), 6, "{ctx}");
}

#[test]
fn the_realtime_example_counts_every_message_exactly_on_one_node() {
    let t = target();
    let dir = tempfile::tempdir().unwrap();
    let base = format!("defaults.base_url=\"{}\"", t.url());
    let html = dir.path().join("report.html");
    let csv = dir.path().join("timeline.csv");
    let (out, s) = run(
        &example(),
        &[
            "--set",
            &base,
            "--out",
            &format!("html={}", html.display()),
            "--out",
            &format!("csv={}", csv.display()),
        ],
        dir.path(),
    );
    let s = s.unwrap_or_else(|| panic!("no summary\n{}", show(&out)));
    assert!(out.status.success(), "{}", show(&out));
    assert_counts_match(&s, &t, &out);
    // Every other output names the WebSocket metrics: the terminal summary, the HTML
    // report (its data), the CSV timeline's columns.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let html = std::fs::read_to_string(&html).unwrap();
    let csv_head = std::fs::read_to_string(&csv).unwrap();
    let csv_head = csv_head.lines().next().unwrap_or_default().to_string();
    for name in [
        "ws_connecting",
        "ws_session_duration",
        "ws_msg_rtt",
        "ws_sessions",
        "ws_msgs_sent",
        "ws_msgs_received",
    ] {
        assert!(stdout.contains(name), "terminal lacks {name}:\n{stdout}");
        assert!(html.contains(&format!("\"{name}\"")), "HTML lacks {name}");
        assert!(csv_head.contains(name), "CSV lacks {name}: {csv_head}");
    }
    // Thresholds on WebSocket metrics are evaluated (and pass on loopback).
    let th = s["thresholds"].as_array().unwrap();
    assert!(
        th.iter()
            .any(|x| x["metric"] == "ws_msg_rtt" && x["passed"] == true),
        "{th:?}"
    );
}

#[test]
fn a_mesh_of_two_counts_every_message_exactly() {
    let mesh = Mesh::new();
    let env = &[("STAMPEDE_CAPACITY", "1")];
    let n1 = mesh.node("n1", &[], env);
    let a1 = n1.addr();
    let n2 = mesh.node("n2", &["--bootstrap", a1.as_str()], env);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&[&n1, &n2], &ids)),
        "the mesh did not form"
    );
    let t = target();
    let base = format!("defaults.base_url=\"{}\"", t.url());
    let dir = n1.dir.to_string_lossy().to_string();
    let (out, s) = run(
        &example(),
        &["--mesh", "--data-dir", &dir, "--set", &base],
        mesh.tmp.path(),
    );
    let s = s.unwrap_or_else(|| panic!("no summary\n{}", show(&out)));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(s["nodes"].as_array().unwrap().len(), 2, "{}", s["nodes"]);
    // Both nodes sent messages: the merge adds their named metrics.
    for n in s["nodes"].as_array().unwrap() {
        assert!(
            n["stats"]["metrics"]["ws_msgs_sent"]["count"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{n}"
        );
    }
    assert_counts_match(&s, &t, &out);

    // The node that ran it shows the same counts in its live view and on /metrics.
    let http = n1.control().unwrap()["http"].as_str().unwrap().to_string();
    let run_id = s["run_id"].as_str().unwrap();
    let (status, live) = http_get(&http, "/api/live");
    assert_eq!(status, 200, "{live}");
    let live: Value = serde_json::from_str(&live).unwrap();
    let run = live["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run_id)
        .unwrap_or_else(|| panic!("run {run_id} not in /api/live: {live}"));
    for name in [
        "ws_msgs_sent",
        "ws_msgs_received",
        "ws_msg_rtt",
        "ws_sessions",
    ] {
        assert_eq!(
            run["totals"]["metrics"][name]["count"], s["totals"]["metrics"][name]["count"],
            "/api/live {name}"
        );
    }
    let (status, text) = http_get(&http, "/metrics");
    assert_eq!(status, 200, "{text}");
    let sum = |family: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(family) && l.contains(&format!("run=\"{run_id}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    assert_eq!(
        sum("stampede_ws_msgs_sent_total{"),
        metric(&s, "ws_msgs_sent"),
        "{text}"
    );
    assert_eq!(
        sum("stampede_ws_msg_rtt_seconds_count{"),
        metric(&s, "ws_msg_rtt"),
        "{text}"
    );
}

/// A small echo server on Python's `websockets` (Debian's python3-websockets): prints
/// its port, echoes every message, and prints its counts when its stdin closes.
const PY_ECHO: &str = r#"
import asyncio, json, sys
import websockets
counts = {"sessions": 0, "received": 0, "sent": 0, "subprotocols": []}
async def handler(ws, *path):
    counts["sessions"] += 1
    counts["subprotocols"].append(ws.subprotocol)
    async for msg in ws:
        counts["received"] += 1
        await ws.send(msg)
        counts["sent"] += 1
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, subprotocols=["chat.v2"], max_size=1 << 20) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(counts), flush=True)
asyncio.run(main())
"#;

/// A Python that has the `websockets` module: Debian's (where apt installs
/// python3-websockets) before whatever `python3` is first on the PATH.
fn python_with_websockets() -> Result<&'static str, String> {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|py| {
            Command::new(py)
                .args(["-c", "import websockets"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            "python3 with the websockets module (python3-websockets) is not installed".into()
        })
}

#[test]
fn interop_with_pythons_websockets_server_counts_match_on_its_side() {
    let py = match python_with_websockets() {
        Ok(py) => py,
        Err(why) => {
            // .ci/run installs it; a developer machine may not have it.
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mut py = Command::new(py)
        .args(["-c", PY_ECHO])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let port: u16 = lines
        .next()
        .expect("the server prints its port")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("echo.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "py-echo"
[defaults]
base_url = "http://127.0.0.1:{port}"
timeout = "3s"
[scenarios.s]
executor = "per-vu-iterations"
vus = 3
iterations = 5
flow = "f"
[[flows.f.steps]]
name = "open"
ws = {{ open = "ws://127.0.0.1:{port}/chat", subprotocols = ["chat.v2"], keep = true }}
[[flows.f.steps]]
name = "json"
ws = {{ send_json = {{ kind = "probe", vu = "{{{{ vu }}}}", n = "{{{{ iteration }}}}" }} }}
[[flows.f.steps]]
name = "json back"
ws = {{ receive = "next" }}
check = {{ json = {{ "$.kind" = "probe" }}, body_regex = '"n":[0-4],' }}
[[flows.f.steps]]
name = "binary"
ws = {{ send_binary = "raw {{{{ iteration }}}}" }}
[[flows.f.steps]]
name = "binary back"
ws = {{ receive = "next" }}
check = {{ body_contains = "raw" }}
[[flows.f.steps]]
name = "ping"
ws = {{ ping = true }}
"#
        ),
    )
    .unwrap();
    let (out, s) = run(&plan, &[], dir.path());
    drop(py.stdin.take());
    let counts: Value =
        serde_json::from_str(&lines.next().expect("the server prints its counts").unwrap())
            .unwrap();
    let _ = py.wait();
    let s = s.unwrap_or_else(|| panic!("no summary\n{}", show(&out)));
    assert!(out.status.success(), "{}\n{counts}", show(&out));
    // 3 VUs keep one socket each over 5 iterations of 2 messages.
    assert_eq!(counts["sessions"], 3, "{counts}");
    assert_eq!(counts["received"], 30, "{counts}");
    assert_eq!(counts["sent"], 30, "{counts}");
    assert_eq!(metric(&s, "ws_sessions"), 3);
    assert_eq!(metric(&s, "ws_msgs_sent"), 30);
    assert_eq!(metric(&s, "ws_msgs_received"), 30);
    assert!(counts["subprotocols"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p == "chat.v2"));
    assert_eq!(s["totals"]["checks"]["failed"], 0, "{}", s["totals"]);
    assert_eq!(s["totals"]["failed"], 0, "{}", s["totals"]);
    // Per iteration: a JSON path and a regex on one message, a contains on the other.
    assert_eq!(s["totals"]["checks"]["passed"], 45, "{}", s["totals"]);
}

/// A one-connection WebSocket server that completes the upgrade, reads one frame, then
/// writes `reply` raw and hangs up.
fn misbehaving_server(reply: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") && req.len() < 16 * 1024 {
            if c.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            req.push(b[0]);
        }
        let text = String::from_utf8_lossy(&req).to_string();
        let key = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let _ = write!(
            c,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        // The client's message: wait for it so the send step succeeds.
        let mut frame = [0u8; 64];
        let _ = c.read(&mut frame);
        let _ = c.write_all(&reply);
        let _ = c.flush();
        std::thread::sleep(Duration::from_millis(100));
    });
    port
}

fn bad_input_plan(dir: &Path, url: &str) -> PathBuf {
    let plan = dir.join("bad.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "bad"
[defaults]
timeout = "3s"
[scenarios.s]
executor = "per-vu-iterations"
vus = 1
iterations = 1
flow = "f"
[[flows.f.steps]]
name = "open"
ws = {{ open = "{url}" }}
[[flows.f.steps]]
name = "send"
ws = {{ send = "hello" }}
[[flows.f.steps]]
name = "receive"
ws = {{ receive = "next" }}
"#
        ),
    )
    .unwrap();
    plan
}

/// Runs the bad-input plan against `url` and returns (step that failed, its errors).
fn failure_of(url: &str) -> (String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (out, s) = run(&bad_input_plan(dir.path(), url), &[], dir.path());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the run took {:?}",
        started.elapsed()
    );
    let s = s.unwrap_or_else(|| panic!("no summary\n{}", show(&out)));
    let failed: Vec<(String, Value)> = s["requests"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["failed"].as_u64().unwrap_or(0) > 0)
        .map(|(k, v)| (k.clone(), v["errors"].clone()))
        .collect();
    assert_eq!(failed.len(), 1, "exactly one step fails: {failed:?}");
    assert_eq!(s["totals"]["failed"], 1, "{}", s["totals"]);
    failed.into_iter().next().unwrap()
}

#[test]
fn a_server_that_hangs_up_mid_message_is_one_connect_error() {
    // A text frame that announces 100 bytes, 10 of them sent, then the hang-up.
    let mut reply = vec![0x81, 100];
    reply.extend_from_slice(b"0123456789");
    let port = misbehaving_server(reply);
    let (step, errors) = failure_of(&format!("ws://127.0.0.1:{port}/x"));
    assert_eq!(step, "receive");
    assert_eq!(errors, serde_json::json!({"connect": 1}));
}

#[test]
fn a_server_that_hangs_up_between_fragments_is_one_connect_error() {
    // The first fragment of a text message (FIN clear), then the hang-up.
    let port = misbehaving_server(vec![0x01, 3, b'a', b'b', b'c']);
    let (step, errors) = failure_of(&format!("ws://127.0.0.1:{port}/x"));
    assert_eq!(step, "receive");
    assert_eq!(errors, serde_json::json!({"connect": 1}));
}

#[test]
fn a_malformed_frame_is_one_protocol_error() {
    // A text frame with a reserved bit set (no extension was agreed), and one masked by
    // the server (RFC 6455 5.1: a client must fail the connection on either).
    for reply in [
        vec![0xC1, 2, b'h', b'i'],
        vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2],
    ] {
        let port = misbehaving_server(reply.clone());
        let (step, errors) = failure_of(&format!("ws://127.0.0.1:{port}/x"));
        assert_eq!(step, "receive", "{reply:?}");
        assert_eq!(errors, serde_json::json!({"other": 1}), "{reply:?}");
    }
}

#[test]
fn an_oversized_message_in_fragments_is_refused() {
    // Five 4,000,000-byte fragments: each frame is within the 4 MiB limit, the message
    // (20 MB) is over the 16 MiB one; refused once the fragments pass it.
    let mut reply = Vec::with_capacity(5 * (4_000_010));
    for i in 0..5 {
        let first = i == 0;
        let last = i == 4;
        reply.push(if last { 0x80 } else { 0 } | if first { 0x02 } else { 0 });
        reply.push(127);
        reply.extend_from_slice(&4_000_000u64.to_be_bytes());
        reply.resize(reply.len() + 4_000_000, b'x');
    }
    let port = misbehaving_server(reply);
    let (step, errors) = failure_of(&format!("ws://127.0.0.1:{port}/x"));
    assert_eq!(step, "receive");
    assert_eq!(errors, serde_json::json!({"other": 1}));
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_read() {
    // A binary frame that claims 1 TiB: refused from its header, nothing allocated.
    let mut reply = vec![0x82, 127];
    reply.extend_from_slice(&(1u64 << 40).to_be_bytes());
    let port = misbehaving_server(reply);
    let (step, errors) = failure_of(&format!("ws://127.0.0.1:{port}/x"));
    assert_eq!(step, "receive");
    assert_eq!(errors, serde_json::json!({"other": 1}));
}

#[test]
fn no_such_endpoint_is_an_http_4xx_at_open() {
    let t = target();
    let url = t.url().replace("http://", "ws://") + "/ws/nope";
    let (step, errors) = failure_of(&url);
    assert_eq!(step, "open");
    assert_eq!(errors, serde_json::json!({"http_4xx": 1}));
}

#[test]
fn a_step_on_a_socket_no_step_opens_is_a_plan_error_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let plan = bad_input_plan(dir.path(), "ws://127.0.0.1:9/x");
    let text = std::fs::read_to_string(&plan).unwrap().replace(
        "ws = { receive = \"next\" }",
        "ws = { receive = \"next\", socket = \"chat\" }",
    );
    std::fs::write(&plan, text).unwrap();
    for cmd in ["validate", "run"] {
        let out = Command::new(BIN)
            .arg(cmd)
            .arg(&plan)
            .stdin(Stdio::null())
            .output()
            .expect("run stampede");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", show(&out));
        assert!(
            err.contains("bad.toml:18: flows.f.steps[2].ws: no step opens socket \"chat\""),
            "{cmd}: {}",
            show(&out)
        );
    }
}
