//! What a node knows of runs right now, for the dashboard, `/metrics` and `status`:
//! the current run's merged timeline, each node's own timeline, the merged totals,
//! events, and the summaries of recent runs.
//!
//! A timeline here is the last [`KEEP_SECONDS`] at 1 s plus the run's coarse history
//! before them (buckets of whole minutes and hours merged by the aggregate, see
//! [`crate::reports::aggregate::LIVE_HISTORY`]): what it holds does not grow with the run.
//!
//! The run's and each node's totals (for `/metrics` and the dashboard's stats) are
//! kept encoded ([`PackedMetrics`]): a histogram in memory is as large as the highest
//! value it ever held needs, so live copies of every node's totals grew by a step with
//! each new worst latency of a soak (see docs/benchmarks.md, soak); encoded, they take
//! a few KB whatever the outliers.
//!
//! The run coordinator writes it (once per snapshot: a second's worth of work, never
//! per request); readers take a short read lock and copy what they need. It must not
//! compute measurements itself.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use stampede_protocol::snapshot::{Layout, Metrics};

use crate::reports::aggregate::TimelinePoint;
use crate::reports::summary::{Event, Summary};

/// Seconds of timeline kept at full resolution per run and per node for live charts
/// (ten minutes); older seconds are in the history.
pub const KEEP_SECONDS: usize = 600;
/// Finished runs whose summaries are kept for the dashboard.
pub const KEEP_RUNS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct LiveMember {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `running`, `lost`, `completed`.
    pub status: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveRun {
    pub run_id: String,
    pub plan: String,
    /// `joining`, `ready`, `running`, `finishing`, `done`.
    pub phase: String,
    pub leader: String,
    pub started_unix_ms: u64,
    pub members: Vec<LiveMember>,
    /// The merged picture, one point per second: the last [`KEEP_SECONDS`].
    pub timeline: VecDeque<TimelinePoint>,
    /// Each node's own seconds, by node name: the last [`KEEP_SECONDS`].
    pub per_node: BTreeMap<String, VecDeque<TimelinePoint>>,
    /// The merged picture before `timeline`, in coarse buckets (`width_s` each).
    pub history: Vec<TimelinePoint>,
    /// Each node's picture before its `per_node` seconds, by node name.
    pub per_node_history: BTreeMap<String, Vec<TimelinePoint>>,
    pub events: Vec<Event>,
    /// Merged counters and histograms so far (for `/metrics`).
    #[serde(skip)]
    pub totals: Option<PackedMetrics>,
    #[serde(skip)]
    pub layout: Option<Layout>,
    /// Each node's totals so far, by node name (for per-node `/metrics` series).
    #[serde(skip)]
    pub node_totals: BTreeMap<String, PackedMetrics>,
}

/// Counters and histograms encoded as a snapshot carries them (CBOR, histograms in
/// HdrHistogram's V2 form: run-length encoded, so their size follows the values
/// recorded, not the highest one). Readers decode what they show.
#[derive(Debug, Clone, Default)]
pub struct PackedMetrics(Vec<u8>);

impl PackedMetrics {
    pub fn of(m: &Metrics) -> PackedMetrics {
        PackedMetrics(m.encode())
    }

    /// The metrics again; `None` only if the bytes were not made by [`PackedMetrics::of`].
    /// Our own encoding: not held to the memory budget of a peer's message (a single
    /// outlier encodes in a few bytes but decodes to a counts array that reaches it).
    pub fn unpack(&self) -> Option<Metrics> {
        ciborium::from_reader(&self.0[..]).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The encoding (`Metrics::encode`'s).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl LiveRun {
    pub fn new(run_id: &str, plan: &str) -> LiveRun {
        LiveRun {
            run_id: run_id.into(),
            plan: plan.into(),
            phase: "joining".into(),
            leader: String::new(),
            started_unix_ms: 0,
            members: Vec::new(),
            timeline: VecDeque::new(),
            per_node: BTreeMap::new(),
            history: Vec::new(),
            per_node_history: BTreeMap::new(),
            events: Vec::new(),
            totals: None,
            layout: None,
            node_totals: BTreeMap::new(),
        }
    }

    pub fn push_point(&mut self, p: TimelinePoint) {
        push_bounded(&mut self.timeline, p);
    }

    pub fn push_node_point(&mut self, node: &str, p: TimelinePoint) {
        push_bounded(self.per_node.entry(node.to_string()).or_default(), p);
    }

    /// Bytes the run's and its nodes' totals take here (what [`PackedMetrics`] bounds).
    pub fn totals_bytes(&self) -> usize {
        self.totals.as_ref().map_or(0, PackedMetrics::len)
            + self
                .node_totals
                .values()
                .map(PackedMetrics::len)
                .sum::<usize>()
    }

    /// Replaces the coarse history of the run and of its nodes (by node name), as
    /// [`crate::reports::aggregate::RunAggregate::live_history`] gives it for [`KEEP_SECONDS`].
    /// Its buckets change once a minute: calling it more often only costs a copy.
    pub fn set_history(
        &mut self,
        run: Vec<TimelinePoint>,
        per_node: BTreeMap<String, Vec<TimelinePoint>>,
    ) {
        self.history = run;
        self.per_node_history = per_node;
    }
}

fn push_bounded(q: &mut VecDeque<TimelinePoint>, p: TimelinePoint) {
    // A second may be re-sent (a late snapshot): replace rather than duplicate.
    if let Some(last) = q.iter_mut().rev().find(|x| x.t == p.t) {
        *last = p;
        return;
    }
    q.push_back(p);
    while q.len() > KEEP_SECONDS {
        q.pop_front();
    }
}

/// Every run this node takes part in or started, and recent results.
#[derive(Default)]
pub struct LiveRuns {
    pub runs: RwLock<BTreeMap<String, LiveRun>>,
    pub finished: RwLock<VecDeque<Summary>>,
}

impl LiveRuns {
    pub fn new() -> Arc<LiveRuns> {
        Arc::new(LiveRuns::default())
    }

    /// Applies `f` to the run's live record, creating it if needed.
    pub fn update(&self, run_id: &str, plan: &str, f: impl FnOnce(&mut LiveRun)) {
        let mut runs = match self.runs.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        f(runs
            .entry(run_id.to_string())
            .or_insert_with(|| LiveRun::new(run_id, plan)));
    }

    /// Forgets a run's live record (the coordinator dropped the run).
    pub fn remove(&self, run_id: &str) {
        match self.runs.write() {
            Ok(mut r) => r.remove(run_id),
            Err(p) => p.into_inner().remove(run_id),
        };
    }

    pub fn finish(&self, summary: Summary) {
        let mut f = match self.finished.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        f.retain(|s| s.run_id != summary.run_id);
        f.push_front(summary);
        f.truncate(KEEP_RUNS);
    }

    /// A copy of the runs (cheap enough for a page refresh or a scrape).
    pub fn snapshot(&self) -> Vec<LiveRun> {
        match self.runs.read() {
            Ok(r) => r.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    pub fn recent(&self) -> Vec<Summary> {
        match self.finished.read() {
            Ok(r) => r.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::snapshot::SeriesKey;

    fn layout() -> Layout {
        Layout {
            scenarios: vec!["s".into()],
            flows: vec!["f".into(), "g".into()],
            flow_slots: vec![(0, 0), (0, 1)],
            series: (0..2)
                .map(|flow| SeriesKey {
                    scenario: 0,
                    flow,
                    step: 0,
                    step_name: "get".into(),
                })
                .collect(),
        }
    }

    /// Bytes the histograms of `m` take in memory (8 per count slot).
    fn heap_of(m: &Metrics) -> usize {
        let hists = m
            .series
            .iter()
            .flat_map(|s| [&s.latency, &s.service])
            .chain(
                m.scenarios
                    .iter()
                    .flat_map(|s| [&s.schedule_lag, &s.iteration_duration]),
            );
        hists.map(|h| h.0.distinct_values() * 8).sum()
    }

    /// A soak's totals meet a new worst latency now and then (a busy machine): what the
    /// live view keeps of three nodes' totals must not grow with each one, as a copy
    /// of in-memory histograms does (a slot per value up to the highest), and must read
    /// back exactly.
    #[test]
    fn live_totals_stay_small_whatever_the_worst_latency() {
        let layout = layout();
        let mut run = LiveRun::new("r", "p");
        let mut merged = Metrics::new(&layout);
        let mut nodes: Vec<Metrics> = (0..3).map(|_| Metrics::new(&layout)).collect();
        // (live view bytes, in-memory histogram bytes) after each new worst latency.
        let mut steps = Vec::new();
        // Ten minutes of seconds; every 100 s a new worst latency, 1 ms up to 100 s.
        for t in 0..600u64 {
            for (i, node) in nodes.iter_mut().enumerate() {
                let mut s = Metrics::new(&layout);
                for k in 0..100u64 {
                    let flow = (k % 2) as usize;
                    s.series[flow].latency.record(200 + (k * 13) % 900);
                    s.series[flow].service.record(150 + k);
                    s.series[flow].requests += 1;
                    s.scenarios[0].schedule_lag.record(20 + k);
                    s.scenarios[0].iteration_duration.record(300 + k);
                }
                if t % 100 == 0 {
                    let worst = 1_000 * 10u64.pow((t / 100) as u32);
                    s.series[i % 2].latency.record(worst);
                    s.scenarios[0].schedule_lag.record(worst);
                }
                node.merge(&s).unwrap();
                merged.merge(&s).unwrap();
                run.node_totals
                    .insert(format!("n{i}"), PackedMetrics::of(node));
                run.totals = Some(PackedMetrics::of(&merged));
            }
            if t % 100 == 0 {
                let in_memory = heap_of(&merged) + nodes.iter().map(heap_of).sum::<usize>();
                steps.push((run.totals_bytes(), in_memory));
            }
        }
        // From the second step on, every ordinary value has been seen once.
        let (first, last) = (steps[1], steps[steps.len() - 1]);
        // In memory the four totals grew by ~220 KB per step (~950 KB over four); the
        // live view's encoded copy by ~30 bytes per outlier.
        assert!(last.1 - first.1 > 500_000, "{steps:?}");
        assert!(
            last.0 < 16 * 1024,
            "live totals hold {} bytes: {steps:?}",
            last.0
        );
        assert!(
            last.0 - first.0 < 512,
            "live totals grew with the outliers: {steps:?}"
        );
        assert_eq!(
            run.totals.as_ref().and_then(PackedMetrics::unpack),
            Some(merged)
        );
        assert_eq!(
            run.node_totals.get("n2").and_then(PackedMetrics::unpack),
            Some(nodes.pop().unwrap())
        );
    }
}
