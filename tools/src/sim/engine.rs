//! The simulated load engine of one node: a constant-arrival-rate schedule walked the
//! way the real engine walks it — an event is started only if this node owns it in
//! its current split and holds its lease; an event held up by a lapsed lease and then
//! more than [`LATE_LIMIT_US`] overdue is dropped, never started late in a burst.
//!
//! Must not know about the network or the protocol beyond the split and the lease.

use stampede_protocol::machine::version::Split;

/// How late an event may still start after the node had to wait (for its lease):
/// the start-boundary tolerance of "never more than planned".
pub const LATE_LIMIT_US: u64 = 100_000;

/// The plan every simulated run carries out.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rate: u64,
    pub duration_us: u64,
}

impl Plan {
    pub fn total(&self) -> u64 {
        self.rate * self.duration_us / 1_000_000
    }
    /// Run time (µs) of event k.
    pub fn at(&self, k: u64) -> u64 {
        k * 1_000_000 / self.rate
    }
    pub fn first_at_or_after(&self, t_us: u64) -> u64 {
        (t_us * self.rate).div_ceil(1_000_000).min(self.total())
    }
}

impl stampede_protocol::machine::RunSchedule for Plan {
    fn first_event_at(&self, t_us: u64) -> u64 {
        self.first_at_or_after(t_us)
    }
    fn duration_us(&self) -> u64 {
        self.duration_us
    }
}

#[derive(Debug, Default)]
pub struct Engine {
    pub running: bool,
    pub index: usize,
    pub split: Option<Split>,
    /// Start instant on this node's wall clock.
    pub start_local_wall: u64,
    pub lease: Option<u64>,
    pub stopped: bool,
    pub finished: bool,
    pub told_started: bool,
    /// Next global event to look at.
    pub next: u64,
    /// Seconds handed to the machine so far.
    pub seconds_out: u64,
    /// Events started, by this node's run-time second.
    pub per_second: Vec<u64>,
    pub dropped: u64,
}

/// What the engine did in one step.
#[derive(Debug, Default)]
pub struct Step {
    /// (event, local run time) started.
    pub started: Vec<(u64, u64)>,
    pub told_started: bool,
    pub seconds: Vec<u64>,
    pub finished: bool,
}

impl Engine {
    /// Runs the engine up to this node's local clocks.
    pub fn step(&mut self, plan: &Plan, local_wall: u64, local_mono: u64) -> Step {
        let mut out = Step::default();
        if !self.running || self.finished {
            return out;
        }
        let Some(split) = &self.split else { return out };
        if local_wall < self.start_local_wall {
            return out;
        }
        let run_t = local_wall - self.start_local_wall;
        if !self.told_started {
            self.told_started = true;
            out.told_started = true;
        }
        let lease_ok = self.lease.is_some_and(|l| l > local_mono) && !self.stopped;
        while self.next < plan.total() && plan.at(self.next) <= run_t {
            let k = self.next;
            if split.events.owner(k) != self.index {
                self.next += 1;
                continue;
            }
            if self.stopped {
                self.next += 1;
                continue;
            }
            if !lease_ok {
                // Hold: re-checked when the lease (or a new split) comes.
                break;
            }
            self.next += 1;
            if run_t - plan.at(k) > LATE_LIMIT_US {
                self.dropped += 1;
                continue;
            }
            let s = (run_t / 1_000_000) as usize;
            if self.per_second.len() <= s {
                self.per_second.resize(s + 1, 0);
            }
            self.per_second[s] += 1;
            out.started.push((k, run_t));
        }
        let end = run_t >= plan.duration_us || self.stopped;
        let complete = if end {
            (run_t / 1_000_000 + 1).min(plan.duration_us.div_ceil(1_000_000).max(1))
        } else {
            run_t / 1_000_000
        };
        while self.seconds_out < complete {
            out.seconds.push(self.seconds_out);
            self.seconds_out += 1;
        }
        if end {
            self.finished = true;
            out.finished = true;
        }
        out
    }

    pub fn count(&self, second: u64) -> u64 {
        self.per_second.get(second as usize).copied().unwrap_or(0)
    }
}
