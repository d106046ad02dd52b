//! stampede: a distributed load tester. The binary (`main.rs`) is only wiring; every
//! concern lives in a module of this library so that tests and the mesh reuse it.

pub mod abort;
pub mod aggregate;
pub mod bundle;
pub mod cli;
pub mod commands;
pub mod compile;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod dashboard;
pub mod data;
pub mod demo;
pub mod embedded;
pub mod engine;
pub mod exit;
pub mod failing;
pub mod fds;
pub mod html;
pub mod http;
pub mod jsonpath;
pub mod live;
pub mod mesh;
pub mod outputs;
pub mod pacing;
pub mod prometheus;
pub mod report;
pub mod results;
pub mod run;
pub mod settings;
pub mod status_http;
pub mod template;
pub mod terminal;
pub mod vu;
