//! stampede: a distributed load tester. The binary (`main.rs`) is only wiring; every
//! concern lives in a module of this library so that tests and the mesh reuse it.

pub mod http;
