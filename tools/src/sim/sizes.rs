//! Real encoded sizes of the per-second measurements, for the simulator's traffic
//! figures: a `Metrics` of a one-step plan with `k` requests recorded in its real
//! HdrHistograms (latencies spread like a web service's: a log-normal around 20 ms),
//! encoded as a snapshot on today's all-to-all gossip (`SnapshotMessage`, its metrics
//! an integer array) and as a tree's batch (`BatchMessage`, a byte string).
//!
//! Must not decide anything: it only measures bytes.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stampede_protocol::mesh::{to_cbor, GossipBody};
use stampede_protocol::run::{BatchMessage, SnapshotMessage};
use stampede_protocol::snapshot::{Layout, Metrics, SeriesKey};

/// The largest power of two of requests a second is measured with (the simulator's
/// rate is at most 100,000 a second).
const MAX_LOG2: u32 = 17;

/// Encoded sizes by requests in the second (rounded up to a power of two).
pub struct Sizes {
    /// (snapshot message bytes, batch message bytes without its covers bitmap).
    by_log2: Vec<(u64, u64)>,
}

impl Default for Sizes {
    fn default() -> Self {
        Self::new()
    }
}

impl Sizes {
    pub fn new() -> Sizes {
        let layout = Layout {
            scenarios: vec!["browse".into()],
            flows: vec!["home".into()],
            flow_slots: vec![(0, 0)],
            series: vec![SeriesKey {
                scenario: 0,
                flow: 0,
                step: 0,
                step_name: "GET /".into(),
            }],
        };
        let mut rng = SmallRng::seed_from_u64(20);
        let mut by_log2 = Vec::new();
        for log2 in 0..=MAX_LOG2 {
            let k = if log2 == 0 { 0 } else { 1u64 << (log2 - 1) };
            let mut m = Metrics::new(&layout);
            for _ in 0..k {
                // Box-Muller: a log-normal latency around 20 ms, sigma 0.6.
                let (u1, u2): (f64, f64) = (rng.random_range(1e-9..1.0), rng.random());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                let us = (20_000.0 * (0.6 * z).exp()) as u64 + 1;
                let s = &mut m.series[0];
                s.latency.record(us);
                s.service
                    .record(us.saturating_sub(rng.random_range(0..200)).max(1));
                s.requests += 1;
                s.bytes_received += 2_000;
                s.bytes_sent += 300;
                let sc = &mut m.scenarios[0];
                sc.iterations += 1;
                sc.schedule_lag.record(rng.random_range(1..2_000));
                sc.iteration_duration.record(us + 50);
            }
            m.flow_iterations[0] = k;
            let metrics = m.encode();
            let snapshot = to_cbor(&GossipBody::Snapshot(Box::new(SnapshotMessage {
                run_id: "6932a8b2-0f3c".into(),
                // A real peer id's length.
                node: "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo".into(),
                seq: 1000,
                vus: 100,
                cpu: 0.25,
                metrics: metrics.clone(),
            })))
            .len() as u64;
            let batch = to_cbor(&GossipBody::Batch(Box::new(BatchMessage {
                run_id: "6932a8b2-0f3c".into(),
                seq: 1000,
                covers: Vec::new(),
                vus: 100,
                cpu: 0.25,
                metrics,
            })))
            .len() as u64;
            by_log2.push((snapshot, batch));
        }
        Sizes { by_log2 }
    }

    fn entry(&self, requests: u64) -> (u64, u64) {
        let log2 = if requests == 0 {
            0
        } else {
            (64 - (requests - 1).leading_zeros()).min(MAX_LOG2) as usize + 1
        };
        self.by_log2[log2.min(self.by_log2.len() - 1)]
    }

    /// A member's snapshot of a second with `requests` requests, on all-to-all gossip.
    pub fn snapshot(&self, requests: u64) -> u64 {
        self.entry(requests).0
    }

    /// A batch of `requests` requests covering members up to roster index `highest`.
    pub fn batch(&self, requests: u64, highest: u32) -> u64 {
        self.entry(requests).1 + highest as u64 / 8 + 1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_grow_with_requests_and_a_batch_is_smaller_than_a_snapshot() {
        let s = super::Sizes::new();
        assert!(s.snapshot(0) < s.snapshot(100) && s.snapshot(100) < s.snapshot(10_000));
        assert!(s.batch(100, 0) < s.snapshot(100));
        assert!(s.batch(1000, 999) > s.batch(1000, 0));
    }
}
