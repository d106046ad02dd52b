//! TEMPORARY stub — replaced by the segments branch.
use serde::{Deserialize, Serialize};
use std::time::Duration;
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub target: u64,
    pub duration: Duration,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Executor {
    ConstantVus {
        vus: u64,
        duration: Duration,
    },
    RampingVus {
        start_vus: u64,
        stages: Vec<Stage>,
    },
    ConstantArrivalRate {
        rate: f64,
        duration: Duration,
        max_vus: u64,
        pre_allocated_vus: u64,
    },
    RampingArrivalRate {
        start_rate: f64,
        stages: Vec<Stage>,
        max_vus: u64,
        pre_allocated_vus: u64,
    },
    PerVuIterations {
        vus: u64,
        iterations: u64,
        max_duration: Duration,
    },
    SharedIterations {
        vus: u64,
        iterations: u64,
        max_duration: Duration,
    },
}
