//! Barriers (ready, started, finished), the engine's milestones, stop, and what is
//! republished until it has done its job.
//!
//! A barrier completes when every member this node does not consider gone has
//! arrived: a silent member is dropped from it (never waited for), and one heard
//! again is waited for again. Arrivals count only from roster members, once each.
//!
//! Must not decide leases or ownership.

use super::events::{Barrier, RunEvent};
use super::{EngineState, Now, Phase, Progress, RunMachine, StopKind};
use crate::run::{clip_reason, BarrierDetail, RunMessage};

impl RunMachine {
    pub(super) fn arrive(&mut self, barrier: Barrier, detail: BarrierDetail, now: Now) {
        let Some(me) = self.my_index else { return };
        if self.my_arrivals.contains_key(&barrier) {
            return;
        }
        self.my_arrivals.insert(barrier, detail.clone());
        self.arrival(me, barrier, &detail, now);
        // Arrivals ride on heartbeats (to the witnesses, who hear every member): one
        // goes now rather than at the next beat, and gossip would cost every node
        // every member's arrival.
        if !self.roster.is_empty() {
            self.send_beat(now);
        }
    }

    pub(super) fn on_arrive(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Arrive {
            barrier, detail, ..
        } = msg
        else {
            return;
        };
        let Some(j) = self.index_of(from) else { return };
        self.arrival(j, *barrier, detail, now);
    }

    /// Member `j` arrived at `barrier` (the first arrival counts).
    pub(super) fn arrival(&mut self, j: usize, barrier: Barrier, detail: &BarrierDetail, now: Now) {
        let arrived = self.arrivals.entry(barrier).or_default();
        if arrived.contains_key(&j) {
            return;
        }
        arrived.insert(j, detail.clone());
        self.complete_here = None;
        if let (Barrier::Finished, Some(error)) = (&barrier, &detail.error) {
            let node = self.roster[j].name.clone();
            self.event(
                now,
                RunEvent::NodeFailed {
                    node,
                    error: error.clone(),
                },
            );
        }
    }

    pub(super) fn barrier_complete(&self, barrier: Barrier) -> bool {
        if self.my_index.is_some() && !self.i_witness() {
            // It hears only the witnesses: their word is what it goes by. Once all of
            // them are silent (done with the run, or lost) there is no one left to
            // wait for.
            return self.told_complete.contains(&barrier)
                || self.witnesses.iter().all(|&w| self.peers[w].gone);
        }
        let arrived = self.arrivals.get(&barrier);
        !self.roster.is_empty()
            && self
                .peers
                .iter()
                .enumerate()
                .all(|(j, p)| p.gone || arrived.is_some_and(|a| a.contains_key(&j)))
    }

    pub(super) fn check_barriers(&mut self, now: Now) {
        if !self.started_told && self.barrier_complete(Barrier::Started) {
            self.started_told = true;
            let starts: Vec<u64> = self.arrivals[&Barrier::Started]
                .values()
                .filter_map(|d| d.started_unix_us)
                .collect();
            if let (Some(lo), Some(hi)) = (starts.iter().min(), starts.iter().max()) {
                // How far after the agreed instant the last node began (run clock).
                let late = self
                    .version
                    .as_ref()
                    .map(|v| *hi as i64 - v.start_unix_us as i64);
                self.out.push(super::Effect::Progress(Progress::Started {
                    nodes: starts.len(),
                    start_skew_us: hi - lo,
                    start_late_us: late,
                }));
            }
        }
        let finished_here = self.my_index.is_none()
            || self.my_arrivals.contains_key(&Barrier::Finished)
            || self.engine == EngineState::Finished;
        if self.phase >= Phase::Running
            && self.phase < Phase::Finishing
            && finished_here
            && self.barrier_complete(Barrier::Finished)
        {
            self.phase = Phase::Finishing;
            self.finishing_since = Some(now.mono_us);
            if self.i_witness() && self.witnesses.len() < self.roster.len() {
                // The members that are not witnesses learn it from this beat; the
                // witness may be done before its next one.
                self.send_beat_to_all(now);
            }
        }
        // An origin outside the roster has no engine: it follows the barriers.
        if self.my_index.is_none() && self.phase == Phase::Ready && self.version.is_some() {
            self.phase = Phase::Running;
        }
    }

    pub(super) fn on_own_second(&mut self, seq: u64, now: Now) {
        if self.tree().is_some() {
            self.tree_own_second(seq, now);
            return;
        }
        let Some(me) = self.my_index else { return };
        if seq < self.published.saturating_sub(1) && self.seen[me].contains(&seq) {
            return;
        }
        self.published = self.published.max(seq + 1);
        self.out.push(super::Effect::PublishSnapshot { seq });
        let id = self.me.id.clone();
        self.on_snapshot(&id, &id, seq, now);
    }

    pub(super) fn on_engine_finished(&mut self, error: Option<String>, now: Now) {
        if self.engine == EngineState::Finished {
            return;
        }
        self.engine = EngineState::Finished;
        if self.phase < Phase::Running {
            self.phase = Phase::Running;
        }
        self.out.push(super::Effect::Busy(false));
        self.out.push(super::Effect::Lease(None));
        let snapshots = if error.is_some() { 0 } else { self.published };
        self.arrive(
            Barrier::Finished,
            BarrierDetail {
                snapshots: Some(snapshots),
                error: error.map(clip_reason),
                ..Default::default()
            },
            now,
        );
    }

    pub(super) fn on_stop_command(&mut self, reason: String, now: Now) {
        let msg = self.publish(RunMessage::Stop {
            run_id: self.run_id.clone(),
            reason: clip_reason(reason),
        });
        self.stop_msg = Some(msg.clone());
        self.stop_sent = now.mono_us;
        let me = self.me.id.clone();
        self.on_stop(&me, &msg, now);
    }

    pub(super) fn on_stop(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Stop { reason, .. } = msg else {
            return;
        };
        // Only the run's own nodes may stop it.
        if from != self.origin && self.index_of(from).is_none() {
            return;
        }
        if self.stop.is_some() {
            return;
        }
        self.stop = Some(reason.clone());
        self.event(
            now,
            RunEvent::Stop {
                reason: reason.clone(),
            },
        );
        if self.engine == EngineState::Running {
            self.out.push(super::Effect::StopEngine(StopKind::Graceful));
        }
    }

    /// Best-effort gossip: what others may have missed goes out again.
    pub(super) fn republish(&mut self, now: Now) {
        let every = self.timing.republish_us;
        if let Some(r) = self.roster_msg.clone() {
            if !self.barrier_complete(Barrier::Ready)
                && now.mono_us.saturating_sub(self.join_sent) >= every
            {
                // Again, directly, to the members never heard from since: the roster
                // of a large run is big, and the others have it.
                self.join_sent = now.mono_us;
                for j in 0..self.roster.len() {
                    if Some(j) != self.my_index && self.peers[j].beat_sent == 0 {
                        self.out.push(super::Effect::Send {
                            to: self.roster[j].id.clone(),
                            msg: r.clone(),
                        });
                    }
                }
            }
        }
        if let Some(a) = self.assign_msg.clone() {
            if self.am_leader() && now.mono_us.saturating_sub(self.assign_sent) >= every {
                // Versions go out until the run ends: a member that missed one would
                // keep a stale share (and no lease, with it).
                self.assign_sent = now.mono_us;
                self.out.push(super::Effect::Publish(a));
            }
        }
        if let Some(s) = self.stop_msg.clone() {
            if !self.barrier_complete(Barrier::Finished)
                && now.mono_us.saturating_sub(self.stop_sent) >= every
            {
                self.stop_sent = now.mono_us;
                self.out.push(super::Effect::Publish(s));
            }
        }
    }
}
