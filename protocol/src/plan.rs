//! The plan: what a user writes in TOML (spec §3, §10), parsed and checked into a
//! validated [`Plan`].
//!
//! This module owns the plan's schema and every rule that can be checked without
//! touching the network or the disk beyond the plan text itself. Errors are one line
//! naming the file, the line and the field (`plan.toml:12: scenarios.shop.rate: ...`).
//! It must not compile templates or load data files: the node does that, because both
//! depend on things only a node knows (its data partition, its allowlist).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::duration::{check_plan_duration, format_duration, parse_duration, MAX_PLAN_DURATION};
use crate::executor::{Executor, Stage, MAX_VUS};
use crate::threshold::{Threshold, ThresholdEntry};

/// Most bytes of plan text (the whole plan bundle is bounded the same way).
pub const MAX_PLAN_BYTES: usize = crate::run::MAX_BUNDLE_BYTES;
/// Most VU slots of all scenarios of a plan together (each scenario: `MAX_VUS`).
pub const MAX_PLAN_VUS: u64 = 10 * MAX_VUS;
/// Most redirects a step may follow (`defaults.max_redirects`).
pub const MAX_REDIRECTS: u32 = 100;
/// Most VUs sharing one HTTP/2 connection (`defaults.http2_streams_per_connection`):
/// servers commonly allow 100 to 256 concurrent streams.
pub const MAX_HTTP2_STREAMS_PER_CONNECTION: u32 = 1000;

/// A plan that parsed and passed every static check.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub seed: u64,
    pub defaults: Defaults,
    pub data: Vec<DataDecl>,
    pub scenarios: Vec<Scenario>,
    pub flows: Vec<Flow>,
    pub thresholds: Vec<Threshold>,
    /// The plan expects every request may fail (e.g. it probes a service that is down):
    /// a run in which every request failed is then not an error of its own.
    pub expect_failures: bool,
    /// What a mesh run of this plan needs from the nodes (`[requirements]`).
    pub requirements: crate::run::Requirements,
    /// Key names whose values reports redact, besides the built-in ones (`redact`; see
    /// `crate::redact`).
    pub redact: Vec<String>,
    /// The .proto files gRPC steps draw their services from (`grpc.proto`), relative to
    /// the plan; a mesh run ships them (and what they import) in the bundle.
    pub proto_files: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Defaults {
    pub base_url: Option<String>,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    /// `"1.1"`, `"2"` (h2 via ALPN / prior knowledge) or `"auto"`.
    pub http_version: HttpVersion,
    pub insecure_skip_tls_verify: bool,
    pub max_redirects: u32,
    /// Above 1, the VUs of a worker thread share HTTP/2 connections, at most this many
    /// (one stream each) per connection; 1: every VU has its own.
    pub http2_streams_per_connection: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HttpVersion {
    #[serde(rename = "1.1")]
    Http1,
    #[serde(rename = "2")]
    Http2,
    #[serde(rename = "auto")]
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataMode {
    Unique,
    SharedSequential,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExhausted {
    /// Start again from the first row (of the VU's own rows in `unique` mode).
    Recycle,
    /// The VU stops iterating once its rows are used up.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    Csv,
    Jsonl,
}

#[derive(Debug, Clone)]
pub struct DataDecl {
    pub name: String,
    /// As written in the plan: relative to the plan file.
    pub file: String,
    pub mode: DataMode,
    pub on_exhausted: OnExhausted,
    pub format: DataFormat,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub executor: Executor,
    pub start_after: Duration,
    /// How long in-flight iterations may run on after the scenario's end (or a graceful
    /// stop of the run) before they are abandoned; `None`: the node's default (30 s).
    pub graceful_stop: Option<Duration>,
    /// (index into `Plan::flows`, weight); weights are > 0.
    pub flows: Vec<(usize, u32)>,
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    /// Where the step is written, for errors found later (template compilation).
    pub location: String,
    pub request: Request,
    pub check: Check,
    pub extract: Vec<(String, Extract)>,
    pub think: Think,
    /// Set for a gRPC step: `request` then holds the call as HTTP/2 sees it (POST to
    /// `URL/package.Service/Method`, the metadata as headers, the message as JSON).
    pub grpc: Option<GrpcCall>,
    /// A WebSocket step (`ws = {...}`) instead of an HTTP request; `request` is then a
    /// GET of an empty URL that is never sent.
    pub ws: Option<WsStep>,
}

/// What a WebSocket step does, on which of the VU's sockets.
#[derive(Debug, Clone)]
pub struct WsStep {
    /// The socket's name (`socket = "..."`, default `default`): a VU holds one socket
    /// per name, across steps and iterations, until a `close` step or a loss.
    pub socket: String,
    pub action: WsAction,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum WsAction {
    /// Open (a URL starting with `/` is joined to `base_url`, http→ws, https→wss).
    /// With `keep`, a socket already open is used as it is.
    Open {
        url: String,
        headers: Vec<(String, String)>,
        subprotocols: Vec<String>,
        keep: bool,
    },
    Send(WsMessage),
    /// The next message (`matching = false`), or the first that passes the step's
    /// checks, skipping others (`matching = true`).
    Receive {
        matching: bool,
    },
    Ping,
    Close {
        code: u16,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub enum WsMessage {
    Text(String),
    Json(serde_json::Value),
    /// The text's UTF-8 bytes, sent as a binary message.
    Binary(String),
}

/// What a gRPC step calls; the rest of the call lives in the step's `request`.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// `package.Service/Method`, as written.
    pub method: String,
    /// The step wrote `messages = [...]`: the request messages of a client-streaming or
    /// bidirectional call, sent in order; the request's JSON is then an array of them.
    pub streamed: bool,
}

/// Most request messages one gRPC step may send (`messages = [...]`).
pub const MAX_GRPC_MESSAGES: usize = 1000;

/// Most .proto files a plan may name (their imports come on top).
pub const MAX_PROTO_FILES: usize = 64;

/// gRPC status codes by their canonical names (`OK`, `NOT_FOUND`, ...), in code order.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum Body {
    None,
    Text(String),
    Json(serde_json::Value),
    Form(Vec<(String, String)>),
}

#[derive(Debug, Clone, Default)]
pub struct Check {
    /// Accepted statuses; empty means "any status below 400".
    pub status: Vec<u16>,
    pub body_contains: Option<String>,
    pub body_regex: Option<String>,
    pub headers: Vec<(String, String)>,
    pub json: Vec<(String, serde_json::Value)>,
    /// Accepted gRPC status codes of a gRPC step; empty means `OK` only.
    pub grpc_status: Vec<u32>,
}

#[derive(Debug, Clone)]
pub enum Extract {
    Json(String),
    Regex(String),
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Think {
    None,
    Fixed(Duration),
    Range(Duration, Duration),
}

/// A plan error: one line, naming file, line and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Printable(&self.file))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {}", Printable(field))?;
        }
        write!(f, ": {}", Printable(&self.message))
    }
}

/// Text from the plan shown with control characters escaped (`\r`, `\u{e}`): a field
/// name or value taken from a plan must not break the error's one line, or move the
/// terminal's cursor.
struct Printable<'a>(&'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for PlanError {}

// ---------------------------------------------------------------------------------
// The raw TOML schema. Unknown keys are errors: a typo in a load plan silently
// ignored is a test that measures the wrong thing.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Option<String>,
    seed: Option<u64>,
    #[serde(default)]
    expect_failures: bool,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    data: BTreeMap<String, Spanned<RawData>>,
    #[serde(default)]
    scenarios: BTreeMap<String, Spanned<RawScenario>>,
    #[serde(default)]
    flows: BTreeMap<String, Spanned<RawFlow>>,
    #[serde(default)]
    thresholds: BTreeMap<String, Spanned<Vec<Spanned<ThresholdEntry>>>>,
    #[serde(default)]
    requirements: RawRequirements,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    grpc: RawGrpc,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    #[serde(default)]
    proto: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRequirements {
    #[serde(default)]
    min_nodes: u32,
    #[serde(default)]
    require_all: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    base_url: Option<String>,
    timeout: Option<Dur>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    http_version: Option<HttpVersion>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    max_redirects: Option<u32>,
    http2_streams_per_connection: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    file: String,
    mode: Option<DataMode>,
    on_exhausted: Option<OnExhausted>,
    format: Option<DataFormat>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum ExecutorKind {
    ConstantVus,
    RampingVus,
    ConstantArrivalRate,
    RampingArrivalRate,
    PerVuIterations,
    SharedIterations,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    executor: ExecutorKind,
    vus: Option<u64>,
    duration: Option<Dur>,
    stages: Option<Vec<RawStage>>,
    start_vus: Option<u64>,
    start_rate: Option<f64>,
    rate: Option<f64>,
    time_unit: Option<Dur>,
    max_vus: Option<u64>,
    pre_allocated_vus: Option<u64>,
    iterations: Option<u64>,
    max_duration: Option<Dur>,
    start_after: Option<Dur>,
    graceful_stop: Option<Dur>,
    flows: Option<Vec<RawFlowWeight>>,
    flow: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    target: f64,
    duration: Dur,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowWeight {
    flow: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Option<String>,
    request: Option<RawRequest>,
    grpc: Option<RawGrpcCall>,
    ws: Option<RawWs>,
    #[serde(default)]
    check: RawCheck,
    #[serde(default)]
    extract: BTreeMap<String, RawExtract>,
    think: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    method: Option<String>,
    url: String,
    #[serde(default)]
    query: BTreeMap<String, toml::Value>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    json: Option<toml::Value>,
    body: Option<String>,
    form: Option<BTreeMap<String, toml::Value>>,
    timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcCall {
    /// The server: `http://` (h2c) or `https://` (TLS, ALPN h2); default `defaults.base_url`.
    url: Option<String>,
    method: String,
    message: Option<toml::Value>,
    messages: Option<Vec<toml::Value>>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GrpcStatusSpec {
    One(GrpcCode),
    Many(Vec<GrpcCode>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GrpcCode {
    Number(u32),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWs {
    socket: Option<String>,
    open: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    subprotocols: Vec<String>,
    #[serde(default)]
    keep: bool,
    send: Option<String>,
    send_json: Option<toml::Value>,
    send_binary: Option<String>,
    receive: Option<String>,
    ping: Option<bool>,
    close: Option<u16>,
    reason: Option<String>,
    timeout: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    grpc_status: Option<GrpcStatusSpec>,
    status: Option<StatusSpec>,
    body_contains: Option<String>,
    body_regex: Option<String>,
    #[serde(default)]
    header: BTreeMap<String, String>,
    #[serde(default)]
    json: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StatusSpec {
    One(u16),
    Many(Vec<u16>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtract {
    json: Option<String>,
    regex: Option<String>,
    header: Option<String>,
    cookie: Option<String>,
}

/// A duration written as a string ("500ms", "1h30m"); a bad one is reported by toml
/// with the value's position.
#[derive(Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .and_then(check_plan_duration)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("bad duration \"{s}\": {e}")))
    }
}

// ---------------------------------------------------------------------------------

/// Parses and validates a plan. `file` is only used to name the plan in errors.
pub fn parse_plan(file: &str, src: &str) -> Result<Plan, PlanError> {
    if src.len() > MAX_PLAN_BYTES {
        return Err(PlanError {
            file: file.to_string(),
            line: None,
            field: None,
            message: format!("the plan is {} bytes, limit {MAX_PLAN_BYTES}", src.len()),
        });
    }
    let raw: RawPlan = toml::from_str(src).map_err(|e| {
        let span = e.span();
        PlanError {
            file: file.to_string(),
            line: span.as_ref().map(|s| line_of(src, s.start)),
            field: span.as_ref().and_then(|s| field_at(src, s.start)),
            message: one_line(e.message()),
        }
    })?;
    Validator { file, src }.plan(raw)
}

struct Validator<'a> {
    file: &'a str,
    src: &'a str,
}

impl Validator<'_> {
    fn err(&self, span: Range<usize>, field: String, message: impl Into<String>) -> PlanError {
        PlanError {
            file: self.file.to_string(),
            line: Some(line_of(self.src, span.start)),
            field: Some(field),
            message: message.into(),
        }
    }

    /// An error about `key` inside the table at `span`: points at the key's own line
    /// when it is written there, at the table otherwise (a missing key).
    fn err_key(&self, span: &Range<usize>, path: &str, key: &str, msg: &str) -> PlanError {
        // A table's span may cover only its `[header]`: look on to the next header.
        let table_end = self.src[span.end.min(self.src.len())..]
            .find("\n[")
            .map_or(self.src.len(), |i| span.end + i);
        let at = find_key(self.src, span.start..table_end.max(span.end), key).unwrap_or(span.start);
        self.err(at..at, format!("{path}.{key}"), msg)
    }

    fn plan(&self, raw: RawPlan) -> Result<Plan, PlanError> {
        let defaults = Defaults {
            base_url: raw
                .defaults
                .base_url
                .map(|u| u.trim_end_matches('/').to_string()),
            timeout: raw
                .defaults
                .timeout
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(60)),
            headers: raw.defaults.headers.into_iter().collect(),
            http_version: raw.defaults.http_version.unwrap_or(HttpVersion::Http1),
            insecure_skip_tls_verify: raw.defaults.insecure_skip_tls_verify,
            max_redirects: raw.defaults.max_redirects.unwrap_or(10),
            http2_streams_per_connection: raw.defaults.http2_streams_per_connection.unwrap_or(1),
        };
        if let Some(base) = &defaults.base_url {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                let at = self.src.find("base_url").unwrap_or(0);
                return Err(self.err(
                    at..at,
                    "defaults.base_url".into(),
                    format!("\"{base}\" must start with http:// or https://"),
                ));
            }
        }

        let mut data = Vec::new();
        for (name, d) in raw.data {
            let span = d.span();
            let d = d.into_inner();
            let path = format!("data.{name}");
            let format = match d.format {
                Some(f) => f,
                None if d.file.ends_with(".csv") => DataFormat::Csv,
                None if d.file.ends_with(".jsonl") || d.file.ends_with(".ndjson") => {
                    DataFormat::Jsonl
                }
                None => {
                    return Err(self.err_key(
                        &span,
                        &path,
                        "file",
                        "cannot tell the format from the file name: name it .csv or .jsonl, or set format = \"csv\" | \"jsonl\"",
                    ))
                }
            };
            data.push(DataDecl {
                name,
                file: d.file,
                mode: d.mode.unwrap_or(DataMode::SharedSequential),
                on_exhausted: d.on_exhausted.unwrap_or(OnExhausted::Recycle),
                format,
            });
        }

        let flow_names: Vec<String> = raw.flows.keys().cloned().collect();
        let mut flows = Vec::new();
        // WebSocket steps that use a socket, to check once every flow is read that some
        // step opens it (a VU's sockets outlive flows, so any flow's open counts).
        let mut socket_uses = Vec::new();
        for (name, f) in raw.flows {
            let span = f.span();
            let f = f.into_inner();
            if f.steps.is_empty() {
                return Err(self.err(
                    span,
                    format!("flows.{name}.steps"),
                    "a flow needs at least one step",
                ));
            }
            let mut steps = Vec::new();
            for (i, s) in f.steps.into_iter().enumerate() {
                let span = s.span();
                let step = self.step(&name, i, s)?;
                if let Some(ws) = &step.ws {
                    if !matches!(ws.action, WsAction::Open { .. }) {
                        socket_uses.push((
                            ws.socket.clone(),
                            span,
                            format!("flows.{name}.steps[{i}]"),
                        ));
                    }
                }
                steps.push(step);
            }
            flows.push(Flow { name, steps });
        }
        self.sockets_opened(&flows, socket_uses)?;

        if raw.scenarios.is_empty() {
            return Err(PlanError {
                file: self.file.to_string(),
                line: None,
                field: Some("scenarios".into()),
                message: "the plan has no scenario: add a [scenarios.NAME] table".into(),
            });
        }
        let mut scenarios: Vec<Scenario> = Vec::new();
        let mut vu_slots: u64 = 0;
        for (name, s) in raw.scenarios {
            let span = s.span();
            let sc = self.scenario(&name, s, &flow_names)?;
            vu_slots = vu_slots.saturating_add(sc.executor.max_vus());
            if vu_slots > MAX_PLAN_VUS {
                return Err(self.err(
                    span,
                    format!("scenarios.{name}"),
                    format!("the scenarios up to this one use {vu_slots} VUs in all, limit {MAX_PLAN_VUS}"),
                ));
            }
            scenarios.push(sc);
        }
        if defaults.max_redirects > MAX_REDIRECTS {
            let at = find_key(self.src, 0..self.src.len(), "max_redirects").unwrap_or(0);
            return Err(self.err(
                at..at,
                "defaults.max_redirects".into(),
                format!(
                    "({}) must be at most {MAX_REDIRECTS}",
                    defaults.max_redirects
                ),
            ));
        }
        let streams = defaults.http2_streams_per_connection;
        if !(1..=MAX_HTTP2_STREAMS_PER_CONNECTION).contains(&streams) {
            let at =
                find_key(self.src, 0..self.src.len(), "http2_streams_per_connection").unwrap_or(0);
            return Err(self.err(
                at..at,
                "defaults.http2_streams_per_connection".into(),
                format!("({streams}) must be from 1 to {MAX_HTTP2_STREAMS_PER_CONNECTION}"),
            ));
        }
        if raw.requirements.min_nodes as usize > crate::run::MAX_MEMBERS {
            let at = find_key(self.src, 0..self.src.len(), "min_nodes").unwrap_or(0);
            return Err(self.err(
                at..at,
                "requirements.min_nodes".into(),
                format!(
                    "({}) must be at most {}",
                    raw.requirements.min_nodes,
                    crate::run::MAX_MEMBERS
                ),
            ));
        }

        let mut thresholds = Vec::new();
        for (metric, exprs) in raw.thresholds {
            for e in exprs.into_inner() {
                let e_span = e.span();
                let t: Threshold = e
                    .get_ref()
                    .parse(&metric)
                    .map_err(|m| self.err(e_span.clone(), format!("thresholds.\"{metric}\""), m))?;
                thresholds.push(t);
            }
        }

        Ok(Plan {
            name: raw.name.unwrap_or_else(|| "unnamed".into()),
            seed: raw.seed.unwrap_or(0x5eed),
            defaults,
            data,
            scenarios,
            flows,
            thresholds,
            expect_failures: raw.expect_failures,
            requirements: crate::run::Requirements {
                min_nodes: raw.requirements.min_nodes,
                require_all: raw.requirements.require_all,
                labels: raw.requirements.labels,
            },
            redact: raw.redact,
            proto_files: self.proto_files(raw.grpc.proto)?,
        })
    }

    fn proto_files(&self, files: Vec<String>) -> Result<Vec<String>, PlanError> {
        let at = find_key(self.src, 0..self.src.len(), "proto").unwrap_or(0);
        if files.len() > MAX_PROTO_FILES {
            return Err(self.err(
                at..at,
                "grpc.proto".into(),
                format!("{} files, limit {MAX_PROTO_FILES}", files.len()),
            ));
        }
        for f in &files {
            // Confined like the bundle's files: relative, no way up.
            let bad = f.is_empty()
                || f.starts_with('/')
                || f.contains('\\')
                || f.split('/').any(|c| c == ".." || c.is_empty() || c == ".");
            if bad {
                return Err(self.err(
                    at..at,
                    "grpc.proto".into(),
                    format!("\"{f}\" must be a relative path inside the plan's directory, without . or .. parts"),
                ));
            }
        }
        Ok(files)
    }

    fn step(&self, flow: &str, index: usize, s: Spanned<RawStep>) -> Result<Step, PlanError> {
        let span = s.span();
        let s = s.into_inner();
        let path = format!("flows.{flow}.steps[{index}]");
        let (r, grpc, ws) = match (s.request, s.grpc, s.ws) {
            (Some(r), None, None) => (r, None, None),
            (None, Some(g), None) => {
                let (r, call) = self.grpc_call(&span, &path, g, s.check.status.is_some())?;
                (r, Some(call), None)
            }
            (None, None, Some(w)) => {
                let ws = self.ws_step(&span, &path, w)?;
                let receives = matches!(ws.action, WsAction::Receive { .. });
                let checks = s.check.status.is_some() || !s.check.header.is_empty();
                if checks
                    || (!receives
                        && (s.check.body_contains.is_some()
                            || s.check.body_regex.is_some()
                            || !s.check.json.is_empty()
                            || !s.extract.is_empty()))
                {
                    return Err(self.err_key(
                        &span,
                        &path,
                        "check",
                        "a WebSocket step checks and extracts only a received message (body_contains, body_regex, json), in a receive step",
                    ));
                }
                let placeholder = RawRequest {
                    method: None,
                    url: "/".into(),
                    query: BTreeMap::new(),
                    headers: BTreeMap::new(),
                    json: None,
                    body: None,
                    form: None,
                    timeout: None,
                };
                (placeholder, None, Some(ws))
            }
            _ => {
                return Err(self.err_key(
                    &span,
                    &path,
                    "request",
                    "a step has exactly one of request, grpc or ws",
                ))
            }
        };
        let method = r
            .method
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase();
        if !method.bytes().all(|b| b.is_ascii_alphabetic()) || method.is_empty() {
            return Err(self.err_key(
                &span,
                &path,
                "request",
                &format!("bad HTTP method \"{method}\""),
            ));
        }
        let bodies = r.json.is_some() as u8 + r.body.is_some() as u8 + r.form.is_some() as u8;
        if bodies > 1 {
            return Err(self.err_key(
                &span,
                &path,
                "request",
                "give at most one of json, body, form",
            ));
        }
        let body = if let Some(j) = r.json {
            Body::Json(toml_to_json(j))
        } else if let Some(b) = r.body {
            Body::Text(b)
        } else if let Some(f) = r.form {
            Body::Form(f.into_iter().map(|(k, v)| (k, toml_scalar(&v))).collect())
        } else {
            Body::None
        };
        if !(r.url.starts_with('/')
            || r.url.starts_with("http://")
            || r.url.starts_with("https://")
            || r.url.starts_with("{{"))
        {
            return Err(self.err_key(
                &span,
                &path,
                "url",
                &format!(
                    "\"{}\" must start with / (joined to defaults.base_url) or http:// or https://",
                    r.url
                ),
            ));
        }
        let mut check = Check::default();
        if let Some(st) = s.check.status {
            check.status = match st {
                StatusSpec::One(c) => vec![c],
                StatusSpec::Many(v) => v,
            };
            if let Some(bad) = check.status.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(self.err_key(
                    &span,
                    &path,
                    "check",
                    &format!("status {bad} is not an HTTP status"),
                ));
            }
        }
        if let Some(spec) = s.check.grpc_status {
            if grpc.is_none() {
                return Err(self.err_key(
                    &span,
                    &path,
                    "check",
                    "grpc_status is a check of gRPC steps",
                ));
            }
            let codes = match spec {
                GrpcStatusSpec::One(c) => vec![c],
                GrpcStatusSpec::Many(v) => v,
            };
            for c in codes {
                let code = match c {
                    GrpcCode::Number(n) if (n as usize) < GRPC_STATUS_NAMES.len() => n,
                    GrpcCode::Name(name) => GRPC_STATUS_NAMES
                        .iter()
                        .position(|k| k.eq_ignore_ascii_case(&name))
                        .map(|i| i as u32)
                        .ok_or_else(|| {
                            self.err_key(
                                &span,
                                &path,
                                "check",
                                &format!("grpc_status \"{name}\" is not a gRPC status name (OK, NOT_FOUND, ...)"),
                            )
                        })?,
                    GrpcCode::Number(n) => {
                        return Err(self.err_key(
                            &span,
                            &path,
                            "check",
                            &format!("grpc_status {n} is not a gRPC status code (0..=16)"),
                        ))
                    }
                };
                check.grpc_status.push(code);
            }
        }
        check.body_contains = s.check.body_contains;
        check.body_regex = s.check.body_regex;
        check.headers = s.check.header.into_iter().collect();
        check.json = s
            .check
            .json
            .into_iter()
            .map(|(k, v)| (k, toml_to_json(v)))
            .collect();
        let mut extract = Vec::new();
        for (var, e) in s.extract {
            let how =
                match (e.json, e.regex, e.header, e.cookie) {
                    (Some(p), None, None, None) => Extract::Json(p),
                    (None, Some(p), None, None) => Extract::Regex(p),
                    (None, None, Some(p), None) => Extract::Header(p),
                    (None, None, None, Some(p)) if grpc.is_none() => Extract::Cookie(p),
                    _ => return Err(self.err_key(
                        &span,
                        &format!("{path}.extract"),
                        &var,
                        if grpc.is_none() {
                            "give exactly one of json, regex, header, cookie"
                        } else {
                            "give exactly one of json, regex, header (a gRPC step has no cookies)"
                        },
                    )),
                };
            extract.push((var, how));
        }
        let think = match s.think {
            None => Think::None,
            Some(t) => parse_think(&t).map_err(|m| self.err_key(&span, &path, "think", &m))?,
        };
        let location = format!("{}:{}: {path}", self.file, line_of(self.src, span.start));
        Ok(Step {
            name: s.name.unwrap_or_else(|| format!("{flow}#{}", index + 1)),
            location,
            request: Request {
                method,
                url: r.url,
                query: r
                    .query
                    .into_iter()
                    .map(|(k, v)| (k, toml_scalar(&v)))
                    .collect(),
                headers: r.headers.into_iter().collect(),
                body,
                timeout: r.timeout.map(|d| d.0),
            },
            check,
            extract,
            think,
            grpc,
            ws,
        })
    }

    /// Every socket a WebSocket step sends, receives, pings or closes on is opened by
    /// some step of the plan: a misspelt `socket` name is a plan error, not a step that
    /// fails on every iteration.
    fn sockets_opened(
        &self,
        flows: &[Flow],
        uses: Vec<(String, Range<usize>, String)>,
    ) -> Result<(), PlanError> {
        let opened: BTreeSet<&str> = flows
            .iter()
            .flat_map(|f| &f.steps)
            .filter_map(|s| s.ws.as_ref())
            .filter(|w| matches!(w.action, WsAction::Open { .. }))
            .map(|w| w.socket.as_str())
            .collect();
        for (socket, span, path) in uses {
            if !opened.contains(socket.as_str()) {
                let known = if opened.is_empty() {
                    "no step opens a WebSocket".to_string()
                } else {
                    let names: Vec<String> = opened.iter().map(|n| format!("\"{n}\"")).collect();
                    format!("sockets opened: {}", names.join(", "))
                };
                return Err(self.err_key(
                    &span,
                    &path,
                    "ws",
                    &format!("no step opens socket \"{socket}\" ({known}); add a step with ws = {{ open = ..., socket = \"{socket}\" }}"),
                ));
            }
        }
        Ok(())
    }

    fn ws_step(&self, span: &Range<usize>, path: &str, w: RawWs) -> Result<WsStep, PlanError> {
        let bad = |msg: &str| self.err_key(span, path, "ws", msg);
        let given = w.open.is_some() as u8
            + w.send.is_some() as u8
            + w.send_json.is_some() as u8
            + w.send_binary.is_some() as u8
            + w.receive.is_some() as u8
            + w.ping.is_some() as u8
            + w.close.is_some() as u8;
        if given != 1 {
            return Err(bad(
                "give exactly one of open, send, send_json, send_binary, receive, ping, close",
            ));
        }
        if w.open.is_none() && (!w.headers.is_empty() || !w.subprotocols.is_empty() || w.keep) {
            return Err(bad("headers, subprotocols and keep belong to an open"));
        }
        if w.close.is_none() && w.reason.is_some() {
            return Err(bad("reason belongs to a close"));
        }
        let action = if let Some(url) = w.open {
            if !(url.starts_with('/')
                || url.starts_with("ws://")
                || url.starts_with("wss://")
                || url.starts_with("{{"))
            {
                return Err(bad(&format!(
                    "open \"{url}\" must start with / (joined to defaults.base_url) or ws:// or wss://"
                )));
            }
            WsAction::Open {
                url,
                headers: w.headers.into_iter().collect(),
                subprotocols: w.subprotocols,
                keep: w.keep,
            }
        } else if let Some(t) = w.send {
            WsAction::Send(WsMessage::Text(t))
        } else if let Some(j) = w.send_json {
            WsAction::Send(WsMessage::Json(toml_to_json(j)))
        } else if let Some(b) = w.send_binary {
            WsAction::Send(WsMessage::Binary(b))
        } else if let Some(r) = w.receive {
            WsAction::Receive {
                matching: match r.as_str() {
                    "next" => false,
                    "matching" => true,
                    other => {
                        return Err(bad(&format!(
                            "receive = \"{other}\": use \"next\" (the next message) or \"matching\" (the first that passes the checks)"
                        )))
                    }
                },
            }
        } else if let Some(p) = w.ping {
            if !p {
                return Err(bad("ping = false does nothing; leave the step out"));
            }
            WsAction::Ping
        } else {
            let code = w.close.unwrap_or(1000);
            // Codes an endpoint may send (RFC 6455 7.4): 1000-1003, 1007-1014, 3000-4999.
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(bad(&format!("close = {code} is not a close code an endpoint may send (1000-1003, 1007-1014, 3000-4999)")));
            }
            let reason = w.reason.unwrap_or_default();
            if reason.len() > 123 {
                return Err(bad("a close reason is at most 123 bytes"));
            }
            WsAction::Close { code, reason }
        };
        let socket = w.socket.unwrap_or_else(|| "default".into());
        if socket.is_empty() || socket.len() > 64 {
            return Err(bad("socket names are 1 to 64 characters"));
        }
        Ok(WsStep {
            socket,
            action,
            timeout: w.timeout.map(|d| d.0),
        })
    }

    /// A gRPC step as the HTTP/2 request it is: POST to `URL/package.Service/Method`,
    /// metadata as headers, the message as JSON (templated). The method itself is looked
    /// up in the plan's .proto files when the plan is compiled.
    fn grpc_call(
        &self,
        span: &Range<usize>,
        path: &str,
        g: RawGrpcCall,
        has_http_status: bool,
    ) -> Result<(RawRequest, GrpcCall), PlanError> {
        let gpath = format!("{path}.grpc");
        if has_http_status {
            return Err(self.err_key(
                span,
                path,
                "check",
                "status is a check of HTTP steps: a gRPC step checks grpc_status",
            ));
        }
        let well_formed = g.method.split_once('/').is_some_and(|(svc, m)| {
            !svc.is_empty()
                && !m.is_empty()
                && !m.contains('/')
                && svc
                    .bytes()
                    .chain(m.bytes())
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        });
        if !well_formed {
            return Err(self.err_key(
                span,
                &gpath,
                "method",
                &format!(
                    "\"{}\" is not a gRPC method: write package.Service/Method",
                    g.method
                ),
            ));
        }
        let base = g.url.unwrap_or_default();
        let base = base.trim_end_matches('/');
        if !(base.is_empty()
            || base.starts_with("http://")
            || base.starts_with("https://")
            || base.starts_with("{{"))
        {
            return Err(self.err_key(
                span,
                &gpath,
                "url",
                &format!("\"{base}\" must start with http:// (h2c) or https:// (TLS)"),
            ));
        }
        // No URL: the method's path is joined to defaults.base_url like any "/" URL.
        let url = format!("{base}/{}", g.method);
        if g.metadata.len() > 256 {
            return Err(self.err_key(span, &gpath, "metadata", "at most 256 entries"));
        }
        let message = match (g.message, g.messages) {
            (Some(_), Some(_)) => {
                return Err(self.err_key(
                    span,
                    &gpath,
                    "messages",
                    "give message (one request message) or messages (a stream of them), not both",
                ))
            }
            (None, Some(list)) => {
                if list.len() > MAX_GRPC_MESSAGES {
                    return Err(self.err_key(
                        span,
                        &gpath,
                        "messages",
                        &format!("{} messages, at most {MAX_GRPC_MESSAGES}", list.len()),
                    ));
                }
                if let Some(i) = list.iter().position(|m| !m.is_table()) {
                    return Err(self.err_key(
                        span,
                        &gpath,
                        "messages",
                        &format!("messages[{i}] is not a table (each is a request message in the protobuf JSON mapping)"),
                    ));
                }
                toml::Value::Array(list)
            }
            (None, None) => toml::Value::Table(Default::default()),
            (Some(m @ toml::Value::Table(_)), None) => m,
            (Some(_), None) => {
                return Err(self.err_key(
                    span,
                    &gpath,
                    "message",
                    "the message is a table (the request message in the protobuf JSON mapping)",
                ))
            }
        };
        let streamed = message.is_array();
        let request = RawRequest {
            method: Some("POST".into()),
            url,
            query: BTreeMap::new(),
            headers: g.metadata,
            json: Some(message),
            body: None,
            form: None,
            timeout: g.timeout,
        };
        Ok((
            request,
            GrpcCall {
                method: g.method,
                streamed,
            },
        ))
    }

    fn scenario(
        &self,
        name: &str,
        s: Spanned<RawScenario>,
        flow_names: &[String],
    ) -> Result<Scenario, PlanError> {
        let span = s.span();
        let s = s.into_inner();
        let path = format!("scenarios.{name}");
        let need = |v: Option<u64>, key: &str| {
            v.ok_or_else(|| {
                self.err_key(
                    &span,
                    &path,
                    key,
                    &format!(
                        "missing field `{key}` (required by executor {})",
                        kind_name(s.executor)
                    ),
                )
            })
        };
        let need_dur = |v: Option<Dur>, key: &str| {
            v.map(|d| d.0).ok_or_else(|| {
                self.err_key(
                    &span,
                    &path,
                    key,
                    &format!(
                        "missing field `{key}` (required by executor {})",
                        kind_name(s.executor)
                    ),
                )
            })
        };
        let stages = |v: &Option<Vec<RawStage>>| -> Result<Vec<Stage>, PlanError> {
            let v = v.as_ref().ok_or_else(|| {
                self.err_key(
                    &span,
                    &path,
                    "stages",
                    &format!(
                        "missing field `stages` (required by executor {})",
                        kind_name(s.executor)
                    ),
                )
            })?;
            if v.is_empty() {
                return Err(self.err_key(&span, &path, "stages", "needs at least one stage"));
            }
            v.iter()
                .map(|st| {
                    if st.target < 0.0 || !st.target.is_finite() {
                        Err(self.err_key(
                            &span,
                            &path,
                            "stages",
                            "a stage target must be zero or more",
                        ))
                    } else {
                        Ok(Stage {
                            target: st.target.round() as u64,
                            duration: st.duration.0,
                        })
                    }
                })
                .collect()
        };
        // An arrival rate is per second unless time_unit says otherwise ("1m": per minute).
        let per_second = |r: f64| match s.time_unit {
            Some(u) if !u.0.is_zero() => r / u.0.as_secs_f64(),
            _ => r,
        };
        let executor = match s.executor {
            ExecutorKind::ConstantVus => Executor::ConstantVus {
                vus: need(s.vus, "vus")?,
                duration: need_dur(s.duration, "duration")?,
            },
            ExecutorKind::RampingVus => Executor::RampingVus {
                start_vus: s.start_vus.unwrap_or(0),
                stages: stages(&s.stages)?,
            },
            ExecutorKind::ConstantArrivalRate => {
                let rate = s.rate.ok_or_else(|| {
                    self.err_key(
                        &span,
                        &path,
                        "rate",
                        "missing field `rate` (required by executor constant-arrival-rate)",
                    )
                })?;
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err(self.err_key(
                        &span,
                        &path,
                        "rate",
                        "must be a positive number of iterations per second",
                    ));
                }
                let max_vus = need(s.max_vus, "max_vus")?;
                Executor::ConstantArrivalRate {
                    rate: per_second(rate),
                    duration: need_dur(s.duration, "duration")?,
                    max_vus,
                    pre_allocated_vus: s.pre_allocated_vus.unwrap_or(max_vus),
                }
            }
            ExecutorKind::RampingArrivalRate => {
                let max_vus = need(s.max_vus, "max_vus")?;
                let st = stages(&s.stages)?;
                if s.time_unit.is_some() {
                    return Err(self.err_key(&span, &path, "time_unit", "ramping-arrival-rate stage targets are per second; time_unit is not supported here"));
                }
                Executor::RampingArrivalRate {
                    start_rate: s.start_rate.unwrap_or(0.0),
                    stages: st,
                    max_vus,
                    pre_allocated_vus: s.pre_allocated_vus.unwrap_or(max_vus),
                }
            }
            ExecutorKind::PerVuIterations => Executor::PerVuIterations {
                vus: need(s.vus, "vus")?,
                iterations: need(s.iterations, "iterations")?,
                max_duration: s
                    .max_duration
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(600)),
            },
            ExecutorKind::SharedIterations => Executor::SharedIterations {
                vus: need(s.vus, "vus")?,
                iterations: need(s.iterations, "iterations")?,
                max_duration: s
                    .max_duration
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(600)),
            },
        };
        let flows_key = if s.flow.is_some() { "flow" } else { "flows" };
        let weights: Vec<(String, u32)> = match (s.flows, s.flow) {
            (Some(_), Some(_)) => {
                return Err(self.err_key(
                    &span,
                    &path,
                    "flow",
                    "give either flow or flows, not both",
                ))
            }
            (Some(v), None) => v.into_iter().map(|w| (w.flow, w.weight)).collect(),
            (None, Some(f)) => vec![(f, 1)],
            (None, None) if flow_names.len() == 1 => vec![(flow_names[0].clone(), 1)],
            (None, None) => {
                return Err(self.err_key(
                    &span,
                    &path,
                    "flows",
                    "missing field `flows` (or `flow`): which flows does this scenario run?",
                ))
            }
        };
        let mut flows = Vec::new();
        for (f, w) in weights {
            let Some(idx) = flow_names.iter().position(|n| *n == f) else {
                let known = if flow_names.is_empty() {
                    "none".to_string()
                } else {
                    flow_names.join(", ")
                };
                return Err(self.err_key(
                    &span,
                    &path,
                    flows_key,
                    &format!("unknown flow \"{f}\" (flows defined: {known})"),
                ));
            };
            if w == 0 {
                return Err(self.err_key(
                    &span,
                    &path,
                    flows_key,
                    &format!("flow \"{f}\" has weight 0"),
                ));
            }
            flows.push((idx, w));
        }
        if flows.is_empty() {
            return Err(self.err_key(&span, &path, "flows", "needs at least one flow"));
        }
        if let Err(e) = executor.validate() {
            // "stages[1].duration" → the `stages` key's line.
            let key = e
                .field
                .split(['[', '.'])
                .next()
                .unwrap_or(&e.field)
                .to_string();
            return Err(self.err_key(&span, &path, &key, &format!("{} {}", e.field, e.reason)));
        }
        let start_after = s.start_after.map(|d| d.0).unwrap_or_default();
        let ends = start_after.checked_add(executor.total_duration());
        if ends.is_none_or(|e| e > MAX_PLAN_DURATION) {
            return Err(self.err_key(
                &span,
                &path,
                "start_after",
                &format!(
                    "start_after ({}) plus the scenario's length ({}) is over the limit of {}",
                    format_duration(start_after),
                    format_duration(executor.total_duration()),
                    format_duration(MAX_PLAN_DURATION)
                ),
            ));
        }
        Ok(Scenario {
            name: name.to_string(),
            executor,
            start_after,
            graceful_stop: s.graceful_stop.map(|d| d.0),
            flows,
        })
    }
}

fn kind_name(k: ExecutorKind) -> &'static str {
    match k {
        ExecutorKind::ConstantVus => "constant-vus",
        ExecutorKind::RampingVus => "ramping-vus",
        ExecutorKind::ConstantArrivalRate => "constant-arrival-rate",
        ExecutorKind::RampingArrivalRate => "ramping-arrival-rate",
        ExecutorKind::PerVuIterations => "per-vu-iterations",
        ExecutorKind::SharedIterations => "shared-iterations",
    }
}

/// "1s" or "1s..3s".
pub fn parse_think(s: &str) -> Result<Think, String> {
    match s.split_once("..") {
        None => parse_duration(s)
            .and_then(check_plan_duration)
            .map(Think::Fixed)
            .map_err(|e| format!("bad think time \"{s}\": {e}")),
        Some((a, b)) => {
            let part = |p: &str| {
                parse_duration(p)
                    .and_then(check_plan_duration)
                    .map_err(|e| format!("bad think time \"{s}\": {e}"))
            };
            let (a, b) = (part(a)?, part(b)?);
            if b < a {
                return Err(format!(
                    "bad think time \"{s}\": the range ends before it starts"
                ));
            }
            Ok(Think::Range(a, b))
        }
    }
}

/// Converts a TOML value to JSON (a request body or an expected value).
pub fn toml_to_json(v: toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(J::Number)
            .unwrap_or(J::Null),
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            J::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

fn toml_scalar(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1-based line of a byte offset.
pub fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The dotted key path of the value at `offset`: the nearest `[table]` header above it
/// plus the key written before it on its line. A best effort for toml's own errors,
/// which carry a position but no key path.
fn field_at(src: &str, offset: usize) -> Option<String> {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let before = &src[line_start..offset];
    let key = before
        .rsplit(['{', ','])
        .find_map(|part| {
            part.split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
        })
        .filter(|k| !k.is_empty() && !k.contains(['[', ']']));
    let header = src[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    match (header, key) {
        (Some(h), Some(k)) => Some(format!("{h}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(h), None) => Some(h),
        (None, None) => None,
    }
}

/// Byte offset of `key = ` inside `span`, if the key is written there.
fn find_key(src: &str, span: Range<usize>, key: &str) -> Option<usize> {
    let text = src.get(span.clone())?;
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let prev_ok = at == 0
            || !text.as_bytes()[at - 1].is_ascii_alphanumeric() && text.as_bytes()[at - 1] != b'_';
        let rest = text[at + key.len()..].trim_start();
        if prev_ok && (rest.starts_with('=')) {
            return Some(span.start + at);
        }
        from = at + key.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 7
[defaults]
base_url = "http://127.0.0.1:8080"
timeout = "5s"

[data.accounts]
file = "accounts.csv"
mode = "unique"

[scenarios.shoppers]
executor = "ramping-arrival-rate"
stages = [ { target = 0, duration = "0s" }, { target = 50, duration = "10s" } ]
max_vus = 100
flows = [ { flow = "browse", weight = 60 }, { flow = "purchase", weight = 40 } ]

[scenarios.steady]
executor = "constant-vus"
vus = 3
duration = "1m"
flow = "browse"
start_after = "5s"
graceful_stop = "2s"

[[flows.browse.steps]]
name = "search"
request = { url = "/products", query = { q = "shoe" } }
check = { status = 200 }

[[flows.purchase.steps]]
name = "login"
request = { method = "POST", url = "/login", json = { user = "{{ accounts.user }}", password = "{{ accounts.password }}" } }
check = { status = 200, json = { "$.ok" = true } }
extract = { token = { json = "$.token" } }
think = "1s..3s"

[thresholds]
"http_req_duration{flow=purchase}" = ["p(99) < 800ms"]
"http_req_failed" = ["rate < 1%"]
"#;

    #[test]
    fn parses_the_spec_shape() {
        let p = parse_plan("plan.toml", GOOD).unwrap();
        assert_eq!(p.name, "t");
        assert_eq!(p.seed, 7);
        assert_eq!(p.scenarios.len(), 2);
        assert_eq!(p.flows.len(), 2);
        let shoppers = p.scenarios.iter().find(|s| s.name == "shoppers").unwrap();
        assert_eq!(shoppers.flows, vec![(0, 60), (1, 40)]);
        let steady = p.scenarios.iter().find(|s| s.name == "steady").unwrap();
        assert_eq!(steady.start_after, Duration::from_secs(5));
        assert_eq!(steady.graceful_stop, Some(Duration::from_secs(2)));
        let login = &p.flows[1].steps[0];
        assert_eq!(login.request.method, "POST");
        assert!(matches!(login.request.body, Body::Json(_)));
        assert_eq!(
            login.think,
            Think::Range(Duration::from_secs(1), Duration::from_secs(3))
        );
        assert!(login.location.starts_with("plan.toml:"));
        assert_eq!(p.thresholds.len(), 2);
        assert_eq!(p.data[0].mode, DataMode::Unique);
    }

    fn err(src: &str) -> PlanError {
        parse_plan("plan.toml", src).unwrap_err()
    }

    #[test]
    fn bad_toml_names_line() {
        let e = err("name = \"x\"\n[scenarios.a\nexecutor = 1\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().starts_with("plan.toml:2"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn unknown_executor_names_line_and_field() {
        let src = GOOD.replace("executor = \"constant-vus\"", "executor = \"constant-vuz\"");
        let e = err(&src);
        let line = src
            .lines()
            .position(|l| l.contains("constant-vuz"))
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.field.as_deref(), Some("scenarios.steady.executor"), "{e}");
        assert!(e.message.contains("constant-vuz"), "{e}");
    }

    #[test]
    fn missing_field_names_scenario() {
        let src = GOOD.replace("vus = 3\n", "");
        let e = err(&src);
        assert_eq!(e.field.as_deref(), Some("scenarios.steady.vus"), "{e}");
        let line = src
            .lines()
            .position(|l| l.contains("[scenarios.steady]"))
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(line), "{e}");
    }

    #[test]
    fn bad_duration_names_line_and_field() {
        let src = GOOD.replace("duration = \"1m\"", "duration = \"1 fortnight\"");
        let e = err(&src);
        let line = src.lines().position(|l| l.contains("fortnight")).unwrap() + 1;
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.field.as_deref(), Some("scenarios.steady.duration"), "{e}");
        assert!(e.message.contains("fortnight"), "{e}");
    }

    #[test]
    fn http2_streams_per_connection_is_bounded_and_named() {
        let ok = GOOD.replace(
            "timeout = \"5s\"",
            "timeout = \"5s\"\nhttp2_streams_per_connection = 10",
        );
        let plan = parse_plan("plan.toml", &ok).unwrap();
        assert_eq!(plan.defaults.http2_streams_per_connection, 10);
        assert_eq!(
            parse_plan("plan.toml", GOOD)
                .unwrap()
                .defaults
                .http2_streams_per_connection,
            1
        );
        for bad in ["0", "1001"] {
            let src = GOOD.replace(
                "timeout = \"5s\"",
                &format!("timeout = \"5s\"\nhttp2_streams_per_connection = {bad}"),
            );
            let e = err(&src);
            let line = src
                .lines()
                .position(|l| l.contains("http2_streams"))
                .unwrap()
                + 1;
            assert_eq!(e.line, Some(line), "{e}");
            assert_eq!(
                e.field.as_deref(),
                Some("defaults.http2_streams_per_connection"),
                "{e}"
            );
        }
    }

    #[test]
    fn redact_names_keys() {
        let plan = parse_plan("p.toml", &format!("redact = [\"x-tenant\"]\n{GOOD}")).unwrap();
        assert_eq!(plan.redact, ["x-tenant"]);
    }

    #[test]
    fn unknown_key_is_an_error() {
        let src = GOOD.replace("vus = 3", "vus = 3\nvuss = 4");
        let e = err(&src);
        assert!(e.message.contains("vuss"), "{e}");
        let line = src.lines().position(|l| l.starts_with("vuss")).unwrap() + 1;
        assert_eq!(e.line, Some(line), "{e}");
    }

    #[test]
    fn websocket_steps_parse_and_bad_ones_are_named() {
        let plan = |steps: &str| {
            format!(
                "name = \"w\"\n[scenarios.s]\nexecutor = \"per-vu-iterations\"\nvus = 1\niterations = 1\nflow = \"f\"\n{steps}"
            )
        };
        let ok = parse_plan(
            "plan.toml",
            &plan(
                "[[flows.f.steps]]\nws = { open = \"ws://127.0.0.1:1/x\", subprotocols = [\"a\"], keep = true, socket = \"s\" }\n\
                 [[flows.f.steps]]\nws = { receive = \"matching\", socket = \"s\", timeout = \"2s\" }\ncheck = { json = { \"$.a\" = 1 } }\n\
                 [[flows.f.steps]]\nws = { close = 4000, reason = \"bye\", socket = \"s\" }\n",
            ),
        )
        .unwrap();
        let steps = &ok.flows[0].steps;
        let ws = |i: usize| steps[i].ws.as_ref().unwrap();
        assert!(matches!(ws(0).action, WsAction::Open { keep: true, .. }));
        assert!(matches!(ws(1).action, WsAction::Receive { matching: true }));
        assert_eq!(ws(1).timeout, Some(Duration::from_secs(2)));
        assert!(matches!(ws(2).action, WsAction::Close { code: 4000, .. }));
        for (steps, says) in [
            ("ws = { receive = \"later\" }", "use \"next\""),
            ("ws = { send = \"a\", ping = true }", "exactly one of open"),
            (
                "ws = { send = \"a\" }\nrequest = { url = \"/\" }",
                "exactly one of request, grpc or ws",
            ),
            (
                "ws = { send = \"a\" }\ncheck = { body_contains = \"x\" }",
                "in a receive step",
            ),
            ("ws = { open = \"http://x/\" }", "ws:// or wss://"),
            ("ws = { close = 1005 }", "not a close code"),
            ("ws = { send = \"a\", keep = true }", "belong to an open"),
        ] {
            let e = err(&plan(&format!("[[flows.f.steps]]\n{steps}\n")));
            assert!(e.to_string().contains(says), "{steps}: {e}");
            assert!(matches!(e.line, Some(7..=9)), "{steps}: {e}");
        }
    }

    #[test]
    fn a_websocket_step_on_a_socket_no_step_opens_is_named() {
        let src = "name = \"w\"\n[scenarios.s]\nexecutor = \"per-vu-iterations\"\nvus = 1\niterations = 1\nflow = \"f\"\n\
             [[flows.f.steps]]\nws = { open = \"ws://127.0.0.1:1/x\", socket = \"chat\" }\n\
             [[flows.f.steps]]\nws = { send = \"hi\", socket = \"chat\" }\n\
             [[flows.g.steps]]\nws = { receive = \"next\", socket = \"caht\" }\n";
        let e = err(src);
        assert_eq!(e.line, Some(12), "{e}");
        assert_eq!(e.field.as_deref(), Some("flows.g.steps[0].ws"), "{e}");
        assert!(
            e.message
                .contains("no step opens socket \"caht\" (sockets opened: \"chat\")"),
            "{e}"
        );
        // Without any open, the default socket is named too.
        let e = err(&src.replace("open = \"ws://127.0.0.1:1/x\"", "ping = true"));
        assert!(
            e.message
                .contains("no step opens socket \"chat\" (no step opens a WebSocket)"),
            "{e}"
        );
        // Opened in another flow: a VU's sockets outlive flows, so this is fine.
        parse_plan("plan.toml", &src.replace("caht", "chat")).unwrap();
    }

    #[test]
    fn unknown_flow_is_named() {
        let src = GOOD.replace(
            "flow = \"browse\"\nstart_after",
            "flow = \"brows\"\nstart_after",
        );
        let e = err(&src);
        assert!(e.message.contains("\"brows\""), "{e}");
        assert_eq!(e.field.as_deref(), Some("scenarios.steady.flow"), "{e}");
    }

    #[test]
    fn bad_threshold_is_named() {
        let src = GOOD.replace("rate < 1%", "rate <<< 1%");
        let e = err(&src);
        assert!(e.field.as_deref().unwrap().starts_with("thresholds"), "{e}");
        let line = src.lines().position(|l| l.contains("<<<")).unwrap() + 1;
        assert_eq!(e.line, Some(line), "{e}");
    }

    #[test]
    fn executor_rules_are_checked() {
        let src = GOOD.replace("vus = 3", "vus = 0");
        let e = err(&src);
        assert_eq!(e.field.as_deref(), Some("scenarios.steady.vus"), "{e}");
        assert!(e.message.contains("at least 1"), "{e}");
    }

    #[test]
    fn think_forms() {
        assert_eq!(
            parse_think("2s").unwrap(),
            Think::Fixed(Duration::from_secs(2))
        );
        assert!(parse_think("3s..1s").is_err());
    }

    /// Found by tools/fuzz.sh (fuzz_plan_bytes): a key made of a carriage return and a
    /// control character was echoed raw as the error's field, breaking its one line.
    #[test]
    fn control_characters_from_the_plan_never_break_the_error_line() {
        let e = parse_plan("p.toml", "\"\r\u{e}=\0")
            .unwrap_err()
            .to_string();
        assert!(!e.contains(['\r', '\n', '\u{e}']), "{e:?}");
        assert!(e.starts_with("p.toml:1: "), "{e}");
    }
}
