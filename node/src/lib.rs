//! stampede: a distributed load tester. The binary (`main.rs`) is only wiring; every
//! concern lives in a module of this library so that tests and the mesh reuse it.
//!
//! The folders follow the data path: a `plan` is compiled, the `engine` runs this
//! node's segment of it over `http`, `reports` turn measurements into a run's picture,
//! `run` drives a run across the `mesh`, and `serve` answers the CLI and the browser.
//! The top-level files are the commands a user types.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod exit;
pub mod http;
pub mod mesh;
pub mod plan;
pub mod reports;
pub mod run;
pub mod serve;
pub mod settings;
