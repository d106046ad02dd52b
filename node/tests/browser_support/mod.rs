//! Shared helpers of the browser tests: find headless Chromium (a test FAILS without it
//! under CI=true and prints SKIPPED otherwise), dump a page's DOM after its scripts ran,
//! screenshot it, and a tiny HTTP GET over loopback.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser, or None after printing SKIPPED (only outside CI: in CI it panics).
pub fn chromium(test: &str) -> Option<PathBuf> {
    let p = Path::new(CHROMIUM);
    if p.exists() {
        return Some(p.to_path_buf());
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{test}: {CHROMIUM} is missing; .ci/run installs chromium (apt-get install chromium)"
    );
    eprintln!("SKIPPED {test}: {CHROMIUM} not installed (install the chromium package)");
    None
}

/// How long one Chromium run may take. Normal runs here take a few seconds.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// Runs headless Chromium with the network locked to loopback and a fresh profile.
fn run(browser: &Path, extra: &[String], url: &str, offline: bool) -> std::process::Output {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(browser);
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
        "--hide-scrollbars",
        "--mute-audio",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    if offline {
        // Any request that is not file:// goes to a closed port and fails.
        cmd.arg("--proxy-server=127.0.0.1:9")
            .arg("--proxy-bypass-list=<-loopback>");
    }
    cmd.args(extra).arg(url);
    cmd.stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    wait_bounded(child, RUN_LIMIT)
}

/// Waits for a child at most `limit`, killing it after that. Its output is read while
/// it runs: a page whose DOM is larger than the pipe's buffer (64 KiB; the report of a
/// long run) would otherwise block Chromium on writing it until the limit.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                break child.wait().expect("chromium exit status");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for chromium: {e}"),
        }
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// The DOM once the page has loaded and, with `budget_ms` > 0, its scripts have run for
/// that much virtual time (0: just the scripts that run at load).
///
/// Headless Chromium's virtual-time budget sometimes never expires and the browser
/// never prints (a known Chromium bug; here it hung the dashboard test in about a third
/// of the runs on a loaded 2-core machine, with this project's code from before any
/// change that could touch the page too). Pages that render at load need no budget.
/// A run that prints no DOM is killed after [`RUN_LIMIT`] and retried with a fresh
/// profile, up to three runs in all.
pub fn dump_dom(browser: &Path, url: &str, budget_ms: u64, offline: bool) -> String {
    const RUNS: usize = 3;
    let mut failures = Vec::new();
    for attempt in 1..=RUNS {
        let mut args = vec!["--dump-dom".to_string()];
        if budget_ms > 0 {
            args.push(format!("--virtual-time-budget={budget_ms}"));
        }
        let out = run(browser, &args, url, offline);
        let dom = String::from_utf8_lossy(&out.stdout).to_string();
        if dom.contains("</html>") {
            return dom;
        }
        eprintln!(
            "chromium printed no DOM for {url} (run {attempt} of {RUNS}): {:?}",
            out.status
        );
        failures.push(format!(
            "run {attempt}: status {:?}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    panic!(
        "chromium printed no DOM for {url} in {RUNS} runs:\n{}",
        failures.join("\n")
    );
}

/// A PNG screenshot of the page at 1400 px wide.
pub fn screenshot(browser: &Path, url: &str, file: &Path, height: u32, offline: bool) -> bool {
    let out = run(
        browser,
        &[
            format!("--screenshot={}", file.display()),
            format!("--window-size=1400,{height}"),
            "--virtual-time-budget=1500".into(),
        ],
        url,
        offline,
    );
    out.status.success() && file.exists()
}

/// `GET path` on a loopback `addr` (`127.0.0.1:PORT`): (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the node's HTTP server");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of attribute `attr` on the element with `id` in a dumped DOM.
pub fn attr_of_id(dom: &str, id: &str, attr: &str) -> Option<String> {
    let re = regex::Regex::new(&format!(r#"<[^>]*\bid="{}"[^>]*>"#, regex::escape(id))).ok()?;
    let tag = re.find(dom)?.as_str();
    let re = regex::Regex::new(&format!(r#"\b{}="([^"]*)""#, regex::escape(attr))).ok()?;
    re.captures(tag).map(|c| c[1].to_string())
}

/// Point counts of every chart line inside the chart `data-chart="id"`.
pub fn chart_points(dom: &str, chart: &str) -> Vec<u64> {
    let start = match dom.find(&format!("data-chart=\"{chart}\"")) {
        Some(i) => i,
        None => return Vec::new(),
    };
    let rest = &dom[start..];
    let end = rest.find("</svg>").unwrap_or(rest.len());
    let re = regex::Regex::new(r#"<path class="line"[^>]*data-points="(\d+)"[^>]*\sd="M[^"]+""#)
        .expect("regex");
    re.captures_iter(&rest[..end])
        .filter_map(|c| c[1].parse().ok())
        .collect()
}

/// The first `n` server-sent events of `GET path` (their `data:` payloads), read for at
/// most `limit`.
pub fn sse_messages(addr: &str, path: &str, n: usize, limit: Duration) -> Vec<String> {
    let mut s = TcpStream::connect(addr).expect("connect to the node's HTTP server");
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let re = regex::Regex::new(r"data: ([^\n]*)\n\n").expect("regex");
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => raw.extend_from_slice(&buf[..k]),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&raw);
        let found: Vec<String> = re.captures_iter(&text).map(|c| c[1].to_string()).collect();
        if found.len() >= n {
            return found.into_iter().take(n).collect();
        }
    }
    let text = String::from_utf8_lossy(&raw);
    re.captures_iter(&text).map(|c| c[1].to_string()).collect()
}
