//! Heartbeats, fencing, leases and terms: who is alive, who may send load, who leads.
//!
//! - Every member sends a `Beat` each `beat_us` with its monotonic stamp, its version
//!   and, for every member it heard *at the same version* and has not fenced, that
//!   member's newest stamp (an echo).
//! - A member's lease lasts `lease_us` past the stamp that the majority's slowest
//!   echo confirms (itself counting as one): only its own stamps count, so messages
//!   that waited out a pause in a socket buffer renew nothing.
//! - A member silent for `fail_us` is fenced by the observer for good. Once a
//!   majority has fenced it, its lease has expired (`fail ≥ lease + margin`), so its
//!   share may move and, if it led, the term moves on.
//!
//! Must not decide what moves where (the leader's part) or touch measurements.

use super::events::RunEvent;
use super::{Now, Phase, RunMachine};
use crate::run::RunMessage;

/// The least time between two heartbeats sent at once in answer to the same member
/// (two members without a lease would otherwise answer each other without end).
const IMMEDIATE_GAP_US: u64 = 50_000;

/// The least time between two heartbeats sent in answer to others.
const ANSWER_GAP_US: u64 = 5_000;

/// How many of its own heartbeat stamps a node remembers to check echoes against.
const BEATS_KEPT: usize = 64;

impl RunMachine {
    pub(super) fn on_tick(&mut self, now: Now) {
        if self.phase == Phase::Joining {
            self.joining_tick(now);
            return;
        }
        if self.my_index.is_some()
            && now.mono_us.saturating_sub(self.beat_sent) >= self.timing.beat_us
        {
            self.send_beat(now);
        }
        self.answer_if_due(now);
        self.fence_silent(now);
        self.republish(now);
    }

    /// Sends this node's heartbeat now.
    pub(super) fn send_beat(&mut self, now: Now) {
        let Some(me) = self.my_index else { return };
        // This beat echoes everyone: it is the answer anyone was waiting for.
        self.answer_due = false;
        let mut echoes = Vec::new();
        let mut fenced = Vec::new();
        let mut fenced_claims = Vec::new();
        for (j, p) in self.peers.iter().enumerate() {
            if j == me {
                continue;
            }
            if p.fenced_by_me {
                fenced.push(j as u32);
                if !self.counted.is_empty() {
                    fenced_claims.push(p.claims.clone());
                }
            } else if p.beat_sent > 0 && p.digest == self.digest {
                echoes.push((j as u32, p.beat_sent));
            }
        }
        // Stamps strictly increase, so an echo names exactly one of them.
        let sent_us = now.mono_us.max(self.beat_sent + 1);
        self.beat_sent = sent_us;
        self.my_beats
            .push_back((sent_us, self.digest, self.my_claims.clone()));
        while self.my_beats.len() > BEATS_KEPT {
            self.my_beats.pop_front();
        }
        let arrived = self
            .my_arrivals
            .iter()
            .map(|(b, d)| (*b, d.clone()))
            .collect();
        let wants_echo = !self.holds_lease(now);
        self.publish(RunMessage::Beat {
            run_id: self.run_id.clone(),
            term: self.term,
            sent_us,
            version: self.version.clone(),
            echoes,
            fenced,
            claims: self.my_claims.to_vec(),
            fenced_claims,
            arrived,
            wants_echo,
        });
        // Own knowledge of itself, so that the counts include this node.
        let digest = self.digest;
        let term = self.term;
        let version = self.version.clone();
        let p = &mut self.peers[me];
        p.last_heard = now.mono_us;
        p.beat_sent = sent_us;
        p.term = term;
        p.version = version;
        p.digest = digest;
    }

    pub(super) fn on_beat(&mut self, from: &str, msg: &RunMessage, now: Now) {
        let RunMessage::Beat {
            term,
            sent_us,
            version,
            echoes,
            fenced,
            arrived,
            wants_echo,
            claims,
            fenced_claims,
            ..
        } = msg
        else {
            return;
        };
        let Some(j) = self.index_of(from) else { return };
        for (barrier, detail) in arrived.iter().take(super::events::Barrier::ALL.len()) {
            self.arrival(j, *barrier, detail, now);
        }
        if Some(j) == self.my_index || self.peers.is_empty() {
            return;
        }
        let n = self.roster.len();
        let was_gone = self.peers[j].gone;
        {
            let p = &mut self.peers[j];
            p.last_heard = p.last_heard.max(now.mono_us);
            p.gone = false;
        }
        if was_gone {
            let (node, id) = (self.roster[j].name.clone(), self.roster[j].id.clone());
            self.event(now, RunEvent::NodeReturned { node, id });
        }
        self.maybe_lift_fence(j);
        if *sent_us <= self.peers[j].beat_sent {
            // An older beat than one already taken (reordered or repeated).
            return;
        }
        let new_fenced: std::collections::BTreeSet<u32> = fenced
            .iter()
            .copied()
            .filter(|&f| (f as usize) < n)
            .collect();
        let old_fenced = std::mem::take(&mut self.peers[j].fenced);
        if old_fenced != new_fenced || *term > self.term {
            self.beat_news = true;
        }
        for f in old_fenced.difference(&new_fenced) {
            self.fence_count[*f as usize] -= 1;
        }
        for f in new_fenced.difference(&old_fenced) {
            self.fence_count[*f as usize] += 1;
        }
        let digest = version.as_ref().map_or(0, |v| v.digest());
        let echo = self
            .my_index
            .and_then(|me| echoes.iter().find(|(i, _)| *i as usize == me))
            .map(|(_, ts)| *ts);
        let p = &mut self.peers[j];
        // Claims only grow: the highest heard is what a lost member may have used.
        let k = self.counted.len();
        if p.claims.len() < k {
            p.claims.resize(k, 0);
        }
        for (mine, theirs) in p.claims.iter_mut().zip(claims.iter()) {
            *mine = (*mine).max(*theirs);
        }
        p.fenced_claims = fenced
            .iter()
            .zip(fenced_claims.iter())
            .map(|(f, c)| (*f, c.iter().take(k).copied().collect()))
            .collect();
        p.fenced = new_fenced;
        p.beat_sent = *sent_us;
        p.term = *term;
        p.version = version.clone();
        p.digest = digest;
        if let Some(ts) = echo.filter(|ts| *ts > p.echo_of_me) {
            self.beat_news = true;
            p.echo_of_me = ts;
            p.echo_digest = self
                .my_beats
                .iter()
                .rev()
                .find(|(s, _, _)| *s == ts)
                .map_or(u64::MAX, |(_, d, _)| *d);
        }
        // A member at this node's version that has no lease (it just took the
        // version up), or this node lacking one, is answered at once: a version
        // switch costs a round trip rather than a beat period. Once both hold a
        // lease the exchange stops; between two members that cannot get one it is
        // limited to one answer per IMMEDIATE_GAP_US. One beat echoes every member,
        // so answers to many members at once are one beat (at most one per
        // ANSWER_GAP_US; one asked for sooner goes at the next input or tick): a
        // version switch in a mesh of hundreds stays a handful of beats per node.
        let lacking = *wants_echo || !self.holds_lease(now);
        let replied = self.peers[j].replied_at;
        if digest == self.digest
            && lacking
            && !self.peers[j].fenced_by_me
            && (replied == 0 || now.mono_us.saturating_sub(replied) >= IMMEDIATE_GAP_US)
        {
            self.peers[j].replied_at = now.mono_us;
            self.answer_due = true;
        }
        self.answer_if_due(now);
    }

    /// Sends the heartbeat others asked for, unless one went out too recently.
    pub(super) fn answer_if_due(&mut self, now: Now) {
        if self.answer_due && now.mono_us.saturating_sub(self.answered_at) >= ANSWER_GAP_US {
            self.answer_due = false;
            self.answered_at = now.mono_us;
            self.send_beat(now);
        }
    }

    /// Lifts this node's fence of member `j` if it is heard and this node is no
    /// longer at the version the fence was set at (see `Peer::fenced_by_me`).
    pub(super) fn maybe_lift_fence(&mut self, j: usize) {
        let p = &self.peers[j];
        if p.fenced_by_me && !p.gone && (p.fenced_digest == 0 || p.fenced_digest != self.digest) {
            self.peers[j].fenced_by_me = false;
            self.fence_count[j] = self.fence_count[j].saturating_sub(1);
        }
    }

    /// Fences every member silent for the failure timeout.
    fn fence_silent(&mut self, now: Now) {
        let Some(me) = self.my_index else {
            // An origin outside the roster only follows; it fences no one but still
            // stops waiting for the silent.
            for p in &mut self.peers {
                if now.mono_us.saturating_sub(p.last_heard) >= self.timing.fail_us {
                    p.gone = true;
                }
            }
            return;
        };
        for j in 0..self.peers.len() {
            if j == me {
                continue;
            }
            let p = &self.peers[j];
            if now.mono_us.saturating_sub(p.last_heard) < self.timing.fail_us {
                continue;
            }
            if !p.gone {
                self.peers[j].gone = true;
                let last = self.seen[j].last();
                let (node, id) = (self.roster[j].name.clone(), self.roster[j].id.clone());
                self.event(
                    now,
                    RunEvent::NodeLost {
                        node,
                        id,
                        last_snapshot: last,
                    },
                );
            }
            if !self.peers[j].fenced_by_me {
                self.peers[j].fenced_by_me = true;
                self.peers[j].fenced_digest = self.digest;
                self.fence_count[j] += 1;
            }
        }
    }

    /// Whether a majority of the roster has fenced member `i` (as far as this node
    /// knows): its lease has then surely expired, for good.
    pub(super) fn quorum_fenced(&self, i: usize) -> bool {
        self.fence_count
            .get(i)
            .is_some_and(|&c| c >= self.majority())
    }

    /// Moves past every term whose leader a majority has fenced, and up to the
    /// highest term a majority of members has reached (a member that missed the
    /// fences catches up; a lone member claiming a high term moves no one).
    pub(super) fn bump_terms(&mut self, now: Now) {
        let mut target = self.term;
        for _ in 0..self.roster.len() {
            let Some(l) = self.leader_index(target) else {
                return;
            };
            if !self.quorum_fenced(l) {
                break;
            }
            let Some(next) = target.checked_add(1) else {
                return;
            };
            target = next;
        }
        let ahead = self.peers.iter().any(|p| p.term > self.term);
        if target == self.term && !ahead {
            return;
        }
        let mut terms: Vec<u64> = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, p)| {
                if Some(j) == self.my_index {
                    self.term
                } else {
                    p.term
                }
            })
            .collect();
        terms.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(&t) = terms.get(self.majority() - 1) {
            target = target.max(t);
        }
        if target <= self.term {
            return;
        }
        self.term = target;
        self.adopted = false;
        self.next_seq = 0;
        self.assign_msg = None;
        let leader = self
            .leader_index(self.term)
            .map(|i| self.roster[i].name.clone())
            .unwrap_or_default();
        self.event(
            now,
            RunEvent::LeaderElected {
                leader,
                term: target,
            },
        );
        if let Some(me) = self.my_index {
            self.peers[me].term = target;
        }
    }

    /// The lease this node holds now, from echoes of its stamps at its version, and
    /// the claims of the heartbeat that lease rests on: every member of that majority
    /// has heard them, so whichever majority later fences this node knows them.
    fn compute_lease(&self) -> Option<(u64, Vec<u64>)> {
        let me = self.my_index?;
        let need = self.majority() - 1;
        if need == 0 {
            return Some((u64::MAX, vec![u64::MAX; self.counted.len()]));
        }
        let mut echoes: Vec<u64> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != me && p.echo_of_me > 0 && p.echo_digest == self.digest)
            .map(|(_, p)| p.echo_of_me)
            .collect();
        if echoes.len() < need {
            return None;
        }
        // The need-th newest echo: the majority's slowest confirmation.
        let (_, nth, _) = echoes.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
        let nth = *nth;
        let claims = self
            .my_beats
            .iter()
            .find(|(s, _, _)| *s == nth)
            .map_or_else(|| vec![0; self.counted.len()], |(_, _, c)| c.to_vec());
        Some((nth.saturating_add(self.timing.lease_us), claims))
    }

    /// The engine wants to go further into its counted scenarios.
    pub(super) fn on_claims(&mut self, wanted: &[u64]) {
        if wanted.iter().zip(self.my_claims.iter()).any(|(w, m)| w > m) {
            let mut c = self.my_claims.to_vec();
            for (m, w) in c.iter_mut().zip(wanted) {
                *m = (*m).max(*w);
            }
            self.my_claims = std::sync::Arc::new(c);
        }
    }

    pub(super) fn update_lease(&mut self, now: Now) {
        // Before an assignment the lease (at "no version") still says whether this
        // node is in touch with a majority: the leader needs one to assign.
        let granted = match self.flaw {
            super::Flaw::NoLease if self.my_index.is_some() => {
                Some((u64::MAX, vec![u64::MAX; self.counted.len()]))
            }
            _ => self.compute_lease(),
        };
        let lease = granted.as_ref().map(|(l, _)| *l);
        if let Some((_, claims)) = granted {
            if claims != self.confirmed && !claims.is_empty() {
                self.confirmed = claims.clone();
                self.out.push(super::Effect::Claims(claims));
            }
        }
        if lease != self.lease {
            self.lease = lease;
            self.out.push(super::Effect::Lease(lease));
        }
        if self.phase != Phase::Running || self.holds_lease(now) {
            self.lease_lapsed_since = None;
            return;
        }
        // A version switch lapses the lease for a round trip; only a lapse longer
        // than two beats is worth an event.
        let since = *self.lease_lapsed_since.get_or_insert(now.mono_us);
        if now.mono_us.saturating_sub(since) >= 2 * self.timing.beat_us && !self.lease_lost_noted {
            self.lease_lost_noted = true;
            let node = self.me.name.clone();
            self.event(now, RunEvent::LeaseLost { node });
        }
    }

    /// Whether this node holds its lease at `now`.
    pub(super) fn holds_lease(&self, now: Now) -> bool {
        self.lease.is_some_and(|l| l > now.mono_us)
    }
}
