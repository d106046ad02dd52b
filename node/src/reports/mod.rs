//! Metrics and reports: node seconds merged into a run's picture (exactly, histogram
//! addition), the JSON summary and its outputs (CSV, JUnit, HTML, Prometheus, the
//! terminal), the live view, the durable results in the data dir, and the live judges
//! that stop a run early (`abort_on_fail`, a run that only fails). Nothing here sends
//! load or talks to peers; the run driver hands seconds in and takes reports out.

pub mod abort;
pub mod aggregate;
pub mod compare;
pub mod failing;
pub mod html;
pub mod live;
pub mod outputs;
pub mod prometheus;
pub mod results;
pub(crate) mod spill;
pub mod summary;
pub mod terminal;
