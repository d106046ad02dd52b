//! Membership at scale, sans I/O: which members are alive when a node is connected to
//! only a bounded set of neighbours and hears nothing periodic from the rest.
//!
//! The rules (SWIM's, over gossip): a member is alive from the moment a record of it is
//! heard until a suspicion of *that* record (same sequence number) goes unrefuted for
//! `suspect_timeout`; its subject refutes by announcing a newer record; a record that
//! says "leaving" is lost at once; a newer record always wins, and at an equal sequence
//! number lost beats suspect beats alive. Suspicions come only from a node's own
//! evidence about a neighbour (a dropped connection it could not re-open, pings
//! unanswered), so idle traffic is per neighbour, not per member. Each node re-announces
//! itself slowly, at a pace that keeps the mesh-wide rate of records constant
//! ([`refresh_interval_ms`]), which heals a lost rumor without costing more per node as
//! the mesh grows.
//!
//! This module keeps the state and takes the current time as an input; it must not do
//! I/O, check signatures (the caller installs only records their subject signed) or
//! know about connections. The node (`node/src/mesh/`) and the membership simulation
//! (`tools/src/sim/membership.rs`) both drive it.

use std::collections::BTreeMap;

/// What one node believes about one other member's current record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rumor {
    Alive,
    /// Someone saw the member's record `seq` fail; lost after the timeout unless a newer
    /// record arrives.
    Suspect {
        since_ms: u64,
    },
    Lost {
        since_ms: u64,
    },
}

impl Rumor {
    fn rank(self) -> u8 {
        match self {
            Rumor::Alive => 0,
            Rumor::Suspect { .. } => 1,
            Rumor::Lost { .. } => 2,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    rumor: Rumor,
    /// When a newer record of it last arrived (a refresh is one).
    renewed_ms: u64,
}

/// What a change did, for the caller to log or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<Id> {
    /// The member's rumor moved (e.g. suspect → lost); `Alive` when a newer record revived it.
    Became(Id, Rumor),
}

/// Liveness of the members one node knows, by their records' sequence numbers.
#[derive(Debug, Clone)]
pub struct Liveness<Id: Ord + Clone> {
    suspect_timeout_ms: u64,
    entries: BTreeMap<Id, Entry>,
}

impl<Id: Ord + Clone> Liveness<Id> {
    pub fn new(suspect_timeout_ms: u64) -> Self {
        Liveness {
            suspect_timeout_ms,
            entries: BTreeMap::new(),
        }
    }

    /// A record of `id` (already verified by the caller). Returns whether it was newer
    /// than what we held, i.e. whether the member is now alive (or lost, if `leaving`)
    /// on its strength.
    pub fn record(&mut self, id: Id, seq: u64, leaving: bool, now_ms: u64) -> bool {
        let rumor = if leaving {
            Rumor::Lost { since_ms: now_ms }
        } else {
            Rumor::Alive
        };
        match self.entries.get_mut(&id) {
            Some(e) if e.seq > seq => false,
            // The same record again: news only if it says more (leaving) than we had.
            Some(e) if e.seq == seq => {
                if rumor.rank() > e.rumor.rank() {
                    e.rumor = rumor;
                    true
                } else {
                    false
                }
            }
            Some(e) => {
                *e = Entry {
                    seq,
                    rumor,
                    renewed_ms: now_ms,
                };
                true
            }
            None => {
                self.entries.insert(
                    id,
                    Entry {
                        seq,
                        rumor,
                        renewed_ms: now_ms,
                    },
                );
                true
            }
        }
    }

    /// A suspicion of `id`'s record `seq`, from this node's own evidence or heard from
    /// another member. Applies only to the record we hold (a suspicion of an older
    /// record is stale; one of a record we never saw cannot be checked, and would let
    /// a forger name a sequence number its subject could not refute). Returns whether it
    /// changed anything (then it is news worth passing on).
    pub fn suspect(&mut self, id: &Id, seq: u64, now_ms: u64) -> bool {
        match self.entries.get_mut(id) {
            Some(e) if e.seq == seq && e.rumor == Rumor::Alive => {
                e.rumor = Rumor::Suspect { since_ms: now_ms };
                true
            }
            _ => false,
        }
    }

    /// Moves suspicions past their timeout to lost, and members whose record was not
    /// renewed for `expire_after_ms` (several of their slow refreshes missed: the safety
    /// net for a node whose neighbours all died with it, so that nobody suspected it).
    pub fn tick(&mut self, now_ms: u64, expire_after_ms: u64) -> Vec<Change<Id>> {
        let mut out = Vec::new();
        for (id, e) in self.entries.iter_mut() {
            let expired = now_ms.saturating_sub(e.renewed_ms) >= expire_after_ms;
            let timed_out = matches!(e.rumor, Rumor::Suspect { since_ms } if now_ms.saturating_sub(since_ms) >= self.suspect_timeout_ms);
            let lost = matches!(e.rumor, Rumor::Lost { .. });
            if !lost && (timed_out || expired) {
                e.rumor = Rumor::Lost { since_ms: now_ms };
                out.push(Change::Became(id.clone(), e.rumor));
            }
        }
        out
    }

    pub fn rumor(&self, id: &Id) -> Option<Rumor> {
        self.entries.get(id).map(|e| e.rumor)
    }

    pub fn seq(&self, id: &Id) -> Option<u64> {
        self.entries.get(id).map(|e| e.seq)
    }

    /// Whether `id` counts as alive: known, and neither lost nor past its suspicion.
    pub fn is_alive(&self, id: &Id) -> bool {
        matches!(
            self.rumor(id),
            Some(Rumor::Alive) | Some(Rumor::Suspect { .. })
        )
    }

    pub fn forget(&mut self, id: &Id) {
        self.entries.remove(id);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Members believed alive.
    pub fn alive(&self) -> impl Iterator<Item = &Id> {
        self.entries
            .iter()
            .filter(|(_, e)| !matches!(e.rumor, Rumor::Lost { .. }))
            .map(|(id, _)| id)
    }
}

/// Whether a suspicion heard about this node itself must be refuted (by announcing a
/// newer record): it names our current record or a later one.
pub fn must_refute(own_seq: u64, suspected_seq: u64) -> bool {
    suspected_seq >= own_seq
}

/// How often a node re-announces its record when nothing changed, given how many
/// members it knows: `floor_ms`, or slower in a larger mesh, so that the whole mesh
/// sends about `per_second` records a second and each node receives that many —
/// constant in the mesh's size.
pub fn refresh_interval_ms(members: usize, floor_ms: u64, per_second: f64) -> u64 {
    let spread = (members as f64 / per_second.max(0.001) * 1000.0) as u64;
    floor_ms.max(spread)
}

/// The neighbours to dial so that this node holds `want` chosen links: candidates are
/// taken in the order of `rank` (the caller passes a random rank, so links form a
/// random graph, which is connected with high probability for `want` ≥ 3).
pub fn pick_neighbours<Id: Ord + Clone>(
    chosen: usize,
    want: usize,
    mut candidates: Vec<(u64, Id)>,
) -> Vec<Id> {
    let need = want.saturating_sub(chosen);
    candidates.sort();
    candidates
        .into_iter()
        .take(need)
        .map(|(_, id)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_makes_alive_and_an_unrefuted_suspicion_makes_lost() {
        let mut l = Liveness::new(1000);
        assert!(l.record("b", 10, false, 0));
        assert!(l.is_alive(&"b"));
        assert!(l.suspect(&"b", 10, 100));
        assert!(
            !l.suspect(&"b", 10, 150),
            "the same suspicion again is no news"
        );
        assert!(l.tick(1099, u64::MAX).is_empty());
        assert!(l.is_alive(&"b"), "a suspect still counts as alive");
        assert_eq!(
            l.tick(1100, u64::MAX),
            vec![Change::Became("b", Rumor::Lost { since_ms: 1100 })]
        );
        assert!(!l.is_alive(&"b"));
        // The stale record again (a neighbour's list that still has it) does not revive it.
        assert!(!l.record("b", 10, false, 1200));
        assert!(!l.is_alive(&"b"));
        // Its subject's newer record does.
        assert!(l.record("b", 11, false, 1300));
        assert!(l.is_alive(&"b"));
    }

    #[test]
    fn a_refutation_beats_the_suspicion() {
        let mut l = Liveness::new(1000);
        l.record("b", 10, false, 0);
        l.suspect(&"b", 10, 0);
        assert!(must_refute(10, 10));
        assert!(!must_refute(11, 10), "an old suspicion needs no answer");
        assert!(l.record("b", 11, false, 500));
        assert!(l.tick(5000, u64::MAX).is_empty());
        assert_eq!(l.rumor(&"b"), Some(Rumor::Alive));
    }

    #[test]
    fn stale_forged_and_unknown_suspicions_change_nothing() {
        let mut l = Liveness::new(1000);
        l.record("b", 10, false, 0);
        assert!(!l.suspect(&"b", 9, 0), "older record");
        assert!(!l.suspect(&"b", u64::MAX, 0), "a record never seen");
        assert!(!l.suspect(&"c", 1, 0), "unknown member");
        assert!(l.tick(10_000, u64::MAX).is_empty());
        assert!(l.is_alive(&"b"));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_record_not_renewed_for_the_expiry_is_lost() {
        let mut l = Liveness::new(1000);
        l.record("b", 10, false, 0);
        l.record("c", 10, false, 0);
        l.record("c", 11, false, 50_000);
        assert!(
            !l.record("b", 10, false, 50_000),
            "a relayed copy renews nothing"
        );
        assert_eq!(
            l.tick(60_000, 60_000),
            vec![Change::Became("b", Rumor::Lost { since_ms: 60_000 })]
        );
        assert!(l.is_alive(&"c"));
        assert!(
            l.tick(61_000, 60_000).is_empty(),
            "lost once, reported once"
        );
    }

    #[test]
    fn leaving_is_lost_at_once_and_older_records_are_ignored() {
        let mut l = Liveness::new(1000);
        l.record("b", 10, false, 0);
        assert!(l.record("b", 10, true, 5), "same record saying leaving");
        assert!(!l.is_alive(&"b"));
        assert!(!l.record("b", 9, false, 6));
        assert!(!l.is_alive(&"b"));
        l.forget(&"b");
        assert!(l.is_empty());
    }

    #[test]
    fn the_refresh_slows_with_the_mesh_so_the_mesh_wide_rate_is_constant() {
        assert_eq!(refresh_interval_ms(10, 60_000, 1.0), 60_000);
        assert_eq!(refresh_interval_ms(1000, 60_000, 1.0), 1_000_000);
        // members / interval = records per second arriving at every node.
        for n in [100usize, 1000, 10_000] {
            let per_s = n as f64 / (refresh_interval_ms(n, 1000, 2.0) as f64 / 1000.0);
            assert!((per_s - 2.0).abs() < 0.01, "{n}: {per_s}");
        }
        assert_eq!(
            refresh_interval_ms(5, 100, 0.0),
            5_000_000,
            "no division by 0"
        );
    }

    #[test]
    fn neighbours_are_picked_up_to_the_wanted_count_by_rank() {
        let c = vec![(5, "e"), (1, "a"), (3, "c")];
        assert_eq!(pick_neighbours(1, 3, c.clone()), vec!["a", "c"]);
        assert!(pick_neighbours(3, 3, c.clone()).is_empty());
        assert_eq!(pick_neighbours(0, 8, c).len(), 3);
    }
}
