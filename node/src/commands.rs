//! `stampede run`, `validate` and `demo` on an embedded single node: load the plan (with
//! `--set` overrides), check the outputs, run, print, write files, judge thresholds.
//!
//! Each command maps its failures onto the exit codes of `cli` through [`Failure`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stampede_protocol::plan::{parse_plan, PlanError};

use crate::cli::{ImportHarArgs, RunArgs, ValidateArgs};
use crate::exit::{Failure, Outcome};
use crate::plan::compile::{self, CompiledPlan};
use crate::reports::outputs::{self, Output};
use crate::reports::summary::{self, Summary};
use crate::reports::terminal;
use crate::run::embedded::{self, LocalOptions};
use stampede_protocol::machine::events::RunEvent;

pub fn run(args: RunArgs) -> Result<Outcome, Failure> {
    if args.mesh || args.node_client.node.is_some() {
        return run_mesh(args);
    }
    let outs = parse_outputs(&args.outputs)?;
    let plan = load_plan(&args.plan, &args.set)?;
    let mut opts = LocalOptions {
        workers: args.workers.unwrap_or(LocalOptions::default().workers),
        quiet: args.quiet,
        ..LocalOptions::default()
    };
    opts.allow_target.extend(args.allow_target.iter().cloned());
    // Before anything resolves or sends: a target the operator did not allow is a usage
    // error, not millions of failed requests.
    let allow = crate::http::Allowlist::from_entries(&opts.allow_target)
        .map_err(|e| Failure::usage(e.to_string()))?;
    embedded::refuse_unallowed_targets(&plan, &allow)
        .map_err(|e| Failure::usage(format!("{}: {e}", args.plan.display())))?;
    let expect_failures = plan.plan.expect_failures;
    let summary = embedded::run(Arc::new(plan), opts).map_err(Failure::run)?;
    finish(&summary, &outs, expect_failures)
}

pub fn validate(args: ValidateArgs) -> Result<Outcome, Failure> {
    let plan = load_plan(&args.plan, &[])?;
    let p = &plan.plan;
    println!(
        "{}: plan \"{}\" is valid: {} scenario(s), {} flow(s), {} data feeder(s), {} threshold(s), runs {}",
        args.plan.display(),
        p.name,
        p.scenarios.len(),
        p.flows.len(),
        p.data.len(),
        p.thresholds.len(),
        stampede_protocol::duration::format_duration(embedded::plan_duration(&plan))
    );
    Ok(Outcome::Success)
}

/// `stampede import har`: reads the recording (bounded), writes the plan, and checks it
/// with the same compiler as `validate` before anything is written.
pub fn import_har(args: ImportHarArgs) -> Result<Outcome, Failure> {
    use crate::plan::har;
    use std::io::Read;
    let file = args.har.display().to_string();
    let mut text = String::new();
    std::fs::File::open(&args.har)
        .and_then(|f| {
            f.take(har::MAX_HAR_BYTES as u64 + 1)
                .read_to_string(&mut text)
        })
        .map_err(|e| Failure::usage(format!("{file}: cannot read the recording: {e}")))?;
    let name = args
        .out
        .as_deref()
        .unwrap_or(&args.har)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recording".into());
    let opts = har::Options {
        base_url: args.base_url,
        include_assets: args.include_assets,
        include_hosts: args.include_host,
        flow_per_page: args.flow_per_page,
        no_correlate: args.no_correlate,
        name,
    };
    let imported = har::import(&text, &opts).map_err(|e| Failure::usage(format!("{file}: {e}")))?;
    let shown = args
        .out
        .as_ref()
        .map_or("the imported plan".to_string(), |p| p.display().to_string());
    // A plan that does not compile is this importer's bug, said before it is written.
    compile_text(&shown, &imported.plan, &[], Path::new(".")).map_err(|e| {
        Failure::run(format!(
            "{file}: the plan made from it does not validate (a bug of the importer): {e}"
        ))
    })?;
    match &args.out {
        Some(p) => std::fs::write(p, &imported.plan)
            .map_err(|e| Failure::run(format!("{}: cannot write the plan: {e}", p.display())))?,
        None => print!("{}", imported.plan),
    }
    eprintln!(
        "{file}: {} request(s) recorded, {} step(s) written to {shown}, {} value(s) correlated, {} asset(s) and {} request(s) to other hosts left out",
        imported.entries,
        imported.steps,
        imported.correlated,
        imported.assets_left_out,
        imported.other_hosts.values().sum::<usize>()
    );
    Ok(Outcome::Success)
}

/// `stampede run --mesh`: hand the plan bundle to this machine's node, follow the run's
/// progress, and write the merged result. Ctrl-C stops the run mesh-wide, gracefully.
fn run_mesh(args: RunArgs) -> Result<Outcome, Failure> {
    let outs = parse_outputs(&args.outputs)?;
    // Check the plan here first: a typo is a usage error before anything is sent.
    let plan = load_plan(&args.plan, &args.set)?;
    let file = args.plan.display().to_string();
    let text =
        std::fs::read_to_string(&args.plan).map_err(|e| Failure::usage(format!("{file}: {e}")))?;
    let text = if args.set.is_empty() {
        text
    } else {
        apply_sets(&file, &text, &args.set)?
    };
    let base = args
        .plan
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut files = std::collections::BTreeMap::new();
    for d in &plan.plan.data {
        let bytes = std::fs::read(base.join(&d.file)).map_err(|e| {
            Failure::usage(format!(
                "{file}: data.{}.file: cannot read {}: {e}",
                d.name, d.file
            ))
        })?;
        files.insert(d.file.clone(), bytes);
    }
    let plan_name = args
        .plan
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plan.toml".into());
    let bundle = stampede_protocol::run::Bundle {
        plan_name,
        plan: text,
        files,
    };
    bundle.validate().map_err(Failure::usage)?;
    let target = crate::serve::control::find_node(
        args.node_client.node.as_deref(),
        args.node_client.data_dir.as_deref(),
    )
    .map_err(Failure::usage)?;
    let request = crate::serve::control::ControlRequest::Run {
        bundle,
        requirements: plan.plan.requirements.clone(),
    };
    let summary = follow_run(&target, request, args.quiet, embedded::plan_duration(&plan))?;
    finish(&summary, &outs, plan.plan.expect_failures)
}

/// Sends a run request to a node, shows its progress as it streams in, and returns
/// the merged summary. Ctrl-C asks the node to stop the run mesh-wide, gracefully.
pub fn follow_run(
    target: &crate::serve::control::Target,
    request: crate::serve::control::ControlRequest,
    quiet: bool,
    total: Duration,
) -> Result<Summary, Failure> {
    // Ctrl-C: ask the node to stop the run everywhere; the summary still comes back.
    let run_id = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let (target, run_id) = (target.clone(), run_id.clone());
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                loop {
                    if tokio::signal::ctrl_c().await.is_err() {
                        return;
                    }
                    let id = run_id.lock().ok().and_then(|g| g.clone());
                    if let Some(id) = id {
                        eprintln!("\nstopping run {id} on every node (the report follows)…");
                        let _ = crate::serve::control::call(
                            &target,
                            crate::serve::control::ControlRequest::Stop { run_id: id },
                        );
                    } else {
                        std::process::exit(crate::cli::EXIT_RUN_FAILED);
                    }
                }
            });
        });
    }
    let mut progress = crate::reports::terminal::Progress::new(quiet);
    let started = std::time::Instant::now();
    let result =
        crate::serve::control::call_streaming(target, request, Duration::from_secs(120), |ev| {
            if let Some(id) = ev.get("run_id").and_then(|v| v.as_str()) {
                if let Ok(mut g) = run_id.lock() {
                    *g = Some(id.to_string());
                }
            }
            if let Some(p) = ev.get("progress") {
                if let Ok(point) =
                    serde_json::from_value::<crate::reports::aggregate::TimelinePoint>(p.clone())
                {
                    let nodes = ev.get("nodes").and_then(|n| n.as_u64()).unwrap_or(0) as usize;
                    progress.update(Duration::from_secs(point.t + 1), total, &point, nodes);
                }
            } else if let Some(e) = ev.get("run_event") {
                // A run event, typed: what makes the report incomplete is said even with
                // --quiet.
                if let Ok(e) = serde_json::from_value::<crate::reports::summary::Event>(e.clone()) {
                    progress.finish();
                    if !quiet || e.event.is_warning() {
                        eprintln!(
                            "[{:>5.1}s] {}: {}",
                            started.elapsed().as_secs_f64(),
                            e.event.kind(),
                            crate::reports::terminal::event_detail(&e.event)
                        );
                    }
                }
            } else if let Some(kind) = ev.get("event").and_then(|v| v.as_str()) {
                // A progress note of the run's set-up (proposed, refused, roster, ...).
                progress.finish();
                let mut rest = ev.clone();
                if let Some(o) = rest.as_object_mut() {
                    o.remove("event");
                }
                // A refusal is said even with --quiet.
                if !quiet || kind == "refused" {
                    eprintln!("[{:>5.1}s] {kind}: {rest}", started.elapsed().as_secs_f64());
                }
            }
        });
    progress.finish();
    let summary_json = result.map_err(Failure::run)?;
    let summary: Summary = serde_json::from_value(summary_json.clone())
        .map_err(|e| Failure::run(format!("the node sent an unreadable summary: {e}")))?;
    Ok(summary)
}

/// Prints the summary, writes the outputs and judges the run: failed thresholds first
/// (what the user asked to be judged by), then a run in which every request failed
/// (unless the plan expects failures).
pub fn finish(
    summary: &Summary,
    outs: &[Output],
    expect_failures: bool,
) -> Result<Outcome, Failure> {
    print_and_write(summary, outs)?;
    let t = &summary.totals;
    let aborted = summary
        .events
        .iter()
        .any(|e| matches!(e.event, RunEvent::ThresholdAbort { .. }));
    if aborted || !summary::thresholds_passed(summary) {
        eprintln!("some thresholds failed");
        Ok(Outcome::ThresholdsFailed)
    } else if t.requests > 0 && t.failed == t.requests && !expect_failures {
        eprintln!(
            "every request failed ({} of {}); exit code {} (set expect_failures = true in \
             the plan when that is the point)",
            t.failed,
            t.requests,
            crate::cli::EXIT_ALL_FAILED
        );
        Ok(Outcome::AllFailed)
    } else {
        Ok(Outcome::Success)
    }
}

/// The summary table on stdout, then every `--out` file.
pub fn print_and_write(summary: &Summary, outs: &[Output]) -> Result<(), Failure> {
    print!("{}", terminal::summary_table(summary));
    outputs::write_all(outs, summary).map_err(Failure::run)
}

pub fn parse_outputs(specs: &[String]) -> Result<Vec<Output>, Failure> {
    specs
        .iter()
        .map(|s| outputs::parse(s).map_err(Failure::usage))
        .collect()
}

/// Reads a plan, applies `--set key=value` overrides and compiles it.
pub fn load_plan(path: &Path, sets: &[String]) -> Result<CompiledPlan, Failure> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("{file}: cannot read the plan: {e}")))?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    compile_text(&file, &src, sets, &base)
}

/// Compiles plan text; `file` names it in errors and `base` resolves its data files.
pub fn compile_text(
    file: &str,
    src: &str,
    sets: &[String],
    base: &Path,
) -> Result<CompiledPlan, Failure> {
    let usage = |e: PlanError| Failure::usage(e.to_string());
    let (file, src) = if sets.is_empty() {
        (file.to_string(), src.to_string())
    } else {
        (format!("{file} (with --set)"), apply_sets(file, src, sets)?)
    };
    let plan = parse_plan(&file, &src).map_err(usage)?;
    let mut compiled = compile::compile(plan, &file, base).map_err(usage)?;
    compiled.source = src;
    Ok(compiled)
}

/// `--set a.b.c=value`: the value is read as TOML (a number, a string in quotes, an
/// array…) and taken as a plain string when it is not valid TOML.
pub fn apply_sets(file: &str, src: &str, sets: &[String]) -> Result<String, Failure> {
    let mut doc: toml::Table = toml::from_str(src).map_err(|e| {
        Failure::usage(
            PlanError {
                file: file.into(),
                line: e
                    .span()
                    .map(|s| stampede_protocol::plan::line_of(src, s.start)),
                field: None,
                message: e.message().to_string(),
            }
            .to_string(),
        )
    })?;
    for s in sets {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--set \"{s}\": expected KEY=VALUE")))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        let mut table = &mut doc;
        for p in &parts[..parts.len() - 1] {
            let entry = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                Failure::usage(format!("--set \"{s}\": \"{p}\" is not a table in the plan"))
            })?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    toml::to_string(&doc).map_err(|e| Failure::usage(format!("--set: {e}")))
}

/// The retail example, embedded so that `stampede demo` needs no files.
pub const RETAIL_PLAN: &str = include_str!("../../examples/retail.toml");

/// `user,password` rows for the demo shop's accounts user1..userN.
pub fn accounts_csv(n: u64) -> String {
    let mut s = String::from("user,password\n");
    for i in 1..=n {
        s.push_str(&format!("user{i},pass{i}\n"));
    }
    s
}
