//! How a command ends: success, failed thresholds, a usage/plan error, or a run that
//! could not complete — each with its own documented exit code (see `cli`).
//!
//! Commands return `Result<Outcome, Failure>`; only `main` turns that into a process
//! exit code, so library code never calls `process::exit`.

use std::fmt;

use crate::cli::{
    EXIT_ALL_FAILED, EXIT_NOT_FOUND, EXIT_RUN_FAILED, EXIT_THRESHOLDS_FAILED, EXIT_USAGE,
};

/// A command that finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A threshold failed, or one with `abort_on_fail` stopped the run.
    ThresholdsFailed,
    /// Every request of the run failed (and the plan did not expect it).
    AllFailed,
}

/// Why a command could not do its job. The message is one sentence for the user.
#[derive(Debug)]
pub enum Failure {
    /// The plan or the command line is wrong; nothing ran.
    Usage(String),
    /// Something went wrong while running (or starting) the run.
    Run(String),
    /// What was asked for (a finished run's report) is on no node that could be asked.
    NotFound(String),
}

impl Failure {
    pub fn usage(msg: impl Into<String>) -> Self {
        Failure::Usage(msg.into())
    }
    pub fn run(msg: impl Into<String>) -> Self {
        Failure::Run(msg.into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Run(m) | Failure::NotFound(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<Failure>() {
            Ok(f) => f,
            Err(e) => Failure::Run(format!("{e:#}")),
        }
    }
}

impl Outcome {
    /// Prints the failure (if any) and maps the outcome to the process exit code.
    pub fn exit_code(result: Result<Outcome, Failure>) -> i32 {
        match result {
            Ok(Outcome::Success) => 0,
            Ok(Outcome::ThresholdsFailed) => EXIT_THRESHOLDS_FAILED,
            Ok(Outcome::AllFailed) => EXIT_ALL_FAILED,
            Err(f) => {
                eprintln!("error: {f}");
                match f {
                    Failure::Usage(_) => EXIT_USAGE,
                    Failure::Run(_) => EXIT_RUN_FAILED,
                    Failure::NotFound(_) => EXIT_NOT_FOUND,
                }
            }
        }
    }
}
