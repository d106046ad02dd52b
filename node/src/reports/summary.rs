//! The run's result: the JSON summary of spec §7 built from a [`RunAggregate`], and the
//! plan's thresholds evaluated against it.
//!
//! Percentiles are read from merged histograms only. This module owns the summary's
//! shape (a fixed contract: extend, never rename); it must not run anything or print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stampede_protocol::named::{Kind, Named};
use stampede_protocol::plan::Plan;
use stampede_protocol::snapshot::{ErrorClass, Hist, Layout, Metrics, SeriesStats};
use stampede_protocol::threshold::{Aggregate, Metric, Threshold};

use crate::reports::aggregate::{RunAggregate, TimelinePoint};

/// The version of the summary's JSON shape, written as `schema_version`: raised when a
/// field changes meaning or goes, not when one is added. Readers (`stampede compare`)
/// refuse a newer one; a summary without it predates the field and is version 1.
pub const SUMMARY_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    pub run_id: String,
    pub plan: String,
    pub started_at: String,
    pub duration_s: f64,
    pub totals: Stats,
    pub requests: BTreeMap<String, Stats>,
    pub flows: BTreeMap<String, Stats>,
    pub scenarios: BTreeMap<String, Stats>,
    pub nodes: Vec<NodeSummary>,
    pub by_label: BTreeMap<String, BTreeMap<String, Stats>>,
    pub timeline: Vec<TimelinePoint>,
    pub thresholds: Vec<ThresholdResult>,
    pub events: Vec<Event>,
    pub generator: Generator,
    /// Spread of the nodes' actual start instants (0 on a single node).
    pub start_skew_us: u64,
    /// The plan as it ran (TOML, with `--set` overrides applied).
    pub plan_source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Stats {
    pub requests: u64,
    pub failed: u64,
    pub iterations: u64,
    pub dropped_iterations: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub rps: f64,
    pub latency_us: Latency,
    pub service_time_us: Latency,
    pub errors: BTreeMap<String, u64>,
    pub checks: Checks,
    /// Metrics of step kinds other than HTTP (`ws_msg_rtt`, ...), only those recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, NamedStat>,
}

/// One named metric in a summary: a duration's count and percentiles (µs), or a
/// counter's count and rate per second.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum NamedStat {
    Duration {
        count: u64,
        #[serde(flatten)]
        latency_us: Latency,
    },
    Counter {
        count: u64,
        rate: f64,
    },
}

/// The named metrics of a series as the summary shows them.
pub fn named_stats(s: &SeriesStats, dur: f64) -> BTreeMap<String, NamedStat> {
    let mut out = BTreeMap::new();
    for (n, h) in s.named.hists() {
        out.insert(
            n.name().to_string(),
            NamedStat::Duration {
                count: h.len(),
                latency_us: Latency::of(h),
            },
        );
    }
    for (n, c) in s.named.counters() {
        out.insert(
            n.name().to_string(),
            NamedStat::Counter {
                count: c,
                rate: ((c as f64 / dur.max(1e-9)) * 10.0).round() / 10.0,
            },
        );
    }
    debug_assert!(out.keys().all(|k| Named::parse(k).is_some()));
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Hist) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |x| h.0.value_at_quantile(x);
        Latency {
            min: h.0.min(),
            mean: (h.0.mean() * 10.0).round() / 10.0,
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: h.0.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Checks {
    pub passed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeSummary {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `completed`, `lost`, ...
    pub status: String,
    pub requests: u64,
    pub failed: u64,
    pub iterations: u64,
    pub stats: Stats,
    /// Process CPU at the node's busiest second, as a fraction of its worker cores.
    pub cpu: f64,
    /// How long after the run's agreed start instant this node's workers passed it, on
    /// the run clock, the origin's (µs; negative only through clock-offset error). Mesh
    /// runs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_late_us: Option<i64>,
    /// This node's clock offset to the leader's as the run measured it (µs, leader −
    /// local). Mesh runs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_us: Option<i64>,
    /// The node's own seconds.
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThresholdResult {
    pub metric: String,
    pub expr: String,
    /// The measured value: microseconds for durations, a fraction for rates.
    pub value: f64,
    pub passed: bool,
}

/// Something that happened to the run, at `t` seconds of run time: one of the
/// protocol's typed events, `{"t", "kind", ...}` in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Seconds since the run started.
    pub t: f64,
    #[serde(flatten)]
    pub event: stampede_protocol::machine::events::RunEvent,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Generator {
    /// Process CPU use of the busiest node, as a fraction of the cores it used (0..1).
    pub cpu: f64,
    pub schedule_lag_us: LagSummary,
    pub dropped_iterations: u64,
    /// True when the generator, not the target, may be what the numbers describe.
    pub saturated: bool,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LagSummary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// What is known about a node besides its measurements.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub status: String,
    /// Process CPU (fraction of the worker cores) at its highest second.
    pub cpu: f64,
    /// See [`NodeSummary::start_late_us`].
    pub start_late_us: Option<i64>,
    /// See [`NodeSummary::clock_offset_us`].
    pub clock_offset_us: Option<i64>,
}

/// Inputs to a summary besides the aggregate.
pub struct SummaryInput<'a> {
    pub run_id: &'a str,
    pub plan: &'a Plan,
    pub started_at_unix_ms: u64,
    pub duration_s: f64,
    pub nodes: &'a [NodeInfo],
    pub events: Vec<Event>,
    pub start_skew_us: u64,
    pub plan_source: &'a str,
}

/// A generator whose CPU stays above this share of its cores is saturated.
pub const CPU_SATURATED: f64 = 0.9;
/// A generator that starts iterations later than this (p99) is saturated.
pub const LAG_SATURATED_US: u64 = 10_000;

pub fn build(agg: &RunAggregate, input: SummaryInput<'_>) -> Summary {
    let layout = agg.layout();
    let dur = input.duration_s.max(1e-9);
    let stats_of = |m: &Metrics, pick: &dyn Fn(usize) -> bool, iterations: u64, dropped: u64| {
        let mut s = SeriesStats::default();
        for (i, st) in m.series.iter().enumerate() {
            if pick(i) {
                s.add(st);
            }
        }
        stats(&s, iterations, dropped, dur)
    };
    let all = |_: usize| true;
    let run_totals = agg.metrics(&agg.totals);
    let iterations: u64 = run_totals.scenarios.iter().map(|s| s.iterations).sum();
    let dropped: u64 = run_totals.scenarios.iter().map(|s| s.dropped).sum();
    let totals = stats_of(&run_totals, &all, iterations, dropped);

    let mut requests = BTreeMap::new();
    let mut names: Vec<&str> = layout.series.iter().map(|k| k.step_name.as_str()).collect();
    names.dedup();
    for name in names {
        if requests.contains_key(name) {
            continue;
        }
        let pick = |i: usize| layout.series[i].step_name == name;
        // Iterations of the flows this request appears in.
        let its: u64 = layout
            .flow_slots
            .iter()
            .enumerate()
            .filter(|(_, (sc, f))| {
                layout
                    .series
                    .iter()
                    .any(|k| k.scenario == *sc && k.flow == *f && k.step_name == name)
            })
            .map(|(slot, _)| run_totals.flow_iterations[slot])
            .sum();
        requests.insert(name.to_string(), stats_of(&run_totals, &pick, its, 0));
    }
    let mut flows = BTreeMap::new();
    for (fi, fname) in layout.flows.iter().enumerate() {
        let pick = |i: usize| layout.series[i].flow == fi;
        let its: u64 = layout
            .flow_slots
            .iter()
            .enumerate()
            .filter(|(_, (_, f))| *f == fi)
            .map(|(slot, _)| run_totals.flow_iterations[slot])
            .sum();
        flows.insert(fname.clone(), stats_of(&run_totals, &pick, its, 0));
    }
    let mut scenarios = BTreeMap::new();
    for (si, sname) in layout.scenarios.iter().enumerate() {
        let pick = |i: usize| layout.series[i].scenario == si;
        let sc = &run_totals.scenarios[si];
        scenarios.insert(
            sname.clone(),
            stats_of(&run_totals, &pick, sc.iterations, sc.dropped),
        );
    }

    let mut nodes = Vec::new();
    let mut by_label: BTreeMap<String, BTreeMap<String, Metrics>> = BTreeMap::new();
    let mut cpu: f64 = 0.0;
    for (id, nt) in &agg.nodes {
        let info = input
            .nodes
            .iter()
            .find(|n| n.id == *id)
            .cloned()
            .unwrap_or_else(|| NodeInfo {
                id: id.clone(),
                name: id.clone(),
                status: "completed".into(),
                ..Default::default()
            });
        cpu = cpu.max(info.cpu);
        let node_totals = agg.metrics(&nt.totals);
        let its: u64 = node_totals.scenarios.iter().map(|s| s.iterations).sum();
        let dr: u64 = node_totals.scenarios.iter().map(|s| s.dropped).sum();
        let st = stats_of(&node_totals, &all, its, dr);
        for (k, v) in &info.labels {
            let m = by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_insert_with(|| Metrics::new(layout));
            let _ = m.merge(&node_totals);
        }
        nodes.push(NodeSummary {
            id: info.id.clone(),
            name: info.name.clone(),
            labels: info.labels.clone(),
            status: info.status.clone(),
            requests: st.requests,
            failed: st.failed,
            iterations: st.iterations,
            stats: st,
            cpu: (info.cpu * 1000.0).round() / 1000.0,
            start_late_us: info.start_late_us,
            clock_offset_us: info.clock_offset_us,
            timeline: agg.report_node_timeline(id),
        });
    }
    let by_label = by_label
        .into_iter()
        .map(|(k, vals)| {
            let vals = vals
                .into_iter()
                .map(|(v, m)| {
                    let its = m.scenarios.iter().map(|s| s.iterations).sum();
                    let dr = m.scenarios.iter().map(|s| s.dropped).sum();
                    (v, stats_of(&m, &all, its, dr))
                })
                .collect();
            (k, vals)
        })
        .collect();

    let mut lag = Hist::default();
    for s in &run_totals.scenarios {
        lag.add(&s.schedule_lag);
    }
    let lag = LagSummary {
        p50: if lag.is_empty() {
            0
        } else {
            lag.0.value_at_quantile(0.5)
        },
        p99: if lag.is_empty() {
            0
        } else {
            lag.0.value_at_quantile(0.99)
        },
        max: lag.0.max(),
    };
    let mut warnings = Vec::new();
    for n in nodes.iter().filter(|n| n.cpu >= CPU_SATURATED) {
        warnings.push(format!(
            "node {}: generator CPU reached {:.0}% of its cores: its numbers may describe the generator, not the target",
            n.name,
            n.cpu * 100.0
        ));
    }
    if lag.p99 > LAG_SATURATED_US {
        warnings.push(format!(
            "iterations started up to {:.1} ms late (p99 schedule lag): the generator could not keep the schedule",
            lag.p99 as f64 / 1000.0
        ));
    }
    let generator = Generator {
        cpu: (cpu * 1000.0).round() / 1000.0,
        schedule_lag_us: lag,
        dropped_iterations: dropped,
        saturated: !warnings.is_empty(),
        warnings,
    };

    let thresholds = input
        .plan
        .thresholds
        .iter()
        .map(|t| evaluate(t, agg, input.nodes, dur))
        .collect();

    Summary {
        schema_version: SUMMARY_SCHEMA_VERSION,
        run_id: input.run_id.to_string(),
        plan: input.plan.name.clone(),
        started_at: iso8601(input.started_at_unix_ms),
        duration_s: (input.duration_s * 1000.0).round() / 1000.0,
        totals,
        requests,
        flows,
        scenarios,
        nodes,
        by_label,
        timeline: agg.report_timeline(),
        thresholds,
        events: input.events,
        generator,
        start_skew_us: input.start_skew_us,
        plan_source: input.plan_source.to_string(),
    }
}

fn schema_v1() -> u32 {
    1
}

fn stats(s: &SeriesStats, iterations: u64, dropped: u64, dur: f64) -> Stats {
    let mut errors = BTreeMap::new();
    for c in ErrorClass::ALL {
        let n = s.errors[c as usize];
        if n > 0 {
            errors.insert(c.name().to_string(), n);
        }
    }
    Stats {
        requests: s.requests,
        failed: s.failed,
        iterations,
        dropped_iterations: dropped,
        bytes_received: s.bytes_received,
        bytes_sent: s.bytes_sent,
        rps: ((s.requests as f64 / dur) * 10.0).round() / 10.0,
        latency_us: Latency::of(&s.latency),
        service_time_us: Latency::of(&s.service),
        errors,
        checks: Checks {
            passed: s.checks_passed,
            failed: s.checks_failed,
        },
        metrics: named_stats(s, dur),
    }
}

/// Evaluates one threshold over the series and nodes its tags select.
pub fn evaluate(
    t: &Threshold,
    agg: &RunAggregate,
    nodes: &[NodeInfo],
    dur: f64,
) -> ThresholdResult {
    let layout = agg.layout();
    let f = &t.filter;
    // Which metrics to read: all nodes, or only those the node/label tags name.
    let node_filtered = f.node.is_some() || f.label.is_some();
    let merged = if node_filtered {
        let mut merged = Metrics::new(layout);
        for (id, nt) in &agg.nodes {
            let info = nodes.iter().find(|n| n.id == *id);
            let name_ok = f
                .node
                .as_ref()
                .is_none_or(|want| info.is_some_and(|i| i.name == *want) || id == want);
            let label_ok = f
                .label
                .as_ref()
                .is_none_or(|(k, v)| info.is_some_and(|i| i.labels.get(k) == Some(v)));
            if name_ok && label_ok {
                let _ = merged.merge(&agg.metrics(&nt.totals));
            }
        }
        merged
    } else {
        agg.metrics(&agg.totals)
    };
    let source = &merged;
    let series_ok = |i: usize| series_matches(layout, i, t);
    let mut s = SeriesStats::default();
    for (i, st) in source.series.iter().enumerate() {
        if series_ok(i) {
            s.add(st);
        }
    }
    let scen_ok = |si: usize| {
        f.scenario
            .as_ref()
            .is_none_or(|n| layout.scenarios[si] == *n)
    };
    let (mut its, mut dropped) = (0u64, 0u64);
    for (slot, (sc, fl)) in layout.flow_slots.iter().enumerate() {
        if scen_ok(*sc) && f.flow.as_ref().is_none_or(|n| layout.flows[*fl] == *n) {
            its += source.flow_iterations[slot];
        }
    }
    for (si, st) in source.scenarios.iter().enumerate() {
        if scen_ok(si) {
            dropped += st.dropped;
        }
    }
    let e = &t.expr;
    let hist_value = |h: &Hist| -> f64 {
        if h.is_empty() {
            return 0.0;
        }
        match e.aggregate {
            Aggregate::Percentile => h.0.value_at_quantile(e.percentile / 100.0) as f64,
            Aggregate::Avg => h.0.mean(),
            Aggregate::Min => h.0.min() as f64,
            Aggregate::Max => h.0.max() as f64,
            Aggregate::Med => h.0.value_at_quantile(0.5) as f64,
            Aggregate::Rate | Aggregate::Count => h.len() as f64,
        }
    };
    let count_value = |n: u64| -> f64 {
        match e.aggregate {
            Aggregate::Rate => n as f64 / dur,
            _ => n as f64,
        }
    };
    let fraction = |num: u64, den: u64| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let value = match t.metric {
        Metric::HttpReqDuration => hist_value(&s.latency),
        Metric::HttpReqServiceTime => hist_value(&s.service),
        Metric::HttpReqFailed => {
            let failed = f.error.map_or(s.failed, |c| s.errors[c as usize]);
            match e.aggregate {
                Aggregate::Count => failed as f64,
                _ => fraction(failed, s.requests),
            }
        }
        Metric::HttpReqs => count_value(s.requests),
        Metric::Checks => match e.aggregate {
            Aggregate::Count => s.checks_passed as f64,
            _ => fraction(s.checks_passed, s.checks_passed + s.checks_failed),
        },
        Metric::Iterations => count_value(its),
        Metric::DroppedIterations => count_value(dropped),
        Metric::Named(n) => match n.kind() {
            Kind::Duration => s.named.hist(n).map_or(0.0, hist_value),
            Kind::Counter => count_value(s.named.counter(n)),
        },
    };
    ThresholdResult {
        metric: t.key.clone(),
        expr: t.source.clone(),
        value: (value * 1e6).round() / 1e6,
        passed: e.op.holds(value, e.value),
    }
}

fn series_matches(layout: &Layout, i: usize, t: &Threshold) -> bool {
    let k = &layout.series[i];
    let f = &t.filter;
    f.scenario
        .as_ref()
        .is_none_or(|n| layout.scenarios[k.scenario] == *n)
        && f.flow.as_ref().is_none_or(|n| layout.flows[k.flow] == *n)
        && f.step.as_ref().is_none_or(|n| k.step_name == *n)
}

/// `2026-11-26T21:05:03.123Z` from Unix milliseconds (UTC, proleptic Gregorian).
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        unix_ms % 1000
    )
}

/// True when every threshold passed.
pub fn thresholds_passed(s: &Summary) -> bool {
    s.thresholds.iter().all(|t| t.passed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::aggregate::NodeSecond;

    #[test]
    fn named_metrics_merge_across_nodes_into_every_output_and_thresholds() {
        let text = r#"
name = "p"
[defaults]
base_url = "http://127.0.0.1:1"
[scenarios.s]
executor = "constant-vus"
vus = 1
duration = "2s"
flow = "f"
[[flows.f.steps]]
name = "a"
request = { url = "/" }
[thresholds]
"ws_msg_rtt{step=a}" = ["p(99) < 5ms", "max < 1ms"]
"ws_msgs_sent" = ["count == 30", "rate > 10"]
"ws_connecting" = ["count == 0"]
"#;
        let p = crate::commands::compile_text("p.toml", text, &[], std::path::Path::new("."))
            .expect("plan compiles");
        let mut agg = RunAggregate::new(p.layout.clone());
        for (node, t, rtt) in [("n1", 0, 1000), ("n2", 0, 3000), ("n1", 1, 2000)] {
            let mut m = Metrics::new(&p.layout);
            for _ in 0..10 {
                m.series[0].named.record(Named::WsMsgRtt, rtt);
            }
            m.series[0].named.count(Named::WsMsgsSent, 10);
            agg.add(
                node,
                &NodeSecond {
                    second: t,
                    metrics: m,
                    vus: 1,
                },
            )
            .unwrap();
        }
        agg.finish();
        let s = build(
            &agg,
            SummaryInput {
                run_id: "r",
                plan: &p.plan,
                started_at_unix_ms: 0,
                duration_s: 2.0,
                nodes: &[],
                events: vec![],
                start_skew_us: 0,
                plan_source: text,
            },
        );
        let json = serde_json::to_value(&s).unwrap();
        let rtt = &json["totals"]["metrics"]["ws_msg_rtt"];
        assert_eq!(rtt["count"], 30, "{rtt}");
        assert_eq!(rtt["p50"], 2000);
        assert_eq!(rtt["max"], 3001);
        assert_eq!(json["totals"]["metrics"]["ws_msgs_sent"]["count"], 30);
        assert_eq!(json["totals"]["metrics"]["ws_msgs_sent"]["rate"], 15.0);
        assert_eq!(
            json["requests"]["a"]["metrics"]["ws_msgs_sent"]["count"],
            30
        );
        assert_eq!(
            json["nodes"][0]["stats"]["metrics"]["ws_msgs_sent"]["count"],
            20
        );
        assert!(json["totals"]["metrics"].get("ws_connecting").is_none());
        // The summary reads back (stored reports, `stampede report`).
        let back: Summary = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, s);
        let verdicts: Vec<(String, bool)> = s
            .thresholds
            .iter()
            .map(|t| (format!("{} {}", t.metric, t.expr), t.passed))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("ws_connecting count == 0".to_string(), true),
                ("ws_msg_rtt{step=a} p(99) < 5ms".to_string(), true),
                ("ws_msg_rtt{step=a} max < 1ms".to_string(), false),
                ("ws_msgs_sent count == 30".to_string(), true),
                ("ws_msgs_sent rate > 10".to_string(), true),
            ]
        );
        // Timeline, CSV and terminal carry them too.
        assert_eq!(s.timeline[0].named["ws_msgs_sent"], 20);
        assert_eq!(s.timeline[1].named["ws_msg_rtt_p99_us"], 2000);
        let csv = crate::reports::outputs::csv(&s);
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let row0: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        assert_eq!(row0[col("ws_msgs_sent")], "20");
        assert_eq!(row0[col("ws_msg_rtt_p99_us")], "3001");
        assert_eq!(row0[col("ws_connecting_p99_us")], "0");
        let table = crate::reports::terminal::summary_table(&s);
        assert!(
            table.contains("ws_msg_rtt: count 30, p50 2.00ms"),
            "{table}"
        );
        assert!(table.contains("ws_msgs_sent: 30 (15.0/s)"), "{table}");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_795_726_503_123), "2026-11-26T20:55:03.123Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
