//! The simulated load engine of one node: a constant-arrival-rate schedule walked the
//! way the real engine walks it — an event is started only if this node owns it in
//! its current split and holds its lease; an event held up by a lapsed lease and then
//! more than [`LATE_LIMIT_US`] overdue is dropped, never started late in a burst.
//! Beside it, two counted scenarios as the real engine runs them: a shared pool
//! (shared-iterations) and per-VU iterations, every iteration claimed within the
//! claims the protocol confirmed.
//!
//! Must not know about the network or the protocol beyond the split and the lease.

use stampede_protocol::machine::version::{Counted, Split};

/// How late an event may still start after the node had to wait (for its lease):
/// the start-boundary tolerance of "never more than planned".
pub const LATE_LIMIT_US: u64 = 100_000;

/// The plan every simulated run carries out.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rate: u64,
    pub duration_us: u64,
    /// VUs of each counted scenario (0: no counted scenarios).
    pub vus: u64,
    /// Slots of the shared pool, and iterations of each VU of the per-VU scenario.
    pub pool: u64,
    pub rounds: u64,
    /// How long one counted iteration takes.
    pub iter_us: u64,
}

/// Claims index of the pool and of the per-VU scenario.
pub const POOL: usize = 0;
pub const PER_VU: usize = 1;

impl Plan {
    pub fn counted(&self) -> Vec<Counted> {
        if self.vus == 0 {
            return Vec::new();
        }
        vec![
            Counted::Pool {
                iterations: self.pool,
            },
            Counted::PerVu {
                iterations: self.rounds,
            },
        ]
    }

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
    fn counted(&self) -> Vec<Counted> {
        Plan::counted(self)
    }
}

/// One counted VU here: busy until, and (per-VU) its next iteration.
#[derive(Debug, Clone, Copy)]
struct CountedVu {
    busy_until: u64,
    next: u64,
}

#[derive(Debug, Default)]
pub struct Engine {
    pub running: bool,
    pub index: usize,
    /// Set with `set_split`, which forgets what was worked out from the old one.
    /// Shared, so that a step lends it without moving it.
    split: Option<std::sync::Arc<Split>>,
    /// The first event at or after `next` that this node owns in `split` (the plan's
    /// total if none), once looked up: walking every event of the mesh on every node
    /// asks `owner` N times per event, most of a large simulation's engine cost.
    own_next: Option<u64>,
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
    /// Confirmed claims (Effect::Claims), and what this node claimed.
    pub allowed: Vec<u64>,
    pub claimed: [u64; 2],
    pool_vus: std::collections::BTreeMap<u64, CountedVu>,
    moves_seen: Vec<(usize, u64)>,
    mine: Option<Vec<u64>>,
    per_vu: std::collections::BTreeMap<u64, CountedVu>,
}

/// What the engine did in one step.
#[derive(Debug, Default)]
pub struct Step {
    /// (event, local run time) started.
    pub started: Vec<(u64, u64)>,
    /// Pool slots started, as (base member, rank); per-VU iterations as (VU, i).
    pub pool: Vec<(usize, u64)>,
    pub per_vu: Vec<(u64, u64)>,
    pub told_started: bool,
    pub seconds: Vec<u64>,
    pub finished: bool,
}

impl Engine {
    /// The split to run from now on (the first, or one after a version switch).
    pub fn set_split(&mut self, split: Split) {
        self.split = Some(std::sync::Arc::new(split));
        self.own_next = None;
    }

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
        let total = plan.total();
        while self.next < total && plan.at(self.next) <= run_t {
            let k = match self.own_next.filter(|&k| k >= self.next) {
                Some(k) => k,
                None => {
                    let k = (split.events.owned_from(self.index, self.next).next())
                        .map_or(total, |k| k.min(total));
                    self.own_next = Some(k);
                    k
                }
            };
            if k >= total || plan.at(k) > run_t {
                // The events due before it are others': passed, as one by one.
                self.next = k.min(plan.first_at_or_after(run_t + 1));
                break;
            }
            self.next = k;
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
        if lease_ok && plan.vus > 0 {
            if let Some(split) = self.split.clone() {
                self.counted(plan, &split, run_t, &mut out);
            }
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

    /// Starts every counted iteration due: a free VU claims a pool slot (or its next
    /// iteration) within the confirmed claims.
    fn counted(&mut self, plan: &Plan, split: &Split, run_t: u64, out: &mut Step) {
        let allowed = |c: usize| self.allowed.get(c).copied().unwrap_or(0);
        let (a_pool, a_vu) = (allowed(POOL), allowed(PER_VU));
        let (Some(pool), Some(rounds)) = (split.counted.get(POOL), split.counted.get(PER_VU))
        else {
            return;
        };
        let size = pool.size(self.index);
        // Which VUs are here changes only with the split's moves: listing them is
        // the costly part of a step, so it is redone only then.
        // (Compared in place, and the list taken out and put back, not copied: this
        // runs every 5 ms on every node.)
        let moves = (split.vus.reassignments().iter()).map(|r| (r.lost, r.from_index));
        let fresh = self.mine.is_none() || !moves.clone().eq(self.moves_seen.iter().copied());
        if fresh {
            self.moves_seen = moves.collect();
            self.mine = Some(
                (split.vus.owned_from(self.index, 0))
                    .take_while(|&g| g < plan.vus)
                    .collect(),
            );
        }
        let mine = self.mine.take().unwrap_or_default();
        for &g in &mine {
            let v = self.pool_vus.entry(g).or_insert(CountedVu {
                busy_until: 0,
                next: 0,
            });
            if v.busy_until <= run_t && self.claimed[POOL] < size.min(a_pool) {
                out.pool.extend(pool.slot(self.index, self.claimed[POOL]));
                self.claimed[POOL] += 1;
                v.busy_until = run_t + plan.iter_us;
            }
            let known = self.per_vu.contains_key(&g);
            let v = self.per_vu.entry(g).or_insert(CountedVu {
                busy_until: 0,
                next: 0,
            });
            if fresh || !known {
                v.next = v.next.max(rounds.first_iteration(&split.vus, g));
            }
            if v.busy_until <= run_t && v.next < plan.rounds && v.next < a_vu {
                out.per_vu.push((g, v.next));
                self.claimed[PER_VU] = self.claimed[PER_VU].max(v.next + 1);
                v.next += 1;
                v.busy_until = run_t + plan.iter_us;
            }
        }
        self.mine = Some(mine);
    }

    /// The claims to ask for: what is claimed plus a second's worth.
    pub fn wanted(&self, plan: &Plan) -> Vec<u64> {
        if plan.vus == 0 {
            return Vec::new();
        }
        let per_s = 1_000_000 / plan.iter_us.max(1);
        let mine = self
            .split
            .as_ref()
            .map_or(1, |s| s.vus.scale(self.index, plan.vus).max(1));
        vec![
            self.claimed[POOL] + per_s * mine,
            self.claimed[PER_VU] + per_s,
        ]
    }

    pub fn count(&self, second: u64) -> u64 {
        self.per_second.get(second as usize).copied().unwrap_or(0)
    }
}
