//! The membership simulation (`stampede-sim --membership`) at small sizes: a seeded cold
//! start reaches a full view, a killed node is lost by every survivor within the
//! suspicion bound, nobody alive is held lost, idle traffic stays under the issue's
//! 5 KB/s per node and does not grow with the mesh, and a seed replays exactly. The
//! 1,000-node figures come from the release binary (docs/benchmarks.md); the split of
//! the seed's five million users is checked at a reduced roster here too.

use stampede_tools::sim::membership::{simulate, Figures, MembershipSetup};
use stampede_tools::sim::segments::{measure, SegmentsSetup};

fn run(nodes: usize, loss: f64, seed: u64) -> Figures {
    simulate(&MembershipSetup {
        nodes,
        seconds: 70,
        kill: 1,
        kill_at_s: 55,
        ramp_s: 3,
        latency_us: 50_000,
        loss,
        seed,
    })
    .expect("a valid setup")
}

#[test]
fn a_cold_mesh_converges_loses_a_killed_node_and_idles_at_a_constant_cost() {
    // Both past 60 members, where the slow refresh's floor (60 s) no longer sets the
    // mesh-wide rate of records: from there it is one a second at any size.
    let small = run(64, 0.0, 7);
    let large = run(192, 0.0, 7);
    for f in [&small, &large] {
        let lines = f.lines().join("\n");
        let full = f
            .full_view_s
            .unwrap_or_else(|| panic!("no full view:\n{lines}"));
        assert!(full < 15.0, "{lines}");
        let lost = f
            .all_lost_s
            .unwrap_or_else(|| panic!("killed node never lost:\n{lines}"));
        // Close seen after one latency, the probe refused after one round trip, the
        // suspicion relayed a few hops, then the 3 s suspicion timeout (checked every
        // 250 ms).
        assert!((3.0..4.5).contains(&lost), "{lines}");
        assert_eq!(f.false_lost, 0, "{lines}");
        assert_eq!(
            f.false_suspicions, 0,
            "no loss, no false suspicion:\n{lines}"
        );
        assert!(f.window_s >= 20.0, "{lines}");
        assert!(
            f.idle_bytes_mean > 500.0 && f.idle_bytes_mean < 5000.0,
            "{lines}"
        );
        assert!(f.idle_bytes_max < 10_000.0, "{lines}");
        assert!(f.links_max <= 12 && f.links_mean >= 4.0, "{lines}");
        assert!(f.announce_bytes > 300 && f.announce_bytes < 1000, "{lines}");
    }
    // Constant in N: three times the nodes, about the same bytes per node (a little more
    // while gossipsub meshes fill towards D = 4).
    let ratio = large.idle_bytes_mean / small.idle_bytes_mean;
    assert!(
        (0.8..1.4).contains(&ratio),
        "{ratio}: {:?} vs {:?}",
        small.lines(),
        large.lines()
    );
    assert_eq!(run(64, 0.0, 7), small, "the same seed replays the same run");
}

#[test]
fn lossy_links_still_converge_and_lose_only_the_killed_node() {
    let f = run(48, 0.05, 3);
    let lines = f.lines().join("\n");
    assert!(f.full_view_s.is_some_and(|t| t < 20.0), "{lines}");
    assert!(f.all_lost_s.is_some_and(|t| t < 6.0), "{lines}");
    assert_eq!(f.false_lost, 0, "{lines}");
}

#[test]
fn bad_setups_are_refused_with_the_flag_named() {
    let good = MembershipSetup {
        nodes: 10,
        seconds: 60,
        kill: 1,
        kill_at_s: 40,
        ramp_s: 1,
        latency_us: 50_000,
        loss: 0.0,
        seed: 1,
    };
    for (bad, flag) in [
        (
            MembershipSetup {
                nodes: 5000,
                ..good.clone()
            },
            "--nodes",
        ),
        (
            MembershipSetup {
                kill: 5,
                ..good.clone()
            },
            "--kill",
        ),
        (
            MembershipSetup {
                loss: 0.9,
                ..good.clone()
            },
            "--loss",
        ),
        (
            MembershipSetup {
                seconds: 1,
                ..good.clone()
            },
            "--seconds",
        ),
    ] {
        let e = simulate(&bad).expect_err(flag);
        assert!(e.contains(flag), "{e}");
    }
}

#[test]
fn five_million_users_split_exactly_into_messages_under_the_gossip_limit() {
    let figures = measure(&SegmentsSetup {
        nodes: 40,
        vus: 5_000_000,
        arrivals: 20_000,
        moves: 10,
    })
    .expect("a valid setup");
    assert!(figures.len() >= 10);
    for f in &figures {
        assert!(f.ok, "{}: {}", f.name, f.value);
    }
}
