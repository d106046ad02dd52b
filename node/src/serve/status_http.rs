//! The node's HTTP status server (loopback by default): `/` the live dashboard,
//! `/api/live` its JSON, `/events` the same once per second as server-sent events,
//! `/runs/<id>/report.html` and `/runs/<id>/summary.json` for recent runs, `/health`,
//! and `/metrics` (Prometheus text format: mesh gauges plus the current run's counters
//! and histograms per node and step).
//!
//! It only reads the shared membership view and the live runs; it must never block the
//! mesh event loop (locks are held only while copying) and never serve anything that
//! changes state.
//!
//! DNS rebinding: a web page in the operator's browser can make its own name resolve to
//! 127.0.0.1 and then read this server as if it were its own origin. So every request's
//! `Host` must name this server — an IP literal, `localhost`, this machine's host name or
//! a configured name ([`AllowedHosts`]) — or it is answered 421; an `Origin`, when
//! present, must name one of those too, or it is answered 403.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use std::sync::Arc;
use std::time::Duration;

use crate::mesh::membership::MemberState;
use crate::mesh::SharedView;
use crate::reports::live::LiveRuns;

/// The `Host` names the server answers to besides IP literals, `localhost` and this
/// machine's host name (e.g. the name a reverse proxy or a Prometheus scraper uses).
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    /// This machine's host name plus `names`, compared without case.
    pub fn new(names: impl IntoIterator<Item = String>) -> AllowedHosts {
        let mut all: Vec<String> = names.into_iter().map(|n| normalise(&n)).collect();
        all.extend(machine_host_name().map(|n| normalise(&n)));
        AllowedHosts { names: all }
    }

    /// Whether a `Host` header value (`name`, `name:port`, `[v6]:port`) names us.
    /// IP literals are safe: rebinding needs a name that the attacker's DNS answers.
    pub fn host_ok(&self, host: &str) -> bool {
        let name = normalise(strip_port(host));
        !name.is_empty()
            && (name.parse::<std::net::IpAddr>().is_ok()
                || name == "localhost"
                || self.names.contains(&name))
    }

    /// Whether an `Origin` header value (`http://name:port`) names us.
    pub fn origin_ok(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|rest| !rest.contains('/') && self.host_ok(rest))
    }

    /// The answer to a request that does not name us, if it does not.
    fn refuse(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        };
        // A request without Host is not from a browser (browsers always send it).
        if let Some(host) = header(http::header::HOST) {
            if !self.host_ok(host) {
                return Some(respond(
                    StatusCode::MISDIRECTED_REQUEST,
                    "text/plain",
                    "this server answers only to its IP address, localhost or its host name\n"
                        .into(),
                ));
            }
        }
        if let Some(origin) = header(http::header::ORIGIN) {
            if !self.origin_ok(origin) {
                return Some(respond(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "requests from other origins are refused\n".into(),
                ));
            }
        }
        None
    }
}

/// Lower case, without a trailing dot (`LOCALHOST.` is `localhost`).
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name:port` → `name`, `[::1]:port` → `::1`, `name` → `name`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

fn machine_host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Serves until the task is dropped, answering only to IP literals, `localhost` and this
/// machine's host name.
pub async fn serve(listener: TcpListener, view: SharedView, live: Arc<LiveRuns>) {
    serve_with_hosts(listener, view, live, AllowedHosts::new([])).await
}

/// Like [`serve`], also answering to the configured `hosts`.
pub async fn serve_with_hosts(
    listener: TcpListener,
    view: SharedView,
    live: Arc<LiveRuns>,
    hosts: AllowedHosts,
) {
    let hosts = Arc::new(hosts);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "status HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let view = view.clone();
        let live = live.clone();
        let hosts = hosts.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let view = view.clone();
                let live = live.clone();
                let hosts = hosts.clone();
                async move {
                    Ok::<_, Infallible>(
                        hosts
                            .refuse(&req)
                            .unwrap_or_else(|| route(&req, &view, &live)),
                    )
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "status HTTP connection failed");
            }
        });
    }
}

/// Whole responses, or the `/events` stream.
type Body = UnsyncBoxBody<Bytes, Infallible>;

fn respond(status: StatusCode, ctype: &str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn route(req: &Request<Incoming>, view: &SharedView, live: &Arc<LiveRuns>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/health" => {
            let alive = view.read().map(|v| v.alive_peers().len()).unwrap_or(0);
            respond(
                StatusCode::OK,
                "application/json",
                format!("{{\"status\":\"ok\",\"peers_alive\":{alive}}}\n"),
            )
        }
        "/metrics" => {
            let mut text = metrics_text(view);
            // The newest run still going, else the newest.
            if let Some(run) = crate::serve::dashboard::newest_runs(live, 1).first() {
                crate::reports::prometheus::run_text(run, &mut text);
            }
            respond(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/" | "/index.html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::serve::dashboard::page(&crate::serve::dashboard::api_json(view, live)),
        ),
        "/events" => events(view.clone(), live.clone()),
        "/api/live" => respond(
            StatusCode::OK,
            "application/json",
            crate::serve::dashboard::api_json(view, live).to_string(),
        ),
        path => match path
            .strip_prefix("/runs/")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((id, file)) => run_file(live, id, file),
            None => not_found(),
        },
    }
}

/// Server-sent events: the `/api/live` document once per second, as long as the
/// client stays connected (a closed connection drops the stream).
fn events(view: SharedView, live: Arc<LiveRuns>) -> Response<Body> {
    let stream = futures::stream::unfold((view, live, true), |(view, live, first)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let json = crate::serve::dashboard::api_json(&view, &live).to_string();
        let frame = Frame::data(Bytes::from(format!("data: {json}\n\n")));
        Some((Ok::<_, Infallible>(frame), (view, live, false)))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// A recent run's report or summary, by run id.
fn run_file(live: &LiveRuns, id: &str, file: &str) -> Response<Body> {
    let Some(mut s) = live.recent().into_iter().find(|s| s.run_id == id) else {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such recent run on this node (only runs started from it are kept)\n".into(),
        );
    };
    // Served to whoever can reach the port: the plan's secrets stay out.
    s.plan_source = stampede_protocol::redact::redact_plan_source(&s.plan_source);
    match file {
        "report.html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::reports::html::render(&s),
        ),
        "summary.json" => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&s).unwrap_or_default(),
        ),
        _ => not_found(),
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of the membership view.
pub fn metrics_text(view: &SharedView) -> String {
    let Ok(v) = view.read() else {
        return String::new();
    };
    let rows = v.rows(Instant::now());
    let count = |s: MemberState| rows.iter().filter(|r| r.state == s).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP stampede_mesh_size Members of the mesh this node sees alive, itself included."
    );
    let _ = writeln!(out, "# TYPE stampede_mesh_size gauge");
    let _ = writeln!(out, "stampede_mesh_size {}", count(MemberState::Alive));
    let _ = writeln!(
        out,
        "# HELP stampede_mesh_members Members known to this node by state."
    );
    let _ = writeln!(out, "# TYPE stampede_mesh_members gauge");
    for s in [
        MemberState::Alive,
        MemberState::Lost,
        MemberState::Incompatible,
    ] {
        let _ = writeln!(
            out,
            "stampede_mesh_members{{state=\"{}\"}} {}",
            s.as_str(),
            count(s)
        );
    }
    let _ = writeln!(
        out,
        "# HELP stampede_peer_up Whether a member is alive (1) or not (0)."
    );
    let _ = writeln!(out, "# TYPE stampede_peer_up gauge");
    for r in rows.iter().filter(|r| !r.is_self) {
        let up = u8::from(r.state == MemberState::Alive);
        let _ = writeln!(
            out,
            "stampede_peer_up{{peer_id=\"{}\",name=\"{}\",state=\"{}\"}} {up}",
            esc(&r.id),
            esc(&r.name),
            r.state.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP stampede_peer_connected Whether this node has a live connection to a member."
    );
    let _ = writeln!(out, "# TYPE stampede_peer_connected gauge");
    for r in rows.iter().filter(|r| !r.is_self) {
        let _ = writeln!(
            out,
            "stampede_peer_connected{{peer_id=\"{}\",name=\"{}\"}} {}",
            esc(&r.id),
            esc(&r.name),
            u8::from(r.connected)
        );
    }
    let _ = writeln!(out, "# HELP stampede_node_info This node's identity.");
    let _ = writeln!(out, "# TYPE stampede_node_info gauge");
    if let Some(me) = rows.first() {
        let _ = writeln!(
            out,
            "stampede_node_info{{peer_id=\"{}\",name=\"{}\",version=\"{}\",protocol_version=\"{}\"}} 1",
            esc(&me.id),
            esc(&me.name),
            esc(&me.version),
            me.protocol_version.unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use libp2p::PeerId;
    use stampede_protocol::mesh::{Announce, NodeState, PROTOCOL_VERSION};

    use crate::mesh::membership::View;

    fn ann(id: &PeerId, name: &str) -> Announce {
        Announce {
            id: id.to_string(),
            name: name.into(),
            version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: Default::default(),
            capacity: 1,
            state: NodeState::Idle,
            allow_targets: vec![],
            addrs: vec![],
            seq: 1,
            signature: vec![],
        }
    }

    #[test]
    fn a_served_summary_and_report_carry_no_secret_of_the_plan() {
        let source = r#"name = "t"
[defaults]
base_url = "http://127.0.0.1:9"
headers = { authorization = "Bearer s3cret-tok" }

[scenarios.s]
executor = "constant-vus"
vus = 1
duration = "1s"
flows = [ { flow = "f", weight = 1 } ]

[[flows.f.steps]]
request = { url = "/" }
"#;
        let plan = stampede_protocol::plan::parse_plan("t.toml", source).unwrap();
        let agg = crate::reports::aggregate::RunAggregate::new(Default::default());
        let summary = crate::reports::summary::build(
            &agg,
            crate::reports::summary::SummaryInput {
                run_id: "r1",
                plan: &plan,
                started_at_unix_ms: 0,
                duration_s: 1.0,
                nodes: &[],
                events: vec![],
                start_skew_us: 0,
                plan_source: source,
            },
        );
        assert!(summary.plan_source.contains("s3cret-tok"));
        let live = LiveRuns::new();
        live.finish(summary);
        for file in ["summary.json", "report.html"] {
            let r = run_file(&live, "r1", file);
            assert_eq!(r.status(), StatusCode::OK);
            let body = futures::executor::block_on(r.into_body().collect())
                .unwrap()
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains("s3cret-tok"), "{file} leaks the token");
            assert!(text.contains("[redacted]"), "{file}");
        }
    }

    #[test]
    fn hosts_and_origins_that_name_this_server() {
        let h = AllowedHosts::new(["Dash.Example.org".to_string()]);
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:9",
            "::1",
            "localhost:80",
            "LOCALHOST.",
            "10.77.0.3:7401",
            "dash.example.org:443",
        ] {
            assert!(h.host_ok(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "",
            ":80",
            "127.0.0.1.evil.example",
        ] {
            assert!(!h.host_ok(bad), "{bad}");
        }
        assert!(h.origin_ok("http://127.0.0.1:8080"));
        assert!(h.origin_ok("https://dash.example.org"));
        for bad in [
            "null",
            "http://evil.example:8080",
            "file://",
            "http://127.0.0.1/x",
        ] {
            assert!(!h.origin_ok(bad), "{bad}");
        }
    }

    #[test]
    fn metrics_count_states_and_escape_labels() {
        let me = PeerId::random();
        let other = PeerId::random();
        let now = Instant::now();
        let mut v = View::new(me, ann(&me, "me"), Duration::from_secs(3));
        v.heard_announce(other, ann(&other, "evil\"name\nx"), now);
        v.refresh(now);
        let view = Arc::new(RwLock::new(v));
        let text = metrics_text(&view);
        assert!(text.contains("stampede_mesh_size 2\n"), "{text}");
        assert!(text.contains("stampede_mesh_members{state=\"lost\"} 0\n"));
        assert!(text.contains("name=\"evil\\\"name\\nx\""), "{text}");
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.rsplit_once(' ')
                    .is_some_and(|(_, v)| v.parse::<f64>().is_ok()),
                "{line}"
            );
        }
    }
}
