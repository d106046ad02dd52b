//! End-to-end tests of stampede-target over real loopback sockets: the shop journey, session
//! rules (401/409), the catalogue, exact `/_stats` counts, every knob (stall, latency, error
//! rate, concurrency limit), h2c, the in-thread `spawn` API and the binary's start-up line.
//! Timing assertions are lower bounds only, so a loaded machine cannot make them flake.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, TIMEOUT};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use stampede_tools::{start, Latency, StatsSnapshot, TargetConfig, TargetHandle};

async fn target(accounts: u64) -> TargetHandle {
    start(TargetConfig {
        accounts,
        ..TargetConfig::default()
    })
    .await
    .expect("start target")
}

#[tokio::test]
async fn shop_journey_login_cart_checkout_account() {
    let t = target(100).await;
    let mut c = Client::connect(t.addr()).await;
    let token = c.login(42).await;

    let r = c
        .post_auth("/cart", &token, r#"{"product": 7, "qty": 2}"#)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["items"], 2);
    // qty defaults to 1; numeric strings (as templates render them) are accepted.
    let r = c.post_auth("/cart", &token, r#"{"product": "9"}"#).await;
    assert_eq!(
        (r.status, r.json()["items"].clone()),
        (StatusCode::OK, 3.into())
    );

    let r = c.post_auth("/checkout", &token, "").await;
    assert_eq!(r.status, StatusCode::OK);
    let order = r.json();
    assert_eq!(order["items"], 3);
    assert!(order["total_cents"].as_u64().unwrap() > 0);

    let r = c.post_auth("/checkout", &token, "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "cart empty");

    let r = c.get_auth("/account", &token).await;
    assert_eq!(r.status, StatusCode::OK);
    let acct = r.json();
    assert_eq!(acct["user"], "user42");
    assert_eq!(acct["orders"], 1);
    assert_eq!(acct["cart_items"], 0);
    assert_eq!(acct["spent_cents"], order["total_cents"]);

    // Bad cart input is named, not swallowed.
    let r = c.post_auth("/cart", &token, r#"{"product": 1001}"#).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = c.post_auth("/cart", &token, r#"{"qty": 1}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("product"));
    let r = c
        .post_auth("/cart", &token, r#"{"product": 1, "qty": -1}"#)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = c.post_auth("/cart", &token, "{nope").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    t.stop().await;
}

#[tokio::test]
async fn login_rejects_bad_credentials_and_bad_json() {
    let t = target(10).await;
    let mut c = Client::connect(t.addr()).await;
    for body in [
        r#"{"user":"user1","password":"pass2"}"#,
        r#"{"user":"user11","password":"pass11"}"#,
        r#"{"user":"admin","password":"admin"}"#,
    ] {
        let r = c.post("/login", body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{body}");
    }
    for body in ["", "{", r#"{"user":"user1"}"#, r#"[1,2]"#] {
        let r = c.post("/login", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(r.json()["error"].is_string());
    }
    let r = c.get("/login").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let big = format!(
        r#"{{"user":"user1","password":"{}"}}"#,
        "x".repeat(stampede_tools::MAX_BODY)
    );
    let r = c.post("/login", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    t.stop().await;
}

#[tokio::test]
async fn a_newer_login_ends_the_older_session_with_409() {
    let t = target(10).await;
    let mut vu1 = Client::connect(t.addr()).await;
    let mut vu2 = Client::connect(t.addr()).await;
    let first = vu1.login(3).await;
    assert_eq!(
        vu1.get_auth("/account", &first).await.status,
        StatusCode::OK
    );
    // A second VU on the same account supersedes the first.
    let second = vu2.login(3).await;
    assert_ne!(first, second);
    for (path, method) in [
        ("/account", Method::GET),
        ("/checkout", Method::POST),
        ("/cart", Method::POST),
    ] {
        let r = vu1
            .send(method, path, Some(&first), Some(r#"{"product":1}"#))
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{path}");
    }
    assert_eq!(
        vu2.get_auth("/account", &second).await.status,
        StatusCode::OK
    );
    // One VU logging in again each iteration never sees a 409.
    let mut token = second;
    for _ in 0..5 {
        token = vu2.login(3).await;
        let r = vu2.post_auth("/cart", &token, r#"{"product":2}"#).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            vu2.post_auth("/checkout", &token, "").await.status,
            StatusCode::OK
        );
    }
    // Another account's login does not disturb this one.
    vu1.login(4).await;
    assert_eq!(
        vu2.get_auth("/account", &token).await.status,
        StatusCode::OK
    );
    // Unknown and missing tokens are 401, not 409.
    for bad in ["garbage", "3.1.0000000000000000", ""] {
        let r = vu1.get_auth("/account", bad).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
    }
    let r = vu1.get("/account").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = vu1.post("/checkout", "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    t.stop().await;
}

#[tokio::test]
async fn products_search_and_lookup() {
    let t = target(1).await;
    let mut c = Client::connect(t.addr()).await;
    for id in [1u64, 500, 1000] {
        let r = c.get(&format!("/products/{id}")).await;
        assert_eq!(r.status, StatusCode::OK);
        let p = r.json();
        assert_eq!(p["id"], id);
        assert!(p["name"].is_string() && p["price_cents"].is_u64());
    }
    for path in ["/products/0", "/products/1001", "/products/abc", "/nowhere"] {
        assert_eq!(c.get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    for q in ["", "?q=", "?q=lamp", "?q=Red+Oak", "?q=red%20oak", "?q=zzz"] {
        let r = c.get(&format!("/products{q}")).await;
        assert_eq!(r.status, StatusCode::OK);
        let list = r.json();
        let list = list.as_array().expect("search returns a list");
        assert!(list.len() <= stampede_tools::SEARCH_LIMIT);
        assert_eq!(list.is_empty(), q.ends_with("zzz"), "{q}");
        if q.contains("oak") || q.contains("Oak") {
            for item in list {
                assert!(item["name"].as_str().unwrap().contains("Red Oak"));
            }
        }
    }
    t.stop().await;
}

async fn http_stats(c: &mut Client) -> StatsSnapshot {
    let r = c.get("/_stats").await;
    assert_eq!(r.status, StatusCode::OK);
    serde_json::from_slice(&r.body).expect("stats JSON")
}

#[tokio::test]
async fn stats_count_every_load_request_exactly() {
    let t = target(10).await;
    let mut c = Client::connect(t.addr()).await;
    let token = c.login(1).await; // login 1
    c.post("/login", r#"{"user":"user1","password":"x"}"#).await; // login 2 (401)
    c.post("/login", "{").await; // login 3 (400)
    for i in 1..=5 {
        c.get(&format!("/products/{i}")).await;
    }
    c.get("/products/5000").await; // 404 still counts under its route
    c.get("/products?q=oak").await;
    c.post_auth("/cart", &token, r#"{"product":1}"#).await;
    c.post_auth("/checkout", &token, "").await;
    c.get_auth("/account", &token).await;
    c.get("/does-not-exist").await;
    c.send(Method::DELETE, "/cart", None, None).await;
    let expected = 3 + 6 + 1 + 1 + 1 + 1 + 2;

    let s = http_stats(&mut c).await;
    assert_eq!(s.requests, expected);
    assert_eq!(t.requests(), expected);
    let e = |k: &str| s.endpoints[k];
    assert_eq!(e("POST /login"), 3);
    assert_eq!(e("GET /products/{id}"), 6);
    assert_eq!(e("GET /products"), 1);
    assert_eq!(e("POST /cart"), 1);
    assert_eq!(e("POST /checkout"), 1);
    assert_eq!(e("GET /account"), 1);
    assert_eq!(e("other"), 2);
    assert_eq!(s.statuses["200"], 10);
    assert_eq!(s.statuses["401"], 1);
    assert_eq!(s.statuses["400"], 1);
    assert_eq!(s.statuses["404"], 2);
    assert_eq!(s.statuses["405"], 1);
    let per_second: u64 = s.per_second.iter().map(|&(_, n)| n).sum();
    assert_eq!(per_second, expected);
    assert!(s.per_second.len() <= stampede_tools::PER_SECOND_WINDOW as usize);
    assert_eq!(s.connections_open, 1);
    assert_eq!(s.connections_accepted, 1);

    // Every request received counts except the /_stats request answering (spec §10):
    // the first read is counted by the second; load requests are kept apart.
    let again = http_stats(&mut c).await;
    assert_eq!(again.requests, expected + 1);
    assert_eq!(again.load_requests, expected);
    assert_eq!(again.admin_requests, 2);

    // The raw JSON carries the documented field names.
    let raw: Value = c.get("/_stats").await.json();
    assert_eq!(raw["requests"], expected + 2);
    assert_eq!(raw["load_requests"], expected);
    assert!(raw["endpoints"]["POST /login"].is_u64());
    assert!(raw["per_second"][0][0].is_u64() && raw["per_second"][0][1].is_u64());

    let r = c.post("/_stats/reset", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(t.requests(), 0);
    c.get("/products/1").await;
    // The reset cleared every counter, its own admin count included.
    let after = http_stats(&mut c).await;
    assert_eq!(after.requests, 1);
    assert_eq!(after.load_requests, 1);
    t.reset_stats();
    assert_eq!(t.stats().requests, 0);
    t.stop().await;
}

#[tokio::test]
async fn stall_delays_requests_and_lifting_it_releases_waiting_ones() {
    let t = target(1).await;
    let mut c = Client::connect(t.addr()).await;
    let r = c.post("/_control", r#"{"stall_ms": 300}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["stall_ms"], 300);
    let began = Instant::now();
    assert_eq!(c.get("/products/1").await.status, StatusCode::OK);
    assert!(began.elapsed() >= Duration::from_millis(300));
    // Admin endpoints are never stalled, so a test can always lift the stall.
    let mut admin = Client::connect(t.addr()).await;
    assert_eq!(admin.get("/_control").await.json()["stall_ms"], 300);

    // A stall far longer than the test timeout; lifting it must release the request.
    t.set_stall(Duration::from_secs(600));
    let addr = t.addr();
    let waiting = tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        c.get("/products/2").await.status
    });
    wait_until(&t, "request inside the service", |s| s.in_service == 1).await;
    let r = admin.post("/_control", r#"{"stall_ms": 0}"#).await;
    assert_eq!(r.json()["stall_ms"], 0);
    let status = tokio::time::timeout(TIMEOUT, waiting)
        .await
        .expect("stalled request was not released")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
    t.stop().await;
}

#[tokio::test]
async fn latency_knob_delays_every_request() {
    let t = start(TargetConfig {
        latency: "20ms".parse().unwrap(),
        ..TargetConfig::default()
    })
    .await
    .unwrap();
    let mut c = Client::connect(t.addr()).await;
    let began = Instant::now();
    for _ in 0..5 {
        c.get("/products/1").await;
    }
    assert!(began.elapsed() >= Duration::from_millis(100));
    let r = c
        .post("/_control", r#"{"latency": "uniform:1ms..2ms"}"#)
        .await;
    assert_eq!(r.json()["latency"], "uniform:1ms..2ms");
    assert_eq!(
        t.control_state().latency,
        Latency::Uniform {
            min: Duration::from_millis(1),
            max: Duration::from_millis(2)
        }
        .to_string()
    );
    t.stop().await;
}

#[tokio::test]
async fn error_rate_knob_fails_about_that_fraction() {
    let t = target(1).await;
    let mut c = Client::connect(t.addr()).await;
    let r = c.post("/_control", r#"{"error_rate": 0.25}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    let n = 800;
    let mut failed = 0u64;
    for _ in 0..n {
        match c.get("/products/1").await.status {
            StatusCode::OK => {}
            StatusCode::INTERNAL_SERVER_ERROR => failed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // Expected 200, standard deviation about 12: these bounds are ~8 deviations wide.
    assert!((100..=300).contains(&failed), "{failed} of {n} failed");
    assert_eq!(t.stats().statuses["500"], failed);

    t.set_error_rate(1.0).unwrap();
    for _ in 0..20 {
        let r = c.get("/products/1").await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // Admin is never failed.
    assert_eq!(c.get("/_stats").await.status, StatusCode::OK);
    t.set_error_rate(0.0).unwrap();
    for _ in 0..20 {
        assert_eq!(c.get("/products/1").await.status, StatusCode::OK);
    }
    assert!(t.set_error_rate(1.5).is_err());
    t.stop().await;
}

#[tokio::test]
async fn bad_control_input_is_refused_and_changes_nothing() {
    let t = target(1).await;
    let mut c = Client::connect(t.addr()).await;
    let before = t.control_state();
    for body in [
        r#"{"error_rate": 2}"#,
        r#"{"latency": "soon"}"#,
        r#"{"stall_ms": -1}"#,
        r#"{"stall": 5}"#,
        r#"{"latency": "5ms", "error_rate": -0.1}"#,
        "not json",
    ] {
        let r = c.post("/_control", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(t.control_state(), before);
    t.stop().await;
}

/// Polls the target's gauges until `cond` holds; bounded by [`TIMEOUT`].
async fn wait_until(t: &TargetHandle, what: &str, cond: impl Fn(&StatsSnapshot) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = t.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never reached: {what}; last {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn launch(t: &TargetHandle, n: usize) -> Vec<tokio::task::JoinHandle<StatusCode>> {
    (0..n)
        .map(|i| {
            let addr = t.addr();
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                c.get(&format!("/products/{}", i + 1)).await.status
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_queues_the_excess() {
    let (limit, clients) = (2usize, 6usize);
    let t = start(TargetConfig {
        concurrency_limit: Some(limit),
        stall: stampede_tools::MAX_STALL,
        ..TargetConfig::default()
    })
    .await
    .unwrap();
    // Held by the stall: exactly `limit` in service, the rest queued.
    let tasks = launch(&t, clients);
    wait_until(&t, "2 in service, 4 queued", |s| {
        s.in_service == limit as u64 && s.queued == (clients - limit) as u64
    })
    .await;
    t.set_stall(Duration::ZERO);
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let s = t.stats();
    assert_eq!(s.max_in_service, limit as u64);
    assert_eq!((s.in_service, s.queued), (0, 0));
    assert_eq!(t.control_state().concurrency_limit, limit);

    // The knee: six 100ms requests through two slots take at least three rounds.
    let latency = Duration::from_millis(100);
    t.set_latency(Latency::Fixed(latency));
    let began = Instant::now();
    for task in launch(&t, clients) {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert!(began.elapsed() >= latency * (clients / limit) as u32);
    assert_eq!(t.stats().max_in_service, limit as u64);

    // Lifting the limit lets them all in at once.
    t.set_latency(Latency::None);
    t.set_concurrency_limit(None);
    t.set_stall(stampede_tools::MAX_STALL);
    let tasks = launch(&t, clients);
    wait_until(&t, "all 6 in service", |s| s.in_service == clients as u64).await;
    assert_eq!(t.stats().queued, 0);
    t.set_stall(Duration::ZERO);
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    t.stop().await;
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let t = target(5).await;
    let stream = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // All ten requests go out before any answer is awaited: multiplexed streams.
    let mut streams = Vec::new();
    for id in 1..=10 {
        let req = http::Request::get(format!("http://{}/products/{id}", t.addr()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let fut = sender.send_request(req);
        streams.push(tokio::spawn(async move {
            let resp = fut.await.expect("h2 request");
            assert_eq!(resp.version(), http::Version::HTTP_2);
            (
                resp.status(),
                resp.into_body().collect().await.unwrap().to_bytes(),
            )
        }));
    }
    for (i, stream) in streams.into_iter().enumerate() {
        let (status, body) = tokio::time::timeout(TIMEOUT, stream)
            .await
            .expect("h2 timed out")
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], i as u64 + 1);
    }
    assert_eq!(t.requests(), 10);
    assert_eq!(t.stats().connections_accepted, 1);
    t.stop().await;
}

#[tokio::test]
async fn stop_closes_keep_alive_connections() {
    let t = target(1).await;
    let addr = t.addr();
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/products/1").await.status, StatusCode::OK);
    t.stop().await;
    let after = c.try_get("/products/1").await;
    assert!(
        after.is_err(),
        "keep-alive connection survived stop: {after:?}"
    );
    let err = tokio::net::TcpStream::connect(addr).await;
    assert!(err.is_err(), "listener still open after stop");
}

/// Raw HTTP/1.1 with `Connection: close` over a blocking socket.
fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn spawn_runs_on_its_own_threads_without_a_runtime() {
    let t = stampede_tools::spawn(TargetConfig {
        threads: 2,
        ..TargetConfig::default()
    })
    .unwrap();
    assert!(t.url().starts_with("http://127.0.0.1:"));
    let reply = raw_get(t.addr(), "/products/3");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(r#""id":3"#));
    assert_eq!(t.requests(), 1);
    let addr = t.addr();
    t.shutdown();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn config_errors_are_reported_not_panicked() {
    let err = stampede_tools::spawn(TargetConfig {
        accounts: 0,
        ..TargetConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("accounts"), "{err}");
    let err = stampede_tools::spawn(TargetConfig {
        error_rate: 7.0,
        ..TargetConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("error_rate"), "{err}");
}

#[test]
fn binary_prints_its_address_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stampede-target"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--accounts",
            "3",
            "--threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start binary");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("stampede-target listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr: std::net::SocketAddr = url.parse().unwrap();
    let reply = raw_get(addr, "/products/1000");
    let _ = child.kill();
    let _ = child.wait();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn binary_rejects_bad_flags_by_name() {
    for args in [
        &["--latency", "soonish"][..],
        &["--error-rate", "2"][..],
        &["--accounts", "0"][..],
        &["--listen", "not an address"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_stampede-target"))
            .args(args)
            .output()
            .expect("run binary");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(args[0]) || err.contains(args[1]),
            "{args:?}: {err}"
        );
    }
}
