//! The long-running node (`stampede node`) and the CLI commands that talk to one
//! (`peers`, `status`, `stop`, `keygen`). Owned by the mesh work; placeholder until then.

use crate::cli::{KeygenArgs, NodeArgs, NodeClientArgs, PeersArgs, StopArgs};
use crate::exit::{Failure, Outcome};

fn not_yet(what: &str) -> Result<Outcome, Failure> {
    Err(Failure::usage(format!(
        "`stampede {what}` is not available in this build yet"
    )))
}

pub fn node(_args: NodeArgs) -> Result<Outcome, Failure> {
    not_yet("node")
}
pub fn peers(_args: PeersArgs) -> Result<Outcome, Failure> {
    not_yet("peers")
}
pub fn status(_args: NodeClientArgs) -> Result<Outcome, Failure> {
    not_yet("status")
}
pub fn stop(_args: StopArgs) -> Result<Outcome, Failure> {
    not_yet("stop")
}
pub fn keygen(_args: KeygenArgs) -> Result<Outcome, Failure> {
    not_yet("keygen")
}
