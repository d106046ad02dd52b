//! What a node knows of runs right now, for the dashboard, `/metrics` and `status`:
//! the current run's merged timeline, each node's own timeline, the merged totals,
//! events, and the summaries of recent runs.
//!
//! A timeline here is the last [`KEEP_SECONDS`] at 1 s plus the run's coarse history
//! before them (buckets of whole minutes and hours merged by the aggregate, see
//! [`crate::reports::aggregate::LIVE_HISTORY`]): what it holds does not grow with the run.
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
    pub totals: Option<Metrics>,
    #[serde(skip)]
    pub layout: Option<Layout>,
    /// Each node's totals so far, by node name (for per-node `/metrics` series).
    #[serde(skip)]
    pub node_totals: BTreeMap<String, Metrics>,
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
