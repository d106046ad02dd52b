//! A run on an embedded single node in this process — a mesh of one: the zero-setup
//! path of `stampede run PLAN` and the building block a mesh node reuses for its own
//! execution segment.
//!
//! It starts the engine on the whole plan (segment 0..1), drives the live progress line,
//! turns Ctrl-C into a graceful stop (a second Ctrl-C stops hard), and returns the
//! merged summary. It must not write output files; `outputs` does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::cpu::CpuSampler;
use crate::engine::{Engine, RunSpec, Stop};
use crate::http::{Allowlist, ClientSettings, HttpVersionPref, Shared};
use crate::plan::compile::CompiledPlan;
use crate::reports::aggregate::{NodeCollector, RunAggregate};
use crate::reports::summary::{self, NodeInfo, Summary, SummaryInput};
use crate::reports::terminal::Progress;
use stampede_protocol::machine::events::RunEvent;

pub struct LocalOptions {
    pub workers: usize,
    pub quiet: bool,
    pub allow_target: Vec<String>,
    pub graceful_stop: Duration,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            workers: crate::engine::cpu::cores(),
            quiet: false,
            // An embedded run is its operator's own command: loopback is allowed.
            allow_target: vec![crate::http::LOOPBACK.to_string()],
            graceful_stop: Duration::from_secs(30),
            node_name: hostname(),
            labels: BTreeMap::new(),
        }
    }
}

/// This machine's host name, the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// HTTP client settings for a plan on this node.
pub fn client_settings(
    plan: &CompiledPlan,
    allow_target: &[String],
) -> Result<ClientSettings, String> {
    let allow = Allowlist::from_entries(allow_target.iter()).map_err(|e| e.to_string())?;
    let d = &plan.plan.defaults;
    Ok(ClientSettings {
        insecure_tls: d.insecure_skip_tls_verify,
        http_version: match d.http_version {
            stampede_protocol::plan::HttpVersion::Http1 => HttpVersionPref::Http1,
            stampede_protocol::plan::HttpVersion::Http2 => HttpVersionPref::Http2,
            stampede_protocol::plan::HttpVersion::Auto => HttpVersionPref::Auto,
        },
        max_redirects: d.max_redirects,
        allow,
        ..ClientSettings::default()
    })
}

/// Refuses a plan whose fixed target hosts (`base_url`, static step URLs) no entry of
/// `allow` can match, before anything resolves them: one line naming the host and the
/// `--allow-target` that would allow it. Hosts known only at run time are checked per
/// connection by the HTTP client.
pub fn refuse_unallowed_targets(plan: &CompiledPlan, allow: &Allowlist) -> Result<(), String> {
    let mut hosts = std::collections::BTreeSet::new();
    if let Some(b) = &plan.plan.defaults.base_url {
        if let Ok(u) = crate::http::Url::parse(b) {
            hosts.insert(u.host().to_string());
        }
    }
    for f in &plan.flows {
        for s in &f.steps {
            if let crate::plan::compile::UrlTemplate::Static(u) = &s.url {
                hosts.insert(u.host().to_string());
            }
        }
    }
    hosts.iter().try_for_each(|h| allow.refuse_unmatchable(h))
}

/// This machine's wall clock in Unix ms (the run protocol's µs clock, coarser).
pub fn unix_ms() -> u64 {
    stampede_protocol::run::unix_us() / 1000
}

/// A short, unique-enough run id: time plus randomness. This is the one format
/// every node accepts (`stampede_protocol::run::validate_run_id`): a run id becomes a
/// directory name, so a change here must change the check with it.
pub fn new_run_id() -> String {
    format!("{:x}-{:04x}", unix_ms() / 1000, rand::random::<u16>())
}

/// Runs the whole plan here and returns its summary.
pub fn run(plan: Arc<CompiledPlan>, opts: LocalOptions) -> Result<Summary, String> {
    let settings = client_settings(&plan, &opts.allow_target)?;
    let http = Shared::new(settings).map_err(|e| e.to_string())?;
    let diagnosed = http.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the run's runtime: {e}"))?;
    let run_id = new_run_id();
    let workers = opts.workers.max(1);
    let started_ms = unix_ms();
    // A short lead so that every worker is up before the first intended instant.
    let start_at = Instant::now() + Duration::from_millis(50);
    let spec = RunSpec {
        plan: plan.clone(),
        assignment: crate::engine::LiveAssignment::single(&plan),
        lease: crate::engine::Lease::always(),
        node: 0,
        node_name: opts.node_name.clone(),
        workers,
        http,
        start_at,
        graceful_stop: opts.graceful_stop,
    };
    let total = plan_duration(&plan);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let engine =
        Engine::start(spec, tx).map_err(|e| format!("cannot start worker threads: {e}"))?;
    let stop = engine.stop.clone();
    let mut collector = NodeCollector::new(plan.layout.clone(), workers);
    // A local run has no data dir: its timelines' older buckets go to the system's
    // temporary dir (unlinked files), so that an hour-long soak stays flat here too.
    let mut agg = RunAggregate::spilling_to(plan.layout.clone(), Some(std::env::temp_dir().into()));
    let mut progress = Progress::new(opts.quiet);
    let mut cpu = CpuSampler::default();
    let mut cpu_max: f64 = 0.0;
    let node_id = "local".to_string();
    let mut events = Vec::new();
    let mut watch = crate::reports::failing::Watch::default();
    let mut refusals_said = 0;
    let watches_abort = plan.plan.thresholds.iter().any(|t| t.abort_on_fail);
    let mut aborted = false;
    let live_nodes = vec![NodeInfo {
        id: node_id.clone(),
        name: opts.node_name.clone(),
        labels: opts.labels.clone(),
        ..Default::default()
    }];
    rt.block_on(async {
        let mut ctrl_c = 0;
        loop {
            tokio::select! {
                r = rx.recv() => {
                    let Some(r) = r else { break };
                    for second in collector.add(r) {
                        // Skip the last partial second's CPU sample: it covers shutdown.
                        if !collector.finished() {
                            cpu_max = cpu_max.max(cpu.sample(workers));
                        }
                        let _ = agg.add(&node_id, &second);
                        if let Some(p) = agg.latest() {
                            let t = start_at.elapsed();
                            let diagnoses = diagnosed.diagnoses();
                            let refusals: Vec<_> = crate::reports::failing::refusals(&diagnoses).collect();
                            for d in refusals.iter().skip(refusals_said) {
                                progress.say(&d.line);
                                events.push(crate::reports::failing::event(t.as_secs_f64(), RunEvent::TargetRefused { message: d.line.clone() }));
                            }
                            refusals_said = refusals.len();
                            if let Some(line) = watch.second(&p, &diagnoses) {
                                progress.say(&line);
                                events.push(crate::reports::failing::event(t.as_secs_f64(), RunEvent::OnlyFailing { message: line.clone() }));
                            }
                            progress.update(t, total, &p, 1);
                            if watches_abort && !aborted {
                                if let Some(r) = crate::reports::abort::check(&plan.plan, &agg, &live_nodes, t, true) {
                                    // k6's abortOnFail: stop now; what was measured stays.
                                    aborted = true;
                                    let line = r.message();
                                    progress.say(&line);
                                    events.push(crate::reports::failing::event(t.as_secs_f64(), RunEvent::ThresholdAbort { message: line.clone() }));
                                    stop.stop(Stop::Hard);
                                }
                            }
                        }
                    }
                    if collector.finished() {
                        break;
                    }
                }
                _ = tokio::signal::ctrl_c() => {
                    ctrl_c += 1;
                    let how = if ctrl_c == 1 { Stop::Graceful } else { Stop::Hard };
                    events.push(summary::Event {
                        t: start_at.elapsed().as_secs_f64(),
                        event: RunEvent::StopRequested {
                            how: if ctrl_c == 1 { "graceful" } else { "hard" }.into(),
                        },
                    });
                    stop.stop(how);
                }
            }
        }
    });
    engine.join();
    progress.finish();
    agg.finish();
    let duration_s = start_at.elapsed().as_secs_f64();
    let nodes = vec![NodeInfo {
        id: node_id.clone(),
        name: opts.node_name.clone(),
        labels: opts.labels.clone(),
        status: "completed".into(),
        cpu: cpu_max,
        ..Default::default()
    }];
    Ok(summary::build(
        &agg,
        SummaryInput {
            run_id: &run_id,
            plan: &plan.plan,
            started_at_unix_ms: started_ms,
            duration_s,
            nodes: &nodes,
            events,
            start_skew_us: 0,
            plan_source: &plan.source,
        },
    ))
}

/// The longest any scenario runs, with its start offset.
pub fn plan_duration(plan: &CompiledPlan) -> Duration {
    plan.scenarios
        .iter()
        .map(|s| s.start_after + s.executor.total_duration())
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_run_ids_pass_the_check_every_node_makes() {
        for _ in 0..100 {
            let id = new_run_id();
            stampede_protocol::run::validate_run_id(&id).unwrap();
        }
    }
}
