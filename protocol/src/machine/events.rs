//! The typed vocabulary of a run that every consumer shares: the events a run records
//! (report, JSON summary, CLI progress, dashboard), the barriers and the status of a
//! member. One serde-tagged enum each, so that no consumer matches on strings.
//!
//! Must not hold state or decide anything: the state machine emits these, the node
//! stores and renders them.

use serde::{Deserialize, Serialize};

/// A barrier of a run: every live member arrives once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Barrier {
    /// The member has the plan, the roster and its clock offset.
    Ready,
    /// The member's engine passed the common start instant.
    Started,
    /// The member's engine ended (or could not start) and it says how many seconds it
    /// published.
    Finished,
}

impl Barrier {
    pub const ALL: [Barrier; 3] = [Barrier::Ready, Barrier::Started, Barrier::Finished];

    pub fn name(self) -> &'static str {
        match self {
            Barrier::Ready => "ready",
            Barrier::Started => "started",
            Barrier::Finished => "finished",
        }
    }
}

/// How a member of a run stands, as a node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Heard recently and sending its share.
    Running,
    /// Silent past the failure timeout: its share is (or will be) taken over.
    Lost,
    /// Was fenced (silent, share moved) and has been heard again: alive, still
    /// reporting what it measured, but it sends no load of this run any more.
    Observer,
    /// Ended the run normally.
    Completed,
}

impl MemberStatus {
    pub fn name(self) -> &'static str {
        match self {
            MemberStatus::Running => "running",
            MemberStatus::Lost => "lost",
            MemberStatus::Observer => "observer",
            MemberStatus::Completed => "completed",
        }
    }
}

/// Something that happened to a run, in the words of the report. The JSON shape is
/// `{"t": seconds, "kind": "...", ...fields}` (the `t` lives beside it, in the
/// node's `Event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEvent {
    /// A member fell silent past the failure timeout (this node fenced it).
    NodeLost {
        node: String,
        id: String,
        /// The last second of it merged here.
        last_snapshot: Option<u64>,
    },
    /// A fenced member was heard again: it rejoins as an observer (never with its old
    /// share).
    NodeReturned { node: String, id: String },
    /// Members moved to a new term: its leader is named by the election rule.
    LeaderElected { leader: String, term: u64 },
    /// The leader moved lost members' shares to the survivors.
    Reassigned {
        lost: String,
        from_s: f64,
        moved: String,
    },
    /// This node's lease lapsed (it lost contact with a majority of the run): it
    /// starts nothing until it holds one again.
    LeaseLost { node: String },
    /// A graceful stop of the whole run.
    Stop { reason: String },
    /// Ctrl-C in a run on one node: `graceful` the first time, `hard` the second.
    StopRequested { how: String },
    /// Every request so far failed to reach its target (refused, DNS, TLS, ...).
    OnlyFailing { message: String },
    /// A target this node's allowlist does not allow (said once per host).
    TargetRefused { message: String },
    /// A threshold with `abort_on_fail` failed: the run was stopped.
    ThresholdAbort { message: String },
    /// A member could not run its share (HTTP set-up or engine failed to start).
    NodeFailed { node: String, error: String },
    /// Seconds of a member the report does not contain: ranges such as `3-7, 9`;
    /// `after` set when everything from that second on is missing too (a member that
    /// was lost before it said how many it had).
    SnapshotsMissing {
        node: String,
        seconds: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// A member's own totals did not reach the reporter (tree aggregation): the
    /// report's `nodes` lacks it, and by-label figures and node- or label-filtered
    /// thresholds are without it. Its seconds are in the run's totals all the same.
    NodeTotalsMissing { node: String, reason: String },
}

impl RunEvent {
    /// The event's kind as it appears in JSON (`node_lost`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            RunEvent::NodeLost { .. } => "node_lost",
            RunEvent::NodeReturned { .. } => "node_returned",
            RunEvent::LeaderElected { .. } => "leader_elected",
            RunEvent::Reassigned { .. } => "reassigned",
            RunEvent::LeaseLost { .. } => "lease_lost",
            RunEvent::Stop { .. } => "stop",
            RunEvent::StopRequested { .. } => "stop_requested",
            RunEvent::OnlyFailing { .. } => "only_failing",
            RunEvent::TargetRefused { .. } => "target_refused",
            RunEvent::ThresholdAbort { .. } => "threshold_abort",
            RunEvent::NodeFailed { .. } => "node_failed",
            RunEvent::SnapshotsMissing { .. } => "snapshots_missing",
            RunEvent::NodeTotalsMissing { .. } => "node_totals_missing",
        }
    }

    /// The one line the summary leads with, for events that say the run measured
    /// something other than the target's capacity.
    pub fn headline(&self) -> Option<&str> {
        match self {
            RunEvent::OnlyFailing { message }
            | RunEvent::TargetRefused { message }
            | RunEvent::ThresholdAbort { message } => Some(message),
            _ => None,
        }
    }

    /// Whether a quiet CLI still prints it: it says the report is incomplete or the
    /// run did not go as planned.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            RunEvent::NodeLost { .. }
                | RunEvent::NodeFailed { .. }
                | RunEvent::SnapshotsMissing { .. }
                | RunEvent::NodeTotalsMissing { .. }
                | RunEvent::LeaseLost { .. }
                | RunEvent::OnlyFailing { .. }
                | RunEvent::TargetRefused { .. }
                | RunEvent::ThresholdAbort { .. }
        )
    }
}

/// Sorted seconds as short text: `3-7, 9`.
pub fn second_ranges(seconds: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seconds.len() {
        let start = seconds[i];
        let mut end = start;
        while i + 1 < seconds.len() && seconds[i + 1] == end + 1 {
            i += 1;
            end = seconds[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_the_json_shape_of_the_report() {
        let e = RunEvent::NodeLost {
            node: "n1".into(),
            id: "12D".into(),
            last_snapshot: Some(4),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "node_lost");
        assert_eq!(v["last_snapshot"], 4);
        assert_eq!(e.kind(), "node_lost");
        let back: RunEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn missing_seconds_read_as_ranges() {
        assert_eq!(second_ranges(&[]), "");
        assert_eq!(second_ranges(&[4]), "4");
        assert_eq!(second_ranges(&[3, 4, 5, 6, 7, 9, 11, 12]), "3-7, 9, 11-12");
    }
}
