//! Assignment versions: who owns which VU index and arrival event, as a short
//! description that every member can expand into the same [`Split`].
//!
//! A version is the run's common start plus the ordered list of moves made so far
//! (lost member → survivors, from an event index on). Its content is a pure function
//! of the roster and that list, so a version travels in every heartbeat and any
//! member can rebuild it; its `digest` names the content. Two members with the same
//! digest agree on every owner — which is what the lease rule compares.
//!
//! Counted work (shared-iterations, per-vu-iterations) has no schedule to say "from
//! here on": a lost member's share moves from its *claims* on — the reservations a
//! majority confirmed to it (see `liveness`), which the leader reads from the members
//! that fenced it — so nothing it may have started is handed out again.
//!
//! Must not decide when to move a share (that is the leader's part) or hold state.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::run::RosterEntry;
use crate::segment::{Assignment, Reassignment, SegmentError, Striping};

/// The most moves a version may list: every member but one can be lost once.
pub const MAX_MOVES: usize = crate::run::MAX_MEMBERS;

/// The order of versions: the issuing leader's term, then its own sequence.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct VersionId {
    pub term: u64,
    pub seq: u64,
}

/// One failover: the member at roster index `lost` hands all its VU indices, its
/// arrival events from `from_event` on, and its counted work beyond `claims`, to the
/// `takers` (every member not lost by then, when empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Move {
    pub lost: u32,
    pub from_event: u64,
    /// Run time (µs) the move takes effect at, for the report.
    pub at_us: u64,
    /// One per counted scenario (plan order): the most of it the lost member may
    /// have started — pool slots for shared-iterations, the iteration number below
    /// which its VUs may have started for per-vu-iterations. A missing entry moves
    /// nothing of that scenario (the safe side).
    #[serde(default)]
    pub claims: Vec<u64>,
    /// The members that take over, as a bit set of roster indices (bit i of byte
    /// i / 8); empty: every member not moved. A bit set keeps a version small in a
    /// large mesh: it travels in every heartbeat.
    #[serde(default)]
    pub takers: Vec<u8>,
}

impl Move {
    /// Whether roster index `i` is among the takers.
    pub fn takes(&self, i: usize) -> bool {
        self.takers.is_empty()
            || self
                .takers
                .get(i / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
}

/// A set of roster indices as a move's `takers` bit set.
pub fn member_set(members: impl IntoIterator<Item = usize>) -> Vec<u8> {
    let mut bits = Vec::new();
    for i in members {
        if bits.len() <= i / 8 {
            bits.resize(i / 8 + 1, 0);
        }
        bits[i / 8] |= 1 << (i % 8);
    }
    bits
}

/// Most counted scenarios a run may have (claims travel in every heartbeat).
pub const MAX_COUNTED: usize = 64;

/// A scenario whose work is a number of iterations rather than a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Counted {
    /// shared-iterations: a pool of `iterations` split by capacity. A member's claim
    /// counts the slots of its pool it may start.
    Pool { iterations: u64 },
    /// per-vu-iterations: every VU does `iterations`. A member's claim is the
    /// iteration number below which its VUs may start; a taken-over VU goes on from
    /// the lost member's claim.
    PerVu { iterations: u64 },
}

/// A run of slots of some member's pool that a member took over: ranks `first..` of
/// `from`'s pool, spread by `spread` (which of the split's survivor stripings, and
/// this member's position in it). A member's own base share is a piece with `from`
/// = itself and no spread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub from: usize,
    pub first: u64,
    pub count: u64,
    pub spread: Option<(usize, usize)>,
}

/// One counted scenario's work, member by member, after the moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountedSplit {
    pub kind: Counted,
    /// By member: its pool, in the order it works through it (Pool only).
    pieces: Vec<Vec<Piece>>,
    /// By member: the claim it was moved at (it may start nothing beyond).
    caps: Vec<Option<u64>>,
    /// By move: the claim a taken-over VU goes on from (PerVu only).
    floors: Vec<u64>,
    /// The stripings that spread a lost member's pool over the survivors (Pool
    /// only), one per move, which the pieces name: a copy in each of ~N pieces per
    /// move made a hundred-node split with a few dozen moves tens of megabytes.
    #[serde(default)]
    spreads: Vec<Striping>,
}

impl CountedSplit {
    /// Slots of its pool member `node` may work through (Pool; 0 otherwise).
    pub fn size(&self, node: usize) -> u64 {
        let Some(pieces) = self.pieces.get(node) else {
            return 0;
        };
        let sum = pieces.iter().fold(0u64, |a, p| a.saturating_add(p.count));
        self.caps[node].map_or(sum, |c| sum.min(c))
    }

    /// What slot `rank` of `node`'s pool is, as (member, rank) of a base share: the
    /// identity that "at most once" is about.
    pub fn slot(&self, node: usize, rank: u64) -> Option<(usize, u64)> {
        let (mut node, mut rank) = (node, rank);
        // Each step goes one move back; there are fewer moves than members.
        for _ in 0..=self.pieces.len() {
            let mut r = rank;
            let mut next = None;
            for p in self.pieces.get(node)? {
                if r < p.count {
                    next = Some(match &p.spread {
                        None => return Some((node, p.first + r)),
                        Some((k, pos)) => {
                            let st = self.spreads.get(*k)?;
                            (p.from, p.first.checked_add(st.nth_owned(*pos, r)?)?)
                        }
                    });
                    break;
                }
                r -= p.count;
            }
            (node, rank) = next?;
        }
        None
    }

    /// The first iteration a VU does here (PerVu): the highest claim of the members
    /// it was taken from, 0 for a VU never moved.
    pub fn first_iteration(&self, vus: &Assignment, vu: u64) -> u64 {
        vus.moved_at(vu)
            .into_iter()
            .map(|level| self.floors.get(level).copied().unwrap_or(u64::MAX))
            .max()
            .unwrap_or(0)
    }
}

/// An assignment version as it travels: enough to rebuild the split exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub id: VersionId,
    /// The common start instant, in the run clock (the origin's wall clock, Unix
    /// µs).
    pub start_unix_us: u64,
    pub moves: Vec<Move>,
}

/// Who owns which index: VU numbers and arrival events (one index space each), and
/// the counted scenarios' work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub vus: Assignment,
    pub events: Assignment,
    /// One per counted scenario, in plan order.
    #[serde(default)]
    pub counted: Vec<CountedSplit>,
}

impl Split {
    /// A run on one node.
    pub fn single(counted: &[Counted]) -> Split {
        let mut s = Split {
            vus: Assignment::single(),
            events: Assignment::single(),
            counted: Vec::new(),
        };
        s.counted = counted
            .iter()
            .map(|&kind| base_counted(kind, &Striping::single()))
            .collect();
        s
    }
}

fn base_counted(kind: Counted, base: &Striping) -> CountedSplit {
    let n = base.segments();
    let pieces = match kind {
        Counted::Pool { iterations } => (0..n)
            .map(|i| {
                vec![Piece {
                    from: i,
                    first: 0,
                    count: base.scale(i, iterations),
                    spread: None,
                }]
            })
            .collect(),
        Counted::PerVu { .. } => vec![Vec::new(); n],
    };
    CountedSplit {
        kind,
        pieces,
        caps: vec![None; n],
        floors: Vec::new(),
        spreads: Vec::new(),
    }
}

impl Version {
    /// Names the content (start and moves), not the id: a new leader that re-issues
    /// the same content under its own term keeps the same digest. Never 0 (0 is "no
    /// assignment yet" in a heartbeat).
    pub fn digest(&self) -> u64 {
        let mut h = Sha256::new();
        h.update(self.start_unix_us.to_le_bytes());
        for m in &self.moves {
            h.update(m.lost.to_le_bytes());
            h.update(m.from_event.to_le_bytes());
            // Lengths first, so that two lists cannot run into each other.
            h.update((m.claims.len() as u64).to_le_bytes());
            for c in &m.claims {
                h.update(c.to_le_bytes());
            }
            h.update((m.takers.len() as u64).to_le_bytes());
            h.update(&m.takers);
        }
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b).max(1)
    }

    /// Whether roster index `i` has been moved away in this version.
    pub fn is_moved(&self, i: usize) -> bool {
        self.moves.iter().any(|m| m.lost as usize == i)
    }

    /// Expands the version over the roster's capacities and the plan's counted
    /// scenarios. Fails on a move that names an unknown member, the same member
    /// twice, a taker that is unknown or lost, or leaves nobody to take over.
    pub fn split(
        &self,
        roster: &[RosterEntry],
        counted: &[Counted],
    ) -> Result<Split, SegmentError> {
        let weights: Vec<u64> = roster.iter().map(|m| u64::from(m.weight.max(1))).collect();
        let bad = |why: String| SegmentError::BadWeights(why);
        if self.moves.len() > MAX_MOVES {
            return Err(bad(format!(
                "{} moves, at most {MAX_MOVES}",
                self.moves.len()
            )));
        }
        if counted.len() > MAX_COUNTED {
            return Err(bad(format!(
                "{} counted scenarios, at most {MAX_COUNTED}",
                counted.len()
            )));
        }
        let base = Striping::from_weights(&weights)?;
        let mut vus = Assignment::new(base.clone());
        let mut events = Assignment::new(base.clone());
        let mut pools: Vec<CountedSplit> =
            counted.iter().map(|&k| base_counted(k, &base)).collect();
        let mut gone = vec![false; roster.len()];
        for m in &self.moves {
            let lost = m.lost as usize;
            if lost >= roster.len() {
                return Err(bad(format!(
                    "move of member {lost} in a roster of {}",
                    roster.len()
                )));
            }
            gone[lost] = true;
            if m.takers.len() > roster.len().div_ceil(8) || m.claims.len() > MAX_COUNTED {
                return Err(bad(format!(
                    "move of member {lost}: too many takers or claims"
                )));
            }
            let takes = |i: usize| !gone[i] && m.takes(i);
            let survivors: Vec<(usize, u64)> = weights
                .iter()
                .enumerate()
                .filter(|(i, _)| takes(*i))
                .map(|(i, w)| (i, *w))
                .collect();
            let named = m.takers.len() * 8;
            if (0..named)
                .any(|i| !m.takers.is_empty() && m.takes(i) && (i >= roster.len() || gone[i]))
            {
                return Err(bad(format!(
                    "move of member {lost}: a taker is unknown or lost"
                )));
            }
            vus.reassign(Reassignment::new(lost, 0, &survivors)?)?;
            events.reassign(Reassignment::new(lost, m.from_event, &survivors)?)?;
            let spread =
                Striping::from_weights(&survivors.iter().map(|s| s.1).collect::<Vec<_>>())?;
            for (c, pool) in pools.iter_mut().enumerate() {
                // No claim for this scenario: keep all of it with the lost member.
                let claim = m.claims.get(c).copied();
                match pool.kind {
                    Counted::Pool { .. } => {
                        let have = pool.size(lost);
                        let kept = claim.unwrap_or(have).min(have);
                        pool.caps[lost] = Some(kept);
                        let rest = have - kept;
                        let k = pool.spreads.len();
                        pool.spreads.push(spread.clone());
                        for (pos, &(s, _)) in survivors.iter().enumerate() {
                            let count = spread.scale(pos, rest);
                            if count > 0 {
                                pool.pieces[s].push(Piece {
                                    from: lost,
                                    first: kept,
                                    count,
                                    spread: Some((k, pos)),
                                });
                            }
                        }
                    }
                    Counted::PerVu { .. } => pool.floors.push(claim.unwrap_or(u64::MAX)),
                }
            }
        }
        Ok(Split {
            vus,
            events,
            counted: pools,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(n: usize) -> Vec<RosterEntry> {
        (0..n)
            .map(|i| RosterEntry {
                id: format!("p{i}"),
                name: format!("n{i}"),
                labels: Default::default(),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn a_move_hands_the_lost_members_later_events_to_the_survivors() {
        let v = Version {
            id: VersionId { term: 1, seq: 1 },
            start_unix_us: 5,
            moves: vec![Move {
                lost: 1,
                from_event: 30,
                at_us: 0,
                claims: vec![],
                takers: vec![],
            }],
        };
        let s = v.split(&roster(3), &[]).unwrap();
        for e in 0..100u64 {
            let before = Version {
                moves: vec![],
                ..v.clone()
            }
            .split(&roster(3), &[])
            .unwrap()
            .events
            .owner(e);
            let after = s.events.owner(e);
            if e < 30 || before != 1 {
                assert_eq!(before, after, "event {e}");
            } else {
                assert_ne!(after, 1, "event {e} still on the lost member");
            }
        }
        assert!((0..50).all(|g| s.vus.owner(g) != 1));
    }

    fn mv(lost: u32, claims: Vec<u64>, takers: Vec<usize>) -> Move {
        Move {
            lost,
            from_event: 0,
            at_us: 0,
            claims,
            takers: member_set(takers),
        }
    }

    #[test]
    fn a_large_splits_size_grows_with_its_moves_not_with_moves_times_members() {
        // A hundred members, thirty lost one after another (a cut-off third of the
        // mesh): every member holds this split, and its engine a copy. Each move's
        // survivor striping is kept once, not once per survivor's piece (that made it
        // ~10 MB, and a simulated hundred-node run 3 GB).
        let counted = [
            Counted::Pool {
                iterations: 100_000,
            },
            Counted::PerVu { iterations: 10 },
        ];
        let v = Version {
            id: VersionId::default(),
            start_unix_us: 0,
            moves: (0..30).map(|i| mv(i * 3, vec![10, 1], vec![])).collect(),
        };
        let s = v.split(&roster(100), &counted).unwrap();
        let size = serde_json::to_vec(&s.counted).unwrap().len();
        assert!(size < 1_000_000, "the counted split takes {size} bytes");
        // Still every slot once.
        let pool = &s.counted[0];
        let mut seen = std::collections::BTreeSet::new();
        for node in 0..100 {
            for k in 0..pool.size(node) {
                assert!(seen.insert(pool.slot(node, k).unwrap()));
            }
        }
        assert_eq!(seen.len(), 100_000);
    }

    #[test]
    fn counted_work_moves_from_the_claims_on_and_every_slot_has_one_owner() {
        let counted = [
            Counted::Pool { iterations: 101 },
            Counted::PerVu { iterations: 10 },
        ];
        let v = Version {
            id: VersionId::default(),
            start_unix_us: 0,
            moves: vec![mv(1, vec![20, 4], vec![]), mv(0, vec![30, 7], vec![3])],
        };
        let s = v.split(&roster(4), &counted).unwrap();
        let pool = &s.counted[0];
        let mut seen = std::collections::BTreeSet::new();
        for node in 0..4 {
            for k in 0..pool.size(node) {
                let slot = pool.slot(node, k).expect("a slot within the size");
                assert!(seen.insert(slot), "{slot:?} owned twice");
            }
        }
        // Lost members keep exactly their claims; nothing else is lost or doubled.
        assert_eq!(pool.size(1), 20);
        assert!(pool.size(0) <= 30);
        assert_eq!(seen.len(), 101);
        assert_eq!(
            pool.size(2) + pool.size(3) + pool.size(0) + pool.size(1),
            101
        );
        // Only the named taker got member 0's rest.
        let before = Version {
            moves: vec![mv(1, vec![20, 4], vec![])],
            ..v.clone()
        }
        .split(&roster(4), &counted)
        .unwrap();
        assert_eq!(pool.size(2), before.counted[0].size(2));
        // A VU taken from member 1 goes on from its claim, from member 0 from the
        // higher of the two claims along its way.
        let per_vu = &s.counted[1];
        let g1 = (0..100).find(|&g| s.vus.base().owner(g) == 1).unwrap();
        assert!(per_vu.first_iteration(&s.vus, g1) >= 4);
        let g0 = (0..100).find(|&g| s.vus.base().owner(g) == 0).unwrap();
        assert_eq!(per_vu.first_iteration(&s.vus, g0), 7);
        let g2 = (0..100).find(|&g| s.vus.base().owner(g) == 2).unwrap();
        assert_eq!(per_vu.first_iteration(&s.vus, g2), 0);
    }

    #[test]
    fn a_move_without_claims_moves_no_counted_work() {
        let counted = [
            Counted::Pool { iterations: 50 },
            Counted::PerVu { iterations: 5 },
        ];
        let v = Version {
            id: VersionId::default(),
            start_unix_us: 0,
            moves: vec![mv(2, vec![], vec![])],
        };
        let s = v.split(&roster(3), &counted).unwrap();
        let base = Version {
            moves: vec![],
            ..v.clone()
        }
        .split(&roster(3), &counted)
        .unwrap();
        for node in 0..2 {
            assert_eq!(s.counted[0].size(node), base.counted[0].size(node));
        }
        let g = (0..100).find(|&g| s.vus.base().owner(g) == 2).unwrap();
        assert_eq!(s.counted[1].first_iteration(&s.vus, g), u64::MAX);
    }

    #[test]
    fn takers_that_are_unknown_or_lost_are_refused() {
        let v = Version {
            id: VersionId::default(),
            start_unix_us: 0,
            moves: vec![mv(1, vec![], vec![1])],
        };
        assert!(v.split(&roster(3), &[]).is_err());
        let v = Version {
            moves: vec![mv(1, vec![], vec![7])],
            ..v
        };
        assert!(v.split(&roster(3), &[]).is_err());
    }

    #[test]
    fn the_digest_names_the_content_not_the_issuer() {
        let a = Version {
            id: VersionId { term: 1, seq: 0 },
            start_unix_us: 7,
            moves: vec![],
        };
        let mut b = a.clone();
        b.id = VersionId { term: 4, seq: 0 };
        assert_eq!(a.digest(), b.digest());
        b.moves.push(Move {
            lost: 0,
            from_event: 1,
            at_us: 0,
            claims: vec![],
            takers: vec![],
        });
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), 0);
    }

    #[test]
    fn bad_moves_are_refused_not_panicked_on() {
        let mut v = Version {
            id: VersionId::default(),
            start_unix_us: 0,
            moves: vec![Move {
                lost: 9,
                from_event: 0,
                at_us: 0,
                claims: vec![],
                takers: vec![],
            }],
        };
        assert!(v.split(&roster(3), &[]).is_err());
        v.moves = (0..3)
            .map(|i| Move {
                lost: i,
                from_event: 0,
                at_us: 0,
                claims: vec![],
                takers: vec![],
            })
            .collect();
        assert!(v.split(&roster(3), &[]).is_err(), "nobody left");
        v.moves = vec![v.moves[0].clone(), v.moves[0].clone()];
        assert!(v.split(&roster(3), &[]).is_err(), "same member twice");
    }
}
