//! Execution segments: how a run's global indices (VU numbers, arrival events, shared
//! iterations) are split between nodes so that the union is exactly the single-machine
//! schedule.
//!
//! Owns the exact-rational segment sequence, k6-style striping of indices over segments,
//! and the failover `Assignment` (base striping plus ordered reassignments of a lost
//! node's remaining indices to the survivors). Pure, deterministic integer math: no
//! floats in ownership decisions, no clock, no I/O.
//!
//! Striping (k6's rule): with L the lowest common denominator of the segment lengths,
//! segment i owns nᵢ = lengthᵢ·L of every L consecutive indices. Indices 0..L are dealt
//! in order; index e goes to the first segment s (segments ordered largest first, ties by
//! position) with e ≥ cₛ·L/nₛ compared exactly (e·nₛ ≥ cₛ·L), where cₛ is how many indices
//! s already holds; k6 writes this as `e > ⌊cₛL/nₛ⌋ || (e == ⌊cₛL/nₛ⌋ && nₛ | cₛL)`.
//! The pattern repeats every L indices.
//!
//! Bounding L: weights such as 997 and 1009 would give L = 2006. `SegmentSequence::
//! from_weights` therefore rounds capacity weights to at most `max(MAX_PARTS, n)` parts
//! (each node keeps at least one part), so L ≤ 2·max(MAX_PARTS, n); sequences built from
//! explicit fractions are refused when L exceeds `MAX_PERIOD`, or when they have more
//! than `MAX_SEGMENTS` segments. Everything here can arrive from a peer, so building a
//! striping costs O(L·log n) and an assignment at most `MAX_REASSIGNMENTS` failovers.

use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

/// Capacity weights are rounded to this many parts (or one per node, if more) so that the
/// striping period stays small.
pub const MAX_PARTS: u64 = 1000;

/// Largest striping period (lowest common denominator of segment lengths) accepted.
pub const MAX_PERIOD: u64 = 20_000;

/// Most segments (nodes) a sequence may have: a run's roster is at most this long
/// (`run::MAX_MEMBERS`), and a sequence from a peer is refused past it before its
/// striping is built.
pub const MAX_SEGMENTS: usize = 1024;

/// Why a segment sequence, striping or assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment fraction {num}/{den} is not in [0, 1] with a non-zero denominator")]
    BadFraction { num: u64, den: u64 },
    #[error("segment sequence: {0}")]
    BadSequence(String),
    #[error("segment weights: {0}")]
    BadWeights(String),
    #[error("segment sequence needs a striping period of {period} indices, more than the limit of {MAX_PERIOD}; use coarser fractions")]
    PeriodTooLarge { period: u128 },
    #[error("reassignment {position} (node {lost} lost): {reason}")]
    BadReassignment {
        position: usize,
        lost: usize,
        reason: String,
    },
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// An exact fraction in [0, 1], always reduced. Serialised as `[num, den]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "(u64, u64)", into = "(u64, u64)")]
pub struct Ratio {
    num: u64,
    den: u64,
}

impl Ratio {
    pub const ZERO: Ratio = Ratio { num: 0, den: 1 };
    pub const ONE: Ratio = Ratio { num: 1, den: 1 };

    /// `num/den`, reduced; refused unless `den > 0` and `num ≤ den`.
    pub fn new(num: u64, den: u64) -> Result<Ratio, SegmentError> {
        if den == 0 || num > den {
            return Err(SegmentError::BadFraction { num, den });
        }
        let g = gcd(u128::from(num), u128::from(den)) as u64;
        Ok(Ratio {
            num: num / g,
            den: den / g,
        })
    }

    pub fn num(self) -> u64 {
        self.num
    }

    pub fn den(self) -> u64 {
        self.den
    }

    /// `self - other` for `other ≤ self`, exactly; `None` if the reduced result does not
    /// fit in u64 parts.
    fn minus(self, other: Ratio) -> Option<Ratio> {
        let num = u128::from(self.num) * u128::from(other.den)
            - u128::from(other.num) * u128::from(self.den);
        let den = u128::from(self.den) * u128::from(other.den);
        let g = gcd(num, den);
        Some(Ratio {
            num: u64::try_from(num / g).ok()?,
            den: u64::try_from(den / g).ok()?,
        })
    }
}

impl TryFrom<(u64, u64)> for Ratio {
    type Error = SegmentError;
    fn try_from((num, den): (u64, u64)) -> Result<Self, Self::Error> {
        Ratio::new(num, den)
    }
}

impl From<Ratio> for (u64, u64) {
    fn from(r: Ratio) -> Self {
        (r.num, r.den)
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.num) * u128::from(other.den))
            .cmp(&(u128::from(other.num) * u128::from(self.den)))
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

/// One segment (from, to] of [0, 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecutionSegment {
    pub from: Ratio,
    pub to: Ratio,
}

impl fmt::Display for ExecutionSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.from, self.to)
    }
}

/// The shared sequence 0 = r0 < r1 < … < rn = 1; segment i is (rᵢ, rᵢ₊₁].
/// Serialised as the list of boundaries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<Ratio>", into = "Vec<Ratio>")]
pub struct SegmentSequence {
    bounds: Vec<Ratio>,
}

impl SegmentSequence {
    /// Validates the boundaries: at least two, first 0, last 1, strictly increasing.
    pub fn new(bounds: Vec<Ratio>) -> Result<SegmentSequence, SegmentError> {
        if bounds.len() > MAX_SEGMENTS + 1 {
            return Err(SegmentError::BadSequence(format!(
                "{} segments, more than the limit of {MAX_SEGMENTS}",
                bounds.len() - 1
            )));
        }
        if bounds.len() < 2 {
            return Err(SegmentError::BadSequence(format!(
                "needs at least the boundaries 0 and 1, got {} boundaries",
                bounds.len()
            )));
        }
        if bounds[0] != Ratio::ZERO || bounds[bounds.len() - 1] != Ratio::ONE {
            return Err(SegmentError::BadSequence(format!(
                "must start at 0 and end at 1, got {} … {}",
                bounds[0],
                bounds[bounds.len() - 1]
            )));
        }
        if let Some(w) = bounds.windows(2).position(|w| w[0] >= w[1]) {
            return Err(SegmentError::BadSequence(format!(
                "boundaries must strictly increase, but boundary {} ({}) is not below boundary {} ({})",
                w,
                bounds[w],
                w + 1,
                bounds[w + 1]
            )));
        }
        Ok(SegmentSequence { bounds })
    }

    /// The whole of [0, 1) as one segment: a run on one node.
    pub fn single() -> SegmentSequence {
        SegmentSequence {
            bounds: vec![Ratio::ZERO, Ratio::ONE],
        }
    }

    /// Capacity-weighted split: segment i gets a length proportional to `weights[i]`.
    /// Weights are rounded to at most `max(MAX_PARTS, n)` parts in total (every segment
    /// keeps at least one part) to bound the striping period; weights already summing to
    /// no more than that are used exactly.
    pub fn from_weights(weights: &[u64]) -> Result<SegmentSequence, SegmentError> {
        if weights.is_empty() {
            return Err(SegmentError::BadWeights("no weights given".into()));
        }
        if let Some(i) = weights.iter().position(|&w| w == 0) {
            return Err(SegmentError::BadWeights(format!(
                "weight {i} is 0; every segment needs a positive weight"
            )));
        }
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        let budget = u128::from(MAX_PARTS).max(weights.len() as u128);
        let parts: Vec<u128> = if total <= budget {
            weights.iter().map(|&w| u128::from(w)).collect()
        } else {
            weights
                .iter()
                .map(|&w| ((u128::from(w) * budget * 2 + total) / (total * 2)).max(1))
                .collect()
        };
        let sum: u128 = parts.iter().sum();
        let sum64 =
            u64::try_from(sum).map_err(|_| SegmentError::BadWeights("weights too large".into()))?;
        let mut bounds = Vec::with_capacity(parts.len() + 1);
        let mut acc: u128 = 0;
        bounds.push(Ratio::ZERO);
        for p in &parts {
            acc += p;
            bounds.push(Ratio::new(acc as u64, sum64)?);
        }
        SegmentSequence::new(bounds)
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Always false: a sequence has at least one segment.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn bounds(&self) -> &[Ratio] {
        &self.bounds
    }

    pub fn segment(&self, i: usize) -> Option<ExecutionSegment> {
        (i < self.len()).then(|| ExecutionSegment {
            from: self.bounds[i],
            to: self.bounds[i + 1],
        })
    }

    pub fn segments(&self) -> impl Iterator<Item = ExecutionSegment> + '_ {
        self.bounds.windows(2).map(|w| ExecutionSegment {
            from: w[0],
            to: w[1],
        })
    }
}

impl TryFrom<Vec<Ratio>> for SegmentSequence {
    type Error = SegmentError;
    fn try_from(bounds: Vec<Ratio>) -> Result<Self, Self::Error> {
        SegmentSequence::new(bounds)
    }
}

impl From<SegmentSequence> for Vec<Ratio> {
    fn from(s: SegmentSequence) -> Self {
        s.bounds
    }
}

/// The striping of all indices over the segments of a sequence. Serialised as its
/// sequence; the pattern is rebuilt (and the period re-checked) when read.
///
/// Its tables are shared, not copied, by clones: a failover's survivor striping is held
/// by every survivor's piece of every counted pool (1,000 members × 10 moves would
/// otherwise copy a 1,000-segment table 10,000 times: ~0.5 GB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SegmentSequence", into = "SegmentSequence")]
pub struct Striping {
    sequence: Arc<SegmentSequence>,
    period: u64,
    /// Owner of each offset in 0..period.
    owners: Arc<[u32]>,
    /// Offsets in 0..period owned by each segment, ascending.
    offsets: Arc<[Vec<u64>]>,
}

impl Striping {
    pub fn new(sequence: SegmentSequence) -> Result<Striping, SegmentError> {
        let mut lengths = Vec::with_capacity(sequence.len());
        for seg in sequence.segments() {
            let len = seg
                .to
                .minus(seg.from)
                .ok_or(SegmentError::PeriodTooLarge { period: u128::MAX })?;
            lengths.push(len);
        }
        let mut period: u128 = 1;
        for len in &lengths {
            let den = u128::from(len.den);
            period = period / gcd(period, den) * den;
            if period > u128::from(MAX_PERIOD) {
                return Err(SegmentError::PeriodTooLarge { period });
            }
        }
        let period = period as u64;
        let shares: Vec<u64> = lengths
            .iter()
            .map(|len| len.num * (period / len.den))
            .collect();
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&a, &b| shares[b].cmp(&shares[a]));
        let mut owners = Vec::with_capacity(period as usize);
        let mut offsets: Vec<Vec<u64>> = shares
            .iter()
            .map(|&n| Vec::with_capacity(n as usize))
            .collect();
        let l = u128::from(period);
        // Segment s qualifies for index e once e ≥ tₛ = ⌈cₛ·L/nₛ⌉. Instead of trying every
        // segment for every index (L × segments steps: 4·10⁸ for a sequence of 20,000
        // segments from a peer), segments wait in `pending` by tₛ and move to `ready`
        // (by position in `order`) when e reaches it: L·log(segments) steps.
        let threshold =
            |s: usize, held: usize| (held as u128 * l).div_ceil(u128::from(shares[s])) as u64;
        let mut pending: BinaryHeap<Reverse<(u64, usize)>> =
            (0..order.len()).map(|pos| Reverse((0, pos))).collect();
        let mut ready: BinaryHeap<Reverse<usize>> = BinaryHeap::with_capacity(order.len());
        for e in 0..period {
            while let Some(&Reverse((t, pos))) = pending.peek() {
                if t > e {
                    break;
                }
                pending.pop();
                ready.push(Reverse(pos));
            }
            // Some segment always qualifies: if none did, summing e·nₛ < cₛ·L over all s
            // would give e·L < e·L.
            let Some(Reverse(pos)) = ready.pop() else {
                return Err(SegmentError::BadSequence(format!(
                    "no segment qualifies for index {e}"
                )));
            };
            let chosen = order[pos];
            owners.push(chosen as u32);
            offsets[chosen].push(e);
            pending.push(Reverse((threshold(chosen, offsets[chosen].len()), pos)));
        }
        Ok(Striping {
            sequence: Arc::new(sequence),
            period,
            owners: owners.into(),
            offsets: offsets.into(),
        })
    }

    /// Striping of a capacity-weighted split (see `SegmentSequence::from_weights`).
    pub fn from_weights(weights: &[u64]) -> Result<Striping, SegmentError> {
        Striping::new(SegmentSequence::from_weights(weights)?)
    }

    /// One segment owning every index.
    pub fn single() -> Striping {
        Striping {
            sequence: Arc::new(SegmentSequence::single()),
            period: 1,
            owners: Arc::new([0]),
            offsets: Arc::new([vec![0]]),
        }
    }

    pub fn sequence(&self) -> &SegmentSequence {
        &self.sequence
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.offsets.len()
    }

    /// L: the pattern of owners repeats every `period()` indices.
    pub fn period(&self) -> u64 {
        self.period
    }

    /// nᵢ: how many of every `period()` consecutive indices segment `seg` owns (0 for an
    /// unknown segment).
    pub fn share(&self, seg: usize) -> u64 {
        self.offsets.get(seg).map_or(0, |o| o.len() as u64)
    }

    /// The segment owning global index `index`.
    pub fn owner(&self, index: u64) -> usize {
        self.owners[(index % self.period) as usize] as usize
    }

    pub fn owns(&self, seg: usize, index: u64) -> bool {
        self.owner(index) == seg
    }

    /// Segment `seg`'s share of a global count `v`: how many of the indices 0..v it owns.
    /// Shares of all segments sum to `v`, and never shrink as `v` grows. 0 for an unknown
    /// segment.
    pub fn scale(&self, seg: usize, v: u64) -> u64 {
        let Some(offsets) = self.offsets.get(seg) else {
            return 0;
        };
        let below = v % self.period;
        (v / self.period) * offsets.len() as u64 + offsets.partition_point(|&o| o < below) as u64
    }

    /// The `rank`-th index (from 0) owned by `seg`, if it is representable.
    pub fn nth_owned(&self, seg: usize, rank: u64) -> Option<u64> {
        let offsets = self.offsets.get(seg)?;
        let n = offsets.len() as u64;
        (rank / n)
            .checked_mul(self.period)?
            .checked_add(offsets[(rank % n) as usize])
    }

    /// The indices owned by `seg`, ascending, starting at the first one ≥ `start`.
    pub fn owned_from(&self, seg: usize, start: u64) -> StripedIndices<'_> {
        StripedIndices {
            striping: self,
            seg,
            rank: self.scale(seg, start),
        }
    }
}

impl TryFrom<SegmentSequence> for Striping {
    type Error = SegmentError;
    fn try_from(s: SegmentSequence) -> Result<Self, Self::Error> {
        Striping::new(s)
    }
}

impl From<Striping> for SegmentSequence {
    fn from(s: Striping) -> Self {
        Arc::unwrap_or_clone(s.sequence)
    }
}

/// Iterator over one segment's indices of a `Striping`.
#[derive(Clone, Debug)]
pub struct StripedIndices<'a> {
    striping: &'a Striping,
    seg: usize,
    rank: u64,
}

impl Iterator for StripedIndices<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let index = self.striping.nth_owned(self.seg, self.rank)?;
        self.rank += 1;
        Some(index)
    }
}

/// A lost node's remaining indices handed to the survivors.
///
/// Every index ≥ `from_index` whose owner (after all earlier reassignments) is `lost`
/// goes to `survivors[striping.owner(r)]`, where r is the index's rank among the lost
/// node's indices ≥ `from_index`. Survivors' own indices never move, so work already in
/// flight on a survivor is untouched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassignment {
    /// Node (segment of the base striping) that was lost.
    pub lost: usize,
    /// First index that moves; the lost node's indices below it stay with it (they were
    /// done, in flight or lost with it).
    pub from_index: u64,
    /// Node ids taking over, in the order of `striping`'s segments.
    pub survivors: Vec<usize>,
    /// Striping of the lost node's indices over `survivors`.
    pub striping: Striping,
}

impl Reassignment {
    /// Spreads `lost`'s indices from `from_index` on over survivors weighted by capacity:
    /// `survivors[i] = (node id, weight)`.
    pub fn new(
        lost: usize,
        from_index: u64,
        survivors: &[(usize, u64)],
    ) -> Result<Reassignment, SegmentError> {
        let weights: Vec<u64> = survivors.iter().map(|&(_, w)| w).collect();
        let striping = Striping::from_weights(&weights)
            .map_err(|e| SegmentError::BadWeights(format!("survivors of lost node {lost}: {e}")))?;
        Ok(Reassignment {
            lost,
            from_index,
            survivors: survivors.iter().map(|&(id, _)| id).collect(),
            striping,
        })
    }
}

/// Who owns which index for a whole run: the base striping over nodes (node id = base
/// segment number) plus the ordered failover reassignments.
///
/// One index space per assignment: a run keeps separate assignments (same base, own
/// `from_index` values) for VU numbers and for arrival events or shared iterations.
/// Serialised as `{ base, reassignments }`; validated again when read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AssignmentWire", into = "AssignmentWire")]
pub struct Assignment {
    base: Striping,
    reassignments: Vec<Reassignment>,
    /// For reassignment j: how many indices below `from_index` its lost node owned just
    /// before it (a cache; not serialised).
    lost_before: Vec<u64>,
    /// For reassignment j, by node: its position among the survivors, or `NOT_SURVIVOR`
    /// (a cache; not serialised). Keeps a count at level j linear in the nodes tracked
    /// rather than in nodes × survivors.
    survivor_pos: Vec<Vec<u32>>,
    /// By node: lost in some reassignment (a cache; not serialised).
    lost: Vec<bool>,
}

const NOT_SURVIVOR: u32 = u32::MAX;

/// Most failovers one assignment may carry. Decoding an assignment replays every
/// reassignment, at a cost that grows with the cube of their number; a run that loses
/// more nodes than this must stop rather than reassign again.
pub const MAX_REASSIGNMENTS: usize = 256;

#[derive(Serialize, Deserialize)]
struct AssignmentWire {
    base: Striping,
    reassignments: Vec<Reassignment>,
}

impl TryFrom<AssignmentWire> for Assignment {
    type Error = SegmentError;
    fn try_from(w: AssignmentWire) -> Result<Self, Self::Error> {
        let mut a = Assignment::new(w.base);
        for r in w.reassignments {
            a.reassign(r)?;
        }
        Ok(a)
    }
}

impl From<Assignment> for AssignmentWire {
    fn from(a: Assignment) -> Self {
        AssignmentWire {
            base: a.base,
            reassignments: a.reassignments,
        }
    }
}

impl Assignment {
    pub fn new(base: Striping) -> Assignment {
        let nodes = base.segments();
        Assignment {
            base,
            reassignments: Vec::new(),
            lost_before: Vec::new(),
            survivor_pos: Vec::new(),
            lost: vec![false; nodes],
        }
    }

    /// A run on one node.
    pub fn single() -> Assignment {
        Assignment::new(Striping::single())
    }

    /// Number of nodes (segments of the base striping), lost ones included.
    pub fn nodes(&self) -> usize {
        self.base.segments()
    }

    pub fn base(&self) -> &Striping {
        &self.base
    }

    pub fn reassignments(&self) -> &[Reassignment] {
        &self.reassignments
    }

    pub fn is_lost(&self, node: usize) -> bool {
        self.lost.get(node).copied().unwrap_or(false)
    }

    /// Applies a failover. Refused if the lost node is unknown or already lost, or the
    /// survivors are empty, repeated, unknown, lost, or include the lost node.
    pub fn reassign(&mut self, r: Reassignment) -> Result<(), SegmentError> {
        let position = self.reassignments.len();
        let bad = |reason: String| SegmentError::BadReassignment {
            position,
            lost: r.lost,
            reason,
        };
        if position >= MAX_REASSIGNMENTS {
            return Err(bad(format!(
                "more than {MAX_REASSIGNMENTS} reassignments in one run"
            )));
        }
        if r.lost >= self.nodes() {
            return Err(bad(format!("the run has only {} nodes", self.nodes())));
        }
        if self.is_lost(r.lost) {
            return Err(bad("that node was already lost".into()));
        }
        if r.survivors.is_empty() {
            return Err(bad("no survivors to take over".into()));
        }
        if r.survivors.len() != r.striping.segments() {
            return Err(bad(format!(
                "{} survivors but a striping of {} segments",
                r.survivors.len(),
                r.striping.segments()
            )));
        }
        let mut pos = vec![NOT_SURVIVOR; self.nodes()];
        for (i, &s) in r.survivors.iter().enumerate() {
            if s >= self.nodes() {
                return Err(bad(format!("survivor {s} is not a node of the run")));
            }
            if s == r.lost || self.is_lost(s) {
                return Err(bad(format!("survivor {s} is lost")));
            }
            if pos[s] != NOT_SURVIVOR {
                return Err(bad(format!("survivor {s} is listed twice")));
            }
            pos[s] = i as u32;
        }
        let before = self.count_at(r.lost, r.from_index, position);
        self.lost_before.push(before);
        self.survivor_pos.push(pos);
        self.lost[r.lost] = true;
        self.reassignments.push(r);
        Ok(())
    }

    /// The node owning global index `index`.
    pub fn owner(&self, index: u64) -> usize {
        let mut owner = self.base.owner(index);
        for (level, r) in self.reassignments.iter().enumerate() {
            if owner == r.lost && index >= r.from_index {
                let rank = self.count_at(r.lost, index, level) - self.lost_before[level];
                owner = r.survivors[r.striping.owner(rank)];
            }
        }
        owner
    }

    pub fn owns(&self, node: usize, index: u64) -> bool {
        self.owner(index) == node
    }

    /// The reassignments (by position) that moved `index` to another node, in order.
    pub fn moved_at(&self, index: u64) -> Vec<usize> {
        let mut owner = self.base.owner(index);
        let mut levels = Vec::new();
        for (level, r) in self.reassignments.iter().enumerate() {
            if owner == r.lost && index >= r.from_index {
                let rank = self.count_at(r.lost, index, level) - self.lost_before[level];
                owner = r.survivors[r.striping.owner(rank)];
                levels.push(level);
            }
        }
        levels
    }

    /// How many of the indices 0..v `node` owns. Sums to `v` over all nodes and never
    /// shrinks as `v` grows; 0 for an unknown node.
    pub fn scale(&self, node: usize, v: u64) -> u64 {
        self.count_at(node, v, self.reassignments.len())
    }

    /// `node`'s count of indices below `v` after the first `level` reassignments.
    ///
    /// A level's count for node x needs the previous level's counts for x and for that
    /// level's lost node, so it tracks x plus every lost node, level by level, in place:
    /// O(levels²) work and one allocation instead of a recursion that doubles per level.
    fn count_at(&self, node: usize, v: u64, level: usize) -> u64 {
        if node >= self.nodes() {
            return 0;
        }
        let applied = &self.reassignments[..level];
        if applied.is_empty() {
            return self.base.scale(node, v);
        }
        let mut counts: Vec<(usize, u64)> = Vec::with_capacity(level + 1);
        counts.push((node, self.base.scale(node, v)));
        for r in applied {
            if !counts.iter().any(|&(x, _)| x == r.lost) {
                counts.push((r.lost, self.base.scale(r.lost, v)));
            }
        }
        for (j, r) in applied.iter().enumerate() {
            let lost_prev = counts
                .iter()
                .find(|&&(x, _)| x == r.lost)
                .map_or(0, |&(_, c)| c);
            // The lost node's indices in [from_index, v), handed out by rank.
            let moved = if v > r.from_index {
                lost_prev - self.lost_before[j]
            } else {
                0
            };
            for (x, c) in counts.iter_mut() {
                if *x == r.lost {
                    *c = lost_prev - moved;
                } else {
                    let p = self.survivor_pos[j][*x];
                    if p != NOT_SURVIVOR {
                        *c += r.striping.scale(p as usize, moved);
                    }
                }
            }
        }
        counts[0].1
    }

    /// The `rank`-th index (from 0) owned by `node`, if any.
    pub fn nth_owned(&self, node: usize, rank: u64) -> Option<u64> {
        self.nth_owned_after(node, rank, 0)
    }

    /// Like `nth_owned`, knowing that `node` owns at most `rank` indices below `hint`:
    /// gallops up from the hint, then bisects on the monotone `scale`.
    fn nth_owned_after(&self, node: usize, rank: u64, hint: u64) -> Option<u64> {
        if self.reassignments.is_empty() {
            return self.base.nth_owned(node, rank);
        }
        if node >= self.nodes() || self.scale(node, u64::MAX) <= rank {
            return None;
        }
        // Invariant: scale(lo) ≤ rank < scale(hi).
        let mut lo = hint;
        let mut step: u64 = 1;
        let mut hi = loop {
            let probe = lo.saturating_add(step);
            if self.scale(node, probe) > rank {
                break probe;
            }
            lo = probe;
            step = step.saturating_mul(2);
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.scale(node, mid) > rank {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi - 1)
    }

    /// The indices owned by `node`, ascending, from the first one ≥ `start`. Ends if the
    /// node was lost (after its last index) or is unknown.
    pub fn owned_from(&self, node: usize, start: u64) -> OwnedIndices<'_> {
        let remaining = if node >= self.nodes() {
            0
        } else if self.reassignments.is_empty() {
            u64::MAX
        } else {
            self.scale(node, u64::MAX) - self.scale(node, start)
        };
        OwnedIndices {
            assignment: self,
            node,
            next: start,
            remaining,
        }
    }
}

/// How many candidates the iterator checks one by one before searching: scanning costs
/// about one `owner` call per global index whatever the node's share, while the search
/// pays off only across long runs of other nodes' indices.
const SCAN_LIMIT: u64 = 64;

/// Iterator over one node's indices of an `Assignment`.
#[derive(Clone, Debug)]
pub struct OwnedIndices<'a> {
    assignment: &'a Assignment,
    node: usize,
    /// First candidate index not yet examined.
    next: u64,
    /// Indices still to come (u64::MAX: unbounded).
    remaining: u64,
}

impl Iterator for OwnedIndices<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.remaining == 0 {
            return None;
        }
        let a = self.assignment;
        let found = if a.reassignments.is_empty() {
            a.base
                .nth_owned(self.node, a.base.scale(self.node, self.next))
        } else {
            let scan_end = self.next.saturating_add(SCAN_LIMIT);
            (self.next..scan_end)
                .find(|&i| a.owner(i) == self.node)
                .or_else(|| {
                    let rank = a.scale(self.node, scan_end);
                    a.nth_owned_after(self.node, rank, scan_end)
                })
        }?;
        self.next = found.checked_add(1)?;
        if self.remaining != u64::MAX {
            self.remaining -= 1;
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(num: u64, den: u64) -> Ratio {
        Ratio::new(num, den).unwrap()
    }

    #[test]
    fn research_example_table() {
        // Sequence 0, 1/2, 3/4, 1: L = 4, owners of 0..3 = A, B, A, C.
        let seq = SegmentSequence::new(vec![r(0, 1), r(1, 2), r(3, 4), r(1, 1)]).unwrap();
        let s = Striping::new(seq).unwrap();
        assert_eq!(s.period(), 4);
        assert_eq!((0..4).map(|i| s.owner(i)).collect::<Vec<_>>(), [0, 1, 0, 2]);
        let table = |seg: usize| (1..=8).map(|v| s.scale(seg, v)).collect::<Vec<_>>();
        assert_eq!(table(0), [1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(table(1), [0, 1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(table(2), [0, 0, 0, 1, 1, 1, 1, 2]);
    }

    #[test]
    fn ratios_reduce_and_refuse_nonsense() {
        assert_eq!(r(2, 4), r(1, 2));
        assert_eq!(r(0, 7), Ratio::ZERO);
        assert!(Ratio::new(3, 2).is_err());
        assert!(Ratio::new(0, 0).is_err());
        assert!(r(1, 3) < r(1, 2));
    }

    #[test]
    fn sequences_are_validated() {
        assert!(SegmentSequence::new(vec![r(0, 1)]).is_err());
        assert!(SegmentSequence::new(vec![r(1, 4), r(1, 1)]).is_err());
        assert!(SegmentSequence::new(vec![r(0, 1), r(1, 2)]).is_err());
        let err = SegmentSequence::new(vec![r(0, 1), r(1, 2), r(1, 2), r(1, 1)]).unwrap_err();
        assert!(err.to_string().contains("strictly increase"), "{err}");
        assert!(SegmentSequence::from_weights(&[]).is_err());
        assert!(SegmentSequence::from_weights(&[3, 0]).is_err());
    }

    #[test]
    fn weights_are_rounded_to_bound_the_period() {
        let s = Striping::from_weights(&[997, 1009]).unwrap();
        assert!(s.period() <= 2 * MAX_PARTS, "period {}", s.period());
        let a = s.share(0) as f64 / s.period() as f64;
        assert!((a - 997.0 / 2006.0).abs() < 0.002, "{a}");
        // Tiny weights next to huge ones still get a part.
        let s = Striping::from_weights(&[u64::MAX, 1, u64::MAX / 2]).unwrap();
        assert!(s.share(1) >= 1);
        // Small weights are exact.
        let s = Striping::from_weights(&[2, 1, 1]).unwrap();
        assert_eq!(s.period(), 4);
        assert_eq!((s.share(0), s.share(1), s.share(2)), (2, 1, 1));
        // Explicit fractions with a huge period are refused, not built.
        let seq = SegmentSequence::new(vec![r(0, 1), r(1, 99_991), r(1, 1)]).unwrap();
        assert!(matches!(
            Striping::new(seq),
            Err(SegmentError::PeriodTooLarge { .. })
        ));
    }

    #[test]
    fn striped_iterator_matches_owner() {
        let s = Striping::from_weights(&[3, 5, 2]).unwrap();
        for seg in 0..3 {
            let got: Vec<u64> = s.owned_from(seg, 7).take(20).collect();
            let want: Vec<u64> = (7..).filter(|&i| s.owns(seg, i)).take(20).collect();
            assert_eq!(got, want);
        }
        assert_eq!(s.owned_from(9, 0).next(), None);
        assert_eq!(s.scale(9, 100), 0);
    }

    #[test]
    fn failover_hands_lost_indices_to_survivors() {
        let base = Striping::from_weights(&[1, 1, 1]).unwrap();
        let mut a = Assignment::new(base.clone());
        a.reassign(Reassignment::new(1, 30, &[(0, 1), (2, 1)]).unwrap())
            .unwrap();
        for i in 0..30 {
            assert_eq!(a.owner(i), base.owner(i), "index {i} below from_index");
        }
        for i in 30..300 {
            assert_ne!(a.owner(i), 1, "lost node still owns {i}");
            if base.owner(i) != 1 {
                assert_eq!(a.owner(i), base.owner(i));
            }
        }
        assert_eq!(a.scale(1, 1_000), 10);
        assert_eq!(a.scale(0, 999) + a.scale(1, 999) + a.scale(2, 999), 999);
        let lost: Vec<u64> = a.owned_from(1, 0).collect();
        assert_eq!(
            lost,
            (0..30).filter(|&i| base.owner(i) == 1).collect::<Vec<_>>()
        );
        assert!(a.is_lost(1));

        // Refusals.
        let again = Reassignment::new(1, 40, &[(0, 1)]).unwrap();
        assert!(a.reassign(again).is_err());
        let to_lost = Reassignment::new(0, 40, &[(1, 1)]).unwrap();
        assert!(a.reassign(to_lost).is_err());
        let to_self = Reassignment::new(2, 40, &[(2, 1)]).unwrap();
        assert!(a.reassign(to_self).is_err());
        let unknown = Reassignment::new(2, 40, &[(7, 1)]).unwrap();
        assert!(a.reassign(unknown).is_err());
        let twice = Reassignment::new(2, 40, &[(0, 1), (0, 2)]).unwrap();
        assert!(a.reassign(twice).is_err());
        assert!(Reassignment::new(2, 40, &[]).is_err());
    }

    #[test]
    fn sparse_owners_are_found_past_the_scan_window() {
        // Node 0 owns 1 index in 1000 until node 2 is lost, then half of node 2's.
        let mut a = Assignment::new(Striping::from_weights(&[1, 500, 499]).unwrap());
        a.reassign(Reassignment::new(2, 5_000, &[(1, 1), (0, 1)]).unwrap())
            .unwrap();
        for node in 0..3 {
            let got: Vec<u64> = a.owned_from(node, 3).take_while(|&i| i < 20_000).collect();
            let want: Vec<u64> = (3..20_000).filter(|&i| a.owner(i) == node).collect();
            assert_eq!(got, want, "node {node}");
        }
        assert_eq!(
            a.nth_owned(0, 0),
            Some(501),
            "smallest segment is dealt last"
        );
        assert_eq!(a.nth_owned(0, 5), Some(a.owned_from(0, 0).nth(5).unwrap()));
        assert_eq!(a.owned_from(2, 5_000).next(), None);
        assert_eq!(a.owned_from(7, 0).next(), None);
    }

    #[test]
    fn assignment_round_trips_through_cbor_and_is_revalidated() {
        let mut a = Assignment::new(Striping::from_weights(&[4, 2, 3, 1]).unwrap());
        a.reassign(Reassignment::new(2, 17, &[(0, 2), (1, 1), (3, 1)]).unwrap())
            .unwrap();
        a.reassign(Reassignment::new(0, 50, &[(1, 1), (3, 5)]).unwrap())
            .unwrap();
        let mut bytes = Vec::new();
        ciborium::into_writer(&a, &mut bytes).unwrap();
        let back: Assignment = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back, a);
        for i in 0..500 {
            assert_eq!(back.owner(i), a.owner(i));
        }

        // A peer sending a reassignment to a lost survivor is refused on read.
        let json = serde_json::to_value(&a).unwrap();
        let mut bad = json.clone();
        bad["reassignments"][1]["survivors"] = serde_json::json!([2, 3]);
        assert!(serde_json::from_value::<Assignment>(bad).is_err());
        let mut bad = json;
        bad["base"] = serde_json::json!([[0, 1], [2, 3], [1, 2], [1, 1]]);
        assert!(serde_json::from_value::<Assignment>(bad).is_err());
    }

    fn weights() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(prop_oneof![1u64..10, 1u64..1_000, 1u64..5_000_000], 1..=7)
    }

    /// Base weights plus up to three failovers: (lost pick, from_index, survivor weights).
    fn failovers() -> impl Strategy<Value = Vec<(usize, u64, Vec<u64>)>> {
        prop::collection::vec(
            (0usize..100, 0u64..400, prop::collection::vec(1u64..20, 7)),
            0..=3,
        )
    }

    fn build(weights: &[u64], failovers: &[(usize, u64, Vec<u64>)]) -> Assignment {
        let mut a = Assignment::new(Striping::from_weights(weights).unwrap());
        for (pick, from, sw) in failovers {
            let alive: Vec<usize> = (0..a.nodes()).filter(|&n| !a.is_lost(n)).collect();
            if alive.len() < 2 {
                break;
            }
            let lost = alive[pick % alive.len()];
            let survivors: Vec<(usize, u64)> = alive
                .iter()
                .copied()
                .filter(|&n| n != lost)
                .zip(sw.iter().copied())
                .collect();
            a.reassign(Reassignment::new(lost, *from, &survivors).unwrap())
                .unwrap();
        }
        a
    }

    /// The k6 rule exactly as stated: every index tries the segments in order.
    fn naive_owners(seq: &SegmentSequence) -> Vec<u32> {
        let s = Striping::new(seq.clone()).unwrap();
        let l = u128::from(s.period());
        let shares: Vec<u64> = (0..s.segments()).map(|i| s.share(i)).collect();
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&a, &b| shares[b].cmp(&shares[a]));
        let mut held = vec![0u128; shares.len()];
        (0..s.period())
            .map(|e| {
                let c = order
                    .iter()
                    .copied()
                    .find(|&x| u128::from(e) * u128::from(shares[x]) >= held[x] * l)
                    .unwrap();
                held[c] += 1;
                c as u32
            })
            .collect()
    }

    #[test]
    fn a_sequence_of_too_many_segments_is_refused_when_decoded() {
        // 20,000 segments of 1/20,000: the period is within MAX_PERIOD, but striping it
        // the old way took L × segments = 4·10⁸ steps on the receiving event loop.
        let bounds: Vec<(u64, u64)> = (0..=20_000u64).map(|i| (i, 20_000)).collect();
        let mut cbor = Vec::new();
        ciborium::into_writer(&bounds, &mut cbor).unwrap();
        let err = ciborium::from_reader::<Striping, _>(&cbor[..]).unwrap_err();
        assert!(
            err.to_string()
                .contains("20000 segments, more than the limit of 1024"),
            "{err}"
        );
        // The largest allowed sequence still stripes, and exactly as the k6 rule says.
        let bounds: Vec<Ratio> = (0..=MAX_SEGMENTS as u64)
            .map(|i| r(i, MAX_SEGMENTS as u64))
            .collect();
        let seq = SegmentSequence::new(bounds).unwrap();
        let s = Striping::new(seq.clone()).unwrap();
        assert_eq!(&s.owners[..], &naive_owners(&seq)[..]);
    }

    #[test]
    fn clones_share_the_tables_so_a_split_over_many_survivors_stays_small() {
        // A failover's survivor striping is held by every survivor's piece of a pool:
        // 1,000 members x 10 moves must not copy a 1,000-segment table 10,000 times.
        let s = Striping::from_weights(&vec![3; 1000]).unwrap();
        let c = s.clone();
        assert!(Arc::ptr_eq(&s.offsets, &c.offsets));
        assert!(Arc::ptr_eq(&s.owners, &c.owners));
        assert!(Arc::ptr_eq(&s.sequence, &c.sequence));
        assert_eq!(s, c);
        let back: SegmentSequence = c.into();
        assert_eq!(&back, s.sequence());
    }

    #[test]
    fn reassignments_are_bounded() {
        let nodes = MAX_REASSIGNMENTS + 2;
        let mut a = Assignment::new(Striping::from_weights(&vec![1; nodes]).unwrap());
        let last = nodes - 1;
        for lost in 0..MAX_REASSIGNMENTS {
            a.reassign(Reassignment::new(lost, 10, &[(last, 1)]).unwrap())
                .unwrap();
        }
        let err = a
            .reassign(Reassignment::new(MAX_REASSIGNMENTS, 10, &[(last, 1)]).unwrap())
            .unwrap_err();
        assert!(
            err.to_string().contains("more than 256 reassignments"),
            "{err}"
        );
        // Everything from index 10 on that the lost nodes owned went to the last node.
        assert_eq!(a.owner(5_000), last);
    }

    proptest! {
        #[test]
        fn owners_follow_the_k6_rule(w in weights()) {
            let seq = SegmentSequence::from_weights(&w).unwrap();
            prop_assert_eq!(&Striping::new(seq.clone()).unwrap().owners[..], &naive_owners(&seq)[..]);
        }

        #[test]
        fn owners_of_explicit_fractions_follow_the_k6_rule(
            cuts in proptest::collection::btree_set(1u64..360, 0..12)
        ) {
            let mut bounds = vec![r(0, 1)];
            bounds.extend(cuts.iter().map(|&c| r(c, 360)));
            bounds.push(r(1, 1));
            let seq = SegmentSequence::new(bounds).unwrap();
            prop_assert_eq!(&Striping::new(seq.clone()).unwrap().owners[..], &naive_owners(&seq)[..]);
        }

        #[test]
        fn striping_shares_are_exact_and_monotone(w in weights(), v in 0u64..50_000) {
            let s = Striping::from_weights(&w).unwrap();
            let shares: Vec<u64> = (0..w.len()).map(|i| s.scale(i, v)).collect();
            prop_assert_eq!(shares.iter().sum::<u64>(), v);
            for (i, &share) in shares.iter().enumerate() {
                prop_assert!(s.scale(i, v + 1) >= share);
                prop_assert!(s.scale(i, v + 1) - share <= 1);
            }
            // Every index below v (checked on a window) has exactly one owner, consistent
            // with scale.
            let lo = v.saturating_sub(300);
            for i in lo..v {
                let o = s.owner(i);
                prop_assert!(o < w.len());
                prop_assert_eq!(s.scale(o, i + 1), s.scale(o, i) + 1);
            }
        }

        #[test]
        fn large_counts_never_overflow(w in weights(), v in any::<u64>()) {
            let s = Striping::from_weights(&w).unwrap();
            let total: u128 = (0..w.len()).map(|i| u128::from(s.scale(i, v))).sum();
            prop_assert_eq!(total, u128::from(v));
        }

        #[test]
        fn failover_keeps_union_exact_and_survivors_own(w in weights(), f in failovers(), v in 0u64..1_500) {
            let a = build(&w, &f);
            let n = a.nodes();
            let shares: Vec<u64> = (0..n).map(|i| a.scale(i, v)).collect();
            prop_assert_eq!(shares.iter().sum::<u64>(), v);
            for (i, &share) in shares.iter().enumerate() {
                prop_assert!(a.scale(i, v + 1) >= share);
            }
            let mut counted = vec![0u64; n];
            for i in 0..v {
                let o = a.owner(i);
                prop_assert!(o < n);
                counted[o] += 1;
                // Survivors keep their own indices through every level.
                let mut before = a.base.owner(i);
                let mut partial = Assignment::new(a.base.clone());
                for r in a.reassignments() {
                    partial.reassign(r.clone()).unwrap();
                    let now = partial.owner(i);
                    if before != r.lost {
                        prop_assert_eq!(now, before);
                    } else if i >= r.from_index {
                        prop_assert!(r.survivors.contains(&now));
                    } else {
                        prop_assert_eq!(now, before);
                    }
                    before = now;
                }
                prop_assert_eq!(before, o);
            }
            prop_assert_eq!(counted, shares);
        }

        #[test]
        fn owned_iterators_match_owner(w in weights(), f in failovers(), start in 0u64..500) {
            let a = build(&w, &f);
            for node in 0..a.nodes() {
                let got: Vec<u64> = a.owned_from(node, start).take_while(|&i| i < 800).collect();
                let want: Vec<u64> = (start..800).filter(|&i| a.owner(i) == node).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
