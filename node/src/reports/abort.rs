//! Thresholds with `abort_on_fail` (k6's abortOnFail and delayAbortEval): whether the
//! live, merged measurements of a run already fail one, so the run must stop now.
//!
//! A pure function of the live aggregate: the embedded run calls it once a second on
//! its own aggregate; a mesh run's coordinator calls it on the merged aggregate of every
//! node and publishes the stop. It must not stop anything or print; the caller does.

use std::time::Duration;

use stampede_protocol::plan::Plan;

use crate::reports::aggregate::RunAggregate;
use crate::reports::summary::{self, NodeInfo};

/// The threshold that stopped a run, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct AbortReason {
    /// `METRIC{tags}: EXPR`, as written in the plan.
    pub threshold: String,
    /// The measured value that failed it (µs for durations, a fraction for rates).
    pub value: f64,
    /// Time into the run of the evaluation that failed.
    pub at: Duration,
}

impl AbortReason {
    /// One line for the live output, the log and the summary.
    pub fn message(&self) -> String {
        format!(
            "threshold {} failed at {:.0} s (measured {}) and has abort_on_fail: the run \
             was stopped there; the report covers the run up to the stop",
            self.threshold,
            self.at.as_secs_f64(),
            self.value
        )
    }
}

/// The first threshold with `abort_on_fail` whose `delay_abort_eval` has passed at
/// `elapsed` and that fails on `agg` (the live totals so far, all nodes merged), if any.
/// `nodes` names the nodes for `node=`/label tags. Without `per_node` figures (a mesh
/// run aggregated in a tree: the live aggregate holds merged seconds only), thresholds
/// filtered by node or label are not judged live — they would read nothing — only in
/// the report.
pub fn check(
    plan: &Plan,
    agg: &RunAggregate,
    nodes: &[NodeInfo],
    elapsed: Duration,
    per_node: bool,
) -> Option<AbortReason> {
    let secs = elapsed.as_secs_f64().max(1e-3);
    plan.thresholds
        .iter()
        .filter(|t| t.abort_on_fail && elapsed >= t.delay_abort_eval)
        .filter(|t| per_node || (t.filter.node.is_none() && t.filter.label.is_none()))
        .find_map(|t| {
            let r = summary::evaluate(t, agg, nodes, secs);
            (!r.passed).then(|| AbortReason {
                threshold: t.to_string(),
                value: r.value,
                at: elapsed,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::aggregate::NodeSecond;

    fn plan(thresholds: &str) -> crate::plan::compile::CompiledPlan {
        let text = format!(
            r#"
name = "p"
[defaults]
base_url = "http://127.0.0.1:1"
[scenarios.s]
executor = "constant-vus"
vus = 1
duration = "10s"
flow = "f"
[[flows.f.steps]]
name = "a"
request = {{ url = "/" }}
[thresholds]
{thresholds}
"#
        );
        crate::commands::compile_text("p.toml", &text, &[], std::path::Path::new("."))
            .expect("plan compiles")
    }

    /// One second of `requests`, `failed` of them failed.
    fn second(
        p: &crate::plan::compile::CompiledPlan,
        t: u64,
        requests: u64,
        failed: u64,
    ) -> NodeSecond {
        let mut m = stampede_protocol::snapshot::Metrics::new(&p.layout);
        m.series[0].requests = requests;
        m.series[0].failed = failed;
        NodeSecond {
            second: t,
            metrics: m,
            vus: 1,
        }
    }

    #[test]
    fn a_failing_abort_threshold_is_named_after_its_delay_and_others_never() {
        let p = plan(
            r#""http_req_failed" = [{ threshold = "rate < 10%", abort_on_fail = true, delay_abort_eval = "2s" }]
"http_reqs" = ["count > 1000000"]"#,
        );
        let mut agg = RunAggregate::new(p.layout.clone());
        let _ = agg.add("n", &second(&p, 0, 100, 50));
        // Failing, but still within delay_abort_eval.
        assert_eq!(
            check(&p.plan, &agg, &[], Duration::from_secs(1), true),
            None
        );
        let r = check(&p.plan, &agg, &[], Duration::from_secs(2), true).expect("aborts");
        assert_eq!(r.threshold, "http_req_failed: rate < 10%");
        assert_eq!(r.value, 0.5);
        assert!(r.message().contains("failed at 2 s"), "{}", r.message());
        // Passing again on the merged totals: no abort.
        let _ = agg.add("n", &second(&p, 1, 10_000, 0));
        assert_eq!(
            check(&p.plan, &agg, &[], Duration::from_secs(3), true),
            None
        );
    }

    /// Without per-node figures (a tree-aggregated mesh run's live aggregate), a
    /// threshold filtered by node or label is left to the report: it would read
    /// nothing and fail (or pass) on no data.
    #[test]
    fn node_and_label_filtered_abort_thresholds_wait_for_per_node_figures() {
        let p = plan(
            r#""http_reqs{node=n}" = [{ threshold = "count > 1000", abort_on_fail = true }]
"http_reqs{region=eu}" = [{ threshold = "count > 1000", abort_on_fail = true }]"#,
        );
        let mut agg = RunAggregate::new(p.layout.clone());
        let _ = agg.add("n", &second(&p, 0, 100, 0));
        let t = Duration::from_secs(1);
        assert!(check(&p.plan, &agg, &[], t, true).is_some());
        assert_eq!(check(&p.plan, &agg, &[], t, false), None);
    }
}
