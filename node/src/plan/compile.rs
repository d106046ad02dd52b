//! A plan made ready to run: templates compiled once, data files loaded, regexes and
//! JSON paths built, and the metrics [`Layout`] derived — everything a VU needs so that
//! nothing is parsed per request.
//!
//! This module turns a validated [`Plan`] into a [`CompiledPlan`]; it must not schedule,
//! send or measure anything. Errors name the plan file, line and field, like the
//! plan's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use regex::Regex;
use stampede_protocol::executor::Executor;
use stampede_protocol::plan::{self, Body, DataMode, Extract, Plan, PlanError, Think};
use stampede_protocol::snapshot::{Layout, SeriesKey};

use crate::http::Url;
use crate::plan::data::{self, DataSet, FeedMode, OnExhausted};
use crate::plan::jsonpath::JsonPath;
use crate::plan::proto;
use crate::plan::template::{JsonTemplate, Scope, Template};

/// The whole plan, ready for VUs. Shared read-only (`Arc`) by every worker thread.
#[derive(Debug)]
pub struct CompiledPlan {
    pub plan: Plan,
    /// The plan's TOML as it was compiled (overrides applied), for reports.
    pub source: String,
    /// Where the plan file is; data files are relative to it.
    pub base_dir: PathBuf,
    pub layout: Layout,
    pub feeders: Vec<Feeder>,
    pub flows: Vec<CompiledFlow>,
    pub scenarios: Vec<CompiledScenario>,
    /// VU slots of all scenarios together: the global VU id space (data partitioning).
    pub total_vu_slots: u64,
    /// Every .proto file the plan's gRPC steps read, imports included (a mesh run ships
    /// them in its bundle).
    pub proto_files: Vec<String>,
    /// The names of the WebSocket sockets the plan's steps use (a VU's socket slots).
    pub ws_sockets: Vec<String>,
}

#[derive(Debug)]
pub struct Feeder {
    pub data: Arc<DataSet>,
    pub mode: FeedMode,
    pub on_exhausted: OnExhausted,
}

#[derive(Debug)]
pub struct CompiledFlow {
    pub name: String,
    pub steps: Vec<CompiledStep>,
    /// Extract variables of this flow (slots of `Vu::vars`).
    pub var_count: usize,
    /// Which feeders the flow's templates read: only those advance per iteration.
    pub feeders_used: Vec<bool>,
}

#[derive(Debug)]
pub struct CompiledStep {
    pub name: String,
    pub method: Method,
    pub url: UrlTemplate,
    pub query: Vec<(String, Template)>,
    pub headers: Vec<(HeaderName, Template)>,
    pub body: CompiledBody,
    pub timeout: Duration,
    pub check: CompiledCheck,
    pub extract: Vec<(usize, CompiledExtract)>,
    pub think: Think,
    /// Set for a gRPC step: the method it calls (the rest is the HTTP/2 request above).
    pub grpc: Option<crate::http::GrpcMethod>,
    /// A WebSocket step: the HTTP fields above are unused.
    pub ws: Option<CompiledWs>,
}

/// A WebSocket step ready to run.
#[derive(Debug)]
pub struct CompiledWs {
    /// Index of the socket among [`CompiledPlan::ws_sockets`] (a slot of the VU's).
    pub socket: usize,
    pub action: CompiledWsAction,
    pub timeout: Duration,
}

#[derive(Debug)]
pub enum CompiledWsAction {
    Open {
        url: Template,
        headers: Vec<(String, Template)>,
        subprotocols: Vec<String>,
        keep: bool,
    },
    /// `body` is `Text` or `Json`.
    Send {
        body: CompiledBody,
        binary: bool,
    },
    Receive {
        matching: bool,
    },
    Ping,
    Close {
        code: u16,
        reason: String,
    },
}

impl CompiledStep {
    fn for_each_feeder(&self, mut f: impl FnMut(usize)) {
        if let UrlTemplate::Dynamic(t) = &self.url {
            t.feeders_used().for_each(&mut f);
        }
        let query = self.query.iter().map(|(_, t)| t);
        for t in query.chain(self.headers.iter().map(|(_, t)| t)) {
            t.feeders_used().for_each(&mut f);
        }
        if let Some(ws) = &self.ws {
            match &ws.action {
                CompiledWsAction::Open { url, headers, .. } => {
                    url.feeders_used().for_each(&mut f);
                    headers
                        .iter()
                        .for_each(|(_, t)| t.feeders_used().for_each(&mut f));
                }
                CompiledWsAction::Send {
                    body: CompiledBody::Text(t),
                    ..
                } => t.feeders_used().for_each(&mut f),
                CompiledWsAction::Send {
                    body: CompiledBody::Json(j),
                    ..
                } => j.feeders_used().for_each(&mut f),
                _ => {}
            }
        }
        match &self.body {
            CompiledBody::None => {}
            CompiledBody::Text(t) => t.feeders_used().for_each(&mut f),
            CompiledBody::Json(j) => j.feeders_used().for_each(&mut f),
            CompiledBody::Form(v) => v
                .iter()
                .for_each(|(_, t)| t.feeders_used().for_each(&mut f)),
        }
    }
}

/// A URL that is parsed once when it has no holes.
#[derive(Debug)]
pub enum UrlTemplate {
    Static(Url),
    Dynamic(Template),
}

#[derive(Debug)]
pub enum CompiledBody {
    None,
    Text(Template),
    Json(JsonTemplate),
    Form(Vec<(String, Template)>),
}

#[derive(Debug, Default)]
pub struct CompiledCheck {
    pub status: Vec<u16>,
    /// Accepted gRPC statuses of a gRPC step (empty: OK); `status` then is unused.
    pub grpc_status: Vec<u32>,
    pub body_contains: Option<String>,
    pub body_regex: Option<Regex>,
    pub headers: Vec<(HeaderName, String)>,
    pub json: Vec<(JsonPath, serde_json::Value)>,
}

impl CompiledCheck {
    /// How many checks a response is held against (for the `checks` rate). A status
    /// check always counts: without one, "below 400" is the check.
    pub fn count(&self) -> u64 {
        1 + self.body_contains.is_some() as u64
            + self.body_regex.is_some() as u64
            + self.headers.len() as u64
            + self.json.len() as u64
    }
}

#[derive(Debug)]
pub enum CompiledExtract {
    Json(JsonPath),
    /// The first capture group if there is one, else the whole match.
    Regex(Regex),
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug)]
pub struct CompiledScenario {
    pub name: String,
    pub executor: Executor,
    pub start_after: Duration,
    /// The scenario's own graceful-stop window, if the plan sets one.
    pub graceful_stop: Option<Duration>,
    /// Flows with cumulative weights for a weighted pick: (flow index, cumulative).
    pub flows: Vec<(usize, u64)>,
    pub total_weight: u64,
    /// For each flow slot of this scenario: the index of its first series and of its
    /// flow-iteration counter in [`Layout`].
    pub series_base: Vec<usize>,
    pub flow_slot: Vec<usize>,
    /// First global VU id of this scenario.
    pub vu_offset: u64,
    pub vu_slots: u64,
}

impl CompiledScenario {
    /// Index into `flows` for a draw in `0..total_weight`.
    pub fn pick(&self, draw: u64) -> usize {
        self.flows
            .iter()
            .position(|(_, cum)| draw < *cum)
            .unwrap_or(self.flows.len() - 1)
    }
}

/// Reads, validates and compiles a plan file.
pub fn load(path: &Path) -> Result<CompiledPlan, PlanError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| PlanError {
        file: file.clone(),
        line: None,
        field: None,
        message: format!("cannot read the plan: {e}"),
    })?;
    let plan = plan::parse_plan(&file, &src)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut compiled = compile(plan, &file, &base)?;
    compiled.source = src;
    Ok(compiled)
}

/// Where a plan's data files come from.
#[derive(Debug, Clone, Copy)]
pub enum DataFiles<'a> {
    /// A local run: files on disk, relative to the plan's directory.
    Dir(&'a Path),
    /// A mesh run: only the files shipped in the plan bundle, by the name the plan
    /// gives. Nothing is read from this node's disk, so a plan cannot make a node read
    /// (or echo back) its own files.
    Bundle(&'a BTreeMap<String, Vec<u8>>),
}

/// Compiles a validated plan; `file` names it in errors, `base_dir` resolves data files.
pub fn compile(plan: Plan, file: &str, base_dir: &Path) -> Result<CompiledPlan, PlanError> {
    compile_from(plan, file, DataFiles::Dir(base_dir))
}

/// Compiles a validated plan with its data files from `files`.
pub fn compile_from(plan: Plan, file: &str, files: DataFiles) -> Result<CompiledPlan, PlanError> {
    let err = |field: String, message: String| PlanError {
        file: file.to_string(),
        line: None,
        field: Some(field),
        message,
    };

    let mut feeders = Vec::new();
    for d in &plan.data {
        let format = match d.format {
            plan::DataFormat::Csv => data::DataFormat::Csv,
            plan::DataFormat::Jsonl => data::DataFormat::JsonLines,
        };
        let field = || format!("data.{}.file", d.name);
        let set = match files {
            DataFiles::Dir(base) => data::load(&d.name, &base.join(&d.file), Some(format)),
            DataFiles::Bundle(shipped) => {
                let Some(bytes) = shipped.get(&d.file) else {
                    return Err(err(
                        field(),
                        format!(
                            "{:?} is not a file of the plan bundle (a mesh run reads data only from the files shipped with its plan)",
                            d.file
                        ),
                    ));
                };
                data::parse(&d.name, &d.file, bytes, format)
            }
        }
        .map_err(|e| err(field(), e.to_string()))?;
        feeders.push(Feeder {
            data: Arc::new(set),
            mode: match d.mode {
                DataMode::Unique => FeedMode::Unique,
                DataMode::SharedSequential => FeedMode::SharedSequential,
                DataMode::Random => FeedMode::Random,
            },
            on_exhausted: match d.on_exhausted {
                plan::OnExhausted::Recycle => OnExhausted::Recycle,
                plan::OnExhausted::Stop => OnExhausted::Stop,
            },
        });
    }

    let protos = if plan.proto_files.is_empty() {
        None
    } else {
        Some(
            proto::load(&plan.proto_files, files).map_err(|e| PlanError {
                file: match (&e.file, files) {
                    (Some(f), DataFiles::Dir(base)) => base.join(f).display().to_string(),
                    (Some(f), DataFiles::Bundle(_)) => f.clone(),
                    (None, _) => file.to_string(),
                },
                line: e.line,
                field: Some("grpc.proto".into()),
                message: e.message,
            })?,
        )
    };

    let mut flows = Vec::new();
    let mut ws_sockets = Vec::new();
    for f in &plan.flows {
        let mut scope = Scope::new();
        for feeder in &feeders {
            scope.add_feeder(&feeder.data.name, &feeder.data.columns);
        }
        for s in &f.steps {
            for (var, _) in &s.extract {
                scope.add_var(var);
            }
        }
        let mut steps = Vec::new();
        for s in &f.steps {
            steps.push(compile_step(
                &plan,
                s,
                &scope,
                protos.as_ref(),
                &mut ws_sockets,
            )?);
        }
        let mut feeders_used = vec![false; feeders.len()];
        for st in &steps {
            st.for_each_feeder(|i| feeders_used[i] = true);
        }
        flows.push(CompiledFlow {
            name: f.name.clone(),
            steps,
            var_count: scope.var_count(),
            feeders_used,
        });
    }

    let mut layout = Layout {
        scenarios: plan.scenarios.iter().map(|s| s.name.clone()).collect(),
        flows: plan.flows.iter().map(|f| f.name.clone()).collect(),
        ..Default::default()
    };
    let mut scenarios = Vec::new();
    let mut vu_offset = 0;
    for (si, s) in plan.scenarios.iter().enumerate() {
        let mut cum = 0u64;
        let mut weighted = Vec::new();
        let mut series_base = Vec::new();
        let mut flow_slot = Vec::new();
        for &(fi, w) in &s.flows {
            // u32 weights, at most one per flow entry of an 8 MiB plan: cannot wrap,
            // but a plan number is never added unchecked.
            cum = cum.checked_add(u64::from(w)).ok_or_else(|| {
                err(
                    format!("scenarios.{}.flows", s.name),
                    "the weights add up to too much".into(),
                )
            })?;
            weighted.push((fi, cum));
            flow_slot.push(layout.flow_slots.len());
            layout.flow_slots.push((si, fi));
            series_base.push(layout.series.len());
            for (step, st) in plan.flows[fi].steps.iter().enumerate() {
                layout.series.push(SeriesKey {
                    scenario: si,
                    flow: fi,
                    step,
                    step_name: st.name.clone(),
                });
            }
        }
        let vu_slots = s.executor.max_vus();
        scenarios.push(CompiledScenario {
            name: s.name.clone(),
            executor: s.executor.clone(),
            start_after: s.start_after,
            graceful_stop: s.graceful_stop,
            flows: weighted,
            total_weight: cum,
            series_base,
            flow_slot,
            vu_offset,
            vu_slots,
        });
        vu_offset = vu_offset
            .checked_add(vu_slots)
            .filter(|v| *v <= plan::MAX_PLAN_VUS)
            .ok_or_else(|| {
                err(
                    format!("scenarios.{}", s.name),
                    format!(
                        "the scenarios use more than {} VUs in all",
                        plan::MAX_PLAN_VUS
                    ),
                )
            })?;
    }
    let total_vu_slots = vu_offset;

    for feeder in &feeders {
        if feeder.mode == FeedMode::Unique {
            feeder
                .data
                .check_unique(total_vu_slots)
                .map_err(|e| err(format!("data.{}", feeder.data.name), e.to_string()))?;
        }
    }

    Ok(CompiledPlan {
        plan,
        source: String::new(),
        base_dir: match files {
            DataFiles::Dir(base) => base.to_path_buf(),
            DataFiles::Bundle(_) => PathBuf::new(),
        },
        layout,
        feeders,
        flows,
        scenarios,
        total_vu_slots,
        proto_files: protos.map(|p| p.files).unwrap_or_default(),
        ws_sockets,
    })
}

fn compile_step(
    plan: &Plan,
    s: &plan::Step,
    scope: &Scope,
    protos: Option<&proto::Protos>,
    ws_sockets: &mut Vec<String>,
) -> Result<CompiledStep, PlanError> {
    // Step errors found here carry the step's own location ("plan.toml:31: flows.x.steps[2]").
    let err = |field: &str, message: String| {
        let (file_line, path) = s.location.rsplit_once(": ").unwrap_or((&s.location, ""));
        let (file, line) = match file_line.rsplit_once(':') {
            Some((f, l)) => (f.to_string(), l.parse().ok()),
            None => (file_line.to_string(), None),
        };
        PlanError {
            file,
            line,
            field: Some(format!("{path}.{field}")),
            message,
        }
    };
    let tpl = |field: &str, src: &str| {
        Template::compile(src, scope).map_err(|e| err(field, format!("bad template: {e}")))
    };

    let ws = match &s.ws {
        None => None,
        Some(w) => Some(compile_ws(plan, w, scope, ws_sockets, &err, &tpl)?),
    };
    let (method, url, query, headers, body) = if ws.is_some() {
        (
            Method::GET,
            UrlTemplate::Dynamic(tpl("ws", "")?),
            Vec::new(),
            Vec::new(),
            CompiledBody::None,
        )
    } else {
        let method = Method::from_bytes(s.request.method.as_bytes()).map_err(|_| {
            err(
                "request.method",
                format!("bad HTTP method \"{}\"", s.request.method),
            )
        })?;
        let full_url = if s.request.url.starts_with('/') {
            match &plan.defaults.base_url {
                Some(b) => format!("{b}{}", s.request.url),
                None => {
                    return Err(err(
                        "request.url",
                        format!(
                            "\"{}\" is relative but [defaults] has no base_url",
                            s.request.url
                        ),
                    ))
                }
            }
        } else {
            s.request.url.clone()
        };
        let url_tpl = tpl("request.url", &full_url)?;
        let url = match url_tpl.static_text() {
            Some(text) => UrlTemplate::Static(
                Url::parse(text)
                    .map_err(|e| err("request.url", format!("bad URL \"{text}\": {e}")))?,
            ),
            None => UrlTemplate::Dynamic(url_tpl),
        };
        let mut query = Vec::new();
        for (k, v) in &s.request.query {
            query.push((k.clone(), tpl(&format!("request.query.{k}"), v)?));
        }
        let mut headers = Vec::new();
        for (k, v) in plan.defaults.headers.iter().chain(&s.request.headers) {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err("request.headers", format!("bad header name \"{k}\"")))?;
            // A step's header replaces a default of the same name.
            headers.retain(|(n, _): &(HeaderName, Template)| *n != name);
            headers.push((name, tpl(&format!("request.headers.{k}"), v)?));
        }
        let body = match &s.request.body {
            Body::None => CompiledBody::None,
            Body::Text(t) => CompiledBody::Text(tpl("request.body", t)?),
            Body::Json(j) => CompiledBody::Json(
                JsonTemplate::compile(j, scope)
                    .map_err(|e| err("request.json", format!("bad template: {e}")))?,
            ),
            Body::Form(f) => {
                let mut out = Vec::new();
                for (k, v) in f {
                    out.push((k.clone(), tpl(&format!("request.form.{k}"), v)?));
                }
                CompiledBody::Form(out)
            }
        };
        (method, url, query, headers, body)
    };
    let grpc = match &s.grpc {
        None => None,
        Some(call) => {
            let Some(protos) = protos else {
                return Err(err(
                    "grpc.method",
                    "a gRPC step needs the plan's .proto files: add [grpc] proto = [\"FILE.proto\"]"
                        .into(),
                ));
            };
            let m = proto::method(&protos.pool, &call.method).map_err(|e| err("grpc.method", e))?;
            if m.is_client_streaming() && !call.streamed {
                return Err(err(
                    "grpc.message",
                    format!("{} is a client-streaming call: write its request messages as messages = [{{ ... }}, ...], sent in order", call.method),
                ));
            }
            if !m.is_client_streaming() && call.streamed {
                return Err(err(
                    "grpc.messages",
                    format!(
                        "{} takes one request message: write message = {{ ... }}",
                        call.method
                    ),
                ));
            }
            match &s.request.body {
                Body::Json(serde_json::Value::Array(list)) => {
                    for (i, one) in list.iter().enumerate() {
                        proto::check_message(&m.input(), one, &format!("messages[{i}]"))
                            .map_err(|e| err("grpc", e))?;
                    }
                }
                Body::Json(j) => {
                    proto::check_message(&m.input(), j, "message").map_err(|e| err("grpc", e))?
                }
                _ => {}
            }
            Some(crate::http::GrpcMethod::new(&m))
        }
    };
    let c = &s.check;
    let mut check = CompiledCheck {
        grpc_status: c.grpc_status.clone(),
        status: c.status.clone(),
        body_contains: c.body_contains.clone(),
        body_regex: match &c.body_regex {
            Some(r) => {
                Some(Regex::new(r).map_err(|e| err("check.body_regex", one_line(&e.to_string())))?)
            }
            None => None,
        },
        ..Default::default()
    };
    for (k, v) in &c.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| err("check.header", format!("bad header name \"{k}\"")))?;
        check.headers.push((name, v.clone()));
    }
    for (p, v) in &c.json {
        let path = JsonPath::compile(p)
            .map_err(|e| err("check.json", format!("bad JSON path \"{p}\": {e}")))?;
        check.json.push((path, v.clone()));
    }
    let mut extract = Vec::new();
    for (var, e) in &s.extract {
        let slot = scope
            .var_slot(var)
            .expect("every extract var was added to the scope");
        let field = format!("extract.{var}");
        let compiled = match e {
            Extract::Json(p) => CompiledExtract::Json(
                JsonPath::compile(p)
                    .map_err(|e| err(&field, format!("bad JSON path \"{p}\": {e}")))?,
            ),
            Extract::Regex(r) => CompiledExtract::Regex(
                Regex::new(r).map_err(|e| err(&field, one_line(&e.to_string())))?,
            ),
            Extract::Header(h) => CompiledExtract::Header(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| err(&field, format!("bad header name \"{h}\"")))?,
            ),
            Extract::Cookie(c) => CompiledExtract::Cookie(c.clone()),
        };
        extract.push((slot, compiled));
    }
    Ok(CompiledStep {
        name: s.name.clone(),
        method,
        url,
        query,
        headers,
        body,
        timeout: s.request.timeout.unwrap_or(plan.defaults.timeout),
        check,
        extract,
        think: s.think,
        grpc,
        ws,
    })
}

/// Compiles a WebSocket step; `err` and `tpl` name the step's fields in errors.
fn compile_ws(
    plan: &Plan,
    w: &plan::WsStep,
    scope: &Scope,
    ws_sockets: &mut Vec<String>,
    err: &dyn Fn(&str, String) -> PlanError,
    tpl: &dyn Fn(&str, &str) -> Result<Template, PlanError>,
) -> Result<CompiledWs, PlanError> {
    let socket = match ws_sockets.iter().position(|n| *n == w.socket) {
        Some(i) => i,
        None => {
            ws_sockets.push(w.socket.clone());
            ws_sockets.len() - 1
        }
    };
    let action = match &w.action {
        plan::WsAction::Open {
            url,
            headers,
            subprotocols,
            keep,
        } => {
            let full = if url.starts_with('/') {
                let Some(base) = &plan.defaults.base_url else {
                    return Err(err(
                        "ws.open",
                        format!("\"{url}\" is relative but [defaults] has no base_url"),
                    ));
                };
                let base = if let Some(rest) = base.strip_prefix("http://") {
                    format!("ws://{rest}")
                } else if let Some(rest) = base.strip_prefix("https://") {
                    format!("wss://{rest}")
                } else {
                    base.clone()
                };
                format!("{base}{url}")
            } else {
                url.clone()
            };
            let mut hs = Vec::new();
            for (k, v) in plan.defaults.headers.iter().chain(headers) {
                HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| err("ws.headers", format!("bad header name \"{k}\"")))?;
                hs.retain(|(n, _): &(String, Template)| !n.eq_ignore_ascii_case(k));
                hs.push((k.clone(), tpl(&format!("ws.headers.{k}"), v)?));
            }
            CompiledWsAction::Open {
                url: tpl("ws.open", &full)?,
                headers: hs,
                subprotocols: subprotocols.clone(),
                keep: *keep,
            }
        }
        plan::WsAction::Send(m) => match m {
            plan::WsMessage::Text(t) => CompiledWsAction::Send {
                body: CompiledBody::Text(tpl("ws.send", t)?),
                binary: false,
            },
            plan::WsMessage::Binary(t) => CompiledWsAction::Send {
                body: CompiledBody::Text(tpl("ws.send_binary", t)?),
                binary: true,
            },
            plan::WsMessage::Json(j) => CompiledWsAction::Send {
                body: CompiledBody::Json(
                    JsonTemplate::compile(j, scope)
                        .map_err(|e| err("ws.send_json", format!("bad template: {e}")))?,
                ),
                binary: false,
            },
        },
        plan::WsAction::Receive { matching } => CompiledWsAction::Receive {
            matching: *matching,
        },
        plan::WsAction::Ping => CompiledWsAction::Ping,
        plan::WsAction::Close { code, reason } => CompiledWsAction::Close {
            code: *code,
            reason: reason.clone(),
        },
    };
    Ok(CompiledWs {
        socket,
        action,
        timeout: w.timeout.unwrap_or(plan.defaults.timeout),
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
