//! Thresholds: `"METRIC{tag=value}" = ["p(99) < 800ms", "rate < 1%"]` parsed into
//! something a report can evaluate.
//!
//! This module owns the threshold grammar only; evaluating against measured numbers
//! is the report's job (it knows where the numbers live).

use std::fmt;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::named::{Kind, Named};
use crate::snapshot::ErrorClass;

/// The metrics a threshold can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Request latency (from the intended time), microseconds.
    HttpReqDuration,
    /// Service time (from the actual send), microseconds.
    HttpReqServiceTime,
    /// Fraction of requests that failed (transport error, HTTP status ≥ 400 not
    /// accepted by a check, or a failed check).
    HttpReqFailed,
    /// Count and rate of requests.
    HttpReqs,
    /// Fraction of checks that passed.
    Checks,
    Iterations,
    DroppedIterations,
    /// A metric of a step kind other than HTTP (`ws_msg_rtt`, ...).
    Named(Named),
}

impl Metric {
    fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "http_req_duration" => Metric::HttpReqDuration,
            "http_req_service_time" => Metric::HttpReqServiceTime,
            "http_req_failed" => Metric::HttpReqFailed,
            "http_reqs" => Metric::HttpReqs,
            "checks" => Metric::Checks,
            "iterations" => Metric::Iterations,
            "dropped_iterations" => Metric::DroppedIterations,
            _ => return Named::parse(s).map(Metric::Named),
        })
    }
    pub const NAMES: &'static str = "http_req_duration, http_req_service_time, http_req_failed, http_reqs, checks, iterations, dropped_iterations";

    /// Every name a threshold may use, comma-separated.
    pub fn names() -> String {
        format!("{}, {}", Metric::NAMES, Named::names())
    }

    /// True for a metric held in microseconds.
    pub fn is_duration(self) -> bool {
        match self {
            Metric::HttpReqDuration | Metric::HttpReqServiceTime => true,
            Metric::Named(n) => n.kind() == Kind::Duration,
            _ => false,
        }
    }
}

/// Which part of the measurements a threshold looks at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TagFilter {
    pub scenario: Option<String>,
    pub flow: Option<String>,
    /// The step (request) name; `name` and `step` are the same tag.
    pub step: Option<String>,
    pub node: Option<String>,
    /// Any other tag is a node label, e.g. `region=eu`.
    pub label: Option<(String, String)>,
    /// `http_req_failed{error=grpc_unavailable}`: only the failed requests of that class.
    pub error: Option<ErrorClass>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// Percentile in per-mille precision: p(99.9) = 999 tenths... stored as f64.
    Percentile,
    Avg,
    Min,
    Max,
    Med,
    Rate,
    Count,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// One expression: `AGG OP VALUE`. Durations are held in microseconds; a bare number
/// for a duration metric means milliseconds (as in k6); rates are fractions.
#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdExpr {
    pub aggregate: Aggregate,
    /// For `p(N)`: N in percent (99.9 for p(99.9)).
    pub percentile: f64,
    pub op: Op,
    pub value: f64,
    /// The value was written as a duration or a plain number of milliseconds.
    pub value_is_duration: bool,
}

impl ThresholdExpr {
    pub fn parse(s: &str) -> Result<ThresholdExpr, String> {
        let bad = |why: &str| format!("bad threshold \"{s}\": {why}");
        let t = s.trim();
        let ops = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let (pos, op_str, op) = ops
            .iter()
            .filter_map(|(o, op)| t.find(o).map(|p| (p, *o, *op)))
            .min_by_key(|(p, o, _)| (*p, std::cmp::Reverse(o.len())))
            .ok_or_else(|| bad("expected an expression like \"p(99) < 800ms\" or \"rate < 1%\""))?;
        let lhs = t[..pos].trim();
        let rhs = t[pos + op_str.len()..].trim();
        if rhs.starts_with(['<', '>', '=', '!']) {
            return Err(bad("expected one comparison operator"));
        }
        let (aggregate, percentile) =
            if let Some(inner) = lhs.strip_prefix("p(").and_then(|r| r.strip_suffix(')')) {
                let p: f64 = inner
                    .trim()
                    .parse()
                    .map_err(|_| bad("p(N) needs a number N"))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(bad("a percentile must be between 0 and 100"));
                }
                (Aggregate::Percentile, p)
            } else {
                let a = match lhs {
                    "avg" => Aggregate::Avg,
                    "min" => Aggregate::Min,
                    "max" => Aggregate::Max,
                    "med" => Aggregate::Med,
                    "rate" => Aggregate::Rate,
                    "count" => Aggregate::Count,
                    _ => {
                        return Err(bad(&format!(
                        "unknown aggregate \"{lhs}\" (use p(N), avg, min, max, med, rate, count)"
                    )))
                    }
                };
                (a, 50.0)
            };
        let (value, value_is_duration) = if let Some(pct) = rhs.strip_suffix('%') {
            let v: f64 = pct.trim().parse().map_err(|_| bad("bad percentage"))?;
            (v / 100.0, false)
        } else if let Ok(v) = rhs.parse::<f64>() {
            (v, false)
        } else {
            let d = parse_duration(rhs).map_err(|e| bad(&format!("bad value \"{rhs}\": {e}")))?;
            (d.as_secs_f64() * 1e6, true)
        };
        // `nan` and `inf` parse as f64; a comparison with NaN is never true, so such a
        // threshold could only ever fail, whatever was measured.
        if !value.is_finite() {
            return Err(bad("the value must be a finite number"));
        }
        Ok(ThresholdExpr {
            aggregate,
            percentile,
            op,
            value,
            value_is_duration,
        })
    }
}

/// A threshold as written in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// The key as written, e.g. `http_req_duration{flow=purchase}`.
    pub key: String,
    pub metric: Metric,
    pub filter: TagFilter,
    /// The expression as written, e.g. `p(99) < 800ms`.
    pub source: String,
    pub expr: ThresholdExpr,
    /// k6's `abortOnFail`: stop the run as soon as this threshold fails on live data.
    pub abort_on_fail: bool,
    /// k6's `delayAbortEval`: how long into the run before `abort_on_fail` is looked at
    /// (the first seconds of a run are often unrepresentative).
    pub delay_abort_eval: Duration,
}

/// The longest `delay_abort_eval` a plan may ask for.
pub const MAX_DELAY_ABORT_EVAL: Duration = Duration::from_secs(24 * 3600);

/// How one threshold is written in a plan: an expression, or a table with k6's options
/// `{ threshold = "rate < 1%", abort_on_fail = true, delay_abort_eval = "10s" }`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum ThresholdEntry {
    Expr(String),
    Options(ThresholdOptions),
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdOptions {
    pub threshold: String,
    #[serde(default)]
    pub abort_on_fail: bool,
    #[serde(default)]
    pub delay_abort_eval: Option<String>,
}

impl ThresholdEntry {
    /// The expression, e.g. `p(99) < 800ms`.
    pub fn expr(&self) -> &str {
        match self {
            ThresholdEntry::Expr(e) => e,
            ThresholdEntry::Options(o) => &o.threshold,
        }
    }

    /// Parses the entry into a threshold of the metric `key`.
    pub fn parse(&self, key: &str) -> Result<Threshold, String> {
        let source = self.expr();
        let mut t = Threshold::new(key, source, ThresholdExpr::parse(source)?)?;
        if let ThresholdEntry::Options(o) = self {
            t.abort_on_fail = o.abort_on_fail;
            if let Some(d) = &o.delay_abort_eval {
                let d = parse_duration(d).map_err(|e| format!("delay_abort_eval \"{d}\": {e}"))?;
                if d > MAX_DELAY_ABORT_EVAL {
                    return Err(format!(
                        "delay_abort_eval {d:?} is longer than the limit of 24h"
                    ));
                }
                if !o.abort_on_fail {
                    return Err(
                        "delay_abort_eval needs abort_on_fail = true (it delays the abort)".into(),
                    );
                }
                t.delay_abort_eval = d;
            }
        }
        Ok(t)
    }
}

impl Threshold {
    pub fn new(key: &str, source: &str, mut expr: ThresholdExpr) -> Result<Threshold, String> {
        let (name, tags) = match key.split_once('{') {
            None => (key.trim(), ""),
            Some((n, rest)) => {
                let tags = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("\"{key}\": missing closing }}"))?;
                (n.trim(), tags)
            }
        };
        let metric = Metric::parse(name)
            .ok_or_else(|| format!("unknown metric \"{name}\" (known: {})", Metric::names()))?;
        let mut filter = TagFilter::default();
        for tag in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v) = tag
                .split_once('=')
                .ok_or_else(|| format!("\"{key}\": a tag is written name=value"))?;
            let (k, v) = (k.trim(), v.trim().trim_matches('"').to_string());
            match k {
                "scenario" => filter.scenario = Some(v),
                "flow" => filter.flow = Some(v),
                "name" | "step" => filter.step = Some(v),
                "node" => filter.node = Some(v),
                "error" if metric != Metric::HttpReqFailed => {
                    let why = "the error tag selects failed requests; use it on http_req_failed";
                    return Err(format!("\"{key}\": {why}"));
                }
                "error" => {
                    filter.error = Some(ErrorClass::parse(&v).ok_or_else(|| {
                        format!(
                            "\"{key}\": unknown error class \"{v}\" (known: {})",
                            ErrorClass::names()
                        )
                    })?)
                }
                _ if filter.label.is_none() => filter.label = Some((k.to_string(), v)),
                _ => return Err(format!("\"{key}\": at most one node label tag")),
            }
        }
        let is_duration_metric = metric.is_duration();
        match expr.aggregate {
            Aggregate::Rate if is_duration_metric => {
                return Err(format!(
                    "\"{source}\": {name} is a duration; use p(N), avg, min, max or med"
                ))
            }
            Aggregate::Percentile
            | Aggregate::Avg
            | Aggregate::Min
            | Aggregate::Max
            | Aggregate::Med
                if !is_duration_metric =>
            {
                return Err(format!(
                    "\"{source}\": {name} is not a duration; use rate or count"
                ))
            }
            _ => {}
        }
        if is_duration_metric && !expr.value_is_duration {
            // A bare number is milliseconds, as in k6.
            expr.value *= 1000.0;
            expr.value_is_duration = true;
        }
        Ok(Threshold {
            key: key.to_string(),
            metric,
            filter,
            source: source.to_string(),
            expr,
            abort_on_fail: false,
            delay_abort_eval: Duration::ZERO,
        })
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_tag_names_a_class_of_failed_requests() {
        let expr = || ThresholdExpr::parse("count == 0").unwrap();
        let t = Threshold::new(
            "http_req_failed{error=grpc_unavailable, flow=f}",
            "",
            expr(),
        )
        .unwrap();
        assert_eq!(t.filter.error, Some(ErrorClass::GrpcUnavailable));
        assert_eq!(t.filter.flow.as_deref(), Some("f"));
        assert_eq!(t.filter.label, None);
        let e = Threshold::new("http_req_failed{error=grpc_nope}", "", expr()).unwrap_err();
        assert!(e.contains("unknown error class \"grpc_nope\""), "{e}");
        assert!(e.contains("grpc_unauthenticated"), "{e}");
        let e = Threshold::new("http_reqs{error=timeout}", "", expr()).unwrap_err();
        assert!(e.contains("use it on http_req_failed"), "{e}");
    }

    #[test]
    fn parses_forms() {
        let e = ThresholdExpr::parse("p(99) < 800ms").unwrap();
        assert_eq!(e.aggregate, Aggregate::Percentile);
        assert_eq!(e.percentile, 99.0);
        assert_eq!(e.op, Op::Lt);
        assert_eq!(e.value, 800_000.0);
        let e = ThresholdExpr::parse("rate<1%").unwrap();
        assert_eq!((e.aggregate, e.value), (Aggregate::Rate, 0.01));
        let e = ThresholdExpr::parse("p(99.9) <= 1s").unwrap();
        assert_eq!((e.percentile, e.op, e.value), (99.9, Op::Le, 1e6));
        assert!(ThresholdExpr::parse("p(99) 800ms").is_err());
        assert!(ThresholdExpr::parse("q(99) < 1").is_err());
        assert!(ThresholdExpr::parse("rate <<< 1%").is_err());
    }

    #[test]
    fn abort_on_fail_options_as_in_k6() {
        let entry = |toml_text: &str| -> ThresholdEntry {
            #[derive(serde::Deserialize)]
            struct Doc {
                t: ThresholdEntry,
            }
            toml::from_str::<Doc>(toml_text).unwrap().t
        };
        let plain = entry(r#"t = "rate < 1%""#)
            .parse("http_req_failed")
            .unwrap();
        assert!(!plain.abort_on_fail);
        let t = entry(
            r#"t = { threshold = "rate < 1%", abort_on_fail = true, delay_abort_eval = "10s" }"#,
        )
        .parse("http_req_failed")
        .unwrap();
        assert!(t.abort_on_fail);
        assert_eq!(t.delay_abort_eval, Duration::from_secs(10));
        assert_eq!(t.source, "rate < 1%");
        let too_long = entry(
            r#"t = { threshold = "rate < 1%", abort_on_fail = true, delay_abort_eval = "25h" }"#,
        )
        .parse("http_req_failed");
        assert!(too_long.unwrap_err().contains("24h"));
        let no_abort = entry(r#"t = { threshold = "rate < 1%", delay_abort_eval = "1s" }"#)
            .parse("http_req_failed");
        assert!(no_abort.unwrap_err().contains("abort_on_fail"));
    }

    #[test]
    fn tags_and_k6_milliseconds() {
        let t = Threshold::new(
            "http_req_duration{flow=purchase, region=eu}",
            "p(95) < 200",
            ThresholdExpr::parse("p(95) < 200").unwrap(),
        )
        .unwrap();
        assert_eq!(t.filter.flow.as_deref(), Some("purchase"));
        assert_eq!(t.filter.label, Some(("region".into(), "eu".into())));
        assert_eq!(t.expr.value, 200_000.0);
        assert!(Threshold::new(
            "http_req_durations",
            "p(95) < 1",
            ThresholdExpr::parse("p(95) < 1").unwrap()
        )
        .is_err());
        assert!(Threshold::new(
            "http_req_failed",
            "p(95) < 1",
            ThresholdExpr::parse("p(95) < 1").unwrap()
        )
        .is_err());
    }

    #[test]
    fn named_metrics_take_thresholds_by_their_kind() {
        let t = |key: &str, e: &str| Threshold::new(key, e, ThresholdExpr::parse(e).unwrap());
        let rtt = t("ws_msg_rtt{flow=chat}", "p(95) < 50").unwrap();
        assert_eq!(rtt.metric, Metric::Named(Named::WsMsgRtt));
        assert_eq!(rtt.expr.value, 50_000.0);
        assert_eq!(rtt.filter.flow.as_deref(), Some("chat"));
        let sent = t("ws_msgs_sent", "count >= 10").unwrap();
        assert_eq!(sent.metric, Metric::Named(Named::WsMsgsSent));
        assert!(t("ws_msgs_sent", "p(95) < 1")
            .unwrap_err()
            .contains("not a duration"));
        assert!(t("ws_connecting", "rate < 1")
            .unwrap_err()
            .contains("is a duration"));
        let e = t("ws_msg_rt", "p(95) < 1").unwrap_err();
        assert!(
            e.contains("ws_msg_rtt") && e.contains("http_req_duration"),
            "{e}"
        );
    }

    #[test]
    fn values_that_are_not_finite_are_refused() {
        for bad in ["p(95) < inf", "rate < NaN", "count > 1e400", "avg < -inf%"] {
            let e = ThresholdExpr::parse(bad).unwrap_err();
            assert!(e.contains("must be a finite number"), "{bad}: {e}");
        }
        assert!(ThresholdExpr::parse("count > 1e300").is_ok());
    }
}
