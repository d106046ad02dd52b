//! The tree on its own: machines of one run wired to each other by hand, so that
//! every hop is visible (the simulator checks it under faults).

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::machine::version::{Move, Version, VersionId};
use crate::machine::{Input, Me, Peer, Timing};

const START: u64 = 1_000_000_000_000;

fn now(t_us: u64) -> Now {
    Now {
        mono_us: 5_000_000 + t_us,
        wall_us: START + t_us,
    }
}

fn roster(n: usize) -> Vec<RosterEntry> {
    (0..n)
        .map(|i| RosterEntry {
            id: format!("p{i:04}"),
            name: format!("n{i}"),
            labels: Default::default(),
            weight: 1,
        })
        .collect()
}

/// Member `i` of an `n`-member run already running, with tree aggregation.
fn member(n: usize, i: usize, fan_in: usize) -> RunMachine {
    let r = roster(n);
    let me = Me {
        id: r[i].id.clone(),
        name: r[i].name.clone(),
        labels: Default::default(),
        weight: 1,
    };
    let mut m = RunMachine::blank(
        me,
        "6932a8b2-0f3c",
        "p0000",
        "h",
        "p.toml",
        Default::default(),
        Timing::mesh(),
        now(0),
    );
    m.set_aggregation(Aggregation::Tree { fan_in });
    m.roster = r;
    m.index = m
        .roster
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.clone(), i))
        .collect();
    m.my_index = Some(i);
    // Heard "in the future": nobody falls silent in these tests, nobody is fenced.
    m.peers = vec![
        Peer {
            last_heard: u64::MAX / 2,
            ..Default::default()
        };
        n
    ];
    m.started_told = true;
    m.fence_count = vec![0; n];
    m.seen = vec![Default::default(); n];
    m.absent = vec![Default::default(); n];
    m.witnesses = (0..n.min(5)).collect();
    m.version = Some(version(&[]));
    m.phase = Phase::Running;
    m.build_tree();
    m
}

fn version(lost: &[u32]) -> Version {
    Version {
        id: VersionId {
            term: 1,
            seq: lost.len() as u64,
        },
        start_unix_us: START,
        moves: lost
            .iter()
            .map(|&l| Move {
                lost: l,
                from_event: 0,
                at_us: 0,
                claims: vec![],
                takers: vec![],
            })
            .collect(),
    }
}

/// A run's machines and the messages between them, delivered at once, in order.
struct Mesh {
    m: Vec<RunMachine>,
    /// Per node: (second, covers) merged into its view.
    merged: Vec<Vec<(u64, Vec<u32>)>>,
    /// Direct messages up the tree, and gossip of the root, as (from, to) counts.
    sent: BTreeMap<&'static str, usize>,
    dead: BTreeSet<usize>,
}

impl Mesh {
    fn new(n: usize, fan_in: usize) -> Mesh {
        Mesh {
            m: (0..n).map(|i| member(n, i, fan_in)).collect(),
            merged: vec![Vec::new(); n],
            sent: BTreeMap::new(),
            dead: BTreeSet::new(),
        }
    }

    fn input(&mut self, i: usize, input: Input, t: u64) {
        if self.dead.contains(&i) {
            return;
        }
        let effects = self.m[i].handle(input, now(t));
        self.apply(i, effects, t);
    }

    fn apply(&mut self, i: usize, effects: Vec<Effect>, t: u64) {
        let id = self.m[i].roster[i].id.clone();
        for e in effects {
            match e {
                Effect::SendSnapshot { seq, to } => {
                    *self.sent.entry("snapshot").or_default() += 1;
                    let j = self.m[i].index_of(&to).unwrap();
                    let input = Input::Batch {
                        from: id.clone(),
                        seq,
                        covers: vec![i as u32],
                        published: false,
                    };
                    self.input(j, input, t);
                }
                Effect::Forward {
                    seq,
                    to: Some(to),
                    covers,
                } => {
                    *self.sent.entry("group").or_default() += 1;
                    let j = self.m[i].index_of(&to).unwrap();
                    let input = Input::Batch {
                        from: id.clone(),
                        seq,
                        covers,
                        published: false,
                    };
                    self.input(j, input, t);
                }
                Effect::Forward {
                    seq,
                    to: None,
                    covers,
                } => {
                    *self.sent.entry("root").or_default() += 1;
                    for j in 0..self.m.len() {
                        if j != i {
                            let input = Input::Batch {
                                from: id.clone(),
                                seq,
                                covers: covers.clone(),
                                published: true,
                            };
                            self.input(j, input, t);
                        }
                    }
                }
                Effect::MergeBatch { seq, covers } => self.merged[i].push((seq, covers)),
                _ => {}
            }
        }
    }

    fn second(&mut self, seq: u64, t: u64) {
        for i in 0..self.m.len() {
            self.input(i, Input::OwnSecond { seq }, t);
        }
    }

    fn tick(&mut self, t: u64) {
        for i in 0..self.m.len() {
            self.input(i, Input::Tick, t);
        }
    }

    /// Every (member, second) merged at node `i`, and whether any came twice.
    fn view(&self, i: usize) -> (BTreeSet<(u32, u64)>, bool) {
        let mut all = BTreeSet::new();
        let mut twice = false;
        for (s, covers) in &self.merged[i] {
            for &c in covers {
                twice |= !all.insert((c, *s));
            }
        }
        (all, twice)
    }
}

#[test]
fn every_member_is_in_one_group_and_every_node_draws_the_same_tree() {
    let a = member(100, 3, 16);
    let b = member(100, 77, 16);
    let (ta, tb) = (a.tree().unwrap(), b.tree().unwrap());
    assert_eq!(ta.groups(), 7);
    let mut seen = BTreeSet::new();
    for g in 0..ta.groups() {
        let ca: Vec<usize> = ta.candidates(g).collect();
        let cb: Vec<usize> = tb.candidates(g).collect();
        assert_eq!(ca, cb, "group {g}");
        assert!(ca.len() <= 16 && !ca.is_empty());
        for j in ca {
            assert_eq!(ta.group_of(j), g);
            assert!(seen.insert(j), "member {j} in two groups");
        }
    }
    assert_eq!(seen.len(), 100);
    // Another run draws other aggregators (the load of aggregating moves around).
    let other = Tree::new(&roster(100), "6932a8b2-0f3d", 16);
    let firsts = |t: &Tree| {
        (0..t.groups())
            .map(|g| t.candidates(g).next())
            .collect::<Vec<_>>()
    };
    assert_ne!(firsts(ta), firsts(&other));
    // The default fan-in makes two levels of the largest roster.
    let t = Tree::new(&roster(crate::run::MAX_MEMBERS), "6932a8b2-0f3c", FAN_IN);
    assert!(t.groups() <= FAN_IN);
}

#[test]
fn two_levels_bring_every_second_to_every_node_once_with_one_gossip_a_second() {
    let (n, fan_in) = (10, 3);
    let mut mesh = Mesh::new(n, fan_in);
    assert_eq!(mesh.m[0].tree().unwrap().groups(), 4);
    for s in 0..3u64 {
        let t = 1_000_000 * (s + 1);
        mesh.second(s, t);
        mesh.tick(t + 10_000);
    }
    for i in 0..n {
        let (view, twice) = mesh.view(i);
        assert!(!twice, "node {i} merged a second twice");
        let want: BTreeSet<(u32, u64)> = (0..n as u32)
            .flat_map(|j| (0..3).map(move |s| (j, s)))
            .collect();
        assert_eq!(view, want, "node {i}'s view");
    }
    // Each second: one snapshot per member not its own aggregator, one merge per
    // group besides the root's, one gossip.
    assert_eq!(mesh.sent["root"], 3, "{:?}", mesh.sent);
    assert_eq!(mesh.sent["group"], 3 * 3, "{:?}", mesh.sent);
    assert_eq!(mesh.sent["snapshot"], 3 * (n - 4), "{:?}", mesh.sent);
}

#[test]
fn a_missing_member_holds_a_second_up_only_for_the_bounded_wait() {
    let mut mesh = Mesh::new(6, 8);
    let root = mesh.m[0].root().unwrap();
    let silent = (root + 1) % 6;
    for i in 0..6 {
        if i != silent {
            mesh.input(i, Input::OwnSecond { seq: 0 }, 1_000_000);
        }
    }
    assert!(mesh.merged[root].is_empty(), "waits for the rest");
    mesh.tick(1_000_000 + ROOT_WAIT_US - 1);
    assert!(mesh.merged[root].is_empty());
    mesh.tick(1_000_000 + ROOT_WAIT_US);
    assert_eq!(mesh.merged[root].len(), 1);
    assert_eq!(mesh.merged[root][0].1.len(), 5);
    // The late one goes out as a supplement covering it alone.
    mesh.input(silent, Input::OwnSecond { seq: 0 }, 2_500_000);
    mesh.tick(2_500_000 + ROOT_WAIT_US);
    for i in 0..6 {
        let (view, twice) = mesh.view(i);
        assert!(!twice);
        assert_eq!(view.len(), 6, "node {i}");
    }
    assert_eq!(mesh.merged[root][1].1, vec![silent as u32]);
}

#[test]
fn an_overlapping_merge_is_refused_whole_and_the_flaw_takes_it() {
    let mut m = member(5, 4, 8);
    let root = m.root().unwrap();
    let from = m.roster[root].id.clone();
    let batch = |covers: Vec<u32>| Input::Batch {
        from: from.clone(),
        seq: 2,
        covers,
        published: true,
    };
    let merges = |e: &[Effect]| {
        e.iter()
            .filter(|e| matches!(e, Effect::MergeBatch { .. }))
            .count()
    };
    assert_eq!(merges(&m.handle(batch(vec![0, 1]), now(3_000_000))), 1);
    assert_eq!(
        merges(&m.handle(batch(vec![0, 1]), now(3_000_001))),
        0,
        "a duplicate"
    );
    assert_eq!(
        merges(&m.handle(batch(vec![1, 2]), now(3_000_002))),
        0,
        "overlaps member 1"
    );
    assert!(
        !m.seen[2].contains(&2),
        "refused whole: 2 is left to the re-fetch"
    );
    assert_eq!(merges(&m.handle(batch(vec![2, 3]), now(3_000_003))), 1);
    // A merge from a member that can never be the root is not taken at all.
    let not_root = (0..5)
        .find(|&j| m.tree().unwrap().group_of(j) != 0)
        .map(|j| m.roster[j].id.clone());
    if let Some(f) = not_root {
        let e = m.handle(
            Input::Batch {
                from: f,
                seq: 3,
                covers: vec![4],
                published: true,
            },
            now(3_000_004),
        );
        assert_eq!(merges(&e), 0);
    }
    let mut flawed = member(5, 4, 8);
    flawed.set_flaw(Flaw::OverlappingBatches);
    flawed.handle(batch(vec![0, 1]), now(3_000_000));
    assert_eq!(merges(&flawed.handle(batch(vec![1, 2]), now(3_000_001))), 1);
}

#[test]
fn a_member_cannot_pass_off_another_members_second_or_a_far_future_one() {
    let (n, fan_in) = (10, 3);
    let mut agg_node = None;
    let probe = member(n, 0, fan_in);
    let t = probe.tree().unwrap().clone();
    // A group aggregator that is not the root, and two members of other groups.
    let g = 1;
    let agg = t.candidates(g).next().unwrap();
    let mate = t.candidates(g).nth(1).unwrap();
    let stranger = (0..n)
        .find(|&j| t.group_of(j) != g && t.group_of(j) != 0)
        .unwrap();
    let mut m = member(n, agg, fan_in);
    let holds = |e: &[Effect]| e.iter().any(|e| matches!(e, Effect::Hold { .. }));
    let id = |j: usize| probe.roster[j].id.clone();
    let direct = |from: usize, seq: u64, covers: Vec<u32>| Input::Batch {
        from: id(from),
        seq,
        covers,
        published: false,
    };
    // Its group mate's own second: held.
    assert!(holds(
        &m.handle(direct(mate, 0, vec![mate as u32]), now(1_000_000))
    ));
    // Again (a duplicate on the wire): not held twice.
    assert!(!holds(
        &m.handle(direct(mate, 0, vec![mate as u32]), now(1_000_001))
    ));
    // The mate claiming the aggregator's own second, or a stranger's: refused.
    assert!(!holds(
        &m.handle(direct(mate, 0, vec![agg as u32]), now(1_000_002))
    ));
    assert!(!holds(&m.handle(
        direct(stranger, 0, vec![stranger as u32]),
        now(1_000_003)
    )));
    // A second far beyond the run's clock would push the window past the real ones.
    assert!(!holds(&m.handle(
        direct(mate, 1_000_000, vec![mate as u32]),
        now(1_000_004)
    )));
    // Out of the roster, unsorted, empty: refused.
    for covers in [vec![99], vec![], vec![3, 2]] {
        assert!(!holds(&m.handle(direct(mate, 1, covers), now(1_000_005))));
    }
    agg_node.replace(m);
    assert!(agg_node.is_some());
}

#[test]
fn a_lost_aggregator_is_replaced_and_its_group_sends_again_what_was_not_merged() {
    let (n, fan_in) = (10, 3);
    let mut mesh = Mesh::new(n, fan_in);
    let t = mesh.m[0].tree().unwrap().clone();
    let g = 2;
    let agg = t.candidates(g).next().unwrap();
    let next = t.candidates(g).nth(1).unwrap();
    mesh.second(0, 1_000_000);
    mesh.tick(1_010_000);
    // The aggregator dies just before second 1: its group's second 1 goes nowhere.
    mesh.dead.insert(agg);
    mesh.second(1, 2_000_000);
    mesh.tick(2_000_000 + ROOT_WAIT_US);
    let root = mesh.m[0].root().unwrap();
    let (view, _) = mesh.view(root);
    let lacking: Vec<u32> = t
        .candidates(g)
        .filter(|&j| j != agg)
        .map(|j| j as u32)
        .filter(|&j| !view.contains(&(j, 1)))
        .collect();
    assert!(!lacking.is_empty());
    // Its share moves: every member takes the next candidate.
    for m in &mut mesh.m {
        m.version = Some(version(&[agg as u32]));
    }
    assert_eq!(mesh.m[next].aggregator_of(g), Some(next));
    mesh.tick(4_000_000);
    mesh.tick(4_000_000 + ROOT_WAIT_US + GROUP_WAIT_US);
    for i in (0..n).filter(|&i| i != agg) {
        let (view, twice) = mesh.view(i);
        assert!(!twice, "node {i} merged a second twice");
        for &j in &lacking {
            assert!(
                view.contains(&(j, 1)),
                "node {i} lacks member {j}'s second 1"
            );
        }
    }
}

/// The root of a run of 6 (fan-in 8: one group) as it takes another member's second 0
/// at 1 s: the root, that member's index, and what taking it did.
fn root_given_a_mates_second_0() -> (RunMachine, usize, Vec<Effect>) {
    let m = member(6, 0, 8);
    let root = m.root().unwrap();
    let mut m = if root == 0 { m } else { member(6, root, 8) };
    let mate = (0..6).find(|&j| j != root).unwrap();
    let from = m.roster[mate].id.clone();
    let e = m.handle(
        Input::Batch {
            from,
            seq: 0,
            covers: vec![mate as u32],
            published: false,
        },
        now(1_000_000),
    );
    (m, mate, e)
}

#[test]
fn an_aggregator_passes_up_what_it_holds_before_it_leaves_the_run() {
    let (mut m, _, e) = root_given_a_mates_second_0();
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Hold { seq: 0, own: false })));
    assert!(m.tree_holds());
    m.phase = Phase::Finishing;
    m.finishing_since = Some(now(1_000_000).mono_us);
    m.pass_up(None, now(1_000_001), true);
    assert!(!m.tree_holds());
}

/// Once the run is finishing, a second held for passing up waits no more: the run's
/// last, partial second, which only a few members have, never covers its scope and
/// waited out the group's and the root's waits (1.3 s between `finished` and the
/// report at 50 real nodes).
#[test]
fn a_finishing_aggregator_passes_up_a_partial_last_second_at_once() {
    let (mut m, mate, _) = root_given_a_mates_second_0();
    let forwarded = |e: &[Effect]| {
        e.iter()
            .any(|e| matches!(e, Effect::Forward { seq: 0, .. }))
    };
    // Running: it waits for the rest of the scope.
    let e = m.handle(Input::Tick, now(1_050_000));
    assert!(!forwarded(&e) && m.tree_holds());
    // Finishing (every member arrived at `finished`): it goes up at once, long before
    // the root's wait is out.
    let finished = (0..6)
        .map(|j| {
            (
                j,
                crate::run::BarrierDetail {
                    snapshots: Some(if j == mate { 1 } else { 0 }),
                    ..Default::default()
                },
            )
        })
        .collect();
    m.arrivals
        .insert(crate::machine::events::Barrier::Finished, finished);
    m.phase = Phase::Finishing;
    let e = m.handle(Input::Tick, now(1_100_000));
    assert!(forwarded(&e), "{e:?}");
    assert!(!m.tree_holds());
}

/// A reporter in the tree's grace fetches at once a gap far behind the run's end (a
/// member's first second that never came up the tree: seen at 40 real nodes, where the
/// report then waited out the whole grace), and waits only for the last seconds.
#[test]
fn a_reporter_fetches_an_old_gap_at_once_and_waits_only_for_the_last_seconds() {
    let mut m = member(6, 0, 8);
    assert!(m.is_reporter(), "node 0 is the origin");
    let seconds = 8u64;
    let mut finished = BTreeMap::new();
    for j in 0..6 {
        finished.insert(
            j,
            crate::run::BarrierDetail {
                snapshots: Some(seconds),
                ..Default::default()
            },
        );
        for s in 0..seconds {
            // Member 3's first second and member 4's last never came.
            if (j, s) != (3, 0) && (j, s) != (4, seconds - 1) {
                m.seen[j].insert(s);
            }
        }
    }
    m.arrivals
        .insert(crate::machine::events::Barrier::Finished, finished);
    m.phase = Phase::Finishing;
    m.finishing_since = Some(now(10_000_000).mono_us);
    let fetches = |e: &[Effect]| -> Vec<(String, Vec<u64>)> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Fetch { node, seqs } => Some((node.clone(), seqs.clone())),
                _ => None,
            })
            .collect()
    };
    let e = m.handle(Input::Tick, now(10_100_000));
    assert_eq!(
        fetches(&e),
        vec![("p0003".to_string(), vec![0])],
        "the old gap at once, not the last second"
    );
    // After the grace the last second's gap is fetched too.
    let after = 10_000_000 + TREE_GRACE_US + m.timing.fetch_every_us;
    let e = m.handle(Input::Tick, now(after));
    assert!(
        fetches(&e).contains(&("p0004".to_string(), vec![seconds - 1])),
        "{:?}",
        fetches(&e)
    );
}
