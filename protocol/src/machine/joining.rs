//! Joining a run: the origin proposes and collects joins, members fetch and check the
//! plan and answer, the origin closes the join phase with a roster (or an abort).
//!
//! Authority: a roster and an abort count only from the run's origin (the signer of
//! its proposal); a join counts only on the origin, once per node.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::events::Barrier;
use super::{JoinInfo, Me, Now, Peer, Phase, Progress, RunMachine, RunSchedule, Timing};
use crate::run::{clip_reason, BarrierDetail, Requirements, RosterEntry, RunMessage};
use crate::run::{MAX_MEMBERS, MAX_REASON};

use crate::run::MAX_WEIGHT;

impl RunMachine {
    /// The machine of the node whose CLI started the run: it proposes to `asked`
    /// (everyone it sees alive) and prepares its own bundle (the node answers
    /// `Prepared`).
    #[allow(clippy::too_many_arguments)]
    pub fn new_origin(
        me: Me,
        run_id: &str,
        bundle_hash: &str,
        plan_name: &str,
        requirements: Requirements,
        asked: BTreeSet<String>,
        timing: Timing,
        now: Now,
    ) -> (RunMachine, Vec<super::Effect>) {
        let id = me.id.clone();
        let mut m = RunMachine::blank(
            me,
            run_id,
            &id,
            bundle_hash,
            plan_name,
            requirements.clone(),
            timing,
            now,
        );
        m.expected = asked;
        m.expected.insert(id.clone());
        // The run clock is the origin's own wall clock.
        m.clock_synced = true;
        let asked = m.expected.len();
        m.out
            .push(super::Effect::Progress(Progress::Proposed { asked }));
        let p = m.publish(RunMessage::Propose {
            run_id: run_id.into(),
            origin: id,
            bundle_hash: bundle_hash.into(),
            plan: plan_name.into(),
            requirements,
        });
        m.propose_msg = Some(p);
        m.join_sent = now.mono_us;
        let out = std::mem::take(&mut m.out);
        (m, out)
    }

    /// The machine of a node that heard a proposal from `from`; `busy_with` is the
    /// run this node is committed to, if any (it then refuses by name). `None` when
    /// the proposal is not one to answer (its origin is not its signer).
    pub fn new_member(
        me: Me,
        from: &str,
        propose: &RunMessage,
        busy_with: Option<&str>,
        timing: Timing,
        now: Now,
    ) -> Option<(RunMachine, Vec<super::Effect>)> {
        let RunMessage::Propose {
            run_id,
            origin,
            bundle_hash,
            plan,
            requirements,
        } = propose
        else {
            return None;
        };
        if origin != from {
            return None;
        }
        let mut m = RunMachine::blank(
            me,
            run_id,
            origin,
            bundle_hash,
            plan,
            requirements.clone(),
            timing,
            now,
        );
        match busy_with {
            Some(other) => {
                let join = m.join_msg(false, Some(format!("busy with run {other}")));
                m.send_to_origin(join);
                m.phase = super::Phase::Done;
            }
            None => {
                m.out.push(super::Effect::FetchBundle {
                    origin: origin.clone(),
                });
                // The run clock is the origin's: its samples are taken now, beside the
                // bundle's fetch and while the others join, not after the roster (at
                // 50 real nodes that was 0.4–0.7 s between the roster and `ready`,
                // most of it every member dialing the first roster member at once).
                m.out.push(super::Effect::SyncClock {
                    peer: origin.clone(),
                });
            }
        }
        let out = std::mem::take(&mut m.out);
        Some((m, out))
    }

    /// Joins go to the origin only, directly: it alone collects them, and gossiping
    /// them would cost every node of a large mesh every other node's join.
    fn send_to_origin(&mut self, msg: RunMessage) -> Arc<RunMessage> {
        let msg = Arc::new(msg);
        if self.origin != self.me.id {
            self.out.push(super::Effect::Send {
                to: self.origin.clone(),
                msg: msg.clone(),
            });
        }
        msg
    }

    fn join_msg(&self, accept: bool, reason: Option<String>) -> RunMessage {
        RunMessage::Join {
            run_id: self.run_id.clone(),
            accept,
            // A plan error can be long; cut, it still names the problem.
            reason: reason.map(clip_reason),
            name: self.me.name.clone(),
            labels: self.me.labels.clone(),
            weight: self.me.weight.clamp(1, MAX_WEIGHT),
        }
    }

    pub(super) fn on_prepared(&mut self, result: Result<Arc<dyn RunSchedule>, String>, now: Now) {
        if self.phase != Phase::Joining || self.my_join.is_some() {
            return;
        }
        let join = match result {
            Ok(schedule) => {
                self.counted = schedule.counted();
                self.counted.truncate(super::version::MAX_COUNTED);
                self.my_claims = Arc::new(vec![0; self.counted.len()]);
                self.schedule = Some(schedule);
                self.accepted = true;
                self.join_msg(true, None)
            }
            Err(why) => self.join_msg(false, Some(why)),
        };
        let msg = self.send_to_origin(join);
        self.my_join = Some(msg.clone());
        self.join_sent = now.mono_us;
        let me = self.me.id.clone();
        self.on_join(&me, &msg, now);
    }

    pub(super) fn on_join(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Join {
            accept,
            reason,
            name,
            labels,
            weight,
            ..
        } = msg
        else {
            return;
        };
        if self.origin != self.me.id
            || self.phase != Phase::Joining
            || self.joins.contains_key(from)
            || self.joins.len() >= MAX_MEMBERS
        {
            return;
        }
        if !accept {
            self.out.push(super::Effect::Progress(Progress::Refused {
                node: name.clone(),
                reason: reason.clone().unwrap_or_default(),
            }));
        }
        self.joins.insert(
            from.to_string(),
            JoinInfo {
                accept: *accept,
                reason: reason.clone(),
                name: name.clone(),
                labels: labels.clone(),
                weight: (*weight).clamp(1, MAX_WEIGHT),
            },
        );
        self.maybe_close_joins(now);
    }

    pub(super) fn on_peer_gone(&mut self, peer: &str, now: Now) {
        if peer == self.origin {
            self.origin_silent = true;
        }
        if self.phase != Phase::Joining {
            return;
        }
        if peer == self.origin && self.origin != self.me.id {
            // A proposal whose origin died before its roster will never start.
            self.set_done();
            return;
        }
        if self.origin == self.me.id {
            self.expected.remove(peer);
            self.maybe_close_joins(now);
        }
    }

    /// Joining on a tick: the origin's window, a member's republished join, and a
    /// member that never hears a roster giving up.
    pub(super) fn joining_tick(&mut self, now: Now) {
        if self.origin == self.me.id {
            // The proposal goes out again while the window is open: a node that
            // missed it would be left out of the run for nothing.
            if let Some(p) = self.propose_msg.clone() {
                if now.mono_us.saturating_sub(self.join_sent) >= self.timing.republish_us {
                    self.join_sent = now.mono_us;
                    self.out.push(super::Effect::Publish(p));
                }
            }
            self.maybe_close_joins(now);
            return;
        }
        if let Some(j) = self.my_join.clone() {
            if now.mono_us.saturating_sub(self.join_sent) >= self.timing.republish_us {
                self.join_sent = now.mono_us;
                self.out.push(super::Effect::Send {
                    to: self.origin.clone(),
                    msg: j,
                });
            }
        }
        if now.mono_us > self.join_deadline + 3 * self.timing.join_window_us {
            self.set_done();
        }
    }

    fn maybe_close_joins(&mut self, now: Now) {
        if self.origin != self.me.id || self.phase != Phase::Joining {
            return;
        }
        let all_answered = self.expected.iter().all(|p| self.joins.contains_key(p));
        if !all_answered && now.mono_us < self.join_deadline {
            return;
        }
        let mut members = Vec::new();
        let mut refused = Vec::new();
        for (id, j) in &self.joins {
            let labels_ok = self
                .requirements
                .labels
                .iter()
                .all(|(k, v)| j.labels.get(k) == Some(v));
            if j.accept && labels_ok {
                members.push(RosterEntry {
                    id: id.clone(),
                    name: j.name.clone(),
                    labels: j.labels.clone(),
                    weight: j.weight,
                });
            } else {
                let why = if !labels_ok {
                    "labels do not match the run's selector".to_string()
                } else {
                    j.reason.clone().unwrap_or_default()
                };
                refused.push((j.name.clone(), why));
            }
        }
        for p in &self.expected {
            if !self.joins.contains_key(p) {
                refused.push((p.clone(), "did not answer in time".into()));
            }
        }
        let min = self.requirements.min_nodes.max(1) as usize;
        let list = |r: &[(String, String)]| {
            r.iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let abort = if self.requirements.require_all && !refused.is_empty() {
            Some(format!(
                "the plan requires all nodes, and {} refused: {}",
                refused.len(),
                list(&refused)
            ))
        } else if members.len() < min {
            Some(format!(
                "{} node(s) accepted, the run needs {min}{}",
                members.len(),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!(" (refused: {})", list(&refused))
                }
            ))
        } else {
            None
        };
        if let Some(reason) = abort {
            let reason = clip_reason(reason);
            self.publish(RunMessage::Abort {
                run_id: self.run_id.clone(),
                reason: reason.clone(),
            });
            self.out.push(super::Effect::Aborted(reason));
            self.set_done();
            return;
        }
        // Sorted by id: every member derives the same indices, and the election rule
        // names the same leader for every term.
        members.sort_by(|a, b| a.id.cmp(&b.id));
        refused.truncate(MAX_MEMBERS);
        for r in &mut refused {
            r.1.truncate(MAX_REASON);
        }
        let fan_in = match self.aggregation {
            super::Aggregation::Tree { fan_in } => fan_in.min(MAX_MEMBERS) as u32,
            super::Aggregation::AllToAll => 0,
        };
        let msg = RunMessage::Roster {
            run_id: self.run_id.clone(),
            members,
            refused,
            fan_in,
        };
        let msg = self.publish(msg);
        self.roster_msg = Some(msg.clone());
        let me = self.me.id.clone();
        self.on_roster(&me, &msg, now);
    }

    pub(super) fn on_roster(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Roster {
            members,
            refused,
            fan_in,
            ..
        } = msg
        else {
            return;
        };
        if from != self.origin || !self.roster.is_empty() || self.phase != Phase::Joining {
            return;
        }
        let mut ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        ids.dedup();
        if members.is_empty()
            || members.len() > MAX_MEMBERS
            || ids.len() != members.len()
            || !members.windows(2).all(|w| w[0].id < w[1].id)
        {
            return;
        }
        self.roster = members.clone();
        self.index = self
            .roster
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        self.my_index = self.index_of(&self.me.id);
        let n = self.roster.len();
        self.peers = vec![
            Peer {
                last_heard: now.mono_us,
                ..Default::default()
            };
            n
        ];
        self.fence_count = vec![0; n];
        self.witnesses =
            super::liveness::choose_witnesses(&self.roster, &self.run_id, &self.origin);
        self.seen = vec![Default::default(); n];
        self.absent = vec![Default::default(); n];
        self.own = vec![Default::default(); n];
        // Every member aggregates the way the origin chose.
        self.set_aggregation(match *fan_in {
            0 => super::Aggregation::AllToAll,
            f => super::Aggregation::Tree { fan_in: f as usize },
        });
        self.build_tree();
        self.term = 1;
        self.phase = Phase::Ready;
        if self.origin == self.me.id {
            let names = self.roster.iter().map(|m| m.name.clone()).collect();
            let leader = self.roster[self.witnesses[0]].name.clone();
            self.out.push(super::Effect::Progress(Progress::Roster {
                members: names,
                leader,
                refused: refused.clone(),
            }));
        }
        if self.my_index.is_none() {
            if self.origin != self.me.id {
                // Not part of it: forget it.
                self.set_done();
            }
            return;
        }
        if !self.accepted {
            self.set_done();
            return;
        }
        // Offsets are to the run clock, the origin's wall clock (the reference
        // whoever leads, and whether or not the origin lives on): taken while joining.
        if !self.arrive_ready(now) {
            self.send_beat(now);
        }
    }

    /// Arrives at `ready` (which sends a heartbeat) once this node is in the roster
    /// and has its clock offset; false if it cannot yet.
    pub(super) fn arrive_ready(&mut self, now: Now) -> bool {
        if self.my_index.is_none() || !self.clock_synced || !self.accepted {
            return false;
        }
        self.arrive(
            Barrier::Ready,
            BarrierDetail {
                clock_offset_us: Some(self.clock_offset_us),
                ..Default::default()
            },
            now,
        );
        true
    }

    pub(super) fn on_abort(&mut self, from: &str, reason: &str) {
        if from == self.origin && self.phase < Phase::Running {
            self.out.push(super::Effect::Aborted(reason.to_string()));
            self.set_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Effect, Input};
    use super::*;

    const RUN: &str = "6932a8b2-0f3c";

    fn now(t_us: u64) -> Now {
        Now {
            mono_us: 5_000_000 + t_us,
            wall_us: 1_000_000_000_000 + t_us,
        }
    }

    fn me(id: &str) -> Me {
        Me {
            id: id.into(),
            name: id.into(),
            labels: Default::default(),
            weight: 1,
        }
    }

    fn roster(ids: &[&str]) -> RunMessage {
        RunMessage::Roster {
            run_id: RUN.into(),
            members: ids
                .iter()
                .map(|id| RosterEntry {
                    id: (*id).into(),
                    name: (*id).into(),
                    labels: Default::default(),
                    weight: 1,
                })
                .collect(),
            refused: Vec::new(),
            fan_in: 0,
        }
    }

    struct Plan;
    impl RunSchedule for Plan {
        fn first_event_at(&self, _: u64) -> u64 {
            0
        }
        fn duration_us(&self) -> u64 {
            10_000_000
        }
    }

    fn ready_in_beats(effects: &[Effect]) -> Vec<Option<i64>> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { msg, .. } => match msg.as_ref() {
                    RunMessage::Beat { arrived, .. } => Some(arrived.clone()),
                    _ => None,
                },
                _ => None,
            })
            .flatten()
            .filter(|(b, _)| *b == Barrier::Ready)
            .map(|(_, d)| d.clock_offset_us)
            .collect()
    }

    /// Member p0001 as it hears p0002's proposal, and what it does at once.
    fn member_of_p0002() -> (RunMachine, Vec<Effect>) {
        let propose = RunMessage::Propose {
            run_id: RUN.into(),
            origin: "p0002".into(),
            bundle_hash: "h".into(),
            plan: "p.toml".into(),
            requirements: Requirements::default(),
        };
        RunMachine::new_member(me("p0001"), "p0002", &propose, None, Timing::mesh(), now(0))
            .expect("a proposal from its origin")
    }

    /// The run clock is the origin's: a member samples it as it hears the proposal,
    /// beside the bundle's fetch, and arrives at `ready` as soon as the roster comes
    /// (before, it sampled the first roster member only after the roster: at 50 real
    /// nodes 0.4–0.7 s between the roster and `ready`).
    #[test]
    fn a_member_syncs_with_the_origin_while_joining_and_is_ready_with_the_roster() {
        let (mut m, out) = member_of_p0002();
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::FetchBundle { origin } if origin == "p0002")));
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::SyncClock { peer } if peer == "p0002")),
            "the origin's clock is sampled at once"
        );
        m.handle(Input::Prepared(Ok(Arc::new(Plan))), now(10_000));
        let out = m.handle(Input::ClockSynced { offset_us: -1234 }, now(20_000));
        assert!(
            ready_in_beats(&out).is_empty(),
            "no roster yet: nothing to arrive at"
        );
        // The roster names another member first (whose clock was the reference before).
        let out = m.handle(
            Input::Message {
                from: "p0002".into(),
                msg: Arc::new(roster(&["p0000", "p0001", "p0002"])),
            },
            now(30_000),
        );
        assert!(
            !out.iter().any(|e| matches!(e, Effect::SyncClock { .. })),
            "no second sync after the roster"
        );
        assert_eq!(ready_in_beats(&out), vec![Some(-1234); 2]);
        // A later offset changes nothing: the first counts.
        m.handle(Input::ClockSynced { offset_us: 99 }, now(40_000));
        assert_eq!(m.clock_offset_us, -1234);
    }

    /// A member whose samples come after the roster arrives when they come.
    #[test]
    fn a_member_whose_samples_come_late_arrives_when_they_do() {
        let (mut m, _) = member_of_p0002();
        m.handle(Input::Prepared(Ok(Arc::new(Plan))), now(10_000));
        let out = m.handle(
            Input::Message {
                from: "p0002".into(),
                msg: Arc::new(roster(&["p0000", "p0001", "p0002"])),
            },
            now(30_000),
        );
        assert!(ready_in_beats(&out).is_empty());
        let out = m.handle(Input::ClockSynced { offset_us: 77 }, now(40_000));
        assert_eq!(ready_in_beats(&out), vec![Some(77); 2]);
    }
}
