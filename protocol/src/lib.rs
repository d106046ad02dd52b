//! stampede-protocol: everything of stampede that crosses the wire or the disk — the
//! plan schema, mesh messages and metric snapshots — so that every node, whatever
//! machine it runs on, reads them the same way. Nothing here does I/O.

pub mod duration;
pub mod executor;
pub mod machine;
pub mod membership;
pub mod mesh;
pub mod named;
pub mod plan;
pub mod redact;
pub mod run;
pub mod segment;
pub mod snapshot;
pub mod threshold;
