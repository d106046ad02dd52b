//! `stampede compare BASE.json NEW.json`: two runs' JSON summaries side by side (the total,
//! each flow, each request), and `--fail-on` rules that turn a regression into a failed
//! command for CI.
//!
//! It owns reading a summary back from disk (bounded, schema-checked), the rule grammar
//! (docs/ci.md) and the three renderings (terminal table, markdown, JSON). It must not
//! run anything or compute percentiles: every figure is read from the summaries as they
//! were written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::exit::{Failure, Outcome};
use crate::reports::summary::SUMMARY_SCHEMA_VERSION;

/// The largest summary file read: a summary with a long timeline and many nodes is a few
/// MiB; anything far bigger is not one.
pub const MAX_SUMMARY_BYTES: u64 = 64 * 1024 * 1024;
/// Most `--fail-on` rules: more is a script gone wrong, not a policy.
pub const MAX_RULES: usize = 256;

/// What `compare` needs of one row of a summary (`totals`, `flows.X`, `requests.X`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RowStats {
    pub requests: u64,
    pub failed: u64,
    pub rps: f64,
    pub latency_us: RowLatency,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RowLatency {
    #[serde(default)]
    pub mean: f64,
    pub p50: u64,
    #[serde(default)]
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
    #[serde(default)]
    pub p999: u64,
    #[serde(default)]
    pub max: u64,
}

/// The parts of a JSON summary that `compare` reads; other fields may come and go.
#[derive(Debug, Clone, Deserialize)]
pub struct RunFile {
    #[serde(default)]
    pub schema_version: u32,
    pub run_id: String,
    pub plan: String,
    pub started_at: String,
    pub duration_s: f64,
    pub totals: RowStats,
    #[serde(default)]
    pub requests: BTreeMap<String, RowStats>,
    #[serde(default)]
    pub flows: BTreeMap<String, RowStats>,
}

/// Reads and checks a JSON summary. Errors name the file and what is wrong with it.
pub fn load(path: &Path) -> Result<RunFile, String> {
    parse(&path.display().to_string(), &read_bounded(path)?)
}

/// A baseline for the HTML report (`--baseline`): the summary checked as [`load`] does,
/// as JSON without the parts the report does not draw for it (plan source, nodes,
/// labels, events), so embedding it costs little.
pub fn load_baseline(path: &Path) -> Result<serde_json::Value, String> {
    let name = path.display().to_string();
    let bytes = read_bounded(path)?;
    parse(&name, &bytes)?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{name}: {e}"))?;
    if let Some(o) = v.as_object_mut() {
        for k in ["plan_source", "nodes", "by_label", "events"] {
            o.remove(k);
        }
    }
    Ok(v)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SUMMARY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_SUMMARY_BYTES {
        return Err(format!(
            "{name}: larger than {} MiB; that is not a stampede JSON summary",
            MAX_SUMMARY_BYTES / (1024 * 1024)
        ));
    }
    Ok(bytes)
}

/// [`load`] for bytes already in memory; `name` is used in errors.
pub fn parse(name: &str, bytes: &[u8]) -> Result<RunFile, String> {
    let not_summary = |why: String| {
        format!(
            "{name}: not a stampede JSON summary (the file `stampede run --out json=FILE` writes): {why}"
        )
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| not_summary(format!("invalid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(not_summary("the top level is not an object".into()));
    };
    for key in ["run_id", "totals"] {
        if !obj.contains_key(key) {
            return Err(not_summary(format!("it has no `{key}`")));
        }
    }
    if let Some(v) = obj.get("schema_version") {
        match v.as_u64() {
            Some(n) if n <= u64::from(SUMMARY_SCHEMA_VERSION) => {}
            Some(n) => {
                return Err(format!(
                    "{name}: summary schema version {n} is newer than this stampede reads \
                     ({SUMMARY_SCHEMA_VERSION}); compare with the stampede that wrote it"
                ))
            }
            None => return Err(not_summary("`schema_version` is not a number".into())),
        }
    }
    serde_json::from_value(value).map_err(|e| not_summary(e.to_string()))
}

/// A figure compared between the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Rps,
    Requests,
    ErrorRate,
    Mean,
    P50,
    P90,
    P95,
    P99,
    P999,
    Max,
}

/// The metrics every rendering shows, in order.
const SHOWN: [Metric; 5] = [
    Metric::Rps,
    Metric::P50,
    Metric::P95,
    Metric::P99,
    Metric::ErrorRate,
];

impl Metric {
    fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "rps" => Metric::Rps,
            "requests" => Metric::Requests,
            "error_rate" | "errors" => Metric::ErrorRate,
            "mean" | "avg" => Metric::Mean,
            "p50" | "med" => Metric::P50,
            "p90" => Metric::P90,
            "p95" => Metric::P95,
            "p99" => Metric::P99,
            "p999" | "p99.9" => Metric::P999,
            "max" => Metric::Max,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Rps => "rps",
            Metric::Requests => "requests",
            Metric::ErrorRate => "error_rate",
            Metric::Mean => "mean",
            Metric::P50 => "p50",
            Metric::P90 => "p90",
            Metric::P95 => "p95",
            Metric::P99 => "p99",
            Metric::P999 => "p999",
            Metric::Max => "max",
        }
    }

    fn is_latency(self) -> bool {
        !matches!(self, Metric::Rps | Metric::Requests | Metric::ErrorRate)
    }

    /// True when a larger value is worse (latency, errors).
    fn higher_is_worse(self) -> bool {
        !matches!(self, Metric::Rps | Metric::Requests)
    }

    /// The figure in its natural unit: µs for latency, percent for the error rate.
    fn of(self, s: &RowStats) -> f64 {
        let l = &s.latency_us;
        match self {
            Metric::Rps => s.rps,
            Metric::Requests => s.requests as f64,
            Metric::ErrorRate => {
                if s.requests == 0 {
                    0.0
                } else {
                    s.failed as f64 * 100.0 / s.requests as f64
                }
            }
            Metric::Mean => l.mean,
            Metric::P50 => l.p50 as f64,
            Metric::P90 => l.p90 as f64,
            Metric::P95 => l.p95 as f64,
            Metric::P99 => l.p99 as f64,
            Metric::P999 => l.p999 as f64,
            Metric::Max => l.max as f64,
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Metric::ErrorRate => format!("{v:.2}%"),
            Metric::Rps => format!("{v:.1}"),
            Metric::Requests => format!("{v:.0}"),
            _ => show_us(v),
        }
    }

    fn show_delta(self, d: f64) -> String {
        let sign = if d < 0.0 { "-" } else { "+" };
        match self {
            Metric::ErrorRate => format!("{sign}{:.2}pp", d.abs()),
            m if m.is_latency() => format!("{sign}{}", show_us(d.abs())),
            _ => format!("{sign}{:.1}", d.abs()),
        }
    }
}

fn show_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{us:.0}µs")
    }
}

/// Which rows a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Every,
    Total,
    Flow(String),
    Request(String),
}

/// The change a rule compares against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Relative, in percent of the base value.
    Percent(f64),
    /// Percentage points (error rate only).
    Points(f64),
    /// Absolute, in the metric's unit (µs for latency).
    Absolute(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

/// One `--fail-on` rule, e.g. `p99{flow=purchase} > +10%`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub text: String,
    pub metric: Metric,
    pub scope: Scope,
    op: Op,
    pub change: Change,
}

impl Rule {
    /// Parses one rule; the error quotes it and says what is wrong (docs/ci.md has the
    /// grammar).
    pub fn parse(text: &str) -> Result<Rule, String> {
        let bad = |why: &str| format!("--fail-on '{text}': {why}");
        let t = text.trim();
        let op_at = t
            .find(['<', '>'])
            .ok_or_else(|| bad("expected METRIC OP CHANGE, e.g. 'p99 > +10%'"))?;
        let (lhs, rest) = t.split_at(op_at);
        let (op, rhs) = if let Some(r) = rest.strip_prefix(">=") {
            (Op::Ge, r)
        } else if let Some(r) = rest.strip_prefix("<=") {
            (Op::Le, r)
        } else if let Some(r) = rest.strip_prefix('>') {
            (Op::Gt, r)
        } else {
            (Op::Lt, &rest[1..])
        };
        let lhs = lhs.trim();
        let (metric_text, scope) = match lhs.split_once('{') {
            None => (lhs, Scope::Every),
            Some((m, s)) => {
                let s = s
                    .strip_suffix('}')
                    .ok_or_else(|| bad("a scope is closed with `}`"))?
                    .trim();
                let scope = if s == "total" {
                    Scope::Total
                } else {
                    match s.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                        Some(("flow", v)) if !v.is_empty() => Scope::Flow(v.to_string()),
                        Some(("name" | "request", v)) if !v.is_empty() => {
                            Scope::Request(v.to_string())
                        }
                        _ => {
                            return Err(bad("the scope is {total}, {flow=NAME} or {name=REQUEST}"))
                        }
                    }
                };
                (m.trim(), scope)
            }
        };
        let metric = Metric::parse(metric_text).ok_or_else(|| {
            bad(&format!(
                "unknown metric `{metric_text}` (rps, requests, error_rate, mean, p50, p90, p95, p99, p999 or max)"
            ))
        })?;
        let rhs = rhs.trim();
        if rhs.is_empty() {
            return Err(bad("the change is missing, e.g. +10%"));
        }
        let number = |s: &str| -> Result<f64, String> {
            let v: f64 = s.trim().parse().map_err(|_| {
                bad(&format!(
                    "`{rhs}` is not a change such as +10%, +0.5pp or +20ms"
                ))
            })?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(bad("the change must be a finite number"))
            }
        };
        let change = if let Some(n) = rhs.strip_suffix('%') {
            Change::Percent(number(n)?)
        } else if let Some(n) = rhs.strip_suffix("pp") {
            if metric != Metric::ErrorRate {
                return Err(bad("`pp` (percentage points) is for error_rate only"));
            }
            Change::Points(number(n)?)
        } else if metric.is_latency() {
            let (sign, d) = match rhs.strip_prefix('-') {
                Some(d) => (-1.0, d),
                None => (1.0, rhs.strip_prefix('+').unwrap_or(rhs)),
            };
            let d = stampede_protocol::duration::parse_duration(d).map_err(|e| {
                bad(&format!(
                    "a latency change is a percentage (+10%) or a duration (+20ms): {e}"
                ))
            })?;
            Change::Absolute(sign * d.as_secs_f64() * 1e6)
        } else if metric == Metric::ErrorRate {
            return Err(bad(
                "an error_rate change is in percentage points (+0.5pp) or relative (+10%)",
            ));
        } else {
            Change::Absolute(number(rhs)?)
        };
        Ok(Rule {
            text: t.to_string(),
            metric,
            scope,
            op,
            change,
        })
    }

    fn applies_to(&self, row: &RowKey) -> bool {
        match (&self.scope, row) {
            (Scope::Every, _) => true,
            (Scope::Total, RowKey::Total) => true,
            (Scope::Flow(f), RowKey::Flow(g)) => f == g,
            (Scope::Request(r), RowKey::Request(q)) => r == q,
            _ => false,
        }
    }

    /// The change this rule measures between `base` and `new`, in its own unit.
    fn measure(&self, base: f64, new: f64) -> f64 {
        match self.change {
            Change::Percent(_) => relative(base, new),
            Change::Points(_) | Change::Absolute(_) => new - base,
        }
    }

    fn fires(&self, base: f64, new: f64) -> bool {
        let limit = match self.change {
            Change::Percent(v) | Change::Points(v) | Change::Absolute(v) => v,
        };
        let d = self.measure(base, new);
        match self.op {
            Op::Gt => d > limit,
            Op::Ge => d >= limit,
            Op::Lt => d < limit,
            Op::Le => d <= limit,
        }
    }
}

/// Relative change in percent; from 0 to something is +∞ (and 0 to 0 is no change).
fn relative(base: f64, new: f64) -> f64 {
    if base == 0.0 {
        if new == 0.0 {
            0.0
        } else {
            f64::INFINITY.copysign(new)
        }
    } else {
        (new - base) / base.abs() * 100.0
    }
}

/// A row of the comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowKey {
    Total,
    Flow(String),
    Request(String),
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowKey::Total => f.write_str("total"),
            RowKey::Flow(n) => write!(f, "flow {n}"),
            RowKey::Request(n) => write!(f, "request {n}"),
        }
    }
}

/// One metric of one row in both runs.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub metric: Metric,
    pub base: f64,
    pub new: f64,
    pub delta: f64,
    /// `null` in JSON when the base is 0 and the new value is not.
    pub delta_pct: Option<f64>,
}

impl Cell {
    /// Base, new, Δ and Δ% as shown (Δ% empty when nothing changed).
    fn texts(&self) -> [String; 4] {
        let pct = if self.delta == 0.0 {
            String::new()
        } else {
            show_pct(self.delta_pct.unwrap_or(f64::INFINITY))
        };
        [
            self.metric.show(self.base),
            self.metric.show(self.new),
            self.metric.show_delta(self.delta),
            pct,
        ]
    }
}

/// A row present in both runs.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub row: String,
    #[serde(skip)]
    pub key: RowKey,
    pub cells: Vec<Cell>,
}

/// A rule that fired on a row.
#[derive(Debug, Clone, Serialize)]
pub struct Firing {
    pub rule: String,
    pub row: String,
    pub metric: Metric,
    pub base: f64,
    pub new: f64,
    pub message: String,
}

/// The whole comparison: what every rendering shows.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base: RunInfo,
    pub new: RunInfo,
    pub rows: Vec<Row>,
    /// Rows in only one of the runs (a renamed or new request, a dropped flow).
    pub only_in_base: Vec<String>,
    pub only_in_new: Vec<String>,
    pub rules: Vec<String>,
    pub fired: Vec<Firing>,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    pub plan: String,
    pub started_at: String,
    pub duration_s: f64,
}

impl RunInfo {
    fn of(r: &RunFile) -> RunInfo {
        RunInfo {
            run_id: r.run_id.clone(),
            plan: r.plan.clone(),
            started_at: r.started_at.clone(),
            duration_s: r.duration_s,
        }
    }
}

fn rows_of(r: &RunFile) -> BTreeMap<RowKey, &RowStats> {
    let mut m = BTreeMap::new();
    m.insert(RowKey::Total, &r.totals);
    for (k, v) in &r.flows {
        m.insert(RowKey::Flow(k.clone()), v);
    }
    for (k, v) in &r.requests {
        m.insert(RowKey::Request(k.clone()), v);
    }
    m
}

/// Compares two runs and judges the rules. A rule scoped to a row that is missing from
/// either run is an error: it could never fire, which is not a pass.
pub fn compare(base: &RunFile, new: &RunFile, rules: &[Rule]) -> Result<Comparison, String> {
    let b = rows_of(base);
    let n = rows_of(new);
    for rule in rules {
        let (key, what) = match &rule.scope {
            Scope::Flow(f) => (RowKey::Flow(f.clone()), "flow"),
            Scope::Request(r) => (RowKey::Request(r.clone()), "request"),
            _ => continue,
        };
        for (run, rows, label) in [(base, &b, "base"), (new, &n, "new")] {
            if !rows.contains_key(&key) {
                let name = match &key {
                    RowKey::Flow(s) | RowKey::Request(s) => s,
                    RowKey::Total => "",
                };
                return Err(format!(
                    "--fail-on '{}': the {label} run ({}) has no {what} `{name}`",
                    rule.text, run.run_id
                ));
            }
        }
    }
    let mut rows = Vec::new();
    let mut fired = Vec::new();
    for (key, bs) in &b {
        let Some(ns) = n.get(key) else { continue };
        let mut metrics: Vec<Metric> = SHOWN.to_vec();
        for r in rules {
            if !metrics.contains(&r.metric) && r.applies_to(key) {
                metrics.push(r.metric);
            }
        }
        let cells = metrics
            .iter()
            .map(|&m| {
                let (bv, nv) = (m.of(bs), m.of(ns));
                let pct = relative(bv, nv);
                Cell {
                    metric: m,
                    base: bv,
                    new: nv,
                    delta: nv - bv,
                    delta_pct: pct.is_finite().then_some(pct),
                }
            })
            .collect();
        for r in rules.iter().filter(|r| r.applies_to(key)) {
            let (bv, nv) = (r.metric.of(bs), r.metric.of(ns));
            if r.fires(bv, nv) {
                fired.push(Firing {
                    rule: r.text.clone(),
                    row: key.to_string(),
                    metric: r.metric,
                    base: bv,
                    new: nv,
                    message: format!(
                        "rule '{}' fired on {key}: {} {} -> {} ({}, {})",
                        r.text,
                        r.metric.name(),
                        r.metric.show(bv),
                        r.metric.show(nv),
                        r.metric.show_delta(nv - bv),
                        show_pct(relative(bv, nv)),
                    ),
                });
            }
        }
        rows.push(Row {
            row: key.to_string(),
            key: key.clone(),
            cells,
        });
    }
    let only = |a: &BTreeMap<RowKey, &RowStats>, other: &BTreeMap<RowKey, &RowStats>| {
        a.keys()
            .filter(|k| !other.contains_key(k))
            .map(ToString::to_string)
            .collect()
    };
    Ok(Comparison {
        base: RunInfo::of(base),
        new: RunInfo::of(new),
        only_in_base: only(&b, &n),
        only_in_new: only(&n, &b),
        rows,
        rules: rules.iter().map(|r| r.text.clone()).collect(),
        passed: fired.is_empty(),
        fired,
    })
}

fn show_pct(p: f64) -> String {
    if p.is_infinite() {
        if p > 0.0 { "+∞%" } else { "-∞%" }.to_string()
    } else {
        format!("{:+.1}%", p)
    }
}

/// How a cell's change reads: worse, better, or within noise (5 % or 0.1 pp).
fn verdict(c: &Cell) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    let significant = if c.metric == Metric::ErrorRate {
        c.delta.abs() >= 0.1
    } else {
        c.delta_pct.is_none_or(|p| p.abs() >= 5.0)
    };
    if !significant || c.delta == 0.0 {
        Equal
    } else if (c.delta > 0.0) == c.metric.higher_is_worse() {
        Greater
    } else {
        Less
    }
}

/// The terminal table; `color` adds ANSI colours (red worse, green better, bold red for a
/// fired rule).
pub fn render_table(c: &Comparison, color: bool) -> String {
    let paint = |code: &str, s: String| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s
        }
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "base {} ({}, {})\nnew  {} ({}, {})\n",
        c.base.run_id, c.base.plan, c.base.started_at, c.new.run_id, c.new.plan, c.new.started_at
    );
    let _ = writeln!(
        o,
        "{:<32} {:>12} {:>12} {:>12} {:>9}",
        "", "base", "new", "Δ", "Δ%"
    );
    for row in &c.rows {
        let _ = writeln!(o, "{}", paint("1", row.row.clone()));
        for cell in &row.cells {
            let [base, new, delta, pct] = cell.texts();
            let line = format!(
                "  {:<30} {base:>12} {new:>12} {delta:>12} {pct:>9}",
                cell.metric.name(),
            );
            let line = match verdict(cell) {
                std::cmp::Ordering::Greater => paint("31", line),
                std::cmp::Ordering::Less => paint("32", line),
                std::cmp::Ordering::Equal => line,
            };
            let _ = write!(o, "{line}");
            for f in c
                .fired
                .iter()
                .filter(|f| f.row == row.row && f.metric == cell.metric)
            {
                let _ = write!(o, "  {}", paint("1;31", format!("✗ {}", f.rule)));
            }
            o.push('\n');
        }
    }
    for (label, rows) in [
        ("only in base", &c.only_in_base),
        ("only in new", &c.only_in_new),
    ] {
        if !rows.is_empty() {
            let _ = writeln!(o, "\n{label}: {}", rows.join(", "));
        }
    }
    if !c.rules.is_empty() {
        o.push('\n');
        if c.passed {
            let _ = writeln!(
                o,
                "{}",
                paint(
                    "32",
                    format!("{} rule(s) checked, none fired", c.rules.len())
                )
            );
        }
    }
    o
}

/// A markdown table for a pull-request comment.
pub fn render_markdown(c: &Comparison) -> String {
    let md = |s: &str| s.replace('|', "\\|");
    let mut o = String::new();
    let status = if c.rules.is_empty() {
        ""
    } else if c.passed {
        " ✅"
    } else {
        " ❌"
    };
    let _ = writeln!(
        o,
        "### stampede: `{}` vs baseline{status}\n",
        md(&c.new.plan)
    );
    let _ = writeln!(
        o,
        "Base `{}` ({}) · new `{}` ({})\n",
        md(&c.base.run_id),
        md(&c.base.started_at),
        md(&c.new.run_id),
        md(&c.new.started_at)
    );
    o.push_str("| row | metric | base | new | Δ | Δ% |\n|---|---|---:|---:|---:|---:|\n");
    for row in &c.rows {
        for cell in &row.cells {
            let fired = c
                .fired
                .iter()
                .any(|f| f.row == row.row && f.metric == cell.metric);
            let [base, new, delta, pct] = cell.texts();
            let _ = writeln!(
                o,
                "| {} | {} | {base} | {new} | {delta} | {pct}{} |",
                md(&row.row),
                cell.metric.name(),
                if fired { " ❌" } else { "" }
            );
        }
    }
    if !c.rules.is_empty() {
        o.push_str("\n**Rules**\n\n");
        for r in &c.rules {
            let hits: Vec<&Firing> = c.fired.iter().filter(|f| &f.rule == r).collect();
            if hits.is_empty() {
                let _ = writeln!(o, "- ✅ `{}`", md(r));
            } else {
                let rows: Vec<String> = hits.iter().map(|f| md(&f.row)).collect();
                let _ = writeln!(o, "- ❌ `{}` fired on {}", md(r), rows.join(", "));
            }
        }
    }
    for (label, rows) in [
        ("Only in base", &c.only_in_base),
        ("Only in new", &c.only_in_new),
    ] {
        if !rows.is_empty() {
            let _ = writeln!(o, "\n{label}: {}", md(&rows.join(", ")));
        }
    }
    o
}

/// The comparison as JSON (stable keys: `base`, `new`, `rows[].cells[]`, `fired`,
/// `passed`).
pub fn render_json(c: &Comparison) -> String {
    let mut s = serde_json::to_string_pretty(c).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

/// `stampede compare`: prints the comparison on stdout and each fired rule on stderr;
/// [`Outcome::ThresholdsFailed`] (exit 99) when a rule fired, a usage error (exit 2) for
/// a bad rule, format or file.
pub fn command(args: crate::cli::CompareArgs) -> Result<Outcome, Failure> {
    if args.fail_on.len() > MAX_RULES {
        return Err(Failure::usage(format!(
            "{} --fail-on rules; the limit is {MAX_RULES}",
            args.fail_on.len()
        )));
    }
    let rules = args
        .fail_on
        .iter()
        .map(|r| Rule::parse(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let format = args.format.as_str();
    if !matches!(format, "table" | "text" | "markdown" | "md" | "json") {
        return Err(Failure::usage(format!(
            "--format {format}: expected table, markdown or json"
        )));
    }
    let base = load(&args.base).map_err(Failure::usage)?;
    let new = load(&args.new).map_err(Failure::usage)?;
    let c = compare(&base, &new, &rules).map_err(Failure::usage)?;
    let text = match format {
        "markdown" | "md" => render_markdown(&c),
        "json" => render_json(&c),
        _ => {
            use std::io::IsTerminal;
            let color = std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            render_table(&c, color)
        }
    };
    print!("{text}");
    for f in &c.fired {
        eprintln!("{}", f.message);
    }
    if c.passed {
        Ok(Outcome::Success)
    } else {
        eprintln!(
            "{} rule firing(s); exit code {}",
            c.fired.len(),
            crate::cli::EXIT_THRESHOLDS_FAILED
        );
        Ok(Outcome::ThresholdsFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: u64, failed: u64, rps: f64, p99: u64) -> RowStats {
        RowStats {
            requests,
            failed,
            rps,
            latency_us: RowLatency {
                p50: p99 / 4,
                p95: p99 / 2,
                p99,
                ..Default::default()
            },
        }
    }

    fn run(id: &str, total: RowStats, login: RowStats) -> RunFile {
        RunFile {
            schema_version: SUMMARY_SCHEMA_VERSION,
            run_id: id.into(),
            plan: "shop".into(),
            started_at: "2026-12-05T22:00:00Z".into(),
            duration_s: 10.0,
            totals: total,
            requests: [("login".to_string(), login)].into(),
            flows: [("browse".to_string(), stats(10, 0, 1.0, 1000))].into(),
        }
    }

    #[test]
    fn rule_grammar() {
        let r = Rule::parse("p99 > +10%").unwrap();
        assert_eq!(
            (r.metric, &r.scope, r.op, r.change),
            (Metric::P99, &Scope::Every, Op::Gt, Change::Percent(10.0))
        );
        let r = Rule::parse(" error_rate{flow=purchase} >= 0.5pp ").unwrap();
        assert_eq!(r.scope, Scope::Flow("purchase".into()));
        assert_eq!((r.op, r.change), (Op::Ge, Change::Points(0.5)));
        let r = Rule::parse("rps{total} < -5%").unwrap();
        assert_eq!(
            (r.scope.clone(), r.op, r.change),
            (Scope::Total, Op::Lt, Change::Percent(-5.0))
        );
        let r = Rule::parse("p95{name=add to cart} > +20ms").unwrap();
        assert_eq!(r.scope, Scope::Request("add to cart".into()));
        assert_eq!(r.change, Change::Absolute(20_000.0));
        assert_eq!(
            Rule::parse("max<=-1.5s").unwrap().change,
            Change::Absolute(-1_500_000.0)
        );
        assert_eq!(
            Rule::parse("rps < -50").unwrap().change,
            Change::Absolute(-50.0)
        );
        assert_eq!(
            Rule::parse("p99.9{request=x} > 0%").unwrap().metric,
            Metric::P999
        );
    }

    #[test]
    fn rule_errors_name_the_rule_and_the_problem() {
        let e = |s: &str| Rule::parse(s).unwrap_err();
        assert_eq!(
            e("p99 10%"),
            "--fail-on 'p99 10%': expected METRIC OP CHANGE, e.g. 'p99 > +10%'"
        );
        assert_eq!(
            e("p98 > 10%"),
            "--fail-on 'p98 > 10%': unknown metric `p98` (rps, requests, error_rate, mean, p50, p90, p95, p99, p999 or max)"
        );
        assert_eq!(
            e("p99{flow=x > 1%"),
            "--fail-on 'p99{flow=x > 1%': a scope is closed with `}`"
        );
        assert_eq!(
            e("p99{node=a} > 1%"),
            "--fail-on 'p99{node=a} > 1%': the scope is {total}, {flow=NAME} or {name=REQUEST}"
        );
        assert_eq!(
            e("p99 >"),
            "--fail-on 'p99 >': the change is missing, e.g. +10%"
        );
        assert_eq!(
            e("rps < lots"),
            "--fail-on 'rps < lots': `lots` is not a change such as +10%, +0.5pp or +20ms"
        );
        assert_eq!(
            e("p99 > +0.5pp"),
            "--fail-on 'p99 > +0.5pp': `pp` (percentage points) is for error_rate only"
        );
        assert_eq!(
            e("error_rate > 1"),
            "--fail-on 'error_rate > 1': an error_rate change is in percentage points (+0.5pp) or relative (+10%)"
        );
        assert!(e("p99 > +20 parsecs").starts_with(
            "--fail-on 'p99 > +20 parsecs': a latency change is a percentage (+10%) or a duration (+20ms): "
        ));
        assert_eq!(
            e("rps < inf%"),
            "--fail-on 'rps < inf%': the change must be a finite number"
        );
    }

    #[test]
    fn rules_fire_on_the_rows_that_regressed_only() {
        let base = run("b", stats(1000, 0, 100.0, 4000), stats(100, 0, 10.0, 4000));
        let new = run("n", stats(1000, 10, 96.0, 4200), stats(100, 0, 10.0, 9000));
        let rules: Vec<Rule> = [
            "p99 > +10%",
            "error_rate{total} > +0.5pp",
            "rps < -5%",
            "p99{total} > +10%",
            "p50 > +1s",
        ]
        .iter()
        .map(|r| Rule::parse(r).unwrap())
        .collect();
        let c = compare(&base, &new, &rules).unwrap();
        let fired: Vec<(&str, &str)> = c
            .fired
            .iter()
            .map(|f| (f.rule.as_str(), f.row.as_str()))
            .collect();
        assert_eq!(
            fired,
            vec![
                ("error_rate{total} > +0.5pp", "total"),
                ("p99 > +10%", "request login")
            ]
        );
        assert!(!c.passed);
        assert_eq!(
            c.fired[1].message,
            "rule 'p99 > +10%' fired on request login: p99 4.00ms -> 9.00ms (+5.00ms, +125.0%)"
        );
        let md = render_markdown(&c);
        assert!(
            md.contains("| request login | p99 | 4.00ms | 9.00ms | +5.00ms | +125.0% ❌ |"),
            "{md}"
        );
        assert!(md.contains("- ✅ `rps < -5%`"), "{md}");
        let table = render_table(&c, false);
        assert!(!table.contains('\x1b'), "no colour unless asked");
        assert!(render_table(&c, true).contains("\x1b[1;31m✗ p99 > +10%"));
        let j: serde_json::Value = serde_json::from_str(&render_json(&c)).unwrap();
        assert_eq!(j["passed"], false);
        assert_eq!(j["fired"][1]["row"], "request login");
    }

    #[test]
    fn a_scoped_rule_on_a_missing_row_is_an_error_not_a_pass() {
        let base = run("b", stats(1, 0, 1.0, 1), stats(1, 0, 1.0, 1));
        let new = run("n", stats(1, 0, 1.0, 1), stats(1, 0, 1.0, 1));
        let r = Rule::parse("p99{name=checkout} > +10%").unwrap();
        assert_eq!(
            compare(&base, &new, &[r]).unwrap_err(),
            "--fail-on 'p99{name=checkout} > +10%': the base run (b) has no request `checkout`"
        );
    }

    #[test]
    fn from_zero_is_an_infinite_rise() {
        let r = Rule::parse("error_rate > +50%").unwrap();
        assert!(r.fires(0.0, 0.1));
        assert!(!r.fires(0.0, 0.0));
        assert_eq!(relative(0.0, 0.0), 0.0);
    }

    #[test]
    fn files_that_are_not_summaries_get_one_clear_error() {
        let e = |b: &str| parse("x.json", b.as_bytes()).unwrap_err();
        assert!(e("{").starts_with("x.json: not a stampede JSON summary (the file `stampede run --out json=FILE` writes): invalid JSON: "));
        assert!(e("[1]").ends_with(": the top level is not an object"));
        assert!(e("{\"log\": 1}").ends_with(": it has no `run_id`"));
        assert_eq!(
            e("{\"run_id\": \"r\", \"totals\": {}, \"schema_version\": 99}"),
            format!("x.json: summary schema version 99 is newer than this stampede reads ({SUMMARY_SCHEMA_VERSION}); compare with the stampede that wrote it")
        );
        assert!(e("{\"run_id\": \"r\", \"totals\": {}}").contains("missing field"));
    }
}
