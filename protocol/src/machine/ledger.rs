//! The snapshot ledger and the report: which (member, second) pairs go into the
//! merged report, which are re-fetched at the end, and which are named as missing.
//!
//! Exact accounting rests on this: a snapshot is merged once per (member, second),
//! only from its own author; at the end every second of every member is either in
//! the report or named in a `snapshots_missing` event (`after` for everything past a
//! lost member's last second). Reporters are the origin and the leader at the end, so
//! the result survives the origin.
//!
//! Must not merge measurements itself (the node does, on `Merge`).

use super::events::{second_ranges, Barrier, MemberStatus, RunEvent};
use super::{MemberFact, Now, OwnOutcome, ReportFacts, RunMachine};
use crate::run::SNAPSHOTS_PER_REQUEST;

/// The most seconds a run's ledger tracks per member (a week): a peer's claim of more
/// is refused at decode and cut here before anything loops over it.
pub const MAX_SECONDS: u64 = crate::run::MAX_RUN_SECONDS;

/// How long a reporter gives a member to answer for its own totals (the node's
/// request times out then) before it counts the ask as failed and may ask again.
pub const OWN_TIMEOUT_US: u64 = 5_000_000;
/// The most members a reporter asks for their own totals at once: 1,024 members'
/// answers (each up to a few hundred KB) never all arrive in the same instant.
pub const MAX_OWN_FETCHES: usize = 16;

/// Where a reporter's fetch of one member's own totals stands (tree aggregation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OwnFetch {
    #[default]
    Unasked,
    /// Asked at this instant (mono µs), no answer yet.
    Asked(u64),
    /// The ask failed at this instant: asked again after `fetch_every_us`.
    Failed(u64),
    Got,
    /// The member has none: not asked again.
    Refused,
}

/// The seconds of one member a node has: every second below `below`, and the ones
/// above it that came out of order. Memory is the out-of-order seconds only, so it
/// does not grow with the length of a run (a set of every second would, by tens of
/// bytes a second per member).
#[derive(Debug, Clone, Default)]
pub struct Seconds {
    below: u64,
    above: std::collections::BTreeSet<u64>,
}

impl Seconds {
    /// Adds a second; false if it was there already.
    pub fn insert(&mut self, s: u64) -> bool {
        if s < self.below || !self.above.insert(s) {
            return false;
        }
        while self.above.remove(&self.below) {
            self.below += 1;
        }
        true
    }

    pub fn contains(&self, s: &u64) -> bool {
        *s < self.below || self.above.contains(s)
    }

    /// The highest second held.
    pub fn last(&self) -> Option<u64> {
        self.above
            .iter()
            .next_back()
            .copied()
            .or_else(|| self.below.checked_sub(1))
    }

    /// How many seconds are held.
    pub fn count(&self) -> usize {
        self.below as usize + self.above.len()
    }
}

impl RunMachine {
    pub(super) fn on_snapshot(&mut self, from: &str, node: &str, seq: u64, _now: Now) {
        if from != node || seq >= MAX_SECONDS {
            return;
        }
        let Some(j) = self.index_of(node) else { return };
        if self.seen[j].insert(seq) {
            self.out.push(super::Effect::Merge {
                node: node.to_string(),
                seq,
            });
        }
    }

    pub(super) fn on_fetched(&mut self, node: &str, got: Vec<u64>, missing: Vec<u64>, now: Now) {
        let Some(j) = self.index_of(node) else { return };
        for seq in got.into_iter().take(SNAPSHOTS_PER_REQUEST) {
            self.on_snapshot(node, node, seq, now);
        }
        for seq in missing.into_iter().take(SNAPSHOTS_PER_REQUEST) {
            if seq < MAX_SECONDS {
                self.absent[j].insert(seq);
            }
        }
    }

    pub(super) fn on_own_fetched(&mut self, node: &str, outcome: OwnOutcome, now: Now) {
        let Some(j) = self.index_of(node) else { return };
        let Some(own) = self.own.get_mut(j) else {
            return;
        };
        if matches!(*own, OwnFetch::Got | OwnFetch::Refused) {
            return;
        }
        *own = match outcome {
            OwnOutcome::Got => OwnFetch::Got,
            OwnOutcome::Refused => OwnFetch::Refused,
            OwnOutcome::Failed => OwnFetch::Failed(now.mono_us),
        };
    }

    /// The run's seconds as far as this node knows: past the last second any member
    /// said it had or was seen with. A member's own timeline is cut there, as the
    /// run's is, so that their buckets line up.
    fn run_end_second(&self) -> u64 {
        let finished = self.arrivals.get(&Barrier::Finished);
        (0..self.roster.len())
            .map(|j| {
                let said = finished
                    .and_then(|f| f.get(&j))
                    .and_then(|d| d.snapshots)
                    .unwrap_or(0)
                    .min(MAX_SECONDS);
                said.max(self.seen[j].last().map_or(0, |s| s + 1))
            })
            .max()
            .unwrap_or(0)
    }

    /// A reporter with tree aggregation asks every member for its own totals (the
    /// merged seconds carry no per-member figures), at most [`MAX_OWN_FETCHES`] at a
    /// time, again after a failure, until it has them, the member says it has none,
    /// is gone, or the reporter has waited `finish_wait_us`. True while some are
    /// still awaited.
    fn fetch_own(&mut self, now: Now, waited_enough: bool) -> bool {
        if self.tree().is_none() {
            return false;
        }
        let end = self.run_end_second();
        let t = now.mono_us;
        let mut in_flight = self
            .own
            .iter()
            .filter(|o| matches!(o, OwnFetch::Asked(at) if t.saturating_sub(*at) < OWN_TIMEOUT_US))
            .count();
        let mut pending = false;
        for j in 0..self.own.len() {
            let ask = match self.own[j] {
                OwnFetch::Got | OwnFetch::Refused => continue,
                _ if self.peers[j].gone || waited_enough => continue,
                OwnFetch::Unasked => true,
                OwnFetch::Asked(at) => t.saturating_sub(at) >= OWN_TIMEOUT_US,
                OwnFetch::Failed(at) => t.saturating_sub(at) >= self.timing.fetch_every_us,
            };
            pending = true;
            if ask && in_flight < MAX_OWN_FETCHES {
                in_flight += 1;
                self.own[j] = OwnFetch::Asked(t);
                let node = self.roster[j].id.clone();
                self.out.push(super::Effect::FetchOwn { node, end });
            }
        }
        pending
    }

    /// The origin reports. When the origin is gone (or outside the roster and
    /// silent), the leader does, and so does the first member this node sees alive,
    /// so that a result survives the origin even when no majority is left to elect
    /// anyone. One report per run while the origin lives: every copy is the same.
    pub(super) fn is_reporter(&self) -> bool {
        if self.origin == self.me.id {
            return true;
        }
        let origin_gone = match self.index_of(&self.origin) {
            Some(o) => self.peers[o].gone,
            None => self.origin_silent,
        };
        // Only witnesses hear every member, so only they can report.
        origin_gone
            && self.i_witness()
            && (self.am_leader()
                || self
                    .witnesses
                    .iter()
                    .copied()
                    .find(|&j| !self.peers[j].gone)
                    == self.my_index)
    }

    /// Finishing: reporters fetch what they lack, then report; others are done.
    pub(super) fn finish(&mut self, now: Now) {
        let since = *self.finishing_since.get_or_insert(now.mono_us);
        // With tree aggregation, the last seconds are still on their way up: every
        // node stays a little to pass up and take in what it can, and a reporter
        // fetches one by one only what did not come by then.
        let tree_grace =
            self.tree().is_some() && now.mono_us.saturating_sub(since) < super::tree::TREE_GRACE_US;
        if self.tree().is_some() {
            // Every engine has ended and sent its last second before it arrived at
            // `finished`: what an aggregator holds now waits for nothing more, so it
            // goes up at once rather than after the group's and the root's waits. (A
            // run's last, partial second — held by the few members that had one — never
            // covers its scope and waited them out: 1.3 s between `finished` and the
            // report at 50 real nodes.) A second that comes later still goes up as a
            // supplement covering just its members.
            self.pass_up(None, now, true);
        }
        if !self.is_reporter() {
            if !tree_grace {
                self.set_done();
            }
            return;
        }
        let waited_enough = now.mono_us.saturating_sub(since) >= self.timing.finish_wait_us;
        // Members' own totals are final once they arrived at `finished`: asked for at
        // once, while the last seconds still come up the tree.
        let own_pending = self.fetch_own(now, waited_enough);
        let finished = self
            .arrivals
            .get(&Barrier::Finished)
            .cloned()
            .unwrap_or_default();
        let mut to_fetch: Vec<(usize, Vec<u64>)> = Vec::new();
        let mut unreported: Vec<(usize, Vec<u64>, Option<u64>)> = Vec::new();
        for j in 0..self.roster.len() {
            let seen = &self.seen[j];
            match finished.get(&j).and_then(|d| d.snapshots) {
                Some(count) => {
                    let count = count.min(MAX_SECONDS);
                    let (gone, gaps): (Vec<u64>, Vec<u64>) = (0..count)
                        .filter(|s| !seen.contains(s))
                        .partition(|s| self.absent[j].contains(s));
                    let mut lacking = gone;
                    if !gaps.is_empty() {
                        if self.peers[j].gone || waited_enough {
                            lacking.extend(gaps);
                            lacking.sort_unstable();
                        } else {
                            to_fetch.push((j, gaps));
                        }
                    }
                    if !lacking.is_empty() {
                        unreported.push((j, lacking, None));
                    }
                }
                None => {
                    // Lost before it said how many seconds it had: every gap below
                    // its last known second, and everything after it, is missing.
                    let next = seen.last().map_or(0, |s| s + 1);
                    let gaps: Vec<u64> = (0..next).filter(|s| !seen.contains(s)).collect();
                    unreported.push((j, gaps, Some(next)));
                }
            }
        }
        if !to_fetch.is_empty() {
            // In the tree's grace only the last seconds may still come up the tree; a
            // gap further back (a member's batch lost or refused at the start) will
            // not, so it is fetched at once instead of after the grace (at 40 real
            // nodes that grace was the 2 s between the plan's end and the report).
            let end = self.run_end_second();
            let settled = |s: &u64| s + super::tree::TREE_SETTLED_S <= end;
            if now.mono_us.saturating_sub(self.fetch_asked) >= self.timing.fetch_every_us {
                let mut asked = false;
                for (j, seqs) in &to_fetch {
                    let mut seqs: Vec<u64> = seqs
                        .iter()
                        .copied()
                        .filter(|s| !tree_grace || settled(s))
                        .collect();
                    if seqs.is_empty() {
                        continue;
                    }
                    seqs.truncate(SNAPSHOTS_PER_REQUEST);
                    let node = self.roster[*j].id.clone();
                    self.out.push(super::Effect::Fetch { node, seqs });
                    asked = true;
                }
                if asked {
                    self.fetch_asked = now.mono_us;
                }
            }
            return;
        }
        if own_pending {
            return;
        }
        for (j, seconds, after) in unreported {
            let node = self.roster[j].name.clone();
            let seconds = second_ranges(&seconds);
            self.event(
                now,
                RunEvent::SnapshotsMissing {
                    node,
                    seconds,
                    after,
                },
            );
        }
        if self.tree().is_some() {
            for j in 0..self.own.len() {
                let reason = match self.own[j] {
                    OwnFetch::Got => continue,
                    OwnFetch::Refused => "it has none for this run",
                    _ if self.peers[j].gone => "it is gone",
                    OwnFetch::Unasked => "not asked in time",
                    _ => "no answer",
                };
                let node = self.roster[j].name.clone();
                self.event(
                    now,
                    RunEvent::NodeTotalsMissing {
                        node,
                        reason: reason.into(),
                    },
                );
            }
        }
        self.report(now);
        self.set_done();
    }

    fn report(&mut self, now: Now) {
        if self.reported {
            return;
        }
        self.reported = true;
        let started = self.arrivals.get(&Barrier::Started);
        let ready = self.arrivals.get(&Barrier::Ready);
        let members: Vec<MemberFact> = (0..self.roster.len())
            .map(|i| {
                let m = &self.roster[i];
                let status = match self.member_status(i) {
                    MemberStatus::Running => MemberStatus::Completed,
                    s => s,
                };
                MemberFact {
                    index: i,
                    id: m.id.clone(),
                    name: m.name.clone(),
                    labels: m.labels.clone(),
                    status,
                    start_late_us: started
                        .and_then(|b| b.get(&i))
                        .and_then(|d| d.started_unix_us)
                        .zip(self.version.as_ref().map(|v| v.start_unix_us))
                        .map(|(s, at)| s as i64 - at as i64),
                    clock_offset_us: ready
                        .and_then(|b| b.get(&i))
                        .and_then(|d| d.clock_offset_us),
                }
            })
            .collect();
        let starts: Vec<u64> = started
            .map(|b| b.values().filter_map(|d| d.started_unix_us).collect())
            .unwrap_or_default();
        let skew = match (starts.iter().min(), starts.iter().max()) {
            (Some(a), Some(b)) => b - a,
            _ => 0,
        };
        let facts = ReportFacts {
            members,
            start_unix_us: self.version.as_ref().map(|v| v.start_unix_us),
            start_skew_us: skew,
            duration_s: self.run_time_us(now).unwrap_or(0) as f64 / 1e6,
            seconds: self.seen.iter().map(|s| s.count()).sum(),
        };
        self.out.push(super::Effect::Report(facts));
    }
}

#[cfg(test)]
mod tests {
    use super::Seconds;

    #[test]
    fn seconds_in_order_take_no_memory_and_out_of_order_ones_are_kept() {
        let mut s = Seconds::default();
        for i in 0..100_000u64 {
            assert!(s.insert(i));
        }
        assert!(!s.insert(5), "a second is taken once");
        assert_eq!(
            (s.count(), s.last(), s.above.len()),
            (100_000, Some(99_999), 0)
        );
        assert!(s.insert(100_002));
        assert!(!s.contains(&100_001) && s.contains(&100_002) && s.contains(&3));
        assert_eq!(s.last(), Some(100_002));
        assert!(s.insert(100_001) && s.insert(100_000));
        assert_eq!((s.count(), s.above.len()), (100_003, 0));
        assert_eq!(Seconds::default().last(), None);
    }
}
