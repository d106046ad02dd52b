//! stampede: a distributed load tester. The binary (`main.rs`) is only wiring; every
//! concern lives in a module of this library so that tests and the mesh reuse it.

pub mod cli;
pub mod commands;
pub mod compile;
pub mod daemon;
pub mod data;
pub mod engine;
pub mod exit;
pub mod jsonpath;
pub mod template;
pub mod vu;
