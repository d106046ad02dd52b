//! `stampede import har`: a browser recording (HAR 1.1/1.2) turned into a readable plan.
//!
//! Owns reading a HAR (with bounds and errors that name the JSON path), choosing which
//! entries become steps (main host, static assets, browser-made requests), keeping the
//! headers that matter, turning bodies into `json`/`form`/`body`, think times from the
//! recorded gaps, and correlating dynamic values: a value a later request sends that
//! first appeared in an earlier response becomes an `extract` there and a `{{ var }}`
//! here. It writes plan text only; it must not read files, send traffic or compile the
//! plan (the command checks its output with the same compiler `validate` uses).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::http::Url;

/// Largest HAR file read; recordings with bodies are big, but beyond this a plan made
/// from it would not be readable anyway.
pub const MAX_HAR_BYTES: usize = 64 << 20;
/// Most entries looked at.
pub const MAX_ENTRIES: usize = 10_000;
/// Most steps written (a plan past this is not one anyone reads).
pub const MAX_STEPS: usize = 2_000;
/// Request bodies larger than this are left out of the plan (with a comment).
pub const MAX_REQUEST_BODY: usize = 256 * 1024;
/// Response bodies are searched for correlation only up to this size.
const MAX_RESPONSE_SCAN: usize = 1 << 20;
/// Values shorter than this are too common to be a token or a session id.
const MIN_VALUE_LEN: usize = 6;
/// Numbers with fewer digits (1, 42) appear everywhere: they are never correlated.
const MIN_NUMBER_DIGITS: usize = 3;

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Origin (and optional path prefix) that URLs are written relative to; default:
    /// the first entry's origin.
    pub base_url: Option<String>,
    /// Keep stylesheets, scripts, images, fonts and media.
    pub include_assets: bool,
    /// Hosts besides the main one whose requests are kept (with absolute URLs).
    pub include_hosts: Vec<String>,
    /// One flow per recorded page instead of one for the whole recording.
    pub flow_per_page: bool,
    /// Turn correlation off (to see what it does; the plan then replays recorded tokens).
    pub no_correlate: bool,
    /// The plan's `name`.
    pub name: String,
}

/// What went wrong in a HAR: the JSON path and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for HarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for HarError {}

fn err(path: &str, message: impl Into<String>) -> HarError {
    HarError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The plan and what was done to get it, for the command's report.
#[derive(Debug, Clone)]
pub struct Imported {
    pub plan: String,
    pub entries: usize,
    pub steps: usize,
    pub assets_left_out: usize,
    pub other_hosts: BTreeMap<String, usize>,
    pub correlated: usize,
}

/// One recorded request and its response, as far as the plan needs them.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    page: Option<String>,
    start_us: i64,
    time_us: i64,
    method: String,
    url: Url,
    headers: Vec<(String, String)>,
    post_mime: String,
    post_text: Option<String>,
    post_params: Vec<(String, String)>,
    status: u16,
    redirect_url: String,
    resp_headers: Vec<(String, String)>,
    resp_mime: String,
    resp_text: Option<String>,
    resource_type: String,
}

/// Reads a HAR and writes a plan.
pub fn import(text: &str, opts: &Options) -> Result<Imported, HarError> {
    if text.len() > MAX_HAR_BYTES {
        return Err(err(
            "$",
            format!(
                "the file has {} bytes; at most {MAX_HAR_BYTES} are read (record a shorter journey)",
                text.len()
            ),
        ));
    }
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        err(
            "$",
            format!("not JSON (line {}, column {}): {e}", e.line(), e.column()),
        )
    })?;
    let (entries, pages) = parse_log(&doc)?;
    build(entries, &pages, opts)
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, HarError> {
    v.as_object()
        .ok_or_else(|| err(path, format!("expected an object, found {}", kind(v))))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field<'a>(o: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value, HarError> {
    o.get(key)
        .ok_or_else(|| err(&format!("{path}.{key}"), "missing (HAR 1.2 requires it)"))
}

fn str_field<'a>(o: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a str, HarError> {
    let v = field(o, path, key)?;
    v.as_str().ok_or_else(|| {
        err(
            &format!("{path}.{key}"),
            format!("expected a string, found {}", kind(v)),
        )
    })
}

fn opt_str<'a>(o: &'a Map<String, Value>, key: &str) -> &'a str {
    o.get(key).and_then(Value::as_str).unwrap_or("")
}

fn name_values(
    o: &Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Vec<(String, String)>, HarError> {
    let p = format!("{path}.{key}");
    let v = field(o, path, key)?;
    let arr = v
        .as_array()
        .ok_or_else(|| err(&p, format!("expected an array, found {}", kind(v))))?;
    arr.iter()
        .enumerate()
        .map(|(i, item)| {
            let ip = format!("{p}[{i}]");
            let o = obj(item, &ip)?;
            Ok((
                str_field(o, &ip, "name")?.to_string(),
                str_field(o, &ip, "value")?.to_string(),
            ))
        })
        .collect()
}

/// The entries (sorted by start, bounded) and page titles by id.
fn parse_log(doc: &Value) -> Result<(Vec<Entry>, HashMap<String, String>), HarError> {
    let root = obj(doc, "$")?;
    let log = obj(field(root, "$", "log")?, "$.log")?;
    let version = str_field(log, "$.log", "version")?;
    if version != "1.2" && version != "1.1" {
        return Err(err(
            "$.log.version",
            format!("HAR version \"{version}\" is not supported (1.1 and 1.2 are)"),
        ));
    }
    let mut pages = HashMap::new();
    if let Some(v) = log.get("pages") {
        let arr = v.as_array().ok_or_else(|| {
            err(
                "$.log.pages",
                format!("expected an array, found {}", kind(v)),
            )
        })?;
        for (i, p) in arr.iter().enumerate().take(MAX_ENTRIES) {
            let path = format!("$.log.pages[{i}]");
            let o = obj(p, &path)?;
            let id = str_field(o, &path, "id")?;
            pages.insert(id.to_string(), opt_str(o, "title").to_string());
        }
    }
    let v = field(log, "$.log", "entries")?;
    let arr = v.as_array().ok_or_else(|| {
        err(
            "$.log.entries",
            format!("expected an array, found {}", kind(v)),
        )
    })?;
    if arr.len() > MAX_ENTRIES {
        return Err(err(
            "$.log.entries",
            format!(
                "{} entries; at most {MAX_ENTRIES} are imported (record a shorter journey)",
                arr.len()
            ),
        ));
    }
    let mut entries = arr
        .iter()
        .enumerate()
        .map(|(i, e)| parse_entry(e, &format!("$.log.entries[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.start_us);
    Ok((entries, pages))
}

fn parse_entry(v: &Value, path: &str) -> Result<Entry, HarError> {
    let o = obj(v, path)?;
    let started = str_field(o, path, "startedDateTime")?;
    let start_us = parse_datetime(started).ok_or_else(|| {
        err(
            &format!("{path}.startedDateTime"),
            format!("\"{started}\" is not an ISO 8601 date and time"),
        )
    })?;
    let tv = field(o, path, "time")?;
    let time_ms = tv.as_f64().ok_or_else(|| {
        err(
            &format!("{path}.time"),
            format!("expected a number, found {}", kind(tv)),
        )
    })?;
    let rp = format!("{path}.request");
    let req = obj(field(o, path, "request")?, &rp)?;
    let method = str_field(req, &rp, "method")?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(err(
            &format!("{rp}.method"),
            format!("\"{method}\" is not an HTTP method"),
        ));
    }
    let url_text = str_field(req, &rp, "url")?;
    let url = Url::parse(url_text).map_err(|e| err(&format!("{rp}.url"), e.to_string()));
    let headers = name_values(req, &rp, "headers")?;
    let (mut post_mime, mut post_text, mut post_params) = (String::new(), None, Vec::new());
    if let Some(pd) = req.get("postData") {
        let pp = format!("{rp}.postData");
        let pd = obj(pd, &pp)?;
        post_mime = opt_str(pd, "mimeType").to_string();
        post_text = pd.get("text").and_then(Value::as_str).map(str::to_string);
        if pd.contains_key("params") {
            post_params = name_values(pd, &pp, "params")?;
        }
    }
    let sp = format!("{path}.response");
    let resp = obj(field(o, path, "response")?, &sp)?;
    let sv = field(resp, &sp, "status")?;
    let status = sv
        .as_u64()
        .filter(|s| *s < 1000)
        .ok_or_else(|| err(&format!("{sp}.status"), "expected a status code (0 to 999)"))?
        as u16;
    let resp_headers = name_values(resp, &sp, "headers")?;
    let cp = format!("{sp}.content");
    let content = obj(field(resp, &sp, "content")?, &cp)?;
    let resp_text = match (
        content.get("text").and_then(Value::as_str),
        opt_str(content, "encoding"),
    ) {
        (Some(t), "") if t.len() <= MAX_RESPONSE_SCAN => Some(t.to_string()),
        _ => None,
    };
    // A URL that stampede cannot send (data:, blob:, ws:) is kept as an error for the
    // entry, reported only if the entry would otherwise become a step.
    let url = match url {
        Ok(u) => u,
        Err(e) if url_text.starts_with("http://") || url_text.starts_with("https://") => {
            return Err(e)
        }
        Err(_) => {
            Url::parse("http://unsupported.invalid/").map_err(|e| err(path, e.to_string()))?
        }
    };
    Ok(Entry {
        path: path.to_string(),
        page: o.get("pageref").and_then(Value::as_str).map(str::to_string),
        start_us,
        time_us: (time_ms.max(0.0) * 1000.0) as i64,
        method: method.to_ascii_uppercase(),
        url,
        headers,
        post_mime,
        post_text,
        post_params,
        status,
        redirect_url: opt_str(resp, "redirectURL").to_string(),
        resp_headers,
        resp_mime: opt_str(content, "mimeType").to_ascii_lowercase(),
        resp_text,
        resource_type: o
            .get("_resourceType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase(),
    })
}

/// `2026-12-05T22:10:00.123Z` or with an offset (`+01:00`) → µs since the Unix epoch.
fn parse_datetime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac_us = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut scale = 100_000;
        for c in r[..digits].bytes().take(6) {
            frac_us += i64::from(c - b'0') * scale;
            scale /= 10;
        }
        rest = &r[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" | "" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let t = &rest[1..];
            if !t.is_ascii() {
                return None;
            }
            let (oh, om) = match t.len() {
                5 if t.as_bytes()[2] == b':' => {
                    (t[0..2].parse::<i64>().ok()?, t[3..5].parse::<i64>().ok()?)
                }
                4 => (t[0..2].parse::<i64>().ok()?, t[2..4].parse::<i64>().ok()?),
                2 => (t.parse::<i64>().ok()?, 0),
                _ => return None,
            };
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1_000_000 + frac_us)
}

/// Request headers a plan must not carry: hop-by-hop, set by the client itself, the
/// cookie jar's, the browser's cache's, and browser fingerprints.
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "cookie",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "referer",
    "origin",
    "cache-control",
    "pragma",
    "if-none-match",
    "if-modified-since",
    "dnt",
    "upgrade-insecure-requests",
    "priority",
    "purpose",
    "x-client-data",
];

fn keep_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(n.starts_with(':') || n.starts_with("sec-") || DROPPED_HEADERS.contains(&n.as_str()))
}

/// Response headers that are never a value a client sends back.
const PLAIN_RESPONSE_HEADERS: &[&str] = &[
    "date",
    "expires",
    "last-modified",
    "server",
    "set-cookie",
    "cache-control",
    "vary",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "age",
    "via",
    "alt-svc",
    "strict-transport-security",
    "report-to",
    "nel",
    "x-powered-by",
    "accept-ranges",
    "location",
];

fn harvest_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(n.starts_with("content-")
        || n.starts_with("access-control-")
        || PLAIN_RESPONSE_HEADERS.contains(&n.as_str()))
}

/// Stylesheets, scripts, images, fonts, media: what a browser fetches to draw a page.
fn is_asset(e: &Entry) -> bool {
    match e.resource_type.as_str() {
        "stylesheet" | "script" | "image" | "font" | "media" | "manifest" | "texttrack" => {
            return true
        }
        "document" | "fetch" | "xhr" | "websocket" | "eventsource" => return false,
        _ => {}
    }
    let m = e.resp_mime.split(';').next().unwrap_or("").trim();
    if m.starts_with("image/")
        || m.starts_with("font/")
        || m.starts_with("audio/")
        || m.starts_with("video/")
        || matches!(
            m,
            "text/css"
                | "text/javascript"
                | "application/javascript"
                | "application/x-javascript"
                | "application/wasm"
                | "application/font-woff"
                | "application/manifest+json"
        )
    {
        return true;
    }
    let path = e.url.path().to_ascii_lowercase();
    let ext = path
        .rsplit('/')
        .next()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, x)| x);
    matches!(
        ext,
        Some(
            "css"
                | "js"
                | "mjs"
                | "map"
                | "png"
                | "jpg"
                | "jpeg"
                | "gif"
                | "svg"
                | "ico"
                | "webp"
                | "avif"
                | "woff"
                | "woff2"
                | "ttf"
                | "otf"
                | "eot"
                | "mp4"
                | "webm"
                | "mp3"
                | "wasm"
        )
    )
}

/// How a step's later value is read from a response.
#[derive(Debug, Clone, PartialEq)]
enum How {
    Json(String),
    Header(String),
}

#[derive(Debug, Clone)]
struct Extract {
    var: String,
    how: How,
    used_in: Vec<String>,
}

/// A TOML value whose strings are templates.
#[derive(Debug, Clone)]
enum Tv {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Arr(Vec<Tv>),
    Table(Vec<(String, Tv)>),
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Tv),
    Form(Vec<(String, String)>),
    Text(String),
}

#[derive(Debug, Clone)]
struct Step {
    name: String,
    method: String,
    url: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Body,
    status: Option<u16>,
    think_ms: Option<u64>,
    extracts: Vec<Extract>,
    notes: Vec<String>,
}

/// Where a value was first seen in a response.
#[derive(Debug, Clone)]
struct Source {
    step: usize,
    how: How,
    key: String,
}

/// Correlation state of one flow: values first seen in responses, and values the
/// client sent before any response had them (user input and constants, never
/// correlated).
#[derive(Default)]
struct Correlator {
    sources: HashMap<String, Source>,
    sent: HashSet<String>,
    vars: HashMap<(usize, String), String>,
    used_names: HashSet<String>,
    off: bool,
}

fn looks_dynamic(s: &str) -> bool {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.len() >= MIN_NUMBER_DIGITS && s.len() <= 19;
    }
    s.len() >= MIN_VALUE_LEN
        && s.len() <= 4096
        && s.bytes().any(|b| b.is_ascii_digit())
        && !s.contains("{{")
}

/// Characters that end a token inside a URL, a header value or a text body.
fn is_delim(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '/' | '?'
                | '&'
                | '='
                | ','
                | ';'
                | ':'
                | '"'
                | '\''
                | '('
                | ')'
                | '<'
                | '>'
                | '['
                | ']'
                | '{'
                | '}'
        )
}

impl Correlator {
    /// A JSON path step for `key`.
    fn path_key(key: &str) -> String {
        let bare = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if bare {
            format!(".{key}")
        } else {
            format!("['{}']", key.replace('\\', "\\\\").replace('\'', "\\'"))
        }
    }

    fn offer(&mut self, value: String, src: Source) {
        if looks_dynamic(&value) && !self.sent.contains(&value) {
            self.sources.entry(value).or_insert(src);
        }
    }

    /// Every string and number leaf of a JSON response with its path.
    fn harvest_json(&mut self, v: &Value, path: &str, key: &str, step: usize, budget: &mut usize) {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        match v {
            Value::String(s) => self.offer(
                s.clone(),
                Source {
                    step,
                    how: How::Json(path.to_string()),
                    key: key.to_string(),
                },
            ),
            Value::Number(n) if n.is_i64() || n.is_u64() => self.offer(
                n.to_string(),
                Source {
                    step,
                    how: How::Json(path.to_string()),
                    key: key.to_string(),
                },
            ),
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.harvest_json(x, &format!("{path}[{i}]"), key, step, budget);
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    let p = format!("{path}{}", Self::path_key(k));
                    self.harvest_json(x, &p, k, step, budget);
                }
            }
            _ => {}
        }
    }

    fn harvest(&mut self, e: &Entry, step: usize) {
        if self.off {
            return;
        }
        if let Some(text) = &e.resp_text {
            if e.resp_mime.contains("json") || text.trim_start().starts_with(['{', '[']) {
                if let Ok(v) = serde_json::from_str::<Value>(text) {
                    let mut budget = 100_000;
                    self.harvest_json(&v, "$", "value", step, &mut budget);
                }
            }
        }
        for (name, value) in &e.resp_headers {
            if harvest_header(name) {
                self.offer(
                    value.trim().to_string(),
                    Source {
                        step,
                        how: How::Header(name.to_ascii_lowercase()),
                        key: name.clone(),
                    },
                );
            }
        }
    }

    /// The variable that holds `value` (made on first use).
    fn var_for(&mut self, value: &str, used_at: &str, steps: &mut [Step]) -> Option<String> {
        let src = self.sources.get(value)?.clone();
        let key = (src.step, value.to_string());
        if let Some(v) = self.vars.get(&key) {
            let v = v.clone();
            if let Some(x) = steps[src.step].extracts.iter_mut().find(|x| x.var == v) {
                if !x.used_in.iter().any(|u| u == used_at) {
                    x.used_in.push(used_at.to_string());
                }
            }
            return Some(v);
        }
        let var = self.fresh_name(&src.key);
        self.vars.insert(key, var.clone());
        steps[src.step].extracts.push(Extract {
            var: var.clone(),
            how: src.how,
            used_in: vec![used_at.to_string()],
        });
        Some(var)
    }

    fn fresh_name(&mut self, key: &str) -> String {
        let mut base: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        base = base.trim_matches('_').to_string();
        if base.is_empty() || !base.starts_with(|c: char| c.is_ascii_alphabetic()) {
            base = format!("value_{base}").trim_end_matches('_').to_string();
        }
        if crate::plan::template::is_builtin_name(&base) {
            base.push_str("_value");
        }
        let mut name = base.clone();
        let mut n = 2;
        while !self.used_names.insert(name.clone()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        name
    }

    /// `s` with every correlated token replaced by its `{{ var }}`; the rest is
    /// remembered as sent by the client.
    fn rewrite(&mut self, s: &str, used_at: &str, steps: &mut [Step]) -> String {
        if self.off {
            return s.to_string();
        }
        if let Some(v) = self.var_for(s, used_at, steps) {
            return format!("{{{{ {v} }}}}");
        }
        let mut out = String::with_capacity(s.len());
        let mut token = String::new();
        let mut flush = |token: &mut String, out: &mut String, this: &mut Correlator| {
            if token.is_empty() {
                return;
            }
            match this.var_for(token, used_at, steps) {
                Some(v) => {
                    let _ = write!(out, "{{{{ {v} }}}}");
                }
                None => {
                    out.push_str(token);
                    if looks_dynamic(token) {
                        this.sent.insert(token.clone());
                    }
                }
            }
            token.clear();
        };
        for c in s.chars() {
            if is_delim(c) {
                flush(&mut token, &mut out, self);
                out.push(c);
            } else {
                token.push(c);
            }
        }
        flush(&mut token, &mut out, self);
        if looks_dynamic(s) && out == s {
            self.sent.insert(s.to_string());
        }
        out
    }
}

/// Form-decodes one query or form component (`+` and `%XX`); `None` if not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let v = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())?;
                out.push(v);
                i += 2;
            }
            b'%' => return None,
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `a=1&b=2` as pairs, or `None` when it cannot be a table (a key twice, bad escapes).
fn split_pairs(q: &str) -> Option<Vec<(String, String)>> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (k, v) = (form_decode(k)?, form_decode(v)?);
        if k.is_empty() || pairs.iter().any(|(x, _)| *x == k) {
            return None;
        }
        pairs.push((k, v));
    }
    Some(pairs)
}

fn json_to_tv(v: &Value) -> Option<Tv> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => Tv::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Tv::Int(i),
            (None, Some(f)) if f.is_finite() && !n.is_u64() => Tv::Float(f),
            _ => return None,
        },
        Value::String(s) => Tv::Str(s.clone()),
        Value::Array(a) => Tv::Arr(a.iter().map(json_to_tv).collect::<Option<_>>()?),
        Value::Object(o) => Tv::Table(
            o.iter()
                .map(|(k, v)| Some((k.clone(), json_to_tv(v)?)))
                .collect::<Option<_>>()?,
        ),
    })
}

fn has_braces(tv: &Tv) -> bool {
    match tv {
        Tv::Str(s) => s.contains("{{"),
        Tv::Arr(a) => a.iter().any(has_braces),
        Tv::Table(t) => t.iter().any(|(k, v)| k.contains("{{") || has_braces(v)),
        _ => false,
    }
}

fn rewrite_tv(tv: &mut Tv, c: &mut Correlator, used_at: &str, steps: &mut [Step]) {
    match tv {
        Tv::Str(s) => *s = c.rewrite(s, used_at, steps),
        // A number stays a number: a template would send it as a JSON string.
        Tv::Int(i) => {
            let t = i.to_string();
            if !c.off && looks_dynamic(&t) && !c.sources.contains_key(&t) {
                c.sent.insert(t);
            }
        }
        Tv::Arr(a) => a.iter_mut().for_each(|x| rewrite_tv(x, c, used_at, steps)),
        Tv::Table(t) => t
            .iter_mut()
            .for_each(|(_, x)| rewrite_tv(x, c, used_at, steps)),
        _ => {}
    }
}

fn is_json_mime(m: &str) -> bool {
    let m = m
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || m.ends_with("+json")
}

fn is_form_mime(m: &str) -> bool {
    m.to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
}

/// (scheme, lower-case host, port): what makes two URLs the same origin.
fn origin(u: &Url) -> (String, String, u16) {
    (
        u.scheme().as_str().to_string(),
        u.host().to_ascii_lowercase(),
        u.port(),
    )
}

fn host_label(u: &Url) -> String {
    if u.port() == u.scheme().default_port() {
        u.host().to_ascii_lowercase()
    } else {
        format!("{}:{}", u.host().to_ascii_lowercase(), u.port())
    }
}

fn build(
    entries: Vec<Entry>,
    pages: &HashMap<String, String>,
    opts: &Options,
) -> Result<Imported, HarError> {
    let first = entries
        .iter()
        .find(|e| e.url.host() != "unsupported.invalid")
        .ok_or_else(|| err("$.log.entries", "no http:// or https:// request recorded"))?;
    let first_origin = Url::parse(&format!(
        "{}://{}/",
        first.url.scheme().as_str(),
        first.url.authority()
    ))
    .map_err(|e| err(&first.path, e.to_string()))?;
    let base = match &opts.base_url {
        Some(b) => Url::parse(b).map_err(|e| err("--base-url", e.to_string()))?,
        None => first_origin.clone(),
    };
    // A base_url of another environment than the recorded one stands in for the
    // origin of the first request.
    let base_origin = if entries.iter().any(|e| origin(&e.url) == origin(&base)) {
        origin(&base)
    } else {
        origin(&first_origin)
    };
    let prefix = base.path().trim_end_matches('/').to_string();
    let base_text = format!(
        "{}://{}{}",
        base.scheme().as_str(),
        base.authority(),
        prefix
    );
    let include: HashSet<String> = opts
        .include_hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();

    let mut out_notes: Vec<String> = Vec::new();
    if base_origin != origin(&base) {
        out_notes.push(format!(
            "recorded against {}; its requests are sent to base_url",
            host_label(&first_origin)
        ));
    }
    let mut other_hosts: BTreeMap<String, usize> = BTreeMap::new();
    let (mut assets, mut preflights, mut no_response, mut redirects, mut unsupported) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut pending_redirects: HashSet<String> = HashSet::new();
    let mut kept: Vec<&Entry> = Vec::new();
    for e in &entries {
        if e.url.host() == "unsupported.invalid" {
            unsupported += 1;
            continue;
        }
        let same = origin(&e.url) == base_origin;
        if !same
            && !include.contains(&host_label(&e.url))
            && !include.contains(&e.url.host().to_ascii_lowercase())
        {
            *other_hosts.entry(host_label(&e.url)).or_default() += 1;
            continue;
        }
        if e.status == 0 {
            no_response += 1;
            continue;
        }
        if e.method == "OPTIONS"
            && e.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("access-control-request-method"))
        {
            preflights += 1;
            continue;
        }
        if !opts.include_assets && is_asset(e) {
            assets += 1;
            continue;
        }
        if pending_redirects.remove(&e.url.to_string()) {
            redirects += 1;
            continue;
        }
        if (300..400).contains(&e.status) && !e.redirect_url.is_empty() {
            if let Ok(t) = e.url.resolve(&e.redirect_url) {
                pending_redirects.insert(t.to_string());
            }
        }
        kept.push(e);
    }
    if kept.len() > MAX_STEPS {
        return Err(err(
            "$.log.entries",
            format!(
                "{} requests would become steps; at most {MAX_STEPS} (record a shorter journey)",
                kept.len()
            ),
        ));
    }

    // Flows: the whole recording, or one per page (in order of first appearance).
    let mut groups: Vec<(String, Vec<&Entry>)> = Vec::new();
    if opts.flow_per_page {
        let mut last: Option<String> = None;
        for e in &kept {
            let page = e
                .page
                .clone()
                .or(last.clone())
                .unwrap_or_else(|| "page".into());
            last = Some(page.clone());
            match groups.iter_mut().find(|(p, _)| *p == page) {
                Some((_, g)) => g.push(e),
                None => groups.push((page, vec![e])),
            }
        }
    } else {
        groups.push(("recording".into(), kept.clone()));
    }

    let mut flows: Vec<(String, String, Vec<Step>)> = Vec::new();
    let mut flow_names: HashSet<String> = HashSet::new();
    let mut correlated = 0;
    for (page, group) in &groups {
        let title = pages.get(page).cloned().unwrap_or_default();
        let mut name = if opts.flow_per_page {
            ident(if title.is_empty() { page } else { &title })
        } else {
            "recording".to_string()
        };
        let stem = name.clone();
        let mut n = 2;
        while !flow_names.insert(name.clone()) {
            name = format!("{stem}_{n}");
            n += 1;
        }
        let (steps, c) = steps_of(group, &base_origin, &prefix, opts);
        correlated += c;
        flows.push((name, title, steps));
    }

    if assets > 0 {
        out_notes.push(format!(
            "{assets} static asset request(s) (stylesheets, scripts, images, fonts) left out; --include-assets keeps them"
        ));
    }
    if preflights > 0 {
        out_notes.push(format!(
            "{preflights} CORS preflight request(s) left out: the browser made them"
        ));
    }
    if redirects > 0 {
        out_notes.push(format!("{redirects} request(s) that followed a redirect left out: the client follows redirects itself"));
    }
    if no_response > 0 {
        out_notes.push(format!(
            "{no_response} request(s) without a response (status 0: blocked or cancelled) left out"
        ));
    }
    if unsupported > 0 {
        out_notes.push(format!("{unsupported} request(s) that are not http:// or https:// (data:, blob:, ws:) left out"));
    }
    if !other_hosts.is_empty() {
        out_notes.push(
            "requests to other hosts left out (--include-host HOST keeps a host's requests):"
                .into(),
        );
        for (h, n) in &other_hosts {
            out_notes.push(format!("  {h}: {n} request(s)"));
        }
    }
    let steps: usize = flows.iter().map(|f| f.2.len()).sum();
    if steps == 0 {
        return Err(err(
            "$.log.entries",
            format!(
                "no request of {} is left to replay ({} entries recorded); see --include-assets and --include-host",
                host_label(&base),
                entries.len()
            ),
        ));
    }
    let plan = render(&opts.name, &base_text, entries.len(), &out_notes, &flows);
    Ok(Imported {
        plan,
        entries: entries.len(),
        steps,
        assets_left_out: assets,
        other_hosts,
        correlated,
    })
}

/// A plan-friendly identifier: letters, digits, `_` and `-`.
fn ident(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    let out = out.trim_matches('_').chars().take(40).collect::<String>();
    if out.is_empty() {
        "page".into()
    } else {
        out
    }
}

/// The steps of one flow and how many values were correlated.
fn steps_of(
    group: &[&Entry],
    base_origin: &(String, String, u16),
    prefix: &str,
    opts: &Options,
) -> (Vec<Step>, usize) {
    let mut c = Correlator {
        off: opts.no_correlate,
        ..Correlator::default()
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut prev_end: Option<i64> = None;
    for e in group {
        let idx = steps.len();
        if let (Some(end), Some(last)) = (prev_end, steps.last_mut()) {
            let gap_ms = (e.start_us - end) / 1000;
            if gap_ms >= 10 {
                last.think_ms = Some(gap_ms as u64);
            }
        }
        prev_end = Some(prev_end.map_or(e.start_us + e.time_us, |p| p.max(e.start_us + e.time_us)));
        let label = format!("step {}", idx + 1);
        let path = e.url.path();
        let same = origin(&e.url) == *base_origin;
        let (url_raw, query_raw) = (
            if same && (prefix.is_empty() || path.starts_with(prefix)) {
                let rel = &path[prefix.len()..];
                if rel.starts_with('/') {
                    rel.to_string()
                } else {
                    format!("/{rel}")
                }
            } else {
                format!(
                    "{}://{}{}",
                    e.url.scheme().as_str(),
                    e.url.authority(),
                    path
                )
            },
            e.url.query().unwrap_or(""),
        );
        let mut step = Step {
            name: format!("{} {}", e.method, e.url.path()),
            method: e.method.clone(),
            url: String::new(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Body::None,
            status: match e.status {
                300..=399 => None,
                s => Some(s),
            },
            think_ms: None,
            extracts: Vec::new(),
            notes: Vec::new(),
        };
        // A literal `{{` cannot be written in a plan (templates have no escape).
        let raw_texts = [
            url_raw.as_str(),
            query_raw,
            e.post_text.as_deref().unwrap_or(""),
        ];
        if raw_texts.iter().any(|t| t.contains("{{"))
            || e.headers.iter().any(|(_, v)| v.contains("{{"))
        {
            steps.push(Step {
                notes: vec![format!(
                    "{}: left out: it sends `{{{{`, which a plan cannot write literally",
                    e.path
                )],
                ..step
            });
            continue;
        }
        steps.push(step.clone());
        step.url = c.rewrite(&url_raw, &label, &mut steps);
        match split_pairs(query_raw) {
            Some(pairs) => {
                for (k, v) in pairs {
                    let v = c.rewrite(&v, &label, &mut steps);
                    step.query.push((k, v));
                }
            }
            None => {
                let q = c.rewrite(query_raw, &label, &mut steps);
                step.url = format!("{}?{q}", step.url);
            }
        }
        let content_type = e
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| e.post_mime.clone());
        let text = e.post_text.clone().unwrap_or_default();
        let mut drop_content_type = false;
        if text.len() > MAX_REQUEST_BODY {
            step.notes.push(format!(
                "the recorded body ({} bytes) is larger than {MAX_REQUEST_BODY} bytes and was left out",
                text.len()
            ));
        } else if !text.is_empty() || !e.post_params.is_empty() {
            let json = is_json_mime(&content_type)
                .then(|| serde_json::from_str::<Value>(&text).ok())
                .flatten()
                .and_then(|v| json_to_tv(&v))
                .filter(|tv| !has_braces(tv));
            let form = is_form_mime(&content_type)
                .then(|| {
                    if text.is_empty() {
                        let mut seen = HashSet::new();
                        e.post_params
                            .iter()
                            .all(|(k, _)| seen.insert(k.clone()))
                            .then(|| e.post_params.clone())
                    } else {
                        split_pairs(&text)
                    }
                })
                .flatten();
            if let Some(mut tv) = json {
                rewrite_tv(&mut tv, &mut c, &label, &mut steps);
                step.body = Body::Json(tv);
                drop_content_type = content_type.trim().eq_ignore_ascii_case("application/json");
            } else if let Some(pairs) = form {
                let pairs = pairs
                    .into_iter()
                    .map(|(k, v)| {
                        let v = c.rewrite(&v, &label, &mut steps);
                        (k, v)
                    })
                    .collect();
                step.body = Body::Form(pairs);
                drop_content_type = true;
            } else if !text.is_empty() {
                step.body = Body::Text(c.rewrite(&text, &label, &mut steps));
            }
        }
        for (n, v) in &e.headers {
            let lower = n.to_ascii_lowercase();
            if !keep_header(&lower) || (drop_content_type && lower == "content-type") {
                continue;
            }
            if lower == "accept" && v.contains("*/*") {
                continue;
            }
            if step.headers.iter().any(|(x, _)| *x == lower) {
                continue;
            }
            let v = c.rewrite(v, &label, &mut steps);
            step.headers.push((lower, v));
        }
        let extracts = std::mem::take(&mut steps[idx].extracts);
        step.extracts = extracts;
        // Named by the path as the plan sends it: `GET /products/{id}` when the id is a
        // variable, so the report's row is not named after one recorded value.
        if step.url.starts_with('/') {
            step.name = format!(
                "{} {}",
                step.method,
                step.url.replace("{{ ", "{").replace(" }}", "}")
            );
        }
        steps[idx] = step;
        c.harvest(e, idx);
    }
    let correlated = steps.iter().map(|s| s.extracts.len()).sum();
    (steps, correlated)
}

/// A TOML string on one line: literal (`'...'`) when it has quotes and nothing that
/// needs escaping, else basic with JSON's escapes (which TOML shares), plus DEL, which
/// TOML wants escaped.
fn toml_str(s: &str) -> String {
    if s.contains('"') && !s.contains('\'') && !s.chars().any(char::is_control) {
        return format!("'{s}'");
    }
    serde_json::to_string(s)
        .unwrap_or_default()
        .replace('\u{7f}', "\\u007F")
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml_str(k)
    }
}

fn render_tv(tv: &Tv, out: &mut String) {
    match tv {
        Tv::Str(s) => out.push_str(&toml_str(s)),
        Tv::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Tv::Float(f) => out.push_str(&toml::Value::Float(*f).to_string()),
        Tv::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Tv::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_tv(x, out);
            }
            out.push(']');
        }
        Tv::Table(t) => render_pairs(t.iter().map(|(k, v)| (k.as_str(), v)), out),
    }
}

fn render_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a Tv)>, out: &mut String) {
    let mut any = false;
    out.push('{');
    for (k, v) in pairs {
        out.push_str(if any { ", " } else { " " });
        any = true;
        out.push_str(&toml_key(k));
        out.push_str(" = ");
        render_tv(v, out);
    }
    out.push_str(if any { " }" } else { "}" });
}

fn str_table(pairs: &[(String, String)]) -> String {
    let tvs: Vec<(String, Tv)> = pairs
        .iter()
        .map(|(k, v)| (k.clone(), Tv::Str(v.clone())))
        .collect();
    let mut s = String::new();
    render_pairs(tvs.iter().map(|(k, v)| (k.as_str(), v)), &mut s);
    s
}

fn render(
    name: &str,
    base: &str,
    entries: usize,
    notes: &[String],
    flows: &[(String, String, Vec<Step>)],
) -> String {
    let mut o = String::new();
    let steps: usize = flows.iter().map(|f| f.2.len()).sum();
    let _ = writeln!(
        o,
        "# Imported by `stampede import har` from {entries} recorded request(s): {steps} step(s)."
    );
    for n in notes {
        let _ = writeln!(o, "# {n}");
    }
    let _ = writeln!(o, "name = {}", toml_str(name));
    let _ = writeln!(o, "\n[defaults]\nbase_url = {}", toml_str(base));
    // Headers every step sends alike belong to the defaults.
    let all: Vec<&Step> = flows
        .iter()
        .flat_map(|f| f.2.iter())
        .filter(|s| !s.url.is_empty())
        .collect();
    let mut common: Vec<(String, String)> =
        all.first().map(|s| s.headers.clone()).unwrap_or_default();
    common.retain(|h| {
        all.len() > 1 && all.iter().all(|s| s.headers.contains(h)) && !h.1.contains("{{")
    });
    if !common.is_empty() {
        let _ = writeln!(o, "headers = {}", str_table(&common));
    }
    let _ = writeln!(
        o,
        "\n# One VU replays the recording once: set the load here (e.g. executor = \"constant-vus\", vus, duration)."
    );
    let _ = writeln!(
        o,
        "[scenarios.recording]\nexecutor = \"per-vu-iterations\"\nvus = 1\niterations = 1"
    );
    if flows.len() == 1 {
        let _ = writeln!(o, "flow = {}", toml_str(&flows[0].0));
    } else {
        let list: Vec<String> = flows
            .iter()
            .map(|f| format!("{{ flow = {} }}", toml_str(&f.0)))
            .collect();
        let _ = writeln!(o, "flows = [{}]", list.join(", "));
    }
    for (flow, title, steps) in flows {
        if !title.is_empty() {
            let _ = writeln!(o, "\n# Page: {}", title.replace('\n', " "));
        }
        for (i, s) in steps.iter().enumerate() {
            o.push('\n');
            for n in &s.notes {
                let _ = writeln!(o, "# {n}");
            }
            if s.url.is_empty() {
                continue;
            }
            let _ = writeln!(o, "# step {}", i + 1);
            let _ = writeln!(o, "[[flows.{}.steps]]", toml_key(flow));
            let _ = writeln!(o, "name = {}", toml_str(&s.name));
            let mut req = String::from("request = { ");
            if s.method != "GET" {
                let _ = write!(req, "method = {}, ", toml_str(&s.method));
            }
            let _ = write!(req, "url = {}", toml_str(&s.url));
            if !s.query.is_empty() {
                let _ = write!(req, ",\n            query = {}", str_table(&s.query));
            }
            let headers: Vec<(String, String)> = s
                .headers
                .iter()
                .filter(|h| !common.contains(h))
                .cloned()
                .collect();
            if !headers.is_empty() {
                let _ = write!(req, ",\n            headers = {}", str_table(&headers));
            }
            match &s.body {
                Body::None => {}
                Body::Json(tv) => {
                    req.push_str(",\n            json = ");
                    render_tv(tv, &mut req);
                }
                Body::Form(pairs) => {
                    let _ = write!(req, ",\n            form = {}", str_table(pairs));
                }
                Body::Text(t) => {
                    let _ = write!(req, ",\n            body = {}", toml_str(t));
                }
            }
            req.push_str(" }");
            let _ = writeln!(o, "{req}");
            if let Some(st) = s.status {
                let _ = writeln!(o, "check = {{ status = {st} }}");
            }
            if !s.extracts.is_empty() {
                let mut parts = Vec::new();
                for x in &s.extracts {
                    let (how, arg) = match &x.how {
                        How::Json(p) => ("json", p.clone()),
                        How::Header(h) => ("header", h.clone()),
                    };
                    let _ = writeln!(
                        o,
                        "# {}: {} of this response ({how} {arg}), sent again in {}",
                        x.var,
                        if how == "json" { "a value" } else { "a header" },
                        x.used_in.join(", ")
                    );
                    parts.push(format!(
                        "{} = {{ {how} = {} }}",
                        toml_key(&x.var),
                        toml_str(&arg)
                    ));
                }
                let _ = writeln!(o, "extract = {{ {} }}", parts.join(", "));
            }
            if let Some(ms) = s.think_ms {
                let _ = writeln!(o, "think = \"{ms}ms\"");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests;
