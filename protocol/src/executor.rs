//! Executors: the validated load shape of one scenario and its global schedule.
//!
//! Owns the executor config (as plans and the wire carry it), its validation, the global
//! VU curve of the closed-model executors, the global arrival schedule of the open-model
//! executors, and each node's share of them through an `Assignment`. Pure math on
//! nanoseconds: no clock, no tokio, no I/O. The engine asks "how many VUs at t", "when
//! does that change next" and "when does event k fire", then sleeps until then.
//!
//! How a node's share is derived (as k6 does it):
//! - ramping-vus / constant-vus: VU global index g runs on the node that owns g, while
//!   g < the global VU count; node VUs at t = `scale(node, vus_at(t))`.
//! - arrival-rate: event k of the *global* schedule fires at its global time t_k; a node
//!   fires only the events it owns. `max_vus` / `pre_allocated_vus` are scaled.
//! - per-vu-iterations: VUs are scaled, each VU still does `iterations`.
//! - shared-iterations: VUs and the iteration pool are both scaled.
//!
//! Rates are quantised to 0.001 iterations per second (rate·1000 rounded) so that the
//! area under the rate curve is an exact integer and the choice of which piece of the
//! curve an event falls in never depends on float rounding; only the position inside a
//! ramp is solved in f64 (to the nanosecond). Event k fires at t_k = inf{t : A(t) > k}
//! where A is the area under the rate curve, so event 0 fires at 0 for a non-zero start
//! rate, constant rate r gives exactly t_k = k/r (to the ns, rounded down), no event ever
//! fires inside a stretch of rate 0, and there are ⌈A(end)⌉ events in all.

use crate::duration::{check_plan_duration, human, MAX_PLAN_DURATION};
use crate::segment::Assignment;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Highest rate accepted, in iterations per second.
pub const MAX_RATE: f64 = 1e9;

/// Most VUs one scenario may use (`vus`, `max_vus`, `start_vus`, ramping-vus stage
/// targets): each is a task with its own connections and state on some node, and
/// the engine keeps per-VU bookkeeping for the whole range.
pub const MAX_VUS: u64 = 1_000_000;

/// Most iterations an iteration executor may ask for (`iterations`).
pub const MAX_ITERATIONS: u64 = 1_000_000_000_000;

/// Most stages of a ramp.
pub const MAX_STAGES: usize = 10_000;

/// `max_duration` of the iteration executors when the plan gives none (k6's default).
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(600);

/// One stage of a ramp: reach `target` (VUs, or iterations per second) linearly over
/// `duration`. A zero duration is an instant jump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub target: u64,
    #[serde(with = "human")]
    pub duration: Duration,
}

/// A scenario's executor, tagged by `executor = "…"` as in the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "executor", rename_all = "kebab-case")]
pub enum Executor {
    ConstantVus {
        vus: u64,
        #[serde(with = "human")]
        duration: Duration,
    },
    RampingVus {
        #[serde(default)]
        start_vus: u64,
        stages: Vec<Stage>,
    },
    ConstantArrivalRate {
        /// Iterations per second.
        rate: f64,
        #[serde(with = "human")]
        duration: Duration,
        max_vus: u64,
        /// VUs to create up front; 0 lets the engine choose.
        #[serde(default)]
        pre_allocated_vus: u64,
    },
    RampingArrivalRate {
        /// Iterations per second at the start.
        #[serde(default)]
        start_rate: f64,
        /// Targets are iterations per second.
        stages: Vec<Stage>,
        max_vus: u64,
        #[serde(default)]
        pre_allocated_vus: u64,
    },
    PerVuIterations {
        #[serde(default = "one")]
        vus: u64,
        iterations: u64,
        #[serde(with = "human", default = "default_max_duration")]
        max_duration: Duration,
    },
    SharedIterations {
        #[serde(default = "one")]
        vus: u64,
        iterations: u64,
        #[serde(with = "human", default = "default_max_duration")]
        max_duration: Duration,
    },
}

fn one() -> u64 {
    1
}

fn default_max_duration() -> Duration {
    DEFAULT_MAX_DURATION
}

/// A refused executor config, naming the executor and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{executor} executor: `{field}` {reason}")]
pub struct ExecutorError {
    pub executor: &'static str,
    pub field: String,
    pub reason: String,
}

fn refuse(
    executor: &'static str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> ExecutorError {
    ExecutorError {
        executor,
        field: field.into(),
        reason: reason.into(),
    }
}

/// Nanoseconds, saturating at u64::MAX (about 584 years) so unvalidated input cannot
/// panic.
fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Executor {
    /// The plan's name for this executor.
    pub fn kind(&self) -> &'static str {
        match self {
            Executor::ConstantVus { .. } => "constant-vus",
            Executor::RampingVus { .. } => "ramping-vus",
            Executor::ConstantArrivalRate { .. } => "constant-arrival-rate",
            Executor::RampingArrivalRate { .. } => "ramping-arrival-rate",
            Executor::PerVuIterations { .. } => "per-vu-iterations",
            Executor::SharedIterations { .. } => "shared-iterations",
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ExecutorError> {
        let kind = self.kind();
        let positive = |field: &str, v: u64| {
            if v == 0 {
                Err(refuse(kind, field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        let at_most = |field: &str, v: u64, max: u64| {
            if v > max {
                Err(refuse(kind, field, format!("({v}) must be at most {max}")))
            } else {
                Ok(())
            }
        };
        let nonzero_duration = |field: &str, d: Duration| {
            if d.is_zero() {
                Err(refuse(kind, field, "must be longer than 0s"))
            } else {
                check_plan_duration(d)
                    .map(|_| ())
                    .map_err(|m| refuse(kind, field, m))
            }
        };
        let vu_pool = |max_vus: u64, pre: u64| {
            positive("max_vus", max_vus)?;
            at_most("max_vus", max_vus, MAX_VUS)?;
            if pre > max_vus {
                return Err(refuse(
                    kind,
                    "pre_allocated_vus",
                    format!("({pre}) must not exceed max_vus ({max_vus})"),
                ));
            }
            Ok(())
        };
        match self {
            Executor::ConstantVus { vus, duration } => {
                positive("vus", *vus)?;
                at_most("vus", *vus, MAX_VUS)?;
                nonzero_duration("duration", *duration)
            }
            Executor::RampingVus { start_vus, stages } => {
                at_most("start_vus", *start_vus, MAX_VUS)?;
                for (i, s) in stages.iter().enumerate() {
                    at_most(&format!("stages[{i}].target"), s.target, MAX_VUS)?;
                }
                stages_total(kind, stages).map(|_| ())
            }
            Executor::ConstantArrivalRate {
                rate,
                duration,
                max_vus,
                pre_allocated_vus,
            } => {
                if milli_rate(kind, "rate", *rate)? == 0 {
                    return Err(refuse(kind, "rate", "must be at least 0.001 per second"));
                }
                nonzero_duration("duration", *duration)?;
                vu_pool(*max_vus, *pre_allocated_vus)
            }
            Executor::RampingArrivalRate {
                start_rate,
                stages,
                max_vus,
                pre_allocated_vus,
            } => {
                milli_rate(kind, "start_rate", *start_rate)?;
                for (i, s) in stages.iter().enumerate() {
                    milli_rate(kind, format!("stages[{i}].target"), s.target as f64)?;
                }
                stages_total(kind, stages)?;
                vu_pool(*max_vus, *pre_allocated_vus)
            }
            Executor::PerVuIterations {
                vus,
                iterations,
                max_duration,
            }
            | Executor::SharedIterations {
                vus,
                iterations,
                max_duration,
            } => {
                positive("vus", *vus)?;
                at_most("vus", *vus, MAX_VUS)?;
                positive("iterations", *iterations)?;
                at_most("iterations", *iterations, MAX_ITERATIONS)?;
                nonzero_duration("max_duration", *max_duration)
            }
        }
    }

    /// How long the executor runs (for the iteration executors: at most `max_duration`).
    pub fn total_duration(&self) -> Duration {
        match self {
            Executor::ConstantVus { duration, .. }
            | Executor::ConstantArrivalRate { duration, .. } => *duration,
            Executor::RampingVus { stages, .. } | Executor::RampingArrivalRate { stages, .. } => {
                Duration::from_nanos(
                    stages
                        .iter()
                        .fold(0u64, |acc, s| acc.saturating_add(ns(s.duration))),
                )
            }
            Executor::PerVuIterations { max_duration, .. }
            | Executor::SharedIterations { max_duration, .. } => *max_duration,
        }
    }

    /// Global VU slots the executor may need at once.
    pub fn max_vus(&self) -> u64 {
        match self {
            Executor::ConstantVus { vus, .. }
            | Executor::PerVuIterations { vus, .. }
            | Executor::SharedIterations { vus, .. } => *vus,
            Executor::RampingVus { start_vus, stages } => {
                stages.iter().map(|s| s.target).fold(*start_vus, u64::max)
            }
            Executor::ConstantArrivalRate { max_vus, .. }
            | Executor::RampingArrivalRate { max_vus, .. } => *max_vus,
        }
    }

    /// Global VUs to create before the start: `pre_allocated_vus` for the arrival-rate
    /// executors (`max_vus` when 0), `max_vus()` otherwise.
    pub fn pre_allocated_vus(&self) -> u64 {
        match self {
            Executor::ConstantArrivalRate {
                pre_allocated_vus,
                max_vus,
                ..
            }
            | Executor::RampingArrivalRate {
                pre_allocated_vus,
                max_vus,
                ..
            } if *pre_allocated_vus > 0 => (*pre_allocated_vus).min(*max_vus),
            _ => self.max_vus(),
        }
    }

    /// Node's share of `max_vus()`.
    pub fn node_max_vus(&self, assignment: &Assignment, node: usize) -> u64 {
        assignment.scale(node, self.max_vus())
    }

    /// Node's share of `pre_allocated_vus()`.
    pub fn node_pre_allocated_vus(&self, assignment: &Assignment, node: usize) -> u64 {
        assignment.scale(node, self.pre_allocated_vus())
    }

    /// Global VU count at time `t` of the closed-model executors (None for the others).
    ///
    /// Ramping-vus interpolates linearly inside a stage and the count changes to n at
    /// the moment the line reaches n (rounding toward the stage's start value, as k6
    /// does). From the end on, the last target.
    pub fn vus_at(&self, t: Duration) -> Option<u64> {
        match self {
            Executor::ConstantVus { vus, .. } => Some(*vus),
            Executor::RampingVus { start_vus, stages } => {
                Some(ramp_value_at(*start_vus, stages, ns(t)))
            }
            _ => None,
        }
    }

    /// The first time after `after` (strictly) and before the end at which the global VU
    /// count changes, with the new count. None if it never changes again (or for
    /// executors without a VU curve).
    pub fn next_vu_change(&self, after: Duration) -> Option<(Duration, u64)> {
        match self {
            Executor::RampingVus { start_vus, stages } => {
                ramp_next_change(*start_vus, stages, ns(after))
                    .map(|(t, v)| (Duration::from_nanos(t), v))
            }
            _ => None,
        }
    }

    /// Node's VU count at `t`: the VU indices below `vus_at(t)` that the node owns.
    pub fn node_vus_at(&self, assignment: &Assignment, node: usize, t: Duration) -> Option<u64> {
        self.vus_at(t).map(|v| assignment.scale(node, v))
    }

    /// Like `next_vu_change`, for one node's count: skips global changes that do not
    /// touch the node's indices.
    pub fn next_node_vu_change(
        &self,
        assignment: &Assignment,
        node: usize,
        after: Duration,
    ) -> Option<(Duration, u64)> {
        let current = self.node_vus_at(assignment, node, after)?;
        let mut cursor = after;
        loop {
            let (t, global) = self.next_vu_change(cursor)?;
            let mine = assignment.scale(node, global);
            if mine != current {
                return Some((t, mine));
            }
            cursor = t;
        }
    }

    /// Iterations the node performs in all, for the iteration executors (None for the
    /// others): per-vu-iterations → the node's VUs × `iterations`; shared-iterations →
    /// the node's share of the pool. Pass the assignment of the matching index space
    /// (VU indices, or iteration indices for the shared pool).
    pub fn node_iterations(&self, assignment: &Assignment, node: usize) -> Option<u64> {
        match self {
            Executor::PerVuIterations {
                vus, iterations, ..
            } => Some(assignment.scale(node, *vus).saturating_mul(*iterations)),
            Executor::SharedIterations { iterations, .. } => {
                Some(assignment.scale(node, *iterations))
            }
            _ => None,
        }
    }

    /// The global arrival schedule of the open-model executors (Ok(None) for the others).
    pub fn arrival_schedule(&self) -> Result<Option<ArrivalSchedule>, ExecutorError> {
        match self {
            Executor::ConstantArrivalRate { rate, duration, .. } => {
                self.validate()?;
                ArrivalSchedule::constant(*rate, *duration).map(Some)
            }
            Executor::RampingArrivalRate {
                start_rate, stages, ..
            } => {
                self.validate()?;
                ArrivalSchedule::ramping(*start_rate, stages).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// When global event `k` fires (None past the end, for an invalid config, or for
    /// executors without arrivals). Builds the schedule on every call: an engine should
    /// keep an `ArrivalSchedule` instead.
    pub fn arrival_time(&self, k: u64) -> Option<Duration> {
        self.arrival_schedule().ok()??.arrival_time(k)
    }

    /// Number of events of the global arrival schedule (see `arrival_time`).
    pub fn total_arrivals(&self) -> Option<u64> {
        Some(self.arrival_schedule().ok()??.total_arrivals())
    }
}

/// Sum of the stage durations; refuses no stages, too many, a zero total and a total
/// over [`MAX_PLAN_DURATION`].
fn stages_total(kind: &'static str, stages: &[Stage]) -> Result<u64, ExecutorError> {
    if stages.is_empty() {
        return Err(refuse(kind, "stages", "needs at least one stage"));
    }
    if stages.len() > MAX_STAGES {
        return Err(refuse(
            kind,
            "stages",
            format!("has {} stages, limit {MAX_STAGES}", stages.len()),
        ));
    }
    let max = ns(MAX_PLAN_DURATION);
    let mut total: u64 = 0;
    for (i, s) in stages.iter().enumerate() {
        total = u64::try_from(s.duration.as_nanos())
            .ok()
            .and_then(|d| total.checked_add(d))
            .filter(|t| *t <= max)
            .ok_or_else(|| {
                refuse(
                    kind,
                    format!("stages[{i}].duration"),
                    format!(
                        "makes the stages longer than the limit of {}",
                        crate::duration::format_duration(MAX_PLAN_DURATION)
                    ),
                )
            })?;
    }
    if total == 0 {
        return Err(refuse(
            kind,
            "stages",
            "last 0s in total; give at least one stage a duration",
        ));
    }
    Ok(total)
}

/// Value of a line from `a` to `b` over `d` ns at `tau` ns (0 ≤ tau ≤ d, d > 0),
/// rounded toward `a`.
fn interp(a: u64, b: u64, tau: u64, d: u64) -> u64 {
    let step = (u128::from(a.abs_diff(b)) * u128::from(tau) / u128::from(d)) as u64;
    if b >= a {
        a + step
    } else {
        a - step
    }
}

fn ramp_value_at(start: u64, stages: &[Stage], t: u64) -> u64 {
    let mut s: u64 = 0;
    let mut a = start;
    for stage in stages {
        let e = s.saturating_add(ns(stage.duration));
        if t < e {
            return interp(a, stage.target, t - s, e - s);
        }
        a = stage.target;
        s = e;
    }
    a
}

fn ramp_next_change(start: u64, stages: &[Stage], after: u64) -> Option<(u64, u64)> {
    let current = ramp_value_at(start, stages, after);
    let mut s: u64 = 0;
    let mut a = start;
    for stage in stages {
        let b = stage.target;
        let e = s.saturating_add(ns(stage.duration));
        let d = e - s;
        if d > 0 && e > after {
            if s > after && a != current {
                return Some((s, a));
            }
            if a != b {
                // First tau past `after` where the rounded line leaves its value there.
                let diff = u128::from(a.abs_diff(b));
                let at = u128::from(after.saturating_sub(s));
                let steps_done = diff * at / u128::from(d);
                let tau = ((steps_done + 1) * u128::from(d)).div_ceil(diff);
                if tau < u128::from(d) {
                    let tau = tau as u64;
                    return Some((s + tau, interp(a, b, tau, d)));
                }
            }
        }
        a = b;
        s = e;
    }
    None
}

/// Rate in thousandths of an iteration per second.
fn milli_rate(
    kind: &'static str,
    field: impl Into<String>,
    rate: f64,
) -> Result<u64, ExecutorError> {
    if !rate.is_finite() || rate < 0.0 {
        return Err(refuse(
            kind,
            field,
            format!("({rate}) must be a number ≥ 0"),
        ));
    }
    if rate > MAX_RATE {
        return Err(refuse(
            kind,
            field,
            format!("({rate}) exceeds the limit of {MAX_RATE} per second"),
        ));
    }
    Ok((rate * 1000.0).round() as u64)
}

/// Units of area under the rate curve per iteration: rates are in 1/1000 per second and
/// times in ns, and a trapezoid's doubled area keeps everything integral.
const UNITS_PER_ITERATION: u128 = 2 * 1_000 * 1_000_000_000;

/// One linear piece of the rate curve, with positive duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    start_ns: u64,
    dur_ns: u64,
    from_milli: u64,
    to_milli: u64,
    /// Area (in units) before this piece.
    units_before: u128,
    /// Area (in units) of this piece.
    units: u128,
}

/// The global arrival schedule: when each event number fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrivalSchedule {
    pieces: Vec<Piece>,
    total_units: u128,
    end_ns: u64,
}

impl ArrivalSchedule {
    /// `rate` iterations per second for `duration`.
    pub fn constant(rate: f64, duration: Duration) -> Result<ArrivalSchedule, ExecutorError> {
        let kind = "constant-arrival-rate";
        let m = milli_rate(kind, "rate", rate)?;
        ArrivalSchedule::build(kind, m, &[(m, duration)])
    }

    /// From `start_rate`, linearly to each stage's target (per second) over its duration.
    pub fn ramping(start_rate: f64, stages: &[Stage]) -> Result<ArrivalSchedule, ExecutorError> {
        let kind = "ramping-arrival-rate";
        let start = milli_rate(kind, "start_rate", start_rate)?;
        let mut targets = Vec::with_capacity(stages.len());
        for (i, s) in stages.iter().enumerate() {
            let m = milli_rate(kind, format!("stages[{i}].target"), s.target as f64)?;
            targets.push((m, s.duration));
        }
        ArrivalSchedule::build(kind, start, &targets)
    }

    fn build(
        kind: &'static str,
        start_milli: u64,
        targets: &[(u64, Duration)],
    ) -> Result<ArrivalSchedule, ExecutorError> {
        let mut pieces = Vec::with_capacity(targets.len());
        let mut from = start_milli;
        let mut start_ns: u64 = 0;
        let mut units_before: u128 = 0;
        for (i, &(to, duration)) in targets.iter().enumerate() {
            let too_long = || {
                refuse(
                    kind,
                    format!("stages[{i}].duration"),
                    "makes the run too long",
                )
            };
            let dur_ns = u64::try_from(duration.as_nanos()).map_err(|_| too_long())?;
            if dur_ns > 0 {
                let units = u128::from(from + to) * u128::from(dur_ns);
                pieces.push(Piece {
                    start_ns,
                    dur_ns,
                    from_milli: from,
                    to_milli: to,
                    units_before,
                    units,
                });
                units_before += units;
                start_ns = start_ns.checked_add(dur_ns).ok_or_else(too_long)?;
            }
            from = to;
        }
        Ok(ArrivalSchedule {
            pieces,
            total_units: units_before,
            end_ns: start_ns,
        })
    }

    /// Length of the schedule.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns)
    }

    /// Number of events: ⌈area under the rate curve⌉.
    pub fn total_arrivals(&self) -> u64 {
        u64::try_from(self.total_units.div_ceil(UNITS_PER_ITERATION)).unwrap_or(u64::MAX)
    }

    /// Node's number of events.
    pub fn node_arrivals(&self, assignment: &Assignment, node: usize) -> u64 {
        assignment.scale(node, self.total_arrivals())
    }

    /// Iterations per second at `t` (0 outside the schedule).
    pub fn rate_at(&self, t: Duration) -> f64 {
        let t = ns(t);
        let i = self.pieces.partition_point(|p| p.start_ns + p.dur_ns <= t);
        match self.pieces.get(i) {
            Some(p) if t >= p.start_ns => {
                let (f, g) = (p.from_milli as f64, p.to_milli as f64);
                (f + (g - f) * (t - p.start_ns) as f64 / p.dur_ns as f64) / 1000.0
            }
            _ => 0.0,
        }
    }

    /// When global event `k` (from 0) fires, relative to the scenario start; None past
    /// the end. Non-decreasing in k and always before `duration()`.
    pub fn arrival_time(&self, k: u64) -> Option<Duration> {
        let u = u128::from(k) * UNITS_PER_ITERATION;
        if u >= self.total_units {
            return None;
        }
        let i = self
            .pieces
            .partition_point(|p| p.units_before + p.units <= u);
        let p = self.pieces.get(i)?;
        let a = u - p.units_before;
        let tau = if a == 0 {
            0
        } else if p.from_milli == p.to_milli {
            // Area grows by 2·rate units per ns: exact, rounded down.
            u64::try_from(a / (2 * u128::from(p.from_milli))).unwrap_or(u64::MAX)
        } else {
            // Solve f·τ + (g−f)·τ²/(2D) = a in the form without cancellation:
            // τ = 2a / (f + √(f² + 2a(g−f)/D)).
            let f = p.from_milli as f64 / 1000.0;
            let g = p.to_milli as f64 / 1000.0;
            let d = p.dur_ns as f64 / 1e9;
            let area = a as f64 / UNITS_PER_ITERATION as f64;
            let disc = (f * f + 2.0 * area * (g - f) / d).max(0.0);
            let tau_s = 2.0 * area / (f + disc.sqrt());
            if tau_s.is_finite() {
                (tau_s * 1e9).round() as u64
            } else {
                p.dur_ns
            }
        };
        Some(Duration::from_nanos(p.start_ns + tau.min(p.dur_ns - 1)))
    }

    /// The events `node` owns, from event number `from_k` on, as (k, t_k), in order.
    pub fn arrivals_owned_by<'a>(
        &'a self,
        assignment: &'a Assignment,
        node: usize,
        from_k: u64,
    ) -> impl Iterator<Item = (u64, Duration)> + 'a {
        assignment
            .owned_from(node, from_k)
            .map_while(move |k| self.arrival_time(k).map(|t| (k, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{Reassignment, Striping};
    use proptest::prelude::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn stage(target: u64, ms: u64) -> Stage {
        Stage {
            target,
            duration: Duration::from_millis(ms),
        }
    }

    fn rar(start_rate: f64, stages: Vec<Stage>) -> ArrivalSchedule {
        let e = Executor::RampingArrivalRate {
            start_rate,
            stages,
            max_vus: 10,
            pre_allocated_vus: 0,
        };
        e.arrival_schedule().unwrap().unwrap()
    }

    fn all_times(s: &ArrivalSchedule) -> Vec<Duration> {
        (0..s.total_arrivals())
            .map(|k| s.arrival_time(k).unwrap())
            .collect()
    }

    #[test]
    fn ramp_from_zero_to_100_per_second_over_10s_has_500_events() {
        let s = rar(0.0, vec![stage(100, 10_000)]);
        assert_eq!(s.total_arrivals(), 500);
        assert_eq!(s.arrival_time(500), None);
        let times = all_times(&s);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(*times.last().unwrap() < Duration::from_secs(10));
        // A(t) = 5t², so t_k = √(k/5).
        for (k, t) in times.iter().enumerate() {
            let want = (k as f64 / 5.0).sqrt();
            assert!(
                (t.as_secs_f64() - want).abs() < 1e-6,
                "k={k}: {t:?} vs {want}"
            );
        }
        assert!((s.rate_at(secs(5.0)) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn ramp_down_and_constant_pieces() {
        let s = rar(100.0, vec![stage(0, 10_000)]);
        assert_eq!(s.total_arrivals(), 500);
        let times = all_times(&s);
        assert_eq!(times[0], Duration::ZERO);
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        assert!(*times.last().unwrap() < Duration::from_secs(10));
        // A(t) = 100t − 5t²: the last event (k = 499) is where A = 499.
        let t = times[499].as_secs_f64();
        assert!((100.0 * t - 5.0 * t * t - 499.0).abs() < 1e-5);
    }

    #[test]
    fn constant_rate_is_exact() {
        let e = Executor::ConstantArrivalRate {
            rate: 1000.0,
            duration: Duration::from_secs(2),
            max_vus: 5,
            pre_allocated_vus: 2,
        };
        let s = e.arrival_schedule().unwrap().unwrap();
        assert_eq!(s.total_arrivals(), 2000);
        for k in 0..2000 {
            assert_eq!(s.arrival_time(k), Some(Duration::from_millis(k)));
        }
        assert_eq!(s.arrival_time(2000), None);

        let third = ArrivalSchedule::constant(3.0, Duration::from_secs(1)).unwrap();
        assert_eq!(
            all_times(&third),
            [0, 333_333_333, 666_666_666].map(Duration::from_nanos)
        );
        let slow = ArrivalSchedule::constant(0.5, Duration::from_secs(10)).unwrap();
        assert_eq!(all_times(&slow), [0, 2, 4, 6, 8].map(Duration::from_secs));
        // A partial last period still holds its event.
        let odd = ArrivalSchedule::constant(10.0, Duration::from_millis(1_050)).unwrap();
        assert_eq!(odd.total_arrivals(), 11);
        // A ramping schedule that never ramps gives the same times.
        assert_eq!(
            all_times(&rar(7.0, vec![stage(7, 3_000)])),
            all_times(&ArrivalSchedule::constant(7.0, Duration::from_secs(3)).unwrap())
        );
    }

    #[test]
    fn zero_duration_stages_jump() {
        let s = rar(0.0, vec![stage(0, 0), stage(10, 0), stage(10, 2_000)]);
        assert_eq!(
            all_times(&s),
            (0..20)
                .map(|k| Duration::from_millis(100 * k))
                .collect::<Vec<_>>()
        );
        // 0→10/s over 1s (area 5), jump to 50/s for 1s (area 50).
        let s = rar(0.0, vec![stage(10, 1_000), stage(50, 0), stage(50, 1_000)]);
        assert_eq!(s.total_arrivals(), 55);
        assert_eq!(s.arrival_time(5), Some(Duration::from_secs(1)));
        assert_eq!(s.arrival_time(6), Some(Duration::from_millis(1_020)));
    }

    #[test]
    fn no_event_fires_while_the_rate_is_zero() {
        // Area 5, then 5 down to 0, nothing for 5s, then 5 more.
        let s = rar(
            0.0,
            vec![
                stage(10, 1_000),
                stage(0, 1_000),
                stage(0, 5_000),
                stage(10, 1_000),
            ],
        );
        assert_eq!(s.total_arrivals(), 15);
        let times = all_times(&s);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        for t in &times {
            assert!(
                *t <= secs(2.0) || *t >= secs(7.0),
                "{t:?} in the silent stretch"
            );
        }
        assert_eq!(s.arrival_time(10), Some(Duration::from_secs(7)));
        // A zero rate throughout has no events at all.
        let s = rar(0.0, vec![stage(0, 5_000)]);
        assert_eq!(s.total_arrivals(), 0);
        assert_eq!(s.arrival_time(0), None);
        // Fractional rates: 0.5/s for 3s is area 1.5 → events at 0s and 2s.
        let s = ArrivalSchedule::constant(0.5, Duration::from_secs(3)).unwrap();
        assert_eq!(all_times(&s), [0, 2].map(Duration::from_secs));
    }

    #[test]
    fn ramping_vus_follow_the_stages() {
        let e = Executor::RampingVus {
            start_vus: 0,
            stages: vec![stage(10, 10_000), stage(10, 5_000), stage(0, 5_000)],
        };
        e.validate().unwrap();
        let at = |s: f64| e.vus_at(secs(s)).unwrap();
        assert_eq!(at(0.0), 0);
        assert_eq!(at(1.0), 1);
        assert_eq!(at(9.999), 9);
        assert_eq!(at(10.0), 10);
        assert_eq!(at(15.0), 10);
        assert_eq!(at(15.5), 9);
        assert_eq!(at(19.99), 1);
        assert_eq!(at(25.0), 0);
        assert_eq!(e.max_vus(), 10);
        assert_eq!(e.total_duration(), Duration::from_secs(20));

        let mut changes = Vec::new();
        let mut t = Duration::ZERO;
        while let Some((next, v)) = e.next_vu_change(t) {
            assert!(changes.len() < 100);
            changes.push((next, v));
            t = next;
        }
        let mut want: Vec<(Duration, u64)> = (1..=10).map(|v| (secs(v as f64), v)).collect();
        want.extend((1..=9).map(|i| (secs(15.0 + 0.5 * i as f64), 10 - i)));
        assert_eq!(changes, want);

        // An instant jump mid-run is a change point.
        let e = Executor::RampingVus {
            start_vus: 2,
            stages: vec![stage(2, 1_000), stage(50, 0), stage(50, 1_000)],
        };
        assert_eq!(e.next_vu_change(Duration::ZERO), Some((secs(1.0), 50)));
        assert_eq!(e.next_vu_change(secs(1.0)), None);
    }

    #[test]
    fn validation_names_the_field() {
        let err = |e: Executor| e.validate().unwrap_err().to_string();
        let msg = err(Executor::ConstantVus {
            vus: 0,
            duration: Duration::from_secs(1),
        });
        assert!(
            msg.contains("constant-vus") && msg.contains("`vus`"),
            "{msg}"
        );
        let msg = err(Executor::RampingVus {
            start_vus: 0,
            stages: vec![],
        });
        assert!(msg.contains("`stages`"), "{msg}");
        let msg = err(Executor::ConstantArrivalRate {
            rate: f64::NAN,
            duration: Duration::from_secs(1),
            max_vus: 1,
            pre_allocated_vus: 0,
        });
        assert!(msg.contains("`rate`"), "{msg}");
        let msg = err(Executor::ConstantArrivalRate {
            rate: 10.0,
            duration: Duration::from_secs(1),
            max_vus: 2,
            pre_allocated_vus: 3,
        });
        assert!(msg.contains("`pre_allocated_vus`"), "{msg}");
        let msg = err(Executor::RampingArrivalRate {
            start_rate: -1.0,
            stages: vec![stage(1, 1)],
            max_vus: 2,
            pre_allocated_vus: 0,
        });
        assert!(msg.contains("`start_rate`"), "{msg}");
        let msg = err(Executor::RampingArrivalRate {
            start_rate: 0.0,
            stages: vec![
                stage(1, 1),
                Stage {
                    target: 1,
                    duration: Duration::MAX,
                },
            ],
            max_vus: 2,
            pre_allocated_vus: 0,
        });
        assert!(msg.contains("`stages[1].duration`"), "{msg}");
        let msg = err(Executor::SharedIterations {
            vus: 1,
            iterations: 0,
            max_duration: DEFAULT_MAX_DURATION,
        });
        assert!(msg.contains("`iterations`"), "{msg}");
    }

    #[test]
    fn reads_plan_toml_and_round_trips_cbor() {
        let e: Executor = toml::from_str(
            r#"
            executor = "ramping-arrival-rate"
            stages = [ { target = 0, duration = "0s" }, { target = 5000, duration = "4m" },
                       { target = 5000, duration = "50m" }, { target = 0, duration = "1m" } ]
            max_vus = 20000
            "#,
        )
        .unwrap();
        e.validate().unwrap();
        assert_eq!(e.kind(), "ramping-arrival-rate");
        assert_eq!(e.total_duration(), Duration::from_secs(55 * 60));
        // 0.5·5000·240 + 5000·3000 + 0.5·5000·60 = 15,750,000.
        assert_eq!(e.total_arrivals(), Some(15_750_000));
        let s = e.arrival_schedule().unwrap().unwrap();
        assert_eq!(s.arrival_time(600_000), Some(Duration::from_secs(240)));

        let e: Executor = toml::from_str(
            "executor = \"constant-arrival-rate\"\nrate = 100\nduration = \"10s\"\nmax_vus = 50",
        )
        .unwrap();
        assert_eq!(e.total_arrivals(), Some(1000));
        let e: Executor =
            toml::from_str("executor = \"per-vu-iterations\"\niterations = 3").unwrap();
        assert_eq!(
            e,
            Executor::PerVuIterations {
                vus: 1,
                iterations: 3,
                max_duration: DEFAULT_MAX_DURATION
            }
        );
        let bad = toml::from_str::<Executor>(
            "executor = \"constant-vus\"\nvus = 3\nduration = \"3 weeks\"",
        );
        assert!(bad.unwrap_err().to_string().contains("3 weeks"));

        let mut bytes = Vec::new();
        ciborium::into_writer(&e, &mut bytes).unwrap();
        assert_eq!(
            ciborium::from_reader::<Executor, _>(bytes.as_slice()).unwrap(),
            e
        );
    }

    #[test]
    fn iteration_executors_split_like_k6() {
        let a = Assignment::new(Striping::from_weights(&[2, 1, 1]).unwrap());
        let shared = Executor::SharedIterations {
            vus: 7,
            iterations: 103,
            max_duration: DEFAULT_MAX_DURATION,
        };
        let per_vu = Executor::PerVuIterations {
            vus: 7,
            iterations: 5,
            max_duration: DEFAULT_MAX_DURATION,
        };
        let sum = |e: &Executor| {
            (0..3)
                .map(|n| e.node_iterations(&a, n).unwrap())
                .sum::<u64>()
        };
        assert_eq!(sum(&shared), 103);
        assert_eq!(sum(&per_vu), 35);
        assert_eq!((0..3).map(|n| shared.node_max_vus(&a, n)).sum::<u64>(), 7);
        assert_eq!(per_vu.node_iterations(&a, 0), Some(4 * 5));
        assert_eq!(per_vu.vus_at(Duration::ZERO), None);
    }

    fn weights() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(1u64..50, 1..=7)
    }

    fn stages() -> impl Strategy<Value = Vec<Stage>> {
        prop::collection::vec(
            (0u64..60, prop_oneof![Just(0u64), 1u64..3_000]).prop_map(|(t, ms)| stage(t, ms)),
            1..=5,
        )
        .prop_filter("some duration", |s| s.iter().any(|s| !s.duration.is_zero()))
    }

    /// A split with an optional failover of node `lost` from index `from`.
    fn assignment(w: &[u64], failover: Option<(usize, u64)>) -> Assignment {
        let mut a = Assignment::new(Striping::from_weights(w).unwrap());
        if let Some((lost, from)) = failover {
            if w.len() > 1 {
                let lost = lost % w.len();
                let survivors: Vec<(usize, u64)> = (0..w.len())
                    .filter(|&n| n != lost)
                    .map(|n| (n, w[n]))
                    .collect();
                a.reassign(Reassignment::new(lost, from, &survivors).unwrap())
                    .unwrap();
            }
        }
        a
    }

    proptest! {
        #[test]
        fn segmented_arrivals_union_to_the_global_schedule(
            start in 0u64..40,
            st in stages(),
            w in weights(),
            failover in prop::option::of((0usize..7, 0u64..200)),
        ) {
            let s = rar(start as f64, st);
            let global: Vec<(u64, Duration)> = (0..s.total_arrivals())
                .map(|k| (k, s.arrival_time(k).unwrap()))
                .collect();
            prop_assert!(global.windows(2).all(|p| p[0].1 <= p[1].1));
            prop_assert!(global.iter().all(|&(_, t)| t < s.duration()));
            let a = assignment(&w, failover);
            let mut union = Vec::new();
            for node in 0..w.len() {
                let mine: Vec<(u64, Duration)> = s.arrivals_owned_by(&a, node, 0).collect();
                prop_assert_eq!(mine.len() as u64, s.node_arrivals(&a, node));
                union.extend(mine);
            }
            union.sort();
            prop_assert_eq!(union, global);
        }

        #[test]
        fn resuming_from_an_event_number_skips_exactly_the_earlier_ones(
            w in weights(),
            from_k in 0u64..300,
        ) {
            let s = rar(10.0, vec![stage(200, 2_000)]);
            let a = assignment(&w, None);
            for node in 0..w.len() {
                let all: Vec<_> = s.arrivals_owned_by(&a, node, 0).filter(|&(k, _)| k >= from_k).collect();
                let resumed: Vec<_> = s.arrivals_owned_by(&a, node, from_k).collect();
                prop_assert_eq!(all, resumed);
            }
        }

        #[test]
        fn vu_change_points_describe_the_curve(
            start in 0u64..60,
            st in stages(),
            probes in prop::collection::vec(0u64..16_000_000_000, 20),
        ) {
            let e = Executor::RampingVus { start_vus: start, stages: st };
            let mut changes = vec![(Duration::ZERO, e.vus_at(Duration::ZERO).unwrap())];
            let mut t = Duration::ZERO;
            while let Some((next, v)) = e.next_vu_change(t) {
                prop_assert!(next > t && next < e.total_duration());
                prop_assert_eq!(e.vus_at(next), Some(v));
                prop_assert_ne!(e.vus_at(next - Duration::from_nanos(1)), Some(v));
                prop_assert!(changes.len() < 1_000);
                changes.push((next, v));
                t = next;
            }
            for p in probes {
                let p = Duration::from_nanos(p).min(e.total_duration().saturating_sub(Duration::from_nanos(1)));
                let last = changes.iter().rev().find(|(t, _)| *t <= p).unwrap();
                prop_assert_eq!(e.vus_at(p), Some(last.1), "at {:?}", p);
            }
        }

        #[test]
        fn segmented_vus_add_up_to_the_global_curve(
            start in 0u64..60,
            st in stages(),
            w in weights(),
            failover in prop::option::of((0usize..7, 0u64..30)),
            probes in prop::collection::vec(0u64..16_000_000_000, 10),
        ) {
            let e = Executor::RampingVus { start_vus: start, stages: st };
            let a = assignment(&w, failover);
            for p in probes {
                let p = Duration::from_nanos(p);
                let sum: u64 = (0..w.len()).map(|n| e.node_vus_at(&a, n, p).unwrap()).sum();
                prop_assert_eq!(Some(sum), e.vus_at(p));
            }
            for node in 0..w.len() {
                let mut t = Duration::ZERO;
                let mut count = 0;
                while let Some((next, v)) = e.next_node_vu_change(&a, node, t) {
                    prop_assert!(next > t);
                    prop_assert_eq!(e.node_vus_at(&a, node, next), Some(v));
                    prop_assert_ne!(e.node_vus_at(&a, node, next - Duration::from_nanos(1)), Some(v));
                    count += 1;
                    prop_assert!(count < 1_000);
                    t = next;
                }
            }
        }
    }
}
