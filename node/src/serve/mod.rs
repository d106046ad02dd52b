//! Serving: the local control endpoint the CLI talks to, and the HTTP status server
//! with the live dashboard. Both only read what the run driver and the reports
//! publish; neither decides anything about a run.

pub mod control;
pub mod dashboard;
pub mod status_http;
