//! A target that attacks its load generator (issue 12, item 11): a 2 GB body, an endless
//! chunked body, a flood of cookies. The real `stampede run` binary runs against a
//! hostile server written here (a tokio listener on 127.0.0.1 in this test process);
//! its memory is sampled from /proc while it runs, and the run must end on time.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the hostile server answers to every request.
#[derive(Clone, Copy)]
enum Hostility {
    /// `Content-Length: 2 GB`, and the bytes keep coming as fast as the socket takes them.
    HugeBody,
    /// `Transfer-Encoding: chunked`, chunk after chunk, never the last one.
    EndlessChunks,
    /// A small body, with 200 distinct cookies of 3 KB each per response.
    CookieFlood,
}

/// Serves `how` on 127.0.0.1 from a runtime of its own; the server stops with the runtime.
struct Hostile {
    addr: SocketAddr,
    bytes_sent: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

fn hostile(how: Hostility) -> Hostile {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes_sent = Arc::new(AtomicU64::new(0));
    let counter = bytes_sent.clone();
    rt.spawn(async move {
        let mut serial = 0u64;
        while let Ok((sock, _)) = listener.accept().await {
            serial += 1;
            tokio::spawn(serve(sock, how, counter.clone(), serial));
        }
    });
    Hostile {
        addr,
        bytes_sent,
        _rt: rt,
    }
}

async fn serve(mut sock: TcpStream, how: Hostility, sent: Arc<AtomicU64>, serial: u64) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let mut answered = 0u64;
    loop {
        // One request head at a time (the VU sends GETs without bodies).
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
            if request.len() > 1 << 20 {
                return;
            }
        }
        let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        request.drain(..end);
        answered += 1;
        let chunk = vec![b'x'; 64 * 1024];
        let result = match how {
            Hostility::HugeBody => {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 2147483648\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            Hostility::EndlessChunks => {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                loop {
                    if sock.write_all(&framed).await.is_err() {
                        return;
                    }
                    sent.fetch_add(framed.len() as u64, Ordering::Relaxed);
                }
            }
            Hostility::CookieFlood => {
                let mut head = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
                let value = "v".repeat(3000);
                // Within the 64 KiB head limit: 20 cookies of 3 KB, new names each time.
                for i in 0..20 {
                    head.push_str(&format!(
                        "set-cookie: c{serial}x{answered}x{i}={value}; Path=/\r\n"
                    ));
                }
                head.push_str("\r\nok");
                sock.write_all(head.as_bytes()).await
            }
        };
        if result.is_err() {
            return;
        }
    }
}

/// VmRSS of a process in bytes, or None once it has exited.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Observed {
    status: std::process::ExitStatus,
    peak_rss: u64,
    wall: Duration,
    summary: Value,
    stderr: String,
}

/// Runs `stampede run` on `plan`, sampling its RSS every 20 ms. Kills it (and fails)
/// if it has not ended within `limit`.
fn run_sampled(plan: &Path, dir: &Path, limit: Duration) -> Observed {
    let json = dir.join("summary.json");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stampede"))
        .arg("run")
        .arg(plan)
        .args(["--quiet", "--workers", "2", "--out"])
        .arg(format!("json={}", json.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stampede");
    let pid = child.id();
    let mut peak = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if let Some(rss) = rss_bytes(pid) {
            peak = peak.max(rss);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the run did not end within {limit:?} (peak RSS so far {} MB)",
                peak >> 20
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut stderr);
    }
    let summary = std::fs::read_to_string(&json)
        .map(|s| serde_json::from_str(&s).expect("summary is JSON"))
        .unwrap_or(Value::Null);
    Observed {
        status,
        peak_rss: peak,
        wall,
        summary,
        stderr,
    }
}

fn plan(dir: &Path, addr: SocketAddr, step_extra: &str) -> std::path::PathBuf {
    let p = dir.join("hostile.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    write!(
        f,
        r#"
name = "hostile"
[defaults]
base_url = "http://{addr}"
timeout = "1s"

[scenarios.s]
executor = "constant-vus"
vus = 40
duration = "3s"
flow = "f"

[[flows.f.steps]]
name = "get"
request = {{ method = "GET", url = "/" }}
{step_extra}
"#
    )
    .unwrap();
    p
}

/// The bound on the generator's memory under a hostile target: 40 VUs, each allowed to
/// keep a few MiB at most, plus the runtime's own. Before the fix: 2.28–2.64 GB.
const RSS_BOUND: u64 = 200 << 20;
/// Plan (3 s) + one request timeout (1 s) + margin for a loaded machine.
const WALL_BOUND: Duration = Duration::from_secs(12);

fn assert_bounded(o: &Observed, what: &str) {
    eprintln!(
        "{what}: peak RSS {} MB, run took {:.1} s, exit {:?}",
        o.peak_rss >> 20,
        o.wall.as_secs_f64(),
        o.status.code()
    );
    assert!(
        o.peak_rss < RSS_BOUND,
        "{what}: peak RSS {} MB is over {} MB\n{}",
        o.peak_rss >> 20,
        RSS_BOUND >> 20,
        o.stderr
    );
    assert!(
        o.wall < WALL_BOUND,
        "{what}: the run took {:?}, more than {WALL_BOUND:?}\n{}",
        o.wall,
        o.stderr
    );
}

#[test]
fn a_two_gigabyte_body_neither_bloats_nor_stalls_the_run() {
    let t = hostile(Hostility::HugeBody);
    let dir = tempfile::tempdir().unwrap();
    let o = run_sampled(
        &plan(dir.path(), t.addr, ""),
        dir.path(),
        Duration::from_secs(60),
    );
    assert_bounded(&o, "2 GB body");
    assert_every_request_timed_out(&o);
    assert!(t.bytes_sent.load(Ordering::Relaxed) > 1 << 20);
}

/// Each VU's requests timed out reading the body, one timeout after each was sent.
fn assert_every_request_timed_out(o: &Observed) {
    let totals = &o.summary["totals"];
    assert!(
        totals["requests"].as_u64().unwrap_or(0) >= 40,
        "{}",
        o.summary
    );
    assert_eq!(totals["requests"], totals["failed"], "{}", o.summary);
    assert_eq!(
        totals["errors"]["timeout"], totals["requests"],
        "{}",
        o.summary
    );
}

#[test]
fn an_endless_chunked_body_with_a_body_check_keeps_only_a_bounded_start() {
    let t = hostile(Hostility::EndlessChunks);
    let dir = tempfile::tempdir().unwrap();
    // A body check makes the VU keep the body: only up to its per-response bound.
    let o = run_sampled(
        &plan(
            dir.path(),
            t.addr,
            r#"check = { body_contains = "never there" }"#,
        ),
        dir.path(),
        Duration::from_secs(60),
    );
    assert_bounded(&o, "endless chunked body");
    assert_every_request_timed_out(&o);
}

#[test]
fn a_cookie_flood_is_bounded_per_vu() {
    let t = hostile(Hostility::CookieFlood);
    let dir = tempfile::tempdir().unwrap();
    let o = run_sampled(
        &plan(dir.path(), t.addr, ""),
        dir.path(),
        Duration::from_secs(60),
    );
    assert_bounded(&o, "cookie flood");
    assert!(o.status.success(), "{}", o.stderr);
    let totals = &o.summary["totals"];
    let requests = totals["requests"].as_u64().unwrap_or(0);
    let sent = totals["bytes_sent"].as_u64().unwrap_or(0);
    // An unbounded jar sends every cookie back, each request 60 KB longer than the one
    // before, until the requests time out; a bounded one sends at most its bound.
    assert!(requests >= 40, "{}", o.summary);
    assert_eq!(totals["failed"], 0, "{}", o.summary);
    assert!(
        sent / requests < 40 * 1024,
        "{} bytes per request",
        sent / requests
    );
}
