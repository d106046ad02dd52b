//! Leadership and assignment versions: the leader of a term adopts the newest version
//! a majority holds, issues the first assignment when `ready` completes, and moves the
//! shares of members a majority has fenced; members accept versions only from the
//! leader the election rule names for their own term.
//!
//! Must not decide liveness (heartbeats do) or start anything without a lease.

use super::events::RunEvent;
use super::version::{Move, Version, VersionId};
use super::{EngineState, Now, Phase, Progress, RunMachine, StopKind};
use crate::run::{BarrierDetail, RunMessage};

impl RunMachine {
    /// The leader's duties, run after every input.
    pub(super) fn lead(&mut self, now: Now) {
        if !self.am_leader() || self.phase >= Phase::Finishing || self.phase < Phase::Ready {
            return;
        }
        if !self.adopted && !self.adopt(now) {
            return;
        }
        if !self.holds_lease(now) {
            // Out of touch with a majority: issuing anything could fork the run.
            return;
        }
        match self.version.clone() {
            None => {
                if self.barrier_complete(super::events::Barrier::Ready) {
                    self.assign_first(now);
                }
            }
            Some(v) => self.move_fenced(v, now),
        }
    }

    /// Adopts the newest version among a majority that has reached this term. True
    /// once done (term 1 has nothing to adopt).
    fn adopt(&mut self, now: Now) -> bool {
        if self.term == 1 {
            self.adopted = true;
            self.next_seq = 0;
            return true;
        }
        let at_term: Vec<usize> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(j, p)| {
                self.witness(*j) && (Some(*j) == self.my_index || (p.term == self.term && !p.gone))
            })
            .map(|(j, _)| j)
            .collect();
        if at_term.len() < self.majority() {
            return false;
        }
        let newest = at_term
            .iter()
            .filter_map(|&j| {
                if Some(j) == self.my_index {
                    self.version.clone()
                } else {
                    self.peers[j].version.clone()
                }
            })
            .max_by_key(|v| v.id);
        self.adopted = true;
        self.next_seq = 0;
        if let Some(mut v) = newest {
            // Re-issued under this term: members accept versions of their own term
            // only. Same content, same digest, so no member's lease is disturbed.
            v.id = VersionId {
                term: self.term,
                seq: self.next_seq,
            };
            self.next_seq += 1;
            self.issue(v, now);
        }
        true
    }

    fn assign_first(&mut self, now: Now) {
        let run_clock = (now.wall_us as i64 + self.clock_offset_us).max(0) as u64;
        let moves = (0..self.roster.len())
            .filter(|&i| self.quorum_fenced(i))
            .map(|i| Move {
                lost: i as u32,
                from_event: 0,
                at_us: 0,
                // Lost before the start: it claimed nothing.
                claims: vec![0; self.counted.len()],
                takers: Vec::new(),
            })
            .collect();
        let v = Version {
            id: VersionId {
                term: self.term,
                seq: self.next_seq,
            },
            start_unix_us: run_clock + self.timing.start_lead_us,
            moves,
        };
        self.next_seq += 1;
        self.issue(v, now);
    }

    /// Moves the share of every member a majority has fenced and no version moved yet.
    fn move_fenced(&mut self, current: Version, now: Now) {
        let lost: Vec<usize> = (0..self.roster.len())
            .filter(|&i| self.quorum_fenced(i) && !current.is_moved(i))
            .collect();
        if lost.is_empty() || lost.len() + current.moves.len() >= self.roster.len() {
            return;
        }
        let Some(schedule) = self.schedule.clone() else {
            return;
        };
        let at = self
            .run_time_us(now)
            .unwrap_or(0)
            .saturating_add(self.timing.failover_lead_us);
        let from_event = schedule.first_event_at(at);
        let mut v = current;
        // Members whose engine ended take nothing: work handed to them would be lost.
        let finished = self.arrivals.get(&super::events::Barrier::Finished);
        let taking: Vec<usize> = (0..self.roster.len())
            .filter(|&i| !v.is_moved(i) && !lost.contains(&i))
            .filter(|i| !finished.is_some_and(|f| f.contains_key(i)))
            .collect();
        let takers = if taking.len() + lost.len() + v.moves.len() == self.roster.len() {
            Vec::new() // everyone left takes over: the short form
        } else {
            super::version::member_set(taking)
        };
        for i in lost {
            v.moves.push(Move {
                lost: i as u32,
                from_event,
                at_us: at,
                claims: self.claims_of_fenced(i),
                takers: takers.clone(),
            });
        }
        v.id = VersionId {
            term: self.term,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.issue(v, now);
    }

    /// The most a fenced member may have claimed: the highest of its claims heard
    /// here and reported by the members that fenced it. A majority confirmed its
    /// claims before it could use them, and a majority fenced it, so at least one
    /// member in both has reported them.
    fn claims_of_fenced(&self, i: usize) -> Vec<u64> {
        let mut claims = vec![0u64; self.counted.len()];
        if self.flaw == super::Flaw::NoClaims {
            return claims;
        }
        let heard = self.peers.iter().enumerate().flat_map(|(j, p)| {
            let reported = if j == i {
                None
            } else {
                p.fenced_claims.get(&(i as u32))
            };
            let own = (Some(j) == self.my_index).then(|| &self.peers[i].claims);
            reported.into_iter().chain(own)
        });
        for c in heard {
            for (m, x) in claims.iter_mut().zip(c) {
                *m = (*m).max(*x);
            }
        }
        claims
    }

    /// Publishes a version as this term's leader and applies it here.
    fn issue(&mut self, v: Version, now: Now) {
        let msg = self.publish(RunMessage::Assign {
            run_id: self.run_id.clone(),
            term: self.term,
            version: v.clone(),
        });
        self.assign_msg = Some(msg);
        self.assign_sent = now.mono_us;
        self.switch_version(v, now);
    }

    pub(super) fn on_assign(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Assign { term, version, .. } = msg else {
            return;
        };
        // Authority: only the member the election rule names for this node's own
        // term, with a version of that term, newer than what this node holds.
        let Some(l) = self.leader_index(self.term) else {
            return;
        };
        let entitled =
            *term == self.term && version.id.term == self.term && from == self.roster[l].id;
        let lax = self.flaw == super::Flaw::NoAuthority && *term >= self.term;
        if !(entitled || lax) || self.version.as_ref().is_some_and(|v| version.id <= v.id) {
            return;
        }
        self.switch_version(version.clone(), now);
    }

    /// Takes up a version: the split, the engine, the report's events.
    pub(super) fn switch_version(&mut self, v: Version, now: Now) {
        let split = match v.split(&self.roster, &self.counted) {
            Ok(s) => s,
            Err(_) => return,
        };
        let changed = self.digest != v.digest();
        let fresh: Vec<Move> = v
            .moves
            .iter()
            .filter(|m| !self.version.as_ref().is_some_and(|o| o.moves.contains(m)))
            .cloned()
            .collect();
        self.digest = v.digest();
        let me_moved = self.my_index.is_some_and(|i| v.is_moved(i));
        if self.deadline.is_none() {
            if let Some(s) = &self.schedule {
                // The termination bound, on the monotonic clock.
                let until_start = (v.start_unix_us as i64
                    - (now.wall_us as i64 + self.clock_offset_us))
                    .max(0) as u64;
                self.deadline = Some(
                    now.mono_us
                        .saturating_add(until_start)
                        .saturating_add(s.duration_us())
                        .saturating_add(self.timing.overrun_us),
                );
            }
        }
        self.version = Some(v);
        self.split = Some(split.clone());
        for m in &fresh {
            let lost = self.roster[m.lost as usize].name.clone();
            let survivors: Vec<String> = self
                .roster
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.version.as_ref().is_some_and(|v| v.is_moved(*i)))
                .filter(|(i, _)| m.takes(*i))
                .map(|(_, r)| r.name.clone())
                .collect();
            let counted = if m.claims.is_empty() {
                String::new()
            } else {
                format!(", counted iterations beyond {:?}", m.claims)
            };
            let moved = format!(
                "VUs and arrival events from #{}{counted} of {lost} to {}",
                m.from_event,
                survivors.join(", ")
            );
            self.event(
                now,
                RunEvent::Reassigned {
                    lost,
                    from_s: m.at_us as f64 / 1e6,
                    moved,
                },
            );
        }
        if self.engine == EngineState::Running {
            if changed {
                self.out.push(super::Effect::SwapSplit(split));
            }
            if me_moved {
                // Fenced and moved: an observer from now on.
                self.out.push(super::Effect::StopEngine(StopKind::Graceful));
            }
        }
        if changed {
            for j in 0..self.peers.len() {
                self.maybe_lift_fence(j);
            }
            // The lease rests on echoes at the new version: ask for them now.
            self.update_lease(now);
            self.send_beat(now);
        }
    }

    /// Starts this node's engine once it has a version, unless it was moved away
    /// (an observer never runs the old share) or the run was stopped before start.
    pub(super) fn maybe_start_engine(&mut self, now: Now) {
        if self.engine != EngineState::Idle || self.phase != Phase::Ready {
            return;
        }
        let (Some(index), Some(v), Some(split)) =
            (self.my_index, self.version.clone(), self.split.clone())
        else {
            return;
        };
        if !self
            .my_arrivals
            .contains_key(&super::events::Barrier::Ready)
        {
            // No clock offset yet: the start instant cannot be placed.
            return;
        }
        self.phase = Phase::Running;
        if self.stop.is_some() || v.is_moved(index) {
            self.engine = EngineState::Finished;
            self.arrive(
                super::events::Barrier::Finished,
                BarrierDetail {
                    snapshots: Some(0),
                    ..Default::default()
                },
                now,
            );
            return;
        }
        self.engine = EngineState::Running;
        let local = (v.start_unix_us as i64 - self.clock_offset_us).max(0) as u64;
        self.out.push(super::Effect::Busy(true));
        self.out.push(super::Effect::StartEngine {
            split,
            start_local_wall_us: local,
            index,
        });
        let duration_s = self
            .schedule
            .as_ref()
            .map_or(0.0, |s| s.duration_us() as f64 / 1e6);
        self.out.push(super::Effect::Progress(Progress::Assigned {
            index,
            duration_s,
        }));
    }
}
