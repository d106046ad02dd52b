//! The runtime-adjustable behaviour of stampede-target: latency, error rate, stall and
//! concurrency limit. Set from flags at start and changed later through `POST /_control` or
//! [`crate::TargetHandle`]. Read on every request, so reads are plain atomic loads (the
//! limiter is behind an `RwLock`, touched only while a limit is set). It must not count or
//! route requests.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::latency::Latency;

/// Longest stall the knob accepts.
pub const MAX_STALL: Duration = Duration::from_secs(3600);

/// The knobs as `GET /_control` and `POST /_control` report them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlState {
    /// In the `--latency` syntax.
    pub latency: String,
    pub error_rate: f64,
    pub stall_ms: u64,
    /// 0 means no limit.
    pub concurrency_limit: usize,
}

/// Body of `POST /_control`: every field optional, absent fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlUpdate {
    /// In the `--latency` syntax, e.g. `"normal:20ms,5ms"`; `"0"` removes it.
    pub latency: Option<String>,
    /// Fraction of load requests answered 500, 0.0 ..= 1.0.
    pub error_rate: Option<f64>,
    /// Extra delay added to every load request while non-zero.
    pub stall_ms: Option<u64>,
    /// At most this many load requests in service at once; 0 removes the limit.
    pub concurrency_limit: Option<usize>,
}

/// A knob value that is out of range; the message names the knob and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlError(pub String);

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ControlError {}

pub(crate) fn check_error_rate(rate: f64) -> Result<f64, ControlError> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(ControlError(format!(
            "error_rate {rate} is outside 0.0 ..= 1.0"
        )))
    }
}

pub(crate) struct Knobs {
    latency_kind: AtomicU8,
    latency_a: AtomicU64,
    latency_b: AtomicU64,
    error_rate_bits: AtomicU64,
    /// Stall in nanoseconds; a watch so in-flight stalled requests see it being lifted.
    stall: watch::Sender<u64>,
    stall_ns: AtomicU64,
    limited: AtomicBool,
    limit: RwLock<(usize, Option<Arc<Semaphore>>)>,
}

impl Knobs {
    pub(crate) fn new() -> Knobs {
        Knobs {
            latency_kind: AtomicU8::new(0),
            latency_a: AtomicU64::new(0),
            latency_b: AtomicU64::new(0),
            error_rate_bits: AtomicU64::new(0f64.to_bits()),
            stall: watch::Sender::new(0),
            stall_ns: AtomicU64::new(0),
            limited: AtomicBool::new(false),
            limit: RwLock::new((0, None)),
        }
    }

    pub(crate) fn latency(&self) -> Latency {
        Latency::from_parts(
            self.latency_kind.load(Relaxed),
            self.latency_a.load(Relaxed),
            self.latency_b.load(Relaxed),
        )
    }

    pub(crate) fn set_latency(&self, l: Latency) {
        let (k, a, b) = l.to_parts();
        // Zero the kind first so a reader racing this change sees "no latency", not a
        // mix of the old kind and new parameters.
        self.latency_kind.store(0, Relaxed);
        self.latency_a.store(a, Relaxed);
        self.latency_b.store(b, Relaxed);
        self.latency_kind.store(k, Relaxed);
    }

    pub(crate) fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate_bits.load(Relaxed))
    }

    pub(crate) fn set_error_rate(&self, rate: f64) -> Result<(), ControlError> {
        let rate = check_error_rate(rate)?;
        self.error_rate_bits.store(rate.to_bits(), Relaxed);
        Ok(())
    }

    pub(crate) fn stall(&self) -> Duration {
        Duration::from_nanos(self.stall_ns.load(Relaxed))
    }

    /// Stalls longer than [`MAX_STALL`] are cut to it, so deadlines never overflow.
    pub(crate) fn set_stall(&self, d: Duration) {
        let d = d.min(MAX_STALL);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.stall_ns.store(ns, Relaxed);
        self.stall.send_replace(ns);
    }

    /// Waits out the stall that started at `since`, re-reading it whenever it changes, so
    /// lifting the stall (or shortening it) releases requests that are already waiting.
    pub(crate) async fn wait_stall(&self, since: tokio::time::Instant) {
        let mut rx = self.stall.subscribe();
        loop {
            let ns = *rx.borrow_and_update();
            if ns == 0 {
                return;
            }
            let deadline = since + Duration::from_nanos(ns);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    pub(crate) fn concurrency_limit(&self) -> usize {
        self.limit
            .read()
            .map(|g| g.0)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// Replaces the limiter. Requests already admitted keep their permits from the old one,
    /// so for a moment after a change more than the new limit may be in service.
    pub(crate) fn set_concurrency_limit(&self, limit: Option<usize>) {
        let limit = limit.filter(|&n| n > 0);
        let mut g = self.limit.write().unwrap_or_else(|p| p.into_inner());
        *g = (
            limit.unwrap_or(0),
            limit.map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)))),
        );
        self.limited.store(limit.is_some(), Relaxed);
    }

    /// The current limiter, or `None` when there is no limit (the common, cheap case).
    pub(crate) fn limiter(&self) -> Option<Arc<Semaphore>> {
        if !self.limited.load(Relaxed) {
            return None;
        }
        self.limit
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    pub(crate) fn state(&self) -> ControlState {
        ControlState {
            latency: self.latency().to_string(),
            error_rate: self.error_rate(),
            stall_ms: u64::try_from(self.stall().as_millis()).unwrap_or(u64::MAX),
            concurrency_limit: self.concurrency_limit(),
        }
    }

    /// Validates the whole update first so a bad field changes nothing.
    pub(crate) fn apply(&self, u: &ControlUpdate) -> Result<ControlState, ControlError> {
        let latency = match &u.latency {
            Some(s) => Some(
                s.parse::<Latency>()
                    .map_err(|e| ControlError(e.to_string()))?,
            ),
            None => None,
        };
        if let Some(r) = u.error_rate {
            check_error_rate(r)?;
        }
        if let Some(l) = latency {
            self.set_latency(l);
        }
        if let Some(r) = u.error_rate {
            self.set_error_rate(r)?;
        }
        if let Some(ms) = u.stall_ms {
            self.set_stall(Duration::from_millis(ms));
        }
        if let Some(n) = u.concurrency_limit {
            self.set_concurrency_limit(Some(n));
        }
        Ok(self.state())
    }
}
