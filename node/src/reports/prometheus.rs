//! Prometheus text exposition (format 0.0.4) of a run's counters and histograms, per
//! node and per (scenario, flow, step), for `/metrics`.
//!
//! Every sample is one node's own count, never a merged one, so `sum()` over nodes in
//! Prometheus is exact and nothing is counted twice; the latency histogram is a classic
//! bucketed histogram built from the node's HdrHistogram (cumulative counts at fixed
//! bounds), so percentiles are computed by Prometheus from buckets, never averaged.
//! Node labels (e.g. `region`) are copied onto every series as `label_<key>`.
//! This module only formats what [`LiveRun`] holds; it must not measure or lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use stampede_protocol::named::{Kind, Named};
use stampede_protocol::snapshot::{ErrorClass, Hist, Layout, Metrics};

use crate::reports::live::LiveRun;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is added.
pub const BUCKETS_S: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// A valid label name from a node label key: `[a-zA-Z_][a-zA-Z0-9_]*`, prefixed `label_`.
pub fn label_name(key: &str) -> String {
    let mut o = String::from("label_");
    for c in key.chars() {
        o.push(if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        });
    }
    o
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    lines: Vec<String>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut o = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(o, "{k}=\"{}\"", escape_label(v));
    }
    o.push('}');
    o
}

/// A float in the exposition format (Go-style: `+Inf`, no exponent surprises).
fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Cumulative counts at each of [`BUCKETS_S`] and the sum of values in seconds.
pub fn buckets(h: &Hist) -> (Vec<u64>, u64, f64) {
    let mut per = vec![0u64; BUCKETS_S.len()];
    let mut sum_us = 0f64;
    let mut count = 0u64;
    for v in h.0.iter_recorded() {
        let n = v.count_at_value();
        // The bucket's highest equivalent value: a value is never counted below its bound.
        let hi = v.value_iterated_to();
        count += n;
        sum_us += h.0.median_equivalent(hi) as f64 * n as f64;
        if let Some(i) = BUCKETS_S.iter().position(|b| (hi as f64) <= b * 1e6) {
            per[i] += n;
        }
    }
    let mut acc = 0;
    for c in per.iter_mut() {
        acc += *c;
        *c = acc;
    }
    (per, count, sum_us / 1e6)
}

/// The run's families, appended to `out`.
pub fn run_text(run: &LiveRun, out: &mut String) {
    let Some(layout) = run.layout.as_ref() else {
        return;
    };
    let fam = |name, kind, help| Family {
        name,
        kind,
        help,
        lines: Vec::new(),
    };
    let mut info = fam(
        "stampede_run_info",
        "gauge",
        "The run /metrics describes (the newest still going, else the newest).",
    );
    info.lines.push(format!(
        "stampede_run_info{} 1",
        labels(&[
            ("run", &run.run_id),
            ("plan", &run.plan),
            ("phase", &run.phase),
            ("leader", &run.leader),
        ])
    ));
    let mut req = fam(
        "stampede_requests_total",
        "counter",
        "Requests sent, per node and step.",
    );
    let mut fail = fam(
        "stampede_request_failures_total",
        "counter",
        "Requests that failed (any error class), per node and step.",
    );
    let mut errs = fam(
        "stampede_request_errors_total",
        "counter",
        "Failed requests by error class, per node and step.",
    );
    let mut checks = fam(
        "stampede_checks_total",
        "counter",
        "Checks evaluated, by result, per node and step.",
    );
    let mut bytes = fam(
        "stampede_received_bytes_total",
        "counter",
        "Response bytes received, per node and step.",
    );
    let mut dur = fam(
        "stampede_request_duration_seconds",
        "histogram",
        "Request latency from the intended start (no coordinated omission), per node and step.",
    );
    let mut its = fam(
        "stampede_iterations_total",
        "counter",
        "Iterations completed, per node and scenario.",
    );
    let mut dropped = fam(
        "stampede_dropped_iterations_total",
        "counter",
        "Iterations that could not start (every VU busy), per node and scenario.",
    );
    let mut vus = fam(
        "stampede_active_vus",
        "gauge",
        "VUs active in the node's latest reported second.",
    );
    let mut lag = fam(
        "stampede_schedule_lag_p99_seconds",
        "gauge",
        "p99 of how late iterations started in the node's latest reported second.",
    );

    // Named metrics (WebSocket, gRPC, ...): one family each, only those recorded.
    let mut named: BTreeMap<Named, Vec<String>> = BTreeMap::new();

    let member_labels: BTreeMap<&str, &BTreeMap<String, String>> = run
        .members
        .iter()
        .map(|m| (m.name.as_str(), &m.labels))
        .collect();
    for (node, packed) in &run.node_totals {
        let Some(m) = packed.unpack() else { continue };
        let m = &m;
        let node_labels: Vec<(String, String)> = member_labels
            .get(node.as_str())
            .map(|l| l.iter().map(|(k, v)| (label_name(k), v.clone())).collect())
            .unwrap_or_default();
        let base: Vec<(&str, &str)> = [("run", run.run_id.as_str()), ("node", node.as_str())]
            .into_iter()
            .chain(node_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect();
        series_lines(
            layout,
            m,
            &base,
            [
                &mut req,
                &mut fail,
                &mut errs,
                &mut checks,
                &mut bytes,
                &mut dur,
            ],
        );
        named_lines(layout, m, &base, &mut named);
        for (si, sc) in m.scenarios.iter().enumerate() {
            let sname = layout.scenarios.get(si).map(String::as_str).unwrap_or("");
            let mut l = base.clone();
            l.push(("scenario", sname));
            its.lines
                .push(format!("{}{} {}", its.name, labels(&l), sc.iterations));
            dropped
                .lines
                .push(format!("{}{} {}", dropped.name, labels(&l), sc.dropped));
        }
        if let Some(p) = run.per_node.get(node).and_then(|t| t.back()) {
            vus.lines
                .push(format!("{}{} {}", vus.name, labels(&base), p.vus));
            lag.lines.push(format!(
                "{}{} {}",
                lag.name,
                labels(&base),
                num(p.schedule_lag_p99_us as f64 / 1e6)
            ));
        }
    }
    for f in [
        info, req, fail, errs, checks, bytes, dur, its, dropped, vus, lag,
    ] {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for l in f.lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    for (n, lines) in named {
        let (name, kind) = named_family(n);
        let _ = writeln!(out, "# HELP {name} {}", n.help());
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
}

/// The family of a named metric: `stampede_ws_msg_rtt_seconds` (histogram),
/// `stampede_ws_msgs_sent_total` (counter).
pub fn named_family(n: Named) -> (String, &'static str) {
    match n.kind() {
        Kind::Duration => (format!("stampede_{}_seconds", n.name()), "histogram"),
        Kind::Counter => (format!("stampede_{}_total", n.name()), "counter"),
    }
}

fn named_lines(
    layout: &Layout,
    m: &Metrics,
    base: &[(&str, &str)],
    out: &mut BTreeMap<Named, Vec<String>>,
) {
    for (i, st) in m.series.iter().enumerate() {
        let Some(k) = layout.series.get(i) else {
            continue;
        };
        if st.named.is_empty() {
            continue;
        }
        let mut l: Vec<(&str, &str)> = base.to_vec();
        l.push((
            "scenario",
            layout.scenarios.get(k.scenario).map_or("", String::as_str),
        ));
        l.push(("flow", layout.flows.get(k.flow).map_or("", String::as_str)));
        l.push(("step", &k.step_name));
        let ls = labels(&l);
        for (n, c) in st.named.counters() {
            let (name, _) = named_family(n);
            out.entry(n).or_default().push(format!("{name}{ls} {c}"));
        }
        for (n, h) in st.named.hists() {
            let (name, _) = named_family(n);
            hist_lines(&name, &l, h, out.entry(n).or_default());
        }
    }
}

fn series_lines(layout: &Layout, m: &Metrics, base: &[(&str, &str)], fams: [&mut Family; 6]) {
    let [req, fail, errs, checks, bytes, dur] = fams;
    for (i, st) in m.series.iter().enumerate() {
        let Some(k) = layout.series.get(i) else {
            continue;
        };
        let sc = layout.scenarios.get(k.scenario).map(String::as_str);
        let fl = layout.flows.get(k.flow).map(String::as_str);
        let mut l: Vec<(&str, &str)> = base.to_vec();
        l.push(("scenario", sc.unwrap_or("")));
        l.push(("flow", fl.unwrap_or("")));
        l.push(("step", &k.step_name));
        let ls = labels(&l);
        req.lines.push(format!("{}{ls} {}", req.name, st.requests));
        fail.lines.push(format!("{}{ls} {}", fail.name, st.failed));
        bytes
            .lines
            .push(format!("{}{ls} {}", bytes.name, st.bytes_received));
        for c in ErrorClass::ALL {
            let n = st.errors[c as usize];
            if n > 0 {
                let mut le = l.clone();
                le.push(("class", c.name()));
                errs.lines.push(format!("{}{} {n}", errs.name, labels(&le)));
            }
        }
        for (result, n) in [("passed", st.checks_passed), ("failed", st.checks_failed)] {
            let mut lc = l.clone();
            lc.push(("result", result));
            checks
                .lines
                .push(format!("{}{} {n}", checks.name, labels(&lc)));
        }
        hist_lines(dur.name, &l, &st.latency, &mut dur.lines);
    }
}

/// A histogram's `_bucket`, `_sum` and `_count` lines under labels `l`.
fn hist_lines(name: &str, l: &[(&str, &str)], h: &Hist, lines: &mut Vec<String>) {
    let (cum, count, sum) = buckets(h);
    for (b, c) in BUCKETS_S.iter().zip(&cum) {
        let le = num(*b);
        let mut lb = l.to_vec();
        lb.push(("le", &le));
        lines.push(format!("{name}_bucket{} {c}", labels(&lb)));
    }
    let mut lb = l.to_vec();
    lb.push(("le", "+Inf"));
    lines.push(format!("{name}_bucket{} {count}", labels(&lb)));
    let ls = labels(l);
    lines.push(format!("{name}_sum{ls} {}", num(sum)));
    lines.push(format!("{name}_count{ls} {count}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::snapshot::SeriesKey;

    fn layout() -> Layout {
        Layout {
            scenarios: vec!["s".into()],
            flows: vec!["f".into()],
            flow_slots: vec![(0, 0)],
            series: vec![SeriesKey {
                scenario: 0,
                flow: 0,
                step: 0,
                step_name: "get \"x\"".into(),
            }],
        }
    }

    #[test]
    fn buckets_are_cumulative_and_exact_at_bounds() {
        let mut h = Hist::default();
        for v in [100, 900, 1000, 30_000, 2_000_000, 100_000_000] {
            h.record(v);
        }
        let (cum, count, sum) = buckets(&h);
        assert_eq!(count, 6);
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(cum[0], 1); // ≤ 0.5 ms
        assert_eq!(cum[1], 3); // ≤ 1 ms (1000 µs counts at its bound)
        assert_eq!(cum[BUCKETS_S.len() - 1], 5); // 100 s is only in +Inf
        assert!((sum - 102.032).abs() < 0.2, "{sum}");
    }

    #[test]
    fn families_are_declared_once_and_labels_escaped() {
        let mut run = LiveRun::new("r1", "p");
        run.layout = Some(layout());
        let mut m = Metrics::new(&layout());
        m.series[0].requests = 3;
        m.series[0].failed = 1;
        m.series[0].errors[ErrorClass::Http5xx as usize] = 1;
        m.series[0].errors[ErrorClass::GrpcUnavailable as usize] = 2;
        m.series[0].latency.record(2000);
        m.series[0].named.record(Named::WsMsgRtt, 700);
        m.series[0].named.count(Named::WsMsgsSent, 4);
        m.scenarios[0].iterations = 3;
        let packed = crate::reports::live::PackedMetrics::of(&m);
        run.node_totals.insert("a".into(), packed.clone());
        run.node_totals.insert("b".into(), packed);
        run.members.push(crate::reports::live::LiveMember {
            id: "x".into(),
            name: "a".into(),
            labels: [("re-gion".to_string(), "eu".to_string())].into(),
            status: "running".into(),
        });
        let mut out = String::new();
        run_text(&run, &mut out);
        assert_eq!(out.matches("# TYPE stampede_requests_total ").count(), 1);
        assert!(out.contains(
            "stampede_requests_total{run=\"r1\",node=\"a\",label_re_gion=\"eu\",scenario=\"s\",flow=\"f\",step=\"get \\\"x\\\"\"} 3\n"
        ), "{out}");
        assert!(out.contains("class=\"http_5xx\"} 1\n"));
        assert!(out.contains("class=\"grpc_unavailable\"} 2\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 1\n"));
        assert!(out.contains("le=\"0.0025\"} 1\n"));
        assert_eq!(
            out.matches("# TYPE stampede_ws_msg_rtt_seconds histogram")
                .count(),
            1
        );
        assert_eq!(
            out.matches("# TYPE stampede_ws_msgs_sent_total counter")
                .count(),
            1
        );
        assert!(out.contains("stampede_ws_msgs_sent_total{run=\"r1\",node=\"b\",scenario=\"s\",flow=\"f\",step=\"get \\\"x\\\"\"} 4\n"), "{out}");
        assert!(out.contains("stampede_ws_msg_rtt_seconds_bucket{run=\"r1\",node=\"b\",scenario=\"s\",flow=\"f\",step=\"get \\\"x\\\"\",le=\"0.001\"} 1\n"), "{out}");
        assert!(!out.contains("ws_connecting"));
    }
}
