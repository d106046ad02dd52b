//! A virtual user: its connections, cookie jar, variables and random generator, and
//! the running of one iteration of a flow — render each step's request, send it,
//! check and extract from the response, record what happened, think.
//!
//! A VU lives on one worker thread and records into that worker's [`Metrics`] through a
//! `RefCell` borrowed only between awaits: no lock, no atomic and no channel send per
//! request. It must not decide *when* to iterate; the executors in `engine` do.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use rand::rngs::SmallRng;
use rand::Rng;
use stampede_protocol::named::Named;
use stampede_protocol::plan::Think;
use stampede_protocol::snapshot::{ErrorClass, Metrics};

use crate::http::ws::{self, WsConn, WsError};
use crate::http::{
    CookieJar, GrpcClient, HttpErrorKind, OutRequest, Response, Shared, Url, VuClient,
};
use crate::plan::compile::{
    CompiledBody, CompiledCheck, CompiledExtract, CompiledPlan, CompiledStep, CompiledWs,
    CompiledWsAction, UrlTemplate,
};
use crate::plan::data::{self, FeedMode, RowPick, SharedCursor};
use crate::plan::jsonpath;
use crate::plan::template::RenderCtx;
use crate::reports::failing::Backoff;

/// What a worker thread shares with its VUs.
pub struct WorkerCtx {
    pub plan: Arc<CompiledPlan>,
    pub http: Arc<Shared>,
    pub node_name: Arc<str>,
    pub recorder: RefCell<Metrics>,
    /// One cursor per feeder, shared by the node's workers (shared-sequential mode).
    pub cursors: Arc<Vec<SharedCursor>>,
}

/// How an iteration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IterationEnd {
    Completed,
    /// A request or check failed (the iteration still ran to its end or to the failure).
    Failed,
    /// The VU's data ran out under `on_exhausted = "stop"`: it must not iterate again.
    DataExhausted,
}

/// What is left of a retired VU: enough for the next VU of its slot to continue its
/// data rows and random sequence (see [`Vu::park`]).
#[derive(Debug, Clone)]
pub struct Parked {
    pub global_id: u64,
    pub iteration: u64,
    pub(crate) rng: SmallRng,
}

pub struct Vu {
    /// 0-based across the whole mesh and every scenario.
    pub global_id: u64,
    pub scenario: usize,
    pub iteration: u64,
    client: VuClient,
    /// Made at the VU's first gRPC step: most plans have none.
    grpc: Option<GrpcClient>,
    jar: CookieJar,
    /// Extracted variables, per flow (each flow has its own slots).
    vars: Vec<Vec<Option<String>>>,
    rng: SmallRng,
    text: String,
    body: Vec<u8>,
    /// Paces this VU while its target cannot be reached.
    backoff: Backoff,
    /// The VU's WebSockets, by the plan's socket index: kept across steps and
    /// iterations until a close step or a loss.
    sockets: Vec<Option<WsConn>>,
}

impl Vu {
    pub fn new(ctx: &WorkerCtx, scenario: usize, global_id: u64) -> Vu {
        let mut client = VuClient::new(ctx.http.clone());
        client
            .share_http2_connections(ctx.plan.plan.defaults.http2_streams_per_connection as usize);
        Vu {
            global_id,
            scenario,
            iteration: 0,
            client,
            grpc: None,
            jar: CookieJar::new(),
            vars: ctx
                .plan
                .flows
                .iter()
                .map(|f| vec![None; f.var_count])
                .collect(),
            rng: data::vu_rng(ctx.plan.plan.seed, global_id),
            text: String::new(),
            body: Vec::new(),
            backoff: Backoff::default(),
            sockets: (0..ctx.plan.ws_sockets.len()).map(|_| None).collect(),
        }
    }

    /// Ends this VU, keeping what its successor in the same VU slot must go on from: its
    /// iteration count (which `unique` row comes next) and its random generator (the
    /// seeded sequence goes on instead of repeating). Connections, cookies and
    /// variables are dropped with it.
    pub fn park(self) -> Parked {
        Parked {
            global_id: self.global_id,
            iteration: self.iteration,
            rng: self.rng,
        }
    }

    /// A VU that takes up where a parked one left off.
    pub fn resume(ctx: &WorkerCtx, scenario: usize, parked: Parked) -> Vu {
        let mut vu = Vu::new(ctx, scenario, parked.global_id);
        vu.iteration = parked.iteration;
        vu.rng = parked.rng;
        vu
    }

    /// Runs one iteration. `intended` is when the open model meant it to start (its
    /// first request's latency counts from there); `None` for closed-model executors.
    pub async fn iterate(&mut self, ctx: &WorkerCtx, intended: Option<Instant>) -> IterationEnd {
        let plan = &*ctx.plan;
        let sc = &plan.scenarios[self.scenario];
        let slot = sc.pick(self.rng.random_range(0..sc.total_weight.max(1)));
        let flow_index = sc.flows[slot].0;
        let flow = &plan.flows[flow_index];

        // The data rows of this iteration, one per feeder the flow reads.
        let mut rows: Vec<Option<&[String]>> = Vec::with_capacity(plan.feeders.len());
        for (i, f) in plan.feeders.iter().enumerate() {
            if !flow.feeders_used[i] {
                rows.push(None);
                continue;
            }
            let pick = match f.mode {
                FeedMode::Unique => f.data.unique_row(
                    self.global_id,
                    plan.total_vu_slots,
                    self.iteration,
                    f.on_exhausted,
                ),
                FeedMode::SharedSequential => f.data.shared_row(&ctx.cursors[i], f.on_exhausted),
                FeedMode::Random => f.data.random_row(&mut self.rng),
            };
            match pick {
                RowPick::Row(r) => rows.push(Some(r)),
                RowPick::Exhausted => return IterationEnd::DataExhausted,
            }
        }

        let started = Instant::now();
        let mut failed = false;
        let mut unreached = false;
        let mut step_intended = intended.unwrap_or(started);
        let mut last_done = started;
        for (si, step) in flow.steps.iter().enumerate() {
            let series = sc.series_base[slot] + si;
            if let Some(ws) = &step.ws {
                let ran = self.ws_step(ctx, step, ws, series, step_intended, flow_index, &rows);
                let Some(done) = ran.await else {
                    failed = true;
                    break;
                };
                last_done = self.think(step.think, done).await;
                step_intended = last_done;
                continue;
            }
            let vars = &mut self.vars[flow_index];
            let built = {
                let mut rctx = RenderCtx {
                    vu: self.global_id + 1,
                    iteration: self.iteration,
                    node: &ctx.node_name,
                    vars,
                    rows: &rows,
                    rng: &mut self.rng,
                };
                build_request(step, &mut rctx, &mut self.text, &mut self.body)
            };
            let req = match built {
                Ok(r) => r,
                Err(_msg) => {
                    let mut m = ctx.recorder.borrow_mut();
                    let s = &mut m.series[series];
                    s.requests += 1;
                    s.failed += 1;
                    s.errors[ErrorClass::Other as usize] += 1;
                    failed = true;
                    break;
                }
            };
            let bytes_sent = req.body.len() as u64;
            let (result, grpc_status) = match &step.grpc {
                None => (self.client.send(req, &mut self.jar).await, None),
                Some(method) => {
                    let client = self
                        .grpc
                        .get_or_insert_with(|| GrpcClient::new(ctx.http.clone()));
                    match client.call(method, req).await {
                        Ok(reply) => (Ok(reply.response), Some(reply.status)),
                        Err(e) => (Err(e), None),
                    }
                }
            };
            let ok = {
                let mut m = ctx.recorder.borrow_mut();
                let s = &mut m.series[series];
                s.requests += 1;
                match &result {
                    Ok(resp) => {
                        // Request line, headers and body as written, over every hop.
                        s.bytes_sent += resp.bytes_sent;
                        s.latency.record(micros(
                            resp.done_at.saturating_duration_since(step_intended),
                        ));
                        s.service
                            .record(micros(resp.done_at.saturating_duration_since(resp.sent_at)));
                        s.bytes_received += resp.bytes_received;
                        if let Some(code) = grpc_status {
                            s.named.record(
                                Named::GrpcReqDuration,
                                micros(resp.done_at.saturating_duration_since(resp.sent_at)),
                            );
                            if let Some(n) = Named::grpc_status(code) {
                                s.named.count(n, 1);
                            }
                        }
                        let verdict = run_checks(&step.check, resp, grpc_status);
                        s.checks_passed += verdict.passed;
                        s.checks_failed += verdict.failed;
                        match verdict.error {
                            None => true,
                            Some(class) => {
                                s.failed += 1;
                                s.errors[class as usize] += 1;
                                false
                            }
                        }
                    }
                    Err(e) => {
                        unreached = Backoff::applies(e.kind());
                        s.bytes_sent += bytes_sent;
                        if !matches!(
                            e.kind(),
                            HttpErrorKind::Refused | HttpErrorKind::InvalidRequest
                        ) {
                            s.latency.record(micros(
                                Instant::now().saturating_duration_since(step_intended),
                            ));
                        }
                        if step.grpc.is_some() {
                            // What a gRPC client reports for a call it could not finish:
                            // its own deadline, or an unavailable server.
                            let code = match e.kind() {
                                HttpErrorKind::Timeout => Some(4),
                                HttpErrorKind::Refused | HttpErrorKind::InvalidRequest => None,
                                _ => Some(14),
                            };
                            if let Some(n) = code.and_then(Named::grpc_status) {
                                s.named.count(n, 1);
                            }
                        }
                        s.failed += 1;
                        s.checks_failed += step.check.count();
                        s.errors[e.kind().class() as usize] += 1;
                        false
                    }
                }
            };
            match result {
                Ok(resp) if ok => {
                    self.backoff.succeeded();
                    extract(step, &resp, &self.jar, &mut self.vars[flow_index]);
                    // Clock reads cost on this path: the response's own end stands for
                    // "now" unless the step thinks.
                    last_done = resp.done_at;
                }
                _ => {
                    // Later steps usually depend on this one (a token, a cart): stop here
                    // rather than send requests that can only fail.
                    failed = true;
                    break;
                }
            }
            last_done = self.think(step.think, last_done).await;
            step_intended = last_done;
        }

        {
            let mut m = ctx.recorder.borrow_mut();
            let st = &mut m.scenarios[self.scenario];
            st.iterations += 1;
            st.failed_iterations += failed as u64;
            let ended = if failed { Instant::now() } else { last_done };
            st.iteration_duration
                .record(micros(ended.saturating_duration_since(started)));
            m.flow_iterations[sc.flow_slot[slot]] += 1;
        }
        self.iteration += 1;
        if unreached {
            // The target was not reached: trying again at once would only spin.
            tokio::time::sleep(self.backoff.failed()).await;
        }
        if failed {
            IterationEnd::Failed
        } else {
            IterationEnd::Completed
        }
    }
}

impl Vu {
    /// Thinks as the step says after a step that ended at `done`; returns when the
    /// thinking ended (`done` itself when there is none: no clock read).
    async fn think(&mut self, think: Think, done: Instant) -> Instant {
        match think {
            Think::None => return done,
            Think::Fixed(d) => tokio::time::sleep(d).await,
            Think::Range(a, b) => {
                let d = a + (b - a).mul_f64(self.rng.random::<f64>());
                tokio::time::sleep(d).await;
            }
        }
        Instant::now()
    }

    /// Runs one WebSocket step and records it in `series` like a request (latency
    /// from `intended`, service time from its start) plus its named metrics. Returns
    /// when it ended, or `None` when it failed.
    #[allow(clippy::too_many_arguments)]
    async fn ws_step(
        &mut self,
        ctx: &WorkerCtx,
        step: &CompiledStep,
        ws: &CompiledWs,
        series: usize,
        intended: Instant,
        flow_index: usize,
        rows: &[Option<&[String]>],
    ) -> Option<Instant> {
        let started = Instant::now();
        let slot = ws.socket;
        let mut sent_bytes = 0u64;
        let mut received = Vec::new();
        let mut verdict = (0u64, 0u64);
        let outcome: Result<(), WsError> = match &ws.action {
            CompiledWsAction::Open {
                url,
                headers,
                subprotocols,
                keep,
            } => {
                if *keep && self.sockets[slot].is_some() {
                    // Held from an earlier iteration: nothing to send, nothing to count.
                    return Some(started);
                }
                if let Some(old) = self.sockets[slot].take() {
                    Self::session_ended(ctx, series, &old);
                    let _ = old.close(1000, "", ws.timeout).await;
                }
                let (url, headers) = {
                    let mut rctx = RenderCtx {
                        vu: self.global_id + 1,
                        iteration: self.iteration,
                        node: &ctx.node_name,
                        vars: &mut self.vars[flow_index],
                        rows,
                        rng: &mut self.rng,
                    };
                    let mut u = String::new();
                    url.render(&mut rctx, &mut u);
                    let hs: Vec<(String, String)> = headers
                        .iter()
                        .map(|(k, t)| {
                            let mut v = String::new();
                            t.render(&mut rctx, &mut v);
                            (k.clone(), v)
                        })
                        .collect();
                    (u, hs)
                };
                match ws::open(&ctx.http, &url, &headers, subprotocols, ws.timeout).await {
                    Ok(o) => {
                        let mut m = ctx.recorder.borrow_mut();
                        let n = &mut m.series[series].named;
                        n.record(Named::WsConnecting, micros(o.connecting));
                        n.count(Named::WsSessions, 1);
                        self.sockets[slot] = Some(o.conn);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            CompiledWsAction::Send { body, binary } => {
                self.body.clear();
                {
                    let mut rctx = RenderCtx {
                        vu: self.global_id + 1,
                        iteration: self.iteration,
                        node: &ctx.node_name,
                        vars: &mut self.vars[flow_index],
                        rows,
                        rng: &mut self.rng,
                    };
                    match body {
                        CompiledBody::Json(j) => j.render_json(&mut rctx, &mut self.body),
                        CompiledBody::Text(t) => {
                            self.text.clear();
                            t.render(&mut rctx, &mut self.text);
                            self.body.extend_from_slice(self.text.as_bytes());
                        }
                        CompiledBody::None | CompiledBody::Form(_) => {}
                    }
                }
                match self.sockets[slot].as_mut() {
                    None => Err(no_socket(ctx, slot)),
                    Some(conn) => {
                        sent_bytes = self.body.len() as u64;
                        let r = conn.send(self.body.clone(), *binary, ws.timeout).await;
                        if r.is_ok() {
                            ctx.recorder.borrow_mut().series[series]
                                .named
                                .count(Named::WsMsgsSent, 1);
                        }
                        r
                    }
                }
            }
            CompiledWsAction::Receive { matching } => match self.sockets[slot].as_mut() {
                None => Err(no_socket(ctx, slot)),
                Some(conn) => {
                    let deadline = tokio::time::Instant::now() + ws.timeout;
                    loop {
                        match conn.next(deadline).await {
                            Err(e) => break Err(e),
                            Ok(msg) => {
                                let v = body_checks(&step.check, &msg.data);
                                received.push(msg.data.len() as u64);
                                if *matching && v.1 > 0 {
                                    // Not the message this step waits for: skipped.
                                    continue;
                                }
                                verdict = v;
                                if let Some(sent) = conn.last_sent {
                                    ctx.recorder.borrow_mut().series[series].named.record(
                                        Named::WsMsgRtt,
                                        micros(msg.at.saturating_duration_since(sent)),
                                    );
                                }
                                extract_body(step, &msg.data, &mut self.vars[flow_index]);
                                break Ok(());
                            }
                        }
                    }
                }
            },
            CompiledWsAction::Ping => match self.sockets[slot].as_mut() {
                None => Err(no_socket(ctx, slot)),
                Some(conn) => conn.ping(ws.timeout).await.map(|(_, arrived)| {
                    received.extend(std::iter::repeat_n(0, arrived as usize));
                }),
            },
            CompiledWsAction::Close { code, reason } => match self.sockets[slot].take() {
                None => Err(no_socket(ctx, slot)),
                Some(conn) => {
                    Self::session_ended(ctx, series, &conn);
                    conn.close(*code, reason, ws.timeout).await.map(|dropped| {
                        received.extend(std::iter::repeat_n(0, dropped as usize));
                    })
                }
            },
        };
        let done = Instant::now();
        let mut m = ctx.recorder.borrow_mut();
        let s = &mut m.series[series];
        s.requests += 1;
        s.bytes_sent += sent_bytes;
        s.bytes_received += received.iter().sum::<u64>();
        s.named.count(Named::WsMsgsReceived, received.len() as u64);
        s.latency
            .record(micros(done.saturating_duration_since(intended)));
        s.service
            .record(micros(done.saturating_duration_since(started)));
        match outcome {
            Ok(()) => {
                s.checks_passed += verdict.0;
                s.checks_failed += verdict.1;
                if verdict.1 > 0 {
                    s.failed += 1;
                    s.errors[ErrorClass::CheckFailed as usize] += 1;
                    return None;
                }
                Some(done)
            }
            Err(e) => {
                tracing::debug!(step = %step.name, "{e}");
                s.failed += 1;
                s.errors[e.class as usize] += 1;
                if matches!(ws.action, CompiledWsAction::Receive { .. }) {
                    s.checks_failed += body_check_count(&step.check);
                }
                if e.is_lost() {
                    if let Some(conn) = self.sockets[slot].take() {
                        s.named.record(
                            Named::WsSessionDuration,
                            micros(done.saturating_duration_since(conn.opened_at)),
                        );
                    }
                }
                None
            }
        }
    }

    fn session_ended(ctx: &WorkerCtx, series: usize, conn: &WsConn) {
        ctx.recorder.borrow_mut().series[series]
            .named
            .record(Named::WsSessionDuration, micros(conn.opened_at.elapsed()));
    }
}

fn no_socket(ctx: &WorkerCtx, slot: usize) -> WsError {
    WsError {
        class: ErrorClass::Other,
        message: format!(
            "no open WebSocket \"{}\": open it in an earlier step (ws = {{ open = ... }})",
            ctx.plan.ws_sockets[slot]
        ),
    }
}

pub fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Renders a step into a request. Errors are a template that rendered an invalid URL
/// or header: the plan's fault, counted as an `other` error.
fn build_request(
    step: &CompiledStep,
    rctx: &mut RenderCtx<'_>,
    text: &mut String,
    body: &mut Vec<u8>,
) -> Result<OutRequest, String> {
    let url = match &step.url {
        UrlTemplate::Static(u) if step.query.is_empty() => u.clone(),
        UrlTemplate::Static(u) => {
            text.clear();
            text.push_str(&u.to_string());
            append_query(step, rctx, text);
            Url::parse(text).map_err(|e| e.to_string())?
        }
        UrlTemplate::Dynamic(t) => {
            text.clear();
            t.render(rctx, text);
            append_query(step, rctx, text);
            Url::parse(text).map_err(|e| e.to_string())?
        }
    };
    // An empty map does not allocate; most steps send no header of their own.
    let mut headers = if step.headers.is_empty() {
        HeaderMap::new()
    } else {
        HeaderMap::with_capacity(step.headers.len() + 1)
    };
    for (name, t) in &step.headers {
        let value = match t.static_text() {
            Some(s) => HeaderValue::from_str(s),
            None => {
                text.clear();
                t.render(rctx, text);
                HeaderValue::from_str(text)
            }
        }
        .map_err(|_| format!("header {name} rendered an invalid value"))?;
        headers.append(name.clone(), value);
    }
    body.clear();
    match &step.body {
        CompiledBody::None => {}
        CompiledBody::Text(t) => {
            text.clear();
            t.render(rctx, text);
            body.extend_from_slice(text.as_bytes());
        }
        CompiledBody::Json(j) => {
            j.render_json(rctx, body);
            if !headers.contains_key(http::header::CONTENT_TYPE) {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        CompiledBody::Form(fields) => {
            text.clear();
            for (i, (k, t)) in fields.iter().enumerate() {
                if i > 0 {
                    text.push('&');
                }
                percent_encode(k, text);
                text.push('=');
                let mut v = String::new();
                t.render(rctx, &mut v);
                percent_encode(&v, text);
            }
            body.extend_from_slice(text.as_bytes());
            if !headers.contains_key(http::header::CONTENT_TYPE) {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
            }
        }
    }
    let mut req = OutRequest::new(step.method.clone(), url);
    req.headers = headers;
    req.body = Bytes::copy_from_slice(body);
    req.timeout = step.timeout;
    req.keep_body = reads_body(step);
    Ok(req)
}

/// Whether a check or an extraction of this step reads the response body. A body no one
/// reads is counted as received but never kept: a target's large body costs no memory.
fn reads_body(step: &CompiledStep) -> bool {
    let c = &step.check;
    c.body_contains.is_some()
        || c.body_regex.is_some()
        || !c.json.is_empty()
        || step
            .extract
            .iter()
            .any(|(_, e)| matches!(e, CompiledExtract::Json(_) | CompiledExtract::Regex(_)))
}

fn append_query(step: &CompiledStep, rctx: &mut RenderCtx<'_>, out: &mut String) {
    let mut first = !out.contains('?');
    let mut v = String::new();
    for (k, t) in &step.query {
        out.push(if first { '?' } else { '&' });
        first = false;
        percent_encode(k, out);
        out.push('=');
        v.clear();
        t.render(rctx, &mut v);
        percent_encode(&v, out);
    }
}

/// application/x-www-form-urlencoded style escaping of one key or value.
pub fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

struct Verdict {
    passed: u64,
    failed: u64,
    /// Why the request counts as failed, if it does.
    error: Option<ErrorClass>,
}

/// `grpc_status`: the call's status when the step is a gRPC call; it is checked instead
/// of the HTTP status.
fn run_checks(c: &CompiledCheck, r: &Response, grpc_status: Option<u32>) -> Verdict {
    let status = r.status.as_u16();
    let status_ok = match grpc_status {
        Some(code) if c.grpc_status.is_empty() => code == 0,
        Some(code) => c.grpc_status.contains(&code),
        None if c.status.is_empty() => status < 400,
        None => c.status.contains(&status),
    };
    let mut passed = status_ok as u64;
    let mut failed = !status_ok as u64;
    let mut tally = |ok: bool| {
        if ok {
            passed += 1
        } else {
            failed += 1
        }
    };
    for (name, want) in &c.headers {
        tally(r.headers.get(name.as_str()) == Some(want.as_str()));
    }
    let (p, f) = body_checks(c, &r.body);
    passed += p;
    failed += f;
    let error = if let (false, Some(code)) = (status_ok, grpc_status) {
        // A status the step does not accept is its own class, as HTTP's are; an OK
        // where the step wanted another status is a failed check.
        Some(ErrorClass::grpc(code).unwrap_or(ErrorClass::CheckFailed))
    } else if !status_ok {
        Some(match status {
            400..=499 => ErrorClass::Http4xx,
            500..=599 => ErrorClass::Http5xx,
            _ => ErrorClass::CheckFailed,
        })
    } else if failed > 0 {
        Some(ErrorClass::CheckFailed)
    } else {
        None
    };
    Verdict {
        passed,
        failed,
        error,
    }
}

/// The checks of a body (an HTTP response's or a WebSocket message's): contains,
/// regex, JSON paths. Returns (passed, failed).
fn body_checks(c: &CompiledCheck, body: &[u8]) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    let mut tally = |ok: bool| {
        if ok {
            passed += 1
        } else {
            failed += 1
        }
    };
    if let Some(needle) = &c.body_contains {
        tally(memfind(body, needle.as_bytes()));
    }
    if let Some(re) = &c.body_regex {
        tally(
            std::str::from_utf8(body)
                .map(|b| re.is_match(b))
                .unwrap_or(false),
        );
    }
    if !c.json.is_empty() {
        let doc: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        for (path, want) in &c.json {
            tally(doc.as_ref().and_then(|d| path.eval(d)).as_deref() == Some(want));
        }
    }
    (passed, failed)
}

/// How many checks [`body_checks`] makes.
fn body_check_count(c: &CompiledCheck) -> u64 {
    c.body_contains.is_some() as u64 + c.body_regex.is_some() as u64 + c.json.len() as u64
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn extract(step: &CompiledStep, r: &Response, jar: &CookieJar, vars: &mut [Option<String>]) {
    if step.extract.is_empty() {
        return;
    }
    let mut doc: Option<Option<serde_json::Value>> = None;
    for (slot, how) in &step.extract {
        let value = match how {
            CompiledExtract::Header(h) => r.headers.get(h.as_str()).map(str::to_string),
            CompiledExtract::Cookie(name) => jar.get(name).map(str::to_string),
            body => from_body(body, &r.body, &mut doc),
        };
        vars[*slot] = value;
    }
}

/// Extracts from a WebSocket message: JSON path and regex (headers and cookies are an
/// HTTP response's; they extract nothing here).
fn extract_body(step: &CompiledStep, body: &[u8], vars: &mut [Option<String>]) {
    let mut doc = None;
    for (slot, how) in &step.extract {
        vars[*slot] = from_body(how, body, &mut doc);
    }
}

/// A JSON path's or regex's value in `body`; `doc` caches the parsed JSON.
fn from_body(
    how: &CompiledExtract,
    body: &[u8],
    doc: &mut Option<Option<serde_json::Value>>,
) -> Option<String> {
    match how {
        CompiledExtract::Json(p) => {
            let d = doc.get_or_insert_with(|| serde_json::from_slice(body).ok());
            d.as_ref()
                .and_then(|d| p.eval(d))
                .map(|v| jsonpath::value_to_string(&v))
        }
        CompiledExtract::Regex(re) => std::str::from_utf8(body).ok().and_then(|b| {
            re.captures(b).map(|c| {
                c.get(1)
                    .or_else(|| c.get(0))
                    .map(|m| m.as_str().to_string())
                    .unwrap_or_default()
            })
        }),
        CompiledExtract::Header(_) | CompiledExtract::Cookie(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        let mut s = String::new();
        percent_encode("a b&c=d/é", &mut s);
        assert_eq!(s, "a+b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn memfind_works() {
        assert!(memfind(b"hello world", b"o w"));
        assert!(!memfind(b"hello", b"world"));
        assert!(memfind(b"x", b""));
    }
}
