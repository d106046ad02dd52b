//! What a node offers its peers of the runs it takes part in: plan bundles it
//! proposed and the snapshots it published, shared with the mesh event loop so that
//! it answers peers' requests without a round trip through the run driver.
//!
//! Must not decide anything about a run; it only keeps and answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use stampede_protocol::run::{
    unix_us, Bundle, OwnTotals, RunRequest, RunResponse, SnapshotMessage, MAX_OWN_METRICS_BYTES,
    MAX_OWN_POINTS, MAX_RUN_SECONDS, SNAPSHOTS_PER_REQUEST, SNAPSHOT_ANSWER_BYTES,
};

use crate::reports::aggregate::{Timeline, REPORT};

/// A node's own part of a run, kept once its engine is done, to answer a reporter's
/// `own` request (tree aggregation: the merged seconds carry no per-member figures).
/// Its size is bounded by the timeline's tiers, not by the run's length.
pub struct OwnRecord {
    /// This node's peer id.
    pub node: String,
    /// Its totals, encoded (`Metrics::encode`).
    pub totals: Vec<u8>,
    pub seconds: u64,
    pub vus: u64,
    pub cpu: f64,
    /// Its own seconds, every bucket closed.
    pub timeline: Timeline,
}

impl OwnRecord {
    /// The answer to a reporter: the timeline cut at the run's end the reporter asked
    /// with, at the report's resolution; within the bounds the asker holds it to.
    pub fn answer(&self, run_id: &str, end: u64) -> RunResponse {
        if self.totals.len() > MAX_OWN_METRICS_BYTES {
            return RunResponse::Refused {
                reason: format!(
                    "this node's totals take {} bytes, over the {MAX_OWN_METRICS_BYTES} an answer may carry",
                    self.totals.len()
                ),
            };
        }
        let mut timeline = self.timeline.points(end.min(MAX_RUN_SECONDS), &REPORT);
        // A week at the report's resolution is well under the bound; the newest are
        // the ones kept if ever it is not.
        if timeline.len() > MAX_OWN_POINTS {
            timeline.drain(..timeline.len() - MAX_OWN_POINTS);
        }
        RunResponse::Own(Box::new(OwnTotals {
            run_id: run_id.to_string(),
            node: self.node.clone(),
            seconds: self.seconds,
            vus: self.vus,
            cpu: self.cpu,
            metrics: self.totals.clone(),
            timeline,
        }))
    }
}

/// Bundles and own snapshots, shared with the mesh event loop so that it can answer
/// peers' requests without a round trip through the actor.
#[derive(Default)]
pub struct RunStore {
    pub(crate) bundles: Mutex<HashMap<String, Bundle>>,
    /// This node's own snapshots of the last [`RECENT_SECONDS`] of each run; older
    /// ones are answered from the snapshot log on disk (`results`), so memory does not
    /// grow with the length of a run.
    pub(crate) snapshots: Mutex<HashMap<(String, u64), SnapshotMessage>>,
    /// This node's own part of each run it finished with tree aggregation.
    pub(crate) own: Mutex<HashMap<String, Arc<OwnRecord>>>,
    results: Option<crate::reports::results::Results>,
}

/// How many of its newest seconds of a run a node keeps in memory to answer re-fetches.
pub const RECENT_SECONDS: u64 = 120;

impl RunStore {
    /// A store that answers older seconds from the node's snapshot logs.
    pub fn with_results(results: crate::reports::results::Results) -> RunStore {
        RunStore {
            results: Some(results),
            ..Default::default()
        }
    }

    /// Keeps one of this node's own snapshots, and lets go of the run's seconds older
    /// than [`RECENT_SECONDS`] when there is a log to answer them from.
    pub fn keep(&self, s: SnapshotMessage) {
        let mut store = match self.snapshots.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if self.results.is_some() {
            // Every older second, not just the one that just left the window: a second
            // that was never kept (skipped) must not pin its predecessors.
            if let Some(oldest) = s.seq.checked_sub(RECENT_SECONDS) {
                store.retain(|(run, seq), _| *run != s.run_id || *seq > oldest);
            }
        }
        store.insert((s.run_id.clone(), s.seq), s);
    }

    /// Keeps this node's own part of a run (its engine is done).
    pub fn keep_own(&self, run_id: &str, record: OwnRecord) {
        let mut own = match self.own.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        own.insert(run_id.to_string(), Arc::new(record));
    }

    /// Lets go of everything kept of a run.
    pub fn forget(&self, run_id: &str) {
        if let Ok(mut s) = self.snapshots.lock() {
            s.retain(|(r, _), _| r != run_id);
        }
        if let Ok(mut o) = self.own.lock() {
            o.remove(run_id);
        }
    }

    /// Answers a peer's run request (called on the event loop: must be quick).
    pub fn respond(&self, req: RunRequest) -> RunResponse {
        match req {
            // The mesh event loop hands these to the run driver; none reach here.
            RunRequest::Message { .. } => RunResponse::Refused {
                reason: "a run message is not a question".into(),
            },
            // Tree aggregation is not driven by this node yet (docs/protocol.md §10).
            RunRequest::Batch(_) => RunResponse::Refused {
                reason: "this node aggregates snapshots all to all".into(),
            },
            // The codec stamped the arrival and stamps `t3_us` again as it encodes the
            // answer: this node's event loop is between the two.
            RunRequest::Clock { t1_us, arrived_us } => {
                let t = unix_us();
                RunResponse::Clock {
                    t1_us,
                    t2_us: arrived_us.unwrap_or(t),
                    t3_us: t,
                    received_us: None,
                }
            }
            RunRequest::Bundle { hash, .. } => {
                match self.bundles.lock().ok().and_then(|b| b.get(&hash).cloned()) {
                    Some(bundle) => RunResponse::Bundle { bundle },
                    None => RunResponse::Refused {
                        reason: format!("no bundle with hash {hash}"),
                    },
                }
            }
            RunRequest::Snapshots { run_id, node, seqs } => {
                let store = match self.snapshots.lock() {
                    Ok(s) => s,
                    Err(p) => p.into_inner(),
                };
                let (mut snapshots, mut missing, mut bytes) = (Vec::new(), Vec::new(), 0);
                for seq in seqs.iter().take(SNAPSHOTS_PER_REQUEST) {
                    match store.get(&(run_id.clone(), *seq)) {
                        // The rest is asked for again.
                        Some(_) if bytes >= SNAPSHOT_ANSWER_BYTES => break,
                        Some(s) => {
                            bytes += s.metrics.len();
                            snapshots.push(s.clone());
                        }
                        None => missing.push(*seq),
                    }
                }
                drop(store);
                if let (false, Some(results)) = (missing.is_empty(), &self.results) {
                    // Older seconds: from the log, one pass, within the same budget.
                    let wanted: std::collections::BTreeSet<u64> = missing.iter().copied().collect();
                    if let Ok(log) = results.read(&run_id) {
                        for r in log {
                            if bytes >= SNAPSHOT_ANSWER_BYTES {
                                break;
                            }
                            if r.node != node || !wanted.contains(&r.seq) {
                                continue;
                            }
                            if let Ok(s) = r.snapshot() {
                                if missing.contains(&s.seq) {
                                    bytes += s.metrics.len();
                                    missing.retain(|m| *m != s.seq);
                                    snapshots.push(s);
                                }
                            }
                        }
                    }
                }
                RunResponse::Snapshots { snapshots, missing }
            }
            // A clone of at most a couple of thousand points and the encoded totals.
            RunRequest::Own { run_id, end } => {
                let record = match self.own.lock() {
                    Ok(o) => o.get(&run_id).cloned(),
                    Err(p) => p.into_inner().get(&run_id).cloned(),
                };
                match record {
                    Some(r) => r.answer(&run_id, end),
                    None => RunResponse::Refused {
                        reason: format!("no own totals of run {run_id} on this node"),
                    },
                }
            }
            // durability: answered by the mesh event loop from `results`, never here.
            RunRequest::Summary { .. } => RunResponse::Refused {
                reason: "summaries are answered from the data dir".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds older than the in-memory window are let go and answered from the log,
    /// so a long run's own snapshots do not stay in memory.
    #[test]
    fn old_seconds_leave_memory_and_are_answered_from_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let results = crate::reports::results::Results::new(tmp.path());
        let store = RunStore::with_results(results.clone());
        let run = "6932a8b2-0f3c";
        for seq in 0..(RECENT_SECONDS + 30) {
            let s = SnapshotMessage {
                run_id: run.into(),
                node: "me".into(),
                seq,
                vus: 1,
                cpu: 0.0,
                metrics: vec![seq as u8; 16],
            };
            results.append_snapshot(&s).unwrap();
            store.keep(s);
        }
        assert_eq!(
            store.snapshots.lock().unwrap().len(),
            RECENT_SECONDS as usize
        );
        let answer = store.respond(RunRequest::Snapshots {
            run_id: run.into(),
            node: "me".into(),
            seqs: vec![3, RECENT_SECONDS + 20, 10_000],
        });
        let RunResponse::Snapshots { snapshots, missing } = answer else {
            panic!("not a snapshots answer: {answer:?}");
        };
        let mut got: Vec<u64> = snapshots.iter().map(|s| s.seq).collect();
        got.sort_unstable();
        assert_eq!(got, vec![3, RECENT_SECONDS + 20]);
        assert_eq!(
            snapshots.iter().find(|s| s.seq == 3).unwrap().metrics,
            vec![3u8; 16]
        );
        assert_eq!(missing, vec![10_000]);
    }

    /// A second the node skipped (no snapshot kept for it) does not leave the one
    /// before the window's edge in memory for the rest of the run.
    #[test]
    fn seconds_around_a_skipped_one_leave_memory_too() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RunStore::with_results(crate::reports::results::Results::new(tmp.path()));
        for seq in (0..(3 * RECENT_SECONDS)).filter(|s| *s != RECENT_SECONDS + 5) {
            store.keep(SnapshotMessage {
                run_id: "r".into(),
                node: "me".into(),
                seq,
                vus: 1,
                cpu: 0.0,
                metrics: vec![0; 4],
            });
        }
        let stored = store.snapshots.lock().unwrap();
        let oldest = stored.keys().map(|(_, seq)| *seq).min();
        assert_eq!(oldest, Some(2 * RECENT_SECONDS));
        assert_eq!(stored.len(), RECENT_SECONDS as usize);
    }

    /// A re-fetch answer says which asked seconds the node does not have, and stops
    /// taking snapshots once its byte budget is spent (the rest are asked again).
    #[test]
    fn a_refetch_answer_names_what_it_lacks_and_keeps_to_its_byte_budget() {
        let store = RunStore::default();
        let third = vec![0u8; SNAPSHOT_ANSWER_BYTES / 3 + 1];
        {
            let mut stored = store.snapshots.lock().unwrap();
            for seq in [0u64, 1, 2, 3, 5] {
                let s = SnapshotMessage {
                    run_id: "r".into(),
                    node: "n".into(),
                    seq,
                    vus: 0,
                    cpu: 0.0,
                    metrics: third.clone(),
                };
                stored.insert(("r".into(), seq), s);
            }
        }
        let answer = store.respond(RunRequest::Snapshots {
            run_id: "r".into(),
            node: "n".into(),
            seqs: vec![4, 0, 1, 2, 3, 5],
        });
        let RunResponse::Snapshots { snapshots, missing } = answer else {
            panic!("not a snapshots answer: {answer:?}");
        };
        assert_eq!(missing, vec![4]);
        let seqs: Vec<u64> = snapshots.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2], "three thirds fill the budget");
    }
}
