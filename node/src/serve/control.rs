//! The local control endpoint: how the CLI (`peers`, `status`, `stop`,
//! `run --mesh`) talks to a running node, and the client side of it.
//!
//! Protection: the server binds to loopback (127.0.0.1, port chosen by the OS unless
//! the `control` setting says otherwise) and writes its address together with a random
//! token to `DATA_DIR/control.json` with mode 0600. Requests that change anything
//! (`stop`, `run`) must carry that token; read-only requests (`peers`, `status`)
//! may omit it so `--node ADDR` works without access to the data dir.
//!
//! Wire format: one JSON object per line. The client sends a head line
//! `{"op": "...", "token": "...", ...}` of at most 4 KiB; a `run` head is followed by a
//! body line `{"bundle": ..., "requirements": ...}` (up to 32 MiB), which the node reads
//! only after the head's token checked out, so that nobody without the token can make it
//! read or parse more than 4 KiB. The node answers with zero or more event lines
//! (`{"event": ...}`, streamed run progress) and one final line
//! `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}`. At most
//! [`MAX_CONNECTIONS`] connections are served at once; every read has a timeout. New
//! request kinds are new `op`s in [`ControlRequest`]. This module must not touch the
//! swarm directly: it reads the shared view and sends `MeshCommand`s.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use stampede_protocol::mesh::{MeshRequest, MeshResponse};
use stampede_protocol::run::{RunRequest, RunResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::mesh::{MeshCommand, SharedView};

/// The largest head line the server reads: op, token and small arguments.
const MAX_HEAD_LINE: usize = 4 * 1024;
/// The largest body line the server reads, after the token checked out.
/// (A run's body carries the plan bundle, data files included.)
const MAX_BODY_LINE: usize = 32 * 1024 * 1024;
/// Connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long the head line may take to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the body line may take to arrive (32 MiB over loopback takes milliseconds).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
const CONTROL_FILE: &str = "control.json";

/// What the CLI asks of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The membership view.
    Peers,
    /// Runs in progress and recent runs.
    Status,
    /// Stop a run mesh-wide.
    Stop { run_id: String },
    /// A finished run's summary: from this node's data dir, else from the first alive
    /// member that has it. The answer is `{"found": true, "from", "summary"}` or
    /// `{"found": false, "asked"}`.
    Report { run_id: String },
    /// Run a plan bundle across the mesh; progress lines stream back, then the summary.
    Run {
        bundle: stampede_protocol::run::Bundle,
        #[serde(default)]
        requirements: stampede_protocol::run::Requirements,
    },
}

/// The first line of a request: everything but a run's bundle.
#[derive(Debug, Serialize, Deserialize)]
struct HeadLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(flatten)]
    head: Head,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Head {
    Peers,
    Status,
    Stop {
        run_id: String,
    },
    /// A finished run's summary, from this node or the mesh.
    Report {
        run_id: String,
    },
    /// The bundle follows in a [`RunBody`] line.
    Run,
}

impl Head {
    /// Whether the request changes something (and so needs the token).
    fn mutates(&self) -> bool {
        match self {
            Head::Peers | Head::Status | Head::Report { .. } => false,
            Head::Stop { .. } | Head::Run => true,
        }
    }
}

/// The second line of a `run` request.
#[derive(Debug, Serialize, Deserialize)]
struct RunBody {
    bundle: stampede_protocol::run::Bundle,
    #[serde(default)]
    requirements: stampede_protocol::run::Requirements,
}

/// The lines a client sends for a request: the head, and the body if it has one.
fn request_lines(
    token: Option<String>,
    request: ControlRequest,
) -> Result<Vec<u8>, serde_json::Error> {
    let (head, body) = match request {
        ControlRequest::Peers => (Head::Peers, None),
        ControlRequest::Status => (Head::Status, None),
        ControlRequest::Stop { run_id } => (Head::Stop { run_id }, None),
        ControlRequest::Report { run_id } => (Head::Report { run_id }, None),
        ControlRequest::Run {
            bundle,
            requirements,
        } => (
            Head::Run,
            Some(RunBody {
                bundle,
                requirements,
            }),
        ),
    };
    let mut out = serde_json::to_vec(&HeadLine { token, head })?;
    out.push(b'\n');
    if let Some(body) = body {
        serde_json::to_writer(&mut out, &body)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The final line of an answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Self {
        Reply {
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
}

/// What `control.json` holds: how to reach the node, and who it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlInfo {
    pub addr: String,
    pub token: String,
    pub pid: u32,
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub http: Option<String>,
    pub key_fingerprint: Option<String>,
}

impl ControlInfo {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(CONTROL_FILE)
    }

    pub fn write(&self, data_dir: &Path) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| format!("cannot encode control info: {e}"))?;
        let path = Self::path(data_dir);
        crate::mesh::key::write_private(&path, &json)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn read(data_dir: &Path) -> Result<ControlInfo, String> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "no node found: {} does not exist (start one with `stampede node --data-dir {}`, or pass --node ADDR)",
                    path.display(),
                    data_dir.display()
                )
            } else {
                format!("cannot read {}: {e}", path.display())
            }
        })?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a valid control file: {e}", path.display()))
    }
}

/// A fresh random token (hex, 128 bits).
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Everything the server needs to answer.
#[derive(Clone)]
pub struct ControlState {
    pub token: String,
    pub view: SharedView,
    pub commands: mpsc::Sender<MeshCommand>,
    pub coordinator: mpsc::Sender<crate::run::CoordCommand>,
    /// The node's saved run results (`status` after a restart, `report`).
    pub results: crate::reports::results::Results,
}

/// Serves the control endpoint until the listener fails or the task is dropped.
pub async fn serve(listener: TcpListener, state: ControlState) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "control endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Said without waiting (the socket buffer takes one line) and closed: a flood
            // of connections costs a socket each, never a task or a buffer.
            let _ = stream.try_write(&reply_line(&Reply::err(format!(
                "the node serves {MAX_CONNECTIONS} control connections at once; try again"
            ))));
            tracing::debug!(%peer, "control connection refused: all slots taken");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state).await {
                tracing::debug!(%peer, error = %e, "control connection ended with an error");
            }
            drop(slot);
        });
    }
}

fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    out
}

/// Reads one line of at most `limit` bytes within `wait`; the error is the reply.
async fn read_line_within<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    limit: usize,
    wait: Duration,
    what: &str,
) -> Result<String, Reply> {
    let mut line = String::new();
    let mut limited = rd.take(limit as u64);
    match tokio::time::timeout(wait, limited.read_line(&mut line)).await {
        Err(_) => Err(Reply::err(format!(
            "timed out after {} s waiting for the {what} line",
            wait.as_secs()
        ))),
        Ok(Err(e)) => Err(Reply::err(format!("cannot read the {what} line: {e}"))),
        Ok(Ok(_)) if !line.ends_with('\n') => Err(Reply::err(format!(
            "{what} line missing or longer than {limit} bytes"
        ))),
        Ok(Ok(_)) => Ok(line),
    }
}

const NEEDS_TOKEN: &str = "this request needs the node's control token (from DATA_DIR/control.json or STAMPEDE_CONTROL_TOKEN)";

async fn handle(stream: tokio::net::TcpStream, state: &ControlState) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = TokioBufReader::new(rd);
    let reply = match read_line_within(&mut rd, MAX_HEAD_LINE, HEAD_TIMEOUT, "request").await {
        Err(reply) => reply,
        Ok(line) => match serde_json::from_str::<HeadLine>(&line) {
            Err(e) => Reply::err(format!("not a control request: {e}")),
            Ok(HeadLine { token, head }) => {
                if head.mutates() && !token_ok(token.as_deref(), &state.token) {
                    Reply::err(NEEDS_TOKEN)
                } else {
                    match head {
                        Head::Run => {
                            match read_line_within(&mut rd, MAX_BODY_LINE, BODY_TIMEOUT, "run body")
                                .await
                            {
                                Err(reply) => reply,
                                Ok(body) => match serde_json::from_str::<RunBody>(&body) {
                                    Err(e) => Reply::err(format!("not a run body: {e}")),
                                    Ok(RunBody {
                                        bundle,
                                        requirements,
                                    }) => stream_run(&mut wr, state, bundle, requirements).await?,
                                },
                            }
                        }
                        Head::Peers => answer(ControlRequest::Peers, state).await,
                        Head::Status => answer(ControlRequest::Status, state).await,
                        Head::Stop { run_id } => {
                            answer(ControlRequest::Stop { run_id }, state).await
                        }
                        Head::Report { run_id } => {
                            answer(ControlRequest::Report { run_id }, state).await
                        }
                    }
                }
            }
        },
    };
    wr.write_all(&reply_line(&reply)).await?;
    wr.shutdown().await
}

/// Starts a run and streams its progress as event lines; the reply carries the summary.
///
/// The run driver's lines are taken off its channel at once and wait in a
/// [`ProgressQueue`] while the client reads: a CLI that stops reading (suspended,
/// piped into a pager) costs the node at most that queue, whatever the run's length.
async fn stream_run<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    state: &ControlState,
    bundle: stampede_protocol::run::Bundle,
    requirements: stampede_protocol::run::Requirements,
) -> std::io::Result<Reply> {
    let (progress, mut progress_rx) = mpsc::unbounded_channel();
    let (done, mut done_rx) = tokio::sync::oneshot::channel();
    let cmd = crate::run::CoordCommand::Start {
        bundle,
        requirements,
        client: crate::run::ClientLink { progress, done },
    };
    if state.coordinator.send(cmd).await.is_err() {
        return Ok(Reply::err("the node's run coordinator is not running"));
    }
    let queue = std::sync::Mutex::new(ProgressQueue::default());
    let queued = tokio::sync::Notify::new();
    let result = {
        let relay = async {
            while let Some(line) = progress_rx.recv().await {
                lock_queue(&queue).push(line);
                queued.notify_one();
            }
            std::future::pending::<()>().await
        };
        // Writes whole lines only: it is never cancelled inside a write.
        let writer = async {
            loop {
                let next = lock_queue(&queue).lines.pop_front();
                match next {
                    Some(line) => write_event(wr, &line).await?,
                    None => tokio::select! {
                        _ = queued.notified() => {}
                        result = &mut done_rx => return Ok::<_, std::io::Error>(result),
                    },
                }
            }
        };
        tokio::select! {
            result = writer => result?,
            _ = relay => unreachable!("the relay never ends"),
        }
    };
    // Lines sent before the end go out first.
    while let Ok(line) = progress_rx.try_recv() {
        lock_queue(&queue).push(line);
    }
    let (lines, dropped) = {
        let mut q = lock_queue(&queue);
        (std::mem::take(&mut q.lines), q.dropped)
    };
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "the CLI read too slowly: its oldest run events were dropped"
        );
    }
    for line in lines {
        write_event(wr, &line).await?;
    }
    Ok(match result {
        Ok(Ok(summary)) => Reply::ok(serde_json::to_value(summary).unwrap_or_default()),
        Ok(Err(e)) => Reply::err(e),
        Err(_) => Reply::err("the run ended without a result"),
    })
}

async fn write_event<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    line: &serde_json::Value,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(&serde_json::json!({ "event": line })).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

/// Most lines a run's client may have waiting to be written.
const PROGRESS_QUEUE: usize = 256;

/// Lines waiting for the client. A progress line says the whole run so far, so a newer
/// one replaces any still waiting; run events beyond [`PROGRESS_QUEUE`] push out the
/// oldest (counted). The final summary never goes through here.
#[derive(Default)]
struct ProgressQueue {
    lines: std::collections::VecDeque<serde_json::Value>,
    dropped: u64,
}

impl ProgressQueue {
    fn push(&mut self, line: serde_json::Value) {
        if line.get("progress").is_some() {
            if let Some(i) = self.lines.iter().position(|l| l.get("progress").is_some()) {
                self.lines.remove(i);
            }
        }
        if self.lines.len() >= PROGRESS_QUEUE {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
    }
}

fn lock_queue(q: &std::sync::Mutex<ProgressQueue>) -> std::sync::MutexGuard<'_, ProgressQueue> {
    match q.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn token_ok(given: Option<&str>, expected: &str) -> bool {
    let Some(given) = given else { return false };
    // Constant-time compare, so the token cannot be guessed byte by byte.
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Answers a request whose token, if it needs one, was checked.
async fn answer(request: ControlRequest, state: &ControlState) -> Reply {
    match request {
        ControlRequest::Peers => match state.view.read() {
            Ok(v) => Reply::ok(
                serde_json::to_value(v.rows(std::time::Instant::now())).unwrap_or_default(),
            ),
            Err(_) => Reply::err("membership view unavailable"),
        },
        ControlRequest::Status => {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let cmd = crate::run::CoordCommand::Status { reply };
            match state.coordinator.send(cmd).await {
                Ok(()) => match rx.await {
                    Ok(v) => Reply::ok(with_saved_runs(v, &state.results).await),
                    Err(_) => Reply::err("no answer from the run coordinator"),
                },
                Err(_) => Reply::err("the node's run coordinator is not running"),
            }
        }
        ControlRequest::Stop { run_id } => {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let cmd = crate::run::CoordCommand::Stop { run_id, reply };
            match state.coordinator.send(cmd).await {
                Ok(()) => match rx.await {
                    Ok(Ok(())) => Reply::ok(serde_json::json!({ "stopping": true })),
                    Ok(Err(e)) => Reply::err(e),
                    Err(_) => Reply::err("no answer from the run coordinator"),
                },
                Err(_) => Reply::err("the node's run coordinator is not running"),
            }
        }
        ControlRequest::Report { run_id } => report(run_id, state).await,
        ControlRequest::Run { .. } => Reply::err("a run request is streamed, not answered here"),
    }
}

/// How long one member may take to answer a summary request.
const REPORT_ASK_TIMEOUT: Duration = Duration::from_secs(4);
/// How long `report` asks the mesh in all (the CLI waits 30 s for an answer).
const REPORT_MESH_WAIT: Duration = Duration::from_secs(20);

/// Adds the finished runs saved in the data dir to the coordinator's runs in memory
/// (which win for a run in both), so `status` lists them after a restart.
async fn with_saved_runs(
    mut status: serde_json::Value,
    results: &crate::reports::results::Results,
) -> serde_json::Value {
    let r = results.clone();
    let saved = tokio::task::spawn_blocking(move || r.list())
        .await
        .unwrap_or_default();
    let Some(runs) = status.get_mut("runs").and_then(|v| v.as_array_mut()) else {
        return status;
    };
    for run in runs.iter_mut() {
        let id = run["run_id"].as_str().unwrap_or_default();
        let is_saved = saved.iter().any(|s| s.run_id == id);
        run["saved"] = serde_json::Value::Bool(is_saved);
    }
    for s in saved {
        if runs.iter().any(|r| r["run_id"] == s.run_id.as_str()) {
            continue;
        }
        runs.push(serde_json::json!({
            "run_id": s.run_id, "plan": s.plan, "phase": "done", "saved": true,
            "started_at": s.started_at, "elapsed_s": s.duration_s,
            "requests": s.requests, "failed": s.failed,
            "members": s.members, "lost": s.lost, "leader_name": "",
        }));
    }
    status
}

/// Finds a finished run's summary: here first, then each alive member in turn.
async fn report(run_id: String, state: &ControlState) -> Reply {
    if let Err(e) = crate::reports::results::check_run_id(&run_id) {
        return Reply::err(e);
    }
    let (r, id) = (state.results.clone(), run_id.clone());
    match tokio::task::spawn_blocking(move || r.load_summary_json(&id)).await {
        Ok(Ok(Some(json))) => return found(&run_id, &json, "this node"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(run = %run_id, error = %e, "saved summary unreadable; asking the mesh")
        }
        Err(e) => tracing::warn!(error = %e, "summary read failed"),
    }
    let peers = match state.view.read() {
        Ok(v) => v.alive_peers(),
        Err(_) => Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + REPORT_MESH_WAIT;
    let mut asked = 0;
    for peer in peers {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        asked += 1;
        let req = MeshRequest::Run(RunRequest::Summary {
            run_id: run_id.clone(),
        });
        match crate::mesh::request(&state.commands, peer, req, left.min(REPORT_ASK_TIMEOUT)).await {
            Ok(MeshResponse::Run(RunResponse::Summary { json })) => {
                let reply = found(&run_id, &json, &peer.to_string());
                if reply.ok {
                    return reply;
                }
                tracing::warn!(%peer, error = ?reply.error, "a member sent an unusable summary");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "no summary from a member"),
        }
    }
    Reply::ok(serde_json::json!({ "found": false, "asked": asked }))
}

/// The reply for a summary found at `from`, once it is checked to be the run's.
fn found(run_id: &str, json: &str, from: &str) -> Reply {
    match crate::reports::results::parse_summary(run_id, json)
        .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string()))
    {
        Ok(summary) => Reply::ok(serde_json::json!({
            "found": true, "from": from, "summary": summary,
        })),
        Err(e) => Reply::err(format!("the summary of run {run_id} from {from}: {e}")),
    }
}

/// Where and how the CLI reaches a node.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub token: Option<String>,
}

/// Finds the node: `--node ADDR` wins; otherwise `control.json` in the data dir
/// (`--data-dir`, `STAMPEDE_DATA_DIR`, or the default). The token comes from
/// `STAMPEDE_CONTROL_TOKEN` or that file.
pub fn find_node(node: Option<&str>, data_dir: Option<&Path>) -> Result<Target, String> {
    let dir = client_data_dir(data_dir);
    let env_token = std::env::var("STAMPEDE_CONTROL_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    match node {
        Some(addr) => {
            let token = env_token.or_else(|| ControlInfo::read(&dir).ok().map(|i| i.token));
            Ok(Target {
                addr: addr.to_string(),
                token,
            })
        }
        None => {
            let info = ControlInfo::read(&dir)?;
            Ok(Target {
                addr: info.addr,
                token: env_token.or(Some(info.token)),
            })
        }
    }
}

/// The data dir a CLI command means: `--data-dir`, `STAMPEDE_DATA_DIR`, or the default.
pub fn client_data_dir(data_dir: Option<&Path>) -> PathBuf {
    data_dir
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("STAMPEDE_DATA_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(crate::settings::default_data_dir)
}

/// Sends one request and returns the final reply's data (blocking; the CLI has no
/// runtime of its own).
pub fn call(target: &Target, request: ControlRequest) -> Result<serde_json::Value, String> {
    call_streaming(target, request, Duration::from_secs(30), |_| {})
}

/// Like [`call`], handing every streamed event line to `on_event`; `quiet` is the
/// longest silence accepted between two lines.
pub fn call_streaming(
    target: &Target,
    request: ControlRequest,
    quiet: Duration,
    mut on_event: impl FnMut(serde_json::Value),
) -> Result<serde_json::Value, String> {
    let addrs: Vec<SocketAddr> = target
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("control address `{}` is not HOST:PORT: {e}", target.addr))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| format!("control address `{}` resolves to nothing", target.addr))?;
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(3)).map_err(|e| {
        format!(
            "cannot reach the node at {} ({e}); is `stampede node` running?",
            target.addr
        )
    })?;
    stream
        .set_read_timeout(Some(quiet))
        .map_err(|e| e.to_string())?;
    let bytes = request_lines(target.token.clone(), request).map_err(|e| e.to_string())?;
    stream
        .write_all(&bytes)
        .map_err(|e| format!("cannot send to the node at {}: {e}", target.addr))?;
    let mut rd = BufReader::new(stream);
    // Event lines (streamed progress) go to `on_event`; the final line has "ok".
    loop {
        let mut buf = String::new();
        let n = rd
            .read_line(&mut buf)
            .map_err(|e| format!("no answer from the node at {}: {e}", target.addr))?;
        if n == 0 {
            return Err(format!(
                "the node at {} closed the connection without an answer",
                target.addr
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&buf)
            .map_err(|e| format!("the node at {} sent an unreadable answer: {e}", target.addr))?;
        if let Some(ev) = v.get("event") {
            on_event(ev.clone());
            continue;
        }
        if v.get("ok").is_some() {
            let reply: Reply =
                serde_json::from_value(v).map_err(|e| format!("unreadable answer: {e}"))?;
            return if reply.ok {
                Ok(reply.data.unwrap_or_default())
            } else {
                Err(reply.error.unwrap_or_else(|| "the node refused".into()))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_stable_json() {
        let bytes = request_lines(
            Some("t".into()),
            ControlRequest::Stop {
                run_id: "r1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\"token\":\"t\",\"op\":\"stop\",\"run_id\":\"r1\"}\n"
        );
        let back: HeadLine = serde_json::from_str(r#"{"op":"peers"}"#).unwrap();
        assert_eq!(back.head, Head::Peers);
        assert!(back.token.is_none());
        // A run: the head carries only op and token; the bundle is on the second line.
        let bundle = stampede_protocol::run::Bundle {
            plan_name: "p.toml".into(),
            plan: "x".repeat(10_000),
            files: Default::default(),
        };
        let bytes = request_lines(
            Some("t".into()),
            ControlRequest::Run {
                bundle: bundle.clone(),
                requirements: Default::default(),
            },
        )
        .unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"token":"t","op":"run"}"#);
        assert!(lines[0].len() <= MAX_HEAD_LINE);
        let body: RunBody = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(body.bundle, bundle);
    }

    /// A control state whose coordinator is `coordinator`'s other end.
    fn state(coordinator: mpsc::Sender<crate::run::CoordCommand>) -> ControlState {
        use stampede_protocol::mesh::{Announce, NodeState, PROTOCOL_VERSION};
        let me = libp2p::PeerId::random();
        let announce = Announce {
            id: me.to_string(),
            name: "n".into(),
            version: "0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: Default::default(),
            capacity: 1,
            state: NodeState::Idle,
            allow_targets: vec![],
            addrs: vec![],
            seq: 1,
            signature: vec![],
        };
        let view = Arc::new(std::sync::RwLock::new(crate::mesh::membership::View::new(
            me,
            announce,
            Duration::from_secs(3),
        )));
        let (commands, _) = mpsc::channel(1);
        ControlState {
            token: "secret".into(),
            view,
            commands,
            coordinator,
            results: crate::reports::results::Results::new(
                &std::env::temp_dir().join("stampede-fuzz-control"),
            ),
        }
    }

    /// A real control endpoint on 127.0.0.1 (no coordinator behind it) and its address.
    async fn endpoint() -> std::net::SocketAddr {
        let (coordinator, _) = mpsc::channel(1);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state(coordinator)));
        addr
    }

    /// A CLI that does not read while a long run streams: the node keeps a bounded
    /// queue (the newest progress line, the newest run events), then the summary.
    #[tokio::test]
    async fn a_client_that_does_not_read_costs_a_bounded_queue_and_still_gets_the_summary() {
        let (coordinator, mut commands) = mpsc::channel(1);
        let state = state(coordinator);
        // A pipe of 64 bytes that nobody reads until the run is over.
        let (mut client, mut server) = tokio::io::duplex(64);
        let bundle = stampede_protocol::run::Bundle {
            plan_name: "p.toml".into(),
            plan: String::new(),
            files: Default::default(),
        };
        let stream = tokio::spawn(async move {
            stream_run(&mut server, &state, bundle, Default::default())
                .await
                .map(|r| serde_json::to_value(r).unwrap())
        });
        let Some(crate::run::CoordCommand::Start { client: link, .. }) = commands.recv().await
        else {
            panic!("no run started");
        };
        let (progress, events) = (10_000u64, 1_000u64);
        for i in 0..progress {
            link.progress
                .send(serde_json::json!({ "progress": i }))
                .unwrap();
            if i < events {
                link.progress
                    .send(serde_json::json!({ "run_event": i }))
                    .unwrap();
            }
            if i % 100 == 0 {
                // Give the relay a turn, as the driver's pace would.
                tokio::task::yield_now().await;
            }
        }
        // The run's result (a failure here: it goes the same way as a summary).
        let _ = link.done.send(Err("the run's result".into()));
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut text))
            .await
            .expect("the stream ends")
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), stream)
            .await
            .expect("the stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(reply["error"], "the run's result", "{reply}");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            lines.len() <= PROGRESS_QUEUE + 2,
            "{} lines were kept for a client that did not read",
            lines.len()
        );
        // The newest of each kind made it.
        let last = |kind: &str| lines.iter().rev().find_map(|l| l["event"][kind].as_u64());
        assert_eq!(last("progress"), Some(progress - 1));
        assert_eq!(last("run_event"), Some(events - 1));
    }

    /// Sends `bytes`, closes the sending side, and returns what the node answered.
    async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        let mut out = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out));
        assert!(read.await.is_ok(), "no answer within 10 s to {bytes:?}");
        out
    }

    fn fuzz_cases() -> u32 {
        std::env::var("STAMPEDE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: fuzz_cases(),
            max_shrink_iters: 512,
            ..Default::default()
        })]

        /// Arbitrary bytes, and valid requests cut or with a byte changed: every
        /// connection gets exactly one reply line, and nothing mutates without the token.
        #[test]
        fn fuzz_control_requests(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            pick in 0usize..5,
            at in proptest::prelude::any::<usize>(),
            byte in proptest::prelude::any::<u8>(),
            use_junk in proptest::prelude::any::<bool>(),
        ) {
            let valid: [&[u8]; 5] = [
                b"{\"op\":\"peers\"}\n",
                b"{\"op\":\"status\"}\n",
                b"{\"op\":\"stop\",\"run_id\":\"r\"}\n",
                b"{\"op\":\"run\"}\n{\"bundle\":{\"plan_name\":\"p\",\"plan\":\"\",\"files\":{}}}\n",
                b"{\"op\":\"run\",\"token\":\"secret\"}\n{\"bundle\":{\"plan_name\":\"p\",\"plan\":\"\",\"files\":{\"a\":[1,2]}}}\n",
            ];
            let bytes = if use_junk {
                junk
            } else {
                let mut b = valid[pick].to_vec();
                let i = at % b.len();
                b[i] = byte;
                b
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let answer = rt.block_on(async {
                let addr = endpoint().await;
                raw(addr, &bytes).await
            });
            let lines: Vec<&str> = answer.lines().collect();
            proptest::prop_assert_eq!(lines.len(), 1, "{:?}", answer);
            let reply: Reply = serde_json::from_str(lines[0]).unwrap();
            if reply.ok {
                // Only the read-only requests can succeed without a coordinator.
                proptest::prop_assert!(reply.data.is_some());
            }
        }
    }

    #[test]
    fn token_comparison() {
        assert!(token_ok(Some("abc"), "abc"));
        assert!(!token_ok(Some("abd"), "abc"));
        assert!(!token_ok(Some("ab"), "abc"));
        assert!(!token_ok(None, "abc"));
        assert_eq!(new_token().len(), 32);
    }

    #[tokio::test]
    async fn status_lists_saved_runs_after_those_in_memory_once_each() {
        let tmp = tempfile::tempdir().unwrap();
        let results = crate::reports::results::Results::new(tmp.path());
        let saved = |id: &str| {
            let s = crate::reports::results::tests::summary(id, 80, 0);
            results.save_summary(&s).unwrap();
        };
        saved("1-0001");
        saved("1-0002");
        let in_memory = serde_json::json!({"runs": [
            {"run_id": "1-0002", "phase": "done"},
            {"run_id": "1-0003", "phase": "running"},
        ]});
        let v = with_saved_runs(in_memory, &results).await;
        let runs = v["runs"].as_array().unwrap();
        let ids: Vec<&str> = runs.iter().map(|r| r["run_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["1-0002", "1-0003", "1-0001"]);
        assert_eq!(runs[0]["saved"], true);
        assert_eq!(runs[1]["saved"], false);
        assert_eq!(runs[2]["phase"], "done");
        assert_eq!(runs[2]["requests"], 80);
    }
}
