//! What a node offers its peers of the runs it takes part in: plan bundles it
//! proposed and the snapshots it published, shared with the mesh event loop so that
//! it answers peers' requests without a round trip through the run driver.
//!
//! Must not decide anything about a run; it only keeps and answers.

use std::collections::HashMap;
use std::sync::Mutex;

use stampede_protocol::run::{
    unix_us, Bundle, RunRequest, RunResponse, SnapshotMessage, SNAPSHOTS_PER_REQUEST,
    SNAPSHOT_ANSWER_BYTES,
};

/// Bundles and own snapshots, shared with the mesh event loop so that it can answer
/// peers' requests without a round trip through the actor.
#[derive(Default)]
pub struct RunStore {
    pub(crate) bundles: Mutex<HashMap<String, Bundle>>,
    pub(crate) snapshots: Mutex<HashMap<(String, u64), SnapshotMessage>>,
}

impl RunStore {
    /// Answers a peer's run request (called on the event loop: must be quick).
    pub fn respond(&self, req: RunRequest) -> RunResponse {
        match req {
            RunRequest::Clock { t1_us } => {
                let t = unix_us();
                RunResponse::Clock {
                    t1_us,
                    t2_us: t,
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
            RunRequest::Snapshots { run_id, seqs, .. } => {
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
                RunResponse::Snapshots { snapshots, missing }
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
