//! Failover figures of a large run (issue #13: "failover of a node and of an
//! aggregator within 3 s" at 1,000 simulated nodes with 50 ms links): one schedule
//! without faults to learn who the run's witnesses and aggregators are, then the same
//! schedule with two crashes — a plain member (neither witness nor aggregator) and,
//! later, a group's aggregator (not the root's group, not a witness) — and what every
//! node did about them.
//!
//! Must not decide anything about the protocol: it only reads the simulated world.

use super::check::{check, Violation};
use super::faults::{Fault, Schedule};
use super::{Setup, World};

/// When the two crashes come, after the first iteration started.
const NODE_CRASH_AFTER_US: u64 = 4_000_000;
const AGGREGATOR_CRASH_AFTER_US: u64 = 12_000_000;

/// What [`measure`] found.
pub struct Figures {
    pub nodes: usize,
    pub latency_us: u64,
    /// Trigger to the first iteration started anywhere (the fault-free schedule).
    pub first_iteration_us: Option<u64>,
    /// The plain member crashed, and how long until every live member ran the split
    /// without it (took up the version moving its share); `None`: some never did.
    pub node: usize,
    pub node_failover_us: Option<u64>,
    pub members_swapped: (usize, usize),
    /// The aggregator crashed (its group), and how long until node 0 merged a root
    /// batch covering a surviving member of that group for a second after the crash.
    pub aggregator: usize,
    pub group: usize,
    pub aggregator_failover_us: Option<u64>,
    /// Member seconds measured (published) against those node 0 merged, live or
    /// fetched at the end, and the protocol's invariants over the crash schedule.
    pub published: u64,
    pub merged_at_origin: u64,
    pub violations: Vec<Violation>,
    /// The fault-free world (for its traffic figures).
    pub quiet: World,
}

/// Runs `setup` twice with links of `latency_us` one way (±10 %).
pub fn measure(setup: &Setup, seed: u64, latency_us: u64) -> Result<Figures, String> {
    let schedule = Schedule {
        delay_min: latency_us - latency_us / 10,
        delay_max: latency_us + latency_us / 10,
        ..Schedule::quiet(setup.nodes)
    };
    let mut quiet = World::new(setup.clone(), schedule.clone(), seed);
    quiet.run();
    let first = quiet
        .first_start_at
        .ok_or("the fault-free run never started an iteration")?;
    let m = quiet.nodes[0]
        .machine
        .as_ref()
        .ok_or("node 0 holds no run")?;
    let roster = m.roster();
    let at = |j: usize| -> Result<usize, String> {
        quiet
            .index(&roster[j].id)
            .ok_or_else(|| format!("roster member {j} is no node"))
    };
    let tree = m
        .tree()
        .ok_or("the run has no aggregation tree (--all-to-all?)")?;
    let witnesses = m.witnesses().to_vec();
    let aggregators: Vec<usize> = (0..tree.groups())
        .filter_map(|g| m.aggregator_of(g))
        .collect();
    let plain = (1..roster.len())
        .find(|j| !witnesses.contains(j) && !aggregators.contains(j))
        .ok_or("no member is neither witness nor aggregator (too few nodes)")?;
    let (group, aggregator) = (1..tree.groups())
        .filter_map(|g| Some((g, m.aggregator_of(g)?)))
        .find(|(_, a)| !witnesses.contains(a) && *a != plain)
        .ok_or("no group but the root's has an aggregator that is not a witness")?;
    let survivors: Vec<u32> = (0..roster.len())
        .filter(|&j| tree.group_of(j) == group && j != aggregator && j != plain)
        .map(|j| j as u32)
        .collect();
    let (plain, aggregator) = (at(plain)?, at(aggregator)?);

    let t_node = first + NODE_CRASH_AFTER_US;
    let t_aggregator = first + AGGREGATOR_CRASH_AFTER_US;
    let mut crashing = schedule;
    crashing.faults = vec![
        Fault::Crash {
            node: plain,
            at: t_node,
        },
        Fault::Crash {
            node: aggregator,
            at: t_aggregator,
        },
    ];
    let mut w = World::new(setup.clone(), crashing, seed);
    w.run();
    let violations = check(&w);

    // Every live member took up a split after the node's crash (and before the
    // aggregator's, which moves shares again).
    let live: Vec<usize> = (0..w.nodes.len())
        .filter(|&i| !w.nodes[i].crashed && w.nodes[i].machine.is_some())
        .collect();
    let swaps: Vec<Option<u64>> = live
        .iter()
        .map(|&i| {
            w.nodes[i]
                .swapped_at
                .iter()
                .copied()
                .find(|&t| t >= t_node && t < t_aggregator)
        })
        .collect();
    let swapped = swaps.iter().flatten().count();
    let node_failover_us = (swapped == live.len())
        .then(|| swaps.iter().flatten().max().map(|t| t - t_node))
        .flatten();

    // The run's second the aggregator died in, on the true run clock (node 0's wall).
    let start_virtual = w
        .run_start_unix
        .map(|s| s as i64 - 1_000_000_000_000 - w.nodes[0].wall_offset)
        .ok_or("the crash schedule's run never started")?;
    let crash_second = ((t_aggregator as i64 - start_virtual).max(0) / 1_000_000) as u64;
    let aggregator_failover_us = w
        .observed
        .iter()
        .find(|(_, seq, covers)| {
            *seq > crash_second && covers.iter().any(|c| survivors.contains(c))
        })
        .map(|(t, _, _)| t - t_aggregator);

    let published = w.nodes.iter().map(|n| n.published.len() as u64).sum();
    let merged_at_origin = w.nodes[0].merged.iter().map(|s| s.len() as u64).sum();
    Ok(Figures {
        nodes: setup.nodes,
        latency_us,
        first_iteration_us: Some(first),
        node: plain,
        node_failover_us,
        members_swapped: (swapped, live.len()),
        aggregator,
        group,
        aggregator_failover_us,
        published,
        merged_at_origin,
        violations,
        quiet,
    })
}
