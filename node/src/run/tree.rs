//! The node's half of snapshot aggregation in a tree (docs/protocol.md §10): sending
//! its own seconds up, holding and merging what it aggregates, forwarding or
//! gossiping a merged second, and putting a root's merge into the run's aggregate.
//! Every decision (to whom, when, whether a merge is taken) is the run machine's
//! (`stampede_protocol::machine::tree`); this only moves and adds measurements.
//!
//! Must not decide which seconds count: it does what `SendSnapshot`, `Hold`,
//! `Forward` and `MergeBatch` say.

use stampede_protocol::machine::OwnOutcome;
use stampede_protocol::mesh::{GossipBody, MeshRequest};
use stampede_protocol::run::{
    covers_bitmap, BatchMessage, OwnTotals, RunRequest, RunResponse, SnapshotMessage,
};
use stampede_protocol::snapshot::{Layout, Metrics};

use super::store::OwnRecord;
use super::{publish, Driver};
use crate::mesh::MeshCommand;
use crate::reports::aggregate::{NodeSecond, NodeTotals, RunAggregate, SpillDir};

/// A member's own seconds summed as they come (tree aggregation), for the report's
/// per-member section: its totals, its own timeline, its highest CPU.
pub(super) struct OwnPart {
    totals: NodeTotals,
    empty: Metrics,
    cpu: f64,
}

impl OwnPart {
    /// `spill`: where its timeline's older buckets go ([`NodeTotals::spilling_to`]).
    pub(super) fn new(layout: &Layout, spill: Option<SpillDir>) -> OwnPart {
        OwnPart {
            totals: NodeTotals::spilling_to(layout, spill),
            empty: Metrics::new(layout),
            cpu: 0.0,
        }
    }

    pub(super) fn add(&mut self, s: &NodeSecond, cpu: f64) {
        // Our own engine's metrics are of the plan's layout: this cannot fail.
        if let Err(e) = self.totals.add(s, &self.empty) {
            tracing::error!(error = %e, "own second does not fit the plan");
        }
        self.cpu = self.cpu.max(cpu);
    }
}

/// What an aggregator holds of one second: the merge so far and whom it covers.
pub(super) struct Bucket {
    metrics: Metrics,
    covers: Vec<u32>,
    vus: u64,
    cpu: f64,
}

/// The environment variable that sets the aggregation of the runs this node starts:
/// a fan-in (2..=1024) for tree aggregation whatever the run's size, or `0` for all to
/// all. Unset: see [`ALL_TO_ALL_UP_TO`]. The roster carries the choice to every member.
pub const FAN_IN_ENV: &str = "STAMPEDE_FAN_IN";

/// Unless [`FAN_IN_ENV`] says otherwise, a run proposed to at most this many nodes
/// (the origin included) aggregates all to all, a larger one in a tree of fan-in
/// `FAN_IN` (32). All to all costs every node about 72 KB/s at 8 nodes and 107 KB/s
/// at 16 (simulated, docs/benchmarks.md) against the tree's 37 KB/s, and grows with
/// the run; but it gives every node's live view each member's own seconds (the
/// dashboard's per-node lines and per-label table), which the tree's merged seconds
/// do not carry.
pub const ALL_TO_ALL_UP_TO: usize = 8;

/// The aggregation of a run this node starts, proposed to `nodes` nodes.
pub(super) fn aggregation(nodes: usize) -> stampede_protocol::machine::Aggregation {
    aggregation_of(std::env::var(FAN_IN_ENV).ok().as_deref(), nodes)
}

fn aggregation_of(setting: Option<&str>, nodes: usize) -> stampede_protocol::machine::Aggregation {
    use stampede_protocol::machine::{Aggregation, FAN_IN};
    let default = if nodes > ALL_TO_ALL_UP_TO {
        Aggregation::Tree { fan_in: FAN_IN }
    } else {
        Aggregation::AllToAll
    };
    match setting.map(|v| v.trim().parse::<usize>()) {
        None => default,
        Some(Ok(0)) => Aggregation::AllToAll,
        Some(Ok(f)) if (2..=stampede_protocol::run::MAX_MEMBERS).contains(&f) => {
            Aggregation::Tree { fan_in: f }
        }
        Some(_) => {
            tracing::warn!(
                "{FAN_IN_ENV} must be 0 (all to all) or 2..={}: using the default, {default:?}",
                stampede_protocol::run::MAX_MEMBERS
            );
            default
        }
    }
}

/// Checks a member's own totals, asked of `node` for run `run_id`, and puts them into
/// the run's per-member figures (not its totals). Refused unless within the wire
/// bounds, of this run and of the member asked (a member speaks only for itself), and
/// of the plan's layout (decoded within `Metrics::decode`'s memory budget).
pub(super) fn add_own_to(
    agg: &mut RunAggregate,
    run_id: &str,
    node: &str,
    own: &OwnTotals,
) -> Result<(), String> {
    own.validate()?;
    if own.run_id != run_id || own.node != node {
        return Err(format!(
            "an answer for {} of run {} to a request for {node}",
            own.node, own.run_id
        ));
    }
    let totals = Metrics::decode(&own.metrics).map_err(|e| e.to_string())?;
    agg.add_own(node, &totals, own.seconds, own.vus, own.timeline.clone())
        .map_err(|e| e.to_string())
}

impl Driver {
    /// Keeps this node's own part of a run (tree aggregation) for reporters to ask
    /// for: once its engine is done, before it arrives at `finished`. An engine that
    /// never ran leaves an empty part.
    pub(super) fn keep_own(&mut self, run_id: &str) {
        let me = self.me.id.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.machine.tree().is_none() {
            return;
        }
        let Some(layout) = run.plan.as_ref().map(|p| p.layout.clone()) else {
            return;
        };
        let mut own = run
            .own
            .take()
            .unwrap_or_else(|| OwnPart::new(&layout, None));
        own.totals.timeline.finish();
        let totals = own.totals.totals.packed().as_bytes().to_vec();
        self.store.keep_own(
            run_id,
            OwnRecord {
                node: me,
                totals,
                seconds: own.totals.seconds,
                vus: own.totals.vus,
                cpu: own.cpu,
                timeline: own.totals.timeline,
            },
        );
    }

    /// Asks a member for its own part (or takes this node's from its store).
    pub(super) fn fetch_own(&mut self, run_id: &str, node: String, end: u64) {
        let request = RunRequest::Own {
            run_id: run_id.to_string(),
            end,
        };
        if node == self.me.id {
            let answer = Ok(self.store.respond(request));
            let _ = self.tasks_tx.send(super::tasks::Done::Own {
                run_id: run_id.to_string(),
                node,
                answer,
            });
            return;
        }
        super::tasks::fetch_own(
            self.mesh.clone(),
            self.tasks_tx.clone(),
            run_id.to_string(),
            node,
            request,
        );
    }

    /// Checks a member's answer and puts it into the run's per-member figures.
    /// Hostile until checked: it must be an answer for this run, of the member asked
    /// (no member speaks for another), within the wire bounds, of the plan's layout.
    pub(super) fn take_own(
        &mut self,
        run_id: &str,
        node: &str,
        answer: Result<RunResponse, String>,
    ) -> OwnOutcome {
        let own = match answer {
            Ok(RunResponse::Own(own)) => own,
            Ok(RunResponse::Refused { reason }) => {
                tracing::warn!(run = run_id, node, %reason, "a member has no own totals for the run");
                return OwnOutcome::Refused;
            }
            Ok(other) => {
                tracing::warn!(run = run_id, node, answer = ?std::mem::discriminant(&other), "unexpected answer to an own-totals request");
                return OwnOutcome::Failed;
            }
            Err(e) => {
                tracing::debug!(run = run_id, node, error = %e, "own-totals request failed");
                return OwnOutcome::Failed;
            }
        };
        match self.add_own(run_id, node, &own) {
            Ok(()) => OwnOutcome::Got,
            Err(e) => {
                tracing::warn!(run = run_id, node, error = %e, "own totals refused");
                OwnOutcome::Failed
            }
        }
    }

    fn add_own(&mut self, run_id: &str, node: &str, own: &OwnTotals) -> Result<(), String> {
        let run = self.runs.get_mut(run_id).ok_or("the run is gone")?;
        let agg = run.agg.as_mut().ok_or("the run has no aggregate")?;
        add_own_to(agg, run_id, node, own)?;
        run.cpu_max.insert(node.to_string(), own.cpu);
        Ok(())
    }

    /// This node's own snapshot of a second: the one at hand, or from its store.
    fn own_second(&self, run_id: &str, seq: u64) -> Option<SnapshotMessage> {
        if let Some(s) = self
            .current
            .as_ref()
            .filter(|s| s.run_id == run_id && s.seq == seq)
        {
            return Some(s.clone());
        }
        let store = match self.store.snapshots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        store.get(&(run_id.to_string(), seq)).cloned()
    }

    fn my_index(&self, run_id: &str) -> Option<u32> {
        self.runs
            .get(run_id)
            .and_then(|r| r.machine.my_index())
            .map(|i| i as u32)
    }

    pub(super) fn send_snapshot(&mut self, run_id: &str, seq: u64, to: &str) {
        let (Some(s), Some(me), Ok(peer)) = (
            self.own_second(run_id, seq),
            self.my_index(run_id),
            to.parse::<libp2p::PeerId>(),
        ) else {
            return;
        };
        let batch = BatchMessage {
            run_id: run_id.to_string(),
            seq,
            covers: covers_bitmap(&[me]),
            vus: s.vus,
            cpu: s.cpu,
            metrics: s.metrics,
        };
        let request = MeshRequest::Run(RunRequest::Batch(Box::new(batch)));
        // Best effort: a second lost here is fetched one by one at the end.
        let _ = self.mesh.try_send(MeshCommand::Send { peer, request });
    }

    pub(super) fn hold(&mut self, run_id: &str, seq: u64, own: bool) {
        let (bytes, covers, vus, cpu) = if own {
            let (Some(s), Some(me)) = (self.own_second(run_id, seq), self.my_index(run_id)) else {
                return;
            };
            (s.metrics, vec![me], s.vus, s.cpu)
        } else {
            let Some(b) = self
                .current_batch
                .as_ref()
                .filter(|b| b.run_id == run_id && b.seq == seq)
            else {
                return;
            };
            let n = self
                .runs
                .get(run_id)
                .map_or(0, |r| r.machine.roster().len());
            let Ok(covers) = stampede_protocol::run::covers_indices(&b.covers, n) else {
                return;
            };
            (b.metrics.clone(), covers, b.vus, b.cpu)
        };
        let metrics = match Metrics::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                // The machine counts it held: the merge that goes up will say it
                // covers a second it lacks. Logged; a plan mismatch is a bug or a lie.
                tracing::warn!(run = run_id, seq, error = %e, "a second to aggregate does not decode");
                return;
            }
        };
        let key = (run_id.to_string(), seq);
        match self.buckets.get_mut(&key) {
            Some(b) => {
                if let Err(e) = b.metrics.merge(&metrics) {
                    tracing::warn!(run = run_id, seq, error = %e, "a second to aggregate does not fit the plan");
                    return;
                }
                b.covers.extend(covers);
                b.vus = b.vus.saturating_add(vus);
                b.cpu = b.cpu.max(cpu);
            }
            None => {
                self.buckets.insert(
                    key,
                    Bucket {
                        metrics,
                        covers,
                        vus,
                        cpu,
                    },
                );
            }
        }
    }

    pub(super) fn forward(&mut self, run_id: &str, seq: u64, to: Option<String>, covers: &[u32]) {
        let Some(mut b) = self.buckets.remove(&(run_id.to_string(), seq)) else {
            return;
        };
        b.covers.sort_unstable();
        if b.covers != covers {
            // Only when a second it was told to hold did not decode: the merge says
            // whom its measurements really hold, so that no node counts a member's
            // second it lacks (that member's is fetched one by one at the end).
            tracing::error!(run = run_id, seq, held = ?b.covers, told = ?covers, "an aggregated second covers other members than the run machine holds");
        }
        let batch = BatchMessage {
            run_id: run_id.to_string(),
            seq,
            covers: covers_bitmap(&b.covers),
            vus: b.vus,
            cpu: b.cpu,
            metrics: b.metrics.encode(),
        };
        match to {
            Some(to) => {
                let Ok(peer) = to.parse::<libp2p::PeerId>() else {
                    return;
                };
                let request = MeshRequest::Run(RunRequest::Batch(Box::new(batch)));
                let _ = self.mesh.try_send(MeshCommand::Send { peer, request });
            }
            None => {
                // The root: to every node, and (a `MergeBatch` follows) into its own.
                publish(&self.mesh, GossipBody::Batch(Box::new(batch.clone())), true);
                self.current_batch = Some(batch);
            }
        }
    }

    /// Drops what this node still holds of a run (it is done with it).
    pub(super) fn drop_buckets(&mut self, run_id: &str) {
        self.buckets.retain(|(r, _), _| r != run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::snapshot::SeriesKey;

    fn layout(steps: usize) -> Layout {
        Layout {
            scenarios: vec!["s".into()],
            flows: vec!["f".into()],
            flow_slots: vec![(0, 0)],
            series: (0..steps)
                .map(|step| SeriesKey {
                    scenario: 0,
                    flow: 0,
                    step,
                    step_name: format!("step{step}"),
                })
                .collect(),
        }
    }

    const RUN: &str = "6932a8b2-0f3c";

    fn own(node: &str, metrics: &Metrics) -> OwnTotals {
        OwnTotals {
            run_id: RUN.into(),
            node: node.into(),
            seconds: 3,
            vus: 2,
            cpu: 0.5,
            metrics: metrics.encode(),
            timeline: Vec::new(),
        }
    }

    #[test]
    fn the_fan_in_setting_picks_the_aggregation() {
        use stampede_protocol::machine::{Aggregation, FAN_IN};
        let tree = Aggregation::Tree { fan_in: FAN_IN };
        let (small, large) = (ALL_TO_ALL_UP_TO, ALL_TO_ALL_UP_TO + 1);
        assert_eq!(aggregation_of(None, small), Aggregation::AllToAll);
        assert_eq!(aggregation_of(None, large), tree);
        assert_eq!(aggregation_of(Some("0"), large), Aggregation::AllToAll);
        assert_eq!(
            aggregation_of(Some(" 8 "), 3),
            Aggregation::Tree { fan_in: 8 }
        );
        assert_eq!(aggregation_of(Some("1"), large), tree);
        assert_eq!(aggregation_of(Some("4096"), small), Aggregation::AllToAll);
        assert_eq!(aggregation_of(Some("lots"), large), tree);
    }

    /// Only the member asked speaks, only for this run and this plan; what it says
    /// goes into its own figures, never into the run's totals.
    #[test]
    fn a_members_own_totals_are_taken_only_from_itself_and_only_per_member() {
        let mut m = Metrics::new(&layout(1));
        m.series[0].requests = 7;
        let mut agg = RunAggregate::new(layout(1));
        assert!(
            add_own_to(&mut agg, RUN, "a", &own("b", &m)).is_err(),
            "b for a"
        );
        let mut other_run = own("a", &m);
        other_run.run_id = "6932a8b2-0f3d".into();
        assert!(add_own_to(&mut agg, RUN, "a", &other_run).is_err());
        let other_plan = own("a", &Metrics::new(&layout(2)));
        assert!(add_own_to(&mut agg, RUN, "a", &other_plan).is_err());
        let mut garbage = own("a", &m);
        garbage.metrics = vec![0xff; 40];
        assert!(add_own_to(&mut agg, RUN, "a", &garbage).is_err());
        assert!(agg.nodes.is_empty());

        add_own_to(&mut agg, RUN, "a", &own("a", &m)).unwrap();
        assert_eq!(agg.metrics(&agg.nodes["a"].totals).total_requests(), 7);
        assert_eq!(
            agg.metrics(&agg.totals).total_requests(),
            0,
            "run totals untouched"
        );
        // Asked again (a retry that crossed an answer): replaced, not added.
        add_own_to(&mut agg, RUN, "a", &own("a", &m)).unwrap();
        assert_eq!(agg.metrics(&agg.nodes["a"].totals).total_requests(), 7);
    }

    /// A member's answer for a three-day run stays within the bounds its asker holds
    /// it to (points, bytes under the response frame), and its timeline holds every
    /// request of its totals.
    #[test]
    fn a_three_day_members_own_answer_stays_within_its_bounds() {
        let layout = layout(1);
        let mut part = OwnPart::new(&layout, None);
        let days = 3 * 86_400;
        let mut requests = 0;
        for second in 0..days {
            let mut m = Metrics::new(&layout);
            // A request every 10 minutes keeps this quick; every bucket of every
            // tier still has something in it.
            if second % 600 == 0 {
                m.series[0].requests = 1;
                m.series[0].latency.record(1_000 + second % 7);
                requests += 1;
            }
            part.add(
                &NodeSecond {
                    second,
                    metrics: m,
                    vus: 1,
                },
                0.1,
            );
        }
        part.totals.timeline.finish();
        let record = OwnRecord {
            node: "a".into(),
            totals: part.totals.totals.packed().as_bytes().to_vec(),
            seconds: part.totals.seconds,
            vus: part.totals.vus,
            cpu: part.cpu,
            timeline: part.totals.timeline,
        };
        let answer = record.answer(RUN, days);
        let bytes = stampede_protocol::mesh::to_cbor(&stampede_protocol::mesh::MeshResponse::Run(
            answer.clone(),
        ));
        let RunResponse::Own(o) = answer else {
            panic!("not an own answer: {answer:?}");
        };
        o.validate().unwrap();
        eprintln!(
            "three days: {} points, {} bytes on the wire",
            o.timeline.len(),
            bytes.len()
        );
        assert!(o.timeline.len() <= stampede_protocol::run::MAX_OWN_POINTS);
        // A worst case of MAX_MEMBERS such answers stays a bounded total.
        assert!(bytes.len() < 1 << 20, "{} bytes", bytes.len());
        let in_timeline: u64 = o.timeline.iter().map(|p| p.requests).sum();
        assert_eq!((o.seconds, in_timeline), (days, requests));
        let mut agg = RunAggregate::new(layout.clone());
        add_own_to(&mut agg, RUN, "a", &o).unwrap();
        assert_eq!(
            agg.metrics(&agg.nodes["a"].totals).total_requests(),
            requests
        );
        assert_eq!(agg.report_node_timeline("a"), o.timeline);
    }
}
