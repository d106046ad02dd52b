//! What a person sees in the terminal: a live progress line while a run goes, and the
//! final summary table.
//!
//! Output goes to stderr (progress) and stdout (the summary), so `--out json=-` style
//! piping and logs stay clean. This module only formats; it must not compute
//! measurements (they come from `aggregate` and `report`).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::reports::aggregate::TimelinePoint;
use stampede_protocol::named::{Kind, Named};

use crate::reports::summary::{Latency, NamedStat, Stats, Summary};

/// Draws the live line: on a terminal it rewrites itself; elsewhere it prints a plain
/// line every few seconds so CI logs show progress without flooding.
pub struct Progress {
    tty: bool,
    quiet: bool,
    last_plain: Option<u64>,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            quiet,
            last_plain: None,
        }
    }

    pub fn update(&mut self, elapsed: Duration, total: Duration, p: &TimelinePoint, nodes: usize) {
        if self.quiet {
            return;
        }
        let line = format!(
            "{} / {}  {:>8.0} req/s  p50 {:>8}  p99 {:>8}  errors {:>6}  VUs {:>5}  nodes {}",
            clock(elapsed),
            clock(total),
            p.rps,
            us(p.p50_us),
            us(p.p99_us),
            p.errors,
            p.vus,
            nodes
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else if self.last_plain.is_none_or(|t| elapsed.as_secs() >= t + 5) {
            self.last_plain = Some(elapsed.as_secs());
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Says one line plainly, even with `--quiet` (what makes the numbers meaningless
    /// must not be missed); the live line is redrawn after it on the next update.
    pub fn say(&mut self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty && !self.quiet {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.tty && !self.quiet {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// A latency in microseconds, in the unit a person reads fastest.
pub fn us(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1}s", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.2}ms", v as f64 / 1e3)
    } else {
        format!("{v}µs")
    }
}

/// The final summary table.
pub fn summary_table(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nrun {}  plan \"{}\"  started {}  {:.1}s",
        s.run_id, s.plan, s.started_at, s.duration_s
    );
    // What makes every number below meaningless comes first.
    for line in headlines(s) {
        let _ = writeln!(out, "\n{line}");
    }
    let _ = writeln!(
        out,
        "\n{:<28} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "request", "count", "fail%", "req/s", "p50", "p90", "p99", "p99.9", "max"
    );
    let row = |out: &mut String, name: &str, st: &Stats| {
        let l: &Latency = &st.latency_us;
        let fail = if st.requests == 0 {
            0.0
        } else {
            st.failed as f64 * 100.0 / st.requests as f64
        };
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>6.2}% {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9}",
            truncate(name, 28),
            st.requests,
            fail,
            st.rps,
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max)
        );
    };
    for (name, st) in &s.requests {
        row(&mut out, name, st);
    }
    row(&mut out, "TOTAL", &s.totals);
    let t = &s.totals;
    let _ = writeln!(
        out,
        "\niterations {}  dropped {}  received {}  sent {}  checks {}/{} passed",
        t.iterations,
        t.dropped_iterations,
        bytes(t.bytes_received),
        bytes(t.bytes_sent),
        t.checks.passed,
        t.checks.passed + t.checks.failed
    );
    if !t.errors.is_empty() {
        let list: Vec<String> = t.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "errors: {}", list.join(", "));
    }
    let _ = writeln!(
        out,
        "latency from intended start (p99 {}); service time p99 {}",
        us(t.latency_us.p99),
        us(t.service_time_us.p99)
    );
    named_rows(&mut out, &t.metrics);
    if s.nodes.len() > 1 {
        let _ = writeln!(
            out,
            "\n{:<20} {:<10} {:>10} {:>8} {:>9}",
            "node", "status", "requests", "failed", "p99"
        );
        for n in &s.nodes {
            let _ = writeln!(
                out,
                "{:<20} {:<10} {:>10} {:>8} {:>9}",
                truncate(&n.name, 20),
                n.status,
                n.requests,
                n.failed,
                us(n.stats.latency_us.p99)
            );
        }
    }
    for (label, vals) in &s.by_label {
        for (v, st) in vals {
            let _ = writeln!(
                out,
                "{label}={v}: {} requests, p50 {}, p99 {}",
                st.requests,
                us(st.latency_us.p50),
                us(st.latency_us.p99)
            );
        }
    }
    for e in &s.events {
        let _ = writeln!(
            out,
            "event at {:.1}s: {} {}",
            e.t,
            e.event.kind(),
            event_detail(&e.event)
        );
    }
    if !s.thresholds.is_empty() {
        let _ = writeln!(out, "\nthresholds:");
        for th in &s.thresholds {
            let _ = writeln!(
                out,
                "  {} {} {} (measured {})",
                if th.passed { "PASS" } else { "FAIL" },
                th.metric,
                th.expr,
                if is_duration_key(&th.metric) {
                    us(th.value as u64)
                } else {
                    format!("{}", th.value)
                }
            );
        }
    }
    let g = &s.generator;
    let _ = writeln!(
        out,
        "\ngenerator: cpu {:.0}%, schedule lag p99 {}, dropped iterations {}",
        g.cpu * 100.0,
        us(g.schedule_lag_us.p99),
        g.dropped_iterations
    );
    for w in &g.warnings {
        let _ = writeln!(out, "WARNING: generator saturated: {w}");
    }
    out
}

/// True when a threshold's key (`METRIC{tags}`) names a duration metric.
fn is_duration_key(key: &str) -> bool {
    let name = key.split('{').next().unwrap_or("").trim();
    name == "http_req_duration"
        || name == "http_req_service_time"
        || Named::parse(name).is_some_and(|n| n.kind() == Kind::Duration)
}

/// The totals' named metrics (WebSocket, gRPC, ...): durations with percentiles,
/// counters with count and rate.
fn named_rows(out: &mut String, metrics: &std::collections::BTreeMap<String, NamedStat>) {
    for (name, m) in metrics {
        match m {
            NamedStat::Duration { count, latency_us } => {
                let _ = writeln!(
                    out,
                    "{name}: count {count}, p50 {}, p90 {}, p99 {}, max {}",
                    us(latency_us.p50),
                    us(latency_us.p90),
                    us(latency_us.p99),
                    us(latency_us.max)
                );
            }
            NamedStat::Counter { count, rate } => {
                let _ = writeln!(out, "{name}: {count} ({rate:.1}/s)");
            }
        }
    }
}

/// The events a reader must see before the table: the run only failed, a target was
/// refused, a threshold stopped the run.
pub fn headlines(s: &Summary) -> Vec<String> {
    s.events
        .iter()
        .filter_map(|e| e.event.headline())
        .map(|m| format!("!! {m}"))
        .collect()
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// An event's fields other than its kind, as compact JSON.
pub fn event_detail(e: &stampede_protocol::machine::events::RunEvent) -> String {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("kind");
    }
    v.to_string()
}
