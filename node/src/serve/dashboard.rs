//! The live dashboard served at `/` by every node: the page (assets embedded in the
//! binary, no network needed) and the `/api/live` JSON it polls once per second — mesh
//! members, runs with their merged and per-node timelines, exact per-node and per-label
//! stats read from merged histograms, saturation warnings naming the node, and recent
//! finished runs.
//!
//! It only reads the membership view and [`LiveRuns`]; it must not change either.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use stampede_protocol::snapshot::{ErrorClass, Metrics, SeriesStats};

use crate::mesh::SharedView;
use crate::reports::html::{escape, script_json, CHARTS_JS, COMMON_CSS};
use crate::reports::live::{LiveRun, LiveRuns};
use crate::reports::summary::{named_stats, Checks, Latency, Stats, LAG_SATURATED_US};

const DASHBOARD_JS: &str = include_str!("../../assets/dashboard.js");

/// The summary stats of a bag of metrics over `dur_s` seconds (same shape as the
/// JSON summary's `totals`).
pub fn stats_of(m: &Metrics, dur_s: f64) -> Stats {
    let mut s = SeriesStats::default();
    for st in &m.series {
        s.add(st);
    }
    let mut errors = BTreeMap::new();
    for c in ErrorClass::ALL {
        let n = s.errors[c as usize];
        if n > 0 {
            errors.insert(c.name().to_string(), n);
        }
    }
    let dur = dur_s.max(1e-9);
    Stats {
        requests: s.requests,
        failed: s.failed,
        iterations: m.scenarios.iter().map(|x| x.iterations).sum(),
        dropped_iterations: m.scenarios.iter().map(|x| x.dropped).sum(),
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
        metrics: named_stats(&s, dur),
    }
}

/// A run as the dashboard shows it: the live record plus exact stats so far.
pub fn run_json(r: &LiveRun, now_ms: u64) -> Value {
    // Seconds covered so far: the timeline's extent, else wall time since the start.
    let covered = r.timeline.back().map(|p| p.t + 1).unwrap_or(0) as f64;
    let wall = if r.started_unix_ms > 0 && now_ms > r.started_unix_ms {
        (now_ms - r.started_unix_ms) as f64 / 1000.0
    } else {
        0.0
    };
    let dur = if covered > 0.0 {
        covered
    } else {
        wall.max(1.0)
    };
    let totals = r
        .totals
        .as_ref()
        .and_then(|p| p.unpack())
        .map(|m| stats_of(&m, dur));
    let labels_of: BTreeMap<&str, &BTreeMap<String, String>> = r
        .members
        .iter()
        .map(|m| (m.name.as_str(), &m.labels))
        .collect();
    let mut nodes = Vec::new();
    let mut by_label: BTreeMap<String, BTreeMap<String, Metrics>> = BTreeMap::new();
    for (name, packed) in &r.node_totals {
        let Some(m) = packed.unpack() else { continue };
        let m = &m;
        let member = r.members.iter().find(|x| x.name == *name);
        let labels = labels_of.get(name.as_str()).cloned().cloned();
        for (k, v) in labels.iter().flatten() {
            let acc = by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_insert_with(|| Metrics {
                    series: vec![Default::default(); m.series.len()],
                    scenarios: vec![Default::default(); m.scenarios.len()],
                    flow_iterations: vec![0; m.flow_iterations.len()],
                });
            let _ = acc.merge(m);
        }
        nodes.push(json!({
            "name": name,
            "id": member.map(|x| x.id.clone()).unwrap_or_default(),
            "labels": labels.unwrap_or_default(),
            "status": member.map(|x| x.status.clone()).unwrap_or_else(|| "running".into()),
            "stats": stats_of(m, dur),
        }));
    }
    let by_label: BTreeMap<String, BTreeMap<String, Stats>> = by_label
        .into_iter()
        .map(|(k, vals)| {
            (
                k,
                vals.into_iter()
                    .map(|(v, m)| (v, stats_of(&m, dur)))
                    .collect(),
            )
        })
        .collect();
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        // Polled every second: the charts show the newest window, not the whole hour.
        if let Some(Value::Array(t)) = o.get_mut("timeline") {
            trim_front(t);
        }
        if let Some(Value::Object(per)) = o.get_mut("per_node") {
            for t in per.values_mut() {
                if let Value::Array(t) = t {
                    trim_front(t);
                }
            }
        }
        o.insert("totals".into(), json!(totals));
        o.insert("nodes".into(), Value::Array(nodes));
        o.insert("by_label".into(), json!(by_label));
        o.insert("saturation".into(), json!(saturation(r)));
        o.insert("elapsed_s".into(), json!(wall));
    }
    v
}

/// Seconds of timeline `/api/live` sends per run and per node.
pub const LIVE_WINDOW_SECONDS: usize = 600;

fn trim_front(t: &mut Vec<Value>) {
    if t.len() > LIVE_WINDOW_SECONDS {
        t.drain(..t.len() - LIVE_WINDOW_SECONDS);
    }
}

/// Saturation warnings for the newest seconds of each node, naming the node.
pub fn saturation(r: &LiveRun) -> Vec<String> {
    let mut out = Vec::new();
    for (node, tl) in &r.per_node {
        // The last few seconds: a warning stays up long enough to be seen.
        for p in tl.iter().rev().take(5) {
            if p.schedule_lag_p99_us > LAG_SATURATED_US {
                out.push(format!(
                    "node {node}: iterations started {:.1} ms late (schedule lag p99) at {} s — the generator cannot keep the schedule",
                    p.schedule_lag_p99_us as f64 / 1000.0,
                    p.t
                ));
                break;
            }
        }
        if let Some(p) = tl.iter().rev().take(5).find(|p| p.dropped_iterations > 0) {
            out.push(format!(
                "node {node}: {} iteration(s) dropped at {} s (every VU busy)",
                p.dropped_iterations, p.t
            ));
        }
    }
    out
}

/// Runs `/api/live` describes (the newest first); older ones are in "recent".
pub const SHOWN_RUNS: usize = 3;

/// Copies of the `n` newest runs (going ones first), without cloning the others: a
/// long-lived node keeps many finished runs and this is read every second.
pub fn newest_runs(live: &LiveRuns, n: usize) -> Vec<LiveRun> {
    let runs = match live.runs.read() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    let mut keys: Vec<(bool, u64, &String)> = runs
        .values()
        // A proposal that never started (refused, abandoned) must not shadow real runs.
        .map(|r| {
            (
                r.phase != "done" && r.started_unix_ms > 0,
                r.started_unix_ms,
                &r.run_id,
            )
        })
        .collect();
    keys.sort_by(|a, b| b.cmp(a));
    keys.iter()
        .take(n)
        .filter_map(|(_, _, id)| runs.get(*id).cloned())
        .collect()
}

/// The `/api/live` document.
pub fn api_json(view: &SharedView, live: &LiveRuns) -> Value {
    let rows = view
        .read()
        .map(|v| v.rows(Instant::now()))
        .unwrap_or_default();
    let me = rows.iter().find(|r| r.is_self);
    let now = crate::run::embedded::unix_ms();
    let runs = newest_runs(live, SHOWN_RUNS);
    let recent: Vec<Value> = live
        .recent()
        .iter()
        .map(|s| {
            json!({
                "run_id": s.run_id,
                "plan": s.plan,
                "started_at": s.started_at,
                "duration_s": s.duration_s,
                "nodes": s.nodes.len(),
                "requests": s.totals.requests,
                "failed": s.totals.failed,
                "p99_us": s.totals.latency_us.p99,
                "rps": s.totals.rps,
                "thresholds_passed": crate::reports::summary::thresholds_passed(s),
                "saturated": s.generator.saturated,
                "report": format!("/runs/{}/report.html", s.run_id),
                "summary": format!("/runs/{}/summary.json", s.run_id),
            })
        })
        .collect();
    json!({
        "node": {
            "name": me.map(|m| m.name.clone()).unwrap_or_default(),
            "id": me.map(|m| m.id.clone()).unwrap_or_default(),
        },
        "now_unix_ms": now,
        "members": rows,
        "runs": runs.iter().map(|r| run_json(r, now)).collect::<Vec<_>>(),
        "recent": recent,
    })
}

/// The dashboard page with the current state embedded, so it shows numbers at once.
pub fn page(api: &Value) -> String {
    let name = api["node"]["name"].as_str().unwrap_or("");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>stampede node · {name}</title><style>{css}</style></head>\n<body>\
         <div id=\"app\"><noscript>The dashboard needs JavaScript; see <a href=\"/api/live\">/api/live</a>.</noscript></div>\n\
         <script type=\"application/json\" id=\"initial\">{json}</script>\n\
         <script>{charts}</script>\n<script>{dash}</script>\n</body></html>\n",
        name = escape(name),
        css = COMMON_CSS,
        json = script_json(api),
        charts = CHARTS_JS,
        dash = DASHBOARD_JS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::aggregate::TimelinePoint;

    #[test]
    fn newest_going_run_first_and_unstarted_proposals_last() {
        let live = LiveRuns::new();
        for (id, phase, started) in [
            ("old", "done", 1_000),
            ("stuck", "joining", 0),
            ("newer", "done", 3_000),
            ("going", "running", 2_000),
        ] {
            live.update(id, "p", |r| {
                r.phase = phase.into();
                r.started_unix_ms = started;
            });
        }
        let ids: Vec<String> = newest_runs(&live, 3)
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(ids, ["going", "newer", "old"]);
    }

    #[test]
    fn per_label_stats_merge_histograms_and_saturation_names_the_node() {
        let layout = stampede_protocol::snapshot::Layout {
            scenarios: vec!["s".into()],
            flows: vec!["f".into()],
            flow_slots: vec![(0, 0)],
            series: vec![stampede_protocol::snapshot::SeriesKey {
                scenario: 0,
                flow: 0,
                step: 0,
                step_name: "a".into(),
            }],
        };
        let mut r = LiveRun::new("r", "p");
        for (name, region, lat) in [
            ("a", "eu", 1000),
            ("b", "us", 150_000),
            ("c", "us", 160_000),
        ] {
            let mut m = Metrics::new(&layout);
            for _ in 0..10 {
                m.series[0].latency.record(lat);
            }
            m.series[0].requests = 10;
            r.node_totals
                .insert(name.into(), crate::reports::live::PackedMetrics::of(&m));
            r.members.push(crate::reports::live::LiveMember {
                id: format!("id-{name}"),
                name: name.into(),
                labels: [("region".to_string(), region.to_string())].into(),
                status: "running".into(),
            });
        }
        r.push_node_point(
            "b",
            TimelinePoint {
                t: 3,
                schedule_lag_p99_us: 25_000,
                ..Default::default()
            },
        );
        let v = run_json(&r, 0);
        assert_eq!(v["by_label"]["region"]["us"]["requests"], 20);
        assert_eq!(v["by_label"]["region"]["eu"]["requests"], 10);
        let p99 = v["by_label"]["region"]["us"]["latency_us"]["p99"]
            .as_u64()
            .unwrap();
        assert!((159_000..=161_000).contains(&p99), "{p99}");
        let sat = v["saturation"].as_array().unwrap();
        assert_eq!(sat.len(), 1, "{sat:?}");
        assert!(sat[0].as_str().unwrap().contains("node b"));
    }
}
