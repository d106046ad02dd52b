//! The command line: every subcommand and flag a user types, parsed by clap.
//!
//! This module only describes arguments; it must not do work. `main.rs` hands each
//! parsed command to the module that owns it. Flags that are also node settings are
//! layered by `config` (defaults < config file < `STAMPEDE_*` environment < flags), so
//! they are `Option`s here: `None` means "not given on the command line".

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code when the run completed but a threshold failed (k6 uses 99 too).
pub const EXIT_THRESHOLDS_FAILED: i32 = 99;
/// Exit code for a plan or usage error: nothing was run.
pub const EXIT_USAGE: i32 = 2;
/// Exit code for a run that started but could not complete (or could not start).
pub const EXIT_RUN_FAILED: i32 = 3;
/// Exit code for a run that completed but in which every request failed, when the plan
/// does not say so is expected (`expect_failures = true`) and no threshold failed.
pub const EXIT_ALL_FAILED: i32 = 4;
/// Exit code of `stampede report` when neither this node nor any alive member has the run.
pub const EXIT_NOT_FOUND: i32 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "stampede",
    version,
    about = "A distributed load tester: many machines acting as one.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a plan: on an embedded single node, or across the mesh with --mesh.
    Run(RunArgs),
    /// Start a long-running node of the mesh.
    Node(NodeArgs),
    /// Show the mesh members as this node sees them.
    Peers(PeersArgs),
    /// Show runs in progress and recent runs.
    Status(StatusArgs),
    /// Stop a run mesh-wide, gracefully (the report is still written).
    Stop(StopArgs),
    /// Print a finished run's summary and write its files, from whichever node has it.
    Report(ReportArgs),
    /// Write a new mesh pre-shared key.
    Keygen(KeygenArgs),
    /// One command, no setup: a local demo shop and the retail example run against it.
    Demo(DemoArgs),
    /// Check a plan without running it.
    Validate(ValidateArgs),
    /// Make a plan from a recording.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// A browser recording (HAR 1.2, "Save all as HAR" in the browser's network tab).
    Har(ImportHarArgs),
}

#[derive(Debug, Args)]
pub struct ImportHarArgs {
    /// The recording (.har).
    pub har: PathBuf,
    /// Where to write the plan (default: standard output).
    #[arg(long = "out", value_name = "PLAN.toml")]
    pub out: Option<PathBuf>,
    /// The plan's base_url, to which request URLs are made relative (default: the
    /// origin of the first recorded request).
    #[arg(long = "base-url", value_name = "URL")]
    pub base_url: Option<String>,
    /// Keep stylesheets, scripts, images, fonts and media (left out by default).
    #[arg(long = "include-assets")]
    pub include_assets: bool,
    /// Keep the requests to this other host (host or host:port). Repeatable.
    #[arg(long = "include-host", value_name = "HOST")]
    pub include_host: Vec<String>,
    /// One flow per recorded page instead of one flow for the whole recording
    /// (values are correlated within a flow only).
    #[arg(long = "flow-per-page")]
    pub flow_per_page: bool,
    /// Do not correlate dynamic values: the plan sends the recorded tokens and ids.
    #[arg(long = "no-correlate")]
    pub no_correlate: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
    /// Write a result file: json=FILE, html=FILE, junit=FILE or csv=FILE. Repeatable.
    #[arg(long = "out", value_name = "FORMAT=FILE")]
    pub outputs: Vec<String>,
    /// Hand the plan to the node daemon on this machine and run it across the mesh.
    #[arg(long)]
    pub mesh: bool,
    #[command(flatten)]
    pub node_client: NodeClientArgs,
    /// Override a plan key, e.g. --set scenarios.shoppers.rate=200. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Do not draw the live progress line (for logs and CI).
    #[arg(long)]
    pub quiet: bool,
    /// Worker threads that generate load (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Hosts or CIDRs this embedded node may send load to, besides loopback (always
    /// allowed for an embedded run).
    #[arg(long = "allow-target", value_name = "HOST_OR_CIDR")]
    pub allow_target: Vec<String>,
}

/// How a CLI command finds the node it talks to (spec §10).
#[derive(Debug, Args, Clone, Default)]
pub struct NodeClientArgs {
    /// The node's control address (host:port); overrides --data-dir.
    #[arg(long = "node", value_name = "CONTROL_ADDR")]
    pub node: Option<String>,
    /// The node's data directory (the same flag the node was started with).
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct NodeArgs {
    /// A config file (TOML) with node settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Multiaddr to listen on for the mesh. Repeatable.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Multiaddr of a peer to join through (with or without /p2p/ID; /dns4/ names work). Repeatable.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// The mesh pre-shared key file (from `stampede keygen`).
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Run without a mesh key: only for a local, trusted machine.
    #[arg(long = "insecure-no-key")]
    pub insecure_no_key: bool,
    /// A label of this node, e.g. region=eu. Repeatable.
    #[arg(long = "label", value_name = "K=V")]
    pub label: Vec<String>,
    /// A host, CIDR or `loopback` (127.0.0.0/8 and ::1) this node may send load to;
    /// nothing is allowed unless listed. Repeatable.
    #[arg(long = "allow-target", value_name = "HOST_OR_CIDR")]
    pub allow_target: Vec<String>,
    /// Serve the dashboard and /metrics here (loopback by default).
    #[arg(long = "http", value_name = "ADDR")]
    pub http: Option<String>,
    /// This node's name in the mesh (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the node keeps its identity, control socket address and run results.
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long = "log-json")]
    pub log_json: bool,
}

#[derive(Debug, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub node_client: NodeClientArgs,
    /// Print a JSON array of members instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub node_client: NodeClientArgs,
    /// Print one JSON object per run instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The run to stop.
    pub run_id: String,
    #[command(flatten)]
    pub node_client: NodeClientArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The finished run (as `stampede status` lists it).
    pub run_id: String,
    /// Write a result file: json=FILE, html=FILE, junit=FILE or csv=FILE. Repeatable.
    #[arg(long = "out", value_name = "FORMAT=FILE")]
    pub outputs: Vec<String>,
    #[command(flatten)]
    pub node_client: NodeClientArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (default: standard output).
    #[arg(long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo run lasts.
    #[arg(long, default_value = "20s")]
    pub duration: String,
    /// Write the JSON summary here as well.
    #[arg(long = "out", value_name = "FORMAT=FILE")]
    pub outputs: Vec<String>,
    /// Do not draw the live progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
}
