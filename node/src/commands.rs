//! `stampede run`, `validate` and `demo` on an embedded single node.

use crate::cli::{DemoArgs, RunArgs, ValidateArgs};
use crate::exit::{Failure, Outcome};

pub fn run(_args: RunArgs) -> Result<Outcome, Failure> {
    Err(Failure::usage("not yet"))
}
pub fn validate(_args: ValidateArgs) -> Result<Outcome, Failure> {
    Err(Failure::usage("not yet"))
}
pub fn demo(_args: DemoArgs) -> Result<Outcome, Failure> {
    Err(Failure::usage("not yet"))
}
