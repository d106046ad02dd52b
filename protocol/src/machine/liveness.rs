//! Heartbeats, fencing, leases and terms: who is alive, who may send load, who leads.
//!
//! - The run has a few **witnesses** (every member of a roster of up to
//!   [`MAX_WITNESSES`], else that many, the origin among them): only their echoes,
//!   fences and terms count, so a member's cost does not grow with the roster.
//! - Every member sends a `Beat` each `beat_us`, directly (never gossip, whose
//!   relays would age it by a hop each) to every witness — a witness to every member.
//!   It carries its monotonic stamp and, from a witness to a member it heard *at the
//!   same version* and has not fenced, that member's newest stamp (an echo).
//! - A member's lease lasts `lease_us` past the stamp that the witness majority's
//!   slowest echo confirms (a witness counts itself): only its own stamps count, so
//!   messages that waited out a pause in a socket buffer renew nothing.
//! - A member silent for `fail_us` is fenced by a witness for good. Once a majority
//!   of the witnesses has fenced it, its lease has expired (`fail ≥ lease + margin`),
//!   so its share may move and, if it led, the term moves on.
//!
//! Must not decide what moves where (the leader's part) or touch measurements.

use super::events::{Barrier, RunEvent};
use super::{Now, Phase, RunMachine};
use crate::run::{RosterEntry, RunMessage};

/// Up to this many members, every member is a witness (and the protocol is the
/// all-to-all one of small meshes); above, this many are. Seven survive the loss of
/// any three of them, and keep a witness's work at about seven heartbeats in and out
/// per member per beat period.
pub const MAX_WITNESSES: usize = 7;

/// The witnesses of a run: the whole roster while it has at most
/// [`MAX_WITNESSES`] members, else the origin (when it is a member: it follows and
/// reports the run, so it hears everyone anyway) and the members ranked first by a
/// hash of the run id and their peer id (rendezvous hashing: every node computes the
/// same set, and runs spread the duty over the mesh). Ascending roster indices.
pub fn choose_witnesses(roster: &[RosterEntry], run_id: &str, origin: &str) -> Vec<usize> {
    use sha2::{Digest, Sha256};
    if roster.len() <= MAX_WITNESSES {
        return (0..roster.len()).collect();
    }
    let rank = |id: &str| {
        let mut h = Sha256::new();
        h.update((run_id.len() as u64).to_le_bytes());
        h.update(run_id.as_bytes());
        h.update(id.as_bytes());
        let d = h.finalize();
        u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
    };
    let mut ranked: Vec<(bool, u64, usize)> = roster
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id != origin, rank(&m.id), i))
        .collect();
    ranked.sort_unstable();
    let mut chosen: Vec<usize> = ranked[..MAX_WITNESSES].iter().map(|r| r.2).collect();
    chosen.sort_unstable();
    chosen
}

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
            && now.mono_us.saturating_sub(self.round_sent) >= self.beat_every()
        {
            self.send_beat(now);
        }
        self.answer_if_due(now);
        self.fence_silent(now);
        self.republish(now);
    }

    /// Sends this node's heartbeat now, to everyone it goes to.
    pub(super) fn send_beat(&mut self, now: Now) {
        // The witnesses it goes to need no other answer.
        let witnesses = &self.witnesses;
        self.answer_to.retain(|j| !witnesses.contains(j));
        // Answers to members do not reach the witnesses: only a heartbeat to them
        // resets the beat period.
        self.round_sent = now.mono_us;
        self.send_beat_to(now, None);
    }

    /// Sends this node's heartbeat to every member, witnesses or not (a witness
    /// telling that the run finished: it may be done before anyone asks again).
    pub(super) fn send_beat_to_all(&mut self, now: Now) {
        let me = self.my_index;
        let all: Vec<usize> = (0..self.roster.len()).filter(|&j| Some(j) != me).collect();
        self.answer_to.clear();
        self.send_beat_to(now, Some(all));
    }

    /// How often this node beats: every `beat_us` for a witness, twice that for
    /// the other members of a large run (a witness hears every member, so this
    /// halves the busiest nodes' load; a lease still spans three such beats).
    fn beat_every(&self) -> u64 {
        if self.i_witness() || self.witnesses.len() == self.roster.len() {
            self.timing.beat_us
        } else {
            2 * self.timing.beat_us
        }
    }

    /// The nodes this node's own heartbeats go to: every witness (and an origin
    /// outside the roster, which follows the run). The other members hear a witness
    /// only in its answers to their own heartbeats (see `on_beat`): a witness's work
    /// is then one answer per member heartbeat, not a heartbeat to every member too.
    fn beat_recipients(&self) -> Vec<Option<usize>> {
        let Some(me) = self.my_index else {
            return Vec::new();
        };
        let mut to: Vec<Option<usize>> = self
            .witnesses
            .iter()
            .filter(|&&j| j != me)
            .map(|&j| Some(j))
            .collect();
        if self.index_of(&self.origin).is_none() {
            to.push(None);
        }
        to
    }

    /// Sends a heartbeat to `only` (the members waiting for an answer) or, with
    /// `None`, to every recipient. Each copy carries only what its recipient uses:
    /// its own echo, and the whole version only for a witness.
    fn send_beat_to(&mut self, now: Now, only: Option<Vec<usize>>) {
        let Some(me) = self.my_index else { return };
        let witness = self.witness(me);
        let mut fenced = Vec::new();
        let mut fenced_claims = Vec::new();
        if witness {
            for (j, p) in self.peers.iter().enumerate() {
                if j != me && p.fenced_by_me {
                    fenced.push(j as u32);
                    if !self.counted.is_empty() {
                        fenced_claims.push(p.claims.clone());
                    }
                }
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

        let complete: Vec<Barrier> = if witness {
            match &self.complete_here {
                Some(c) => c.clone(),
                None => {
                    let c: Vec<Barrier> = Barrier::ALL
                        .into_iter()
                        .filter(|b| self.barrier_complete(*b))
                        .collect();
                    self.complete_here = Some(c.clone());
                    c
                }
            }
        } else {
            Vec::new()
        };
        let wants_echo = !self.holds_lease(now);
        let recipients = match only {
            Some(list) => list.into_iter().map(Some).collect(),
            None => self.beat_recipients(),
        };
        for r in recipients {
            // Arrivals the recipient does not yet say it holds.
            let holds = r.map_or(0, |j| self.peers[j].holds_mine);
            let arrived: Vec<_> = self
                .my_arrivals
                .iter()
                .filter(|(b, _)| holds & barrier_bit(**b) == 0)
                .map(|(b, d)| (*b, d.clone()))
                .collect();
            let received: Vec<Barrier> = match r {
                Some(j) => Barrier::ALL
                    .into_iter()
                    .filter(|b| self.arrivals.get(b).is_some_and(|a| a.contains_key(&j)))
                    .collect(),
                None => Vec::new(),
            };
            let (to, echoes, version) = match r {
                Some(j) => {
                    let p = &self.peers[j];
                    let echo =
                        witness && !p.fenced_by_me && p.beat_sent > 0 && p.digest == self.digest;
                    let echoes = if echo {
                        vec![(j as u32, p.beat_sent)]
                    } else {
                        Vec::new()
                    };
                    let version = if self.witness(j) {
                        self.version.clone()
                    } else {
                        None
                    };
                    (self.roster[j].id.clone(), echoes, version)
                }
                None => (self.origin.clone(), Vec::new(), None),
            };
            let msg = std::sync::Arc::new(RunMessage::Beat {
                run_id: self.run_id.clone(),
                term: self.term,
                sent_us,
                version,
                echoes,
                fenced: fenced.clone(),
                claims: self.my_claims.to_vec(),
                fenced_claims: fenced_claims.clone(),
                arrived,
                wants_echo,
                digest: self.digest,
                complete: complete.clone(),
                received,
            });
            self.out.push(super::Effect::Send { to, msg });
        }
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
            digest,
            complete,
            received,
            ..
        } = msg
        else {
            return;
        };
        let Some(j) = self.index_of(from) else { return };
        for (barrier, detail) in arrived.iter().take(Barrier::ALL.len()) {
            self.arrival(j, *barrier, detail, now);
        }
        // Only witnesses speak for the run: their fences, terms and completions.
        let witness = self.witness(j);
        if witness {
            self.told_complete.extend(complete.iter().copied());
        }
        self.peers[j].holds_mine = received.iter().fold(0, |m, b| m | barrier_bit(*b));
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
            self.complete_here = None;
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
            .filter(|&f| witness && (f as usize) < n)
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
        let digest = version.as_ref().map_or(*digest, |v| v.digest());
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
            .filter(|_| witness)
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
        if self.i_witness() && !witness {
            // A member that is not a witness hears this witness only in answers:
            // every heartbeat of it is answered (its echo, if it is at this version;
            // this witness's term, fences and completed barriers in any case).
            self.answer_to.insert(j);
            self.answer_if_due(now);
            return;
        }
        // Only a witness's echo is worth asking for, and only a witness gives one.
        let lacking = (*wants_echo && self.i_witness()) || (!self.holds_lease(now) && witness);
        let replied = self.peers[j].replied_at;
        if digest == self.digest
            && lacking
            && !self.peers[j].fenced_by_me
            && (replied == 0 || now.mono_us.saturating_sub(replied) >= IMMEDIATE_GAP_US)
        {
            self.peers[j].replied_at = now.mono_us;
            self.answer_to.insert(j);
        }
        self.answer_if_due(now);
    }

    /// Sends the heartbeat others asked for — to them only —, unless one went out
    /// too recently.
    pub(super) fn answer_if_due(&mut self, now: Now) {
        if !self.answer_to.is_empty()
            && now.mono_us.saturating_sub(self.answered_at) >= ANSWER_GAP_US
        {
            let to: Vec<usize> = std::mem::take(&mut self.answer_to).into_iter().collect();
            self.answered_at = now.mono_us;
            self.send_beat_to(now, Some(to));
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
            self.complete_here = None;
            return;
        };
        // A member that is not a witness hears only the witnesses, and its fences
        // would count for nothing: it watches the witnesses alone (this runs on every
        // tick of every member, so it must not walk the roster there).
        let witness = self.witness(me);
        let watched = if witness {
            self.peers.len()
        } else {
            self.witnesses.len()
        };
        for x in 0..watched {
            let j = if witness { x } else { self.witnesses[x] };
            if j == me || j >= self.peers.len() {
                continue;
            }
            let p = &self.peers[j];
            if now.mono_us.saturating_sub(p.last_heard) < self.timing.fail_us {
                continue;
            }
            if !p.gone {
                self.peers[j].gone = true;
                self.complete_here = None;
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
            if witness && !self.peers[j].fenced_by_me {
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
        // Once `finished` is complete every engine is done and no version will be
        // issued again (`lead` stops at Finishing): a leader that reported and left
        // is no reason for the members still passing up their last seconds to elect
        // another, which only split their terms at the end.
        if self.phase >= Phase::Finishing {
            return;
        }
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
        let ahead = self
            .witnesses
            .iter()
            .any(|&j| self.peers.get(j).is_some_and(|p| p.term > self.term));
        if target == self.term && !ahead {
            return;
        }
        let mut terms: Vec<u64> = self
            .witnesses
            .iter()
            .map(|&j| {
                if Some(j) == self.my_index {
                    self.term
                } else {
                    self.peers[j].term
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
        let need = self.majority() - usize::from(self.witness(me));
        if need == 0 {
            return Some((u64::MAX, vec![u64::MAX; self.counted.len()]));
        }
        // Only witnesses echo (at most seven): this runs on every heartbeat taken, so
        // it must not walk the whole roster.
        let mut echoes: Vec<u64> = self
            .witnesses
            .iter()
            .filter(|&&j| j != me)
            .filter_map(|&j| self.peers.get(j))
            .filter(|p| p.echo_of_me > 0 && p.echo_digest == self.digest)
            .map(|p| p.echo_of_me)
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

/// A barrier's bit in `Peer::holds_mine`.
fn barrier_bit(b: Barrier) -> u8 {
    let i = Barrier::ALL.iter().position(|x| *x == b).unwrap_or(0);
    1 << i
}
