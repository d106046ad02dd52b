//! The run-protocol simulator as a test: seeded schedules of real state machines under
//! every fault kind keep every invariant, and the invariants do catch a protocol
//! without leases or without the leader-authority rule (the mutation check). The full
//! counts (2,000 schedules at 5 nodes, 50 at 100) run in `.ci/run` on the release
//! binary; this keeps a smaller, debug-build share in `cargo test`.

use stampede_protocol::machine::Timing;
use stampede_tools::sim::engine::Plan;
use stampede_tools::sim::faults::FaultKind;
use stampede_tools::sim::{run_one, Flaw, Setup};

fn setup(nodes: usize, flaw: Flaw) -> Setup {
    Setup {
        nodes,
        plan: Plan {
            rate: 100,
            duration_us: 15_000_000,
        },
        timing: Timing::mesh(),
        tail_us: 90_000_000,
        flaw,
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
