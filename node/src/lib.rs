//! stampede: a distributed load tester. The binary (`main.rs`) is only wiring; every
//! concern lives in a module of this library so that tests and the mesh reuse it.

pub mod cli;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod exit;
pub mod mesh;
pub mod settings;
pub mod status_http;
