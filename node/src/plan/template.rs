//! Request templates: the `{{ expr }}` holes of URLs, headers, bodies and JSON bodies.
//!
//! A template is compiled once, when the plan is loaded, into a list of literal and hole
//! parts whose names are already resolved to slot, data feeder and column indices. Rendering
//! therefore never parses, never looks a name up in a map and never allocates beyond the
//! caller's output buffer. This module must not know about HTTP, VUs' scheduling or where
//! variables and data rows come from: the caller hands them in through [`RenderCtx`].
//!
//! Expressions (spec §10): `var` (a per-VU variable some step extracts), `NAME.COLUMN` (the
//! VU's current row of data feeder NAME), `vu` (the 1-based global VU id, as k6's `__VU`),
//! `iteration` (the VU's 0-based iteration number), `node` (the node's name), `uuid()`,
//! `random_int(A, B)` (inclusive; A and B integer literals) and `timestamp_ms()` (Unix
//! milliseconds). The builtin names win over an extracted variable of the same name; plan
//! validation should refuse such variables (see [`is_builtin_name`]). There is no escape
//! for a literal `{{`.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

/// Names that always mean a builtin and so cannot name an extracted variable.
const BUILTINS: &[&str] = &[
    "vu",
    "iteration",
    "node",
    "uuid",
    "random_int",
    "timestamp_ms",
];

/// True for names reserved by template builtins (`vu`, `iteration`, `node`, `uuid`,
/// `random_int`, `timestamp_ms`): an `extract` variable with such a name could never be read.
pub fn is_builtin_name(name: &str) -> bool {
    BUILTINS.contains(&name)
}

#[derive(Debug, Clone)]
struct FeederEntry {
    index: usize,
    columns: HashMap<String, usize>,
    /// Column names in file order, for error messages.
    names: Vec<String>,
}

/// The names a template may refer to, built by the plan loader for one flow.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    feeders: HashMap<String, FeederEntry>,
    feeder_count: usize,
    vars: HashMap<String, usize>,
    var_count: usize,
}

impl Scope {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a data feeder and returns its index (the position of its row in
    /// [`RenderCtx::rows`]). Registering a name again returns the first index and replaces
    /// its columns.
    pub fn add_feeder(&mut self, name: &str, columns: &[String]) -> usize {
        let cols: HashMap<String, usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        if let Some(entry) = self.feeders.get_mut(name) {
            entry.columns = cols;
            entry.names = columns.to_vec();
            return entry.index;
        }
        let idx = self.feeder_count;
        self.feeder_count += 1;
        let entry = FeederEntry {
            index: idx,
            columns: cols,
            names: columns.to_vec(),
        };
        self.feeders.insert(name.to_string(), entry);
        idx
    }

    /// Registers an extracted variable and returns its slot in [`RenderCtx::vars`];
    /// registering a name again returns the same slot.
    pub fn add_var(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.vars.get(name) {
            return slot;
        }
        let slot = self.var_count;
        self.var_count += 1;
        self.vars.insert(name.to_string(), slot);
        slot
    }

    /// Number of variable slots a VU needs (`vars.len()` of its [`RenderCtx`]).
    pub fn var_count(&self) -> usize {
        self.var_count
    }

    /// Number of feeders (`rows.len()` of a [`RenderCtx`]).
    pub fn feeder_count(&self) -> usize {
        self.feeder_count
    }

    /// The slot of a registered variable.
    pub fn var_slot(&self, name: &str) -> Option<usize> {
        self.vars.get(name).copied()
    }

    /// The index of a registered feeder.
    pub fn feeder_index(&self, name: &str) -> Option<usize> {
        self.feeders.get(name).map(|f| f.index)
    }
}

/// Everything a hole can read while one request is being built.
pub struct RenderCtx<'a> {
    /// 1-based global VU id (unique across the mesh).
    pub vu: u64,
    /// The VU's iteration number, 0-based.
    pub iteration: u64,
    /// The node's name.
    pub node: &'a str,
    /// The VU's variables by slot; an unset variable renders as empty text.
    pub vars: &'a [Option<String>],
    /// The VU's current row per feeder index; a missing row renders as empty text.
    pub rows: &'a [Option<&'a [String]>],
    /// The VU's own generator, seeded from the plan seed for reproducible runs.
    pub rng: &'a mut SmallRng,
}

/// A template that failed to compile, with where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// What is wrong, e.g. "unknown function `rand_int`".
    pub message: String,
    /// 1-based line of the offending text in the template source.
    pub line: usize,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// The hole (or the rest of the template after an unclosed `{{`) in which it occurs.
    pub snippet: String,
    /// Where in a JSON body the template sits (e.g. `$.user`), when it is a JSON leaf.
    pub json_path: Option<String>,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if self.line > 1 {
            write!(f, " at line {}, column {}", self.line, self.column)?;
        } else {
            write!(f, " at column {}", self.column)?;
        }
        write!(f, " in `{}`", self.snippet)?;
        if let Some(p) = &self.json_path {
            write!(f, " (json body at `{p}`)")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateError {}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(Box<str>),
    Var(usize),
    Column { feeder: usize, column: usize },
    Vu,
    Iteration,
    Node,
    Uuid,
    RandomInt(i64, i64),
    TimestampMs,
}

impl Part {
    fn is_number(&self) -> bool {
        matches!(
            self,
            Part::Vu | Part::Iteration | Part::RandomInt(..) | Part::TimestampMs
        )
    }
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Compiles `src`, resolving every name through `scope`.
    pub fn compile(src: &str, scope: &Scope) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest_at = 0;
        while let Some(rel) = src[rest_at..].find("{{") {
            let open = rest_at + rel;
            lit.push_str(&src[rest_at..open]);
            let Some(close_rel) = src[open + 2..].find("}}") else {
                return Err(error_at(
                    src,
                    open,
                    "unclosed `{{`".to_string(),
                    truncate(&src[open..], 60),
                ));
            };
            let close = open + 2 + close_rel;
            let hole = &src[open..close + 2];
            let part = parse_expr(src, open + 2, close, hole, scope)?;
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit).into_boxed_str()));
            }
            parts.push(part);
            rest_at = close + 2;
        }
        lit.push_str(&src[rest_at..]);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit.into_boxed_str()));
        }
        Ok(Template { parts })
    }

    /// True when the template has no holes: callers can build its bytes once.
    pub fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// The whole text of a template without holes.
    pub fn static_text(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Variable slots this template reads (in order of appearance, may repeat).
    pub fn vars_used(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(s) => Some(*s),
            _ => None,
        })
    }

    /// Feeder indices this template reads (in order of appearance, may repeat).
    pub fn feeders_used(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Column { feeder, .. } => Some(*feeder),
            _ => None,
        })
    }

    /// True when the template is exactly one hole that yields an integer (`vu`,
    /// `iteration`, `random_int(..)`, `timestamp_ms()`).
    pub fn is_single_number(&self) -> bool {
        matches!(self.parts.as_slice(), [p] if p.is_number())
    }

    /// Appends the rendered text to `out`.
    pub fn render(&self, ctx: &mut RenderCtx<'_>, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var(slot) => out.push_str(var_text(ctx, *slot)),
                Part::Column { feeder, column } => out.push_str(column_text(ctx, *feeder, *column)),
                Part::Node => out.push_str(ctx.node),
                Part::Uuid => {
                    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                    out.push_str(new_uuid(ctx.rng).hyphenated().encode_lower(&mut buf));
                }
                Part::Vu => push_int(out, ctx.vu as i128),
                Part::Iteration => push_int(out, ctx.iteration as i128),
                Part::RandomInt(a, b) => push_int(out, ctx.rng.random_range(*a..=*b) as i128),
                Part::TimestampMs => push_int(out, now_ms() as i128),
            }
        }
    }

    /// Renders into a new string (convenience for tests and cold paths).
    pub fn render_to_string(&self, ctx: &mut RenderCtx<'_>) -> String {
        let mut s = String::new();
        self.render(ctx, &mut s);
        s
    }

    /// Appends the rendered text as the contents of a JSON string (no quotes); literals
    /// were escaped at compile time (see [`Template::into_json_literals`]).
    fn render_json_str(&self, ctx: &mut RenderCtx<'_>, out: &mut Vec<u8>) {
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.extend_from_slice(s.as_bytes()),
                Part::Var(slot) => escape_json_into(var_text(ctx, *slot), out),
                Part::Column { feeder, column } => {
                    escape_json_into(column_text(ctx, *feeder, *column), out)
                }
                Part::Node => escape_json_into(ctx.node, out),
                Part::Uuid => {
                    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                    let s = new_uuid(ctx.rng).hyphenated().encode_lower(&mut buf);
                    out.extend_from_slice(s.as_bytes());
                }
                Part::Vu => {
                    let _ = write!(out, "{}", ctx.vu);
                }
                Part::Iteration => {
                    let _ = write!(out, "{}", ctx.iteration);
                }
                Part::RandomInt(a, b) => {
                    let _ = write!(out, "{}", ctx.rng.random_range(*a..=*b));
                }
                Part::TimestampMs => {
                    let _ = write!(out, "{}", now_ms());
                }
            }
        }
    }

    fn into_json_literals(mut self) -> Template {
        for part in &mut self.parts {
            if let Part::Lit(s) = part {
                let mut v = Vec::with_capacity(s.len());
                escape_json_into(s, &mut v);
                // Escaping only adds ASCII to valid UTF-8.
                *s = String::from_utf8(v).unwrap_or_default().into_boxed_str();
            }
        }
        self
    }
}

fn var_text<'a>(ctx: &RenderCtx<'a>, slot: usize) -> &'a str {
    match ctx.vars.get(slot) {
        Some(Some(s)) => s.as_str(),
        _ => "",
    }
}

fn column_text<'a>(ctx: &RenderCtx<'a>, feeder: usize, column: usize) -> &'a str {
    match ctx.rows.get(feeder) {
        Some(Some(row)) => row.get(column).map(|s| s.as_str()).unwrap_or(""),
        _ => "",
    }
}

fn new_uuid(rng: &mut SmallRng) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn push_int(out: &mut String, n: i128) {
    let _ = write!(out, "{n}");
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn error_at(src: &str, pos: usize, message: String, snippet: String) -> TemplateError {
    let before = &src[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = src[line_start..pos].chars().count() + 1;
    TemplateError {
        message,
        line,
        column,
        snippet,
        json_path: None,
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A cursor over one hole's expression, `src[start..end]`, that reports positions in `src`.
struct Cursor<'s> {
    src: &'s str,
    pos: usize,
    end: usize,
    hole: &'s str,
}

impl<'s> Cursor<'s> {
    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..self.end].chars().next()
    }

    fn name(&mut self) -> &'s str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !is_name_char(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.src[start..self.pos]
    }

    fn err(&self, pos: usize, message: String) -> TemplateError {
        error_at(self.src, pos, message, self.hole.to_string())
    }

    fn unexpected(&self) -> TemplateError {
        let rest = self.src[self.pos..self.end].trim_end();
        self.err(self.pos, format!("unexpected `{}`", truncate(rest, 20)))
    }
}

fn parse_expr(
    src: &str,
    start: usize,
    end: usize,
    hole: &str,
    scope: &Scope,
) -> Result<Part, TemplateError> {
    let mut c = Cursor {
        src,
        pos: start,
        end,
        hole,
    };
    c.skip_ws();
    if c.pos == end {
        return Err(c.err(start - 2, "empty template expression".to_string()));
    }
    let name_at = c.pos;
    let name = c.name();
    if name.is_empty() {
        return Err(c.unexpected());
    }
    c.skip_ws();
    let part = match c.peek() {
        None => resolve_name(&c, name_at, name, scope)?,
        Some('(') => {
            c.pos += 1;
            let args = parse_args(&mut c, name)?;
            resolve_call(&c, name_at, name, &args)?
        }
        Some('.') => {
            c.pos += 1;
            c.skip_ws();
            let col_at = c.pos;
            let column = c.name();
            if column.is_empty() {
                return Err(c.err(col_at, format!("expected a column name after `{name}.`")));
            }
            resolve_column(&c, name_at, name, col_at, column, scope)?
        }
        Some(_) => return Err(c.unexpected()),
    };
    c.skip_ws();
    if c.pos != end {
        return Err(c.unexpected());
    }
    Ok(part)
}

fn parse_args(c: &mut Cursor<'_>, func: &str) -> Result<Vec<i64>, TemplateError> {
    let mut args = Vec::new();
    c.skip_ws();
    if c.peek() == Some(')') {
        c.pos += 1;
        return Ok(args);
    }
    loop {
        c.skip_ws();
        let arg_at = c.pos;
        while let Some(ch) = c.peek() {
            if ch == ',' || ch == ')' || ch.is_whitespace() {
                break;
            }
            c.pos += ch.len_utf8();
        }
        let text = &c.src[arg_at..c.pos];
        if text.is_empty() {
            return Err(match c.peek() {
                None => c.err(arg_at, format!("unclosed `(` in call of `{func}`")),
                Some(_) => c.err(arg_at, format!("missing argument in call of `{func}`")),
            });
        }
        let value: i64 = text.parse().map_err(|_| {
            c.err(
                arg_at,
                format!("argument `{text}` of `{func}` is not an integer literal"),
            )
        })?;
        args.push(value);
        c.skip_ws();
        match c.peek() {
            Some(',') => c.pos += 1,
            Some(')') => {
                c.pos += 1;
                return Ok(args);
            }
            None => return Err(c.err(c.pos, format!("unclosed `(` in call of `{func}`"))),
            Some(_) => return Err(c.unexpected()),
        }
    }
}

fn resolve_call(
    c: &Cursor<'_>,
    at: usize,
    name: &str,
    args: &[i64],
) -> Result<Part, TemplateError> {
    let arity = |want: usize, sig: &str| -> Result<(), TemplateError> {
        if args.len() == want {
            Ok(())
        } else {
            Err(c.err(
                at,
                format!(
                    "`{name}` takes {want} argument{} ({sig}), got {}",
                    if want == 1 { "" } else { "s" },
                    args.len()
                ),
            ))
        }
    };
    match name {
        "uuid" => arity(0, "`uuid()`").map(|_| Part::Uuid),
        "timestamp_ms" => arity(0, "`timestamp_ms()`").map(|_| Part::TimestampMs),
        "random_int" => {
            arity(2, "`random_int(A, B)`")?;
            let (a, b) = (args[0], args[1]);
            if a > b {
                return Err(c.err(at, format!("`random_int({a}, {b})` needs A <= B")));
            }
            Ok(Part::RandomInt(a, b))
        }
        "vu" | "iteration" | "node" => Err(c.err(
            at,
            format!("`{name}` is not a function: write `{{{{ {name} }}}}`"),
        )),
        _ => Err(c.err(at, format!("unknown function `{name}`"))),
    }
}

fn resolve_name(
    c: &Cursor<'_>,
    at: usize,
    name: &str,
    scope: &Scope,
) -> Result<Part, TemplateError> {
    match name {
        "vu" => return Ok(Part::Vu),
        "iteration" => return Ok(Part::Iteration),
        "node" => return Ok(Part::Node),
        "uuid" | "timestamp_ms" => {
            return Err(c.err(at, format!("`{name}` is a function: write `{name}()`")))
        }
        "random_int" => {
            return Err(c.err(
                at,
                "`random_int` is a function: write `random_int(A, B)`".to_string(),
            ))
        }
        _ => {}
    }
    if let Some(&slot) = scope.vars.get(name) {
        return Ok(Part::Var(slot));
    }
    if let Some(entry) = scope.feeders.get(name) {
        let example = entry.names.first().map(String::as_str).unwrap_or("COLUMN");
        return Err(c.err(
            at,
            format!("`{name}` is a data feeder: name a column, e.g. `{name}.{example}`"),
        ));
    }
    Err(c.err(
        at,
        format!("unknown variable `{name}` (no step extracts it)"),
    ))
}

fn resolve_column(
    c: &Cursor<'_>,
    at: usize,
    name: &str,
    col_at: usize,
    column: &str,
    scope: &Scope,
) -> Result<Part, TemplateError> {
    let Some(entry) = scope.feeders.get(name) else {
        return Err(c.err(at, format!("unknown data feeder `{name}`")));
    };
    match entry.columns.get(column) {
        Some(&col) => Ok(Part::Column {
            feeder: entry.index,
            column: col,
        }),
        None => Err(c.err(
            col_at,
            format!(
                "data feeder `{name}` has no column `{column}` (columns: {})",
                entry.names.join(", ")
            ),
        )),
    }
}

/// Appends `s` escaped for the inside of a JSON string.
pub fn escape_json_into(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[derive(Debug, Clone, PartialEq)]
enum JsonOp {
    /// Pre-serialized JSON text (structure, keys, static values).
    Raw(Vec<u8>),
    /// A templated string value; quotes are added at render time.
    Str(Template),
    /// A single integer hole rendered as a bare JSON number.
    Number(Template),
}

/// A JSON request body whose string leaves are templates, compiled once.
///
/// Object keys are not templated. A string leaf that is exactly one integer hole
/// (`{{ random_int(1, 1000) }}`, `{{ vu }}`, `{{ iteration }}`, `{{ timestamp_ms() }}`)
/// renders as a JSON number; every other templated leaf renders as a JSON string.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonTemplate {
    ops: Vec<JsonOp>,
}

impl JsonTemplate {
    pub fn compile(
        value: &serde_json::Value,
        scope: &Scope,
    ) -> Result<JsonTemplate, TemplateError> {
        let mut ops = Vec::new();
        let mut raw = Vec::new();
        let mut path = String::from("$");
        compile_json(value, scope, &mut ops, &mut raw, &mut path)?;
        if !raw.is_empty() {
            ops.push(JsonOp::Raw(raw));
        }
        Ok(JsonTemplate { ops })
    }

    /// True when the body has no holes.
    pub fn is_static(&self) -> bool {
        self.ops.iter().all(|o| matches!(o, JsonOp::Raw(_)))
    }

    /// Appends the rendered JSON text to `out`.
    pub fn render_json(&self, ctx: &mut RenderCtx<'_>, out: &mut Vec<u8>) {
        for op in &self.ops {
            match op {
                JsonOp::Raw(b) => out.extend_from_slice(b),
                JsonOp::Str(t) => {
                    out.push(b'"');
                    t.render_json_str(ctx, out);
                    out.push(b'"');
                }
                JsonOp::Number(t) => t.render_json_str(ctx, out),
            }
        }
    }

    /// Variable slots the body reads.
    pub fn vars_used(&self) -> impl Iterator<Item = usize> + '_ {
        self.templates().flat_map(|t| t.vars_used())
    }

    /// Feeder indices the body reads.
    pub fn feeders_used(&self) -> impl Iterator<Item = usize> + '_ {
        self.templates().flat_map(|t| t.feeders_used())
    }

    fn templates(&self) -> impl Iterator<Item = &Template> + '_ {
        self.ops.iter().filter_map(|o| match o {
            JsonOp::Str(t) | JsonOp::Number(t) => Some(t),
            JsonOp::Raw(_) => None,
        })
    }
}

fn push_path_key(path: &mut String, key: &str) {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        path.push('.');
        path.push_str(key);
    } else {
        path.push_str("['");
        path.push_str(&key.replace('\\', "\\\\").replace('\'', "\\'"));
        path.push_str("']");
    }
}

fn compile_json(
    value: &serde_json::Value,
    scope: &Scope,
    ops: &mut Vec<JsonOp>,
    raw: &mut Vec<u8>,
    path: &mut String,
) -> Result<(), TemplateError> {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            let t = Template::compile(s, scope).map_err(|mut e| {
                e.json_path = Some(path.clone());
                e
            })?;
            if t.is_static() {
                raw.push(b'"');
                escape_json_into(s, raw);
                raw.push(b'"');
                return Ok(());
            }
            if !raw.is_empty() {
                ops.push(JsonOp::Raw(std::mem::take(raw)));
            }
            if t.is_single_number() {
                ops.push(JsonOp::Number(t));
            } else {
                ops.push(JsonOp::Str(t.into_json_literals()));
            }
        }
        Value::Array(items) => {
            raw.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    raw.push(b',');
                }
                let len = path.len();
                let _ = write!(path, "[{i}]");
                compile_json(item, scope, ops, raw, path)?;
                path.truncate(len);
            }
            raw.push(b']');
        }
        Value::Object(map) => {
            raw.push(b'{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    raw.push(b',');
                }
                raw.push(b'"');
                escape_json_into(k, raw);
                raw.extend_from_slice(b"\":");
                let len = path.len();
                push_path_key(path, k);
                compile_json(v, scope, ops, raw, path)?;
                path.truncate(len);
            }
            raw.push(b'}');
        }
        // Null, booleans and numbers serialize infallibly.
        other => raw.extend_from_slice(other.to_string().as_bytes()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn scope() -> Scope {
        let mut s = Scope::new();
        s.add_feeder("accounts", &["user".to_string(), "password".to_string()]);
        s.add_var("token");
        s
    }

    struct Fixture {
        vars: Vec<Option<String>>,
        row: Vec<String>,
        rng: SmallRng,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                vars: vec![Some("tok\"en".to_string())],
                row: vec!["user7".to_string(), "pa\\ss\n7".to_string()],
                rng: SmallRng::seed_from_u64(7),
            }
        }

        fn render(&mut self, t: &Template) -> String {
            let rows = [Some(self.row.as_slice())];
            let mut ctx = RenderCtx {
                vu: 3,
                iteration: 9,
                node: "eu-1",
                vars: &self.vars,
                rows: &rows,
                rng: &mut self.rng,
            };
            t.render_to_string(&mut ctx)
        }

        fn render_json(&mut self, t: &JsonTemplate) -> Vec<u8> {
            let rows = [Some(self.row.as_slice())];
            let mut ctx = RenderCtx {
                vu: 3,
                iteration: 9,
                node: "eu-1",
                vars: &self.vars,
                rows: &rows,
                rng: &mut self.rng,
            };
            let mut out = Vec::new();
            t.render_json(&mut ctx, &mut out);
            out
        }
    }

    fn err(src: &str) -> String {
        Template::compile(src, &scope()).unwrap_err().to_string()
    }

    #[test]
    fn static_text_is_kept_verbatim() {
        let t = Template::compile("/products?q=a{b}c}}", &scope()).unwrap();
        assert!(t.is_static());
        assert_eq!(t.static_text(), Some("/products?q=a{b}c}}"));
        assert_eq!(Fixture::new().render(&t), "/products?q=a{b}c}}");
        let empty = Template::compile("", &scope()).unwrap();
        assert!(empty.is_static());
        assert_eq!(empty.static_text(), Some(""));
    }

    #[test]
    fn holes_render_builtins_vars_and_columns() {
        let t = Template::compile(
            "{{vu}}/{{ iteration }}/{{  node}}/{{ token }}/{{ accounts.user }}/{{accounts . password}}",
            &scope(),
        )
        .unwrap();
        assert!(!t.is_static());
        assert_eq!(
            Fixture::new().render(&t),
            "3/9/eu-1/tok\"en/user7/pa\\ss\n7"
        );
        assert_eq!(t.vars_used().collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.feeders_used().collect::<Vec<_>>(), vec![0, 0]);
    }

    #[test]
    fn unset_var_and_missing_row_render_empty() {
        let t = Template::compile("[{{ token }}][{{ accounts.user }}]", &scope()).unwrap();
        let vars = vec![None];
        let rows: [Option<&[String]>; 1] = [None];
        let mut rng = SmallRng::seed_from_u64(1);
        let mut ctx = RenderCtx {
            vu: 1,
            iteration: 0,
            node: "n",
            vars: &vars,
            rows: &rows,
            rng: &mut rng,
        };
        assert_eq!(t.render_to_string(&mut ctx), "[][]");
        // Slices shorter than the scope (caller bug) still do not panic.
        let mut ctx = RenderCtx {
            vu: 1,
            iteration: 0,
            node: "n",
            vars: &[],
            rows: &[],
            rng: &mut rng,
        };
        assert_eq!(t.render_to_string(&mut ctx), "[][]");
    }

    #[test]
    fn random_int_is_inclusive_and_seeded() {
        let t = Template::compile("{{ random_int(-2, 2) }}", &scope()).unwrap();
        let mut f = Fixture::new();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let n: i64 = f.render(&t).parse().unwrap();
            assert!((-2..=2).contains(&n));
            seen.insert(n);
        }
        assert_eq!(seen.len(), 5, "all of -2..=2 appear in 500 draws: {seen:?}");
        let (mut a, mut b) = (Fixture::new(), Fixture::new());
        let xs: Vec<_> = (0..20).map(|_| a.render(&t)).collect();
        let ys: Vec<_> = (0..20).map(|_| b.render(&t)).collect();
        assert_eq!(xs, ys, "same seed, same sequence");
        let one = Template::compile("{{random_int(5,5)}}", &scope()).unwrap();
        assert_eq!(f.render(&one), "5");
        let wide = Template::compile(
            "{{ random_int(-9223372036854775808, 9223372036854775807) }}",
            &scope(),
        )
        .unwrap();
        assert!(f.render(&wide).parse::<i64>().is_ok());
    }

    #[test]
    fn uuid_and_timestamp() {
        let t = Template::compile("{{ uuid() }}", &scope()).unwrap();
        let mut f = Fixture::new();
        let a = f.render(&t);
        let b = f.render(&t);
        let parsed = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(a.len(), 36);
        assert_ne!(a, b);
        let ts = Template::compile("{{ timestamp_ms() }}", &scope()).unwrap();
        let before = now_ms();
        let v: u64 = f.render(&ts).parse().unwrap();
        assert!(v >= before && v < before + 3_600_000);
    }

    #[test]
    fn error_messages_name_position_and_text() {
        assert_eq!(
            err("Bearer {{ rand_int(1, 2) }}"),
            "unknown function `rand_int` at column 11 in `{{ rand_int(1, 2) }}`"
        );
        assert_eq!(
            err("{{ random_int(1) }}"),
            "`random_int` takes 2 arguments (`random_int(A, B)`), got 1 at column 4 in `{{ random_int(1) }}`"
        );
        assert_eq!(
            err("{{ uuid(3) }}"),
            "`uuid` takes 0 arguments (`uuid()`), got 1 at column 4 in `{{ uuid(3) }}`"
        );
        assert_eq!(err("a {{ token"), "unclosed `{{` at column 3 in `{{ token`");
        assert_eq!(
            err("x{{  }}"),
            "empty template expression at column 2 in `{{  }}`"
        );
        assert_eq!(
            err("{{ tokn }}"),
            "unknown variable `tokn` (no step extracts it) at column 4 in `{{ tokn }}`"
        );
        assert_eq!(
            err("{{ acounts.user }}"),
            "unknown data feeder `acounts` at column 4 in `{{ acounts.user }}`"
        );
        assert_eq!(
            err("{{ accounts.usr }}"),
            "data feeder `accounts` has no column `usr` (columns: user, password) at column 13 in `{{ accounts.usr }}`"
        );
        assert_eq!(
            err("{{ accounts }}"),
            "`accounts` is a data feeder: name a column, e.g. `accounts.user` at column 4 in `{{ accounts }}`"
        );
        assert_eq!(
            err("{{ random_int(a, 2) }}"),
            "argument `a` of `random_int` is not an integer literal at column 15 in `{{ random_int(a, 2) }}`"
        );
        assert_eq!(
            err("{{ random_int(3, 2) }}"),
            "`random_int(3, 2)` needs A <= B at column 4 in `{{ random_int(3, 2) }}`"
        );
        assert_eq!(
            err("{{ uuid }}"),
            "`uuid` is a function: write `uuid()` at column 4 in `{{ uuid }}`"
        );
        assert_eq!(
            err("{{ vu() }}"),
            "`vu` is not a function: write `{{ vu }}` at column 4 in `{{ vu() }}`"
        );
        assert_eq!(
            err("{{ token x }}"),
            "unexpected `x` at column 10 in `{{ token x }}`"
        );
        assert_eq!(
            err("{{ {x} }}"),
            "unexpected `{x}` at column 4 in `{{ {x} }}`"
        );
        assert_eq!(
            err("{{ random_int(1, 2 }}"),
            "unclosed `(` in call of `random_int` at column 20 in `{{ random_int(1, 2 }}`"
        );
        assert_eq!(
            err("{{ random_int(1,,2) }}"),
            "missing argument in call of `random_int` at column 17 in `{{ random_int(1,,2) }}`"
        );
        assert_eq!(
            err("{{ accounts. }}"),
            "expected a column name after `accounts.` at column 14 in `{{ accounts. }}`"
        );
        assert_eq!(
            err("line one\n  {{ nope }}"),
            "unknown variable `nope` (no step extracts it) at line 2, column 6 in `{{ nope }}`"
        );
        assert_eq!(
            err("{{ random_int(1, 99999999999999999999) }}"),
            "argument `99999999999999999999` of `random_int` is not an integer literal at column 18 in `{{ random_int(1, 99999999999999999999) }}`"
        );
        assert_eq!(
            err("héllo {{ x }}"),
            "unknown variable `x` (no step extracts it) at column 10 in `{{ x }}`"
        );
    }

    #[test]
    fn scope_dedupes_names() {
        let mut s = Scope::new();
        assert_eq!(s.add_var("a"), 0);
        assert_eq!(s.add_var("b"), 1);
        assert_eq!(s.add_var("a"), 0);
        assert_eq!(s.var_count(), 2);
        assert_eq!(s.add_feeder("f", &["x".into()]), 0);
        assert_eq!(s.add_feeder("g", &[]), 1);
        assert_eq!(s.add_feeder("f", &["y".into()]), 0);
        assert_eq!(s.feeder_count(), 2);
        assert!(Template::compile("{{ f.y }}", &s).is_ok());
        assert!(Template::compile("{{ f.x }}", &s).is_err());
        assert!(is_builtin_name("vu") && !is_builtin_name("token"));
    }

    #[test]
    fn json_body_numbers_strings_and_escaping() {
        let body = serde_json::json!({
            "user": "{{ accounts.user }}",
            "password": "{{ accounts.password }}",
            "product": "{{ random_int(1, 1000) }}",
            "vu": "{{vu}}",
            "label": "vu {{ vu }}",
            "quote": "say \"hi\" to {{ token }}",
            "nested": [1, true, null, {"n": "{{ iteration }}", "s": "plain\t"}],
            "weird key\"": 2.5
        });
        let t = JsonTemplate::compile(&body, &scope()).unwrap();
        assert!(!t.is_static());
        let out = Fixture::new().render_json(&t);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user"], "user7");
        assert_eq!(v["password"], "pa\\ss\n7");
        let p = v["product"].as_i64().unwrap();
        assert!((1..=1000).contains(&p));
        assert_eq!(v["vu"], 3);
        assert_eq!(v["label"], "vu 3");
        assert_eq!(v["quote"], "say \"hi\" to tok\"en");
        assert_eq!(v["nested"][3]["n"], 9);
        assert_eq!(v["nested"][3]["s"], "plain\t");
        assert_eq!(v["nested"][0], 1);
        assert_eq!(v["weird key\""], 2.5);
        assert_eq!(t.feeders_used().count(), 2);
        assert_eq!(t.vars_used().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn json_static_body_and_error_path() {
        let body = serde_json::json!({"a": ["x", {"b": "y"}]});
        let t = JsonTemplate::compile(&body, &scope()).unwrap();
        assert!(t.is_static());
        let out = Fixture::new().render_json(&t);
        assert_eq!(out, serde_json::to_vec(&body).unwrap());
        let bad = serde_json::json!({"a": [1, {"my key": "{{ nope }}"}]});
        let e = JsonTemplate::compile(&bad, &scope()).unwrap_err();
        assert_eq!(e.json_path.as_deref(), Some("$.a[1]['my key']"));
        assert_eq!(
            e.to_string(),
            "unknown variable `nope` (no step extracts it) at column 4 in `{{ nope }}` (json body at `$.a[1]['my key']`)"
        );
    }

    #[test]
    fn escape_control_chars() {
        let mut out = Vec::new();
        escape_json_into("a\u{1}\u{8}\u{c}\"\\é", &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "a\\u0001\\b\\f\\\"\\\\é");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn compile_never_panics(src in "\\PC{0,40}") {
                let _ = Template::compile(&src, &scope());
            }

            #[test]
            fn compile_never_panics_on_holes(src in "[a-z{}() ,.0-9-]{0,30}") {
                let _ = Template::compile(&src, &scope());
            }

            #[test]
            fn json_strings_round_trip(s in "\\PC{0,30}", var in "\\PC{0,30}") {
                let lit = s.replace('{', "(");
                let src = format!("{lit}{{{{ token }}}}");
                let body = serde_json::json!({ "k": src });
                let t = JsonTemplate::compile(&body, &scope()).unwrap();
                let mut f = Fixture::new();
                f.vars = vec![Some(var.clone())];
                let out = f.render_json(&t);
                let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                prop_assert_eq!(v["k"].as_str().unwrap(), format!("{lit}{var}"));
            }
        }
    }
}
