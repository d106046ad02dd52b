//! The invariants every simulated schedule is checked against (docs/protocol.md lists
//! them with the command that runs them).
//!
//! Must not change the world: it only reads what happened.

use std::collections::BTreeSet;

use stampede_protocol::machine::events::RunEvent;

use super::engine::LATE_LIMIT_US;
use super::faults::Fault;
use super::{Aggregation, World, FORGED_EVENT};

/// How soon after a loss the rate must be back (spec: within 3 s).
pub const RECOVERY_US: u64 = 3_000_000;

/// The invariants, by name, in the order they are checked.
pub const INVARIANTS: [&str; 7] = [
    "at-most-once",
    "never-more-than-planned",
    "liveness",
    "one-leader-per-term",
    "exact-accounting",
    "termination",
    "forgery-has-no-effect",
];

/// What broke, if anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

/// Checks every invariant; the first violation of each kind is returned.
pub fn check(w: &World) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut fail = |invariant: &'static str, detail: String| {
        if !out.iter().any(|v: &Violation| v.invariant == invariant) {
            out.push(Violation { invariant, detail });
        }
    };
    let plan = w.setup.plan;

    // At most once: no arrival event started twice anywhere.
    for (k, s) in w.starts.iter().enumerate() {
        if s.len() > 1 {
            let who: Vec<String> = s
                .iter()
                .map(|x| format!("n{} at {:.3}s", x.node, x.at as f64 / 1e6))
                .collect();
            fail(
                "at-most-once",
                format!("event {k} started {} times: {}", s.len(), who.join(", ")),
            );
        }
    }

    // ... and no counted iteration (pool slot, or a VU's iteration) started twice.
    let twice = w
        .pool_starts
        .iter()
        .map(|(k, s)| (format!("pool slot {k:?}"), s))
        .chain(
            w.vu_starts
                .iter()
                .map(|(k, s)| (format!("VU {} iteration {}", k.0, k.1), s)),
        )
        .find(|(_, s)| s.len() > 1);
    if let Some((what, s)) = twice {
        let who: Vec<String> = s
            .iter()
            .map(|x| format!("n{} at {:.3}s", x.node, x.at as f64 / 1e6))
            .collect();
        fail(
            "at-most-once",
            format!("{what} started {} times: {}", s.len(), who.join(", ")),
        );
    }

    // Never more than planned: per second of the true run clock, the starts are at
    // most the events planned in that second and the start-boundary tolerance before.
    let tolerance = LATE_LIMIT_US as i64 + w.schedule.offset_error_us + 1_000;
    let seconds = plan.duration_us.div_ceil(1_000_000) as i64 + 2;
    let mut per_second = vec![0u64; seconds as usize + 1];
    for s in w.starts.iter().flatten() {
        let sec = s.true_run_us.div_euclid(1_000_000).clamp(0, seconds);
        per_second[sec as usize] += 1;
    }
    for (sec, &n) in per_second.iter().enumerate() {
        let from = (sec as i64 * 1_000_000 - tolerance).max(0) as u64;
        let to = (sec as u64 + 1) * 1_000_000 + w.schedule.offset_error_us as u64 + 1;
        let planned = plan.first_at_or_after(to) - plan.first_at_or_after(from);
        if n > planned {
            fail(
                "never-more-than-planned",
                format!("second {sec}: {n} started, {planned} planned (with tolerance)"),
            );
        }
    }

    // Liveness: with a majority alive and connected, every event from 3 s after the
    // last fault on is started (the takeover is complete by then).
    let recovered_from = w
        .schedule
        .faults
        .iter()
        .map(|f| match f {
            Fault::Crash { at, .. } => at + RECOVERY_US,
            // A pause: its share moves within 3 s of its start; on resume it is an
            // observer (or, after a short pause, carries on).
            Fault::Pause { at, until, .. } => (at + RECOVERY_US).max(*until + RECOVERY_US),
            Fault::Partition { until, .. } => until + RECOVERY_US,
        })
        .max()
        .unwrap_or(0);
    // Virtual time of the run's start: when node 0's wall clock reads the start.
    let start_at_virtual = w
        .run_start_unix
        .map(|s| s as i64 - 1_000_000_000_000 - w.nodes[0].wall_offset)
        .unwrap_or(0)
        .max(0) as u64;
    let first_checked = recovered_from
        .saturating_sub(start_at_virtual)
        .max(1_000_000);
    let lossy = w.schedule.loss > 0.0 || w.schedule.spike > 0.0;
    // Progress needs a majority of the witnesses in touch: a schedule that took it
    // away at any instant (a partition cutting 4 of 7 off, or one with a crash) may
    // stop the run for good (docs/protocol.md §16), and only safety is checked.
    let decidable = witness_majority_down(w).is_none();
    if !lossy && w.schedule.delay_max < 50_000 && decidable {
        let from = plan.first_at_or_after(first_checked);
        let to = plan.first_at_or_after(plan.duration_us.saturating_sub(500_000));
        if let Some(k) = (from..to).find(|&k| w.starts[k as usize].is_empty()) {
            fail(
                "liveness",
                format!(
                    "event {k} (planned at {:.3}s of run time) was never started",
                    plan.at(k) as f64 / 1e6
                ),
            );
        }
    }

    // Counted work: once the takeover is done, every slot a live member holds in the
    // final split is started, when the run leaves time for it (a lost member's
    // unconfirmed-but-claimed work is lost with it, at most a second's worth).
    if !lossy && w.schedule.delay_max < 50_000 && plan.vus > 0 && decidable {
        let work = plan.rounds * plan.iter_us;
        if recovered_from + work + 2_000_000 < plan.duration_us + start_at_virtual {
            if let Some(missed) = counted_unstarted(w) {
                fail("liveness", missed);
            }
        }
    }

    // One leader per term, and survivors converge on the highest term.
    let survivors: Vec<usize> = (0..w.nodes.len())
        .filter(|&i| !w.nodes[i].crashed && w.nodes[i].done_at.is_some())
        .collect();
    let rosters: BTreeSet<&Vec<String>> = survivors
        .iter()
        .map(|&i| &w.nodes[i].roster)
        .filter(|r| !r.is_empty())
        .collect();
    if rosters.len() > 1 {
        fail(
            "one-leader-per-term",
            "members hold different rosters, so the election rule names different leaders".into(),
        );
    }
    // Only the nodes still in the run once the faults were over can be held to the
    // terms reached after them: a member moved away as an observer may leave long
    // before (a member that is not a witness leaves as soon as its share is done and
    // it hears no witness).
    let terms: BTreeSet<u64> = survivors
        .iter()
        .filter(|&&i| !w.nodes[i].roster.is_empty())
        .filter(|&&i| w.nodes[i].done_at.is_some_and(|d| d >= recovered_from))
        .map(|&i| w.nodes[i].term_at_done)
        .collect();
    if recovered_from + 5_000_000 < plan.duration_us && terms.len() > 1 && decidable {
        fail(
            "one-leader-per-term",
            format!("survivors ended in different terms: {terms:?}"),
        );
    }

    // Exact accounting: every second a node published is in a report or named
    // there as missing; a report never holds a second that was never published.
    let reporters: Vec<usize> = (0..w.nodes.len())
        .filter(|&i| w.nodes[i].report.is_some())
        .collect();
    let roster_alive = (0..w.nodes.len())
        .filter(|&i| !w.nodes[i].crashed && !w.nodes[i].roster.is_empty())
        .count();
    if reporters.is_empty() && roster_alive > 0 {
        fail(
            "exact-accounting",
            "no node built the report: the result is lost".into(),
        );
    }
    for &r in &reporters {
        let node = &w.nodes[r];
        for (j, s) in node
            .merged
            .iter()
            .enumerate()
            .flat_map(|(j, m)| m.iter().map(move |&s| (j, s)))
        {
            if !w.nodes[j].published.contains(&s) {
                fail(
                    "exact-accounting",
                    format!("n{r}'s report holds second {s} of n{j}, which n{j} never published"),
                );
            }
        }
        for j in 0..w.nodes.len() {
            let named = missing_of(&node.events, &format!("n{j}"));
            for &s in &w.nodes[j].published {
                if !node.merged[j].contains(&s) && !named.covers(s) {
                    fail(
                        "exact-accounting",
                        format!("n{r}'s report lacks second {s} of n{j} and does not say so"),
                    );
                }
            }
        }
    }

    // The per-member section (tree aggregation): every member's own totals are in a
    // report or the member is named in a `node_totals_missing` event; none is asked
    // for in all-to-all runs (the snapshots carry them).
    let tree = w.setup.aggregation != Aggregation::AllToAll;
    for &r in &reporters {
        let node = &w.nodes[r];
        if !tree {
            if node.own_asks > 0 {
                fail(
                    "exact-accounting",
                    format!("n{r} asked for members' own totals in an all-to-all run"),
                );
            }
            continue;
        }
        for id in &node.roster {
            let Some(j) = w.nodes.iter().position(|n| n.id == *id) else {
                continue;
            };
            let name = format!("n{j}");
            let named = node
                .events
                .iter()
                .any(|e| matches!(e, RunEvent::NodeTotalsMissing { node, .. } if *node == name));
            if node.own_got.contains(&j) == named {
                fail(
                    "exact-accounting",
                    format!(
                        "n{r}'s report {} n{j}'s own totals and {} them missing",
                        if named { "has" } else { "lacks" },
                        if named { "names" } else { "does not name" }
                    ),
                );
            }
        }
    }

    // Exactness of the merge itself: no reporter took a (member, second) twice,
    // and the tree moved exactly what it held.
    for &r in &reporters {
        if let Some((j, s)) = w.nodes[r].counted_twice.first() {
            fail(
                "exact-accounting",
                format!(
                    "n{r} counted second {s} of n{j} twice ({} pairs in all)",
                    w.nodes[r].counted_twice.len()
                ),
            );
        }
    }
    for (i, n) in w.nodes.iter().enumerate() {
        if let Some(e) = n.tree_errors.first() {
            fail("exact-accounting", format!("n{i}: {e}"));
        }
    }

    // Termination: every node that was not killed left the run.
    for (i, n) in w.nodes.iter().enumerate() {
        if !n.crashed && n.machine.is_some() && n.done_at.is_none() {
            let phase = n.machine.as_ref().map(|m| m.phase().name()).unwrap_or("-");
            fail(
                "termination",
                format!("n{i} never left the run (still {phase})"),
            );
        }
    }

    // Forgery has no effect: no honest node ever held a forged version.
    for (i, n) in w.nodes.iter().enumerate() {
        if Some(i) == w.schedule.hostile {
            continue;
        }
        if n.versions
            .iter()
            .any(|v| v.moves.iter().any(|m| m.from_event == FORGED_EVENT))
        {
            fail(
                "forgery-has-no-effect",
                format!("n{i} took up a forged version"),
            );
        }
    }
    out
}

/// The first instant (virtual µs) at which no majority of the run's witnesses could
/// reach each other — crashed, paused, or split by a partition —, if there was one.
/// A fault schedule hits at most a minority of the roster, but with more members
/// than witnesses that minority may hold most of the witnesses.
pub fn witness_majority_down(w: &World) -> Option<u64> {
    let m = w.nodes.iter().find_map(|n| n.machine.as_ref())?;
    let witnesses: Vec<usize> = m
        .witnesses()
        .iter()
        .filter_map(|&r| w.index(&m.roster().get(r)?.id))
        .collect();
    let majority = m.witnesses().len() / 2 + 1;
    let mut instants: Vec<u64> = w.schedule.faults.iter().map(Fault::start).collect();
    instants.sort_unstable();
    instants.into_iter().find(|&t| {
        let up = |n: &usize| {
            w.schedule.faults.iter().all(|f| match f {
                Fault::Crash { node, at } => node != n || *at > t,
                Fault::Pause { node, at, until } => node != n || t < *at || t >= *until,
                Fault::Partition { .. } => true,
            })
        };
        let alive: Vec<usize> = witnesses.iter().copied().filter(up).collect();
        let side = w.schedule.faults.iter().find_map(|f| match f {
            Fault::Partition { side, at, until } if *at <= t && t < *until => Some(side),
            _ => None,
        });
        let largest = match side {
            Some(side) => {
                let inside = alive.iter().filter(|n| side.contains(n)).count();
                inside.max(alive.len() - inside)
            }
            None => alive.len(),
        };
        largest < majority
    })
}

/// The first counted iteration that a live member owns in the final split but never
/// started, if any.
fn counted_unstarted(w: &World) -> Option<String> {
    use super::engine::{PER_VU, POOL};
    let plan = w.setup.plan;
    let live = |i: usize| !w.nodes[i].crashed && !w.nodes[i].paused;
    let holder = (0..w.nodes.len()).find(|&i| live(i) && w.nodes[i].machine.is_some())?;
    let m = w.nodes[holder].machine.as_ref()?;
    let v = m.version()?;
    let split = v.split(m.roster(), &plan.counted()).ok()?;
    let moved = |i: usize| v.is_moved(i) || !live(i);
    let pool = &split.counted[POOL];
    for s in (0..m.roster().len()).filter(|&s| !moved(s)) {
        for k in 0..pool.size(s) {
            let slot = pool.slot(s, k)?;
            if !w.pool_starts.contains_key(&slot) {
                return Some(format!("n{s}'s pool slot {k} ({slot:?}) was never started"));
            }
        }
    }
    let rounds = &split.counted[PER_VU];
    for g in 0..plan.vus {
        let o = split.vus.owner(g);
        if moved(o) {
            continue;
        }
        for i in rounds.first_iteration(&split.vus, g)..plan.rounds {
            if !w.vu_starts.contains_key(&(g, i)) {
                return Some(format!("VU {g} (on n{o}) never started iteration {i}"));
            }
        }
    }
    None
}

/// The seconds a report names as missing for one node.
#[derive(Debug, Default)]
pub struct Missing {
    pub seconds: BTreeSet<u64>,
    pub after: Option<u64>,
}

impl Missing {
    pub fn covers(&self, s: u64) -> bool {
        self.seconds.contains(&s) || self.after.is_some_and(|a| s >= a)
    }
}

fn missing_of(events: &[RunEvent], node: &str) -> Missing {
    let mut m = Missing::default();
    for e in events {
        if let RunEvent::SnapshotsMissing {
            node: n,
            seconds,
            after,
        } = e
        {
            if n != node {
                continue;
            }
            if let Some(a) = after {
                m.after = Some(m.after.map_or(*a, |x: u64| x.min(*a)));
            }
            for part in seconds.split(", ").filter(|p| !p.is_empty()) {
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                    m.seconds.extend(a..=b);
                }
            }
        }
    }
    m
}
