//! `stampede-sim`: runs seeded fault schedules of N real run-protocol state machines
//! over a simulated network and virtual clock, and checks the protocol's invariants on
//! each. Exit 0 iff every invariant held; a violation prints its seed and the trace
//! that `--seed S` replays. The last line is always a one-line summary.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use stampede_protocol::machine::Timing;
use stampede_tools::sim::check::{witness_majority_down, INVARIANTS};
use stampede_tools::sim::engine::Plan;
use stampede_tools::sim::faults::FaultKind;
use stampede_tools::sim::membership::{simulate, MembershipSetup};
use stampede_tools::sim::segments::{measure, SegmentsSetup};
use stampede_tools::sim::{run_one, Aggregation, Flaw, Setup};

#[derive(Parser, Debug)]
#[command(
    name = "stampede-sim",
    about = "Deterministic simulation of stampede's run protocol under faults"
)]
struct Args {
    /// Nodes in the mesh (3 to 1000).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// How many seeded schedules to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// Run only this seed (replays a reported violation, with its trace).
    #[arg(long)]
    seed: Option<u64>,
    /// The first seed of the range (seeds are first..first+seeds).
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Faults to draw from: loss,dup,delay,partition,crash,pause,clock,hostile (or all).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Arrival rate of the simulated plan (events per second).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// VUs of each of the plan's two counted scenarios (a shared-iterations pool and
    /// per-vu-iterations); 0 leaves them out. Default: two per node.
    #[arg(long)]
    counted_vus: Option<u64>,
    /// Length of the simulated plan in seconds.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Build a flaw into every machine (mutation check): none, no-lease, no-authority,
    /// no-claims, overlapping-batches.
    #[arg(long, default_value = "none")]
    flaw: String,
    /// Print the trace of every schedule, not just of violations.
    #[arg(long)]
    verbose: bool,
    /// Simulate membership (SWIM over gossip, tools/src/sim/membership.rs) instead of a
    /// run, at 100, 300 and --nodes nodes (those up to --nodes): one line per figure.
    #[arg(long)]
    membership: bool,
    /// --membership: simulated seconds (a cold start, the idle window, then the kill 20 s
    /// before the end).
    #[arg(long, default_value_t = 90)]
    seconds: u64,
    /// --membership: nodes killed at once.
    #[arg(long, default_value_t = 1)]
    kill: usize,
    /// --membership and --failover: one-way link latency in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// A run with links of --latency-ms (tools/src/sim/failover.rs): without faults
    /// (trigger to first iteration, and its traffic with --traffic), then with a plain
    /// member crashed and later a group's aggregator: how long until every member ran
    /// without the member, until the group's seconds reached the origin again, and
    /// whether the merge stayed exact. One line per figure.
    #[arg(long)]
    failover: bool,
    /// --membership: probability that a TCP segment is lost (resent after an RTO).
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Split the seed's 5,000,000 VUs and 5,000,000 arrivals over --nodes members
    /// (tools/src/sim/segments.rs): time to compute the split and the size of every
    /// message that carries it, one line per figure.
    #[arg(long)]
    segments: bool,
    /// --segments: moves (lost members) in the failover version.
    #[arg(long, default_value_t = 10)]
    moves: usize,
    /// Print each schedule's control-traffic figures (real encoded message sizes):
    /// bytes per second per node (mean and busiest), messages per second per node,
    /// and the time from the trigger to the first iteration started.
    #[arg(long)]
    traffic: bool,
    /// Snapshots go all to all (every member gossips its own second, every node
    /// merges every member's), as before the aggregation tree.
    #[arg(long)]
    all_to_all: bool,
    /// Members per group of the aggregation tree (2 to 1024).
    #[arg(long, default_value_t = stampede_protocol::machine::FAN_IN)]
    fan_in: usize,
}

/// How long one counted iteration takes in the simulated plan.
const COUNTED_ITER_US: u64 = 100_000;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stampede-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    if args.membership {
        return membership(args);
    }
    if args.segments {
        return segments(args);
    }
    if !(3..=1000).contains(&args.nodes) {
        return Err(format!("--nodes {}: must be 3 to 1000", args.nodes));
    }
    if !(1..=100_000).contains(&args.rate) || !(5..=3600).contains(&args.duration) {
        return Err("--rate must be 1..=100000 and --duration 5..=3600".into());
    }
    let kinds: Vec<FaultKind> = if args.faults == "all" {
        FaultKind::ALL.to_vec()
    } else if args.faults == "none" {
        Vec::new()
    } else {
        args.faults
            .split(',')
            .map(|k| FaultKind::parse(k.trim()))
            .collect::<Result<_, _>>()?
    };
    let flaw = match args.flaw.as_str() {
        "none" => Flaw::None,
        "no-lease" => Flaw::NoLease,
        "no-authority" => Flaw::NoAuthority,
        "no-claims" => Flaw::NoClaims,
        "overlapping-batches" => Flaw::OverlappingBatches,
        other => {
            return Err(format!(
                "--flaw {other}: none, no-lease, no-authority, no-claims or overlapping-batches"
            ))
        }
    };
    if !(2..=1024).contains(&args.fan_in) {
        return Err(format!("--fan-in {}: must be 2 to 1024", args.fan_in));
    }
    let aggregation = if args.all_to_all {
        Aggregation::AllToAll
    } else {
        Aggregation::Tree {
            fan_in: args.fan_in,
        }
    };
    let setup = Setup {
        nodes: args.nodes,
        plan: Plan {
            rate: args.rate,
            duration_us: args.duration * 1_000_000,
            vus: args.counted_vus.unwrap_or(2 * args.nodes as u64),
            // Counted work spans 40 % of the run, so that faults land in it.
            rounds: args.duration * 1_000_000 * 4 / 10 / COUNTED_ITER_US,
            pool: args.counted_vus.unwrap_or(2 * args.nodes as u64) * args.duration * 1_000_000 * 4
                / 10
                / COUNTED_ITER_US,
            iter_us: COUNTED_ITER_US,
        },
        timing: Timing::mesh(),
        tail_us: 90_000_000,
        flaw,
        measure_traffic: args.traffic,
        aggregation,
    };
    if args.failover {
        return failover(args, &setup);
    }
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let began = Instant::now();
    let (mut violations, mut checked, mut failed_seeds) = (0usize, 0usize, Vec::new());
    let mut starts = 0usize;
    let mut counted = 0usize;
    let mut dropped = 0u64;
    let mut undecidable = 0usize;
    for &seed in &seeds {
        let (world, found) = run_one(&setup, &kinds, seed);
        checked += INVARIANTS.len();
        starts += world.starts.iter().map(Vec::len).sum::<usize>();
        counted += world.pool_starts.values().map(Vec::len).sum::<usize>()
            + world.vu_starts.values().map(Vec::len).sum::<usize>();
        dropped += world.nodes.iter().map(|n| n.engine.dropped).sum::<u64>();
        if let Some(t) = witness_majority_down(&world) {
            undecidable += 1;
            if args.seed.is_some() {
                println!(
                    "seed {seed}: no majority of the witnesses in touch at {:.3} s: liveness not checked",
                    t as f64 / 1e6
                );
            }
        }
        if args.traffic {
            print_traffic(seed, &world);
        }
        if !found.is_empty() || args.verbose || args.seed.is_some() {
            println!("seed {seed}: schedule {:?}", world.schedule);
            for line in &world.trace {
                println!("  {line}");
            }
        }
        if !found.is_empty() {
            for v in &found {
                println!("VIOLATION seed {seed}: {}: {}", v.invariant, v.detail);
            }
            println!("replay: stampede-sim --nodes {} --seed {seed} --faults {} --rate {} --duration {} --flaw {}{}",
                args.nodes, args.faults, args.rate, args.duration, args.flaw,
                if args.all_to_all { " --all-to-all".to_string() } else { format!(" --fan-in {}", args.fan_in) });
            violations += found.len();
            failed_seeds.push(seed);
        }
    }
    println!(
        "stampede-sim: {} schedules of {} nodes, {checked} invariant checks, {starts} arrivals and {counted} counted iterations started ({dropped} arrivals dropped late after a lapsed lease), {undecidable} schedules with no witness majority in touch at some instant (liveness not checked there), {violations} violations{} ({:.1} s)",
        seeds.len(),
        args.nodes,
        if failed_seeds.is_empty() {
            String::new()
        } else {
            format!(" in seeds {failed_seeds:?}")
        },
        began.elapsed().as_secs_f64()
    );
    Ok(violations == 0)
}

/// Idle traffic per node the issue allows (bytes/s).
const IDLE_GOAL: f64 = 5000.0;

fn membership(args: &Args) -> Result<bool, String> {
    let began = Instant::now();
    let mut sizes: Vec<usize> = [100, 300].into_iter().filter(|&n| n < args.nodes).collect();
    sizes.push(args.nodes);
    let mut ok = true;
    let mut idle = Vec::new();
    for &nodes in &sizes {
        let setup = MembershipSetup {
            nodes,
            seconds: args.seconds,
            kill: args.kill,
            kill_at_s: args.seconds.saturating_sub(20),
            ramp_s: 5,
            latency_us: args.latency_ms.saturating_mul(1000),
            loss: args.loss,
            seed: args.seed.unwrap_or(args.first_seed),
        };
        let f = simulate(&setup)?;
        for line in f.lines() {
            println!("{line}");
        }
        ok &= f.window_s > 0.0
            && f.idle_bytes_mean <= IDLE_GOAL
            && (args.kill == 0 || f.all_lost_s.is_some());
        idle.push(format!("{:.2}", f.idle_bytes_mean / 1000.0));
    }
    println!(
        "stampede-sim --membership: idle KB/s per node at {} nodes: {} (goal <= {} KB/s, constant in N); {} ({:.1} s)",
        sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("/"),
        idle.join("/"),
        IDLE_GOAL / 1000.0,
        if ok { "ok" } else { "GOAL MISSED or no full view" },
        began.elapsed().as_secs_f64()
    );
    Ok(ok)
}

fn segments(args: &Args) -> Result<bool, String> {
    let began = Instant::now();
    let figures = measure(&SegmentsSetup {
        nodes: args.nodes,
        vus: 5_000_000,
        arrivals: 5_000_000,
        moves: args.moves,
    })?;
    let mut ok = true;
    for f in &figures {
        println!(
            "{}: {}{}",
            f.name,
            f.value,
            if f.ok { "" } else { "  <-- FAILED" }
        );
        ok &= f.ok;
    }
    println!(
        "stampede-sim --segments: {} figures for {} members, {} ({:.1} s)",
        figures.len(),
        args.nodes,
        if ok {
            "all within bounds"
        } else {
            "SOME FAILED"
        },
        began.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// The failover figures of one seed (default 1), one line each.
fn failover(args: &Args, setup: &Setup) -> Result<bool, String> {
    if !(1..=2_000).contains(&args.latency_ms) {
        return Err(format!(
            "--latency-ms {}: must be 1 to 2000",
            args.latency_ms
        ));
    }
    let seed = args.seed.unwrap_or(args.first_seed);
    let began = Instant::now();
    let f = stampede_tools::sim::failover::measure(setup, seed, args.latency_ms * 1000)?;
    let secs = |us: Option<u64>| match us {
        Some(us) => format!("{:.3} s", us as f64 / 1e6),
        None => "never".to_string(),
    };
    let n = f.nodes;
    let ms = args.latency_ms;
    if args.traffic {
        print_traffic(seed, &f.quiet);
    }
    println!(
        "failover seed {seed}: {n} nodes, {ms} ms links: trigger to first iteration {}",
        secs(f.first_iteration_us)
    );
    println!(
        "failover seed {seed}: {n} nodes, {ms} ms links: member n{} crashed: every live member ran without it after {} ({} of {} members took up the move)",
        f.node,
        secs(f.node_failover_us),
        f.members_swapped.0,
        f.members_swapped.1
    );
    println!(
        "failover seed {seed}: {n} nodes, {ms} ms links: aggregator n{} of group {} crashed: the group's next second reached the origin after {}",
        f.aggregator,
        f.group,
        secs(f.aggregator_failover_us)
    );
    println!(
        "failover seed {seed}: {n} nodes, {ms} ms links: the origin merged {} of {} member seconds measured, {} invariant violations ({:.1} s)",
        f.merged_at_origin,
        f.published,
        f.violations.len(),
        began.elapsed().as_secs_f64()
    );
    for v in &f.violations {
        println!(
            "VIOLATION failover seed {seed}: {}: {}",
            v.invariant, v.detail
        );
    }
    Ok(f.violations.is_empty()
        && f.node_failover_us.is_some()
        && f.aggregator_failover_us.is_some())
}

/// One line per figure of a schedule's control traffic, averaged over the time from
/// the trigger to the last node done (the run's whole life: joining, running,
/// finishing).
fn print_traffic(seed: u64, w: &stampede_tools::sim::World) {
    let end_us = w
        .nodes
        .iter()
        .filter_map(|n| n.done_at)
        .max()
        .unwrap_or(w.setup.plan.duration_us)
        .max(1);
    let secs = end_us as f64 / 1e6;
    let live: Vec<usize> = (0..w.nodes.len())
        .filter(|&i| !w.nodes[i].crashed)
        .collect();
    let per_node = |i: usize| {
        let t = w.traffic[i];
        (
            (t.bytes_in + t.bytes_out) as f64 / secs,
            (t.messages_in + t.messages_out) as f64 / secs,
        )
    };
    let n = live.len().max(1) as f64;
    let mean_bytes = live.iter().map(|&i| per_node(i).0).sum::<f64>() / n;
    let mean_msgs = live.iter().map(|&i| per_node(i).1).sum::<f64>() / n;
    let (busiest, busiest_bytes) = live
        .iter()
        .map(|&i| (i, per_node(i).0))
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let busiest_msgs = per_node(busiest).1;
    let witness = w
        .nodes
        .iter()
        .find_map(|n| n.machine.as_ref())
        .is_some_and(|m| m.witnesses().contains(&busiest));
    println!(
        "traffic seed {seed}: {} nodes, {:?}, {secs:.1} s from trigger to the last node done",
        w.nodes.len(),
        w.setup.aggregation
    );
    println!(
        "traffic seed {seed}: control bytes per node, in + out: mean {:.1} KB/s",
        mean_bytes / 1e3
    );
    println!(
        "traffic seed {seed}: control bytes at the busiest node (n{busiest}{}): {:.1} KB/s",
        if witness { ", a witness" } else { "" },
        busiest_bytes / 1e3
    );
    println!("traffic seed {seed}: control messages per node, in + out: mean {mean_msgs:.0}/s, busiest {busiest_msgs:.0}/s");
    let total: u64 = w.traffic_by_kind.values().sum();
    let kinds: Vec<String> = w
        .traffic_by_kind
        .iter()
        .map(|(k, b)| format!("{k} {:.0} %", *b as f64 * 100.0 / total.max(1) as f64))
        .collect();
    println!(
        "traffic seed {seed}: by kind (in + out, mesh-wide): {}",
        kinds.join(", ")
    );
    // What the live views held: (member, second) pairs merged as they came (from the
    // root's batches, or all-to-all snapshots at the reporters) against those fetched
    // one by one at the end.
    let published: u64 = w.nodes.iter().map(|n| n.published.len() as u64).sum();
    let live: Vec<u64> = live.iter().map(|&i| w.nodes[i].merged_live).collect();
    let least = live.iter().min().copied().unwrap_or(0);
    let fetched: u64 = w.nodes.iter().map(|n| n.merged_single).sum();
    println!(
        "traffic seed {seed}: live view: the emptiest node merged {least} of {published} member seconds as they came; {fetched} merged one by one (re-fetch or all-to-all)"
    );
    match w.first_start_at {
        Some(t) => println!(
            "traffic seed {seed}: trigger to first iteration: {:.3} s",
            t as f64 / 1e6
        ),
        None => println!("traffic seed {seed}: trigger to first iteration: never"),
    }
    // The CLI's wall: the trigger to the origin's report.
    if let (Some(first), Some(done)) = (w.first_start_at, w.nodes[0].done_at) {
        println!(
            "traffic seed {seed}: trigger to the origin's report: {:.3} s for a {:.0} s plan ({:.3} s after the plan's end)",
            done as f64 / 1e6,
            w.setup.plan.duration_us as f64 / 1e6,
            done.saturating_sub(first + w.setup.plan.duration_us) as f64 / 1e6
        );
    }
}
