//! The run-protocol simulator as a test: seeded schedules of real state machines under
//! every fault kind keep every invariant, and the invariants do catch a protocol
//! without leases or without the leader-authority rule (the mutation check). The full
//! counts (2,000 schedules at 5 nodes, 50 at 100) run in `.ci/run` on the release
//! binary; this keeps a smaller, debug-build share in `cargo test`.

use stampede_protocol::machine::Timing;
use stampede_tools::sim::engine::Plan;
use stampede_tools::sim::faults::FaultKind;
use stampede_tools::sim::{run_one, Aggregation, Flaw, Setup};

fn setup(nodes: usize, flaw: Flaw) -> Setup {
    Setup {
        nodes,
        plan: Plan {
            rate: 100,
            duration_us: 15_000_000,
            vus: 2 * nodes as u64,
            rounds: 60,
            pool: 2 * nodes as u64 * 60,
            iter_us: 100_000,
        },
        timing: Timing::mesh(),
        tail_us: 90_000_000,
        flaw,
        measure_traffic: false,
        // A small fan-in: two levels of the tree even at 5 nodes.
        aggregation: Aggregation::Tree { fan_in: 2 },
    }
}

#[test]
fn every_invariant_holds_under_seeded_faults() {
    let s = setup(5, Flaw::None);
    for seed in 1..=60 {
        let (world, found) = run_one(&s, &FaultKind::ALL, seed);
        assert!(
            found.is_empty(),
            "seed {seed}: {found:?}\n{}",
            world.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

#[test]
fn a_merge_that_takes_overlapping_batches_counts_seconds_twice_and_the_simulator_says_so() {
    let s = setup(5, Flaw::OverlappingBatches);
    let caught = (1..=20).find_map(|seed| {
        let (_, found) = run_one(&s, &FaultKind::ALL, seed);
        found
            .iter()
            .find(|v| v.invariant == "exact-accounting" && v.detail.contains("twice"))
            .map(|v| (seed, v.detail.clone()))
    });
    assert!(
        caught.is_some(),
        "no schedule caught a merge of overlapping batches"
    );
}

#[test]
fn the_all_to_all_snapshots_keep_every_invariant_too() {
    let s = Setup {
        aggregation: Aggregation::AllToAll,
        ..setup(5, Flaw::None)
    };
    for seed in 1..=20 {
        let (world, found) = run_one(&s, &FaultKind::ALL, seed);
        assert!(
            found.is_empty(),
            "seed {seed}: {found:?}\n{}",
            world.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

#[test]
fn without_leases_a_paused_or_cut_off_member_doubles_load_and_the_simulator_says_so() {
    let s = setup(5, Flaw::NoLease);
    let caught = (1..=40).find_map(|seed| {
        let (_, found) = run_one(
            &s,
            &[FaultKind::Pause, FaultKind::Partition, FaultKind::Crash],
            seed,
        );
        found
            .iter()
            .find(|v| v.invariant == "at-most-once")
            .map(|v| (seed, v.detail.clone()))
    });
    assert!(
        caught.is_some(),
        "no schedule caught a protocol without leases"
    );
}

#[test]
fn without_the_authority_rule_a_forged_version_is_taken_up_and_the_simulator_says_so() {
    let s = setup(5, Flaw::NoAuthority);
    let caught = (1..=40).find_map(|seed| {
        let (_, found) = run_one(&s, &[FaultKind::Hostile], seed);
        found
            .iter()
            .find(|v| v.invariant == "forgery-has-no-effect")
            .map(|v| (seed, v.detail.clone()))
    });
    assert!(
        caught.is_some(),
        "no schedule caught a protocol without the authority rule"
    );
}

#[test]
fn without_claims_a_lost_members_counted_work_runs_twice_and_the_simulator_says_so() {
    let s = setup(5, Flaw::NoClaims);
    let caught = (1..=40).find_map(|seed| {
        let (_, found) = run_one(&s, &[FaultKind::Crash], seed);
        found
            .iter()
            .find(|v| v.invariant == "at-most-once" && !v.detail.starts_with("event"))
            .map(|v| (seed, v.detail.clone()))
    });
    assert!(
        caught.is_some(),
        "no schedule caught a failover that ignores the lost member's claims"
    );
}

#[test]
fn a_crashed_members_counted_work_is_taken_over_from_its_claims() {
    // Five nodes, one killed while the counted scenarios run: the survivors finish
    // the lost member's pool and VUs from its claims on, and every slot is started
    // once — except the few the lost member claimed but never started.
    let s = setup(5, Flaw::None);
    let mut taken_over = 0;
    for seed in 1..=12 {
        let (w, found) = run_one(&s, &[FaultKind::Crash], seed);
        assert!(found.is_empty(), "seed {seed}: {found:?}");
        let lost: Vec<usize> = (0..w.nodes.len()).filter(|&i| w.nodes[i].crashed).collect();
        let Some(v) = (0..w.nodes.len())
            .filter(|i| !lost.contains(i))
            .find_map(|i| w.nodes[i].machine.as_ref()?.version().cloned())
        else {
            continue;
        };
        for m in v.moves.iter().filter(|m| lost.contains(&(m.lost as usize))) {
            let x = m.lost as usize;
            let by_lost = (w.pool_starts.values())
                .filter(|st| st.iter().any(|s| s.node == x))
                .count() as u64;
            // The lost member's own slots that another member started.
            let after_lost = w
                .pool_starts
                .iter()
                .filter(|(k, st)| k.0 == x && st.iter().any(|s| s.node != x))
                .count();
            // What the lost member held but had not claimed went to others.
            if m.claims[0] > 0 && m.claims[0] >= by_lost && after_lost > 0 {
                taken_over += 1;
            }
        }
    }
    assert!(taken_over > 0, "no schedule moved counted work by claims");
}

#[test]
fn a_run_larger_than_its_witnesses_keeps_every_invariant_and_survives_a_lost_witness() {
    // Twelve nodes: seven witnesses, five members that hear only them. Seeded faults
    // of every kind, then crashes alone: the runs where a witness is killed must
    // still move its share (the other six are a majority) and report.
    let s = setup(12, Flaw::None);
    for seed in 1..=12 {
        let (world, found) = run_one(&s, &FaultKind::ALL, seed);
        assert!(
            found.is_empty(),
            "seed {seed}: {found:?}\n{}",
            world.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        );
    }
    let mut witness_lost = 0;
    for seed in 1..=20 {
        let (w, found) = run_one(&s, &[FaultKind::Crash], seed);
        assert!(found.is_empty(), "seed {seed}: {found:?}");
        let Some(m) = w.nodes.iter().find_map(|n| n.machine.as_ref()) else {
            continue;
        };
        assert_eq!(m.witnesses().len(), 7, "seven witnesses of twelve");
        let lost: Vec<usize> = (0..w.nodes.len()).filter(|&i| w.nodes[i].crashed).collect();
        if lost.iter().any(|i| m.witnesses().contains(i)) {
            witness_lost += 1;
            let moved = w
                .nodes
                .iter()
                .filter(|n| !n.crashed)
                .find_map(|n| n.machine.as_ref()?.version().cloned())
                .is_some_and(|v| v.moves.iter().any(|mv| lost.contains(&(mv.lost as usize))));
            assert!(moved, "seed {seed}: a lost witness's share was not moved");
        }
    }
    assert!(witness_lost > 0, "no schedule lost a witness");
}

#[test]
fn a_large_runs_control_traffic_per_member_does_not_grow_with_the_roster() {
    // Real encoded sizes of every run message, 20 and 60 nodes, no faults: a member
    // that is not a witness costs about the same at both sizes.
    let mean_member = |nodes: usize| {
        let mut s = setup(nodes, Flaw::None);
        s.measure_traffic = true;
        s.plan.vus = 0;
        s.plan.pool = 0;
        let (w, found) = run_one(&s, &[], 1);
        assert!(found.is_empty(), "{nodes} nodes: {found:?}");
        let m = w.nodes[0].machine.as_ref().expect("the origin ran");
        let members: Vec<usize> = (0..nodes).filter(|i| !m.witnesses().contains(i)).collect();
        let bytes: u64 = members
            .iter()
            .map(|&i| w.traffic[i].bytes_in + w.traffic[i].bytes_out)
            .sum();
        bytes as f64 / members.len() as f64
    };
    let (small, large) = (mean_member(20), mean_member(60));
    assert!(small > 0.0);
    // Gossip (the roster, versions) still grows a little with the roster.
    assert!(
        large < small * 1.5,
        "a member's control bytes grew from {small:.0} at 20 nodes to {large:.0} at 60"
    );
}

/// The default schedule of `stampede-sim` (20 s at 200 arrivals/s, two counted VUs
/// per node) with `--all-to-all`, so that a seed it reported replays here exactly.
fn cli_setup(nodes: usize) -> Setup {
    Setup {
        nodes,
        plan: Plan {
            rate: 200,
            duration_us: 20_000_000,
            vus: 2 * nodes as u64,
            rounds: 80,
            pool: 2 * nodes as u64 * 80,
            iter_us: 100_000,
        },
        timing: Timing::mesh(),
        tail_us: 90_000_000,
        flaw: Flaw::None,
        measure_traffic: false,
        // The seeds below were reported before the tree was the simulator's default:
        // they replay with `--all-to-all`.
        aggregation: Aggregation::AllToAll,
    }
}

#[test]
fn a_member_that_left_as_an_observer_before_a_later_election_is_not_held_to_its_term() {
    // Seed 485 at 12 nodes: n10 (not a witness) is paused, fenced and moved, and
    // leaves the run as an observer at term 1; the leaders of terms 1 and 2 are lost
    // later and the others elect the leader of term 3. n10 never heard of it, and need
    // not: it was out of the run by then. (Seed 412 showed this until the members'
    // clock samples moved to the proposal, which changed every seed's draws.)
    let (w, found) = run_one(&cli_setup(12), &FaultKind::ALL, 485);
    assert!(found.is_empty(), "{found:?}");
    let n10 = &w.nodes[10];
    assert_eq!(n10.term_at_done, 1, "n10 left at term 1");
    let others: std::collections::BTreeSet<u64> = (0..12)
        .filter(|&i| i != 10 && !w.nodes[i].crashed)
        .map(|i| w.nodes[i].term_at_done)
        .collect();
    assert_eq!(others, [3].into(), "the others end in term 3");
}

#[test]
fn a_schedule_that_takes_a_witness_majority_away_is_checked_for_safety_only() {
    // Seeds 678 and 971 at 12 nodes: a partition of four members (three of them
    // witnesses) and the crash of a fourth witness leave no four of the seven in
    // touch, so every lease lapses and stays lapsed after the heal (fences at the
    // same version are never lifted; §16). Liveness is not expected there; every
    // safety invariant still is.
    for seed in [678, 971] {
        let (w, found) = run_one(&cli_setup(12), &FaultKind::ALL, seed);
        assert!(found.is_empty(), "seed {seed}: {found:?}");
        assert!(
            stampede_tools::sim::check::witness_majority_down(&w).is_some(),
            "seed {seed}: a witness majority was down at some instant"
        );
    }
    // And a schedule whose faults stay within a minority of the witnesses is held to
    // liveness: seed 412 loses two of them.
    let (w, _) = run_one(&cli_setup(12), &FaultKind::ALL, 412);
    assert!(stampede_tools::sim::check::witness_majority_down(&w).is_none());
}

/// A schedule with no faults but one kill -9 at `at` (µs).
fn kill_only(nodes: usize, node: usize, at: u64) -> stampede_tools::sim::faults::Schedule {
    stampede_tools::sim::faults::Schedule {
        faults: vec![stampede_tools::sim::faults::Fault::Crash { node, at }],
        ..stampede_tools::sim::faults::Schedule::quiet(nodes)
    }
}

#[test]
fn a_killed_aggregator_or_root_is_replaced_and_the_report_stays_exact() {
    use stampede_protocol::machine::tree::Tree;
    use stampede_protocol::run::RosterEntry;
    let n = 12;
    let s = Setup {
        aggregation: Aggregation::Tree { fan_in: 3 },
        ..setup(n, Flaw::None)
    };
    // The roster is every node, sorted by id: index i is node i.
    let roster: Vec<RosterEntry> = (0..n)
        .map(|i| RosterEntry {
            id: format!("p{i:04}"),
            name: format!("n{i}"),
            labels: Default::default(),
            weight: 1,
        })
        .collect();
    let tree = Tree::new(&roster, "sim-run", 3);
    assert_eq!(tree.groups(), 4);
    let root = tree.candidates(0).next().unwrap();
    let aggregator = tree.candidates(1).next().unwrap();
    for victim in [root, aggregator] {
        let mut w = stampede_tools::sim::World::new(s.clone(), kill_only(n, victim, 6_000_000), 7);
        w.run();
        let found = stampede_tools::sim::check::check(&w);
        assert!(found.is_empty(), "killing n{victim}: {found:?}");
        // Its share moved: the tree now names the next candidate.
        let survivor = (0..n).find(|&i| i != victim).unwrap();
        let m = w.nodes[survivor].machine.as_ref().unwrap();
        assert!(m.version().unwrap().is_moved(victim));
        let group = tree.group_of(victim);
        assert_eq!(m.aggregator_of(group), tree.candidates(group).nth(1));
        // After the failover every survivor's live view takes the run in again:
        // what reporters fetch one by one at the end is the few seconds around
        // the kill, not the rest of the run.
        let reporters: Vec<usize> = (0..n).filter(|&i| w.nodes[i].report.is_some()).collect();
        assert!(!reporters.is_empty());
        for &r in &reporters {
            let one_by_one = w.nodes[r].merged_single;
            assert!(
                one_by_one <= 2 * n as u64,
                "killing n{victim}: n{r} fetched {one_by_one} seconds one by one"
            );
        }
        let published: usize = (0..n).map(|i| w.nodes[i].published.len()).sum();
        let least_live = (0..n)
            .filter(|&i| !w.nodes[i].crashed)
            .map(|i| w.nodes[i].merged_live)
            .min()
            .unwrap();
        assert!(
            least_live as usize >= published - 2 * n,
            "killing n{victim}: a live view took {least_live} of {published} seconds"
        );
    }
}

/// Issue #13's failover bounds on a 50-member run with 50 ms links, in virtual time
/// (deterministic, not a timed test): a crashed plain member's share is taken up by
/// every survivor, and a crashed aggregator's group reaches the origin again, each
/// within 3 s; the origin's merge stays exact.
#[test]
fn a_crashed_member_and_a_crashed_aggregator_fail_over_within_three_seconds() {
    let mut s = setup(50, Flaw::None);
    s.plan.vus = 0;
    s.plan.rounds = 0;
    s.plan.pool = 0;
    s.plan.duration_us = 25_000_000;
    s.aggregation = Aggregation::Tree { fan_in: 8 };
    let f = stampede_tools::sim::failover::measure(&s, 1, 50_000).unwrap();
    assert!(f.violations.is_empty(), "{:?}", f.violations);
    assert_eq!(f.members_swapped.0, f.members_swapped.1);
    let node = f.node_failover_us.expect("every member takes up the move");
    let aggregator = f
        .aggregator_failover_us
        .expect("the group's seconds reach the origin again");
    assert!(node <= 3_000_000, "member failover took {node} µs");
    assert!(
        aggregator <= 3_000_000,
        "aggregator failover took {aggregator} µs"
    );
    assert_eq!(
        f.merged_at_origin, f.published,
        "the origin's merge is exact"
    );
}
