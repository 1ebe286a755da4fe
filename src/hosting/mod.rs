//! hosting: the orchestrator (being written).

pub mod serve;
