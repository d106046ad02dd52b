//! gRPC steps end to end: the real `stampede` binary against the demo shop's gRPC service
//! (h2c) with the calls counted on the server side, and the plan errors and hostile
//! answers a gRPC step must turn into one clear line or one error class.

mod mesh_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use stampede_tools::{TargetConfig, TargetHandle};

fn stampede() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stampede"))
}

fn target() -> TargetHandle {
    stampede_tools::spawn(TargetConfig {
        threads: 2,
        ..TargetConfig::default()
    })
    .expect("start stampede-target")
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/proto")
}

/// A plan directory holding `plan.toml` and the shop's inventory.proto.
fn plan_dir(plan: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        proto_dir().join("inventory.proto"),
        dir.path().join("inventory.proto"),
    )
    .unwrap();
    let p = dir.path().join("plan.toml");
    std::fs::write(&p, plan).unwrap();
    (dir, p)
}

fn run(plan: &Path, dir: &Path) -> (Output, Option<Value>) {
    let json = dir.join("summary.json");
    let out = stampede()
        .arg("run")
        .arg(plan)
        .args(["--quiet", "--out"])
        .arg(format!("json={}", json.display()))
        .output()
        .expect("run stampede");
    let summary = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("summary is JSON"));
    (out, summary)
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn shop_plan(url: &str, iterations: u32) -> String {
    let missing = 4 * iterations;
    format!(
        r#"
name = "grpc-shop"
[grpc]
proto = ["inventory.proto"]

[defaults]
base_url = "{url}"

[thresholds]
grpc_req_duration = ["p(99) < 5000"]
grpc_status_not_found = ["count == {missing}"]

[scenarios.stock]
executor = "per-vu-iterations"
vus = 4
iterations = {iterations}
flows = [{{ flow = "stock" }}]

[[flows.stock.steps]]
name = "get"
grpc = {{ method = "shop.Inventory/GetStock", message = {{ product_id = 2 }}, metadata = {{ x-shopper = "vu-{{{{vu}}}}" }}, timeout = "5s" }}
check = {{ grpc_status = "OK", json = {{ "$.warehouse" = "wh-2", "$.quantity" = 174 }} }}
extract = {{ pid = {{ json = "$.product_id" }} }}

[[flows.stock.steps]]
name = "watch"
grpc = {{ url = "{url}", method = "shop.Inventory/WatchStock", message = {{ product_id = "{{{{pid}}}}", updates = 3 }} }}
check = {{ json = {{ "$[2].quantity" = 172, "$[0].warehouse" = "wh-2" }} }}

[[flows.stock.steps]]
name = "missing"
grpc = {{ method = "shop.Inventory/GetStock", message = {{ product_id = 999999 }} }}
check = {{ grpc_status = ["NOT_FOUND"] }}
"#
    )
}

#[test]
fn unary_and_streaming_calls_are_counted_exactly_by_the_shop() {
    let t = target();
    let (dir, plan) = plan_dir(&shop_plan(&t.url(), 5));
    let (out, s) = run(&plan, dir.path());
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    let stats = t.stats();
    let get = stats.endpoints["gRPC shop.Inventory/GetStock"];
    let watch = stats.endpoints["gRPC shop.Inventory/WatchStock"];
    assert!(out.status.success(), "{}", show(&out));
    // 4 VUs × 5 iterations × (GetStock, WatchStock, GetStock of a missing product).
    assert_eq!(get, 4 * 5 * 2, "{}", show(&out));
    assert_eq!(watch, 4 * 5, "{}", show(&out));
    assert_eq!(s["totals"]["requests"].as_u64(), Some(get + watch));
    assert_eq!(s["totals"]["requests"].as_u64(), Some(t.requests()));
    assert_eq!(s["totals"]["failed"].as_u64(), Some(0), "{s}");
    // Per iteration: status + 2 JSON checks, status + 2 JSON checks, status.
    assert_eq!(
        s["totals"]["checks"]["passed"].as_u64(),
        Some(20 * 7),
        "{s}"
    );
    assert_eq!(s["totals"]["checks"]["failed"].as_u64(), Some(0), "{s}");
    // The gRPC metrics: a duration per call, a count per status, in every series.
    let m = &s["totals"]["metrics"];
    assert_eq!(
        m["grpc_req_duration"]["count"].as_u64(),
        Some(get + watch),
        "{s}"
    );
    assert_eq!(m["grpc_status_ok"]["count"].as_u64(), Some(40), "{s}");
    assert_eq!(
        m["grpc_status_not_found"]["count"].as_u64(),
        Some(20),
        "{s}"
    );
    assert_eq!(
        s["requests"]["missing"]["metrics"]["grpc_status_not_found"]["count"].as_u64(),
        Some(20),
        "{s}"
    );
    assert!(
        s["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["passed"] == true),
        "{}",
        s["thresholds"]
    );
}

/// Statuses a step does not accept are failed calls of their own class
/// (`grpc_not_found`, ...), exact in the JSON summary, the terminal table and the HTML
/// report, and selectable in thresholds with `http_req_failed{error=...}`; an OK where
/// the step wanted another status is `check_failed`.
#[test]
fn non_ok_statuses_are_error_classes_with_exact_counts() {
    let t = target();
    let url = t.url();
    let (dir, plan) = plan_dir(&format!(
        r#"
name = "grpc-errors"
[grpc]
proto = ["inventory.proto"]
[defaults]
base_url = "{url}"

[thresholds]
"http_req_failed{{error=grpc_not_found}}" = ["count == 10"]
"http_req_failed{{error=grpc_out_of_range, scenario=watch}}" = ["count == 10", "rate == 100%"]
"http_req_failed{{error=grpc_unavailable}}" = ["count == 0"]

[scenarios.lookup]
executor = "per-vu-iterations"
vus = 2
iterations = 5
flows = [{{ flow = "lookup" }}]

[scenarios.watch]
executor = "per-vu-iterations"
vus = 2
iterations = 5
flows = [{{ flow = "watch" }}]

[scenarios.wrong]
executor = "per-vu-iterations"
vus = 2
iterations = 5
flows = [{{ flow = "wrong" }}]

[[flows.lookup.steps]]
name = "found"
grpc = {{ method = "shop.Inventory/GetStock", message = {{ product_id = 2 }} }}

[[flows.lookup.steps]]
name = "missing"
grpc = {{ method = "shop.Inventory/GetStock", message = {{ product_id = 999999 }} }}

[[flows.watch.steps]]
name = "too many"
grpc = {{ method = "shop.Inventory/WatchStock", message = {{ product_id = 2, updates = 101 }} }}

[[flows.wrong.steps]]
name = "wants missing"
grpc = {{ method = "shop.Inventory/GetStock", message = {{ product_id = 2 }} }}
check = {{ grpc_status = "NOT_FOUND" }}
"#
    ));
    let json = dir.path().join("summary.json");
    let html = dir.path().join("report.html");
    let out = stampede()
        .arg("run")
        .arg(&plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .arg("--out")
        .arg(format!("html={}", html.display()))
        .output()
        .expect("run stampede");
    assert!(out.status.success(), "{}", show(&out));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let stats = t.stats();
    assert_eq!(stats.endpoints["gRPC shop.Inventory/GetStock"], 30, "{s}");
    assert_eq!(stats.endpoints["gRPC shop.Inventory/WatchStock"], 10, "{s}");
    assert_eq!(s["totals"]["requests"].as_u64(), Some(40), "{s}");
    assert_eq!(s["totals"]["failed"].as_u64(), Some(30), "{s}");
    assert_eq!(
        s["totals"]["errors"],
        serde_json::json!({ "grpc_not_found": 10, "grpc_out_of_range": 10, "check_failed": 10 }),
        "{s}"
    );
    assert_eq!(
        s["requests"]["missing"]["errors"],
        serde_json::json!({ "grpc_not_found": 10 }),
        "{s}"
    );
    assert_eq!(
        s["totals"]["metrics"]["grpc_status_out_of_range"]["count"].as_u64(),
        Some(10),
        "{s}"
    );
    let thresholds = s["thresholds"].as_array().unwrap();
    assert_eq!(thresholds.len(), 4, "{}", s["thresholds"]);
    assert!(
        thresholds.iter().all(|t| t["passed"] == true),
        "{}",
        s["thresholds"]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("check_failed 10, grpc_not_found 10, grpc_out_of_range 10"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(&html).unwrap();
    assert!(report.contains("\"grpc_out_of_range\":10"), "{report}");
}

fn validate(plan: &Path) -> (Option<i32>, String) {
    let out = stampede().arg("validate").arg(plan).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_protos_methods_and_messages_are_one_plan_error_each() {
    let url = "http://127.0.0.1:9";
    let good = shop_plan(url, 1);

    // A malformed .proto: its file and line.
    let (dir, plan) = plan_dir(&good);
    std::fs::write(
        dir.path().join("inventory.proto"),
        "syntax = \"proto3\";\npackage shop;\nmessage A {\n  uint32 x = ;\n}\n",
    )
    .unwrap();
    let (code, err) = validate(&plan);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("inventory.proto:4"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // An unknown method: the step's line and the methods there are.
    let (_dir, plan) = plan_dir(&good.replace(
        "GetStock\", message = { product_id = 999999",
        "GetStocks\", message = { product_id = 999999",
    ));
    let (code, err) = validate(&plan);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("plan.toml:30: flows.stock.steps[2].grpc.method")
            && err.contains("no method \"GetStocks\"")
            && err.contains("WatchStock"),
        "{err}"
    );

    // A message that does not match the schema: the field, and where.
    let (_dir, plan) = plan_dir(&good.replace("updates = 3", "updates = \"many\""));
    let (code, err) = validate(&plan);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("plan.toml:25: flows.stock.steps[1].grpc") && err.contains("message.updates"),
        "{err}"
    );
    let (_dir, plan) = plan_dir(&good.replace("updates = 3", "updatez = 3"));
    let (_, err) = validate(&plan);
    assert!(err.contains("no field \"updatez\""), "{err}");

    // A .proto path that leaves the plan's directory.
    let (_dir, plan) = plan_dir(&good.replace(
        "proto = [\"inventory.proto\"]",
        "proto = [\"../inventory.proto\"]",
    ));
    let (code, err) = validate(&plan);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("grpc.proto") && err.contains("relative path"),
        "{err}"
    );
}

/// Client-streaming and bidirectional calls: `messages = [...]` sent in order (templated),
/// the answer a message (client-streaming) or an array (bidi) for checks and extracts,
/// counted by the shop; and the plan errors of a `message`/`messages` that does not fit
/// the method.
#[test]
fn client_streaming_and_bidi_calls_send_their_messages_in_order() {
    let t = target();
    let url = t.url();
    let good = format!(
        r#"
name = "grpc-streams"
[grpc]
proto = ["inventory.proto"]
[defaults]
base_url = "{url}"
[scenarios.s]
executor = "per-vu-iterations"
vus = 2
iterations = 4
flows = [{{ flow = "f" }}]

[[flows.f.steps]]
name = "total"
grpc = {{ method = "shop.Inventory/TotalStock", messages = [{{ product_id = 1 }}, {{ product_id = "{{{{vu}}}}" }}, {{ product_id = 3 }}] }}
check = {{ json = {{ "$.products" = 3 }} }}
extract = {{ qty = {{ json = "$.quantity" }} }}

[[flows.f.steps]]
name = "feed"
grpc = {{ method = "shop.Inventory/StockFeed", messages = [{{ product_id = 2 }}, {{ product_id = 7 }}], metadata = {{ x-total = "{{{{qty}}}}" }} }}
check = {{ json = {{ "$[0].quantity" = 174, "$[1].quantity" = 359, "$[1].warehouse" = "wh-3" }} }}

[[flows.f.steps]]
name = "feed missing"
grpc = {{ method = "shop.Inventory/StockFeed", messages = [{{ product_id = 2 }}, {{ product_id = 0 }}] }}
check = {{ grpc_status = "NOT_FOUND", json = {{ "$[0].product_id" = 2 }} }}
"#
    );
    let (dir, plan) = plan_dir(&good);
    let (out, s) = run(&plan, dir.path());
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    assert!(out.status.success(), "{}", show(&out));
    let stats = t.stats();
    assert_eq!(stats.endpoints["gRPC shop.Inventory/TotalStock"], 8, "{s}");
    assert_eq!(stats.endpoints["gRPC shop.Inventory/StockFeed"], 16, "{s}");
    assert_eq!(s["totals"]["requests"].as_u64(), Some(24), "{s}");
    assert_eq!(s["totals"]["failed"].as_u64(), Some(0), "{s}");
    // Per iteration: status + 1 JSON check, status + 3, status + 1.
    assert_eq!(s["totals"]["checks"]["passed"].as_u64(), Some(8 * 8), "{s}");
    assert_eq!(
        s["totals"]["metrics"]["grpc_status_not_found"]["count"].as_u64(),
        Some(8),
        "{s}"
    );

    // One plan error each, exit code 2.
    let refused = |from: &str, to: &str| -> String {
        let (_dir, plan) = plan_dir(&good.replace(from, to));
        let (code, err) = validate(&plan);
        assert_eq!(code, Some(2), "{err}");
        err
    };
    let err = refused(
        "TotalStock\", messages = [{ product_id = 1 }, { product_id = \"{{vu}}\" }, { product_id = 3 }]",
        "TotalStock\", message = { product_id = 1 }",
    );
    assert!(
        err.contains("flows.f.steps[0].grpc.message")
            && err.contains("client-streaming call: write its request messages as messages = ["),
        "{err}"
    );
    let err = refused("TotalStock\", messages", "GetStock\", messages");
    assert!(err.contains("takes one request message"), "{err}");
    let err = refused("{ product_id = 7 }", "{ product_idd = 7 }");
    assert!(
        err.contains("messages[1].product_idd") && err.contains("no field \"product_idd\""),
        "{err}"
    );
    let feed = "messages = [{ product_id = 2 }, { product_id = 7 }]";
    let err = refused(feed, "messages = [{ product_id = 2 }, 7]");
    assert!(err.contains("messages[1] is not a table"), "{err}");
    let err = refused(feed, "message = { product_id = 2 }, messages = []");
    assert!(err.contains("not both"), "{err}");
}

/// Reads the HTTP/2 client preface and frames until a HEADERS frame; false if the
/// connection ends or stalls first.
fn read_until_headers(c: &mut std::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut at = 24;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf[at + 3] == 1 {
                return true;
            }
            at += 9 + len;
        }
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) if buf.len() < 1 << 20 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return false,
        }
    }
}

/// A raw HTTP/2 server on loopback that answers each of `calls` connections' first
/// call with our SETTINGS and then `frames` (already encoded), and closes. Returns its
/// address and how many calls it answered.
fn raw_h2_server(
    calls: usize,
    frames: Vec<u8>,
) -> (std::net::SocketAddr, std::thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut served = 0;
        // Bounded: the run may make fewer calls than planned; the test compares counts.
        listener.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while served < calls && std::time::Instant::now() < until {
            let mut c = match listener.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
            };
            c.set_nonblocking(false).ok();
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .ok();
            // Read the client preface and frames until the call's HEADERS frame.
            if !read_until_headers(&mut c) {
                continue;
            }
            let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
            let _ = c.write_all(&settings);
            let _ = c.write_all(&frames);
            served += 1;
            drop(c);
        }
        served
    });
    (addr, server)
}

/// A plan of 3 calls of GetStock to `addr`, each by its own VU and so on its own
/// connection: the raw server closes each connection after its one answer (with
/// frames of the client's still unread, so often as a reset), and a VU that reused
/// that connection for its next call would race the close — a call on a connection the
/// server has dropped is rightly `unavailable`, but not what these tests look at.
fn three_calls(addr: std::net::SocketAddr) -> (tempfile::TempDir, PathBuf) {
    plan_dir(&format!(
        r#"
expect_failures = true
[grpc]
proto = ["inventory.proto"]
[scenarios.s]
executor = "per-vu-iterations"
vus = 3
iterations = 1
flows = [{{ flow = "f" }}]
[[flows.f.steps]]
grpc = {{ url = "http://{addr}", method = "shop.Inventory/GetStock", message = {{ product_id = 1 }}, timeout = "3s" }}
"#
    ))
}

/// A server that answers every call with the headers and the first 3 bytes of a 100-byte
/// message, then closes the connection: one error class, no panic, no hang.
#[test]
fn a_server_closing_mid_message_is_one_error_class() {
    // A HEADERS frame (stream 1, END_HEADERS) with ":status: 200" (HPACK static index
    // 8), and a DATA frame holding a gRPC message prefix that promises 100 bytes but
    // carries 3.
    let mut frames = vec![0, 0, 1, 1, 4, 0, 0, 0, 1, 0x88];
    frames.extend_from_slice(&[0, 0, 8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 100, 1, 2, 3]);
    let (addr, server) = raw_h2_server(3, frames);
    let (dir, plan) = three_calls(addr);
    let (out, s) = run(&plan, dir.path());
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    let served = server.join().unwrap() as u64;
    assert!(served >= 1, "{s}");
    assert_eq!(s["totals"]["requests"].as_u64(), Some(served), "{s}");
    assert_eq!(s["totals"]["failed"].as_u64(), Some(served), "{s}");
    // A call the server broke off is reported as gRPC clients do: UNAVAILABLE.
    assert_eq!(
        s["totals"]["metrics"]["grpc_status_unavailable"]["count"].as_u64(),
        Some(served),
        "{s}"
    );
    let errors = s["totals"]["errors"].as_object().unwrap();
    let classes: Vec<_> = errors
        .iter()
        .filter(|(_, n)| n.as_u64() > Some(0))
        .collect();
    assert_eq!(classes.len(), 1, "{errors:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// An answer that is not gRPC (an HTTP 404 page, as a plain web server or a proxy sends
/// it) takes its status from gRPC's HTTP mapping: UNIMPLEMENTED, a failed call of class
/// `grpc_unimplemented` — not a protocol error from parsing the page as gRPC frames.
#[test]
fn a_non_grpc_answer_gets_its_status_from_http() {
    // HEADERS (END_HEADERS) ":status: 404" (HPACK static index 13), then a DATA frame
    // with END_STREAM carrying `{"e":1}`.
    let mut frames = vec![0, 0, 1, 1, 4, 0, 0, 0, 1, 0x8d];
    frames.extend_from_slice(&[0, 0, 7, 0, 1, 0, 0, 0, 1]);
    frames.extend_from_slice(br#"{"e":1}"#);
    let (addr, server) = raw_h2_server(3, frames);
    let (dir, plan) = three_calls(addr);
    let (out, s) = run(&plan, dir.path());
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    let served = server.join().unwrap() as u64;
    assert!(served >= 1, "{s}");
    assert_eq!(s["totals"]["failed"].as_u64(), Some(served), "{s}");
    assert_eq!(
        s["totals"]["errors"]["grpc_unimplemented"].as_u64(),
        Some(served),
        "{s}"
    );
    assert_eq!(
        s["totals"]["metrics"]["grpc_status_unimplemented"]["count"].as_u64(),
        Some(served),
        "{s}"
    );
}

/// Python's grpcio server (node/tests/grpc_support/inventory_server.py), started by the
/// test; its counts come back on its stdout when its stdin closes.
struct PyServer {
    child: std::process::Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PyServer {
    fn start(tls: Option<(&Path, &Path)>) -> PyServer {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_support/inventory_server.py");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script);
        if let Some((cert, key)) = tls {
            cmd.arg(cert).arg(key);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start /usr/bin/python3 (Debian's python3-grpcio, python3-protobuf)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            while let Some(Ok(line)) = lines.next() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the grpcio server says its port within 30 s");
        let port = first
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        PyServer {
            child,
            port,
            lines: rx,
        }
    }

    /// Closes the server's stdin and returns the calls it counted.
    fn finish(mut self) -> Value {
        drop(self.child.stdin.take());
        let line = self
            .lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the grpcio server prints its counts");
        let _ = self.child.wait();
        serde_json::from_str(&line).expect("counts are JSON")
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn interop_plan(url: &str, tls: bool) -> String {
    format!(
        r#"
name = "grpc-interop"
[grpc]
proto = ["inventory.proto"]
[defaults]
insecure_skip_tls_verify = {tls}
[scenarios.s]
executor = "shared-iterations"
vus = 3
iterations = 20
flows = [{{ flow = "f" }}]
[[flows.f.steps]]
name = "get"
grpc = {{ url = "{url}", method = "shop.Inventory/GetStock", message = {{ productId = "{{{{iteration}}}}1" }}, metadata = {{ x-shopper = "vu-{{{{vu}}}}" }} }}
check = {{ header = {{ x-served-by = "grpcio" }} }}
extract = {{ wh = {{ json = "$.warehouse" }} }}
[[flows.f.steps]]
name = "watch"
grpc = {{ url = "{url}", method = "shop.Inventory/WatchStock", message = {{ product_id = 10, updates = 4 }} }}
check = {{ json = {{ "$[3].quantity" = 987, "$[0].warehouse" = "py-1" }} }}
[[flows.f.steps]]
name = "missing"
grpc = {{ url = "{url}", method = "shop.Inventory/GetStock", message = {{ product_id = 5000 }} }}
check = {{ grpc_status = "NOT_FOUND" }}
[[flows.f.steps]]
name = "total"
grpc = {{ url = "{url}", method = "shop.Inventory/TotalStock", messages = [{{ product_id = 10 }}, {{ productId = "2{{{{vu}}}}" }}, {{ product_id = 30 }}] }}
check = {{ json = {{ "$.products" = 3 }} }}
[[flows.f.steps]]
name = "feed"
grpc = {{ url = "{url}", method = "shop.Inventory/StockFeed", messages = [{{ product_id = 5 }}, {{ product_id = 6 }}] }}
check = {{ json = {{ "$[0].quantity" = 995, "$[1].quantity" = 994, "$[1].warehouse" = "py-0" }} }}
"#
    )
}

fn interop(tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    if tls {
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args([
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "{}", show(&out));
    }
    let server = PyServer::start(tls.then_some((cert.as_path(), key.as_path())));
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{}", server.port);
    std::fs::copy(
        proto_dir().join("inventory.proto"),
        dir.path().join("inventory.proto"),
    )
    .unwrap();
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, interop_plan(&url, tls)).unwrap();
    let (out, s) = run(&plan, dir.path());
    let counts = server.finish();
    let s = s.unwrap_or_else(|| panic!("no summary: {}", show(&out)));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(counts["GetStock"], 40, "{counts} {}", show(&out));
    assert_eq!(counts["WatchStock"], 20, "{counts}");
    assert_eq!(counts["streamed"], 80, "{counts}");
    // Only the first step sends x-shopper.
    assert_eq!(counts["metadata_ok"], 20, "{counts}");
    // Client-streaming and bidi: every message each call sent reached grpcio.
    assert_eq!(counts["TotalStock"], 20, "{counts}");
    assert_eq!(counts["StockFeed"], 20, "{counts}");
    assert_eq!(counts["received"], 20 * (3 + 2), "{counts}");
    assert_eq!(s["totals"]["requests"].as_u64(), Some(100), "{s}");
    assert_eq!(s["totals"]["failed"].as_u64(), Some(0), "{s}");
    assert_eq!(s["totals"]["checks"]["failed"].as_u64(), Some(0), "{s}");
}

#[test]
fn interop_with_python_grpcio_over_h2c() {
    interop(false);
}

#[test]
fn interop_with_python_grpcio_over_tls() {
    interop(true);
}

/// A mesh run of two nodes: the .proto travels in the plan bundle (neither node reads it
/// from disk), and the merged report counts exactly what the shop counted.
#[test]
fn a_mesh_run_ships_the_proto_and_counts_exactly() {
    let mesh = mesh_support::Mesh::new();
    let env = &[("STAMPEDE_CAPACITY", "1")];
    let n1 = mesh.node("n1", &[], env);
    let a1 = n1.addr();
    let n2 = mesh.node("n2", &["--bootstrap", a1.as_str()], env);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(
        mesh_support::wait_until(std::time::Duration::from_secs(30), || {
            mesh_support::all_see(&[&n1, &n2], &ids)
        }),
        "the mesh did not form"
    );
    let t = target();
    let plan_text = shop_plan(&t.url(), 5)
        .replace(
            "executor = \"per-vu-iterations\"",
            "executor = \"shared-iterations\"",
        )
        .replace("iterations = 5", "iterations = 30")
        .replace("count == 20", "count == 30")
        .replace(
            "[scenarios.stock]",
            "[requirements]\nmin_nodes = 2\n\n[scenarios.stock]",
        )
        // NOT_FOUND no longer accepted: 30 failed calls of class grpc_not_found, whose
        // counts travel in the snapshots' `errors_more`.
        .replace("check = { grpc_status = [\"NOT_FOUND\"] }\n", "");
    let (dir, plan) = plan_dir(&plan_text);
    let json = dir.path().join("summary.json");
    let out = Command::new(mesh_support::BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir"])
        .arg(&n2.dir)
        .arg(&plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run stampede");
    assert!(out.status.success(), "{}", show(&out));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let stats = t.stats();
    assert_eq!(stats.endpoints["gRPC shop.Inventory/GetStock"], 60);
    assert_eq!(stats.endpoints["gRPC shop.Inventory/WatchStock"], 30);
    assert_eq!(s["totals"]["requests"].as_u64(), Some(t.requests()), "{s}");
    assert_eq!(s["totals"]["requests"].as_u64(), Some(90), "{s}");
    assert_eq!(s["nodes"].as_array().unwrap().len(), 2, "{}", s["nodes"]);
    let m = &s["totals"]["metrics"];
    assert_eq!(m["grpc_req_duration"]["count"].as_u64(), Some(90), "{s}");
    assert_eq!(
        m["grpc_status_not_found"]["count"].as_u64(),
        Some(30),
        "{s}"
    );
    assert_eq!(
        s["totals"]["errors"],
        serde_json::json!({ "grpc_not_found": 30 }),
        "{s}"
    );
    // Each node's share, the other node's as it came over the wire.
    let mut sum = 0;
    for n in s["nodes"].as_array().unwrap() {
        let e = n["stats"]["errors"]["grpc_not_found"].as_u64().unwrap_or(0);
        assert_eq!(Some(e), n["failed"].as_u64(), "{n}");
        sum += e;
    }
    assert_eq!(sum, 30, "{}", s["nodes"]);
}
