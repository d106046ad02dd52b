//! The node's half of snapshot aggregation in a tree (docs/protocol.md §10): sending
//! its own seconds up, holding and merging what it aggregates, forwarding or
//! gossiping a merged second, and putting a root's merge into the run's aggregate.
//! Every decision (to whom, when, whether a merge is taken) is the run machine's
//! (`stampede_protocol::machine::tree`); this only moves and adds measurements.
//!
//! Must not decide which seconds count: it does what `SendSnapshot`, `Hold`,
//! `Forward` and `MergeBatch` say.

use stampede_protocol::mesh::{GossipBody, MeshRequest};
use stampede_protocol::run::{covers_bitmap, BatchMessage, RunRequest, SnapshotMessage};
use stampede_protocol::snapshot::Metrics;

use super::{publish, Driver};
use crate::mesh::MeshCommand;

/// What an aggregator holds of one second: the merge so far and whom it covers.
pub(super) struct Bucket {
    metrics: Metrics,
    covers: Vec<u32>,
    vus: u64,
    cpu: f64,
}

/// The environment variable that turns tree aggregation on for the runs this node
/// starts, with its fan-in (2..=1024); unset, runs aggregate all to all. The roster
/// carries the choice to every member.
pub const FAN_IN_ENV: &str = "STAMPEDE_FAN_IN";

/// The aggregation the runs this node starts use.
pub(super) fn aggregation() -> stampede_protocol::machine::Aggregation {
    use stampede_protocol::machine::Aggregation;
    match std::env::var(FAN_IN_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(f) if (2..=stampede_protocol::run::MAX_MEMBERS).contains(&f) => {
            Aggregation::Tree { fan_in: f }
        }
        _ => Aggregation::AllToAll,
    }
}

impl Driver {
    /// This node's own snapshot of a second: the one at hand, or from its store.
    fn own_second(&self, run_id: &str, seq: u64) -> Option<SnapshotMessage> {
        if let Some(s) = self
            .current
            .as_ref()
            .filter(|s| s.run_id == run_id && s.seq == seq)
        {
            return Some(s.clone());
        }
        let store = match self.store.snapshots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        store.get(&(run_id.to_string(), seq)).cloned()
    }

    fn my_index(&self, run_id: &str) -> Option<u32> {
        self.runs
            .get(run_id)
            .and_then(|r| r.machine.my_index())
            .map(|i| i as u32)
    }

    pub(super) fn send_snapshot(&mut self, run_id: &str, seq: u64, to: &str) {
        let (Some(s), Some(me), Ok(peer)) = (
            self.own_second(run_id, seq),
            self.my_index(run_id),
            to.parse::<libp2p::PeerId>(),
        ) else {
            return;
        };
        let batch = BatchMessage {
            run_id: run_id.to_string(),
            seq,
            covers: covers_bitmap(&[me]),
            vus: s.vus,
            cpu: s.cpu,
            metrics: s.metrics,
        };
        let request = MeshRequest::Run(RunRequest::Batch(Box::new(batch)));
        // Best effort: a second lost here is fetched one by one at the end.
        let _ = self.mesh.try_send(MeshCommand::Send { peer, request });
    }

    pub(super) fn hold(&mut self, run_id: &str, seq: u64, own: bool) {
        let (bytes, covers, vus, cpu) = if own {
            let (Some(s), Some(me)) = (self.own_second(run_id, seq), self.my_index(run_id)) else {
                return;
            };
            (s.metrics, vec![me], s.vus, s.cpu)
        } else {
            let Some(b) = self
                .current_batch
                .as_ref()
                .filter(|b| b.run_id == run_id && b.seq == seq)
            else {
                return;
            };
            let n = self
                .runs
                .get(run_id)
                .map_or(0, |r| r.machine.roster().len());
            let Ok(covers) = stampede_protocol::run::covers_indices(&b.covers, n) else {
                return;
            };
            (b.metrics.clone(), covers, b.vus, b.cpu)
        };
        let metrics = match Metrics::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                // The machine counts it held: the merge that goes up will say it
                // covers a second it lacks. Logged; a plan mismatch is a bug or a lie.
                tracing::warn!(run = run_id, seq, error = %e, "a second to aggregate does not decode");
                return;
            }
        };
        let key = (run_id.to_string(), seq);
        match self.buckets.get_mut(&key) {
            Some(b) => {
                if let Err(e) = b.metrics.merge(&metrics) {
                    tracing::warn!(run = run_id, seq, error = %e, "a second to aggregate does not fit the plan");
                    return;
                }
                b.covers.extend(covers);
                b.vus = b.vus.saturating_add(vus);
                b.cpu = b.cpu.max(cpu);
            }
            None => {
                self.buckets.insert(
                    key,
                    Bucket {
                        metrics,
                        covers,
                        vus,
                        cpu,
                    },
                );
            }
        }
    }

    pub(super) fn forward(&mut self, run_id: &str, seq: u64, to: Option<String>, covers: &[u32]) {
        let Some(mut b) = self.buckets.remove(&(run_id.to_string(), seq)) else {
            return;
        };
        b.covers.sort_unstable();
        if b.covers != covers {
            // Only when a second it was told to hold did not decode: the merge says
            // whom its measurements really hold, so that no node counts a member's
            // second it lacks (that member's is fetched one by one at the end).
            tracing::error!(run = run_id, seq, held = ?b.covers, told = ?covers, "an aggregated second covers other members than the run machine holds");
        }
        let batch = BatchMessage {
            run_id: run_id.to_string(),
            seq,
            covers: covers_bitmap(&b.covers),
            vus: b.vus,
            cpu: b.cpu,
            metrics: b.metrics.encode(),
        };
        match to {
            Some(to) => {
                let Ok(peer) = to.parse::<libp2p::PeerId>() else {
                    return;
                };
                let request = MeshRequest::Run(RunRequest::Batch(Box::new(batch)));
                let _ = self.mesh.try_send(MeshCommand::Send { peer, request });
            }
            None => {
                // The root: to every node, and (a `MergeBatch` follows) into its own.
                publish(&self.mesh, GossipBody::Batch(Box::new(batch.clone())), true);
                self.current_batch = Some(batch);
            }
        }
    }

    /// Drops what this node still holds of a run (it is done with it).
    pub(super) fn drop_buckets(&mut self, run_id: &str) {
        self.buckets.retain(|(r, _), _| r != run_id);
    }
}
