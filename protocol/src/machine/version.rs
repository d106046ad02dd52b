//! Assignment versions: who owns which VU index and arrival event, as a short
//! description that every member can expand into the same [`Split`].
//!
//! A version is the run's common start plus the ordered list of moves made so far
//! (lost member → survivors, from an event index on). Its content is a pure function
//! of the roster and that list, so a version travels in every heartbeat and any
//! member can rebuild it; its `digest` names the content. Two members with the same
//! digest agree on every owner — which is what the lease rule compares.
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

/// One failover: the member at roster index `lost` hands all its VU indices, and its
/// arrival events from `from_event` on, to every member not lost by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Move {
    pub lost: u32,
    pub from_event: u64,
    /// Run time (µs) the move takes effect at, for the report.
    pub at_us: u64,
}

/// An assignment version as it travels: enough to rebuild the split exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub id: VersionId,
    /// The common start instant, in the run clock (the first roster member's wall
    /// clock, Unix µs).
    pub start_unix_us: u64,
    pub moves: Vec<Move>,
}

/// Who owns which index: VU numbers and arrival events (one index space each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub vus: Assignment,
    pub events: Assignment,
}

impl Split {
    /// A run on one node.
    pub fn single() -> Split {
        Split {
            vus: Assignment::single(),
            events: Assignment::single(),
        }
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

    /// Expands the version over the roster's capacities. Fails on a move that names
    /// an unknown member, the same member twice, or leaves nobody to take over.
    pub fn split(&self, roster: &[RosterEntry]) -> Result<Split, SegmentError> {
        let weights: Vec<u64> = roster.iter().map(|m| u64::from(m.weight.max(1))).collect();
        if self.moves.len() > MAX_MOVES {
            return Err(SegmentError::BadWeights(format!(
                "{} moves, at most {MAX_MOVES}",
                self.moves.len()
            )));
        }
        let base = Striping::from_weights(&weights)?;
        let mut vus = Assignment::new(base.clone());
        let mut events = Assignment::new(base);
        let mut gone = vec![false; roster.len()];
        for m in &self.moves {
            let lost = m.lost as usize;
            if lost >= roster.len() {
                return Err(SegmentError::BadWeights(format!(
                    "move of member {lost} in a roster of {}",
                    roster.len()
                )));
            }
            gone[lost] = true;
            let survivors: Vec<(usize, u64)> = weights
                .iter()
                .enumerate()
                .filter(|(i, _)| !gone[*i])
                .map(|(i, w)| (i, *w))
                .collect();
            vus.reassign(Reassignment::new(lost, 0, &survivors)?)?;
            events.reassign(Reassignment::new(lost, m.from_event, &survivors)?)?;
        }
        Ok(Split { vus, events })
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
            }],
        };
        let s = v.split(&roster(3)).unwrap();
        for e in 0..100u64 {
            let before = Version {
                moves: vec![],
                ..v.clone()
            }
            .split(&roster(3))
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
            }],
        };
        assert!(v.split(&roster(3)).is_err());
        v.moves = (0..3)
            .map(|i| Move {
                lost: i,
                from_event: 0,
                at_us: 0,
            })
            .collect();
        assert!(v.split(&roster(3)).is_err(), "nobody left");
        v.moves = vec![v.moves[0], v.moves[0]];
        assert!(v.split(&roster(3)).is_err(), "same member twice");
    }
}
