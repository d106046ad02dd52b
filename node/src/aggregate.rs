//! Turning measurements into a run's picture: worker seconds into node seconds
//! ([`NodeCollector`]), and node seconds from any number of nodes into run totals,
//! per-node totals and a timeline ([`RunAggregate`]).
//!
//! Everything merges by histogram addition, so the totals are exact whatever the order
//! in which seconds arrive. Memory stays flat over a long run: full histograms are kept
//! only for the totals (per node) and for a short window of recent seconds; older
//! seconds are folded into compact [`TimelinePoint`]s. This module must not format
//! output or talk to the network.

use std::collections::BTreeMap;

use serde::Serialize;
use stampede_protocol::snapshot::{ErrorClass, Hist, Layout, Metrics};

use crate::engine::WorkerReport;

/// One second of one node, complete over all its workers.
#[derive(Debug, Clone)]
pub struct NodeSecond {
    pub second: u64,
    pub metrics: Metrics,
    pub vus: u64,
}

/// Merges the per-second reports of a node's workers into node seconds.
pub struct NodeCollector {
    layout: Layout,
    workers: usize,
    /// Highest second each worker reported, and whether it sent its last report.
    reported: Vec<(Option<u64>, bool)>,
    pending: BTreeMap<u64, NodeSecond>,
    next: u64,
}

impl NodeCollector {
    pub fn new(layout: Layout, workers: usize) -> NodeCollector {
        NodeCollector {
            layout,
            workers,
            reported: vec![(None, false); workers],
            pending: BTreeMap::new(),
            next: 0,
        }
    }

    /// Takes one worker report; returns the node seconds it completed, in order and
    /// without gaps: the mesh asks a node for every second below its count, so a second
    /// that no worker reported goes out empty rather than missing.
    pub fn add(&mut self, r: WorkerReport) -> Vec<NodeSecond> {
        let layout = &self.layout;
        // A report for a second already sent on counts in the first one not sent: the
        // totals stay exact and nothing waits in `pending` forever.
        let second = r.second.max(self.next);
        let entry = self.pending.entry(second).or_insert_with(|| NodeSecond {
            second,
            metrics: Metrics::new(layout),
            vus: 0,
        });
        // A merge of same-plan metrics cannot fail; a worker is part of this process.
        let _ = entry.metrics.merge(&r.metrics);
        entry.vus += r.vus;
        if let Some(slot) = self.reported.get_mut(r.worker) {
            slot.0 = Some(slot.0.map_or(r.second, |s| s.max(r.second)));
            slot.1 |= r.last;
        }
        let mut out = Vec::new();
        loop {
            let s = self.next;
            let complete = self
                .reported
                .iter()
                .all(|(hi, last)| *last || hi.is_some_and(|h| h >= s));
            if !complete || (self.pending.is_empty() && self.finished()) {
                break;
            }
            let ns = self.pending.remove(&s).unwrap_or_else(|| NodeSecond {
                second: s,
                metrics: Metrics::new(&self.layout),
                vus: 0,
            });
            out.push(ns);
            self.next += 1;
        }
        out
    }

    /// Every worker sent its last report.
    pub fn finished(&self) -> bool {
        self.reported.iter().all(|(_, last)| *last)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// One second of the whole run, as drawn on charts and written to the timeline.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TimelinePoint {
    pub t: u64,
    pub requests: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub errors: u64,
    pub errors_by_class: BTreeMap<String, u64>,
    pub iterations: u64,
    pub dropped_iterations: u64,
    pub bytes_received: u64,
    pub vus: u64,
    pub schedule_lag_p99_us: u64,
    /// Nodes that reported this second.
    pub nodes: usize,
}

/// Everything one node contributed.
#[derive(Debug, Clone)]
pub struct NodeTotals {
    pub totals: Metrics,
    pub seconds: u64,
    pub last_second: Option<u64>,
    pub vus: u64,
    /// This node's own seconds (compact points: regional differences stay visible).
    pub timeline: Vec<TimelinePoint>,
}

/// Seconds kept in full before being folded into the timeline: late seconds from a slow
/// node still land exactly in the totals; only their timeline percentiles are affected.
const WINDOW: u64 = 5;

/// The merged picture of a run, fed node seconds from any node in any order.
pub struct RunAggregate {
    layout: Layout,
    pub totals: Metrics,
    pub nodes: BTreeMap<String, NodeTotals>,
    window: BTreeMap<u64, (Metrics, BTreeMap<String, u64>)>,
    pub timeline: Vec<TimelinePoint>,
    /// Seconds at or below this are folded.
    folded_through: Option<u64>,
}

impl RunAggregate {
    pub fn new(layout: Layout) -> RunAggregate {
        RunAggregate {
            totals: Metrics::new(&layout),
            layout,
            nodes: BTreeMap::new(),
            window: BTreeMap::new(),
            timeline: Vec::new(),
            folded_through: None,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Adds one node's second. Fails only if the metrics come from another plan.
    pub fn add(
        &mut self,
        node: &str,
        s: &NodeSecond,
    ) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        let layout = &self.layout;
        let nt = self
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeTotals {
                totals: Metrics::new(layout),
                seconds: 0,
                last_second: None,
                vus: 0,
                timeline: Vec::new(),
            });
        nt.totals.merge(&s.metrics)?;
        let p = point(s.second, &s.metrics, s.vus, 1);
        match nt.timeline.binary_search_by_key(&s.second, |x| x.t) {
            Ok(i) => nt.timeline[i] = p,
            Err(i) => nt.timeline.insert(i, p),
        }
        nt.seconds += 1;
        if nt.last_second.is_none_or(|l| s.second >= l) {
            nt.last_second = Some(s.second);
            nt.vus = s.vus;
        }
        self.totals.merge(&s.metrics)?;
        match self.folded_through {
            Some(f) if s.second <= f => {
                // Too late for full percentiles: keep counts exact in its timeline point.
                if let Some(p) = self.timeline.iter_mut().find(|p| p.t == s.second) {
                    let extra = point(s.second, &s.metrics, s.vus, 1);
                    p.requests += extra.requests;
                    p.rps = p.requests as f64;
                    p.errors += extra.errors;
                    p.iterations += extra.iterations;
                    p.dropped_iterations += extra.dropped_iterations;
                    p.bytes_received += extra.bytes_received;
                    p.vus += extra.vus;
                    p.nodes += 1;
                }
            }
            _ => {
                let layout = &self.layout;
                let (m, vus) = self
                    .window
                    .entry(s.second)
                    .or_insert_with(|| (Metrics::new(layout), BTreeMap::new()));
                m.merge(&s.metrics)?;
                vus.insert(node.to_string(), s.vus);
                let newest = *self.window.keys().next_back().unwrap_or(&0);
                if newest >= WINDOW {
                    self.fold_through(newest - WINDOW);
                }
            }
        }
        Ok(())
    }

    fn fold_through(&mut self, through: u64) {
        while let Some((&t, _)) = self.window.first_key_value() {
            if t > through {
                break;
            }
            let (m, vus) = self.window.remove(&t).expect("key just seen");
            self.timeline
                .push(point(t, &m, vus.values().sum(), vus.len()));
            self.folded_through = Some(t);
        }
    }

    /// Folds every remaining second into the timeline (at the end of a run).
    pub fn finish(&mut self) {
        self.fold_through(u64::MAX);
    }

    /// The most recent second, for live views.
    pub fn latest(&self) -> Option<TimelinePoint> {
        let (t, (m, vus)) = self.window.iter().next_back()?;
        Some(point(*t, m, vus.values().sum(), vus.len()))
    }

    /// The most recent second that `nodes` nodes have reported (or the oldest one
    /// still open): a live view of a second that only some nodes sent yet would show a
    /// fraction of the load.
    pub fn latest_complete(&self, nodes: usize) -> Option<TimelinePoint> {
        let (t, (m, vus)) = self
            .window
            .iter()
            .rev()
            .find(|(_, (_, v))| v.len() >= nodes)
            .or_else(|| self.window.iter().next())?;
        Some(point(*t, m, vus.values().sum(), vus.len()))
    }
}

/// One second of metrics as a timeline point (percentiles from its merged histogram).
pub fn point(t: u64, m: &Metrics, vus: u64, nodes: usize) -> TimelinePoint {
    let mut lat = Hist::default();
    let mut p = TimelinePoint {
        t,
        vus,
        nodes,
        ..Default::default()
    };
    for s in &m.series {
        lat.add(&s.latency);
        p.requests += s.requests;
        p.errors += s.failed;
        p.bytes_received += s.bytes_received;
        for c in ErrorClass::ALL {
            let n = s.errors[c as usize];
            if n > 0 {
                *p.errors_by_class.entry(c.name().to_string()).or_default() += n;
            }
        }
    }
    let mut lag = Hist::default();
    for s in &m.scenarios {
        p.iterations += s.iterations;
        p.dropped_iterations += s.dropped;
        lag.add(&s.schedule_lag);
    }
    p.rps = p.requests as f64;
    if !lat.is_empty() {
        p.p50_us = lat.0.value_at_quantile(0.5);
        p.p90_us = lat.0.value_at_quantile(0.9);
        p.p99_us = lat.0.value_at_quantile(0.99);
        p.max_us = lat.0.max();
    }
    if !lag.is_empty() {
        p.schedule_lag_p99_us = lag.0.value_at_quantile(0.99);
    }
    p
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
                step_name: "a".into(),
            }],
        }
    }

    fn report(worker: usize, second: u64, n: u64, last: bool) -> WorkerReport {
        let mut m = Metrics::new(&layout());
        for i in 0..n {
            m.series[0].latency.record(100 + i);
        }
        m.series[0].requests = n;
        WorkerReport {
            worker,
            second,
            metrics: m,
            vus: 1,
            last,
        }
    }

    #[test]
    fn node_seconds_complete_when_all_workers_reported() {
        let mut c = NodeCollector::new(layout(), 2);
        assert!(c.add(report(0, 0, 5, false)).is_empty());
        let out = c.add(report(1, 0, 7, false));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].metrics.total_requests(), 12);
        // Worker 0 ends at second 1; worker 1 goes on to second 2.
        assert!(c.add(report(1, 1, 1, false)).is_empty());
        let out = c.add(report(0, 1, 2, true));
        assert_eq!(out.iter().map(|s| s.second).collect::<Vec<_>>(), vec![1]);
        assert_eq!(out[0].metrics.total_requests(), 3);
        let out = c.add(report(1, 2, 4, true));
        assert_eq!(
            out.iter()
                .map(|s| (s.second, s.metrics.total_requests()))
                .collect::<Vec<_>>(),
            vec![(2, 4)]
        );
        assert!(c.finished());
    }

    /// The mesh asks a node for every second below its count: a second that no worker
    /// reported must still go out (empty), and a late report must not be lost.
    #[test]
    fn node_seconds_have_no_gaps_and_lose_nothing() {
        let mut c = NodeCollector::new(layout(), 2);
        assert_eq!(c.add(report(0, 0, 1, false)).len(), 0);
        assert_eq!(c.add(report(1, 0, 1, false)).len(), 1);
        // Worker 0 skips second 1 and ends at 3; worker 1 ends at 2.
        assert!(c.add(report(0, 3, 4, true)).is_empty());
        let out = c.add(report(1, 2, 2, true));
        assert_eq!(
            out.iter()
                .map(|s| (s.second, s.metrics.total_requests()))
                .collect::<Vec<_>>(),
            vec![(1, 0), (2, 2), (3, 4)]
        );
        assert!(c.finished());

        // A report for a second already sent lands in the next one.
        let mut c = NodeCollector::new(layout(), 1);
        assert_eq!(c.add(report(0, 0, 1, false)).len(), 1);
        assert_eq!(c.add(report(0, 1, 1, false)).len(), 1);
        let out = c.add(report(0, 0, 5, true));
        assert_eq!(
            out.iter()
                .map(|s| (s.second, s.metrics.total_requests()))
                .collect::<Vec<_>>(),
            vec![(2, 5)]
        );
    }

    #[test]
    fn aggregate_is_exact_and_bounded() {
        let mut a = RunAggregate::new(layout());
        let mut total = 0;
        for t in 0..100u64 {
            for node in ["a", "b"] {
                let r = report(0, t, t % 7 + 1, false);
                total += t % 7 + 1;
                a.add(
                    node,
                    &NodeSecond {
                        second: t,
                        metrics: r.metrics,
                        vus: 1,
                    },
                )
                .unwrap();
            }
            assert!(a.window.len() as u64 <= WINDOW + 1);
        }
        // A late second from a third node still counts exactly.
        let r = report(0, 3, 10, false);
        a.add(
            "c",
            &NodeSecond {
                second: 3,
                metrics: r.metrics,
                vus: 1,
            },
        )
        .unwrap();
        total += 10;
        a.finish();
        assert_eq!(a.totals.total_requests(), total);
        assert_eq!(a.timeline.len(), 100);
        assert_eq!(a.timeline.iter().map(|p| p.requests).sum::<u64>(), total);
        assert_eq!(a.timeline[3].nodes, 3);
        assert_eq!(a.nodes["c"].totals.total_requests(), 10);
    }
}
