//! stampede-noise: how much of a core this machine takes away from a thread that never
//! blocks. It spins on the monotonic clock for a while and counts every gap between two
//! readings longer than a threshold: time the thread did not run although it wanted to
//! (the hypervisor descheduling the vCPU, interrupts, other threads on the core).
//!
//! The benchmark harness runs it, pinned to the generator's core, beside the schedule
//! lag figures: a load generator on a core that loses milliseconds at a time shows them
//! as lag that no scheduling of its own can avoid. It measures; it decides nothing.

use std::time::{Duration, Instant};

use clap::Parser;
use stampede_tools::latency::parse_duration;

#[derive(Parser)]
#[command(about = "Spin on the clock and report the gaps in which this thread did not run")]
struct Args {
    /// How long to spin, e.g. "3s" or "500ms" (ns, us, ms, s or m).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// The least gap that counts, in microseconds (a clock read takes well under 1 µs).
    #[arg(long, default_value_t = 20)]
    threshold_us: u64,
}

/// Upper bounds (µs) of the gap classes reported; the last class is open-ended.
const CLASSES_US: [u64; 5] = [50, 100, 500, 1_000, 5_000];

fn main() {
    let args = Args::parse();
    let threshold = Duration::from_micros(args.threshold_us.max(1));
    let mut counts = [0u64; CLASSES_US.len() + 1];
    let (mut lost, mut longest) = (Duration::ZERO, Duration::ZERO);
    let start = Instant::now();
    let end = start + args.duration;
    let mut prev = start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let gap = now - prev;
        prev = now;
        if gap >= threshold {
            lost += gap;
            longest = longest.max(gap);
            let us = gap.as_micros() as u64;
            let class = CLASSES_US
                .iter()
                .position(|&hi| us < hi)
                .unwrap_or(CLASSES_US.len());
            counts[class] += 1;
        }
    }
    let wall = start.elapsed();
    let secs = wall.as_secs_f64();
    let mut classes = Vec::new();
    let mut lo = args.threshold_us;
    for (i, n) in counts.iter().enumerate() {
        let label = match CLASSES_US.get(i) {
            Some(hi) => format!("{}-{}us", lo, hi),
            None => format!(">={}us", lo),
        };
        classes.push(format!("{label} {:.1}/s", *n as f64 / secs));
        lo = CLASSES_US.get(i).copied().unwrap_or(lo);
    }
    println!(
        "lost {:.2}% of {:.1} s in gaps >= {} us, longest {:.2} ms; gaps: {}",
        100.0 * lost.as_secs_f64() / secs,
        secs,
        args.threshold_us,
        longest.as_secs_f64() * 1e3,
        classes.join(", ")
    );
}
