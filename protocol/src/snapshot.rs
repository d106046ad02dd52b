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

use crate::named::NamedMetrics;

/// Significant digits kept by every latency histogram (±0.1 %).
pub const SIGFIG: u8 = 3;

/// The largest value a histogram tracks, in µs (2^40 µs, about 12.7 days): larger values
/// are recorded as this one. Bounds a histogram's memory (about 260 KB at [`SIGFIG`]), so a
/// few bytes from a peer that claim a huge range cannot make a receiver allocate more.
pub const MAX_TRACKABLE_US: u64 = 1 << 40;

/// Histogram memory a [`Metrics::decode`] may allocate, beyond
/// [`DECODE_BYTES_PER_BYTE`] per byte received: a legitimate second of a plan with a few
/// hundred series fits; a hostile message is refused before the histograms exist.
pub const DECODE_BASE_BUDGET: usize = 64 * 1024 * 1024;

/// Histogram memory a [`Metrics::decode`] may allocate per byte received, on top of
/// [`DECODE_BASE_BUDGET`].
pub const DECODE_BYTES_PER_BYTE: usize = 64;

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
    /// A gRPC call whose server answered a status the step does not accept, one class
    /// per status (CANCELLED = 1 .. UNAUTHENTICATED = 16), like `http_4xx` for HTTP.
    GrpcCancelled = 9,
    GrpcUnknown = 10,
    GrpcInvalidArgument = 11,
    GrpcDeadlineExceeded = 12,
    GrpcNotFound = 13,
    GrpcAlreadyExists = 14,
    GrpcPermissionDenied = 15,
    GrpcResourceExhausted = 16,
    GrpcFailedPrecondition = 17,
    GrpcAborted = 18,
    GrpcOutOfRange = 19,
    GrpcUnimplemented = 20,
    GrpcInternal = 21,
    GrpcUnavailable = 22,
    GrpcDataLoss = 23,
    GrpcUnauthenticated = 24,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 25] = [
        ErrorClass::Connect,
        ErrorClass::Timeout,
        ErrorClass::Tls,
        ErrorClass::Dns,
        ErrorClass::Http4xx,
        ErrorClass::Http5xx,
        ErrorClass::CheckFailed,
        ErrorClass::Refused,
        ErrorClass::Other,
        ErrorClass::GrpcCancelled,
        ErrorClass::GrpcUnknown,
        ErrorClass::GrpcInvalidArgument,
        ErrorClass::GrpcDeadlineExceeded,
        ErrorClass::GrpcNotFound,
        ErrorClass::GrpcAlreadyExists,
        ErrorClass::GrpcPermissionDenied,
        ErrorClass::GrpcResourceExhausted,
        ErrorClass::GrpcFailedPrecondition,
        ErrorClass::GrpcAborted,
        ErrorClass::GrpcOutOfRange,
        ErrorClass::GrpcUnimplemented,
        ErrorClass::GrpcInternal,
        ErrorClass::GrpcUnavailable,
        ErrorClass::GrpcDataLoss,
        ErrorClass::GrpcUnauthenticated,
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
            ErrorClass::GrpcCancelled => "grpc_cancelled",
            ErrorClass::GrpcUnknown => "grpc_unknown",
            ErrorClass::GrpcInvalidArgument => "grpc_invalid_argument",
            ErrorClass::GrpcDeadlineExceeded => "grpc_deadline_exceeded",
            ErrorClass::GrpcNotFound => "grpc_not_found",
            ErrorClass::GrpcAlreadyExists => "grpc_already_exists",
            ErrorClass::GrpcPermissionDenied => "grpc_permission_denied",
            ErrorClass::GrpcResourceExhausted => "grpc_resource_exhausted",
            ErrorClass::GrpcFailedPrecondition => "grpc_failed_precondition",
            ErrorClass::GrpcAborted => "grpc_aborted",
            ErrorClass::GrpcOutOfRange => "grpc_out_of_range",
            ErrorClass::GrpcUnimplemented => "grpc_unimplemented",
            ErrorClass::GrpcInternal => "grpc_internal",
            ErrorClass::GrpcUnavailable => "grpc_unavailable",
            ErrorClass::GrpcDataLoss => "grpc_data_loss",
            ErrorClass::GrpcUnauthenticated => "grpc_unauthenticated",
        }
    }

    /// The class of a gRPC call that ended with status `code`: `None` for OK (0) and for
    /// a code gRPC does not define.
    pub fn grpc(code: u32) -> Option<ErrorClass> {
        match code {
            1..=16 => Some(ErrorClass::ALL[ErrorClass::GrpcCancelled as usize - 1 + code as usize]),
            _ => None,
        }
    }

    /// The class called `name`, if there is one.
    pub fn parse(name: &str) -> Option<ErrorClass> {
        ErrorClass::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Every name, comma-separated (for error messages).
    pub fn names() -> String {
        ErrorClass::ALL.map(ErrorClass::name).join(", ")
    }
}

pub const ERROR_CLASSES: usize = ErrorClass::ALL.len();

/// The classes every build sends and reads as the fixed array `errors` of a series; the
/// classes after them travel in `errors_more` (see [`SeriesStats`]'s encoding).
pub const LEGACY_ERROR_CLASSES: usize = 9;

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
        // Two empty ones are equal without a walk of their counts (an empty second is
        // recognised this way once per node second, see reports/aggregate.rs).
        if self.0.is_empty() && o.0.is_empty() {
            return true;
        }
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
    /// Records a value in microseconds; 0 is recorded as 1 µs (the lowest trackable),
    /// anything above [`MAX_TRACKABLE_US`] as that.
    #[inline]
    pub fn record(&mut self, us: u64) {
        // Auto-resize makes recording infallible; the cap keeps every histogram one that
        // a receiver accepts (see `check_v2_header`).
        let _ = self.0.record(us.clamp(1, MAX_TRACKABLE_US));
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
        let memory = check_v2_header(&bytes.0)
            .map_err(|e| serde::de::Error::custom(format!("histogram: {e}")))?;
        take_from_budget(memory).map_err(serde::de::Error::custom)?;
        let mut h: Histogram<u64> = HistDe::new()
            .deserialize(&mut &bytes.0[..])
            .map_err(|e| serde::de::Error::custom(format!("histogram: {e:?}")))?;
        h.auto(true);
        Ok(Hist(h))
    }
}

/// The V2 header: cookie, payload length, normalizing offset, digits, low, high, ratio.
const V2_HEADER_BYTES: usize = 40;
/// HdrHistogram's cookie of an uncompressed V2 histogram (the only kind we write).
const V2_COOKIE: u32 = 0x1c84_9303 | 0x10;

/// Checks a V2 histogram's header against what we write, before the hdrhistogram crate
/// trusts it: the crate allocates `payload_len` and a counts array sized by `high` as
/// read. Returns the bytes its counts array will take.
fn check_v2_header(bytes: &[u8]) -> Result<usize, String> {
    let Some(header) = bytes.get(..V2_HEADER_BYTES) else {
        return Err(format!(
            "{} bytes, shorter than the {V2_HEADER_BYTES}-byte header",
            bytes.len()
        ));
    };
    let u32_at = |i: usize| u32::from_be_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(0) != V2_COOKIE {
        return Err(format!(
            "cookie {:#x} is not an uncompressed V2 histogram",
            u32_at(0)
        ));
    }
    let payload = u32_at(4) as usize;
    let present = bytes.len() - V2_HEADER_BYTES;
    if payload != present {
        return Err(format!(
            "header claims {payload} payload bytes, {present} are present"
        ));
    }
    if u32_at(12) != u32::from(SIGFIG) {
        return Err(format!(
            "{} significant digits, expected {SIGFIG}",
            u32_at(12)
        ));
    }
    let (low, high) = (u64_at(16), u64_at(24));
    if low != 1 || !(2..=MAX_TRACKABLE_US.saturating_mul(2)).contains(&high) {
        return Err(format!(
            "range {low}..{high} is not 1..(2..={})",
            MAX_TRACKABLE_US * 2
        ));
    }
    Ok(counts_len(high) * std::mem::size_of::<u64>())
}

/// Length of the counts array of a histogram of range 1..`high` at [`SIGFIG`]: the
/// hdrhistogram crate's `num_bins(buckets_to_cover(high))`, computed without allocating.
fn counts_len(high: u64) -> usize {
    let sub_bucket_count: u64 = 2048; // 2·10^3 rounded up to a power of two
    let mut smallest_untrackable = sub_bucket_count;
    let mut buckets = 1usize;
    while smallest_untrackable <= high {
        if smallest_untrackable > u64::MAX / 2 {
            buckets += 1;
            break;
        }
        smallest_untrackable <<= 1;
        buckets += 1;
    }
    (buckets + 1) * (sub_bucket_count as usize / 2)
}

thread_local! {
    /// Histogram bytes the decode under way on this thread may still allocate; `None`
    /// outside [`Metrics::decode`] (one histogram is bounded by its header check alone).
    static HIST_BUDGET: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn take_from_budget(memory: usize) -> Result<(), String> {
    HIST_BUDGET.with(|b| match b.get() {
        None => Ok(()),
        Some(left) if memory <= left => {
            b.set(Some(left - memory));
            Ok(())
        }
        Some(_) => Err(
            "histograms would take more memory than a message of this size may ask for".to_string(),
        ),
    })
}

/// Sets the histogram budget of this thread for one decode, and clears it when dropped
/// (also when the decode fails or panics).
struct BudgetGuard(Option<usize>);

impl BudgetGuard {
    fn set(budget: usize) -> BudgetGuard {
        BudgetGuard(HIST_BUDGET.with(|b| b.replace(Some(budget))))
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        HIST_BUDGET.with(|b| b.set(self.0));
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
                    // The hint is the sender's claim: trust it only as far as a page.
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
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

/// Adds a counter into a total, stopping at `u64::MAX` instead of wrapping.
#[inline]
fn add_sat(total: &mut u64, n: u64) {
    *total = total.saturating_add(n);
}

/// What happened to the requests of one series (one step of one flow of one scenario).
///
/// Encoded as a CBOR map of its fields, except `errors`: the first
/// [`LEGACY_ERROR_CLASSES`] classes go as the fixed array `errors` (as every earlier build
/// sends and reads it), the later ones as `errors_more`, cut after the last non-zero
/// class and absent when all are zero. So a snapshot without such errors is byte for
/// byte what an earlier build sends, and an earlier build skips `errors_more` as an
/// unknown field (its `failed` still counts those requests).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesStats {
    /// Latency from the intended time (open model) — what a user waited.
    pub latency: Hist,
    /// Service time from the actual send — what the target took.
    pub service: Hist,
    pub requests: u64,
    pub failed: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Failed requests per [`ErrorClass`], indexed by it.
    pub errors: [u64; ERROR_CLASSES],
    pub checks_passed: u64,
    pub checks_failed: u64,
    /// Metrics of step kinds other than HTTP (WebSocket, gRPC), only those recorded.
    pub named: NamedMetrics,
}

/// [`SeriesStats`] as written: borrowed, so encoding copies no histogram.
#[derive(Serialize)]
#[serde(rename = "SeriesStats")]
struct SeriesOut<'a> {
    latency: &'a Hist,
    service: &'a Hist,
    requests: u64,
    failed: u64,
    bytes_received: u64,
    bytes_sent: u64,
    errors: &'a [u64],
    #[serde(skip_serializing_if = "<[u64]>::is_empty")]
    errors_more: &'a [u64],
    checks_passed: u64,
    checks_failed: u64,
    #[serde(skip_serializing_if = "NamedMetrics::is_empty")]
    named: &'a NamedMetrics,
}

/// [`SeriesStats`] as read; unknown fields are skipped (not buffered), as before.
#[derive(Deserialize)]
#[serde(rename = "SeriesStats")]
struct SeriesIn {
    latency: Hist,
    service: Hist,
    requests: u64,
    failed: u64,
    bytes_received: u64,
    bytes_sent: u64,
    errors: [u64; LEGACY_ERROR_CLASSES],
    #[serde(default)]
    errors_more: MoreErrors,
    checks_passed: u64,
    checks_failed: u64,
    #[serde(default)]
    named: NamedMetrics,
}

/// The error classes after the legacy ones, as read: at most as many as this build
/// knows, refused beyond that (a class it cannot name must not vanish silently).
#[derive(Default)]
struct MoreErrors([u64; ERROR_CLASSES - LEGACY_ERROR_CLASSES]);

impl<'de> Deserialize<'de> for MoreErrors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MoreErrors, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MoreErrors;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of error counts")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MoreErrors, A::Error> {
                let mut out = MoreErrors::default();
                for slot in out.0.iter_mut() {
                    match seq.next_element()? {
                        Some(n) => *slot = n,
                        None => return Ok(out),
                    }
                }
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::custom(format!(
                        "errors_more: more than the {} error classes this node knows ({})",
                        ERROR_CLASSES - LEGACY_ERROR_CLASSES,
                        ErrorClass::ALL[LEGACY_ERROR_CLASSES..]
                            .iter()
                            .map(|c| c.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

impl Serialize for SeriesStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (errors, more) = self.errors.split_at(LEGACY_ERROR_CLASSES);
        let used = more.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
        SeriesOut {
            latency: &self.latency,
            service: &self.service,
            requests: self.requests,
            failed: self.failed,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            errors,
            errors_more: &more[..used],
            checks_passed: self.checks_passed,
            checks_failed: self.checks_failed,
            named: &self.named,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SeriesStats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SeriesStats, D::Error> {
        let w = SeriesIn::deserialize(d)?;
        let mut errors = [0; ERROR_CLASSES];
        errors[..LEGACY_ERROR_CLASSES].copy_from_slice(&w.errors);
        errors[LEGACY_ERROR_CLASSES..].copy_from_slice(&w.errors_more.0);
        Ok(SeriesStats {
            latency: w.latency,
            service: w.service,
            requests: w.requests,
            failed: w.failed,
            bytes_received: w.bytes_received,
            bytes_sent: w.bytes_sent,
            errors,
            checks_passed: w.checks_passed,
            checks_failed: w.checks_failed,
            named: w.named,
        })
    }
}

impl SeriesStats {
    pub fn add(&mut self, o: &SeriesStats) {
        self.latency.add(&o.latency);
        self.service.add(&o.service);
        // Counters from peers saturate: a hostile or corrupt count must not wrap the
        // run's totals around (or panic a debug build).
        add_sat(&mut self.requests, o.requests);
        add_sat(&mut self.failed, o.failed);
        add_sat(&mut self.bytes_received, o.bytes_received);
        add_sat(&mut self.bytes_sent, o.bytes_sent);
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            add_sat(a, *b);
        }
        add_sat(&mut self.checks_passed, o.checks_passed);
        add_sat(&mut self.checks_failed, o.checks_failed);
        self.named.add(&o.named);
    }
    pub fn reset(&mut self) {
        let (l, s, n) = (
            std::mem::take(&mut self.latency),
            std::mem::take(&mut self.service),
            std::mem::take(&mut self.named),
        );
        *self = SeriesStats {
            latency: l,
            service: s,
            named: n,
            ..Default::default()
        };
        self.latency.reset();
        self.service.reset();
        self.named.reset();
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
        add_sat(&mut self.iterations, o.iterations);
        add_sat(&mut self.failed_iterations, o.failed_iterations);
        add_sat(&mut self.dropped, o.dropped);
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
            add_sat(a, *b);
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
        self.series
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.requests))
    }

    /// CBOR bytes (histograms inside in HdrHistogram's V2 format).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes CBOR from a peer. Histograms may take at most [`DECODE_BASE_BUDGET`] +
    /// [`DECODE_BYTES_PER_BYTE`] × `bytes.len()` of memory, checked from their headers
    /// before each is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Metrics, MetricsError> {
        let _budget = BudgetGuard::set(
            DECODE_BASE_BUDGET.saturating_add(bytes.len().saturating_mul(DECODE_BYTES_PER_BYTE)),
        );
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
    fn named_metrics_merge_and_round_trip_with_the_snapshot() {
        use crate::named::Named;
        let (mut a, mut b) = (sample(1, 100), sample(2, 100));
        let plain = a.encode();
        assert!(
            !plain.windows(5).any(|w| w == b"named"),
            "a series without named metrics must not carry the key"
        );
        for v in 1..=50 {
            a.series[1].named.record(Named::WsMsgRtt, v * 100);
            b.series[1].named.record(Named::WsMsgRtt, v * 7);
        }
        a.series[1].named.count(Named::WsMsgsSent, 50);
        b.series[1].named.count(Named::WsMsgsSent, 5);
        let back = Metrics::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        a.merge(&b).unwrap();
        let n = &a.series[1].named;
        assert_eq!(n.hist(Named::WsMsgRtt).unwrap().len(), 100);
        assert_eq!(n.counter(Named::WsMsgsSent), 55);
        assert!(a.series[0].named.is_empty());
        a.reset();
        assert_eq!(a, Metrics::new(&layout()));
    }

    #[test]
    fn reset_keeps_layout() {
        let mut m = sample(4, 100);
        m.reset();
        assert_eq!(m, Metrics::new(&layout()));
    }

    /// A V2 header as hdrhistogram writes it, with the fields given.
    fn v2_header(payload_len: u32, digits: u32, low: u64, high: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(V2_COOKIE.to_be_bytes());
        b.extend(payload_len.to_be_bytes());
        b.extend(0u32.to_be_bytes());
        b.extend(digits.to_be_bytes());
        b.extend(low.to_be_bytes());
        b.extend(high.to_be_bytes());
        b.extend(1.0f64.to_be_bytes());
        b
    }

    fn decode_hist(v2: &[u8]) -> Result<Hist, String> {
        let mut cbor = Vec::new();
        ciborium::into_writer(&ciborium::Value::Bytes(v2.to_vec()), &mut cbor).unwrap();
        ciborium::from_reader::<Hist, _>(&cbor[..]).map_err(|e| e.to_string())
    }

    #[test]
    fn a_histogram_claiming_4_gib_is_refused_from_its_header() {
        // 48 bytes that claim a 4 GiB payload: the crate would allocate it before reading.
        let mut v2 = v2_header(u32::MAX, 3, 1, 2048);
        v2.extend([0u8; 8]);
        assert_eq!(v2.len(), 48);
        let err = decode_hist(&v2).unwrap_err();
        assert!(
            err.contains("claims 4294967295 payload bytes, 8 are present"),
            "{err}"
        );
    }

    #[test]
    fn a_histogram_claiming_a_huge_range_or_precision_is_refused() {
        // high = u64::MAX or 5 digits: tens of MB of counts from a 40-byte header.
        let err = decode_hist(&v2_header(0, 3, 1, u64::MAX)).unwrap_err();
        assert!(err.contains("range 1.."), "{err}");
        let err = decode_hist(&v2_header(0, 5, 1, 2048)).unwrap_err();
        assert!(err.contains("5 significant digits"), "{err}");
        let mut compressed = v2_header(0, 3, 1, 2048);
        compressed[3] = 0x14;
        let err = decode_hist(&compressed).unwrap_err();
        assert!(err.contains("not an uncompressed V2"), "{err}");
        assert!(decode_hist(&[0x1c, 0x84]).is_err());
    }

    #[test]
    fn counts_len_matches_the_crate() {
        for high in [
            2,
            2047,
            2048,
            4096,
            1 << 20,
            3_600_000_000,
            MAX_TRACKABLE_US * 2,
        ] {
            let h = Histogram::<u64>::new_with_bounds(1, high, SIGFIG).unwrap();
            assert_eq!(counts_len(high), h.distinct_values(), "high {high}");
        }
    }

    /// Serialises one series `n` times without holding `n` copies.
    struct Repeat<'a>(&'a SeriesStats, usize);

    impl Serialize for Repeat<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(self.1))?;
            for _ in 0..self.1 {
                seq.serialize_element(self.0)?;
            }
            seq.end()
        }
    }

    #[test]
    fn many_sparse_histograms_are_refused_by_the_decode_budget() {
        // One value at the top of the range: ~45 bytes on the wire, ~270 KB in memory.
        let mut series = SeriesStats::default();
        series.latency.record(MAX_TRACKABLE_US);
        series.service.record(MAX_TRACKABLE_US);
        #[derive(Serialize)]
        struct Wire<'a> {
            series: Repeat<'a>,
            scenarios: Vec<ScenarioStats>,
            flow_iterations: Vec<u64>,
        }
        let encode = |n| {
            let mut out = Vec::new();
            let wire = Wire {
                series: Repeat(&series, n),
                scenarios: vec![],
                flow_iterations: vec![],
            };
            ciborium::into_writer(&wire, &mut out).unwrap();
            out
        };
        // A few are fine.
        assert_eq!(Metrics::decode(&encode(3)).unwrap().series.len(), 3);
        // 2,000 of them (~400 KB) would need ~1 GB: refused before it is allocated.
        let bytes = encode(2000);
        assert!(bytes.len() < 500_000, "{}", bytes.len());
        let err = Metrics::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("more memory than a message"), "{err}");
        // The budget is per decode: a later decode on this thread starts afresh.
        assert!(Metrics::decode(&encode(3)).is_ok());
    }

    #[test]
    fn merged_counters_saturate() {
        let mut a = sample(1, 10);
        let mut b = a.clone();
        b.series[0].requests = u64::MAX - 1;
        b.series[0].errors[0] = u64::MAX;
        b.scenarios[0].iterations = u64::MAX;
        b.flow_iterations[0] = u64::MAX;
        a.merge(&b).unwrap();
        assert_eq!(a.series[0].requests, u64::MAX);
        assert_eq!(a.series[0].errors[0], u64::MAX);
        assert_eq!(a.scenarios[0].iterations, u64::MAX);
        assert_eq!(a.flow_iterations[0], u64::MAX);
        assert_eq!(a.total_requests(), u64::MAX);
    }

    #[test]
    fn values_above_the_trackable_maximum_are_recorded_at_it_and_round_trip() {
        let mut m = Metrics::new(&layout());
        m.series[0].latency.record(u64::MAX);
        m.series[0].latency.record(MAX_TRACKABLE_US);
        assert_eq!(m.series[0].latency.len(), 2);
        assert!(m.series[0].latency.0.max() <= MAX_TRACKABLE_US * 2);
        assert_eq!(Metrics::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn huge_values_do_not_panic() {
        let mut h = Hist::default();
        h.record(3_600_000_000 * 5);
        h.record(0);
        assert_eq!(h.len(), 2);
    }

    /// A series as builds before the gRPC error classes wrote and read it.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct LegacySeries {
        latency: Hist,
        service: Hist,
        requests: u64,
        failed: u64,
        bytes_received: u64,
        bytes_sent: u64,
        errors: [u64; 9],
        checks_passed: u64,
        checks_failed: u64,
        #[serde(default, skip_serializing_if = "NamedMetrics::is_empty")]
        named: NamedMetrics,
    }

    fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn series_with(classes: &[(ErrorClass, u64)]) -> SeriesStats {
        let mut s = sample(3, 40).series[0].clone();
        for &(c, n) in classes {
            s.errors[c as usize] += n;
            s.failed += n;
        }
        s
    }

    fn legacy(s: &SeriesStats) -> LegacySeries {
        LegacySeries {
            latency: s.latency.clone(),
            service: s.service.clone(),
            requests: s.requests,
            failed: s.failed,
            bytes_received: s.bytes_received,
            bytes_sent: s.bytes_sent,
            errors: s.errors[..9].try_into().unwrap(),
            checks_passed: s.checks_passed,
            checks_failed: s.checks_failed,
            named: s.named.clone(),
        }
    }

    #[test]
    fn without_grpc_errors_a_series_is_encoded_as_earlier_builds_do() {
        let s = series_with(&[(ErrorClass::Timeout, 2)]);
        assert_eq!(cbor(&s), cbor(&legacy(&s)));
        // And what an earlier build sends reads back whole.
        let back: SeriesStats = ciborium::from_reader(&cbor(&legacy(&s))[..]).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn grpc_error_classes_round_trip_and_an_earlier_build_skips_them() {
        let s = series_with(&[
            (ErrorClass::Http5xx, 1),
            (ErrorClass::GrpcNotFound, 3),
            (ErrorClass::GrpcUnavailable, 5),
        ]);
        let bytes = cbor(&s);
        let back: SeriesStats = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.errors[ErrorClass::GrpcUnavailable as usize], 5);
        let old: LegacySeries = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(old, legacy(&s));
        // Cut after the last class used: UNAVAILABLE is the 14th after the legacy nine.
        let v: ciborium::Value = ciborium::from_reader(&bytes[..]).unwrap();
        let more = v
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_text() == Some("errors_more"))
            .map(|(_, v)| v.as_array().unwrap().len());
        assert_eq!(more, Some(14));
    }

    #[test]
    fn error_classes_a_node_does_not_know_are_refused_with_a_clear_error() {
        let s = series_with(&[(ErrorClass::GrpcUnauthenticated, 1)]);
        let mut v: ciborium::Value = ciborium::from_reader(&cbor(&s)[..]).unwrap();
        for (k, v) in v.as_map_mut().unwrap() {
            if k.as_text() == Some("errors_more") {
                v.as_array_mut().unwrap().push(ciborium::Value::from(1u64));
            }
        }
        let e = ciborium::from_reader::<SeriesStats, _>(&cbor(&v)[..])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("errors_more: more than the 16 error classes"),
            "{e}"
        );
        // A legacy array of another length, and an errors_more claiming a billion
        // entries (it holds none): refused, nothing allocated for the claim.
        let mut short = legacy(&s);
        short.errors = [0; 9];
        let mut v: ciborium::Value = ciborium::from_reader(&cbor(&short)[..]).unwrap();
        for (k, v) in v.as_map_mut().unwrap() {
            if k.as_text() == Some("errors") {
                v.as_array_mut().unwrap().pop();
            }
        }
        assert!(ciborium::from_reader::<SeriesStats, _>(&cbor(&v)[..]).is_err());
        let e = ciborium::from_reader::<MoreErrors, _>(&[0x9a, 0x3b, 0x9a, 0xca, 0x00][..])
            .err()
            .unwrap();
        assert!(!e.to_string().is_empty());
    }

    #[test]
    fn grpc_statuses_map_to_their_classes() {
        assert_eq!(ErrorClass::grpc(0), None);
        assert_eq!(ErrorClass::grpc(1), Some(ErrorClass::GrpcCancelled));
        assert_eq!(ErrorClass::grpc(5), Some(ErrorClass::GrpcNotFound));
        assert_eq!(ErrorClass::grpc(14), Some(ErrorClass::GrpcUnavailable));
        assert_eq!(ErrorClass::grpc(16), Some(ErrorClass::GrpcUnauthenticated));
        assert_eq!(ErrorClass::grpc(17), None);
        for (i, c) in ErrorClass::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert_eq!(ErrorClass::parse(c.name()), Some(c));
        }
    }
}
