//! Carrying out the state machine's effects: the I/O half of the driver (publishing,
//! tasks, the engine, merging measurements, the report).
//!
//! Must not make protocol decisions: each effect is done as asked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stampede_protocol::machine::events::RunEvent;
use stampede_protocol::machine::{Effect, Progress, ReportFacts};
use stampede_protocol::mesh::{GossipBody, MeshRequest, NodeState};
use stampede_protocol::run::RunRequest;
use stampede_protocol::snapshot::Metrics;
use tokio::sync::mpsc;

use super::{publish, tasks, Driver, EngineNews};
use crate::engine::cpu::CpuSampler;
use crate::engine::{Engine, LiveAssignment, RunSpec, Split, Stop};
use crate::http::Shared;
use crate::mesh::MeshCommand;
use crate::reports::aggregate::{NodeCollector, NodeSecond};
use crate::reports::summary::{self, Event, NodeInfo, SummaryInput};
use crate::run::embedded::client_settings;

/// How long after the start instant a node takes up its workers' start stamp and
/// reports it: long enough that nothing but the workers runs at the instant itself.
const START_SETTLE: Duration = Duration::from_millis(20);

impl Driver {
    pub(super) fn execute(&mut self, run_id: &str, effects: Vec<Effect>) {
        let traced = super::timeline::on().then(super::unix_us);
        for e in effects {
            if let Some(now) = traced {
                super::timeline::effect(run_id, &e, now);
            }
            self.effect(run_id, e);
        }
    }

    fn tell(&self, run_id: &str, line: serde_json::Value) {
        if let Some(c) = self.runs.get(run_id).and_then(|r| r.client.as_ref()) {
            let _ = c.progress.send(line);
        }
    }

    fn effect(&mut self, run_id: &str, e: Effect) {
        match e {
            Effect::Publish(msg) => publish(
                &self.mesh,
                GossipBody::Run(Box::new(msg.as_ref().clone())),
                false,
            ),
            Effect::Send { to, msg } => {
                let Ok(peer) = to.parse::<libp2p::PeerId>() else {
                    return;
                };
                let request = MeshRequest::Run(RunRequest::Message {
                    // Stamped again by the event loop with the version it speaks.
                    protocol_version: stampede_protocol::mesh::PROTOCOL_VERSION,
                    msg: Box::new(msg.as_ref().clone()),
                });
                // Best effort, like gossip: a heartbeat lost to a full queue is
                // repaired by the next one.
                let _ = self.mesh.try_send(MeshCommand::Send { peer, request });
            }
            Effect::FetchBundle { origin } => {
                let hash = self
                    .runs
                    .get(run_id)
                    .map(|r| r.machine.bundle_hash().to_string())
                    .unwrap_or_default();
                tasks::fetch_bundle(
                    self.mesh.clone(),
                    self.tasks_tx.clone(),
                    run_id.to_string(),
                    origin,
                    hash,
                    self.me.data_dir.clone(),
                    self.me.allow_targets.clone(),
                );
            }
            Effect::SyncClock { peer } => tasks::sync_clock(
                self.mesh.clone(),
                self.tasks_tx.clone(),
                run_id.into(),
                peer,
            ),
            Effect::StartEngine {
                split,
                start_local_wall_us,
                index,
            } => self.start_engine(run_id, split, start_local_wall_us, index),
            Effect::SwapSplit(split) => {
                tracing::debug!(run = run_id, "split swapped");
                if let Some(live) = self.runs.get(run_id).and_then(|r| r.live_split.clone()) {
                    live.replace(split);
                }
            }
            Effect::Claims(claims) => {
                if let Some(r) = self.runs.get(run_id) {
                    r.lease.allow(&claims);
                }
            }
            Effect::Lease(until) => {
                tracing::debug!(run = run_id, ?until, now = self.now().mono_us, "lease");
                if let Some(r) = self.runs.get(run_id) {
                    r.lease.set(until);
                }
            }
            Effect::StopEngine(_) => {
                if let Some(e) = self.runs.get(run_id).and_then(|r| r.engine.as_ref()) {
                    e.stop(Stop::Graceful);
                }
            }
            Effect::PublishSnapshot { seq } => {
                if let Some(s) = self.current.clone().filter(|s| s.seq == seq) {
                    publish(&self.mesh, GossipBody::Snapshot(Box::new(s)), true);
                }
            }
            Effect::Merge { node, seq } => self.merge(run_id, &node, seq),
            Effect::SendSnapshot { seq, to } => self.send_snapshot(run_id, seq, &to),
            Effect::Hold { seq, own } => self.hold(run_id, seq, own),
            Effect::Forward { seq, to, covers } => self.forward(run_id, seq, to, &covers),
            Effect::MergeBatch { seq, covers } => self.merge_batch(run_id, seq, covers.len()),
            // Its own seconds (a reporter merges them from a root's merges, like
            // everyone's): from its own store, not over the network.
            Effect::Fetch { node, seqs } if node == self.me.id => {
                if let stampede_protocol::run::RunResponse::Snapshots { snapshots, missing } =
                    self.store.respond(RunRequest::Snapshots {
                        run_id: run_id.to_string(),
                        node: node.clone(),
                        seqs,
                    })
                {
                    let _ = self.tasks_tx.send(tasks::Done::Fetched {
                        run_id: run_id.to_string(),
                        node,
                        snapshots,
                        missing,
                    });
                }
            }
            Effect::FetchOwn { node, end } => self.fetch_own(run_id, node, end),
            Effect::Fetch { node, seqs } => tasks::fetch_seconds(
                self.mesh.clone(),
                self.tasks_tx.clone(),
                run_id.into(),
                node,
                seqs,
            ),
            Effect::Event { t, event } => self.record(run_id, t, event),
            Effect::Progress(p) => {
                let mut line = progress_line(&p);
                line["run_id"] = run_id.into();
                self.tell(run_id, line);
            }
            Effect::Report(facts) => self.report(run_id, facts),
            Effect::Aborted(reason) => {
                if let Some(c) = self.runs.get_mut(run_id).and_then(|r| r.client.take()) {
                    let _ = c.done.send(Err(reason));
                }
            }
            Effect::Busy(busy) => {
                let state = if busy {
                    NodeState::Running
                } else {
                    NodeState::Idle
                };
                let _ = self.mesh.try_send(MeshCommand::SetState(state));
            }
            Effect::Done => {
                if let Some(r) = self.runs.get_mut(run_id) {
                    r.finished_at = Some(Instant::now());
                    r.ended_s.get_or_insert(
                        r.machine
                            .version()
                            .map(|v| {
                                (super::unix_us() as i64 - v.start_unix_us as i64).max(0) as f64
                                    / 1e6
                            })
                            .unwrap_or(0.0),
                    );
                    if let Some(c) = r.client.take() {
                        // Done without a report (not a reporter, or aborted).
                        let _ = c.done.send(Err("the run ended without a report".into()));
                    }
                }
                self.mirror_live(run_id);
            }
        }
    }

    fn record(&mut self, run_id: &str, t: f64, event: RunEvent) {
        let ev = Event { t, event };
        if let Some(r) = self.runs.get_mut(run_id) {
            if let Some(c) = &r.client {
                let _ = c.progress.send(serde_json::json!({ "run_event": &ev }));
            }
            r.events.push(ev);
        }
    }

    /// Puts the current snapshot into the run's aggregate and the live view.
    fn merge(&mut self, run_id: &str, node: &str, seq: u64) {
        let Some(s) = self
            .current
            .clone()
            .filter(|s| s.node == node && s.seq == seq)
        else {
            return;
        };
        if let Err(e) = self.results.append_snapshot(&s) {
            tracing::warn!(error = %e, "snapshot not logged");
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let node_name = run.machine.name_of(node);
        let live_nodes = live_members(&run.machine);
        let Some(agg) = run.agg.as_mut() else { return };
        let metrics = match Metrics::decode(&s.metrics) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(node = %s.node, error = %e, "snapshot refused");
                return;
            }
        };
        let second = NodeSecond {
            second: s.seq,
            metrics,
            vus: s.vus,
        };
        // With tree aggregation a snapshot merged one by one is a second the tree did
        // not bring (the end's re-fetch): into the run's totals only. A member's own
        // figures come whole from the member (`add_own`); adding the second there
        // too would count it twice, or leave a member's part made of gaps alone.
        let tree = run.machine.tree().is_some();
        let added = if tree {
            agg.add_merged(s.seq, &second.metrics, s.vus, 1)
        } else {
            agg.add(&s.node, &second)
        };
        if let Err(e) = added {
            tracing::warn!(node = %s.node, error = %e, "snapshot does not fit the plan");
            return;
        }
        if !tree {
            let cpu = run.cpu_max.entry(s.node.clone()).or_insert(0.0);
            *cpu = cpu.max(s.cpu);
        }
        let node_point = crate::reports::aggregate::point(s.seq, &second.metrics, s.vus, 1);
        let latest = agg.latest_complete(live_nodes);
        let totals = agg.totals.packed().clone();
        let node_totals = agg.nodes.get(&s.node).map(|n| n.totals.packed().clone());
        // The coarse history of a long run (before the live view's recent minutes) is
        // rebuilt once a minute of run time, keyed by node name for the dashboard.
        let minute = agg.end() / 60;
        let history = (minute > run.history_minute).then(|| {
            run.history_minute = minute;
            let (merged, per_node) = agg.live_history(crate::reports::live::KEEP_SECONDS as u64);
            let per_node: BTreeMap<String, _> = per_node
                .into_iter()
                .map(|(id, points)| (run.machine.name_of(&id), points))
                .collect();
            (merged, per_node)
        });
        self.live.update(run_id, run.machine.plan_name(), |l| {
            if let Some((merged, per_node)) = history {
                l.set_history(merged, per_node);
            }
            if !tree {
                l.push_node_point(&node_name, node_point);
            }
            if let Some(p) = latest.clone() {
                l.push_point(p);
            }
            l.totals = Some(totals);
            if let Some(nt) = node_totals {
                l.node_totals.insert(node_name.clone(), nt);
            }
        });
        if let (Some(c), Some(p)) = (&run.client, latest) {
            let _ = c
                .progress
                .send(serde_json::json!({"progress": p, "nodes": live_nodes}));
        }
        self.check_abort(run_id);
    }

    /// Puts the batch at hand (a root's merge of second `seq` over `members`
    /// members) into the run's aggregate and the live view: the run's totals and
    /// timeline only (it carries no per-member figures).
    fn merge_batch(&mut self, run_id: &str, seq: u64, members: usize) {
        let Some(b) = self
            .current_batch
            .clone()
            .filter(|b| b.run_id == run_id && b.seq == seq)
        else {
            return;
        };
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let live_nodes = live_members(&run.machine);
        let Some(agg) = run.agg.as_mut() else { return };
        let metrics = match Metrics::decode(&b.metrics) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(run = run_id, seq, error = %e, "merged second refused");
                return;
            }
        };
        if let Err(e) = agg.add_merged(seq, &metrics, b.vus, members) {
            tracing::warn!(run = run_id, seq, error = %e, "merged second does not fit the plan");
            return;
        }
        let latest = agg.latest_complete(live_nodes);
        let totals = agg.totals.packed().clone();
        self.live.update(run_id, run.machine.plan_name(), |l| {
            if let Some(p) = latest.clone() {
                l.push_point(p);
            }
            l.totals = Some(totals);
        });
        if let (Some(c), Some(p)) = (&run.client, latest) {
            let _ = c
                .progress
                .send(serde_json::json!({"progress": p, "nodes": live_nodes}));
        }
        self.check_abort(run_id);
    }

    /// Judges abort-on-fail thresholds on the merged data, on the node whose CLI
    /// waits (the origin), and stops the run everywhere if one failed.
    fn check_abort(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        // Thresholds with abort_on_fail are judged on the merged data by the node
        // whose CLI waits for the run (the origin); the stop reaches every node.
        let abort = match (&run.client, &run.plan, &run.agg) {
            (Some(_), Some(plan), Some(agg)) if run.machine.stopped().is_none() => {
                let elapsed = run
                    .machine
                    .version()
                    .map(|v| (super::unix_us() as i64 - v.start_unix_us as i64).max(0) as u64)
                    .unwrap_or(0);
                let per_node = run.machine.tree().is_none();
                // Names and labels, for thresholds filtered by node or label.
                let nodes: Vec<NodeInfo> = run
                    .machine
                    .roster()
                    .iter()
                    .map(|r| NodeInfo {
                        id: r.id.clone(),
                        name: r.name.clone(),
                        labels: r.labels.clone(),
                        ..Default::default()
                    })
                    .collect();
                crate::reports::abort::check(
                    &plan.plan,
                    agg,
                    &nodes,
                    Duration::from_micros(elapsed),
                    per_node,
                )
            }
            _ => None,
        };
        if let Some(r) = abort {
            let message = r.message();
            tracing::warn!(run = run_id, %message, "threshold with abort_on_fail failed: stopping the run");
            self.record(
                run_id,
                r.at.as_secs_f64(),
                RunEvent::ThresholdAbort {
                    message: message.clone(),
                },
            );
            self.input(
                run_id,
                stampede_protocol::machine::Input::Command(
                    stampede_protocol::machine::Command::Stop { reason: message },
                ),
            );
        }
    }

    fn start_engine(&mut self, run_id: &str, split: Split, start_local_wall_us: u64, index: usize) {
        let workers = self.me.workers.max(1);
        let (allow, graceful, name) = (
            self.me.allow_targets.clone(),
            self.me.graceful_stop,
            self.me.name.clone(),
        );
        let engine_tx = self.engine_tx.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(plan) = run.plan.clone() else {
            let _ = engine_tx.send(EngineNews::Failed {
                run_id: run_id.into(),
                error: "the run's plan is missing".into(),
            });
            return;
        };
        let now_us = super::unix_us() as i64;
        let start_at = Instant::now()
            + Duration::from_micros((start_local_wall_us as i64 - now_us).max(0) as u64);
        let http = match client_settings(&plan, &allow)
            .and_then(|s| Shared::new(s).map_err(|e| e.to_string()))
        {
            Ok(h) => h,
            Err(e) => {
                let _ = engine_tx.send(EngineNews::Failed {
                    run_id: run_id.into(),
                    error: format!("cannot configure HTTP for the run: {e}"),
                });
                return;
            }
        };
        let live = LiveAssignment::new(split);
        run.live_split = Some(live.clone());
        run.counted = Some(crate::engine::counted_of(&plan).len()).filter(|&n| n > 0);
        run.workers = workers;
        let spec = RunSpec {
            plan: plan.clone(),
            assignment: live,
            lease: run.lease.clone(),
            node: index,
            node_name: name.clone(),
            workers,
            http,
            start_at,
            graceful_stop: graceful,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let engine = match Engine::start(spec, tx) {
            Ok(e) => e,
            Err(e) => {
                let _ = engine_tx.send(EngineNews::Failed {
                    run_id: run_id.into(),
                    error: format!("cannot start the engine: {e}"),
                });
                return;
            }
        };
        run.engine = Some(engine.stop.clone());
        run.collector = Some(NodeCollector::new(plan.layout.clone(), workers));
        if run.machine.tree().is_some() {
            run.own = Some(super::tree::OwnPart::new(
                &plan.layout,
                Some(self.me.data_dir.as_path().into()),
            ));
        }
        run.cpu = CpuSampler::default();
        let rid = run_id.to_string();
        let mut engine_started = engine.started.clone();
        let settled = tokio::time::Instant::from_std(start_at + START_SETTLE);
        tokio::spawn(async move {
            // Not woken by the stamp itself: this task, the driver and the mesh taking
            // it up at the start instant would compete with the workers.
            tokio::time::sleep_until(settled).await;
            let at = match engine_started.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or_else(super::unix_us),
                Err(_) => super::unix_us(),
            };
            let _ = engine_tx.send(EngineNews::Started {
                run_id: rid.clone(),
                at_wall_us: at,
            });
            while let Some(report) = rx.recv().await {
                let _ = engine_tx.send(EngineNews::Report {
                    run_id: rid.clone(),
                    report,
                });
            }
        });
        // The engine's threads end by themselves; join them off the driver.
        std::thread::spawn(move || engine.join());
    }

    /// Builds the summary from the aggregate and the machine's facts, keeps it, and
    /// hands it to the CLI if one waits.
    fn report(&mut self, run_id: &str, facts: ReportFacts) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let client = run.client.take();
        let fail = |client: Option<super::ClientLink>, why: &str| {
            if let Some(c) = client {
                let _ = c.done.send(Err(why.to_string()));
            }
        };
        let (Some(agg), Some(plan)) = (run.agg.as_mut(), run.plan.clone()) else {
            fail(client, "the run has no measurements");
            return;
        };
        agg.finish();
        let nodes: Vec<NodeInfo> = facts
            .members
            .iter()
            .map(|m| NodeInfo {
                id: m.id.clone(),
                name: m.name.clone(),
                labels: m.labels.clone(),
                status: m.status.name().into(),
                cpu: run.cpu_max.get(&m.id).copied().unwrap_or(0.0),
                start_late_us: m.start_late_us,
                clock_offset_us: m.clock_offset_us,
            })
            .collect();
        run.ended_s = Some(facts.duration_s);
        let summary = summary::build(
            agg,
            SummaryInput {
                run_id,
                plan: &plan.plan,
                started_at_unix_ms: facts
                    .start_unix_us
                    .map(|u| u / 1000)
                    .unwrap_or(run.started_unix_ms),
                duration_s: facts.duration_s,
                nodes: &nodes,
                events: run.events.clone(),
                start_skew_us: facts.start_skew_us,
                plan_source: &plan.source,
            },
        );
        // With tree aggregation the live view had the run's merged seconds only; the
        // members' own totals, fetched for the report, give it (and /metrics, by node
        // and label) its per-member figures from now on.
        let own_totals: Option<BTreeMap<String, _>> = run.machine.tree().map(|_| {
            agg.nodes
                .iter()
                .map(|(id, nt)| (run.machine.name_of(id), nt.totals.packed().clone()))
                .collect()
        });
        if let Some(node_totals) = own_totals {
            self.live.update(run_id, run.machine.plan_name(), |l| {
                l.node_totals = node_totals;
            });
        }
        if let Err(e) = self.results.save_summary(&summary) {
            tracing::error!(run = %run_id, error = %e, "the summary was not saved");
        }
        self.live.finish(summary.clone());
        if let Some(c) = client {
            let _ = c.done.send(Ok(summary));
        }
    }
}

/// A progress note as a CLI line.
fn progress_line(p: &Progress) -> serde_json::Value {
    match p {
        Progress::Proposed { asked } => serde_json::json!({"event": "proposed", "asked": asked}),
        Progress::Refused { node, reason } => {
            serde_json::json!({"event": "refused", "node": node, "reason": reason})
        }
        Progress::Roster {
            members,
            leader,
            refused,
        } => {
            serde_json::json!({"event": "roster", "members": members, "leader": leader, "refused": refused})
        }
        Progress::Assigned { index, duration_s } => {
            serde_json::json!({"event": "assigned", "index": index, "duration_s": duration_s})
        }
        Progress::Started {
            nodes,
            start_skew_us,
            start_late_us,
        } => {
            serde_json::json!({"event": "started", "nodes": nodes, "start_skew_us": start_skew_us, "start_late_us": start_late_us})
        }
    }
}

/// Roster members not lost: how many nodes a second must have to be complete, and the
/// node count the CLI's progress line shows.
fn live_members(m: &stampede_protocol::machine::RunMachine) -> usize {
    (0..m.roster().len())
        .filter(|&i| m.member_status(i) != stampede_protocol::machine::events::MemberStatus::Lost)
        .count()
}
