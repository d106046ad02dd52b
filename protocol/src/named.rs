//! Metrics that only some step kinds record (WebSocket, gRPC, ...), by name: a fixed
//! list of [`Named`] metrics, each a duration (an HdrHistogram in µs) or a counter, kept
//! per series in [`NamedMetrics`] beside the HTTP numbers of a [`SeriesStats`].
//!
//! Only metrics that were recorded take space, on the wire as in memory; merging adds
//! histograms and counters like the rest of a snapshot, so it stays exact and
//! associative. Decoding bounds everything a peer can claim: at most one entry per known
//! metric, known wire ids only, histograms through the snapshot's memory budget.
//! This module owns the list of names and their encoding; it must not know which step
//! records what, nor how a report shows it.
//!
//! To add a metric: a variant in [`Named`], a line in each `match` below (a new wire id,
//! never reusing one), and in [`Named::ALL`]. Reports, `/metrics` and thresholds pick it
//! up from there.
//!
//! [`SeriesStats`]: crate::snapshot::SeriesStats

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::snapshot::Hist;

/// Whether a [`Named`] metric is a duration (histogram) or a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An HdrHistogram of microseconds: thresholds take `p(N)`, `avg`, `min`, `max`,
    /// `med`, `count`.
    Duration,
    /// A count: thresholds take `count` and `rate` (per second of the run).
    Counter,
}

/// A metric a step kind records by name (k6's names where k6 has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Named {
    /// Time to open a WebSocket: TCP connect, TLS, and the upgrade handshake.
    WsConnecting,
    /// From a WebSocket's open to its close (or loss).
    WsSessionDuration,
    /// From a message sent to the matching message received (a `receive` step).
    WsMsgRtt,
    /// WebSockets opened.
    WsSessions,
    /// WebSocket messages sent.
    WsMsgsSent,
    /// WebSocket messages received (also those a `receive` step skipped).
    WsMsgsReceived,
    /// A gRPC call, from sending to its status (the last message and the trailers).
    GrpcReqDuration,
    /// gRPC calls that ended with status OK (0).
    GrpcStatusOk,
    /// gRPC calls that ended with status CANCELLED (1).
    GrpcStatusCancelled,
    /// gRPC calls that ended with status UNKNOWN (2).
    GrpcStatusUnknown,
    /// gRPC calls that ended with status INVALID_ARGUMENT (3).
    GrpcStatusInvalidArgument,
    /// gRPC calls that ended with status DEADLINE_EXCEEDED (4).
    GrpcStatusDeadlineExceeded,
    /// gRPC calls that ended with status NOT_FOUND (5).
    GrpcStatusNotFound,
    /// gRPC calls that ended with status ALREADY_EXISTS (6).
    GrpcStatusAlreadyExists,
    /// gRPC calls that ended with status PERMISSION_DENIED (7).
    GrpcStatusPermissionDenied,
    /// gRPC calls that ended with status RESOURCE_EXHAUSTED (8).
    GrpcStatusResourceExhausted,
    /// gRPC calls that ended with status FAILED_PRECONDITION (9).
    GrpcStatusFailedPrecondition,
    /// gRPC calls that ended with status ABORTED (10).
    GrpcStatusAborted,
    /// gRPC calls that ended with status OUT_OF_RANGE (11).
    GrpcStatusOutOfRange,
    /// gRPC calls that ended with status UNIMPLEMENTED (12).
    GrpcStatusUnimplemented,
    /// gRPC calls that ended with status INTERNAL (13).
    GrpcStatusInternal,
    /// gRPC calls that ended with status UNAVAILABLE (14).
    GrpcStatusUnavailable,
    /// gRPC calls that ended with status DATA_LOSS (15).
    GrpcStatusDataLoss,
    /// gRPC calls that ended with status UNAUTHENTICATED (16).
    GrpcStatusUnauthenticated,
}

impl Named {
    /// The counter of gRPC calls that ended with status `code` (0..=16); `None` for a
    /// code gRPC does not define.
    pub fn grpc_status(code: u32) -> Option<Named> {
        Named::ALL
            .get(7 + code as usize)
            .copied()
            .filter(|_| code <= 16)
    }

    /// Every metric, in the order reports list them.
    pub const ALL: [Named; 24] = [
        Named::WsConnecting,
        Named::WsSessionDuration,
        Named::WsMsgRtt,
        Named::WsSessions,
        Named::WsMsgsSent,
        Named::WsMsgsReceived,
        Named::GrpcReqDuration,
        Named::GrpcStatusOk,
        Named::GrpcStatusCancelled,
        Named::GrpcStatusUnknown,
        Named::GrpcStatusInvalidArgument,
        Named::GrpcStatusDeadlineExceeded,
        Named::GrpcStatusNotFound,
        Named::GrpcStatusAlreadyExists,
        Named::GrpcStatusPermissionDenied,
        Named::GrpcStatusResourceExhausted,
        Named::GrpcStatusFailedPrecondition,
        Named::GrpcStatusAborted,
        Named::GrpcStatusOutOfRange,
        Named::GrpcStatusUnimplemented,
        Named::GrpcStatusInternal,
        Named::GrpcStatusUnavailable,
        Named::GrpcStatusDataLoss,
        Named::GrpcStatusUnauthenticated,
    ];

    /// The name in plans, reports and thresholds.
    pub fn name(self) -> &'static str {
        match self {
            Named::WsConnecting => "ws_connecting",
            Named::WsSessionDuration => "ws_session_duration",
            Named::WsMsgRtt => "ws_msg_rtt",
            Named::WsSessions => "ws_sessions",
            Named::WsMsgsSent => "ws_msgs_sent",
            Named::WsMsgsReceived => "ws_msgs_received",
            Named::GrpcReqDuration => "grpc_req_duration",
            Named::GrpcStatusOk => "grpc_status_ok",
            Named::GrpcStatusCancelled => "grpc_status_cancelled",
            Named::GrpcStatusUnknown => "grpc_status_unknown",
            Named::GrpcStatusInvalidArgument => "grpc_status_invalid_argument",
            Named::GrpcStatusDeadlineExceeded => "grpc_status_deadline_exceeded",
            Named::GrpcStatusNotFound => "grpc_status_not_found",
            Named::GrpcStatusAlreadyExists => "grpc_status_already_exists",
            Named::GrpcStatusPermissionDenied => "grpc_status_permission_denied",
            Named::GrpcStatusResourceExhausted => "grpc_status_resource_exhausted",
            Named::GrpcStatusFailedPrecondition => "grpc_status_failed_precondition",
            Named::GrpcStatusAborted => "grpc_status_aborted",
            Named::GrpcStatusOutOfRange => "grpc_status_out_of_range",
            Named::GrpcStatusUnimplemented => "grpc_status_unimplemented",
            Named::GrpcStatusInternal => "grpc_status_internal",
            Named::GrpcStatusUnavailable => "grpc_status_unavailable",
            Named::GrpcStatusDataLoss => "grpc_status_data_loss",
            Named::GrpcStatusUnauthenticated => "grpc_status_unauthenticated",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Named::WsConnecting
            | Named::WsSessionDuration
            | Named::WsMsgRtt
            | Named::GrpcReqDuration => Kind::Duration,
            _ => Kind::Counter,
        }
    }

    /// One line for `/metrics` HELP and the docs.
    pub fn help(self) -> &'static str {
        match self {
            Named::WsConnecting => "Time to open a WebSocket (connect, TLS, upgrade).",
            Named::WsSessionDuration => "WebSocket session length, open to close.",
            Named::WsMsgRtt => "WebSocket message round trip, send to matching receive.",
            Named::WsSessions => "WebSockets opened.",
            Named::WsMsgsSent => "WebSocket messages sent.",
            Named::WsMsgsReceived => "WebSocket messages received.",
            Named::GrpcReqDuration => "gRPC call duration, sent to status.",
            Named::GrpcStatusOk => "gRPC calls that ended OK.",
            Named::GrpcStatusCancelled => "gRPC calls that ended CANCELLED.",
            Named::GrpcStatusUnknown => "gRPC calls that ended UNKNOWN.",
            Named::GrpcStatusInvalidArgument => "gRPC calls that ended INVALID_ARGUMENT.",
            Named::GrpcStatusDeadlineExceeded => "gRPC calls that ended DEADLINE_EXCEEDED.",
            Named::GrpcStatusNotFound => "gRPC calls that ended NOT_FOUND.",
            Named::GrpcStatusAlreadyExists => "gRPC calls that ended ALREADY_EXISTS.",
            Named::GrpcStatusPermissionDenied => "gRPC calls that ended PERMISSION_DENIED.",
            Named::GrpcStatusResourceExhausted => "gRPC calls that ended RESOURCE_EXHAUSTED.",
            Named::GrpcStatusFailedPrecondition => "gRPC calls that ended FAILED_PRECONDITION.",
            Named::GrpcStatusAborted => "gRPC calls that ended ABORTED.",
            Named::GrpcStatusOutOfRange => "gRPC calls that ended OUT_OF_RANGE.",
            Named::GrpcStatusUnimplemented => "gRPC calls that ended UNIMPLEMENTED.",
            Named::GrpcStatusInternal => "gRPC calls that ended INTERNAL.",
            Named::GrpcStatusUnavailable => "gRPC calls that ended UNAVAILABLE.",
            Named::GrpcStatusDataLoss => "gRPC calls that ended DATA_LOSS.",
            Named::GrpcStatusUnauthenticated => "gRPC calls that ended UNAUTHENTICATED.",
        }
    }

    /// The id on the wire: stable across versions, never reused for another metric.
    fn id(self) -> u16 {
        match self {
            Named::WsConnecting => 1,
            Named::WsSessionDuration => 2,
            Named::WsMsgRtt => 3,
            Named::WsSessions => 4,
            Named::WsMsgsSent => 5,
            Named::WsMsgsReceived => 6,
            Named::GrpcReqDuration => 7,
            Named::GrpcStatusOk => 8,
            Named::GrpcStatusCancelled => 9,
            Named::GrpcStatusUnknown => 10,
            Named::GrpcStatusInvalidArgument => 11,
            Named::GrpcStatusDeadlineExceeded => 12,
            Named::GrpcStatusNotFound => 13,
            Named::GrpcStatusAlreadyExists => 14,
            Named::GrpcStatusPermissionDenied => 15,
            Named::GrpcStatusResourceExhausted => 16,
            Named::GrpcStatusFailedPrecondition => 17,
            Named::GrpcStatusAborted => 18,
            Named::GrpcStatusOutOfRange => 19,
            Named::GrpcStatusUnimplemented => 20,
            Named::GrpcStatusInternal => 21,
            Named::GrpcStatusUnavailable => 22,
            Named::GrpcStatusDataLoss => 23,
            Named::GrpcStatusUnauthenticated => 24,
        }
    }

    fn from_id(id: u16) -> Option<Named> {
        Named::ALL.into_iter().find(|n| n.id() == id)
    }

    /// The metric called `name`, if there is one.
    pub fn parse(name: &str) -> Option<Named> {
        Named::ALL.into_iter().find(|n| n.name() == name)
    }

    /// Every name, comma-separated (for error messages).
    pub fn names() -> String {
        Named::ALL.map(Named::name).join(", ")
    }
}

/// The named metrics of one series. Entries stay once created (a reset zeroes them, so
/// a worker keeps its memory); empty ones are neither encoded nor compared.
#[derive(Debug, Clone, Default)]
pub struct NamedMetrics {
    /// Duration metrics, sorted by metric.
    hists: Vec<(Named, Hist)>,
    /// Counters, sorted by metric.
    counters: Vec<(Named, u64)>,
}

impl NamedMetrics {
    /// Records a duration in µs. A counter metric given here is counted instead, so a
    /// mistake shows in the reports rather than vanishing.
    #[inline]
    pub fn record(&mut self, n: Named, us: u64) {
        match n.kind() {
            Kind::Duration => self.hist_mut(n).record(us),
            Kind::Counter => self.count(n, 1),
        }
    }

    /// Adds `k` to a counter.
    #[inline]
    pub fn count(&mut self, n: Named, k: u64) {
        let i = match self.counters.binary_search_by_key(&n, |e| e.0) {
            Ok(i) => i,
            Err(i) => {
                self.counters.insert(i, (n, 0));
                i
            }
        };
        let c = &mut self.counters[i].1;
        *c = c.saturating_add(k);
    }

    fn hist_mut(&mut self, n: Named) -> &mut Hist {
        let i = match self.hists.binary_search_by_key(&n, |e| e.0) {
            Ok(i) => i,
            Err(i) => {
                self.hists.insert(i, (n, Hist::default()));
                i
            }
        };
        &mut self.hists[i].1
    }

    /// The histogram of a duration metric, if anything was recorded.
    pub fn hist(&self, n: Named) -> Option<&Hist> {
        self.hists
            .iter()
            .find(|e| e.0 == n && !e.1.is_empty())
            .map(|e| &e.1)
    }

    /// A counter's value (0 when never counted).
    pub fn counter(&self, n: Named) -> u64 {
        self.counters.iter().find(|e| e.0 == n).map_or(0, |e| e.1)
    }

    /// The duration metrics that hold values, in [`Named`] order.
    pub fn hists(&self) -> impl Iterator<Item = (Named, &Hist)> {
        self.hists
            .iter()
            .filter(|e| !e.1.is_empty())
            .map(|e| (e.0, &e.1))
    }

    /// The counters above zero, in [`Named`] order.
    pub fn counters(&self) -> impl Iterator<Item = (Named, u64)> + '_ {
        self.counters.iter().filter(|e| e.1 > 0).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.hists().next().is_none() && self.counters().next().is_none()
    }

    /// Adds `o` into `self`: histograms add, counters add (saturating).
    pub fn add(&mut self, o: &NamedMetrics) {
        for (n, h) in o.hists() {
            self.hist_mut(n).add(h);
        }
        for (n, c) in o.counters() {
            self.count(n, c);
        }
    }

    /// Empties every value but keeps the entries' memory.
    pub fn reset(&mut self) {
        self.hists.iter_mut().for_each(|e| e.1.reset());
        self.counters.iter_mut().for_each(|e| e.1 = 0);
    }
}

impl PartialEq for NamedMetrics {
    fn eq(&self, o: &NamedMetrics) -> bool {
        self.hists().eq(o.hists()) && self.counters().eq(o.counters())
    }
}

/// On the wire: `[[id, histogram]..., [id, count]...]`, one flat sequence of pairs,
/// non-empty entries only; the id says which kind the second element is.
impl Serialize for NamedMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (hists, counters) = (self.hists().count(), self.counters().count());
        let mut seq = s.serialize_seq(Some(hists + counters))?;
        for (n, h) in self.hists() {
            seq.serialize_element(&(n.id(), h))?;
        }
        for (n, c) in self.counters() {
            seq.serialize_element(&(n.id(), c))?;
        }
        seq.end()
    }
}

/// One `[id, value]` pair, decoded by the kind its id names.
struct Entry(Named, Value);

enum Value {
    Hist(Hist),
    Count(u64),
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [metric id, value] pair")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
                let id: u16 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("named metric without an id"))?;
                let n = Named::from_id(id)
                    .ok_or_else(|| de::Error::custom(format!("unknown named metric id {id}")))?;
                let missing =
                    || de::Error::custom(format!("named metric {} without a value", n.name()));
                let v = match n.kind() {
                    Kind::Duration => Value::Hist(seq.next_element()?.ok_or_else(missing)?),
                    Kind::Counter => Value::Count(seq.next_element()?.ok_or_else(missing)?),
                };
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(format!(
                        "named metric {}: more than [id, value]",
                        n.name()
                    )));
                }
                Ok(Entry(n, v))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for NamedMetrics {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NamedMetrics, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NamedMetrics;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of named metrics")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NamedMetrics, A::Error> {
                let mut m = NamedMetrics::default();
                while let Some(Entry(n, v)) = seq.next_element::<Entry>()? {
                    // Each metric at most once: the entries a peer can make are bounded by
                    // the list of names, whatever the sequence claims.
                    if m.hists.iter().any(|e| e.0 == n) || m.counters.iter().any(|e| e.0 == n) {
                        return Err(de::Error::custom(format!(
                            "named metric {} appears twice",
                            n.name()
                        )));
                    }
                    match v {
                        Value::Hist(h) => m.hists.push((n, h)),
                        Value::Count(c) => m.counters.push((n, c)),
                    }
                }
                m.hists.sort_by_key(|e| e.0);
                m.counters.sort_by_key(|e| e.0);
                Ok(m)
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn decode(bytes: &[u8]) -> Result<NamedMetrics, String> {
        ciborium::from_reader(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn names_and_ids_are_unique() {
        for (i, a) in Named::ALL.iter().enumerate() {
            for b in &Named::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert_ne!(a.id(), b.id());
            }
            assert_eq!(Named::parse(a.name()), Some(*a));
            assert_eq!(Named::from_id(a.id()), Some(*a));
        }
    }

    #[test]
    fn merge_is_exact_and_empty_entries_do_not_count() {
        let mut a = NamedMetrics::default();
        let mut b = NamedMetrics::default();
        for v in 1..=100 {
            a.record(Named::WsMsgRtt, v * 10);
            b.record(Named::WsMsgRtt, v * 1000);
        }
        a.count(Named::WsMsgsSent, 100);
        b.count(Named::WsMsgsSent, 50);
        b.count(Named::WsMsgsReceived, 7);
        let mut ab = a.clone();
        ab.add(&b);
        let mut ba = b.clone();
        ba.add(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.hist(Named::WsMsgRtt).unwrap().len(), 200);
        assert_eq!(ab.counter(Named::WsMsgsSent), 150);
        assert_eq!(ab.counter(Named::WsMsgsReceived), 7);
        assert!(ab.hist(Named::WsConnecting).is_none());
        ab.reset();
        assert!(ab.is_empty());
        assert_eq!(ab, NamedMetrics::default());
        assert_eq!(cbor(&ab), cbor(&NamedMetrics::default()));
    }

    #[test]
    fn round_trip_carries_only_what_was_recorded() {
        let mut m = NamedMetrics::default();
        m.record(Named::WsConnecting, 1500);
        m.count(Named::WsSessions, 3);
        m.count(Named::WsMsgsSent, 0);
        let bytes = cbor(&m);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.counters().count(), 1);
        // An empty bag is one byte: an empty CBOR array.
        assert_eq!(cbor(&NamedMetrics::default()), vec![0x80]);
    }

    #[test]
    fn hostile_input_is_refused_with_a_clear_error() {
        let e = decode(&cbor(&vec![(999u16, 1u64)])).unwrap_err();
        assert!(e.contains("unknown named metric id 999"), "{e}");
        let id = Named::WsMsgsSent.id();
        let e = decode(&cbor(&vec![(id, 1u64), (id, 2u64)])).unwrap_err();
        assert!(e.contains("ws_msgs_sent appears twice"), "{e}");
        // A counter's id with a histogram's bytes, and a histogram's id with a number.
        let e = decode(&cbor(&vec![(Named::WsMsgRtt.id(), 5u64)])).unwrap_err();
        assert!(e.contains("byte buffer"), "{e}");
        let e = decode(&cbor(&vec![(id, 1u64, 2u64)])).unwrap_err();
        assert!(e.contains("more than [id, value]"), "{e}");
        let e = decode(&cbor(&vec![vec![id]])).unwrap_err();
        assert!(e.contains("without a value"), "{e}");
        // A sequence that claims a billion entries but holds none allocates nothing.
        let e = decode(&[0x9a, 0x3b, 0x9a, 0xca, 0x00]).unwrap_err();
        assert!(!e.is_empty());
    }
}
