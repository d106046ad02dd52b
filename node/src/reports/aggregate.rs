//! Turning measurements into a run's picture: worker seconds into node seconds
//! ([`NodeCollector`]), and node seconds from any number of nodes into run totals,
//! per-node totals and a timeline ([`RunAggregate`]).
//!
//! Everything merges by histogram addition, so the totals are exact whatever the order
//! in which seconds arrive. Memory stays flat over a long run: full histograms are kept
//! only for the totals (per node), a short window of recent seconds and one open bucket
//! per [`Timeline`] tier; older seconds are folded into compact [`TimelinePoint`]s, and
//! older buckets into coarser ones (percentiles read from the merged histogram, never
//! averaged). This module must not format output or talk to the network.

use std::collections::{BTreeMap, VecDeque};

use stampede_protocol::named::NamedMetrics;
use stampede_protocol::snapshot::{ErrorClass, Hist, Layout, Metrics, ERROR_CLASSES};

use crate::engine::WorkerReport;
use crate::reports::live::PackedMetrics;
use crate::reports::spill::{Record, SpillFile};

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
        // A report for a second already sent on counts in the first one not sent: the
        // totals stay exact and nothing waits in `pending` forever.
        let second = r.second.max(self.next);
        match self.pending.entry(second) {
            // The first report of a second is taken as it is: creating an empty one to
            // merge it into would cost every histogram's counts array each second.
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(NodeSecond {
                    second,
                    metrics: r.metrics,
                    vus: r.vus,
                });
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let entry = o.get_mut();
                // A merge of same-plan metrics cannot fail; a worker is part of this
                // process.
                let _ = entry.metrics.merge(&r.metrics);
                entry.vus += r.vus;
            }
        }
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

/// One bucket of the run's or a node's timeline: a wire type too (a member's own
/// timeline travels in its `OwnTotals`), so it lives in the protocol crate.
pub use stampede_protocol::run::TimelinePoint;

/// A run's or a node's totals, kept encoded between additions ([`PackedMetrics`]).
///
/// In memory a histogram's counts array is as long as its highest value needs: 8 KB
/// more per doubling of the worst latency, lag or iteration time, for ever, in every
/// histogram of the run's and of each node's totals — a run's memory would rise in a
/// step at each new worst stall. Encoded, a histogram takes a few bytes per distinct
/// value recorded. An addition decodes, merges and re-encodes (once per node second);
/// only the one being added to is decoded at a time, so the memory at a new worst
/// value grows by one `Metrics`, not by one per node.
#[derive(Debug, Clone)]
pub struct Totals(PackedMetrics);

impl Totals {
    fn new(layout: &Layout) -> Totals {
        Totals(PackedMetrics::of(&Metrics::new(layout)))
    }

    fn merge(&mut self, m: &Metrics) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        let mut t = self.get()?;
        t.merge(m)?;
        self.0 = PackedMetrics::of(&t);
        Ok(())
    }

    /// The totals, decoded.
    pub fn get(&self) -> Result<Metrics, stampede_protocol::snapshot::MetricsError> {
        self.0.unpack().ok_or_else(|| {
            stampede_protocol::snapshot::MetricsError::Decode("run totals unreadable".into())
        })
    }

    /// The totals as encoded (what the live view keeps).
    pub fn packed(&self) -> &PackedMetrics {
        &self.0
    }
}

/// Everything one node contributed.
#[derive(Debug)]
pub struct NodeTotals {
    pub totals: Totals,
    pub seconds: u64,
    pub last_second: Option<u64>,
    pub vus: u64,
    /// This node's own seconds (regional differences stay visible).
    pub timeline: Timeline,
    /// Its timeline as the report shows it, when it came whole from the node itself
    /// (tree aggregation: [`RunAggregate::add_own`]) rather than second by second.
    pub report_timeline: Option<Vec<TimelinePoint>>,
}

impl NodeTotals {
    pub fn new(layout: &Layout) -> NodeTotals {
        NodeTotals::spilling_to(layout, None)
    }

    /// With its timeline's older buckets on disk in `dir` ([`Timeline::spilling_to`]).
    pub fn spilling_to(layout: &Layout, dir: Option<SpillDir>) -> NodeTotals {
        NodeTotals {
            totals: Totals::new(layout),
            seconds: 0,
            last_second: None,
            vus: 0,
            timeline: Timeline::spilling_to(dir),
            report_timeline: None,
        }
    }

    /// Adds one of the node's seconds (`empty`: the layout's empty metrics, a second
    /// equal to it leaves the totals alone). Fails only if the metrics come from
    /// another plan.
    pub fn add(
        &mut self,
        s: &NodeSecond,
        empty: &Metrics,
    ) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        if s.metrics != *empty {
            self.totals.merge(&s.metrics)?;
        }
        self.timeline
            .add_acc(s.second, Acc::of(&s.metrics, s.vus, 1));
        self.seconds += 1;
        if self.last_second.is_none_or(|l| s.second >= l) {
            self.last_second = Some(s.second);
            self.vus = s.vus;
        }
        Ok(())
    }
}

/// Seconds kept in full before being folded into the timeline: late seconds from a slow
/// node still land exactly in the totals; only their timeline percentiles are affected.
const WINDOW: u64 = 5;

/// The merged picture of a run, fed node seconds from any node in any order.
pub struct RunAggregate {
    layout: Layout,
    /// A second with nothing in it, to recognise one (see `add`).
    empty: Metrics,
    pub totals: Totals,
    pub nodes: BTreeMap<String, NodeTotals>,
    pub timeline: Timeline,
    /// Where its timelines spill their older buckets (None: they stay in memory).
    spill_dir: Option<SpillDir>,
}

/// A dir (a node's data dir) that timelines spill their older buckets to.
pub type SpillDir = std::sync::Arc<std::path::Path>;

impl RunAggregate {
    /// Everything in memory (a finished run's report, tests); a node running a run
    /// uses [`RunAggregate::spilling_to`].
    pub fn new(layout: Layout) -> RunAggregate {
        RunAggregate::spilling_to(layout, None)
    }

    /// With the run's and every node's timeline spilling their older buckets to `dir`,
    /// so that memory does not grow with the run's length.
    pub fn spilling_to(layout: Layout, dir: Option<SpillDir>) -> RunAggregate {
        RunAggregate {
            totals: Totals::new(&layout),
            empty: Metrics::new(&layout),
            layout,
            nodes: BTreeMap::new(),
            timeline: Timeline::spilling_to(dir.clone()),
            spill_dir: dir,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// `t` (the run's totals or a node's) decoded. Our own encoding fails to decode
    /// only through a bug: that is logged, and empty totals of the plan's layout stand
    /// in rather than a panic.
    pub fn metrics(&self, t: &Totals) -> Metrics {
        t.get().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the run's totals back");
            Metrics::new(&self.layout)
        })
    }

    /// Adds one node's second. Fails only if the metrics come from another plan.
    pub fn add(
        &mut self,
        node: &str,
        s: &NodeSecond,
    ) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        let (layout, dir) = (&self.layout, &self.spill_dir);
        let nt = self
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeTotals::spilling_to(layout, dir.clone()));
        // A second with nothing in it (an idle node's, most of a slow plan's) leaves
        // the totals as they are: no decode and re-encode of every histogram for it.
        if s.metrics != self.empty {
            nt.totals.merge(&s.metrics)?;
            self.totals.merge(&s.metrics)?;
        }
        let acc = Acc::of(&s.metrics, s.vus, 1);
        nt.timeline.add_acc(s.second, acc.clone());
        nt.seconds += 1;
        if nt.last_second.is_none_or(|l| s.second >= l) {
            nt.last_second = Some(s.second);
            nt.vus = s.vus;
        }
        self.timeline.add_acc(s.second, acc);
        Ok(())
    }

    /// A second with nothing in it, of this run's plan.
    pub fn empty(&self) -> &Metrics {
        &self.empty
    }

    /// Puts a node's own totals and report timeline, as it sent them whole (tree
    /// aggregation), into the per-node figures — never into the run's totals or
    /// timeline, which the merged seconds already hold. Replaces what the node had
    /// here. Fails if the metrics come from another plan.
    pub fn add_own(
        &mut self,
        node: &str,
        totals: &Metrics,
        seconds: u64,
        vus: u64,
        timeline: Vec<TimelinePoint>,
    ) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        let mut nt = NodeTotals::new(&self.layout);
        nt.totals.merge(totals)?;
        nt.seconds = seconds;
        nt.last_second = seconds.checked_sub(1);
        nt.vus = vus;
        nt.report_timeline = Some(timeline);
        self.nodes.insert(node.to_string(), nt);
        Ok(())
    }

    /// Adds a merge of one second over `members` nodes (tree aggregation: a root's
    /// merged second): the run's totals and timeline only, since it holds no
    /// per-node figures. Fails only if the metrics come from another plan.
    pub fn add_merged(
        &mut self,
        second: u64,
        m: &Metrics,
        vus: u64,
        members: usize,
    ) -> Result<(), stampede_protocol::snapshot::MetricsError> {
        if *m != self.empty {
            self.totals.merge(m)?;
        }
        self.timeline.add_acc(second, Acc::of(m, vus, members));
        Ok(())
    }

    /// Folds every remaining second into the timelines (at the end of a run).
    pub fn finish(&mut self) {
        self.timeline.finish();
        for nt in self.nodes.values_mut() {
            nt.timeline.finish();
        }
    }

    /// The most recent second, for live views.
    pub fn latest(&self) -> Option<TimelinePoint> {
        self.timeline.latest()
    }

    /// The most recent second that `nodes` nodes have reported (or the oldest one
    /// still open): a live view of a second that only some nodes sent yet would show a
    /// fraction of the load.
    pub fn latest_complete(&self, nodes: usize) -> Option<TimelinePoint> {
        self.timeline.latest_complete(nodes)
    }

    /// Seconds the run's timeline covers so far (folded).
    pub fn end(&self) -> u64 {
        self.timeline.end()
    }

    /// The run's merged timeline as the report shows it ([`REPORT`] resolution).
    pub fn report_timeline(&self) -> Vec<TimelinePoint> {
        self.timeline.points(self.end(), &REPORT)
    }

    /// A node's timeline as the report shows it, cut at the run's seconds (not the
    /// node's) so that every node's buckets line up with the merged ones.
    pub fn report_node_timeline(&self, node: &str) -> Vec<TimelinePoint> {
        self.nodes
            .get(node)
            .map(|nt| match &nt.report_timeline {
                Some(points) => points.clone(),
                None => nt.timeline.points(self.end(), &REPORT),
            })
            .unwrap_or_default()
    }

    /// The run's and each node's history before the live view's last
    /// `recent_seconds` (which it keeps at 1 s itself), at [`LIVE_HISTORY`] resolution.
    pub fn live_history(
        &self,
        recent_seconds: u64,
    ) -> (Vec<TimelinePoint>, BTreeMap<String, Vec<TimelinePoint>>) {
        let end = self.end().saturating_sub(recent_seconds);
        let run = self.timeline.points(end, &LIVE_HISTORY);
        let nodes = self
            .nodes
            .iter()
            .map(|(n, nt)| (n.clone(), nt.timeline.points(end, &LIVE_HISTORY)))
            .collect();
        (run, nodes)
    }

    /// Timeline points and open histograms held for the run and all its nodes: what
    /// grows with a run's length, if anything does.
    pub fn retained(&self) -> (usize, usize) {
        let mut r = self.timeline.retained();
        for nt in self.nodes.values() {
            let (p, h) = nt.timeline.retained();
            r.0 += p;
            r.1 += h;
        }
        r
    }
}

/// A node's or the run's timeline at the resolution a long run can afford: a few
/// recent seconds open in full (so seconds arriving from several nodes merge exactly),
/// then per tier of [`TIERS`] the closed buckets of the span that tier is kept for,
/// plus one open bucket holding a merged histogram. Memory is bounded by the tiers, not
/// by the run's length (only the coarsest tier grows, by one point an hour).
#[derive(Debug)]
pub struct Timeline {
    window: BTreeMap<u64, Acc>,
    tiers: Vec<Tier>,
    /// Seconds at or below this are folded into the tiers.
    folded_through: Option<u64>,
}

/// Tiers this wide spill their older closed buckets to disk in a timeline given a
/// spill dir: together they take on 7 buckets a minute for hours (the 10 s tier for
/// its 4,000 s, the 1 min tier for its 26,000 s), the growth a soak would otherwise
/// see for its first seven hours. The 1 s tier is the fixed recent window and the
/// coarser ones take on a bucket every 10 min or hour: they stay in memory.
const SPILL_WIDTHS: [u64; 2] = [10, 60];

/// Closed buckets a spilling tier keeps in memory, newest first: where a late second
/// lands (a second later than that is rare and goes to the file as a record).
const CLOSED_IN_MEMORY: usize = 4;

/// Bucket widths, finest first; each is a multiple of the one before, so a coarser
/// bucket is exactly a run of finer ones. With the span each tier is kept for after
/// the newest second (None: the whole run). The spans cover what [`REPORT`] and
/// [`LIVE_HISTORY`] read back, with a margin for alignment.
pub const TIERS: [(u64, Option<u64>); 5] = [
    (1, Some(700)),
    (10, Some(4_000)),
    (60, Some(26_000)),
    (600, Some(120_000)),
    (3_600, None),
];

/// How a finished run's timeline is presented, newest first: (bucket width, span). The
/// last 10 minutes at 1 s, the 50 minutes before at 10 s, the 5 hours before at 1 min,
/// the 18 hours before at 10 min, and everything older at 1 h.
pub const REPORT: [(u64, u64); 5] = [
    (1, 600),
    (10, 3_000),
    (60, 18_000),
    (600, 64_800),
    (3_600, u64::MAX),
];

/// The live view's history of a long run (the dashboard keeps its last minutes at 1 s
/// itself): the hour before them at 1 min, the day before at 10 min, older at 1 h.
pub const LIVE_HISTORY: [(u64, u64); 3] = [(60, 3_600), (600, 82_800), (3_600, u64::MAX)];

#[derive(Debug)]
struct Tier {
    width: u64,
    keep: Option<u64>,
    /// Buckets by start second, oldest first (a spilling tier's newest only).
    closed: VecDeque<TimelinePoint>,
    /// Buckets still taking seconds, with their merged histograms.
    open: BTreeMap<u64, Acc>,
    spill: TierSpill,
}

/// Where a tier's older closed buckets go.
#[derive(Debug, Default)]
enum TierSpill {
    /// Nowhere: they stay in memory, as far back as the tier's span.
    #[default]
    Off,
    /// To a file in this dir, created with the first bucket that leaves memory.
    Ready(SpillDir),
    On(SpillFile),
}

/// Counts and the two histograms a timeline point is read from: all series' latency
/// merged, all scenarios' schedule lag merged.
#[derive(Debug, Clone, Default)]
struct Acc {
    requests: u64,
    errors: u64,
    errors_by_class: [u64; ERROR_CLASSES],
    iterations: u64,
    dropped: u64,
    bytes_received: u64,
    /// None while nothing was recorded: most seconds of a quiet soak are empty, and an
    /// empty histogram still costs its counts array to create and to add.
    latency: Option<Hist>,
    lag: Option<Hist>,
    /// `latency` and `lag` encoded, while the Acc is an open bucket of a coarse tier
    /// (see [`PACK_FROM_WIDTH`]); both are `None` then.
    packed: Option<Box<Packed>>,
    named: NamedMetrics,
    /// Within a second: the sum over nodes; within a bucket: the highest second.
    vus: u64,
    nodes: usize,
}

impl Acc {
    fn of(m: &Metrics, vus: u64, nodes: usize) -> Acc {
        let mut a = Acc {
            vus,
            nodes,
            ..Default::default()
        };
        for s in &m.series {
            merge_into(&mut a.latency, &s.latency);
            a.requests += s.requests;
            a.errors += s.failed;
            a.bytes_received += s.bytes_received;
            for (i, n) in s.errors.iter().enumerate() {
                a.errors_by_class[i] += n;
            }
            a.named.add(&s.named);
        }
        for s in &m.scenarios {
            a.iterations += s.iterations;
            a.dropped += s.dropped;
            merge_into(&mut a.lag, &s.schedule_lag);
        }
        a
    }

    /// Adds counts and histograms; `vus` and `nodes` are the caller's to combine.
    fn add(&mut self, o: &Acc) {
        self.requests += o.requests;
        self.errors += o.errors;
        for (a, b) in self.errors_by_class.iter_mut().zip(o.errors_by_class) {
            *a += b;
        }
        self.iterations += o.iterations;
        self.dropped += o.dropped;
        self.bytes_received += o.bytes_received;
        if let Some(h) = &o.latency {
            merge_into(&mut self.latency, h);
        }
        if let Some(h) = &o.lag {
            merge_into(&mut self.lag, h);
        }
        self.named.add(&o.named);
    }

    fn point(&self, t: u64, width: u64) -> TimelinePoint {
        let mut p = TimelinePoint {
            t,
            width_s: width,
            requests: self.requests,
            rps: self.requests as f64 / width.max(1) as f64,
            errors: self.errors,
            iterations: self.iterations,
            dropped_iterations: self.dropped,
            bytes_received: self.bytes_received,
            vus: self.vus,
            nodes: self.nodes,
            ..Default::default()
        };
        for c in ErrorClass::ALL {
            let n = self.errors_by_class[c as usize];
            if n > 0 {
                p.errors_by_class.insert(c.name().to_string(), n);
            }
        }
        if let Some(h) = self.latency.as_ref().filter(|h| !h.is_empty()) {
            p.p50_us = h.0.value_at_quantile(0.5);
            p.p90_us = h.0.value_at_quantile(0.9);
            p.p99_us = h.0.value_at_quantile(0.99);
            p.max_us = h.0.max();
        }
        if let Some(h) = self.lag.as_ref().filter(|h| !h.is_empty()) {
            p.schedule_lag_p99_us = h.0.value_at_quantile(0.99);
        }
        for (n, c) in self.named.counters() {
            p.named.insert(n.name().to_string(), c);
        }
        for (n, h) in self.named.hists() {
            p.named
                .insert(format!("{}_p99_us", n.name()), h.0.value_at_quantile(0.99));
        }
        p
    }

    fn hists(&self) -> usize {
        self.latency.is_some() as usize + self.lag.is_some() as usize
    }

    /// Bytes its histograms take: 8 per count slot in memory, or their encoding.
    #[cfg(test)]
    fn hist_bytes(&self) -> usize {
        let live = |h: &Option<Hist>| h.as_ref().map_or(0, |h| h.0.distinct_values() * 8);
        live(&self.latency)
            + live(&self.lag)
            + self
                .packed
                .as_ref()
                .map_or(0, |p| p.latency.len() + p.lag.len())
    }

    /// Encodes the histograms (they then take bytes per recorded value, not a slot per
    /// value up to the highest). Left as they are if encoding fails.
    fn pack(&mut self) {
        if self.packed.is_some() {
            return;
        }
        let (Some(latency), Some(lag)) = (pack_hist(&self.latency), pack_hist(&self.lag)) else {
            return;
        };
        self.latency = None;
        self.lag = None;
        self.packed = Some(Box::new(Packed { latency, lag }));
    }

    /// Decodes what [`Acc::pack`] encoded.
    fn unpack(&mut self) {
        if let Some(p) = self.packed.take() {
            self.latency = unpack_hist(&p.latency);
            self.lag = unpack_hist(&p.lag);
        }
    }
}

/// Open buckets at least this wide keep their histograms encoded between additions:
/// they get one every 10 s or less often, and they live long enough to meet a soak's
/// worst latencies (a 1-hour bucket holds every outlier of its hour, 8 KB more per
/// doubling of the worst one while in memory).
const PACK_FROM_WIDTH: u64 = 60;

#[derive(Debug, Clone)]
struct Packed {
    latency: Vec<u8>,
    lag: Vec<u8>,
}

/// A histogram in HdrHistogram's V2 encoding (empty for none); `None` if that fails.
fn pack_hist(h: &Option<Hist>) -> Option<Vec<u8>> {
    use hdrhistogram::serialization::Serializer as _;
    let mut out = Vec::new();
    if let Some(h) = h {
        hdrhistogram::serialization::V2Serializer::new()
            .serialize(&h.0, &mut out)
            .ok()?;
    }
    Some(out)
}

fn unpack_hist(bytes: &[u8]) -> Option<Hist> {
    if bytes.is_empty() {
        return None;
    }
    match hdrhistogram::serialization::Deserializer::new().deserialize::<u64, _>(&mut &bytes[..]) {
        Ok(mut h) => {
            h.auto(true);
            Some(Hist(h))
        }
        Err(e) => {
            // Our own encoding of a moment ago: only a bug gets here; the bucket then
            // keeps its counts but loses its percentiles.
            tracing::warn!(error = ?e, "timeline bucket histogram unreadable");
            None
        }
    }
}

fn merge_into(dst: &mut Option<Hist>, src: &Hist) {
    if src.is_empty() {
        return;
    }
    match dst {
        Some(d) => d.add(src),
        None => *dst = Some(src.clone()),
    }
}

/// Adds a late second's counts to a point already closed (its percentiles stay those
/// of the seconds it had: the histogram is gone).
fn add_counts(p: &mut TimelinePoint, a: &Acc) {
    p.requests += a.requests;
    p.rps = p.requests as f64 / p.width_s.max(1) as f64;
    p.errors += a.errors;
    for c in ErrorClass::ALL {
        let n = a.errors_by_class[c as usize];
        if n > 0 {
            *p.errors_by_class.entry(c.name().to_string()).or_default() += n;
        }
    }
    p.iterations += a.iterations;
    p.dropped_iterations += a.dropped;
    p.bytes_received += a.bytes_received;
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline::spilling_to(None)
    }

    /// A timeline whose wide tiers ([`SPILL_WIDTHS`]) keep their older closed buckets
    /// in files in `dir` (a node's data dir) rather than in memory; `None`: all in
    /// memory, as [`Timeline::new`].
    pub fn spilling_to(dir: Option<SpillDir>) -> Timeline {
        Timeline {
            window: BTreeMap::new(),
            tiers: TIERS
                .iter()
                .map(|&(width, keep)| Tier {
                    width,
                    keep,
                    closed: VecDeque::new(),
                    open: BTreeMap::new(),
                    spill: match &dir {
                        Some(d) if SPILL_WIDTHS.contains(&width) => TierSpill::Ready(d.clone()),
                        _ => TierSpill::Off,
                    },
                })
                .collect(),
            folded_through: None,
        }
    }

    /// Adds one node's second.
    pub fn add(&mut self, second: u64, m: &Metrics, vus: u64) {
        self.add_acc(second, Acc::of(m, vus, 1));
    }

    fn add_acc(&mut self, second: u64, a: Acc) {
        match self.folded_through {
            Some(f) if second <= f => self.add_late(second, &a),
            _ => {
                match self.window.entry(second) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(a);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        let w = o.get_mut();
                        w.add(&a);
                        w.vus += a.vus;
                        w.nodes += a.nodes;
                    }
                }
                let newest = *self.window.keys().next_back().unwrap_or(&0);
                if newest >= WINDOW {
                    self.fold_through(newest - WINDOW);
                }
            }
        }
    }

    /// A second older than the open window: exact in every count; its percentiles
    /// count where it meets an open bucket (which carries it on to coarser tiers) or is
    /// the first second of its bucket.
    fn add_late(&mut self, second: u64, a: &Acc) {
        let end = self.end();
        for tier in &mut self.tiers {
            let start = second - second % tier.width;
            if let Some(open) = tier.open.get_mut(&start) {
                open.unpack();
                open.add(a);
                open.nodes = open.nodes.max(1);
                if tier.width >= PACK_FROM_WIDTH {
                    open.pack();
                }
                return;
            }
            match tier.closed.binary_search_by_key(&start, |p| p.t) {
                Ok(i) => {
                    let p = &mut tier.closed[i];
                    add_counts(p, a);
                    if tier.width == 1 {
                        // The same second from one more node.
                        p.vus += a.vus;
                        p.nodes += 1;
                    }
                }
                // Older than every bucket in memory of a tier that spilled: the file
                // holds its bucket, or no second reached it.
                Err(0) if tier.spilled() > 0 => tier.late_to_file(a.point(start, tier.width)),
                // A bucket no earlier second reached: this second is all of it.
                Err(i) => {
                    let keep_from = tier.keep.map(|k| end.saturating_sub(k));
                    if keep_from.is_none_or(|k| start >= k) {
                        tier.closed.insert(i, a.point(start, tier.width));
                        tier.spill_old();
                    }
                }
            }
        }
    }

    fn fold_through(&mut self, through: u64) {
        while let Some((&t, _)) = self.window.first_key_value() {
            if t > through {
                break;
            }
            let a = self.window.remove(&t).expect("key just seen");
            self.folded_through = Some(t);
            self.cascade(Some((t, a)), t + 1);
        }
    }

    /// Puts a folded second into the finest tier and closes every bucket that ends at
    /// or before `end`, each closed bucket going into the next tier's open one: a
    /// second's histogram is added once per tier it reaches, not once per tier.
    fn cascade(&mut self, second: Option<(u64, Acc)>, end: u64) {
        let mut carried: Vec<(u64, Acc)> = second.into_iter().collect();
        for tier in &mut self.tiers {
            for (s, a) in carried.drain(..) {
                let start = s - s % tier.width;
                let packs = tier.width >= PACK_FROM_WIDTH;
                match tier.open.entry(start) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        let open = v.insert(a);
                        if packs {
                            open.pack();
                        }
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        let open = o.get_mut();
                        open.unpack();
                        open.add(&a);
                        open.vus = open.vus.max(a.vus);
                        open.nodes = open.nodes.max(a.nodes);
                        if packs {
                            open.pack();
                        }
                    }
                }
            }
            while let Some((&s, _)) = tier.open.first_key_value() {
                if s.saturating_add(tier.width) > end {
                    break;
                }
                let mut acc = tier.open.remove(&s).expect("key just seen");
                acc.unpack();
                let p = acc.point(s, tier.width);
                match tier.closed.binary_search_by_key(&s, |x| x.t) {
                    Ok(i) => tier.closed[i] = p,
                    Err(i) => tier.closed.insert(i, p),
                }
                carried.push((s, acc));
            }
            if let Some(k) = tier.keep {
                let from = end
                    .min(self.folded_through.map_or(0, |f| f + 1))
                    .saturating_sub(k);
                while tier.closed.front().is_some_and(|p| p.t < from) {
                    tier.closed.pop_front();
                }
            }
            tier.spill_old();
        }
    }

    /// Folds every remaining second and closes every bucket, partial ones included (at
    /// the end of a run, or of a node's part in it).
    pub fn finish(&mut self) {
        self.fold_through(u64::MAX);
        self.cascade(None, u64::MAX);
    }

    /// Seconds folded so far: one past the newest folded second.
    pub fn end(&self) -> u64 {
        self.folded_through.map_or(0, |f| f + 1)
    }

    /// The newest open second, for live views.
    pub fn latest(&self) -> Option<TimelinePoint> {
        let (t, a) = self.window.iter().next_back()?;
        Some(a.point(*t, 1))
    }

    /// The newest open second that `nodes` nodes have reported (or the oldest one still
    /// open).
    pub fn latest_complete(&self, nodes: usize) -> Option<TimelinePoint> {
        let (t, a) = self
            .window
            .iter()
            .rev()
            .find(|(_, a)| a.nodes >= nodes)
            .or_else(|| self.window.iter().next())?;
        Some(a.point(*t, 1))
    }

    /// The folded seconds before `end` at the resolution `res` gives (newest first:
    /// bucket width and span), oldest point first. Each cut is aligned to the coarser
    /// width beyond it, so every point is a whole bucket of its tier.
    pub fn points(&self, end: u64, res: &[(u64, u64)]) -> Vec<TimelinePoint> {
        let mut parts = Vec::new();
        let mut hi = res.first().map_or(end, |&(w, _)| end - end % w);
        for (i, &(width, span)) in res.iter().enumerate() {
            let lo = match res.get(i + 1) {
                Some(&(coarser, _)) => {
                    let lo = hi.saturating_sub(span);
                    lo - lo % coarser
                }
                None => 0,
            };
            if let Some(tier) = self.tiers.iter().find(|t| t.width == width) {
                parts.push(tier.range(lo, hi));
            }
            hi = lo;
            if hi == 0 {
                break;
            }
        }
        parts.into_iter().rev().flatten().collect()
    }

    /// Records written to the spill files (0 for a timeline held in memory).
    pub fn spilled(&self) -> usize {
        self.tiers.iter().map(Tier::spilled).sum()
    }

    /// Points and histograms held in memory (closed points; open seconds and buckets
    /// count two histograms each): what [`retained_bound`] bounds.
    pub fn retained(&self) -> (usize, usize) {
        let points = self.tiers.iter().map(|t| t.closed.len()).sum();
        let hists = self.window.values().map(Acc::hists).sum::<usize>()
            + self
                .tiers
                .iter()
                .flat_map(|t| t.open.values())
                .map(Acc::hists)
                .sum::<usize>();
        (points, hists)
    }
}

/// The most closed points one timeline holds after `end` seconds: each bounded tier's
/// span in buckets (plus one at each edge), and the unbounded tier's whole run.
pub fn retained_bound(end: u64) -> usize {
    TIERS
        .iter()
        .map(|&(width, keep)| (keep.unwrap_or(end).min(end) / width + 2) as usize)
        .sum()
}

impl Tier {
    /// Buckets starting in `lo..hi`, closed (on file or in memory) or open, oldest first.
    fn range(&self, lo: u64, hi: u64) -> Vec<TimelinePoint> {
        let mut closed: BTreeMap<u64, TimelinePoint> = match &self.spill {
            TierSpill::On(f) => match f.read() {
                Ok(mut all) => {
                    let mut inside = all.split_off(&lo);
                    inside.split_off(&hi);
                    inside
                }
                Err(e) => {
                    // Our own file of a moment ago: only a disk fault gets here. The
                    // totals stay exact; the report shows the buckets it still has.
                    tracing::error!(error = %e, width_s = self.width, "spilled timeline unreadable");
                    BTreeMap::new()
                }
            },
            _ => BTreeMap::new(),
        };
        // Memory is newer than the file where both hold a bucket (a bucket closed
        // again after a late second made it early).
        let from = self.closed.partition_point(|p| p.t < lo);
        for p in self.closed.iter().skip(from).take_while(|p| p.t < hi) {
            closed.insert(p.t, p.clone());
        }
        let mut out: Vec<TimelinePoint> = closed.into_values().collect();
        for (&s, a) in self.open.range(lo..hi) {
            let p = if a.packed.is_some() {
                let mut a = a.clone();
                a.unpack();
                a.point(s, self.width)
            } else {
                a.point(s, self.width)
            };
            let i = out.partition_point(|x| x.t < s);
            out.insert(i, p);
        }
        out
    }
}

impl Tier {
    fn spilled(&self) -> usize {
        match &self.spill {
            TierSpill::On(f) => f.records(),
            _ => 0,
        }
    }

    /// The tier's spill file, created on first use; None if the tier does not spill (or
    /// could not: then it keeps its buckets in memory, as a tier without a dir does).
    fn file(&mut self) -> Option<&mut SpillFile> {
        if let TierSpill::Ready(dir) = &self.spill {
            self.spill = match SpillFile::create(dir) {
                Ok(f) => TierSpill::On(f),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot spill the run's timeline to disk; keeping it in memory");
                    TierSpill::Off
                }
            };
        }
        match &mut self.spill {
            TierSpill::On(f) => Some(f),
            _ => None,
        }
    }

    /// Moves closed buckets past the newest [`CLOSED_IN_MEMORY`] to the file.
    fn spill_old(&mut self) {
        while self.closed.len() > CLOSED_IN_MEMORY {
            let oldest = Record::Put(self.closed[0].clone());
            let Some(file) = self.file() else { return };
            if let Err(e) = file.append(&oldest) {
                self.unspill(e);
                return;
            }
            self.closed.pop_front();
        }
    }

    /// A late second for a bucket older than those in memory: to the file if it can
    /// take it, else into memory.
    fn late_to_file(&mut self, p: TimelinePoint) {
        if let Some(file) = self.file() {
            match file.append(&Record::Late(p.clone())) {
                Ok(()) => return,
                Err(e) => self.unspill(e),
            }
        }
        match self.closed.binary_search_by_key(&p.t, |x| x.t) {
            Ok(i) => crate::reports::spill::add_point_counts(&mut self.closed[i], &p),
            Err(i) => self.closed.insert(i, p),
        }
    }

    /// Writing failed (disk full): the file's buckets come back to memory, where the
    /// tier keeps them from now on, as far back as its span.
    fn unspill(&mut self, e: std::io::Error) {
        tracing::warn!(error = %e, width_s = self.width, "cannot spill the run's timeline to disk any more; keeping it in memory");
        if let TierSpill::On(f) = std::mem::take(&mut self.spill) {
            match f.read() {
                Ok(mut all) => {
                    for p in self.closed.drain(..) {
                        all.insert(p.t, p);
                    }
                    self.closed = all.into_values().collect();
                }
                Err(e) => {
                    tracing::error!(error = %e, width_s = self.width, "spilled timeline unreadable; its older buckets are lost (the totals stay exact)");
                }
            }
        }
    }
}

/// One second of metrics as a timeline point (percentiles from its merged histogram).
pub fn point(t: u64, m: &Metrics, vus: u64, nodes: usize) -> TimelinePoint {
    Acc::of(m, vus, nodes).point(t, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::snapshot::SeriesKey;
    use std::collections::BTreeSet;

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
            assert!(a.timeline.window.len() as u64 <= WINDOW + 1);
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
        assert_eq!(a.metrics(&a.totals).total_requests(), total);
        let tl = a.report_timeline();
        assert_eq!(tl.len(), 100);
        assert_eq!(tl.iter().map(|p| p.requests).sum::<u64>(), total);
        assert_eq!(tl[3].nodes, 3);
        assert_eq!(a.metrics(&a.nodes["c"].totals).total_requests(), 10);
    }

    /// Latencies of second `t` of node `n` (a few, varying so that buckets differ).
    fn values(t: u64, n: u64) -> Vec<u64> {
        (0..(t % 3 + n))
            .map(|i| 50 + (t * 37 + i * 11 + n) % 5_000)
            .collect()
    }

    fn second_of(t: u64, n: u64) -> NodeSecond {
        // Copying an empty second is much cheaper than creating its histograms.
        static EMPTY: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
        let mut m = EMPTY.get_or_init(|| Metrics::new(&layout())).clone();
        if values(t, n).is_empty() {
            return NodeSecond {
                second: t,
                metrics: m,
                vus: 1 + t % 4,
            };
        }
        for v in values(t, n) {
            m.series[0].latency.record(v);
            m.series[0].requests += 1;
        }
        m.scenarios[0].schedule_lag.record(t % 97 + 1);
        m.scenarios[0].iterations = values(t, n).len() as u64;
        NodeSecond {
            second: t,
            metrics: m,
            vus: 1 + t % 4,
        }
    }

    /// Every bucket of every width is its seconds merged: counts summed, percentiles
    /// read from the histogram of all its seconds' values (not from its seconds'
    /// points), and the buckets tile the run without gap or overlap.
    #[test]
    fn long_timelines_downsample_exactly() {
        let run = 25_000u64;
        let mut a = RunAggregate::new(layout());
        for t in 0..run {
            for n in 1..=2 {
                a.add(&format!("n{n}"), &second_of(t, n)).unwrap();
            }
        }
        a.finish();
        let tl = a.report_timeline();
        let mut next = 0;
        let mut widths = BTreeSet::new();
        for p in &tl {
            assert_eq!(p.t, next, "buckets tile the run");
            next = p.t + p.width_s;
            widths.insert(p.width_s);
            let mut h = Hist::default();
            let mut requests = 0;
            let mut vus = 0;
            for t in p.t..p.t + p.width_s {
                for n in 1..=2 {
                    for v in values(t, n) {
                        h.record(v);
                        requests += 1;
                    }
                }
                vus = vus.max(2 * (1 + t % 4));
            }
            assert_eq!(p.requests, requests, "bucket at {}", p.t);
            assert_eq!(p.p50_us, h.0.value_at_quantile(0.5), "bucket at {}", p.t);
            assert_eq!(p.p99_us, h.0.value_at_quantile(0.99), "bucket at {}", p.t);
            assert_eq!(p.max_us, h.0.max(), "bucket at {}", p.t);
            assert_eq!(p.vus, vus);
            assert_eq!(p.nodes, 2);
            assert!((p.rps - requests as f64 / p.width_s as f64).abs() < 1e-9);
        }
        assert_eq!(next, run);
        assert_eq!(widths.into_iter().collect::<Vec<_>>(), vec![1, 10, 60, 600]);
        // The newest ten minutes stay at full resolution.
        assert!(tl.iter().rev().take(600).all(|p| p.width_s == 1));
        let node = a.report_node_timeline("n1");
        assert_eq!(
            node.iter().map(|p| (p.t, p.width_s)).collect::<Vec<_>>(),
            tl.iter().map(|p| (p.t, p.width_s)).collect::<Vec<_>>(),
            "node buckets line up with the merged ones"
        );
    }

    /// What a timeline holds is bounded by its tiers, whatever the run's length (but
    /// for the coarsest tier, which grows by one point an hour).
    #[test]
    fn retained_points_do_not_grow_with_the_run() {
        let mut a = RunAggregate::new(layout());
        for t in 0..25_000u64 {
            a.add("n", &second_of(t, 1)).unwrap();
            if t % 1_000 == 999 {
                let (points, hists) = a.retained();
                // Two timelines: the run's and the node's.
                assert!(points <= 2 * retained_bound(t + 1), "{points} at {t}");
                assert!(hists <= 2 * 2 * (WINDOW as usize + 1 + TIERS.len()));
            }
        }
        assert!(
            retained_bound(259_200) < 2_000,
            "{}",
            retained_bound(259_200)
        );
    }

    /// A timeline that spills its 10 s and 1 min buckets to disk holds a fixed number of
    /// points in memory after its first minutes (in memory it took on 7 a minute for
    /// hours, the slope a soak's RSS showed), and reads back exactly what one kept
    /// in memory shows, late seconds (a re-fetched gap, a slow node) included.
    #[test]
    fn a_spilling_timeline_holds_what_one_in_memory_does_in_fixed_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spilling = RunAggregate::spilling_to(layout(), Some(dir.path().into()));
        let mut memory = RunAggregate::new(layout());
        let mut held = Vec::new();
        let mut x = 7u64;
        let run = 14_400u64;
        for t in 0..run {
            for a in [&mut spilling, &mut memory] {
                a.add("a", &second_of(t, 1)).unwrap();
            }
            // Now and then node b's second arrives late: by a few seconds (it lands in
            // an open or a recent bucket) or by many minutes (a bucket on disk).
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            if t > 3_000 && (x >> 33).is_multiple_of(50) {
                let late = t
                    - 1
                    - (x >> 40)
                        % if (x >> 20).is_multiple_of(2) {
                            30
                        } else {
                            2_900
                        };
                for a in [&mut spilling, &mut memory] {
                    a.add("b", &second_of(late, 2)).unwrap();
                }
            }
            if t % 1_800 == 1_799 {
                assert_eq!(
                    spilling.report_timeline(),
                    memory.report_timeline(),
                    "report at {t}"
                );
                assert_eq!(spilling.live_history(600), memory.live_history(600));
                // The run's and a's timelines; b's holds a few late seconds.
                held.push(
                    spilling.timeline.retained().0 + spilling.nodes["a"].timeline.retained().0,
                );
            }
        }
        spilling.finish();
        memory.finish();
        assert_eq!(spilling.report_timeline(), memory.report_timeline());
        for n in ["a", "b"] {
            assert_eq!(
                spilling.report_node_timeline(n),
                memory.report_node_timeline(n)
            );
        }
        assert!(spilling.timeline.spilled() > 0);
        // From the first hour on, memory takes on only the 10-minute and hour buckets.
        let after_first_hour = &held[1..];
        let grew = after_first_hour.last().unwrap() - after_first_hour[0];
        assert!(
            grew <= 2 * (6 * 3 + 3),
            "points held every 30 min: {held:?}"
        );
        let (in_memory, _) = memory.timeline.retained();
        assert!(
            in_memory > 1_000,
            "the timeline kept in memory holds {in_memory}"
        );
        // Nothing is left in the dir: the files were unlinked when opened.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A soak meets a new worst latency now and then: the coarse buckets a timeline
    /// holds open (a 1-hour bucket holds every outlier of its hour) must not grow by a
    /// slot range with each, and their percentiles must stay exact.
    #[test]
    fn open_buckets_do_not_grow_with_the_worst_latency() {
        let mut tl = Timeline::new();
        let mut merged_hour = Hist::default();
        let mut held = Vec::new();
        // Two hours; in the middle of every 10 minutes a new worst latency and lag,
        // 4 ms up to ~17 min.
        for t in 0..7_200u64 {
            let mut m = second_of(t, 1).metrics;
            if t % 600 == 300 {
                let worst = 1_000u64 << (2 + t / 600);
                m.series[0].latency.record(worst);
                m.scenarios[0].schedule_lag.record(worst);
            }
            if t >= 3_600 {
                merged_hour.add(&m.series[0].latency);
            }
            tl.add(t, &m, 1);
            if t % 600 == 330 {
                let coarse: usize = (tl.tiers.iter())
                    .filter(|tier| tier.width >= 60)
                    .flat_map(|tier| tier.open.values())
                    .map(Acc::hist_bytes)
                    .sum();
                held.push(coarse);
            }
        }
        let grew = held.iter().max().unwrap() - held[0];
        // In memory, the open 1-minute, 10-minute and 1-hour buckets took 8 KB more per
        // doubling of the worst latency and as much per doubling of the worst lag.
        assert!(
            grew < 8 * 1024,
            "open coarse buckets grew {grew} bytes: {held:?}"
        );
        tl.finish();
        let hour = tl
            .points(tl.end(), &[(3_600, u64::MAX)])
            .into_iter()
            .find(|p| p.t == 3_600)
            .expect("the second hour's bucket");
        assert_eq!(hour.p99_us, merged_hour.0.value_at_quantile(0.99));
        assert_eq!(hour.max_us, merged_hour.0.max());
    }

    /// Bytes the histograms of `m` take in memory: 8 per slot of each counts array.
    fn hist_bytes_of(m: &Metrics) -> usize {
        let hist = |h: &Hist| h.0.distinct_values() * 8;
        m.series
            .iter()
            .map(|s| hist(&s.latency) + hist(&s.service))
            .chain(
                m.scenarios
                    .iter()
                    .map(|s| hist(&s.schedule_lag) + hist(&s.iteration_duration)),
            )
            .sum()
    }

    /// The run's and its nodes' totals live as long as the run and meet its worst
    /// stalls: kept encoded, they do not take 8 KB more per histogram at each doubling
    /// of the worst latency, and their percentiles stay exact.
    #[test]
    fn totals_do_not_grow_with_the_worst_latency() {
        let mut a = RunAggregate::new(layout());
        let mut merged = Hist::default();
        let (mut held, mut in_memory) = (Vec::new(), Vec::new());
        let held_now = |a: &RunAggregate| {
            a.totals.packed().len()
                + a.nodes
                    .values()
                    .map(|n| n.totals.packed().len())
                    .sum::<usize>()
        };
        // Three nodes for ten minutes; every 50 s a new worst latency, lag and
        // iteration time on one of them, 4 ms up to 8 s.
        for t in 0..600u64 {
            for (i, node) in ["a", "b", "c"].iter().enumerate() {
                let mut s = second_of(t, i as u64 + 1);
                if t % 50 == 25 && i == t as usize % 3 {
                    let worst = 1_000u64 << (2 + t / 50);
                    s.metrics.series[0].latency.record(worst);
                    s.metrics.scenarios[0].schedule_lag.record(worst);
                    s.metrics.scenarios[0].iteration_duration.record(worst);
                }
                merged.add(&s.metrics.series[0].latency);
                a.add(node, &s).unwrap();
            }
            if t % 50 == 40 {
                held.push(held_now(&a));
                let decoded = hist_bytes_of(&a.metrics(&a.totals))
                    + a.nodes
                        .values()
                        .map(|n| hist_bytes_of(&a.metrics(&n.totals)))
                        .sum::<usize>();
                in_memory.push(decoded);
            }
        }
        let grew = |v: &[usize]| v.iter().max().unwrap() - v[0];
        eprintln!("bytes of the totals, encoded: {held:?}; in memory: {in_memory:?}");
        // The control: in memory, the same totals grew by 8 KB per doubling in each of
        // their histograms that met the new worst value.
        assert!(grew(&in_memory) > 200 * 1024, "in memory: {in_memory:?}");
        // Encoded, they grow only by the few bytes of each value not recorded before
        // (over ten minutes of 4 ms..8 s, a few hundred distinct buckets in each
        // histogram): a small fraction of the control, and bounded by the buckets of
        // the recorded range, not stepping up 8 KB per histogram per doubling.
        assert!(
            grew(&held) * 20 < grew(&in_memory),
            "kept totals grew: {held:?}, in memory: {in_memory:?}"
        );
        assert!(grew(&held) < 16 * 1024, "kept totals grew: {held:?}");
        let totals = a.metrics(&a.totals);
        assert_eq!(totals.series[0].latency, merged);
        assert_eq!(totals.series[0].latency.0.max(), merged.0.max());
    }

    /// A second that arrives after its bucket closed still counts exactly.
    #[test]
    fn late_seconds_count_in_closed_buckets() {
        let mut a = RunAggregate::new(layout());
        for t in 0..5_000u64 {
            a.add("a", &second_of(t, 1)).unwrap();
        }
        // Node b's second 3 arrives long after (a re-fetched gap).
        a.add("b", &second_of(3, 2)).unwrap();
        a.finish();
        let tl = a.report_timeline();
        let want: u64 = (0..5_000u64)
            .map(|t| values(t, 1).len() as u64)
            .sum::<u64>()
            + values(3, 2).len() as u64;
        assert_eq!(tl.iter().map(|p| p.requests).sum::<u64>(), want);
        assert_eq!(a.metrics(&a.totals).total_requests(), want);
        let b = a.report_node_timeline("b");
        assert_eq!(
            b.iter().map(|p| p.requests).sum::<u64>(),
            values(3, 2).len() as u64
        );
    }

    /// The live history ends where the live view's full-resolution part begins and
    /// covers the whole run before it.
    #[test]
    fn live_history_covers_the_run_before_the_recent_minutes() {
        let mut a = RunAggregate::new(layout());
        for t in 0..20_000u64 {
            a.add("a", &second_of(t, 1)).unwrap();
        }
        let (run, nodes) = a.live_history(600);
        assert_eq!(run.first().map(|p| p.t), Some(0));
        let last = run.last().unwrap();
        assert!(last.t + last.width_s <= a.end() - 600);
        assert!(last.t + last.width_s + 60 > a.end() - 600);
        assert!(run.len() < 100, "{}", run.len());
        assert_eq!(nodes["a"].len(), run.len());
    }
}
