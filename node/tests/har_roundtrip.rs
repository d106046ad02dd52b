//! The HAR import, for real: headless Chromium walks the demo shop's storefront (search,
//! product, login, cart, checkout), the test records a HAR from the browser's own
//! DevTools protocol (Network events), `stampede import har` turns it into a plan, and
//! 20 VUs run it. The shop's `/_stats` must then show every API call of the journey
//! exactly 20 times what the browser made, with no 4xx — which needs the login token
//! correlated; the same plan imported with `--no-correlate` must get 4xx.
//!
//! The DevTools protocol runs over `--remote-debugging-pipe` (JSON messages ended by a
//! NUL byte on file descriptors 3 and 4): no port, no WebSocket client, no Python.

mod browser_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Bound on one DevTools answer or awaited event.
const CDP_WAIT: Duration = Duration::from_secs(20);
/// VUs that replay the imported journey.
const VUS: u64 = 20;

/// A headless Chromium driven over the DevTools pipe.
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    next_id: u64,
    /// Events seen while waiting for answers, in order.
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let (child_reads, to) = std::io::pipe().expect("pipe");
        let (from_raw, child_writes) = std::io::pipe().expect("pipe");
        let (r, w) = (child_reads.as_raw_fd(), child_writes.as_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            // Nothing but loopback (which Chromium never sends through a proxy): any
            // other request goes to a closed port.
            "--proxy-server=127.0.0.1:9",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The
        // pipe ends are first copied above 10 so that dup2 onto 3 and 4 cannot clobber
        // one with the other; dup2 clears close-on-exec on the copies.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((child_reads, child_writes));
        let (tx, from) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_raw);
            loop {
                let mut msg = Vec::new();
                match reader.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        msg.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice::<Value>(&msg) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Browser {
            child,
            to,
            from,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        }
    }

    /// Sends a command (to a page's session, or the browser) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("encode");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + CDP_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v.get("id").and_then(Value::as_u64) == Some(id) => {
                    if let Some(e) = v.get("error") {
                        panic!("{method}: chromium answered with an error: {e}");
                    }
                    return v["result"].clone();
                }
                Ok(v) => self.events.push(v),
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no answer within {CDP_WAIT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: chromium went away"),
            }
        }
    }

    /// Waits until an event `method` has arrived (it may have already).
    fn wait_event(&mut self, method: &str) {
        if self.events.iter().any(|e| e["method"] == method) {
            return;
        }
        let deadline = Instant::now() + CDP_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) => {
                    let hit = v["method"] == method;
                    self.events.push(v);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no {method} event within {CDP_WAIT:?}"),
            }
        }
    }

    /// Runs a user action in the page (an async function body) and waits for it.
    fn act(&mut self, session: &str, what: &str, body: &str) {
        let expr = format!("(async () => {{ {UNTIL} {body} }})()");
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            let page = self.call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": "document.body.innerText", "returnByValue": true }),
            );
            panic!(
                "{what}: the page threw: {ex}\npage: {}",
                page["result"]["value"]
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bounded wait inside the page for what a user would look at.
const UNTIL: &str = "const until = (f, what) => new Promise((ok, no) => { const t0 = Date.now(); \
    const tick = () => { let v = false; try { v = f(); } catch (e) {} \
    if (v) ok(v); else if (Date.now() - t0 > 10000) no(new Error('timed out: ' + what)); \
    else setTimeout(tick, 20); }; tick(); });";

/// One request the browser made, put together from its Network events.
#[derive(Default)]
struct Exchange {
    request: Value,
    wall_time: f64,
    started: f64,
    finished: Option<f64>,
    response: Option<Value>,
    kind: String,
    failed: bool,
}

/// HAR 1.2 from the Network events of one page session.
fn har_from_events(b: &mut Browser, session: &str, title: &str) -> Value {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: HashMap<String, Exchange> = HashMap::new();
    for e in &b.events {
        let p = &e["params"];
        let Some(id) = p["requestId"].as_str() else {
            continue;
        };
        match e["method"].as_str().unwrap_or("") {
            "Network.requestWillBeSent" => {
                order.push(id.to_string());
                by_id.insert(
                    id.to_string(),
                    Exchange {
                        request: p["request"].clone(),
                        wall_time: p["wallTime"].as_f64().unwrap_or(0.0),
                        started: p["timestamp"].as_f64().unwrap_or(0.0),
                        kind: p["type"].as_str().unwrap_or("").to_ascii_lowercase(),
                        ..Exchange::default()
                    },
                );
            }
            "Network.responseReceived" => {
                if let Some(x) = by_id.get_mut(id) {
                    x.response = Some(p["response"].clone());
                }
            }
            "Network.loadingFinished" => {
                if let Some(x) = by_id.get_mut(id) {
                    x.finished = p["timestamp"].as_f64();
                }
            }
            "Network.loadingFailed" => {
                if let Some(x) = by_id.get_mut(id) {
                    x.failed = true;
                }
            }
            _ => {}
        }
    }
    let pairs = |v: &Value| -> Vec<Value> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| json!({ "name": k, "value": v.as_str().unwrap_or("") }))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut entries = Vec::new();
    let mut first_wall = None;
    for id in order {
        let x = &by_id[&id];
        let url = x.request["url"].as_str().unwrap_or("");
        if !url.starts_with("http") {
            continue;
        }
        first_wall.get_or_insert(x.wall_time);
        let resp = x.response.clone().unwrap_or(json!({}));
        let body = if x.finished.is_some() && !x.failed {
            b.call(
                Some(session),
                "Network.getResponseBody",
                json!({ "requestId": id }),
            )
        } else {
            json!({})
        };
        let mut content = json!({
            "size": body["body"].as_str().map_or(0, str::len),
            "mimeType": resp["mimeType"].as_str().unwrap_or(""),
        });
        if let Some(t) = body["body"].as_str() {
            content["text"] = json!(t);
            if body["base64Encoded"].as_bool() == Some(true) {
                content["encoding"] = json!("base64");
            }
        }
        let mut request = json!({
            "method": x.request["method"],
            "url": url,
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": pairs(&x.request["headers"]),
            "queryString": [],
            "headersSize": -1,
            "bodySize": x.request["postData"].as_str().map_or(0, str::len),
        });
        if let Some(post) = x.request["postData"].as_str() {
            let mime = x.request["headers"]
                .as_object()
                .and_then(|h| {
                    h.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                        .and_then(|(_, v)| v.as_str())
                })
                .unwrap_or("");
            request["postData"] = json!({ "mimeType": mime, "text": post });
        }
        entries.push(json!({
            "pageref": "page_1",
            "startedDateTime": iso8601(x.wall_time),
            "time": x.finished.map_or(0.0, |f| (f - x.started) * 1000.0),
            "request": request,
            "response": {
                "status": if x.failed { 0 } else { resp["status"].as_u64().unwrap_or(0) },
                "statusText": resp["statusText"].as_str().unwrap_or(""),
                "httpVersion": "HTTP/1.1",
                "cookies": [],
                "headers": pairs(&resp["headers"]),
                "content": content,
                "redirectURL": "",
                "headersSize": -1,
                "bodySize": -1,
            },
            "cache": {},
            "timings": { "send": 0, "wait": 0, "receive": 0 },
            "_resourceType": x.kind,
        }));
    }
    json!({ "log": {
        "version": "1.2",
        "creator": { "name": "stampede har_roundtrip test (Chromium DevTools protocol)", "version": "1" },
        "pages": [{
            "id": "page_1",
            "title": title,
            "startedDateTime": iso8601(first_wall.unwrap_or(0.0)),
            "pageTimings": {},
        }],
        "entries": entries,
    }})
}

/// Unix seconds → `2026-12-05T22:10:00.123Z`.
fn iso8601(unix: f64) -> String {
    let ms = (unix * 1000.0).round() as i64;
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The shop's `/_stats`, read over HTTP as any client would.
fn stats(addr: &str) -> Value {
    let (status, body) = browser_support::http_get(addr, "/_stats");
    assert_eq!(status, 200, "/_stats: {body}");
    serde_json::from_str(&body).expect("/_stats is JSON")
}

fn stampede(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stampede"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run stampede")
}

/// Imports the HAR, lets every VU log in as its own account (the recording's user1
/// would be shared by all 20, and a new login ends the account's older session) and
/// runs it with 20 VUs. Returns the plan text.
fn import_and_run(dir: &Path, har: &Path, extra: &[&str], tag: &str) -> String {
    let plan = dir.join(format!("{tag}.toml"));
    let mut args = vec![
        "import",
        "har",
        har.to_str().unwrap(),
        "--out",
        plan.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = stampede(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "import {tag}: {stderr}");
    eprintln!("{stderr}");
    let text = std::fs::read_to_string(&plan).expect("plan written");
    // Parameterise the recorded account, as docs/har-import.md tells users to.
    assert_eq!(text.matches("\"user1\"").count(), 1, "{text}");
    assert_eq!(text.matches("\"pass1\"").count(), 1, "{text}");
    let text = text
        .replace("\"user1\"", "\"user{{ vu }}\"")
        .replace("\"pass1\"", "\"pass{{ vu }}\"");
    std::fs::write(&plan, &text).unwrap();
    let out = stampede(&["validate", plan.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "validate {tag}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vus = format!("scenarios.recording.vus={VUS}");
    let out = stampede(&["run", plan.to_str().unwrap(), "--quiet", "--set", &vus]);
    eprintln!(
        "run {tag}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    text
}

#[test]
fn a_browser_recording_imported_and_replayed_by_20_vus() {
    let Some(chromium) = browser_support::chromium("har_roundtrip") else {
        return;
    };
    let target = stampede_tools::spawn(stampede_tools::TargetConfig::default()).expect("target");
    let addr = target.addr().to_string();
    let url = target.url();

    // A user's journey through the storefront, recorded by the browser.
    let mut b = Browser::start(&chromium);
    let t = b.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
    let target_id = t["targetId"].as_str().expect("targetId").to_string();
    let a = b.call(
        None,
        "Target.attachToTarget",
        json!({ "targetId": target_id, "flatten": true }),
    );
    let s = a["sessionId"].as_str().expect("sessionId").to_string();
    b.call(Some(&s), "Network.enable", json!({}));
    b.call(Some(&s), "Page.enable", json!({}));
    b.call(
        Some(&s),
        "Page.navigate",
        json!({ "url": format!("{url}/") }),
    );
    b.wait_event("Page.loadEventFired");
    b.act(
        &s,
        "front page",
        "await until(() => document.querySelectorAll('#results li').length === 20, 'front page');",
    );
    b.act(
        &s,
        "search",
        "document.querySelector('#q').value = 'oak'; document.querySelector('#search').click(); \
         await until(() => [...document.querySelectorAll('#results li')].every(li => li.textContent.includes('Oak')) \
           && document.querySelectorAll('#results li').length === 20, 'search results');",
    );
    b.act(
        &s,
        "product",
        "const btn = document.querySelector('#results li:nth-child(13) button'); btn.click(); \
         await until(() => document.querySelector('#product').dataset.id === btn.dataset.id, 'product');",
    );
    b.act(
        &s,
        "login",
        "document.querySelector('#user').value = 'user1'; document.querySelector('#password').value = 'pass1'; \
         document.querySelector('#login').click(); \
         await until(() => document.querySelector('#who').textContent.includes('user1'), 'login');",
    );
    b.act(
        &s,
        "add to cart",
        "document.querySelector('#add').click(); \
         await until(() => document.querySelector('#cart').textContent === '1', 'cart');",
    );
    b.act(
        &s,
        "checkout",
        "document.querySelector('#checkout').click(); \
         await until(() => document.querySelector('#order').dataset.order, 'order');",
    );
    let har = har_from_events(&mut b, &s, "stampede shop");
    drop(b);

    let browser = stats(&addr);
    let endpoints = browser["endpoints"].as_object().expect("endpoints").clone();
    let journey: Vec<(&str, u64)> = endpoints
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!("the browser's journey: {journey:?}");
    for api in [
        "GET /products",
        "GET /products/{id}",
        "POST /login",
        "POST /cart",
        "POST /checkout",
        "GET /account",
    ] {
        assert!(
            endpoints[api].as_u64().unwrap_or(0) > 0,
            "the browser never called {api}: {browser}"
        );
    }
    assert_eq!(endpoints["other"], 0, "{browser}");

    let tmp = tempfile::tempdir().unwrap();
    // HAR_ROUNDTRIP_KEEP=DIR keeps the recording and the plans there to look at.
    let keep = std::env::var_os("HAR_ROUNDTRIP_KEEP").map(std::path::PathBuf::from);
    let dir = keep.as_deref().unwrap_or(tmp.path());
    std::fs::create_dir_all(dir).unwrap();
    let har_file = dir.join("shop.har");
    std::fs::write(&har_file, serde_json::to_vec_pretty(&har).unwrap()).unwrap();

    // Correlated: every call arrives 20 times as often as the browser made it, no 4xx.
    target.reset_stats();
    let plan = import_and_run(dir, &har_file, &[], "correlated");
    assert!(
        plan.contains("extract = { token = { json = \"$.token\" } }"),
        "{plan}"
    );
    assert!(
        plan.contains("authorization = \"Bearer {{ token }}\""),
        "{plan}"
    );
    assert!(
        !plan.contains("/shop.js") && !plan.contains("/logo.svg"),
        "{plan}"
    );
    let after = stats(&addr);
    for (api, n) in &journey {
        assert_eq!(
            after["endpoints"][*api].as_u64(),
            Some(n * VUS),
            "{api}: the browser made it {n} time(s), so {VUS} VUs should make it {} times: {after}\n{plan}",
            n * VUS
        );
    }
    for (code, n) in after["statuses"].as_object().unwrap() {
        if code.starts_with('4') {
            assert_eq!(n, 0, "status {code} answered {n} time(s): {after}\n{plan}");
        }
    }

    // Without correlation the recorded token is replayed: its session was ended by the
    // VUs' logins, so the shop refuses it. This is what the check above guards against.
    target.reset_stats();
    let plain = import_and_run(dir, &har_file, &["--no-correlate"], "plain");
    assert!(!plain.contains("{{ token }}"), "{plain}");
    let after = stats(&addr);
    let refused: u64 = after["statuses"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(c, _)| c.starts_with('4'))
        .map(|(_, n)| n.as_u64().unwrap_or(0))
        .sum();
    assert!(
        refused > 0,
        "replaying the recorded token got no 4xx: {after}\n{plain}"
    );
}
