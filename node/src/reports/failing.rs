//! A run that only fails says so, early (issue 16): the live watch that notices when
//! every request so far failed because the target could not be reached at all (connect,
//! DNS, TLS, or refused by the allowlist), and the pacing of a VU after such a failure,
//! so that a dead target costs neither the VU nor the generator a core.
//!
//! It reads live points and the HTTP layer's diagnoses and returns what to say; it must
//! not record metrics, stop a run or print (the callers — the embedded run, and the
//! coordinator for a mesh — decide where the words go).

use std::time::Duration;

use stampede_protocol::machine::events::RunEvent;
use stampede_protocol::snapshot::ErrorClass;

use crate::http::{Diagnosis, HttpErrorKind};
use crate::reports::aggregate::TimelinePoint;

/// The summary's record of a one-line headline (a run that only fails, a refused
/// target, an aborting threshold), at `t` seconds into the run.
pub fn event(t: f64, event: RunEvent) -> crate::reports::summary::Event {
    crate::reports::summary::Event { t, event }
}

/// The error classes that mean "the target was never reached".
const UNREACHED: [ErrorClass; 4] = [
    ErrorClass::Connect,
    ErrorClass::Dns,
    ErrorClass::Tls,
    ErrorClass::Refused,
];

/// Watches the live seconds of a run until the first request succeeds or the run is
/// found to be only failing (said once).
#[derive(Debug, Default)]
pub struct Watch {
    attempts: u64,
    seconds: u64,
    done: bool,
}

impl Watch {
    /// Takes one live second (of the whole run, all nodes merged) and the diagnoses met
    /// so far. Returns the line to say, once: when every request of the seconds seen so
    /// far failed without reaching the target, e.g. `every request failed in the first
    /// 1 s (31 attempts/s): 127.0.0.1:9: connection refused — is the service up?`.
    pub fn second(&mut self, p: &TimelinePoint, diagnoses: &[Diagnosis]) -> Option<String> {
        if self.done || p.requests == 0 {
            return None;
        }
        let unreached: u64 = UNREACHED
            .iter()
            .map(|c| p.errors_by_class.get(c.name()).copied().unwrap_or(0))
            .sum();
        if p.errors < p.requests || unreached < p.requests {
            // Something got an answer (or failed in a way that needs the target): the
            // target is there, whatever else is wrong.
            self.done = true;
            return None;
        }
        self.attempts += p.requests;
        self.seconds += 1;
        let why: Vec<&str> = diagnoses.iter().map(|d| d.line.as_str()).collect();
        if why.is_empty() {
            // The words are on their way (a VU notes them as it fails); say it next second.
            return None;
        }
        self.done = true;
        Some(format!(
            "every request failed in the first {} s ({} attempts/s): {}",
            self.seconds,
            self.attempts / self.seconds,
            why.join("; ")
        ))
    }
}

/// Diagnoses of targets refused by the allowlist, to say once each.
pub fn refusals(diagnoses: &[Diagnosis]) -> impl Iterator<Item = &Diagnosis> {
    diagnoses
        .iter()
        .filter(|d| d.kind == HttpErrorKind::Refused)
}

/// The pause of one VU after failing to reach its target: short at first, doubling on
/// each failure in a row up to a cap, gone after the first success. Without it a VU
/// facing a closed port spins (a refused connect takes microseconds on loopback).
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const CAP: Duration = Duration::from_secs(1);

    /// Whether a failure of this kind means the target was not reached at all.
    pub fn applies(kind: HttpErrorKind) -> bool {
        matches!(
            kind,
            HttpErrorKind::Connect
                | HttpErrorKind::Dns
                | HttpErrorKind::Tls
                | HttpErrorKind::Refused
        )
    }

    /// The pause before the next attempt, and the one after it grows.
    pub fn failed(&mut self) -> Duration {
        let now = self.next.max(Self::FIRST);
        self.next = (now * 2).min(Self::CAP);
        now
    }

    pub fn succeeded(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(requests: u64, classes: &[(&str, u64)]) -> TimelinePoint {
        TimelinePoint {
            requests,
            errors: classes.iter().map(|c| c.1).sum(),
            errors_by_class: classes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    fn refused_port() -> Vec<Diagnosis> {
        vec![Diagnosis {
            kind: HttpErrorKind::Connect,
            line: "127.0.0.1:9: connection refused — is the service up?".into(),
        }]
    }

    #[test]
    fn only_unreached_failures_are_said_once_with_the_attempt_rate() {
        let mut w = Watch::default();
        assert_eq!(w.second(&point(0, &[]), &refused_port()), None);
        // No words yet: wait for the VU's note.
        assert_eq!(w.second(&point(40, &[("connect", 40)]), &[]), None);
        let said = w.second(&point(20, &[("connect", 20)]), &refused_port());
        assert_eq!(
            said.as_deref(),
            Some(
                "every request failed in the first 2 s (30 attempts/s): \
                 127.0.0.1:9: connection refused — is the service up?"
            )
        );
        assert_eq!(
            w.second(&point(20, &[("connect", 20)]), &refused_port()),
            None
        );
    }

    #[test]
    fn a_target_that_answers_is_not_only_failing() {
        let mut w = Watch::default();
        assert_eq!(
            w.second(&point(10, &[("connect", 9)]), &refused_port()),
            None
        );
        assert_eq!(
            w.second(&point(10, &[("connect", 10)]), &refused_port()),
            None
        );
        let mut w = Watch::default();
        // 5xx: the service is up and answering badly; thresholds speak for that.
        assert_eq!(
            w.second(&point(10, &[("http_5xx", 10)]), &refused_port()),
            None
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(pauses[0], Backoff::FIRST);
        assert_eq!(pauses[1], Backoff::FIRST * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), Backoff::CAP);
        b.succeeded();
        assert_eq!(b.failed(), Backoff::FIRST);
        assert!(Backoff::applies(HttpErrorKind::Connect));
        assert!(!Backoff::applies(HttpErrorKind::Timeout));
        assert!(!Backoff::applies(HttpErrorKind::Io));
    }
}
