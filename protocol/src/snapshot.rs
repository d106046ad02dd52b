//! Measurements in a form that merges exactly: [`Metrics`] is a bag of counters and
//! HdrHistograms laid out by the plan, and merging two bags adds them.
//!
//! Merge is associative and commutative (merge(merge(a,b),c) = merge(a,merge(b,c))), so
//! a worker thread's second, a node's second, a whole run, or a region's share can all
//! be combined at any level, in any order, and percentiles are read only from the merged
//! histograms — never averaged. This module must not know about time, threads or the
//! network: it only holds numbers and encodes them.

use hdrhistogram::serialization::{Deserializer as HistDe, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Significant digits kept by every latency histogram (±0.1 %).
pub const SIGFIG: u8 = 3;

/// Classes of failed requests, the "errors" golden signal (spec §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    Connect = 0,
    Timeout = 1,
    Tls = 2,
    Dns = 3,
    Http4xx = 4,
    Http5xx = 5,
    CheckFailed = 6,
    /// The target refused by this node's allowlist: no traffic was sent.
    Refused = 7,
    /// A protocol error, a bad response, a template that rendered an invalid request.
    Other = 8,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::Connect,
        ErrorClass::Timeout,
        ErrorClass::Tls,
        ErrorClass::Dns,
        ErrorClass::Http4xx,
        ErrorClass::Http5xx,
        ErrorClass::CheckFailed,
        ErrorClass::Refused,
        ErrorClass::Other,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Connect => "connect",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Tls => "tls",
            ErrorClass::Dns => "dns",
            ErrorClass::Http4xx => "http_4xx",
            ErrorClass::Http5xx => "http_5xx",
            ErrorClass::CheckFailed => "check_failed",
            ErrorClass::Refused => "refused",
            ErrorClass::Other => "other",
        }
    }
}

pub const ERROR_CLASSES: usize = ErrorClass::ALL.len();

/// A latency histogram in microseconds, auto-resizing so that a 5-minute response
/// never panics or is clipped.
#[derive(Clone)]
pub struct Hist(pub Histogram<u64>);

impl std::fmt::Debug for Hist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Hist(n={}, min={}, max={})",
            self.0.len(),
            self.0.min(),
            self.0.max()
        )
    }
}

/// Equal when they hold the same recorded values, whatever their current size.
impl PartialEq for Hist {
    fn eq(&self, o: &Hist) -> bool {
        self.0.len() == o.0.len()
            && self
                .0
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .eq(o
                    .0
                    .iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value())))
    }
}

impl Default for Hist {
    fn default() -> Self {
        let mut h = Histogram::new(SIGFIG).expect("3 significant digits is valid");
        h.auto(true);
        Hist(h)
    }
}

impl Hist {
    /// Records a value in microseconds; 0 is recorded as 1 µs (the lowest trackable).
    #[inline]
    pub fn record(&mut self, us: u64) {
        // Auto-resize makes recording infallible for any u64 below the histogram's
        // hard limit; saturate anyway rather than panic on a corrupt clock.
        let _ = self.0.record(us.max(1));
    }
    pub fn add(&mut self, other: &Hist) {
        // Same significant digits on both sides and auto-resize on ours: add cannot fail
        // short of memory exhaustion; keep going rather than lose the rest of a merge.
        let _ = self.0.add(&other.0);
    }
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut buf)
            .map_err(|e| serde::ser::Error::custom(format!("histogram: {e:?}")))?;
        s.serialize_bytes(&buf)
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes_compat::ByteBuf = Deserialize::deserialize(d)?;
        let mut h: Histogram<u64> = HistDe::new()
            .deserialize(&mut &bytes.0[..])
            .map_err(|e| serde::de::Error::custom(format!("histogram: {e:?}")))?;
        h.auto(true);
        Ok(Hist(h))
    }
}

/// A byte string for serde without another crate: accepts CBOR bytes or a sequence.
pub(crate) mod serde_bytes_compat {
    use serde::de::{SeqAccess, Visitor};
    use serde::Deserialize;

    pub struct ByteBuf(pub Vec<u8>);

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(ByteBuf(out))
                }
            }
            // byte_buf, not bytes: ciborium serves borrowed bytes only up to its scratch
            // buffer (4 KiB); a larger histogram or data file must be read into a Vec.
            d.deserialize_byte_buf(V)
        }
    }
}

/// What happened to the requests of one series (one step of one flow of one scenario).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesStats {
    /// Latency from the intended time (open model) — what a user waited.
    pub latency: Hist,
    /// Service time from the actual send — what the target took.
    pub service: Hist,
    pub requests: u64,
    pub failed: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub errors: [u64; ERROR_CLASSES],
    pub checks_passed: u64,
    pub checks_failed: u64,
}

impl SeriesStats {
    pub fn add(&mut self, o: &SeriesStats) {
        self.latency.add(&o.latency);
        self.service.add(&o.service);
        self.requests += o.requests;
        self.failed += o.failed;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            *a += b;
        }
        self.checks_passed += o.checks_passed;
        self.checks_failed += o.checks_failed;
    }
    pub fn reset(&mut self) {
        let (l, s) = (
            std::mem::take(&mut self.latency),
            std::mem::take(&mut self.service),
        );
        *self = SeriesStats {
            latency: l,
            service: s,
            ..Default::default()
        };
        self.latency.reset();
        self.service.reset();
    }
}

/// What happened to the iterations of one scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioStats {
    pub iterations: u64,
    /// Iterations in which a request or a check failed.
    pub failed_iterations: u64,
    /// Arrivals that could not start because every VU was busy (open model).
    pub dropped: u64,
    /// How late iterations started against their intended time (open model).
    pub schedule_lag: Hist,
    pub iteration_duration: Hist,
}

impl ScenarioStats {
    pub fn add(&mut self, o: &ScenarioStats) {
        self.iterations += o.iterations;
        self.failed_iterations += o.failed_iterations;
        self.dropped += o.dropped;
        self.schedule_lag.add(&o.schedule_lag);
        self.iteration_duration.add(&o.iteration_duration);
    }
    pub fn reset(&mut self) {
        self.iterations = 0;
        self.failed_iterations = 0;
        self.dropped = 0;
        self.schedule_lag.reset();
        self.iteration_duration.reset();
    }
}

/// Every counter and histogram of a node (or of a worker thread, or of the whole mesh)
/// over some interval, laid out by the plan's [`Layout`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Indexed by series (see [`Layout::series`]).
    pub series: Vec<SeriesStats>,
    /// Indexed by scenario.
    pub scenarios: Vec<ScenarioStats>,
    /// Iterations per (scenario, flow) pair, indexed as [`Layout::flow_slots`].
    pub flow_iterations: Vec<u64>,
}

/// Errors from a [`Metrics`] merge or decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    #[error("metrics layouts differ ({0})")]
    Layout(&'static str),
    #[error("cannot decode metrics: {0}")]
    Decode(String),
}

impl Metrics {
    pub fn new(layout: &Layout) -> Metrics {
        Metrics {
            series: vec![SeriesStats::default(); layout.series.len()],
            scenarios: vec![ScenarioStats::default(); layout.scenarios.len()],
            flow_iterations: vec![0; layout.flow_slots.len()],
        }
    }

    /// Adds `o` into `self`. Both must come from the same plan.
    pub fn merge(&mut self, o: &Metrics) -> Result<(), MetricsError> {
        if self.series.len() != o.series.len() {
            return Err(MetricsError::Layout("series"));
        }
        if self.scenarios.len() != o.scenarios.len() {
            return Err(MetricsError::Layout("scenarios"));
        }
        if self.flow_iterations.len() != o.flow_iterations.len() {
            return Err(MetricsError::Layout("flows"));
        }
        for (a, b) in self.series.iter_mut().zip(&o.series) {
            a.add(b);
        }
        for (a, b) in self.scenarios.iter_mut().zip(&o.scenarios) {
            a.add(b);
        }
        for (a, b) in self.flow_iterations.iter_mut().zip(&o.flow_iterations) {
            *a += b;
        }
        Ok(())
    }

    /// Empties every counter and histogram but keeps their memory.
    pub fn reset(&mut self) {
        self.series.iter_mut().for_each(SeriesStats::reset);
        self.scenarios.iter_mut().for_each(ScenarioStats::reset);
        self.flow_iterations.iter_mut().for_each(|c| *c = 0);
    }

    pub fn total_requests(&self) -> u64 {
        self.series.iter().map(|s| s.requests).sum()
    }

    /// CBOR bytes (histograms inside in HdrHistogram's V2 format).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Metrics, MetricsError> {
        ciborium::from_reader(bytes).map_err(|e| MetricsError::Decode(e.to_string()))
    }
}

/// Names for the indices of [`Metrics`], derived from the plan the same way on every
/// node: one series per (scenario, flow, step) that the plan can run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub scenarios: Vec<String>,
    pub flows: Vec<String>,
    /// (scenario index, flow index) for every flow a scenario runs.
    pub flow_slots: Vec<(usize, usize)>,
    pub series: Vec<SeriesKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesKey {
    pub scenario: usize,
    pub flow: usize,
    /// Index of the step inside its flow.
    pub step: usize,
    pub step_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            scenarios: vec!["s".into()],
            flows: vec!["f".into()],
            flow_slots: vec![(0, 0)],
            series: vec![
                SeriesKey {
                    scenario: 0,
                    flow: 0,
                    step: 0,
                    step_name: "a".into(),
                },
                SeriesKey {
                    scenario: 0,
                    flow: 0,
                    step: 1,
                    step_name: "b".into(),
                },
            ],
        }
    }

    fn sample(seed: u64, n: u64) -> Metrics {
        let mut m = Metrics::new(&layout());
        let mut x = seed;
        for i in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 40) % 2_000_000 + 1;
            let s = &mut m.series[(i % 2) as usize];
            s.latency.record(v);
            s.service.record(v / 2);
            s.requests += 1;
            if v.is_multiple_of(7) {
                s.failed += 1;
                s.errors[ErrorClass::Http5xx as usize] += 1;
            }
        }
        m.scenarios[0].iterations = n / 2;
        m.flow_iterations[0] = n / 2;
        m
    }

    #[test]
    fn merge_is_associative_and_exact() {
        let (a, b, c) = (sample(1, 5000), sample(2, 3000), sample(3, 7000));
        let mut left = a.clone();
        left.merge(&b).unwrap();
        left.merge(&c).unwrap();
        let mut bc = b.clone();
        bc.merge(&c).unwrap();
        let mut right = a.clone();
        right.merge(&bc).unwrap();
        assert_eq!(left, right);
        assert_eq!(left.total_requests(), 15_000);
        // Percentiles of the merged histogram equal those of one histogram fed all values.
        let mut one = Hist::default();
        for m in [&a, &b, &c] {
            for s in &m.series {
                for v in s.latency.0.iter_recorded() {
                    one.0
                        .record_n(v.value_iterated_to(), v.count_at_value())
                        .unwrap();
                }
            }
        }
        let mut merged_all = left.series[0].latency.clone();
        merged_all.add(&left.series[1].latency);
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(
                merged_all.0.value_at_quantile(q),
                one.0.value_at_quantile(q)
            );
        }
    }

    #[test]
    fn encode_round_trip_and_garbage() {
        let m = sample(9, 1000);
        let back = Metrics::decode(&m.encode()).unwrap();
        assert_eq!(m, back);
        assert!(Metrics::decode(b"\xff\x00garbage").is_err());
        let mut other = Metrics::new(&Layout::default());
        assert!(other.merge(&m).is_err());
    }

    #[test]
    fn large_histograms_round_trip() {
        // Many distinct values: the V2 encoding is well over ciborium's 4 KiB scratch.
        let mut m = Metrics::new(&layout());
        for v in 1..200_000u64 {
            m.series[0].latency.record(v * 7);
        }
        let bytes = m.encode();
        assert!(bytes.len() > 8192, "{} bytes", bytes.len());
        assert_eq!(Metrics::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn reset_keeps_layout() {
        let mut m = sample(4, 100);
        m.reset();
        assert_eq!(m, Metrics::new(&layout()));
    }

    #[test]
    fn huge_values_do_not_panic() {
        let mut h = Hist::default();
        h.record(3_600_000_000 * 5);
        h.record(0);
        assert_eq!(h.len(), 2);
    }
}
