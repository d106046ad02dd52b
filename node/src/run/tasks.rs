//! The slow parts of a run that a node does on behalf of its state machine: fetching
//! and preparing a plan bundle, taking clock samples, re-fetching missed seconds. Each
//! is a task that answers with one message to the driver; none touches run state.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use stampede_protocol::mesh::{MeshRequest, MeshResponse};
use stampede_protocol::run::{clock_offset, unix_us, RunRequest, RunResponse, SnapshotMessage};
use tokio::sync::{mpsc, oneshot};

use crate::mesh::MeshCommand;
use crate::plan::compile::CompiledPlan;

/// How often a member asks the origin for the plan bundle before it refuses the run,
/// and the pause before the next try (times the attempt): all within the join window.
const BUNDLE_ATTEMPTS: u32 = 4;
const BUNDLE_RETRY_AFTER: Duration = Duration::from_millis(200);
/// Clock samples per member; the one with the smallest round trip is kept.
const CLOCK_SAMPLES: usize = 8;

/// What a task reports back.
pub enum Done {
    Prepared {
        run_id: String,
        /// The plan, compiled, and this node's refusal to send its load, if it refuses.
        result: Result<(Arc<CompiledPlan>, Option<String>), String>,
    },
    Clock {
        run_id: String,
        offset_us: i64,
    },
    Fetched {
        run_id: String,
        node: String,
        snapshots: Vec<SnapshotMessage>,
        missing: Vec<u64>,
    },
    /// A member's answer to a request for its own totals, or why there is none.
    Own {
        run_id: String,
        node: String,
        answer: Result<RunResponse, String>,
    },
}

/// Why a request to a peer got no answer.
pub enum AskError {
    /// The mesh could not carry it (no connection, a failed dial, a closed stream):
    /// worth trying again.
    Transport(String),
    /// Anything else (a timeout, the mesh gone, a bad peer id): not.
    Other(String),
}

/// Sends a run request to a peer and waits for the answer, at most `limit`.
pub async fn ask(
    mesh: &mpsc::Sender<MeshCommand>,
    peer: &str,
    req: RunRequest,
    limit: Duration,
) -> Result<MeshResponse, AskError> {
    let peer: PeerId = peer
        .parse()
        .map_err(|_| AskError::Other(format!("`{peer}` is not a peer id")))?;
    let (reply, rx) = oneshot::channel();
    mesh.send(MeshCommand::Request {
        peer,
        request: MeshRequest::Run(req),
        reply,
    })
    .await
    .map_err(|_| AskError::Other("the mesh went away".into()))?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(answer))) => Ok(answer),
        Ok(Ok(Err(e))) => Err(AskError::Transport(e)),
        Ok(Err(_)) => Err(AskError::Other("the mesh went away".into())),
        Err(_) => Err(AskError::Other("timed out".into())),
    }
}

/// Fetches the bundle from the origin, verifies its hash and prepares the plan.
pub fn fetch_bundle(
    mesh: mpsc::Sender<MeshCommand>,
    tx: mpsc::UnboundedSender<Done>,
    run_id: String,
    origin: String,
    hash: String,
    data_dir: std::path::PathBuf,
    allow: Vec<String>,
) {
    tokio::spawn(async move {
        let request = RunRequest::Bundle {
            run_id: run_id.clone(),
            hash: hash.clone(),
        };
        // A member that learnt of the origin through gossip may have no connection
        // to it yet, and the first dial can fail (two nodes dialling each other at
        // once): a failed request is tried again, within the join window.
        let mut attempt = 0;
        let asked = std::time::Instant::now();
        let answer = loop {
            attempt += 1;
            match ask(&mesh, &origin, request.clone(), Duration::from_secs(10)).await {
                Err(AskError::Transport(e)) if attempt < BUNDLE_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "plan bundle request failed; trying again");
                    tokio::time::sleep(BUNDLE_RETRY_AFTER * attempt).await;
                }
                other => break other,
            }
        };
        tracing::debug!(target: super::timeline::TARGET, run = %run_id, attempt, ms = asked.elapsed().as_millis() as u64, ok = answer.is_ok(), "bundle fetched");
        let result = match answer {
            Ok(MeshResponse::Run(RunResponse::Bundle { bundle })) => {
                if bundle.hash() != hash {
                    Err("the plan bundle does not match its hash".to_string())
                } else {
                    crate::plan::bundle::prepare_bundle(&bundle, &data_dir, &run_id, &allow)
                }
            }
            Ok(MeshResponse::Run(RunResponse::Refused { reason })) => Err(reason),
            Ok(_) => Err("unexpected answer to a bundle request".into()),
            Err(AskError::Transport(e) | AskError::Other(e)) => {
                Err(format!("cannot fetch the plan from the origin: {e}"))
            }
        };
        let _ = tx.send(Done::Prepared { run_id, result });
    });
}

/// Takes clock samples of `peer` and reports the offset of the fastest round trip.
pub fn sync_clock(
    mesh: mpsc::Sender<MeshCommand>,
    tx: mpsc::UnboundedSender<Done>,
    run_id: String,
    peer: String,
) {
    tokio::spawn(async move {
        let mut best: Option<(u64, i64)> = None;
        let began = std::time::Instant::now();
        let mut samples = Vec::with_capacity(CLOCK_SAMPLES);
        for _ in 0..CLOCK_SAMPLES {
            // Re-stamped by the codec as it sends the request.
            let req = RunRequest::Clock {
                t1_us: unix_us(),
                arrived_us: None,
            };
            if let Ok(MeshResponse::Run(RunResponse::Clock {
                t1_us,
                t2_us,
                t3_us,
                received_us,
            })) = ask(&mesh, &peer, req, Duration::from_secs(2)).await
            {
                // Every stamp of the sample is a codec's, at the wire, so the event
                // loops and this task count in neither direction.
                let t4 = received_us.unwrap_or_else(unix_us);
                let (off, rtt) = clock_offset(t1_us, t2_us, t3_us, t4);
                samples.push((rtt, off));
                if best.is_none_or(|(r, _)| rtt < r) {
                    best = Some((rtt, off));
                }
            }
        }
        if best.is_none() {
            tracing::warn!(run = %run_id, "no clock sample answered: offset taken as 0");
        }
        let offset_us = best.map(|(_, o)| o).unwrap_or(0);
        tracing::debug!(target: super::timeline::TARGET, run = %run_id, ms = began.elapsed().as_millis() as u64, offset_us, samples = ?samples, "clock samples (rtt, offset)");
        let _ = tx.send(Done::Clock { run_id, offset_us });
    });
}

/// Asks a member for seconds it published.
pub fn fetch_seconds(
    mesh: mpsc::Sender<MeshCommand>,
    tx: mpsc::UnboundedSender<Done>,
    run_id: String,
    node: String,
    seqs: Vec<u64>,
) {
    tokio::spawn(async move {
        let req = RunRequest::Snapshots {
            run_id: run_id.clone(),
            node: node.clone(),
            seqs,
        };
        if let Ok(MeshResponse::Run(RunResponse::Snapshots { snapshots, missing })) =
            ask(&mesh, &node, req, Duration::from_secs(5)).await
        {
            let _ = tx.send(Done::Fetched {
                run_id,
                node,
                snapshots,
                missing,
            });
        }
    });
}

/// How long a member has to answer for its own totals (the run machine counts the ask
/// failed then, and may ask again).
const OWN_TIMEOUT: Duration =
    Duration::from_micros(stampede_protocol::machine::ledger::OWN_TIMEOUT_US);

/// Asks a member for its own totals (tree aggregation); always answers `Own`, so the
/// run machine learns of a failure as soon as it happens.
pub fn fetch_own(
    mesh: mpsc::Sender<MeshCommand>,
    tx: mpsc::UnboundedSender<Done>,
    run_id: String,
    node: String,
    req: RunRequest,
) {
    tokio::spawn(async move {
        let answer = match ask(&mesh, &node, req, OWN_TIMEOUT).await {
            Ok(MeshResponse::Run(r)) => Ok(r),
            Ok(MeshResponse::Refused { reason }) => Ok(RunResponse::Refused { reason }),
            Ok(_) => Err("not a run answer".to_string()),
            Err(AskError::Transport(e) | AskError::Other(e)) => Err(e),
        };
        let _ = tx.send(Done::Own {
            run_id,
            node,
            answer,
        });
    });
}
