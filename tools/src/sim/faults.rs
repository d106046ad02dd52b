//! A seeded fault schedule: which faults one simulated run suffers, and when.
//!
//! Must not run anything: the world (`super::World`) applies it.

use rand::rngs::SmallRng;
use rand::Rng;

/// The kinds of fault a schedule may draw from (`--faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Loss,
    Duplicate,
    Delay,
    Partition,
    Crash,
    Pause,
    Clock,
    Hostile,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Loss,
        FaultKind::Duplicate,
        FaultKind::Delay,
        FaultKind::Partition,
        FaultKind::Crash,
        FaultKind::Pause,
        FaultKind::Clock,
        FaultKind::Hostile,
    ];

    pub fn parse(s: &str) -> Result<FaultKind, String> {
        Ok(match s {
            "loss" => FaultKind::Loss,
            "dup" | "duplicate" => FaultKind::Duplicate,
            "delay" | "reorder" => FaultKind::Delay,
            "partition" => FaultKind::Partition,
            "crash" => FaultKind::Crash,
            "pause" => FaultKind::Pause,
            "clock" => FaultKind::Clock,
            "hostile" => FaultKind::Hostile,
            other => {
                return Err(format!(
                    "unknown fault `{other}` (known: loss, dup, delay, partition, crash, pause, clock, hostile)"
                ))
            }
        })
    }
}

/// One node's trouble at one time (virtual µs).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Killed -9: never heard from again.
    Crash { node: usize, at: u64 },
    /// SIGSTOP at `at`, SIGCONT at `until`.
    Pause { node: usize, at: u64, until: u64 },
    /// `side` can talk only among itself from `at` to `until`.
    Partition {
        side: Vec<usize>,
        at: u64,
        until: u64,
    },
}

impl Fault {
    pub fn start(&self) -> u64 {
        match self {
            Fault::Crash { at, .. } | Fault::Pause { at, .. } | Fault::Partition { at, .. } => *at,
        }
    }
}

/// Everything that goes wrong in one simulated run.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub loss: f64,
    pub duplicate: f64,
    /// Message delay: uniform in [min, max] µs, and now and then a spike.
    pub delay_min: u64,
    pub delay_max: u64,
    pub spike: f64,
    pub spike_us: u64,
    /// Wall clock offsets per node (µs) and whether the sync measures them exactly.
    pub wall_offsets: Vec<i64>,
    pub offset_error_us: i64,
    pub faults: Vec<Fault>,
    /// A member that forges leader messages.
    pub hostile: Option<usize>,
}

impl Schedule {
    /// No faults: no loss, duplicates or spikes, links of 0.2–2 ms, true clocks.
    pub fn quiet(nodes: usize) -> Schedule {
        Schedule {
            loss: 0.0,
            duplicate: 0.0,
            delay_min: 200,
            delay_max: 2_000,
            spike: 0.0,
            spike_us: 0,
            wall_offsets: vec![0; nodes],
            offset_error_us: 0,
            faults: Vec::new(),
            hostile: None,
        }
    }

    /// Draws a schedule for `nodes` nodes from the allowed kinds, with faults between
    /// `from` and `until` (µs of virtual time). Crashes, pauses and partitions never
    /// take down a majority of the roster at once; with more members than witnesses
    /// they may still take most of the witnesses (`check::witness_majority_down`),
    /// and the run is then expected to stay safe, not to go on.
    pub fn draw(
        rng: &mut SmallRng,
        nodes: usize,
        kinds: &[FaultKind],
        from: u64,
        until: u64,
    ) -> Schedule {
        let has = |k| kinds.contains(&k);
        let mut s = Schedule::quiet(nodes);
        if has(FaultKind::Loss) && rng.random_bool(0.6) {
            s.loss = rng.random_range(0.0..0.03);
        }
        if has(FaultKind::Duplicate) && rng.random_bool(0.5) {
            s.duplicate = rng.random_range(0.0..0.03);
        }
        if has(FaultKind::Delay) && rng.random_bool(0.7) {
            s.delay_min = rng.random_range(100..5_000);
            s.delay_max = s.delay_min + rng.random_range(0..40_000);
            if rng.random_bool(0.3) {
                s.spike = rng.random_range(0.0..0.01);
                s.spike_us = rng.random_range(50_000..400_000);
            }
        }
        if has(FaultKind::Clock) {
            for o in s.wall_offsets.iter_mut().skip(1) {
                *o = rng.random_range(-2_000_000..2_000_000);
            }
            s.offset_error_us = rng.random_range(0..300);
        }
        // Nodes that may be hit, at most a minority in total, the origin included.
        let minority = (nodes - 1) / 2;
        let mut hit: Vec<usize> = Vec::new();
        let pick = |rng: &mut SmallRng, hit: &mut Vec<usize>| -> Option<usize> {
            if hit.len() >= minority {
                return None;
            }
            for _ in 0..16 {
                let n = rng.random_range(0..nodes);
                if !hit.contains(&n) {
                    hit.push(n);
                    return Some(n);
                }
            }
            None
        };
        let span = until.saturating_sub(from).max(1);
        if has(FaultKind::Crash) && rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..=2) {
                if let Some(node) = pick(rng, &mut hit) {
                    s.faults.push(Fault::Crash {
                        node,
                        at: from + rng.random_range(0..span),
                    });
                }
            }
        }
        if has(FaultKind::Pause) && rng.random_bool(0.5) {
            if let Some(node) = pick(rng, &mut hit) {
                let at = from + rng.random_range(0..span);
                // Short pauses (under the failure timeout) and long ones (over it).
                let len = if rng.random_bool(0.5) {
                    rng.random_range(100_000..1_800_000)
                } else {
                    rng.random_range(2_500_000..20_000_000)
                };
                s.faults.push(Fault::Pause {
                    node,
                    at,
                    until: at + len,
                });
            }
        }
        if has(FaultKind::Partition) && rng.random_bool(0.5) {
            let mut side = Vec::new();
            for _ in 0..rng.random_range(1..=minority.max(1)) {
                if let Some(n) = pick(rng, &mut hit) {
                    side.push(n);
                }
            }
            if !side.is_empty() {
                let at = from + rng.random_range(0..span);
                let len = rng.random_range(1_000_000..15_000_000);
                s.faults.push(Fault::Partition {
                    side,
                    at,
                    until: at + len,
                });
            }
        }
        if has(FaultKind::Hostile) && rng.random_bool(0.5) && nodes > 2 {
            // Not the origin: the origin's word on the roster is law by design.
            s.hostile = Some(rng.random_range(1..nodes));
        }
        s
    }
}
