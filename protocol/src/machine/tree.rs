//! Snapshot aggregation in a tree (docs/protocol.md §10): who aggregates whose
//! seconds, what an aggregator holds and when it passes a merged second up, which of
//! its own seconds a member sends again after a failover, and which merged seconds a
//! node takes into its view of the run.
//!
//! The shape, from the roster alone: members in rendezvous order (SHA-256 of the run
//! id and the peer id), dealt round-robin into `ceil(n / fan_in)` groups; the
//! aggregator of a group is its first member in that order whose share was not moved
//! (the run's agreed record of who is lost, so every member at a version names the
//! same one, and a lost aggregator is replaced by the next as soon as its share
//! moves); the root is group 0's aggregator. Members send each second to their group's
//! aggregator, aggregators send one merge of it to the root, the root gossips one
//! merge of the whole run. With at most `fan_in²` members (1024 at the default fan-in
//! of 32, the roster's limit) that is two levels.
//!
//! Exactness: every merged second names the exact set of members it covers, and a
//! node takes one only if that set is disjoint from what it already has of that
//! second; anything else (a failover's overlap, a duplicate) is refused whole and its
//! members' seconds are fetched one by one at the end, or named as missing.
//!
//! Must not merge measurements (the node does, on `Hold`, `Forward` and
//! `MergeBatch`) nor decide what the report names as missing (the ledger does).

use std::collections::{BTreeMap, BTreeSet};

use super::{Effect, Flaw, Now, Phase, RunMachine};
use crate::run::RosterEntry;

/// Members per group, by default: two levels reach [`crate::run::MAX_MEMBERS`].
pub const FAN_IN: usize = 32;
/// The smallest fan-in a run may be set to (tests use small ones to get two levels
/// out of a few nodes).
pub const MIN_FAN_IN: usize = 2;
/// How long a group's aggregator waits for the rest of its group's second after the
/// first of it arrived, before it passes up what it has.
pub const GROUP_WAIT_US: u64 = 400_000;
/// How long the root waits for the rest of a second (the groups' waits included).
pub const ROOT_WAIT_US: u64 = 900_000;
/// How long past the run's finish an aggregator stays to pass up the last seconds,
/// and a reporter waits before it fetches the seconds it lacks one by one.
pub const TREE_GRACE_US: u64 = 2_000_000;
/// How many seconds before a run's end a second's merge has certainly had its time
/// to come up the tree (its members' waits, the group's and the root's, are ~1.3 s):
/// a reporter fetches such a second's gaps one by one at once, and waits out
/// [`TREE_GRACE_US`] only for the seconds after it.
pub const TREE_SETTLED_S: u64 = 3;
/// Seconds an aggregator remembers what it passed up, and a member which of its own
/// seconds it has not yet seen merged: older ones are left to the end's re-fetch.
pub const TREE_WINDOW_S: u64 = 120;

/// How a run's per-second snapshots reach every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// Every member gossips its own second and every node merges every member's
    /// (the cost at each node grows with the run's members).
    #[default]
    AllToAll,
    /// Up a tree of this fan-in, and down from its root (this module).
    Tree { fan_in: usize },
}

/// The run's aggregation tree, from the roster and the run id alone.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Roster indices in rendezvous order.
    order: Vec<usize>,
    /// Each roster index's position in `order`.
    pos: Vec<usize>,
    groups: usize,
}

impl Tree {
    pub fn new(roster: &[RosterEntry], run_id: &str, fan_in: usize) -> Tree {
        use sha2::{Digest, Sha256};
        let score = |id: &str| {
            let mut h = Sha256::new();
            h.update((run_id.len() as u64).to_le_bytes());
            h.update(run_id.as_bytes());
            h.update(b"aggregate");
            h.update(id.as_bytes());
            let d = h.finalize();
            u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
        };
        let mut ranked: Vec<(u64, usize)> = roster
            .iter()
            .enumerate()
            .map(|(i, m)| (score(&m.id), i))
            .collect();
        ranked.sort_unstable();
        let order: Vec<usize> = ranked.into_iter().map(|r| r.1).collect();
        let mut pos = vec![0; roster.len()];
        for (p, &i) in order.iter().enumerate() {
            pos[i] = p;
        }
        let fan_in = fan_in.max(MIN_FAN_IN);
        Tree {
            order,
            pos,
            groups: roster.len().div_ceil(fan_in).max(1),
        }
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn group_of(&self, j: usize) -> usize {
        self.pos.get(j).map_or(0, |p| p % self.groups)
    }

    /// A group's members in the order they take over as its aggregator.
    pub fn candidates(&self, g: usize) -> impl Iterator<Item = usize> + '_ {
        self.order.iter().copied().skip(g).step_by(self.groups)
    }
}

/// What this node holds of one second as an aggregator.
#[derive(Debug, Clone, Default)]
pub(super) struct StageSecond {
    /// Members whose second went up (or out, at the root) from here already.
    passed: BTreeSet<u32>,
    /// Members whose second is held, not yet passed on, and since when (mono µs).
    held: BTreeSet<u32>,
    held_since: Option<u64>,
}

/// The tree's state on one node.
#[derive(Debug, Clone, Default)]
pub(super) struct TreeState {
    pub(super) tree: Option<Tree>,
    pub(super) stage: BTreeMap<u64, StageSecond>,
    /// This node's own seconds not yet seen in a root's merge: the second and the
    /// (aggregator, root) it went to.
    unmerged: BTreeMap<u64, (usize, usize)>,
    /// The (aggregator, root) this node's seconds go to now.
    route: Option<(usize, usize)>,
    /// Own seconds sent already (a repeat of the engine's is ignored).
    sent: super::ledger::Seconds,
}

impl RunMachine {
    /// Sets how snapshots travel (before the roster arrives; the node and the
    /// simulator set it right after creating the machine).
    pub fn set_aggregation(&mut self, a: Aggregation) {
        self.aggregation = match a {
            Aggregation::Tree { fan_in } => Aggregation::Tree {
                fan_in: fan_in.max(MIN_FAN_IN),
            },
            a => a,
        };
    }

    pub fn aggregation(&self) -> Aggregation {
        self.aggregation
    }

    /// The run's tree (tree aggregation, once the roster is known).
    pub fn tree(&self) -> Option<&Tree> {
        self.trees.tree.as_ref()
    }

    pub(super) fn build_tree(&mut self) {
        if let Aggregation::Tree { fan_in } = self.aggregation {
            self.trees.tree = Some(Tree::new(&self.roster, &self.run_id, fan_in));
        }
    }

    fn moved(&self, j: usize) -> bool {
        self.version.as_ref().is_some_and(|v| v.is_moved(j))
    }

    /// The aggregator of group `g`: its first member whose share was not moved.
    pub fn aggregator_of(&self, g: usize) -> Option<usize> {
        let t = self.trees.tree.as_ref()?;
        t.candidates(g).find(|&j| !self.moved(j))
    }

    /// The root: group 0's aggregator.
    pub fn root(&self) -> Option<usize> {
        self.aggregator_of(0)
    }

    fn am_root(&self) -> bool {
        self.my_index.is_some() && self.root() == self.my_index
    }

    /// The members whose seconds this node aggregates: all of them at the root, its
    /// group at a group's candidate, none elsewhere.
    fn in_scope(&self, j: usize) -> bool {
        let (Some(t), Some(me)) = (self.trees.tree.as_ref(), self.my_index) else {
            return false;
        };
        self.am_root() || t.group_of(j) == t.group_of(me)
    }

    /// This node's engine produced second `seq`: it goes to the group's aggregator
    /// (held here when that is this node).
    pub(super) fn tree_own_second(&mut self, seq: u64, now: Now) {
        let Some(me) = self.my_index else { return };
        if !self.trees.sent.insert(seq) {
            return;
        }
        self.published = self.published.max(seq + 1);
        let Some(route) = self.route() else { return };
        self.trees.unmerged.insert(seq, route);
        let keep_from = seq.saturating_sub(TREE_WINDOW_S);
        self.trees.unmerged = self.trees.unmerged.split_off(&keep_from);
        self.send_own(seq, route.0, me, now);
    }

    fn route(&self) -> Option<(usize, usize)> {
        let t = self.trees.tree.as_ref()?;
        let g = t.group_of(self.my_index?);
        Some((self.aggregator_of(g)?, self.root()?))
    }

    fn send_own(&mut self, seq: u64, to: usize, me: usize, now: Now) {
        if to == me {
            self.take(seq, vec![me as u32], true, now);
        } else {
            self.out.push(Effect::SendSnapshot {
                seq,
                to: self.roster[to].id.clone(),
            });
        }
    }

    /// A merged (or single) second arrived: gossiped by the root (`published`), or
    /// sent directly up the tree to this node.
    pub(super) fn on_batch(
        &mut self,
        from: &str,
        seq: u64,
        covers: &[u32],
        published: bool,
        now: Now,
    ) {
        let n = self.roster.len();
        if self.trees.tree.is_none()
            || covers.is_empty()
            || seq >= super::ledger::MAX_SECONDS
            || covers.iter().any(|&c| c as usize >= n)
            || !covers.windows(2).all(|w| w[0] < w[1])
        {
            return;
        }
        let Some(sender) = self.index_of(from) else {
            return;
        };
        let Some(t) = self.trees.tree.as_ref() else {
            return;
        };
        if published {
            // Only a candidate for the root merges the whole run.
            if t.group_of(sender) != 0 {
                return;
            }
            self.take_merged(seq, covers, now);
            return;
        }
        // Up the tree: a member's own second, or a merge of the sender's group by its
        // aggregator (or one before it in the order, not yet replaced there): no
        // other member may speak for a member's second.
        let single = covers == [sender as u32];
        let g = t.group_of(sender);
        let aggregates = t
            .candidates(g)
            .take_while(|&j| self.moved(j) || j == sender)
            .any(|j| j == sender);
        let its_group = covers.iter().all(|&c| t.group_of(c as usize) == g);
        if !(single || (aggregates && its_group))
            || !covers.iter().all(|&c| self.in_scope(c as usize))
        {
            return;
        }
        self.take(seq, covers.to_vec(), false, now);
    }

    /// Holds `covers`' second `seq` here for passing up, unless some of it was held
    /// or passed already (a duplicate, or a repeat after a failover: refused whole).
    fn take(&mut self, seq: u64, covers: Vec<u32>, own: bool, now: Now) {
        // A second far past the run's clock is a peer's lie: it would push the window
        // past every real second.
        let run_s = self.run_time_us(now).map(|t| t / 1_000_000);
        if run_s.is_none_or(|r| seq > r + TREE_WINDOW_S / 4) {
            return;
        }
        let newest = self.trees.stage.keys().next_back().copied().unwrap_or(0);
        if seq + TREE_WINDOW_S < newest {
            // Too old to know whether it went up already.
            return;
        }
        let st = self.trees.stage.entry(seq).or_default();
        if covers
            .iter()
            .any(|c| st.passed.contains(c) || st.held.contains(c))
        {
            return;
        }
        st.held.extend(covers.iter().copied());
        st.held_since.get_or_insert(now.mono_us);
        self.out.push(Effect::Hold { seq, own });
        if seq > newest {
            let keep_from = seq.saturating_sub(TREE_WINDOW_S);
            let kept = self.trees.stage.split_off(&keep_from);
            self.trees.stage = kept;
        }
        self.pass_up(Some(seq), now, false);
    }

    /// Passes up what is held of each second (or of `only`) once it covers every
    /// member in scope not moved, or waited long enough (or `all`: the run is over).
    pub(super) fn pass_up(&mut self, only: Option<u64>, now: Now, all: bool) {
        let Some(me) = self.my_index else { return };
        if only.is_none() && !self.trees.stage.values().any(|s| !s.held.is_empty()) {
            // Every node ticks this; only aggregators hold anything.
            return;
        }
        let root = self.am_root();
        let wait = if root { ROOT_WAIT_US } else { GROUP_WAIT_US };
        let seqs: Vec<u64> = match only {
            Some(s) => vec![s],
            None => self
                .trees
                .stage
                .iter()
                .filter(|(_, st)| !st.held.is_empty())
                .map(|(&s, _)| s)
                .collect(),
        };
        let scope: Vec<u32> = match self.trees.tree.as_ref() {
            Some(t) => (0..self.roster.len())
                .filter(|&j| (root || t.group_of(j) == t.group_of(me)) && !self.moved(j))
                .map(|j| j as u32)
                .collect(),
            None => return,
        };
        let to_root = self.root();
        for seq in seqs {
            let Some(st) = self.trees.stage.get(&seq) else {
                continue;
            };
            if st.held.is_empty() {
                continue;
            }
            let complete = scope
                .iter()
                .all(|j| st.held.contains(j) || st.passed.contains(j));
            let waited = st
                .held_since
                .is_some_and(|t| now.mono_us.saturating_sub(t) >= wait);
            if !(complete || waited || all) {
                continue;
            }
            let to = if root {
                None
            } else {
                match to_root {
                    Some(r) if r != me => Some(self.roster[r].id.clone()),
                    // No root (every candidate of group 0 lost): keep it; the end's
                    // re-fetch gets these seconds from their members.
                    _ => continue,
                }
            };
            let Some(st) = self.trees.stage.get_mut(&seq) else {
                continue;
            };
            let covers: Vec<u32> = std::mem::take(&mut st.held).into_iter().collect();
            st.held_since = None;
            st.passed.extend(covers.iter().copied());
            self.out.push(Effect::Forward {
                seq,
                to: to.clone(),
                covers: covers.clone(),
            });
            if to.is_none() {
                // The root's own gossip does not come back to it.
                self.take_merged(seq, &covers, now);
            }
        }
    }

    /// A root's merge of second `seq`: into this node's view if it overlaps nothing
    /// this node has of that second.
    fn take_merged(&mut self, seq: u64, covers: &[u32], _now: Now) {
        if self.seen.len() != self.roster.len() {
            return;
        }
        let overlaps = covers.iter().any(|&c| self.seen[c as usize].contains(&seq));
        if overlaps && self.flaw != Flaw::OverlappingBatches {
            return;
        }
        for &c in covers {
            self.seen[c as usize].insert(seq);
        }
        if let Some(me) = self.my_index {
            if covers.contains(&(me as u32)) {
                self.trees.unmerged.remove(&seq);
            }
        }
        self.out.push(Effect::MergeBatch {
            seq,
            covers: covers.to_vec(),
        });
    }

    /// On each tick: pass up what waited long enough, and send this node's seconds
    /// not yet seen merged again when its aggregator or the root changed.
    pub(super) fn tree_tick(&mut self, now: Now) {
        if self.trees.tree.is_none() || self.phase == Phase::Done {
            return;
        }
        self.pass_up(None, now, false);
        let Some(me) = self.my_index else { return };
        let Some(route) = self.route() else { return };
        if Some(route) != self.trees.route {
            let was = self.trees.route.replace(route);
            if was.is_some_and(|w| w.1 != route.1) {
                // A new root: what went up to the old one and never came back merged
                // may be taken again when its members send it again.
                let seen = &self.seen;
                for (seq, st) in self.trees.stage.iter_mut() {
                    st.passed
                        .retain(|&c| seen.get(c as usize).is_some_and(|x| x.contains(seq)));
                }
            }
            if was.is_some() {
                let again: Vec<u64> = self
                    .trees
                    .unmerged
                    .iter()
                    .filter(|(_, &r)| r != route)
                    .map(|(&s, _)| s)
                    .collect();
                for seq in again {
                    self.trees.unmerged.insert(seq, route);
                    self.send_own(seq, route.0, me, now);
                }
            }
        }
    }

    /// Whether this node still holds seconds to pass up.
    #[cfg(test)]
    pub(super) fn tree_holds(&self) -> bool {
        self.trees.stage.values().any(|s| !s.held.is_empty())
    }
}

#[cfg(test)]
mod tests;
